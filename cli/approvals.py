"""`pgwarden approvals`: list, watch, show, approve and deny approval requests, through the
gateway's admin API (the approver's own token from PGWARDEN_TOKEN or --token)."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.table import Table

from cli.context import fail, literal_console, settings_of
from cli.tokens import parse_ttl

app = typer.Typer(help="Review and decide statements held for approval.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document per request.")]
NoteOption = Annotated[str, typer.Option(help="Why: shown to the requester and audited.")]


@dataclass
class AdminApi:
    url: str
    token: str
    verify: str | bool

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if not self.token:
            fail("an approver token is needed: set PGWARDEN_TOKEN or pass --token")
        try:
            with httpx.Client(base_url=self.url, verify=self.verify, timeout=15) as client:
                reply = client.request(
                    method,
                    path,
                    json=body,
                    headers={"Authorization": f"Bearer {self.token}"},
                )
        except httpx.HTTPError as exc:
            fail(f"the admin API at {self.url} cannot be reached: {exc}")
        if reply.status_code >= 400:
            try:
                detail = reply.json().get("detail")
            except ValueError:
                detail = reply.text
            fail(f"{detail} (HTTP {reply.status_code})")
        return reply.json()


def _api(ctx: typer.Context) -> AdminApi:
    api = ctx.meta.get("approvals_api")
    assert isinstance(api, AdminApi)
    return api


@app.callback()
def approvals(
    ctx: typer.Context,
    token: Annotated[
        str, typer.Option(envvar="PGWARDEN_TOKEN", help="The approver's token.", show_default=False)
    ] = "",
    url: Annotated[
        str | None,
        typer.Option(
            envvar="PGWARDEN_ADMIN_URL",
            help="The gateway's admin API; default: admin.host and admin.port of the settings.",
        ),
    ] = None,
    cacert: Annotated[
        str | None,
        typer.Option(envvar="PGWARDEN_ADMIN_CACERT", help="CA of the admin listener's TLS."),
    ] = None,
) -> None:
    """Approver commands talk to a gateway's admin API: local or remote, the same way."""
    if url is None:
        admin = settings_of(ctx).admin
        scheme = "https" if admin.tls_cert is not None else "http"
        host = f"[{admin.host}]" if ":" in admin.host else admin.host
        url = f"{scheme}://{host}:{admin.port}"
    ctx.meta["approvals_api"] = AdminApi(url.rstrip("/"), token.strip(), cacert or True)


def _when(t: float | None) -> str:
    if t is None:
        return ""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _votes(r: dict[str, Any]) -> str:
    yes = sum(1 for v in r["votes"] if v["verdict"] == "approve")
    return f"{yes}/{r['approvers_required']} of {' or '.join(r['approvers'])}"


def _print(requests: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for r in requests:
            typer.echo(orjson.dumps(r).decode())
        return
    table = Table("id", "created", "status", "requester", "target", "approvals", "statement")
    for r in requests:
        text = " ".join(r["text"].split())
        table.add_row(
            r["id"],
            _when(r["created"]),
            r["status"],
            r["principal"].get("subject", ""),
            r["target"],
            _votes(r),
            text if len(text) <= 80 else text[:77] + "...",
        )
    literal_console().print(table)


@app.command("list")
def list_requests(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="pending, approved, timed_out, granted, denied, withdrawn.")
    ] = None,
    watch: Annotated[
        bool, typer.Option(help="Keep printing requests as they come or change (Ctrl-C ends).")
    ] = False,
    watch_for: Annotated[
        float | None, typer.Option(hidden=True, help="Stop watching after this many seconds.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The requests you may decide (or made), newest first."""
    api = _api(ctx)
    path = "/approvals" + (f"?status={status}" if status else "")
    requests = api.call("GET", path)
    _print(requests, as_json)
    if not watch:
        return
    seen = {r["id"]: (r["status"], len(r["votes"])) for r in requests}
    ends = None if watch_for is None else time.monotonic() + watch_for
    try:
        while ends is None or time.monotonic() < ends:
            time.sleep(1.0)
            fresh = []
            for r in reversed(api.call("GET", path)):
                state = (r["status"], len(r["votes"]))
                if seen.get(r["id"]) != state:
                    seen[r["id"]] = state
                    fresh.append(r)
            if fresh:
                _print(fresh, as_json)
    except KeyboardInterrupt:
        return


@app.command()
def show(ctx: typer.Context, request_id: str, as_json: JsonOption = False) -> None:
    """One request in full: statement, parameters, facts, reasons, votes."""
    r = _api(ctx).call("GET", f"/approvals/{request_id}")
    if as_json:
        typer.echo(orjson.dumps(r, option=orjson.OPT_INDENT_2).decode())
        return
    table = Table(title=f"{r['id']} ({r['status']})", title_justify="left", show_header=False)
    rows = [
        (
            "requester",
            f"{r['principal'].get('subject', '')} ({', '.join(r['principal'].get('groups', []))})",
        ),
        ("target", r["target"]),
        ("session", r["session_id"]),
        ("statement", r["text"]),
        ("parameters", ", ".join("NULL" if p is None else repr(p) for p in r["params"])),
        ("reasons", "; ".join(r["reasons"])),
        ("justification", r["justification"]),
        ("approvals", _votes(r)),
        ("held until", _when(r["wait_until"])),
        ("statement record", r["audit_record"] or ""),
    ]
    rows += [
        (f"vote {v['verdict']}", f"{v['subject']} at {_when(v['time'])}: {v['note']}")
        for v in r["votes"]
    ]
    for key, value in rows:
        table.add_row(key, value)
    literal_console().print(table)


def _decided(reply: dict[str, Any]) -> None:
    r = reply["request"]
    grant = reply.get("grant")
    if not reply["decided"]:
        typer.echo(f"{r['id']}: vote recorded; {_votes(r)} so far, still {r['status']}")
    elif grant is not None:
        until = _when(grant["expires"])
        what = "once" if grant["kind"] == "once" else "any statement of its shape"
        typer.echo(
            f"{r['id']}: {r['status']}; grant {grant['id']} lets it run {what} until {until} UTC"
        )
    else:
        typer.echo(f"{r['id']}: {r['status']}")


@app.command()
def approve(
    ctx: typer.Context,
    request_id: str,
    note: NoteOption = "",
    window: Annotated[
        str | None,
        typer.Option(help="Grant the statement's shape for this long (e.g. 30m) instead."),
    ] = None,
) -> None:
    """Approve: a held statement runs (once enough approvers have); a timed-out one may be
    run again once, as a grant."""
    body: dict[str, Any] = {"note": note}
    if window is not None:
        try:
            body["window_seconds"] = parse_ttl(window)
        except ValueError as exc:
            fail(str(exc).replace("--ttl", "--window"))
    _decided(_api(ctx).call("POST", f"/approvals/{request_id}/approve", body))


@app.command()
def deny(ctx: typer.Context, request_id: str, note: NoteOption = "") -> None:
    """Deny: the held statement ends in an error that carries the note."""
    _decided(_api(ctx).call("POST", f"/approvals/{request_id}/deny", {"note": note}))


@app.command()
def grants(
    ctx: typer.Context,
    all_grants: Annotated[bool, typer.Option("--all", help="Used and expired ones too.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Grants: yours, or every one for the admin groups."""
    rows = _api(ctx).call("GET", "/approvals/grants" + ("?live=false" if all_grants else ""))
    if as_json:
        for g in rows:
            typer.echo(orjson.dumps(g).decode())
        return
    table = Table("id", "request", "kind", "subject", "target", "expires", "used")
    for g in rows:
        used = f"{_when(g['used_at'])} by {g['used_by']}" if g["used_at"] else ""
        table.add_row(
            g["id"],
            g["request_id"],
            g["kind"],
            g["subject"],
            g["target"],
            _when(g["expires"]),
            used,
        )
    literal_console().print(table)
