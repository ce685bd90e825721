#!/bin/bash
# bench/profile-worker.sh ANCHORS OUTDIR: cProfile of one serving connection under 4K QD32 fio
# (randwrite, then randread), on a GPU machine.  Development aid; prints the top functions.
set -u
A=$1 O=$2
mkdir -p "$O"
NBD_VRAM_PROFILE=$O python3 nbd_vram.py serve --socket /tmp/p.sock --size "${SIZE:-8G}" --workers 1 > "$O/serve.log" 2>&1 &
S=$!
for _ in $(seq 100); do [ -S /tmp/p.sock ] && break; sleep 0.2; done; sleep 1
for rw in randwrite randread; do
  "$A/bench/run-fio.sh" --name=$rw --rw=$rw --ioengine=nbd --uri="nbd+unix:///?socket=/tmp/p.sock" --size="${WSET:-4g}" \
    --time_based --runtime=4 --norandommap --randrepeat=0 --bs=4k --iodepth=32 | grep -E "IOPS"
done
kill -TERM $S; wait $S
for f in "$O"/*.prof; do
  python3 -c "import pstats,sys; pstats.Stats(sys.argv[1]).sort_stats('tottime').print_stats(14)" "$f" | grep -v "^$" | tail -20
done
