#!/usr/bin/env bash
# Runs the end-to-end pipeline tests against tansu, a Kafka-compatible broker written in Rust,
# instead of librdkafka's mock cluster: the same tests, with RILL_TEST_KAFKA=tansu, each test
# starting a tansu process of its own (memory storage, loopback only). Installs tansu when
# missing; the first install compiles for 15 to 35 minutes. Tests that need the mock cluster's
# fault injection, or group behaviour tansu does not have (see docs/reliability.md), are skipped
# here with the reason printed; `make test` runs them on the mock cluster.
set -euo pipefail

TANSU_VERSION=0.6.0
CARGO=${CARGO:-cargo}

find_tansu() {
    if [[ -n ${RILL_TANSU_BIN:-} && -x ${RILL_TANSU_BIN} ]]; then
        echo "${RILL_TANSU_BIN}"
    elif command -v tansu >/dev/null 2>&1; then
        command -v tansu
    elif [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/tansu ]]; then
        echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
    fi
}

# Whether the binary runs a broker on memory storage (a build without the dynostore feature
# exits at once with FeatureNotEnabled).
runs_a_broker() {
    local binary=$1 port log pid
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log=$(mktemp)
    RUST_LOG=warn "$binary" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ \
        >"$log" 2>&1 &
    pid=$!
    sleep 1
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        rm -f "$log"
        return 0
    fi
    echo "tansu exited at once:" >&2
    cat "$log" >&2
    rm -f "$log"
    return 1
}

tansu=$(find_tansu)
if [[ -z $tansu ]] || ! runs_a_broker "$tansu"; then
    echo "installing tansu $TANSU_VERSION with dynostore (memory storage); this takes a while"
    $CARGO install tansu --version "$TANSU_VERSION" --locked --features dynostore --force
    tansu=$(find_tansu)
    runs_a_broker "$tansu"
fi
echo "tansu: $tansu ($("$tansu" --version 2>/dev/null || echo "version unknown"))"

export RILL_TEST_KAFKA=tansu
export RILL_TANSU_BIN=$tansu

skip_args=()
skip() {
    echo "skipped on tansu: $1 ($2)"
    skip_args+=(--skip "$1")
}
skip broker_errors_and_a_broker_restart_are_survived "needs the mock cluster's fault injection"
skip request_errors_and_a_broker_down_and_back_lose_no_span "needs the mock cluster's fault injection"
skip a_commit_due_while_the_broker_is_down_does_not_stop_the_consumer \
    "needs the mock cluster's fault injection"
skip eager_group_loses_nothing_as_members_come_and_go \
    "a member that leaves while another joins keeps its partitions on tansu; docs/reliability.md"

failed=()
run() {
    local started=$SECONDS status=0
    echo "== $*"
    "$@" || status=$?
    echo "== $(( SECONDS - started )) s, exit $status: $*"
    if (( status != 0 )); then
        failed+=("$*")
    fi
}

run $CARGO test --no-fail-fast -p integration-tests --lib kafka -- "${skip_args[@]}"
run $CARGO test --no-fail-fast -p integration-tests --test kafka_pipeline -- "${skip_args[@]}"
run $CARGO test --no-fail-fast -p spans-pipeline --test consumer --test consumer_group --test consumer_outcomes \
    --test consumer_flusher --test consumer_kafka_faults --test run_binary -- "${skip_args[@]}"

if (( ${#failed[@]} > 0 )); then
    printf 'failed on tansu: %s\n' "${failed[@]}"
    exit 1
fi
echo "every test above passed on tansu"
