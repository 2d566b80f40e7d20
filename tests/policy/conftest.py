"""Fixtures for the policy tests: small policies in temp dirs and a real OPA sidecar on them."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.policy.sidecar import OpaSidecar

# A tiny stand-in for the reference policy: enough to give each action a case.
POLICY = """package pgwarden

default decision := {"action": "deny", "reasons": ["no rule allows this"]}

decision := {"action": "allow", "reasons": ["reads are allowed"], "masks": masks} if {
    input.statement.category == "read"
}

decision := {"action": "approve", "reasons": ["writes need approval"], "approvers": ["admins"]} if {
    input.statement.category == "write"
    not "admins" in input.principal.groups
}

decision := {"action": "allow", "reasons": ["admins write"]} if {
    input.statement.category == "write"
    "admins" in input.principal.groups
}

masks contains {"schema": s, "table": t, "column": c, "method": m} if {
    some col in input.statement.columns
    s := col.schema
    t := col.table
    c := col.column
    m := data.pgwarden.classification[sprintf("%s.%s.%s", [s, t, c])]
}
"""

CLASSIFICATION = '{"classification": {"public.customers.email": "email"}}'


def write_policy(root: Path, policy: str = POLICY, revision: str = "test-1") -> tuple[Path, Path]:
    """A rego dir and a bundle dir (manifest + classification data) under `root`."""
    rego_dir = root / "rego"
    bundle_dir = root / "bundles"
    rego_dir.mkdir(parents=True, exist_ok=True)
    # The project's layout: bundles/pgwarden/data.json is data.pgwarden.
    data_dir = bundle_dir / "pgwarden"
    data_dir.mkdir(parents=True, exist_ok=True)
    (rego_dir / "decision.rego").write_text(policy)
    (bundle_dir / "pgwarden" / ".manifest").write_text(
        f'{{"revision": "{revision}", "roots": ["pgwarden"]}}'
    )
    (data_dir / "data.json").write_text(CLASSIFICATION)
    return rego_dir, bundle_dir


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path, so a Unix socket path inside it fits in sockaddr_un."""
    path = Path(tempfile.mkdtemp(prefix="pgw-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def policy_dirs(short_tmp: Path) -> tuple[Path, Path]:
    return write_policy(short_tmp / "src")


@pytest.fixture
async def sidecar(
    opa_binary: Path, short_tmp: Path, policy_dirs: tuple[Path, Path]
) -> AsyncIterator[OpaSidecar]:
    rego_dir, bundle_dir = policy_dirs
    opa = OpaSidecar(
        opa_binary=opa_binary,
        rego_dir=rego_dir,
        bundle_dir=bundle_dir,
        work_dir=short_tmp / "opa",
        poll_seconds=0.1,
    )
    await opa.start()
    try:
        yield opa
    finally:
        await opa.stop()
