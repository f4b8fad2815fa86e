#!/usr/bin/env bash
# Submission (587, STARTTLS + AUTH, one message per connection) with [state] in Redis, client
# addresses pinned to one worker or not, and per-process counters (pinned) for reference:
# three mailgate instances one after the other in one run, each measured RUNS times by the
# reference harness (../shared/bench/scenario.py, medians in its "summary" lines).
#
#   bench/run-pinning.sh [OUT_DIR]        # default: bench-results/pinning-<date>
#
# Env: RUNS (3), SUBMSGS (2000), WORKERS (2), REDIS_PORT (10379: a redis-server of this run's
#      own, stopped by its PID), BENCH_DIR (default ../shared/bench next to this repository);
#      REDIS_URL: use that Redis instead of starting one (a shared one: only this run's key
#      prefix, REDIS_PREFIX, default mailgate-bench-<pid>:, is deleted between variants);
#      VARIANTS: label:state:pin words (default: the three below; memory-unpinned:none:no is
#      per-process counters unpinned, for reference only: its AUTH defence is not exact).
# mailgate runs `serve --no-delivery` (receiving only) on 127.0.0.1:10287; every load is bounded
# by message count and time; everything stays on 127.0.0.1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
OUT=${1:-$ROOT/bench-results/pinning-$(date -u +%Y%m%dT%H%M%SZ)}
RUNS=${RUNS:-3} SUBMSGS=${SUBMSGS:-2000} WORKERS=${WORKERS:-2} REDIS_PORT=${REDIS_PORT:-10379}
mkdir -p "$OUT"
echo "results in $OUT" >&2

REDIS_PREFIX=${REDIS_PREFIX:-mailgate-bench-$$:}
VARIANTS=${VARIANTS:-memory-pinned:none:auto redis-pinned:redis:yes redis-unpinned:redis:auto}
REDIS_PID=
if [ -z "${REDIS_URL:-}" ]; then
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --daemonize no \
    > "$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
fi
MGPID= MG=
forget_prefix() {  # this run's keys only: the Redis may be shared
  redis-cli -u "$REDIS_URL" --scan --pattern "$REDIS_PREFIX*" \
    | xargs -r -n 500 redis-cli -u "$REDIS_URL" del > /dev/null
}
cleanup() {
  [ -n "$MGPID" ] && { kill "$MGPID" 2>/dev/null || true; wait "$MGPID" 2>/dev/null || true; }
  [ -n "$MG" ] && rm -rf "$MG"
  forget_prefix || true
  [ -n "$REDIS_PID" ] && { kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; }
  return 0
}
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && break; sleep 0.2; done

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

for variant in $VARIANTS; do
  IFS=: read -r label state pin <<< "$variant"
  url=""; [ "$state" = redis ] && url="$REDIS_URL"
  if ss -ltnH 'sport = :10287' | grep -q .; then
    echo "port 10287 is in use by another process: not measuring someone else's server" >&2
    exit 1
  fi
  MG=$(mktemp -d /tmp/mailgate-bench.XXXXXX)
  python3 "$ROOT/bench/mailgate_instance.py" "$MG" --workers "$WORKERS" --state "$url" \
    --state-prefix "$REDIS_PREFIX" --pin-clients "$pin" > /dev/null
  MAILGATE_LOG_LEVEL=WARNING mailgate -c "$MG/mailgate.toml" serve --no-delivery \
    > "$OUT/$label-serve.log" 2>&1 &
  MGPID=$!
  wait_listening
  kill -0 "$MGPID"  # ours listens, not someone else's
  sleep 2  # every worker in the port's group (a worker that joins late gets no connections)
  echo "{\"meta\": \"variant\", \"label\": \"$label\", \"load1\": $(cut -d' ' -f1 /proc/loadavg), \"date\": \"$(date -u +%FT%TZ)\"}" >> "$OUT/meta.jsonl"
  python3 "$BENCH_DIR/scenario.py" submission --server "mailgate-$label" --host 127.0.0.1 \
    --port 10287 --only submit-1perconn --runs "$RUNS" --messages "$SUBMSGS" \
    --pid "$MGPID" > "$OUT/$label.jsonl"
  kill "$MGPID"; wait "$MGPID" || true
  MGPID=
  forget_prefix
  rm -rf "$MG"
  MG=
done
echo "{\"meta\": \"end\", \"load1\": $(cut -d' ' -f1 /proc/loadavg), \"date\": \"$(date -u +%FT%TZ)\"}" >> "$OUT/meta.jsonl"
grep -h '"summary": true' "$OUT"/*.jsonl
