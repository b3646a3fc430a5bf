#!/usr/bin/env bash
# Runs pulse-ingestor (release build). With no REDIS_URL configured (environment or .env), it
# starts a local redis-server with AOF persistence, data under .data/redis (LOCAL_REDIS_PORT,
# default 6379), and stops it on exit. .env (in the repository root, the working directory the
# binary reads it from) fills in only what the environment leaves unset: the command line wins.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

load_env_file .env

redis_pid=""
cleanup() { [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true; }
trap cleanup EXIT

if [ -z "${REDIS_URL:-}" ]; then
  ensure_cmd redis-server redis-server
  port=${LOCAL_REDIS_PORT:-6379}
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "==> using the Redis already listening on 127.0.0.1:$port"
  else
    mkdir -p .data/redis
    echo "==> starting redis-server on 127.0.0.1:$port (AOF on, data in .data/redis)"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/.data/redis" \
      --appendonly yes --appendfsync everysec --save "" >.data/redis/redis.log 2>&1 &
    redis_pid=$!
    wait_port "$port"
  fi
  export REDIS_URL="redis://127.0.0.1:$port"
fi

echo "==> building pulse-ingestor (release)"
cargo build --release --bin pulse-ingestor
echo "==> running: REDIS_URL=$REDIS_URL LISTEN_ADDR=${LISTEN_ADDR:-0.0.0.0:8070}"
target/release/pulse-ingestor &
app=$!
trap 'kill -TERM $app 2>/dev/null || true' INT TERM
wait $app || status=$?
cleanup
exit "${status:-0}"
