#!/bin/bash
# Guest script for the systemd guest (run.sh with VM_INIT=systemd: systemd 252, the host's, is
# PID 1): install.sh installs the real units, and systemd itself starts, restarts, reloads, stops
# and sleeps the daemon, one boot.  Each part prints "=== NAME: PASS (N s)"; the first failure ends
# the script with the unit's status and journal and the kernel log's tail.
#   install   install.sh --yes --size 512M --no-start into the live system (the fake libcuda in
#             /usr/local/lib, an nvidia-smi stub; a runtime drop-in gives the daemon the BAR);
#             enable made the alias nbd-vram.service
#   start     systemctl start: active only once the daemon sent READY=1 (its "swap on" and
#             "ready:" lines come before systemd's ActiveEnterTimestamp), swap at 1500, STATUS=,
#             its VRAM fd in the fd store; systemctl status and the journal at their priorities;
#             `systemctl status nbd-vram` (the alias); no warning of the daemon, vm.swappiness set;
#             the sandbox in effect on the daemon (bounding set, NoNewPrivs, seccomp, its own UTS
#             namespace, PID 1's mount namespace, serving threads SCHED_RR);
#             then a verifier starts, confined to its own memory cgroup (MemoryHigh: only its pages
#             go out to swap, none of PID 1's), with data that stays in VRAM swap until the stop
#   restart   under `pressure 48 300` (PRESSURE_HOLD): systemctl kill -s KILL --kill-whom=main;
#             systemd restarts it with the stored fd, it takes the slice over (the device stays
#             swap throughout, no swapoff, no mkswap); at the hold `nbd_vram.py upgrade`, then
#             systemctl reload with a bad power key (the reload fails, systemctl status says why at
#             priority 3, the daemon is not signalled) and a good one (info, 6);
#             every checksum verified, no I/O error
#   sleep     with the verifier's data in VRAM swap: the sleep unit's ordering on systemd's graph;
#             systemctl suspend with pm_test=freezer (the kernel freezes every task and thaws it
#             again; no device is suspended): the swap released before the kernel's suspend entry
#             (every page back in RAM, the restart's leftovers too) and back after its exit; the
#             sleep unit's lines carry the daemon's tag, nbd-vram
#   kill_all  the verifier's pages pushed out again; systemctl kill -s KILL --kill-whom=all: every
#             process of the unit dies, systemd restarts it, the new daemon takes the slice over
#             from the fd store
#   stop      systemctl stop with the verifier's pages in VRAM swap: inactive, exit 0; swap off,
#             disconnected, freed in that order in the journal, the VRAM (the BAR) all zeros:
#             scrubbed; the fd store empty, the cgroup empty; then the verifier's checksums (its
#             data went through the restart, the sleep, the kill of every process and the swapoff)
#   uninstall install.sh --uninstall: units disabled and gone from systemd (the alias too), files
#             removed, config kept
#   deb       the .deb of packaging/build.sh (built on the host into /mnt/deb): dpkg -i enables and
#             starts the packaged unit (swap at 1500; the alias made); dpkg -i of a rebuilt version: the running daemon
#             takes the new program over in place (same MainPID, the device never off /proc/swaps, no
#             swapoff in the journal); dpkg --purge: stopped (swapoff), files and configuration gone
# Needs: VRAM_MB=1024, a 512 MiB guest, GUEST_FAKECUDA (default /mnt/libcuda.so.1); GUEST_PARTS
# (default: all, in that order; each part needs the ones before it).
set -eEuo pipefail
# shellcheck source=/dev/null
. /mnt/guest.env
# shellcheck source=/dev/null
. "$NBD_VRAM_VM/guest-lib.sh"
REPO=$NBD_VRAM_REPO
LIB=${GUEST_FAKECUDA:-/mnt/libcuda.so.1}
BAR=$(bar_enable | head -n 1)
UNIT=vram-swap-nbd.service
SLEEP_UNIT=vram-swap-nbd-sleep.service
ALIAS=nbd-vram.service
# The daemon's capability bounding set as the unit gives it (CapabilityBoundingSet=): CAP_NET_ADMIN 12,
# CAP_IPC_LOCK 14, CAP_SYS_MODULE 16, CAP_SYS_ADMIN 21, CAP_SYS_NICE 23, CAP_SYS_RESOURCE 24, CAP_MKNOD 27
CAPS=$(( 1 << 12 | 1 << 14 | 1 << 16 | 1 << 21 | 1 << 23 | 1 << 24 | 1 << 27 ))
RUNDIR=/run/nbd-vram
NV=/usr/local/bin/nbd_vram.py
# what install.sh installs besides the program, the units and the config (the command's other name,
# the README, the manual pages, the bash completion): gone again after --uninstall
DOCS="/usr/local/bin/nbd-vram /usr/local/share/doc/nbd-vram/README.md /usr/local/share/man/man8/nbd-vram.8
  /usr/local/share/man/man5/nbd-vram.conf.5 /usr/local/share/bash-completion/completions/nbd_vram.py"
# The restart's hog: RAM full while the killed daemon's successor starts (400 in the integration
# boot's parts; 300 here puts ~150 MiB out, well past the 64 MiB the kill waits for, in less time).
HOG=${GUEST_PART_HOG_MB:-300}
DEV=""
dmesg -n 1
sysctl -qw kernel.watchdog_thresh=60      # TCG: see guest-integration.sh

# On any failure (guest-lib.sh's on_err): which part, the unit's status and journal, the kernel log's tail.
on_fail_dump() {
  systemctl --no-pager status "$UNIT" 2>&1 | tail -n 25
  echo "--- journalctl -u $UNIT (last 40):"; journalctl --no-pager -u "$UNIT" -n 40
}
trap 'on_err $LINENO' ERR

prop() { systemctl show -p "$1" --value "${2:-$UNIT}"; }
swap_prio() { awk -v d="$1" '$1 == d {print $5}' /proc/swaps; }
swap_used_on() { awk -v d="$1" '$1 == d {print int($4 / 1024)}' /proc/swaps; }
# cursor: the journal's current end (for journal_since)
cursor() { journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'; }
# journal_since CURSOR ARGS...: "PRIORITY MONOTONIC_US COMM: MESSAGE" of the entries after CURSOR
# (ARGS: journalctl matches, e.g. -u UNIT); a kernel line's time is the kernel's own (it reaches
# journald late across a freeze)
journal_since() {
  local c=$1; shift
  journalctl --no-pager -o json --after-cursor="$c" "$@" | python3 -c 'import json, sys
for line in sys.stdin:
    e = json.loads(line)
    m = e.get("MESSAGE")
    if isinstance(m, list):
        m = bytes(m).decode(errors="replace")
    t = e.get("_SOURCE_MONOTONIC_TIMESTAMP") or e["__MONOTONIC_TIMESTAMP"]
    print(e.get("PRIORITY", "?"), t, "%s: %s" % (e.get("SYSLOG_IDENTIFIER") or e.get("_COMM", "?"), m))'
}
# first_at FILE REGEX: the monotonic time (us) of the first line of FILE (journal_since's) matching REGEX
first_at() { awk -v re="$2" '$0 ~ re {print $2; exit}' "$1"; }
# priority_of FILE REGEX: the priority of the first matching line
priority_of() { awk -v re="$2" '$0 ~ re {print $1; exit}' "$1"; }
# wait_swapped MIB: until DEV holds at least MIB MiB of swapped pages
wait_swapped() {
  local used=0
  for _ in $(seq 2400); do
    used=$(swap_used_on "$DEV"); [ "${used:-0}" -ge "$1" ] && return 0; sleep 0.25
  done
  fail "$DEV never held $1 MiB of swap (${used:-0} MiB)"
}
# wait_hold LOG PID: until the pressure in LOG says it holds (its data out in swap)
wait_hold() {
  local until=$(( SECONDS + 1200 ))
  while [ $SECONDS -lt $until ]; do grep -q 'pressure: holding' "$1" && return 0
    kill -0 "$2" 2>/dev/null || break; sleep 1; done
  cat "$1"; fail "the pressure did not reach its hold"
}
# wait_taken_over OLD_PID NRESTARTS SECONDS: systemd restarted the unit (NRestarts), a new daemon is
# its MainPID and active, and state.json says it took the device over; DEV stays swap all along.
wait_taken_over() {
  local old=$1 n=$2 until=$(( SECONDS + $3 )) main next=$(( SECONDS + 30 ))
  while [ $SECONDS -lt $until ]; do
    grep -q "^$DEV " /proc/swaps || fail "$DEV stopped being swap during the restart: $(tr "\n" ";" < /proc/swaps)"
    # (PID 1 pages in under this pressure too: a systemctl call may time out, 25 s, and is tried again)
    main=$(prop MainPID 2>&1) || { echo "  ($(cut -d' ' -f1 /proc/uptime) s: systemctl show: $main)"; sleep 1; continue; }
    if [ $SECONDS -ge $next ]; then
      next=$(( SECONDS + 30 ))
      # the unit's journal where the host can read it, should the guest die before the failure report
      timeout 20 journalctl -q --no-pager -u "$UNIT" -n 80 -o short-monotonic > /mnt/journal-takeover.txt 2>&1 || true
      echo "  ($(cut -d' ' -f1 /proc/uptime) s: $(prop ActiveState)/$(prop SubState), MainPID $main, NRestarts $(prop NRestarts), $(swap_used_on "$DEV") MiB on $DEV, MemFree $(( $(meminfo_kb MemFree) / 1024 )) MiB)"
    fi
    if [ "$(prop NRestarts)" = "$n" ] && [ "$main" != 0 ] && [ "$main" != "$old" ] && [ "$(prop ActiveState)" = active ] \
       && grep -qs '"adopted_at"' "$RUNDIR/state.json" && [ "$(state_key pid)" = "$main" ]; then
      return 0
    fi
    sleep 1
  done
  fail "no restarted daemon took $DEV over within $3 s (NRestarts $(prop NRestarts), MainPID $(prop MainPID), $(prop ActiveState))"
}
# bar_nonzero_mib: MiB of the BAR (the fake GPU's VRAM) that are not all zeros
bar_nonzero_mib() {
  python3 - "$BAR" <<'PY'
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
vram = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
zero = bytes(1 << 20)
print(sum(vram[o:o + (1 << 20)] != zero for o in range(0, len(vram), 1 << 20)))
PY
}

# -- install.sh into the live system ---------------------------------------------------------
t_install() {
  part install
  [ "$(cat /proc/1/comm)" = systemd ] || fail "PID 1 is $(cat /proc/1/comm), not systemd"
  echo "install: $(systemctl --version | head -n 1); system $(systemctl is-system-running || true)"
  systemctl --no-pager list-units --state=failed --no-legend
  mkdir -p /usr/local/lib /usr/local/bin
  cp "$LIB" /usr/local/lib/libcuda.so.1 && ldconfig
  # nvidia-smi stub (GPU 0: 1 GiB, no display): install.sh's driver check and the unit's ExecStartPre.
  printf '%s\n' '#!/bin/sh' 'case "$*" in *--query-gpu*) echo "1024, Disabled" ;; esac' 'exit 0' > /usr/local/bin/nvidia-smi
  chmod +x /usr/local/bin/nvidia-smi
  # The fake GPU's VRAM is the BAR: the only setting the lab adds to the unit (a runtime drop-in).
  mkdir -p /run/systemd/system/$UNIT.d
  printf '[Service]\nEnvironment=FAKECUDA_BACKING=%s\n' "$BAR" > /run/systemd/system/$UNIT.d/lab.conf
  [ ! -e /etc/nbd-vram.conf ] || fail "/etc/nbd-vram.conf exists before install"
  "$REPO/install.sh" --yes --size 512M --no-start </dev/null
  for f in "$NV" /etc/systemd/system/$UNIT /etc/systemd/system/$SLEEP_UNIT /etc/nbd-vram.conf $DOCS; do
    [ -f "$f" ] || fail "install.sh did not install $f"
  done
  cmp "$REPO/$UNIT" /etc/systemd/system/$UNIT || fail "the installed unit differs from the checkout's"
  [ "$(systemctl is-enabled $UNIT)" = enabled ] || fail "$UNIT is not enabled"
  [ "$(systemctl is-enabled $SLEEP_UNIT)" = enabled ] || fail "$SLEEP_UNIT is not enabled"
  # Alias=: enable made the short name, a link to the unit
  [ "$(readlink /etc/systemd/system/$ALIAS)" = /etc/systemd/system/$UNIT ] || fail "systemctl enable did not make the $ALIAS link"
  prop Names | grep -qw $ALIAS || fail "systemd does not know $UNIT as $ALIAS: $(prop Names)"
  [ "$(prop LoadState)" = loaded ] && [ "$(prop FragmentPath)" = /etc/systemd/system/$UNIT ] \
    || fail "systemd did not load $UNIT from /etc/systemd/system: $(prop LoadState) $(prop FragmentPath)"
  prop DropInPaths | grep -q /run/systemd/system/$UNIT.d/lab.conf || fail "the lab drop-in is not loaded"
  # Two connections (as the other kernel parts), and a dead connection held 300 s, not 600: a
  # daemon that never comes back fails the test in minutes.
  printf 'connections = 2\ndead_conn_timeout = 300\n' >> /etc/nbd-vram.conf
  # The vm sysctl at the value it has: the sandbox must let the daemon write /proc/sys/vm, and
  # nothing else changes.
  echo "swappiness = $(sysctl -n vm.swappiness)" >> /etc/nbd-vram.conf
  grep -E '^[a-z_]+ *=' /etc/nbd-vram.conf
  grep -q '^size = 512M' /etc/nbd-vram.conf || fail "/etc/nbd-vram.conf has no 'size = 512M'"
  [ -x "$NV" ] || fail "$NV is not executable"
  pass
}

# -- the verifier: data of its own in VRAM swap from the start to the stop --------------------
# A process whose pages (and only those: reclaim inside its own cgroup, not the machine's) go out to
# VRAM swap: no hog, its 48 MiB of data alone are over MemoryHigh=24M, which throttles and reclaims
# it into swap (MemoryMax could OOM-kill it while swap-out is slow).  Started once the daemon is up,
# so that it fills while the restart runs; it holds until the stop, where its checksums are verified:
# its data goes through the restart, the upgrade, the sleep, the kill of every process and the stop.
VERIFIER_LOG=/tmp/pressure-verifier.log
VERIFIER_HOLD=/tmp/verifier-hold
VERIFIER_CG=/sys/fs/cgroup/system.slice/lab-verifier.scope
VERIFIER=""
start_verifier() {
  rm -f "$VERIFIER_HOLD"
  PRESSURE_HOLD=$VERIFIER_HOLD systemd-run --quiet --scope --unit=lab-verifier -p MemoryHigh=24M \
    /bin/bash -c ". $NBD_VRAM_VM/guest-lib.sh; pressure 48 0" > $VERIFIER_LOG 2>&1 &
  VERIFIER=$!
}

# -- systemctl start ------------------------------------------------------------------------
t_start() {
  part start
  local c j=/tmp/j-start active_at swapon_at ready_at
  c=$(cursor)
  systemctl start $UNIT            # Type=notify: returns once READY=1 came (or the start failed)
  echo "start: systemctl start returned after $(( SECONDS - T0 )) s"
  [ "$(prop ActiveState)/$(prop SubState)" = active/running ] || fail "$UNIT is $(prop ActiveState)/$(prop SubState)"
  DEV=$(state_key device)
  [ -n "$DEV" ] && [ "$(swap_prio "$DEV")" = 1500 ] || fail "no nbd swap at priority 1500: $(cat /proc/swaps)"
  [ "$(state_key pid)" = "$(prop MainPID)" ] || fail "state.json's pid $(state_key pid) is not MainPID $(prop MainPID)"
  prop StatusText | grep -q "^serving 512 MiB of GPU 0 on $DEV" || fail "STATUS= is '$(prop StatusText)'"
  [ "$(prop NFileDescriptorStore)" = 1 ] || fail "systemd holds $(prop NFileDescriptorStore) stored fds, not the 1 VRAM fd"
  journal_since "$c" -u $UNIT > $j
  cat $j
  active_at=$(prop ActiveEnterTimestampMonotonic)
  swapon_at=$(first_at $j "nbd-vram: swap on $DEV at priority 1500")
  ready_at=$(first_at $j "nbd-vram: ready: serving")
  [ -n "$swapon_at" ] && [ -n "$ready_at" ] || fail "no 'swap on'/'ready:' line of the daemon in the journal"
  echo "start: swap on at $swapon_at us, READY line at $ready_at us, active at $active_at us (monotonic)"
  # The swap is on before systemd has the unit active.  (Not the "ready:" line: the daemon's log is
  # written by a thread of its own, so that line reaches journald about when READY=1 reaches PID 1,
  # before or after: 1.6 ms after once, 2026-11-30.)
  [ "$swapon_at" -lt "$active_at" ] || fail "the unit was active before the swap was on"
  [ "$(priority_of $j "nbd-vram: ready: serving")" = 6 ] || fail "the ready line is not at priority 6 (info)"
  [ "$(priority_of $j "nbd-vram: swap on $DEV")" = 6 ] || fail "the swap-on line is not at priority 6 (info)"
  # Nothing the sandbox refused: no warning or error of the daemon (SCHED_RR, mlockall, oom_score_adj,
  # PR_SET_IO_FLUSHER, the sysctl each say so at priority 4 when they fail)
  if awk '$1 <= 4 && $3 == "nbd-vram:"' $j | grep .; then fail "the daemon warned at its start"; fi
  grep -q "nbd-vram: sysctl vm.swappiness = " $j || fail "the daemon did not set vm.swappiness"
  systemctl --no-pager status $UNIT | tee /tmp/status-start || true
  grep -q 'Active: active (running)' /tmp/status-start || fail "systemctl status does not say active (running)"
  grep -q "Status: \"serving" /tmp/status-start || fail "systemctl status does not show the daemon's STATUS="
  grep -q "ready: serving" /tmp/status-start || fail "systemctl status does not show the daemon's lines"
  journalctl --no-pager -t nbd-vram -p info -n 3 | grep -q 'ready: serving' || fail "journalctl -t nbd-vram does not find the daemon"
  systemctl --no-pager status ${ALIAS%.service} > /tmp/status-alias || fail "systemctl status ${ALIAS%.service} exited $?"
  grep -q "Main PID: $(prop MainPID) " /tmp/status-alias || fail "systemctl status ${ALIAS%.service} does not show the daemon"
  check_hardening
  kernel_clean
  start_verifier
  pass
}

# check_hardening: the unit's sandbox as systemd loaded it, and in effect on the running daemon
check_hardening() {
  local main p=/tmp/hardening k kv rr
  main=$(prop MainPID)
  systemctl show -p NoNewPrivileges -p LockPersonality -p RestrictSUIDSGID -p ProtectHostname -p UMask \
    -p RestrictAddressFamilies -p SystemCallArchitectures -p SystemCallErrorNumber -p CapabilityBoundingSet \
    -p IPAddressDeny -p ProtectSystem -p PrivateTmp -p PrivateMounts $UNIT | tee $p
  for kv in NoNewPrivileges=yes LockPersonality=yes RestrictSUIDSGID=yes ProtectHostname=yes UMask=0077 \
            ProtectSystem=no PrivateTmp=no; do
    grep -qx "$kv" $p || fail "systemd loaded $UNIT without $kv"
  done
  grep -q '^RestrictAddressFamilies=AF_UNIX AF_NETLINK$\|^RestrictAddressFamilies=AF_NETLINK AF_UNIX$' $p || fail "RestrictAddressFamilies is not AF_UNIX AF_NETLINK"
  # ... and on the daemon: its bounding set, no new privileges, a seccomp filter, a UTS namespace of
  # its own, and PID 1's mount namespace (see same_mount_ns)
  grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/$main/status
  k=$(awk '/^CapBnd:/ {print $2}' /proc/$main/status)
  [ $(( 16#$k )) = $CAPS ] || fail "the daemon's capability bounding set is $k, not $(printf %016x $CAPS)"
  [ "$(awk '/^NoNewPrivs:/ {print $2}' /proc/$main/status)" = 1 ] || fail "the daemon may gain privileges (NoNewPrivs 0)"
  [ "$(awk '/^Seccomp:/ {print $2}' /proc/$main/status)" = 2 ] || fail "the daemon has no seccomp filter"
  [ "$(readlink /proc/$main/ns/uts)" != "$(readlink /proc/1/ns/uts)" ] || fail "the daemon shares PID 1's UTS namespace (ProtectHostname)"
  same_mount_ns "$main"
  # the serving threads (one a connection: 2) got SCHED_RR (realtime = yes) under the bounding set
  rr=$(rr_serving_threads 2)
  [ "$rr" -ge 2 ] || fail "$rr serving threads run SCHED_RR, not 2 (the unit's CapabilityBoundingSet needs CAP_SYS_NICE)"
  echo "hardening: in effect on pid $main (CapBnd $k); $rr serving threads SCHED_RR"
  # (online, it asks PID 1 over D-Bus, which this guest has not: the unit file's rating instead)
  systemd-analyze security --offline=true /etc/systemd/system/$UNIT 2>&1 | tail -n 1
}
# same_mount_ns PID: the daemon runs in PID 1's mount namespace.  In one of its own, swapon holds the
# device through a mount of that namespace; after a crash the takeover ends the dead daemon's last
# processes, the namespace goes, and /proc/swaps names the device /nbdX (the restart then lost the
# swap: commit 66dcaaf's sandbox, 3 of 3 boots)
same_mount_ns() {
  [ "$(readlink /proc/$1/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ] \
    || fail "pid $1 has a mount namespace of its own ($(readlink /proc/$1/ns/mnt), PID 1 $(readlink /proc/1/ns/mnt))"
}

# -- kill -9 of the main process under load, upgrade and reload at the hold -------------------
t_restart() {
  part restart
  local hold=/tmp/restart-hold log=/tmp/pressure-restart.log ppid rc=0 old c j=/tmp/j-restart used main n
  rm -f "$hold"
  PRESSURE_HOLD=$hold pressure 48 "$HOG" > $log 2>&1 &
  ppid=$!
  wait_swapped 64
  old=$(prop MainPID)
  n=$(( $(prop NRestarts) + 1 ))
  used=$(swap_used_on "$DEV")
  c=$(cursor)
  echo "restart: systemctl kill -s KILL --kill-whom=main (pid $old) with $used MiB in VRAM swap"
  systemctl kill -s KILL --kill-whom=main $UNIT
  wait_taken_over "$old" $n 600
  main=$(prop MainPID)
  echo "restart: systemd restarted it: pid $main took $DEV over $(( SECONDS - T0 )) s into the part ($(swap_used_on "$DEV") MiB in swap)"
  same_mount_ns "$main"
  journal_since "$c" -u $UNIT > $j
  cat $j
  grep -q "Main process exited, code=killed, status=9/KILL" $j || fail "systemd did not see the main process killed"
  grep -q "restart counter is at $n" $j || fail "systemd did not schedule the restart"
  grep -q "took back slice 0 (512 MiB of VRAM) from systemd's fd store" $j || fail "the new daemon did not take the VRAM back from the fd store"
  if grep -Eq "nbd-vram: (swap off on|swap on) " $j; then fail "swapoff or mkswap/swapon during the restart"; fi
  [ "$(prop NFileDescriptorStore)" = 1 ] || fail "the fd store holds $(prop NFileDescriptorStore) fds after the restart"
  wait_hold $log $ppid
  old=$main
  c=$(cursor)
  echo "restart: $NV upgrade with $(swap_used_on "$DEV") MiB in VRAM swap"
  "$NV" upgrade --timeout 300 || fail "nbd_vram.py upgrade failed"
  [ "$(prop MainPID)" = "$old" ] && [ "$(state_key pid)" = "$old" ] || fail "the upgrade changed the pid ($old -> $(prop MainPID))"
  [ "$(prop ActiveState)" = active ] && [ "$(prop NRestarts)" = $n ] || fail "after the upgrade: $(prop ActiveState), NRestarts $(prop NRestarts)"
  # systemctl reload (ExecReload: check-config, then SIGHUP) with a power key changed: first to a bad
  # value (the reload fails and says why, the daemon is not signalled: the old settings stay), then
  # to a good one.
  echo "battery_threshold = 0" >> /etc/nbd-vram.conf
  if systemctl reload $UNIT 2> /tmp/reload-bad; then fail "systemctl reload succeeded with battery_threshold = 0"; fi
  cat /tmp/reload-bad
  grep -q "failed" /tmp/reload-bad || fail "systemctl reload did not say it failed"
  systemctl --no-pager status $UNIT > /tmp/status-reload || true
  grep -q "battery_threshold: 0 is outside 1..99" /tmp/status-reload || { cat /tmp/status-reload; fail "systemctl status does not show why the reload failed"; }
  sed -i 's/^battery_threshold = 0$/battery_threshold = 30/' /etc/nbd-vram.conf
  systemctl reload $UNIT
  for _ in $(seq 120); do journalctl -q -o cat --after-cursor="$c" -u $UNIT | grep -q 'SIGHUP: battery_threshold = 30' && break; sleep 1; done
  [ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" = "$old" ] || fail "the reloads changed the unit: $(prop ActiveState), pid $(prop MainPID)"
  journal_since "$c" -u $UNIT > $j
  cat $j
  [ "$(priority_of $j "battery_threshold: 0 is outside 1..99")" = 3 ] || fail "no error (priority 3) for the bad battery_threshold"
  grep -q "nbd-vram: .*battery_threshold: 0 is outside" $j || fail "the reload's error line does not carry the tag nbd-vram"
  if grep -q "SIGHUP: configuration not reloaded" $j; then fail "the daemon was signalled with the bad file"; fi
  [ "$(grep -c "SIGHUP: battery_threshold" $j)" = 1 ] || fail "the daemon did not reload exactly once"
  [ "$(priority_of $j "SIGHUP: battery_threshold = 30 .was 20.")" = 6 ] || fail "no info line (priority 6) for battery_threshold 30"
  grep -q "Reloaded $UNIT\|Reloaded nbd-vram" $j || fail "systemd logged no reload"
  touch "$hold"
  wait "$ppid" || rc=$?
  cat $log
  [ "$rc" -eq 0 ] || fail "pressure exited $rc across the kill, the restart, the upgrade and the reloads"
  grep -q 'MiB verified' $log || fail "pressure printed no 'verified' line"
  [ -z "$VERIFIER" ] || kill -0 "$VERIFIER" || fail "the verifier died during the restart"
  kernel_clean
  pass
}

t_sleep() {
  part sleep
  local c j=/tmp/j-sleep before deps off entry exit_ back until old_dev
  [ "$(prop ActiveState)" = active ] || fail "$UNIT is $(prop ActiveState) at the start of sleep"
  DEV=$(state_key device)
  [ "$(swap_prio "$DEV")" = 1500 ] || fail "no nbd swap at 1500: $(cat /proc/swaps)"
  [ -n "$VERIFIER" ] || start_verifier
  wait_hold $VERIFIER_LOG $VERIFIER
  cat $VERIFIER_LOG
  echo "sleep: the verifier has $(( $(cat $VERIFIER_CG/memory.swap.current) >> 20 )) MiB in swap; $DEV holds $(swap_used_on "$DEV") MiB"
  before=$(prop Before $SLEEP_UNIT)
  echo "sleep: $SLEEP_UNIT Before=$before"
  for u in sleep.target systemd-suspend.service systemd-hibernate.service systemd-hybrid-sleep.service \
           systemd-suspend-then-hibernate.service nvidia-suspend.service nvidia-hibernate.service; do
    grep -qw "$u" <<<"$before" || fail "$SLEEP_UNIT is not ordered before $u"
  done
  prop RequiredBy $SLEEP_UNIT | grep -qw sleep.target || fail "$SLEEP_UNIT is not RequiredBy=sleep.target (enabled)"
  deps=$(systemctl list-dependencies --no-pager --plain --after sleep.target)
  grep -qw "$SLEEP_UNIT" <<<"$deps" || { echo "$deps"; fail "sleep.target is not ordered after $SLEEP_UNIT"; }
  # (list-dependencies expands targets only: suspend.target -> systemd-suspend.service -> sleep.target)
  deps=$(systemctl list-dependencies --no-pager --plain sleep.target)
  grep -qw "$SLEEP_UNIT" <<<"$deps" || { echo "$deps"; fail "sleep.target does not pull in $SLEEP_UNIT"; }
  prop After systemd-suspend.service | grep -qw sleep.target || fail "systemd-suspend.service is not after sleep.target"
  echo "sleep: ordered before sleep.target and systemd-suspend.service, required by sleep.target"
  # its sandbox as systemd loaded it: the release and the restore below run under it
  [ "$(prop CapabilityBoundingSet $SLEEP_UNIT)" = "" ] && [ "$(prop PrivateDevices $SLEEP_UNIT)" = yes ] \
    && [ "$(prop PrivateNetwork $SLEEP_UNIT)" = yes ] && [ "$(prop ProtectSystem $SLEEP_UNIT)" = full ] \
    || fail "$SLEEP_UNIT was loaded without its sandbox: $(systemctl show -p CapabilityBoundingSet -p PrivateDevices -p PrivateNetwork -p ProtectSystem $SLEEP_UNIT | paste -sd' ')"
  echo "sleep: $SLEEP_UNIT sandboxed (no capabilities, private /dev, no network, ProtectSystem=full)"
  [ -w /sys/power/pm_test ] || fail "no /sys/power/pm_test (kernel without CONFIG_PM_DEBUG)"
  echo "sleep: /sys/power/state: $(cat /sys/power/state); mem_sleep: $(cat /sys/power/mem_sleep)"
  echo freezer > /sys/power/pm_test
  [ "$(swap_used_on "$DEV")" -gt 0 ] || fail "nothing in VRAM swap before the suspend"
  echo "sleep: systemctl suspend with $(swap_used_on "$DEV") MiB in VRAM swap"
  c=$(cursor)
  systemctl suspend
  until=$(( SECONDS + 600 ))
  while [ $SECONDS -lt $until ]; do
    if dmesg | grep -q 'PM: suspend exit' && [ "$(prop ActiveState $SLEEP_UNIT)" = inactive ] \
       && [ "$(prop ActiveState suspend.target)" = inactive ] && grep -q '^/dev/nbd' /proc/swaps \
       && grep -qs '"mode": "serving"' "$RUNDIR/state.json"; then break; fi
    sleep 1
  done
  echo none > /sys/power/pm_test
  { journal_since "$c" -u $UNIT -u $SLEEP_UNIT -u systemd-suspend.service -u sleep.target -u suspend.target
    journal_since "$c" -k; } | sort -n -k2 > $j || true
  cat $j
  dmesg | grep -q 'PM: suspend exit' || fail "the kernel did not go through a suspend within 600 s"
  grep -q '^/dev/nbd' /proc/swaps || fail "no nbd swap again 600 s after the suspend"
  old_dev=$DEV
  DEV=$(state_key device)
  [ "$DEV" = "$old_dev" ] || echo "sleep: the swap came back on $DEV (was $old_dev)"
  off=$(first_at $j "nbd-vram: swap off on $old_dev")
  entry=$(first_at $j "PM: suspend entry")
  exit_=$(first_at $j "PM: suspend exit")
  back=$(awk -v re="nbd-vram: swap on $DEV" -v after="$exit_" '$0 ~ re && $2 > after {print $2; exit}' $j)
  echo "sleep: swap off at $off us, suspend entry $entry, exit $exit_, swap on again at ${back:-never} (monotonic)"
  [ -n "$off" ] && [ -n "$entry" ] && [ "$off" -lt "$entry" ] || fail "the swap was not released before the suspend entry"
  [ -n "$back" ] || fail "no swap on $DEV after the suspend exit"
  # The sleep unit's lines carry the daemon's tag (SyslogIdentifier=nbd-vram)
  grep -q "nbd-vram: sleep: asking the daemon" $j || fail "the sleep unit's 'sleep:' line does not carry the tag nbd-vram"
  grep -q "nbd-vram: wake: " $j || fail "the sleep unit's 'wake:' line does not carry the tag nbd-vram"
  [ "$(swap_prio "$DEV")" = 1500 ] || fail "$DEV is back at priority $(swap_prio "$DEV"), not 1500"
  [ "$(prop ActiveState)" = active ] || fail "$UNIT is $(prop ActiveState) after the resume"
  kill -0 "$VERIFIER" || fail "the verifier died during the sleep"
  kernel_clean
  pass
}

# -- the whole control group killed, with the verifier's pages (only those) in VRAM swap -------
t_kill_all() {
  part kill_all
  local old c j=/tmp/j-killall procs used t n
  # The release before the sleep brought every page back (and swap came back empty): the
  # verifier's pages go out again (a lower MemoryHigh reclaims its cgroup down to it, into swap),
  # and nothing else is out there: no page that PID 1 needs waits on the dead daemon.
  systemctl set-property --runtime lab-verifier.scope MemoryHigh=16M
  for _ in $(seq 120); do used=$(( $(cat $VERIFIER_CG/memory.swap.current) >> 20 )); [ "$used" -ge 24 ] && break; sleep 1; done
  echo "kill_all: the verifier has $used MiB in swap; $DEV holds $(swap_used_on "$DEV") MiB"
  [ "$used" -ge 24 ] || fail "less than 24 MiB of the verifier reached swap"
  old=$(prop MainPID)
  n=$(( $(prop NRestarts) + 1 ))
  procs=$(tr '\n' ' ' < "/sys/fs/cgroup/system.slice/$UNIT/cgroup.procs")
  c=$(cursor)
  echo "kill_all: systemctl kill -s KILL --kill-whom=all: pids $procs"
  systemctl kill -s KILL --kill-whom=all $UNIT
  t=$SECONDS
  for p in $procs; do for _ in $(seq 50); do [ -e "/proc/$p" ] || break; sleep 0.2; done; done
  for p in $procs; do [ ! -e "/proc/$p" ] || fail "pid $p of the unit outlived SIGKILL"; done
  wait_taken_over "$old" $n 600
  echo "kill_all: pid $(prop MainPID) took $DEV over $(( SECONDS - t )) s after the kill (every process of the unit had died)"
  journal_since "$c" -u $UNIT > $j
  cat $j
  grep -q "took back slice 0 (512 MiB of VRAM) from systemd's fd store" $j || fail "the new daemon did not take the VRAM back from the fd store"
  if grep -Eq "nbd-vram: (swap off on|swap on) " $j; then fail "swapoff or mkswap/swapon during the restart"; fi
  [ "$(prop NFileDescriptorStore)" = 1 ] || fail "the fd store holds $(prop NFileDescriptorStore) fds after the restart"
  kill -0 "$VERIFIER" || fail "the verifier died when every process of the unit was killed"
  kernel_clean
  pass
}

# -- systemctl stop, with the verifier's pages in VRAM swap; then the verifier's checksums -----
t_stop() {
  part stop
  local c j=/tmp/j-stop order nz left rc=0
  nz=$(bar_nonzero_mib)
  echo "stop: $nz MiB of the VRAM hold data before the stop ($(swap_used_on "$DEV") MiB in swap)"
  [ "$nz" -gt 1 ] || fail "the VRAM is all zeros but the swap header before the stop: nothing to see the scrub by"
  # (the swapoff takes the verifier's pages back into its cgroup: no limit in the way)
  [ -z "$VERIFIER" ] || systemctl set-property --runtime lab-verifier.scope MemoryHigh=infinity
  c=$(cursor)
  systemctl stop $UNIT
  echo "stop: systemctl stop returned after $(( SECONDS - T0 )) s"
  [ "$(prop ActiveState)" = inactive ] && [ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ] \
    || fail "after the stop: $(prop ActiveState), result $(prop Result), exit $(prop ExecMainStatus)"
  ! grep -q '^/dev/nbd' /proc/swaps || fail "nbd swap still on after the stop"
  check_disconnected
  [ ! -e "$RUNDIR/state.json" ] || fail "state.json left behind"
  # KillMode=process: systemd signals the daemon alone, which must end its workers itself.
  for _ in $(seq 20); do
    left=$(cat /sys/fs/cgroup/system.slice/$UNIT/cgroup.procs 2>/dev/null || true); [ -n "$left" ] || break; sleep 0.5
  done
  [ -z "$left" ] || fail "processes left in the unit's cgroup after the stop: ${left//$'\n'/ }"
  [ "$(prop NFileDescriptorStore)" = 0 ] || fail "the fd store still holds $(prop NFileDescriptorStore) fds"
  journal_since "$c" -u $UNIT > $j
  cat $j
  order=$(awk -v s="swap off on $DEV" -v d="disconnected $DEV" '
    index($0, s) {print "swapoff"} index($0, d) {print "disconnect"} / freed [0-9.]+ [KMGT]?i?B of VRAM/ {print "free"}' $j | tr '\n' ' ')
  echo "stop: in the journal: $order"
  [ "$order" = "swapoff disconnect free " ] || fail "stop order in the journal: '$order'"
  # The swapoff's progress, as STATUS= and the journal tell it while systemctl stop waits (a line as
  # each swapoff starts, then every 10 s): "stopping: swapoff /dev/nbd0, 44 MiB left, 3 MiB/s".
  grep -Eq "nbd-vram: stopping: swapoff $DEV, [0-9.]+ [KMG]iB left" $j || fail "no progress line of the stop's swapoff in the journal"
  nz=$(bar_nonzero_mib)
  [ "$nz" -eq 0 ] || fail "$nz MiB of the VRAM are not zero after the stop: not scrubbed"
  echo "stop: the VRAM is all zeros: scrubbed before it was freed"
  if [ -n "$VERIFIER" ]; then
    touch "$VERIFIER_HOLD"
    wait "$VERIFIER" || rc=$?
    cat $VERIFIER_LOG
    [ "$rc" -eq 0 ] || fail "the verifier exited $rc: its data did not survive the sleep, the kill of every process and the stop"
    grep -q 'MiB verified' $VERIFIER_LOG || fail "the verifier printed no 'verified' line"
    VERIFIER=""
  fi
  kernel_clean
  pass
}

# -- install.sh --uninstall ------------------------------------------------------------------
t_uninstall() {
  part uninstall
  rm -rf /run/systemd/system/$UNIT.d
  "$REPO/install.sh" --uninstall </dev/null
  for f in "$NV" /etc/systemd/system/$UNIT /etc/systemd/system/$SLEEP_UNIT $DOCS; do
    [ ! -e "$f" ] && [ ! -L "$f" ] || fail "install.sh --uninstall left $f"
  done
  grep -q '^size = 512M' /etc/nbd-vram.conf || fail "install.sh --uninstall removed or changed /etc/nbd-vram.conf (it must keep it)"
  [ "$(prop LoadState)" = not-found ] && [ "$(prop LoadState $SLEEP_UNIT)" = not-found ] \
    || fail "systemd still has the units: $(prop LoadState), $(prop LoadState $SLEEP_UNIT)"
  [ ! -e /etc/systemd/system/multi-user.target.wants/$UNIT ] && [ ! -e /etc/systemd/system/sleep.target.requires/$SLEEP_UNIT ] \
    || fail "install.sh --uninstall left the units enabled"
  [ ! -L /etc/systemd/system/$ALIAS ] || fail "install.sh --uninstall left the $ALIAS link"
  pass
}

# -- the .deb (packaging/build.sh): installed, upgraded to a rebuilt version with the service
# running (the same daemon takes the new program over: swap never off), purged (swapoff first)
# swap_watch DEV FILE: until FILE is removed, append "gone" to FILE.out each time DEV is not swap
swap_watch() {
  while [ -e "$2" ]; do grep -q "^$1 " /proc/swaps || echo gone >> "$2.out"; sleep 0.2; done
}
t_deb() {
  part deb
  local v1 v2 pid dev c j=/tmp/j-deb watch=/tmp/deb-watch ver
  v1=$(ls /mnt/deb/v1/nbd-vram_*_all.deb); v2=$(ls /mnt/deb/v2/nbd-vram_*_all.deb)
  ver=$(dpkg-deb -f "$v2" Version)
  [ ! -e "$NV" ] || fail "$NV is still there (the part uninstall comes first)"
  # The admin's configuration, kept (as uninstall left it); the lab's drop-in back for the packaged unit.
  grep -q '^size = 512M' /etc/nbd-vram.conf || fail "no /etc/nbd-vram.conf from the install part"
  mkdir -p /run/systemd/system/$UNIT.d
  printf '[Service]\nEnvironment=FAKECUDA_BACKING=%s\n' "$BAR" > /run/systemd/system/$UNIT.d/lab.conf
  rm -f /var/lib/man-db/auto-update       # (man-db's trigger rebuilds its index: minutes under TCG)
  # The host's root is a container image whose policy-rc.d forbids starting services (deb-systemd-invoke
  # asks it, as it must); a real system has none.
  rm -f /usr/sbin/policy-rc.d
  dpkg --force-confold -i "$v1" </dev/null
  case $(prop FragmentPath) in
    "/lib/systemd/system/$UNIT"|"/usr/lib/systemd/system/$UNIT") ;;
    *) fail "systemd runs $(prop FragmentPath), not the package's unit" ;;
  esac
  { [ "$(systemctl is-enabled $UNIT)" = enabled ] && [ "$(systemctl is-enabled $SLEEP_UNIT)" = enabled ]; } \
    || fail "the package did not enable its units"
  [ -L /etc/systemd/system/$ALIAS ] || fail "the package's enable made no $ALIAS link"
  [ "$(prop ActiveState)/$(prop SubState)" = active/running ] || fail "the package's postinst did not start $UNIT"
  dev=$(state_key device)
  [ "$(swap_prio "$dev")" = 1500 ] || fail "no nbd swap at 1500 after dpkg -i: $(cat /proc/swaps)"
  pid=$(prop MainPID)
  echo "deb: $(dpkg-query -W -f '${Package} ${Version}' nbd-vram) installed, pid $pid serves $dev"

  c=$(cursor)
  touch "$watch"; rm -f "$watch.out"
  swap_watch "$dev" "$watch" &
  dpkg --force-confold -i "$v2" </dev/null | tee /tmp/dpkg-upgrade.out
  rm -f "$watch"; wait
  [ "$(dpkg-query -W -f '${Version}' nbd-vram)" = "$ver" ] || fail "dpkg did not upgrade to $ver"
  grep -q "took version .* over in place: swap stayed on" /tmp/dpkg-upgrade.out || fail "the postinst did not upgrade in place"
  [ "$(prop MainPID)" = "$pid" ] || fail "the upgrade changed the daemon ($pid -> $(prop MainPID))"
  [ ! -s "$watch.out" ] || fail "$dev was not swap for a moment during the upgrade ($(wc -l < "$watch.out") samples)"
  journal_since "$c" -u $UNIT > $j
  ! grep -q "swap off on" $j || fail "the upgrade swapped off: $(grep 'swap off on' $j)"
  echo "deb: upgraded to $ver: pid $pid still serves $dev, swap on throughout"

  dpkg --purge nbd-vram </dev/null
  [ "$(prop LoadState)" = not-found ] || fail "systemd still has $UNIT after the purge"
  ! grep -q '^/dev/nbd' /proc/swaps || fail "nbd swap still on after the purge"
  check_disconnected
  for f in /usr/bin/nbd_vram.py /lib/systemd/system/$UNIT /etc/nbd-vram.conf /etc/systemd/system/$ALIAS; do
    [ ! -e "$f" ] || fail "dpkg --purge left $f"
  done
  rm -rf /run/systemd/system/$UNIT.d
  kernel_clean
  pass
}

PARTS=${GUEST_PARTS:-install start restart sleep kill_all stop uninstall deb}
for p in $PARTS; do "t_$p"; done
echo "=== systemd: PASS ($PARTS)"
