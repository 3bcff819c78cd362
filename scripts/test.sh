#!/usr/bin/env bash
# The test command of the README: installs the test dependencies, builds the edge, runs the unit
# and integration tests (cargo test --workspace), then the real-client suites against the dev-profile
# binary, and ends with the summary line "N passed, M failed" (the real-client suites).
# Exits non-zero when anything failed.
#
#   scripts/test.sh                      everything that CI runs
#   scripts/test.sh two_pages throttled  only these real-client suites (after the build)
#   KCS_SKIP_CARGO_TEST=1 scripts/test.sh   skip cargo test --workspace
#   KCS_SKIP_BUILD=1 KCS_BIN=path scripts/test.sh   use an edge binary built elsewhere
#
# Logs and screenshots of the real-client suites go to artifacts/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
mkdir -p artifacts

# Each suite must finish well inside this; the suites themselves aim at under 2 minutes.
SUITE_TIMEOUT=240

# name|command
SUITES=(
    "client_unit|node --test tests/e2e/client_unit.test.mjs tests/e2e/meet_layout.test.mjs"
    "whip_whep|python3 tests/interop/test_whip_whep.py"
    "cascade|python3 tests/interop/test_cascade.py"
    "edge_failure|python3 tests/interop/test_edge_failure.py"
    "two_pages|node tests/e2e/two_pages.mjs"
    "meeting|node tests/e2e/meeting.mjs"
    "throttled|node tests/e2e/throttled.mjs"
    "multiregion|bash bench/multiregion/run.sh 3 8s"
)

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
if ! scripts/install-test-deps.sh; then
    echo "install-test-deps.sh failed"
    echo "0 passed, ${#SUITES[@]} failed"
    exit 1
fi

cargo_failed=0
# One build for everything: `cargo test --no-run` also builds the `kcs` binary (edge-node has
# integration tests), with the same features the tests use, so nothing is compiled twice.
step "cargo test --workspace --no-run (builds kcs too)"
if [ "${KCS_SKIP_BUILD:-0}" = 1 ]; then
    echo "skipped (KCS_SKIP_BUILD=1)"
elif ! cargo test --workspace --no-run; then
    echo "build of the edge failed: the real-client suites cannot run"
    echo "0 passed, ${#SUITES[@]} failed"
    exit 1
fi
export KCS_BIN="${KCS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/kcs}"

if [ "${KCS_SKIP_CARGO_TEST:-0}" != 1 ] && [ "$#" -eq 0 ]; then
    step "cargo test --workspace"
    if ! cargo test --workspace; then
        cargo_failed=1
    fi
fi

passed=0
failed=0
skipped=0
results=()
for entry in "${SUITES[@]}"; do
    name=${entry%%|*}
    cmd=${entry#*|}
    if [ "$#" -gt 0 ]; then
        wanted=0
        for w in "$@"; do [ "$w" = "$name" ] && wanted=1; done
        [ "$wanted" = 1 ] || continue
    fi
    step "real-client suite $name: $cmd"
    start=$(date +%s)
    timeout --kill-after=10 "$SUITE_TIMEOUT" $cmd 2>&1 | tee "artifacts/$name.log"
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - start ))
    case $rc in
        0) passed=$((passed + 1)); results+=("PASS $name (${secs}s)") ;;
        77) skipped=$((skipped + 1)); results+=("SKIP $name (${secs}s)") ;;
        124|137) failed=$((failed + 1)); results+=("FAIL $name (timed out after ${SUITE_TIMEOUT}s)") ;;
        *) failed=$((failed + 1)); results+=("FAIL $name (exit $rc, ${secs}s)") ;;
    esac
done

step "summary"
[ "$cargo_failed" = 1 ] && echo "FAIL cargo test --workspace"
for r in "${results[@]}"; do echo "$r"; done
[ "$skipped" -gt 0 ] && echo "($skipped skipped)"
echo "$passed passed, $failed failed"
if [ "$failed" -gt 0 ] || [ "$cargo_failed" = 1 ]; then
    exit 1
fi
exit 0
