#!/usr/bin/env bash
# The performance baseline, reproducible on one machine: each worker as its
# own process (release build), the stand-in gateway, then `trusted-contact
# bench`, which measures this machine's PostgreSQL and RabbitMQ limits and
# runs the load publisher against the system in the same run. The largest
# resident set of each worker process is sampled while it runs.
#
#   bash scripts/perf.sh [RATE] [SECONDS] [SCENARIO]     (default 500 60 invitations)
set -euo pipefail
cd "$(dirname "$0")/.."

rate="${1:-500}"
seconds="${2:-60}"
scenario="${3:-invitations}"
run_id="perf$$"
export TC_TOPOLOGY_PREFIX="${run_id}."
export TC_DATABASE_URL="postgres://postgres@127.0.0.1:5432/tc_${run_id}"
export TC_SMS_GATEWAY_URL="http://127.0.0.1:8091"
# The provider's limit is not what is measured here.
export TC_SMS_RATE_PER_SEC=5000 TC_SMS_BURST=500
export TC_LOG=warn
out="target/perf/${run_id}"
mkdir -p "$out"
bin=target/release/trusted-contact
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    psql -q -h 127.0.0.1 -U postgres -d postgres \
        -c "DROP DATABASE IF EXISTS tc_${run_id} WITH (FORCE)" >/dev/null 2>&1 || true
    "$bin" teardown >/dev/null 2>&1 || true
}
trap cleanup EXIT

cargo build --release --locked --quiet
"$bin" migrate
"$bin" sms-gateway --port 8091 --max-logged-requests 1000 2> "$out/gateway.log" &
pids+=($!)
echo "sms-gateway $!" > "$out/processes"
port=9300
for worker in invitations sweeper recovery sms; do
    TC_HTTP_PORT=$port "$bin" run --worker "$worker" 2> "$out/$worker.log" &
    pids+=($!)
    echo "$worker $!" >> "$out/workers"
    echo "$worker $!" >> "$out/processes"
    port=$((port + 1))
done
for port in 9300 9301 9302 9303; do
    for _ in $(seq 1 60); do
        curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
        sleep 0.5
    done
done

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}
broker_pid=$(pgrep -f beam.smp | head -1 || true)
[ -n "$broker_pid" ] && echo "rabbitmq $broker_pid" >> "$out/processes"
before=$(while read -r name pid; do echo "$name $(cpu_seconds "$pid")"; done < "$out/processes")
postgres_before=$(ps -o times= -C postgres | awk '{ s += $1 } END { print s + 0 }')

sample_rss() {
    while true; do
        while read -r name pid; do
            rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
            echo "$name $rss"
        done < "$out/workers"
        sleep 1
    done
}
sample_rss > "$out/rss.samples" &
sampler=$!

"$bin" bench --limit-secs 10 --scenario "$scenario" --rate "$rate" \
    --duration-secs "$seconds" --duplicate-share 0 --refused-share 0 \
    --ineligible-share 0 --quiet --report-dir "$out/loadgen" \
    --gateway-url "$TC_SMS_GATEWAY_URL" | tee "$out/bench.txt"
kill "$sampler"

echo "CPU seconds used during the run (2 cores):" | tee -a "$out/bench.txt"
while read -r name pid; do
    start=$(echo "$before" | awk -v n="$name" '$1 == n { print $2 }')
    now=$(cpu_seconds "$pid")
    awk -v n="$name" -v a="${start:-0}" -v b="$now" 'BEGIN { printf "  %-12s %7.1f\n", n, b - a }' \
        | tee -a "$out/bench.txt"
done < "$out/processes"
postgres_after=$(ps -o times= -C postgres | awk '{ s += $1 } END { print s + 0 }')
printf "  %-12s %7.1f  (all server processes, exited ones excluded)\n" postgres \
    "$((postgres_after - postgres_before))" | tee -a "$out/bench.txt"

echo "Largest resident set per worker process (MiB):" | tee -a "$out/bench.txt"
awk '{ if ($2 > max[$1]) max[$1] = $2 } END { for (w in max) printf "  %-12s %6.1f\n", w, max[w] / 1024 }' \
    "$out/rss.samples" | sort | tee -a "$out/bench.txt"
echo "report: $out/loadgen/report.html, $out/bench.txt"
