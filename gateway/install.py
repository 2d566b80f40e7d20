"""Where this installation keeps what it ships besides code (the reference policy and its
data) and where it looks for the tools it runs, so that nothing depends on the directory
the gateway is started from."""

from __future__ import annotations

import sys
from pathlib import Path

# The folder holding the `gateway` package: a source checkout or an editable install.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
# Where a wheel install puts the policy folders (pyproject's shared-data).
SHARED_DATA = Path(sys.prefix) / "share" / "pgwarden"


def shipped(name: str) -> Path:
    """The shipped folder `name` (`rego`, `bundles`): the source tree's, else the wheel's."""
    for base in (SOURCE_ROOT, SHARED_DATA):
        if (base / name).is_dir():
            return base / name
    return SOURCE_ROOT / name


def tool_candidates(name: str) -> list[Path]:
    """Where a tool the installation brings may be: the project's `.pgwarden/bin` (make
    installs OPA there) and the virtualenv's `bin` beside this Python."""
    # sys.executable is not resolved: a virtualenv's python is a symlink out of its bin.
    return [SOURCE_ROOT / ".pgwarden" / "bin" / name, Path(sys.executable).parent / name]
