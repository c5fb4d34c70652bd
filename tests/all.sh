#!/usr/bin/env bash
# Runs every test of every layer; each layer ends with its runner's summary line.
# Usage: tests/all.sh   (from anywhere; needs only the Rust toolchain for now)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target

echo "== layer: rust (core unit + integration, CLI crash tests) =="
status=0
cargo test --workspace --no-fail-fast 2>&1 | tee target/rust-tests.log || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "rust: %d passed, %d failed\n", p, f }' target/rust-tests.log
exit "$status"
