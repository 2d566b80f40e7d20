"""`pgwarden policy`: test, build and try out the Rego policy that decides every statement."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from cli.context import fail, settings_of
from gateway.identity.principal import Principal
from gateway.policy.bundle import BundleError, build_bundle, read_manifest
from gateway.policy.decision import Decision
from gateway.policy.input import SessionInfo, TargetInfo, build_input
from gateway.policy.opa import OpaDecider
from gateway.policy.sidecar import OpaSidecar, SidecarError, opa_binary_of
from gateway.policy.transport import OpaTransport
from gateway.proxy.targets import TargetError, TargetRegistry, parse_dbname
from gateway.settings import Settings

app = typer.Typer(help="Test, build and evaluate the Rego policy.", no_args_is_help=True)

BUNDLE_NAME = "pgwarden.tar.gz"


def _opa(settings: Settings) -> Path:
    try:
        return opa_binary_of(settings)
    except SidecarError as exc:
        fail(str(exc))


@app.command("test")
def test(ctx: typer.Context) -> None:
    """Run `opa test` on the policy with its bundle data; print the coverage figure."""
    settings = settings_of(ctx)
    opa = _opa(settings)
    rego_dir, bundle_dir = settings.policy.rego_dir, settings.policy.bundle_dir
    if not rego_dir.is_dir():
        fail(f"no policy directory at {rego_dir}")
    paths = [str(rego_dir)] + ([str(bundle_dir)] if bundle_dir.is_dir() else [])
    # The built tarballs sit in bundles/ and would load as data a second time.
    ignore = ["--ignore", "*.tar.gz"]
    run = subprocess.run(
        [str(opa), "test", *ignore, *paths], capture_output=True, text=True, check=False
    )
    typer.echo((run.stdout + run.stderr).rstrip())
    if run.returncode != 0:
        fail("policy tests failed", run.returncode)
    coverage = subprocess.run(
        [str(opa), "test", "--coverage", "--format", "json", *ignore, *paths],
        capture_output=True,
        check=False,
    )
    try:
        figure = float(orjson.loads(coverage.stdout)["coverage"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        fail("opa test --coverage gave no coverage figure")
    typer.echo(f"coverage: {figure:.1f}%")


@app.command("build")
def build(ctx: typer.Context) -> None:
    """Build the policy bundle (bundles/pgwarden.tar.gz) carrying the manifest's revision."""
    settings = settings_of(ctx)
    opa = _opa(settings)
    out = settings.policy.bundle_dir / BUNDLE_NAME
    try:
        revision = read_manifest(settings.policy.bundle_dir).get("revision")
        build_bundle(opa, settings.policy.rego_dir, settings.policy.bundle_dir, out, revision=None)
    except BundleError as exc:
        fail(f"policy does not build: {exc}")
    typer.echo(f"built {out} (revision {revision or 'none'})")


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    sql: Annotated[str, typer.Argument(help="The SQL text to decide (it is never run).")],
    subject: Annotated[str, typer.Option(help="The principal's subject.")],
    target: Annotated[
        str,
        typer.Option(help="The target (dbname: TARGET or TARGET/DATABASE) the statement goes to."),
    ],
    group: Annotated[
        list[str] | None, typer.Option(help="A group of the principal; repeatable.")
    ] = None,
    in_transaction: Annotated[
        bool, typer.Option(help="Decide as if inside an explicit transaction.")
    ] = False,
) -> None:
    """Print the policy input and the decision for each statement of SQL, without running it."""
    from gateway.sql.analysis import analyze

    settings = settings_of(ctx)
    statements = analyze(sql)
    if not statements:
        fail("no statement in the SQL text")
    principal = Principal(
        subject=subject,
        issuer="pgwarden policy eval",
        groups=tuple(group or ()),
        token_id=f"eval-{uuid.uuid4()}",
        expires_at=None,
        claims={"sub": subject, "groups": list(group or ())},
    )
    try:
        name, database = parse_dbname(target)
    except TargetError as exc:
        fail(str(exc))
    registered = TargetRegistry(settings.state_dir / "targets.json").get(name)
    default = registered.dbname if registered is not None else name
    target_info = TargetInfo(
        name=name,
        database=database or default,
        labels=registered.labels if registered is not None else {},
        default_database=default,
        databases=registered.databases if registered is not None else (),
    )
    session = SessionInfo(
        id=str(uuid.uuid4()),
        client_addr="127.0.0.1",
        application_name="pgwarden policy eval",
        user=subject,
        in_transaction=in_transaction,
    )
    inputs = [
        build_input(
            principal,
            target_info,
            session,
            facts.to_input(protocol="simple", index=i, count=len(statements)),
        )
        for i, facts in enumerate(statements)
    ]
    try:
        decisions = asyncio.run(_decide_with_throwaway_opa(settings, inputs))
    except SidecarError as exc:
        fail(str(exc))
    for policy_input, decision in zip(inputs, decisions, strict=True):
        document = {"input": policy_input, "decision": decision_document(decision)}
        typer.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


def decision_document(decision: Decision) -> dict[str, Any]:
    """A decision as JSON, in the shape the policy answers with, plus what pgwarden adds."""
    return {
        "action": decision.action,
        "reasons": list(decision.reasons),
        "approvers": list(decision.approvers),
        "masks": [
            {"schema": m.schema, "table": m.table, "column": m.column, "method": m.method}
            for m in decision.masks
        ],
        "decision_id": decision.decision_id,
        "bundle_revision": decision.bundle_revision,
    }


async def _decide_with_throwaway_opa(
    settings: Settings, inputs: list[dict[str, Any]]
) -> list[Decision]:
    # A short temp path: the sidecar's Unix socket lives inside it.
    work_dir = Path(tempfile.mkdtemp(prefix="pgw-eval-"))
    sidecar = OpaSidecar(
        opa_binary=_opa(settings),
        rego_dir=settings.policy.rego_dir,
        bundle_dir=settings.policy.bundle_dir,
        work_dir=work_dir,
    )
    try:
        async with sidecar:
            transport = OpaTransport(
                sidecar.url,
                decision_path=settings.policy.decision_path,
                timeout_seconds=max(settings.policy.timeout_seconds, 5.0),
            )
            decider = OpaDecider(
                transport, timeout_seconds=max(settings.policy.timeout_seconds, 5.0)
            )
            try:
                return [await decider.decide(i, not_after=None) for i in inputs]
            finally:
                await transport.aclose()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
