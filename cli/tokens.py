"""`pgwarden tokens`: issue, list and revoke the gateway's own tokens for agents and services."""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Annotated

import orjson
import typer
from rich.table import Table

from cli.context import control_client, fail, literal_console, settings_of
from gateway.identity.local import LocalTokenIssuer, open_signing_key
from gateway.identity.registry import TokenRecord, UnknownToken
from gateway.identity.signing_key import SigningKeyError
from gateway.policy.bundle import mentioned_strings
from gateway.settings import Settings

app = typer.Typer(help="Issue, list and revoke locally signed tokens.", no_args_is_help=True)

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TTL = re.compile(r"(?:\d+[smhd])+")
_TTL_PART = re.compile(r"(\d+)([smhd])")
MAX_TTL_SECONDS = 366 * 86400


def parse_ttl(text: str) -> int:
    """Seconds in a lifetime such as `90s`, `30m`, `8h`, `7d` or `1h30m`."""
    value = text.strip().lower()
    if not _TTL.fullmatch(value):
        raise ValueError(f"bad --ttl {text!r}: use a number with s, m, h or d (e.g. 8h)")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _TTL_PART.findall(value))
    if not 1 <= seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"bad --ttl {text!r}: must be between 1s and {MAX_TTL_SECONDS // 86400}d")
    return seconds


@app.command()
def issue(
    ctx: typer.Context,
    subject: Annotated[str, typer.Option(help="Who the token is for, e.g. agent:ci.")],
    group: Annotated[
        list[str] | None, typer.Option(help="A group the policy knows (repeatable).")
    ] = None,
    ttl: Annotated[str, typer.Option(help="Lifetime: s, m, h or d, e.g. 8h.")] = "8h",
) -> None:
    """Sign a token and print it alone on stdout, so `$(pgwarden tokens issue ...)` works."""
    settings = settings_of(ctx)
    try:
        seconds = parse_ttl(ttl)
        with control_client(settings) as registry:
            issuer = LocalTokenIssuer(
                open_signing_key(settings),
                registry,
                issuer=settings.identity.local_issuer,
                audience=settings.identity.local_audience,
            )
            issued = issuer.issue(subject, group or [], seconds)
    except (ValueError, SigningKeyError) as exc:
        fail(str(exc))
    typer.echo(issued.token)
    typer.echo(
        f"issued {issued.record.jti} for {subject}, expires {_when(issued.record.expires_at)}",
        err=True,
    )
    _warn_about_unknown_groups(settings, group or [])


@app.command("list")
def list_tokens(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """Every token issued here, with its status (active, expired, revoked)."""
    with control_client(settings_of(ctx)) as registry:
        records = registry.tokens()
    now = time.time()
    if as_json:
        rows = [_as_json(r, now) for r in records]
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table("id", "subject", "groups", "issued", "expires", "status")
    for r in records:
        table.add_row(
            r.jti,
            r.subject,
            ", ".join(r.groups),
            _when(r.issued_at),
            _when(r.expires_at),
            r.status(now),
        )
    literal_console().print(table)


@app.command()
def revoke(
    ctx: typer.Context,
    jti: Annotated[str, typer.Argument(help="The token's id (see `pgwarden tokens list`).")],
) -> None:
    """Revoke a token. A login with it is refused as soon as this returns; each open
    session of it, idle or busy, ends with FATAL 28P01 "token revoked" on every gateway
    sharing the control store: at once with a PostgreSQL store (NOTIFY), within
    identity.revocation_poll_seconds (0.25 s by default) with SQLite."""
    try:
        with control_client(settings_of(ctx)) as registry:
            record = registry.revoke_token(jti)
    except UnknownToken:
        fail(f"no token with id {jti}")
    typer.echo(f"revoked {record.jti} ({record.subject})")


def _warn_about_unknown_groups(settings: Settings, groups: list[str]) -> None:
    """A group the policy never spells out is treated like no group at all: most likely a
    typo (`engineer` for `engineers`), worth a word before the token reaches its user."""
    mentioned = mentioned_strings(settings.policy.rego_dir, settings.policy.bundle_dir)
    if mentioned is None:
        return  # the policy is elsewhere (your own OPA): nothing here to compare with
    for name in groups:
        if name not in mentioned:
            typer.echo(
                f"warning: the policy in {settings.policy.rego_dir} does not mention group"
                f" {name!r} (a typo?): it treats it as any group it does not know",
                err=True,
            )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _as_json(record: TokenRecord, now: float) -> dict[str, object]:
    return {
        "jti": record.jti,
        "subject": record.subject,
        "groups": list(record.groups),
        "issued_at": _when(record.issued_at),
        "expires_at": _when(record.expires_at),
        "revoked_at": _when(record.revoked_at) or None,
        "status": record.status(now),
    }
