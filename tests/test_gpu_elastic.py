"""Elastic VRAM on the real driver (the GPU machine only: NBD_VRAM_TEST_LIBCUDA=libcuda.so.1, as root).

`nbd_vram.py run` under tests/power_harness.py (no nbd driver there: the harness plays the kernel and
relays each slice to NBD clients), 1 GiB slices: fio verify runs on slice 0 of every GPU while
`shrink` and `grow` release and take slices, then a real second process allocates VRAM until less
than the reserve is free, and the daemon gives slices back until the reserve holds; when that
process exits, they come back.  With several GPUs (`gpus = all`) the other process sits on the last
GPU only, and only that GPU gives slices back.
"""
import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from test_elastic import Elastic, fio_verify

GiB = 1 << 30
pytestmark = [pytest.mark.skipif(not os.environ.get("NBD_VRAM_TEST_LIBCUDA"), reason="real driver only (the GPU machine)"),
              pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")]

FIO = os.environ.get("NBD_VRAM_FIO") or shutil.which("fio")      # the anchors' bench/run-fio.sh on the GPU machine
RESERVE_GIB = 4

HOG = textwrap.dedent("""
    # Another GPU program: takes VRAM on device DEV until less than RESERVE - 1.5 GiB is free, holds it
    # until stdin closes.
    import ctypes, sys
    dev, reserve = int(sys.argv[1]), int(sys.argv[2])
    cu = ctypes.CDLL("libcuda.so.1")
    assert cu.cuInit(0) == 0
    ctx = ctypes.c_void_p()
    assert cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0 and cu.cuCtxSetCurrent(ctx) == 0
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    cu.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
    want = free.value - reserve + 3 * (1 << 29)
    ptr = ctypes.c_uint64()
    rc = cu.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(want))
    print("hog: cuMemAlloc of %.1f GiB on GPU %d: %d" % (want / 2**30, dev, rc), flush=True)
    sys.stdin.read()
""")


def gpu_count():
    cu = ctypes.CDLL("libcuda.so.1")
    n = ctypes.c_int()
    assert cu.cuInit(0) == 0 and cu.cuDeviceGetCount(ctypes.byref(n)) == 0
    return n.value


@pytest.mark.skipif(not FIO, reason="needs fio with the nbd engine (NBD_VRAM_FIO)")
def test_shrink_grow_and_a_real_gpu_program(tmp_path, fakecuda):
    ngpu = min(gpu_count(), 2)
    h = Elastic(tmp_path, fakecuda, f"slice_size = 1G\nreserve = {RESERVE_GIB}G\n"
                f"gpus = {'all' if ngpu > 1 else '0'}\nconnections = 4\n", VRAM_SETUP_SIZE_MB=str(6 * 1024))
    try:
        st = h.wait_mode("serving", timeout=180)
        print(f"serving: {[(s['gpu_index'], s['number'], s['priority']) for s in st['slices']]}")
        assert len(st["slices"]) == 6 * ngpu
        fios = [fio_verify(h.nbd / f"slice-{g}.0.sock", tmp_path, f"fio-gpu{g}", size="512M", loops=6)
                for g in range(ngpu)]
        t0 = time.monotonic()
        out = h.cli("shrink", f"{2 * ngpu}G")
        print(f"shrink {2 * ngpu}G: rc {out.returncode} in {time.monotonic() - t0:.1f} s: {out.stderr.strip()}")
        assert out.returncode == 0 and len(h.slices()) == 4 * ngpu, out.stderr
        out = h.cli("grow", f"{ngpu}G")
        print(f"grow {ngpu}G: rc {out.returncode}: {out.stderr.strip()}")
        assert out.returncode == 0 and len(h.slices()) == 5 * ngpu, out.stderr

        last = ngpu - 1
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(last), str(RESERVE_GIB * GiB)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        print(hog.stdout.readline().strip())
        t0 = time.monotonic()
        h.wait(lambda: sum(1 for g, _ in h.slices() if g == last) == 3, "released on the hogged GPU", timeout=120)
        print(f"released 2 slices of GPU {last} in {time.monotonic() - t0:.1f} s; slices now {h.slices()}")
        time.sleep(3)
        assert sum(1 for g, _ in h.slices() if g == last) == 3
        assert all(sum(1 for g, _ in h.slices() if g == o) == 5 for o in range(last))    # the others untouched
        hog.stdin.close()
        hog.wait(30)
        t0 = time.monotonic()
        h.wait(lambda: len(h.slices()) == 5 * ngpu, "taken back after the program quit", timeout=120)
        print(f"taken back in {time.monotonic() - t0:.1f} s (reclaim_after 2 s); slices now {h.slices()}")
        for g, f in enumerate(fios):
            rc = f.wait(600)
            text = (tmp_path / f"fio-gpu{g}.out").read_text()
            print(f"fio verify on slice {g}.0: exit {rc}: {text.strip()[:300]}")
            assert rc == 0, text
        ev = h.lines()
        assert "BAD" not in " ".join(ev), ev
        print("events:", [e for e in ev if e.startswith(("verify", "probe")) and "ok" in e][-8:])
        print(h.cli("status").stdout)
    finally:
        assert h.stop() == 0, h.text()[-3000:]
        h.log.close()
