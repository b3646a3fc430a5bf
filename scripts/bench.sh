#!/usr/bin/env bash
# Builds release binaries, starts its own Redis, reference Processor and ingestor on free
# loopback ports, runs the benchmark scenarios, checks the books after each, stops everything
# and writes the table into BENCHMARKS.md. BENCH_QUICK=1 runs shorter, smaller scenarios.
# `scripts/bench.sh ab [pairs]`: alternating REDIS_COMMIT=per-shard / one-call pairs (scenarios 2
# and 4a) with the cost model, printed as a table. `scripts/bench.sh compare <dir> [pairs]`: the
# same against another build's pulse-ingestor in <dir> (scenarios 2, 4a, 4b). `scripts/bench.sh
# wait [pairs]`: REDIS_WAIT_REPLICAS 0 against 1, with a real replica. `scripts/bench.sh usage`:
# live usage query latency alone and beside 1,000,000 other keys. `scripts/bench.sh eventtime
# [pairs]`: stamped pulses (5 % up to 30 minutes late) against unstamped, alternating.
# `scripts/bench.sh callgrind [count]`: instructions per request (ingestor) and per pulse (Redis)
# under valgrind's callgrind, over a fixed replay — figures the neighbours' load does not move. BENCH_BIN=<dir> runs another
# build (with `compare`: two builds against each other).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cmd redis-server redis-server
ensure_cmd redis-cli redis-tools
ensure_cmd wrk wrk
if [ "${1:-}" = callgrind ]; then ensure_cmd valgrind valgrind; fi
ensure_cmd python3 python3
cargo build --release --workspace --bins
exec python3 scripts/bench.py "$@"
