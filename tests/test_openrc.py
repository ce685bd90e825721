"""The OpenRC init script (openrc/nbd-vram.initd), its elogind sleep hook and install.sh's OpenRC path,
run by OpenRC's own tools (openrc-run, supervise-daemon, rc-service, rc-update from Debian's openrc).

This machine was not booted by OpenRC and has no nbd driver, so each test runs in a mount namespace
of its own (unshare): a fresh tmpfs on /run with /run/openrc/softlevel, as if OpenRC had booted, and
overlays on /etc, /usr/local and /var/log whose writes land in the test's tmp_path; nothing of the
host changes.  The daemon is `nbd_vram.py run` under tests/power_harness.py (the kernel's part
played, everything else the daemon's own code), reached through the conf.d setting NBD_VRAM_BIN.
Needs root, unshare/nsenter and the openrc package (.ci/run installs it).
"""
import json
import os
import re
import shutil
import signal
import time

import pytest

from conftest import ROOT, Namespace, eventually

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter", "openrc-run", "supervise-daemon",
                                                           "rc-service", "rc-update")),
    reason="needs root, unshare/nsenter and OpenRC's tools (apt-get install openrc)")

INITD = ROOT / "openrc" / "nbd-vram.initd"
SLEEP_HOOK = ROOT / "openrc" / "nbd-vram.sleep"
HARNESS = ROOT / "tests" / "power_harness.py"


class Service:
    """The init script in TMP/etc/init.d (a path outside the overlays: OpenRC reads ../conf.d beside it),
    its conf.d pointing the daemon at the harness through a wrapper."""

    def __init__(self, ns, tmp, fakecuda, conf="", confd="", harness=""):
        """HARNESS: more of the harness's settings for the daemon, as shell (HARNESS_SWAPOFF_S=11 ...)."""
        self.ns, self.tmp = ns, tmp
        self.rt, self.events, self.log = tmp / "rt", tmp / "events", tmp / "daemon.log"
        self.fails = tmp / "swapoff-fails"
        (tmp / "etc" / "init.d").mkdir(parents=True)
        (tmp / "etc" / "conf.d").mkdir()
        self.script = tmp / "etc" / "init.d" / "nbd-vram"
        shutil.copy(INITD, self.script)
        self.config = tmp / "nbd-vram.conf"
        self.config.write_text("size = 64M\nmin_size = 64M\nconnections = 2\nworkers = 1\npower = always\n"
                               "power_poll = 5\nbuffer_size = 256K\n" + conf)
        self.wrapper = tmp / "nbd_vram"
        self.wrapper.write_text(
            "#!/bin/sh\n# `run` under the harness (the kernel's part played); every other command the real one\n"
            f"export NBD_VRAM_LIBCUDA={fakecuda} NBD_VRAM_CUINIT_TRIES=1 HARNESS_EVENTS={self.events} "
            f"HARNESS_SWAPOFF_FAILS={self.fails} HARNESS_SWAPOFF_RETRY_S=1 NBD_VRAM_SYSFS_ROOT={tmp / 'sys'} "
            f"NBD_VRAM_RUNTIME_DIR={self.rt} PYTHONUNBUFFERED=1 {harness}\n"
            f'[ "$1" = run ] && exec python3 {HARNESS} "$@"\n'
            f'exec python3 {ROOT / "nbd_vram.py"} "$@"\n')
        self.wrapper.chmod(0o755)
        (tmp / "etc" / "conf.d" / "nbd-vram").write_text(
            f"NBD_VRAM_BIN={self.wrapper}\nNBD_VRAM_CONFIG={self.config}\nNBD_VRAM_LOG={self.log}\n"
            f"NBD_VRAM_RUNTIME_DIR={self.rt}\nstop_timeout=4\n" + confd)

    def __call__(self, *args, timeout=120):
        return self.ns.run(self.script, *args, timeout=timeout)

    def state(self):
        try:
            return json.loads((self.rt / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def text(self, path):
        try:
            return path.read_text()
        except OSError:
            return ""

    def events_text(self):
        return self.text(self.events)


@pytest.fixture
def ns(tmp_path):
    n = Namespace(tmp_path, overlays=("/etc", "/usr/local", "/var/log"), openrc=True)
    yield n
    n.close()


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def test_start_waits_for_swap_then_reload_and_stop(ns, tmp_path, fakecuda):
    svc = Service(ns, tmp_path, fakecuda)
    p = svc("--nodeps", "start")
    assert p.returncode == 0, p.out + svc.text(svc.log)
    # start returned only once the daemon said it was ready: swapon already done
    st = svc.state()
    assert st.get("ready") is True and st["mode"] == "serving", st
    assert "swapon /dev/nbd-harness 1500" in svc.events_text()
    assert svc("status").returncode == 0
    pid = st["pid"]
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert b"PYTHONMALLOC=malloc" in environ                 # from supervise-daemon: no re-exec needed

    # reload: a power setting changed takes effect (SIGHUP); a bad file is refused before any signal
    svc.config.write_text(svc.config.read_text().replace("power_poll = 5", "power_poll = 7"))
    p = svc("reload")
    assert p.returncode == 0, p.out
    assert eventually(lambda: svc.text(svc.log), "SIGHUP: power_poll = 7"), svc.text(svc.log)
    svc.config.write_text(svc.config.read_text() + "power = bogus\n")
    p = svc("reload")
    assert p.returncode != 0 and "not reloaded" in p.out and "'power' is set twice" in p.out, p.out
    assert svc.state()["pid"] == pid and alive(pid)

    p = svc("stop")
    assert p.returncode == 0, p.out
    assert not alive(pid)
    ev = svc.events_text().splitlines()
    assert ev[-2:] == [f"{pid} swapoff /dev/nbd-harness", f"{pid} disconnect"], ev
    assert not (svc.rt / "state.json").exists()
    assert svc("status").returncode == 3


def test_a_start_that_fails_says_why_in_one_line_and_is_not_restarted(ns, tmp_path, fakecuda):
    svc = Service(ns, tmp_path, fakecuda, conf="gpus = 5\n", confd="respawn_delay=1\n")
    t0 = time.monotonic()
    p = svc("--nodeps", "start")
    assert p.returncode != 0, p.out
    assert "GPU" in p.out and "see " + str(svc.log) in p.out, p.out     # the daemon's own reason, quoted
    assert time.monotonic() - t0 < 60
    time.sleep(3)                      # a supervisor left behind would have restarted it by now
    assert not ns.pids("supervise-daemon nbd-vram|power_harness.py run")

    # a configuration the daemon refuses: check-config's line, nothing started
    svc.config.write_text(svc.config.read_text().replace("gpus = 5\n", "").replace("size = 64M", "size = lots"))
    p = svc("--nodeps", "start")
    assert p.returncode != 0 and "size" in p.out and "lots" in p.out, p.out


def test_a_stop_is_refused_while_swapoff_fails_and_nothing_is_killed(ns, tmp_path, fakecuda):
    svc = Service(ns, tmp_path, fakecuda)
    assert svc("--nodeps", "start").returncode == 0
    pid = svc.state()["pid"]
    svc.fails.touch()                                   # RAM cannot take the pages back
    t0 = time.monotonic()
    p = svc("stop")
    assert p.returncode != 0, p.out
    assert time.monotonic() - t0 < 30
    assert f"the daemon (pid {pid}) is still swapping off after 4 s" in p.out and "never killed" in p.out, p.out
    assert alive(pid), "the daemon was killed with its swap live"
    assert "swapoff /dev/nbd-harness failed" in svc.events_text()
    svc.fails.unlink()                                  # RAM again: the daemon's retry succeeds and it ends
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pid)
    p = svc("stop")                                     # the service's state catches up
    assert p.returncode == 0, p.out
    assert f"{pid} disconnect" in svc.events_text()


def test_a_crashed_daemon_is_restarted(ns, tmp_path, fakecuda):
    svc = Service(ns, tmp_path, fakecuda, confd="respawn_delay=1\n")
    assert svc("--nodeps", "start").returncode == 0
    pid = svc.state()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (svc.state().get("ready") and svc.state().get("pid") != pid):
        assert time.monotonic() < deadline, svc.text(svc.log)[-3000:]
        time.sleep(0.2)
    assert svc("status").returncode == 0
    assert svc("stop").returncode == 0


def test_the_sleep_hook_releases_before_and_takes_back_after(ns, tmp_path, fakecuda):
    svc = Service(ns, tmp_path, fakecuda)
    assert svc("--nodeps", "start").returncode == 0
    pid = svc.state()["pid"]
    env = dict(os.environ, NBD_VRAM_BIN=str(svc.wrapper))
    p = ns.run(SLEEP_HOOK, "pre", "suspend", env=env)
    assert p.returncode == 0, p.out
    assert svc.state()["mode"] == "idle"
    p = ns.run(SLEEP_HOOK, "post", "suspend", env=env)
    assert p.returncode == 0, p.out
    deadline = time.monotonic() + 60
    while not (svc.state().get("mode") == "serving" and svc.state().get("ready")):
        assert time.monotonic() < deadline, svc.text(svc.log)[-3000:]
        time.sleep(0.2)
    assert svc.state()["pid"] == pid                     # the same daemon throughout

    # a release that fails refuses the sleep, with the reason, and leaves swap serving
    svc.fails.touch()
    p = ns.run(SLEEP_HOOK, "pre", "suspend", env=env, timeout=180)
    assert p.returncode != 0 and "refusing to let the system sleep" in p.out, p.out
    svc.fails.unlink()
    assert svc.state()["mode"] == "serving"
    assert svc("stop").returncode == 0


# -- install.sh under OpenRC ------------------------------------------------------------------------

def stubs(tmp_path):
    d = tmp_path / "stubs"
    d.mkdir()
    (d / "nvidia-smi").write_text('#!/bin/sh\necho "8192, Disabled"\n')
    (d / "modprobe").write_text("#!/bin/sh\nexit 0\n")
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def test_install_detects_openrc_installs_starts_upgrades_in_place_and_uninstalls(ns, tmp_path, fakecuda):
    """install.sh on a machine that OpenRC booted: its files, the default runlevel, the service started
    and ready; a new version of the program only: upgraded in place (same daemon, swap on); --uninstall:
    stopped (swapoff, its progress shown while it runs) and every file gone but the admin's configuration."""
    # The daemon's own swapoff, a fake one that takes 25 s with 64 MiB on the device: a stop long
    # enough for the init script to say how far it is (every 10 s of its own wait, which begins when
    # supervise-daemon --stop returns: at once or seconds later) while install.sh waits.
    svc = Service(ns, tmp_path, fakecuda, confd="stop_timeout=60\n",
                  harness="HARNESS_SWAPOFF_S=25 HARNESS_SWAP_USED_KIB=65536")
    # The admin's conf.d sends the daemon to the harness (this machine has no nbd driver); install.sh
    # keeps it and puts the shipped one beside it.
    confd = (tmp_path / "etc" / "conf.d" / "nbd-vram").read_text().replace(f"NBD_VRAM_CONFIG={svc.config}\n", "")
    ns.run("sh", "-c", f"mkdir -p /etc/conf.d && cat > /etc/conf.d/nbd-vram <<'EOF'\n{confd}EOF\n")
    env = dict(os.environ, PATH=f"{stubs(tmp_path)}:{os.environ['PATH']}", NBD_VRAM_RUNTIME_DIR=str(svc.rt))
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", ".anchors*", ".old", "*.state"))

    p = ns.run("bash", src / "install.sh", "--yes", "--size", "64M", env=env)
    assert p.returncode == 0, p.out + svc.text(svc.log)
    assert "OpenRC did not boot" not in p.out and "PID 1 is not systemd" not in p.out, p.out
    for path, mode in (("/usr/local/bin/nbd_vram.py", "755"), ("/etc/init.d/nbd-vram", "755"),
                       ("/etc/elogind/system-sleep/nbd-vram", "755"), ("/etc/conf.d/nbd-vram.new", "644"),
                       ("/etc/nbd-vram.conf", "644")):
        assert ns.run("stat", "-c", "%a", path).stdout.strip() == mode, path
    assert ns.run("readlink", "/etc/runlevels/default/nbd-vram").stdout.strip() == "/etc/init.d/nbd-vram"
    assert not ns.run("test", "-e", "/etc/systemd/system/vram-swap-nbd.service").returncode == 0
    st = svc.state()
    assert st.get("ready") and st["mode"] == "serving", st
    pid = st["pid"]
    assert ns.run("rc-service", "nbd-vram", "status").returncode == 0

    again = ns.run("bash", src / "install.sh", "--yes", env=env)
    assert again.returncode == 0 and "+ install" not in again.out, again.out
    assert "nbd-vram is running and nothing of it changed" in again.out
    assert svc.state()["pid"] == pid

    # Only the program changed: upgraded in place, the same daemon, swap never off
    (src / "nbd_vram.py").write_text((src / "nbd_vram.py").read_text() + "\n# a new version\n")
    up = ns.run("bash", src / "install.sh", "--yes", env=env, timeout=300)
    assert up.returncode == 0, up.out + svc.text(svc.log)[-3000:]
    assert "upgrading the running daemon in place" in up.out, up.out
    assert svc.state()["pid"] == pid and alive(pid)
    assert "swapoff" not in svc.events_text()

    un = ns.run("bash", src / "install.sh", "--uninstall", env=env, timeout=300)
    assert un.returncode == 0, un.out
    assert not alive(pid)
    assert re.search(r"^\d+ swapoff /dev/nbd-harness", svc.events_text(), re.M), svc.events_text()
    assert re.search(r"still swapping off: \d+ MiB in VRAM swap \(\d+ s\)", un.out), un.out
    for path in ("/usr/local/bin/nbd_vram.py", "/etc/init.d/nbd-vram", "/etc/elogind/system-sleep/nbd-vram",
                 "/etc/runlevels/default/nbd-vram"):
        assert ns.run("test", "-e", path).returncode != 0, path
    assert ns.run("test", "-e", "/etc/conf.d/nbd-vram").returncode == 0       # the admin's, kept
    assert "kept /etc/conf.d/nbd-vram (--purge removes it)" in un.out
