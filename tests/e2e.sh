#!/usr/bin/env bash
# The e2e layer of tests/all.sh (also runnable alone): the four-language end-to-end test
# (tests/e2e/run.mjs). Builds what it runs from this checkout — the hubmsg CLI and the C library
# (release builds, shared with the other layers), the C device (tests/e2e/device.c, with the C
# examples' flags and example.h), the Node package linked into tests/e2e/node_modules — and uses
# the Python venv the python layer made (target/py-venv; it is made here when missing).
# Ends with `e2e: N passed, M failed`.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target/e2e
fail() {
    echo "FAIL $1"
    [ -f "${2:-}" ] && tail -n 40 "$2"
    echo "e2e: 0 passed, 1 failed"
    exit 1
}
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
echo "building the hubmsg CLI, the C library and the C device (log: target/e2e/build.log)"
cargo build --release -p hubmsg-cli -p hubmsg-ffi >target/e2e/build.log 2>&1 || fail "cargo build --release -p hubmsg-cli -p hubmsg-ffi" target/e2e/build.log
pc_dir=$(dirname "$(ffi/pkgconfig.sh)")
# shellcheck disable=SC2046 # pkg-config's flags are meant to split
gcc -std=c11 -Wall -Wextra -Werror -pedantic -O2 -Iexamples/c -o target/e2e/device tests/e2e/device.c \
    $(PKG_CONFIG_PATH="$pc_dir" pkg-config --cflags --libs hubmsg) -lpthread >>target/e2e/build.log 2>&1 ||
    fail "gcc tests/e2e/device.c" target/e2e/build.log
(cd tests/e2e && npm install --foreground-scripts) >target/e2e/npm.log 2>&1 || fail "npm install in tests/e2e" target/e2e/npm.log
if [ ! -x target/py-venv/bin/python ] || ! target/py-venv/bin/python -c 'import hubmsg' 2>/dev/null; then
    echo "installing ./bindings/python into target/py-venv (log: target/e2e/pip.log)"
    { [ -x target/py-venv/bin/python ] || "${PYTHON:-python3}" -m venv target/py-venv; } >target/e2e/pip.log 2>&1 &&
        target/py-venv/bin/python -m pip install -q ./bindings/python >>target/e2e/pip.log 2>&1 || fail "pip install ./bindings/python" target/e2e/pip.log
fi
# The library is found at run time through the rpath pkg-config gives, or LD_LIBRARY_PATH.
LD_LIBRARY_PATH="$PWD/target/release${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    E2E_HUBMSG="$PWD/target/release/hubmsg" E2E_C_DEVICE="$PWD/target/e2e/device" E2E_PYTHON="$PWD/target/py-venv/bin/python" \
    timeout 600 node tests/e2e/run.mjs 2>&1 | tee target/e2e/run.log
status=${PIPESTATUS[0]}
if ! grep -qE '^e2e: [0-9]+ passed' target/e2e/run.log; then
    echo "FAIL tests/e2e/run.mjs ended (exit $status) without its accounting"
    echo "e2e: 0 passed, 1 failed"
    exit 1
fi
exit "$status"
