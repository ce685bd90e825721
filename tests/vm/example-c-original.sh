#!/bin/bash
# Guest script, proof that the harness works: the C original (mlockall + PR_SET_IO_FLUSHER) with the
# mock libcuda whose "VRAM" is the ivshmem BAR, attached with nbd-client as swap, under pressure.
# Run (host, ~2 min):  tests/vm/build.sh && mkdir -p /tmp/ex &&
#   VRAM_MB=1024 VM_TIMEOUT=600 tests/vm/run.sh /tmp/ex "$PWD/tests/vm/example-c-original.sh" 512
# GUEST_C_ORIGINAL (default /work/shared/anchors/c-original) points at the C original; GUEST_WATCHDOG=1
# starts watchdog.py on the server.
set -euo pipefail
. "$NBD_VRAM_VM/guest-lib.sh"
L=${GUEST_C_ORIGINAL:-/work/shared/anchors/c-original}
[ -x "$L/nbd-vram" ] || { echo "SKIP: no C original at $L"; exit 77; }

bar=$(bar_enable)          # one path a line (not `| head -1`: with two BARs, pipefail sees SIGPIPE)
bar=${bar%%$'\n'*}
MOCK_CUDA_BACKING=$bar LD_LIBRARY_PATH=$L/mock VRAM_NBD_THREADS=2 \
  "$L/run-nbd-vram.sh" 1024 /tmp/nv.sock > /tmp/nv.log 2>&1 &
server=$!
wait_for_socket /tmp/nv.sock 30 || { cat /tmp/nv.log; exit 1; }
cat /tmp/nv.log
[ "${GUEST_WATCHDOG:-0}" = 1 ] && start_watchdog "$server"
nbd-client -unix /tmp/nv.sock /dev/nbd0 -b 4096 -N '' -connections 2
mkswap /dev/nbd0 >/dev/null && swapon -p 1500 /dev/nbd0
free -m
pressure 32 700
echo "swap used after pressure (MiB): $(swap_used_mb)"
swapoff /dev/nbd0 && nbd-client -d /dev/nbd0
kill "$server"; for i in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
tail -1 /tmp/nv.log   # the C original aborts in free() on SIGTERM (seen on the host too): not a test failure
fail_on_kernel_errors
echo PASS
