#!/usr/bin/env bash
# Every test of the project against the local RabbitMQ and PostgreSQL: the
# whole suite in parallel (each test has its own database and topology
# prefix), then, alone, the one test that stops and starts the shared broker.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked -- --test-threads=8
cargo test --locked --test integration -- --ignored --test-threads=1
