"""A plan's request-record template gives exactly the bytes the record encoded whole gives.

The chain signs the canonical bytes and `audit verify` recomputes the HMAC over what the log
holds: a record spliced from its plan's template must be byte for byte the record encoded
whole (canonical(request_record())), so that records of both ways, and logs written before
templates, read and verify alike. Compared here over varied records: unicode, NULL
parameters, long text, masks, text no UTF-8 can hold (lone surrogates), no principal.
"""

from __future__ import annotations

import dataclasses
import os

import orjson
import pytest

from gateway.audit.chain import EMPTY_TAIL, AuditChain, PendingRecord
from gateway.audit.events import StatementRequest
from gateway.audit.records import (
    RequestTemplate,
    canonical,
    projections,
    request_bytes,
    request_record,
)
from gateway.identity.principal import Principal
from gateway.policy.decision import Decision, Mask

PRINCIPAL = Principal("agent:ci-bot", "pgwarden", ("ai-agents", "éngineers"), "jti-1", None)
MASKS = (
    Mask("public", "customers", "email", "email"),
    Mask("public", "customers", "ssn", "redact"),
    Mask("crm", "Kunden", "straße", "partial"),
)

BASE = StatementRequest(
    time=1_765_000_000.123456,
    instance="gw-1",
    session_id="0b5e0c9e-3f4a-4c1e-9a51-6d1b1f6f2e10",
    client_addr="127.0.0.1:50432",
    application_name="psql",
    principal=PRINCIPAL,
    target="app",
    text="SELECT id, email FROM customers WHERE id = $1",
    fingerprint="4f1c2b3a9e8d7c6b",
    protocol="extended",
    params=("42",),
    decision=Decision("allow", ("agents read customers",), decision_id="d-1", bundle_revision="r7"),
)

# Fields fixed by the plan and the session: each variant changes some of them.
PLANS: dict[str, StatementRequest] = {
    "plain": BASE,
    "masked": dataclasses.replace(
        BASE,
        decision=Decision("allow", (), masks=MASKS, decision_id="d-2", cache_hit=True),
        masked_columns=tuple(f"{m.schema}.{m.table}.{m.column}" for m in MASKS),
        record_rows=True,
    ),
    "unicode session": dataclasses.replace(
        BASE, application_name='报表 ✓ "quoted" \\ back\nline', target="app/données"
    ),
    "approval": dataclasses.replace(
        BASE,
        decision=Decision("approve", ("needs two", 'a "why"'), ("dba", "sre"), 2, decision_id=None),
        approval_id="a-9",
    ),
    "no principal": dataclasses.replace(BASE, principal=None, protocol="simple"),
    "surrogate in session": dataclasses.replace(BASE, application_name="app\udcff\udc80"),
    "empty strings": dataclasses.replace(BASE, application_name="", client_addr="", target=""),
}

# What changes per execution: time, text (a shared simple-protocol plan), parameters.
EXECUTIONS: dict[str, tuple[float, str, tuple[str | None, ...]]] = {
    "same": (BASE.time, BASE.text, BASE.params),
    "other values": (1_765_000_001.5, "SELECT id, email FROM customers WHERE id = 7", ("7",)),
    "nulls": (0.0, BASE.text, (None, "x", None)),
    "no params": (2.0e9 + 0.000001, "SELECT 1", ()),
    "unicode": (1.0, "SELECT '日本語 🚀 é' AS \"ünï\"", ("Ω≈ç√", "🙂", "a\u0301")),
    "escapes": (3.25, "SELECT E'\\n\\t' -- \"params\": [1]", ('"params":', "\\", "\x00\x1f")),
    "long text": (4.5, "SELECT " + ", ".join(f"'{i}'" for i in range(40_000)), ("p" * 70_000,)),
    "surrogates": (5.75, "SELECT '\udcfe'", ("\udc80ok", None, "\ud800")),
}


def _execution(
    plan: StatementRequest, values: tuple[float, str, tuple[str | None, ...]]
) -> StatementRequest:
    when, text, params = values
    return dataclasses.replace(plan, time=when, text=text, params=params)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("values", EXECUTIONS.values(), ids=EXECUTIONS.keys())
def test_a_spliced_record_is_the_record_encoded_whole(
    plan: StatementRequest, values: tuple[float, str, tuple[str | None, ...]]
) -> None:
    template = RequestTemplate(plan)
    run = _execution(plan, values)
    whole = canonical(request_record(run))
    spliced = template.encode(run.time, run.text, run.params)
    assert spliced == whole
    # And through the sinks' helper, which takes the template the gate attached.
    assert request_bytes(dataclasses.replace(run, template=template)) == whole
    assert request_bytes(run) == whole


def test_a_spliced_record_reads_back_with_its_own_values() -> None:
    template = RequestTemplate(PLANS["masked"])
    body = template.encode(9.5, "SELECT 2", (None, "ü"))
    record = orjson.loads(body)
    assert (record["time"], record["text"], record["params"]) == (9.5, "SELECT 2", [None, "ü"])
    assert record["masked_columns"] == list(PLANS["masked"].masked_columns)
    assert record["decision"]["masks"][2]["column"] == "straße"


def test_records_sealed_from_a_template_and_whole_sign_alike() -> None:
    """Same envelope, same HMAC link, same searchable columns: the chain cannot tell."""
    key = os.urandom(32)
    runs = [_execution(plan, values) for plan in PLANS.values() for values in EXECUTIONS.values()]
    whole = [PendingRecord("request", r.time, (d := request_record(r)), canonical(d)) for r in runs]
    templates = {id(p): RequestTemplate(p) for p in PLANS.values()}
    spliced = []
    for plan in PLANS.values():
        for values in EXECUTIONS.values():
            r = _execution(plan, values)
            spliced.append(
                PendingRecord(
                    "request", r.time, None, templates[id(plan)].encode(r.time, r.text, r.params)
                )
            )
    old, old_tail = AuditChain("gw-1", 0, key).seal(EMPTY_TAIL, whole)
    new, new_tail = AuditChain("gw-1", 0, key).seal(EMPTY_TAIL, spliced)
    assert [(s.body, s.link) for s in new] == [(s.body, s.link) for s in old]
    assert new_tail == old_tail
    # The index's columns, derived from the body where no record value was kept: what
    # `audit verify` derives from the body too (text no UTF-8 holds, escaped).
    assert [s.columns for s in new] == [projections(orjson.loads(s.body)["record"]) for s in old]
    assert new[0].columns == projections(request_record(runs[0]))
