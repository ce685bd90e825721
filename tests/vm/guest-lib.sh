# tests/vm/guest-lib.sh: helpers for guest scripts run by tests/vm/run.sh. Source it in the guest:
#   . "$NBD_VRAM_VM/guest-lib.sh"        (run.sh sets NBD_VRAM_VM, NBD_VRAM_REPO via /mnt/guest.env)

# bar_enable: enable every ivshmem device (PCI device id 0x1110; one per VRAM_MB / VRAM2_MB)
# and print its BAR2 path (resource2_wc, mmap-able), one a line, in PCI order.
bar_enable() {
  local d n=0
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/device")" = 0x1110 ] || continue
    echo 1 > "$d/enable"; echo "$d/resource2_wc"; n=$((n + 1))
  done
  [ "$n" -gt 0 ] || { echo "bar_enable: no ivshmem device (run.sh without VRAM_MB?)" >&2; return 1; }
}

# meminfo_kb KEY: the value of KEY in /proc/meminfo, in kB (e.g. meminfo_kb MemFree)
meminfo_kb() { awk -v k="$1:" '$1 == k {print $2; f=1} END {exit !f}' /proc/meminfo; }

# swap_used_mb: SwapTotal - SwapFree, in MiB
swap_used_mb() { echo $(( ($(meminfo_kb SwapTotal) - $(meminfo_kb SwapFree)) / 1024 )); }

# kmodprobe ARGS: modprobe for the guest kernel's modules (the host root has none for it)
kmodprobe() { modprobe -d /run/kmod "$@"; }

# wait_for_socket PATH [SECONDS=20]
wait_for_socket() {
  local i
  for i in $(seq $(( ${2:-20} * 5 ))); do [ -S "$1" ] && return 0; sleep 0.2; done
  echo "wait_for_socket: $1 did not appear within ${2:-20}s" >&2; return 1
}

# fail_on_kernel_errors: return 1 (printing the lines) if the kernel log shows a hang or an error
fail_on_kernel_errors() {
  local hits
  hits=$(dmesg | grep -E 'blocked for more than|I/O error|Call Trace|BUG:|Oops' || true)
  [ -z "$hits" ] && return 0
  echo "fail_on_kernel_errors: kernel log shows errors:" >&2; echo "$hits" >&2; return 1
}

# Parts (guest-integration.sh, guest-systemd.sh): `part NAME` and `pass` print "=== NAME: start" and
# "=== NAME: PASS (N s)"; `fail MSG` fails the part.  With `set -eE` and `trap 'on_err $LINENO' ERR`,
# the first failure prints "=== NAME: FAIL (exit N at line L: COMMAND)", runs the script's
# on_fail_dump (its daemon's log, say), shows swapon and the kernel log's tail, and exits.
PART=""
T0=$SECONDS
fail() { echo "FAIL: $*" >&2; false; }
part() { PART=$1; echo; echo "=== $PART: start (uptime $(cut -d' ' -f1 /proc/uptime) s)"; T0=$SECONDS; }
pass() { echo "=== $PART: PASS ($(( SECONDS - T0 )) s)"; PART=""; }
on_err() {
  local rc=$? line=$1
  [ "$BASH_SUBSHELL" -eq 0 ] || exit "$rc"      # a subshell's failure is reported by the main shell
  trap - ERR
  set +e
  echo "=== ${PART:-setup}: FAIL (exit $rc at line $line: $BASH_COMMAND)"
  ! declare -F on_fail_dump >/dev/null || on_fail_dump
  swapon --show
  echo "--- dmesg tail:"; dmesg | tail -n 40
  exit "$rc"
}

# state_key KEY: the top-level KEY of the running daemon's state.json (in $NBD_VRAM_RUNTIME_DIR,
# default /run/nbd-vram; empty if none), printed as Python prints it (True, False, None).  awk, not
# python3: a Python start costs 3-5 s under TCG, and the parts poll this.  The daemon writes the file with json.dump(indent=1) and renames it into
# place: a top-level key starts its own line after one space.
state_key() {
  awk -v k="\"$1\":" 'substr($0, 1, length(k) + 1) == " " k {
      v = substr($0, length(k) + 2); sub(/^ +/, "", v); sub(/,$/, "", v)
      if (v ~ /^".*"$/) v = substr(v, 2, length(v) - 2)
      else if (v == "true") v = "True"; else if (v == "false") v = "False"; else if (v == "null") v = "None"
      print v; exit }' "${NBD_VRAM_RUNTIME_DIR:-/run/nbd-vram}/state.json" 2>/dev/null || true
}

# kernel_clean: fail_on_kernel_errors plus the swap layer's read/write errors and hung tasks
kernel_clean() {
  local hits
  hits=$(dmesg | grep -E 'Read-error|Write-error|blocked for more than' || true)
  [ -z "$hits" ] || fail "kernel log: $hits"
  fail_on_kernel_errors
}

# check_disconnected: return 1 (naming it) if a /dev/nbdN is still connected after 10 s
check_disconnected() {
  local d _
  for _ in $(seq 20); do ls /sys/block/nbd*/pid >/dev/null 2>&1 || return 0; sleep 0.5; done
  for d in /sys/block/nbd*; do [ ! -e "$d/pid" ] || fail "$(basename "$d") is still connected"; done
}

# start_watchdog PID [INTERVAL_S [MAX_DUMPS [DUMP_AT]]]: run watchdog.py on PID in the background (prints to the console)
start_watchdog() {
  sysctl -qw kernel.sysrq=1
  python3 "$NBD_VRAM_VM/watchdog.py" "$1" "${2:-5}" "${3:-3}" "${4:-}" &
}

# rr_serving_threads [WANT=2]: the number of SCHED_RR python3 threads (the serving threads, with
# realtime = yes: one per connection, in the workers), once WANT of them are or after 30 s.  Each
# thread switches itself when it starts, which under TCG may be a moment after swapon.
rr_serving_threads() {
  local rr=0
  for _ in $(seq 60); do
    rr=$(ps -eLo cls=,comm= | awk '$1 == "RR" && $2 == "python3"' | wc -l)
    [ "$rr" -ge "${1:-2}" ] && break
    sleep 0.5
  done
  echo "$rr"
}

# pressure [DATA_MB=32] [HOG_MB=MemTotal*3/2]: allocate DATA_MB MiB of random, checksummed 1 MiB
# blocks, then touch a HOG_MB MiB hog (well past RAM) so the data is pushed out to swap, print
# "swap used under pressure (MiB): X", free the hog, verify every checksum and print
# "swap round-trip: N MiB verified". Non-zero exit on corruption.
# With PRESSURE_HOLD=FILE it prints "pressure: holding" once the hog is freed (the data still out
# in swap) and waits for FILE to exist before it verifies.
pressure() {
  local data=${1:-32} hog=${2:-$(( $(meminfo_kb MemTotal) * 3 / 2 / 1024 ))}
  python3 - "$data" "$hog" <<'PY'
import hashlib, os, sys, time
data_mb, hog_mb = int(sys.argv[1]), int(sys.argv[2])
def meminfo():
    return {k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in open("/proc/meminfo"))}
t0 = time.time()
blocks = [os.urandom(1 << 20) for _ in range(data_mb)]
want = [hashlib.sha256(b).digest() for b in blocks]
hog = bytearray(hog_mb << 20)
for i in range(0, len(hog), 4096):
    hog[i] = 1
m = meminfo()
print("pressure: %d MiB hog touched after %.0f s, MemFree %d MiB" % (hog_mb, time.time() - t0, m["MemFree"] >> 10))
print("swap used under pressure (MiB):", (m["SwapTotal"] - m["SwapFree"]) >> 10, flush=True)
del hog
hold = os.environ.get("PRESSURE_HOLD")
if hold:
    print("pressure: holding until %s exists" % hold, flush=True)
    while not os.path.exists(hold):
        time.sleep(0.5)
bad = [i for i, b in enumerate(blocks) if hashlib.sha256(b).digest() != want[i]]
if bad:
    print("DATA CORRUPTED: %d of %d MiB blocks differ (first: %s)" % (len(bad), data_mb, bad[:8]), flush=True)
    sys.exit(1)
print("swap round-trip: %d MiB verified" % data_mb)
print("pressure: done in %.0f s" % (time.time() - t0), flush=True)
PY
}
