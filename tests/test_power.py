"""Power policy: sysfs readings from fixture trees, the decision as a table, and the daemon
releasing and taking back VRAM swap as AC comes and goes (tests/power_harness.py plays the kernel;
tests/vm/guest-power.sh does the same against the real nbd driver)."""
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


# -- readings -------------------------------------------------------------------------------------

def supply(root, name, **files):
    d = Path(root) / "sys/class/power_supply" / name
    d.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        (d / k).write_text(f"{v}\n")
    return d


@pytest.fixture
def sysroot(tmp_path, monkeypatch):
    monkeypatch.setenv("NBD_VRAM_SYSFS_ROOT", str(tmp_path))
    return tmp_path


def test_no_supply_is_a_desktop(nv, sysroot):
    assert nv.read_power() == nv.PowerReadings(None, None, [])


def test_mains_online(nv, sysroot):
    supply(sysroot, "AC", type="Mains", online=1)
    supply(sysroot, "BAT0", type="Battery", capacity=55, status="Charging")
    r = nv.read_power()
    assert (r.ac, r.capacity) == (True, 55)
    assert r.describe() == "on AC power, battery 55%"


def test_mains_offline_and_usb_c_charger(nv, sysroot):
    supply(sysroot, "ADP1", type="Mains", online=0)
    supply(sysroot, "BAT0", type="Battery", capacity=80, status="Discharging")
    assert nv.read_power().ac is False
    supply(sysroot, "ucsi-source-psy-USBC000:001", type="USB", online=1)
    assert nv.read_power().ac is True


def test_two_batteries_weighted_by_energy(nv, sysroot):
    supply(sysroot, "AC", type="Mains", online=0)
    supply(sysroot, "BAT0", type="Battery", capacity=10, status="Discharging", energy_now=2_000_000,
           energy_full=20_000_000)
    supply(sysroot, "BAT1", type="Battery", capacity=90, status="Discharging", energy_now=54_000_000,
           energy_full=60_000_000)
    assert nv.read_power().capacity == 70          # (2 + 54) / (20 + 60)
    (sysroot / "sys/class/power_supply/BAT1/energy_now").unlink()
    (sysroot / "sys/class/power_supply/BAT1/energy_full").unlink()
    assert nv.read_power().capacity == 50          # no energy figures for one: the mean of the percentages


def test_device_batteries_and_absent_ones_are_ignored(nv, sysroot):
    supply(sysroot, "hidpp_battery_0", type="Battery", scope="Device", capacity=5, status="Discharging")
    assert nv.read_power().ac is None               # a mouse does not make a laptop
    supply(sysroot, "BAT1", type="Battery", present=0, capacity=0, status="Unknown")
    assert nv.read_power().ac is None


def test_battery_only_status_decides_ac(nv, sysroot):
    supply(sysroot, "BAT0", type="Battery", capacity=30, status="Discharging")
    assert nv.read_power().ac is False
    supply(sysroot, "BAT0", status="Full")
    assert nv.read_power().ac is True


def test_garbage_in_sysfs_is_unknown_not_an_error(nv, sysroot):
    supply(sysroot, "AC", type="Mains", online="?")
    supply(sysroot, "BAT0", type="Battery", capacity="n/a", status="Discharging")
    r = nv.read_power()
    assert (r.ac, r.capacity) == (False, None)


# -- the decision -----------------------------------------------------------------------------------

AC, BATTERY, DESKTOP = True, False, None


@pytest.mark.parametrize("policy, ac, capacity, released, sleeping, want", [
    # policy    AC       charge released sleeping  swap wanted?
    ("always", BATTERY, 3, False, False, True),
    ("always", AC, 50, False, True, False),       # sleep wins over everything
    ("ac", AC, 50, False, False, True),
    ("ac", BATTERY, 99, False, False, False),
    ("ac", DESKTOP, None, False, False, True),
    ("battery", AC, 5, True, False, True),        # AC back: taken back, whatever the charge
    ("battery", BATTERY, 50, False, False, True),
    ("battery", BATTERY, 20, False, False, True),  # the threshold itself still holds
    ("battery", BATTERY, 19, False, False, False),
    ("battery", BATTERY, 90, True, False, False),  # released: stays so until AC, even above the threshold
    ("battery", BATTERY, None, False, False, True),
    ("battery", DESKTOP, None, False, False, True),
    ("battery", DESKTOP, None, False, True, False),
])
def test_decision_table(nv, policy, ac, capacity, released, sleeping, want):
    got, why = nv.power_decision(policy, 20, nv.PowerReadings(ac, capacity, []), released, sleeping)
    assert got is want, why
    assert why


# -- the daemon -------------------------------------------------------------------------------------

class Harness:
    """`nbd_vram.py run` under tests/power_harness.py, with a power_supply fixture tree; conf_lines are
    added to its configuration file, extra to its environment."""

    def __init__(self, tmp_path, fakecuda, policy="ac", conf_lines="", log_pipe=False, **extra):
        self.tmp = tmp_path
        self.sys = tmp_path / "sysroot"
        self.run = tmp_path / "run"
        self.events = tmp_path / "events"
        self.fails = tmp_path / "swapoff-fails"
        self.ac(True)
        supply(self.sys, "BAT0", type="Battery", capacity=80, status="Discharging")
        conf = tmp_path / "nbd-vram.conf"
        base = (f"size = 64M\nmin_size = 64M\nconnections = 2\nworkers = 2\npower = {policy}\npower_poll = 1\n"
                "buffer_size = 256K\n")
        keys = {line.split("=")[0].strip() for line in conf_lines.splitlines() if "=" in line}
        # conf_lines may change a base key (a key may appear only once in the file).
        conf.write_text("".join(l + "\n" for l in base.splitlines() if l.split("=")[0].strip() not in keys) + conf_lines)
        self.env = fake_env(fakecuda, NBD_VRAM_CONFIG=str(conf), NBD_VRAM_SYSFS_ROOT=str(self.sys),
                            NBD_VRAM_RUNTIME_DIR=str(self.run), HARNESS_EVENTS=str(self.events),
                            HARNESS_SWAPOFF_FAILS=str(self.fails), **dict({"HARNESS_PROBE": "1"}, **extra))
        self.env.pop("NOTIFY_SOCKET", None)
        # log_pipe: the daemon's output is a pipe that this test reads only in text() (so a test can
        # stop reading it); else a file.
        self.log_pipe, self.log_bytes = None, b""
        if log_pipe:
            self.log_pipe, w = os.pipe()
            os.set_blocking(self.log_pipe, False)
            self.log = os.fdopen(w, "w")
        else:
            self.log = open(tmp_path / "daemon.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(HARNESS), "run"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ac(self, online):
        supply(self.sys, "AC", type="Mains", online=int(online))

    def state(self):
        try:
            return json.loads((self.run / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_mode(self, mode, timeout=60):
        """MODE in the state, and ready: "serving" is written from the attach on, swapon comes after."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.text()}"
            st = self.state()
            if st.get("mode") == mode and st.get("pid") == self.proc.pid and st.get("ready"):
                return st
            time.sleep(0.1)
        raise AssertionError(f"no {mode!r} state in {timeout} s: {self.state()}\n{self.text()}")

    def text(self):
        if self.log_pipe is None:
            return (self.tmp / "daemon.log").read_text()
        try:
            while chunk := os.read(self.log_pipe, 1 << 16):
                self.log_bytes += chunk
        except BlockingIOError:
            pass
        return self.log_bytes.decode(errors="replace")

    def lines(self):
        return [l.split(" ", 1)[1] for l in self.events.read_text().splitlines()] if self.events.exists() else []

    def maps(self):
        return Path(f"/proc/{self.proc.pid}/maps").read_text()

    def children(self):
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass
        return out

    def cli(self, *argv):
        return subprocess.run([sys.executable, str(ROOT / "nbd_vram.py"), *argv], env=self.env,
                              capture_output=True, text=True, timeout=120)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def started(start):
    """A fixture's body: yields a function that calls start(...) and keeps what it returns; every
    daemon so started is stopped (SIGTERM) at the end of the test."""
    made = []

    def make(*args, **kw):
        h = start(*args, **kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.stop()
        h.log.close()


@pytest.fixture
def harness(tmp_path, fakecuda):
    yield from started(lambda **kw: Harness(tmp_path, fakecuda, **kw))


def test_ac_off_releases_everything_and_ac_on_takes_it_back(harness):
    h = harness(policy="ac")
    st = h.wait_mode("serving")
    assert st["power"]["wanted"] and st["power"]["ac"] is True
    assert "libcuda" in h.maps() and len(h.children()) == 4          # the GPU process, two workers and the spare
    assert h.lines() == ["exec", "exec", "attach 2", "probe ok", "swapon /dev/nbd-harness 1500"]

    h.ac(False)
    h.proc.send_signal(signal.SIGUSR1)               # what the udev rule does (power-event)
    st = h.wait_mode("idle")
    assert st["pid"] == h.proc.pid                   # the same process, so systemd keeps tracking it
    assert "libcuda" not in h.maps(), "the GPU library is still mapped after the release"
    assert h.children() == [], "worker processes outlived the release"
    assert h.lines()[5:] == ["swapoff /dev/nbd-harness", "disconnect", "exec"]
    assert "on battery (power = ac)" in st["power"]["why"]
    out = h.cli("status")
    assert out.returncode == 0, out.stderr
    assert "idle" in out.stdout and "no VRAM held" in out.stdout and "on battery" in out.stdout

    h.ac(True)                                        # no signal: the 1 s poll sees it
    st = h.wait_mode("serving")
    assert "libcuda" in h.maps()
    assert h.lines()[8:] == ["attach 2", "probe ok", "swapon /dev/nbd-harness 1500"]
    assert h.stop() == 0
    assert h.lines()[-2:] == ["swapoff /dev/nbd-harness", "disconnect"]
    assert not (h.run / "state.json").exists()


def test_failed_swapoff_keeps_serving_and_retries(harness):
    h = harness(policy="ac")
    h.wait_mode("serving")
    h.fails.touch()
    h.ac(False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and h.lines().count("swapoff /dev/nbd-harness failed") < 2:
        time.sleep(0.1)
    assert h.lines().count("swapoff /dev/nbd-harness failed") >= 2, h.lines()     # retried at the next poll
    st = h.state()
    assert st["mode"] == "serving" and "disconnect" not in h.lines()              # never forced
    assert "swapoff /dev/nbd-harness failed" in st["release_error"]
    out = h.cli("status")
    assert "last release failed" in out.stdout
    h.fails.unlink()
    h.wait_mode("idle")
    assert h.stop() == 0


def test_battery_threshold_and_sighup_reload(harness, tmp_path):
    h = harness(policy="battery")
    h.ac(False)
    h.wait_mode("serving")                           # 80 % on battery: kept
    conf = tmp_path / "nbd-vram.conf"
    conf.write_text(conf.read_text().replace("power = battery", "power = battery\nbattery_threshold = 90"))
    h.proc.send_signal(signal.SIGHUP)
    st = h.wait_mode("idle")
    assert eventually(h.text, "on battery at 80%, below battery_threshold 90%"), h.text()
    assert st["power"]["why"] == "released on battery; comes back on AC"
    assert eventually(h.text, "SIGHUP: battery_threshold = 90 (was 20)"), h.text()
    assert st["power"]["released"] is True
    conf.write_text(conf.read_text().replace("battery_threshold = 90", "battery_threshold = 10"))
    h.proc.send_signal(signal.SIGHUP)
    time.sleep(2.5)
    assert h.state()["mode"] == "idle"               # released on battery: back only with AC
    h.ac(True)
    h.wait_mode("serving")
    assert h.stop() == 0


def test_bad_config_on_sighup_keeps_the_old_one(harness, tmp_path):
    h = harness(policy="ac")
    h.wait_mode("serving")
    conf = tmp_path / "nbd-vram.conf"
    conf.write_text(conf.read_text() + "power = sometimes\n")
    h.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "configuration not reloaded" not in h.text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert eventually(h.text, "configuration not reloaded, the old one stays"), h.text()
    assert h.state()["mode"] == "serving" and h.proc.poll() is None
    assert h.stop() == 0


def test_sleep_releases_and_wake_restores(harness):
    h = harness(policy="always")
    h.wait_mode("serving")
    out = h.cli("sleep")
    assert out.returncode == 0, out.stderr
    st = h.state()
    assert st["mode"] == "idle" and st["power"]["sleeping"] and "libcuda" not in h.maps()
    assert "released" in out.stderr
    out = h.cli("wake")
    assert out.returncode == 0, out.stderr
    h.wait_mode("serving")
    assert h.stop() == 0


def test_sleep_is_refused_while_swapoff_fails(harness):
    h = harness(policy="always")
    h.wait_mode("serving")
    h.fails.touch()
    out = h.cli("sleep")
    assert out.returncode == 1
    assert "refusing to let the system sleep with swap on the GPU" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2
    assert not (h.run / "sleeping").exists()          # the daemon is not held off after a refused sleep
    assert h.state()["mode"] == "serving"
    h.fails.unlink()
    time.sleep(2.5)
    assert h.state()["mode"] == "serving"
    assert h.stop() == 0


def test_stop_while_idle_and_manual_stop_is_final(harness):
    h = harness(policy="ac")
    h.ac(False)
    st = h.wait_mode("idle")
    assert "libcuda" not in h.maps() and h.lines() == ["exec", "exec"]    # started on battery: GPU never touched
    assert h.stop() == 0
    assert not (h.run / "state.json").exists()
    out = h.cli("wake")                               # resume after a manual stop: nothing starts
    assert out.returncode == 0 and "no nbd-vram daemon is running" in out.stderr
    out = h.cli("power-event")
    assert out.returncode == 0


def test_sleep_and_wake_without_a_daemon(tmp_path, fakecuda):
    env = fake_env(fakecuda, NBD_VRAM_RUNTIME_DIR=str(tmp_path / "run"))
    for cmd in ("sleep", "wake", "power-event"):
        p = subprocess.run([sys.executable, str(ROOT / "nbd_vram.py"), cmd], env=env, capture_output=True, text=True)
        assert p.returncode == 0, (cmd, p.stderr)


def test_hibernation_resume_on_nbd_is_warned(nv, sysroot):
    assert nv.hibernation_resume_warning() is None
    (sysroot / "proc").mkdir()
    (sysroot / "proc/cmdline").write_text("root=/dev/sda1 resume=/dev/nbd0 quiet\n")
    assert "resume=/dev/nbd0" in nv.hibernation_resume_warning()
    (sysroot / "proc/cmdline").write_text("root=/dev/sda1 resume=UUID=abcd quiet\n")
    (sysroot / "sys/power").mkdir(parents=True)
    (sysroot / "sys/power/resume").write_text("43:0\n")
    assert "/sys/power/resume is 43:0" in nv.hibernation_resume_warning()
    (sysroot / "sys/power/resume").write_text("8:2\n")
    assert nv.hibernation_resume_warning() is None
