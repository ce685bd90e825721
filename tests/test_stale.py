"""A state.json that outlived its daemon (killed with -9, and the restart failed before it wrote its
own) names a pid the kernel may have given to any other process since.  Nothing may trust it:
status, power-event (udev), sleep, wake, shrink, upgrade, a new daemon, install.sh.  Liveness comes
from the lock the daemon holds (RUNTIME_DIR/daemon.lock) and the pid's start time and boot id."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, eventually, fake_env
from test_power import Harness

SCRIPT = ROOT / "nbd_vram.py"


def start_ticks(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])


def boot_id():
    return open("/proc/sys/kernel/random/boot_id").read().strip()


@pytest.fixture
def bystander():
    """An unrelated process that got the dead daemon's pid (SIGUSR1 or SIGUSR2 would kill it)."""
    p = subprocess.Popen(["sleep", "300"])
    yield p
    p.kill()
    p.wait()


def stale_states(pid):
    return {
        "reused pid": {"pid": pid, "pid_start": start_ticks(pid) - 1, "boot_id": boot_id()},
        "earlier boot": {"pid": pid, "pid_start": start_ticks(pid), "boot_id": "0" * 8 + boot_id()[8:]},
        "older version": {"pid": pid},         # no pid_start: the process must at least run nbd_vram.py run
    }


def cli(env, *argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["reused pid", "earlier boot", "older version"])
def test_commands_do_not_trust_a_stale_pid(tmp_path, fakecuda, bystander, kind):
    run = tmp_path / "run"
    run.mkdir()
    state = dict(stale_states(bystander.pid)[kind], mode="serving", version="0.1.0", handover=True,
                 started="2026-01-01 00:00:00", slices=[], connections=2)
    (run / "state.json").write_text(json.dumps(state))
    env = fake_env(fakecuda, NBD_VRAM_RUNTIME_DIR=str(run))
    p = cli(env, "status")
    assert p.returncode == 3 and f"not running (stale state of pid {bystander.pid})" in p.stdout, p
    for argv, rc in [(["power-event"], 0), (["wake"], 0), (["sleep", "--timeout", "5"], 0),
                     (["shrink", "1G", "--timeout", "5"], 3), (["grow", "1G", "--timeout", "5"], 3),
                     (["upgrade", "--timeout", "5"], 3)]:
        p = cli(env, *argv)
        assert p.returncode == rc, (argv, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr
        assert bystander.poll() is None, f"{argv} signalled pid {bystander.pid}, which is not the daemon"
    assert "no nbd-vram daemon is running" in cli(env, "wake").stderr


def test_the_right_process_is_still_signalled(tmp_path, fakecuda, bystander):
    """The control: a state that names the process by its true start time reaches it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"pid": bystander.pid, "pid_start": start_ticks(bystander.pid),
                                                "boot_id": boot_id(), "mode": "serving"}))
    assert cli(fake_env(fakecuda, NBD_VRAM_RUNTIME_DIR=str(run)), "power-event").returncode == 0
    assert bystander.wait(10) == -signal.SIGUSR1


def test_start_is_not_refused_over_a_stale_pid(nv, tmp_path, monkeypatch, bystander):
    monkeypatch.setenv("NBD_VRAM_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("NBD_VRAM_SYSFS_ROOT", str(tmp_path / "sysroot"))      # no nbd devices
    for kind, state in stale_states(bystander.pid).items():
        (tmp_path / "state.json").write_text(json.dumps(dict(state, mode="serving", device="/dev/nbd0")))
        nv.check_stale()           # raised "another nbd-vram daemon (pid N) is serving" before
    (tmp_path / "state.json").write_text(json.dumps({"pid": bystander.pid, "pid_start": start_ticks(bystander.pid),
                                                     "boot_id": boot_id(), "mode": "serving"}))
    with pytest.raises(nv.Fatal, match=f"another nbd-vram daemon \\(pid {bystander.pid}\\)"):
        nv.check_stale()


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
def test_the_lock_says_who_runs_over_re_execs(tmp_path, fakecuda, bystander):
    """The daemon removes the stale state at start; a second daemon is refused by the lock, also
    after the first re-executed itself for an upgrade and for a power release."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps(dict(stale_states(bystander.pid)["reused pid"], mode="serving")))
    h = Harness(tmp_path, fakecuda, policy="ac")
    try:
        h.wait_mode("serving")
        assert eventually(h.text, f"removing the state that a daemon (pid {bystander.pid}) left when it died"), h.text()

        def second():
            env = dict(h.env, HARNESS_EVENTS=str(tmp_path / "events2"))
            p = subprocess.run([sys.executable, str(ROOT / "tests/power_harness.py"), "run"], env=env,
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 1, p.stderr
            assert re.search(rf"another nbd-vram daemon \(pid {h.proc.pid}\) is running", p.stderr), p.stderr
            assert len([l for l in p.stderr.splitlines() if "ERROR" in l]) == 1, p.stderr
        second()
        p = h.cli("upgrade")
        assert p.returncode == 0, p.stderr + h.text()
        second()
        h.ac(False)
        h.proc.send_signal(signal.SIGUSR1)
        h.wait_mode("idle")
        second()
        assert h.state()["pid"] == h.proc.pid and h.proc.poll() is None
    finally:
        assert h.stop() == 0, h.text()
        h.log.close()
    assert bystander.poll() is None


def install_sh_functions():
    """Every function that install.sh defines, to call one alone (install.sh itself runs at its end)."""
    text = (ROOT / "install.sh").read_text()
    return "".join(re.findall(r"(?ms)^[a-z_]+\(\) \{ [^\n]*\}\n|^[a-z_]+\(\) \{\n.*?^\}\n", text))


def stop_stray_daemon(run, fakecuda):
    script = (f"set -euo pipefail\nROOT=''\nSRC={ROOT}\nRUNDIR={run}\nSYSTEMD=none\nOPENRC=none\nDRY=0\n"
              "UNIT=vram-swap-nbd.service\nSERVICE=nbd-vram\n" + install_sh_functions() + "stop_stray_daemon\n")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_install_sh_stops_only_the_daemon_itself(tmp_path, fakecuda):
    """install.sh's stray-daemon stop: a reused pid that runs something else of nbd_vram.py (a serve, a
    status) is left alone; the daemon the state names is stopped."""
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "/usr/local/bin/nbd_vram.py",
                              "serve"])
    try:
        (run / "state.json").write_text(json.dumps(dict(stale_states(other.pid)["reused pid"], mode="serving")))
        p = stop_stray_daemon(run, fakecuda)
        assert p.returncode == 0, p.stderr
        assert "stopping it" not in p.stdout and other.poll() is None, p.stdout
        # The control: the state names this very process (its start time): it is stopped, and waited for.
        (run / "state.json").write_text(json.dumps({"pid": other.pid, "pid_start": start_ticks(other.pid),
                                                    "boot_id": boot_id(), "mode": "serving"}))
        reaper = threading.Thread(target=other.wait)        # else it stays in /proc, a zombie, and is waited for
        reaper.start()
        p = stop_stray_daemon(run, fakecuda)
        assert p.returncode == 0, p.stderr
        assert f"(pid {other.pid}, a smoke test?): stopping it" in p.stdout
        reaper.join(10)
        assert other.returncode == -signal.SIGTERM
    finally:
        other.kill()
        other.wait()


def test_a_reused_worker_pid_is_not_killed(nv):
    """Taking over after a crash SIGKILLs the dead daemon's workers: only those very processes (their
    start times are in the state), not whatever nbd_vram.py worker got one of their pids since."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "/usr/local/bin/nbd_vram.py",
                              "worker"])
    try:
        deadline = time.monotonic() + 20        # Popen returns within exec, before the new argv is readable
        while b"worker" not in open(f"/proc/{other.pid}/cmdline", "rb").read().split(b"\0"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        nv.stop_orphans({"worker_pids": [other.pid], "worker_starts": {str(other.pid): start_ticks(other.pid) - 1}})
        assert other.poll() is None, "a process that only has a dead worker's pid was killed"
        nv.stop_orphans({"worker_pids": [other.pid], "worker_starts": {str(other.pid): start_ticks(other.pid)}})
        deadline = time.monotonic() + 20                                  # the worker itself: stopped
        while os.path.exists(f"/proc/{other.pid}") and time.monotonic() < deadline:
            other.poll()                # reaps it, if stop_orphans gave up waiting first (a loaded machine)
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{other.pid}")
    finally:
        other.kill()
        other.wait()


def test_the_public_summary_is_never_signalled(tmp_path, fakecuda, bystander):
    """The public summary (status.json, world-readable, for `status` by any user) names a live process by
    its true identity, but there is no private state: nothing signals it, nothing takes it for the daemon."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"pid": bystander.pid, "pid_start": start_ticks(bystander.pid),
                                                 "boot_id": boot_id(), "mode": "serving", "version": "0.1.0",
                                                 "started": "2026-01-01 00:00:00", "slices": [], "connections": 2}))
    env = fake_env(fakecuda, NBD_VRAM_RUNTIME_DIR=str(run))
    for argv, rc in [(["power-event"], 0), (["wake"], 0), (["sleep", "--timeout", "5"], 0),
                     (["shrink", "1G", "--timeout", "5"], 3), (["grow", "1G", "--timeout", "5"], 3),
                     (["upgrade", "--timeout", "5"], 3), (["status"], 3)]:
        p = cli(env, *argv)
        assert p.returncode == rc, (argv, p.returncode, p.stderr)
        assert bystander.poll() is None, f"{argv} signalled pid {bystander.pid} on the public summary's word"
