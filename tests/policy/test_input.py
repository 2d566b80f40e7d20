"""The input builder: the document the policy sees, schema version 1."""

from __future__ import annotations

from gateway.identity.principal import Principal
from gateway.policy.input import SessionInfo, TargetInfo, build_input
from gateway.sql.facts import ColumnRef, StatementFacts, TableRef


def test_input_document_matches_schema_version_1() -> None:
    principal = Principal(
        subject="agent:ci-bot",
        issuer="https://idp.example",
        groups=("ai-agents",),
        token_id="jti-1",
        expires_at=1_900_000_000.0,
        claims={"sub": "agent:ci-bot", "exp": 1_900_000_000},
    )
    facts = StatementFacts(
        text="DELETE FROM orders WHERE id = $1",
        fingerprint="fp",
        command="DELETE",
        category="write",
        reads=(TableRef("public", "orders"),),
        writes=(TableRef("public", "orders"),),
        columns=(ColumnRef("public", "orders", "id", "predicate"),),
        functions=("pg_catalog.now",),
        has_where=True,
    )
    document = build_input(
        principal,
        TargetInfo(name="app", database="appdb", labels={"env": "prod"}),
        SessionInfo(
            id="s-1",
            client_addr="10.1.2.3",
            application_name="psql",
            user="bob",
            in_transaction=False,
        ),
        facts.to_input(protocol="extended", index=0, count=1, params=["42"]),
    )
    assert document == {
        "version": 1,
        "principal": {
            "subject": "agent:ci-bot",
            "issuer": "https://idp.example",
            "groups": ["ai-agents"],
            "token_id": "jti-1",
            "claims": {"sub": "agent:ci-bot", "exp": 1_900_000_000},
        },
        "target": {
            "name": "app",
            "database": "appdb",
            "default_database": "appdb",
            "databases": [],
            "labels": {"env": "prod"},
        },
        "session": {
            "id": "s-1",
            "client_addr": "10.1.2.3",
            "application_name": "psql",
            "user": "bob",
            "in_transaction": False,
        },
        "statement": {
            "text": "DELETE FROM orders WHERE id = $1",
            "fingerprint": "fp",
            "protocol": "extended",
            "index": 0,
            "count": 1,
            "command": "DELETE",
            "category": "write",
            "reads": [{"schema": "public", "table": "orders"}],
            "writes": [{"schema": "public", "table": "orders"}],
            "columns": [
                {"schema": "public", "table": "orders", "column": "id", "usage": "predicate"}
            ],
            "functions": ["pg_catalog.now"],
            "has_where": True,
            "flags": [],
            "params": ["42"],
        },
    }


def test_labels_are_copied_into_a_plain_dict() -> None:
    from types import MappingProxyType

    target = TargetInfo(name="t", database="d", labels=MappingProxyType({"env": "dev"}))
    session = SessionInfo(id="s", client_addr=None, application_name="", user="u")
    principal = Principal("s", "i", (), "j", None)
    document = build_input(principal, target, session, {})
    assert type(document["target"]["labels"]) is dict
    assert document["session"]["client_addr"] is None


def test_target_carries_the_chosen_database_beside_the_default_and_the_allowed() -> None:
    target = TargetInfo(
        name="app", database="scratch", default_database="appdb", databases=("scratch", "x")
    )
    session = SessionInfo(id="s", client_addr=None, application_name="", user="u")
    principal = Principal("s", "i", (), "j", None)
    document = build_input(principal, target, session, {})
    assert document["target"] == {
        "name": "app",
        "database": "scratch",
        "default_database": "appdb",
        "databases": ["scratch", "x"],
        "labels": {},
    }
