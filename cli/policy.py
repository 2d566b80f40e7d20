"""`pgwarden policy`: test, build and try out the Rego policy that decides every statement."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import orjson
import typer

from cli.context import control_client, fail, settings_of
from gateway.audit.events import ApprovalEvent, SessionEvent, StatementOutcome, StatementRequest
from gateway.control.targets import Target, parse_dbname
from gateway.guards.estimate import EXPLAIN, NotExplained, rejection
from gateway.guards.rules import OpaSessionRules, RulesUnavailable
from gateway.identity.principal import Principal
from gateway.policy.bundle import BundleError, build_bundle, read_manifest
from gateway.policy.decision import Decision
from gateway.policy.input import TargetInfo, target_input
from gateway.policy.opa import OpaDecider
from gateway.policy.sidecar import OpaSidecar, SidecarError, opa_binary_of
from gateway.policy.transport import OpaTransport
from gateway.proxy.gate import SessionContext, StatementGate
from gateway.proxy.ports import Decider
from gateway.proxy.tracker import StatementRun
from gateway.runtime import catalog_connector
from gateway.settings import Settings
from gateway.sql.analyzer import StatementAnalyzer
from gateway.sql.catalog import DEFAULT_SEARCH_PATH, Catalog, parse_search_path
from gateway.sql.prepared import PreparedStatements

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
    """The decision the gateway would make for each statement of SQL, without running it: the
    gate itself builds the input, against the target's catalog (names resolved, `*`
    expanded), and says which masks it would apply and what it could not resolve."""
    settings = settings_of(ctx)
    principal = Principal(
        subject=subject,
        issuer="pgwarden policy eval",
        groups=tuple(group or ()),
        token_id=f"eval-{uuid.uuid4()}",
        expires_at=None,
        claims={"sub": subject, "groups": list(group or ())},
    )
    name, database = parse_dbname(target)
    with control_client(settings) as control:
        registered = control.target(name)
    chosen = registered.database_for(database) if registered is not None else database or name
    session = SessionContext(
        instance=settings.instance,
        session_id=str(uuid.uuid4()),
        client_addr="127.0.0.1",
        application_name="pgwarden policy eval",
        startup_user=subject,
        principal=principal,
        target_name=name,
        target_database=chosen,
        target_labels=dict(registered.labels) if registered is not None else {},
        target_default_database=registered.dbname if registered is not None else name,
        target_databases=registered.databases if registered is not None else (),
    )
    results = asyncio.run(_evaluate(settings, registered, session, sql, in_transaction))
    if not results:
        fail("no statement in the SQL text")
    for result in results:
        typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


class _NoAudit:
    """policy eval runs nothing, so it records nothing."""

    async def request(self, record: StatementRequest) -> str:
        return ""

    def request_soon(self, record: StatementRequest) -> asyncio.Future[str]:
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        done.set_result("")
        return done

    async def outcome(self, record: StatementOutcome) -> None:
        return None

    def outcome_nowait(self, record: StatementOutcome) -> None:
        return None

    async def session(self, event: SessionEvent) -> None:
        return None

    async def approval(self, event: ApprovalEvent) -> None:
        return None


class _InputsSeen:
    """The decider the gate asks, keeping each input as the gate built it."""

    def __init__(self, inner: Decider) -> None:
        self.inner = inner
        self.inputs: list[dict[str, Any]] = []

    async def decide(self, policy_input: dict[str, Any], *, not_after: float | None) -> Decision:
        self.inputs.append(policy_input)
        return await self.inner.decide(policy_input, not_after=not_after)


async def _evaluate(
    settings: Settings,
    target: Target | None,
    session: SessionContext,
    sql: str,
    in_transaction: bool,
) -> list[dict[str, Any]]:
    notes: list[str] = []
    catalog: Catalog | None = None
    search_path = DEFAULT_SEARCH_PATH
    if target is None:
        notes.append(
            f"target {session.target_name!r} is not registered here: names are not resolved"
            " against a catalog, `*` is not expanded and masks are not placed"
        )
    else:
        connect = catalog_connector(target, session.target_database, os.environ)
        try:
            conn = await connect()
            try:
                search_path = parse_search_path(str(await conn.fetchval("SHOW search_path")))
            finally:
                await conn.close()
            catalog = Catalog(connect, idle_seconds=0)
        except Exception as exc:  # whatever the driver raised: said, and decided without it
            notes.append(
                f"could not log in to target {target.name} ({' '.join(str(exc).split())}):"
                " names are not resolved against its catalog, `*` is not expanded and masks"
                " are not placed; the live decision may differ"
            )
    try:
        async with _throwaway_decider(settings) as (decider, rules):
            seen = _InputsSeen(decider)
            gate = StatementGate(
                session,
                analyzer=StatementAnalyzer(),
                prepared=PreparedStatements(),
                catalog=catalog,
                decider=seen,
                audit=_NoAudit(),
            )
            gate.search_path = search_path
            gate.upstream_user = target.user if target is not None else None
            gate.in_transaction = in_transaction
            if catalog is not None and target is not None:
                await _estimates_as_live(gate, rules, session, target, notes)
            verdict = await gate.check_query(sql)
    finally:
        if catalog is not None:
            await catalog.close()
    runs: list[StatementRun | None] = [*verdict.runs]
    results = []
    for i, decision in enumerate(verdict.decisions):
        # A refusal pgwarden makes itself (e.g. statements after SET search_path) asks no OPA.
        policy_input = seen.inputs[i] if i < len(seen.inputs) else None
        results.append(_result(policy_input, decision, runs[i] if i < len(runs) else None, notes))
    return results


async def _estimates_as_live(
    gate: StatementGate,
    rules: OpaSessionRules,
    session: SessionContext,
    target: Target,
    notes: list[str],
) -> None:
    """Where the session rule asks for estimates, the gate explains as a live session does,
    on a connection of its own to the target under the search_path read on the catalog's
    (nothing runs: EXPLAIN without ANALYZE)."""
    policy_input = {
        "version": 1,
        "principal": session.principal.to_input(),
        "target": target_input(
            TargetInfo(
                target.name,
                session.target_database,
                target.labels,
                target.dbname,
                target.databases,
            )
        ),
    }
    try:
        guards = await rules.for_session(policy_input)
    except RulesUnavailable as exc:
        notes.append(f"the session rule could not be read ({exc}): nothing is estimated")
        return
    if guards.estimate_seq_scan_rows is None:
        return
    connect = catalog_connector(target, session.target_database, os.environ)

    async def explain(text: str, param_types: tuple[int, ...] | None) -> str | NotExplained:
        conn = await connect()
        try:
            return str(await conn.fetchval(EXPLAIN + text))
        except asyncpg.PostgresError as exc:
            return rejection(str(exc.sqlstate or ""))
        finally:
            await conn.close()

    gate.explain = explain
    gate.estimate_seq_scan_rows = guards.estimate_seq_scan_rows
    gate.estimate_plan_rows = guards.estimate_plan_rows


def _result(
    policy_input: dict[str, Any] | None,
    decision: Decision,
    run: StatementRun | None,
    notes: list[str],
) -> dict[str, Any]:
    flags = run.facts.flags if run is not None and run.facts is not None else ()
    unresolved = [_UNRESOLVED[flag] for flag in flags if flag in _UNRESOLVED]
    return {
        "input": policy_input,
        "decision": decision_document(decision),
        "masks_applied": _masks_applied(decision, run),
        "unresolved": notes + unresolved,
    }


# Flags that say the analysis, and so the decision, rests on something it could not see.
_UNRESOLVED = {
    "unresolved_relation": "a relation it names is not in the target's catalog (as the"
    " session's search_path reads it): its schema is empty in the input",
    "catalog_unavailable": "the target's catalog could not be read: names are not resolved",
    "opaque_function": "it calls a function pgwarden cannot see into: its reads are unknown",
    "analysis_error": "the text could not be analysed (category unknown)",
}


_ONE_SOURCE = (
    "its column's mask where the result column is that column itself; the whole value"
    " (redact) where it is an expression of it"
)


def _masks_applied(decision: Decision, run: StatementRun | None) -> list[dict[str, Any]] | str:
    """Which output columns the gateway would mask, and how: a base column by its own mask
    (found by table OID in the result), an expression a masked column flows into whole."""
    if not decision.masks or decision.action != "allow":
        return []
    if run is not None and (run.mask_all or run.lineage is None):
        return (
            "every column a masked column may reach is masked whole: the statement's lineage"
            " is unknown (masks by name: "
            + ", ".join(f"{m.schema}.{m.table}.{m.column} → {m.method}" for m in decision.masks)
            + ")"
        )
    by_column = {(m.schema, m.table, m.column): m.method for m in decision.masks}
    tables = {(m.schema, m.table) for m in decision.masks}
    facts = run.facts if run is not None else None
    outputs = facts.outputs if facts is not None and facts.outputs is not None else ()
    applied: list[dict[str, Any]] = []
    for position, output in enumerate(outputs, start=1):
        sources = sorted(output.sources)
        masked = [s for s in sources if s in by_column or (s[2] == "*" and (s[0], s[1]) in tables)]
        if not masked:
            continue
        if len(masked) == 1 and masked[0] in by_column:
            # The server tells at run time (table OID in RowDescription) whether the result
            # column is the column itself; the text alone does not.
            method, how = by_column[masked[0]], _ONE_SOURCE
        else:
            method, how = "redact", "whole value: several masked columns flow into it"
        applied.append(
            {"output": position, "from": [".".join(s) for s in masked], "method": method,
             "how": how}
        )  # fmt: skip
    return applied


def decision_document(decision: Decision) -> dict[str, Any]:
    """A decision as JSON, in the shape the policy answers with, plus what pgwarden adds."""
    return {
        "action": decision.action,
        "reasons": list(decision.reasons),
        "approvers": list(decision.approvers),
        "approvers_required": decision.approvers_required,
        "masks": [
            {"schema": m.schema, "table": m.table, "column": m.column, "method": m.method}
            for m in decision.masks
        ],
        "decision_id": decision.decision_id,
        "bundle_revision": decision.bundle_revision,
    }


@asynccontextmanager
async def _throwaway_decider(
    settings: Settings,
) -> AsyncIterator[tuple[Decider, OpaSessionRules]]:
    """OPA on the policy sources as they are now, for as long as the block runs."""
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
            timeout = max(settings.policy.timeout_seconds, 5.0)
            transport = OpaTransport(
                sidecar.url, decision_path=settings.policy.decision_path, timeout_seconds=timeout
            )
            try:
                rules = OpaSessionRules(
                    transport, path=settings.policy.session_path, timeout_seconds=timeout
                )
                yield OpaDecider(transport, timeout_seconds=timeout), rules
            finally:
                await transport.aclose()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
