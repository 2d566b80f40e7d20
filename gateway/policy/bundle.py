"""Turn the policy sources (rego dir + bundle data dir) into one OPA bundle, with a revision."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

MANIFEST = ".manifest"


class BundleError(Exception):
    """The policy sources could not be made into a bundle; the message says why."""


def bundle_source(bundle_dir: Path) -> Path | None:
    """The directory holding the bundle's .manifest: bundle_dir itself or one folder below."""
    if (bundle_dir / MANIFEST).is_file():
        return bundle_dir
    found = sorted(p.parent for p in bundle_dir.glob(f"*/{MANIFEST}"))
    if len(found) > 1:
        raise BundleError(f"several bundle manifests under {bundle_dir}: {found}")
    return found[0] if found else None


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    """The bundle's manifest (empty when the sources have none)."""
    source = bundle_source(bundle_dir)
    if source is None:
        return {}
    try:
        manifest = orjson.loads((source / MANIFEST).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise BundleError(f"unreadable manifest {source / MANIFEST}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"manifest {source / MANIFEST} is not a JSON object")
    return manifest


def source_files(rego_dir: Path, bundle_dir: Path, *, tests: bool = False) -> list[Path]:
    """Every file that makes up the policy, in a stable order."""
    files = [p for p in _rego_files(rego_dir) if tests or not _is_test(p)]
    if bundle_dir.is_dir():
        files += sorted(p for p in bundle_dir.rglob("*") if p.is_file() and not _is_built(p))
    return files


# A Rego string: "..." with escapes, or a raw `...` string.
_REGO_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"|`([^`]*)`')


def mentioned_strings(rego_dir: Path, bundle_dir: Path) -> set[str] | None:
    """Every string the policy's sources spell out (Rego literals outside tests, and the
    strings anywhere in its data): what a group name must be among for the policy to treat
    it apart from any other. None when there are no sources here to read."""
    files = source_files(rego_dir, bundle_dir)
    if not any(p.suffix == ".rego" for p in files):
        return None
    found: set[str] = set()
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".rego":
            for quoted, raw in _REGO_STRING.findall(text):
                found.add(raw or _unescape(quoted))
        elif path.suffix == ".json":
            try:
                _collect_strings(orjson.loads(text), found)
            except orjson.JSONDecodeError:
                continue
    return found


def _unescape(quoted: str) -> str:
    try:
        value = orjson.loads(f'"{quoted}"')
    except orjson.JSONDecodeError:
        return quoted
    return value if isinstance(value, str) else quoted


def _collect_strings(value: Any, found: set[str]) -> None:
    if isinstance(value, str):
        found.add(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            found.add(key)
            _collect_strings(item, found)
    elif isinstance(value, list):
        for item in value:
            _collect_strings(item, found)


def source_stamp(rego_dir: Path, bundle_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """Cheap change detector: names, sizes and mtimes of the source files."""
    stamp = []
    for path in source_files(rego_dir, bundle_dir):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        stamp.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def source_digest(rego_dir: Path, bundle_dir: Path) -> str:
    """A digest of the sources' names and contents: edits show even without a revision bump."""
    digest = hashlib.blake2b(digest_size=16)
    for path in source_files(rego_dir, bundle_dir):
        digest.update(str(path).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def stage(rego_dir: Path, bundle_dir: Path, dest: Path, *, tests: bool = False) -> None:
    """Lay out one bundle directory from the two source trees.

    Both trees keep their relative paths, as `opa run rego bundles` would read them:
    `bundles/pgwarden/data.json` is `data.pgwarden`, and the manifest goes to the root.
    OPA refuses `rego/` and `bundles/` as two bundles, because both own the same root.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if bundle_dir.is_dir():
        shutil.copytree(
            bundle_dir,
            dest,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("*.tar.gz", ".*.partial", MANIFEST),
        )
    for path in _rego_files(rego_dir):
        if tests or not _is_test(path):
            target = dest / path.relative_to(rego_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    source = bundle_source(bundle_dir) if bundle_dir.is_dir() else None
    if source is not None:
        shutil.copy2(source / MANIFEST, dest / MANIFEST)


def build_bundle(
    opa_binary: Path, rego_dir: Path, bundle_dir: Path, out: Path, *, revision: str | None
) -> None:
    """`opa build` the sources into `out`, replaced atomically; BundleError on failure."""
    if not any(True for _ in _rego_files(rego_dir)):
        raise BundleError(f"no .rego files under {rego_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pgwarden-bundle-") as tmp:
        staged = Path(tmp) / "bundle"
        stage(rego_dir, bundle_dir, staged)
        partial = out.with_name(f".{out.name}.partial")
        command = [
            str(opa_binary.resolve()),
            "build",
            "--bundle",
            ".",
            "-o",
            str(partial.resolve()),
        ]
        if revision is not None:
            command += ["--revision", revision]
        # Built from inside the stage, so module paths in the bundle read /pgwarden/x.rego.
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=staged)
        except OSError as exc:
            raise BundleError(f"cannot run {opa_binary}: {exc}") from exc
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise BundleError(_first_error(done.stderr or done.stdout))
        # A rename, so that OPA's --watch never reads a half-written bundle.
        partial.replace(out)


def _rego_files(rego_dir: Path) -> Iterator[Path]:
    return iter(sorted(rego_dir.rglob("*.rego"))) if rego_dir.is_dir() else iter(())


def _is_test(path: Path) -> bool:
    return path.name.endswith("_test.rego")


def _is_built(path: Path) -> bool:
    return path.name.endswith((".tar.gz", ".partial"))


def _first_error(text: str) -> str:
    """OPA's first error line (the one naming the file and the problem)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "opa build failed"
    first = lines[0]
    if first.rstrip(":").endswith(("errors occurred", "error occurred")) and len(lines) > 1:
        first = lines[1]
    return first.removeprefix("error: ")
