"""A daemon killed with SIGKILL under a service manager that keeps its fds (tests/fdstore.py does
what systemd does with FDSTORE=1): the restarted daemon takes the same VRAM back, stops the dead
one's workers and gives the kernel new connections; what was written before is read back intact.
tests/power_harness.py plays the kernel; tests/vm/guest-integration.sh (part "restart") does the
same against the real nbd driver, with swap under load."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, eventually, fake_env

HARNESS = ROOT / "tests" / "power_harness.py"
FDSTORE = ROOT / "tests" / "fdstore.py"


class Supervised:
    def __init__(self, tmp_path, fakecuda, conf_lines="", fake=None):
        self.tmp, self.run, self.events = tmp_path, tmp_path / "run", tmp_path / "events"
        self.sys = tmp_path / "sysroot"
        (self.sys / "sys/block").mkdir(parents=True)
        self.power_supply = tmp_path / "power_supply"
        conf = tmp_path / "nbd-vram.conf"
        conf.write_text("size = 64M\nmin_size = 64M\nconnections = 2\nworkers = 2\nbuffer_size = 256K\n" + conf_lines)
        self.env = fake_env(fakecuda, NBD_VRAM_CONFIG=str(conf), NBD_VRAM_SYSFS_ROOT=str(self.sys),
                            NBD_VRAM_RUNTIME_DIR=str(self.run), HARNESS_EVENTS=str(self.events), HARNESS_PROBE="1",
                            NBD_VRAM_POWER_SUPPLY=str(self.power_supply),
                            PYTHONMALLOC="malloc", **(fake or {}))      # as the unit sets it: no re-exec at start
        self.env.pop("NOTIFY_SOCKET", None)
        self.log = open(tmp_path / "out.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(FDSTORE), str(tmp_path / "fdstore"), "--",
                                      sys.executable, str(HARNESS), "run"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def text(self):
        return (self.tmp / "out.log").read_text()

    def lines(self):
        return [l.split(" ", 1)[1] for l in self.events.read_text().splitlines()] if self.events.exists() else []

    def state(self):
        try:
            return json.loads((self.run / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_serving(self, not_pid=None, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()
            st = self.state()
            if st.get("mode") == "serving" and st.get("pid") not in (None, not_pid) and "swapon" in " ".join(
                    self.lines()) and st.get("worker_pids") and Path(self.tmp / "fdstore/ready").exists():
                return st
            time.sleep(0.1)
        raise AssertionError(f"not serving after {timeout} s: {self.state()}\n{self.text()}")

    def stop(self):
        st = self.state()
        if st.get("pid"):
            try:
                os.kill(st["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
def test_sigkill_then_restart_keeps_the_vram_and_its_data(tmp_path, fakecuda):
    s = Supervised(tmp_path, fakecuda)
    try:
        first = s.wait_serving()
        assert eventually(s.text, "fdstore: stored 'vram-GPU-"), s.text()
        assert s.lines() == ["exec", "attach 2", "probe ok", "swapon /dev/nbd-harness 1500"]
        workers = first["worker_pids"]
        os.kill(first["pid"], signal.SIGKILL)
        time.sleep(0.3)
        assert all(alive(p) for p in workers), "workers died with the daemon (they must keep swap served)"
        second = s.wait_serving(not_pid=first["pid"])
        assert eventually(s.text, "with 1 stored fd(s) ['vram-GPU-"), s.text()
        # Taken over: no new allocation, no mkswap, the old workers stopped, the data still there.
        assert s.lines()[4:] == ["exec", "reattach 2", "probe kept ok"], s.lines()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in workers), "the dead daemon's workers still run"
        assert set(second["worker_pids"]).isdisjoint(workers)
        log = s.text()
        assert "took back slice 0 (64 MiB of VRAM) from systemd's fd store" in log
        assert "/dev/nbd-harness is still swap: nothing lost" in log
    finally:
        rc = s.stop()
    assert rc == 0, s.text()
    assert s.lines()[-2:] == ["swapoff /dev/nbd-harness", "disconnect"]
    assert eventually(s.text, "fdstore: removed 'vram-GPU-"), s.text()
    assert not (s.run / "state.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
def test_stored_fd_without_a_device_is_released(tmp_path, fakecuda):
    """The fd comes back but the device is gone (dead_conn_timeout ran out): start afresh, clearly."""
    s = Supervised(tmp_path, fakecuda)
    try:
        first = s.wait_serving()
        os.kill(first["pid"], signal.SIGKILL)
        for name in ("pid", "backend"):        # the kernel gave up on the device meanwhile
            (s.sys / "sys/block/nbd99" / name).unlink()
        (s.sys / "proc/swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n")
        s.wait_serving(not_pid=first["pid"])
        assert eventually(s.text, "no longer attached (dead_conn_timeout ran out?): releasing it"), s.text()
        assert s.lines()[4:7] == ["exec", "attach 2", "probe ok"], s.lines()
    finally:
        assert s.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
def test_upgrade_in_place_keeps_the_vram_and_its_data(tmp_path, fakecuda):
    """`nbd_vram.py upgrade` (SIGUSR2): the same process re-executes the file on disk, takes its own
    device over with the same VRAM, and stops the workers it had."""
    s = Supervised(tmp_path, fakecuda)
    try:
        first = s.wait_serving()
        p = subprocess.run([sys.executable, str(ROOT / "nbd_vram.py"), "upgrade"], env=s.env, capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 0, p.stderr + s.text()
        assert "upgraded: pid" in p.stderr
        second = s.state()
        assert second["pid"] == first["pid"]                      # systemd's MAINPID stays valid
        assert s.lines()[4:] == ["exec", "reattach 2", "probe kept ok"], s.lines()
        assert set(second["worker_pids"]).isdisjoint(first["worker_pids"])
        assert not any(alive(p) for p in first["worker_pids"])
        assert "fdstore: started" in s.text() and s.text().count("fdstore: started") == 1   # no restart
    finally:
        rc = s.stop()
    assert rc == 0, s.text()
    assert s.lines()[-2:] == ["swapoff /dev/nbd-harness", "disconnect"]


def test_upgrade_refuses_what_it_cannot_do(tmp_path, fakecuda):
    env = fake_env(fakecuda, NBD_VRAM_RUNTIME_DIR=str(tmp_path / "run"))
    p = subprocess.run([sys.executable, str(ROOT / "nbd_vram.py"), "upgrade"], env=env, capture_output=True, text=True)
    assert p.returncode == 3 and "no nbd-vram daemon is running" in p.stderr
    (tmp_path / "run").mkdir()
    # A daemon of an older version (no "handover" in its state) must not get a SIGUSR2: it would die of it.
    # (Its state names it by pid alone: it must at least run `nbd_vram.py run`, as this one seems to.)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/usr/local/bin/nbd_vram.py", "run"])
    try:
        (tmp_path / "run/state.json").write_text(json.dumps({"pid": sleeper.pid, "mode": "serving", "version": "0.0.9"}))
        p = subprocess.run([sys.executable, str(ROOT / "nbd_vram.py"), "upgrade"], env=env, capture_output=True,
                           text=True)
        assert p.returncode == 1 and "cannot be upgraded in place" in p.stderr and "systemctl restart" in p.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
def test_power_release_takes_the_vram_out_of_the_fd_store(tmp_path, fakecuda):
    """Else systemd's copy of the fd would keep the VRAM allocated (and the GPU awake) while idle."""
    s = Supervised(tmp_path, fakecuda, conf_lines="power = ac\npower_poll = 1\n")
    ac = s.power_supply / "AC"
    ac.mkdir(parents=True)
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("1\n")
    try:
        s.wait_serving()
        assert eventually(s.text, "fdstore: stored 'vram-GPU-"), s.text()
        (ac / "online").write_text("0\n")
        deadline = time.monotonic() + 30
        while s.state().get("mode") != "idle" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.state().get("mode") == "idle", s.text()
        assert eventually(s.text, "fdstore: removed 'vram-GPU-"), s.text()
        (ac / "online").write_text("1\n")
        s.wait_serving()
        assert s.text().count("fdstore: stored 'vram-GPU-") == 2
    finally:
        assert s.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
@pytest.mark.skipif(bool(os.environ.get("NBD_VRAM_TEST_LIBCUDA")), reason="reads the fake's VRAM through its backing file")
def test_stored_fd_let_go_is_zeroed_first(tmp_path, fakecuda):
    """A stored VRAM fd that cannot be taken over holds the dead daemon's swapped pages: they are
    zeroed before the memory goes back to the driver.  The fake's memory is a file here; the restarted
    daemon finds the GPU full (another program), so nothing of its own overwrites the old block."""
    backing, usage = tmp_path / "vram", tmp_path / "other-usage"
    with open(backing, "wb") as f:
        f.truncate(256 << 20)
    usage.write_text("0\n")
    s = Supervised(tmp_path, fakecuda, fake={"FAKECUDA_BACKING": str(backing), "FAKECUDA_OTHER_USAGE": str(usage)})
    try:
        first = s.wait_serving()
        pattern = (tmp_path / "events.pattern").read_bytes()
        end = first["slices"][0]["size_bytes"]                  # slice 0 is the file's first block
        with open(backing, "rb") as f:
            f.seek(end - 4096)
            assert f.read(4096) == pattern                        # the probe's write, in VRAM
        usage.write_text("256\n")                                 # the GPU is full now: the restart allocates nothing
        os.kill(first["pid"], signal.SIGKILL)
        for name in ("pid", "backend"):                           # and the device is gone: no takeover
            (s.sys / "sys/block/nbd99" / name).unlink()
        deadline = time.monotonic() + 60
        while "could not allocate even 64 MiB of VRAM" not in s.text():      # past the let-go: it failed after
            assert time.monotonic() < deadline, s.text()
            time.sleep(0.2)
        with open(backing, "rb") as f:
            f.seek(end - 4096)
            assert f.read(4096) == bytes(4096), "the let-go VRAM still holds the dead daemon's pages"
        assert eventually(s.text, "zeroed and released 64 MiB of VRAM from the stored fd 'vram-GPU-"), s.text()
        assert eventually(s.text, "fdstore: removed 'vram-GPU-"), s.text()
        usage.write_text("0\n")
        s.wait_serving(not_pid=first["pid"])
    finally:
        assert s.stop() == 0, s.text()
