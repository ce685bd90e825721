"""What the user sees while the daemon swaps off (issue 18): one progress reporter for every long
swapoff (a stop, a release before sleep, a shrink), told in STATUS=, the log, `status` (text and
JSON) and by the commands that wait on it; a STATUS= that follows every change of what is served;
and `status` for any user, from the public summary beside the daemon's private state.

The daemon runs under tests/power_harness.py, here with its own swap_disable: the `swapoff` it runs
is tests/fakeswapoff/swapoff, which takes HARNESS_SWAPOFF_S seconds while the device's Used column in
the fixture's /proc/swaps goes down, as the kernel's does.  tests/fdstore.py plays systemd and keeps
every STATUS= line."""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, eventually
from test_cli import as_nobody
from test_power import Harness
from test_restart import Supervised

SCRIPT = ROOT / "nbd_vram.py"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")


@pytest.fixture
def shared_tmp():
    """A test directory that every user can read (pytest's own is root's only): `status` runs as nobody."""
    d = Path(tempfile.mkdtemp(prefix="nbd-vram-progress-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def statuses(s):
    """Every STATUS= the daemon sent, in order (fdstore.py's log of them)."""
    path = s.tmp / "fdstore/status.log"
    return [l.split(" ", 1)[1] for l in path.read_text().splitlines()] if path.exists() else []


def cli(env, *argv, prefix=()):
    return subprocess.run([*prefix, sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True,
                          timeout=120)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@needs_root
def test_status_line_follows_shrink_grow_and_stop_tells_its_progress(shared_tmp, fakecuda):
    s = Supervised(shared_tmp, fakecuda, "slice_size = 64M\n",
                   fake={"VRAM_SETUP_SIZE_MB": "128", "HARNESS_SWAPOFF_S": "3", "HARNESS_SWAP_USED_KIB": "16384", "HARNESS_PROGRESS_LOG_S": "1"})
    try:
        st = s.wait_serving()
        assert [sl["swap_device"] for sl in st["slices"]] == ["/dev/nbd-harness", "/dev/nbd-harness0.1"]
        # The private state, its public summary, the runtime dir that anyone may read.
        assert (mode(s.run), mode(s.run / "state.json"), mode(s.run / "status.json")) == (0o755, 0o600, 0o644)
        public = json.loads((s.run / "status.json").read_text())
        assert public["pid"] == st["pid"] and "sysctl_saved" not in public and "worker_starts" not in public

        # Any user: the running daemon, from the public summary (not "not running", not "needs root"),
        # as root sees it (once it is healthy: the workers publish their live connections a moment after).
        deadline = time.monotonic() + 10
        while (p := cli(s.env, "status")).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert p.returncode == 0, p.stdout + p.stderr
        p = cli(s.env, "status", prefix=as_nobody())
        assert p.returncode == 0, p.stdout + p.stderr
        assert re.search(rf"^daemon +running, pid {st['pid']}", p.stdout, re.M), p.stdout
        assert "slice 0.1  /dev/nbd-harness0.1" in p.stdout and "health     healthy" in p.stdout, p.stdout

        # shrink: its progress while it waits (not a terminal: plain lines), then STATUS= without the device.
        p = cli(s.env, "shrink", "64M")
        assert p.returncode == 0, p.stderr + s.text()
        assert re.search(r"INFO: shrink: shrinking: swapoff /dev/nbd-harness0\.1, \d+ [KM]iB left", p.stderr), p.stderr
        assert "64 MiB of VRAM is swap now" in p.stderr
        assert eventually(lambda: "\n".join(statuses(s)), "shrinking: swapoff /dev/nbd-harness0.1, 16 MiB left")
        last = statuses(s)[-1]
        assert last.startswith("serving 64 MiB of GPU 0 on /dev/nbd-harness,") and "nbd-harness0.1" not in last, last
        assert not (s.run / "request.json").exists()

        p = cli(s.env, "grow", "64M")
        assert p.returncode == 0, p.stderr + s.text()
        assert statuses(s)[-1].startswith("serving 128 MiB of GPU 0 on /dev/nbd-harness, /dev/nbd-harness0.1,"), \
            statuses(s)

        # systemctl stop: two swapoffs of 3 s each, and all the while the phase, what is left and the rate.
        os.kill(st["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline:
            p = cli(s.env, "status", "--json")
            progress = json.loads(p.stdout).get("progress") if p.stdout.startswith("{") else None
            if progress and progress.get("rate_bytes_s"):
                seen = progress
                break
            time.sleep(0.3)
        assert seen, s.text()
        assert seen["phase"] == "stopping" and seen["slices"] == 2 and 0 <= seen["left_bytes"] < 32 << 20, seen
        assert p.returncode == 0, p.stdout          # the slice already off is not "missing": not degraded
        for prefix in ((), as_nobody()):
            p = cli(s.env, "status", prefix=prefix)
            assert re.search(rf"^daemon +stopping, pid {st['pid']}", p.stdout, re.M), p.stdout
            assert re.search(r"^progress +stopping: swapoff /dev/nbd-harness(0\.1)? \(slice [12] of 2\), \d+ [KM]iB left",
                             p.stdout, re.M), p.stdout
    finally:
        rc = s.stop()
    assert rc == 0, s.text()
    lines = statuses(s)
    assert "stopping: swapoff /dev/nbd-harness0.1 (slice 1 of 2), 32 MiB left" in lines, lines
    assert any(re.fullmatch(r"stopping: swapoff /dev/nbd-harness \(slice 2 of 2\), \d+ MiB left, \d+ MiB/s", l)
               for l in lines), lines
    assert lines[-1] == "stopping: swap is off; freeing the VRAM", lines
    # The log: a line at each swapoff's start and then every HARNESS_PROGRESS_LOG_S (1 s here, 10 s by default).
    logged = [l for l in s.text().splitlines() if "stopping: swapoff /dev/nbd-harness0.1 (slice 1 of 2)" in l]
    assert len(logged) >= 2 and any(l.endswith("MiB/s") for l in logged), logged
    assert not (s.run / "status.json").exists() and not (s.run / "state.json").exists()


@needs_root
def test_sleep_shows_the_release_in_progress(tmp_path, fakecuda):
    h = Harness(tmp_path, fakecuda, policy="always", HARNESS_SWAPOFF_S="2", HARNESS_SWAP_USED_KIB="8192")
    try:
        h.wait_mode("serving")
        p = h.cli("sleep")
        assert p.returncode == 0, p.stderr + h.text()
        assert re.search(r"INFO: sleep: releasing for sleep: swapoff /dev/nbd-harness, \d+ [KM]iB left", p.stderr), p.stderr
        assert "VRAM swap released" in p.stderr
        assert eventually(h.text, "releasing for sleep: swapoff /dev/nbd-harness, 8 MiB left"), h.text()
        assert h.lines()[-3:] == ["swapoff /dev/nbd-harness", "disconnect", "exec"], h.lines()
        assert h.cli("wake").returncode == 0
        h.wait_mode("serving")
    finally:
        assert h.stop() == 0
        h.log.close()


# -- the pieces ---------------------------------------------------------------------------------------

class FakeSlice:
    def __init__(self, dev, kib):
        self.swap_device, self.kib, self.swap_on = dev, kib, True

    def used_kib(self, swaps):
        return self.kib


def test_progress_line(nv, monkeypatch):
    monkeypatch.setattr(nv, "active_swaps", lambda: {})
    published = []
    a, b = FakeSlice("/dev/nbd1", 1 << 20), FakeSlice("/dev/nbd0", 200 << 10)
    p = nv.SwapoffProgress("stopping", [a, b], lambda: published.append(p.line()))
    p.begin(a)
    assert published == ["stopping: swapoff /dev/nbd1 (slice 1 of 2), 1.2 GiB left"]
    a.swap_on = False
    p.begin(b)
    assert published[-1] == "stopping: swapoff /dev/nbd0 (slice 2 of 2), 200 MiB left"
    p.failed("swapoff failed; retrying every 10 s")
    assert published[-1].endswith("200 MiB left; swapoff failed; retrying every 10 s")
    p.end("swap is off; freeing the VRAM")
    assert published[-1] == "stopping: swap is off; freeing the VRAM"
    d = p.describe()
    assert (d["phase"], d["slice"], d["slices"], d["left_bytes"]) == ("stopping", 2, 2, 0)
    one = nv.SwapoffProgress("releasing (reserve)", [a], lambda: None)
    a.swap_on = True
    one.begin(a)
    assert one.line() == "releasing (reserve): swapoff /dev/nbd1, 1.0 GiB left"     # one slice: no "of 1"


class Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_view_redraws_one_line_on_a_terminal(nv):
    term = Terminal()
    view = nv.ProgressView("shrink", term)
    view.show({"progress": {"line": "shrinking: swapoff /dev/nbd1, 1.2 GiB left"}})
    view.show({"progress": {"line": "shrinking: swapoff /dev/nbd1, 1.2 GiB left"}})     # unchanged: not redrawn
    view.show({"progress": {"line": "shrinking: swapoff /dev/nbd1, 1.0 GiB left, 150 MiB/s"}})
    view.show({})
    view.clear()
    assert term.text == ("\rshrink: shrinking: swapoff /dev/nbd1, 1.2 GiB left\x1b[K"
                         "\rshrink: shrinking: swapoff /dev/nbd1, 1.0 GiB left, 150 MiB/s\x1b[K\r\x1b[K")
    assert "\n" not in term.text


# -- status for any user, and never a signal on the summary's word ---------------------------------

def test_status_without_root_reads_the_public_summary_or_says_root_is_needed(shared_tmp):
    run = shared_tmp / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    (run / "state.json").write_text('{"pid": 1, "mode": "serving"}')
    (run / "state.json").chmod(0o600)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NBD_VRAM_RUNTIME_DIR": str(run)}
    p = cli(env, "status", prefix=as_nobody())
    assert p.returncode == 9 and "status needs root" in p.stderr and p.stdout == "", (p.returncode, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1
    # A summary of a daemon that is gone: that much is known, and said.
    (run / "status.json").write_text('{"pid": 999999999, "pid_start": 1, "boot_id": "x", "mode": "serving"}')
    (run / "status.json").chmod(0o644)
    p = cli(env, "status", prefix=as_nobody())
    assert p.returncode == 3 and "not running (stale state of pid 999999999)" in p.stdout, (p.stdout, p.stderr)
