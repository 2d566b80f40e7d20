"""Canonical bytes of audit records: one JSON form per event kind, signed byte for byte."""

from __future__ import annotations

import functools
from typing import Any, Literal, get_args

import orjson

from gateway.audit.events import (
    ApprovalEvent,
    SessionEvent,
    StatementOutcome,
    StatementRequest,
)
from gateway.identity.principal import Principal

RecordKind = Literal[
    "request",
    "outcome",
    "session_start",
    "session_end",
    "auth_failure",
    "key_rotation",
    "prune",
    # Written when an operator starts the gateway on a store behind its head witness: names
    # the records that were lost, linked to the last one the witness saw.
    "chain_gap",
    # The approvals workflow: a request, a vote, a decision, a hold's end, a grant's use.
    "approval",
    # An operator ended a session (`pgwarden sessions kill`): who, and why.
    "session_kill",
]
# In this order: the audit process's frames carry a kind as its index here.
RECORD_KINDS: tuple[RecordKind, ...] = get_args(RecordKind)

# Sorted keys and no floats formatted by locale: the same record always gives the same bytes,
# so a verifier re-reading the store computes the same HMAC the writer did.
_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


_dumps = functools.partial(orjson.dumps, option=_CANONICAL)


def canonical(value: Any) -> bytes:
    try:
        return _dumps(value)
    except orjson.JSONEncodeError:
        # Text holding lone surrogates (bytes a decoder kept as surrogate escapes) has no
        # UTF-8 form: a record must still be written, so such text is escaped, and the
        # escaped form is what is signed and stored.
        return _dumps(_escaped(value))


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return _escaped_text(value)
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def _escaped_text(text: str) -> str:
    """Surrogate escapes as the bytes they stand for (\\xNN); other lone surrogates as the
    bytes of their UTF-8-like form, escaped the same way."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def principal_record(principal: Principal | None) -> dict[str, Any] | None:
    # Claims are left out: they may carry personal data and are not part of the contract.
    if principal is None:
        return None
    return {
        "subject": principal.subject,
        "issuer": principal.issuer,
        "groups": list(principal.groups),
        "token_id": principal.token_id,
    }


def request_record(req: StatementRequest) -> dict[str, Any]:
    d = req.decision
    return {
        "time": req.time,
        "instance": req.instance,
        "session_id": req.session_id,
        "client_addr": req.client_addr,
        "application_name": req.application_name,
        "principal": principal_record(req.principal),
        "target": req.target,
        "text": req.text,
        "fingerprint": req.fingerprint,
        "protocol": req.protocol,
        "params": list(req.params),
        "decision": {
            "action": d.action,
            "reasons": list(d.reasons),
            "approvers": list(d.approvers),
            "approvers_required": d.approvers_required,
            "masks": [
                {"schema": m.schema, "table": m.table, "column": m.column, "method": m.method}
                for m in d.masks
            ],
            "decision_id": d.decision_id,
            "bundle_revision": d.bundle_revision,
            "cache_hit": d.cache_hit,
        },
        "approval_id": req.approval_id,
        "masked_columns": list(req.masked_columns),
        "record_rows": req.record_rows,
    }


def request_bytes(req: StatementRequest) -> bytes:
    """canonical(request_record(req)): from its plan's template where it has one."""
    if req.template is not None:
        return req.template.encode(req.time, req.text, req.params)
    return canonical(request_record(req))


# What changes from one execution of a plan to the next, in sorted key order.
_PER_EXECUTION = ("params", "text", "time")


class RequestTemplate:
    """A plan's request record as canonical bytes less what changes per execution (the
    parameters, the text, the time): encoded once when the plan first runs; each execution
    splices its own values in. `encode()` is byte for byte what canonical(request_record())
    gives: the chain signs these bytes, and a record must read the same either way.

    Valid for requests that agree with the one it was made from in every other field: the
    caller keeps it with what fixes them (the session, the plan's facts and decision)."""

    __slots__ = ("_after_params", "_after_text", "_head", "_tail")

    def __init__(self, req: StatementRequest) -> None:
        record = request_record(req)
        # The canonical form is compact JSON with sorted keys: the constant members in
        # order, cut where a per-execution value goes. Each value is encoded alone, as it
        # would be inside the whole (escaping, where needed, is per string).
        pieces: list[bytes] = []
        current = b"{"
        for i, key in enumerate(sorted(record)):
            current += (b"," if i else b"") + canonical(key) + b":"
            if key in _PER_EXECUTION:
                pieces.append(current)
                current = b""
            else:
                current += canonical(record[key])
        pieces.append(current + b"}")
        self._head, self._after_params, self._after_text, self._tail = pieces

    def encode(self, time: float, text: str, params: tuple[str | None, ...]) -> bytes:
        try:
            # orjson at once (once per planned statement): canonical() only for the text
            # or parameters it cannot encode as they are.
            values = (_dumps(params), _dumps(text), _dumps(time))
        except orjson.JSONEncodeError:
            values = (canonical(params), canonical(text), canonical(time))
        return b"".join(
            (
                self._head,
                values[0],
                self._after_params,
                values[1],
                self._after_text,
                values[2],
                self._tail,
            )
        )


def outcome_record(out: StatementOutcome, rows_limit: int, bytes_limit: int) -> dict[str, Any]:
    rows, truncated = _bounded_rows(out.recorded_rows, rows_limit, bytes_limit)
    return {
        "request_id": out.request_id,
        "time": out.time,
        "command_tag": out.command_tag,
        "rows": out.rows,
        "sqlstate": out.sqlstate,
        "error_message": out.error_message,
        "duration_ms": out.duration_ms,
        "bytes_out": out.bytes_out,
        "forwarded": out.forwarded,
        "recorded_rows": rows,
        "recorded_columns": list(out.recorded_columns),
        "recorded_rows_truncated": truncated,
        # Only where a budget cut the result: earlier records keep their exact form.
        **({"rows_withheld": out.rows_withheld} if out.rows_withheld else {}),
    }


def _bounded_rows(
    rows: tuple[tuple[str | None, ...], ...], rows_limit: int, bytes_limit: int
) -> tuple[list[list[str | None]], bool]:
    # Recorded rows are bounded so one large result cannot stall the writer or bloat the store.
    kept: list[list[str | None]] = []
    size = 0
    for row in rows:
        row_size = sum(len(v) for v in row if v is not None)
        if len(kept) >= rows_limit or size + row_size > bytes_limit:
            return kept, True
        kept.append(list(row))
        size += row_size
    return kept, False


def session_record(event: SessionEvent) -> dict[str, Any]:
    return {
        "time": event.time,
        "instance": event.instance,
        "session_id": event.session_id,
        "client_addr": event.client_addr,
        "application_name": event.application_name,
        "startup_user": event.startup_user,
        "target": event.target,
        "principal": principal_record(event.principal),
        "reason": event.reason,
    }


def approval_record(event: ApprovalEvent) -> dict[str, Any]:
    return {
        "time": event.time,
        "instance": event.instance,
        "event": event.event,
        "approval_id": event.approval_id,
        "principal": principal_record(event.principal),
        "target": event.target,
        "session_id": event.session_id,
        "request_id": event.request_id,
        "status": event.status,
        "note": event.note,
        "grant_id": event.grant_id,
        "grant_kind": event.grant_kind,
        "grant_expires": event.grant_expires,
    }


def envelope(
    chain: str, seq: int, epoch: int, kind: RecordKind, time: float, record: dict[str, Any]
) -> dict[str, Any]:
    """What is signed: the record and its place in its chain."""
    return {
        "chain": chain,
        "seq": seq,
        "epoch": epoch,
        "kind": kind,
        "time": time,
        "record": record,
    }


def record_id(chain: str, seq: int) -> str:
    return f"{chain}:{seq}"


def parse_record_id(value: str) -> tuple[str, int] | None:
    chain, sep, seq = value.rpartition(":")
    if not sep or not chain or not seq.isdigit():
        return None
    return chain, int(seq)


def projections(record: dict[str, Any]) -> dict[str, Any]:
    """The searchable columns a store keeps beside the signed body (verify re-derives them)."""
    principal = record.get("principal") or {}
    decision = record.get("decision") or {}
    return {
        "session_id": record.get("session_id"),
        "subject": principal.get("subject"),
        "target": record.get("target"),
        "action": decision.get("action"),
        "request_id": record.get("request_id"),
        "text": record.get("text"),
    }


PROJECTED_COLUMNS = ("session_id", "subject", "target", "action", "request_id", "text")
