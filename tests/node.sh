#!/usr/bin/env bash
# The node layer of tests/all.sh (also runnable alone): installs the package from this checkout
# the way a user does — `npm ci` in bindings/node (its devDependency @napi-rs/cli from the
# lockfile; the install script builds the addon with cargo), and `npm install <path>` into a
# fresh consumer project under target/ (install scripts only, no @napi-rs/cli there) — then
# `require('hubmsg')` and `import { DeviceClient } from 'hubmsg'` in that project, the types
# drift check, the TypeScript check of __test__/types-usage.ts against index.d.ts, a quick run of
# the Node benchmark (bindings/node/bench, mqtt.js from its lockfile) and `node --test` on
# bindings/node/__test__/*.test.mjs. Ends with `node: N passed, M failed`.
# Needs: the Rust toolchain (cargo on PATH), Node >= 20 with npm.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
LAYER=node
. tests/layer.sh
for tool in cargo node npm; do
    if ! command -v "$tool" >/dev/null; then
        echo "FAIL $tool is not on PATH (the Node package needs the Rust toolchain and Node >= 20 with npm)"
        failed=1
        summary
        exit 1
    fi
done
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

# The package's own install: devDependencies from package-lock.json, then the addon build
# (cargo build --release -p hubmsg-node; skipped when the addon is newer than the sources).
echo "installing bindings/node (npm ci; cargo release build; log: target/node-install.log)"
check install bash -c "cd bindings/node && npm ci --foreground-scripts"
# A consumer project elsewhere: `npm install /path/to/bindings/node` links the package and runs
# its install script, which must work without the package's devDependencies.
consumer=target/node-consumer
rm -rf "$consumer" && mkdir -p "$consumer"
check consumer-install bash -c "cd '$consumer' && npm init -y >/dev/null && npm install --foreground-scripts '$PWD/bindings/node'"
check require bash -c "cd '$consumer' && node -e \"const h = require('hubmsg'); if (typeof h.DeviceClient.fromConnectionString !== 'function') process.exit(1); console.log(h.version())\""
check import bash -c "cd '$consumer' && node --input-type=module -e \"import { DeviceClient, ServiceClient, Hub } from 'hubmsg'; if (![DeviceClient, ServiceClient, Hub].every((c) => typeof c === 'function')) process.exit(1)\""
# The examples resolve 'hubmsg' through examples/node/node_modules (a link to bindings/node).
check examples-install bash -c "cd examples/node && npm install --foreground-scripts"
check types-drift bash -c "cd bindings/node && node scripts/types.mjs"
check types-check bash -c "cd bindings/node && node_modules/.bin/tsc -p __test__/tsconfig.json"

# The benchmark must run and print its figures (their size is reported, never asserted): mqtt.js
# from bindings/node/bench/package-lock.json, the hubmsg CLI from the shared release build.
if [ -x target/release/hubmsg ]; then
    check bench-install bash -c "cd bindings/node/bench && npm ci --ignore-scripts"
    check bench-quick node bindings/node/bench/bench_d2c.mjs --quick --out target/node-bench
    grep -E "msg/s|x \(goal" target/node-bench-quick.log || true
else
    echo "FAIL bench-quick: target/release/hubmsg is missing (cargo build --release -p hubmsg-cli)"
    failed=$((failed + 1))
fi

# node --test on the .mjs files (expanded by the shell: Node 20 does not expand globs).
(cd bindings/node && node --test --test-reporter=tap __test__/*.test.mjs) >target/node-tests.log 2>&1
test_status=$?
grep -E "^not ok|^# (tests|pass|fail|cancelled)" target/node-tests.log
p=$(awk '/^# pass /{print $3}' target/node-tests.log | tail -n 1)
f=$(awk '/^# fail /{print $3}' target/node-tests.log | tail -n 1)
c=$(awk '/^# cancelled /{print $3}' target/node-tests.log | tail -n 1)
passed=$((passed + ${p:-0}))
failed=$((failed + ${f:-0} + ${c:-0}))
if [ "$test_status" -ne 0 ] && [ "${f:-0}" -eq 0 ] && [ "${c:-0}" -eq 0 ]; then
    echo "FAIL node --test exited $test_status"
    tail -n 40 target/node-tests.log
    failed=$((failed + 1))
fi
if [ -z "$p" ]; then
    echo "FAIL node --test ran no test"
    failed=$((failed + 1))
fi
summary
