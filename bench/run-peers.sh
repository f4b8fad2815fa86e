#!/bin/bash
# The peers table of docs/PERFORMANCE.md in one run (issue #19): the reference harness
# ../shared/bench/peers/run-peers.sh (mailgate at HEAD of this checkout, Postfix, Exim,
# chasquid; 10 KiB messages; CPU per message from a cgroup per server), then
#   - a {"meta": "mailgate-build"} line: which variant the harness's venv ran (mailgate.__compiled__:
#     the optional mypyc build of setup.py, or pure Python), and
#   - the large-message scenario (LARGE=0 skips it): smtpload, 1 message per connection, 10 MiB
#     messages ($LARGE_SIZE), $LARGE_MSGS per run, $LARGE_CONC clients, relayed to the sink, for
#     mailgate (the instance the harness made) and Postfix (its message_size_limit raised to
#     mailgate's default, 50 MB, for this scenario only: setup-postfix.sh rewrites main.cf at
#     every start). Labels "mailgate-10MiB" / "postfix-10MiB", cgroup CPU like the harness's.
#
#   OUT=docs/perf-runs/peers.jsonl bench/run-peers.sh            # RUNS=3 MSGS=3000 by default
#   RUNS=1 MSGS=500 ONLY="mailgate postfix" QUIET_LOAD=8 OUT=/tmp/p.jsonl bench/run-peers.sh
#   MAILGATE_MYPYC=1 ... bench/run-peers.sh                      # measure the compiled build
# Then IDLE_COUNT (10,000) idle connections to mailgate (IDLE=0 skips): PSS of the server.
# Every variable of the harness passes through (RUNS, MSGS, ONLY, QUIET_LOAD, QUIET_MAX_S, BASE).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); PROJ=${PROJ:-$(cd "$HERE/.." && pwd)}; export PROJ
SB=${SHARED_BENCH:-/work/shared/bench}   # the reference harness (read-only)
BASE=${BASE:-/tmp/anch}; export BASE
OUT=${OUT:?set OUT to a writable .jsonl file}; export OUT
ONLY=${ONLY:-"mailgate postfix exim chasquid"}; export ONLY
RUNS=${RUNS:-3}
LARGE=${LARGE:-1}; LARGE_SIZE=${LARGE_SIZE:-10485760}; LARGE_MSGS=${LARGE_MSGS:-150}
LARGE_CONC=${LARGE_CONC:-10}; LARGE_CAP=${LARGE_CAP:-300}

MGPID= HB=
CGR=/sys/fs/cgroup/cpuacct
cleanup() {
    [ -n "$MGPID" ] && kill "$MGPID" 2>/dev/null && wait "$MGPID" 2>/dev/null
    "$SB/setup-postfix.sh" stop >/dev/null 2>&1
    for n in mailgate-large postfix-large; do cg_drop $n; done
    [ -n "$HB" ] && rm -rf "$HB"
    return 0
}
trap cleanup EXIT
cg_ok() { [ -w "$CGR/cgroup.procs" ]; }
cg_adopt() {      # cg_adopt NAME PID...: the PIDs and their descendants into anch-NAME
    cg_ok || return 0
    local cg=$CGR/anch-$1 todo next p; shift; mkdir -p "$cg"; todo="$*"
    while [ -n "$todo" ]; do
        next=
        for p in $todo; do echo "$p" > "$cg/cgroup.procs" 2>/dev/null; next="$next $(pgrep -P "$p" | tr '\n' ' ')"; done
        todo=$(echo $next)
    done
}
cg_usage() { cat "$CGR/anch-$1/cpuacct.usage" 2>/dev/null || echo 0; }
cg_drop() {
    local cg=$CGR/anch-$1 p; [ -d "$cg" ] || return 0
    for p in $(cat "$cg/cgroup.procs"); do echo "$p" > "$CGR/cgroup.procs" 2>/dev/null; done
    rmdir "$cg" 2>/dev/null || true
}
# A copy of the harness with one change to the mailgate instance it makes: the AUTH defence's
# thresholds out of reach, exactly as bench/mailgate_instance.py sets them. The load generator
# is ONE client address opening 20 AUTH sessions of one login at the same instant; the AUTH
# defence (issue #11) counts every attempt as a failure while it is in flight, so the unchanged
# harness's mailgate delays them (1, 2, 4... 16 s), refuses the fifth parallel one with 454 4.7.0
# and locks the address out: 0 msg/s, or a p99 of 16 s. The same spirit as the harness's own
# breaker_recipients_per_hour = 0 for this bulk account; the defence still counts everything.
HB=$(mktemp -d /tmp/peers-harness.XXXXXX)   # removed by cleanup
cp -r "$SB/." "$HB/" && chmod -R u+w "$HB"
python3 - "$HB/peers/run-peers.sh" <<'PYEOF' || { echo "cannot patch the harness copy"; exit 1; }
import sys
p = sys.argv[1]; s = open(p).read()
anchor = 'c.setdefault("ratelimits", {})["breaker_recipients_per_hour"] = 0'
assert s.count(anchor) == 1, "the harness changed: review the patch"
s = s.replace(anchor, anchor + '\nc["ratelimits"].update(auth_delay_after=10000, '
              'auth_refuse_after=10000, auth_login_refuse_after=10000, '
              'auth_parallel_per_client=1000, auth_parallel_per_login=1000, auth_ban_after=0)')
open(p, "w").write(s)
PYEOF
echo '{"meta": "harness-patch", "mailgate_config": {"ratelimits": {"auth_delay_after": 10000, "auth_refuse_after": 10000, "auth_login_refuse_after": 10000, "auth_parallel_per_client": 1000, "auth_parallel_per_login": 1000, "auth_ban_after": 0}}, "why": "one load-generator address, 20 parallel AUTH sessions: the AUTH defence delays and locks it out otherwise (as bench/mailgate_instance.py)"}' > "$OUT.patch"

# The harness prints its table at the end; ours is printed once the large scenario is in.
"$HB/peers/run-peers.sh" > "$OUT.harness.txt" 2>&1
status=$?
[ $status -eq 0 ] || { cat "$OUT.harness.txt"; exit $status; }
cat "$OUT.patch" >> "$OUT"; rm -f "$OUT.patch"

if [ -x "$BASE/venv/bin/python" ]; then
    "$BASE/venv/bin/python" - >> "$OUT" <<'PYEOF'
import json, mailgate, mailgate.smtp.server as s
print(json.dumps({"meta": "mailgate-build", "compiled": mailgate.__compiled__,
                  "variant": "mypyc" if mailgate.__compiled__ else "python",
                  "smtp_server_module": s.__file__.rsplit("/", 1)[-1]}))
PYEOF
fi

large() {   # large CGROUP LABEL PORT [scenario.py args...]
    local cgn=$1 label=$2 port=$3 u0 u1; shift 3
    u0=$(cg_usage "$cgn")
    python3 "$SB/scenario.py" smarthost --server "$label" --host 127.0.0.1 --port "$port" \
        --sink-port 10026 --runs "$RUNS" --messages "$LARGE_MSGS" --concurrency "$LARGE_CONC" \
        --size "$LARGE_SIZE" --duration-cap "$LARGE_CAP" --e2e-timeout "$LARGE_CAP" \
        --only smtpload-1perconn "$@" >> "$OUT" 2>> "$OUT.large.err"
    u1=$(cg_usage "$cgn")
    cg_ok && echo "{\"meta\": \"cgroup-cpu\", \"server\": \"$label\", \"scenario\": \"smarthost\", \"variant\": \"smtpload-1perconn\", \"cpu_s\": $(awk -v a="$u0" -v b="$u1" 'BEGIN{printf "%.2f", (b-a)/1e9}')}" >> "$OUT"
    return 0
}

if [ "$LARGE" = 1 ]; then
    echo "{\"meta\": \"large\", \"size\": $LARGE_SIZE, \"messages\": $LARGE_MSGS, \"concurrency\": $LARGE_CONC, \"runs\": $RUNS, \"load1\": $(cut -d' ' -f1 /proc/loadavg)}" >> "$OUT"
    if [[ " $ONLY " == *" mailgate "* ]]; then
        export MAILGATE_CONFIG=$BASE/mailgate-run/mg/mailgate.toml
        "$BASE/venv/bin/mailgate" serve > "$BASE/mailgate-run/serve-large.log" 2>&1 & MGPID=$!
        for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/10225) 2>/dev/null && break; sleep 0.5; done
        cg_adopt mailgate-large "$MGPID"
        large mailgate-large mailgate-10MiB 10225 --pid "$MGPID"
        kill "$MGPID"; wait "$MGPID" 2>/dev/null; MGPID=
        unset MAILGATE_CONFIG
        cg_drop mailgate-large
    fi
fi

# Idle connections (IDLE=0 skips): mailgate holding $IDLE_COUNT connections after EHLO, PSS of
# the server's processes (the harness's instance, connection limits raised to 20,000).
IDLE=${IDLE:-1}; IDLE_COUNT=${IDLE_COUNT:-10000}
if [ "$IDLE" = 1 ] && [[ " $ONLY " == *" mailgate "* ]]; then
    cfg=$BASE/mailgate-run/mg/mailgate-idle.toml
    "$BASE/venv/bin/python" - "$BASE/mailgate-run/mg/mailgate.toml" "$cfg" <<'PYEOF'
import sys, tomllib, tomli_w
c = tomllib.load(open(sys.argv[1], "rb"))
c.setdefault("limits", {}).update(max_connections=20000, max_connections_per_ip=20000)
open(sys.argv[2], "wb").write(tomli_w.dumps(c).encode())
PYEOF
    export MAILGATE_CONFIG=$cfg
    "$BASE/venv/bin/mailgate" serve > "$BASE/mailgate-run/serve-idle.log" 2>&1 & MGPID=$!
    for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/10225) 2>/dev/null && break; sleep 0.5; done
    python3 "$SB/scenario.py" idle --server mailgate --host 127.0.0.1 --port 10225 \
        --counts "$IDLE_COUNT" --pid "$MGPID" >> "$OUT" 2>> "$OUT.large.err"
    kill "$MGPID"; wait "$MGPID" 2>/dev/null; MGPID=
    unset MAILGATE_CONFIG
fi

if [ "$LARGE" = 1 ]; then
    if [[ " $ONLY " == *" postfix "* ]]; then
        "$SB/setup-postfix.sh" start > "$BASE/run/postfix-large-setup.log" 2>&1 || { echo "postfix setup failed"; exit 1; }
        postconf -e message_size_limit=52428800 && postfix reload > /dev/null 2>&1
        cg_adopt postfix-large "$(cat /var/spool/postfix/pid/master.pid)" "$(cat /run/dovecot-bench/master.pid)"
        large postfix-large postfix-10MiB 10025 --postfix --pidfile /var/spool/postfix/pid/master.pid \
            --pidfile /run/dovecot-bench/master.pid
        "$SB/setup-postfix.sh" stop > /dev/null 2>&1
        cg_drop postfix-large
    fi
fi

echo "results: $OUT"
python3 "$SB/peers/table.py" "$OUT"
