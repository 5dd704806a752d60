#!/usr/bin/env bash
# Starts the system with the README's command (in a scratch database and
# topology prefix), waits until it is ready, runs the demo and a short load
# run against it, stops it with SIGTERM and checks it exited cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

run_id="smoke$$"
export TC_TOPOLOGY_PREFIX="${run_id}."
export TC_DATABASE_URL="postgres://postgres@127.0.0.1:5432/tc_${run_id}"
export TC_HTTP_PORT="${TC_HTTP_PORT:-9090}"
gateway_port="${SMS_GATEWAY_PORT:-8090}"
export TC_SMS_GATEWAY_URL="http://127.0.0.1:${gateway_port}"
log_dir="target/smoke"
mkdir -p "$log_dir"

cleanup() {
    if [ -n "${system_pid:-}" ] && kill -0 "$system_pid" 2>/dev/null; then
        kill -TERM "$system_pid" 2>/dev/null || true
        wait "$system_pid" 2>/dev/null || true
    fi
    psql -q -h 127.0.0.1 -U postgres -d postgres \
        -c "DROP DATABASE IF EXISTS tc_${run_id} WITH (FORCE)" >/dev/null 2>&1 || true
    target/release/trusted-contact teardown >/dev/null 2>&1 || true
}
trap cleanup EXIT

cargo build --release --locked --quiet
echo "starting: cargo run --release -- run --worker all --with-sms-gateway ${gateway_port}"
cargo run --release --locked --quiet -- run --worker all --with-sms-gateway "$gateway_port" \
    2> "$log_dir/system.log" &
system_pid=$!

for _ in $(seq 1 60); do
    if curl -fsS "http://127.0.0.1:${TC_HTTP_PORT}/readyz" >/dev/null 2>&1; then break; fi
    sleep 1
done
curl -fsS "http://127.0.0.1:${TC_HTTP_PORT}/readyz" >/dev/null

echo "== demo"
cargo run --release --locked --quiet -- demo 2> "$log_dir/demo.log"

echo "== load publisher, a few seconds at a small rate"
cargo run --release --locked --quiet -- loadgen --rate 20 --duration-secs 5 --quiet \
    --report-dir "$log_dir/loadgen" 2> "$log_dir/loadgen.log"

echo "== metrics after the run"
curl -fsS "http://127.0.0.1:${TC_HTTP_PORT}/metrics" | grep '^trusted_contact_messages_handled_total' | head -5

kill -TERM "$system_pid"
wait "$system_pid"
echo "the system stopped cleanly on SIGTERM"
system_pid=""
