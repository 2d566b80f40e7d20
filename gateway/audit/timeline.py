"""A session as it happened, from its audit records: login, each statement joined with its
outcome (decision, masks, result, duration, recorded rows after masking), the approval
records of its held statements, a kill, the end; one step each, in the order written."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gateway.audit.search import UNREADABLE, readable_record
from gateway.audit.store import AuditStore, RecordFilter, StoredRecord

# A session longer than this shows its first records and says it was cut.
MAX_STEPS = 5000
# Request ids per outcome query (SQLite allows 32766 arguments; kept far below).
_IDS_PER_QUERY = 500

_STEP_KINDS = {
    "session_start": "login",
    "auth_failure": "login_refused",
    "request": "statement",
    "approval": "approval",
    "session_kill": "kill",
    "session_end": "end",
}


@dataclass(frozen=True, slots=True)
class Mask:
    column: str
    method: str


@dataclass(frozen=True, slots=True)
class Outcome:
    record_id: str
    time: float
    command_tag: str | None
    rows: int | None
    sqlstate: str | None
    error_message: str | None
    duration_ms: float | None
    forwarded: bool
    # The rows the client received, after masking, when the session was recorded.
    recorded_columns: tuple[str, ...]
    recorded_rows: tuple[tuple[str | None, ...], ...]
    recorded_rows_truncated: bool
    rows_withheld: int


@dataclass(frozen=True, slots=True)
class Statement:
    text: str
    protocol: str
    params: tuple[str | None, ...]
    action: str
    reasons: tuple[str, ...]
    approvers: tuple[str, ...]
    decision_id: str | None
    bundle_revision: str | None
    masks: tuple[Mask, ...]
    approval_id: str | None
    outcome: Outcome | None


@dataclass(frozen=True, slots=True)
class Step:
    number: int
    # login, login_refused, statement, approval, kill, end (or the record's kind).
    kind: str
    record_id: str
    time: float
    subject: str | None
    groups: tuple[str, ...]
    # Login and end: where from and why; approval: the event, its status and note.
    client_addr: str | None
    application_name: str | None
    reason: str | None
    approval_event: str | None
    approval_status: str | None
    approval_id: str | None
    note: str | None
    statement: Statement | None


@dataclass(frozen=True, slots=True)
class SessionTimeline:
    session_id: str
    target: str | None
    subject: str | None
    steps: tuple[Step, ...]
    # More records than MAX_STEPS: the timeline holds the first ones.
    truncated: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def session_timeline(store: AuditStore, session_id: str) -> SessionTimeline | None:
    """The session's steps, oldest first; None when no record names the session."""
    newest_first = await store.search(RecordFilter(session_id=session_id), MAX_STEPS + 1)
    if not newest_first:
        return None
    truncated = len(newest_first) > MAX_STEPS
    # Cut, a huge session replays its first MAX_STEPS records (its end is searchable).
    records = await _oldest(store, session_id) if truncated else list(reversed(newest_first))
    outcomes = await _outcomes(store, [r.id for r in records if r.kind == "request"])
    steps = tuple(_step(i + 1, r, outcomes) for i, r in enumerate(records))
    first = next((s for s in steps if s.subject is not None), None)
    return SessionTimeline(
        session_id,
        next((r.target for r in records if r.target), None),
        first.subject if first is not None else None,
        steps,
        truncated,
    )


async def _oldest(store: AuditStore, session_id: str) -> list[StoredRecord]:
    """The session's first MAX_STEPS records: newest-first pages walked back to the start."""
    kept: list[StoredRecord] = []
    before: int | None = None
    while True:
        page = await store.search(RecordFilter(session_id=session_id, before_pos=before), 5000)
        kept.extend(page)
        kept = kept[-MAX_STEPS:]
        if len(page) < 5000:
            return list(reversed(kept))
        before = page[-1].pos


async def _outcomes(store: AuditStore, request_ids: list[str]) -> dict[str, StoredRecord]:
    found: dict[str, StoredRecord] = {}
    for start in range(0, len(request_ids), _IDS_PER_QUERY):
        ids = tuple(request_ids[start : start + _IDS_PER_QUERY])
        # Newest first: the first outcome written for a request wins when read oldest last.
        for r in reversed(
            await store.search(RecordFilter(kind="outcome", request_ids=ids), 2 * len(ids))
        ):
            if r.request_id is not None:
                found.setdefault(r.request_id, r)
    return found


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def _step(number: int, r: StoredRecord, outcomes: dict[str, StoredRecord]) -> Step:
    found = readable_record(r)
    # A body that is not a record is still a step, saying so (verify names the record).
    rec: dict[str, Any] = found if found is not None else {"reason": UNREADABLE}
    principal = rec.get("principal") or {}
    statement = None
    if r.kind == "request" and found is not None:
        outcome = outcomes.get(r.id)
        statement = _statement(rec, outcome)
    return Step(
        number=number,
        kind=_STEP_KINDS.get(r.kind, r.kind),
        record_id=r.id,
        time=r.time,
        subject=principal.get("subject"),
        groups=_texts(principal.get("groups")),
        client_addr=rec.get("client_addr"),
        application_name=rec.get("application_name"),
        reason=rec.get("reason") or None,
        approval_event=rec.get("event") if r.kind == "approval" else None,
        approval_status=rec.get("status") if r.kind == "approval" else None,
        approval_id=rec.get("approval_id"),
        note=rec.get("note") or None,
        statement=statement,
    )


def _statement(rec: dict[str, Any], outcome: StoredRecord | None) -> Statement:
    decision = rec.get("decision") or {}
    masks = tuple(
        Mask(f"{m.get('schema')}.{m.get('table')}.{m.get('column')}", str(m.get("method")))
        for m in decision.get("masks") or ()
        if isinstance(m, dict)
    )
    return Statement(
        text=str(rec.get("text", "")),
        protocol=str(rec.get("protocol", "")),
        params=tuple(rec.get("params") or ()),
        action=str(decision.get("action", "")),
        reasons=_texts(decision.get("reasons")),
        approvers=_texts(decision.get("approvers")),
        decision_id=decision.get("decision_id"),
        bundle_revision=decision.get("bundle_revision"),
        masks=masks,
        approval_id=rec.get("approval_id"),
        outcome=None if outcome is None else _outcome(outcome),
    )


def _outcome(r: StoredRecord) -> Outcome:
    rec = readable_record(r) or {"error_message": UNREADABLE}
    rows = rec.get("recorded_rows") or []
    return Outcome(
        record_id=r.id,
        time=r.time,
        command_tag=rec.get("command_tag"),
        rows=rec.get("rows"),
        sqlstate=rec.get("sqlstate"),
        error_message=rec.get("error_message"),
        duration_ms=rec.get("duration_ms"),
        forwarded=bool(rec.get("forwarded", True)),
        recorded_columns=_texts(rec.get("recorded_columns")),
        recorded_rows=tuple(tuple(row) for row in rows if isinstance(row, list)),
        recorded_rows_truncated=bool(rec.get("recorded_rows_truncated")),
        rows_withheld=int(rec.get("rows_withheld") or 0),
    )
