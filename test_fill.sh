#!/usr/bin/env bash
# test_fill.sh: an nbd-vram device takes a full write of zeros (4 MiB O_DIRECT blocks) at the GB/s printed, and samples read back as written.
# SPDX-License-Identifier: MIT
#
#   sudo ./test_fill.sh DEVICE|auto
# auto: the device of the running daemon (state.json in $NBD_VRAM_RUNTIME_DIR or /run/nbd-vram).
# If the device is active swap it is swapoff'd first (every page on it must fit back into
# RAM), and a trap makes it swap again (mkswap + swapon at the old priority) on every exit,
# Ctrl-C included.  Everything on the device is overwritten.  Only /dev/nbdN devices are
# accepted (FORCE=1 overrides: it destroys the device's data).
# Exit status: 0 passed, 1 failed, 77 skipped (not root, or no such device).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUNDIR=${NBD_VRAM_RUNTIME_DIR:-/run/nbd-vram}
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
PRIO=""
DISCARD=()
DEV=""

skip() { echo "SKIP: test_fill.sh: $*"; exit 77; }
fail() { echo "FAIL: test_fill.sh: $*" >&2; exit 1; }
step() { { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2; "$@"; }

restore_swap() {
    local rc=$?
    set +e
    if [ -n "$PRIO" ] && [ -z "$(awk -v d="$DEV" '$1 == d {print $5}' /proc/swaps)" ]; then
        if step mkswap --label nbd-vram "$DEV" >/dev/null && step swapon --priority "$PRIO" "${DISCARD[@]}" "$DEV"; then
            echo "test_fill.sh: $DEV is swap again at priority $PRIO"
        else
            echo "FAIL: test_fill.sh: could not make $DEV swap again (mkswap + swapon --priority $PRIO)" >&2
            rc=1
        fi
    fi
    exit "$rc"
}

case ${1:-} in
    ""|-h|--help) sed -n '2,12p' "$0"; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || skip "needs root (it writes a block device): sudo $0 $1"
if [ "$1" = auto ]; then
    DEV=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["device"])' "$RUNDIR/state.json" 2>/dev/null) \
        || skip "no nbd-vram daemon is running (no $RUNDIR/state.json): name a device, or start one (test_smoke.sh)"
else
    DEV=$1
fi
[ -b "$DEV" ] || skip "$DEV is not a block device"
DEV=$(realpath "$DEV")
if [[ ! $DEV =~ ^/dev/nbd[0-9]+$ ]] && [ "${FORCE:-0}" != 1 ]; then
    fail "refusing to overwrite $DEV: not an nbd device (FORCE=1 overrides, destroying its data)"
fi
if awk -v d="$DEV" '$1 == d {f = 1} END {exit !f}' /proc/mounts; then
    fail "$DEV is mounted"
fi
# A device-mapper device on top (encrypt = yes: the swap is /dev/mapper/nbd-vram-N, not $DEV)
# would be overwritten under its feet, live swap included.
HOLDERS=$(ls "/sys/block/${DEV#/dev/}/holders" 2>/dev/null || true)
if [ -n "$HOLDERS" ]; then
    fail "$DEV is in use by ${HOLDERS//$'\n'/ } (such as the encrypted swap /dev/mapper/nbd-vram-N): refusing to overwrite it"
fi
SIZE=$(blockdev --getsize64 "$DEV")
(( SIZE >= 4 << 20 )) || skip "$DEV has $SIZE bytes: not connected, or smaller than one 4 MiB block"

PRIO=$(awk -v d="$DEV" '$1 == d {print $5}' /proc/swaps)
trap restore_swap EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
if [ -n "$PRIO" ]; then
    # Restore it as the daemon makes it: with --discard unless the configuration says no.
    if [ "$(python3 "$SRC/nbd_vram.py" check-config 2>/dev/null | awk '$1 == "discard" {print $3}')" != no ]; then
        DISCARD=(--discard)
    fi
    echo "test_fill.sh: $DEV is swap at priority $PRIO: swapoff (pages on it come back to RAM)"
    step swapoff "$DEV"
fi

echo "test_fill.sh: writing $(( SIZE >> 20 )) MiB of zeros to $DEV"
python3 - "$DEV" <<'EOF'
import mmap, os, random, sys, time

BS = 4 << 20
ALIGN = 4096


def main(dev):
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    size = os.lseek(fd, 0, os.SEEK_END)
    zeros = mmap.mmap(-1, BS)             # page-aligned, as O_DIRECT needs, and all zero
    rbuf = mmap.mmap(-1, BS)
    tty = sys.stderr.isatty()
    t0 = last = time.monotonic()
    done, next_pct = 0, 10
    while done < size:
        n = min(BS, size - done)
        w = os.pwrite(fd, memoryview(zeros)[:n], done)
        if w <= 0:
            sys.exit(f"FAIL: test_fill.sh: write at offset {done} returned {w}")
        done += w
        now = time.monotonic()
        pct = done * 100 // size
        if tty and (now - last >= 0.5 or done == size):
            sys.stderr.write(f"\r  {pct:3d}%  {done >> 20} of {size >> 20} MiB  {done / (now - t0) / 1e9:.2f} GB/s ")
            sys.stderr.flush()
            last = now
        elif not tty and pct >= next_pct:
            sys.stderr.write(f"  {pct:3d}%  {done >> 20} of {size >> 20} MiB  {done / (now - t0) / 1e9:.2f} GB/s\n")
            next_pct = pct // 10 * 10 + 10
    os.fsync(fd)
    elapsed = time.monotonic() - t0
    if tty:
        sys.stderr.write("\n")
    write_gbps = size / elapsed / 1e9

    # Samples: the first and last block and 8 at random offsets must be all zero.
    rng = random.Random()
    last_off = (size - BS) // ALIGN * ALIGN
    offsets = [0, last_off] + [rng.randrange(0, last_off + 1, ALIGN) for _ in range(8)]
    t1 = time.monotonic()
    for off in offsets:
        got = os.preadv(fd, [rbuf], off)
        if got != BS:
            sys.exit(f"FAIL: test_fill.sh: short read at offset {off}: {got} bytes")
        if rbuf[:] != zeros[:]:
            sys.exit(f"FAIL: test_fill.sh: the 4 MiB at offset {off} are not all zero after the fill")
    read_gbps = len(offsets) * BS / (time.monotonic() - t1) / 1e9

    # A random pattern at a random offset reads back as written.
    off = rng.randrange(0, last_off + 1, ALIGN)
    pattern = mmap.mmap(-1, BS)
    pattern.write(os.urandom(BS))
    if os.pwrite(fd, pattern, off) != BS:
        sys.exit(f"FAIL: test_fill.sh: short write of the pattern at offset {off}")
    os.fsync(fd)
    if os.preadv(fd, [rbuf], off) != BS or rbuf[:] != pattern[:]:
        sys.exit(f"FAIL: test_fill.sh: the 4 MiB pattern written at offset {off} read back differently")
    os.close(fd)
    print(f"test_fill.sh: wrote {size / (1 << 30):.2f} GiB in {elapsed:.2f} s: {write_gbps:.2f} GB/s "
          f"(4 MiB O_DIRECT writes); {len(offsets)} sampled blocks read back zero ({read_gbps:.2f} GB/s); "
          f"pattern at offset {off} verified")


try:
    main(sys.argv[1])
except KeyboardInterrupt:
    sys.stderr.write("\ninterrupted\n")
    sys.exit(130)
except OSError as e:
    sys.exit(f"FAIL: test_fill.sh: {e}")
EOF
echo "PASS: test_fill.sh: $DEV filled and verified"
