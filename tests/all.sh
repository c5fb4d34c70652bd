#!/usr/bin/env bash
# Runs every test of every layer; each layer ends with its runner's summary line.
# Usage: tests/all.sh   (from anywhere; needs the Rust toolchain, gcc, and valgrind for CI=true)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target

echo "== layer: rust (core unit + integration, CLI crash tests, C ABI from Rust) =="
status=0
: > target/c-tests.log # the C suite (ffi/tests/c_suite.rs) appends one line per C test case
cargo test --workspace --no-fail-fast 2>&1 | tee target/rust-tests.log || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "rust: %d passed, %d failed\n", p, f }' target/rust-tests.log

echo "== layer: c (C tests and examples built with gcc -Werror; under valgrind when CI=true) =="
grep "^SKIP \|^FAIL " target/c-tests.log || true
awk '/^ok / { p++ } /^FAIL / { f++ } END { printf "c: %d passed, %d failed\n", p, f }' target/c-tests.log
if grep -q "^FAIL " target/c-tests.log || ! grep -q "^ok " target/c-tests.log; then status=1; fi
exit "$status"
