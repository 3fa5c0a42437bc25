#!/usr/bin/env bash
# fwgate's user-space cost per operation in instructions, counted by callgrind: repeatable to
# within a fraction of a percent on a shared 2-core machine where CPU time per operation varies
# by ±20% from run to run. Use it to compare two builds (A/B); use bench/run.sh for the
# comparison with nginx and HAProxy (instructions leave out the kernel's share, which is about
# half of a proxied request's CPU time).
#
#     bash bench/instructions.sh [FWGATE_BIN ...]
#
# FAST_PATH=false measures hyper's path (what TLS listeners and handed-over connections use).
# KEEP_PROFILES=DIR keeps each phase's callgrind file there (BIN.1 http, .2 handshake, .3 echo,
# .4 refused) for `callgrind_annotate`.
#
# Default binary: the repo's release build (built if missing). For each binary prints
# instructions per HTTP request (keep-alive), per admitted WebSocket handshake, per echoed
# message and per refused handshake. valgrind's count of `rep movsb` is per byte, so large
# memcpys (moves of big futures) weigh more here than they cost on the CPU.
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH_DIR")
BASE_PORT=${BASE_PORT:-19500}
BACKEND="127.0.0.1:$BASE_PORT"
PROXY="127.0.0.1:$((BASE_PORT + 1))"
ADMIN="127.0.0.1:$((BASE_PORT + 2))"
HTTP_N=${HTTP_N:-2000}
HS_N=${HS_N:-500}
ECHO_CONNS=${ECHO_CONNS:-20}
ECHO_MSGS=${ECHO_MSGS:-100}
REF_N=${REF_N:-1000}

log() { printf '%s\n' "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo -n"
    log "installing valgrind with apt-get"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq valgrind; } >/dev/null 2>&1 \
        || die "valgrind is required (apt-get install valgrind failed)"
fi
command -v python3 >/dev/null || die "python3 is required (the keep-alive HTTP client)"
command -v curl >/dev/null || die "curl is required"

BINS=("$@")
if ((${#BINS[@]} == 0)); then
    (cd "$REPO" && cargo build --release --quiet) || die "fwgate build failed"
    BINS=("${CARGO_TARGET_DIR:-$REPO/target}/release/fwgate")
fi
(cd "$BENCH_DIR/loadtool" && cargo build --release --locked --quiet) || die "loadtool build failed"
LOADTOOL="${CARGO_TARGET_DIR:-$BENCH_DIR/loadtool/target}/release/loadtool"

TMP=$(mktemp -d /tmp/fwgate-instr.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

cat >"$TMP/fwgate.toml" <<EOF
workers = 1
rules = "$BENCH_DIR/rules-100.toml"
[listen]
addr = "$PROXY"
fast_path = ${FAST_PATH:-true}
[upstream]
addr = "$BACKEND"
[admin]
addr = "$ADMIN"
[log]
access = false
EOF
cat >"$TMP/keepalive_client.py" <<'EOF'
import http.client, sys, threading
n, conns, host, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def work(k):
    c = http.client.HTTPConnection(host, port)
    for _ in range(k):
        c.request("GET", "/", headers={"X-Firmware-Version": "3.7.0"})
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
ts = [threading.Thread(target=work, args=(n // conns,)) for _ in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
EOF

"$LOADTOOL" backend --http "$BACKEND" --max-secs 3600 >/dev/null 2>&1 &
PIDS+=($!)
H='X-Firmware-Version: 3.7.0'
for bin in "${BINS[@]}"; do
    out="$TMP/cg.out"
    rm -f "$out"*
    valgrind --tool=callgrind --callgrind-out-file="$out" --dump-instr=no \
        --compress-strings=no --compress-pos=no "$bin" run --config "$TMP/fwgate.toml" >"$TMP/fwgate.log" 2>&1 &
    pid=$!
    PIDS+=($pid)
    for _ in $(seq 300); do curl -fs -o /dev/null "http://$ADMIN/readyz" && break; sleep 0.2; done
    curl -fs -o /dev/null "http://$ADMIN/readyz" || die "fwgate under valgrind did not start: $(tail -5 "$TMP/fwgate.log")"
    # Warm up (first connections, lazily built state), then count from zero.
    python3 "$TMP/keepalive_client.py" 200 10 "${PROXY%:*}" "${PROXY#*:}"
    "$LOADTOOL" handshakes --target "$PROXY" --path /ws --header "$H" --device-ids warm --count 50 --concurrency 5 --max-secs 120 >/dev/null 2>&1
    callgrind_control -z "$pid" >/dev/null 2>&1
    python3 "$TMP/keepalive_client.py" "$HTTP_N" 10 "${PROXY%:*}" "${PROXY#*:}"
    callgrind_control -d http "$pid" >/dev/null 2>&1
    "$LOADTOOL" handshakes --target "$PROXY" --path /ws --header "$H" --device-ids hs --count "$HS_N" --concurrency 10 --max-secs 300 >/dev/null 2>&1
    callgrind_control -d handshake "$pid" >/dev/null 2>&1
    "$LOADTOOL" echo --target "$PROXY" --path /ws --header "$H" --device-ids echo --connections "$ECHO_CONNS" --messages "$ECHO_MSGS" --size 64 --max-secs 300 >/dev/null 2>&1
    callgrind_control -d echo "$pid" >/dev/null 2>&1
    "$LOADTOOL" refused --target "$PROXY" --path /ws --header 'X-Firmware-Version: 3.8.0-b3' --device-ids refused --count "$REF_N" --concurrency 10 --max-secs 300 >/dev/null 2>&1
    callgrind_control -d refused "$pid" >/dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null
    if [[ -n ${KEEP_PROFILES:-} ]]; then
        # For callgrind_annotate: one file per phase, named after the binary.
        mkdir -p "$KEEP_PROFILES"
        for f in "$out".*; do cp "$f" "$KEEP_PROFILES/$(basename "$bin").${f##*.}"; done
    fi
    line="$(basename "$bin"):"
    for part in 1 2 3 4; do
        f="$out.$part"
        [[ -f $f ]] || { line+=" part$part=missing"; continue; }
        what=$(sed -n 's/^desc: Trigger: dump //p' "$f")
        total=$(sed -n 's/^summary: //p' "$f")
        case $what in
            http) n=$HTTP_N ;; handshake) n=$HS_N ;; echo) n=$((ECHO_CONNS * ECHO_MSGS)) ;; refused) n=$REF_N ;; *) n=1 ;;
        esac
        line+=" $what=$((total / n))"
    done
    echo "$line instructions per operation"
done
