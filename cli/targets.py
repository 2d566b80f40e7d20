"""`pgwarden targets`: register, list and remove the servers (and their databases) clients
reach through the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from cli.context import control_client, fail, literal_console, settings_of
from gateway.control.targets import SSL_MODES, Target, TargetError, read_targets_file
from gateway.protocol import Terminate
from gateway.proxy.upstream import connect_upstream
from gateway.runtime import catalog_connector
from gateway.settings import Settings
from gateway.sql.catalog import WATCH_SQL

app = typer.Typer(
    help="Manage targets: the upstream servers a client selects by dbname (target or"
    " target/database).",
    no_args_is_help=True,
)


def registered(settings: Settings) -> list[Target]:
    """Every target in the control store, by name."""
    with control_client(settings) as control:
        return sorted(control.targets().values(), key=lambda t: t.name)


def registered_target(settings: Settings, name: str) -> Target:
    with control_client(settings) as control:
        target = control.target(name)
    if target is None:
        fail(f"no target named {name!r}")
    return target


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The name clients use as dbname.")],
    host: Annotated[str, typer.Option(help="Upstream host.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Upstream port.")] = 5432,
    dbname: Annotated[
        str, typer.Option(help="The default database: what dbname=TARGET reaches.")
    ] = "postgres",
    database: Annotated[
        list[str] | None,
        typer.Option(
            help="Another database clients may choose with dbname=TARGET/DATABASE; repeatable;"
            " '*' for any database of the server. The policy decides who may."
        ),
    ] = None,
    user: Annotated[str, typer.Option(help="Upstream role the gateway logs in as.")] = "postgres",
    password_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the password.")
    ] = None,
    password_file: Annotated[str | None, typer.Option(help="File holding the password.")] = None,
    sslmode: Annotated[
        str, typer.Option(help="disable|prefer|require|verify-ca|verify-full")
    ] = "prefer",
    sslrootcert: Annotated[
        str | None, typer.Option(help="CA file for verify-ca/verify-full.")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="k=v label passed to policy; repeatable.")
    ] = None,
    replace: Annotated[bool, typer.Option(help="Replace an existing target of that name.")] = False,
    no_check: Annotated[
        bool,
        typer.Option(
            "--no-check",
            help="Skip checking the credential and files here (they exist only where the"
            " gateway runs).",
        ),
    ] = False,
) -> None:
    """Register a target. The credential is referenced (env var or file), never stored."""
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"label must be k=v, got {item!r}")
        labels[key] = value
    if sslmode not in SSL_MODES:
        fail(f"sslmode must be one of {', '.join(SSL_MODES)}")
    try:
        target = Target(
            name=name,
            host=host,
            port=port,
            dbname=dbname,
            user=user,
            password_env=password_env,
            password_file=password_file,
            sslmode=sslmode,
            sslrootcert=sslrootcert,
            labels=labels,
            databases=tuple(database or ()),
        )
        if not no_check:
            check_local_files(target)
        with control_client(settings_of(ctx)) as control:
            control.add_target(target, replace=replace)
    except TargetError as exc:
        fail(str(exc))
    typer.echo(f"target {name} added")


@app.command("apply")
def apply(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(help='A targets file: {"targets": [{"name": ..., ...}, ...]}.')
    ],
    prune: Annotated[
        bool, typer.Option(help="Also remove every target the file does not name.")
    ] = False,
) -> None:
    """Make the control store hold the file's targets (added, or replaced when they differ),
    as a deployment declares them (the Helm chart runs this at each pod start). Credentials
    and CA files are not checked here: they exist where the gateway runs."""
    try:
        wanted = read_targets_file(file)
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    except TargetError as exc:
        fail(str(exc))
    with control_client(settings_of(ctx)) as control:
        held = control.targets()
        changed = [t for name, t in wanted.items() if held.get(name) != t]
        for target in changed:
            control.add_target(target, replace=True)
        gone = sorted(set(held) - set(wanted)) if prune else []
        for name in gone:
            with contextlib.suppress(TargetError):  # removed meanwhile by someone else
                control.remove_target(name)
    typer.echo(
        f"targets: {len(changed)} added or replaced, {len(gone)} removed,"
        f" {len(wanted) - len(changed)} unchanged"
    )


def check_local_files(target: Target) -> None:
    """TargetError unless the credential and the CA file can be read here: a reference that
    resolves to nothing would otherwise surface only when a client connects."""
    target.password(os.environ)
    if target.sslrootcert is not None and not os.access(target.sslrootcert, os.R_OK):
        raise TargetError(f"target {target.name}: cannot read --sslrootcert {target.sslrootcert}")


@app.command("list")
def list_(
    ctx: typer.Context,
    json: Annotated[bool, typer.Option("--json", help="One JSON document for machines.")] = False,
) -> None:
    """List targets (credentials are shown only as where they come from)."""
    targets = [t.describe() for t in registered(settings_of(ctx))]
    if json:
        typer.echo(orjson.dumps(targets).decode())
        return
    table = Table(
        "name", "host", "port", "dbname", "databases", "user", "sslmode", "credential", "labels"
    )
    for t in targets:
        labels = t["labels"]
        assert isinstance(labels, dict)
        databases = t["databases"]
        assert isinstance(databases, tuple)
        table.add_row(
            str(t["name"]),
            str(t["host"]),
            str(t["port"]),
            str(t["dbname"]),
            ",".join(databases),
            str(t["user"]),
            str(t["sslmode"]),
            str(t["credential"]),
            ",".join(f"{k}={v}" for k, v in labels.items()),
        )
    literal_console(None).print(table)


@app.command("remove")
def remove(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Target to remove.")]
) -> None:
    """Remove a target; open sessions to it keep running until they end."""
    try:
        with control_client(settings_of(ctx)) as control:
            control.remove_target(name)
    except TargetError as exc:
        fail(str(exc))
    typer.echo(f"target {name} removed")


@app.command("test")
def test(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Target to log in to.")],
    database: Annotated[
        str | None, typer.Option(help="One of the databases it serves (default: its own).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Log in to the target as the gateway does and report TLS, the authentication method and
    the server version (the credential is used, never shown)."""
    target = registered_target(settings_of(ctx), name)
    chosen = target.database_for(database)
    report = asyncio.run(_login_report(target, chosen))
    if as_json:
        typer.echo(orjson.dumps(report).decode())
        return
    tls = report["tls"]
    tls_text = (
        "none"
        if not isinstance(tls, dict)
        else f"{tls['version']} {tls['cipher']} (sslmode={target.sslmode})"
    )
    typer.echo(
        f"target {name}: logged in to {target.host}:{target.port} database {chosen}"
        f" as {target.user}; TLS {tls_text}; auth {report['auth_method']};"
        f" server {report['server_version']}"
    )


async def _login_report(target: Target, database: str) -> dict[str, object]:
    up = await connect_upstream(target, os.environ, {}, database=database)
    try:
        ssl_object = up.transport.get_extra_info("ssl_object")
        tls: dict[str, object] | None = None
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            tls = {
                "version": ssl_object.version(),
                "cipher": cipher[0] if cipher else None,
                "verified": target.sslmode in ("verify-ca", "verify-full"),
            }
        return {
            "target": target.name,
            "host": target.host,
            "port": target.port,
            "database": database,
            "user": target.user,
            "sslmode": target.sslmode,
            "tls": tls,
            "auth_method": up.auth_method,
            "server_version": up.parameters.get("server_version", "unknown"),
        }
    finally:
        up.transport.write(Terminate().encode())
        up.transport.close()
        try:
            async with asyncio.timeout(2):
                await up.protocol.wait_closed()
        except TimeoutError:
            up.transport.abort()


@app.command("install-ddl-watch")
def install_ddl_watch(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Target whose database gets the watch.")],
    print_sql: Annotated[
        bool, typer.Option("--print", help="Print the SQL (for psql -f) instead of running it.")
    ] = False,
) -> None:
    """Install the DDL watch (an event trigger and a counter, superuser only) in the target's
    database, with the target's credential: the gateway then sees DDL made on the server
    with one cheap read per statement, and its catalog cache survives ordinary writes."""
    sql = WATCH_SQL.read_text()
    if print_sql:
        typer.echo(sql, nl=False)
        return
    target = registered_target(settings_of(ctx), name)

    async def install() -> None:
        conn = await catalog_connector(target, target.dbname, os.environ)()
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(install())
    except Exception as exc:  # one line, whatever the driver raised
        fail(
            f"could not install the DDL watch in target {name}: {exc}"
            " (it needs a superuser: run the output of --print as one)"
        )
    typer.echo(f"DDL watch installed in target {name} (database {target.dbname})")
