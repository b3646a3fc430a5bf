#!/usr/bin/env bash
# Runs the load simulator with the earlier producer's defaults (3,000 tenants, 10 SKUs, a pulse
# every 500-1,000 ms per tenant, for 100 s) against INGESTOR_URL (default http://127.0.0.1:8070).
# Extra arguments are passed on, e.g. `scripts/run_producer.sh --duration 10s --ledger l.json`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin pulse-producer
exec target/release/pulse-producer --mode tenants --tenants 3000 --skus 10 \
  --min-delay 500ms --max-delay 1000ms --duration 100s "$@"
