"""Searching the audit index for people (the admin API and the console): the filters an
auditor asks with, checked, turned into one `RecordFilter`, a page of records at a time."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, get_args

from gateway.audit.records import RECORD_KINDS
from gateway.audit.store import AuditStore, RecordFilter, StoredRecord
from gateway.policy.decision import Action

# The policy's actions, and "mask": an allowed statement whose decision masked columns.
SEARCH_ACTIONS: tuple[str, ...] = (*get_args(Action), "mask")
MAX_PAGE = 500


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"(\d+)([smhdw])")


def parse_age(text: str) -> float:
    """Seconds in an age such as `90d`, `12h` or `1d12h`."""
    value = text.strip().lower()
    if not value or not re.fullmatch(r"(?:\d+[smhdw])+", value):
        raise ValueError(f"bad age {text!r}: use a number with s, m, h, d or w (e.g. 90d)")
    return float(sum(int(n) * _UNITS[u] for n, u in _AGE.findall(value)))


def parse_when(text: str, now: float, zone: dt.tzinfo | None = None) -> float:
    """A point in time: an age back from now (`2h`), an ISO date/time, or unix seconds. An
    ISO time without an offset is in `zone` (None: this machine's local time, as the CLI
    run here means it)."""
    try:
        return now - parse_age(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"bad time {text!r}: use an age (2h), ISO time or unix seconds") from None
    if moment.tzinfo is None:
        moment = moment.astimezone() if zone is None else moment.replace(tzinfo=zone)
    return moment.timestamp()


class BadSearch(ValueError):
    """A filter no record can match (an unknown action or kind, a reversed time range): said,
    rather than answered with an empty page that reads as "no such records"."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"bad {field} {detail}")
        # Which filter (action, kind, since, limit) and what is wrong with its value.
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class AuditQuery:
    subject: str | None = None
    group: str | None = None
    target: str | None = None
    action: str | None = None
    kind: str | None = None
    session_id: str | None = None
    since: float | None = None
    until: float | None = None
    text: str | None = None

    def record_filter(self, before_pos: int | None = None) -> RecordFilter:
        if self.action is not None and self.action not in SEARCH_ACTIONS:
            raise BadSearch("action", f"{self.action!r}: one of {', '.join(SEARCH_ACTIONS)}")
        if self.kind is not None and self.kind not in RECORD_KINDS:
            raise BadSearch("kind", f"{self.kind!r}: one of {', '.join(RECORD_KINDS)}")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise BadSearch("since", "(the time range is empty): since must be before until")
        masked = self.action == "mask" or None
        return RecordFilter(
            subject=self.subject,
            group=self.group,
            target=self.target,
            # A masked statement is one the policy allowed.
            action="allow" if masked else self.action,
            masked=masked,
            kind=self.kind,
            session_id=self.session_id,
            since=self.since,
            until=self.until,
            text=self.text,
            before_pos=before_pos,
        )


UNREADABLE = "(the stored body is not a readable record: run pgwarden audit verify)"


def readable_record(r: StoredRecord) -> dict[str, Any] | None:
    """The record a stored body signs, or None where the body is not one (changed behind
    the gateway's back): a page shows that, rather than failing on it."""
    try:
        record = r.record()
    except (ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True, slots=True)
class RecordSummary:
    """One search hit as a results table shows it."""

    id: str
    pos: int
    time: float
    kind: str
    session_id: str | None
    subject: str | None
    groups: tuple[str, ...]
    target: str | None
    action: str | None
    masked_columns: tuple[str, ...]
    summary: str

    @classmethod
    def of(cls, r: StoredRecord) -> RecordSummary:
        rec = readable_record(r)
        if rec is None:
            return cls(
                r.id, r.pos, r.time, r.kind, r.session_id, r.subject, (), r.target, r.action,
                (), UNREADABLE,
            )  # fmt: skip
        principal = rec.get("principal") or {}
        return cls(
            id=r.id,
            pos=r.pos,
            time=r.time,
            kind=r.kind,
            session_id=r.session_id,
            subject=r.subject,
            groups=tuple(str(g) for g in principal.get("groups") or ()),
            target=r.target,
            action=r.action,
            masked_columns=tuple(str(c) for c in rec.get("masked_columns") or ()),
            summary=record_summary(r.kind, rec),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pos": self.pos,
            "time": self.time,
            "kind": self.kind,
            "session_id": self.session_id,
            "subject": self.subject,
            "groups": list(self.groups),
            "target": self.target,
            "action": self.action,
            "masked_columns": list(self.masked_columns),
            "summary": self.summary,
        }


def record_summary(kind: str, rec: dict[str, Any]) -> str:
    """One line on what a record says: the statement, an outcome, a session's reason."""
    if kind == "request":
        return str(rec.get("text", ""))
    if kind == "outcome":
        if rec.get("sqlstate"):
            return f"→ {rec['request_id']} ERROR {rec['sqlstate']} {rec.get('error_message') or ''}"
        return f"→ {rec['request_id']} {rec.get('command_tag') or ''} ({rec['duration_ms']} ms)"
    if kind == "key_rotation":
        return f"key epoch {rec['from_epoch']} → {rec['to_epoch']}"
    if kind == "prune":
        return f"pruned through seq {rec['through_seq']}"
    if kind == "approval":
        return (
            f"{rec.get('event', '')} {rec.get('approval_id', '')} {rec.get('note') or ''}".strip()
        )
    return f"{rec.get('client_addr', '')} {rec.get('reason', '')}".strip()


@dataclass(frozen=True, slots=True)
class SearchPage:
    records: tuple[RecordSummary, ...]
    # Pass as `before` for the next (older) page; None on the last page.
    next_before: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "records": [r.as_json() for r in self.records],
            "next_before": self.next_before,
        }


async def search_page(
    store: AuditStore, query: AuditQuery, limit: int = 50, before: int | None = None
) -> SearchPage:
    """Records matching every filter, newest first, `limit` at most; keyset paging on the
    store position, so a page stays the same while records are written meanwhile."""
    if not 1 <= limit <= MAX_PAGE:
        raise BadSearch("limit", f"{limit}: between 1 and {MAX_PAGE}")
    found = await store.search(query.record_filter(before), limit + 1)
    page = found[:limit]
    more = len(found) > limit
    return SearchPage(tuple(RecordSummary.of(r) for r in page), page[-1].pos if more else None)
