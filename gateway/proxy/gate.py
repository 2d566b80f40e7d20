"""The one place every statement passes through: analysis, policy decision and the
write-ahead audit record, producing a verdict the session enforces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gateway.audit.events import StatementOutcome, StatementRequest
from gateway.identity.principal import Principal
from gateway.policy.decision import Decision, Mask
from gateway.protocol import ErrorResponse
from gateway.proxy.ports import AuditSink, AuditUnavailable, Decider
from gateway.proxy.search_path import sets_search_path
from gateway.proxy.tracker import StatementRun
from gateway.sql.catalog import DEFAULT_SEARCH_PATH
from gateway.sql.facts import StatementFacts

# The SQLSTATE of every refusal pgwarden makes (insufficient_privilege).
REFUSED = "42501"
# Statements that return rows decided elsewhere (cursor, prepared statement): they take
# the session's sticky masks.
_ROW_RELAYS = frozenset({"FETCH", "EXECUTE"})


def _involves_masked(facts: StatementFacts | None, masks: Sequence[Mask]) -> bool:
    """Whether an output column PostgreSQL reports no base column for (an expression) may
    carry a masked value: the statement uses a masked column (any usage; `*` was expanded
    by the catalog), an unexpanded `*`, or a function pgwarden cannot see into. `count(*)`
    over a table with masked columns involves none of them."""
    if facts is None or "opaque_function" in facts.flags:
        return True
    keys = {(m.schema, m.table, m.column) for m in masks}
    if any((c.schema, c.table, c.column) in keys or c.column == "*" for c in facts.columns):
        return True
    return any(not f.startswith("pg_catalog.") for f in facts.functions)


class PathUnknown(Exception):
    """The session's search_path cannot be known now: the statements are refused."""

    def __init__(self, reason: str, facts: tuple[StatementFacts, ...]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.facts = facts


_PATH_NOT_LAST = Decision.refuse(
    "a statement that changes search_path must be the last of its Query message"
    " (send the statements after it separately)"
)


class Analyzer(Protocol):
    def analyze(self, text: str) -> tuple[StatementFacts, ...]: ...


class PreparedRegistry(Protocol):
    def resolve(self, facts: tuple[StatementFacts, ...]) -> tuple[StatementFacts, ...]: ...

    def register(self, name: str, facts: StatementFacts) -> None: ...

    def lookup(self, name: str) -> StatementFacts | None: ...

    def closed(self, name: str) -> None: ...

    def completed(self, facts: StatementFacts) -> None: ...


class MaskResolver(Protocol):
    async def mask_targets(self, masks: Sequence[Mask]) -> dict[tuple[int, int], str] | None: ...


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
    target_database: str
    target_labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Verdict:
    """What to do with one client message that carries statements."""

    allowed: bool
    runs: list[StatementRun]
    decisions: list[Decision]
    # The ErrorResponse the client sees in place of the statement when refused.
    refusal: bytes | None = None
    facts: tuple[StatementFacts, ...] = ()


def combine(decisions: Sequence[Decision]) -> Decision:
    """A message is decided as a whole: any deny denies it; else any approval holds it."""
    for wanted in ("deny", "approve"):
        for d in decisions:
            if d.action == wanted:
                return d
    return decisions[0] if decisions else Decision.refuse("empty statement list")


def refusal_error(decision: Decision) -> bytes:
    reason = "; ".join(decision.reasons) or "no reason given"
    if decision.action == "approve":
        message = f"pgwarden: approval required: {reason}"
    else:
        message = f"pgwarden: statement denied: {reason}"
    detail = f"decision id: {decision.decision_id}" if decision.decision_id else None
    return ErrorResponse.build("ERROR", REFUSED, message, detail=detail).encode()


def _audit_refusal(
    exc: AuditUnavailable, decisions: list[Decision], facts: tuple[StatementFacts, ...]
) -> Verdict:
    # Fail closed. (audit.fail_open is the sink's to apply: it then returns no record id.)
    message = f"audit store unavailable, statement not run ({exc})"
    return Verdict(False, [], decisions, refusal_for(message, "58000"), facts)


def refusal_for(message: str, sqlstate: str = REFUSED) -> bytes:
    return ErrorResponse.build("ERROR", sqlstate, f"pgwarden: {message}").encode()


class StatementGate:
    """Per-session: turns statement text into a verdict, recording each statement first."""

    def __init__(
        self,
        ctx: SessionContext,
        *,
        analyzer: Analyzer,
        prepared: PreparedRegistry,
        catalog: Catalog | None,
        decider: Decider,
        audit: AuditSink,
    ) -> None:
        self.ctx = ctx
        self._analyzer = analyzer
        self.prepared = prepared
        self._catalog = catalog
        self._decider = decider
        self._audit = audit
        # The writer's task-free outcome path when it has one (the port needs only outcome()).
        self._outcome_nowait: Callable[[StatementOutcome], None] | None = getattr(
            audit, "outcome_nowait", None
        )
        self.in_transaction = False
        # The session's search_path as the server will apply it to unqualified names.
        self.search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH
        self.upstream_user: str | None = None
        # Set by the session: waits until search_path is known; a reason when it cannot be.
        self.settle_search_path: Callable[[], Awaitable[str | None]] | None = None
        self._principal_input = ctx.principal.to_input()
        self.record_rows = ctx.target_labels.get("pgwarden.record") == "rows"
        self.sticky_masks: dict[tuple[int, int], str] = {}
        self.sticky_mask_all = False
        self._target_input = {
            "name": ctx.target_name,
            "database": ctx.target_database,
            "labels": dict(ctx.target_labels),
        }

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
            path, user = self.search_path, self.upstream_user
            facts = tuple([await catalog.resolve(f, path, user) for f in facts])
        return facts

    async def _path_refusal(
        self, exc: PathUnknown, protocol: str, params: tuple[str | None, ...]
    ) -> Verdict:
        return await self._verdict(
            exc.facts, protocol, params, record=True, decided=Decision.refuse(exc.reason)
        )

    def _input(
        self, facts: StatementFacts, protocol: str, index: int, count: int, params: list[str | None]
    ) -> dict[str, Any]:
        return {
            "version": 1,
            "principal": self._principal_input,
            "target": self._target_input,
            "session": {
                "id": self.ctx.session_id,
                "client_addr": self.ctx.client_addr,
                "application_name": self.ctx.application_name,
                "user": self.ctx.startup_user,
                "in_transaction": self.in_transaction,
            },
            "statement": facts.to_input(protocol=protocol, index=index, count=count, params=params),
        }

    async def _decide_all(
        self, facts: tuple[StatementFacts, ...], protocol: str, params: list[str | None]
    ) -> list[Decision]:
        not_after = self.ctx.principal.expires_at
        count = len(facts)
        inputs = [self._input(f, protocol, i, count, params) for i, f in enumerate(facts)]
        if count == 1:
            return [await self._decider.decide(inputs[0], not_after=not_after)]
        return list(
            await asyncio.gather(*(self._decider.decide(i, not_after=not_after) for i in inputs))
        )

    # -- write-ahead audit -------------------------------------------------------------

    async def _record(
        self,
        facts: tuple[StatementFacts, ...],
        decisions: list[Decision],
        protocol: str,
        params: tuple[str | None, ...],
    ) -> list[str | None]:
        now = time.time()
        records = [
            StatementRequest(
                time=now,
                instance=self.ctx.instance,
                session_id=self.ctx.session_id,
                client_addr=self.ctx.client_addr,
                application_name=self.ctx.application_name,
                principal=self.ctx.principal,
                target=self.ctx.target_name,
                text=f.text,
                fingerprint=f.fingerprint,
                protocol=protocol,
                params=params,
                decision=d,
                masked_columns=tuple(f"{m.schema}.{m.table}.{m.column}" for m in d.masks),
                record_rows=d.extra.get("record_rows") is True or self.record_rows,
            )
            for f, d in zip(facts, decisions, strict=True)
        ]
        # An empty id means the store is down and audit.fail_open let the statement through.
        if len(records) == 1:
            return [await self._audit.request(records[0]) or None]
        ids = await asyncio.gather(*(self._audit.request(r) for r in records))
        return [i or None for i in ids]

    async def _verdict(
        self,
        facts: tuple[StatementFacts, ...],
        protocol: str,
        params: tuple[str | None, ...],
        *,
        record: bool,
        decide_params: bool = True,
        decided: Decision | None = None,
    ) -> Verdict:
        if decided is not None:  # pgwarden's own refusal: OPA is not asked
            decisions = [decided] * len(facts)
        else:
            decisions = await self._decide_all(
                facts, protocol, list(params) if decide_params else []
            )
        combined = combine(decisions)
        allowed = combined.action == "allow"
        request_ids: list[str | None] = [None] * len(facts)
        if record or not allowed:
            try:
                request_ids = await self._record(facts, decisions, protocol, params)
            except AuditUnavailable as exc:
                return _audit_refusal(exc, decisions, facts)
        runs = [StatementRun(rid, f) for rid, f in zip(request_ids, facts, strict=True)]
        refusal = None if allowed else refusal_error(combined)
        if allowed:
            refusal = await self._prepare_masks(runs, decisions)
            allowed = refusal is None
        if not allowed:
            for run in runs:
                run.sqlstate = REFUSED
                run.error_message = "refused by policy"
        return Verdict(allowed, runs, decisions, refusal, facts)

    async def check_query(self, text: str) -> Verdict:
        """A simple-protocol Query: every statement in it, decided as a whole, recorded first."""
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

    async def check_parse(self, text: str) -> Verdict:
        """A Parse: decided on its text; recorded only when refused (Execute records runs)."""
        try:
            facts = await self._facts(text)
        except PathUnknown as exc:
            return await self._path_refusal(exc, "extended", ())
        if not facts:
            return Verdict(True, [], [], None, facts)
        return await self._verdict(facts, "extended", (), record=False)

    async def recheck_text(self, text: str, params: tuple[str | None, ...]) -> Verdict:
        """An Execute of a statement parsed under another search_path than the session's now:
        the server plans it again under the new path, so it is analysed and decided again
        on its text, then recorded with its parameters."""
        try:
            facts = await self._facts(text)
        except PathUnknown as exc:
            return await self._path_refusal(exc, "extended", params)
        return await self._verdict(facts, "extended", params, record=True, decide_params=False)

    async def check_facts(
        self, facts: tuple[StatementFacts, ...], params: tuple[str | None, ...]
    ) -> Verdict:
        """Statements known only by their facts (SQL-prepared, run by protocol Execute).

        The registry keeps what PREPARE's text says, before the catalog: resolved here, as
        a SQL EXECUTE is, or `*` and unqualified tables would match no classified column."""
        try:
            resolved = await self._resolved(facts)
        except PathUnknown as exc:
            return await self._path_refusal(exc, "extended", params)
        return await self._verdict(resolved, "extended", params, record=True)

    async def check_function_call(self, oid: int, args: tuple[str | None, ...]) -> Verdict:
        """The FunctionCall message: decided as a call of the function its OID names."""
        name = await self._catalog.function_name(oid) if self._catalog is not None else None
        if name is None:
            return Verdict(False, [], [], refusal_for(f"function OID {oid} cannot be resolved"))
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
            else ("function_call", "opaque_function"),
        )
        return await self._verdict((facts,), "function_call", args, record=True)

    def still_current(self, decisions: Sequence[Decision]) -> bool:
        """Whether decisions made earlier (at Parse) were made under the policy in force now.

        A decider that cannot say which policy is in force (no `revision`, or None while a
        change loads) makes every earlier decision stale: it is decided again."""
        revision: str | None = getattr(self._decider, "revision", None)
        return revision is not None and all(d.bundle_revision == revision for d in decisions)

    async def recheck_prepared(
        self, facts: tuple[StatementFacts, ...], params: tuple[str | None, ...]
    ) -> Verdict:
        """An Execute of a statement whose Parse decision predates the policy in force: decided
        again as at Parse (on its text), then recorded with its parameters."""
        return await self._verdict(facts, "extended", params, record=True, decide_params=False)

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
        try:
            request_ids = await self._record(facts, decisions, "extended", params)
        except AuditUnavailable as exc:
            return _audit_refusal(exc, decisions, facts)
        if not all(d.cache_hit for d in decisions):
            # In place: the list is the prepared statement's own, kept for its next Execute.
            decisions[:] = [d if d.cache_hit else replace(d, cache_hit=True) for d in decisions]
        runs = [StatementRun(rid, f) for rid, f in zip(request_ids, facts, strict=True)]
        refusal = await self._prepare_masks(runs, decisions)
        return Verdict(refusal is None, runs, decisions, refusal, facts)

    # -- masks ---------------------------------------------------------------------------

    async def _prepare_masks(
        self, runs: list[StatementRun], decisions: list[Decision]
    ) -> bytes | None:
        """Resolve each run's masks to (table oid, attnum) before it is forwarded.

        Masks are sticky for the session: rows that reach the client by another statement
        (FETCH from a cursor, EXECUTE of a prepared statement) are masked all the same.
        """
        for run, decision in zip(runs, decisions, strict=True):
            # Session recording: asked by the decision (`"record_rows": true`) or the target
            # (label pgwarden.record=rows).
            run.record_rows = decision.extra.get("record_rows") is True or self.record_rows
            if not decision.masks:
                if (self.sticky_masks or self.sticky_mask_all) and run.facts is not None:
                    command = run.facts.command
                    if command in _ROW_RELAYS:
                        run.masked = True
                        run.mask_targets = dict(self.sticky_masks)
                        run.mask_all = self.sticky_mask_all
                        # Rows from a cursor or a prepared statement: lineage unknown here.
                        run.mask_expressions = True
                continue
            if run.facts is not None and run.facts.command == "COPY":
                return refusal_for("COPY of masked columns is not allowed (masks apply to rows)")
            run.masked = True
            run.mask_expressions = _involves_masked(run.facts, decision.masks)
            resolver = self._catalog
            targets = None
            if resolver is not None and hasattr(resolver, "mask_targets"):
                targets = await resolver.mask_targets(decision.masks)
            if targets is None:
                run.mask_all = True
                self.sticky_mask_all = True
            else:
                run.mask_targets = {**self.sticky_masks, **targets}
                self.sticky_masks.update(targets)
        return None

    # -- outcomes ------------------------------------------------------------------------

    def outcome(self, run: StatementRun, *, forwarded: bool = True) -> None:
        """Write the outcome record of one run, without holding up the relay."""
        if run.request_id is None:
            return
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
            forwarded=forwarded,
        )
        nowait = self._outcome_nowait
        if nowait is not None:
            nowait(record)
            return
        task = asyncio.ensure_future(self._audit.outcome(record))
        _PENDING_OUTCOMES.add(task)
        task.add_done_callback(_PENDING_OUTCOMES.discard)


_PENDING_OUTCOMES: set[asyncio.Future[None]] = set()
