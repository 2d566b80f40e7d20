"""The webhook's signature and payloads, without a gateway: what a receiver checks."""

from __future__ import annotations

import time

from gateway.control.models import ApprovalRequest, Vote
from gateway.enforce.webhook import payload, sign, verify_signature

KEY = b"k" * 32


def _request() -> ApprovalRequest:
    return ApprovalRequest(
        id="apr-0123456789",
        created=1.0,
        status="denied",
        principal={"subject": "agent:bot"},
        target="app",
        database="appdb",
        session_id="s",
        instance="gw-1",
        text="DELETE  FROM orders\nWHERE id = 1",
        protocol="simple",
        params=(),
        facts=(),
        fingerprint="f",
        grant_key="secret-key-material",
        reasons=("ai-agents may not write without approval",),
        approvers=("engineers",),
        approvers_required=1,
        justification="ticket 7",
        decision_id=None,
        audit_record=None,
        wait_until=2.0,
        votes=(Vote("apr-0123456789", "user:ann", ("engineers",), "deny", "no", 1.5),),
    )


def test_a_signature_checks_out_only_for_its_body_and_key() -> None:
    body = b'{"event":"requested"}'
    header = sign(KEY, int(time.time()), body)
    assert verify_signature(KEY, header, body)
    assert not verify_signature(KEY, header, body + b" ")
    assert not verify_signature(b"other", header, body)
    assert not verify_signature(KEY, "v1=abc", body)
    assert not verify_signature(KEY, header.replace("t=", "t=1"), body)


def test_json_payload_carries_the_request_but_not_the_grant_key() -> None:
    body = payload("denied", _request(), "json")
    assert body["event"] == "denied" and body["request"]["id"] == "apr-0123456789"
    assert "grant_key" not in body["request"]


def test_slack_payload_is_one_text_message() -> None:
    body = payload("requested", _request(), "slack")
    assert set(body) == {"text"}
    text = body["text"]
    assert "apr-0123456789: requested" in text
    assert "`DELETE FROM orders WHERE id = 1`" in text
    assert "Justification: ticket 7" in text and "user:ann (deny: no)" in text
    assert "pgwarden approvals approve apr-0123456789" in text
