"""Kernel-in-the-loop tests: the real nbd driver, in Debian's kernel booted under QEMU (TCG, no KVM).

tests/vm/build.sh builds the guest (cached in /var/tmp/nbd-vram-vmlab), tests/vm/run.sh boots it
with a 1 GiB ivshmem BAR as the "VRAM" and the fake libcuda (tests/fakecuda) mapping that BAR.
Slow (tens of minutes on 2 cores): marked `vm`, so `pytest -m 'not vm'` leaves them out.
Skipped only when QEMU cannot be found or installed, or the kernel cannot be downloaded.
The numbers the guest prints (swap used, MiB verified) are written to the terminal even
without -s, and each test records its console log as the junit property `console_log`.
"""
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# xdist_group: under pytest-xdist (the README's test command, `-n auto --dist loadgroup`) the boots run
# one after the other on one worker while the other workers run the rest of the tests beside them.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

ROOT = Path(__file__).resolve().parent.parent
VM = ROOT / "tests" / "vm"
LAB = Path(os.environ.get("NBD_VRAM_VMLAB", "/var/tmp/nbd-vram-vmlab"))
# The guests' /mnt dirs (console.log, run.out, the fake libcuda): not under pytest's basetemp, which
# another pytest session on this host may rotate away while a guest still runs.  The last 3 of each kind stay.
RUNS = LAB / "runs"

# One boot runs every part of guest-integration.sh; two tests read that one boot's output.
# The part `pressure` (guest-daemon-pressure.sh, the daemon as swap under `pressure 48 700`, clean
# stop) is no longer in it: worker_death_encrypt_power puts the same daemon under the same kind of
# pressure, with a kill in the middle, and checks the same things (SCHED_RR serving threads, the PYTHONMALLOC re-exec,
# data verified, healthy status, clean stop); a run of its own cost ~400 s of CI for nothing new.
# The parts `power` and `encrypt` became one part, encrypt_power, under one pressure (~240 s less), and
# then one with worker_death (~220 s less): a worker killed, the ciphertext checked and the swap released
# on an AC unplug, all under one pressure and one daemon.
# install and restart (the unit's ExecStart by hand, tests/fdstore.py for systemd's fd store) are
# left out: the systemd boot below does both under systemd itself.
INTEGRATION_PARTS = ("smoke", "fill", "worker_death_encrypt_power", "elastic")
# Measured (tests/vm/README.md): the whole boot about 30 min on a quiet 2-core host.  TCG speed follows
# host load, so the limit leaves about 3x headroom (waiting for another session's VM is not counted).
BOOT_TIMEOUT_S = 6000
# run.sh boots again, once, a guest that hung before its init's first line (VM_BOOT_DEADLINE, 180 s, plus
# 10 s for its stacks); the line it prints then is shown with the boot's lines.
RUN_SH_HUNG = "tests/vm/run.sh: the guest hung"
BOOT_RETRY_S = 190


def say(capsys, record_property, *lines):
    """Print to the real terminal, also under pytest's output capture (CI runs without -s).  Under
    pytest-xdist a worker's terminal is not shown: the lines go into the test's report as well (the
    user property "boot_lines"), which conftest.py prints at the end of the run."""
    with capsys.disabled():
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    record_property("boot_lines", "\n".join(lines))


@pytest.fixture(scope="session")
def guest():
    """Build (or reuse) the guest kernel + initramfs; skip only if QEMU or the kernel is unobtainable."""
    p = subprocess.run([str(VM / "build.sh")], capture_output=True, text=True)
    out = (p.stdout + p.stderr).strip()
    if p.returncode != 0:
        why = None
        if not shutil.which("qemu-system-x86_64"):
            why = "qemu-system-x86_64 is not installed and build.sh could not install it (apt-get install qemu-system-x86)"
        elif not (LAB / "kroot" / "lib" / "modules").is_dir():
            why = "Debian's kernel (linux-image-amd64) could not be downloaded (apt-get download)"
        if why:
            print(f"test_kernel_vm: SKIP: {why}\n{out[-2000:]}")
            pytest.skip(f"{why}: {out.splitlines()[-1] if out else 'no output'}")
        pytest.fail(f"tests/vm/build.sh failed (exit {p.returncode}):\n{out[-4000:]}")
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not on PATH")
    print(out)
    return LAB


def fresh_outdir(name):
    """A fresh guest /mnt (under RUNS) with the fake libcuda.so.1 built into it; the last 3 of NAME are kept."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the fake libcuda")
    RUNS.mkdir(parents=True, exist_ok=True)
    for old in sorted(RUNS.glob(f"{name}-*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    d = Path(tempfile.mkdtemp(prefix=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=RUNS))
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(d / "libcuda.so.1"),
                    str(ROOT / "tests" / "fakecuda" / "fakecuda.c"), "-lpthread"], check=True)
    return d


def boot(outdir, script, timeout_s, mem_mb=512, cpus=2, vm_init="", **guest_env):
    """tests/vm/run.sh OUTDIR SCRIPT: returns (exit status, console text, wall seconds).
    VM_INIT=systemd (vm_init) boots systemd as PID 1 instead of a chroot.

    One VM at a time on this host: a lock in the lab dir serializes concurrent pytest sessions
    (the wait is not counted in the VM's timeout)."""
    env = dict(os.environ, VRAM_MB="1024", VRAM2_MB="512", VM_TIMEOUT=str(timeout_s), GUEST_FAKECUDA="/mnt/libcuda.so.1",
               VM_INIT=vm_init)
    env.update({f"GUEST_{k}": str(v) for k, v in guest_env.items()})
    LAB.mkdir(parents=True, exist_ok=True)
    with open(LAB / ".vm-run.lock", "w") as lock, open(outdir / "run.out", "w") as log:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        try:
            p = subprocess.run([str(VM / "run.sh"), str(outdir), str(script), str(mem_mb), str(cpus)], env=env,
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               timeout=timeout_s + BOOT_RETRY_S + 120)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
        wall = time.monotonic() - t0
    text = (outdir / "run.out").read_text(errors="replace").replace("\r", "")
    return rc, text, wall


def tail(text, n=80):
    return "\n".join(text.splitlines()[-n:])


class Boot:
    def __init__(self, out, rc, text, wall, parts, script="guest-integration.sh"):
        self.out, self.rc, self.text, self.wall, self.parts, self.script = out, rc, text, wall, parts, script
        self.console = out / "console.log"

    def say(self, capsys, record_property, pattern, text=None):
        """The boot's headline and its lines matching PATTERN, on the terminal (also without -s)."""
        say(capsys, record_property, "", f"test_kernel_vm: {self.script} ({self.parts}): exit {self.rc} after {self.wall:.0f} s "
            f"(console: {self.console})", *("  " + l for l in (text or self.text).splitlines() if re.search(pattern, l)),
            *("  " + l for l in self.text.splitlines() if l.startswith(RUN_SH_HUNG)))

    def failure(self, what, n=120):
        return f"{what}; guest exited {self.rc} after {self.wall:.0f} s; console {self.console}:\n{tail(self.text, n)}"


@pytest.fixture(scope="module")
def integration_boot(guest):
    """One boot of guest-integration.sh with every part (GUEST_PARTS narrows it)."""
    out = fresh_outdir("integration")
    parts = os.environ.get("GUEST_PARTS", " ".join(INTEGRATION_PARTS))
    rc, text, wall = boot(out, VM / "guest-integration.sh", BOOT_TIMEOUT_S, PARTS=parts)
    return Boot(out, rc, text, wall, parts)


def needs_part(part):
    parts = os.environ.get("GUEST_PARTS")
    if parts is not None and part not in parts.split():
        pytest.skip(f"GUEST_PARTS={parts!r} leaves out {part}")


def test_swap_under_pressure(integration_boot, capsys, record_property):
    """worker_death_encrypt_power's pressure: the daemon as swap takes > 100 MiB of pages out of a 512 MiB
    guest and gives back 48 MiB of checksummed data intact, a worker killed in the middle."""
    part = "worker_death_encrypt_power"
    needs_part(part)
    b = integration_boot
    record_property("console_log", str(b.console))
    start = re.search(rf"^=== {part}: start", b.text, re.M)
    end = re.search(rf"^=== {part}: (PASS|FAIL)", b.text, re.M)
    assert start and end, b.failure(f"no {part} part in the boot's output")
    text = b.text[start.start():end.end()]                 # the part's own lines
    b.say(capsys, record_property, rf"=== {part}|swap used under pressure|MiB verified|pressure: done in|SCHED_RR|worker_death: kill", text)
    assert end.group(1) == "PASS", b.failure(f"{part} did not pass")
    verified = re.findall(r"swap round-trip: (\d+) MiB verified", text)
    assert verified and all(int(v) == 48 for v in verified), verified
    used = [int(u) for u in re.findall(r"swap used under pressure \(MiB\): (\d+)", text)]
    assert used and all(u > 100 for u in used), f"swap used (MiB): {used}"
    killed = [int(k) for k in re.findall(r"worker_death: kill 1 of \d+: kill -9 \d+ with (\d+) MiB swapped out", text)]
    assert killed and killed[0] >= 100, f"the worker was not killed with pages going out to swap: {killed}"


def test_integration(integration_boot, capsys, record_property):
    """guest-integration.sh's parts: test_smoke.sh, test_fill.sh, the ioctl attach, a worker killed
    under pressure, install.sh / --uninstall, a restart and an upgrade under load, encrypted swap
    released on an AC unplug and taken back, and elastic slices on two GPUs, in the same boot."""
    b = integration_boot
    record_property("console_log", str(b.console))
    parts = [p for p in INTEGRATION_PARTS if p in os.environ.get("GUEST_PARTS", " ".join(INTEGRATION_PARTS)).split()]
    if not parts:
        pytest.skip(f"GUEST_PARTS={os.environ['GUEST_PARTS']!r} has none of {INTEGRATION_PARTS}")
    b.say(capsys, record_property, r"^=== |swap used under pressure|MiB verified|worker_death: |worker 1 restarted|^power: "
          r"|^restart: |^encrypt: |^crypt_check: |^marker: ")
    missing = [p for p in parts if not re.search(rf"^=== {p}: PASS", b.text, re.M)]
    assert b.rc == 0 and not missing, b.failure(f"parts without PASS: {missing}")
    assert re.search(r"^=== integration: PASS", b.text, re.M), b.failure("no '=== integration: PASS'")


# The second boot: systemd (the host's, 252) as PID 1, the real units installed by install.sh, and
# systemd itself starting, restarting (fd store), reloading, stopping and suspending the daemon
# (tests/vm/guest-systemd.sh).  Measured in tests/vm/README.md; the limit is about 3x that.
SYSTEMD_PARTS = ("install", "start", "restart", "sleep", "kill_all", "stop", "uninstall", "deb")
SYSTEMD_TIMEOUT_S = 2400


def test_systemd(guest, capsys, record_property):
    """Under the real systemd: install.sh's units, start only after READY=1, the journal's priorities,
    a SIGKILLed main process restarted with its VRAM from the fd store under swap load, upgrade and
    reload under that load, systemctl suspend (pm_test=freezer) and every process of the unit killed with
    a verifier's data in VRAM swap, then stop (swapoff, disconnect, scrub, free); every checksum verified."""
    parts = os.environ.get("GUEST_PARTS")
    if parts is not None and "systemd" not in parts.split():
        pytest.skip(f"GUEST_PARTS={parts!r} leaves out systemd")
    out = fresh_outdir("systemd")
    # The part deb installs the package, then upgrades it to a rebuilt version (the guest's /mnt/deb).
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "nbd_vram.py").read_text(), re.M).group(1)
    for sub, extra in (("v1", []), ("v2", ["--version", f"{version}+rebuilt1"])):
        subprocess.run(["bash", str(ROOT / "packaging" / "build.sh"), "deb", "--out", str(out / "deb" / sub), *extra],
                       check=True, capture_output=True, timeout=120)
    rc, text, wall = boot(out, VM / "guest-systemd.sh", SYSTEMD_TIMEOUT_S, vm_init="systemd", PARTS=" ".join(SYSTEMD_PARTS))
    b = Boot(out, rc, text, wall, " ".join(SYSTEMD_PARTS), script="guest-systemd.sh")
    record_property("console_log", str(b.console))
    b.say(capsys, record_property, r"^=== |^guest: systemd|swap used under pressure|MiB verified|^(start|restart|stop|kill_all|sleep|deb): ")
    missing = [p for p in SYSTEMD_PARTS if not re.search(rf"^=== {p}: PASS", text, re.M)]
    assert rc == 0 and not missing, b.failure(f"parts without PASS: {missing}")
    assert re.search(r"^=== systemd: PASS", text, re.M), b.failure("no '=== systemd: PASS'")
    verified = re.findall(r"swap round-trip: (\d+) MiB verified", text)
    assert len(verified) == 2, b.failure(f"expected two verified pressures (restart; the verifier of sleep, kill_all and stop): {verified}")
