#!/usr/bin/env bash
# A/B: single-pulse durable ingest with API keys and rate limits off vs on, alternating short
# runs so that this shared machine's drift hits both sides alike. Prints each run and the
# median of the per-pair ratios. Usage: scripts/bench_keys_ab.sh [pairs=6] [seconds=3]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_cmd redis-server redis-server
ensure_cmd wrk wrk
pairs=${1:-6} secs=${2:-3}
cargo build --release --bin pulse-ingestor
dir=$(mktemp -d /tmp/pulse-ab.XXXXXX)
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" >/dev/null 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
wait_port "$rport"
key=ab-trusted-service-key
printf '%s * bench\n' "$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)" >"$dir/keys"
for mode in plain keyed; do
  {
    [ "$mode" = keyed ] && printf 'wrk.headers["X-API-Key"] = "%s"\n' "$key"
    cat <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local i = 0
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, string.format(
    '{"tenant_id":"t-%d","product_sku":"SKU-%d","used_amount":1.25,"use_unit":"KB"}', i % 3000, i % 10))
end
LUA
  } >"$dir/$mode.lua"
done
for _ in $(seq "$pairs"); do
  for mode in off on; do
    redis-cli -p "$rport" FLUSHALL >/dev/null
    port=$(free_port)
    if [ "$mode" = on ]; then
      env API_KEYS_FILE="$dir/keys" RATE_LIMIT=1000000 RATE_LIMIT_BURST=1000000 \
        REDIS_URL="redis://127.0.0.1:$rport" LISTEN_ADDR="127.0.0.1:$port" RUST_LOG=error target/release/pulse-ingestor &
      script="$dir/keyed.lua"
    else
      env REDIS_URL="redis://127.0.0.1:$rport" LISTEN_ADDR="127.0.0.1:$port" RUST_LOG=error target/release/pulse-ingestor &
      script="$dir/plain.lua"
    fi
    pid=$!
    wait_port "$port"
    echo "$mode $(wrk -t2 -c64 -d"${secs}s" -s "$script" "http://127.0.0.1:$port/ingest" | awk '/Requests\/sec/ {print $2}')"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done | tee "$dir/results"
python3 - "$dir/results" <<'PY'
import statistics as st, sys
d = {"on": [], "off": []}
for line in open(sys.argv[1]):
    m, v = line.split()
    d[m].append(float(v))
pairs = [a / b for a, b in zip(d["on"], d["off"])]
print(f"keys+limits on/off: median of per-pair ratios {st.median(pairs):.3f}, "
      f"ratio of medians {st.median(d['on']) / st.median(d['off']):.3f}")
PY
