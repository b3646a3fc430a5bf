#!/usr/bin/env bash
# Builds release binaries, starts its own Redis, reference Processor and ingestor on free
# loopback ports, runs the benchmark scenarios, checks the books after each, stops everything
# and writes the table into BENCHMARKS.md. BENCH_QUICK=1 runs shorter, smaller scenarios.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cmd redis-server redis-server
ensure_cmd redis-cli redis-tools
ensure_cmd wrk wrk
ensure_cmd python3 python3
cargo build --release --workspace --bins
exec python3 scripts/bench.py
