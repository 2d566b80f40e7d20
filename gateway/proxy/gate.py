"""The one place every statement passes through: analysis, policy decision and the
write-ahead audit record, producing a verdict the session enforces."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from gateway.audit.events import StatementOutcome, StatementRequest
from gateway.audit.records import RequestTemplate, principal_record
from gateway.control.models import ApprovalRequest
from gateway.control.targets import dbname_for
from gateway.enforce.approvals import grant_key, new_request_id, shape_key
from gateway.enforce.masking import MaskPlan
from gateway.guards.budgets import RowBudget, StatementLimits
from gateway.guards.enforced import EnforcedSettings
from gateway.guards.estimate import (
    IN_FAILED_TRANSACTION,
    UNPLANNABLE,
    NotExplained,
    estimate_key,
    estimate_of,
    explainable,
    parameter_count,
    sql_prepared,
)
from gateway.guards.rates import TOO_MANY_STATEMENTS
from gateway.identity.principal import Principal
from gateway.metrics import GatewayMetrics
from gateway.policy.decision import Decision, Mask
from gateway.policy.input import SessionInfo, TargetInfo, assemble_input, target_input
from gateway.protocol import ErrorResponse, FieldDescription
from gateway.proxy.holds import cannot_ask, grant_notice, held_notice, hold_refusal
from gateway.proxy.ports import (
    Approvals,
    AuditSink,
    AuditUnavailable,
    Decider,
    LiteralReads,
    PolicyRevision,
)
from gateway.proxy.search_path import PathProblem, sets_search_path
from gateway.proxy.tracker import StatementRun
from gateway.sql.analyzer import Spans
from gateway.sql.catalog import DEFAULT_SEARCH_PATH, consults_catalog
from gateway.sql.databases import databases_held_by_statement
from gateway.sql.facts import LINEAGE_OPAQUE_BUILTINS, StatementFacts

# The SQLSTATE of every refusal pgwarden makes (insufficient_privilege).
REFUSED = "42501"
# The setting a client gives its justification for approvals in.
JUSTIFICATION_SETTING = "pgwarden.reason"
# Cost estimates kept per session (gateway/guards/estimate.py), the oldest dropped first.
_ESTIMATES_KEPT = 1000
# Simple-protocol plans kept per session, by statement shape (the least recently used go).
_QUERY_PLANS_KEPT = 256
# Plans kept per shape, one per cost estimate its texts were decided with (the oldest go):
# texts whose literals move the estimate (WHERE id < N) each make one of their own.
_ESTIMATES_PER_SHAPE = 8
# Request-record templates kept per session (one per plan run lately; the oldest go first).
_RECORD_TEMPLATES_KEPT = 256
# Statements that return rows decided elsewhere (cursor, prepared statement): they take
# the session's sticky masks.
_ROW_RELAYS = frozenset({"FETCH", "EXECUTE"})

log = logging.getLogger("pgwarden.gate")


def _involves_masked(facts: StatementFacts | None, masks: Sequence[Mask]) -> bool:
    """Whether an output column PostgreSQL reports no base column for (an expression) may
    carry a masked value: the statement uses a masked column (any usage; `*` was expanded
    by the catalog), an unexpanded `*`, a function pgwarden cannot see into, or text it
    could not analyse (forwarded for admins: it names no columns). `count(*)`
    over a table with masked columns involves none of them."""
    if facts is None or facts.category == "unknown" or "opaque_function" in facts.flags:
        return True
    keys = {(m.schema, m.table, m.column) for m in masks}
    if any((c.schema, c.table, c.column) in keys or c.column == "*" for c in facts.columns):
        return True
    return facts.calls_untraced_function()


# Statements after which no cursor's rows are known by name any more.
_FORGETS_CURSORS = frozenset({"CLOSE", "DISCARD", "CALL", "DO"})
_OPENS_CURSORS = frozenset({"opaque_function", "procedural"})

# Facts whose output lineage does not say where every value comes from: a function pgwarden
# cannot see into may read a masked column that no source names; without the catalog (or a
# relation it does not know) `*` and schemas are guesses.
_UNTRACED = frozenset({"opaque_function", "catalog_unavailable", "unresolved_relation"})


def _output_masks(
    facts: StatementFacts | None, masks: Sequence[Mask]
) -> tuple[tuple[str | None, bool], ...] | None:
    """Per entry of the statement's output list, "redact" when a masked column flows into
    it and None when none does; None overall where lineage cannot be trusted."""
    if facts is None or facts.outputs is None or _UNTRACED.intersection(facts.flags):
        return None
    if facts.calls_untraced_function():
        return None
    outputs = facts.outputs
    if any(o.spread for o in outputs) and any(o.table is not None for o in outputs):
        # A table's width from a cache that may be stale would shift what the entry of
        # unknown width takes up: count on nothing.
        return None
    keys = {(m.schema, m.table, m.column) for m in masks}
    tables = {(m.schema, m.table) for m in masks}
    return tuple(
        (
            "redact"
            if any(s in keys or (s[2] == "*" and (s[0], s[1]) in tables) for s in o.sources)
            else None,
            o.spread,
        )
        for o in outputs
    )


def _same_conditions(one: QueryPlan, other: QueryPlan) -> bool:
    """Whether two plans of a shape were made under the same conditions (search_path,
    catalog generation, transaction state) with the same facts but for the text they quote."""
    return (
        one.search_path == other.search_path
        and one.catalog_generation == other.catalog_generation
        and one.in_transaction == other.in_transaction
        and one.facts.with_text(other.facts.text) == other.facts
    )


def _relays_rows(facts: StatementFacts | None) -> bool:
    return facts is not None and facts.command in _ROW_RELAYS


class PathUnknown(Exception):
    """The session's search_path cannot be known now: the statements are refused."""

    def __init__(self, problem: PathProblem, facts: tuple[StatementFacts, ...]) -> None:
        super().__init__(problem.reason)
        self.problem = problem
        self.facts = facts


_PATH_NOT_LAST = Decision.refuse(
    "a statement that changes search_path must be the last of its Query message"
    " (send the statements after it separately)"
)


class Analyzer(Protocol):
    def analyze(self, text: str) -> tuple[StatementFacts, ...]: ...

    def shape_of(self, text: str) -> tuple[str, Spans] | None: ...

    def shared_span(self, shape: str) -> int | None: ...


class PreparedRegistry(Protocol):
    def resolve(self, facts: tuple[StatementFacts, ...]) -> tuple[StatementFacts, ...]: ...

    def register(self, name: str, facts: StatementFacts) -> None: ...

    def lookup(self, name: str) -> StatementFacts | None: ...

    def closed(self, name: str) -> None: ...

    def completed(self, facts: StatementFacts) -> None: ...


@runtime_checkable
class MaskResolver(Protocol):
    """The parts of the catalog that keep masks exact across DDL made on the server."""

    generation: str | None

    @property
    def watched(self) -> bool: ...

    @property
    def steady(self) -> bool: ...

    @property
    def epoch(self) -> int: ...

    async def refresh(self, since: float | None = None) -> str | None: ...

    def refresh_soon(self) -> asyncio.Future[str | None]: ...

    def check_sql(self) -> tuple[str, str]: ...

    async def mask_targets(self, masks: Sequence[Mask]) -> dict[tuple[int, int], str] | None: ...

    def knows(self, relation: int, attnum: int) -> bool: ...

    def relation_oids(self, facts: StatementFacts) -> frozenset[int] | None: ...

    def columns_of(self, relations: Iterable[int]) -> frozenset[tuple[int, int]]: ...

    async def learn(self, relations: Iterable[int]) -> bool: ...


class Catalog(Protocol):
    async def function_name(self, oid: int) -> str | None: ...

    async def resolve(
        self, facts: StatementFacts, search_path: Sequence[str], user: str | None = None
    ) -> StatementFacts: ...


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What the gate needs to know about the session to build policy inputs and records."""

    instance: str
    session_id: str
    client_addr: str
    application_name: str
    startup_user: str
    principal: Principal
    target_name: str
    # The database of the target the session uses (dbname=TARGET/DATABASE, or the default).
    target_database: str
    target_labels: dict[str, str] = field(default_factory=dict)
    # The target's own database ("": target_database) and the others it lets clients choose.
    target_default_database: str = ""
    target_databases: tuple[str, ...] = ()


@dataclass(slots=True)
class KeptMasks:
    """A masked prepared statement's masks as the slow path resolved them (_prepare_masks),
    kept with it so that its later Executes take them as they are, from the data callback,
    while what they were resolved from holds: the catalog generation its Parse was decided
    under (checked per Execute, see catalog_check), the catalog cache not dropped since
    (`epoch`), and no mask added to the session's sticky ones (`sticky`, their count: they
    only grow). The policy revision, search_path and token are the plan's own conditions.
    `row_plans`: the DataRow plan of each result description met, built once."""

    generation: str
    epoch: int
    sticky: int
    masks: tuple[Mask, ...]
    targets: dict[tuple[int, int], str]
    expressions: bool
    lineage: tuple[tuple[str | None, bool], ...] | None
    relations: frozenset[int] | None
    columns: frozenset[tuple[int, int]] | None
    # (RowDescription, result formats, client encoding) → plan (None: nothing to mask).
    row_plans: dict[tuple[bytes, tuple[int, ...] | None, str], MaskPlan | None] = field(
        default_factory=dict
    )


@dataclass(slots=True)
class QueryPlan:
    """A simple-protocol statement's plan, shared by every text of its shape (texts that
    differ only in literals) where neither its facts nor its decision can depend on a
    literal's value (keep_query_plan says where): the facts resolved and decided (with the
    first text's), and the conditions they hold under; the record of each text carries
    that text. Where the policy input carries a cost estimate, which does depend on the
    literals, a plan serves only the texts whose own estimate is the one it was decided
    with (kept by estimate_key, per shape)."""

    span: int
    facts: StatementFacts
    decisions: list[Decision]
    search_path: tuple[str, ...]
    catalog_generation: str | None
    in_transaction: bool
    masks: KeptMasks | None


@dataclass(slots=True)
class Verdict:
    """What to do with one client message that carries statements."""

    allowed: bool
    runs: list[StatementRun]
    decisions: list[Decision]
    # The ErrorResponse the client sees in place of the statement when refused.
    refusal: bytes | None = None
    facts: tuple[StatementFacts, ...] = ()
    # The server rejects the statement itself (an aborted transaction): its own error, not
    # `refusal`, is what the client would see direct.
    server_rejects: bool = False
    # The cost estimate each statement's policy input carried (empty: none was asked).
    estimates: Sequence[dict[str, Any] | None] = ()
    # Served on a kept plan (executed()): nothing new to keep from it.
    from_plan: bool = False


def combine(decisions: Sequence[Decision]) -> Decision:
    """A message is decided as a whole: any deny denies it; else any approval holds it."""
    for wanted in ("deny", "approve"):
        for d in decisions:
            if d.action == wanted:
                return d
    return decisions[0] if decisions else Decision.refuse("empty statement list")


def refusal_error(decision: Decision, record_id: str | None = None) -> bytes:
    """What the client sees of a deny or an approval the gateway cannot wait for yet: one
    reason in the message, the others and the decision id in DETAIL; for an approval, a HINT
    saying how to ask for it (the audit record is what an approver reads)."""
    reasons = list(dict.fromkeys(r.strip() for r in decision.reasons if r.strip()))
    reason = reasons[0] if reasons else "the policy gave no reason"
    details = []
    if len(reasons) > 1:
        details.append("also: " + "; ".join(reasons[1:]))
    if decision.decision_id:
        details.append(f"decision id: {decision.decision_id}")
    detail = "\n".join(details) or None
    hint = None
    if decision.action == "approve":
        message = f"pgwarden: approval required: {reason}"
        who = " or ".join(decision.approvers) or "an approver"
        shown = f"pgwarden audit show {record_id}" if record_id else "the decision id"
        hint = (
            "pgwarden cannot hold a statement for approval yet, so it was not run."
            f" To ask for approval, send {who} this, for them to review and run:"
            f" {shown}"
        )
    else:
        message = f"pgwarden: statement denied: {reason}"
    return ErrorResponse.build("ERROR", REFUSED, message, detail=detail, hint=hint).encode()


def _id_of(
    chosen: Decision, decisions: Sequence[Decision], request_ids: Sequence[str | None]
) -> str | None:
    """The audit record of the statement whose decision the message got."""
    return next((rid for d, rid in zip(decisions, request_ids, strict=False) if d is chosen), None)


def _audit_refusal(
    exc: AuditUnavailable, decisions: list[Decision], facts: tuple[StatementFacts, ...]
) -> Verdict:
    # Fail closed. (audit.fail_open is the sink's to apply: it then returns no record id.)
    message = f"audit store unavailable, statement not run ({exc})"
    return Verdict(False, [], decisions, refusal_for(message, "58000"), facts)


def _rules_refusal(problem: str) -> Decision:
    # With an id, as the decider gives its own refusals one (the client's DETAIL names it).
    return replace(
        Decision.refuse(f"session rules unavailable: {problem}"), decision_id=str(uuid.uuid4())
    )


def refusal_for(message: str, sqlstate: str = REFUSED) -> bytes:
    return ErrorResponse.build("ERROR", sqlstate, f"pgwarden: {message}").encode()


@dataclass(slots=True)
class _Ask:
    """A message the policy holds for approval, before it is recorded: the id its request
    will have, or the grant it runs under instead."""

    id: str
    key: str
    shape: str
    granted: bool = False


# What a session sends the client at once (a NoticeResponse), at the next message boundary.
Notify = Callable[[bytes], Awaitable[None]]


class StatementGate:
    """Per-session: turns statement text into a verdict, recording each statement first."""

    # Slots, not a __dict__: one per open session (see ClientSession.__slots__).
    __slots__ = (
        "_analyzer",
        "_approvals",
        "_audit",
        "_audit_target",
        "_catalog",
        "_decider",
        "_estimates",
        "_free_databases",
        "_literal_reads",
        "_mask_catalog",
        "_metrics",
        "_principal_input",
        "_query_plans",
        "_record_templates",
        "_revisions",
        "_target_input",
        "budgeted",
        "catalog_generation",
        "ctx",
        "cursors",
        "enforced",
        "entered",
        "estimate_plan_rows",
        "estimate_seq_scan_rows",
        "explain",
        "held",
        "in_transaction",
        "justification",
        "notify",
        "prepared",
        "rate_check",
        "record_rows",
        "rows_relayed",
        "rules_problem",
        "search_path",
        "settle_search_path",
        "statements_recorded",
        "sticky_masks",
        "upstream_user",
    )

    def __init__(
        self,
        ctx: SessionContext,
        *,
        analyzer: Analyzer,
        prepared: PreparedRegistry,
        catalog: Catalog | None,
        decider: Decider,
        audit: AuditSink,
        free_databases: Callable[[Sequence[str]], Awaitable[None]] | None = None,
        metrics: GatewayMetrics | None = None,
        approvals: Approvals | None = None,
    ) -> None:
        self.ctx = ctx
        self._approvals = approvals
        # Set by the session: how a notice reaches the client while a statement is held.
        self.notify: Notify | None = None
        # The justification for approvals (SET pgwarden.reason = '...'), and the request
        # held now, if any (a CancelRequest withdraws it).
        self.justification = ""
        self.held: str | None = None
        self._metrics = metrics or GatewayMetrics()
        self._free_databases = free_databases
        self._analyzer = analyzer
        self.prepared = prepared
        self._catalog = catalog
        # What the catalog and the decider offer beyond their ports, declared and checked
        # once here rather than probed per statement.
        self._mask_catalog = catalog if isinstance(catalog, MaskResolver) else None
        self._decider = decider
        self._revisions = decider if isinstance(decider, PolicyRevision) else None
        self._literal_reads = decider if isinstance(decider, LiteralReads) else None
        # Simple-protocol plans by statement shape (keep_query_plan, planned_query), each
        # shape's by the estimate_key of the cost estimate its decisions were made with
        # (b"": the input carried none, as in every session without estimates).
        self._query_plans: OrderedDict[str, dict[bytes, QueryPlan]] = OrderedDict()
        # The request records of plans, pre-encoded (request_planned); made at first use,
        # so an idle session holds none.
        self._record_templates: (
            dict[tuple[int, str, str, bool], tuple[Decision, RequestTemplate]] | None
        ) = None
        self._audit = audit
        self.in_transaction = False
        # Statements recorded and rows relayed so far, for `pgwarden sessions list`.
        self.statements_recorded = 0
        self.rows_relayed = 0
        # A statement of this session has had a budget: its relay counts COPY data too.
        self.budgeted = False
        # The session's search_path as the server will apply it to unqualified names.
        self.search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH
        self.upstream_user: str | None = None
        # Set by the session: waits until search_path is known; a reason when it cannot be.
        self.settle_search_path: Callable[[], Awaitable[PathProblem | None]] | None = None
        self._principal_input = ctx.principal.to_input()
        # Settings the policy's session rule enforces (gateway/guards): statements that would
        # raise or clear them are denied where the policy lets them run.
        self.enforced = EnforcedSettings()
        # The session's statement rate limit (gateway/guards/rates.py): takes a message's
        # statements, or says why not. None: no limit.
        self.rate_check: Callable[[int], str | None] | None = None
        # The policy's session rule could not be read (the session says why): every
        # statement is refused until it is, since its guards are unknown.
        self.rules_problem: str | None = None
        # Explains a statement's text (with a Parse's parameter types: its generic plan) on
        # the session's upstream connection, or says why not; set where the session rule asks
        # for estimates (gateway/guards/estimate.py).
        self.explain: (
            Callable[[str, tuple[int, ...] | None], Awaitable[str | NotExplained]] | None
        ) = None
        self.estimate_seq_scan_rows = 0
        self.estimate_plan_rows: int | None = None
        # Estimates by statement text, parameter types and search_path: a known one is not
        # explained again. Not by shape: the literals decide the estimate (WHERE g < 10
        # against WHERE g < 10000000); a Parse's text is its shape, explained generically.
        self._estimates: dict[
            tuple[str, tuple[int, ...] | None, tuple[str, ...]], dict[str, Any] | None
        ] = {}
        self.record_rows = ctx.target_labels.get("pgwarden.record") == "rows"
        # Every mask decided in this session, by column and method: re-resolved for each
        # statement that relays rows decided elsewhere (FETCH, EXECUTE).
        self.sticky_masks: dict[tuple[str, str, str, str], Mask] = {}
        # The catalog generation the last statement was resolved under (None: unconfirmed).
        self.catalog_generation: str | None = None
        # When (time.monotonic) the message now at the gate was handed to it (inf: none, as
        # at login): a catalog probe sent after that serves all of its steps.
        self.entered = math.inf
        # Cursor name → the lineage of its rows, as DECLARE's decision saw them (a FETCH
        # names the cursor, not the columns). Missing: unknown, so masked as before.
        self.cursors: dict[str, tuple[tuple[str | None, bool], ...] | None] = {}
        # A session in another database than the target's default is recorded as TARGET/DB.
        self._audit_target = dbname_for(
            ctx.target_name, ctx.target_database, ctx.target_default_database or ctx.target_database
        )
        self._target_input = target_input(
            TargetInfo(
                ctx.target_name,
                ctx.target_database,
                ctx.target_labels,
                ctx.target_default_database,
                ctx.target_databases,
            )
        )

    # -- analysis and decision -------------------------------------------------------

    async def _facts(self, text: str) -> tuple[StatementFacts, ...]:
        return await self._resolved(self.prepared.resolve(self._analyzer.analyze(text)))

    async def _resolved(self, facts: tuple[StatementFacts, ...]) -> tuple[StatementFacts, ...]:
        """Facts against the target's catalog as the session stands now (its search_path).

        Raises PathUnknown when the session cannot say which search_path the server will
        use (transaction control needs no names resolved and always goes through)."""
        if self._catalog is not None:
            if self.settle_search_path is not None and any(f.category != "tcl" for f in facts):
                problem = await self.settle_search_path()
                if problem is not None:
                    raise PathUnknown(problem, facts)
            catalog = self._catalog
            if any(consults_catalog(f) for f in facts):
                # DDL made on the server since the cache was filled must be seen first.
                self.catalog_generation = await self._refresh_catalog()
            path, user = self.search_path, self.upstream_user
            facts = tuple([await catalog.resolve(f, path, user) for f in facts])
        return facts

    def _masks_catalog(self) -> MaskResolver | None:
        return self._mask_catalog

    async def _catalog_resolve(self, facts: StatementFacts) -> None:
        if self._catalog is not None:
            await self._catalog.resolve(facts, self.search_path, self.upstream_user)

    async def _refresh_catalog(self) -> str | None:
        catalog = self._masks_catalog()
        return await catalog.refresh(self.entered) if catalog is not None else None

    async def catalog_moved(self, generation: str | None, facts: Sequence[StatementFacts]) -> bool:
        """Whether statements resolved under catalog `generation` (a Parse's) may mean
        something else now: DDL committed since, or the generation cannot be confirmed."""
        if self._masks_catalog() is None or not any(consults_catalog(f) for f in facts):
            return False
        now = await self._refresh_catalog()
        return now is None or now != generation

    async def _path_refusal(
        self, exc: PathUnknown, protocol: str, params: tuple[str | None, ...]
    ) -> Verdict:
        if exc.problem.skipped:
            # The server skips it: not run, so neither decided nor recorded (as every message
            # the server skips once the session knows it does).
            return Verdict(False, [], [], refusal_for(exc.problem.reason), exc.facts)
        verdict = await self._verdict(
            exc.facts, protocol, params, record=True, decided=Decision.refuse(exc.problem.reason)
        )
        if verdict.runs and exc.problem.aborted and exc.facts[0].category != "tcl":
            # Recorded (no audit refusal to show) and the server, in an aborted transaction,
            # rejects the statement's first command whatever it is.
            verdict.server_rejects = True
        return verdict

    def _input(
        self, facts: StatementFacts, protocol: str, index: int, count: int, params: list[str | None]
    ) -> dict[str, Any]:
        ctx = self.ctx
        return assemble_input(
            self._principal_input,
            self._target_input,
            SessionInfo(
                ctx.session_id,
                ctx.client_addr,
                ctx.application_name,
                ctx.startup_user,
                self.in_transaction,
            ),
            facts.to_input(protocol=protocol, index=index, count=count, params=params),
        )

    async def _decide_all(
        self,
        facts: tuple[StatementFacts, ...],
        protocol: str,
        params: list[str | None],
        estimates: Sequence[dict[str, Any] | None] = (),
    ) -> list[Decision]:
        not_after = self.ctx.principal.expires_at
        count = len(facts)
        inputs = [self._input(f, protocol, i, count, params) for i, f in enumerate(facts)]
        for one, estimate in zip(inputs, estimates, strict=False):
            if estimate is not None:
                one["statement"]["estimate"] = estimate
        started = time.perf_counter()
        if count == 1:
            decisions = [await self._decider.decide(inputs[0], not_after=not_after)]
        else:
            decisions = list(
                await asyncio.gather(
                    *(self._decider.decide(i, not_after=not_after) for i in inputs)
                )
            )
        self._metrics.decision_seconds.observe(time.perf_counter() - started)
        return decisions

    # -- write-ahead audit -------------------------------------------------------------

    async def _record(
        self,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        protocol: str,
        params: tuple[str | None, ...],
        approval_id: str | None = None,
    ) -> list[str | None]:
        records = self._requests(facts, decisions, protocol, params, approval_id)
        # An empty id means the store is down and audit.fail_open let the statement through.
        if len(records) == 1:
            return [await self._audit.request(records[0]) or None]
        ids = await asyncio.gather(*(self._audit.request(r) for r in records))
        return [i or None for i in ids]

    def _requests(
        self,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        protocol: str,
        params: tuple[str | None, ...],
        approval_id: str | None = None,
        template: RequestTemplate | None = None,
    ) -> list[StatementRequest]:
        now = time.time()
        return [
            StatementRequest(
                time=now,
                instance=self.ctx.instance,
                session_id=self.ctx.session_id,
                client_addr=self.ctx.client_addr,
                application_name=self.ctx.application_name,
                principal=self.ctx.principal,
                target=self._audit_target,
                text=f.text,
                fingerprint=f.fingerprint,
                protocol=protocol,
                params=params,
                decision=d,
                approval_id=approval_id,
                masked_columns=tuple(f"{m.schema}.{m.table}.{m.column}" for m in d.masks),
                record_rows=d.record_rows or self.record_rows,
                template=template,
            )
            for f, d in zip(facts, decisions, strict=True)
        ]

    async def _verdict(
        self,
        facts: tuple[StatementFacts, ...],
        protocol: str,
        params: tuple[str | None, ...],
        *,
        record: bool,
        decide_params: bool = True,
        decided: Decision | None = None,
        known: list[Decision] | None = None,
        param_types: tuple[int, ...] | None = None,
    ) -> Verdict:
        if decided is None and self.rules_problem is not None:
            decided = _rules_refusal(self.rules_problem)
        if decided is None and record and self.rate_check is not None:
            limited = await self._rate_limited(facts, protocol, params)
            if limited is not None:
                return limited
        estimates: Sequence[dict[str, Any] | None] = ()
        if decided is not None:  # pgwarden's own refusal: OPA is not asked
            decisions = [decided] * len(facts)
        elif known is not None:  # decided at Parse, under the policy still in force
            decisions = known
        else:
            # Every statement the policy decides has its estimate, whichever way it came.
            if self.explain:
                estimates = await self._estimates_of(facts, param_types)
            decisions = await self._decide_all(
                facts, protocol, list(params) if decide_params else [], estimates
            )
        combined = combine(decisions)
        guard = self.enforced.refusal(facts) if combined.action != "deny" else None
        if guard is not None:
            # The session rule's settings would not hold: denied (with an id, like OPA's
            # denies) where the policy did not deny it already for its own reasons.
            combined = Decision("deny", (guard,), decision_id=str(uuid.uuid4()))
            decisions = [combined] * len(facts)
        allowed = combined.action == "allow"
        ask = None
        if combined.action == "approve" and decided is None and self._approvals is not None:
            if not record:
                # A Parse: nothing runs until Execute, which is held with its parameters.
                return Verdict(True, [], decisions, None, facts)
            ask = await self._ask_first(facts, params)
            allowed = ask.granted
        request_ids: list[str | None] = [None] * len(facts)
        if record or not allowed:
            try:
                request_ids = await self._record(
                    facts, decisions, protocol, params, ask.id if ask is not None else None
                )
            except AuditUnavailable as exc:
                return self._tallied(_audit_refusal(exc, decisions, facts), combined)
        runs = [StatementRun(rid, f) for rid, f in zip(request_ids, facts, strict=True)]
        if ask is not None and not ask.granted:
            try:
                refusal = await self._hold(ask, facts, decisions, protocol, params, request_ids)
            except asyncio.CancelledError:
                # The client went away while held: each statement's record gets its outcome.
                for run in runs:
                    run.sqlstate, run.error_message = "57014", "withdrawn: the client went away"
                    self.outcome(run, forwarded=False)
                raise
            allowed = refusal is None
            for run in runs:
                # The outcome's duration is the statement's own, not its wait for approval.
                run.started = time.perf_counter()
        else:
            refusal = (
                None
                if allowed
                else refusal_error(combined, _id_of(combined, decisions, request_ids))
            )
        if allowed:
            refusal = await self._prepare_masks(runs, decisions)
            allowed = refusal is None
            self._budget(runs, decisions)
        if allowed:
            await self._free_held_databases(facts)
        if not allowed:
            sqlstate, message = REFUSED, "refused by policy"
            if ask is not None and refusal is not None:
                # The hold's end: denied, timed out, withdrawn, or not asked at all.
                ended = ErrorResponse.decode(refusal[5:])
                sqlstate, message = ended.sqlstate or REFUSED, ended.message or message
            for run in runs:
                run.sqlstate = sqlstate
                run.error_message = message
        elif ask is None:
            self._note_justification(facts)
        verdict = Verdict(allowed, runs, decisions, refusal, facts, estimates=estimates)
        # An allowed Parse is counted at its Executes, each of which is recorded.
        return self._tallied(verdict, combined) if record or not allowed else verdict

    # -- approvals ---------------------------------------------------------------------

    async def _ask_first(
        self, facts: tuple[StatementFacts, ...], params: tuple[str | None, ...]
    ) -> _Ask:
        """Before a held message is recorded: a grant it may run under (taken now), else the
        id of the request it will make."""
        assert self._approvals is not None
        ask = _Ask(
            new_request_id(),
            grant_key(tuple(f.text for f in facts), params),
            shape_key(tuple(f.fingerprint for f in facts)),
        )
        try:
            grant = await self._approvals.use_grant(
                self.ctx.principal, self._audit_target, ask.key, ask.shape, self.ctx.session_id
            )
        except Exception as exc:
            # The store is down: no grant can be known, so the statement is held (and its
            # request, made on the same store, fails closed).
            log.warning("approvals: grants cannot be read: %s", exc)
            return ask
        if grant is not None:
            ask.id, ask.granted = grant.request_id, True
            if self.notify is not None:
                await self.notify(grant_notice(grant))
        return ask

    async def _hold(
        self,
        ask: _Ask,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        protocol: str,
        params: tuple[str | None, ...],
        request_ids: list[str | None],
    ) -> bytes | None:
        """Ask for approval and hold the message: None once approved (it runs), else the
        error the client reads in its place. Nothing is sent upstream meanwhile."""
        approvals = self._approvals
        assert approvals is not None
        held = [d for d in decisions if d.action == "approve"]
        combined = held[0]
        now = time.time()
        count = len(facts)
        request = ApprovalRequest(
            id=ask.id,
            created=now,
            status="pending",
            principal=principal_record(self.ctx.principal) or {},
            target=self._audit_target,
            database=self.ctx.target_database,
            session_id=self.ctx.session_id,
            instance=self.ctx.instance,
            text="\n".join(f.text for f in facts),
            protocol=protocol,
            params=params,
            facts=tuple(
                f.to_input(protocol=protocol, index=i, count=count, params=list(params))
                for i, f in enumerate(facts)
            ),
            fingerprint=ask.shape,
            grant_key=ask.key,
            reasons=tuple(dict.fromkeys(r for d in held for r in d.reasons)),
            approvers=combined.approvers,
            approvers_required=max(d.approvers_required for d in held),
            justification=self.justification,
            decision_id=combined.decision_id,
            audit_record=_id_of(combined, decisions, request_ids),
            wait_until=now + approvals.wait_seconds,
        )
        self.held = request.id
        try:
            try:
                await approvals.ask(request, self.ctx.principal)
            except Exception as exc:
                log.warning("approvals: request %s not made: %s", request.id, exc)
                return cannot_ask(str(exc) or type(exc).__name__)
            if self.notify is not None:
                await self.notify(held_notice(request, approvals.wait_seconds))
            try:
                end = await approvals.hold(request, self.ctx.principal)
            except Exception as exc:
                log.warning("approvals: request %s lost: %s", request.id, exc)
                return cannot_ask(str(exc) or type(exc).__name__)
        finally:
            self.held = None
        if end.runs:
            return None
        return hold_refusal(end.request, combined, approvals.wait_seconds)

    def withdraw_held(self) -> bool:
        """A CancelRequest: withdraw the request held now, if any."""
        if self.held is None or self._approvals is None:
            return False
        self._approvals.withdraw(self.held)
        return True

    def _note_justification(self, facts: tuple[StatementFacts, ...]) -> None:
        """`SET pgwarden.reason = '...'` (or the startup option pgwarden.reason) is the
        justification every later approval request of the session carries."""
        for f in facts:
            if f.setting is not None and f.setting[0].lower() == JUSTIFICATION_SETTING:
                self.justification = (f.setting[1] or "").strip()

    async def check_query(self, text: str) -> Verdict:
        """A simple-protocol Query: every statement in it, decided as a whole, recorded first."""
        if self.explain is not None and self._query_plans:
            planned = await self._estimated_query(text)
            if planned is not None:
                return planned
        raw = self.prepared.resolve(self._analyzer.analyze(text))
        if any(sets_search_path(f) for f in raw[:-1]):
            # The statements after it would be resolved under the path before it.
            return await self._verdict(raw, "simple", (), record=True, decided=_PATH_NOT_LAST)
        try:
            facts = await self._resolved(raw)
        except PathUnknown as exc:
            return await self._path_refusal(exc, "simple", ())
        if not facts:
            return Verdict(True, [], [], None, facts)
        return await self._verdict(facts, "simple", (), record=True)

    async def _estimates_of(
        self, facts: tuple[StatementFacts, ...], param_types: tuple[int, ...] | None
    ) -> list[dict[str, Any] | None]:
        """The cost estimate of each explainable statement, from the session's cache or by
        explaining it now; None where it has none (not explainable, or not now: the policy
        must not take that as small)."""
        estimates = [
            await self._estimate(f, param_types, first=i == 0) for i, f in enumerate(facts)
        ]
        # A SQL PREPARE runs nothing: its estimate is made now, while the session is quiet,
        # for its runs by protocol Bind/Execute (inside the client's pipeline, where nothing
        # can be explained), not shown to the policy for the PREPARE itself.
        return [None if "prepare" in f.flags else e for f, e in zip(facts, estimates, strict=True)]

    async def _estimate(
        self, facts: StatementFacts, param_types: tuple[int, ...] | None, *, first: bool
    ) -> dict[str, Any] | None:
        assert self.explain is not None
        if not explainable(facts):
            return None
        text = facts.text
        # A Parse that declares no types shares its text's estimate with a Query of it (a
        # Query's text cannot hold a placeholder).
        key = (text, param_types or None, self.search_path)
        if key in self._estimates:
            return self._estimates[key]
        generic = param_types
        if generic is not None and not parameter_count(text, len(generic)):
            generic = None  # no placeholder: its literals are its plan
        plan = await self.explain(text, generic)
        if plan is NotExplained.FAILED_TRANSACTION:
            return IN_FAILED_TRANSACTION
        if plan is NotExplained.REJECTED and first:
            # Not after other statements of its message: one of them may create what the
            # EXPLAIN missed (PREPARE p ...; EXECUTE p), so the statement would run.
            return UNPLANNABLE
        if isinstance(plan, NotExplained):
            return None  # not now: asked again next time
        estimate = estimate_of(plan, self.estimate_seq_scan_rows, self.estimate_plan_rows)
        if estimate is not None and (generic is not None or sql_prepared(text)):
            estimate["generic"] = True
        if len(self._estimates) >= _ESTIMATES_KEPT:
            del self._estimates[next(iter(self._estimates))]  # the oldest
        self._estimates[key] = estimate
        return estimate

    async def check_parse(self, text: str, param_types: tuple[int, ...] = ()) -> Verdict:
        """A Parse: decided on its text; recorded only when refused (Execute records runs)."""
        try:
            facts = await self._facts(text)
        except PathUnknown as exc:
            return await self._path_refusal(exc, "extended", ())
        if not facts:
            return Verdict(True, [], [], None, facts)
        return await self._verdict(facts, "extended", (), record=False, param_types=param_types)

    async def recheck_text(
        self, text: str, params: tuple[str | None, ...], param_types: tuple[int, ...] = ()
    ) -> Verdict:
        """An Execute of a statement parsed under another search_path than the session's now:
        the server plans it again under the new path, so it is analysed and decided again
        on its text, then recorded with its parameters."""
        try:
            facts = await self._facts(text)
        except PathUnknown as exc:
            return await self._path_refusal(exc, "extended", params)
        return await self._verdict(
            facts, "extended", params, record=True, decide_params=False, param_types=param_types
        )

    async def check_facts(
        self,
        facts: tuple[StatementFacts, ...],
        params: tuple[str | None, ...],
        param_types: tuple[int, ...] | None = None,
    ) -> Verdict:
        """Statements known only by their facts (SQL-prepared, run by protocol Execute).

        The registry keeps what PREPARE's text says, before the catalog: resolved here, as
        a SQL EXECUTE is, or `*` and unqualified tables would match no classified column."""
        try:
            resolved = await self._resolved(facts)
        except PathUnknown as exc:
            return await self._path_refusal(exc, "extended", params)
        return await self._verdict(
            resolved, "extended", params, record=True, param_types=param_types
        )

    async def check_connect(self) -> Verdict:
        """The session's choice of a database other than the target's default, decided (and
        recorded) before pgwarden connects to it, as a statement CONNECT of category
        "session"; `target.database` in every input lets the policy judge each statement too."""
        database = self.ctx.target_database
        quoted = '"' + database.replace('"', '""') + '"'
        facts = StatementFacts(
            text=f"-- startup: connect to database {quoted}",
            fingerprint=f"connect:{database}",
            command="CONNECT",
            category="session",
            flags=("connect",),
        )
        return await self._verdict((facts,), "startup", (), record=True)

    async def check_function_call(self, oid: int, args: tuple[str | None, ...]) -> Verdict:
        """The FunctionCall message: decided as a call of the function its OID names."""
        name = await self._catalog.function_name(oid) if self._catalog is not None else None
        if name is None:
            reason = f"function OID {oid} cannot be resolved"
            return self._tallied(
                Verdict(False, [], [], refusal_for(reason)), Decision.refuse(reason)
            )
        text = f"-- FunctionCall message\nSELECT {name}(...)"
        facts = StatementFacts(
            text=text,
            fingerprint=f"function_call:{name}",
            command="FUNCTION CALL",
            # A function may do anything: the policy treats the call like other code.
            category="utility",
            functions=(name,),
            flags=("function_call",)
            if name.startswith("pg_catalog.")
            and name.removeprefix("pg_catalog.") not in LINEAGE_OPAQUE_BUILTINS
            else ("function_call", "opaque_function"),
        )
        return await self._verdict((facts,), "function_call", args, record=True)

    def still_current(self, decisions: Sequence[Decision]) -> bool:
        """Whether decisions made earlier (at Parse) were made under the policy in force now.

        A decider that cannot say which policy is in force (no `revision`, or None while a
        change loads) makes every earlier decision stale: it is decided again."""
        revisions = self._revisions
        revision = revisions.revision if revisions is not None else None
        if revision is None:
            return False
        if len(decisions) == 1:  # one statement: the planned paths' case
            return decisions[0].bundle_revision == revision
        return all(d.bundle_revision == revision for d in decisions)

    async def recheck_prepared(
        self,
        facts: tuple[StatementFacts, ...],
        params: tuple[str | None, ...],
        param_types: tuple[int, ...] = (),
    ) -> Verdict:
        """An Execute of a statement whose Parse decision predates the policy in force: decided
        again as at Parse (on its text), then recorded with its parameters."""
        return await self._verdict(
            facts, "extended", params, record=True, decide_params=False, param_types=param_types
        )

    async def check_execute(
        self,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        params: tuple[str | None, ...],
    ) -> Verdict:
        """An Execute of a statement allowed at Parse, under the policy still in force
        (still_current): recorded, with its parameters, first. The first Execute after the
        Parse carries the decision made for it; every later one reuses it, and its record
        says so (`cache_hit`, with the revision the decision was made under)."""
        if self.rules_problem is not None:
            return await self._verdict(
                facts, "extended", params, record=True, decided=_rules_refusal(self.rules_problem)
            )
        if self.rate_check is not None:
            limited = await self._rate_limited(facts, "extended", params)
            if limited is not None:
                return limited
        combined = combine(decisions)
        if combined.action == "approve" and self._approvals is not None:
            # Held at each Execute, with its parameters (the Parse was let through).
            return await self._verdict(
                facts, "extended", params, record=True, decided=None, known=decisions
            )
        try:
            request_ids = await self._record(facts, decisions, "extended", params)
        except AuditUnavailable as exc:
            return self._tallied(_audit_refusal(exc, decisions, facts), combined)
        if not all(d.cache_hit for d in decisions):
            # In place: the list is the prepared statement's own, kept for its next Execute.
            decisions[:] = [d if d.cache_hit else replace(d, cache_hit=True) for d in decisions]
        runs = [StatementRun(rid, f) for rid, f in zip(request_ids, facts, strict=True)]
        refusal = await self._prepare_masks(runs, decisions)
        self._budget(runs, decisions)
        if refusal is None:
            await self._free_held_databases(facts)
        return self._tallied(Verdict(refusal is None, runs, decisions, refusal, facts), combined)

    async def _rate_limited(
        self, facts: tuple[StatementFacts, ...], protocol: str, params: tuple[str | None, ...]
    ) -> Verdict | None:
        """Over the statement rate: refused before the policy is asked (the limit spares
        OPA too), recorded like any refusal, with 53400 rather than a policy deny's 42501."""
        assert self.rate_check is not None
        reason = self.rate_check(len(facts))
        if reason is None:
            return None
        decided = Decision("deny", (reason,), decision_id=str(uuid.uuid4()))
        verdict = await self._verdict(facts, protocol, params, record=True, decided=decided)
        if verdict.runs:  # recorded (else the audit refusal stands)
            verdict.refusal = ErrorResponse.build(
                "ERROR",
                TOO_MANY_STATEMENTS,
                f"pgwarden: {reason}",
                detail=f"decision id: {decided.decision_id}",
            ).encode()
            for run in verdict.runs:
                run.sqlstate = TOO_MANY_STATEMENTS
        return verdict

    # -- an Execute whose plan holds: nothing awaited but its catalog check and its record ----

    def plan_fits(
        self,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        kept: KeptMasks | None = None,
        generation: str | None = None,
    ) -> bool:
        """Whether an Execute of a statement allowed at Parse may be relayed from the data
        callback (see check_execute), as long as its decisions are still current (checked
        with still_current() just before it is recorded): the policy did not ask to see
        the parameters, and enforcing them needs nothing awaited but the catalog check
        (catalog_check) and the request record (no masks left to resolve: none, or `kept`
        from an earlier Execute under the catalog `generation` its Parse was decided under;
        no database connection of pgwarden's to free first). The session's guards keep it
        on the task path too: a statement rate to take from, session rules not read (a row
        budget is set here, in executed())."""
        if len(facts) != 1 or self.rules_problem is not None or self.rate_check is not None:
            return False
        decision = decisions[0]
        return (
            decision.action == "allow"
            and (
                not decision.masks
                or (kept is not None and kept.generation == generation and self.masks_hold(kept))
            )
            and not decision.decide_with_params
            and not (self.sticky_masks and _relays_rows(facts[0]))
            and not databases_held_by_statement(facts[0])
        )

    def keep_masks(self, runs: Sequence[StatementRun]) -> KeptMasks | None:
        """What a single Execute's masks resolved to, for its statement's later Executes
        (plan_fits); None where there is nothing to keep or it may not be reused: masks that
        could not be resolved (mask all), no generation to hold them to, rows relayed from
        elsewhere (their masks are the session's, not the statement's)."""
        catalog = self._masks_catalog()
        if len(runs) != 1 or catalog is None:
            return None
        run = runs[0]
        if not run.masked or run.mask_all or _relays_rows(run.facts):
            return None
        generation = run.mask_generation
        if generation is None or generation != catalog.generation:
            return None
        return KeptMasks(
            generation,
            catalog.epoch,
            len(self.sticky_masks),
            tuple(run.masks),
            run.mask_targets,
            run.mask_expressions,
            run.lineage,
            run.mask_relations,
            run.mask_columns,
        )

    def masks_hold(self, kept: KeptMasks) -> bool:
        """Whether kept masks still describe the catalog and the session's sticky masks."""
        catalog = self._masks_catalog()
        return (
            catalog is not None
            and kept.generation == catalog.generation
            and kept.epoch == catalog.epoch
            and kept.sticky == len(self.sticky_masks)
        )

    def catalog_check(self, facts: Sequence[StatementFacts]) -> asyncio.Future[str | None] | None:
        """catalog_moved() without a coroutine: the generation a probe sent now reads (to
        compare with the one the statements were resolved under; None: unconfirmed), or
        None when their meaning does not depend on the catalog."""
        # A probe sent after the statement arrived: only a read the server starts after the
        # client sent its statement sees every DDL committed before it. A NOTIFY from the DDL
        # watch cannot stand in for it: the DDL's client may learn of its commit, and send
        # its next statement here, before the notification reaches the metadata connection.
        # What removes the wait keeps that read on the server, in order with the statement:
        # an assertion on the session's own connection ahead of its Bind/Execute, failing
        # the implicit transaction when the generation moved (then decided afresh, replayed).
        catalog = self._masks_catalog()
        if catalog is None:
            return None
        if len(facts) == 1:  # one statement: the planned paths' case
            if not consults_catalog(facts[0]):
                return None
        elif not any(consults_catalog(f) for f in facts):
            return None
        return catalog.refresh_soon()

    def in_band_check(
        self, facts: Sequence[StatementFacts], generation: str | None
    ) -> tuple[str, str] | None:
        """The catalog check of a statement on a plan resolved under `generation`, to send
        in band (the session's own connection, ahead of the statement in its implicit
        transaction; Catalog.check_sql), where the catalog is steady (a check rarely fails:
        a failed one costs the statement a second round trip) and still reads `generation`.
        None: no check is needed (not consults_catalog), or it goes as a probe
        (catalog_check), which the caller tells apart with catalog_check itself."""
        catalog = self._masks_catalog()
        if (
            catalog is None
            or not catalog.steady
            or generation is None
            or catalog.generation != generation
            or not any(consults_catalog(f) for f in facts)
        ):
            return None
        return catalog.check_sql()

    @staticmethod
    def may_budget(decisions: Sequence[Decision]) -> bool:
        """Whether executing on these decisions may set a row, byte or time budget (their
        `limits`; see _budget): a budgeted write is held until it ends (the session's
        _hold_behind_budget), so its catalog check cannot go in band ahead of it."""
        return any(isinstance(d.extra.get("limits"), StatementLimits) for d in decisions)

    def record_during_catalog_check(self) -> bool:
        """Whether an Execute's request record may be written while its catalog check is
        in flight (the two waits overlap, not add up): where the check rarely finds the
        plan stale (the record is then closed as not sent, see superseded(), and the
        statement recorded afresh). So with the DDL watch (only DDL moves the generation),
        and with the snapshot while it is steady: no write has committed for many probes
        (a read-mostly database). A snapshot that moves (writes) puts the check first
        again, so that a statement keeps one request record when most checks would fail."""
        catalog = self._masks_catalog()
        return catalog is not None and catalog.steady

    def request_planned(
        self,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        protocol: str,
        params: tuple[str | None, ...],
    ) -> asyncio.Future[str]:
        """The request record of a message whose plan holds (an Execute, a Query), queued
        now: its id once durable (the statement waits for nothing else), or
        AuditUnavailable."""
        (fact,), (decision,) = facts, decisions
        # Everything in the record but its time, text and parameters is fixed by the session,
        # the plan's decision (immutable: kept by identity, and held so its id stays its
        # own), the statement's fingerprint and the protocol: encoded once per plan.
        key = (id(decision), fact.fingerprint, protocol, self.record_rows)
        templates = self._record_templates
        kept = templates.get(key) if templates is not None else None
        template = kept[1] if kept is not None and kept[0] is decision else None
        (record,) = self._requests(facts, decisions, protocol, params, template=template)
        if template is None:
            if templates is None:
                templates = self._record_templates = {}
            elif len(templates) >= _RECORD_TEMPLATES_KEPT:
                del templates[next(iter(templates))]
            templates[key] = (decision, RequestTemplate(record))
        return self._audit.request_soon(record)

    # -- simple-protocol plans, shared by statement shape ----------------------------------

    def keep_query_plan(self, text: str, verdict: Verdict) -> None:
        """Keep the plan of a Query allowed on the task path for the texts of its shape,
        where none of them can be decided otherwise: one statement, of a shape whose facts
        no literal's value changes (the analyzer's rule: a query or DML statement whose
        facts read no literal, so not set_config('role', ...), not SET, no literal naming
        an object), allowed and relayable on a plan (plan_fits: no parameters asked for,
        masks resolved), under a policy that reads neither the text nor parameters. Where
        the session's inputs carry a cost estimate (per text: the literals move it), the
        plan is kept under the estimate it was decided with, and serves only texts whose
        own estimate is exactly that (_estimated_query)."""
        if verdict.from_plan or not verdict.allowed:
            return
        if len(verdict.facts) != 1 or len(verdict.runs) != 1:
            return
        facts, decisions = verdict.facts, verdict.decisions
        if not self._shareable(decisions):
            return
        if self.explain is not None and len(verdict.estimates) != 1:
            return  # decided without the estimate its texts are decided with
        estimate = estimate_key(verdict.estimates[0]) if self.explain is not None else b""
        shaped = self._analyzer.shape_of(text)
        if shaped is None:
            return
        shape, _ = shaped
        span = self._analyzer.shared_span(shape)
        if span is None:
            return
        masks = self.keep_masks(verdict.runs) if decisions[0].masks else None
        if not self.plan_fits(facts, decisions, masks, self.catalog_generation):
            return
        plan = QueryPlan(
            span,
            facts[0],
            [decisions[0] if decisions[0].cache_hit else replace(decisions[0], cache_hit=True)],
            self.search_path,
            self.catalog_generation,
            self.in_transaction,
            masks,
        )
        variants = self._query_plans.get(shape)
        if variants is None or any(not _same_conditions(plan, v) for v in variants.values()):
            # One set of conditions per shape: every plan of it has the same facts, so the
            # facts any one of them holds are the text's (_estimated_query explains with them).
            variants = self._query_plans[shape] = {}
        variants.pop(estimate, None)
        variants[estimate] = plan
        if len(variants) > _ESTIMATES_PER_SHAPE:
            del variants[next(iter(variants))]
        self._query_plans.move_to_end(shape)
        if len(self._query_plans) > _QUERY_PLANS_KEPT:
            self._query_plans.popitem(last=False)

    def _shareable(self, decisions: Sequence[Decision]) -> bool:
        """Whether decisions may serve every text of their shape: the policy that made them
        is in force and reads nothing literals change."""
        literal_reads = self._literal_reads
        if literal_reads is None or not self.still_current(decisions):
            return False
        return not any(
            d.bundle_revision is None or literal_reads.reads_literals(d.bundle_revision)
            for d in decisions
        )

    def _shaped_plans(
        self, text: str, shape: str, spans: Spans
    ) -> tuple[dict[bytes, QueryPlan], tuple[StatementFacts, ...]] | None:
        """The plans kept for this text's shape, with the text's facts as they say (the
        plans', quoting this text), while the conditions they share hold now (search_path,
        transaction state); None: none serve it."""
        variants = self._query_plans.get(shape)
        if not variants:
            return None
        some = next(iter(variants.values()))
        if some.search_path != self.search_path or some.in_transaction != self.in_transaction:
            return None
        start, end = spans[some.span]
        return variants, (some.facts.with_text(text[start:end]),)

    def _serves(self, plan: QueryPlan, facts: tuple[StatementFacts, ...]) -> bool:
        """The checks of one plan of the shape now: the policy that decided it in force (and
        reading no literal), the session's guards, its masks."""
        return (
            self._shareable(plan.decisions)
            and self.plan_fits(facts, plan.decisions, plan.masks, plan.catalog_generation)
            and not self.enforced.refusal(facts)
        )

    def planned_query(self, text: str) -> tuple[QueryPlan, tuple[StatementFacts, ...]] | None:
        """The kept plan that serves this Query's text now, with the text's facts; None: the
        task path decides it (no plan for its shape, or a condition moved: policy revision,
        search_path, transaction state, the session's guards, masks; the catalog generation
        and the token are checked by the caller). Not where inputs carry a cost estimate:
        the text's own is asked first, on the task path (_estimated_query)."""
        if not self._query_plans or self.explain is not None:
            return None
        shaped = self._analyzer.shape_of(text)
        if shaped is None:
            return None
        shape, spans = shaped
        found = self._shaped_plans(text, shape, spans)
        if found is None:
            return None
        variants, facts = found
        plan = variants.get(b"")
        if plan is None or not self._serves(plan, facts):
            return None
        self._query_plans.move_to_end(shape)
        return plan, facts

    async def _estimated_query(self, text: str) -> Verdict | None:
        """A Query of a shape with kept plans, in a session whose policy inputs carry a cost
        estimate: the text's own estimate (explained now, or the session's known one), and
        the plan its shape was decided with under exactly that estimate. Everything else in
        the input is the plan's (the facts of the shape; the policy reads neither text nor
        parameters; session and principal as then), so the decision is the one the policy
        would make. Like an Execute on its plan it then waits for the catalog check and its
        own request record, which carries its text. None: the full path decides it (no
        plan for that estimate, or a condition moved)."""
        shaped = self._analyzer.shape_of(text)
        if shaped is None or shaped[0] not in self._query_plans:
            return None
        shape, spans = shaped
        if self.settle_search_path is not None and await self.settle_search_path() is not None:
            return None  # the full path says why
        found = self._shaped_plans(text, shape, spans)
        if found is None:
            return None
        (estimate,) = await self._estimates_of(found[1], None)
        # Everything is looked up again after each wait: plans, path or policy may have moved.
        found = self._shaped_plans(text, shape, spans)
        if found is None:
            return None
        variants, facts = found
        plan = variants.get(estimate_key(estimate))
        if plan is None or await self.catalog_moved(plan.catalog_generation, facts):
            return None
        if not self._serves(plan, facts):
            return None
        self._query_plans.move_to_end(shape)
        recorded = self.request_planned(facts, plan.decisions, "simple", ())
        # Not cancelled with this task: a record being written is written all the same.
        await asyncio.wait((recorded,))
        written = not recorded.cancelled() and recorded.exception() is None
        if written and not self._serves(plan, facts):
            # The masks or the policy moved while it was written: closed as not sent under
            # this plan, the statement decided and recorded afresh.
            self.superseded(facts, recorded)
            return None
        return self.executed(facts, plan.decisions, recorded, plan.masks, protocol="simple")

    def executed(
        self,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        recorded: asyncio.Future[str],
        kept: KeptMasks | None = None,
        *,
        protocol: str = "extended",
    ) -> Verdict:
        """check_execute()'s verdict for an Execute whose plan holds, once request_execute()
        is done: allowed, or refused when its record could not be written (fail closed).
        Its masks are `kept` (plan_fits; the caller saw masks_hold() just now)."""
        combined = combine(decisions)
        if recorded.cancelled():
            problem = AuditUnavailable("the request record was not written")
            return self._tallied(_audit_refusal(problem, decisions, facts), combined)
        exc = recorded.exception()
        if isinstance(exc, AuditUnavailable):
            return self._tallied(_audit_refusal(exc, decisions, facts), combined)
        if exc is not None:
            raise exc
        if not decisions[0].cache_hit:
            decisions[0] = replace(decisions[0], cache_hit=True)
        run = StatementRun(recorded.result() or None, facts[0])
        if self._needs_masks(run, decisions[0]):
            if kept is None or not self.masks_hold(kept):
                raise RuntimeError("a masked Execute on the planned path without its masks")
            run.masked = True
            run.masks = kept.masks
            run.mask_generation = kept.generation
            run.mask_targets = kept.targets
            run.mask_expressions = kept.expressions
            run.lineage = kept.lineage
            run.mask_relations = kept.relations
            run.mask_columns = kept.columns
            run.kept_masks = kept
        self._budget([run], decisions)
        if protocol == "simple":
            self._metrics.query_planned(self.ctx.target_name)
        else:
            self._metrics.execute_planned(self.ctx.target_name)
        return self._tallied(Verdict(True, [run], decisions, None, facts, from_plan=True), combined)

    def superseded(self, facts: tuple[StatementFacts, ...], recorded: asyncio.Future[str]) -> None:
        """A request_execute() record whose plan the catalog check then found stale: its
        outcome says the statement was not sent under it (it is decided and recorded
        afresh), so the trail never shows a statement run on a decision it was not."""
        if recorded.cancelled() or recorded.exception() is not None:
            return  # not written: nothing to close
        run = StatementRun(recorded.result() or None, facts[0])
        run.error_message = (
            "not sent: its plan was stale (the catalog or the policy changed since it was"
            " prepared); decided again"
        )
        self.outcome(run, forwarded=False)

    def _tallied(self, verdict: Verdict, combined: Decision) -> Verdict:
        """Count the verdict's statements by what became of them, and log a refusal (with
        the decision id, never the statement's text or parameters: literals and parameters
        may be secrets; the audit trail has them)."""
        count = len(verdict.facts) or 1
        if verdict.allowed:
            action = "allow"
        elif combined.refused or combined.action == "allow":
            # pgwarden could not decide or could not enforce (OPA or the audit store down,
            # masks that cannot apply): not the policy's answer.
            action = "error"
        else:
            action = combined.action
        masked = verdict.allowed and any(r.masked for r in verdict.runs)
        self._metrics.statements_decided(self.ctx.target_name, action, count, masked=masked)
        if not verdict.allowed:
            reason = ""
            if verdict.refusal is not None:
                reason = ErrorResponse.decode(verdict.refusal[5:]).message or ""
            log.info(
                "statement refused: %s",
                reason,
                extra={
                    "event": "statement_refused",
                    "session_id": self.ctx.session_id,
                    "subject": self.ctx.principal.subject,
                    "target": self._audit_target,
                    "action": action,
                    "decision_id": combined.decision_id,
                    "reasons": list(combined.reasons),
                    "commands": [f.command for f in verdict.facts],
                    "fingerprints": [f.fingerprint for f in verdict.facts],
                },
            )
        return verdict

    async def _free_held_databases(self, facts: Sequence[StatementFacts]) -> None:
        """Before an allowed DROP DATABASE (rename, CREATE DATABASE ... TEMPLATE) is
        forwarded: pgwarden's own catalog connection to that database would make it wait 5 s
        and fail with 55006 where a direct client succeeds."""
        if self._free_databases is None:
            return
        held = [name for f in facts for name in databases_held_by_statement(f)]
        if held:
            await self._free_databases(held)

    # -- budgets -------------------------------------------------------------------------

    def _budget(self, runs: list[StatementRun], decisions: list[Decision]) -> None:
        """Each run's budget from its decision's `limits`; the session's rows so far count
        against `max_rows_total`."""
        for run, decision in zip(runs, decisions, strict=True):
            limits = decision.extra.get("limits")
            if not isinstance(limits, StatementLimits):
                continue
            max_rows = limits.max_rows
            if limits.max_rows_total is not None:
                left = max(0, limits.max_rows_total - self.rows_relayed)
                max_rows = left if max_rows is None else min(max_rows, left)
            if max_rows is None and limits.max_bytes is None and not limits.statement_timeout_ms:
                continue
            run.budget = RowBudget(
                max_rows=max_rows, max_bytes=limits.max_bytes, decision_id=decision.decision_id
            )
            run.timeout_ms = limits.statement_timeout_ms
            self.budgeted = True

    # -- masks ---------------------------------------------------------------------------

    async def _prepare_masks(
        self, runs: list[StatementRun], decisions: list[Decision]
    ) -> bytes | None:
        """Resolve each run's masks to (table oid, attnum) before it is forwarded.

        Masks are sticky for the session: rows that reach the client by another statement
        (FETCH from a cursor, EXECUTE of a prepared statement) are masked all the same.
        """
        for run, decision in zip(runs, decisions, strict=True):
            if not self._needs_masks(run, decision):
                continue
            if not decision.masks:
                assert run.facts is not None
                # Rows from a cursor or a prepared statement: where the cursor's lineage is
                # not known, every expression column is masked.
                run.mask_expressions = True
                if run.facts.command == "FETCH" and run.facts.portal is not None:
                    run.lineage = self.cursors.get(run.facts.portal)
            else:
                if run.facts is not None and run.facts.command == "COPY":
                    return refusal_for(
                        "COPY of masked columns is not allowed (masks apply to rows)"
                    )
                run.mask_expressions = _involves_masked(run.facts, decision.masks)
                run.lineage = _output_masks(run.facts, decision.masks)
                self.sticky_masks.update(
                    {(m.schema, m.table, m.column, m.method): m for m in decision.masks}
                )
            run.masked = True
            # Earlier masks too: what this statement relays may come from an earlier one.
            run.masks = tuple(self.sticky_masks.values())
            await self._resolve_masks(run)
        return None

    def _needs_masks(self, run: StatementRun, decision: Decision) -> bool:
        """Note the run's session recording and cursors; whether masks apply to its rows
        (its own, or the session's sticky ones for rows relayed from elsewhere)."""
        # Session recording: asked by the decision (`"record_rows": true`) or the target
        # (label pgwarden.record=rows).
        run.record_rows = decision.record_rows or self.record_rows
        self._track_cursors(run, decision)
        if decision.masks:
            return True
        return bool(self.sticky_masks) and _relays_rows(run.facts)

    def _track_cursors(self, run: StatementRun, decision: Decision) -> None:
        """Keep each cursor's lineage from its DECLARE (stored once the server confirms it,
        see cursor_declared); forget it whenever its name may hold other rows."""
        facts = run.facts
        if facts is None:
            return
        if facts.command == "DECLARE" and facts.portal is not None:
            self.cursors.pop(facts.portal, None)
            run.declares = (facts.portal, _output_masks(facts, decision.masks))
        elif facts.command == "CLOSE" and facts.portal is not None:
            self.cursors.pop(facts.portal, None)
        elif facts.command in _FORGETS_CURSORS or _OPENS_CURSORS.intersection(facts.flags):
            # CLOSE ALL, DISCARD ALL; code that may open cursors of any name (a PL/pgSQL
            # OPEN): every name's lineage is unknown from now on.
            self.cursors.clear()

    def cursor_declared(self, run: StatementRun) -> None:
        """The server ran a DECLARE: FETCH from that cursor follows its lineage."""
        if run.declares is not None:
            name, lineage = run.declares
            self.cursors[name] = lineage

    def portal_bound(self, name: str) -> None:
        """A protocol Bind named a portal: FETCH by that name reads its rows now."""
        self.cursors.pop(name, None)

    async def _resolve_masks(self, run: StatementRun) -> None:
        """The run's masks as (table OID, attnum) under the catalog's generation now; all
        columns masked when the catalog cannot say."""
        catalog = self._masks_catalog()
        if catalog is None:
            run.mask_all = True
            return
        # Read before the targets: a generation that moves meanwhile leaves them stale.
        run.mask_generation = catalog.generation
        targets = await catalog.mask_targets(run.masks)
        if targets is None or run.mask_generation is None:
            run.mask_all = True
            return
        run.mask_targets = targets
        # A FETCH names no relation: its rows come from the cursor's.
        named = catalog.relation_oids(run.facts) if run.facts is not None else None
        run.mask_relations = named or None
        if run.mask_relations is not None and run.mask_columns is None:
            # What the decision was made on (kept when the masks are resolved again).
            run.mask_columns = catalog.columns_of(run.mask_relations)

    def masks_current(self, run: StatementRun, fields: Sequence[FieldDescription]) -> bool:
        """Whether a masked run's targets can plan the result `fields` describe: resolved
        under the catalog's generation now, and every column the server reports is one the
        catalog has seen in it. Otherwise the server ran the statement against a catalog
        newer than the one it was decided with (DDL meanwhile): refresh_masks() first."""
        catalog = self._masks_catalog()
        if run.mask_all or catalog is None:
            return True
        if run.mask_generation is None or run.mask_generation != catalog.generation:
            return False
        targets = run.mask_targets
        knows = catalog.knows
        named = run.mask_relations
        return all(
            (f.table_oid, f.column_attnum) in targets
            or (knows(f.table_oid, f.column_attnum) and (named is None or f.table_oid in named))
            for f in fields
            if f.table_oid and f.column_attnum
        )

    async def refresh_masks(self, run: StatementRun, fields: Sequence[FieldDescription]) -> None:
        """Resolve the run's masks again against the server's catalog now, before any row of
        the result `fields` describe is relayed. Masked whole: a column of a relation
        that no longer exists (dropped since the server ran it), or that the statement
        does not name (a description kept from before the DDL: a table swapped away under
        a prepared statement whose driver does not describe it again), or that the
        decision did not see (added while the statement waited: `*` may now include a
        classified column the policy was never asked about)."""
        catalog = self._masks_catalog()
        if catalog is None:
            run.mask_all = True
            return
        if await catalog.refresh() is None:
            run.mask_all = True
            return
        facts = run.facts
        if facts is not None and consults_catalog(facts) and catalog.relation_oids(facts) is None:
            # Dropped with the cache: the statement's names resolved again, for their OIDs.
            await self._catalog_resolve(facts)
        named_before = run.mask_relations
        await self._resolve_masks(run)
        if run.mask_all:
            return
        if run.mask_relations is None:
            run.mask_relations = named_before
        targets = run.mask_targets
        columns = [
            (f.table_oid, f.column_attnum) for f in fields if f.table_oid and f.column_attnum
        ]
        unseen = [c for c in columns if c not in targets and not catalog.knows(*c)]
        if unseen and not await catalog.learn(oid for oid, _ in unseen):
            run.mask_all = True
            return
        named, decided_on = run.mask_relations, run.mask_columns
        for column in columns:
            if column in targets:
                continue
            if (
                not catalog.knows(*column)
                or (named is not None and column[0] not in named)
                or (decided_on is not None and column not in decided_on)
            ):
                targets[column] = "redact"

    # -- outcomes ------------------------------------------------------------------------

    def outcome(self, run: StatementRun, *, forwarded: bool = True) -> None:
        """Write the outcome record of one run, without holding up the relay."""
        if run.request_id is None:
            return
        self.statements_recorded += 1
        if forwarded:
            self.rows_relayed += run.rows
        record = StatementOutcome(
            request_id=run.request_id,
            time=time.time(),
            command_tag=run.command_tag,
            rows=run.rows if run.command_tag is not None else None,
            sqlstate=run.sqlstate,
            error_message=run.error_message,
            duration_ms=(time.perf_counter() - run.started) * 1000.0,
            bytes_out=run.bytes_out,
            recorded_rows=tuple(run.recorded),
            recorded_columns=run.recorded_columns,
            forwarded=forwarded,
            rows_withheld=run.budget.withheld if run.budget is not None else 0,
        )
        self._audit.outcome_nowait(record)
