#!/usr/bin/env bash
# Every test of the project against the local RabbitMQ and PostgreSQL: the
# whole suite in parallel (each test has its own database and topology
# prefix). The one test that stops and starts the broker runs, alone, only
# when TC_TEST_MAY_STOP_BROKER=1 (CI sets it): on a broker shared with others
# it would take them down too.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked -- --test-threads=8
if [ "${TC_TEST_MAY_STOP_BROKER:-0}" = 1 ]; then
    cargo test --locked --test integration -- --ignored --test-threads=1
else
    echo "skipped the broker-stopping readiness test (set TC_TEST_MAY_STOP_BROKER=1 to run it)"
fi
