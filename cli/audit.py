"""`pgwarden audit`: read, follow, search, verify, export and prune the audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cli.context import fail, literal_console, settings_of
from gateway.audit import (
    Anchor,
    AuditLogBusy,
    AuditStore,
    AuditStoreError,
    ChainGap,
    RecordFilter,
    StoredRecord,
    audit_keyring,
    audit_log,
    audit_store,
    audit_writer,
    head_witness,
    index_from_log,
    write_ahead_audit,
)
from gateway.audit.chain_state import TrailState, trail_state
from gateway.audit.records import RECORD_KINDS, parse_record_id
from gateway.audit.search import (
    SEARCH_ACTIONS,
    AuditQuery,
    BadSearch,
    parse_age,
    parse_when,
    record_summary,
)
from gateway.proxy.ports import AuditUnavailable
from gateway.settings import Settings

app = typer.Typer(help="Read, verify, export and prune the audit trail.", no_args_is_help=True)

T = TypeVar("T")
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document per record.")]

_RETENTION = re.compile(r"(?:\d+[dh])+")


def parse_retention(text: str) -> float:
    """Seconds in a retention such as `90d`, `36h` or `30d12h`: days and hours only, so that
    a minute or a second is never mistaken for a month."""
    value = text.strip().lower()
    if not _RETENTION.fullmatch(value):
        raise ValueError(f"bad age {text!r}: use days or hours, e.g. 90d or 36h")
    return parse_age(value)


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
            record_summary(r.kind, r.record())[:120],
        )  # fmt: skip
    console.print(table)


@app.command()
def tail(
    ctx: typer.Context,
    lines: Annotated[
        int, typer.Option("-n", "--lines", min=0, help="How many recent records (0 or more).")
    ] = 20,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new ones.")] = False,
    follow_for: Annotated[float | None, typer.Option(hidden=True)] = None,
    as_json: JsonOption = False,
) -> None:
    """The most recent records, oldest first; -f follows new ones as they are written."""
    console = literal_console()

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
    group: Annotated[str | None, typer.Option(help="One of the token's groups.")] = None,
    target: Annotated[str | None, typer.Option(help="Target name.")] = None,
    action: Annotated[
        str | None,
        typer.Option(help=f"The decision: {', '.join(SEARCH_ACTIONS)} (mask: allowed, masked)."),
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help=f"Record kind: {', '.join(RECORD_KINDS)}.")
    ] = None,
    session: Annotated[str | None, typer.Option(help="Session id.")] = None,
    since: Annotated[str | None, typer.Option(help="Age (2h), ISO time or unix time.")] = None,
    until: Annotated[str | None, typer.Option(help="Age (2h), ISO time or unix time.")] = None,
    text: Annotated[str | None, typer.Option(help="Substring of the statement.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Records matching every filter given, newest first."""
    now = time.time()
    try:
        # A value no record can hold would find nothing and read as "no such records".
        where = AuditQuery(
            subject=subject, group=group, target=target, action=action, kind=kind,
            session_id=session,
            since=parse_when(since, now) if since else None,
            until=parse_when(until, now) if until else None,
            text=text,
        ).record_filter()  # fmt: skip
    except BadSearch as exc:
        fail(f"bad --{exc.field} {exc.detail}")
    except ValueError as exc:
        fail(str(exc))
    records = _run(settings_of(ctx), lambda store: store.search(where, limit))
    _print_records(records, as_json, literal_console())


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
    console = literal_console()
    for r in (record, *outcomes):
        table = Table(title=f"{r.id} ({r.kind})", title_justify="left")
        table.add_column("field", no_wrap=True)
        # Folded, never cut: a decision's reasons are what the reader came for.
        table.add_column("value", overflow="fold")
        table.add_row("time", _iso(r.time))
        table.add_row("key epoch", str(r.epoch))
        table.add_row("link", r.link.hex())
        fields = r.record()
        rows: list[list[str | None]] = fields.pop("recorded_rows", None) or []
        columns: list[str] = fields.pop("recorded_columns", None) or []
        for key, shown in _flattened(fields):
            table.add_row(key, shown)
        console.print(table)
        if rows:
            width = max(len(row) for row in rows)
            names = [*columns[:width], *(f"col {i + 1}" for i in range(len(columns), width))]
            grid = Table(*names, title="recorded rows", title_justify="left")
            for row in rows:
                grid.add_row(*("NULL" if v is None else v for v in row))
            console.print(grid)


def _flattened(value: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A record's fields one per row, nested ones by their path (decision.reasons[0]), so
    that each reason, mask and approver is printed whole on a row of its own."""
    out: list[tuple[str, str]] = []
    for key, item in sorted(value.items()):
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            out.extend(_flattened(item, f"{name}."))
        elif isinstance(item, list) and item and key == "masks":
            for i, mask in enumerate(item):
                shown = (
                    f"{mask.get('schema')}.{mask.get('table')}.{mask.get('column')}"
                    f" → {mask.get('method')}"
                    if isinstance(mask, dict)
                    else orjson.dumps(mask).decode()
                )
                out.append((f"{name}[{i}]", shown))
        elif isinstance(item, list) and item:
            for i, element in enumerate(item):
                shown = element if isinstance(element, str) else orjson.dumps(element).decode()
                out.append((f"{name}[{i}]", shown))
        else:
            out.append((name, item if isinstance(item, str) else orjson.dumps(item).decode()))
    return out


@app.command("verify")
def verify_command(
    ctx: typer.Context,
    keys: Annotated[
        Path | None,
        typer.Option(help="Folder holding <chain>.genesis keys (default: the state dir's)."),
    ] = None,
    chain: Annotated[list[str] | None, typer.Option(help="Only this chain (repeatable).")] = None,
    no_head: Annotated[
        bool,
        typer.Option(
            "--no-head",
            help="Pass a chain that has no head witness here (written on another host);"
            " a tail cut from it then goes unnoticed.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Walk every chain; exit 1 naming the first bad record of each broken chain."""
    settings = settings_of(ctx)
    keyring = audit_keyring(settings, keys)
    heads = head_witness(settings)
    trail = audit_log(settings)

    async def work(store: AuditStore) -> TrailState:
        return await trail_state(
            store, keyring, heads, trail, settings.instance, chain, require_head=not no_head
        )

    state = _run(settings, work, catch_up=False)
    if as_json:
        typer.echo(orjson.dumps(state.as_json()).decode())
    else:
        table = Table("chain", "records", "seq", "key epoch", "head", "status")
        rows = [(c, c.chain) for c in state.store.chains]
        if state.log is not None:
            rows.append((state.log.log, f"{state.log.log.chain} (log)"))
        for c, name in rows:
            span = "" if c.first_seq is None else f"{c.first_seq}..{c.last_seq}"
            status = (
                Text("ok", style="green")
                if c.problem is None
                else Text(str(c.problem), style="red")
            )
            table.add_row(
                name, str(c.records), span, str(c.epoch),
                "checked" if c.head_checked else "none", status,
            )  # fmt: skip
        literal_console().print(table)
        if state.log is not None:
            typer.echo(f"index lag: {state.log.lag} records of the log not yet in the store")
    if state.empty:
        fail("no audit chains found")
    if state.problems:
        fail("; ".join(state.problems))


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
        typer.Option(help="Days or hours, e.g. 90d (default: the audit.retention_days setting)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete this instance's records older than the age, leaving a signed anchor; never
    younger than audit.retention_floor_days."""
    settings = settings_of(ctx)
    try:
        if older_than is not None:
            age = parse_retention(older_than)
        elif settings.audit.retention_days is not None:
            age = settings.audit.retention_days * 86400.0
        else:
            fail("give --older-than or set audit.retention_days")
    except ValueError as exc:
        fail(str(exc))
    floor = settings.audit.retention_floor_days
    if age < floor * 86400:
        fail(
            f"refusing to prune records younger than audit.retention_floor_days ({floor}d);"
            " lower that setting to prune closer to now"
        )
    cutoff = time.time() - age
    chain = settings.instance

    async def work(store: AuditStore) -> PruneSpan | None:
        # The store has been brought up to the log (`_run`), so it names what both hold.
        span = await _prunable(store, chain, cutoff)
        if span is None or dry_run:
            return span
        anchor = await _prune(settings, store, cutoff)
        # What the store removed: up to the anchor, which a record written meanwhile with an
        # older clock may have moved past the span read first.
        return None if anchor is None else span.through(anchor.through_seq)

    span = _run(settings, work)
    if as_json:
        doc: dict[str, Any] = {"chain": chain, "dry_run": dry_run, "cutoff": _iso(cutoff)}
        doc.update(span.as_json() if span is not None else {"records": 0})
        typer.echo(orjson.dumps(doc).decode())
    elif span is None:
        typer.echo(f"nothing older than {_iso(cutoff)} in chain {chain}")
    else:
        verb = "would remove" if dry_run else "removed"
        tail = "" if dry_run else "; a signed prune anchor keeps the rest verifiable"
        typer.echo(f"{verb} {span} from chain {chain}{tail}")


async def _prune(settings: Settings, store: AuditStore, cutoff: float) -> Anchor | None:
    """Prune this instance's chain: through its audit log when it has one (the prune record
    goes into the log, which the gateway holds while it runs), else through the store."""
    if audit_log(settings).segments():
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


@dataclass(frozen=True, slots=True)
class PruneSpan:
    """The records a prune removes: a run of seqs, from the chain's first to its newest
    record older than the cutoff (the store prunes through that one)."""

    first_seq: int
    last_seq: int
    oldest: float
    newest: float

    def through(self, seq: int) -> PruneSpan:
        return PruneSpan(self.first_seq, seq, self.oldest, self.newest)

    @property
    def records(self) -> int:
        return self.last_seq - self.first_seq + 1

    def as_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "first_seq": self.first_seq,
            "through_seq": self.last_seq,
            "oldest": _iso(self.oldest),
            "newest": _iso(self.newest),
        }

    def __str__(self) -> str:
        return (
            f"{self.records} record(s) through seq {self.last_seq} (from seq {self.first_seq},"
            f" written {_iso(self.oldest)} to {_iso(self.newest)})"
        )


async def _prunable(store: AuditStore, chain: str, cutoff: float) -> PruneSpan | None:
    newest = await store.search(RecordFilter(chain=chain, until=cutoff), 1)
    if not newest:
        return None
    rows = store.scan(chain, batch=1)
    first = await anext(rows, None)
    await rows.aclose()
    if first is None:
        return None
    return PruneSpan(first.seq, newest[0].seq, first.time, newest[0].time)
