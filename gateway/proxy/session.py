"""One client connection: startup, TLS, token login, the upstream login, then the relay in
both directions with every statement passing through the session's StatementGate."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import math
import socket
import struct
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING, Any, cast

from gateway.audit.events import SessionEvent
from gateway.control.store import ControlStoreUnavailable
from gateway.control.targets import DATABASE_SEPARATOR, TargetError, dbname_for, parse_dbname
from gateway.enforce.masking import MaskPlan
from gateway.guards.budgets import RowBudget
from gateway.guards.estimate import (
    CLIENTS_WHILE_EXPLAINING,
    ExplainRead,
    NotExplained,
    estimate_request,
)
from gateway.guards.kill import SessionSummary
from gateway.guards.rates import TOO_MANY_SESSIONS
from gateway.guards.rules import NO_GUARDS, RulesUnavailable, SessionGuards
from gateway.identity.checks import TOKEN_TOO_LARGE
from gateway.identity.principal import Principal, TokenRejected
from gateway.policy.decision import Decision
from gateway.policy.input import TargetInfo, target_input
from gateway.protocol import (
    CANCEL_REQUEST_CODE,
    AuthenticationCleartextPassword,
    AuthenticationOk,
    BackendKeyData,
    Bind,
    CancelRequest,
    Close,
    CommandComplete,
    CopyFail,
    DataRow,
    Describe,
    ErrorResponse,
    Execute,
    FieldDescription,
    FunctionCall,
    GSSENCRequest,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    PasswordMessage,
    ProtocolViolation,
    Query,
    ReadyForQuery,
    RowDescription,
    SSLRequest,
    StartupMessage,
    Sync,
    decode_backend,
    decode_startup,
)
from gateway.protocol.codes import (
    BIND,
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    COMMAND_COMPLETE,
    COPY_BOTH_RESPONSE,
    COPY_DONE,
    COPY_IN_RESPONSE,
    COPY_OUT_RESPONSE,
    DATA_ROW,
    EMPTY_QUERY_RESPONSE,
    ENCRYPTION_ACCEPTED,
    ENCRYPTION_REFUSED,
    ERROR_RESPONSE,
    EXECUTE,
    FUNCTION_CALL,
    FUNCTION_CALL_RESPONSE,
    NO_DATA,
    NOTICE_RESPONSE,
    NOTIFICATION_RESPONSE,
    PARAMETER_DESCRIPTION,
    PARAMETER_STATUS,
    PARSE,
    PARSE_COMPLETE,
    PASSWORD,
    PORTAL_SUSPENDED,
    QUERY,
    READY_FOR_QUERY,
    ROW_DESCRIPTION,
    STATUS_FAILED,
    STATUS_IDLE,
    STATUS_IN_TRANSACTION,
    SYNC,
)
from gateway.protocol.types import (
    BOOL,
    FLOAT4,
    FLOAT8,
    INT2,
    INT4,
    INT8,
    JSON,
    OID,
    TEXT,
    TEXTLIKE,
    UUID,
)
from gateway.proxy.encodings import client_text, for_client, python_codec, server_text
from gateway.proxy.gate import (
    REFUSED,
    KeptMasks,
    SessionContext,
    StatementGate,
    Verdict,
    refusal_for,
)
from gateway.proxy.holds import CANNOT_ASK as CONTROL_UNAVAILABLE
from gateway.proxy.search_path import (
    FLUSH as FLUSH_MESSAGE,
)
from gateway.proxy.search_path import (
    READ_ANSWERS,
    SHOW_SEARCH_PATH,
    PathProblem,
    PathRead,
    SearchPathWatch,
    first_column,
)
from gateway.proxy.tls import TlsLayer
from gateway.proxy.tracker import Expectation, ResponseTracker, StatementRun
from gateway.proxy.upstream import (
    UpstreamConnection,
    UpstreamError,
    connect_upstream,
    forward_cancel,
)
from gateway.session.backend import DROP, NOT_OWN, PASS, REPLACE, STOP, BackendCore
from gateway.session.frontend import (
    ANSWER,
    BIND_NOTED,
    EXPECT,
    GATE,
    GATED,
    IDLE,
    TERMINATE_SENT,
    FrontendCore,
)
from gateway.sql.catalog import CHECK_FAILED, parse_search_path
from gateway.sql.facts import StatementFacts

if TYPE_CHECKING:
    from gateway.control.targets import Target
    from gateway.proxy.listener import GatewayContext

log = logging.getLogger("pgwarden.session")

_LEN = struct.Struct("!I")
_HEADER = struct.Struct("!BI")
_TLS_HANDSHAKE = 0x16
_CANCEL_CODE = _LEN.pack(CANCEL_REQUEST_CODE)

# Startup parameters relayed upstream. Anything else is a setting (PostgreSQL treats unknown
# startup parameters as GUCs, so `role=...` would be SET ROLE) and goes through policy.
_RELAYED_PARAMETERS = frozenset(
    {
        "application_name",
        "client_encoding",
        "DateStyle",
        "TimeZone",
        "extra_float_digits",
        "IntervalStyle",
    }
)
# The client's input pgwarden holds while a message is with the gate (the undecided messages
# behind it, and what passed through to leave with it): beyond this the client is not read,
# so that it feels the server's pace as it would direct (a pipeline stops soon after the
# server's error, a stalled server stalls the client's writes) and a session's memory stays
# bounded. The server's own write buffer is bounded by the upstream transport's high-water
# mark (pause_writing). asyncio's default high-water mark, the same size.
READ_AHEAD = 64 * 1024
# A cancel owed by a statement that was at the gate is sent again this often while that
# statement still runs, up to this many times in all.
_OWED_CANCEL_AGAIN = 0.25
_OWED_CANCEL_TRIES = 3
# In place of a refused statement: text the server rejects before touching any name.
_BOGUS = b"-- pgwarden refused this statement\npgwarden_refused"
# In place of a statement the server rejects itself in an aborted transaction (25P02): text
# that parses, so that the server's own error is the one it gives; fails anywhere else too.
_REJECTED_IF_ABORTED = b"SELECT pg_catalog.pgwarden_refused()"
# The statement name of pgwarden's stand-ins for refused Executes: never stored (the Parse
# fails), so the client's unnamed statement is left as it was.
_STAND_IN = "pgwarden:refused"
# admin_shutdown: what PostgreSQL itself sends the sessions it ends when it shuts down.
SHUTTING_DOWN = "57P01"
QUERY_CANCELED = "57014"
INVALID_STATEMENT_NAME = "26000"
# The in-band catalog check's statement and portal (one statement per way of reading the
# generation: Catalog.check_sql), named so that neither the client's unnamed statement nor
# its unnamed portal is touched; random per gateway process.
_CHECK_NAME = f"pgwarden:check:{uuid.uuid4().hex[:12]}:"
_SYNC_MESSAGE = Sync().encode()
# Answers to the check's Parse, Bind and Execute, and the server messages that may come
# unasked among them (passed to the client as always).
_CHECK_ANSWERS = frozenset({CLOSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, DATA_ROW})
_UNASKED = frozenset({NOTICE_RESPONSE, NOTIFICATION_RESPONSE, PARAMETER_STATUS})

# Why standard_conforming_strings stays on (refused at startup, on SET, and the session ends
# if the server reports it off): pglast reads SQL as PostgreSQL does with it on. With it off,
# 'a\' OR true --' is a different statement to the server than to the analysis, so the
# policy would decide on one statement while another runs.
_CONFORMING_STRINGS = (
    "standard_conforming_strings must stay on: pgwarden analyses SQL as PostgreSQL reads it"
    " with the setting on; with it off a backslash in a string literal escapes the quote,"
    " and the server would run other statements than the policy decided on"
)


# DataRow plans kept per prepared statement's masks (one per result description and
# formats a client binds it with: a handful).
_ROW_PLANS_KEPT = 8


@dataclass(slots=True)
class _Planned:
    """A message relayed on its plan from callbacks (an Execute on its Parse's, a Query on
    its shape's): what its checks, its record and its enforcement need."""

    code: int  # EXECUTE or QUERY
    message: bytes
    facts: tuple[StatementFacts, ...]
    decisions: list[Decision]
    masks: KeptMasks | None
    # The catalog generation the plan was resolved under.
    generation: str | None
    params: tuple[str | None, ...] = ()
    portal: Portal | None = None
    # The catalog check goes in band ahead of it: (way, SQL) of Catalog.check_sql.
    in_band: tuple[str, str] | None = None

    @property
    def protocol(self) -> str:
        return "extended" if self.code == EXECUTE else "simple"


@dataclass(slots=True)
class _InBandCheck:
    """The catalog check sent in band ahead of a planned Execute (ClientSession._send_check):
    what its answers are awaited for, and what to send again if it fails."""

    planned: _Planned
    recorded: asyncio.Future[str]
    # The client's messages it went ahead of, as the client sent them (its Bind, a
    # Describe, the Execute, the Sync): sent again, decided afresh, if the check fails.
    unit: bytes
    # The way the generation is read (Catalog.check_sql: its statement's name).
    way: str
    # The check failed: the server skips to the client's Sync, whose ReadyForQuery ends it.
    failed: bool = False


class Phase(Enum):
    STARTUP = auto()
    PASSWORD = auto()
    CONNECTING = auto()
    RELAY = auto()
    CLOSED = auto()


@dataclass(slots=True)
class PreparedStatement:
    facts: tuple[StatementFacts, ...]
    decisions: list[Decision]
    # Parameter type OIDs the client gave at Parse (0: the server infers it), replaced by the
    # server's own once a Describe of the statement has read them back.
    param_types: tuple[int, ...] = ()
    # The search_path its names were resolved under (the server re-plans it under another).
    search_path: tuple[str, ...] = ()
    # Its RowDescription from a Describe of this very statement (not of another of its name).
    row_description: bytes | None = None
    # The catalog generation its names were resolved under (DDL since: decided again).
    catalog_generation: str | None = None
    # Its masks as an Execute of it resolved them, for the next ones (gate.plan_fits).
    masks: KeptMasks | None = None
    # The types as the Parse gave them, never replaced: an Execute decided again (DDL or a
    # policy change since the Parse) finds the estimate made at the Parse under these. Under
    # the server's inferred types it would miss it, and nothing can be explained inside the
    # client's Bind/Execute pipeline: an agent's read would be taken as not estimated.
    declared_types: tuple[int, ...] = ()


@dataclass(slots=True)
class Portal:
    """A Bind: the server planned it then, so it runs what its statement was at the Bind,
    whatever that name holds by the Execute."""

    statement: str
    params: tuple[str | None, ...]
    result_formats: tuple[int, ...] = ()
    # The protocol-prepared statement it was bound from, or what a SQL PREPARE of the name
    # was known to run at the Bind.
    prepared: PreparedStatement | None = None
    known: StatementFacts | None = None
    # SearchPathWatch.epoch at the Bind, and the path then when it was certain: the path the
    # server planned it under.
    path_epoch: int = 0
    row_description: bytes | None = None
    search_path: tuple[str, ...] | None = None
    # A value bound in binary whose type nobody declared: its text is only its bytes.
    undeclared_binary: bool = False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "")


# Binary parameter formats of common types, so policy and audit see `13`, not `\x000d`.
_BINARY_INTS = {INT2: 2, INT4: 4, INT8: 8, OID: 4}  # byte length
_BINARY_FLOATS = {FLOAT4: "!f", FLOAT8: "!d"}
_TEXT_TYPES = TEXTLIKE | {JSON}


# Refused where the policy decides on parameter values and one of them cannot be read.
_UNDECLARED_BINARY = (
    "a binary parameter of a type neither the Parse declared nor a Describe read back "
    "cannot be decided by its value; declare its type or send it as text"
)


def _format_of(formats: tuple[int, ...], i: int) -> int:
    """Bind's format codes: none means text for all, one applies to all, else one each."""
    return formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0


def _undeclared_binary(
    values: tuple[bytes | None, ...], formats: tuple[int, ...], types: tuple[int, ...]
) -> bool:
    """Whether a value is bound in binary with no type to read it as (not at Parse, not
    from the server's description): what policy and audit see of it is its bytes."""
    if 1 not in formats:
        return False  # all text (no codes, or only 0): the common Bind
    return any(
        value is not None
        and _format_of(formats, i) == 1
        and (types[i] if i < len(types) else 0) == 0
        for i, value in enumerate(values)
    )


def _param_text(value: bytes | None, fmt: int, type_oid: int, encoding: str) -> str | None:
    if value is None:
        return None
    if fmt == 0 or type_oid in _TEXT_TYPES:
        return client_text(value, encoding)
    size = _BINARY_INTS.get(type_oid)
    if size is not None and len(value) == size:
        return str(int.from_bytes(value, "big", signed=type_oid != OID))
    if type_oid in _BINARY_FLOATS and len(value) == struct.calcsize(_BINARY_FLOATS[type_oid]):
        return repr(struct.unpack(_BINARY_FLOATS[type_oid], value)[0])
    if type_oid == BOOL and len(value) == 1:
        return "true" if value[0] else "false"
    if type_oid == UUID and len(value) == 16:
        return str(uuid.UUID(bytes=value))
    return "\\x" + value.hex()


def _params_text(
    values: tuple[bytes | None, ...],
    formats: tuple[int, ...],
    types: tuple[int, ...],
    encoding: str,
) -> tuple[str | None, ...]:
    """Bind/FunctionCall values as text."""
    out = []
    for i, value in enumerate(values):
        fmt = _format_of(formats, i)
        out.append(_param_text(value, fmt, types[i] if i < len(types) else 0, encoding))
    return tuple(out)


class ClientSession(asyncio.Protocol):
    """State per client; the relay runs on transport callbacks, not streams, for speed."""

    # Slots, not a __dict__: one per open session, idle ones included (issue 9's memory per
    # idle session: a dict of this many keys is larger than the shared-key kind).
    __slots__ = (
        "_aborted",
        "_backend",
        "_bind_error",
        "_budget_fails",
        "_budget_hold",
        "_cancel_owed",
        "_cancel_secret",
        "_cancels",
        "_check",
        "_check_off",
        "_check_parsed",
        "_check_skip",
        "_closing",
        "_direct_tls",
        "_draining",
        "_end_reason",
        "_explain_read",
        "_fail_block",
        "_failed",
        "_frontend",
        "_held_writes",
        "_hold_at_sync",
        "_inbuf",
        "_mask_wait",
        "_owed_error",
        "_password_skip",
        "_path",
        "_path_read",
        "_path_wanted",
        "_paused_by_client",
        "_paused_by_upstream",
        "_portals",
        "_quiet_upstream",
        "_rules_problem",
        "_server_fatal",
        "_ssl_asked",
        "_started_at",
        "_startup",
        "_startup_timer",
        "_statements",
        "_targets_read_again",
        "_tasks",
        "_tls",
        "_traffic",
        "_withheld_query",
        "client_addr",
        "database",
        "encoding",
        "gate",
        "guards",
        "gw",
        "id",
        "phase",
        "principal",
        "target",
        "tracker",
        "transport",
        "up",
    )

    def __init__(self, gw: GatewayContext) -> None:
        self.gw = gw
        # Bytes relayed each way: one integer add per data callback, summed at scrape time.
        self._traffic = gw.metrics.traffic
        self.phase = Phase.STARTUP
        self.id = str(uuid.uuid4())
        self.transport: asyncio.Transport | None = None
        self.client_addr = ""
        self._tls: TlsLayer | None = None
        self._direct_tls = False
        self._ssl_asked = False
        self._inbuf = bytearray()
        # The client's stream once relaying (its bytes, what goes to the server, what waits
        # for the gate), sans-IO; it takes over the buffer startup used.
        self._frontend = FrontendCore(gw.settings.listener.max_message_size, self._inbuf)
        self._startup: StartupMessage | None = None
        # Set once an unknown target name made this session read the control store again.
        self._targets_read_again = False
        self.principal: Principal | None = None
        self.target: Target | None = None
        # Which of the target's databases the session uses (dbname=TARGET/DATABASE).
        self.database = ""
        self.up: UpstreamConnection | None = None
        self.gate: StatementGate | None = None
        self.tracker = ResponseTracker()
        self.encoding = "utf-8"
        # A CancelRequest came while the message at the gate was not yet upstream.
        self._cancel_owed = False
        # Cancels pgwarden sent for this session not yet signalled to the backend, and what
        # waits meanwhile to be written to the server (_forward_cancel).
        self._cancels = 0
        self._held_writes: list[bytes] = []
        # A statement under a budget (row, byte or time) in flight: what the client sent
        # after it is acted on once it has ended, so that nothing runs behind a statement
        # the budget cuts (_hold_behind_budget). `_budget_fails`: it was cut where the
        # server finished it, and the transaction it ran in is failed first.
        self._budget_hold: Expectation | None = None
        self._budget_fails = False
        # A Query of several statements whose budget cut one the server finished: the
        # answers of those after it are withheld, as the server's error would skip them.
        self._withheld_query: Expectation | None = None
        # A budgeted Execute alone before its Sync in a transaction block: the hold starts
        # after that Sync (_drain_client).
        self._hold_at_sync = False
        self._paused_by_upstream = False
        self._paused_by_client = False
        # The server's stream once relaying, sans-IO; its frames are judged by _server_frame.
        self._backend = BackendCore(self._server_answer, self._judge_row, self._own_answer)
        # A masked result's rows wait (server reading paused) while its masks are resolved
        # again against the catalog (_plan_masks).
        self._mask_wait = False
        self._statements: dict[str, PreparedStatement] = {}
        self._portals: dict[str, Portal] = {}
        self._cancel_secret: bytes | None = None
        self._startup_timer: asyncio.TimerHandle | None = None
        # Bytes of an oversized password message still to drop before refusing the token.
        self._password_skip = 0
        # pgwarden is closing the session (its upstream closing is then no news), and whether
        # that is for an internal error (logged once), or after the server's own FATAL.
        self._closing = False
        self._failed = False
        self._server_fatal = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._end_reason = "client quit"
        self._started_at = time.time()
        # The server's error for a Bind it rejected, for the Execute of that portal it skips.
        self._bind_error: ErrorResponse | None = None
        # The search_path the server resolves names with, and its re-reading from the server.
        self._path = SearchPathWatch()
        self._path_read: PathRead | None = None
        # A statement waits for the path: it is read once every forwarded message is answered.
        self._path_wanted = False
        # The server's transaction is aborted (ReadyForQuery "E", and nothing has ended it).
        self._aborted = False
        # pgwarden's own read failed inside the client's pipeline: the server skips to the
        # client's Sync, and the client is owed this error in place of its next message.
        self._owed_error: bytes | None = None
        # The gateway is shutting down: the session ends at its next idle point.
        self._draining = False
        # What the policy's session rule enforces on this session (gateway/guards).
        self.guards: SessionGuards = NO_GUARDS
        # A statement cut short by its budget completed inside a transaction block: the
        # block is failed at the next ReadyForQuery, as the client saw an error.
        self._fail_block = False
        # Why the policy's session rule could not be read (None: it was): statements are
        # refused until it is.
        self._rules_problem: str | None = None
        # pgwarden's own EXPLAIN in flight (cost estimates): its answers are not the client's.
        self._explain_read: ExplainRead | None = None
        # Nothing written to the server is unanswered, and no pipeline is open there (set at
        # a ReadyForQuery that leaves nothing expected, cleared by any write): a catalog
        # check sent now is the first thing in the next implicit transaction.
        self._quiet_upstream = True
        # The in-band catalog check in flight; the way of reading the generation whose
        # check statement this connection has parsed ("" none); the check off for this
        # session (its user cannot run it), and the next Execute (sent again after its
        # check failed) decided on the task path, not its stale plan.
        self._check: _InBandCheck | None = None
        self._check_parsed = ""
        self._check_off = False
        self._check_skip = False

    @property
    def relaying(self) -> bool:
        """Past login and the upstream connect: the session's statements flow."""
        return self.phase is Phase.RELAY

    # -- connection callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        _no_delay(transport)
        peer = transport.get_extra_info("peername")
        self.client_addr = str(peer[0]) if isinstance(peer, tuple) else "local"
        self.gw.sessions.add(self)
        self.gw.all_closed.clear()
        loop = asyncio.get_running_loop()
        self._startup_timer = loop.call_later(
            self.gw.settings.listener.startup_timeout_seconds, self._callback, self._startup_timeout
        )

    def _callback(self, callback: Callable[[], None]) -> None:
        """A timer or deferred call of this session, run at the callback boundary."""
        try:
            callback()
        except Exception as exc:
            self._internal_error(exc)

    def _startup_timeout(self) -> None:
        if self.phase in (Phase.STARTUP, Phase.PASSWORD):
            self._fatal("08006", "pgwarden: startup timed out")

    def connection_lost(self, exc: BaseException | None) -> None:
        was = self.phase
        self.phase = Phase.CLOSED
        self.gw.sessions.discard(self)
        self.gw.rates.close_session(self.id)
        if not self.gw.sessions:
            self.gw.all_closed.set()
        if self._startup_timer is not None:
            self._startup_timer.cancel()
        if self.up is not None:
            self.gw.cancel_keys.release(self.up.process_id, self)
            self.up.transport.close()
        for task in self._tasks:
            task.cancel()
        if self.gate is not None:
            unfinished = (
                "client disconnected before the outcome"
                if self._end_reason == "client quit"
                else f"not completed: {self._end_reason}"
            )
            for e in self.tracker.clear():
                for run in e.runs:
                    if not run.done:
                        run.done = True
                        run.error_message = run.error_message or unfinished
                        self.gate.outcome(run)
        if was in (Phase.RELAY, Phase.CONNECTING) and self.principal is not None:
            self._session_event("session_end", self._end_reason)

    def data_received(self, data: bytes) -> None:
        try:
            self._client_bytes(data)
        except Exception as exc:  # the callback boundary: never a silent drop
            self._internal_error(exc)

    def _client_bytes(self, data: bytes) -> None:
        if self._tls is not None:
            was_done = self._tls.handshake_done
            try:
                data = self._tls.receive(data)
            except Exception:
                self._abort("TLS error")
                return
            if (
                self._direct_tls
                and not was_done
                and self._tls.handshake_done
                and self._tls.alpn != "postgresql"
            ):
                # As PostgreSQL 17: direct TLS is only for clients that say ALPN postgresql.
                self._abort("direct TLS without ALPN postgresql")
                return
            if not data:
                return
        phase = self.phase
        if phase is Phase.RELAY:
            self._client_data(data)
        elif phase is Phase.STARTUP:
            self._inbuf += data
            self._startup_data()
        elif phase is Phase.PASSWORD:
            self._inbuf += data
            self._password_data()
        elif phase is Phase.CONNECTING:
            self._inbuf += data
            if len(self._inbuf) > self.gw.settings.listener.max_message_size:
                self._protocol_violation("too much data before the session was ready")

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        # The client reads slower than the server answers: stop reading the server.
        self._paused_by_client = True
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_by_client = False
        if self.up is not None:
            self.up.transport.resume_reading()

    # -- shutdown ------------------------------------------------------------------------

    def drain(self) -> None:
        """The gateway is shutting down: end the session once nothing the client sent is
        still running or unanswered (at once when it is idle). A session inside a
        transaction may still end it; the listener closes what remains at its deadline."""
        self._draining = True
        self._end_if_drained()

    def _end_if_drained(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.RELAY and (
            self._frontend.state is GATED
            or self.tracker
            or self._inbuf
            or self._backend.buffer
            or self._backend.skip
            or self._frontend.out
            or self._frontend.copy_in
            or self._mask_wait
            or self._path_read is not None
            or (self.gate is not None and self.gate.in_transaction)
        ):
            return
        # Not logged in yet, or between statements: nothing of the client's is lost.
        self.shut_down()

    def shut_down(self) -> None:
        """End the session now, telling the client why (a statement still running gets
        its outcome record from connection_lost)."""
        self._end_reason = "gateway shutting down"
        self._fatal(SHUTTING_DOWN, "pgwarden: the gateway is shutting down")

    # -- output helpers ------------------------------------------------------------------

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._tls is not None:
            self._tls.send(data)
        else:
            self.transport.write(data)

    def _fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        if self.phase is Phase.CLOSED:
            return
        message = for_client(message, self.encoding)
        detail = None if detail is None else for_client(detail, self.encoding)
        self._send(ErrorResponse.build("FATAL", sqlstate, message, detail=detail).encode())
        self._close()

    def _protocol_violation(self, problem: str, sqlstate: str = "08P01") -> None:
        """The client broke the protocol: say what, record why the session ended, close."""
        self._end_reason = f"protocol violation: {problem}"
        if self.phase is Phase.PASSWORD:
            # A login attempt that never presented a token is still a failed login.
            self._session_event("auth_failure", self._end_reason)
        self._fatal(sqlstate, f"pgwarden: {problem}")

    def _internal_error(self, exc: BaseException) -> None:
        """A bug in pgwarden hit this session: log it once (its type and where, not its
        message, which may quote data), record why the session ends, close with a FATAL."""
        if self.phase is Phase.CLOSED or self._failed:
            return
        self._failed = True
        where = "".join(traceback.format_tb(exc.__traceback__))
        log.error("session %s: internal error %s\n%s", self.id, type(exc).__name__, where.rstrip())
        self._end_reason = f"internal error ({type(exc).__name__})"
        self._fatal("XX000", "pgwarden: internal error; the session is closed")

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            if self._tls is not None:
                with contextlib.suppress(Exception):
                    self._tls.close()
            self.transport.close()
        if self.up is not None:
            self.up.transport.close()

    def _abort(self, reason: str) -> None:
        self._end_reason = reason
        if self.transport is not None:
            self.transport.abort()
        if self.up is not None:
            self.up.transport.abort()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, UpstreamError):
            # The target went away while the session was being set up: not a bug.
            self._end_reason = "target closed the connection"
            self._fatal(exc.sqlstate, f"pgwarden: {exc}")
        elif exc is not None:
            self._internal_error(exc)

    def _session_event(self, kind: str, reason: str = "") -> None:
        startup = self._startup.parameters if self._startup else {}
        if kind == "session_start" and self.target is not None and self.principal is not None:
            self.gw.metrics.session_started(self.target.name, self.principal.groups)
        self._log_session(kind, reason, startup)
        event = SessionEvent(
            kind=kind,  # type: ignore[arg-type]
            time=time.time(),
            instance=self.gw.settings.instance,
            session_id=self.id,
            client_addr=self.client_addr,
            application_name=startup.get("application_name", ""),
            startup_user=startup.get("user", ""),
            target=dbname_for(self.target.name, self.database, self.target.dbname)
            if self.target is not None
            else startup.get("database", ""),
            principal=self.principal,
            reason=reason,
        )
        task = asyncio.ensure_future(self.gw.audit.session(event))
        self.gw.background.add(task)
        task.add_done_callback(self.gw.background.discard)

    def _log_session(self, kind: str, reason: str, startup: dict[str, str]) -> None:
        """One log line per session start, end and refused login (never the token)."""
        target = self.target.name if self.target is not None else startup.get("database", "")
        principal = self.principal
        fields: dict[str, object] = {
            "event": kind,
            "session_id": self.id,
            "client_addr": self.client_addr,
            "application_name": startup.get("application_name", ""),
            "target": target,
            "database": self.database,
        }
        if principal is not None:
            fields["subject"] = principal.subject
            fields["groups"] = list(principal.groups)
        if kind == "session_start":
            log.info("session started", extra=fields)
        elif kind == "session_end":
            fields["reason"] = reason
            fields["duration_seconds"] = round(time.time() - self._started_at, 3)
            log.info("session ended: %s", reason, extra=fields)
        else:
            fields["reason"] = reason
            log.warning("login refused: %s", reason, extra=fields)

    # -- startup -------------------------------------------------------------------------

    def _startup_data(self) -> None:
        buf = self._inbuf
        if not buf:
            return
        if buf[0] == _TLS_HANDSHAKE and self._tls is None:
            # Direct TLS (PostgreSQL 17+): the first bytes are a TLS ClientHello.
            self._begin_tls(direct=True)
            return
        if len(buf) < 4:
            return
        (length,) = _LEN.unpack_from(buf, 0)
        # As PostgreSQL: the body after the length word is bounded, at least its 4-byte code.
        if length < 8 or length - 4 > self.gw.settings.listener.max_startup_size:
            self._unframed(f"invalid length of startup packet ({length})")
            return
        if len(buf) < length:
            return
        body = bytes(buf[4:length])
        del buf[:length]
        try:
            packet = decode_startup(body)
        except ProtocolViolation as exc:
            if body[:4] == _CANCEL_CODE:
                self._unframed(f"invalid cancel request packet: {exc}")
            else:
                self._fatal("08P01", f"pgwarden: invalid startup packet: {exc}")
            return
        if isinstance(packet, SSLRequest):
            if self._tls is not None or self._ssl_asked:
                self._fatal("08P01", "pgwarden: duplicate SSLRequest")
                return
            self._ssl_asked = True
            if self.gw.server_tls is None:
                self._send(bytes((ENCRYPTION_REFUSED,)))
                self._startup_data()
                return
            if buf:
                # Bytes sent before the TLS handshake would be trusted as if encrypted
                # (CVE-2021-23222): a protocol violation.
                self._fatal("08P01", "pgwarden: received unencrypted data after SSL request")
                return
            self._send(bytes((ENCRYPTION_ACCEPTED,)))
            self._begin_tls(direct=False)
            return
        if isinstance(packet, GSSENCRequest):
            self._send(bytes((ENCRYPTION_REFUSED,)))
            self._startup_data()
            return
        if isinstance(packet, CancelRequest):
            self._handle_cancel(packet)
            return
        assert isinstance(packet, StartupMessage)
        self._on_startup(packet)

    def _unframed(self, problem: str) -> None:
        """A first packet PostgreSQL cannot frame (its length, a cancel request's size) is
        answered as PostgreSQL answers it: logged (COMMERROR), the connection closed without
        an ErrorResponse. Whatever sent it is no client mid-login (node-postgres ending a
        connection that is still connecting sends Terminate before its startup packet, and
        takes an answer for an error on a client it has closed). Nothing ran."""
        self._end_reason = f"protocol violation: {problem}"
        log.warning("session %s from %s: %s", self.id, self.client_addr, problem)
        self._close()

    def _begin_tls(self, *, direct: bool) -> None:
        assert self.transport is not None
        if self.gw.server_tls is None:
            self._abort("direct TLS without a certificate")
            return
        transport = self.transport
        self._tls = TlsLayer(self.gw.server_tls, transport.write)
        self._direct_tls = direct
        if direct:
            pending = bytes(self._inbuf)
            self._inbuf.clear()
            try:
                plain = self._tls.receive(pending)
            except Exception:
                self._abort("TLS error")
                return
            if self._tls.handshake_done and self._tls.alpn != "postgresql":
                self._abort("direct TLS without ALPN postgresql")
                return
            if plain:
                self._inbuf += plain
                self._startup_data()

    def _handle_cancel(self, packet: CancelRequest) -> None:
        session = self.gw.cancel_keys.find(packet.process_id, packet.secret_key)
        forwarded = session.cancel_running() if session is not None else None
        # PostgreSQL answers a cancel with nothing but closing the connection, once it has
        # signalled the backend; libpq waits for that close. So the client's cancel
        # connection closes only after the target's has.
        if forwarded is None:
            self._close()
        else:
            forwarded.add_done_callback(lambda _: self._close())

    def cancel_running(self) -> asyncio.Future[None] | None:
        if self.gate is not None:
            # A statement held for approval is withdrawn (nothing of it runs upstream).
            self.gate.withdraw_held()
        if self.up is None or self.target is None:
            return None
        if not self.tracker.running():
            # The statement the client cancels may still be at the gate (decided, recorded):
            # the server has not got it, and would ignore a cancel now. It follows the
            # statement upstream instead (_gate_done).
            self._cancel_owed = self._frontend.state is GATED
            return None
        return self._forward_cancel()

    def _forward_cancel(self) -> asyncio.Future[None]:
        """Every cancel pgwarden sends the target for this session (the client's, a budget's,
        a timeout's). Until the target has signalled the backend, nothing more is written to
        the server: a cancel that lands late stops whatever runs then (the client's next
        statement, pgwarden's own EXPLAIN), not the statement it was sent for. Once it is
        signalled, a backend that has finished that statement ignores it while it waits for
        the next one, so what was held is written then."""
        assert self.up is not None and self.target is not None
        done = forward_cancel(self.target, self.up.process_id, self.up.secret_key)
        # Counted once the exchange is under way: it always ends (delivered, refused, or
        # timed out), and so does the hold.
        self._cancels += 1
        done.add_done_callback(self._cancel_delivered)
        return done

    def _cancel_delivered(self, _: asyncio.Future[None]) -> None:
        self._cancels -= 1
        if self._cancels or self.phase is not Phase.RELAY:
            return
        held = self._held_writes
        if held:
            self._held_writes = []
            self._write_upstream(held[0] if len(held) == 1 else b"".join(held))
        self._read_on()

    def _read_on(self) -> None:
        """Read the client again, unless the next message went to the gate with a full
        read-ahead behind it (reading resumes when that one is through) or the server's
        write buffer is full (resume_writing resumes it)."""
        if (
            self.phase is Phase.RELAY
            and self.transport is not None
            and not self._paused_by_upstream
            and not (
                (self._frontend.state is GATED or self._budget_hold is not None)
                and self.held_input > READ_AHEAD
            )
        ):
            self.transport.resume_reading()

    # -- the kill switch (gateway/guards/kill.py) -----------------------------------------

    def summary(self) -> SessionSummary | None:
        if self.phase is not Phase.RELAY or self.principal is None or self.gate is None:
            return None
        assert self.target is not None and self._startup is not None
        front = self.tracker.front()
        run = front.current_run() if front is not None else None
        current = run.facts.text if run is not None and run.facts is not None else None
        return SessionSummary(
            id=self.id,
            subject=self.principal.subject,
            groups=self.principal.groups,
            token_id=self.principal.token_id,
            target=self.target.name,
            database=self.database,
            client_addr=self.client_addr,
            application_name=self._startup.parameters.get("application_name", ""),
            since=self._started_at,
            statements=self.gate.statements_recorded,
            rows=self.gate.rows_relayed,
            current_statement=current if self.tracker.running() else None,
        )

    def kill(self, reason: str, by: str) -> asyncio.Future[None] | None:
        """An operator ends the session: the running query is cancelled upstream (a
        CancelRequest, as the client's own cancel), the kill is audited, and the client is
        told why with a FATAL, as PostgreSQL's pg_terminate_backend does (57P01)."""
        if self.phase is Phase.CLOSED:
            return None
        cancel = self.cancel_running()
        self._session_event("session_kill", f"by {by}: {reason}")
        self._end_reason = f"killed by {by}: {reason}"
        self._fatal(SHUTTING_DOWN, f"pgwarden: session ended by an administrator: {reason}")
        return cancel

    def _on_startup(self, msg: StartupMessage) -> None:
        params = msg.parameters
        self._startup = msg
        if msg.major != 3:
            self._fatal("0A000", f"pgwarden: unsupported frontend protocol {msg.major}.{msg.minor}")
            return
        if "replication" in params and params["replication"].lower() not in (
            "false",
            "off",
            "no",
            "0",
        ):
            self._fatal("28000", "pgwarden: replication connections are not supported")
            return
        try:
            target_name, database = parse_dbname(params.get("database") or params.get("user", ""))
        except TargetError as exc:
            self._fatal("3D000", f"pgwarden: {exc}")
            return
        if self.gw.targets.problem is not None:
            # The targets and the token registry cannot be read: who may connect where, and
            # whether a token was revoked, are unknown. Fail closed.
            self._control_unavailable(self.gw.targets.problem)
            return
        target = self.gw.targets.get(target_name)
        if target is None and not self._targets_read_again:
            # A target added a moment ago (the CLI, another gateway) may not have reached
            # this gateway's copy yet: read the store once before refusing the name.
            self._targets_read_again = True
            if self.transport is not None:
                self.transport.pause_reading()
            self._spawn(self._startup_after_reading_targets(msg))
            return
        if target is None:
            self._fatal(
                "3D000",
                f'pgwarden: no target named "{target_name}" (the database name selects the target:'
                f" dbname=TARGET or TARGET{DATABASE_SEPARATOR}DATABASE)",
            )
            return
        try:
            self.database = target.database_for(database)
        except TargetError as exc:
            self._fatal(REFUSED, f"pgwarden: {exc}")
            return
        self.target = target
        tls = self._tls is not None
        if (
            not tls
            and not _is_loopback(self.client_addr)
            and not self.gw.settings.listener.allow_plaintext_password
        ):
            self._fatal(
                "28000", "pgwarden: TLS is required to send a token (connect with sslmode=require)"
            )
            return
        if msg.minor > 0:
            # We speak 3.0 with upstream; tell the client so and ignore _pq_ options.
            unknown = tuple(k for k in params if k.startswith("_pq_."))
            self._send(NegotiateProtocolVersion(0, unknown).encode())
        self.phase = Phase.PASSWORD
        self._send(AuthenticationCleartextPassword().encode())
        if self._inbuf:
            self._password_data()

    def _password_data(self) -> None:
        buf = self._inbuf
        if self._password_skip:
            # The rest of an oversized password message: dropped unread, so that the client,
            # still sending, reads the refusal instead of a connection reset.
            n = min(self._password_skip, len(buf))
            del buf[:n]
            self._password_skip -= n
            if not self._password_skip:
                self._reject_token(TOKEN_TOO_LARGE)
            return
        if len(buf) < 5:
            return
        code, length = _HEADER.unpack_from(buf, 0)
        if code != PASSWORD or length < 4:
            self._protocol_violation("expected a password message")
            return
        if length - 4 > self.gw.settings.identity.max_token_bytes + 1:  # the token and its NUL
            if length + 1 > self.gw.settings.listener.max_message_size:
                self._reject_token(TOKEN_TOO_LARGE)
                return
            self._password_skip = length + 1
            self._password_data()
            return
        if len(buf) < length + 1:
            return
        body = bytes(buf[5 : length + 1])
        del buf[: length + 1]
        try:
            token = PasswordMessage.decode(body).password
        except ProtocolViolation:
            self._protocol_violation("malformed password message")
            return
        self.phase = Phase.CONNECTING
        self._spawn(self._login(token))

    def _reject_token(self, check: str) -> None:
        self._session_event("auth_failure", check)
        self._fatal("28P01", f"pgwarden: token rejected: {check}")

    async def _login(self, token: str) -> None:
        assert self.target is not None and self._startup is not None
        try:
            principal = await self.gw.verifier.verify(token.strip())
        except TokenRejected as exc:
            self._reject_token(exc.check)
            return
        except ControlStoreUnavailable as exc:
            self._control_unavailable(str(exc))
            return
        self.principal = principal
        guards = await self._session_guards(principal)
        self.guards = guards
        over = self.gw.rates.open_session(
            self.id, principal.subject, principal.token_id, guards.limits
        )
        if over is not None:
            self._session_event("auth_failure", over)
            self._fatal(TOO_MANY_SESSIONS, f"pgwarden: {over}")
            return
        params = self._startup.parameters
        relayed = {k: v for k, v in params.items() if k in _RELAYED_PARAMETERS}
        # The enforced settings start the upstream session, and so are its reset values.
        relayed.update(guards.enforced.startup_parameters())
        settings_sql = self._startup_settings(params)
        if settings_sql is None:
            return
        try:
            up = await connect_upstream(
                self.target, self.gw.environ, relayed, database=self.database
            )
        except UpstreamError as exc:
            self.gw.metrics.upstream_connect_failed(self.target.name)
            if exc.detail:
                log.warning("session %s: %s: %s", self.id, exc, exc.detail)
            self._session_event("auth_failure", str(exc))
            self._fatal(exc.sqlstate, f"pgwarden: {exc}")
            return
        if self.phase is Phase.CLOSED:
            up.transport.close()
            return
        self.up = up
        self.gate = self.gw.make_gate(
            self,
            SessionContext(
                instance=self.gw.settings.instance,
                session_id=self.id,
                client_addr=self.client_addr,
                application_name=params.get("application_name", ""),
                startup_user=params.get("user", ""),
                principal=principal,
                target_name=self.target.name,
                target_database=self.database,
                target_labels=dict(self.target.labels),
                target_default_database=self.target.dbname,
                target_databases=self.target.databases,
            ),
        )
        self.gate.settle_search_path = self._settle_search_path
        self.gate.notify = self._notify_client
        self.gate.enforced = guards.enforced
        self.gate.rules_problem = self._rules_problem
        if guards.estimate_seq_scan_rows is not None:
            self.gate.explain = self._explain
            self.gate.estimate_seq_scan_rows = guards.estimate_seq_scan_rows
            self.gate.estimate_plan_rows = guards.estimate_plan_rows
        if guards.limits.statements_per_second is not None:
            self.gate.rate_check = functools.partial(
                self.gw.rates.take, principal.subject, principal.token_id, guards.limits
            )
        self._session_event("session_start")
        if self.database != self.target.dbname and not await self._database_allowed():
            return
        if settings_sql:
            # Startup `options -c name=value` are statements like any other: decide them.
            verdict = await self.gate.check_query(settings_sql)
            guard = self._guard_settings(verdict)
            if guard is not None:
                verdict.allowed, verdict.refusal = False, guard
            if not verdict.allowed:
                self._fatal(
                    REFUSED, f"pgwarden: startup option refused: {self._refusal_text(verdict)}"
                )
                return
            for run in verdict.runs:
                run.command_tag = "SET"
                run.done = True
                self.gate.outcome(run)
            up.parameters.update(await self._apply_startup_settings(settings_sql))
        # The role's or database's default, or a startup option, may have set it.
        path = await self._startup_search_path()
        if path is None:
            return
        self.gate.search_path = path
        self._begin_relay(up)

    async def _session_guards(self, principal: Principal) -> SessionGuards:
        """The policy's session rule for this principal and target, read once per login.
        When it cannot be read (OPA down, a malformed answer) the login goes on, as with
        OPA down it always has, but no statement runs until the rule is read
        (_rules_known)."""
        try:
            return await self._read_rules(principal)
        except RulesUnavailable as exc:
            self._rules_problem = str(exc)
            return NO_GUARDS

    async def _rules_known(self) -> bool:
        """Before a statement of a session whose rule could not be read at login: read it
        again. None to enforce: the session goes on. Guards: they can only be set at login
        (the upstream session's reset values), so the session ends and the client
        reconnects. Unreadable still: the statement is refused (the gate says why)."""
        assert self.principal is not None and self.gate is not None
        try:
            guards = await self._read_rules(self.principal)
        except RulesUnavailable as exc:
            self._rules_problem = self.gate.rules_problem = str(exc)
            return True
        self._rules_problem = self.gate.rules_problem = None
        if guards == NO_GUARDS:
            return True
        self._end_reason = "session rules read after login"
        self._fatal(
            "57P01",
            "pgwarden: the policy's session rule could not be read at login and asks for"
            " guards now; reconnect",
        )
        return False

    async def _read_rules(self, principal: Principal) -> SessionGuards:
        rules = self.gw.session_rules
        if rules is None:
            return NO_GUARDS
        assert self.target is not None
        target = self.target
        policy_input = {
            "version": 1,
            "principal": principal.to_input(),
            "target": target_input(
                TargetInfo(
                    target.name, self.database, target.labels, target.dbname, target.databases
                )
            ),
        }
        return await rules.for_session(policy_input)

    async def _database_allowed(self) -> bool:
        """Another database than the target's own: the policy decides the choice itself
        before the client's first statement (and sees `target.database` in every input)."""
        assert self.gate is not None
        verdict = await self.gate.check_connect()
        if not verdict.allowed:
            refusal = ErrorResponse.decode((verdict.refusal or b"")[5:])
            self._fatal(refusal.sqlstate or REFUSED, self._refusal_text(verdict), refusal.detail)
            return False
        for run in verdict.runs:
            run.command_tag, run.done = "CONNECT", True
            self.gate.outcome(run)
        return True

    def _refusal_text(self, verdict: Verdict) -> str:
        if verdict.refusal is None:
            return "refused"
        return ErrorResponse.decode(verdict.refusal[5:]).message or "refused"

    def _startup_settings(self, params: dict[str, str]) -> str | None:
        """`options -c a=b` and unknown startup parameters, as SET statements (None: refused)."""
        sets: list[tuple[str, str]] = []
        for key, value in params.items():
            if (
                key in _RELAYED_PARAMETERS
                or key in ("user", "database", "replication")
                or key.startswith("_pq_.")
            ):
                continue
            if key == "options":
                words = value.replace("\\ ", "\0").split()
                i = 0
                while i < len(words):
                    word = words[i]
                    if word == "-c" and i + 1 < len(words):
                        setting = words[i + 1]
                        i += 2
                    elif word.startswith("-c") or (word.startswith("--") and "=" in word):
                        setting = word[2:]
                        i += 1
                    else:
                        self._fatal("42501", f"pgwarden: unsupported startup option {word!r}")
                        return None
                    name, sep, val = setting.replace("\0", " ").partition("=")
                    if not sep:
                        self._fatal("42601", f"pgwarden: malformed startup option {setting!r}")
                        return None
                    sets.append((name.replace("-", "_"), val))
            else:
                sets.append((key, value))
        return "".join(
            f'SET "{n.replace(chr(34), chr(34) * 2)}" TO {_quote_literal(v)};' for n, v in sets
        )

    async def _apply_startup_settings(self, sql: str) -> dict[str, str]:
        """Run the allowed startup settings upstream before the client's first statement."""
        assert self.up is not None
        proto = self.up.protocol
        proto.send(Query(sql.encode()).encode())
        reported: dict[str, str] = {}
        while True:
            code, body = await proto.read_frame()
            if code == READY_FOR_QUERY:
                return reported
            if code == PARAMETER_STATUS:
                ps = decode_backend(code, body)
                assert isinstance(ps, ParameterStatus)
                reported[ps.name] = ps.value
            elif code == ERROR_RESPONSE:
                err = ErrorResponse.decode(body)
                self._fatal(
                    err.sqlstate or "22023", f"pgwarden: startup option failed: {err.message}"
                )
                raise asyncio.CancelledError

    async def _startup_search_path(self) -> tuple[str, ...] | None:
        """The search_path the session starts with, as the server reports it."""
        assert self.up is not None
        proto = self.up.protocol
        proto.send(SHOW_SEARCH_PATH)
        value: str | None = None
        while True:
            code, body = await proto.read_frame()
            if code == DATA_ROW:
                value = first_column(body, self.encoding)
            elif code == ERROR_RESPONSE:
                err = ErrorResponse.decode(body)
                self._fatal(err.sqlstate or "XX000", f"pgwarden: search_path: {err.message}")
                return None
            elif code == READY_FOR_QUERY:
                break
        return parse_search_path(value or "")

    # -- search_path: read again from the server when it may have moved (see search_path) ---

    async def _settle_search_path(self) -> PathProblem | None:
        """Wait until the session's search_path is known; why not, when it cannot be."""
        watch = self._path
        if watch.uncertain and watch.problem is None:
            self._want_path()
            await watch.wait_settled()
        return watch.problem if watch.uncertain else None

    async def _moved_since_parse(self, prepared: PreparedStatement) -> bool:
        """Whether the server would plan the statement under another search_path than the
        one it was decided under (an unknown path counts as moved)."""
        assert self.gate is not None
        if all(f.category == "tcl" for f in prepared.facts):
            return False
        problem = await self._settle_search_path()
        return problem is not None or prepared.search_path != self.gate.search_path

    def _want_path(self) -> None:
        """A statement waits for the path: read it once everything forwarded is answered."""
        if self._path_wanted or self._path_read is not None or self.up is None:
            return
        self._path_wanted = True
        # Decided but still buffered: it may be what moved the path, so it goes first.
        self._flush_server()
        if self.tracker.front() is not None and not self._frontend.discarding:
            # Extended messages are answered at a Flush or Sync: ask for the answers without
            # ending the client's pipeline (a Sync would commit it).
            self._write_upstream(FLUSH_MESSAGE)
        self._read_path_if_quiet()

    def _read_path_if_quiet(self) -> None:
        """Send the read if nothing forwarded is still unanswered, in the form the server's
        state allows; or say why the path cannot be read now."""
        if not self._path_wanted or self.up is None:
            return
        if self._frontend.copy_in:
            problem = PathProblem("search_path cannot be read during COPY FROM STDIN")
        elif self.tracker.front() is not None:
            return
        elif self._frontend.discarding or self._owed_error is not None:
            # The server skips to the client's Sync: so it will the statement waiting.
            problem = PathProblem(
                "not executed: an earlier message of the pipeline failed", skipped=True
            )
        elif self._aborted:
            problem = PathProblem(
                "search_path cannot be read in an aborted transaction", aborted=True
            )
        else:
            self._path_wanted = False
            read = self._path_read = PathRead(
                in_pipeline=self.tracker.unsynced, also=self.guards.enforced.read_back
            )
            self._backend.intercept = True
            self._write_upstream(read.request)
            return
        self._path_wanted = False
        self._path.unknown(problem)

    def _path_answer(self, code: int, view: bytes | bytearray, pos: int, end: int) -> bool:
        """Consume one answer to pgwarden's read; True if the client must see it as well."""
        read = self._path_read
        assert read is not None and self.gate is not None
        body = bytes(view[pos + 5 : end])
        if code == READY_FOR_QUERY:  # after the read's Sync
            self.gate.in_transaction = body[0] != STATUS_IDLE
            self._aborted = body[0] == STATUS_FAILED
        # A FATAL error ends the session: the client is told why, as direct.
        fatal = code == ERROR_RESPONSE and ErrorResponse.decode(body).severity in ("FATAL", "PANIC")
        if not read.answer(code, body, self.encoding):
            return fatal
        self._path_read = None
        self._intercept_own()
        if read.error is None and read.value is not None:
            self.gate.search_path = parse_search_path(read.value)
            escaped = self.guards.enforced.escaped(read.settings) if read.also else None
            if escaped is not None:
                # Code pgwarden could not see into changed what the policy enforces: nothing
                # more runs in this session.
                self._end_reason = f"enforced setting changed: {escaped}"
                self._fatal(
                    REFUSED,
                    "pgwarden: a setting enforced on this session was changed by code pgwarden"
                    f" cannot see into ({escaped}); the session is closed",
                )
                return False
            self._path.learned()
            return False
        error = read.error
        sqlstate = (error.sqlstate if error is not None else None) or "XX000"
        why = server_text(error.message or "", self.encoding) if error is not None else "no value"
        problem = PathProblem(f"search_path could not be read from the server ({why})")
        if read.in_pipeline:
            # The server now skips to the client's Sync: to the client, the statement that
            # waited for the read is the one that failed.
            self._frontend.discarding = True
            self._owed_error = refusal_for(problem.reason, sqlstate)
        self._path.unknown(problem)
        return fatal

    def _begin_relay(self, up: UpstreamConnection) -> None:
        assert self.transport is not None
        # Revoked while the upstream login ran: the token watch skips sessions not yet
        # relaying, but has already put the revocation where this check finds it.
        problem = self._token_problem()
        if problem is not None:
            self._end_session_for_token(problem)
            return
        if self._startup_timer is not None:
            self._startup_timer.cancel()
        proto = up.protocol
        if proto.closed:
            # Lost during the set-up, before on_lost below could hear of it.
            raise UpstreamError("the target closed the connection during login")
        proto.on_data = self._server_data
        proto.on_lost = self._upstream_lost
        proto.on_pause = self._upstream_paused
        proto.on_resume = self._upstream_resumed
        self._cancel_secret = self.gw.cancel_keys.issue(
            up.process_id, self, len(up.secret_key) or 4
        )
        out = [AuthenticationOk().encode()]
        for name, value in up.parameters.items():
            out.append(ParameterStatus(name, value).encode())
        if up.parameters.get("standard_conforming_strings", "on") != "on":
            self._fatal(REFUSED, f"pgwarden: {_CONFORMING_STRINGS}")
            return
        encoding = up.parameters.get("client_encoding", "UTF8")
        self.encoding = python_codec(encoding)
        # Relayed: the client's driver keeps them, nothing here reads them again (an idle
        # session holding its own copy was ~400 bytes of its memory).
        up.parameters.clear()
        out.append(BackendKeyData(up.process_id, self._cancel_secret).encode())
        out.append(ReadyForQuery("I").encode())
        self._send(b"".join(out))
        self.phase = Phase.RELAY
        if up.leftover:
            self._server_data(up.leftover)
        if self._inbuf:
            data = bytes(self._inbuf)
            self._inbuf.clear()
            self._client_data(data)

    def recheck_token_now(self) -> None:
        """Revocations or signing keys changed: end the session now if its token is no
        longer valid. Also the periodic recheck (identity.recheck_seconds): the listener
        sweeps every session at that period, so that an idle session holds no timer."""
        if self.phase is not Phase.RELAY or self.principal is None:
            return
        try:
            reason = self.gw.verifier.still_valid(self.principal)
        except Exception as exc:
            self._internal_error(exc)
            return
        if reason is not None:
            self._end_session_for_token(reason)

    async def _startup_after_reading_targets(self, msg: StartupMessage) -> None:
        await self.gw.targets.refresh()
        if self.phase is Phase.CLOSED:
            return
        if self.transport is not None:
            self.transport.resume_reading()
        self._on_startup(msg)

    def _control_unavailable(self, problem: str) -> None:
        """A login cannot be checked against the control store: refused, with why."""
        self._session_event("auth_failure", f"control store unavailable: {problem}")
        self._fatal(
            CONTROL_UNAVAILABLE,
            "pgwarden: login refused: the control store (targets and token registry) cannot"
            f" be read: {problem}; try again once it is back",
        )

    def _end_session_for_token(self, reason: str) -> None:
        self._end_reason = reason
        self._fatal("28P01", f"pgwarden: session ended: {reason}")

    def _upstream_lost(self, exc: BaseException | None) -> None:
        if self.phase is not Phase.RELAY or self._closing:
            return
        self._end_reason = "target closed the connection"
        if self._server_fatal:
            self._close()  # the server said why itself (terminated, shutting down)
            return
        self._fatal("08006", "pgwarden: lost the connection to the target; the session is closed")

    def _write_upstream(self, data: bytes) -> None:
        """Every write to the server goes here: one that has just closed is a lost target."""
        up = self.up
        if up is None:
            return
        self._quiet_upstream = False
        if self._cancels:
            # Written once the cancel in flight is signalled (_forward_cancel).
            held = self._held_writes
            held.append(data)
            if self.transport is not None and sum(map(len, held)) > READ_AHEAD:
                self.transport.pause_reading()
            return
        if up.transport.is_closing():
            self._upstream_lost(None)
            return
        up.transport.write(data)

    def _upstream_paused(self) -> None:
        self._paused_by_upstream = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _upstream_resumed(self) -> None:
        self._paused_by_upstream = False
        if self.transport is not None and self._frontend.state is not GATED:
            self.transport.resume_reading()

    # -- relay: client to server ---------------------------------------------------------

    @property
    def held_input(self) -> int:
        """Bytes the client sent that pgwarden holds and has not handed to the server yet."""
        return self._frontend.held

    def _client_data(self, data: bytes) -> None:
        self._traffic.to_server += len(data)
        buf = self._inbuf
        buf += data
        if self._frontend.state is GATED or self._budget_hold is not None:
            if self.transport is not None and self.held_input > READ_AHEAD:
                self.transport.pause_reading()
            return
        self._drain_client()

    def _to_server(self, data: bytes) -> None:
        """Queue a decided message for the server; it leaves with what passes through after
        it, at the latest when the next message is handed to the gate."""
        self._frontend.queue(data)

    def _flush_server(self) -> None:
        data = self._frontend.flush()
        if data is not None and self.up is not None:
            self._write_upstream(data)

    def _drain_client(self) -> None:
        """Carry out the frontend core's actions on what the client sent: forward, note the
        answers the server will owe, hand the first message that needs a decision to the
        gate (on its plan from this callback where one holds, else to a task)."""
        core = self._frontend
        next_action = core.next_action
        tracker = self.tracker
        while self._budget_hold is None:
            action = next_action()
            if action is BIND_NOTED:
                self._on_bind(core.bind)
                tracker.expect(Expectation("bind"))
                continue
            if action is EXPECT:
                expectation = Expectation(core.expected)
                tracker.expect(expectation)
                if self._hold_at_sync and expectation.kind == "sync":
                    self._hold_at_sync = False
                    self._hold_behind(expectation, core.flush_through())
                    return
                continue
            if action is ANSWER:
                self._expect_answer(core.described)
                continue
            send = core.send
            if send is not None and self.up is not None:
                self._write_upstream(send)
            if action is IDLE:
                return
            if action is GATE:
                code = core.code
                message = core.message
                assert self.gate is not None
                self.gate.entered = time.monotonic()
                if code == EXECUTE:
                    planned = self._execute_planned(message)
                else:
                    planned = code == QUERY and self._query_planned(message)
                if not planned:
                    self._spawn(self._gated(code, message))
                return
            if action is TERMINATE_SENT:
                self._end_reason = "client quit"
                self._close()
                return
            self._protocol_violation(core.problem, core.sqlstate)
            return

    def _expect_answer(self, msg: Describe | Close) -> None:
        if msg.kind == "S" and msg.name.startswith(_CHECK_NAME):
            self._check_parsed = ""  # the client closes the check's statement: see _forwarded
        held = (self._statements if msg.kind == "S" else self._portals).get(msg.name)
        closing = (msg.kind, msg.name)
        if isinstance(msg, Close):
            self.tracker.expect(Expectation("close", closing=closing, described=held))
        elif msg.kind == "S":
            self.tracker.expect(Expectation("describe_statement", closing=closing, described=held))
        else:
            self.tracker.expect(Expectation("describe_portal", closing=closing, described=held))

    async def _gated(self, code: int, message: bytes) -> None:
        try:
            await self._gate_message(code, message)
        finally:
            self._frontend.gate_done()
        self._gate_done()

    def _forward_owed_cancel(self, running: Expectation, tries: int) -> None:
        """Forward a cancel the client sent while `running` was at the gate. It has just been
        written upstream: a cancel that reaches the backend before it has read the statement
        (still waiting for a command) is ignored by the server, so it is sent again while
        that same statement is still the one running, at most `tries` times in all."""
        if (
            self.phase is not Phase.RELAY
            or self.up is None
            or self.target is None
            or not self.tracker.holds(running)
        ):
            return
        self._forward_cancel()
        if tries > 1:
            asyncio.get_running_loop().call_later(
                _OWED_CANCEL_AGAIN,
                self._callback,
                functools.partial(self._forward_owed_cancel, running, tries - 1),
            )

    def _gate_done(self) -> None:
        """The message handed to the gate is dealt with: the client's next ones go on."""
        self._frontend.gate_done()
        if self.gate is not None:
            self.gate.entered = math.inf
        if self.phase is Phase.RELAY:
            self._drain_client()
            if self._cancel_owed:  # cancelled at the gate: now it has gone upstream, if at all
                self._cancel_owed = False
                running = self.tracker.running_one()
                if running is not None:
                    self._forward_owed_cancel(running, _OWED_CANCEL_TRIES)
            self._read_on()
        if self._draining:
            self._end_if_drained()

    # -- a message whose plan holds: relayed from callbacks, no task per statement ---------

    def _planned_allowed(self) -> bool:
        """Whether the session may relay a message on its plan now at all (else: the task
        path, which says why not where something is wrong)."""
        return (
            self.gate is not None
            and not self._frontend.discarding
            and not self._frontend.copy_in
            and self._owed_error is None
            and self._token_problem() is None
        )

    def _execute_planned(self, message: bytes) -> bool:
        """Take an Execute of a protocol-prepared statement whose Parse-time plan still holds
        (the gate's plan_fits and still_current: parameters, masks, policy revision; here:
        the portal was planned under the search_path the statement was decided under, the
        token is valid); it then waits only for the catalog check and its request record,
        on callbacks, both at once (the longer of the two, not their sum). False: the task
        path decides it (everything else, and any doubt)."""
        gate = self.gate
        if gate is None or not self._planned_allowed():
            return False
        if self._check_skip:
            # Sent again after its in-band check found its plan stale: decided afresh.
            self._check_skip = False
            return False
        try:
            msg = Execute.decode(message[5:])
        except ProtocolViolation:
            return False  # the task path says what is wrong with it
        portal = self._portals.get(msg.portal)
        prepared = portal.prepared if portal is not None else None
        if (
            portal is None
            or prepared is None
            or portal.search_path is None
            or portal.search_path != prepared.search_path
            or not gate.plan_fits(
                prepared.facts, prepared.decisions, prepared.masks, prepared.catalog_generation
            )
        ):
            return False
        if not gate.still_current(prepared.decisions):
            return False
        self._relay_planned(
            _Planned(
                EXECUTE,
                message,
                prepared.facts,
                prepared.decisions,
                prepared.masks,
                prepared.catalog_generation,
                portal.params,
                portal,
            )
        )
        return True

    def _query_planned(self, message: bytes) -> bool:
        """Take a simple-protocol Query whose text's shape has a plan that serves it now
        (gate.planned_query: one statement whose facts and decision no literal changes,
        the policy, search_path, transaction state and masks as when it was planned; the
        search_path known); as an Execute on its plan, it then waits only for the catalog
        check and its request record, which carries its own text. False: the task path."""
        gate = self.gate
        if gate is None or self._path.uncertain or not self._planned_allowed():
            return False
        try:
            text = self._decode_sql(Query.decode(message[5:]).query)
        except ProtocolViolation:
            return False
        if text is None:
            return False
        found = gate.planned_query(text)
        if found is None:
            return False
        plan, facts = found
        self._relay_planned(
            _Planned(QUERY, message, facts, plan.decisions, plan.masks, plan.catalog_generation)
        )
        return True

    def _relay_planned(self, planned: _Planned) -> None:
        """The catalog check and the request record of a message on its plan."""
        assert self.gate is not None
        if self._check_eligible(planned):
            planned.in_band = self.gate.in_band_check(planned.facts, planned.generation)
            if planned.in_band is not None:
                # The check goes with the statement once its record is durable: no wait of
                # its own (_send_check).
                self._record_planned(planned, None)
                return
        probe = self.gate.catalog_check(planned.facts)
        if probe is None:
            self._record_planned(planned, None)
        elif self.gate.record_during_catalog_check():
            # The probe's round trip and the record's write (and fdatasync) overlap: the
            # statement waits for the longer, not the sum (_planned_recorded).
            self._record_planned(planned, probe)
        else:
            probe.add_done_callback(functools.partial(self._catalog_checked, planned))

    def _plan_stale(self, planned: _Planned, probe: asyncio.Future[str | None] | None) -> bool:
        """DDL committed since the plan was made (or the generation cannot be confirmed),
        the policy changed meanwhile, or its kept masks no longer hold (the catalog cache
        dropped, a sticky mask added): the statement is decided afresh on the task path."""
        gate = self.gate
        assert gate is not None
        if probe is not None:
            generation = None if probe.cancelled() or probe.exception() else probe.result()
            if generation is None or generation != planned.generation:
                return True
        if any(d.masks for d in planned.decisions) and (
            planned.masks is None or not gate.masks_hold(planned.masks)
        ):
            return True
        return not gate.still_current(planned.decisions)

    def _catalog_checked(self, planned: _Planned, probe: asyncio.Future[str | None]) -> None:
        """The catalog check of a record not yet written answered."""
        if self.phase is not Phase.RELAY or self._closing:
            return  # the session ended meanwhile: nothing was recorded or sent
        try:
            if self._plan_stale(planned, probe):
                self._spawn(self._gated(planned.code, planned.message))
                return
            self._record_planned(planned, None)
        except Exception as exc:  # the callback boundary: never a silent drop
            self._frontend.gate_done()
            self._internal_error(exc)

    def _record_planned(self, planned: _Planned, probe: asyncio.Future[str | None] | None) -> None:
        """Queue the request record; `probe`: a catalog check still to be waited for too."""
        assert self.gate is not None
        recorded = self.gate.request_planned(
            planned.facts, planned.decisions, planned.protocol, planned.params
        )
        done = functools.partial(self._planned_recorded, planned, probe)
        if probe is None:
            recorded.add_done_callback(done)
            return
        # Whichever of the two ends last goes on at once: a done callback added to a future
        # already done would wait another pass of the event loop (call_soon).
        waits = [probe, recorded]

        def ended(future: asyncio.Future[Any]) -> None:
            waits.remove(future)
            if not waits:
                done(recorded)

        probe.add_done_callback(ended)
        recorded.add_done_callback(ended)

    def _planned_recorded(
        self,
        planned: _Planned,
        probe: asyncio.Future[str | None] | None,
        recorded: asyncio.Future[str],
    ) -> None:
        if self.phase is not Phase.RELAY or self._closing:
            return  # as a cancelled task: the record is written, the statement not sent
        assert self.gate is not None
        try:
            # Asked again only where something may have moved while the record was written:
            # a catalog check that overlapped it, or kept masks (the catalog cache dropped
            # meanwhile). Otherwise _catalog_checked or _execute_planned asked just before
            # the record was queued, and the record's write changes neither.
            again = probe is not None or any(d.masks for d in planned.decisions)
            if again and self._plan_stale(planned, probe):
                # Recorded during a check that found the plan stale (or masks that moved
                # while it was written): the record is closed as not sent under it, the
                # statement decided and recorded afresh.
                self.gate.superseded(planned.facts, recorded)
                self._spawn(self._gated(planned.code, planned.message))
                return
            if planned.in_band is not None and not self._check_eligible(planned):
                # Something went to the server while the record was written (pgwarden's
                # own read of the search_path): the check cannot go first now; a probe.
                self._probe_after_record(planned, recorded)
                return
            verdict = self.gate.executed(
                planned.facts,
                planned.decisions,
                recorded,
                planned.masks,
                protocol=planned.protocol,
            )
            if planned.portal is not None:
                self._execute_decided(verdict, planned.message, planned.portal)
                if planned.in_band is not None and verdict.allowed:
                    self._send_check(planned, recorded)
            else:
                self._query_decided(verdict, planned.message)
        except Exception as exc:  # the callback boundary: never a silent drop
            self._frontend.gate_done()
            self._internal_error(exc)
            return
        self._gate_done()

    # -- the catalog check in band --------------------------------------------------------

    def _check_eligible(self, planned: _Planned) -> bool:
        """Whether a planned Execute's catalog check may go in band, ahead of it in its own
        implicit transaction (see StatementGate.catalog_check): alone with its Bind before
        the client's Sync (the failure skips exactly the client's messages, which are sent
        again), outside a transaction block (a failure would fail the client's block), with
        nothing of the client's unanswered or sent in the pipeline already (its effects
        would be undone with it); not a write under a budget (held until it ends, with its
        Sync: _execute_decided)."""
        return (
            planned.portal is not None
            and self._quiet_upstream
            and not self._check_off
            and self._check is None
            and self._budget_hold is None
            and not self._cancels
            and not self._aborted
            and self.gate is not None
            and not self.gate.in_transaction
            and self._frontend.next_code() == SYNC
            and not (
                any(f.writes for f in planned.facts) and self.gate.may_budget(planned.decisions)
            )
        )

    def _probe_after_record(self, planned: _Planned, recorded: asyncio.Future[str]) -> None:
        """The planned statement's check as a probe after all (its record is written)."""
        assert self.gate is not None
        planned.in_band = None
        probe = self.gate.catalog_check(planned.facts)
        if probe is None:
            self._planned_recorded(planned, None, recorded)
            return
        probe.add_done_callback(
            lambda _: self._callback(lambda: self._planned_recorded(planned, probe, recorded))
        )

    def _send_check(self, planned: _Planned, recorded: asyncio.Future[str]) -> None:
        """Put the catalog check ahead of the Execute just queued and its Bind (not sent yet:
        they leave with the client's Sync, _hold_at_sync): the server runs it first in their
        implicit transaction. What the client sends after that Sync waits for its answer
        (_check_answer)."""
        assert planned.in_band is not None
        out = self._frontend.out
        if not out or out[-1] is not planned.message:
            return  # not forwarded after all: nothing to check
        if self._budget_hold is not None or self._hold_at_sync:
            # _check_eligible rules these out (a write, more than the Sync behind, a block):
            # an Execute held for its budget cannot have a check ahead of it.
            raise RuntimeError("an in-band catalog check ahead of an Execute held back")
        way, sql = planned.in_band
        name = _CHECK_NAME + way
        parsing = self._check_parsed != way
        check = b""
        if parsing:
            # Closed first: whatever holds the name now (a statement of the client's put
            # there since: see _forwarded) is gone, and the Parse cannot fail for the name.
            check = Close("S", name).encode() + Parse(name, sql.encode(), (TEXT,)).encode()
        assert planned.generation is not None
        check += Bind(name, name, (0,), (planned.generation.encode(),), ()).encode()
        check += Execute(name, 0).encode()
        unit = b"".join(out) + _SYNC_MESSAGE
        out.insert(0, check)
        self._check = _InBandCheck(planned, recorded, unit, way)
        self._backend.intercept = True
        self._hold_at_sync = True

    def _check_answer(
        self, code: int, view: bytes | bytearray, pos: int, end: int, whole: bool
    ) -> int:
        """A frame while the in-band check is answered (its Parse, Bind and Execute, ahead of
        everything else still expected: _quiet_upstream)."""
        check = self._check
        assert check is not None
        if code in _UNASKED:
            return NOT_OWN
        if not whole:
            return STOP
        if check.failed:
            if code != READY_FOR_QUERY:
                raise ProtocolViolation(f"server sent {chr(code)!r} while skipping to Sync")
            # The client's messages behind the check were skipped: decided afresh and sent
            # again once this ReadyForQuery (the client's Sync's) is dropped.
            self._check_over()
            asyncio.get_running_loop().call_soon(
                self._callback, functools.partial(self._check_failed, check)
            )
            return DROP
        if code in _CHECK_ANSWERS:
            if code == PARSE_COMPLETE:
                self._check_parsed = check.way
            return DROP
        if code == COMMAND_COMPLETE:
            # The generation holds: the statement behind runs on its plan.
            self._checked(passed=True)
            self._check_over()
            self._end_check_hold()
            return DROP
        if code != ERROR_RESPONSE:
            raise ProtocolViolation(f"server sent {chr(code)!r} for the catalog check")
        err = ErrorResponse.decode(bytes(view[pos + 5 : end]))
        if err.severity in ("FATAL", "PANIC") or err.sqlstate == QUERY_CANCELED:
            # The session ends, or the client's cancel stopped its unit at the check: the
            # error is the client's, as its statement's (its Bind's answer).
            self._check_over()
            self._end_check_hold()
            return NOT_OWN
        check.failed = True
        self._checked(passed=False)
        if err.sqlstate == INVALID_STATEMENT_NAME:
            self._check_parsed = ""  # deallocated by something unseen: parsed again
        elif err.sqlstate != CHECK_FAILED:
            # Not the assertion: the check itself cannot run here (the session's role may
            # not read the DDL watch's table): back to the probe for the session.
            self._check_parsed = ""
            self._check_off = True
            log.info(
                "session %s: in-band catalog check failed (%s %s); the probe from now on",
                self.id,
                err.sqlstate,
                server_text(err.message or "", self.encoding),
            )
        return DROP

    def _check_over(self) -> None:
        """The check has had its last answer: the frames that follow are not its."""
        self._check = None
        self._intercept_own()

    def _intercept_own(self) -> None:
        """Server frames go to _own_answer first while a request of pgwarden's own is
        answered: the in-band check, the search_path read, an EXPLAIN."""
        self._backend.intercept = (
            self._check is not None or self._path_read is not None or self._explain_read is not None
        )

    def _forwarded(self, facts: Sequence[StatementFacts]) -> None:
        """Statements just forwarded: the search_path watch hears of them, and the in-band
        check's statement is closed and parsed again after any that may have deallocated it
        or put a statement of the client's under its name (the client's DEALLOCATE and
        PREPARE, or code pgwarden cannot see into: a trigger a write fires, an event
        trigger, a function): a statement of the client's is never bound in its place."""
        self._path.forwarded(facts)
        if self._check_parsed and any(_may_drop_statements(f) for f in facts):
            self._check_parsed = ""

    def _checked(self, *, passed: bool) -> None:
        if self.target is not None:
            self.gw.metrics.in_band_checked(self.target.name, passed=passed)

    def _end_check_hold(self) -> None:
        """What the client sent after the checked unit's Sync goes on (nothing, mostly: a
        client waits for the answer; then reading was not paused for it either)."""
        if self._budget_hold is not None:
            self._budget_hold = None
            if self._frontend.buffer:
                asyncio.get_running_loop().call_soon(self._callback, self._resume_after_hold)

    def _check_failed(self, check: _InBandCheck) -> None:
        """The check found the plan stale (or could not run): the server skipped the client's
        unit behind it. The unit's request record is closed as not run under its plan, its
        expectations go, and the unit is read again from the client's bytes (its Execute
        decided afresh, with a probe), ahead of what the client sent after it."""
        if self.phase is not Phase.RELAY or self._closing:
            return
        assert self.gate is not None
        for e in self.tracker.clear():
            for run in e.runs:
                run.done = True  # its timers, if any, find it over
        self.tracker.ready()
        self._quiet_upstream = True
        self.gate.superseded(check.planned.facts, check.recorded)
        self._frontend.buffer[0:0] = check.unit
        self._check_skip = True
        self._budget_hold = None
        if self._frontend.state is not GATED:
            self._drain_client()
            self._read_on()

    def _token_problem(self) -> str | None:
        assert self.principal is not None
        return self.gw.verifier.still_valid(self.principal)

    async def _gate_message(self, code: int, message: bytes) -> None:
        assert self.up is not None and self.gate is not None
        problem = self._token_problem()
        if problem is not None:
            self._end_session_for_token(problem)
            return
        if self._rules_problem is not None and not await self._rules_known():
            return
        body = message[5:]
        try:
            if code == QUERY:
                await self._on_query(Query.decode(body), message)
            elif code == PARSE:
                await self._on_parse(Parse.decode(body), message)
            elif code == BIND:
                self._on_bind(Bind.decode(body))
                self.tracker.expect(Expectation("bind"))
                self._to_server(message)
            elif code == EXECUTE:
                await self._on_execute(Execute.decode(body), message)
            elif code == FUNCTION_CALL:
                await self._on_function_call(FunctionCall.decode(body), message)
            else:
                self._protocol_violation(f"unexpected message type {chr(code)!r}")
        except ProtocolViolation as exc:
            self._protocol_violation(str(exc))

    def _decode_sql(self, raw: bytes) -> str | None:
        try:
            return raw.decode(self.encoding)
        except UnicodeDecodeError:
            return None

    def _refuse(
        self,
        kind: str,
        refusal: bytes,
        runs: list[StatementRun],
        *,
        name: str = _STAND_IN,
        server_rejects: bool = False,
    ) -> None:
        """Forward, in place of the refused message, one the server is certain to reject, so the
        server itself fails the transaction and skips to Sync; the error is then rewritten,
        unless the server rejects it as it would the statement (`server_rejects`: 25P02 in
        an aborted transaction), when its own error is what the client sees, as direct.

        A Parse stand-in takes the refused Parse's own name (an unnamed one drops the unnamed
        statement, as the refused Parse would), else one of pgwarden's, never stored."""
        assert self.up is not None
        if self._frontend.discarding:
            # The server skips to Sync already: nothing forwarded now would answer.
            self._pay_owed_error()
            return
        text = _REJECTED_IF_ABORTED if server_rejects else _BOGUS
        own_error = "25P02" if server_rejects else None
        if kind == "query":
            self._to_server(Query(text).encode())
            self.tracker.expect(Expectation("query", runs, refusal=refusal, own_error=own_error))
        else:
            self._to_server(Parse(name, text).encode())
            self.tracker.expect(Expectation("parse", runs, refusal=refusal, own_error=own_error))
            self._frontend.discarding = True

    def _skipped(self, verdict: Verdict, *, answered_ready: bool = False) -> bool:
        """The server skips to Sync (an error came while this was decided, or pgwarden's own
        read failed): the message is not forwarded, and its statements are recorded as not
        run. `answered_ready`: a Query or FunctionCall, which the client expects a
        ReadyForQuery for."""
        if not self._frontend.discarding:
            return False
        assert self.gate is not None
        for run in verdict.runs:
            if not run.done:
                run.done = True
                run.error_message = run.error_message or "not executed: an earlier statement failed"
                self.gate.outcome(run, forwarded=False)
        if self._pay_owed_error() and answered_ready:
            # The client saw no error before this message and awaits its ReadyForQuery: a
            # Sync of pgwarden's ends the skip its own read started (the pipeline's work is
            # rolled back, as after an error of the statement) and gives it.
            self._to_server(Sync().encode())
            self.tracker.expect(Expectation("sync"))
            self._frontend.discarding = False
        return True

    def _pay_owed_error(self) -> bool:
        """After pgwarden's own read failed inside a pipeline, the client's next message gets
        its error (everything before it has been answered: the read waited for that)."""
        owed, self._owed_error = self._owed_error, None
        if owed is None:
            return False
        self._send(owed)
        return True

    async def _on_query(self, msg: Query, message: bytes) -> None:
        assert self.gate is not None and self.up is not None
        if self._frontend.discarding:
            return  # the server would skip it, answering nothing: neither run nor expected
        text = self._decode_sql(msg.query)
        if text is None:
            self._refuse(
                "query", refusal_for(f"query text is not valid {self.encoding}", "22021"), []
            )
            return
        verdict = await self.gate.check_query(text)
        if self._query_decided(verdict, message):
            # Texts of its shape may run on this plan from now on (gate.keep_query_plan).
            self.gate.keep_query_plan(text, verdict)

    def _query_decided(self, verdict: Verdict, message: bytes) -> bool:
        """Enforce a Query's verdict: forward it, or a stand-in the server rejects; True
        when it was forwarded."""
        if self.phase is not Phase.RELAY or self._skipped(verdict, answered_ready=True):
            return False
        if self._refused_verdict(verdict, "query"):
            return False
        self._to_server(message)
        expectation = Expectation("query", verdict.runs)
        self.tracker.expect(expectation)
        self._forwarded(verdict.facts)
        self._arm_timeouts(verdict.runs)
        # In a transaction block what follows must not commit behind a cut statement (a
        # COMMIT pipelined after it); a Query's own implicit transaction ends with it.
        if self.gate is not None and self.gate.in_transaction:
            self._hold_behind_budget(verdict.runs, expectation, flush=False)
        return True

    def _guard_settings(self, verdict: Verdict) -> bytes | None:
        for f in verdict.facts:
            if f.setting is not None and f.setting[0].lower() == "standard_conforming_strings":
                value = (f.setting[1] or "").strip("'\"").lower()
                if value not in ("on", "true", "1", "yes"):
                    return refusal_for(_CONFORMING_STRINGS)
        return None

    def _refused_verdict(self, verdict: Verdict, kind: str, name: str = "") -> bool:
        """Enforce a refusal (policy's or the settings guard's): record each statement's
        outcome as not forwarded and send the server one it must reject in its place."""
        assert self.gate is not None
        refusal = self._guard_settings(verdict) or verdict.refusal
        if verdict.allowed and refusal is None:
            return False
        assert refusal is not None
        for run in verdict.runs:
            run.done = True
            run.sqlstate = run.sqlstate or REFUSED
            self.gate.outcome(run, forwarded=False)
        self._refuse(kind, refusal, [], name=name, server_rejects=verdict.server_rejects)
        return True

    async def _on_parse(self, msg: Parse, message: bytes) -> None:
        assert self.gate is not None and self.up is not None
        if self._frontend.discarding:
            self._to_server(message)
            self.tracker.expect(Expectation("parse"))
            return
        text = self._decode_sql(msg.query)
        if text is None:
            self._refuse(
                "parse",
                refusal_for(f"query text is not valid {self.encoding}", "22021"),
                [],
                name=msg.name,
            )
            return
        verdict = await self.gate.check_parse(text, msg.param_types)
        if self.phase is not Phase.RELAY or self._skipped(verdict):
            return
        if self._refused_verdict(verdict, "parse", msg.name):
            self._statements.pop(msg.name, None)
            return
        # Installed now, since Bind/Execute of this name may follow in the same pipeline; if
        # the server rejects the Parse (a name it still holds), what it holds is restored.
        previous = self._statements.get(msg.name)
        self._statements[msg.name] = PreparedStatement(
            verdict.facts,
            verdict.decisions,
            msg.param_types,
            self.gate.search_path,
            catalog_generation=self.gate.catalog_generation,
            declared_types=msg.param_types,
        )
        if len(verdict.facts) == 1:
            self.gate.prepared.register(msg.name, verdict.facts[0])
        self._to_server(message)
        self.tracker.expect(Expectation("parse", restore=(msg.name, previous)))

    def _on_bind(self, msg: Bind) -> None:
        prepared = self._statements.get(msg.statement)
        types = prepared.param_types if prepared is not None else ()
        params = _params_text(msg.params, msg.param_formats, types, self.encoding)
        known = None
        if prepared is None and self.gate is not None:
            known = self.gate.prepared.lookup(msg.statement)
        if self.gate is not None and msg.portal:
            self.gate.portal_bound(msg.portal)
        path = None if self._path.uncertain or self.gate is None else self.gate.search_path
        self._portals[msg.portal] = Portal(
            msg.statement,
            params,
            msg.result_formats,
            prepared,
            known,
            self._path.epoch,
            search_path=path,
            undeclared_binary=_undeclared_binary(msg.params, msg.param_formats, types),
        )

    async def _on_execute(self, msg: Execute, message: bytes) -> None:
        assert self.gate is not None and self.up is not None
        if self._frontend.discarding:
            self._to_server(message)
            self.tracker.expect(Expectation("execute"))
            return
        portal = self._portals.get(msg.portal)
        if portal is None:
            # The server reports the unknown portal itself; nothing runs.
            self._to_server(message)
            self.tracker.expect(Expectation("execute"))
            return
        prepared = portal.prepared
        # The server planned the portal at its Bind: under the path its Parse was decided
        # under, the decision describes what runs, wherever the path has gone since.
        planned_as_decided = (
            prepared is not None
            and portal.search_path is not None
            and portal.search_path == prepared.search_path
        )
        if (
            not planned_as_decided
            and portal.path_epoch != self._path.epoch
            and not (prepared is not None and all(f.category == "tcl" for f in prepared.facts))
        ):
            # The server planned the portal at its Bind, under a search_path that may have
            # moved since: what pgwarden would resolve now may not be what runs.
            self._refuse(
                "parse",
                refusal_for(
                    "search_path may have changed since this portal was bound; bind it again"
                ),
                [],
            )
            return
        if prepared is None:
            # Prepared by SQL PREPARE (one namespace with Parse): decide it now.
            known = portal.known
            if known is None:
                # What would run is unknown to pgwarden: fail closed.
                self._refuse("parse", refusal_for("unknown prepared statement"), [])
                return
            verdict = await self.gate.check_facts((known,), portal.params)
            if portal.undeclared_binary and any(
                d.extra.get("decide_with_params") is True for d in verdict.decisions
            ):
                self._refuse("parse", refusal_for(_UNDECLARED_BINARY), [])
                return
        elif not prepared.facts:
            self._to_server(message)
            self.tracker.expect(Expectation("execute"))
            return
        elif any(d.decide_with_params for d in prepared.decisions):
            # The policy asked, at Parse, to see the Bind parameters: decide this execution.
            if portal.undeclared_binary:
                # Shown its bytes, a policy could not tell 13 from anything: fail closed.
                self._refuse("parse", refusal_for(_UNDECLARED_BINARY), [])
                return
            verdict = await self.gate.check_facts(
                prepared.facts, portal.params, prepared.declared_types
            )
        elif (
            not planned_as_decided
            and (self._path.uncertain or prepared.search_path != self.gate.search_path)
            and await self._moved_since_parse(prepared)
        ) or await self.gate.catalog_moved(prepared.catalog_generation, prepared.facts):
            # PostgreSQL plans it again under the session's search_path now, or over the
            # catalog as DDL left it: so is it judged.
            verdict = await self.gate.recheck_text(
                prepared.facts[0].text, portal.params, prepared.declared_types
            )
            if verdict.allowed and len(verdict.facts) == 1:
                prepared.facts, prepared.decisions = verdict.facts, verdict.decisions
                prepared.search_path = self.gate.search_path
                prepared.catalog_generation = self.gate.catalog_generation
                self.gate.prepared.register(portal.statement, verdict.facts[0])
        elif not self.gate.still_current(prepared.decisions):
            # The policy changed since the Parse: its allow no longer stands on its own.
            verdict = await self.gate.recheck_prepared(
                prepared.facts, portal.params, prepared.declared_types
            )
            if verdict.allowed:
                prepared.decisions = verdict.decisions
        else:
            verdict = await self.gate.check_execute(
                prepared.facts, prepared.decisions, portal.params
            )
        if prepared is not None:
            # Kept only from a verdict on what the statement holds now (each branch above
            # replaced its facts and decisions with what it decided, or refused), never
            # from one made on this execution's parameters.
            reusable = verdict.allowed and not any(d.decide_with_params for d in prepared.decisions)
            prepared.masks = self.gate.keep_masks(verdict.runs) if reusable else None
        self._execute_decided(verdict, message, portal)

    def _execute_decided(self, verdict: Verdict, message: bytes, portal: Portal) -> None:
        """Enforce an Execute's verdict: forward it, or a stand-in the server rejects."""
        if self.phase is not Phase.RELAY or self._skipped(verdict):
            return
        if not verdict.allowed:
            assert verdict.refusal is not None
            # In place of the Execute, a Parse of pgwarden's own name that the server rejects.
            self._refuse("parse", verdict.refusal, [], server_rejects=verdict.server_rejects)
            return
        for run in verdict.runs:
            if run.masked or run.record_rows:
                # The plan (and the recorded rows' column names) are taken when the rows
                # come: the Describe sent in the same pipeline has been answered by then.
                run.source = portal
                run.result_formats = portal.result_formats
        self._to_server(message)
        expectation = Expectation("execute", verdict.runs)
        self.tracker.expect(expectation)
        self._forwarded(verdict.facts)
        self._arm_timeouts(verdict.runs)
        if (
            self._frontend.next_code() != SYNC
            or self.tracker.executes_unsynced() > 1
            # A write's own effects are undone with its transaction: the Sync waits too.
            or any(r.facts is not None and r.facts.writes for r in verdict.runs)
        ):
            self._hold_behind_budget(verdict.runs, expectation, flush=True)
        elif self.gate is not None and self.gate.in_transaction:
            # Alone before the client's Sync, which goes with it: what follows the Sync waits
            # for its ReadyForQuery, where a block the cut statement completed in is failed.
            self._hold_at_sync = any(r.budget is not None for r in verdict.runs)
        # Else a read alone in an implicit transaction the Sync ends: an error skips nothing.

    async def _on_function_call(self, msg: FunctionCall, message: bytes) -> None:
        assert self.gate is not None
        if self._frontend.discarding:
            return  # the server would skip it, answering nothing: neither run nor expected
        args = _params_text(msg.args, msg.arg_formats, (), self.encoding)
        verdict = await self.gate.check_function_call(msg.function_oid, args)
        if self.phase is not Phase.RELAY or self._skipped(verdict, answered_ready=True):
            return
        if not verdict.allowed:
            assert verdict.refusal is not None
            for run in verdict.runs:
                run.done = True
                run.sqlstate = REFUSED
                self.gate.outcome(run, forwarded=False)
            # FunctionCall is its own sync point: answer it with a Query the server rejects.
            self._to_server(Query(b"pgwarden_refused").encode())
            self.tracker.expect(Expectation("query", [], refusal=verdict.refusal))
            return
        self._to_server(message)
        self.tracker.expect(Expectation("function", verdict.runs))
        self._path.forwarded_opaque()
        self._check_parsed = ""  # code pgwarden cannot see into: see _forwarded

    # -- relay: server to client ---------------------------------------------------------

    def _server_data(self, data: bytes) -> None:
        self._traffic.to_client += len(data)
        try:
            self._relay_server_data(data)
        except ProtocolViolation as exc:
            log.warning("session %s: malformed message from the target: %s", self.id, exc)
            self._end_reason = "protocol violation by the target"
            self._fatal("08P01", "pgwarden: malformed message from the target; session closed")
        except Exception as exc:  # the callback boundary: never a silent drop
            self._internal_error(exc)

    def _relay_server_data(self, data: bytes) -> None:
        backend = self._backend
        if backend.skip:
            n = backend.skipped(data)
            self._send(data[:n])
            data = data[n:]
            if not data:
                return
        out = backend.receive(data)
        if out is not None:
            self._send(out)
        if self._path_wanted:
            self._read_path_if_quiet()
        if self._draining:
            self._end_if_drained()

    def _own_answer(
        self, code: int, view: bytes | bytearray, pos: int, end: int, whole: bool
    ) -> int:
        """A frame while pgwarden's own request is answered: its answers are not the
        client's (backend core verdicts; NOT_OWN: the client's, read as usual)."""
        if self._check is not None:
            return self._check_answer(code, view, pos, end, whole)
        explain = self._explain_read
        if explain is not None and code not in CLIENTS_WHILE_EXPLAINING:
            if not whole:
                return STOP
            if explain.answer(code, view[pos:end]):
                self._explain_read = None
                self._intercept_own()
            return DROP
        if self._path_read is not None and code in READ_ANSWERS:
            # The answer to pgwarden's own read of search_path: not the client's to see.
            if not whole:
                return STOP
            return PASS if self._path_answer(code, view, pos, end) else DROP
        return NOT_OWN

    def _judge_row(
        self, code: int, view: bytes | bytearray, pos: int, end: int, whole: bool
    ) -> int:
        """A DataRow or COPY data frame: counted for the current statement, masked,
        recorded, or withheld over its budget (backend core verdicts)."""
        front = self.tracker.front()
        if self._withheld_query is not None:
            # Behind a cut statement of the same Query (_withheld_answer): counted, not shown.
            if not whole:
                return STOP
            run = front.current_run() if front is not None else None
            if run is not None and code == DATA_ROW:
                run.rows += 1
            return DROP
        if code != DATA_ROW:
            # COPY TO STDOUT data counts against a budget as rows do.
            if self.gate is None or not self.gate.budgeted:
                return PASS
            run = front.current_run() if front is not None else None
            budget = run.budget if run is not None else None
            if budget is None:
                return PASS
            if not whole:
                return STOP
            if budget.cut if code == COPY_DONE else not budget.admit(end - pos):
                self._over_budget(budget)
                return DROP
            return PASS
        if front is None:
            return PASS
        run = front.current_run()
        if run is None:
            return PASS
        verdict = PASS
        budget = run.budget
        if budget is not None:
            if not whole:
                return STOP  # a budgeted row is judged whole
            if not budget.admit(end - pos):
                # Over the decision's budget: never relayed.
                self._over_budget(budget)
                return DROP
        if run.masked or run.record_rows:
            if not whole:
                return STOP  # a masked or recorded row is handled whole
            if run.masked and not run.described and self._plan_masks(run):
                return STOP  # rows wait here until the masks are resolved again
            masked = self._mask_row(run, view, pos, end) if run.masked else None
            if masked is not None:
                self._backend.replacement = masked
                verdict = REPLACE
            if run.record_rows:
                self._record_row(run, masked or bytes(view[pos:end]))
        run.rows += 1
        run.bytes_out += end - pos
        return verdict

    def _server_message(
        self, code: int, view: bytes | bytearray, pos: int, end: int
    ) -> bytes | None:
        """Track one server message; a non-None result replaces it on the way to the client."""
        tracker = self.tracker
        front = tracker.front()
        gate = self.gate
        assert gate is not None
        if code in (COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE):
            if front is None:
                return None
            run = front.current_run()
            cut: bytes | None = None
            if run is not None:
                if run.budget is not None and run.budget.cut:
                    # The statement completed before the cancel reached it: it still ends
                    # with the budget's error, as if cancelled there.
                    cut = self._cut_short(run, completed=True)
                    # (A Query's transaction block is failed at its ReadyForQuery instead.)
                    if front is self._budget_hold and front.kind == "execute":
                        self._budget_fails = True
                    if front.kind == "query" and front.cursor + 1 < len(front.runs):
                        self._withheld_query = front
                elif code == COMMAND_COMPLETE:
                    complete = CommandComplete.decode(bytes(view[pos + 5 : end]))
                    run.command_tag = complete.tag
                    rows = complete.row_count
                    if rows is not None:
                        run.rows = rows
                else:
                    run.command_tag = ""
                run.done = True
                gate.outcome(run)
                front.cursor += 1
                self._after_statement(run)
            if front.kind in ("execute", "function"):
                tracker.pop()
            return cut
        if code == READY_FOR_QUERY:
            status = view[pos + 5]
            gate.in_transaction = status != STATUS_IDLE
            self._aborted = status == STATUS_FAILED
            skipped: list[Expectation] = []
            while True:
                e = tracker.pop()
                if e is None:
                    break
                self._finish_skipped(e)
                if e.kind in ("sync", "query", "function"):
                    break
                skipped.append(e)
            # Still queued before the Sync: forwarded after an error, skipped by the server
            # (a Parse decided while the error was on its way, say): its name holds what it held.
            for e in reversed(skipped):
                if e.kind == "parse":
                    self._undo_parse(e)
            tracker.ready()
            self._quiet_upstream = not tracker
            self._bind_error = None
            if self._fail_block:
                self._fail_block = False
                if status == STATUS_IN_TRANSACTION:
                    # The client saw an error in a transaction block: the server's block is
                    # failed to match (25P02 until ROLLBACK), by a statement it rejects, in
                    # place of this ReadyForQuery; the client gets that one's ("E").
                    self._write_upstream(Query(_REJECTED_IF_ABORTED).encode())
                    tracker.expect(Expectation("query", [], refusal=b""))
                    return b""
            self._path.ready(chr(status))
            return None
        if code == ERROR_RESPONSE:
            err = ErrorResponse.decode(bytes(view[pos + 5 : end]))
            if err.severity in ("FATAL", "PANIC"):
                self._server_fatal = True  # the client learns why from the server itself
            if front is None:
                # The error of a message nothing was expected from (a malformed Flush, say):
                # the server skips to the client's Sync, not forwarded yet.
                self._frontend.discarding = True
                return None
            replacement = front.refusal
            if front.own_error is not None and err.sqlstate == front.own_error:
                replacement = None
            if replacement and self.encoding != "utf-8":
                replacement = self._refusal_for_client(replacement)
            run = front.current_run()
            if run is not None:
                run.sqlstate = err.sqlstate
                run.error_message = server_text(err.message or "", self.encoding)
                if run.budget is not None and run.budget.cut:
                    # Cancelled for its budget (or ended otherwise meanwhile): the client
                    # gets the budget's error in place of the server's.
                    replacement = self._cut_short(run, completed=False)
                run.done = True
                gate.outcome(run)
                front.cursor += 1
                if (
                    run.masked
                    and replacement is None
                    and err.sqlstate != "57014"
                    and not _syntax_error_in_client_text(run, err)
                ):
                    # The server's words may quote a masked value ('invalid input syntax
                    # for type integer: "ada@example.com"'): keep the code, not the text.
                    replacement = ErrorResponse.build(
                        err.severity or "ERROR",
                        err.sqlstate or "XX000",
                        "pgwarden: error text withheld: the statement involves masked columns",
                    ).encode()
            elif front.kind == "parse":
                self._undo_parse(front)
            elif front.kind == "bind":
                # Rejected at Bind (a parameter that does not convert, an error while
                # planning): the error is the outcome of the statement Execute would run.
                self._bind_error = err
            if front.kind in ("query", "function"):
                # The rest of this Query's statements will not run.
                self._finish_skipped(front)
            elif front.kind == "sync":
                # The error of a message nothing was expected from (a malformed Flush, say):
                # the server skips to this Sync, which still answers. Nothing to pop.
                pass
            else:
                tracker.pop()
                self._finish_skipped(front)
                skipped = tracker.skip_to_sync()
                for e in skipped:
                    self._finish_skipped(e)
                if not tracker:
                    # No Sync forwarded yet: the server ignores what comes until the client's,
                    # a Query or FunctionCall included (no answer to wait for).
                    self._frontend.discarding = True
                # The server never ran the Parses it skipped: what their names held stands.
                for e in reversed(skipped):
                    if e.kind == "parse":
                        self._undo_parse(e)
            return replacement
        if code == PORTAL_SUSPENDED:
            if front is not None:
                run = front.current_run()
                cut = None
                if run is not None:
                    run.command_tag = "SUSPENDED"
                    if run.budget is not None and run.budget.cut:
                        cut = self._cut_short(run, completed=True)
                        if front is self._budget_hold:
                            self._budget_fails = True
                    run.done = True
                    gate.outcome(run)
                if front.kind == "execute":
                    tracker.pop()
                return cut
            return None
        if code in (PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA):
            if front is not None and front.kind not in ("query", "execute"):
                tracker.pop()
                if code == CLOSE_COMPLETE and front.closing is not None:
                    kind, name = front.closing
                    held = self._statements if kind == "S" else self._portals
                    # Pipelined, the name may have been parsed or bound again since the Close.
                    if held.get(name) is front.described:
                        held.pop(name, None)
                        if kind == "S":
                            gate.prepared.closed(name)
            return None
        if code == COPY_OUT_RESPONSE:
            run = front.current_run() if front is not None else None
            if run is not None and run.masked:
                # Masks apply to rows; a COPY with masks is refused before it runs, so this
                # is text pgwarden could not analyse (forwarded for admins) that was a COPY.
                self._end_reason = "COPY out of a statement with masked columns"
                self._fatal(REFUSED, "pgwarden: COPY data of a statement with masks is not relayed")
            return None
        if code in (COPY_IN_RESPONSE, COPY_BOTH_RESPONSE):
            if not tracker.copy_in_started():
                self._frontend.copy_in = True
            return None
        if code == PARAMETER_DESCRIPTION:
            if front is not None:
                front.saw_parameters = True
                if isinstance(front.described, PreparedStatement):
                    # The types the server settled on, where the Parse may have left them
                    # open (asyncpg's does): a value bound in binary then reads as what it
                    # is, for the audit and for a policy deciding on parameters.
                    with contextlib.suppress(ProtocolViolation):
                        described = ParameterDescription.decode(bytes(view[pos + 5 : end]))
                        front.described.param_types = described.type_oids
            return None
        if code == ROW_DESCRIPTION:
            if front is None:
                return None
            if front.kind in ("describe_statement", "describe_portal"):
                tracker.pop()
                # Kept with what was described: pipelined, the name may have been parsed or
                # bound again since, and the description is not the new one's.
                if isinstance(front.described, (PreparedStatement, Portal)):
                    front.described.row_description = bytes(view[pos + 5 : end])
            elif front.kind == "query":
                run = front.current_run()
                if run is not None and (run.masked or run.record_rows):
                    # Planned at the first row, which may have to wait for the catalog;
                    # recorded rows take their column names from it.
                    run.description = bytes(view[pos + 5 : end])
                    run.described = False
            return None
        if code == FUNCTION_CALL_RESPONSE:  # the call's outcome; ReadyForQuery follows
            if front is not None and front.kind == "function":
                run = front.current_run()
                if run is not None:
                    run.command_tag = "FUNCTION CALL"
                    run.done = True
                    gate.outcome(run)
                    front.cursor += 1
            return None
        if code == PARAMETER_STATUS:
            ps = ParameterStatus.decode(bytes(view[pos + 5 : end]))
            if ps.name == "client_encoding":
                self.encoding = python_codec(ps.value)
            elif ps.name == "standard_conforming_strings" and ps.value != "on":
                # SET is refused at the gate; set_config(), RESET ALL back to a default of
                # off, a function: never parse another statement under other rules.
                self._end_reason = "standard_conforming_strings turned off"
                self._fatal(REFUSED, f"pgwarden: {_CONFORMING_STRINGS}")
            return None
        return None

    async def _notify_client(self, notice: bytes) -> None:
        """A NoticeResponse of pgwarden's (built in UTF-8), sent between two server
        messages: a large frame the relay passes through in pieces is finished first."""
        # Polled rather than signalled: the relay's hot path stays free of it, and only a
        # held statement's notice ever waits here.
        while self._backend.skip and self.phase is Phase.RELAY:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        note = NoticeResponse.decode(notice[5:])
        fields = {k: for_client(v, self.encoding) for k, v in note.fields.items()}
        self._send(NoticeResponse(fields).encode())

    # -- budgets (gateway/guards/budgets.py) ------------------------------------------------

    def _hold_behind_budget(
        self, runs: list[StatementRun], expectation: Expectation, *, flush: bool
    ) -> None:
        """A statement under a budget was forwarded: what the client sends after it waits
        until it ends. A budget that runs out cancels it, but the server may finish it before
        the cancel lands and would go on to the messages behind it, which the error the
        client gets in its place says did not run (a pipelined statement, a COMMIT). Once it
        has ended, they go; where it was cut, behind a message the server rejects, so that
        the transaction fails and they are skipped as after the server's own error.
        `flush`: an Execute, whose answers the server sends before a Sync only on a Flush."""
        if self._budget_hold is not None or not any(r.budget is not None for r in runs):
            return
        if flush:
            self._to_server(FLUSH_MESSAGE)
        self._hold_behind(expectation, self._frontend.flush())

    def _hold_behind(self, expectation: Expectation, data: bytes | None) -> None:
        """Write `data` (up to the budgeted message) now; the client's messages after it are
        acted on (decided, forwarded) once the server has answered `expectation`."""
        if data is not None:
            self._write_upstream(data)
        self._budget_hold = expectation

    def _server_answer(
        self, code: int, view: bytes | bytearray, pos: int, end: int
    ) -> bytes | None:
        """_server_message, then the end of a budgeted statement's hold once it is answered."""
        withheld = self._withheld_query
        replacement = self._server_message(code, view, pos, end)
        if withheld is not None:
            replacement = self._withheld_answer(code, replacement)
        hold = self._budget_hold
        if hold is not None and (
            # COPY FROM STDIN: the server waits for the client's data, behind the hold.
            code in (COPY_IN_RESPONSE, COPY_BOTH_RESPONSE) or not self.tracker.holds(hold)
        ):
            self._budget_hold = None
            if self._budget_fails:
                self._budget_fails = False
                # Before the client's next messages: the server fails the transaction on it
                # and skips them to the client's Sync, as after an error of the statement.
                self._write_upstream(Parse(_STAND_IN, _BOGUS).encode())
                self.tracker.expect(Expectation("parse", [], refusal=b""))
            # Not from inside the server's data: the client's next messages may be answered
            # by pgwarden itself, after what the server said so far.
            asyncio.get_running_loop().call_soon(self._callback, self._resume_after_hold)
        return replacement

    def _withheld_answer(self, code: int, replacement: bytes | None) -> bytes | None:
        """A server message behind a cut statement of the same Query: tracked as usual (the
        statements ran, their outcomes are recorded), not shown to the client, which has
        the budget's error and expects its ReadyForQuery next."""
        if code == READY_FOR_QUERY:
            self._withheld_query = None
            return replacement
        if code in (COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, ROW_DESCRIPTION, COPY_OUT_RESPONSE):
            return b""
        if code == ERROR_RESPONSE:
            return replacement if self._server_fatal else b""
        if code == COPY_IN_RESPONSE:
            # The client would have to send the data of a statement it was told did not run.
            self._frontend.copy_in = False
            self._write_upstream(
                CopyFail("pgwarden: skipped behind a statement over its budget").encode()
            )
            return b""
        return replacement  # a notice, a setting the server now has: true either way

    def _resume_after_hold(self) -> None:
        if (
            self.phase is Phase.RELAY
            and self._budget_hold is None
            and self._frontend.state is not GATED
        ):
            self._drain_client()
            self._read_on()

    def _over_budget(self, budget: RowBudget) -> None:
        """A budget ran out: cancel the statement upstream, once; its rows are withheld."""
        if not budget.cancelled:
            budget.cancelled = True
            self.cancel_running()

    def _cut_short(self, run: StatementRun, *, completed: bool) -> bytes:
        """The end of a statement whose budget ran out: the budget's error for the client,
        and in its outcome. `completed`: the server finished it without error, so a
        transaction block it ran in is failed at its ReadyForQuery, as the error would."""
        assert run.budget is not None
        error = ErrorResponse.decode(run.budget.error[5:])
        run.sqlstate, run.error_message, run.command_tag = error.sqlstate, error.message, None
        if completed and self.gate is not None and self.gate.in_transaction:
            self._fail_block = True
        return self._refusal_for_client(run.budget.error)

    async def _explain(self, text: str, param_types: tuple[int, ...] | None) -> str | NotExplained:
        """EXPLAIN's JSON for `text` (its generic plan where `param_types` are a Parse's),
        asked on the session's upstream connection where the client cannot notice: nothing
        of the client's in flight; inside its transaction block within a savepoint
        (gateway/guards/estimate.py). Otherwise, or if it fails, why not."""
        if self.gate is None:
            return NotExplained.BUSY
        if (
            # A client pipeline not yet synced that bound or ran something: the request's
            # Syncs would end its implicit transaction (and its portals) under it. One that
            # only parsed and described (asyncpg, before it looks up a type) loses nothing.
            self.tracker
            or self.tracker.ran_unsynced
            or self._frontend.out
            or self._path_read is not None
            or self._path_wanted
            or self._explain_read is not None
            or self._frontend.discarding
            or self._frontend.copy_in
            or self._fail_block
        ):
            return NotExplained.BUSY
        if self._aborted:
            return NotExplained.FAILED_TRANSACTION
        try:
            request, readies = estimate_request(
                text, param_types, in_block=self.gate.in_transaction, encoding=self.encoding
            )
        except UnicodeEncodeError:
            return NotExplained.FAILED
        read = self._explain_read = ExplainRead(self.encoding, readies)
        self._backend.intercept = True  # until its last answer (_own_answer)
        self._write_upstream(request)
        return await read.done

    def _arm_timeouts(self, runs: list[StatementRun]) -> None:
        """The decision's statement_timeout_ms: from when pgwarden forwards the statement."""
        loop = asyncio.get_running_loop()
        for run in runs:
            if run.timeout_ms is not None and run.budget is not None:
                timed_out = functools.partial(self._timed_out, run, run.timeout_ms)
                loop.call_later(run.timeout_ms / 1000, self._callback, timed_out)

    def _timed_out(self, run: StatementRun, ms: int) -> None:
        if run.done or run.budget is None or self.phase is not Phase.RELAY:
            return
        run.budget.time_out(ms)
        self._over_budget(run.budget)

    def _refusal_for_client(self, refusal: bytes) -> bytes:
        """pgwarden's refusal (built in UTF-8) in the client's encoding."""
        err = ErrorResponse.decode(refusal[5:])
        fields = {k: for_client(v, self.encoding) for k, v in err.fields.items()}
        return ErrorResponse(fields).encode()

    def _undo_parse(self, e: Expectation) -> None:
        """A Parse the server rejected or skipped: its name holds what it held before."""
        if e.restore is None:
            return
        name, previous = e.restore
        if previous is None:
            self._statements.pop(name, None)
        else:
            self._statements[name] = previous

    def _finish_skipped(self, e: Expectation) -> None:
        assert self.gate is not None
        while e.cursor < len(e.runs):
            run = e.runs[e.cursor]
            e.cursor += 1
            if not run.done:
                run.done = True
                failed_bind = self._bind_error if e.kind == "execute" else None
                if failed_bind is not None:
                    self._bind_error = None
                    run.sqlstate = failed_bind.sqlstate
                    run.error_message = server_text(failed_bind.message or "", self.encoding)
                run.error_message = run.error_message or "not executed: an earlier statement failed"
                self.gate.outcome(run, forwarded=True)

    # -- masks -----------------------------------------------------------------------------

    def _plan(
        self,
        run: StatementRun,
        fields: tuple[FieldDescription, ...],
        result_formats: tuple[int, ...] | None,
    ) -> MaskPlan | None:
        if run.mask_all:
            return MaskPlan.all_null(len(fields))
        return MaskPlan.build(
            fields,
            run.mask_targets,
            masks_present=run.mask_expressions,
            lineage=run.lineage,
            result_formats=result_formats,
            key=self.gw.mask_key,
            encoding=self.encoding,
        )

    def _plan_masks(self, run: StatementRun) -> bool:
        """Plan a masked run's rows from its RowDescription (its Query's, or its portal's
        Describe); True while they must wait: the server reported columns the catalog has
        not seen in the generation the masks were resolved under (DDL meanwhile), and the
        relay from the server pauses until they are resolved again."""
        if self._mask_wait:
            return True
        described = run.description
        result_formats: tuple[int, ...] | None = None
        portal = run.source
        if isinstance(portal, Portal):
            described = portal.row_description
            if described is None and portal.prepared is not None:
                described = portal.prepared.row_description
            result_formats = run.result_formats
        if described is None:
            # Masks in play but no description of the columns: NULL is valid for any type.
            run.plan, run.described = MaskPlan.all_null(), True
            return False
        assert self.gate is not None
        kept = run.kept_masks
        key = (bytes(described), result_formats, self.encoding)
        if kept is not None and key in kept.row_plans and self.gate.masks_hold(kept):
            # Planned for this description before, under the same masks, catalog generation
            # and cache (masks_current answered yes then, and would now).
            run.plan, run.described = kept.row_plans[key], True
            return False
        fields = RowDescription.decode(described).fields
        if self.gate.masks_current(run, fields):
            run.plan, run.described = self._plan(run, fields, result_formats), True
            if kept is not None and len(kept.row_plans) < _ROW_PLANS_KEPT:
                kept.row_plans[key] = run.plan
            return False
        self._mask_wait = True
        if self.up is not None:
            self.up.transport.pause_reading()
        self._spawn(self._replan_masks(run, fields, result_formats))
        return True

    async def _replan_masks(
        self,
        run: StatementRun,
        fields: tuple[FieldDescription, ...],
        result_formats: tuple[int, ...] | None,
    ) -> None:
        assert self.gate is not None
        await self.gate.refresh_masks(run, fields)
        self._mask_wait = False
        if self.phase is not Phase.RELAY:
            return
        run.plan, run.described = self._plan(run, fields, result_formats), True
        if self.up is not None and not self._paused_by_client:
            self.up.transport.resume_reading()
        self._server_data(b"")

    def _mask_row(
        self, run: StatementRun, view: bytes | bytearray, pos: int, end: int
    ) -> bytes | None:
        """The masked DataRow frame (planned by _plan_masks), or None to relay it as it is."""
        plan = run.plan
        if plan is None:
            return None
        try:
            masked: bytes = plan.apply(bytes(view[pos + 5 : end]))
        except ProtocolViolation:
            self._end_reason = "malformed row from the target"
            self._fatal("08P01", "pgwarden: malformed row from the target; session closed")
            return b""
        return masked

    def _column_names(self, run: StatementRun) -> tuple[str, ...]:
        """The names of a run's output columns, from its Query's or its portal's
        description; () when none was seen (the rows are then recorded unnamed)."""
        described = run.description
        portal = run.source
        if isinstance(portal, Portal):
            described = portal.row_description
            if described is None and portal.prepared is not None:
                described = portal.prepared.row_description
        if described is None:
            return ()
        try:
            return tuple(f.name for f in RowDescription.decode(described).fields)
        except ProtocolViolation:
            return ()

    def _record_row(self, run: StatementRun, frame: bytes) -> None:
        """Session recording: the row as the client received it (after masking), bounded."""
        audit = self.gw.settings.audit
        if (
            len(run.recorded) >= audit.record_rows_limit
            or run.recorded_bytes >= audit.record_bytes_limit
        ):
            return
        try:
            values = DataRow.decode(frame[5:]).values
        except ProtocolViolation:
            return
        row = tuple(None if v is None else client_text(v, self.encoding) for v in values)
        if not run.recorded:
            run.recorded_columns = self._column_names(run)
        run.recorded.append(row)
        run.recorded_bytes += len(frame)

    def _after_statement(self, run: StatementRun) -> None:
        """Bookkeeping once the server confirms a statement succeeded."""
        facts = run.facts
        gate = self.gate
        if facts is None or gate is None:
            return
        if facts.category == "tcl":
            # A transaction began, ended or rewound (in an aborted one, only the last two run):
            # the server's transaction is not aborted, and the path may be readable again.
            self._aborted = False
            self._path.retry()
        gate.prepared.completed(facts)
        gate.cursor_declared(run)
        if facts.command == "DEALLOCATE":
            # One namespace with protocol Parse: a later Parse of the name must not be judged
            # by what was deallocated.
            if facts.prepared_name is None:
                self._statements.clear()
            else:
                self._statements.pop(facts.prepared_name, None)
        elif facts.command == "DISCARD" and "discard_all" in facts.flags:
            self._statements.clear()  # DISCARD ALL
            self._portals.clear()
        if facts.category == "ddl":
            self.gw.after_ddl(self)


def _may_drop_statements(facts: StatementFacts) -> bool:
    """Whether a statement may deallocate or define prepared statements: anything but a read
    whose code pgwarden sees whole (DEALLOCATE, DISCARD and PREPARE; a write fires triggers,
    DDL event triggers, a COMMIT deferred ones; functions it cannot see into)."""
    return facts.category != "read" or any(flag in _DROPS_STATEMENTS for flag in facts.flags)


_DROPS_STATEMENTS = frozenset(
    {"prepare", "execute", "discard_all", "procedural", "opaque_function"}
)


def _syntax_error_in_client_text(run: StatementRun, err: ErrorResponse) -> bool:
    """The server's own syntax error for text pgwarden could not analyse (forwarded for
    admins): its words quote the client's text at the position it reports ("P"), never a
    value. A syntax error raised while running SQL made from data (query_to_xml(email))
    reports an internal query ("q") instead, and stays withheld."""
    return (
        run.facts is not None
        and run.facts.category == "unknown"
        and err.sqlstate == "42601"
        and "P" in err.fields
        and "q" not in err.fields
    )


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Disable Nagle: replies are small and latency-bound (a query is one round trip)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
