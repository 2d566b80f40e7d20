"""Turn a raw OPA answer into a Decision, denying whenever the answer is not a valid decision."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, get_args

import orjson

from gateway.guards.budgets import parse_limits
from gateway.policy.decision import MASK_METHODS, Action, Decision, Mask

ACTIONS: frozenset[str] = frozenset(get_args(Action))
_KNOWN_KEYS = frozenset(
    {
        "action",
        "reasons",
        "approvers",
        "approvers_required",
        "masks",
        "record_rows",
        "decide_with_params",
    }
)
_MASK_KEYS = ("schema", "table", "column", "method")


class _Malformed(Exception):
    """The policy's result is not a decision; the message says which part is wrong."""


def parse_response(status: int, body: bytes) -> Decision:
    """The decision in an HTTP answer from OPA's data API, or a refusal saying what is wrong."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        if status != 200:
            return Decision.refuse(f"OPA error: HTTP {status}")
        return Decision.refuse("OPA answer is not valid JSON")
    if status != 200:
        return Decision.refuse(f"OPA error: HTTP {status}{_error_text(answer)}")
    return parse_answer(answer)


def parse_answer(answer: object) -> Decision:
    """The decision in a decoded OPA answer ({"result": ..., "decision_id": ..., ...})."""
    if not isinstance(answer, dict):
        return Decision.refuse("OPA answer is not a JSON object")
    if "code" in answer and "result" not in answer:
        return Decision.refuse(f"OPA error{_error_text(answer)}")
    decision_id = answer.get("decision_id")
    decision_id = decision_id if isinstance(decision_id, str) else None
    revision = revision_of_provenance(answer.get("provenance"))
    if "result" not in answer:
        # The rule did not produce a value: no policy says yes, so the answer is no.
        return _refusal("policy decision is undefined", decision_id, revision)
    try:
        decision = _decision(answer["result"])
    except _Malformed as exc:
        return _refusal(f"policy decision is malformed: {exc}", decision_id, revision)
    return replace(decision, decision_id=decision_id, bundle_revision=revision)


def revision_of_provenance(provenance: object) -> str | None:
    """The bundle revision OPA reports in `provenance` (several bundles: name=rev, sorted)."""
    if not isinstance(provenance, dict):
        return None
    bundles = provenance.get("bundles")
    if not isinstance(bundles, dict):
        return None
    return revision_of_bundles(
        {name: b.get("revision") for name, b in bundles.items() if isinstance(b, dict)}
    )


def revision_of_bundles(revisions: dict[str, Any]) -> str | None:
    """One revision string for the loaded bundles: the only one's, or name=rev pairs sorted."""
    clean = {name: rev for name, rev in revisions.items() if isinstance(rev, str)}
    if not clean:
        return None
    if len(clean) == 1:
        return next(iter(clean.values()))
    return ",".join(f"{name}={rev}" for name, rev in sorted(clean.items()))


def _refusal(reason: str, decision_id: str | None, revision: str | None) -> Decision:
    return replace(Decision.refuse(reason), decision_id=decision_id, bundle_revision=revision)


def _error_text(answer: object) -> str:
    if not isinstance(answer, dict):
        return ""
    code, message = answer.get("code"), answer.get("message")
    parts = [str(p) for p in (code, message) if isinstance(p, str) and p]
    return f": {': '.join(parts)}" if parts else ""


def _decision(result: object) -> Decision:
    if not isinstance(result, dict):
        raise _Malformed(f"expected an object, got {_kind(result)}")
    action = result.get("action")
    if action not in ACTIONS:
        raise _Malformed(f"unknown action {action!r}")
    reasons = _strings(result, "reasons")
    approvers = _strings(result, "approvers")
    if action == "approve" and not approvers:
        # Nobody could ever approve it, so the statement would hang until it times out.
        raise _Malformed("approve names no approvers")
    required = result.get("approvers_required", 1)
    if isinstance(required, bool) or not isinstance(required, int) or required < 1:
        raise _Malformed(
            f"approvers_required must be a whole number of at least 1, got {required!r}"
        )
    masks = tuple(_mask(m, i) for i, m in enumerate(_list(result, "masks")))
    extra = {k: v for k, v in result.items() if k not in _KNOWN_KEYS}
    if "limits" in extra:
        # A budget that cannot be enforced as the policy meant it: fail closed.
        try:
            extra["limits"] = parse_limits(extra["limits"])
        except ValueError as exc:
            raise _Malformed(str(exc)) from None
    return Decision(
        action=action,
        reasons=reasons,
        approvers=approvers,
        approvers_required=required,
        masks=masks,
        # Only a JSON true turns either on: anything else is the default.
        record_rows=result.get("record_rows") is True,
        decide_with_params=result.get("decide_with_params") is True,
        extra=extra,
    )


def _list(result: dict[str, Any], key: str) -> list[Any]:
    value = result.get(key, [])
    if not isinstance(value, list):
        raise _Malformed(f"{key} must be a list, got {_kind(value)}")
    return value


def _strings(result: dict[str, Any], key: str) -> tuple[str, ...]:
    values = _list(result, key)
    for value in values:
        if not isinstance(value, str):
            raise _Malformed(f"{key} must hold strings, got {_kind(value)}")
    return tuple(values)


def _mask(value: object, index: int) -> Mask:
    if not isinstance(value, dict):
        raise _Malformed(f"masks[{index}] must be an object, got {_kind(value)}")
    fields: list[str] = []
    for key in _MASK_KEYS:
        part = value.get(key)
        if not isinstance(part, str) or not part:
            raise _Malformed(f"masks[{index}].{key} is missing or not a string")
        fields.append(part)
    schema, table, column, method = fields
    if method not in MASK_METHODS:
        raise _Malformed(f"masks[{index}] has unknown method {method!r}")
    return Mask(schema=schema, table=table, column=column, method=method)


def _kind(value: object) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
