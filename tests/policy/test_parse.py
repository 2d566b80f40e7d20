"""The decision parser: anything that is not a well-formed decision is a deny that says why."""

from __future__ import annotations

import orjson
import pytest

from gateway.policy.decision import Decision, Mask
from gateway.policy.parse import parse_answer, parse_response


def test_undefined_means_deny() -> None:
    decision = parse_answer({})
    assert decision.action == "deny"
    assert decision.refused
    assert decision.reasons == ("policy decision is undefined",)


def test_undefined_keeps_decision_id_and_revision() -> None:
    decision = parse_answer(
        {"decision_id": "d-1", "provenance": {"bundles": {"b": {"revision": "r9"}}}}
    )
    assert (decision.action, decision.decision_id, decision.bundle_revision) == (
        "deny",
        "d-1",
        "r9",
    )


def test_allow_with_masks_and_provenance() -> None:
    decision = parse_answer(
        {
            "decision_id": "abc",
            "provenance": {"version": "1.22.3", "bundles": {"policy.tar.gz": {"revision": "v7"}}},
            "result": {
                "action": "allow",
                "reasons": ["reads are fine"],
                "masks": [
                    {"schema": "public", "table": "customers", "column": "email", "method": "email"}
                ],
                "record_rows": True,
            },
        }
    )
    assert decision == Decision(
        action="allow",
        reasons=("reads are fine",),
        masks=(Mask("public", "customers", "email", "email"),),
        decision_id="abc",
        bundle_revision="v7",
        record_rows=True,
    )
    assert not decision.refused
    # A typed field now, not a key left in `extra`.
    assert decision.record_rows is True
    assert decision.extra == {}


def test_approve_carries_approvers() -> None:
    decision = parse_answer(
        {"result": {"action": "approve", "reasons": ["r"], "approvers": ["admins", "engineers"]}}
    )
    assert decision.action == "approve"
    assert decision.approvers == ("admins", "engineers")
    # One approver unless the policy asks for more.
    assert decision.approvers_required == 1


def test_approve_may_ask_for_several_approvers() -> None:
    decision = parse_answer(
        {
            "result": {
                "action": "approve",
                "reasons": ["r"],
                "approvers": ["admins"],
                "approvers_required": 2,
            }
        }
    )
    assert decision.approvers_required == 2
    assert "approvers_required" not in decision.extra


def test_policy_deny_is_not_a_refusal() -> None:
    decision = parse_answer({"result": {"action": "deny", "reasons": ["no"]}})
    assert (decision.action, decision.reasons, decision.refused) == ("deny", ("no",), False)


def test_several_bundles_name_each_revision() -> None:
    provenance = {"bundles": {"b": {"revision": "2"}, "a": {"revision": "1"}}}
    assert (
        parse_answer({"result": {"action": "allow"}, "provenance": provenance}).bundle_revision
        == "a=1,b=2"
    )


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        ("allow", "expected an object, got string"),
        (True, "expected an object, got boolean"),
        ({}, "unknown action None"),
        ({"action": "permit"}, "unknown action 'permit'"),
        ({"action": "ALLOW"}, "unknown action 'ALLOW'"),
        ({"action": "allow", "reasons": "ok"}, "reasons must be a list, got string"),
        ({"action": "allow", "reasons": [1]}, "reasons must hold strings, got number"),
        ({"action": "approve"}, "approve names no approvers"),
        ({"action": "approve", "approvers": [None]}, "approvers must hold strings, got null"),
        (
            {"action": "approve", "approvers": ["admins"], "approvers_required": 0},
            "approvers_required must be a whole number of at least 1, got 0",
        ),
        (
            {"action": "approve", "approvers": ["admins"], "approvers_required": "2"},
            "approvers_required must be a whole number of at least 1, got '2'",
        ),
        (
            {"action": "approve", "approvers": ["admins"], "approvers_required": True},
            "approvers_required must be a whole number of at least 1, got True",
        ),
        ({"action": "allow", "masks": {}}, "masks must be a list, got object"),
        ({"action": "allow", "masks": ["x"]}, "masks[0] must be an object, got string"),
        (
            {"action": "allow", "masks": [{"schema": "s", "table": "t", "method": "null"}]},
            "masks[0].column is missing or not a string",
        ),
        (
            {
                "action": "allow",
                "masks": [{"schema": "s", "table": "t", "column": "c", "method": "rot13"}],
            },
            "masks[0] has unknown method 'rot13'",
        ),
    ],
)
def test_malformed_result_means_deny(result: object, reason: str) -> None:
    decision = parse_answer({"result": result})
    assert decision.action == "deny"
    assert decision.refused
    assert decision.reasons == (f"policy decision is malformed: {reason}",)
    assert decision.masks == ()


def test_answer_that_is_not_an_object() -> None:
    assert parse_answer([1]).reasons == ("OPA answer is not a JSON object",)


def test_opa_error_body() -> None:
    body = orjson.dumps({"code": "internal_error", "message": "eval_conflict_error"})
    decision = parse_response(500, body)
    assert decision.action == "deny"
    assert decision.reasons == ("OPA error: HTTP 500: internal_error: eval_conflict_error",)


def test_http_error_without_json() -> None:
    assert parse_response(502, b"<html>bad gateway</html>").reasons == ("OPA error: HTTP 502",)


def test_garbage_body() -> None:
    assert parse_response(200, b"\x00garbage").reasons == ("OPA answer is not valid JSON",)


def test_ok_response() -> None:
    assert parse_response(200, b'{"result": {"action": "allow"}}').action == "allow"
