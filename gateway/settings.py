"""The gateway's settings: read once from PGWARDEN_* environment and an optional TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.install import shipped


class ListenerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 6543
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Cleartext passwords (the JWT) over plaintext are refused except from loopback.
    allow_plaintext_password: bool = False
    max_message_size: int = 64 * 1024 * 1024
    # Bound on the startup packet's body (after its 4-byte length, as PostgreSQL's
    # MAX_STARTUP_PACKET_LENGTH), read before the client is authenticated.
    max_startup_size: int = 10_000
    # A client that has not authenticated within this time is disconnected.
    startup_timeout_seconds: float = 30.0


class IdentitySettings(BaseModel):
    # Locally issued tokens (pgwarden tokens issue) are signed with this key's issuer.
    local_issuer: str = "pgwarden"
    local_audience: str = "pgwarden"
    # OIDC: empty issuer disables it.
    oidc_issuer: str = ""
    oidc_audience: str = ""
    oidc_groups_claim: str = "groups"
    oidc_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    # The issuer's key set is fetched again when its Cache-Control max-age (or Expires) runs
    # out, but never sooner than the floor nor later than the ceiling: a key the issuer
    # withdraws stops verifying tokens, and ends sessions it verified, within the ceiling.
    oidc_jwks_min_refresh_seconds: float = Field(default=30.0, gt=0)
    oidc_jwks_max_refresh_seconds: float = Field(default=600.0, gt=0)
    # Open sessions re-check their token's expiry this often.
    recheck_seconds: float = 30.0
    # How often the control store's targets and revocations are looked at when it cannot
    # tell of changes (SQLite; a PostgreSQL store's LISTEN connection being reopened), and
    # the OIDC key set: open sessions of a revoked token end within this time, idle or not.
    # A login always checks the registry afresh.
    revocation_poll_seconds: float = Field(default=0.25, gt=0)
    leeway_seconds: float = 30.0
    # A password message (the token) longer than this is refused as "token too large"
    # before anything is decoded.
    max_token_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)


class PolicySettings(BaseModel):
    # Empty: start and supervise a local `opa run --server` sidecar.
    opa_url: str = ""
    opa_binary: Path | None = None
    decision_path: str = "pgwarden/decision"
    # The rule read once per login for the session's guards (enforced settings, rate
    # limits); undefined means none.
    session_path: str = "pgwarden/session"
    # Past this a decision is a deny. It bounds the whole hop, queueing included: a burst of
    # new sessions (each session's first statements miss the cache) must not read as OPA down.
    timeout_seconds: float = 2.0
    cache_size: int = 10_000
    # With opa_url: how often OPA's bundle revision is polled. A policy change OPA loads
    # reaches decisions kept in memory (cache, prepared statements) within this time.
    revision_poll_seconds: float = 1.0
    # The policy folders; by default the ones shipped with this installation (never looked
    # up in the directory the gateway starts from). A relative path is taken from there.
    rego_dir: Path = Field(default_factory=lambda: shipped("rego"))
    bundle_dir: Path = Field(default_factory=lambda: shipped("bundles"))


class AuditSettings(BaseModel):
    store: Literal["sqlite", "postgres"] = "sqlite"
    # SQLite file; relative paths are under the state directory.
    sqlite_path: Path = Path("audit.sqlite3")
    # full: each commit fsynced (a record survives power loss); normal: a record survives a
    # gateway crash but the last commits may be lost with the machine; much cheaper.
    sqlite_synchronous: Literal["full", "normal"] = "full"
    postgres_dsn: str = ""
    # Where a request record must be before its statement is forwarded. disk: in the audit
    # log and fdatasynced (one fdatasync shared by the records of all sessions written
    # meanwhile); os: written to the audit log with write() (survives the gateway being
    # killed, not the machine losing power). The store is then an index fed from the log.
    # store: no log, committed to the store (the arrangement before the log; see in_process).
    durability: Literal["disk", "os", "store"] = "disk"
    # disk: who runs the fdatasync. process: a small child of the gateway's (no GIL shared
    # with the event loop: the fastest); thread: a thread of the gateway's own (one process
    # less). The gateway falls back to the thread when the child cannot be started.
    fdatasync_in: Literal["process", "thread"] = "process"
    # The audit log's segment files are rotated past this size.
    log_segment_mb: int = Field(default=64, ge=1)
    # Fail open means statements run when the store is down: they are then unaudited.
    fail_open: bool = False
    timeout_seconds: float = 2.0
    # The store's inserts run in a child process, on another core than the relay (with the
    # audit log: the index fed from the log; durability=store: the writer). True runs them
    # in the gateway's own process: one process less, a slower relay.
    in_process: bool = False
    retention_days: int | None = Field(default=None, ge=1)
    # `audit prune` refuses to remove records younger than this, whatever it is asked.
    retention_floor_days: int = Field(default=7, ge=0)
    record_rows_limit: int = 100
    record_bytes_limit: int = 65536
    # The store is behind the head witness (deleted, truncated, restored from an old copy):
    # the gateway refuses to start unless this is set, and then writes a `chain_gap` record
    # naming the lost range (`pgwarden serve --accept-audit-gap` sets it for one start).
    accept_chain_gap: bool = False


class CatalogSettings(BaseModel):
    # pgwarden's metadata connection to a database (name resolution, masks) is closed after
    # this long unused: an open one keeps the database from being dropped, renamed or used
    # as a template. 0 keeps it open. (Such statements through pgwarden close it first.)
    idle_seconds: float = 10.0


class ShutdownSettings(BaseModel):
    # SIGTERM: statements already running get this long to finish before their sessions
    # are closed; new connections are refused from the start.
    drain_seconds: float = 30.0


class AdminSettings(BaseModel):
    """The admin listener: /healthz, /readyz, /metrics (and later the approvals API)."""

    host: str = "127.0.0.1"
    # 0 disables the listener.
    port: int = 6544
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Off loopback every request needs a bearer token of one of these groups (and TLS): the
    # metrics name targets and groups, and readiness says what is broken.
    token_groups: list[str] = Field(default_factory=lambda: ["admins"])


class ControlSettings(BaseModel):
    """The control-plane store: targets, the token registry, approval requests, their votes
    and grants."""

    # sqlite: one file in the state directory (one gateway; other processes on the machine
    # see changes within poll_seconds, or identity.revocation_poll_seconds for targets and
    # revocations); postgres: several gateways share it, and a change made through one (or
    # the CLI) reaches the others at once (LISTEN/NOTIFY).
    store: Literal["sqlite", "postgres"] = "sqlite"
    # Under the state directory unless absolute.
    sqlite_path: Path = Path("control.sqlite3")
    postgres_dsn: str = ""
    # A held statement looks at its request this often for changes no notification told of.
    poll_seconds: float = Field(default=0.25, gt=0)


class ApprovalSettings(BaseModel):
    """Holding a statement the policy answered `approve` for until a person decides."""

    # How long a held statement waits for its approvers; 0 asks and refuses at once (the
    # statement may be run again once approved, as a grant).
    wait_seconds: float = Field(default=120.0, ge=0)
    # An approval given after the hold ended is a one-time grant usable this long.
    grant_seconds: float = Field(default=900.0, gt=0)
    # Each new request and each decision is POSTed here (empty: no webhook).
    webhook_url: str = ""
    # The environment variable holding the key the webhook body is signed with (HMAC-SHA256).
    webhook_secret_env: str = "PGWARDEN_WEBHOOK_SECRET"
    # json: pgwarden's own event; slack: a Slack incoming-webhook message ({"text": ...}).
    webhook_format: Literal["json", "slack"] = "json"
    # Attempts per event (with backoff doubling from 0.5 s) before it is logged as lost.
    webhook_attempts: int = Field(default=5, ge=1)


class ConsoleSettings(BaseModel):
    """The web console for people (approvers, auditors), served under /console by the admin
    listener. Fields are grouped by the part that owns them."""

    # -- console core: sessions and OIDC login --
    enabled: bool = False
    # The console's address as browsers reach it (https://... behind a proxy); the OIDC
    # redirect URI is derived from it. Empty: the admin listener's own address.
    public_url: str = ""
    # A signed-in session ends this long after sign-in, whatever happens meanwhile.
    session_hours: float = Field(default=8.0, gt=0, le=7 * 24)
    # OIDC login (authorization code with PKCE) against identity.oidc_issuer; empty: off.
    oidc_client_id: str = ""
    # The environment variable holding the client secret (empty variable: a public client).
    oidc_client_secret_env: str = "PGWARDEN_CONSOLE_OIDC_SECRET"
    oidc_scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])

    # -- audit pages --
    # Who may read the audit pages (search, session replay, chain state) and the /audit API,
    # besides admin.token_groups: audit records hold statement text and recorded rows.
    console_audit_groups: list[str] = Field(default_factory=lambda: ["admins", "auditors"])
    # -- pgwarden login (the login engineer): a person's own short-lived pgwarden token --
    # The longest a token from `pgwarden login` lives; it is also bounded by when the person
    # last signed in at the IdP (the IdP token's auth_time), never by the IdP token's own
    # expiry (an access token's minutes are the IdP's cache period, not a session length).
    login_token_hours: float = Field(default=8.0, gt=0, le=24 * 31)
    # The OIDC client `pgwarden login` runs the device grant as (a public client: the CLI
    # keeps no secret; empty: oidc_client_id). Its tokens must carry identity.oidc_audience.
    login_client_id: str = ""
    # Scopes asked for in the device grant.
    login_scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    # The host people's clients reach the listener at, written into their service file;
    # empty: the host of the gateway URL `pgwarden login` used.
    login_listener_host: str = ""
    # How long a console-confirmed device code (`pgwarden login --via console`) waits for
    # its person, and how often the CLI may ask about it.
    device_code_seconds: float = Field(default=600.0, gt=0, le=3600)
    device_poll_seconds: float = Field(default=5.0, gt=0, le=60)
    # -- SAML 2.0 login (gateway/console/saml.py): on when the IdP's metadata is given --
    # The IdP's metadata (its entity id, SSO URL and signing certificate): a file, read
    # again when it changes, or a URL, read when the first SAML login starts and again
    # once saml_metadata_refresh_seconds have passed (an IdP's rolled-over certificate is
    # taken without a restart; a fetch that fails keeps the last metadata read).
    saml_idp_metadata_file: Path | None = None
    saml_idp_metadata_url: str = ""
    saml_metadata_refresh_seconds: float = Field(default=3600.0, ge=1, le=7 * 86400)
    # Our entity id as registered at the IdP; empty: <public_url>/console/saml/metadata.
    saml_sp_entity_id: str = ""
    # The assertion attribute (Name or FriendlyName) whose values are the person's groups,
    # and the one naming them on the pages (else the NameID).
    saml_groups_attribute: str = "groups"
    saml_name_attribute: str = "displayName"
    # Optional: our key and certificate to sign AuthnRequests (published in our metadata).
    saml_sp_key_file: Path | None = None
    saml_sp_cert_file: Path | None = None
    # Clock difference allowed with the IdP on an assertion's NotBefore / NotOnOrAfter.
    saml_clock_skew_seconds: int = Field(default=30, ge=0, le=300)


class LogSettings(BaseModel):
    # human: one readable line per event; json: one JSON object per line (log shippers).
    # Unset: human on a terminal, json otherwise.
    format: Literal["human", "json"] | None = None
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PGWARDEN_",
        env_nested_delimiter="__",
        toml_file=None,
        extra="forbid",
    )

    state_dir: Path = Path(".pgwarden")
    instance: str = "gw-1"
    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    approval: ApprovalSettings = Field(default_factory=ApprovalSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _CONFIG_FILE[0]
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def state_path(self, path: Path) -> Path:
        """A path under the state directory unless it is absolute."""
        return path if path.is_absolute() else self.state_dir / path


_CONFIG_FILE: list[Path | None] = [None]


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Build the one Settings value: overrides, then environment, then the TOML file."""
    _CONFIG_FILE[0] = config_file
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    finally:
        _CONFIG_FILE[0] = None
