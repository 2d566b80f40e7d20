"""`pgwarden audit`: read, follow, search, verify, export and prune the audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cli.context import fail, settings_of
from gateway.audit import (
    AuditLogBusy,
    AuditStore,
    AuditStoreError,
    ChainGap,
    ChainProblem,
    ChainReport,
    RecordFilter,
    StoredRecord,
    VerifyReport,
    audit_keyring,
    audit_log,
    audit_store,
    audit_writer,
    head_witness,
    index_from_log,
    verify,
    write_ahead_audit,
)
from gateway.audit.records import parse_record_id
from gateway.audit.verify import compare_index, index_lag, verify_log
from gateway.proxy.ports import AuditUnavailable
from gateway.settings import Settings

app = typer.Typer(help="Read, verify, export and prune the audit trail.", no_args_is_help=True)

T = TypeVar("T")
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document per record.")]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"(\d+)([smhdw])")


def parse_age(text: str) -> float:
    """Seconds in an age such as `90d`, `12h` or `1d12h`."""
    value = text.strip().lower()
    if not value or not re.fullmatch(r"(?:\d+[smhdw])+", value):
        raise ValueError(f"bad age {text!r}: use a number with s, m, h, d or w (e.g. 90d)")
    return float(sum(int(n) * _UNITS[u] for n, u in _AGE.findall(value)))


def parse_when(text: str, now: float) -> float:
    """A point in time: an age back from now (`2h`), an ISO date/time, or unix seconds."""
    try:
        return now - parse_age(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"bad time {text!r}: use an age (2h), ISO time or unix seconds") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()


def _run(
    settings: Settings, work: Callable[[AuditStore], Awaitable[T]], *, catch_up: bool = True
) -> T:
    async def main() -> T:
        async with _opened(settings, catch_up=catch_up) as store:
            return await work(store)

    try:
        return asyncio.run(main())
    except (AuditStoreError, AuditUnavailable, ValueError, OSError) as exc:
        fail(str(exc))


@asynccontextmanager
async def _opened(settings: Settings, *, catch_up: bool = True) -> AsyncIterator[AuditStore]:
    """The store, first brought up to this instance's audit log (`catch_up`): what a gateway
    wrote to the log and had not indexed when it stopped (or was killed) is searchable."""
    store = audit_store(settings)
    await store.open()
    try:
        trail = audit_log(settings)
        if catch_up and trail.segments():
            try:
                await index_from_log(store, trail, settings.instance)
            except AuditStoreError as exc:
                typer.echo(
                    f"warning: the index could not be brought up to the log: {exc}", err=True
                )
        yield store
    finally:
        await store.close()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _as_json(r: StoredRecord) -> dict[str, Any]:
    return {"id": r.id, "pos": r.pos, "link": r.link.hex(), **r.envelope()}


def _summary(r: StoredRecord) -> str:
    rec = r.record()
    if r.kind == "request":
        return str(rec.get("text", ""))
    if r.kind == "outcome":
        if rec.get("sqlstate"):
            return f"→ {rec['request_id']} ERROR {rec['sqlstate']} {rec.get('error_message') or ''}"
        return f"→ {rec['request_id']} {rec.get('command_tag') or ''} ({rec['duration_ms']} ms)"
    if r.kind == "key_rotation":
        return f"key epoch {rec['from_epoch']} → {rec['to_epoch']}"
    if r.kind == "prune":
        return f"pruned through seq {rec['through_seq']}"
    return f"{rec.get('client_addr', '')} {rec.get('reason', '')}".strip()


def _print_records(records: list[StoredRecord], as_json: bool, console: Console) -> None:
    if as_json:
        for r in records:
            sys.stdout.write(orjson.dumps(_as_json(r)).decode() + "\n")
        sys.stdout.flush()
        return
    table = Table("id", "time", "kind", "subject", "target", "action", "statement / detail")
    for r in records:
        table.add_row(
            r.id, _iso(r.time), r.kind, r.subject or "", r.target or "", r.action or "",
            _summary(r)[:120],
        )  # fmt: skip
    console.print(table)


@app.command()
def tail(
    ctx: typer.Context,
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many recent records.")] = 20,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new ones.")] = False,
    follow_for: Annotated[float | None, typer.Option(hidden=True)] = None,
    as_json: JsonOption = False,
) -> None:
    """The most recent records, oldest first; -f follows new ones as they are written."""
    console = Console(width=200)

    async def work(store: AuditStore) -> None:
        recent = list(reversed(await store.search(RecordFilter(), lines)))
        _print_records(recent, as_json, console)
        if not follow:
            return
        pos = recent[-1].pos if recent else 0
        deadline = None if follow_for is None else time.monotonic() + follow_for
        while deadline is None or time.monotonic() < deadline:
            new = await store.after(pos, 1000)
            if new:
                _print_records(new, as_json, console)
                pos = new[-1].pos
            else:
                await asyncio.sleep(0.25)

    with contextlib.suppress(KeyboardInterrupt):
        _run(settings_of(ctx), work)


@app.command()
def search(
    ctx: typer.Context,
    subject: Annotated[str | None, typer.Option(help="Token subject, e.g. agent:ci-bot.")] = None,
    target: Annotated[str | None, typer.Option(help="Target name.")] = None,
    action: Annotated[str | None, typer.Option(help="allow, deny or approve.")] = None,
    kind: Annotated[str | None, typer.Option(help="Record kind, e.g. request.")] = None,
    session: Annotated[str | None, typer.Option(help="Session id.")] = None,
    since: Annotated[str | None, typer.Option(help="Age (2h), ISO time or unix time.")] = None,
    until: Annotated[str | None, typer.Option(help="Age (2h), ISO time or unix time.")] = None,
    text: Annotated[str | None, typer.Option(help="Substring of the statement.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Records matching every filter given, newest first."""
    now = time.time()
    try:
        where = RecordFilter(
            subject=subject, target=target, action=action, kind=kind, session_id=session,
            since=parse_when(since, now) if since else None,
            until=parse_when(until, now) if until else None,
            text=text,
        )  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    records = _run(settings_of(ctx), lambda store: store.search(where, limit))
    _print_records(records, as_json, Console(width=200))


@app.command()
def show(
    ctx: typer.Context,
    record_id: Annotated[str, typer.Argument(help="A record id such as gw-1:42.")],
    as_json: JsonOption = False,
) -> None:
    """One record in full, with its outcomes and recorded rows when it is a request."""
    parsed = parse_record_id(record_id)
    if parsed is None:
        fail(f"bad record id {record_id!r}: expected <instance>:<seq>")
    chain, seq = parsed

    async def work(store: AuditStore) -> tuple[StoredRecord | None, list[StoredRecord]]:
        record = await store.get(chain, seq)
        outcomes: list[StoredRecord] = []
        if record is not None and record.kind == "request":
            outcomes = await store.search(RecordFilter(request_id=record.id), 100)
        return record, list(reversed(outcomes))

    record, outcomes = _run(settings_of(ctx), work)
    if record is None:
        fail(f"no audit record {record_id}")
    if as_json:
        doc = _as_json(record)
        doc["outcomes"] = [_as_json(o) for o in outcomes]
        typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console(width=200)
    for r in (record, *outcomes):
        table = Table("field", "value", title=f"{r.id} ({r.kind})", title_justify="left")
        table.add_row("time", _iso(r.time))
        table.add_row("key epoch", str(r.epoch))
        table.add_row("link", r.link.hex())
        rows: list[list[str | None]] = []
        for key, value in sorted(r.record().items()):
            if key == "recorded_rows":
                rows = value
                continue
            shown = value if isinstance(value, str) else orjson.dumps(value).decode()
            table.add_row(key, shown)
        console.print(table)
        if rows:
            width = max(len(row) for row in rows)
            grid = Table(*(f"col {i + 1}" for i in range(width)), title="recorded rows")
            for row in rows:
                grid.add_row(*("NULL" if v is None else v for v in row))
            console.print(grid)


def _chain_json(c: ChainReport) -> dict[str, Any]:
    problem = c.problem
    return {
        "chain": c.chain,
        "records": c.records,
        "first_seq": c.first_seq,
        "last_seq": c.last_seq,
        "epoch": c.epoch,
        "head_checked": c.head_checked,
        "problem": None
        if problem is None
        else {"id": problem.id, "seq": problem.seq, "kind": problem.kind, "detail": problem.detail},
    }


@app.command("verify")
def verify_command(
    ctx: typer.Context,
    keys: Annotated[
        Path | None,
        typer.Option(help="Folder holding <chain>.genesis keys (default: the state dir's)."),
    ] = None,
    chain: Annotated[list[str] | None, typer.Option(help="Only this chain (repeatable).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Walk every chain; exit 1 naming the first bad record of each broken chain."""
    settings = settings_of(ctx)
    keyring = audit_keyring(settings, keys)
    heads = head_witness(settings)

    trail = audit_log(settings)
    with_log = bool(trail.segments()) and (chain is None or settings.instance in chain)

    async def work(store: AuditStore) -> tuple[VerifyReport, _LogCheck | None]:
        if not with_log:
            return await verify(store, keyring, heads, chain), None
        report = await verify(store, keyring, heads, chain)
        name = settings.instance
        checked = _LogCheck(
            await verify_log(trail, name, keyring, heads, store),
            await compare_index(store, trail, name),
            await index_lag(store, trail, name),
        )
        return _lag_is_not_truncation(report, checked), checked

    report, checked = _run(settings, work, catch_up=False)
    problems = [str(p) for p in report.problems]
    if checked is not None:
        if checked.log.problem is not None:
            problems.append(f"audit log: {checked.log.problem}")
        if checked.index is not None:
            problems.append(f"index: {checked.index}")
    if as_json:
        doc: dict[str, Any] = {
            "ok": not problems,
            "chains": [_chain_json(c) for c in report.chains],
        }
        if checked is not None:
            doc["log"] = {
                **_chain_json(checked.log),
                "index_problem": None if checked.index is None else str(checked.index),
                "index_lag": checked.lag,
            }
        typer.echo(orjson.dumps(doc).decode())
    else:
        table = Table("chain", "records", "seq", "key epoch", "head", "status")
        for c in report.chains:
            span = "" if c.first_seq is None else f"{c.first_seq}..{c.last_seq}"
            status = "[green]ok[/]" if c.problem is None else f"[red]{c.problem}[/]"
            table.add_row(
                c.chain, str(c.records), span, str(c.epoch),
                "checked" if c.head_checked else "none", status,
            )  # fmt: skip
        if checked is not None:
            c = checked.log
            span = "" if c.first_seq is None else f"{c.first_seq}..{c.last_seq}"
            status = "[green]ok[/]" if c.problem is None else f"[red]{c.problem}[/]"
            table.add_row(
                f"{c.chain} (log)", str(c.records), span, str(c.epoch),
                "checked" if c.head_checked else "none", status,
            )  # fmt: skip
        Console(width=200).print(table)
        if checked is not None:
            typer.echo(f"index lag: {checked.lag} records of the log not yet in the store")
    if not report.chains and checked is None:
        fail("no audit chains found")
    if problems:
        fail("; ".join(problems))


def _lag_is_not_truncation(report: VerifyReport, checked: _LogCheck) -> VerifyReport:
    """The head witness follows the log, which the index may lag (a gateway killed before
    indexing its last records): an index that ends before the witness while the verified
    log holds all it names is behind, not truncated (the lag is reported)."""
    log_report = checked.log
    chains = []
    for c in report.chains:
        p = c.problem
        if (
            c.chain == log_report.chain
            and p is not None
            and p.kind == "truncated"
            and log_report.problem is None
            and checked.index is None
            and checked.lag > 0
        ):
            c = dataclasses.replace(c, problem=None)
        chains.append(c)
    return VerifyReport(tuple(chains))


@dataclasses.dataclass(frozen=True, slots=True)
class _LogCheck:
    log: ChainReport
    # The first index record that differs from the log, and how far the index lags it.
    index: ChainProblem | None
    lag: int


@app.command()
def export(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", help="Only jsonl.")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File (default stdout).")
    ] = None,
    chain: Annotated[list[str] | None, typer.Option(help="Only this chain (repeatable).")] = None,
) -> None:
    """Stream every record as one JSON line (signed body and link), chain by chain."""
    if fmt != "jsonl":
        fail(f"unknown export format {fmt!r}: only jsonl")

    async def work(store: AuditStore) -> int:
        count = 0
        sink = output.open("wb") if output is not None else sys.stdout.buffer
        try:
            for name in chain or await store.chains():
                buffer: list[bytes] = []
                async for r in store.scan(name, batch=2000):
                    buffer.append(orjson.dumps(_as_json(r)) + b"\n")
                    if len(buffer) >= 2000:
                        sink.write(b"".join(buffer))
                        buffer.clear()
                    count += 1
                sink.write(b"".join(buffer))
            sink.flush()
        finally:
            if output is not None:
                sink.close()
        return count

    count = _run(settings_of(ctx), work)
    if output is not None:
        typer.echo(f"exported {count} records to {output}", err=True)


@app.command()
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(help="Age such as 90d (default: the audit.retention_days setting)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Delete this instance's records older than the age, leaving a signed anchor."""
    settings = settings_of(ctx)
    try:
        if older_than is not None:
            age = parse_age(older_than)
        elif settings.audit.retention_days is not None:
            age = settings.audit.retention_days * 86400.0
        else:
            fail("give --older-than or set audit.retention_days")
    except ValueError as exc:
        fail(str(exc))
    cutoff = time.time() - age

    async def work(store: AuditStore) -> Any:
        if audit_log(settings).segments():
            # The log is the trail: the prune record goes into it, the running gateway
            # (which holds the log) must be stopped first.
            try:
                wal = write_ahead_audit(settings, store)
                await wal.start()
            except AuditLogBusy as exc:
                raise AuditStoreError(f"{exc}: stop it to prune") from exc
            except ChainGap as exc:
                raise AuditStoreError(str(exc)) from exc
            try:
                return await wal.prune(cutoff)
            finally:
                await wal.close()
        writer = audit_writer(settings, store)
        await writer.start()
        try:
            return await writer.prune(cutoff)
        finally:
            await writer.close()

    anchor = _run(settings, work)
    through = None if anchor is None else anchor.through_seq
    if as_json:
        typer.echo(orjson.dumps({"chain": settings.instance, "through_seq": through}).decode())
    elif through is None:
        typer.echo(f"nothing older than {_iso(cutoff)} in chain {settings.instance}")
    else:
        typer.echo(f"pruned chain {settings.instance} through seq {through}; anchor written")
