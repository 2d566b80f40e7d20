"""`pgwarden sessions`: list a running gateway's sessions and end them (the kill switch),
through its admin listener."""

from __future__ import annotations

import datetime as dt
import getpass
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.table import Table

from cli.context import fail, literal_console, settings_of
from gateway.identity.local import LocalTokenIssuer
from gateway.settings import Settings

app = typer.Typer(help="List and end a running gateway's sessions.", no_args_is_help=True)

TOKEN_ENV = "PGWARDEN_ADMIN_TOKEN"
# A token the command signs for itself lives this long: one request.
_OWN_TOKEN_SECONDS = 60
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - compared, never bound

AdminUrl = Annotated[
    str | None,
    typer.Option(help="The admin listener; default from admin.host/admin.port."),
]
Token = Annotated[
    str | None,
    typer.Option(
        envvar=TOKEN_ENV,
        help="A token of an admin.token_groups group; default: one signed here for cli:$USER.",
    ),
]


def _admin_url(settings: Settings, given: str | None) -> str:
    if given:
        return given.rstrip("/")
    admin = settings.admin
    if not admin.port:
        fail("the admin listener is off (admin.port = 0): the kill switch needs it")
    scheme = "https" if admin.tls_cert is not None else "http"
    # A listener on every interface is reached here on loopback.
    host = admin.host if admin.host not in _ANY_ADDRESS else "127.0.0.1"
    return f"{scheme}://{host}:{admin.port}"


def _token(settings: Settings, given: str | None) -> str:
    """The caller's token, or one signed with this gateway's key (whoever can read the state
    directory is its operator); the audit names its subject as the one who killed."""
    if given:
        return given.strip()
    if not settings.admin.token_groups:
        fail("admin.token_groups is empty: nobody may use the kill switch")
    issuer = LocalTokenIssuer.from_settings(settings)
    try:
        subject = f"cli:{getpass.getuser()}"
        return issuer.issue(subject, [settings.admin.token_groups[0]], _OWN_TOKEN_SECONDS).token
    finally:
        issuer.close()


def _call(
    settings: Settings, url: str | None, token: str | None, method: str, path: str, body: Any
) -> Any:
    base = _admin_url(settings, url)
    verify: Any = True
    if base.startswith("https") and settings.admin.tls_cert is not None:
        verify = str(settings.admin.tls_cert)
    try:
        response = httpx.request(
            method,
            base + path,
            json=body,
            headers={"authorization": f"Bearer {_token(settings, token)}"},
            timeout=30,
            verify=verify,
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach the admin listener at {base}: {exc}")
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        fail(f"the admin listener answered {response.status_code}: {detail}")
    return response.json()


def _when(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command("list")
def list_sessions(
    ctx: typer.Context,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Every session past login: principal, target, since, statements, rows, current statement."""
    settings = settings_of(ctx)
    sessions = _call(settings, admin_url, token, "GET", "/sessions", None)["sessions"]
    if as_json:
        typer.echo(orjson.dumps(sessions, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table("id", "principal", "target", "since (UTC)", "statements", "rows", "current")
    for s in sessions:
        target = s["target"] if not s["database"] else f"{s['target']}/{s['database']}"
        table.add_row(
            s["id"],
            f"{s['subject']} ({', '.join(s['groups'])})",
            target,
            _when(s["since"]),
            str(s["statements"]),
            str(s["rows"]),
            s["current_statement"] or "",
        )
    literal_console().print(table)


@app.command()
def kill(
    ctx: typer.Context,
    session_id: Annotated[str | None, typer.Argument(help="The session's id.")] = None,
    subject: Annotated[
        str | None, typer.Option(help="End every session of this principal instead.")
    ] = None,
    reason: Annotated[
        str, typer.Option(help="Told to the client and audited.")
    ] = "ended by an operator",
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """End a session (or all of a subject's): its running query is cancelled upstream and the
    client gets a FATAL that says why; each kill is audited."""
    if (session_id is None) == (subject is None):
        fail("name a session ID or --subject, not both", 2)
    settings = settings_of(ctx)
    body = {"session_id": session_id, "subject": subject, "reason": reason}
    killed = _call(settings, admin_url, token, "POST", "/sessions/kill", body)["killed"]
    for sid in killed:
        typer.echo(f"killed {sid}")
