#!/usr/bin/env bash
# Submission (587, STARTTLS + AUTH, one message per connection) with [state] in Redis, client
# addresses pinned to one worker or not, and per-process counters (pinned) for reference:
# three mailgate instances one after the other in one run, each measured RUNS times by the
# reference harness (../shared/bench/scenario.py, medians in its "summary" lines).
#
#   bench/run-pinning.sh [OUT_DIR]        # default: bench-results/pinning-<date>
#
# Env: RUNS (3), SUBMSGS (2000), WORKERS (2), REDIS_PORT (10379: a redis-server of this run's
#      own, stopped by its PID), BENCH_DIR (default ../shared/bench next to this repository).
# mailgate runs `serve --no-delivery` (receiving only) on 127.0.0.1:10287; every load is bounded
# by message count and time; everything stays on 127.0.0.1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
OUT=${1:-$ROOT/bench-results/pinning-$(date -u +%Y%m%dT%H%M%SZ)}
RUNS=${RUNS:-3} SUBMSGS=${SUBMSGS:-2000} WORKERS=${WORKERS:-2} REDIS_PORT=${REDIS_PORT:-10379}
mkdir -p "$OUT"
echo "results in $OUT" >&2

redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --daemonize no \
  > "$OUT/redis.log" 2>&1 &
REDIS_PID=$!
MGPID= MG=
cleanup() {
  [ -n "$MGPID" ] && { kill "$MGPID" 2>/dev/null || true; wait "$MGPID" 2>/dev/null || true; }
  [ -n "$MG" ] && rm -rf "$MG"
  kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.2; done

wait_listening() {
  python3 - <<'PY'
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        socket.create_connection(("127.0.0.1", 10287), 1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("mailgate did not listen on 10287")
        time.sleep(0.1)
PY
}

for variant in memory-pinned:none:auto redis-pinned:redis:yes redis-unpinned:redis:auto; do
  IFS=: read -r label state pin <<< "$variant"
  url=""; [ "$state" = redis ] && url="redis://127.0.0.1:$REDIS_PORT/0"
  MG=$(mktemp -d /tmp/mailgate-bench.XXXXXX)
  python3 "$ROOT/bench/mailgate_instance.py" "$MG" --workers "$WORKERS" --state "$url" \
    --pin-clients "$pin" > /dev/null
  MAILGATE_LOG_LEVEL=WARNING mailgate -c "$MG/mailgate.toml" serve --no-delivery \
    > "$OUT/$label-serve.log" 2>&1 &
  MGPID=$!
  wait_listening
  sleep 2  # every worker in the port's group (a worker that joins late gets no connections)
  python3 "$BENCH_DIR/scenario.py" submission --server "mailgate-$label" --host 127.0.0.1 \
    --port 10287 --only submit-1perconn --runs "$RUNS" --messages "$SUBMSGS" \
    --pid "$MGPID" > "$OUT/$label.jsonl"
  kill "$MGPID"; wait "$MGPID" || true
  MGPID=
  redis-cli -p "$REDIS_PORT" flushall > /dev/null
  rm -rf "$MG"
  MG=
done
grep -h '"summary": true' "$OUT"/*.jsonl
