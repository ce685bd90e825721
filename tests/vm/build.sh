#!/bin/bash
# tests/vm/build.sh: build the kernel-in-the-loop guest (Debian's own kernel, which has nbd.ko,
# plus a small busybox initramfs). The guest mounts the HOST root read-only over 9p, chroots
# into it and runs one script from the shared out dir (see run.sh), so it runs exactly the
# host's python3, nbd-client, mkswap and the checkout under test.
# Output (cached): ${NBD_VRAM_VMLAB:-/var/tmp/nbd-vram-vmlab}/guest-HASH/{vmlinuz,initrd.img},
# HASH the first 16 hex digits of this file's sha256: a second run is a no-op while they exist, and
# checkouts with different versions of this file share the lab dir (the kernel, the VM lock) without
# booting each other's guest.  run.sh boots the one of the build.sh beside it.
set -euo pipefail
trap 'echo "tests/vm/build.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

SELF=$(realpath "${BASH_SOURCE[0]}")
D=${NBD_VRAM_VMLAB:-/var/tmp/nbd-vram-vmlab}
mkdir -p "$D"; D=$(realpath "$D")
exec 9>"$D/.lock"; flock 9                     # concurrent builds wait for each other
HASH=$(sha256sum "$SELF" | cut -c1-16)
G=$D/guest-$HASH
if [ -s "$G/vmlinuz" ] && [ -s "$G/initrd.img" ]; then
  echo "tests/vm/build.sh: up to date in $G ($(cat "$G/kver"))"; exit 0
fi

# Host packages, installed only when missing.
missing=()
for p in qemu-system-x86 busybox-static kmod cpio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/vm/build.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cd "$D"
# Kernel: the image package that the linux-image-amd64 metapackage depends on.
if [ ! -d kroot/lib/modules ]; then
  rm -rf debs kroot; mkdir debs
  (cd debs && apt-get download -qq linux-image-amd64 2>&1 | grep -v unsandboxed || true)
  dep=$(dpkg-deb -f debs/linux-image-amd64_*.deb Depends | grep -o 'linux-image-[^ ,]*' | head -1)
  [ -n "$dep" ] || { echo "tests/vm/build.sh: cannot read linux-image-amd64's Depends" >&2; exit 1; }
  (cd debs && apt-get download -qq "$dep" 2>&1 | grep -v unsandboxed || true)
  ls debs/"$dep"_*.deb >/dev/null
  dpkg-deb -x debs/"$dep"_*.deb kroot.tmp && mv kroot.tmp kroot
  rm -rf debs                                  # ~70 MB, not needed once extracted
fi
KVER=$(ls kroot/lib/modules | head -1)
depmod -b kroot "$KVER"

# initramfs: busybox + only the modules the guest needs (and their dependencies).
# dm_mod/dm_crypt (+xts/aesni for aes-xts) cost ~0.3 MB; loop is tiny.
WANT="virtio_pci 9pnet_virtio 9p nbd zram lz4 dm_mod dm_crypt xts aesni_intel loop overlay"
rm -rf initrd && mkdir -p initrd/{bin,sbin,dev,proc,sys,host,tmp,lib/modules/$KVER}
cp /bin/busybox initrd/bin/busybox
for a in sh mount umount mkdir modprobe insmod cat echo poweroff sleep ls chroot ln dmesg sync ip grep sed wc cp rm switch_root; do
  ln -s busybox initrd/bin/$a
done
ln -s ../bin/busybox initrd/sbin/modprobe      # kernel's request_module() runs /sbin/modprobe in the initramfs root
for m in $WANT; do
  modprobe -d kroot -S "$KVER" -C /dev/null --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | sort -u | while read -r f; do
  rel=${f#*/lib/modules/"$KVER"/}
  mkdir -p "initrd/lib/modules/$KVER/$(dirname "$rel")" && cp "$f" "initrd/lib/modules/$KVER/$rel"
done
cp kroot/lib/modules/"$KVER"/modules.{order,builtin,builtin.modinfo} initrd/lib/modules/"$KVER"/
depmod -b initrd "$KVER"

cat > initrd/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_pci 9pnet_virtio 9p nbd zram dm_mod dm_crypt loop; do modprobe $m 2>/dev/null || echo "guest: modprobe $m failed"; done
ip link set lo up
H=/host
# The host root is read-only and nothing the guest reads from it changes during a boot: cache=loose
# keeps its files and lookups in the guest's page and dentry caches (without it every stat and read is
# a round trip to QEMU: python3 -c pass took 3.6-5 s under TCG, with it 0.9 s); msize: 256 KiB a
# message instead of 8 KiB (both mounts).  The out dir (/mnt), which both sides write, stays uncached.
P9="trans=virtio,version=9p2000.L,msize=262144"
mount -t 9p -o $P9,ro,cache=loose hostroot $H || { echo "guest: cannot mount host root"; poweroff -f; }
if grep -q 'lab\.init=systemd' /proc/cmdline; then
  # systemd as PID 1 (run.sh with VM_INIT=systemd): the host root read-only under a tmpfs overlay
  # (/etc, /var, /usr/local writable; nothing reaches the host), the guest kernel's modules in its
  # /lib/modules, the checkout's tests/vm/systemd/setup.sh (lab units, masks), then switch_root.
  echo "guest: kernel $(cat /proc/sys/kernel/osrelease), systemd as PID 1, cpus: $(grep -c ^processor /proc/cpuinfo), $(grep MemTotal /proc/meminfo)"
  N=/newroot; mkdir -p /ovl $N
  mount -t tmpfs -o mode=755 ovl /ovl && mkdir -p /ovl/upper /ovl/work
  modprobe overlay && mount -t overlay -o lowerdir=$H,upperdir=/ovl/upper,workdir=/ovl/work overlay $N \
    || { echo "guest: cannot mount the overlay root"; poweroff -f; }
  mount -t 9p -o $P9 out $N/mnt || { echo "guest: cannot mount out dir"; poweroff -f; }
  mount -t tmpfs -o mode=755 tmpfs $N/run
  mkdir -p $N/lib/modules $N/run/kmod/lib && cp -a /lib/modules/* $N/lib/modules/ && ln -s /lib/modules $N/run/kmod/lib/modules
  sh $N/mnt/repo/tests/vm/systemd/setup.sh $N || { echo "guest: tests/vm/systemd/setup.sh failed"; poweroff -f; }
  umount /proc /sys; mount -o move /dev $N/dev
  exec switch_root $N /lib/systemd/systemd
fi
mount -t 9p -o $P9 out $H/mnt || echo "guest: cannot mount out dir"
mount -t proc proc $H/proc; mount -t sysfs sys $H/sys; mount -t devtmpfs dev $H/dev
for d in tmp run var/tmp var/lib; do mount -t tmpfs tmpfs $H/$d; done
mkdir -p $H/dev/pts $H/dev/shm; mount -t devpts devpts $H/dev/pts; mount -t tmpfs tmpfs $H/dev/shm
# the guest kernel's modules for modprobe inside the chroot: `modprobe -d /run/kmod ...`
# (and plain modprobe too where the host has a /lib/modules to mount over)
mkdir -p $H/run/kmod/lib/modules; mount --bind /lib/modules $H/run/kmod/lib/modules
[ -d $H/lib/modules ] && mount --bind /lib/modules $H/lib/modules
echo "guest: kernel $(cat /proc/sys/kernel/osrelease), nbd devices: $(ls /sys/block | grep -c '^nbd'), cpus: $(grep -c ^processor /proc/cpuinfo), $(grep MemTotal /proc/meminfo)"
cmd=$(sed -n 's/.*lab\.cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
case "$cmd" in /*) ;; *) cmd=/mnt/$cmd ;; esac
chroot $H /bin/bash -c 'export HOME=/tmp PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
cd /mnt && { [ ! -f ./guest.env ] || . ./guest.env; } && exec bash "$0"' "$cmd" 2>&1
rc=$?
echo "guest: rc=$rc"
echo $rc > $H/mnt/rc
sync
poweroff -f
INIT
chmod +x initrd/init
rm -rf "$G.tmp" && mkdir "$G.tmp"
(cd initrd && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$G.tmp/initrd.img"
cp kroot/boot/vmlinuz-"$KVER" "$G.tmp/vmlinuz"
echo "$KVER" > "$G.tmp/kver"
rm -rf "$G" && mv "$G.tmp" "$G"
echo "tests/vm/build.sh: built $G (kernel $KVER, initrd $(( $(stat -c %s "$G/initrd.img") / 1024 )) KiB, $(find initrd -name '*.ko' | wc -l) modules)"
