#!/usr/bin/env bash
# Runs every test of every layer; each layer ends with its runner's summary line.
# Usage: tests/all.sh   (from anywhere; needs the Rust toolchain, gcc, and valgrind for CI=true)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target

echo "== layer: lint (cargo fmt --check, cargo clippy -D warnings) =="
status=0
lint_failed=0
cargo fmt --all --check >target/fmt.log 2>&1 || { cat target/fmt.log; lint_failed=$((lint_failed + 1)); }
cargo clippy --workspace --all-targets -- -D warnings >target/clippy.log 2>&1 || { grep -A15 -E '^(error|warning)' target/clippy.log | head -n 200; lint_failed=$((lint_failed + 1)); }
echo "lint: $((2 - lint_failed)) passed, $lint_failed failed"
[ "$lint_failed" -eq 0 ] || status=1

echo "== layer: rust (core unit + integration, CLI crash tests, C ABI from Rust) =="
: > target/c-tests.log # the C suite (ffi/tests/c_suite.rs) appends one line per C test case
cargo test --workspace --no-fail-fast 2>&1 | tee target/rust-tests.log || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "rust: %d passed, %d failed\n", p, f }' target/rust-tests.log
# The storage power-loss simulation's tally, and tests that could not run here (with why).
grep -E "^(store-powerloss: |SKIP )" target/rust-tests.log || true
if ! grep -q "^store-powerloss: " target/rust-tests.log; then
    echo "store-powerloss: the power-loss simulation did not report (it failed or did not run)"
    status=1
fi

echo "== layer: c (C tests and examples built with gcc -Werror; under valgrind when CI=true) =="
grep "^SKIP \|^FAIL " target/c-tests.log || true
awk '/^ok / { p++ } /^FAIL / { f++ } END { printf "c: %d passed, %d failed\n", p, f }' target/c-tests.log
if grep -q "^FAIL " target/c-tests.log || ! grep -q "^ok " target/c-tests.log; then status=1; fi

# Every bench scenario must run and produce numbers (their size is reported, never asserted).
# The Mosquitto baseline is installed with apt-get when missing (as root); if that is
# impossible it is reported as skipped, not failed.
echo "== layer: bench (hubmsg bench --quick) =="
bench_status=0
rm -f target/bench-quick.log
if cargo build --release -p hubmsg-cli 2>&1 | tail -n 1; then
    target/release/hubmsg bench --quick --out target/bench-quick 2>&1 | tee target/bench-quick.log || bench_status=$?
else
    bench_status=1
fi
if ! grep -qE '^bench: [0-9]+ passed, [0-9]+ failed' target/bench-quick.log 2>/dev/null; then
    echo "bench: 0 passed, 1 failed"
    bench_status=1
fi
if [ "$status" -eq 0 ]; then
    status=$bench_status
fi
exit "$status"
