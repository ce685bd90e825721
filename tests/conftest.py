"""Shared fixtures: the fake libcuda and fake NVML (built with gcc), nbd_vram imported by path, a running
`serve`, a mount namespace to install into."""
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "nbd_vram.py"
FAKE_SRC = ROOT / "tests" / "fakecuda" / "fakecuda.c"
FAKE_NVML_SRC = ROOT / "tests" / "fakenvml" / "fakenvml.c"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_module():
    spec = importlib.util.spec_from_file_location("nbd_vram", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def nv():
    return load_module()


@pytest.fixture(scope="session")
def fakecuda(tmp_path_factory):
    """Path of the fake libcuda.so.1, compiled once per test run.

    NBD_VRAM_TEST_LIBCUDA=libcuda.so.1 runs the same tests on the real driver instead (on the GPU machine)."""
    if os.environ.get("NBD_VRAM_TEST_LIBCUDA"):
        return os.environ["NBD_VRAM_TEST_LIBCUDA"]
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the fake libcuda")
    out = tmp_path_factory.mktemp("fakecuda") / "libcuda.so.1"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(out), str(FAKE_SRC),
                    "-lpthread"], check=True)
    return str(out)


@pytest.fixture(scope="session")
def fakenvml(tmp_path_factory):
    """Path of the fake libnvidia-ml.so.1, compiled once per test run (its GPUs are the fake libcuda's)."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the fake NVML")
    out = tmp_path_factory.mktemp("fakenvml") / "libnvidia-ml.so.1"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(out),
                    str(FAKE_NVML_SRC)], check=True)
    return str(out)


def eventually(read, text, count=1, timeout_s=10):
    """Whether read() holds TEXT COUNT times within TIMEOUT_S: the daemon's and serve's log lines are
    written by a thread of their own, so one may come a moment after what it tells of."""
    deadline = time.monotonic() + timeout_s
    while read().count(text) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def fake_env(fakecuda, **extra):
    env = dict(os.environ, NBD_VRAM_LIBCUDA=fakecuda, NBD_VRAM_CUINIT_TRIES="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


OPENRC_DIRS = ("daemons exclusive failed hotplugged inactive options scheduled started starting stopping tmp "
               "wasinactive").split()


class Namespace:
    """A mount namespace held open by a sleeping process, for tests that install into the system: /run
    is a fresh tmpfs (with OPENRC, OpenRC looks booted there: /run/openrc/softlevel), and each of
    OVERLAYS (e.g. /etc, /usr) an overlay whose writes land in TMP; nothing of the host changes.
    run() runs a command in it; close() kills every process left in it."""

    def __init__(self, tmp, overlays=(), openrc=False):
        self.tmp = tmp
        setup = ["mount -t tmpfs -o mode=0755 tmpfs /run"]
        if openrc:
            setup += ["mkdir -p " + " ".join(f"/run/openrc/{d}" for d in OPENRC_DIRS), "touch /run/openrc/softlevel"]
        for i, d in enumerate(overlays):
            up, work = tmp / f"overlay{i}" / "up", tmp / f"overlay{i}" / "work"
            up.mkdir(parents=True)
            work.mkdir()
            setup.append(f"mount -t overlay overlay -o lowerdir={d},upperdir={up},workdir={work} {d}")
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                        " && ".join(setup) + " && echo ready && exec sleep 100000"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.holder.stdout.readline()
        if line.strip() != "ready":
            self.holder.kill()
            pytest.skip(f"no mount namespace with tmpfs and overlays here: {line.strip()} {self.holder.stdout.read()}")
        self.ns = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")

    def run(self, *cmd, env=None, timeout=120):
        p = subprocess.run(["nsenter", "--target", str(self.holder.pid), "--mount", "--", *map(str, cmd)],
                           capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
        p.out = p.stdout + p.stderr
        return p

    def pids(self, pattern=None):
        """The processes of the namespace (the holder left out) whose command line matches the regular
        expression PATTERN (every one without it): the pid namespace is the host's, so pgrep would
        also see the processes of other tests running beside this one."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(pid) == self.holder.pid or os.readlink(f"/proc/{pid}/ns/mnt") != self.ns:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if pattern is None or re.search(pattern, cmdline):
                found.append(int(pid))
        return found

    def close(self):
        """Every process of the namespace (supervisor, daemon, workers) killed, then the holder."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.holder.kill()
        self.holder.wait()


class Server:
    """`nbd_vram.py serve` in a subprocess, stopped with SIGTERM at the end (a SIGKILL fails the test)."""

    def __init__(self, tmp_path, fakecuda, size="256M", args=(), **env):
        self.sock = str(tmp_path / "nbd.sock")
        self.log_path = tmp_path / "serve.log"
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "serve", "--socket", self.sock, "--size", size,
                                      "--min-size", "64M", *args],
                                     env=fake_env(fakecuda, **env), stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        # Ready once it logs "serving": the socket file appears at bind(), a moment before listen().
        while not (os.path.exists(self.sock) and "serving " in self.log_path.read_text()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not open its socket: {self.log()}")
            time.sleep(0.05)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def log(self):
        if not self.logf.closed:
            self.logf.flush()
        return self.log_path.read_text()

    def logged(self, text, count=1, timeout_s=10):
        """Whether TEXT is in the log COUNT times within TIMEOUT_S (see eventually)."""
        return eventually(self.log, text, count, timeout_s)

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"serve needed SIGKILL to stop: {self.log()}")
        self.logf.close()
        return self.proc.returncode


@pytest.fixture
def server(tmp_path, fakecuda):
    s = Server(tmp_path, fakecuda)
    yield s
    rc = s.stop()
    assert rc == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture
def make_server(tmp_path, fakecuda):
    made = []

    def make(size="256M", args=(), sub=None, **env):
        d = tmp_path / (sub or f"s{len(made)}")
        d.mkdir(exist_ok=True)
        s = Server(d, fakecuda, size, args, **env)
        made.append(s)
        return s
    yield make
    for s in made:
        rc = s.stop()
        assert rc == 0, s.log()
        assert "Traceback" not in s.log(), s.log()


def pytest_terminal_summary(terminalreporter, config):
    """The kernel boots' lines (tests/test_kernel_vm.py's "boot_lines": each part's PASS and time, swap used,
    data verified) again at the end of a run with pytest-xdist, whose workers' own output is not shown."""
    if not config.getoption("numprocesses", None):
        return                          # without -n the boots printed them as they ended
    for rep in terminalreporter.getreports("passed") + terminalreporter.getreports("failed"):
        for name, lines in rep.user_properties:
            if name == "boot_lines" and rep.when == "call":
                terminalreporter.write_line(lines)
