# Shared by the layer scripts of tests/all.sh that count their own checks (tests/python.sh,
# tests/node.sh). Source it from the repository root after setting LAYER to the layer's name:
# `check NAME COMMAND...` runs one check with its output in target/$LAYER-NAME.log (shown on
# failure) and counts it; `summary` prints the runner's line "$LAYER: N passed, M failed" and
# succeeds only when something passed and nothing failed. Layers add counts of their own test
# runners to `passed` / `failed`.
passed=0
failed=0
check() { # check NAME COMMAND...: runs a check, counts it, shows its output on failure
    local name=$1 log=target/$LAYER-$1.log
    shift
    if "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        echo "ok $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name (exit $?)"
        tail -n 40 "$log"
    fi
}
summary() {
    echo "$LAYER: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
}
