#!/usr/bin/env python3
"""bench/memclock.py - what the memory_clock_max cap costs: the same fio jobs against
`nbd_vram.py serve` with the GPU's memory clock free, then locked at each lower supported clock
(NVML, as the daemon does), then reset.

    bench/memclock.py --anchors .anchors --out $OUT [--gpu 0] [--runtime 4]

Prints and writes MEMCLOCK-table.md.  If the GPU refuses locked memory clocks (NVML says not
supported or no permission), that is the result, written the same way.
"""
import argparse
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ROOT, fio, fmt, prefill, sh, wait_socket  # noqa: E402

sys.path.insert(0, ROOT)
import nbd_vram as nv  # noqa: E402

JOBS = [("1M seq read QD8", "--rw=read --bs=1m --iodepth=8 --numjobs=1", "bw"),
        ("1M seq write QD8", "--rw=write --bs=1m --iodepth=8 --numjobs=1", "bw"),
        ("4K randread QD32 x4", "--rw=randread --bs=4k --iodepth=32 --numjobs=4", "iops")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpu", default="0")
    ap.add_argument("--runtime", type=int, default=4)
    a = ap.parse_args()
    anchors = os.path.abspath(a.anchors)
    os.makedirs(os.path.join(a.out, "fio"), exist_ok=True)
    card = sh(f"nvidia-smi -i {a.gpu} --query-gpu=name,driver_version --format=csv,noheader")
    nvml = nv.Nvml.open()
    if nvml is None:
        raise SystemExit("memclock: NVML (libnvidia-ml.so.1) is not available")
    cuda = nv.Cuda()
    cuda.init()
    uuid = cuda.device_info(cuda.select_device(a.gpu))["uuid"]
    clocks = nvml.supported_memory_clocks(uuid)
    print(f"memclock: {card}: supported memory clocks {clocks} MHz, now {nvml.memory_clock(uuid)}", flush=True)
    sock = "/tmp/memclock.sock"
    if os.path.exists(sock):
        os.unlink(sock)
    log = open(os.path.join(a.out, "memclock-serve.log"), "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "nbd_vram.py"), "serve", "--socket", sock,
                             "--size", "8G", "--gpu", a.gpu], stdout=log, stderr=subprocess.STDOUT)
    rows, notes = [], []
    try:
        wait_socket(sock, proc, "nbd_vram.py serve")
        prefill(anchors, sock)
        for cap in [None] + clocks[1:]:
            label = "no cap"
            if cap is not None:
                try:
                    got = nvml.lock_memory_clock(uuid, cap)
                except nv.NvmlError as e:
                    notes.append(f"locking the memory clock at {cap} MHz: {e}")
                    print(f"memclock: {notes[-1]}", flush=True)
                    break
                label = f"locked at {got} MHz (reads {nvml.memory_clock(uuid)[0]} MHz)"
            res = [fio(anchors, sock, f"memclock-{cap or 'free'}-{i}", args, a.runtime, a.out)
                   for i, (_, args, _) in enumerate(JOBS)]
            rows.append((label, res))
            print(f"memclock: {label}: " + ", ".join(f"{n} {fmt(m, r and r[m])}" for (n, _, m), r in zip(JOBS, res)),
                  flush=True)
    finally:
        try:
            nvml.reset_memory_clock(uuid)
        except nv.NvmlError as e:
            notes.append(f"reset: {e}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    lines = [f"Card: {card}; memory clocks {clocks} MHz; `nbd_vram.py serve` 8 GiB, fio over a Unix socket, "
             f"{a.runtime} s a job.", "", "| memory clock | " + " | ".join(n for n, _, _ in JOBS) + " |",
             "|---|" + "---|" * len(JOBS)]
    base = rows[0][1] if rows else None
    for label, res in rows:
        cells = []
        for (n, _, m), r, b in zip(JOBS, res, base):
            cells.append(fmt(m, r and r[m]) + (f" ({r[m] / b[m]:.2f}×)" if r and b and label != "no cap" else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [""] + notes
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "MEMCLOCK-table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
