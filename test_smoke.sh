#!/usr/bin/env bash
# test_smoke.sh: `nbd_vram.py run` from this checkout makes VRAM active swap on /dev/nbdX, and 1 MiB written to the device reads back intact.
# SPDX-License-Identifier: MIT
#
# No install needed: run as root from the checkout.
#   sudo ./test_smoke.sh [--stop] [-- EXTRA FLAGS FOR nbd_vram.py run]
# --stop: SIGTERM the daemon at the end and check that it exited 0 and its device is no
#         longer swap (what automated tests use); without it the daemon keeps serving.
# Environment: SIZE (default 1G), MIN_SIZE (default 64M), TIMEOUT (seconds to wait for
# swap and for the stop, default 180), and, passed through to the daemon, NBD_VRAM_CONFIG,
# NBD_VRAM_LIBCUDA and NBD_VRAM_RUNTIME_DIR.
# Exit status: 0 passed, 1 failed, 77 skipped (not root, no nbd module, no libcuda, or
# another nbd-vram daemon is running).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SIZE=${SIZE:-1G}
MIN_SIZE=${MIN_SIZE:-64M}
TIMEOUT=${TIMEOUT:-180}
RUNDIR=${NBD_VRAM_RUNTIME_DIR:-/run/nbd-vram}
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
STOP=0
EXTRA=()
while (( $# )); do
    case $1 in
        --stop) STOP=1 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "test_smoke.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
FLAGS=(--size "$SIZE" --min-size "$MIN_SIZE" "${EXTRA[@]}")

PID=""
LOG=""
WORK=""
PASSED=0

skip() { echo "SKIP: test_smoke.sh: $*"; exit 77; }
fail() {
    if [ -n "$LOG" ] && [ -s "$LOG" ]; then
        echo "--- last lines of the daemon's log ($LOG):" >&2
        tail -n 15 "$LOG" >&2
        echo "---" >&2
    fi
    echo "FAIL: test_smoke.sh: $*" >&2
    exit 1
}
step() { { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2; "$@"; }

# swap_prio DEV: its priority if DEV is active swap, else nothing.
swap_prio() { awk -v d="$1" '$1 == d {print $5}' /proc/swaps; }

# state KEY: KEY from the daemon's state.json, only if that file is our daemon's.
state() {
    python3 - "$RUNDIR/state.json" "$PID" "$1" <<'EOF' 2>/dev/null || true
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
if str(s.get("pid")) == sys.argv[2]:
    print(s.get(sys.argv[3], ""))
EOF
}

wait_exit() {  # PID SECONDS: wait for it to exit; its status in RC, or fail
    local deadline=$(( SECONDS + $2 ))
    while kill -0 "$1" 2>/dev/null; do
        if (( SECONDS >= deadline )); then
            fail "daemon pid $1 still runs ${2}s after SIGTERM (its swapoff or teardown hangs)"
        fi
        sleep 0.5
    done
    RC=0
    wait "$1" || RC=$?
}

cleanup() {
    local rc=$?
    set +e
    if (( ! PASSED )) && [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        echo "test_smoke.sh: stopping the daemon (pid $PID) after the failure: kill -TERM $PID" >&2
        kill -TERM "$PID"
        for _ in $(seq 60); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$PID" 2>/dev/null && echo "test_smoke.sh: daemon pid $PID is still stopping; its log: $LOG" >&2
    fi
    [ -n "$WORK" ] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- requirements ---------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || skip "needs root (it attaches /dev/nbdX and runs swapon): sudo $0"
if [ ! -d /sys/module/nbd ] && ! modprobe -n nbd >/dev/null 2>&1; then
    skip "this kernel has no nbd module (modprobe -n nbd fails)"
fi
command -v python3 >/dev/null || skip "no python3"
SETTINGS=$(python3 "$SRC/nbd_vram.py" check-config "${FLAGS[@]}" 2>&1) || fail "bad configuration: $SETTINGS"
setting() { awk -v k="$1" '$1 == k {print $3}' <<<"$SETTINGS"; }
LIBCUDA=$(setting libcuda)
python3 -c 'import ctypes, sys; ctypes.CDLL(sys.argv[1])' "$LIBCUDA" 2>/dev/null \
    || skip "no CUDA driver: cannot load $LIBCUDA (install the NVIDIA driver, or set NBD_VRAM_LIBCUDA)"
OTHER=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$RUNDIR/state.json" 2>/dev/null || true)
if [ -n "$OTHER" ] && kill -0 "$OTHER" 2>/dev/null; then
    skip "another nbd-vram daemon (pid $OTHER) is running: stop it first (systemctl stop vram-swap-nbd)"
fi

# -- start the daemon -----------------------------------------------------------------------
WORK=$(mktemp -d /tmp/nbd-vram-smoke.XXXXXX)
LOG=/tmp/nbd-vram-smoke.$$.log
echo "+ python3 $SRC/nbd_vram.py run ${FLAGS[*]} >$LOG 2>&1 &"
PYTHONMALLOC=malloc PYTHONUNBUFFERED=1 python3 "$SRC/nbd_vram.py" run "${FLAGS[@]}" >"$LOG" 2>&1 &
PID=$!
echo "test_smoke.sh: daemon pid $PID; waiting up to ${TIMEOUT}s for its device to be swap"

DEV=""
deadline=$(( SECONDS + TIMEOUT ))
while :; do
    if ! kill -0 "$PID" 2>/dev/null; then
        RC=0; wait "$PID" || RC=$?
        PID=""
        fail "the daemon exited with status $RC before its device became swap"
    fi
    DEV=$(state device)
    if [ -n "$DEV" ] && [ -n "$(swap_prio "$DEV")" ]; then break; fi
    (( SECONDS < deadline )) || fail "no swap after ${TIMEOUT}s (state.json device: '${DEV:-none}')"
    sleep 0.5
done
PRIO=$(state priority)
[ "$(swap_prio "$DEV")" = "$PRIO" ] || fail "$DEV is swap at priority $(swap_prio "$DEV"), not the configured $PRIO"
echo "test_smoke.sh: $DEV is swap at priority $PRIO ($(( $(blockdev --getsize64 "$DEV") >> 20 )) MiB)"

# -- data round trip (with swap off, so the kernel does not use those blocks meanwhile) ------
step swapoff "$DEV"
step dd if=/dev/urandom of="$WORK/in" bs=1M count=1 iflag=fullblock status=none
step dd if="$WORK/in" of="$DEV" bs=1M count=1 oflag=direct conv=fsync,notrunc status=none
step dd if="$DEV" of="$WORK/out" bs=1M count=1 iflag=direct status=none
want=$(sha256sum <"$WORK/in" | cut -d' ' -f1)
got=$(sha256sum <"$WORK/out" | cut -d' ' -f1)
[ "$want" = "$got" ] || fail "1 MiB read back from $DEV differs (sha256 $got, wrote $want)"
echo "test_smoke.sh: 1 MiB round trip through $DEV: sha256 $got matches"

# -- swap again, as the daemon had it ------------------------------------------------------
step mkswap --label nbd-vram "$DEV" >/dev/null
if [ "$(setting discard)" = yes ]; then
    step swapon --priority "$PRIO" --discard "$DEV"
else
    step swapon --priority "$PRIO" "$DEV"
fi
[ "$(swap_prio "$DEV")" = "$PRIO" ] || fail "swapon $DEV at priority $PRIO did not take"
step swapon --show

if (( ! STOP )); then
    PASSED=1
    echo "PASS: test_smoke.sh: $DEV is VRAM swap, served by pid $PID (log: $LOG)"
    echo "tear it down with: kill -TERM $PID   (swapoff, disconnect, free the VRAM; watch the log)"
    exit 0
fi

# -- --stop: SIGTERM must swapoff, disconnect and exit 0 -------------------------------------
step kill -TERM "$PID"
wait_exit "$PID" "$TIMEOUT"
PID=""
(( RC == 0 )) || fail "the daemon exited with status $RC after SIGTERM (expected 0)"
[ -z "$(swap_prio "$DEV")" ] || fail "$DEV is still swap after the daemon exited"
for _ in $(seq 20); do
    [ -e "/sys/block/${DEV#/dev/}/pid" ] || break
    sleep 0.5
done
[ ! -e "/sys/block/${DEV#/dev/}/pid" ] || fail "$DEV is still connected after the daemon exited"
[ ! -e "$RUNDIR/state.json" ] || fail "$RUNDIR/state.json was left behind"
PASSED=1
echo "PASS: test_smoke.sh: swap on $DEV, 1 MiB round trip, clean stop (exit 0, swap off, disconnected)"
