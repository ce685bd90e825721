#!/bin/bash
# bench/write-probe.sh ANCHORS: 4K randwrite QD32 x1/x4/x8 against serve in several configurations
# (worker count, grouped copies on/off), to find where write throughput stops scaling.  Development aid.
set -u
A=$1
run_cfg() {  # NAME ENV... -- SERVE ARGS...
  local name=$1; shift
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  rm -f /tmp/wp.sock
  env "${envs[@]}" python3 nbd_vram.py serve --socket /tmp/wp.sock --size 8G "$@" > /tmp/wp.log 2>&1 &
  local S=$!
  for _ in $(seq 100); do grep -q serving /tmp/wp.log && break; sleep 0.2; done
  for nj in 1 4 8; do
    for rw in randwrite randread; do
      iops=$("$A/bench/run-fio.sh" --name=p --rw=$rw --ioengine=nbd --uri="nbd+unix:///?socket=/tmp/wp.sock" \
        --size=4g --time_based --runtime=3 --ramp_time=1 --norandommap --randrepeat=0 --bs=4k --iodepth=32 \
        --numjobs=$nj --group_reporting | grep -oE "IOPS=[0-9.]+k" | head -1)
      echo "$name $rw x$nj: $iops"
    done
  done
  kill -TERM $S; wait $S
}
run_cfg "workers8-grouped" -- --workers 8
run_cfg "workers8-ungrouped" NBD_VRAM_BATCH_COPY=0 -- --workers 8
run_cfg "workers1-grouped" -- --workers 1
