"""Elastic VRAM and every GPU: slices, the reserve, shrink/grow, several GPUs, one GPU failing.

The decisions are table-tested; the daemon runs under tests/power_harness.py (the kernel played by
the harness) on the fake libcuda with several devices, another process's VRAM use simulated with
FAKECUDA_OTHER_USAGE and a lost GPU with FAKECUDA_LOST_DEVICES.  Every slice holds a pattern
(HARNESS_PROBE=all) that is read back at every release, and fio verify runs on a slice through the
harness's NBD relay while slices come and go.  tests/vm/guest-integration.sh (part "elastic") does
the same against the real nbd driver with two "GPUs".
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import nbd_vram as nv
from conftest import eventually
from nbdclient import Client
from test_power import Harness, started

MiB, GiB = 1 << 20, 1 << 30
R = 2 * GiB       # the reserve in the table


# -- decisions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("free, held, ceiling, calm, now, want, want_calm", [
    (5 * GiB, 4, 4, None, 100, None, None),          # all held, room: nothing to take
    (R - 1, 4, 4, None, 100, "release", None),        # another program took VRAM: below the reserve
    (R - 1, 0, 4, None, 100, None, None),             # below, but nothing left to give
    (R, 4, 4, None, 100, None, None),                 # exactly the reserve: held
    (R + GiB, 3, 4, None, 100, None, 100),            # room for a slice: the clock starts
    (R + GiB, 3, 4, 100, 399, None, 100),             # ... not long enough
    (R + GiB, 3, 4, 100, 400, "grow", None),          # ... 300 s of room: take one back
    (R + GiB - 1, 3, 4, 100, 400, None, None),        # the slice would cut into the reserve: clock reset
    (10 * GiB, 4, 2, None, 100, "release", None),     # shrink: above the ceiling
    (10 * GiB, 2, 2, None, 100, None, None),          # at the ceiling
])
def test_elastic_decision(free, held, ceiling, calm, now, want, want_calm):
    assert nv.elastic_decision(R, free, held, ceiling, GiB, calm, now, 300) == (want, want_calm)


def test_elastic_decision_without_a_reserve():
    assert nv.elastic_decision(None, 0, 4, 4, GiB, None, 0, 300) == (None, None)          # never by itself
    assert nv.elastic_decision(None, 10 * GiB, 4, 3, GiB, None, 0, 300) == ("release", None)   # shrink
    assert nv.elastic_decision(None, 10 * GiB, 3, 4, GiB, None, 0, 0) == ("grow", None)    # grow, no wait


@pytest.mark.parametrize("size, slice_size, want", [
    (7 * GiB, GiB, [GiB] * 7),
    (7 * GiB + 512 * MiB, GiB, [GiB] * 7 + [512 * MiB]),
    (512 * MiB, GiB, [512 * MiB]),
    (64 * MiB + 1, 64 * MiB, [64 * MiB]),            # below the 2 MiB granularity: dropped
])
def test_slice_sizes(size, slice_size, want):
    assert nv.slice_sizes(size, slice_size) == want


def test_slice_priorities_step_down_and_stay_in_range():
    assert [nv.slice_priority(1500, n) for n in range(3)] == [1500, 1499, 1498]
    assert nv.slice_priority(1, 5) == 0 and nv.slice_priority(-1, 3) == -1


def test_gpu_specs():
    assert nv.gpu_specs("all", 3) == ["0", "1", "2"]
    assert nv.gpu_specs("1,GPU-ab", 3) == ["1", "GPU-ab"]
    with pytest.raises(nv.NoGpuError):
        nv.gpu_specs("all", 0)


# -- the daemon --------------------------------------------------------------------------------

pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")


class Elastic(Harness):
    def __init__(self, tmp_path, fakecuda, conf_lines, **extra):
        self.other = tmp_path / "other-usage"
        self.lost = tmp_path / "lost-devices"
        self.nbd = tmp_path / "nbd"
        self.nbd.mkdir()
        keys = {line.split("=")[0].strip() for line in conf_lines.splitlines() if "=" in line}
        defaults = "".join(f"{k} = {v}\n" for k, v in (("vram_poll", 1), ("reclaim_after", 2)) if k not in keys)
        super().__init__(tmp_path, fakecuda, policy="always", conf_lines=defaults + conf_lines,
                         HARNESS_PROBE="all", HARNESS_NBD_DIR=str(self.nbd), FAKECUDA_OTHER_USAGE=str(self.other),
                         FAKECUDA_LOST_DEVICES=str(self.lost), **extra)

    def slices(self):
        return [(s["gpu_index"], s["number"]) for s in self.state().get("slices", [])]

    def wait(self, cond, what, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.text()}"
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout} s; slices {self.slices()}, events {self.lines()}\n{self.text()}")


@pytest.fixture
def elastic(tmp_path, fakecuda):
    yield from started(lambda conf_lines, **extra: Elastic(tmp_path, fakecuda, conf_lines, **extra))


def fio_verify(sock, tmp_path, name, size="16M", loops=3):
    """fio (or $NBD_VRAM_FIO, e.g. the anchors' run-fio.sh) writing SIZE at random through the NBD
    socket, then reading every block back against its crc32c, LOOPS times."""
    return subprocess.Popen([os.environ.get("NBD_VRAM_FIO") or "fio", f"--name={name}", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                             "--rw=randwrite", "--bs=4k", f"--size={size}", "--verify=crc32c", "--do_verify=1",
                             f"--loops={loops}", "--iodepth=8", "--verify_fatal=1", "--output-format=terse"],
                            stdout=open(tmp_path / f"{name}.out", "w"), stderr=subprocess.STDOUT)


@pytestmark_root
@pytest.mark.skipif(not shutil.which("fio"), reason="needs fio (apt install fio)")
def test_shrink_grow_and_the_reserve_with_data_verified(elastic, tmp_path):
    h = elastic("slice_size = 64M\nreserve = 512M\n", VRAM_SETUP_SIZE_MB="256", FAKECUDA_TOTAL_MB="1024")
    h.wait_mode("serving")
    assert h.slices() == [(0, 0), (0, 1), (0, 2), (0, 3)], h.slices()
    ev = h.lines()
    assert [e for e in ev if e.startswith("swapon")] == [
        "swapon /dev/nbd-harness 1500", "swapon /dev/nbd-harness0.1 1499",
        "swapon /dev/nbd-harness0.2 1498", "swapon /dev/nbd-harness0.3 1497"], ev
    assert ev.count("probe 0.0 ok") == 1 and "BAD" not in " ".join(ev)

    fio = fio_verify(h.nbd / "slice-0.0.sock", tmp_path, "fio-slice0", loops=20)
    try:
        # By hand: shrink by 100M is two slices (rounded up); the emptiest (here the last) go first.
        out = h.cli("shrink", "100M")
        assert out.returncode == 0, out.stderr + h.text()
        assert "128 MiB of VRAM is swap now" in out.stderr
        assert h.slices() == [(0, 0), (0, 1)]
        assert h.lines()[-6:] == ["swapoff /dev/nbd-harness0.3", "verify ok 3", "disconnect /dev/nbd-harness0.3",
                                  "swapoff /dev/nbd-harness0.2", "verify ok 2", "disconnect /dev/nbd-harness0.2"]
        out = h.cli("grow", "64M")
        assert out.returncode == 0, out.stderr + h.text()
        assert h.slices() == [(0, 0), (0, 1), (0, 2)]
        assert h.lines()[-2:] == ["probe 0.2 ok", "swapon /dev/nbd-harness0.2 1498"], h.lines()
        st = json.loads(h.cli("status", "--json").stdout)
        assert st["gpus"][0]["ceiling"] == 3 and len(st["slices"]) == 3

        # Another program takes 400 MiB of the 1 GiB: 1024 - 400 - 192 = 432 MiB free < 512 MiB:
        # slices are released one a poll until 560 >= 512.
        h.other.write_text("400\n")
        h.wait(lambda: len(h.slices()) == 1, "released down to one slice under the reserve")
        time.sleep(2.5)
        assert h.slices() == [(0, 0)]                 # held: 1024 - 400 - 64 = 560 free
        assert eventually(h.text, "below the reserve of 512 MiB"), h.text()
        # It quits: after reclaim_after (2 s) of room, the slices come back, one a poll, up to the ceiling (3).
        h.other.write_text("0\n")
        h.wait(lambda: len(h.slices()) == 3, "slices taken back")
        time.sleep(3)
        assert len(h.slices()) == 3                   # the ceiling from `shrink`/`grow` holds
        assert fio.wait(300) == 0, (tmp_path / "fio-slice0.out").read_text()
    finally:
        if fio.poll() is None:
            fio.kill()
    ev = h.lines()
    assert "BAD" not in " ".join(ev), ev
    assert sum(1 for e in ev if e.startswith("verify ok")) == 4       # 2 shrunk, 2 under the reserve
    out = h.cli("status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 of 4 slices allowed" in out.stdout and "slice 0.2" in out.stdout
    assert h.stop() == 0
    assert not (h.run / "state.json").exists()


@pytestmark_root
def test_every_gpu_striped_and_a_failing_gpu_given_up_alone(elastic, tmp_path):
    h = elastic("slice_size = 64M\ngpus = all\n", VRAM_SETUP_SIZE_MB="128", FAKECUDA_DEVICES="2")
    st = h.wait_mode("serving")
    assert h.slices() == [(0, 0), (0, 1), (1, 0), (1, 1)], h.slices()
    prio = {(s["gpu_index"], s["number"]): s["priority"] for s in st["slices"]}
    assert prio == {(0, 0): 1500, (0, 1): 1499, (1, 0): 1500, (1, 1): 1499}      # striped: equal pairs
    assert len({s["device"] for s in st["slices"]}) == 4 and len(st["worker_pids"]) == 8   # 2, the spare and the GPU process each

    # GPU 1 dies: a read on its slice gets EIO; its slices are released, GPU 0 serves on.
    h.lost.write_text("1\n")
    time.sleep(0.2)
    c = Client(str(h.nbd / "slice-1.0.sock"))
    c.go()
    err, _ = c.read(0, 4096)
    assert err == 5                                   # EIO, never zeros
    c.close()
    h.wait(lambda: h.slices() == [(0, 0), (0, 1)], "GPU 1 given up")
    time.sleep(3)
    assert h.proc.poll() is None and h.slices() == [(0, 0), (0, 1)]
    c = Client(str(h.nbd / "slice-0.1.sock"))
    c.go()
    data = os.urandom(65536)
    assert c.write(1 << 20, data) == 0 and c.read(1 << 20, len(data)) == (0, data)
    c.close()
    st = h.state()
    assert st["gpus"][1]["failed"] and not st["gpus"][0]["failed"]
    # At each release the patterns of the other slices are read back: GPU 0's always come back; GPU 1's
    # only while it works.
    verify = [e for e in h.lines() if e.startswith("verify")]
    assert verify and all(e.startswith("verify ok") or set(e.split()[2:]) <= {"1.0", "1.1"} for e in verify), verify
    out = h.cli("status")
    assert out.returncode == 10 and "FAILED" in out.stdout, out.stdout
    assert h.stop() == 0


@pytestmark_root
def test_memory_clock_cap_set_and_reset(elastic, tmp_path, fakenvml):
    state = tmp_path / "nvml-state"
    h = elastic("memory_clock_max = 6000\n", NBD_VRAM_LIBNVML=fakenvml, FAKENVML_STATE=str(state))
    h.wait_mode("serving")
    assert state.read_text().split() == ["0", "405", "5001"]            # highest supported <= 6000
    assert eventually(h.text, "memory clock capped at 5001 MHz"), h.text()
    assert h.stop() == 0
    assert state.read_text().strip() == ""                              # reset on stop


@pytestmark_root
def test_memory_clock_cap_unsupported_is_one_warning(elastic, fakenvml):
    h = elastic("memory_clock_max = 6000\n", NBD_VRAM_LIBNVML=fakenvml, FAKENVML_CLOCKS_UNSUPPORTED="1")
    h.wait_mode("serving")
    warn = [l for l in h.text().splitlines() if "memory clock" in l]
    assert len(warn) == 1 and "WARNING" in warn[0] and "NVML_ERROR_NOT_SUPPORTED" in warn[0], warn
    assert h.stop() == 0


def test_shrink_without_a_daemon(tmp_path, fakecuda):
    env = dict(os.environ, NBD_VRAM_RUNTIME_DIR=str(tmp_path))
    p = subprocess.run([sys.executable, nv.__file__, "shrink", "1G"], env=env, capture_output=True, text=True)
    assert p.returncode == 3 and "no nbd-vram daemon is serving" in p.stderr
    p = subprocess.run([sys.executable, nv.__file__, "grow", "lots"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "grow: argument SIZE:" in p.stderr
