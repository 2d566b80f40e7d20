"""The masking leak harness: no cleartext of a classified column ever reaches a client.

A table of its own (`leakprobe.people`) has four classified columns, one per mask method,
each holding unique marker strings; the gateway under test runs the reference policy with
the shipped classification plus these four columns. Every route below tries to read the
markers, as ai-agents and as engineers, through the real gateway with real drivers
(psycopg in text and binary, simple and extended protocol; asyncpg, which is binary): in
rows, notices, notifications, error messages/details/hints, COPY data and parameter-status.
Each outcome is one of

    masked               rows came back, no marker in them
    refused              pgwarden refused the statement (42501, approval or deny)
    error-without-leak   the server (or pgwarden) answered with an error that quotes no marker

and anything else fails the run. The counts by outcome (and per group) are printed at the
end (`pytest -s`, or the terminal summary).
"""

# The routes are SQL built from this module's constants (schema and table names): S608 does
# not apply to them.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psycopg
import pytest
from psycopg.rows import TupleRow

from cli.localpg import LocalCluster
from tests.harness import RunningGateway

from . import REFUSED, harness

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "leakprobe"
RUN = uuid.uuid4().hex[:10]
# One marker per classified column and row. Each method hides all of it: `email` keeps the
# first character of the local part and the domain, `partial` the last 4 characters, so the
# marker sits between a plain first character and a plain tail.
MARKERS = {
    ("email", 1): f"qEMA{RUN}1",
    ("email", 2): f"qEMB{RUN}2",
    ("ssn", 1): f"SSNA{RUN}",
    ("ssn", 2): f"SSNB{RUN}",
    ("card", 1): f"CRDA{RUN}",
    ("card", 2): f"CRDB{RUN}",
    ("phone", 1): f"PHNA{RUN}",
    ("phone", 2): f"PHNB{RUN}",
}
CLASSIFICATION = {
    f"{SCHEMA}.people.email": "email",
    f"{SCHEMA}.people.ssn": "redact",
    f"{SCHEMA}.people.card": "hash",
    f"{SCHEMA}.people.phone": "partial",
}


def _value(column: str, row: int) -> str:
    marker = MARKERS[(column, row)]
    if column == "email":
        return f"{marker}@probe.example"
    if column == "phone":
        return f"+{marker}-0000"
    return marker


SETUP = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.people (
    id int PRIMARY KEY, name text NOT NULL, email text, ssn text, card text, phone text
);
INSERT INTO {SCHEMA}.people VALUES
    (1, 'Ann', '{_value("email", 1)}', '{_value("ssn", 1)}', '{_value("card", 1)}',
     '{_value("phone", 1)}'),
    (2, 'Bob', '{_value("email", 2)}', '{_value("ssn", 2)}', '{_value("card", 2)}',
     '{_value("phone", 2)}');
CREATE TABLE {SCHEMA}.sink (id int PRIMARY KEY, note text);
INSERT INTO {SCHEMA}.sink VALUES (1, 'plain'), (2, 'plain');
CREATE VIEW {SCHEMA}.v_people AS SELECT id, name, email, upper(ssn) AS ussn FROM {SCHEMA}.people;
CREATE VIEW {SCHEMA}.v_json AS SELECT id, row_to_json(p) AS doc FROM {SCHEMA}.people p;
CREATE FUNCTION {SCHEMA}.email_of(int) RETURNS text LANGUAGE sql STABLE
    AS 'SELECT email FROM {SCHEMA}.people WHERE id = $1';
ANALYZE {SCHEMA}.people;
"""

# Route ids another branch fixes (wt/lateral). They run and are reported, but a leak in one
# of them does not fail the run; the lead removes them once that branch is merged.
Step = Callable[["Probe"], Any]


@dataclass(frozen=True)
class Route:
    id: str
    group: str
    run: Step


@dataclass
class Seen:
    """Everything one route made the client see."""

    rows: list[Any] = field(default_factory=list)
    errors: list[tuple[str | None, str]] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return any(state == REFUSED and "pgwarden" in text for state, text in self.errors)


class Probe:
    """One principal's connections; every way a value can reach the client is captured."""

    def __init__(self, gateway: RunningGateway, groups: tuple[str, ...]) -> None:
        token = gateway.token(f"leak:{'+'.join(groups)}:{RUN}", groups=groups)
        self.dsn = gateway.dsn(token)
        self.url = gateway.url(token)
        self.side: list[str] = []  # notices, notifications, parameter-status
        self.conn = self._connect()
        self.seen = Seen()

    def _connect(self) -> psycopg.Connection[TupleRow]:
        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        conn.add_notice_handler(lambda d: self.side.append(_diag_text(d)))
        conn.add_notify_handler(lambda n: self.side.append(f"{n.channel}:{n.payload}"))
        return conn

    def close(self) -> None:
        self.conn.close()

    def fresh(self) -> None:
        if self.conn.closed or self.conn.broken:
            self.conn = self._connect()
        self.seen = Seen()

    def _error(self, exc: BaseException) -> None:
        if isinstance(exc, psycopg.Error):
            diag = exc.diag
            self.seen.errors.append((diag.sqlstate, f"{exc} {_diag_text(diag)}"))
        elif isinstance(exc, asyncpg.PostgresError):
            fields = " ".join(str(getattr(exc, a, "") or "") for a in ("detail", "hint"))
            self.seen.errors.append((exc.sqlstate, f"{exc} {fields}"))
        else:
            self.seen.errors.append((None, repr(exc)))

    def simple(self, *texts: str) -> None:
        """Each text as one simple-protocol Query (psycopg ClientCursor)."""
        for text in texts:
            try:
                with psycopg.ClientCursor(self.conn) as cur:
                    cur.execute(text.encode())
                    while True:
                        if cur.description is not None:
                            self.seen.rows.extend(cur.fetchall())
                        if not cur.nextset():
                            break
            except psycopg.Error as exc:
                self._error(exc)

    def extended(self, text: str, params: tuple[Any, ...] = (), *, binary: bool = False) -> None:
        """Parse/Bind/Execute, prepared server-side, in text or binary results."""
        try:
            with self.conn.cursor(binary=binary) as cur:
                for _ in range(2):
                    cur.execute(text, params or None, prepare=True)
                    if cur.description is not None:
                        self.seen.rows.extend(cur.fetchall())
        except psycopg.Error as exc:
            self._error(exc)

    def copy_out(self, text: str) -> None:
        try:
            with self.conn.cursor() as cur, cur.copy(text) as copy:
                for block in copy:
                    self.seen.rows.append(bytes(block))
        except psycopg.Error as exc:
            self._error(exc)

    def asyncpg(self, text: str, *params: Any) -> None:
        async def go() -> None:
            conn = await asyncpg.connect(self.url)
            conn.add_log_listener(lambda _c, m: self.side.append(str(m)))
            try:
                self.seen.rows.extend(tuple(r) for r in await conn.fetch(text, *params))
                stmt = await conn.prepare(text)
                self.seen.rows.extend(tuple(r) for r in await stmt.fetch(*params))
            finally:
                await conn.close()

        try:
            asyncio.run(go())
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._error(exc)

    def parameter_status(self) -> str:
        names = ("application_name", "TimeZone", "DateStyle", "IntervalStyle", "client_encoding")
        if self.conn.closed:
            return ""
        return " ".join(str(self.conn.info.parameter_status(n)) for n in names)


def _diag_text(diag: object) -> str:
    parts = ("message_primary", "message_detail", "message_hint", "context", "internal_query")
    return " ".join(str(getattr(diag, p, None) or "") for p in parts)


# -- routes ------------------------------------------------------------------------------

P = f"{SCHEMA}.people"


def q(*texts: str) -> Step:
    return lambda probe: probe.simple(*texts)


def ext(text: str, *params: Any, binary: bool = False) -> Step:
    return lambda probe: probe.extended(text, params, binary=binary)


def apg(text: str, *params: Any) -> Step:
    return lambda probe: probe.asyncpg(text, *params)


def copy(text: str) -> Step:
    return lambda probe: probe.copy_out(text)


ROUTES: list[tuple[str, str, Step]] = [
    # plain reads, aliases, casts
    ("read", "plain-columns", q(f"SELECT email, ssn, card, phone FROM {P}")),
    ("read", "star", q(f"SELECT * FROM {P}")),
    ("read", "table-command", q(f"TABLE {P}")),
    ("read", "qualified-star", q(f"SELECT p.* FROM {P} p")),
    ("read", "alias", q(f'SELECT email AS e, ssn AS "S" FROM {P} AS x')),
    ("read", "cast-text", q(f"SELECT email::text, ssn::varchar, card::bpchar(40) FROM {P}")),
    ("read", "cast-json", q(f"SELECT to_json(email), ssn::json FROM {P}")),
    ("read", "whole-row", q(f"SELECT p FROM {P} p")),
    ("read", "whole-row-text", q(f"SELECT p::text FROM {P} p")),
    ("read", "composite-field", q(f"SELECT (p).email, (p).ssn FROM {P} p")),
    ("read", "composite-star", q(f"SELECT (p).* FROM {P} p")),
    # expressions
    ("expr", "upper-lower", q(f"SELECT upper(email), lower(ssn) FROM {P}")),
    ("expr", "concat-op", q(f"SELECT 'x' || email || 'y', ssn || '' FROM {P}")),
    (
        "expr",
        "substr-reverse",
        q(f"SELECT substr(ssn, 2), reverse(card), right(phone, 12) FROM {P}"),
    ),
    ("expr", "case", q(f"SELECT CASE WHEN id > 0 THEN ssn ELSE 'n' END FROM {P}")),
    ("expr", "coalesce-greatest", q(f"SELECT coalesce(ssn, 'x'), greatest(card, 'a') FROM {P}")),
    ("expr", "format", q(f"SELECT format('%s/%s', email, ssn) FROM {P}")),
    ("expr", "concat", q(f"SELECT concat(email, ssn), concat_ws(',', card, phone) FROM {P}")),
    ("expr", "array", q(f"SELECT ARRAY[email, ssn], (ARRAY[card])[1] FROM {P}")),
    ("expr", "row-constructor", q(f"SELECT ROW(email, ssn)::text FROM {P}")),
    ("expr", "literal-beside", q(f"SELECT 'lit', 1, ssn, upper(card) FROM {P}")),
    ("expr", "translate", q(f"SELECT translate(ssn, 'S', 's'), replace(card, 'C', 'c') FROM {P}")),
    ("expr", "encode", q(f"SELECT encode(convert_to(ssn, 'UTF8'), 'escape') FROM {P}")),
    # serialisation
    ("json", "row-to-json", q(f"SELECT row_to_json(p) FROM {P} p")),
    ("json", "to-jsonb", q(f"SELECT to_jsonb(p), to_jsonb(p)::text FROM {P} p")),
    ("json", "json-build", q(f"SELECT json_build_object('e', email, 's', ssn) FROM {P}")),
    ("json", "json-agg", q(f"SELECT json_agg(p) FROM {P} p")),
    ("json", "jsonb-object-agg", q(f"SELECT jsonb_object_agg(id, card) FROM {P}")),
    ("json", "xmlelement", q(f"SELECT xmlelement(name e, email, ssn)::text FROM {P}")),
    ("json", "xmlforest", q(f"SELECT xmlforest(email, ssn)::text FROM {P}")),
    # aggregates
    ("agg", "max-min", q(f"SELECT max(email), min(ssn), max(card), min(phone) FROM {P}")),
    ("agg", "string-agg", q(f"SELECT string_agg(ssn, ','), string_agg(card, '') FROM {P}")),
    ("agg", "array-agg", q(f"SELECT array_agg(email), array_agg(ssn)::text FROM {P}")),
    ("agg", "window", q(f"SELECT first_value(ssn) OVER (), lag(card) OVER (ORDER BY id) FROM {P}")),
    ("agg", "count-beside", q(f"SELECT count(*), count(email), max(ssn) FROM {P}")),
    ("agg", "mode", q(f"SELECT mode() WITHIN GROUP (ORDER BY ssn) FROM {P}")),
    # set operations, CTEs, derived tables
    ("set", "union", q(f"SELECT name FROM {P} UNION SELECT ssn FROM {P}")),
    ("set", "union-all-star", q(f"SELECT * FROM {P} UNION ALL SELECT * FROM {P}")),
    ("set", "intersect-except", q(f"(SELECT card FROM {P}) EXCEPT (SELECT 'x')")),
    ("set", "values-subselect", q(f"VALUES ((SELECT max(ssn) FROM {P})), ('x')")),
    ("cte", "cte", q(f"WITH c AS (SELECT email, ssn FROM {P}) SELECT * FROM c")),
    ("cte", "cte-expr", q(f"WITH c AS (SELECT upper(ssn) AS u FROM {P}) SELECT u, 'x' FROM c")),
    (
        "cte",
        "recursive",
        q(
            f"WITH RECURSIVE r(v, n) AS (SELECT ssn, 1 FROM {P} UNION ALL "
            "SELECT v, n + 1 FROM r WHERE n < 2) SELECT v FROM r"
        ),
    ),
    ("derived", "subselect", q(f"SELECT * FROM (SELECT email, ssn AS s FROM {P}) d")),
    ("derived", "subselect-expr", q(f"SELECT d.x FROM (SELECT ssn || '' AS x FROM {P}) d")),
    ("derived", "scalar-subquery", q(f"SELECT (SELECT ssn FROM {P} WHERE id = 1)")),
    ("derived", "array-subquery", q(f"SELECT ARRAY(SELECT card FROM {P})")),
    # joins, every form, LATERAL included
    ("join", "comma", q(f"SELECT a.ssn, b.card FROM {P} a, {P} b WHERE a.id = b.id")),
    ("join", "inner-on", q(f"SELECT a.email, b.ssn FROM {P} a JOIN {P} b ON a.id = b.id")),
    ("join", "using", q(f"SELECT * FROM {P} a JOIN {SCHEMA}.sink s USING (id)")),
    ("join", "natural", q(f"SELECT * FROM {P} NATURAL JOIN {SCHEMA}.sink")),
    ("join", "left-right-full", q(f"SELECT a.ssn FROM {P} a FULL JOIN {P} b ON a.id = b.id")),
    ("join", "cross", q(f"SELECT a.card, s.note FROM {P} a CROSS JOIN {SCHEMA}.sink s")),
    (
        "lateral",
        "lateral-comma-subselect",
        q(f"SELECT x.e FROM {P} p, LATERAL (SELECT p.email AS e) x"),
    ),
    (
        "lateral",
        "lateral-comma-function",
        q(f"SELECT v FROM {P} p, LATERAL unnest(ARRAY[p.ssn]) v"),
    ),
    (
        "lateral",
        "lateral-cross-join-function",
        q(f"SELECT v FROM {P} p CROSS JOIN LATERAL unnest(ARRAY[p.ssn, p.card]) v"),
    ),
    (
        "lateral",
        "lateral-join-on-subselect",
        q(f"SELECT x.e FROM {P} p JOIN LATERAL (SELECT p.ssn || '' AS e) x ON true"),
    ),
    (
        "lateral",
        "lateral-left-join-function",
        q(f"SELECT v FROM {P} p LEFT JOIN LATERAL unnest(ARRAY[p.email]) v ON true"),
    ),
    (
        "lateral",
        "lateral-cross-join-subselect-expr",
        q(f"SELECT x.* FROM {P} p CROSS JOIN LATERAL (SELECT upper(p.card) AS u) x"),
    ),
    ("lateral", "function-rows", q(f"SELECT * FROM {P} p, unnest(ARRAY[p.phone]) WITH ORDINALITY")),
    # views
    ("view", "view", q(f"SELECT * FROM {SCHEMA}.v_people")),
    ("view", "view-expr", q(f"SELECT ussn, email || '' FROM {SCHEMA}.v_people")),
    ("view", "view-json", q(f"SELECT doc::text FROM {SCHEMA}.v_json")),
    # prepared, extended, binary
    (
        "protocol",
        "sql-prepare-execute",
        q(f"PREPARE lp AS SELECT ssn, upper(email) FROM {P}", "EXECUTE lp", "DEALLOCATE lp"),
    ),
    ("protocol", "extended-text", ext(f"SELECT email, ssn || %s FROM {P} WHERE id > %s", "", 0)),
    ("protocol", "extended-binary", ext(f"SELECT email, card, upper(ssn) FROM {P}", binary=True)),
    ("protocol", "asyncpg-binary", apg(f"SELECT email, ssn, card, phone, upper(ssn) FROM {P}")),
    ("protocol", "asyncpg-params", apg(f"SELECT $1::text || ssn FROM {P} WHERE id > $2", "", 0)),
    ("protocol", "asyncpg-json", apg(f"SELECT to_jsonb(p) FROM {P} p")),
    # cursors
    (
        "cursor",
        "declare-fetch",
        q(
            f"DECLARE lc CURSOR WITH HOLD FOR SELECT ssn, upper(card) FROM {P}",
            "FETCH ALL FROM lc",
            "CLOSE lc",
        ),
    ),
    (
        "cursor",
        "declare-move-fetch",
        q(
            "BEGIN",
            f"DECLARE lm SCROLL CURSOR FOR SELECT * FROM {P}",
            "MOVE LAST IN lm",
            "FETCH PRIOR FROM lm",
            "COMMIT",
        ),
    ),
    # COPY
    ("copy", "copy-table", copy(f"COPY {P} TO STDOUT")),
    ("copy", "copy-query", copy(f"COPY (SELECT ssn FROM {P}) TO STDOUT")),
    ("copy", "copy-columns-csv", copy(f"COPY {P} (email, card) TO STDOUT WITH (FORMAT csv)")),
    # RETURNING (rolled back)
    (
        "returning",
        "update-returning",
        q("BEGIN", f"UPDATE {P} SET name = name WHERE id = 1 RETURNING email, ssn", "ROLLBACK"),
    ),
    (
        "returning",
        "delete-returning",
        q("BEGIN", f"DELETE FROM {P} WHERE id = 2 RETURNING *", "ROLLBACK"),
    ),
    # error texts
    ("error", "cast-int", q(f"SELECT ssn::int FROM {P}")),
    ("error", "cast-date", q(f"SELECT card::date FROM {P}")),
    ("error", "cast-json-invalid", q(f"SELECT ssn::jsonb FROM {P}")),
    ("error", "cast-regclass", q(f"SELECT ssn::regclass FROM {P}")),
    ("error", "cast-uuid", q(f"SELECT phone::uuid FROM {P}")),
    ("error", "xml-parse", q(f"SELECT xmlparse(document ssn) FROM {P}")),
    ("error", "to-number", q(f"SELECT to_number(card, '999')::text || card FROM {P}")),
    (
        "error",
        "unique-violation",
        q(
            "BEGIN",
            "CREATE TEMP TABLE lu (v text UNIQUE)",
            f"INSERT INTO lu SELECT ssn FROM {P}",
            f"INSERT INTO lu SELECT ssn FROM {P}",
            "ROLLBACK",
        ),
    ),
    # catalog statistics
    (
        "stats",
        "pg-stats",
        q(
            "SELECT attname, most_common_vals, histogram_bounds FROM pg_stats"
            f" WHERE schemaname = '{SCHEMA}'"
        ),
    ),
    (
        "stats",
        "pg-stats-text",
        q(f"SELECT histogram_bounds::text FROM pg_stats WHERE schemaname = '{SCHEMA}'"),
    ),
    ("stats", "pg-statistic", q("SELECT stavalues1, stavalues2 FROM pg_statistic")),
    # side channels
    ("side", "set-config", q(f"SELECT set_config('leak.v', ssn, false) FROM {P}", "SHOW leak.v")),
    (
        "side",
        "application-name",
        q(f"SELECT set_config('application_name', ssn, false) FROM {P} WHERE id = 1"),
    ),
    ("side", "notify", q("LISTEN leakch", f"SELECT pg_notify('leakch', ssn) FROM {P}", "SELECT 1")),
    ("side", "advisory-lock", q(f"SELECT pg_advisory_lock(hashtext(ssn)) FROM {P}")),
    (
        "side",
        "raise-notice-do",
        q(f"DO $$BEGIN RAISE NOTICE '%', (SELECT ssn FROM {P} LIMIT 1); END$$"),
    ),
    ("side", "pg-stat-activity", q("SELECT query FROM pg_stat_activity")),
    # functions
    ("fn", "fn-user-sql-function", q(f"SELECT {SCHEMA}.email_of(1), {SCHEMA}.email_of(2)")),
    (
        "fn",
        "fn-query-to-xml",
        q(f"SELECT query_to_xml('SELECT ssn FROM {P}', true, false, '')::text"),
    ),
    ("fn", "fn-table-to-xml", q(f"SELECT table_to_xml('{P}', true, false, '')::text")),
    (
        "fn",
        "fn-cursor-to-xml",
        q(
            "BEGIN",
            f"DECLARE lx CURSOR FOR SELECT ssn FROM {P}",
            "SELECT cursor_to_xml('lx', 5, true, false, '')::text",
            "ROLLBACK",
        ),
    ),
    ("fn", "fn-ts-stat", q(f"SELECT * FROM ts_stat('SELECT to_tsvector(ssn) FROM {P}')")),
    ("fn", "fn-quote-literal", q(f"SELECT quote_literal(ssn), quote_ident(card) FROM {P}")),
    # write laundering: a classified value copied where no mask follows it (rolled back)
    (
        "launder",
        "launder-update-returning",
        q("BEGIN", f"UPDATE {P} SET name = ssn WHERE id = 1 RETURNING name", "ROLLBACK"),
    ),
    (
        "launder",
        "launder-insert-select-returning",
        q(
            "BEGIN",
            f"INSERT INTO {SCHEMA}.sink SELECT id + 10, card FROM {P} RETURNING note",
            "ROLLBACK",
        ),
    ),
    (
        "launder",
        "launder-copy-then-read",
        q(
            "BEGIN",
            f"UPDATE {SCHEMA}.sink s SET note = p.email FROM {P} p WHERE p.id = s.id",
            f"SELECT note FROM {SCHEMA}.sink",
            "ROLLBACK",
        ),
    ),
]

GROUPS: dict[str, tuple[str, ...]] = {"ai-agents": ("ai-agents",), "engineers": ("engineers",)}


def _leaks(text: str) -> list[str]:
    """Markers found in `text`, however cased or reversed."""
    low = text.lower()
    found = []
    for marker in MARKERS.values():
        core = marker[1:] if marker.startswith("q") else marker
        if core.lower() in low or core[::-1].lower() in low:
            found.append(marker)
    return found


def _text_of(seen: Seen, probe: Probe, status_before: str) -> str:
    parts: list[Any] = [seen.rows, [text for _, text in seen.errors], probe.side]
    status = probe.parameter_status()
    if status != status_before:
        parts.append(status)
    return orjson.dumps(parts, default=repr).decode()


@dataclass
class Tally:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_group: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    leaks: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)  # every route's outcome, for -v


@pytest.fixture(scope="module")
def leak_gateway(request: pytest.FixtureRequest) -> Iterator[RunningGateway]:
    """A gateway with the reference policy and the shipped classification plus leakprobe's."""
    conftest = harness(request)
    pg_cluster: LocalCluster = request.getfixturevalue("pg_cluster")
    opa_binary: Path = request.getfixturevalue("opa_binary")
    request.getfixturevalue("app_database")
    root = Path(tempfile.mkdtemp(prefix="pgwarden-leak-"))
    bundles = root / "bundles"
    shutil.copytree(ROOT / "bundles", bundles, ignore=shutil.ignore_patterns("*.tar.gz"))
    data_file = bundles / "pgwarden" / "data.json"
    data = orjson.loads(data_file.read_bytes())
    data["classification"].update(CLASSIFICATION)
    data_file.write_bytes(orjson.dumps(data))
    with psycopg.connect(pg_cluster.dsn(dbname="appdb"), autocommit=True) as conn:
        conn.execute(SETUP.encode())
    gw = conftest.start_gateway(
        root / "state", pg_cluster, opa_binary, policy={"bundle_dir": bundles}
    )
    try:
        yield gw
    finally:
        conftest.stop_gateway(gw)
        with psycopg.connect(pg_cluster.dsn(dbname="appdb"), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE".encode())
        shutil.rmtree(root, ignore_errors=True)


def _summary(tally: Tally) -> str:
    lines = ["", "masking leak harness: routes by outcome"]
    totals: Counter[str] = Counter()
    for (_, outcome), n in tally.outcomes.items():
        totals[outcome] += n
    lines.append("  all: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    for principal in GROUPS:
        counts = {k[1]: v for k, v in tally.outcomes.items() if k[0] == principal}
        lines.append(f"  {principal}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    groups = sorted({g for g, _, _ in tally.by_group})
    for g in groups:
        merged: Counter[str] = Counter()
        for (gg, o, _), n in tally.by_group.items():
            if gg == g:
                merged[o] += n
        lines.append(f"    {g}: " + ", ".join(f"{k}={v}" for k, v in sorted(merged.items())))
    for leak in tally.leaks:
        lines.append(f"  LEAK {leak}")
    return "\n".join(lines)


def test_no_classified_value_reaches_a_client(
    leak_gateway: RunningGateway, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    route_ids = [route_id for _, route_id, _ in ROUTES]
    assert len(route_ids) == len(set(route_ids)), "route ids must be unique"
    assert len(ROUTES) >= 60
    tally = Tally()
    for principal, groups in GROUPS.items():
        probe = Probe(leak_gateway, groups)
        try:
            for group, route_id, step in ROUTES:
                probe.fresh()
                probe.side.clear()
                status_before = probe.parameter_status()
                step(probe)
                seen = probe.seen
                text = _text_of(seen, probe, status_before)
                found = _leaks(text)
                if found:
                    outcome = "LEAK"
                elif seen.rows:
                    outcome = "masked"
                elif seen.refused:
                    outcome = "refused"
                elif seen.errors:
                    outcome = "error-without-leak"
                else:
                    outcome = "masked"  # ran, returned nothing (no rows to leak)
                label = f"{principal} {route_id}: {outcome}"
                tally.routes.append(f"  {group:9} {label}")
                if outcome == "LEAK":
                    tally.leaks.append(f"{principal} {route_id}: {found[0]} in {text[:300]}")
                tally.outcomes[(principal, outcome)] += 1
                tally.by_group[(group, outcome, principal)] += 1
        finally:
            probe.close()
    summary = _summary(tally)
    with capsys.disabled():
        if request.config.getoption("verbose") > 0:
            for line in tally.routes:
                print(line)
        print(summary)
    assert not tally.leaks, summary
