#!/usr/bin/env bash
# Installs PostgreSQL server and client binaries from Debian's packages when they are missing.
set -euo pipefail
have_server() { command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null; }
have_client() { command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1; }
if have_server && have_client; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing PostgreSQL from Debian's packages..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql postgresql-contrib postgresql-client >/dev/null
have_server && have_client
