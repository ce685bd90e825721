"""tests/vm/run.sh's boot watchdog, without a VM: a stand-in qemu-system-x86_64 on PATH that listens on
the monitor socket as QEMU does, hangs at SeaBIOS's line on the boots it is told to, and otherwise
prints the guest init's first line and finishes the script (OUTDIR/rc).  The real boots are
test_kernel_vm's."""
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_SH = ROOT / "tests" / "vm" / "run.sh"

# What the stand-in does: boot N (counted in OUTDIR/boots) hangs if N is in HANG_BOOTS; every
# monitor command is logged to OUTDIR/monitor.log, `quit` ends it as QEMU's does (exit 0).
FAKE_QEMU = r'''#!PYTHON
import os, socket, sys, threading, time
args = sys.argv[1:]
sock = next(a.split(":", 1)[1].split(",")[0] for a in args if a.startswith("unix:"))
out = next(a.split("path=", 1)[1].split(",")[0] for a in args if a.startswith("local,path=") and "mount_tag=out" in a)
boots = int(open(f"{out}/boots").read()) + 1 if os.path.exists(f"{out}/boots") else 1
open(f"{out}/boots", "w").write(str(boots))
hang = boots in [int(n) for n in os.environ.get("HANG_BOOTS", "").split()]
srv = socket.socket(socket.AF_UNIX)
if os.path.exists(sock):
    os.unlink(sock)                 # as QEMU does: the last boot's socket is left behind
srv.bind(sock)
srv.listen()
def monitor():
    while True:
        c, _ = srv.accept()
        c.sendall(b"QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) ")
        for line in c.makefile("rb"):
            cmd = line.decode().strip()
            open(f"{out}/monitor.log", "a").write(cmd + "\n")
            c.sendall(cmd.encode() + b"\r\n" + (b"VM status: running\r\n" if cmd == "info status" else b"") + b"(qemu) ")
            if cmd == "quit":
                os._exit(0)
threading.Thread(target=monitor, daemon=True).start()
# as the real console has it: the kernel (booted quiet) says nothing, and the guest's first line
# follows SeaBIOS's on the same line, after the terminal resets the firmware's output sent
print("SeaBIOS (version 1.16.2-debian-1.16.2-1)\nBooting from ROM..", end="", flush=True)
if hang:
    time.sleep(3600)
print("\x1bc\x1b[?7l\x1b[2Jguest: kernel 6.1.0-57-amd64, nbd devices: 16, cpus: 2, MemTotal: 983492 kB", flush=True)
time.sleep(4)                       # the script runs past the watchdog's deadline (2 s)
open(f"{out}/rc", "w").write("0\n")
'''


@pytest.fixture
def lab(tmp_path):
    """A lab dir with a guest for this build.sh (empty kernel and initramfs: the stand-in never reads
    them) and the stand-in QEMU first on PATH."""
    lab = tmp_path / "lab"
    guest = lab / ("guest-" + hashlib.sha256((ROOT / "tests" / "vm" / "build.sh").read_bytes()).hexdigest()[:16])
    guest.mkdir(parents=True)
    for f in ("vmlinuz", "initrd.img"):
        (guest / f).write_text("stand-in\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    qemu = bin_ / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU.replace("PYTHON", sys.executable, 1))
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    return lab, bin_


def run_sh(lab, tmp_path, hang_boots, tries=None):
    lab_dir, bin_ = lab
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "t.sh").write_text("true\n")
    env = dict(os.environ, NBD_VRAM_VMLAB=str(lab_dir), PATH=f"{bin_}:{os.environ['PATH']}", HANG_BOOTS=hang_boots,
               VM_BOOT_DEADLINE="2", VM_BOOT_DUMP_WAIT="1", VM_TIMEOUT="60")
    if tries:
        env["VM_BOOT_TRIES"] = str(tries)
    p = subprocess.run(["bash", str(RUN_SH), str(out), "t.sh"], capture_output=True, text=True, env=env, timeout=120)
    return p, out


def test_a_boot_that_hangs_before_init_is_dumped_and_booted_again(lab, tmp_path):
    p, out = run_sh(lab, tmp_path, "1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (out / "boots").read_text() == "2"
    assert "the guest hung before its init's first line (try 1 of 2" in p.stderr, p.stderr
    hung = (out / "console-hung-1.log").read_text()
    assert "no 'guest: kernel' line after 2 s" in hung and "(qemu) info registers -a" in hung
    assert (out / "monitor.log").read_text().split("\n")[:7] == [
        "info status", "info registers -a", "sendkey alt-sysrq-9", "sendkey alt-sysrq-l", "sendkey alt-sysrq-w", "quit", ""]
    assert "guest: kernel" in (out / "console.log").read_text()
    assert "exited 0" in p.stdout


def test_a_boot_that_hangs_every_time_fails_with_124(lab, tmp_path):
    p, out = run_sh(lab, tmp_path, "1 2", tries=1)
    assert p.returncode == 124, p.stdout + p.stderr
    assert (out / "boots").read_text() == "1"
    assert "hung before its init's first line in 1 of 1 boots" in p.stderr, p.stderr
    assert [f.name for f in out.glob("console-hung-*.log")] == ["console-hung-1.log"]


def test_a_boot_that_prints_its_first_line_is_left_alone(lab, tmp_path):
    p, out = run_sh(lab, tmp_path, "")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (out / "boots").read_text() == "1"
    assert not (out / "monitor.log").exists() and not list(out.glob("console-hung-*"))
