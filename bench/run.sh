#!/usr/bin/env bash
# fwgate comparative benchmark: direct-to-backend, fwgate, nginx and HAProxy in front of one
# backend, on loopback, on this machine. One command from a fresh clone:
#
#     bash bench/run.sh
#
# Installs wrk, nginx and haproxy with apt-get when missing, builds fwgate and bench/loadtool in
# release mode, runs every measurement RUNS times (medians reported), prints a Markdown table
# and writes it to bench/RESULTS.md. See bench/README.md for what is measured and why.
#
# Knobs (environment): RUNS (5), WRK_SECS (10), WRK_CONNS (50), HS_COUNT (10000),
# HS_CONC (50), ECHO_CONNS (100), ECHO_MSGS (600 per connection), ECHO_SIZE (64),
# IDLE_CONNS (10000, lowered if the fd limit cannot hold it), REFUSED_COUNT (20000),
# BASE_PORT (19000), FWGATE_BIN (use this fwgate binary instead of building the repo's; for
# development only), RESULTS (bench/RESULTS.md), KEEP_TMP=1 (keep configs and logs).
set -uo pipefail

T_START=$(date +%s)
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH_DIR")

RUNS=${RUNS:-5}
WRK_SECS=${WRK_SECS:-10}
WRK_CONNS=${WRK_CONNS:-50}
HS_COUNT=${HS_COUNT:-10000}
HS_CONC=${HS_CONC:-50}
ECHO_CONNS=${ECHO_CONNS:-100}
ECHO_MSGS=${ECHO_MSGS:-600}
ECHO_SIZE=${ECHO_SIZE:-64}
IDLE_CONNS=${IDLE_CONNS:-10000}
REFUSED_COUNT=${REFUSED_COUNT:-20000}
BASE_PORT=${BASE_PORT:-19000}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
ADMITTED_VERSION="3.7.0"
REFUSED_VERSION="3.8.0-b3"

BACKEND_ADDR="127.0.0.1:$BASE_PORT"
FWGATE_ADDR="127.0.0.1:$((BASE_PORT + 1))"
NGINX_ADDR="127.0.0.1:$((BASE_PORT + 2))"
HAPROXY_ADDR="127.0.0.1:$((BASE_PORT + 3))"
FWGATE_ADMIN="127.0.0.1:$((BASE_PORT + 901))"

PROXY_CPU=0 # the proxy under test runs alone on this core
LOAD_CPU=1  # load generators and the backend share this one

log() { printf '[%4ds] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ------------------------------------------------------------------------------ cleanup
TMP=$(mktemp -d /tmp/fwgate-bench.XXXXXX)
declare -a STARTED=() # every PID this script started
cleanup() {
    local pid
    # Only PIDs still on the list: a process already stopped and reaped is taken off it, so a
    # recycled PID is never signalled.
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${STARTED[@]}"; do stop_pid "$pid"; done
    if [[ "${KEEP_TMP:-0}" == 1 ]]; then log "configs and logs kept in $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
started() { STARTED+=("$1"); }
stop_pid() { # pid (one this script started): TERM, wait up to 3 s, KILL, reap, forget
    local pid=$1 i p keep=()
    if kill -TERM "$pid" 2>/dev/null; then
        for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    for p in "${STARTED[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    STARTED=("${keep[@]}")
    return 0
}

# ------------------------------------------------------------------------------ tools
need_pkgs=()
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_pkgs+=(nginx-light)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || need_pkgs+=(haproxy)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
if ((${#need_pkgs[@]})); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
    if command -v apt-get >/dev/null; then
        log "installing ${need_pkgs[*]} with apt-get"
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"; } \
            >"$TMP/apt.log" 2>&1 || log "WARNING: apt-get install ${need_pkgs[*]} failed (see below); what is missing is skipped"
        tail -n 3 "$TMP/apt.log" >&2
    else
        log "WARNING: no apt-get: cannot install ${need_pkgs[*]}; what is missing is skipped"
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin"
command -v taskset >/dev/null || die "taskset (util-linux) is required to pin the proxy and the load side"
command -v curl >/dev/null || die "curl is required (fwgate's admin API)"
HAVE_WRK=1; command -v wrk >/dev/null || { HAVE_WRK=0; log "SKIP: wrk is not installed: the HTTP rows are skipped"; }
HAVE_NGINX=1; command -v nginx >/dev/null || { HAVE_NGINX=0; log "SKIP: nginx is not installed: its column is skipped"; }
HAVE_HAPROXY=1; command -v haproxy >/dev/null || { HAVE_HAPROXY=0; log "SKIP: haproxy is not installed: its column is skipped"; }
(($(nproc) >= 2)) || { PROXY_CPU=0; LOAD_CPU=0; log "WARNING: one CPU only: proxy and load side share it"; }

# ------------------------------------------------------------------------------ fd limit
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
# The proxy holds two sockets per proxied WebSocket (device side + backend side).
max_idle=$(((NOFILE - 200) / 2))
IDLE_REQUESTED=$IDLE_CONNS
if ((IDLE_CONNS > max_idle)); then
    IDLE_CONNS=$max_idle
    log "WARNING: open-file limit is $NOFILE (hard limit $(ulimit -Hn), cannot be raised here): idle WebSockets lowered from $IDLE_REQUESTED to $IDLE_CONNS"
fi

# ------------------------------------------------------------------------------ build
export CARGO_TERM_PROGRESS_WHEN=never
if [[ -n "${FWGATE_BIN:-}" ]]; then
    log "using FWGATE_BIN=$FWGATE_BIN (not building the repo)"
else
    log "building fwgate (cargo build --release in $REPO)"
    (cd "$REPO" && cargo build --release --quiet) || die "fwgate build failed"
    FWGATE_BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/fwgate"
fi
[[ -x "$FWGATE_BIN" ]] || die "no fwgate binary at $FWGATE_BIN"
log "building bench/loadtool"
(cd "$BENCH_DIR/loadtool" && cargo build --release --locked --quiet) || die "loadtool build failed"
LOADTOOL="${CARGO_TARGET_DIR:-$BENCH_DIR/loadtool/target}/release/loadtool"
[[ -x "$LOADTOOL" ]] || die "no loadtool binary at $LOADTOOL"
T_BUILT=$(date +%s)

for a in "$BACKEND_ADDR" "$FWGATE_ADDR" "$NGINX_ADDR" "$HAPROXY_ADDR" "$FWGATE_ADMIN"; do
    if (exec 3<>"/dev/tcp/${a%:*}/${a#*:}") 2>/dev/null; then die "port ${a#*:} is already in use (set BASE_PORT)"; fi
done

# ------------------------------------------------------------------------------ /proc helpers
CLK_TCK=$(getconf CLK_TCK)
declare -A PIDS=() # target -> space-separated PIDs of its processes (nginx: master + worker)
cpu_ticks() { # pids...: utime+stime summed
    local p sum=0 rest
    for p in "$@"; do
        [[ -r /proc/$p/stat ]] || continue
        rest=$(sed 's/.*) //' "/proc/$p/stat") # fields from 3 on (comm may hold spaces)
        set -- $rest
        sum=$((sum + ${12} + ${13}))           # fields 14 and 15
    done
    echo "$sum"
}
rss_kb() { # pids...: VmRSS summed
    local p sum=0 v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null)
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}
kv() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2" | head -n1; }
wait_for() { # seconds command...: poll until the command succeeds
    local deadline=$(($(date +%s) + $1)); shift
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) >= deadline)) && return 1
        sleep 0.1
    done
}
port_open() { (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null; }

# ------------------------------------------------------------------------------ the backend
BACKEND_PID=""
start_backend() {
    taskset -c "$LOAD_CPU" "$LOADTOOL" backend --http "$BACKEND_ADDR" --max-secs 1800 >"$TMP/backend.log" 2>&1 &
    BACKEND_PID=$!
    started "$BACKEND_PID"
    wait_for 10 port_open "$BACKEND_ADDR" || die "backend did not start: $(cat "$TMP/backend.log")"
    PIDS[direct]=$BACKEND_PID
}

# ------------------------------------------------------------------------------ fwgate
TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
mkdir -p "$TMP/fwgate/state"
cp "$BENCH_DIR/rules-100.toml" "$TMP/fwgate/rules.toml" 2>/dev/null || {
    bash "$BENCH_DIR/gen-rules.sh" "$TMP/fwgate/rules.toml" || die "cannot generate the rules file"
}
cat >"$TMP/fwgate/fwgate.toml" <<EOF
rules = "rules.toml"
state_dir = "state"
# One worker thread, like nginx's worker_processes 1 and HAProxy's nbthread 1.
workers = 1

[listen]
addr = "$FWGATE_ADDR"

[upstream]
addr = "$BACKEND_ADDR"

[admin]
addr = "$FWGATE_ADMIN"

[log]
access = false
EOF
FWGATE_CHECKED=""
start_fwgate() {
    # One worker thread (workers = 1 in its config), pinned with the rest of the process.
    FWGATE_ADMIN_TOKEN="$TOKEN" \
        taskset -c "$PROXY_CPU" "$FWGATE_BIN" run --config "$TMP/fwgate/fwgate.toml" >>"$TMP/fwgate/fwgate.log" 2>&1 &
    local pid=$!
    started "$pid"
    PIDS[fwgate]=$pid
    wait_for 15 curl -fs "http://$FWGATE_ADMIN/readyz" || die "fwgate did not become ready: $(tail -n 20 "$TMP/fwgate/fwgate.log")"
    # The kill-switch entry is persisted in state_dir: add it once, check it is in force each start.
    if ! curl -fs "http://$FWGATE_ADMIN/v1/killswitch" | grep -q '0\.0\.1'; then
        local out
        out=$(curl -s -w ' HTTP %{http_code}' -X POST -H "Authorization: Bearer $TOKEN" \
            -H 'Content-Type: application/json' "http://$FWGATE_ADMIN/v1/killswitch" \
            -d '{"versions":"=0.0.1","reason":"bench"}')
        [[ "$out" =~ HTTP\ 2[0-9][0-9]$ ]] || die "kill-switch entry refused: $out"
    fi
    # The limit rule (issue 7) is in rules-100.toml: "throttle-3.9", 3.9.* at 50/s per device.
    # A fwgate build without limit rules refuses that file at start: then regenerate it with
    # NO_LIMIT_RULE=1 bash bench/gen-rules.sh (TODO(rate limit) there marks the place).
    if [[ -z "$FWGATE_CHECKED" ]]; then
        local ok_code deny_code kill_code nrules
        ok_code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Firmware-Version: $ADMITTED_VERSION" "http://$FWGATE_ADDR/")
        deny_code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Firmware-Version: $REFUSED_VERSION" "http://$FWGATE_ADDR/")
        kill_code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Firmware-Version: 0.0.1" "http://$FWGATE_ADDR/")
        nrules=$(curl -fs "http://$FWGATE_ADMIN/v1/rules" | grep -o '"name"' | wc -l)
        log "fwgate: $nrules rule names in /v1/rules, kill switch =0.0.1 -> $kill_code, $ADMITTED_VERSION -> $ok_code, $REFUSED_VERSION -> $deny_code"
        [[ "$ok_code" == 200 ]] || die "fwgate does not admit $ADMITTED_VERSION (got $ok_code)"
        [[ "$deny_code" =~ ^[45] ]] || die "fwgate does not refuse $REFUSED_VERSION (got $deny_code)"
        [[ "$kill_code" =~ ^[45] ]] || die "the kill switch does not refuse 0.0.1 (got $kill_code)"
        FWGATE_CHECKED=1
    fi
}

# ------------------------------------------------------------------------------ nginx
NGINX_MAP=""
if ((HAVE_NGINX)); then
    mkdir -p "$TMP/nginx"
    cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log error;
daemon off;
events {
    # Two connections per proxied WebSocket, but with worker_connections near 2 x N nginx resets
    # ~150-600 of 9,900 handshakes (measured); with headroom the fd limit is what bounds it.
    # nginx warns that this exceeds the fd limit. The connection slots are allocated (and
    # touched) at start, so they are in the "before" RSS, not in the per-WebSocket delta.
    worker_connections $((4 * IDLE_CONNS + 1000));
}
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default; the others don't.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    map \$http_upgrade \$connection_upgrade {
        default upgrade;
        ''      '';
    }
    upstream backend {
        server $BACKEND_ADDR;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen $NGINX_ADDR;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }
    }
}
EOF
fi
start_nginx() {
    taskset -c "$PROXY_CPU" nginx -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" \
        >>"$TMP/nginx/stdout.log" 2>&1 &
    local pid=$! kids=""
    started "$pid"
    wait_for 10 port_open "$NGINX_ADDR" || die "nginx did not start: $(tail -n 5 "$TMP/nginx/error.log" "$TMP/nginx/stdout.log")"
    wait_for 5 pgrep -P "$pid" || die "nginx has no worker"
    kids=$(pgrep -P "$pid" | tr '\n' ' ')
    PIDS[nginx]="$pid $kids"
}

# ------------------------------------------------------------------------------ HAProxy
if ((HAVE_HAPROXY)); then
    mkdir -p "$TMP/haproxy"
    cat >"$TMP/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $(((NOFILE - 100) / 2))
    # no 'log' line: logging off

defaults
    mode http
    option http-keep-alive
    maxconn $(((NOFILE - 100) / 2))
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 75s
    timeout tunnel 1h

frontend fe
    bind $HAPROXY_ADDR
    default_backend be

backend be
    http-reuse safe
    server s1 $BACKEND_ADDR
EOF
fi
start_haproxy() {
    taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/haproxy/haproxy.cfg" >>"$TMP/haproxy/haproxy.log" 2>&1 &
    local pid=$!
    started "$pid"
    wait_for 10 port_open "$HAPROXY_ADDR" || die "haproxy did not start: $(tail -n 5 "$TMP/haproxy/haproxy.log")"
    PIDS[haproxy]=$pid
}

TARGETS=(direct fwgate)
((HAVE_NGINX)) && TARGETS+=(nginx)
((HAVE_HAPROXY)) && TARGETS+=(haproxy)
declare -A ADDR=([direct]=$BACKEND_ADDR [fwgate]=$FWGATE_ADDR [nginx]=$NGINX_ADDR [haproxy]=$HAPROXY_ADDR)

start_target() {
    case $1 in
        direct) start_backend ;;
        fwgate) start_fwgate ;;
        nginx) start_nginx ;;
        haproxy) start_haproxy ;;
    esac
}
stop_target() {
    local p
    # nginx: TERM to the master stops the worker too
    p=${PIDS[$1]%% *}
    stop_pid "$p"
    PIDS[$1]=""
}

# ------------------------------------------------------------------------------ measurements
declare -A R=() # "metric|target" -> values of each run, space separated
add() { R["$1|$2"]+="$3 "; }
RAW="$TMP/raw.txt"
: >"$RAW"
raw() { echo "$*" >>"$RAW"; }

hdr=(--header "X-Firmware-Version: $ADMITTED_VERSION")
# Every WebSocket carries its own X-Device-Id (--device-ids PREFIX-n), as a fleet would: fwgate's
# reconnect backoff (on by default) keys on the device id, else on the client IP, and all of
# this traffic comes from 127.0.0.1 — one "device" reconnecting 10,000 times would (rightly)
# be held back. nginx and HAProxy just forward the header.
lt() { taskset -c "$LOAD_CPU" "$LOADTOOL" "$@"; }

to_us() { # wrk latency "812.00us" / "1.23ms" / "1.01s" -> µs
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); print v + 0 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v * 1000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000000 }
        else print "NA" }'
}
per_op_us() { awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else print "NA" }'; }

measure_http() { # target run
    local t=$1 c0 c1 out reqs rps p99 errs
    c0=$(cpu_ticks ${PIDS[$t]})
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$WRK_CONNS" -d"${WRK_SECS}s" --latency -H "X-Firmware-Version: $ADMITTED_VERSION" "http://${ADDR[$t]}/" 2>&1)
    c1=$(cpu_ticks ${PIDS[$t]})
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    errs=$(awk '/Non-2xx|Socket errors/' <<<"$out" | tr '\n' ' ')
    [[ -n "$errs" ]] && log "  $t http: $errs"
    add http_rps "$t" "${rps:-NA}"
    add http_p99 "$t" "${p99:-NA}"
    add http_cpu "$t" "$(per_op_us $((c1 - c0)) "${reqs:-0}")"
    raw "run$2 $t http: reqs=$reqs rps=$rps p99_us=$p99 cpu_ticks=$((c1 - c0)) $errs"
}

measure_handshakes() { # target run
    local t=$1 c0 c1 out ok
    c0=$(cpu_ticks ${PIDS[$t]})
    out=$(lt handshakes --target "${ADDR[$t]}" --path /ws "${hdr[@]}" --device-ids "hs-$t-r$2" --count "$HS_COUNT" --concurrency "$HS_CONC" --max-secs 60 2>"$TMP/lt.err")
    c1=$(cpu_ticks ${PIDS[$t]})
    [[ -s "$TMP/lt.err" ]] && log "  $t handshakes: $(head -c 300 "$TMP/lt.err")"
    ok=$(kv ok "$out")
    add hs_rate "$t" "$(kv rate "$out")"
    add hs_p99 "$t" "$(kv p99_us "$out")"
    add hs_cpu "$t" "$(per_op_us $((c1 - c0)) "${ok:-0}")"
    raw "run$2 $t handshakes: $out cpu_ticks=$((c1 - c0))"
}

measure_echo() { # target run
    local t=$1 c0 c1 out ok
    c0=$(cpu_ticks ${PIDS[$t]})
    out=$(lt echo --target "${ADDR[$t]}" --path /ws "${hdr[@]}" --device-ids "echo-$t-r$2" --connections "$ECHO_CONNS" --messages "$ECHO_MSGS" --size "$ECHO_SIZE" --max-secs 60 2>"$TMP/lt.err")
    c1=$(cpu_ticks ${PIDS[$t]})
    [[ -s "$TMP/lt.err" ]] && log "  $t echo: $(head -c 300 "$TMP/lt.err")"
    ok=$(kv ok "$out")
    add echo_rate "$t" "$(kv rate "$out")"
    add echo_p99 "$t" "$(kv p99_us "$out")"
    add echo_cpu "$t" "$(per_op_us $((c1 - c0)) "${ok:-0}")"
    raw "run$2 $t echo: $out cpu_ticks=$((c1 - c0))"
}

measure_refused() { # run (fwgate only)
    local c0 c1 out ok
    c0=$(cpu_ticks ${PIDS[fwgate]})
    out=$(lt refused --target "$FWGATE_ADDR" --path /ws --device-ids "refused-r$1" --header "X-Firmware-Version: $REFUSED_VERSION" --count "$REFUSED_COUNT" --concurrency "$HS_CONC" --max-secs 60 2>"$TMP/lt.err")
    c1=$(cpu_ticks ${PIDS[fwgate]})
    [[ -s "$TMP/lt.err" ]] && log "  fwgate refused: $(head -c 300 "$TMP/lt.err")"
    ok=$(kv ok "$out")
    add ref_rate fwgate "$(kv rate "$out")"
    add ref_p99 fwgate "$(kv p99_us "$out")"
    add ref_cpu fwgate "$(per_op_us $((c1 - c0)) "${ok:-0}")"
    raw "run$1 fwgate refused: $out cpu_ticks=$((c1 - c0))"
}

WARM=0
warm_up() { # target: lazy one-time allocations out of the way
    WARM=$((WARM + 1))
    lt handshakes --target "${ADDR[$1]}" --path /ws "${hdr[@]}" --device-ids "warm$WARM-$1" --count 200 --concurrency 10 --max-secs 20 >/dev/null 2>&1
    lt echo --target "${ADDR[$1]}" --path /ws "${hdr[@]}" --device-ids "warmecho$WARM-$1" --connections 10 --messages 10 --max-secs 20 >/dev/null 2>&1
    if ((HAVE_WRK)); then taskset -c "$LOAD_CPU" wrk -t1 -c"$WRK_CONNS" -d1s -H "X-Firmware-Version: $ADMITTED_VERSION" "http://${ADDR[$1]}/" >/dev/null 2>&1; fi
}

measure_idle() { # target run: on a freshly started process
    local t=$1 r0 r1 pid out line open i
    stop_target "$t"
    start_target "$t"
    warm_up "$t"
    sleep 0.5
    r0=$(rss_kb ${PIDS[$t]})
    out="$TMP/idle.out"
    : >"$out"
    # started directly (not through the lt function) so that $! is the loadtool itself
    taskset -c "$LOAD_CPU" "$LOADTOOL" idle --target "${ADDR[$t]}" --path /ws "${hdr[@]}" --device-ids "idle-$t-r$2" --connections "$IDLE_CONNS" \
        --hold-secs 40 --max-secs 100 >"$out" 2>"$TMP/lt.err" &
    pid=$!
    started "$pid"
    for i in $(seq 600); do grep -q ALL_OPEN "$out" && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    sleep 1 # let the proxy finish setting up the last tunnels
    r1=$(rss_kb ${PIDS[$t]})
    line=$(grep ALL_OPEN "$out")
    stop_pid "$pid"
    open=$(kv open " $line")
    [[ -s "$TMP/lt.err" ]] && log "  $t idle: $(head -c 300 "$TMP/lt.err")"
    if [[ -n "$open" && "$open" -gt 0 ]]; then
        add idle_bytes "$t" "$(awk -v a="$r0" -v b="$r1" -v n="$open" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }')"
    else
        add idle_bytes "$t" NA
    fi
    add idle_open "$t" "${open:-0}"
    raw "run$2 $t idle: $line rss_before_kb=$r0 rss_after_kb=$r1"
    sleep 1 # closes settle
}

# Other processes' CPU during the measurements (this machine may be shared): all busy time in
# /proc/stat minus what this script's processes used (reaped descendants + live ones).
proc_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
self_children() { sed 's/.*) //' "/proc/$$/stat" | awk '{ print $12 + $13 + $14 + $15 }'; }
FOREIGN_BUSY0=$(proc_busy)
FOREIGN_SELF0=$(self_children)
FOREIGN_T0=$(date +%s.%N)

# ------------------------------------------------------------------------------ run
log "targets: ${TARGETS[*]}; proxy on CPU $PROXY_CPU, load side on CPU $LOAD_CPU; $RUNS runs each"
start_backend
for t in "${TARGETS[@]}"; do [[ $t == direct ]] || start_target "$t"; done

# The machine's speed drifts (other tenants, frequency): each run starts with a different target,
# so no target is always measured first or last, and each metric is measured for every target
# back to back, so the targets it compares are measured seconds apart, not a minute.
in_turn() { # run -> the targets, rotated by run
    local k=$((($1 - 1) % ${#TARGETS[@]}))
    ORDER=("${TARGETS[@]:k}" "${TARGETS[@]:0:k}")
}

log "phase 1/2: resident memory per idle WebSocket ($IDLE_CONNS open, fresh process each run)"
for run in $(seq "$RUNS"); do
    in_turn "$run"
    for t in "${ORDER[@]}"; do
        measure_idle "$t" "$run"
        log "  run $run $t: $(tail -n1 "$RAW" | cut -d: -f2-)"
    done
done

log "phase 2/2: throughput, latency and CPU per operation (each metric for every target in turn)"
for t in "${TARGETS[@]}"; do warm_up "$t"; done
for run in $(seq "$RUNS"); do
    in_turn "$run"
    if ((HAVE_WRK)); then for t in "${ORDER[@]}"; do measure_http "$t" "$run"; done; fi
    for t in "${ORDER[@]}"; do measure_handshakes "$t" "$run"; done
    for t in "${ORDER[@]}"; do measure_echo "$t" "$run"; done
    measure_refused "$run"
    log "  run $run done (order: ${ORDER[*]})"
done
T_MEASURED=$(date +%s)
# shellcheck disable=SC2086
ours=$(($(self_children) - FOREIGN_SELF0 + $(cpu_ticks ${PIDS[direct]:-} ${PIDS[fwgate]:-} ${PIDS[nginx]:-} ${PIDS[haproxy]:-})))
FOREIGN_PCT=$(awk -v b0="$FOREIGN_BUSY0" -v b1="$(proc_busy)" -v o="$ours" -v t0="$FOREIGN_T0" -v t1="$(date +%s.%N)" \
    -v hz="$CLK_TCK" -v n="$(nproc)" 'BEGIN { f = (b1 - b0 - o) / ((t1 - t0) * hz * n) * 100; if (f < 0) f = 0; printf "%.0f", f }')
if ((FOREIGN_PCT > 10)); then
    log "WARNING: other processes used ${FOREIGN_PCT}% of the machine's CPU during the measurements: expect noise"
fi

# ------------------------------------------------------------------------------ table
median() { # values... (NA ignored)
    printf '%s\n' "$@" | grep -E '^[0-9.eE+-]+$' | sort -g |
        awk '{ a[NR] = $1 } END { if (NR == 0) print "NA"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
declare -A M=()
for key in "${!R[@]}"; do
    # shellcheck disable=SC2086
    M[$key]=$(median ${R[$key]})
done
fmt() { # value decimals
    awk -v v="$1" -v d="$2" 'BEGIN { if (v == "" || v == "NA") print "n/a"; else printf "%.*f", d, v }'
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "NA" || b == "NA" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'
}
ROWS=(
    "http_rps|HTTP requests/s (wrk, $WRK_CONNS conns, ${WRK_SECS}s)|0"
    "http_p99|HTTP p99 latency (µs)|0"
    "http_cpu|CPU per HTTP request (µs)|2"
    "hs_rate|WebSocket handshakes/s ($HS_CONC in flight)|0"
    "hs_p99|Handshake p99 latency (µs)|0"
    "hs_cpu|CPU per admitted handshake (µs)|1"
    "echo_rate|Echo messages/s ($ECHO_CONNS conns, ${ECHO_SIZE} B)|0"
    "echo_p99|Echo round-trip p99 (µs)|0"
    "echo_cpu|CPU per echoed message (µs)|2"
    "idle_bytes|Resident memory per idle WebSocket (bytes, $IDLE_CONNS open)|0"
    "ref_rate|Refused handshakes/s ($REFUSED_VERSION)|0"
    "ref_p99|Refused handshake p99 latency (µs)|0"
    "ref_cpu|CPU per refused handshake (µs)|1"
)
col() { local v=${M["$1|$2"]:-}; if [[ -z "$v" ]]; then echo "—"; else fmt "$v" "$3"; fi; }
table() {
    echo "| metric | direct | fwgate | nginx | HAProxy | fwgate/nginx | fwgate/direct |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    local row key label d
    for row in "${ROWS[@]}"; do
        IFS='|' read -r key label d <<<"$row"
        echo "| $label | $(col "$key" direct "$d") | $(col "$key" fwgate "$d") | $(col "$key" nginx "$d") | $(col "$key" haproxy "$d") | $(ratio "${M["$key|fwgate"]:-}" "${M["$key|nginx"]:-}") | $(ratio "${M["$key|fwgate"]:-}" "${M["$key|direct"]:-}") |"
    done
    echo "| Admitted/refused CPU per handshake (fwgate) | — | $(ratio "${M["hs_cpu|fwgate"]:-}" "${M["ref_cpu|fwgate"]:-}") | — | — | | |"
}
# Issue 7's targets, checked against this run.
targets() {
    local f n h
    chk() { # label verdict-expression (awk) values...
        local label=$1 expr=$2; shift 2
        local v
        v=$(awk -v f="$1" -v n="$2" -v h="$3" "BEGIN { if (f == \"\" || f == \"NA\") { print \"n/a\"; exit } if (n == \"\" || n == \"NA\") n = \"\"; if (h == \"\" || h == \"NA\") h = \"\"; print (($expr) ? \"met\" : \"MISSED\") }")
        echo "- $label: **$v**"
    }
    for m in http_rps hs_rate; do
        f=${M["$m|fwgate"]:-NA}; n=${M["$m|nginx"]:-}; h=${M["$m|haproxy"]:-}
        chk "$m: fwgate $(fmt "$f" 0) ≥ nginx $(fmt "${n:-NA}" 0) and HAProxy $(fmt "${h:-NA}" 0)" '(n == "" || f >= n) && (h == "" || f >= h)' "$f" "$n" "$h"
    done
    for m in http_cpu hs_cpu echo_cpu http_p99 hs_p99 echo_p99; do
        f=${M["$m|fwgate"]:-NA}; n=${M["$m|nginx"]:-}; h=${M["$m|haproxy"]:-}
        case $m in *_cpu) rel="<" ;; *) rel="≤" ;; esac
        if [[ $rel == "<" ]]; then
            chk "$m: fwgate $(fmt "$f" 2) < nginx $(fmt "${n:-NA}" 2) and HAProxy $(fmt "${h:-NA}" 2)" '(n == "" || f < n) && (h == "" || f < h)' "$f" "$n" "$h"
        else
            chk "$m: fwgate $(fmt "$f" 0) ≤ nginx $(fmt "${n:-NA}" 0) and HAProxy $(fmt "${h:-NA}" 0)" '(n == "" || f <= n) && (h == "" || f <= h)' "$f" "$n" "$h"
        fi
    done
    f=${M["idle_bytes|fwgate"]:-NA}; h=${M["idle_bytes|haproxy"]:-}
    chk "idle memory: fwgate $(fmt "$f" 0) B < 4096 B and < HAProxy $(fmt "${h:-NA}" 0) B" 'f < 4096 && (h == "" || f < h)' "$f" "" "$h"
    f=$(ratio "${M["hs_cpu|fwgate"]:-}" "${M["ref_cpu|fwgate"]:-}")
    chk "refused handshake ≥ 5× cheaper in CPU than an admitted one: $f×" 'f >= 5' "$f" "" ""
}
machine() {
    echo "- when: $(date -u '+%Y-%m-%d %H:%M UTC'); fwgate $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (+ uncommitted changes)')$([[ -n "${FWGATE_BIN_SET:-}" ]] && echo " (binary: $FWGATE_BIN)")"
    echo "- CPU: $(nproc) × $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1); memory $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -sr); open-file limit $NOFILE"
    local nv="nginx: not installed" hv="haproxy: not installed" wv="wrk: not installed"
    if ((HAVE_NGINX)); then nv=$(nginx -v 2>&1); fi
    if ((HAVE_HAPROXY)); then hv=$(haproxy -v 2>&1 | sed -n 1p); fi
    if ((HAVE_WRK)); then wv=$(wrk -v 2>&1 | sed -n 1p | cut -d' ' -f1-2); fi
    echo "- $nv"
    echo "- $hv"
    echo "- $(rustc -V); $wv"
    echo "- proxy pinned to CPU $PROXY_CPU (one worker process/thread each); wrk, loadtool and the backend pinned to CPU $LOAD_CPU"
    echo "- runs: $RUNS (medians); wrk ${WRK_SECS}s × $WRK_CONNS conns; $HS_COUNT handshakes; $ECHO_CONNS × $ECHO_MSGS echoes of $ECHO_SIZE B; $IDLE_CONNS idle WebSockets$( ((IDLE_CONNS < IDLE_REQUESTED)) && echo " (lowered from $IDLE_REQUESTED: open-file limit)"); $REFUSED_COUNT refused handshakes"
    echo "- other processes' CPU during the measurements: ${FOREIGN_PCT}% of all cores$( ((FOREIGN_PCT > 10)) && echo ' (**noisy run**: rates and p99 suffer most; CPU per operation least)')"
    echo "- fwgate: bench/rules-100.toml ($(grep -c '^\[\[rule\]\]' "$TMP/fwgate/rules.toml") rules$(grep -q 'action = "limit"' "$TMP/fwgate/rules.toml" && echo ', one of them a limit rule (3.9.*: 50/s per device), which the measured traffic (3.7.0) is not in' || echo '; no limit rule (TODO(rate limit))')) + 1 kill-switch entry (=0.0.1); access log off; workers = 1; every WebSocket with its own X-Device-Id"
}
[[ -n "${FWGATE_BIN:-}" && "$FWGATE_BIN" != "${CARGO_TARGET_DIR:-$REPO/target}/release/fwgate" ]] && FWGATE_BIN_SET=1
T_END=$(date +%s)
{
    echo "# fwgate benchmark results"
    echo
    echo "Produced by \`bash bench/run.sh\` (see bench/README.md). Medians of $RUNS runs; CPU is the"
    echo "proxy's own user+sys time (for **direct**: the backend's) divided by operations."
    echo
    table
    echo
    echo "## Issue 7 targets"
    echo
    targets
    echo
    echo "## Machine"
    echo
    machine
    echo "- time: $((T_END - T_START)) s in all ($((T_BUILT - T_START)) s installing and building, $((T_MEASURED - T_BUILT)) s measuring)"
    echo
    echo "<details><summary>Every run</summary>"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
    echo
    echo "</details>"
} >"$RESULTS"
echo
cat "$RESULTS"
echo
log "wrote $RESULTS; total $((T_END - T_START)) s"
