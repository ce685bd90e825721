#!/usr/bin/env python3
"""bench/multigpu.py - nbd_vram.py on every GPU at once against one GPU, with fio verify across all.

    bench/multigpu.py --anchors .anchors --out $OUT [--gpus N] [--runtime 4]

Starts one `nbd_vram.py serve` per GPU (8 GiB each, on its own socket), prefills each export, then
runs each job first against GPU 0 alone and then against every GPU at the same time (one fio per
GPU, started together), and reports the aggregate (the sum of the fios) against the one-GPU figure.
Then fio verify (randwrite, crc32c, every block read back) on every GPU at once.  Writes
MULTIGPU-table.md and multigpu.json to --out.  This times the NBD servers over Unix sockets, as
bench/bench.py does; the kernel path cannot be timed where the GPUs are.  Standard library only.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import ROOT, fio_argv, fio_result, fmt, sh, wait_socket  # noqa: E402

JOBS = [
    ("4K randread QD32 x8", "--rw=randread --bs=4k --iodepth=32 --numjobs=8", "iops"),
    ("4K randwrite QD32 x8", "--rw=randwrite --bs=4k --iodepth=32 --numjobs=8", "iops"),
    ("1M seq read QD8 x4", "--rw=read --bs=1m --iodepth=8 --numjobs=4 --offset_increment=1g --size=1g", "bw"),
    ("1M seq write QD8 x4", "--rw=write --bs=1m --iodepth=8 --numjobs=4 --offset_increment=1g --size=1g", "bw"),
]


WORKING_SET = "4g"       # of each GPU's export, as bench.py (--size below 8G makes it half the export)


def run_together(anchors, socks, slug, args, runtime, out):
    """One fio per socket, all at once; the sum of their figures (None if any failed)."""
    names = [f"{slug}-gpu{i}" for i in range(len(socks))]
    procs = [subprocess.Popen(fio_argv(anchors, s, n, args, runtime, out, WORKING_SET), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for s, n in zip(socks, names)]
    ok = all(p.wait() == 0 for p in procs)
    if not ok:
        return None
    parts = [fio_result(out, n, args) for n in names]
    if any(p is None for p in parts):
        return None
    return {k: sum(p[k] for p in parts) for k in ("iops", "bw")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=0, help="how many GPUs (default: all)")
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--size", default="8G", help="export on each GPU (default 8G)")
    a = ap.parse_args()
    global WORKING_SET
    size_mib = int(a.size[:-1]) * 1024 if a.size.upper().endswith("G") else int(a.size.rstrip("Mm"))
    if size_mib < 8192:
        WORKING_SET = f"{size_mib // 2}m"
        for i, (name, args, metric) in enumerate(JOBS):
            JOBS[i] = (name, args.replace("--offset_increment=1g --size=1g",
                                          f"--offset_increment={size_mib // 8}m --size={size_mib // 8}m"), metric)
    anchors = os.path.abspath(a.anchors)
    os.makedirs(os.path.join(a.out, "fio"), exist_ok=True)
    cards = sh("nvidia-smi --query-gpu=index,name,driver_version,pci.bus_id --format=csv,noheader").splitlines()
    n = a.gpus or len(cards)
    print(f"multigpu: {n} GPUs: {cards}", flush=True)
    socks = [f"/tmp/multigpu-{i}.sock" for i in range(n)]
    procs, logs = [], []
    for i, s in enumerate(socks):
        if os.path.exists(s):
            os.unlink(s)
        logs.append(open(os.path.join(a.out, f"serve-gpu{i}.log"), "w"))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "nbd_vram.py"), "serve", "--socket", s,
                                       "--size", a.size, "--gpu", str(i)], stdout=logs[-1], stderr=subprocess.STDOUT))
    rows, verify = [], []
    try:
        for i, (s, p) in enumerate(zip(socks, procs)):
            wait_socket(s, p, f"nbd_vram.py serve on GPU {i}")
        for s in socks:
            subprocess.run([os.path.join(anchors, "bench", "run-fio.sh"), "--name=prefill", "--ioengine=nbd",
                            f"--uri=nbd+unix:///?socket={s}", f"--size={WORKING_SET}", "--rw=write", "--bs=1m",
                            "--iodepth=8"], capture_output=True, check=True)
        for name, args, metric in JOBS:
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
            one = run_together(anchors, socks[:1], slug + "-one", args, a.runtime, a.out)
            alln = run_together(anchors, socks, slug + "-all", args, a.runtime, a.out)
            rows.append((name, metric, one, alln))
            print(f"multigpu: {name:22s} 1 GPU {fmt(metric, one and one[metric]):>12s}   {n} GPUs "
                  f"{fmt(metric, alln and alln[metric]):>12s}", flush=True)
        # fio verify on every GPU at once: 1 GiB of 4K random writes each, every block read back.
        vprocs = [subprocess.Popen([os.path.join(anchors, "bench", "run-fio.sh"), f"--name=verify-gpu{i}",
                                    "--ioengine=nbd", f"--uri=nbd+unix:///?socket={s}", "--rw=randwrite", "--bs=4k",
                                    f"--size={'1g' if WORKING_SET == '4g' else WORKING_SET}", "--iodepth=32", "--verify=crc32c", "--do_verify=1",
                                    "--verify_fatal=1", "--output-format=terse"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for i, s in enumerate(socks)]
        for i, p in enumerate(vprocs):
            text = p.communicate()[0]
            verify.append((i, p.returncode))
            print(f"multigpu: fio verify on GPU {i}: exit {p.returncode} {'' if p.returncode == 0 else text[-400:]}",
                  flush=True)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
    date = time.strftime("%Y-%m-%d")
    lines = [f"Cards: {'; '.join(cards)}; {date}; one `nbd_vram.py serve` ({a.size}, 8 workers) per GPU; fio nbd "
             f"engine over Unix sockets, {WORKING_SET} working set a GPU, {a.runtime} s per job after 1 s ramp; N GPUs = "
             "one fio per GPU at the same time, summed.", "",
             f"| job | 1 GPU | {n} GPUs | scaling |", "|---|---|---|---|"]
    for name, metric, one, alln in rows:
        sc = f"{alln[metric] / one[metric]:.2f}×" if one and alln else "n/a"
        lines.append(f"| {name} | {fmt(metric, one and one[metric])} | {fmt(metric, alln and alln[metric])} | {sc} |")
    vsize = "1 GiB" if WORKING_SET == "4g" else WORKING_SET
    lines += ["", f"fio verify ({vsize} of 4K random writes a GPU, crc32c, all GPUs at once): " +
              ", ".join(f"GPU {i} {'passed' if rc == 0 else 'FAILED'}" for i, rc in verify)]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "MULTIGPU-table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "multigpu.json"), "w") as f:
        json.dump({"cards": cards, "date": date, "rows": rows, "verify": verify}, f)
    return 0 if verify and all(rc == 0 for _, rc in verify) and all(o and al for _, _, o, al in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
