#!/usr/bin/env python3
"""bench/bench.py - nbd_vram.py serve and the C original, side by side on one GPU, same fio jobs.

    bench/bench.py --anchors .anchors --out $OUT [--runtime 4] [--rounds 2] [--only REGEX]

Starts both servers on the same GPU (8 GiB each), prefills both, then runs every
job against each server in turn, alternating which goes first each round, and
writes BENCHMARKS.md (a table with the median of the rounds and our/C ratios,
the card, driver and date) and results.json to --out.  Needs the portable fio
with the nbd engine from the anchors bundle (bench/run-fio.sh) and the C
original (c-original/run-nbd-vram.sh).  Standard library only.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = "4g"          # working set of each job, as in the anchors' figures

# name, fio arguments, the figure that counts ("iops" or "bw" in MiB/s), also latency?
JOBS = [
    ("4K randread QD1", "--rw=randread --bs=4k --iodepth=1 --numjobs=1", "iops", True),
    ("4K randwrite QD1", "--rw=randwrite --bs=4k --iodepth=1 --numjobs=1", "iops", True),
    ("4K randread QD32 x1", "--rw=randread --bs=4k --iodepth=32 --numjobs=1", "iops", False),
    ("4K randread QD32 x4", "--rw=randread --bs=4k --iodepth=32 --numjobs=4", "iops", False),
    ("4K randread QD32 x8", "--rw=randread --bs=4k --iodepth=32 --numjobs=8", "iops", False),
    ("4K randwrite QD32 x1", "--rw=randwrite --bs=4k --iodepth=32 --numjobs=1", "iops", False),
    ("4K randwrite QD32 x4", "--rw=randwrite --bs=4k --iodepth=32 --numjobs=4", "iops", False),
    ("4K randwrite QD32 x8", "--rw=randwrite --bs=4k --iodepth=32 --numjobs=8", "iops", False),
    ("1M seq write QD8", "--rw=write --bs=1m --iodepth=8 --numjobs=1", "bw", False),
    ("1M seq read QD8", "--rw=read --bs=1m --iodepth=8 --numjobs=1", "bw", False),
    ("1M seq write QD8 x4", "--rw=write --bs=1m --iodepth=8 --numjobs=4 --offset_increment=1g --size=1g", "bw", False),
    ("1M seq read QD8 x4", "--rw=read --bs=1m --iodepth=8 --numjobs=4 --offset_increment=1g --size=1g", "bw", False),
    ("1M write QD1", "--rw=write --bs=1m --iodepth=1 --numjobs=1", "bw", False),
    ("1M read QD1", "--rw=read --bs=1m --iodepth=1 --numjobs=1", "bw", False),
    ("128K randread QD8", "--rw=randread --bs=128k --iodepth=8 --numjobs=1", "bw", False),
]


def sh(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def wait_socket(path, proc, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not start (exit {proc.poll()})")
        time.sleep(0.1)


def fio_argv(anchors, sock, name, args, runtime, out, size=SIZE):
    """The anchors' fio on one NBD socket, time-based, its JSON result in OUT/fio/NAME.json."""
    return [os.path.join(anchors, "bench", "run-fio.sh"), f"--name={name}", "--ioengine=nbd",
            f"--uri=nbd+unix:///?socket={sock}", f"--size={size}", "--time_based", f"--runtime={runtime}",
            "--ramp_time=1", "--group_reporting", "--norandommap", "--randrepeat=0",
            "--output-format=json", f"--output={os.path.join(out, 'fio', name + '.json')}"] + args.split()


def fio_result(out, name, args):
    """{iops, bw (MiB/s), lat_us} of OUT/fio/NAME.json, or None if the job reported an error."""
    txt = open(os.path.join(out, "fio", f"{name}.json")).read()
    j = json.loads(txt[txt.find("{"):])["jobs"][0]
    s = j["write"] if "write" in args.split()[0] else j["read"]
    if j.get("error"):
        return None
    return {"iops": s["iops"], "bw": s["bw"] / 1024, "lat_us": s["lat_ns"]["mean"] / 1000}


def fio(anchors, sock, name, args, runtime, out):
    p = subprocess.run(fio_argv(anchors, sock, name, args, runtime, out), capture_output=True, text=True)
    if p.returncode != 0:
        print(f"bench: fio {name} failed: {p.stderr.strip()[-400:]}", flush=True)
        return None
    return fio_result(out, name, args)


def prefill(anchors, sock):
    subprocess.run([os.path.join(anchors, "bench", "run-fio.sh"), "--name=prefill", "--ioengine=nbd",
                    f"--uri=nbd+unix:///?socket={sock}", f"--size={SIZE}", "--rw=write", "--bs=1m", "--iodepth=8"],
                   capture_output=True, check=True)


def fmt(metric, v):
    if v is None:
        return "failed"
    return f"{v / 1000:.1f}k" if metric == "iops" else f"{v:.0f} MiB/s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", required=True, help="folder with c-original/ and bench/ (../shared/anchors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="regex of job names to run")
    ap.add_argument("--serve-args", default="", help="extra arguments for nbd_vram.py serve")
    a = ap.parse_args()
    anchors = os.path.abspath(a.anchors)
    os.makedirs(os.path.join(a.out, "fio"), exist_ok=True)
    card = sh("nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max,memory.total "
              "--format=csv,noheader")
    print("bench:", card, flush=True)
    c_sock, py_sock = "/tmp/bench-c.sock", "/tmp/bench-py.sock"
    for p in (c_sock, py_sock):
        if os.path.exists(p):
            os.unlink(p)
    logs = {n: open(os.path.join(a.out, f"{n}.log"), "w") for n in ("c", "py")}
    procs = {
        "c": subprocess.Popen([os.path.join(anchors, "c-original", "run-nbd-vram.sh"), "8192", c_sock, "16"],
                              stdout=logs["c"], stderr=subprocess.STDOUT),
        "py": subprocess.Popen([sys.executable, os.path.join(ROOT, "nbd_vram.py"), "serve", "--socket", py_sock,
                                "--size", "8G"] + a.serve_args.split(), stdout=logs["py"], stderr=subprocess.STDOUT),
    }
    try:
        wait_socket(c_sock, procs["c"], "the C original")
        wait_socket(py_sock, procs["py"], "nbd_vram.py serve")
        socks = {"c": c_sock, "py": py_sock}
        for n in ("c", "py"):
            prefill(anchors, socks[n])
        jobs = [j for j in JOBS if re.search(a.only, j[0])]
        results = {j[0]: {"c": [], "py": []} for j in jobs}
        for rnd in range(a.rounds):
            order = ("c", "py") if rnd % 2 == 0 else ("py", "c")
            for name, args, metric, _ in jobs:
                for n in order:
                    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()) + f"-{n}-{rnd}"
                    r = fio(anchors, socks[n], slug, args, a.runtime, a.out)
                    results[name][n].append(r)
                    print(f"bench: round {rnd + 1} {name:24s} {n:2s} {fmt(metric, r and r[metric]):>12s}"
                          + (f" {r['lat_us']:.1f} us" if r else ""), flush=True)
    finally:
        for n, p in procs.items():
            p.send_signal(signal.SIGTERM)
        for n, p in procs.items():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    rows = []
    for name, args, metric, lat in jobs:
        med = {}
        for n in ("c", "py"):
            vals = [r for r in results[name][n] if r]
            med[n] = ({k: statistics.median(r[k] for r in vals) for k in ("iops", "bw", "lat_us")}
                      if vals else None)
        ratio = (med["py"][metric] / med["c"][metric]) if med["c"] and med["py"] else None
        rows.append((name, metric, lat, med, ratio))
    date = time.strftime("%Y-%m-%d")
    lines = [f"Card: {card}; {date}; fio {SIZE} working set, {a.runtime} s per job after 1 s ramp, "
             f"median of {a.rounds} rounds alternating which server goes first; 8 GiB export each, "
             "both servers running on the same GPU at once.", "",
             "| job | C original | nbd_vram.py | ratio |", "|---|---|---|---|"]
    for name, metric, lat, med, ratio in rows:
        cells = []
        for n in ("c", "py"):
            m = med[n]
            cells.append("failed" if not m else fmt(metric, m[metric]) + (f", {m['lat_us']:.1f} µs" if lat else ""))
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio:.2f}× |" if ratio else
                     f"| {name} | {cells[0]} | {cells[1]} | n/a |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "BENCHMARKS-table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"card": card, "date": date, "results": results}, f)
    for f in logs.values():
        f.close()
    shutil.copy(os.path.join(a.out, "py.log"), os.path.join(a.out, "py-serve.log"))


if __name__ == "__main__":
    main()
