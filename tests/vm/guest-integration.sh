#!/bin/bash
# Guest script: the kernel-in-the-loop integration tests, one boot. Each part prints
# "=== NAME: PASS"; the first failure stops the script (non-zero exit, with the daemon's log).
#   smoke         test_smoke.sh --stop from the checkout
#   fill          run --attach ioctl; test_fill.sh auto against its device (swap restored), then an 8 MiB
#                 O_DIRECT round trip (sha256) with swap off; clean stop
#   worker_death_encrypt_power
#                 the daemon started by hand (it re-executes itself with PYTHONMALLOC=malloc), its
#                 serving threads SCHED_RR, --encrypt yes --power ac: swap on /dev/mapper/nbd-vram-N over
#                 the nbd device; kill -9 the worker under memory pressure: replaced, every connection
#                 taken back by the kernel; data and a marker held out in swap, the marker nowhere in the
#                 BAR as plaintext; AC unplugged: released (swapoff through the replaced worker, mapping
#                 closed, disconnected, freed), data and marker back intact; AC back: encrypted swap
#                 back; teardowns in reverse order; no I/O error in the kernel log; clean stop
#   elastic       two "GPUs" (both BARs), --gpus all, 128 MiB slices: swap striped over both (equal
#                 priorities), `shrink` under the hog, another program on GPU 1 (FAKECUDA_OTHER_USAGE) makes
#                 the daemon give back slices holding pages, every checksum verified; they come back after
#                 reclaim_after once it is gone
#   pressure      (not in the default set) guest-daemon-pressure.sh: `run` as swap under `pressure 48
#                 700`, clean stop, GUEST_RUNS times; worker_death_encrypt_power's pressure proves the
#                 same in CI
# install.sh and the units, the fd store across a SIGKILL, upgrade and reload are tested under systemd
# itself, in a boot of their own: guest-systemd.sh (run.sh VM_INIT=systemd).
# Needs: run.sh with VRAM_MB=1024 (1 GiB BAR), VRAM2_MB=512 for elastic, and a 512 MiB guest; GUEST_FAKECUDA (guest path of the
# fake libcuda.so.1, default /mnt/libcuda.so.1); GUEST_PARTS (default: all of them, in that order);
# cryptsetup on the host (the guest runs the host's userland) for encrypt.
set -eEuo pipefail
# shellcheck source=/dev/null
. /mnt/guest.env
# shellcheck source=/dev/null
. "$NBD_VRAM_VM/guest-lib.sh"
REPO=$NBD_VRAM_REPO
LIB=${GUEST_FAKECUDA:-/mnt/libcuda.so.1}
BARS=$(bar_enable)
BAR=$(head -1 <<<"$BARS")
BAR2=$(sed -n 2p <<<"$BARS")
export NBD_VRAM_LIBCUDA=$LIB FAKECUDA_BACKING=$BAR NBD_VRAM_RUNTIME_DIR=/run/nbd-vram
export NBD_VRAM_CONFIG=/tmp/nbd-vram.conf PYTHONUNBUFFERED=1
: > /tmp/nbd-vram.conf               # every setting from flags; no /etc/nbd-vram.conf is read
# The hog of the part that only needs pages out in swap while it kills, encrypts and unplugs
# (worker_death_encrypt_power): 400 MiB puts ~250 MiB out (500 put ~350 in ~25 % more time),
# past every threshold it waits for (150, 4 MiB); the part `pressure` keeps 700 (~500 MiB out),
# elastic its 450.
HOG=${GUEST_PART_HOG_MB:-400}
DPID=""
DLOG=""
dmesg -n 1
# TCG: a vCPU the busy host does not run for a while looks like a soft lockup (seen once: "BUG: soft
# lockup - CPU#0 stuck for 47s! [kcompactd0]" under the hog): report only past 120 s (2 x thresh).
sysctl -qw kernel.watchdog_thresh=60

# On any failure (guest-lib.sh's on_err): which part, the daemon's log and state, the kernel log's tail.
on_fail_dump() {
  if [ -n "$DLOG" ] && [ -f "$DLOG" ]; then echo "--- daemon log $DLOG:"; tail -n 40 "$DLOG"; fi
  python3 "$REPO/nbd_vram.py" status 2>&1
}
trap 'on_err $LINENO' ERR

# start_daemon NAME ARGS...: `nbd_vram.py run ARGS` in the background (pid in DPID, log in DLOG),
# then wait (up to 300 s) until its swap device is swap; DEV is the nbd device, SWAPDEV the swap
# device (DEV, or its dm-crypt mapping with --encrypt yes).
start_daemon() {
  local name=$1 until=$(( SECONDS + 300 )); shift
  DLOG=/tmp/daemon-$name.log
  # PYTHONMALLOC=malloc as the unit sets it: no re-exec to get it (a Python start is ~5-10 s under
  # TCG).  DAEMON_MALLOC= (empty) starts it as a user would by hand, so the daemon re-executes
  # itself with it (worker_death does, as do the CPU tests).
  PYTHONMALLOC=${DAEMON_MALLOC-malloc} python3 "$REPO/nbd_vram.py" run "$@" >"$DLOG" 2>&1 &
  DPID=$!
  DEV=""
  SWAPDEV=""
  while [ $SECONDS -lt $until ]; do
    kill -0 "$DPID" 2>/dev/null || { wait "$DPID" || true; fail "daemon exited before swapon"; }
    # state_key starts a python3 (seconds under TCG, taken from the starting daemon): only once
    # some swap is on (no part starts with any, stop_daemon checks) and state.json exists.
    if ! has_swap || [ ! -s "$NBD_VRAM_RUNTIME_DIR/state.json" ]; then sleep 0.2; continue; fi
    DEV=$(state_key device)
    SWAPDEV=$(state_key swap_device)
    SWAPDEV=${SWAPDEV:-$DEV}
    [ -n "$DEV" ] && is_swap "$SWAPDEV" && break
    sleep 0.2
  done
  is_swap "$SWAPDEV" || fail "no nbd swap 300 s after starting the daemon"
  echo "daemon pid $DPID: $SWAPDEV is swap after $(( SECONDS - T0 )) s"
}

# is_swap DEV: DEV is active swap, under whichever name /proc/swaps gives it (a dm mapping is
# /dev/dm-N where udev links /dev/mapper/NAME to it, /dev/mapper/NAME where nothing runs udev)
is_swap() {
  local want name _
  grep -q "^$1 " /proc/swaps && return 0
  [ -b "$1" ] || return 1
  want=$(stat -Lc '%t:%T' "$1")
  # (a pipe, not < <(...): the guest has no /dev/fd)
  tail -n +2 /proc/swaps | {
    while read -r name _; do
      [ -b "$name" ] && [ "$(stat -Lc '%t:%T' "$name")" = "$want" ] && exit 0
    done
    exit 1
  }
}

# has_swap: any swap device is on (a cheap test to run before a python3 one)
has_swap() { [ "$(wc -l < /proc/swaps)" -gt 1 ]; }

swap_prio() { awk -v d="$1" '$1 == d {print $5}' /proc/swaps; }

# stop_daemon: SIGTERM; it must exit 0 within 300 s, leaving no nbd swap, no connected nbd and no state.
stop_daemon() {
  local rc=0
  kill -TERM "$DPID"
  for _ in $(seq 600); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$DPID" 2>/dev/null && fail "daemon pid $DPID still runs 300 s after SIGTERM"
  wait "$DPID" || rc=$?
  tail -n 5 "$DLOG"
  [ "$rc" -eq 0 ] || fail "daemon exited $rc after SIGTERM (expected 0)"
  ! grep -q '^/dev/nbd' /proc/swaps || fail "nbd swap still on after the daemon exited"
  ! grep -Eq '^/dev/(dm-|mapper/nbd-vram-)' /proc/swaps || fail "dm swap still on after the daemon exited"
  if grep -qs '^nbd-vram-' /sys/block/dm-*/dm/name; then fail "a dm-crypt mapping nbd-vram-* is left: $(dmsetup ls)"; fi
  check_disconnected
  [ ! -e "$NBD_VRAM_RUNTIME_DIR/state.json" ] || fail "state.json left behind"
  ! grep -q Traceback "$DLOG" || fail "Traceback in the daemon's log"
  DPID=""
  echo "daemon stopped cleanly (exit 0, swap off, disconnected)"
}

# -- guest-daemon-pressure.sh in this boot (its own config file and daemon log) ---------------
t_pressure() {
  part pressure
  "$NBD_VRAM_VM/guest-daemon-pressure.sh"
  kernel_clean
  pass
}

# -- a: test_smoke.sh --stop ----------------------------------------------------------------
t_smoke() {
  part smoke
  SIZE=512M MIN_SIZE=256M TIMEOUT=300 "$REPO/test_smoke.sh" --stop 2>&1 | tee /tmp/smoke.out
  grep -q '^PASS: test_smoke.sh' /tmp/smoke.out || fail "test_smoke.sh printed no PASS line"
  kernel_clean
  pass
}

# -- b: test_fill.sh against a running daemon's device, attached with the classic ioctls ---------
# One daemon for both (a start and a stop are ~35 s under TCG): test_fill.sh works on whichever
# attach made the device, and the ioctl attach gets an O_DIRECT round trip of its own.
t_fill() {
  part fill
  start_daemon fill --attach ioctl --size 256M --min-size 256M --connections 2
  [ "$(state_key attach)" = ioctl ] || fail "state.json says attach=$(state_key attach), not ioctl"
  grep -q 'ioctl' "$DLOG" || fail "the daemon's log does not mention the ioctl attach"
  python3 "$REPO/nbd_vram.py" status
  "$REPO/test_fill.sh" auto 2>&1 | tee /tmp/fill.out
  grep -q '^PASS: test_fill.sh' /tmp/fill.out || fail "test_fill.sh printed no PASS line"
  [ "$(swap_prio "$DEV")" = 1500 ] || fail "test_fill.sh did not restore $DEV as swap at priority 1500"
  swapon --show
  swapoff "$DEV"
  dd if=/dev/urandom of=/tmp/in bs=1M count=8 iflag=fullblock status=none
  dd if=/tmp/in of="$DEV" bs=1M count=8 seek=16 oflag=direct conv=fsync,notrunc status=none
  dd if="$DEV" of=/tmp/out bs=1M count=8 skip=16 iflag=direct status=none
  want=$(sha256sum < /tmp/in | cut -d' ' -f1); got=$(sha256sum < /tmp/out | cut -d' ' -f1)
  [ "$want" = "$got" ] || fail "8 MiB read back from $DEV differ: sha256 $got, wrote $want"
  echo "ioctl: 8 MiB O_DIRECT round trip through $DEV: sha256 $got matches"
  rm -f /tmp/in /tmp/out
  mkswap --label nbd-vram "$DEV" >/dev/null
  swapon --priority 1500 --discard "$DEV"       # the daemon's own swapoff runs at stop
  kernel_clean
  stop_daemon
  pass
}

# -- d: kill -9 the worker in the middle of a pressure run (in worker_death_encrypt_power) ---------
# serving_workers: pids of `nbd_vram.py worker` processes, less a spare (--standby) still waiting
# and the GPU process (--gpu-process: it copies, it serves no connection)
serving_workers() {
  local p
  for p in $(pgrep -f 'nbd_vram.py worker' || true); do
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -E -- '--standby|--gpu-process' || echo "$p"
  done
}
# kill_worker_under_pressure PPID WPID LOG: once the pressure PPID (its output in LOG) has pushed
# GUEST_KILL_AT_MB (150) MiB out to swap, requests are in flight: kill -9 the serving worker WPID.
# GUEST_WD_KILLS=N (a soak; the CI boot kills once): the serving worker is killed N times under the
# one pressure, each time once the previous kill's replacement serves and a new spare is ready.
# GUEST_WD_SPARE_FIRST=1: before the last kill, the spare is killed too (kill -9, just before the
# worker): then no spare can take over and a new process must start while swap is stalled.
# Sets KILLED (SECONDS at the last kill).
kill_worker_under_pressure() {
  local ppid=$1 wpid=$2 log=$3 k kills=${GUEST_WD_KILLS:-1} killed_at spid
  for _ in $(seq 1500); do
    [ "$(swap_used_mb)" -ge "${GUEST_KILL_AT_MB:-150}" ] && break
    kill -0 "$ppid" 2>/dev/null || break
    ! grep -q 'pressure: holding' "$log" || break
    sleep 0.2
  done
  for k in $(seq "$kills"); do
    kill -0 "$ppid" 2>/dev/null || { cat "$log"; fail "pressure ended before kill $k of $kills"; }
    killed_at=$(swap_used_mb)
    if [ "$k" -eq "$kills" ] && [ "${GUEST_WD_SPARE_FIRST:-0}" = 1 ]; then
      spid=$(sed -n 's/.*spare worker ready: pid \([0-9]*\).*/\1/p' "$DLOG" | tail -n 1)
      echo "worker_death: kill -9 of the spare $spid just before the worker"
      kill -9 "$spid"
    fi
    echo "worker_death: kill $k of $kills: kill -9 $wpid with $killed_at MiB swapped out (uptime $(cut -d' ' -f1 /proc/uptime) s)"
    # Should the replacement stall (it must not), the daemon's threads' kernel stacks say where: the
    # mlocked watchdog dumps them 20 and 70 s after the kill, before the 120 s dead-connection timeout.
    [ "$k" -gt 1 ] || start_watchdog "$DPID" 5 2 20,70
    kill -9 "$wpid"
    KILLED=$SECONDS
    [ "$k" -lt "$kills" ] || break
    for _ in $(seq 600); do
      [ "$(grep -c 'worker 1 restarted' "$DLOG")" -ge "$k" ] &&
        [ "$(grep -c 'spare worker ready' "$DLOG")" -ge $(( k + 1 )) ] && break
      sleep 0.2
    done
    [ "$(grep -c 'spare worker ready' "$DLOG")" -ge $(( k + 1 )) ] || fail "no new spare 120 s after kill $k"
    wpid=$(sed -n 's/.*worker 1 restarted (pid \([0-9]*\)).*/\1/p' "$DLOG" | tail -n 1)
    echo "worker_death: kill $k: worker 1 is pid $wpid again after $(( SECONDS - KILLED )) s"
  done
}

# check_worker_replaced SEEN: after kill_worker_under_pressure, the daemon replaced worker 1 each time
# and the kernel took every connection back (its log past line SEEN), and status is healthy.
check_worker_replaced() {
  local seen=$1 kills=${GUEST_WD_KILLS:-1} n r h newpid
  grep -E 'worker 1 .*exited|restarted|RECONFIGURE' "$DLOG" || true
  [ "$(grep -c 'worker 1 restarted' "$DLOG")" -eq "$kills" ] || fail "the daemon's log does not show worker 1 restarted $kills time(s)"
  ! grep -q 'RECONFIGURE.*failed' "$DLOG" || fail "NBD_CMD_RECONFIGURE failed"
  # The kernel answers a RECONFIGURE with no dead slot left with success, dropping the socket:
  # every connection of a replaced worker must have been taken back.
  # (Plus one for each connection the kernel gave up on, a request past its 30 s timeout under TCG,
  # that the daemon replaced: "the kernel gave up on N connection(s)".)
  n=$(dmesg | tail -n +$(( seen + 1 )) | grep -c 'reconnected socket' || true)
  r=$(grep -c 'worker 1 restarted' "$DLOG" || true)
  h=$(sed -n 's/.*the kernel gave up on \([0-9]*\) connection.*/\1/p' "$DLOG" | awk '{s += $1} END {print s + 0}')
  echo "worker_death: $r replacement(s), $h connection(s) given up by the kernel and replaced, $n sockets reconnected"
  [ "$n" -eq $(( 2 * r + h )) ] || fail "the kernel took $n sockets back (\"reconnected socket\"), not $(( 2 * r + h ))"
  kill -0 "$DPID" || fail "the daemon died"
  newpid=$(sed -n 's/.*worker 1 restarted (pid \([0-9]*\)).*/\1/p' "$DLOG" | tail -n 1)
  { [ -n "$newpid" ] && kill -0 "$newpid"; } || fail "worker 1's replacement (pid ${newpid:-?}) is not running"
  # Every connection live again (one the kernel gave up on is replaced within a few seconds).
  for _ in $(seq 30); do python3 "$REPO/nbd_vram.py" status >/tmp/status-wd.txt 2>&1 && break; sleep 1; done
  cat /tmp/status-wd.txt
  python3 "$REPO/nbd_vram.py" status >/dev/null || fail "status is not healthy 30 s after the kill"
  echo "--- nbd lines in the kernel log:"; dmesg | grep -i nbd | tail -n 20 || true
}

# -- g: encrypt = yes: swap on a dm-crypt mapping, VRAM holds only ciphertext ----------------
# dm_named NAME: the dm-N device of the mapping NAME (nothing if there is none)
dm_named() {
  local d
  for d in /sys/block/dm-*; do [ "$(cat "$d/dm/name" 2>/dev/null)" != "$1" ] || basename "$d"; done
}

# hold_marker TOKEN MB HOLD: MB MiB of pages filled with TOKEN, held in memory; prints "marker: ready,
# pid PID", waits for the file HOLD, then checks every page: "marker: N MiB intact" (exit 1 if any differs).
hold_marker() {
  python3 - "$@" <<'PY'
import os, sys, time
token, mb, hold = sys.argv[1].encode(), int(sys.argv[2]), sys.argv[3]
block = (token * (4096 // len(token) + 1))[:4096] * 256
blocks = [bytearray(block) for _ in range(mb)]
print("marker: ready, pid %d" % os.getpid(), flush=True)
while not os.path.exists(hold):
    time.sleep(0.5)
bad = sum(b != block for b in blocks)
print("marker: %d MiB intact" % (mb - bad) if not bad else "marker: %d of %d MiB CHANGED" % (bad, mb), flush=True)
sys.exit(1 if bad else 0)
PY
}

# crypt_check MAPPER NBD BAR TOKEN MARKER_PID: TOKEN is on the plaintext side (MAPPER, read O_DIRECT at
# the pages MARKER_PID has out in swap, all of MAPPER if none has it); the same
# 4 KiB of the ciphertext side (NBD) differ, are not zeros, hold no TOKEN and are found in the BAR
# (so the BAR is where this device's bytes live); and TOKEN is nowhere in the BAR.
crypt_check() {
  python3 - "$@" <<'PY'
import mmap, os, struct, sys
mapper, nbd, bar, token, marker_pid = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode(), sys.argv[5]
PAGE, CHUNK = 4096, 4 << 20

def find_direct(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size, buf = os.lseek(fd, 0, os.SEEK_END), mmap.mmap(-1, CHUNK)
        for off in range(0, size, CHUNK):
            n = os.preadv(fd, [buf], off)
            i = buf.find(token, 0, n)
            if i >= 0:
                return off + i
        return -1
    finally:
        os.close(fd)

def read_direct(path, off):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, PAGE)
        return bytes(buf[:os.preadv(fd, [buf], off)])
    finally:
        os.close(fd)

def swapped_offsets(pid):
    """Where PID's pages that are out in swap are, in pages from the swap area's start (its
    /proc/PID/pagemap: bit 62 swapped, bits 5-54 the swap offset)."""
    offs = []
    with open("/proc/%s/maps" % pid) as maps, open("/proc/%s/pagemap" % pid, "rb") as pagemap:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            try:
                pagemap.seek(lo // PAGE * 8)
                entries = pagemap.read((hi - lo) // PAGE * 8)
            except (OSError, OverflowError):
                continue                    # [vsyscall] and the like
            offs += [e >> 5 & ((1 << 50) - 1) for (e,) in struct.iter_unpack("<Q", entries) if e >> 62 & 1]
    return offs

def find_swapped(path, pid):
    """The marker on PATH at one of the marker process's swapped pages: a few 4 KiB reads instead of
    reading (and decrypting, under TCG) the whole device."""
    for off in swapped_offsets(pid):
        page = read_direct(path, off * PAGE)
        i = page.find(token)
        if i >= 0:
            return off * PAGE + i
    return -1

at = find_swapped(mapper, marker_pid)
if at < 0:
    print("crypt_check: the marker is at none of the marker process's swapped pages: reading all of %s" % mapper)
    at = find_direct(mapper)
if at < 0:
    sys.exit("crypt_check: the marker is not on the plaintext side %s: nothing to look for" % mapper)
page = at - at % PAGE
plain, cipher = read_direct(mapper, page), read_direct(nbd, page)
print("crypt_check: marker at byte %d of %s" % (at, mapper))
bad = []
if len(cipher) != PAGE or cipher == plain or token in cipher or cipher == bytes(PAGE):
    bad.append("byte %d of %s is not ciphertext of that page" % (page, nbd))
fd = os.open(bar, os.O_RDWR)
try:
    vram = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
finally:
    os.close(fd)
where = vram.find(cipher)
print("crypt_check: the page's ciphertext is at byte %d of the BAR" % where)
if where < 0:
    bad.append("the ciphertext is not in the BAR %s: not the VRAM of this device?" % bar)
leak = vram.find(token)
print("crypt_check: the marker is %s" % ("at byte %d of the BAR" % leak if leak >= 0
                                          else "nowhere in the BAR's %d MiB" % (len(vram) >> 20)))
if leak >= 0:
    bad.append("PLAINTEXT IN VRAM")
sys.exit("crypt_check: FAIL: " + "; ".join(bad) if bad else 0)
PY
}

# -- d+g: one pressure for three things: a worker killed under it, the ciphertext in VRAM, an AC
# unplug releasing the encrypted swap (until 2026-11-30 two parts, each with its own daemon and
# pressure: worker_death 242 s, encrypt_power 306 s)
t_worker_death_encrypt_power() {
  part worker_death_encrypt_power
  local name dm nbd token hold=/tmp/encrypt-hold mhold=/tmp/marker-hold job mpid ppid swapped used rc=0 order
  local ps=/tmp/power_supply st seen rr wpid
  command -v cryptsetup >/dev/null || fail "cryptsetup is not installed on the host (apt-get install cryptsetup-bin)"
  seen=$(dmesg | wc -l)         # the kernel's lines of this part come after these
  mkdir -p "$ps/AC" "$ps/BAT0"
  echo Mains >"$ps/AC/type"; echo 1 >"$ps/AC/online"
  echo Battery >"$ps/BAT0/type"; echo 60 >"$ps/BAT0/capacity"; echo Charging >"$ps/BAT0/status"
  export NBD_VRAM_POWER_SUPPLY=$ps
  # Started as a user would by hand (no PYTHONMALLOC): the daemon re-executes itself with it.
  # dead_conn_timeout 120 s (default 600): if the killed worker is not replaced, the kernel fails the
  # held I/O after 2 minutes (the guest may then panic: init's pages are on this swap) instead of 10.
  DAEMON_MALLOC="" start_daemon encrypt --size 512M --min-size 256M --connections 2 --encrypt yes \
    --power ac --power-poll 2 --dead-conn-timeout 120
  tr '\0' '\n' < "/proc/$DPID/environ" | grep -qx PYTHONMALLOC=malloc ||
    fail "the daemon, started without PYTHONMALLOC=malloc, did not re-execute itself with it"
  grep VmLck "/proc/$DPID/status"
  rr=$(rr_serving_threads 2)
  echo "worker_death: serving threads SCHED_RR: $rr"
  [ "$rr" -ge 1 ] || fail "no serving thread is SCHED_RR (realtime = yes)"
  wpid=$(serving_workers)
  [ "$(echo "$wpid" | wc -w)" -eq 1 ] || fail "expected one serving worker process, found: ${wpid:-none}"
  nbd=${DEV#/dev/}
  name=nbd-vram-${nbd#nbd}
  [ "$SWAPDEV" = "/dev/mapper/$name" ] || fail "the swap device is '$SWAPDEV', not /dev/mapper/$name"
  [ "$(state_key encrypted)" = True ] || fail "state.json does not say encrypted"
  dm=$(dm_named "$name")
  [ -n "$dm" ] || fail "no dm device is named $name"
  [ -e "/sys/block/$dm/slaves/$nbd" ] || fail "$dm ($name) does not sit on $DEV: $(ls "/sys/block/$dm/slaves")"
  ! grep -q "^$DEV " /proc/swaps || fail "$DEV itself is swap: the plaintext would go to VRAM"
  swapon --show
  echo "encrypt: swap on $SWAPDEV ($dm over $nbd)"
  cryptsetup status "$name" | tee /tmp/cryptsetup-status
  for want in 'type: +PLAIN' 'cipher: +aes-xts-plain64' 'keysize: +512 bits' 'sector size: +4096' \
              'device: +/dev/nbd' 'flags: .*discards'; do
    grep -Eq "$want" /tmp/cryptsetup-status || fail "cryptsetup status $name does not show '$want'"
  done
  python3 "$REPO/nbd_vram.py" status | tee /tmp/status-encrypt
  grep -q "encrypted (dm-crypt aes-xts-plain64" /tmp/status-encrypt || fail "status does not show the encryption"
  grep -q "$SWAPDEV on $DEV" /tmp/status-encrypt || fail "status does not show $SWAPDEV on $DEV"
  python3 "$REPO/nbd_vram.py" status --json | python3 -c 'import json, sys
s = json.load(sys.stdin)["swap"]
sys.exit(not (s["active"] and s["encrypted"] and s["device"] == sys.argv[1]))' "$SWAPDEV" \
    || fail "status --json does not show the encrypted swap active on $SWAPDEV"

  # A marker pushed out to swap along with the pressure's checksummed data; both are held out there
  # (PRESSURE_HOLD) through the worker's death, the ciphertext check and the power release.
  token=NBDVRAM-PLAINTEXT-$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
  rm -f "$hold" "$mhold"
  hold_marker "$token" 16 "$mhold" >/tmp/marker.log 2>&1 &
  job=$!
  for _ in $(seq 100); do grep -q 'marker: ready' /tmp/marker.log && break; sleep 0.2; done
  mpid=$(sed -n 's/^marker: ready, pid //p' /tmp/marker.log)
  [ -n "$mpid" ] || { cat /tmp/marker.log; fail "the marker process did not start"; }
  (trap - ERR; PRESSURE_HOLD=$hold pressure "${GUEST_DATA_MB:-48}" "$HOG") >/tmp/pressure-encrypt.log 2>&1 &
  ppid=$!
  kill_worker_under_pressure "$ppid" "$wpid" /tmp/pressure-encrypt.log
  for _ in $(seq 1200); do grep -q 'pressure: holding' /tmp/pressure-encrypt.log && break
    kill -0 "$ppid" 2>/dev/null || break; sleep 0.5; done
  if ! grep -q 'pressure: holding' /tmp/pressure-encrypt.log && kill -0 "$ppid" 2>/dev/null; then
    echo "--- the pressure has not reached its hold 600 s after the kill; blocked tasks (sysrq-w):"
    sysctl -qw kernel.sysrq=1; echo w > /proc/sysrq-trigger; sleep 1; dmesg | tail -n 150
  fi
  cat /tmp/pressure-encrypt.log
  grep -q 'pressure: holding' /tmp/pressure-encrypt.log || fail "the pressure did not reach its hold after the worker was killed"
  echo "worker_death: the hog touched $(( SECONDS - KILLED )) s after the kill"
  check_worker_replaced "$seen"
  swapped=$(awk '$1 == "VmSwap:" {print $2}' "/proc/$mpid/status")
  echo "encrypt: ${swapped:-0} KiB of the 16 MiB marker are in swap"
  [ "${swapped:-0}" -ge 4096 ] || fail "less than 4 MiB of the marker reached swap"
  crypt_check "$SWAPDEV" "$DEV" "$BAR" "$token" "$mpid"

  # AC unplugged (power = ac) with the data and the marker out in encrypted VRAM swap: swapoff brings
  # them back through the mapping and the replaced worker; the mapping is closed before the device
  # is let go and the VRAM freed.
  used=$(swap_used_mb)
  echo "power: $used MiB in VRAM swap before the unplug"
  [ "$used" -gt 0 ] || fail "nothing in VRAM swap to bring back"
  echo 0 >"$ps/AC/online"; echo Discharging >"$ps/BAT0/status"
  python3 "$REPO/nbd_vram.py" power-event          # what the udev rule runs
  for _ in $(seq 600); do
    ! has_swap && [ "$(state_key mode)" = idle ] && break
    kill -0 "$DPID" 2>/dev/null || fail "the daemon died during the release"; sleep 0.5; done
  [ "$(state_key mode)" = idle ] || fail "the daemon did not release VRAM swap within 300 s of the unplug"
  python3 "$REPO/nbd_vram.py" status
  [ "$(state_key pid)" = "$DPID" ] || fail "the idle daemon is not the same process (pid $(state_key pid), was $DPID)"
  ! has_swap || fail "swap is still on after the release: $(tail -n +2 /proc/swaps)"
  if [ -n "$(dm_named "$name")" ] || [ -e "/dev/mapper/$name" ]; then fail "the mapping $name outlived the release"; fi
  check_disconnected
  ! grep -q libcuda "/proc/$DPID/maps" || fail "the idle daemon still maps libcuda"
  ! pgrep -f 'nbd_vram.py worker' >/dev/null || fail "worker processes outlived the release"
  touch "$hold" "$mhold"
  wait "$ppid" || rc=$?
  cat /tmp/pressure-encrypt.log
  [ "$rc" -eq 0 ] || fail "data came back from the released encrypted swap corrupted (pressure exited $rc)"
  grep -q 'MiB verified' /tmp/pressure-encrypt.log || fail "pressure printed no 'verified' line"
  wait "$job" || rc=$?
  cat /tmp/marker.log
  [ "$rc" -eq 0 ] || fail "the marker came back from the encrypted swap changed"

  echo 1 >"$ps/AC/online"; echo Charging >"$ps/BAT0/status"     # no signal: the 2 s poll sees it
  for _ in $(seq 600); do
    if has_swap; then st=$(state_key mode); DEV=$(state_key device); SWAPDEV=$(state_key swap_device)
      [ "$st" = serving ] && [ -n "$SWAPDEV" ] && is_swap "$SWAPDEV" && break; fi; sleep 0.5; done
  { [ -n "$SWAPDEV" ] && is_swap "$SWAPDEV"; } || fail "VRAM swap did not come back within 300 s of AC"
  [ "$SWAPDEV" = "/dev/mapper/nbd-vram-${DEV#/dev/nbd}" ] || fail "swap came back on '$SWAPDEV', not a mapping over $DEV"
  echo "power: swap back on $SWAPDEV over $DEV"
  grep -E 'power: ' "$DLOG" || true

  kernel_clean
  name=nbd-vram-${DEV#/dev/nbd}
  stop_daemon
  unset NBD_VRAM_POWER_SUPPLY
  if [ -n "$(dm_named "$name")" ] || [ -e "/dev/mapper/$name" ]; then fail "the mapping $name outlived the daemon"; fi
  # Teardown strictly in reverse, at the release and at the stop: swapoff the mapping, close it,
  # disconnect, free.
  order=$(awk -v s="swap off on /dev/mapper/nbd-vram-" -v c="closed the dm-crypt mapping nbd-vram-" -v d="disconnected /dev/nbd" '
    index($0, s) {print "swapoff"} index($0, c) {print "close"} index($0, d) {print "disconnect"}
    / freed [0-9.]+ [KMGT]?i?B of VRAM/ {print "free"}' "$DLOG" | tr '\n' ' ')
  echo "encrypt: teardowns in the daemon's log: $order"
  [ "$order" = "swapoff close disconnect free swapoff close disconnect free " ] || fail "teardown order: '$order'"
  pass
}

# -- i: slices on two "GPUs", given back and taken again under load.
# nbd_swaps: "device used_KiB priority" of every nbd swap device
nbd_swaps() { awk '$1 ~ /^\/dev\/nbd/ {print $1, $4, $5}' /proc/swaps; }
t_elastic() {
  part elastic
  [ -n "$BAR2" ] || fail "elastic needs a second BAR (run.sh with VRAM2_MB)"
  local hold=/tmp/elastic-hold other=/tmp/other-usage ppid rc=0 n before after prios
  : > "$other"
  # FAKECUDA_BACKING separates paths with ':', which PCI sysfs paths are full of: links without.
  ln -sf "$BAR" /tmp/gpu0-bar
  ln -sf "$BAR2" /tmp/gpu1-bar
  FAKECUDA_BACKING=/tmp/gpu0-bar:/tmp/gpu1-bar FAKECUDA_OTHER_USAGE=$other start_daemon elastic --gpus all --size 384M \
    --min-size 128M --slice-size 128M --connections 2 --reserve 128M --vram-poll 1 --reclaim-after 5
  for _ in $(seq 300); do [ "$(nbd_swaps | wc -l)" -eq 6 ] && break; sleep 0.2; done
  nbd_swaps
  [ "$(nbd_swaps | wc -l)" -eq 6 ] || fail "expected 6 slices as swap (3 on each GPU)"
  prios=$(nbd_swaps | awk '{print $3}' | sort -n | uniq -c | awk '{print $1 "x" $2}' | tr '\n' ' ')
  [ "$prios" = "2x1498 2x1499 2x1500 " ] || fail "slice priorities are not paired over the two GPUs: $prios"
  sleep 3                 # the workers publish their counters every 2 s
  python3 "$REPO/nbd_vram.py" status || true
  grep -E 'connection|WARNING|ERROR' "$DLOG" | head -n 20 || true

  rm -f "$hold"
  # Two GPUs' workers lock more RAM than one's (five processes): a smaller hog than the other parts'.
  PRESSURE_HOLD=$hold pressure 48 450 >/tmp/pressure-elastic.log 2>&1 &
  ppid=$!
  for _ in $(seq 1200); do [ "$(swap_used_mb)" -ge 150 ] && break; kill -0 "$ppid" 2>/dev/null || break; sleep 0.25; done
  echo "elastic: $(swap_used_mb) MiB swapped; per device (device KiB priority):"; nbd_swaps
  [ "$(nbd_swaps | awk '$3 == 1500 && $2 > 0' | wc -l)" -eq 2 ] || fail "swap is not striped over both GPUs' slice 0"
  # By hand, under the hog: one slice (the emptiest) swapped off and freed.
  before=$(nbd_swaps | wc -l)
  python3 "$REPO/nbd_vram.py" shrink 128M --timeout 600 || fail "shrink 128M failed"
  after=$(nbd_swaps | wc -l)
  [ "$after" -eq $(( before - 1 )) ] || fail "shrink left $after slices as swap (was $before)"
  for _ in $(seq 1800); do grep -q 'pressure: holding' /tmp/pressure-elastic.log && break
    kill -0 "$ppid" 2>/dev/null || break; sleep 0.5; done
  cat /tmp/pressure-elastic.log
  grep -q 'pressure: holding' /tmp/pressure-elastic.log || fail "the pressure did not reach its hold"
  echo "elastic: at the hold, per device:"; nbd_swaps
  # Another program takes 200 MiB on GPU 1 (512 MiB, 384 held, 128 free, reserve 128): the daemon must
  # give back its emptiest slices, pages and all, until 128 MiB is free again: two of them.
  before=$(nbd_swaps | wc -l)
  printf '0\n200\n' > "$other"
  for _ in $(seq 1200); do [ "$(nbd_swaps | wc -l)" -le $(( before - 2 )) ] && break; sleep 0.25; done
  nbd_swaps
  [ "$(nbd_swaps | wc -l)" -le $(( before - 2 )) ] || fail "the reserve on GPU 1 did not make the daemon release slices"
  grep -E 'below the reserve|released|other programs' "$DLOG" | tail -n 6 || true
  # By hand again, 256M: the two emptiest left, which now hold the data's pages (swapoff brings them
  # into RAM, which the hog has left): their checksums are verified below.
  before=$(nbd_swaps | wc -l)
  echo "elastic: shrink 256M with $(swap_used_mb) MiB swapped out"
  python3 "$REPO/nbd_vram.py" shrink 256M --timeout 600 2>/tmp/shrink-256.log || { cat /tmp/shrink-256.log
    fail "shrink 256M failed"; }
  cat /tmp/shrink-256.log
  [ "$(nbd_swaps | wc -l)" -eq $(( before - 2 )) ] || fail "shrink 256M did not release two slices"
  # Its progress, while it waited: from the daemon's state (not a terminal: a plain line), and in its log.
  grep -Eq 'shrink: shrinking: swapoff /dev/nbd[0-9]+ \(slice [12] of 2\), [0-9.]+ [KMG]iB left' /tmp/shrink-256.log ||
    fail "shrink 256M printed no progress line"
  grep -Eq 'shrinking: swapoff /dev/nbd[0-9]+ \(slice 2 of 2\), [0-9.]+ [KMG]iB left' "$DLOG" ||
    fail "the daemon logged no progress of the shrink"
  grep -E 'swapoff .* took' "$DLOG" | tail -n 4 || true
  nbd_swaps
  touch "$hold"
  wait "$ppid" || rc=$?
  cat /tmp/pressure-elastic.log
  [ "$rc" -eq 0 ] || fail "data corrupted while slices were released (pressure exited $rc)"
  grep -q 'MiB verified' /tmp/pressure-elastic.log || fail "pressure printed no 'verified' line"
  # The program quits: after reclaim_after (5 s) GPU 1's slices come back, up to the ceilings the two
  # shrinks left (GPU 0: none of 3, GPU 1: 3 of 3).
  : > "$other"
  for _ in $(seq 600); do [ "$(nbd_swaps | wc -l)" -eq 3 ] && break; sleep 0.25; done
  nbd_swaps
  [ "$(nbd_swaps | wc -l)" -eq 3 ] || fail "the released slices were not taken back"
  python3 "$REPO/nbd_vram.py" grow 128M --timeout 600 || fail "grow 128M failed"
  [ "$(nbd_swaps | wc -l)" -eq 4 ] || fail "grow 128M did not take a slice"
  python3 "$REPO/nbd_vram.py" status || true
  kernel_clean
  stop_daemon
  pass
}

PARTS=${GUEST_PARTS:-smoke fill worker_death_encrypt_power elastic}
for p in $PARTS; do "t_$p"; done
echo "=== integration: PASS ($PARTS)"
