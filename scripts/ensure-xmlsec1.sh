#!/usr/bin/env bash
# Installs xmlsec1 from Debian's packages when it is missing: pysaml2 (the console's SAML
# login) verifies and, in the tests' IdP, makes XML signatures with this program.
set -euo pipefail
if command -v xmlsec1 >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "installing xmlsec1 from Debian's packages..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq xmlsec1 >/dev/null
command -v xmlsec1 >/dev/null
