#!/usr/bin/env bash
# The docker-compose topology as plain processes, for a machine without Docker: Redis (AOF),
# the reference Processor, two ingestor replicas, Prometheus with the alert rules; then the
# producer sends load to both replicas for a while with 10-second windows, and the books are
# checked against what the Processor received. The stack stays up until Ctrl-C (--no-wait: stop
# right after the check). Installs redis-server and prometheus when missing.
#   scripts/demo.sh [--no-wait] [--duration 30s]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

wait_after=1 duration=30s
while [ $# -gt 0 ]; do
  case $1 in
    --no-wait) wait_after=0 ;;
    --duration) duration=$2; shift ;;
    *) echo "usage: $0 [--no-wait] [--duration 30s]" >&2; exit 64 ;;
  esac
  shift
done

ensure_cmd redis-server redis-server
ensure_cmd prometheus prometheus
cargo build --release --workspace --bins
bin=target/release
dir=$(mktemp -d /tmp/pulse-demo.XXXXXX)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop EXIT

redis_port=$(free_port); proc_port=$(free_port); prom_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --appendonly yes \
  --appendfsync everysec --save "" >"$dir/redis.log" 2>&1 & pids+=($!)
"$bin/pulse-processor" --listen "127.0.0.1:$proc_port" --journal "$dir/processor.jsonl" \
  >"$dir/processor.log" 2>&1 & pids+=($!)
wait_port "$redis_port"; wait_port "$proc_port"

ports=()
for i in 1 2; do
  port=$(free_port); ports+=("$port")
  REDIS_URL="redis://127.0.0.1:$redis_port" LISTEN_ADDR="127.0.0.1:$port" \
  PROCESSOR_URL="http://127.0.0.1:$proc_port/batches" WINDOW=10s STABILISATION_DELAY=1s \
  DRAIN_INTERVAL=2s "$bin/pulse-ingestor" >"$dir/ingestor-$i.log" 2>&1 & pids+=($!)
done
for p in "${ports[@]}"; do wait_port "$p"; done

cp prometheus.rules.yml "$dir/"
sed -e 's/scrape_interval: 15s/scrape_interval: 2s/' \
    -e "s/\"ingestor-1:8070\", \"ingestor-2:8070\"/\"127.0.0.1:${ports[0]}\", \"127.0.0.1:${ports[1]}\"/" \
    prometheus.yml >"$dir/prometheus.yml"
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$dir/prometheus.log" 2>&1 & pids+=($!)
wait_port "$prom_port"

echo "==> producer: 300 tenants, both replicas, $duration, 5% duplicates, 2% malformed"
"$bin/pulse-producer" --url "http://127.0.0.1:${ports[0]},http://127.0.0.1:${ports[1]}" \
  --mode tenants --tenants 300 --min-delay 100ms --max-delay 400ms --duration "$duration" \
  --duplicate-ratio 0.05 --malformed-ratio 0.02 --ledger "$dir/ledger.json"

echo "==> waiting for the last window to be sealed and delivered"
for _ in $(seq 60); do
  sleep 1
  pending=$(curl -s "http://127.0.0.1:${ports[0]}/admin/pending" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending_windows"])')
  now=$(date +%s)
  # Windows are 10 s: after 12 s past the load, every window has ended.
  [ "$pending" = 0 ] && [ $(( now - $(stat -c %Y "$dir/ledger.json") )) -ge 12 ] && break
done
echo "==> books: what got a 2xx vs what the Processor received"
"$bin/pulse-producer" verify --ledger "$dir/ledger.json" --processor "http://127.0.0.1:$proc_port"

cat <<INFO

Where to look:
  ingestors      http://127.0.0.1:${ports[0]}  http://127.0.0.1:${ports[1]}  (/metrics, /readyz, /admin/pending)
  Processor      http://127.0.0.1:$proc_port/totals
  Prometheus     http://127.0.0.1:$prom_port/graph  (alerts: http://127.0.0.1:$prom_port/alerts)
  logs and data  $dir
INFO
if [ "$wait_after" = 1 ]; then
  echo "The stack keeps running; Ctrl-C stops it."
  wait
fi
