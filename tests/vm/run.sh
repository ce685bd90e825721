#!/bin/bash
# tests/vm/run.sh OUTDIR SCRIPT [MEM_MB] [CPUS]: boot the guest built by build.sh under QEMU
# software emulation (TCG, no KVM) and run SCRIPT as root in the host's own (read-only) userland.
#   OUTDIR  host dir the guest sees read-write at /mnt; SCRIPT is /mnt/SCRIPT, or an absolute
#           host path (the guest sees the host root read-only at the same paths).
#   Env: VRAM_MB=N / VRAM2_MB=N (powers of two) add one / two ivshmem PCI BARs of N MiB backed
#        by host files in /dev/shm: memory outside guest RAM, the stand-in for VRAM (see
#        guest-lib.sh bar_enable). VM_TIMEOUT (s, default 900) bounds the whole run.
#        VM_INIT=systemd boots systemd as PID 1 instead (see tests/vm/systemd/: a tmpfs overlay over
#        the host root, the lab's own target; SCRIPT runs as nbd-vram-lab.service).
#        GUEST_* variables are passed to the guest script, via OUTDIR/guest.env, which also sets
#        NBD_VRAM_REPO (a copy of the checkout, /mnt/repo), NBD_VRAM_VM (its tests/vm) and NBD_VRAM_OUT=/mnt.
#   OUTDIR/monitor.sock is QEMU's monitor while it runs: a hung guest's blocked tasks reach the
#   console after `sendkey alt-sysrq-9` and `sendkey alt-sysrq-w` there (socat, or run.sh's monitor
#   function; the kernel is booted with sysrq_always_enabled).
# Exit status: the guest script's (from OUTDIR/rc); 124 on timeout, 1 if the guest died without one.
# The serial console is shown and saved in OUTDIR/console.log.
set -euo pipefail
die() { echo "tests/vm/run.sh: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: run.sh OUTDIR SCRIPT [MEM_MB] [CPUS]"
HERE=$(dirname "$(realpath "${BASH_SOURCE[0]}")")
D=${NBD_VRAM_VMLAB:-/var/tmp/nbd-vram-vmlab}
G=$D/guest-$(sha256sum "$HERE/build.sh" | cut -c1-16)     # the guest of the build.sh beside this file
[ -s "$G/vmlinuz" ] && [ -s "$G/initrd.img" ] || die "no guest in $G: run tests/vm/build.sh first"
mkdir -p "$1"; out=$(realpath "$1"); script=$2; mem=${3:-1024}; cpus=${4:-2}
case "$script" in
  /*) [ -f "$script" ] || die "no such script: $script" ;;
  *)  [ -f "$out/$script" ] || die "no such script: $out/$script" ;;
esac
case "$script" in *[[:space:]]*) die "SCRIPT path must not contain spaces" ;; esac

rm -f "$out/rc"
# The guest sees the host root, but with tmpfs over /tmp, /run, /var/tmp and /var/lib: a checkout
# there (CI clones anywhere) would be invisible.  So the checkout travels in OUTDIR, at /mnt/repo.
repo=$(realpath "$HERE/../..")
rm -rf "$out/repo" && mkdir -p "$out/repo"
tar -C "$repo" --exclude=./.git --exclude=./.anchors --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.hypothesis -cf - . | tar -C "$out/repo" -xf -
case "$script" in "$repo"/*) script=/mnt/repo/${script#"$repo"/} ;; esac
{
  printf 'export NBD_VRAM_REPO=/mnt/repo NBD_VRAM_VM=/mnt/repo/tests/vm NBD_VRAM_OUT=/mnt\n'
  while IFS= read -r v; do printf 'export %s=%q\n' "$v" "${!v}"; done < <(compgen -v GUEST_ || true)
} > "$out/guest.env"

bars=(); shm=()
trap 'rm -f "${shm[@]}"' EXIT
for n in VRAM_MB VRAM2_MB; do
  mb=${!n:-}; [ -n "$mb" ] || continue
  [[ $mb =~ ^[0-9]+$ ]] && [ "$mb" -gt 0 ] && [ $((mb & (mb - 1))) -eq 0 ] || die "$n=$mb is not a power of two"
  f=$(mktemp /dev/shm/nbd-vram-vmlab.XXXXXX); shm+=("$f"); truncate -s "${mb}M" "$f"
  bars+=(-object "memory-backend-file,size=${mb}M,share=on,mem-path=$f,id=$n"
         -device "ivshmem-plain,memdev=$n")
done

# TCG: a vCPU that the busy host does not run for a while looks stalled to RCU (default: a report
# with a stack dump after 21 s, which fail_on_kernel_errors then fails on; seen 2026-11-29 at host
# load 4-5): report only past 120 s, as the guest scripts do for soft lockups (watchdog_thresh).
# -cpu Westmere (SSE4.2, AES-NI; no AVX, no ERMS), not max: TCG runs this guest faster without them
# (measured in one guest, 2026-11-30: python3 -c pass 3.5 s vs 4.5-6.5, compiling nbd_vram.py 5.5 s
# vs 10.2, dd of 2000 MiB /dev/zero to /dev/null 1.5 s vs 9.7); dm-crypt still has aesni.
# sysrq_always_enabled: the boot watchdog below asks a guest that hangs before its init's first line
# for its stacks (sendkey alt-sysrq-...), before any script could set kernel.sysrq.
append="console=ttyS0 quiet panic=-1 rcupdate.rcu_cpu_stall_timeout=120 sysrq_always_enabled lab.cmd=$script"
case ${VM_INIT:-} in
  "") ;;
  systemd) append+=" lab.init=systemd systemd.unit=nbd-vram-lab.target fstab=0" ;;
  *) die "VM_INIT=$VM_INIT: only systemd (or nothing: the script runs in a chroot)" ;;
esac

# monitor CMD...: QEMU's monitor commands, one after the other; their answers on stdout
monitor() {
  python3 - "$out/monitor.sock" "$@" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
def answer():
    """What the monitor says up to its next prompt (or in 5 s)."""
    buf = b""
    try:
        while not buf.endswith(b"(qemu) ") and (chunk := s.recv(65536)):
            buf += chunk
    except socket.timeout:
        pass
    return buf.decode(errors="replace")
answer()                                    # the monitor's banner
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode() + b"\n")
    # the monitor echoes the command as typed (with cursor moves), then answers, then prompts
    echo, _, text = answer().partition("\n")
    sys.stdout.write(f"(qemu) {cmd}\n" + text.replace("\r", "").replace("(qemu) ", ""))
PY
}

# boot_watchdog DEADLINE: the guest's init prints "guest: kernel ..." seconds into a boot (12-40 s under
# load).  A boot that has not printed it after DEADLINE s hung before any of the lab's scripts ran (seen
# once, 2026-11-30 13:42, in CI: 2400 s at "Booting from ROM.." with the host quiet): write QEMU's
# state and the guest kernel's stacks into the console, then quit QEMU and leave OUTDIR/boot-hung.
boot_watchdog() {
  local s
  for ((s = 0; s < $1; s++)); do
    sleep 1
    grep -q 'guest: kernel [0-9]' "$out/console.log" 2>/dev/null && return 0
  done
  : > "$out/boot-hung"
  echo "tests/vm/run.sh: no 'guest: kernel' line after $1 s: QEMU's state, then the guest's stacks (sysrq l, w)"
  monitor "info status" "info registers -a" "sendkey alt-sysrq-9" "sendkey alt-sysrq-l" "sendkey alt-sysrq-w" || true
  sleep "${VM_BOOT_DUMP_WAIT:-10}"                 # the guest's kernel prints the stacks
  monitor quit >/dev/null || true
}

# One boot, and one more if it hung before the guest's init printed its first line (VM_BOOT_TRIES=2;
# VM_BOOT_DEADLINE=180 s; VM_BOOT_DUMP_WAIT=10 s for the stacks): such a hang is QEMU's or the kernel's
# boot, not the script's, and each hung try's console stays as console-hung-N.log.  VM_TIMEOUT bounds each try.
tries=${VM_BOOT_TRIES:-2}
for ((try = 1; ; try++)); do
  rm -f "$out/boot-hung"
  t0=$(date +%s)
  : > "$out/console.log"
  boot_watchdog "${VM_BOOT_DEADLINE:-180}" >> "$out/console.log" 2>&1 &
  wd=$!
  set +e
  timeout -k 10 "${VM_TIMEOUT:-900}" qemu-system-x86_64 -machine q35,accel=tcg -cpu "${VM_CPU:-Westmere}" -smp "$cpus" -m "$mem" \
    -nographic -vga none -no-reboot -kernel "$G/vmlinuz" -initrd "$G/initrd.img" \
    -monitor "unix:$out/monitor.sock,server=on,wait=off" \
    -append "$append" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$out,mount_tag=out,security_model=none,multidevs=remap" \
    -nic none "${bars[@]}" </dev/null 2>&1 | tee -a "$out/console.log"
  qrc=${PIPESTATUS[0]}
  kill "$wd" 2>/dev/null; wait "$wd" 2>/dev/null
  set -e
  secs=$(( $(date +%s) - t0 ))
  [ -e "$out/boot-hung" ] && [ ! -s "$out/rc" ] || break
  mv "$out/console.log" "$out/console-hung-$try.log"
  if [ "$try" -ge "$tries" ]; then
    echo "tests/vm/run.sh: the guest hung before its init's first line in $try of $try boots (see $out/console-hung-*.log)" >&2
    exit 124
  fi
  echo "tests/vm/run.sh: the guest hung before its init's first line (try $try of $tries; QEMU's state and its stacks: $out/console-hung-$try.log); booting it again" >&2
done
if [ -s "$out/rc" ]; then
  rc=$(cat "$out/rc")
  echo "tests/vm/run.sh: guest script $script exited $rc after ${secs}s"
  exit "$rc"
elif [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
  echo "tests/vm/run.sh: TIMEOUT: guest killed after VM_TIMEOUT=${VM_TIMEOUT:-900}s without finishing $script (see $out/console.log)" >&2
  exit 124
else
  echo "tests/vm/run.sh: guest died without a result (qemu exit $qrc, ${secs}s; see $out/console.log)" >&2
  exit 1
fi
