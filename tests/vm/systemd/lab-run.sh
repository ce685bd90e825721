#!/bin/bash
# nbd-vram-lab.service's ExecStart: the guest script named by lab.cmd= on the kernel command line
# (relative to /mnt or absolute), with /mnt/guest.env, as the chroot guest runs it; then its exit
# status to /mnt/rc (run.sh's result) and poweroff.
export HOME=/tmp PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cmd=$(sed -n 's/.*lab\.cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
case "$cmd" in /*) ;; *) cmd=/mnt/$cmd ;; esac
echo "guest: systemd $(systemctl --version | head -n 1 | cut -d' ' -f2) is PID 1; running $cmd (uptime $(cut -d' ' -f1 /proc/uptime) s)"
cd /mnt && { [ ! -f ./guest.env ] || . ./guest.env; }
bash "$cmd" 2>&1
rc=$?
echo "guest: rc=$rc"
echo $rc > /mnt/rc
sync
systemctl poweroff --force --force
