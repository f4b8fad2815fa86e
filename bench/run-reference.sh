#!/usr/bin/env bash
# The reference scenarios (../shared/bench) against Postfix and mailgate in one run, on loopback.
#
#   bench/run-reference.sh [OUT_DIR]        # default: bench-results/<date>
#
# Env: RUNS (3), MSGS (5000, plain), SUBMSGS (2000, TLS), IDLE_MAILGATE (1000,10000),
#      IDLE_POSTFIX (1000: Postfix holds one process per connection, 100 by default),
#      SKIP_POSTFIX=1 (mailgate only), WORKERS (mailgate [server] workers, default: CPUs),
#      BENCH_DIR (the reference harness, default ../shared/bench next to this repository).
# Ports: Postfix 10025/10587/10465, mailgate 10225/10287/10265, the sink 10026 (both relay there).
# Every load is bounded by message count and time; everything stays on 127.0.0.1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
OUT=${1:-$ROOT/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
RUNS=${RUNS:-3} MSGS=${MSGS:-5000} SUBMSGS=${SUBMSGS:-2000}
IDLE_MAILGATE=${IDLE_MAILGATE:-1000,10000} IDLE_POSTFIX=${IDLE_POSTFIX:-1000}
mkdir -p "$OUT"
echo "results in $OUT" >&2

run_server() {  # label, idle counts, ports..., pid options
  local label=$1 idle=$2; shift 2
  "$BENCH_DIR/run-server.sh" --label "$label" --runs "$RUNS" --messages "$MSGS" \
    --skip submission,submissions,idle "$@" --sink-port 10026 > "$OUT/$label-smarthost.jsonl"
  "$BENCH_DIR/run-server.sh" --label "$label" --runs "$RUNS" --messages "$SUBMSGS" \
    --skip smarthost,idle "$@" > "$OUT/$label-submission.jsonl"
  "$BENCH_DIR/run-server.sh" --label "$label" --runs "$RUNS" --idle-counts "$idle" \
    --skip smarthost,submission,submissions "$@" > "$OUT/$label-idle.jsonl"
}

if [ -z "${SKIP_POSTFIX:-}" ]; then
  "$BENCH_DIR/setup-postfix.sh" start > "$OUT/postfix-setup.log" 2>&1
  trap '"$BENCH_DIR/setup-postfix.sh" stop >/dev/null 2>&1 || true' EXIT
  run_server postfix "$IDLE_POSTFIX" --smarthost-port 10025 --submission-port 10587 --submissions-port 10465 \
    --postfix --pidfile /var/spool/postfix/pid/master.pid --pidfile /run/dovecot-bench/master.pid
  "$BENCH_DIR/setup-postfix.sh" stop > /dev/null 2>&1 || true
fi

# mailgate: a fresh instance with the same shape as the Postfix anchor.
MG=$(mktemp -d /tmp/mailgate-bench.XXXXXX)
python3 "$ROOT/bench/mailgate_instance.py" "$MG" ${WORKERS:+--workers "$WORKERS"}
MAILGATE_LOG_LEVEL=WARNING mailgate -c "$MG/mailgate.toml" serve > "$OUT/mailgate-serve.log" 2>&1 &
MGPID=$!
trap 'kill $MGPID 2>/dev/null || true; wait $MGPID 2>/dev/null || true' EXIT
python3 - "$MG" <<'PY'
import socket, sys, time
deadline = time.monotonic() + 30
for port in (10225, 10287, 10265):
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"mailgate did not listen on {port}")
            time.sleep(0.1)
PY
run_server mailgate "$IDLE_MAILGATE" --smarthost-port 10225 --submission-port 10287 --submissions-port 10265 \
  --pid "$MGPID"
kill "$MGPID"; wait "$MGPID" || true

python3 "$BENCH_DIR/summarize.py" "$OUT"/*.jsonl | tee "$OUT/summary.md"
