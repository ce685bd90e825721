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
    # Swap-shaped: swap-out writes while swap-in reads, the figure is reads + writes.
    ("4K randrw 70/30 QD1", "--rw=randrw --rwmixread=70 --bs=4k --iodepth=1 --numjobs=1", "iops", True),
    ("4K randrw 70/30 QD32 x4", "--rw=randrw --rwmixread=70 --bs=4k --iodepth=32 --numjobs=4", "iops", False),
    ("4K randrw 70/30 QD16 x8", "--rw=randrw --rwmixread=70 --bs=4k --iodepth=16 --numjobs=8", "iops", False),
    ("4K randwrite QD16 x8", "--rw=randwrite --bs=4k --iodepth=16 --numjobs=8", "iops", False),
]
FOOTPRINT_JOB = "4K randrw 70/30 QD16 x8"     # the footprint under load is sampled in the middle of this job


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
    if j.get("error"):
        return None
    rw = args.split()[0]
    if "randrw" in rw or "=rw" in rw:
        r, w = j["read"], j["write"]
        n = r["total_ios"] + w["total_ios"]
        lat = (r["lat_ns"]["mean"] * r["total_ios"] + w["lat_ns"]["mean"] * w["total_ios"]) / max(n, 1)
        return {"iops": r["iops"] + w["iops"], "bw": (r["bw"] + w["bw"]) / 1024, "lat_us": lat / 1000}
    s = j["write"] if "write" in rw else j["read"]
    return {"iops": s["iops"], "bw": s["bw"] / 1024, "lat_us": s["lat_ns"]["mean"] / 1000}


def fio(anchors, sock, name, args, runtime, out, sample=None, size=SIZE):
    """One fio job; sample(), if given, runs in the middle of it (after the ramp)."""
    p = subprocess.Popen(fio_argv(anchors, sock, name, args, runtime, out, size), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if sample is not None:
        time.sleep(1 + runtime / 2)
        sample()
    _, err = p.communicate()
    if p.returncode != 0:
        print(f"bench: fio {name} failed: {err.strip()[-400:]}", flush=True)
        return None
    return fio_result(out, name, args)


def tree(pid):
    """PID and every process below it."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _kib(path, key):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def footprint(pid, export_mib):
    """What a server costs beyond the swap it lends: VRAM of its processes (nvidia-smi's per-process
    figure, which includes the export) less the export, processes with a CUDA context, and its RAM:
    PSS (shared pages split between the processes sharing them) and locked memory, all processes."""
    pids = tree(pid)
    vram = {}
    for line in sh("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits").splitlines():
        try:
            p, mib = (int(x) for x in line.split(","))
        except ValueError:
            continue
        vram[p] = mib
    used = sum(vram.get(p, 0) for p in pids)
    each = [{"pid": p, "role": role(p), "pss_mib": _kib(f"/proc/{p}/smaps_rollup", "Pss") / 1024,
             "anon_mib": _kib(f"/proc/{p}/smaps_rollup", "Pss_Anon") / 1024, "vram_mib": vram.get(p, 0)}
            for p in pids]
    return {"processes": len(pids), "contexts": sum(1 for p in pids if p in vram), "vram_mib": used,
            "vram_beyond_export_mib": used - export_mib,
            "pss_mib": sum(e["pss_mib"] for e in each),
            "locked_mib": sum(_kib(f"/proc/{p}/status", "VmLck") for p in pids) / 1024,
            "each": each}


def role(pid):
    """What a process of a server is, from its command line: daemon, GPU process, worker, spare."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "worker" not in argv:
        return os.path.basename(argv[1] if len(argv) > 1 and argv[0].endswith(("python3", "python")) else argv[0])
    return "GPU process" if "--gpu-process" in argv else "spare" if "--standby" in argv else "worker"


def prefill(anchors, sock, size=SIZE):
    subprocess.run([os.path.join(anchors, "bench", "run-fio.sh"), "--name=prefill", "--ioengine=nbd",
                    f"--uri=nbd+unix:///?socket={sock}", f"--size={size}", "--rw=write", "--bs=1m", "--iodepth=8"],
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
    ap.add_argument("--export-mib", type=int, default=8192, help="size of each server's export")
    ap.add_argument("--working-set", default=SIZE, help="bytes of the export each job touches (fio --size)")
    ap.add_argument("--baseline", default="", help="an earlier nbd_vram.py to run as a third server (column 'before')")
    a = ap.parse_args()
    anchors = os.path.abspath(a.anchors)
    os.makedirs(os.path.join(a.out, "fio"), exist_ok=True)
    card = sh("nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.max,pcie.link.width.max,memory.total "
              "--format=csv,noheader")
    print("bench:", card, flush=True)
    servers = ("c", "py0", "py") if a.baseline else ("c", "py")
    socks = {n: f"/tmp/bench-{n}.sock" for n in servers}
    for p in socks.values():
        if os.path.exists(p):
            os.unlink(p)
    logs = {n: open(os.path.join(a.out, f"{n}.log"), "w") for n in servers}
    procs = {"c": subprocess.Popen([os.path.join(anchors, "c-original", "run-nbd-vram.sh"), str(a.export_mib), socks["c"], "16"],
                                   stdout=logs["c"], stderr=subprocess.STDOUT)}
    for n, prog in (("py0", a.baseline), ("py", os.path.join(ROOT, "nbd_vram.py"))):
        if n in servers:
            procs[n] = subprocess.Popen([sys.executable, prog, "serve", "--socket", socks[n], "--size", f"{a.export_mib}M"]
                                        + a.serve_args.split(), stdout=logs[n], stderr=subprocess.STDOUT)
    prints = {}
    try:
        for n in servers:
            wait_socket(socks[n], procs[n], n)
        for n in servers:
            prefill(anchors, socks[n], a.working_set)
        time.sleep(1)
        for n in servers:
            prints[f"{n} idle"] = footprint(procs[n].pid, a.export_mib)
        jobs = [j for j in JOBS if re.search(a.only, j[0])]
        results = {j[0]: {n: [] for n in servers} for j in jobs}
        for rnd in range(a.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for name, args, metric, _ in jobs:
                for n in order:
                    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()) + f"-{n}-{rnd}"
                    sample = None
                    if name == FOOTPRINT_JOB and rnd == 0:
                        def sample(n=n):
                            prints[f"{n} under {FOOTPRINT_JOB}"] = footprint(procs[n].pid, a.export_mib)
                    r = fio(anchors, socks[n], slug, args, a.runtime, a.out, sample, a.working_set)
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
        for n in servers:
            vals = [r for r in results[name][n] if r]
            med[n] = ({k: statistics.median(r[k] for r in vals) for k in ("iops", "bw", "lat_us")}
                      if vals else None)
        ratio = (med["py"][metric] / med["c"][metric]) if med["c"] and med["py"] else None
        rows.append((name, metric, lat, med, ratio))
    date = time.strftime("%Y-%m-%d")
    lines = [f"Card: {card}; {date}; fio {a.working_set} working set, {a.runtime} s per job after 1 s ramp, "
             f"median of {a.rounds} rounds alternating which server goes first; {a.export_mib} MiB export each, "
             f"all {len(servers)} servers running on the same GPU at once.", "",
             "| job | C original |" + (" nbd_vram.py before |" if a.baseline else "") + " nbd_vram.py | ratio |",
             "|---|---|" + ("---|" if a.baseline else "") + "---|---|"]
    for name, metric, lat, med, ratio in rows:
        cells = []
        for n in servers:
            m = med[n]
            cells.append("failed" if not m else fmt(metric, m[metric]) + (f", {m['lat_us']:.1f} µs" if lat else ""))
        lines.append(f"| {name} | {' | '.join(cells)} | " + (f"{ratio:.2f}× |" if ratio else "n/a |"))
    lines += ["", f"Footprint beyond the {a.export_mib} MiB each server lends (VRAM: nvidia-smi per process; RAM: PSS and "
              "locked memory, every process of the server):", "",
              "| server, when | processes | CUDA contexts | VRAM beyond the export | RAM (PSS) | RAM locked |",
              "|---|---|---|---|---|---|"]
    names = {"c": "C original", "py0": "nbd_vram.py before", "py": "nbd_vram.py"}
    for key, f in prints.items():
        n, when = key.split(" ", 1)
        lines.append(f"| {names[n]}, {when} | {f['processes']} | {f['contexts']} | {f['vram_beyond_export_mib']} MiB | "
                     f"{f['pss_mib']:.0f} MiB | {f['locked_mib']:.0f} MiB |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "BENCHMARKS-table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"card": card, "date": date, "results": results, "footprint": prints}, f)
    for f in logs.values():
        f.close()
    shutil.copy(os.path.join(a.out, "py.log"), os.path.join(a.out, "py-serve.log"))


if __name__ == "__main__":
    main()
