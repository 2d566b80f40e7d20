"""What a client's user reads when pgwarden refuses a statement: one reason, stated once, in
words they can act on; an approval the gateway cannot wait for yet reads differently from a
deny and says how to have it approved; nothing internal (socket paths, addresses) shows."""

from __future__ import annotations

import re

import psycopg
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.harness import RunningGateway

from . import DECISION_ID, REFUSED

pytestmark = pytest.mark.server

AUDIT_SHOW = re.compile(r"pgwarden audit show (\S+:\d+)")
REQUEST = re.compile(r"approval request: (apr-[0-9a-f]+)")


def _refused(
    gateway: RunningGateway, groups: tuple[str, ...], statement: str
) -> psycopg.errors.Diagnostic:
    token = gateway.token("agent:refusals", groups=groups)
    with psycopg.connect(gateway.dsn(token), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute(statement, prepare=False)
        # The session goes on after a refusal.
        assert conn.execute("SELECT 1").fetchone() == (1,)
    diag = info.value.diag
    assert diag.sqlstate == REFUSED
    return diag


def test_a_deny_states_one_reason_once(gateway: RunningGateway) -> None:
    diag = _refused(gateway, ("ai-agents",), "SELECT pg_read_file('/etc/hostname'), pg_ls_dir('/')")
    message = diag.message_primary or ""
    assert message.startswith("pgwarden: statement denied: ai-agents may not use server-side")
    # Two escapes, two reasons: the message states one, DETAIL the other and the decision id.
    assert message.count("may not") == 1 and "approval" not in message
    detail = diag.message_detail or ""
    assert detail.startswith("also: ai-agents may not use server-side escapes")
    assert DECISION_ID.search(detail)
    assert diag.message_hint is None
    # Two statements denied for the same reason: it is still stated once.
    diag = _refused(gateway, ("ai-agents",), "SELECT pg_read_file('a'); SELECT pg_read_file('b')")
    assert (diag.message_primary or "").count("pg_read_file") == 1
    assert "also" not in (diag.message_detail or "")


def test_approval_required_reads_apart_from_a_deny_and_says_how_to_ask(
    gateway: RunningGateway,
) -> None:
    diag = _refused(gateway, ("ai-agents",), "DELETE FROM orders WHERE id = 424242")
    message = diag.message_primary or ""
    assert message == ("pgwarden: approval required: ai-agents may not write without approval")
    assert "denied" not in message
    # Asked and not held (this gateway waits 0 s): the hint names who approves, how, and
    # that the statement may then be run again; DETAIL the request and the statement's record.
    hint = diag.message_hint or ""
    assert "It did not run" in hint and "run the same statement again" in hint
    assert "engineers or admins" in hint
    request = REQUEST.search(diag.message_detail or "")
    assert request is not None and f"pgwarden approvals approve {request.group(1)}" in hint
    asked = AUDIT_SHOW.search(diag.message_detail or "")
    assert asked is not None, diag.message_detail
    # The command in the hint shows an approver the very statement that was asked for.
    result = CliRunner().invoke(
        app,
        ["audit", "show", asked.group(1), "--json"],
        env={"PGWARDEN_STATE_DIR": str(gateway.settings.state_dir)},
    )
    assert result.exit_code == 0, result.stderr
    assert "DELETE FROM orders WHERE id = 424242" in result.stdout
    assert '"approve"' in result.stdout
