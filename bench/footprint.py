#!/usr/bin/env python3
"""bench/footprint.py - what `nbd_vram.py run` costs at its defaults beyond the swap it lends, beside the
C original at its defaults, on one GPU.

    bench/footprint.py --anchors .anchors [--size-mib 2048]

`run` goes under tests/power_harness.py (the GPU machines have no nbd driver: the harness plays the
kernel's part, everything else is the daemon's own code) with the shipped defaults but size; the C
original with VRAM_NBD_THREADS at its default (4).  Prints one table row each: processes, CUDA
contexts, VRAM beyond the export, PSS and locked RAM of every process (bench.py's footprint()).
Standard library only.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import footprint, wait_socket  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchors", required=True)
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:SETTING;SETTING",
                    help="also run `run` with these configuration lines added (e.g. 'workers 2:workers = 2')")
    a = ap.parse_args()
    rows = []
    for variant in ["defaults:"] + a.variant:
        label, _, lines = variant.partition(":")
        rows.append((f"nbd_vram.py run, {label}", run_footprint(a.size_mib, [x.strip() for x in lines.split(";") if x.strip()])))
    rows.append(("C original, defaults (4 threads)", c_footprint(a.anchors, a.size_mib)))
    print(f"| server ({a.size_mib} MiB of VRAM lent) | processes | CUDA contexts | VRAM beyond the export | "
          "RAM (PSS) | RAM locked |")
    print("|---|---|---|---|---|---|")
    for name, fp in rows:
        print(f"| {name} | {fp['processes']} | {fp['contexts']} | {fp['vram_beyond_export_mib']} MiB | "
              f"{fp['pss_mib']:.0f} MiB | {fp['locked_mib']:.0f} MiB |")
    print()
    print("| server | process | RAM (PSS) | of it anonymous | VRAM |")
    print("|---|---|---|---|---|")
    for name, fp in rows:
        for e in fp["each"]:
            print(f"| {name} | {e['role']} | {e['pss_mib']:.0f} MiB | {e['anon_mib']:.0f} MiB | {e['vram_mib']} MiB |")


def run_footprint(size_mib, conf_lines):
    """`run` under the harness with the shipped defaults but SIZE_MIB and CONF_LINES, once serving."""
    tmp = tempfile.mkdtemp(prefix="nbd-vram-footprint-")
    conf = os.path.join(tmp, "nbd-vram.conf")
    with open(conf, "w") as f:
        f.write(f"size = {size_mib}M\nmin_size = {size_mib}M\npower = always\n" + "".join(x + "\n" for x in conf_lines))
    env = dict(os.environ, NBD_VRAM_CONFIG=conf, NBD_VRAM_RUNTIME_DIR=os.path.join(tmp, "run"),
               HARNESS_EVENTS=os.path.join(tmp, "events"), NBD_VRAM_SYSFS_ROOT=os.path.join(tmp, "sys"))
    env.pop("NOTIFY_SOCKET", None)
    log = open(os.path.join(tmp, "run.log"), "w")
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "power_harness.py"), "run"], env=env,
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with open(os.path.join(tmp, "run", "state.json")) as f:
                    if json.load(f).get("mode") == "serving":
                        break
            except (OSError, ValueError):
                pass
            if run.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"footprint: run did not start; see {log.name}")
            time.sleep(0.2)
        time.sleep(2)
        return footprint(run.pid, size_mib)
    finally:
        run.terminate()
        run.wait(120)


def c_footprint(anchors, size_mib):
    tmp = tempfile.mkdtemp(prefix="nbd-vram-footprint-c-")
    sock = os.path.join(tmp, "c.sock")
    c = subprocess.Popen([os.path.join(anchors, "c-original", "run-nbd-vram.sh"), str(size_mib), sock],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_socket(sock, c, "the C original")
        time.sleep(2)
        return footprint(c.pid, size_mib)
    finally:
        c.terminate()
        c.wait(20)


if __name__ == "__main__":
    main()
