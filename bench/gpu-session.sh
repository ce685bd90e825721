#!/bin/bash
# bench/gpu-session.sh STEPS...: what one `device` call runs on the GPU machine (as root, in the
# checkout, with the anchors bundle carried as .anchors).  Output goes to $OUT (default /tmp/out).
#   tests     the real-driver tests: data path, kernel-mode workers, restart, power, elastic
#   multigpu  bench/multigpu.py: every GPU at once against one, fio verify on all
#   memclock  bench/memclock.py: what capping the memory clock costs
#   bench     bench/bench.py: nbd_vram.py serve against the C original, side by side
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export NBD_VRAM_TEST_LIBCUDA=libcuda.so.1 NBD_VRAM_FIO=$PWD/.anchors/bench/run-fio.sh PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id --format=csv,noheader
rc=0
for step in "$@"; do
  t0=$SECONDS
  case $step in
    tests) timeout 330 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_workers.py \
             tests/test_restart.py tests/test_gpu_elastic.py 2>&1 | tail -n 60 | tee "$OUT/tests.txt" ;;
    multigpu) timeout 240 python3 bench/multigpu.py --anchors .anchors --out "$OUT/multigpu" 2>&1 | tail -n 30 ;;
    memclock) timeout 150 python3 bench/memclock.py --anchors .anchors --out "$OUT/memclock" 2>&1 | tail -n 20 ;;
    bench) timeout 560 python3 bench/bench.py --anchors .anchors --out "$OUT/bench" --rounds "${ROUNDS:-2}" 2>&1 | tail -n 25 ;;
    *) echo "gpu-session: unknown step $step"; rc=2 ;;
  esac
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  echo "gpu-session: $step took $(( SECONDS - t0 )) s"
done
exit $rc
