#!/bin/sh
# tests/vm/systemd/setup.sh ROOT: run by the initramfs (busybox sh) before it switches root into
# systemd (build.sh's init, run.sh with VM_INIT=systemd).  ROOT is the host root read-only under a
# tmpfs overlay, ROOT/run an empty tmpfs that systemd keeps.  Leaves the host's own units out:
#   - the lab's target and service (this dir) in ROOT/run/systemd/system: run.sh boots
#     systemd.unit=nbd-vram-lab.target, which needs basic.target and runs lab-run.sh;
#   - every unit that sysinit, sockets, timers and local-fs targets want on the host is masked
#     (a /dev/null link in /run/systemd/system, as `systemctl mask --runtime` makes), but journald;
#   - every generator is masked (fstab, getty, sysv, gpt-auto, cryptsetup...): no host mount,
#     swap, getty or init script becomes a unit.
# What is left is PID 1, journald and what the test starts: vram-swap-nbd.service pulls in
# sysinit.target and basic.target as on any machine, with nothing behind them.
set -e
R=$1
# The host may be a container: systemd would take the guest for one too (/.dockerenv) and then
# ignore the kernel command line (systemd.unit=) and much else.  This is a VM: whiteout the marker.
rm -f "$R/.dockerenv" "$R/run/.containerenv"
HERE=$R/mnt/repo/tests/vm/systemd
U=$R/run/systemd/system
G=$R/run/systemd/system-generators
mkdir -p "$U" "$G"
cp "$HERE/nbd-vram-lab.target" "$HERE/nbd-vram-lab.service" "$U/"
for t in sysinit sockets timers local-fs paths; do
  for w in "$R/lib/systemd/system/$t.target.wants"/* "$R/etc/systemd/system/$t.target.wants"/*; do
    [ -e "$w" ] || [ -L "$w" ] || continue
    n=${w##*/}
    case $n in systemd-journald.service|systemd-journald.socket|systemd-journald-dev-log.socket) continue ;; esac
    ln -sf /dev/null "$U/$n"
  done
done
for g in "$R/lib/systemd/system-generators"/* "$R/usr/lib/systemd/system-generators"/* "$R/etc/systemd/system-generators"/*; do
  [ -e "$g" ] || continue
  ln -sf /dev/null "$G/${g##*/}"
done
echo "guest: systemd lab root ready ($(ls "$U" | wc -l) units masked or added, $(ls "$G" | wc -l) generators masked)"
