#!/usr/bin/env bash
# The Python layer of tests/all.sh (also runnable alone): installs the package from this
# checkout into a venv under target/ the way a user does (`pip install ./bindings/python`,
# maturin pulled by pip), then runs pytest, stubtest on the native module, mypy --strict on the
# examples, and a quick run of the Python benchmark. Ends with `python: N passed, M failed`.
# Needs: the Rust toolchain (cargo on PATH) and Python >= 3.9 with venv and pip (PYTHON=…).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
PY=${PYTHON:-python3}
venv=target/py-venv
LAYER=python
. tests/layer.sh

if ! command -v cargo >/dev/null; then
    # maturin would try to download a Rust toolchain, which cannot work here.
    echo "FAIL cargo is not on PATH: the Python package builds its Rust engine with it"
    failed=1
    summary
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv" || { echo "FAIL $PY -m venv (install python3-venv)"; failed=1; summary; exit 1; }
fi
check tools "$venv/bin/python" -m pip install -q -r bindings/python/requirements-test.txt -r bindings/python/bench/requirements.txt
# A user's install: the PEP 517 build with maturin from PyPI, a release build of the engine.
echo "building and installing ./bindings/python (cargo release build; log: target/python-install.log)"
check install "$venv/bin/python" -m pip install -v --force-reinstall --no-deps ./bindings/python
check import bash -c "cd / && '$PWD/$venv/bin/python' -c 'import hubmsg; print(hubmsg.__version__)'"

# pytest from the package directory: its pyproject.toml holds the settings; `hubmsg` is the
# installed one (the source tree is not on sys.path). Exit code 5 (no tests ran) is a failure.
(cd bindings/python && "../../$venv/bin/python" -m pytest -q -p no:cacheprovider tests) 2>&1 | tee target/python-pytest.log
pytest_status=${PIPESTATUS[0]}
line=$(grep -E '[0-9]+ (passed|failed|errors?)\b|no tests ran' target/python-pytest.log | tail -n 1)
count() { awk -v want="$1" '{ gsub(/[,=]/, " "); for (i = 1; i < NF; i++) if ($(i + 1) ~ want) s += $i } END { print s + 0 }' <<<"$line"; }
p=$(count '^passed')
f=$(count '^(failed|errors?)$')
passed=$((passed + p))
failed=$((failed + f))
if [ "$pytest_status" -ne 0 ] && [ "$f" -eq 0 ]; then
    echo "FAIL pytest exited $pytest_status (5 = no tests ran)"
    failed=$((failed + 1))
fi

check stubtest bash -c "cd / && '$PWD/$venv/bin/python' -m mypy.stubtest hubmsg._hubmsg"
check mypy-examples "$venv/bin/python" -m mypy --strict examples/python bindings/python/python/hubmsg bindings/python/bench
# The benchmark must run and print its figures (their size is reported, never asserted).
check bench-quick bash -c "cargo build --release -p hubmsg-cli -q && '$venv/bin/python' bindings/python/bench/bench_d2c.py --quick --out target/bench-python"
summary
