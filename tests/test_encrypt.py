"""Encrypted swap (encrypt = yes): the option, cryptsetup's exact command line, the one-line errors when
cryptsetup or dm-crypt is missing, the teardown order (swapoff, close, disconnect, free) under the power
harness with a stub cryptsetup, and the stale-mapping checks against fixture sysfs trees.
No dm-crypt is needed here; tests/vm/guest-integration.sh (part encrypt) runs the real thing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SCRIPT, eventually, fake_env, load_module
from test_power import Harness, started

nv = load_module()
MAPPER = "/dev/mapper/nbd-vram-99"          # the harness attaches "index 99"


def stub(directory, name, body):
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def cli(*args, env):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


# -- the option ------------------------------------------------------------------------------------------

def test_encrypt_is_off_by_default_and_parsed_as_yes_or_no(tmp_path):
    s, origin = nv.load_config(os.devnull, environ={})
    assert s["encrypt"] is False and origin["encrypt"] == "default"
    conf = tmp_path / "c.conf"
    conf.write_text("encrypt = yes\n")
    s, origin = nv.load_config(str(conf), environ={})
    assert s["encrypt"] is True and origin["encrypt"] == f"{conf}:1"
    s, origin = nv.load_config(str(conf), flags={"encrypt": "no"}, environ={})
    assert s["encrypt"] is False and origin["encrypt"] == "--encrypt"
    conf.write_text("encrypt = aes\n")
    with pytest.raises(nv.ConfigError, match=r":1: encrypt: .*\(allowed: yes or no\)$"):
        nv.load_config(str(conf), environ={})


def test_encrypt_flag_alone_means_yes():
    args = nv.build_parser().parse_args(["run", "--encrypt"])
    assert args.opt_encrypt == "yes"


# -- cryptsetup's command line ---------------------------------------------------------------------------

PLAIN = ["cryptsetup", "open", "--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512",
         "--key-file", "/dev/urandom", "--sector-size", "4096"]


@pytest.mark.parametrize("device, name, discard, want", [
    ("/dev/nbd0", "nbd-vram-0", True, PLAIN + ["--allow-discards", "/dev/nbd0", "nbd-vram-0"]),
    ("/dev/nbd0", "nbd-vram-0", False, PLAIN + ["/dev/nbd0", "nbd-vram-0"]),
    ("/dev/nbd15", "nbd-vram-15", True, PLAIN + ["--allow-discards", "/dev/nbd15", "nbd-vram-15"]),
])
def test_crypt_open_argv(device, name, discard, want):
    assert nv.crypt_open_argv(device, name, discard) == want


def test_crypt_close_argv_and_names():
    assert nv.crypt_close_argv("nbd-vram-3") == ["cryptsetup", "close", "nbd-vram-3"]
    assert nv.crypt_name(3) == "nbd-vram-3" and nv.crypt_name(3).startswith(nv.CRYPT_PREFIX)


def test_cryptsetup_accepts_the_command_line(tmp_path):
    """The installed cryptsetup validates every option of ours (--test-args: nothing is opened)."""
    exe = shutil.which("cryptsetup")
    if not exe:
        pytest.skip("cryptsetup is not installed (apt-get install -y cryptsetup-bin)")
    if "--test-args" not in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout:
        pytest.skip("this cryptsetup has no --test-args")
    for argv in (nv.crypt_open_argv(str(tmp_path / "nbd0"), "nbd-vram-0", True), nv.crypt_close_argv("nbd-vram-0")):
        p = subprocess.run([exe, "--test-args", *argv[1:]], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and "No action taken" in p.stdout, (argv, p.stdout + p.stderr)
    # ... and it does check them: a sector size that plain mode refuses is an error.
    bad = [a if a != "4096" else "8192" for a in nv.crypt_open_argv(str(tmp_path / "nbd0"), "nbd-vram-0", False)]
    p = subprocess.run([exe, "--test-args", *bad[1:]], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode != 0 and "sector size" in p.stderr


# -- missing cryptsetup or dm-crypt: one line, exit 11, before anything is allocated ----------------------

@pytest.fixture
def encrypt_conf(tmp_path):
    conf = tmp_path / "nbd-vram.conf"
    conf.write_text("encrypt = yes\nsize = 64M\nmin_size = 64M\n")
    return conf


def run_env(tmp_path, fakecuda, path, **extra):
    """The environment of `run`/`check-config` with PATH set to PATH (our python is called by its full path)."""
    env = fake_env(fakecuda, PATH=str(path), PYTHONMALLOC="malloc", NBD_VRAM_RUNTIME_DIR=str(tmp_path / "run"),
                   FAKECUDA_LOG=str(tmp_path / "fakecuda.log"), **extra)
    env.pop("NOTIFY_SOCKET", None)
    return env


def assert_one_error_line(p, *words):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "ERROR" in lines[0] and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_run_without_cryptsetup(tmp_path, fakecuda, encrypt_conf):
    if os.geteuid() != 0:
        pytest.skip("run refuses non-root users before it reads encrypt")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    p = cli("run", "--config", str(encrypt_conf), env=run_env(tmp_path, fakecuda, empty))
    assert p.returncode == nv.EXIT_NO_CRYPT == 11, (p.returncode, p.stderr)
    assert_one_error_line(p, "encrypt = yes needs cryptsetup", "apt install cryptsetup-bin", "set encrypt = no")
    assert not (tmp_path / "run" / "state.json").exists() and not (tmp_path / "run" / "counters").exists()
    log = tmp_path / "fakecuda.log"
    assert not log.exists() or "cuMem" not in log.read_text(), "VRAM was touched"


def test_check_config_without_cryptsetup(tmp_path, fakecuda, encrypt_conf):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    p = cli("check-config", "--config", str(encrypt_conf), env=run_env(tmp_path, fakecuda, empty))
    assert p.returncode == 11, (p.returncode, p.stderr)
    assert_one_error_line(p, "encrypt = yes needs cryptsetup")
    assert any(line.split()[:3] == ["encrypt", "=", "yes"] for line in p.stdout.splitlines()), p.stdout
    p = cli("check-config", "--config", str(encrypt_conf), "--encrypt", "no", env=run_env(tmp_path, fakecuda, empty))
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_missing_dm_crypt(tmp_path, fakecuda, encrypt_conf):
    """cryptsetup is there, dm_crypt is not loaded and modprobe cannot find it; check-config only looks (--dry-run)."""
    bindir = tmp_path / "bin"
    stub(bindir, "cryptsetup", "exit 0")
    stub(bindir, "modprobe", f'echo "$*" >> {tmp_path}/modprobe.args\n'
                             'echo "modprobe: FATAL: Module dm_crypt not found in directory /lib/modules/x" >&2\nexit 1')
    env = run_env(tmp_path, fakecuda, bindir, NBD_VRAM_SYSFS_ROOT=str(tmp_path / "sysroot"))
    p = cli("check-config", "--config", str(encrypt_conf), env=env)
    assert p.returncode == 11, p.stderr
    assert_one_error_line(p, "needs the kernel's dm-crypt", "Module dm_crypt not found", "CONFIG_DM_CRYPT")
    assert (tmp_path / "modprobe.args").read_text().split() == ["--dry-run", "dm_crypt"]
    if os.geteuid() == 0:
        p = cli("run", "--config", str(encrypt_conf), env=env)
        assert p.returncode == 11, p.stderr
        assert_one_error_line(p, "needs the kernel's dm-crypt")
        assert (tmp_path / "modprobe.args").read_text().splitlines()[-1].split() == ["dm_crypt"]
    (tmp_path / "sysroot/sys/module/dm_crypt").mkdir(parents=True)        # loaded: modprobe is not asked
    p = cli("check-config", "--config", str(encrypt_conf), env=env)
    assert p.returncode == 0, p.stderr


# -- teardown order, on stop and on a power release ------------------------------------------------------

@pytest.fixture
def encrypted_harness(tmp_path, fakecuda):
    def start(**kw):
        bindir = tmp_path / "bin"
        stub(bindir, "cryptsetup", 'echo "$$ cryptsetup $*" >> "$HARNESS_EVENTS"')
        (tmp_path / "sysroot/sys/module/dm_crypt").mkdir(parents=True)
        return Harness(tmp_path, fakecuda, conf_lines="encrypt = yes\n", PATH=f"{bindir}:{os.environ['PATH']}",
                       HARNESS_FREE_EVENT="1", **kw)
    yield from started(start)


OPEN = " ".join(PLAIN + ["--allow-discards", "/dev/nbd-harness", "nbd-vram-99"])
UP = ["attach 2", "probe ok", OPEN, f"swapon {MAPPER} 1500"]
DOWN = [f"swapoff {MAPPER}", "cryptsetup close nbd-vram-99", "disconnect", "free VRAM"]


def wait_swapon(h, timeout_s=60):
    """The state says "serving" from the attach on; swapon of the mapping comes a moment later."""
    deadline = time.monotonic() + timeout_s
    while not (h.lines()[-1:] == [f"swapon {MAPPER} 1500"] and h.state().get("swap_device") == MAPPER):
        assert time.monotonic() < deadline, h.text()
        time.sleep(0.1)


def test_swap_goes_on_the_mapping_and_stop_undoes_it_in_reverse(encrypted_harness):
    h = encrypted_harness(policy="always")
    h.wait_mode("serving")
    wait_swapon(h)
    st = h.state()
    assert h.lines() == ["exec", "exec"] + UP
    assert st["device"] == "/dev/nbd-harness" and st["swap_device"] == MAPPER and st["encrypted"] is True
    assert st["encryption"] == {"mapping": "nbd-vram-99", "cipher": "aes-xts-plain64", "key_bits": 512,
                                "sector_bytes": 4096}
    assert eventually(h.text, f"encrypted swap: {MAPPER} over /dev/nbd-harness"), h.text()

    # status, with the mapping in the fixture /proc/swaps as the kernel would list it
    (h.sys / "proc").mkdir(exist_ok=True)
    (h.sys / "proc/swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n"
                                      f"{MAPPER}   partition\t65532\t1024\t1500\n")
    out = h.cli("status")
    assert out.returncode in (0, 10), out.stderr
    rows = {" ".join(line.split()[:2]) if line.startswith("slice") else line.split()[0]: line
            for line in out.stdout.splitlines()}
    assert f"{MAPPER} on /dev/nbd-harness (64 MiB, netlink): priority 1500, 1 MiB used" in rows["slice 0.0"], out.stdout
    assert "on, encrypted (dm-crypt aes-xts-plain64, a 512-bit key for this run only), 1 of 1 slices" \
        in rows["swap"], out.stdout
    js = json.loads(h.cli("status", "--json").stdout)
    assert js["swap"]["active"] is True and js["swap"]["device"] == MAPPER and js["swap"]["encrypted"] is True
    assert js["swap"]["used_bytes"] == 1024 * 1024

    assert h.stop() == 0
    assert h.lines()[len(UP) + 2:] == DOWN


def test_power_release_swaps_off_the_mapping_then_closes_it(encrypted_harness):
    h = encrypted_harness(policy="ac")
    h.wait_mode("serving")
    wait_swapon(h)
    h.ac(False)
    h.proc.send_signal(signal.SIGUSR1)
    h.wait_mode("idle")
    assert h.lines()[len(UP) + 2:] == DOWN + ["exec"]
    h.ac(True)
    h.wait_mode("serving")
    wait_swapon(h)
    assert h.lines()[len(UP) + len(DOWN) + 3:] == UP         # a new mapping, with a new key
    assert h.stop() == 0
    assert h.lines()[-4:] == DOWN


def test_missing_cryptsetup_fails_at_once_on_battery_too(tmp_path, fakecuda):
    """Started on battery with power = ac, run would idle until AC comes: the check comes first."""
    if os.geteuid() != 0:
        pytest.skip("run refuses non-root users before it reads encrypt")
    ac = tmp_path / "sysroot/sys/class/power_supply/AC"
    ac.mkdir(parents=True)
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("0\n")
    conf = tmp_path / "nbd-vram.conf"
    conf.write_text("encrypt = yes\npower = ac\n")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    p = cli("run", "--config", str(conf),
            env=run_env(tmp_path, fakecuda, empty, NBD_VRAM_SYSFS_ROOT=str(tmp_path / "sysroot")))
    assert p.returncode == 11, p.stderr
    assert_one_error_line(p, "encrypt = yes needs cryptsetup")


# -- a mapping left behind by a dead daemon --------------------------------------------------------------

DEAD_PID = 999999999


@pytest.fixture
def stale(tmp_path, monkeypatch):
    """A sysfs tree with nbd0 and, by default, the dm-crypt mapping nbd-vram-0 (dm-0) over it."""
    root = tmp_path / "sysroot"
    monkeypatch.setenv("NBD_VRAM_SYSFS_ROOT", str(root))
    monkeypatch.setenv("NBD_VRAM_RUNTIME_DIR", str(tmp_path / "run"))
    calls = tmp_path / "cryptsetup.calls"
    bindir = tmp_path / "bin"
    stub(bindir, "cryptsetup", f'echo "$*" >> {calls}')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")

    class Tree:
        def nbd(self, index, connected=True, owner=DEAD_PID):
            d = root / f"sys/block/nbd{index}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "backend").write_text(f"nbd-vram:{owner}:GPU-facec0da\n")
            if connected:
                (d / "pid").write_text("1\n")

        def mapping(self, dm, name, slave):
            d = root / f"sys/block/{dm}"
            (d / "dm").mkdir(parents=True, exist_ok=True)
            (d / "dm/name").write_text(name + "\n")
            (d / "slaves").mkdir(exist_ok=True)
            (d / "slaves" / slave).mkdir()

        def swaps(self, *paths):
            (root / "proc").mkdir(parents=True, exist_ok=True)
            (root / "proc/swaps").write_text("Filename Type Size Used Priority\n" + "".join(
                f"{p} partition 1048572 2048 1500\n" for p in paths))

        def calls(self):
            return calls.read_text().splitlines() if calls.exists() else []
    return Tree()


def test_crypt_mappings_finds_only_ours(stale):
    stale.nbd(0)
    stale.nbd(1)
    stale.mapping("dm-0", "nbd-vram-0", "nbd0")
    stale.mapping("dm-1", "cryptswap", "nbd1")           # someone else's mapping: not ours to touch
    stale.mapping("dm-2", "nbd-vram-7", "sda2")           # our name over no nbd device
    assert nv.crypt_mappings() == {0: ("nbd-vram-0", "dm-0")}


@pytest.mark.parametrize("listed_as", ["/dev/dm-0", "/dev/mapper/nbd-vram-0"])
def test_stale_mapping_that_is_swap_is_refused(stale, listed_as):
    """/proc/swaps names it /dev/dm-0 where udev links /dev/mapper, /dev/mapper/NAME where it does not."""
    stale.nbd(0)
    stale.mapping("dm-0", "nbd-vram-0", "nbd0")
    stale.swaps(listed_as)
    with pytest.raises(nv.Fatal) as e:
        nv.check_stale()
    msg = str(e.value)
    assert "/dev/mapper/nbd-vram-0 (dm-crypt over /dev/nbd0) is still active swap" in msg and "\n" not in msg
    assert f"pid {DEAD_PID}" in msg
    assert "`swapoff /dev/mapper/nbd-vram-0`" in msg and "`cryptsetup close nbd-vram-0`" in msg
    assert msg.endswith("`nbd_vram.py detach /dev/nbd0`")
    assert stale.calls() == []


def test_stale_mapping_that_is_not_swap_is_closed(stale, caplog):
    stale.nbd(0, connected=False)                         # disconnected already: only the mapping is left
    stale.mapping("dm-0", "nbd-vram-0", "nbd0")
    stale.swaps()
    nv.check_stale()
    assert stale.calls() == ["close nbd-vram-0"]
    assert "was left by an nbd-vram daemon that is gone, and is not swap: closing it" in caplog.text


def test_stale_mapping_without_cryptsetup(stale, monkeypatch):
    stale.nbd(0, connected=False)
    stale.mapping("dm-0", "nbd-vram-0", "nbd0")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(nv.Fatal, match=r"cryptsetup is not installed to close it: run `dmsetup remove nbd-vram-0`$"):
        nv.check_stale()


def test_mapping_of_a_live_daemon_is_left_alone(stale):
    # A daemon (an older one: this version's would hold the lock): the pid in the backend runs nbd_vram.py run.
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/usr/local/bin/nbd_vram.py", "run"])
    try:
        while b"run" not in open(f"/proc/{daemon.pid}/cmdline", "rb").read().split(b"\0"):
            time.sleep(0.05)            # Popen returns within exec, before the new argv is readable
        stale.nbd(0, owner=daemon.pid)
        stale.mapping("dm-0", "nbd-vram-0", "nbd0")
        with pytest.raises(nv.Fatal, match=r"/dev/nbd0 is served by another nbd-vram daemon \(pid \d+\)"):
            nv.check_stale()
        assert stale.calls() == []
    finally:
        daemon.kill()
        daemon.wait()


def test_detach_refuses_a_device_under_a_mapping(stale, tmp_path):
    stale.nbd(0)
    stale.mapping("dm-0", "nbd-vram-0", "nbd0")
    stale.swaps("/dev/dm-0")
    env = dict(os.environ)
    p = cli("detach", "/dev/nbd0", env=env)
    assert p.returncode == 1, p.stderr
    assert_one_error_line(p, "/dev/nbd0 holds the encrypted swap mapping /dev/mapper/nbd-vram-0",
                          "`swapoff /dev/mapper/nbd-vram-0`, then `cryptsetup close nbd-vram-0` first")
    stale.swaps()
    p = cli("detach", "/dev/nbd0", env=env)
    assert p.returncode == 1 and "run `cryptsetup close nbd-vram-0` first" in p.stderr, p.stderr


# -- the swap of a device, whatever path the kernel lists ---------------------------------------------------

def test_find_swap_by_path_and_by_device_number(tmp_path):
    swaps = {"/dev/dm-0": (1048572, 0, 1500)}
    assert nv.find_swap("/dev/mapper/nbd-vram-0", "/dev/dm-0", swaps=swaps) == ("/dev/dm-0", (1048572, 0, 1500))
    assert nv.find_swap("/dev/nbd0", swaps=swaps) is None
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        for p in (a, b):
            os.mknod(p, 0o600 | 0o060000, os.makedev(250, 7))        # S_IFBLK: two names of one device
    except PermissionError:
        pytest.skip("mknod needs root")
    assert nv.find_swap(str(a), swaps={str(b): (4, 0, 1)}) == (str(b), (4, 0, 1))
    Path(b).unlink()
    os.mknod(b, 0o600 | 0o060000, os.makedev(250, 8))
    assert nv.find_swap(str(a), swaps={str(b): (4, 0, 1)}) is None


def test_a_swap_named_by_a_detached_mount_is_found_under_dev(tmp_path, monkeypatch):
    """A swapon made in a mount namespace that is gone since: /proc/swaps names /dev/nbd0 as /nbd0 and
    /dev/mapper/nbd-vram-1 as /mapper/nbd-vram-1 (a unit with PrivateMounts=yes, after a crash restart's
    takeover ended the old namespace's last process)."""
    dev = tmp_path / "dev"
    (dev / "mapper").mkdir(parents=True)
    (dev / "nbd0").touch()
    (dev / "mapper" / "nbd-vram-1").touch()
    proc = tmp_path / "root" / "proc"
    proc.mkdir(parents=True)
    (proc / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n"
                                "/nbd0 partition 524284 1024 1500\n"
                                "/mapper/nbd-vram-1 partition 524284 0 1500\n"
                                "/nosuch7 partition 4 0 -2\n")
    monkeypatch.setenv("NBD_VRAM_SYSFS_ROOT", str(tmp_path / "root"))
    monkeypatch.setattr(nv, "DEV_DIR", str(dev))
    assert nv.active_swaps() == {f"{dev}/nbd0": (524284, 1024, 1500), f"{dev}/mapper/nbd-vram-1": (524284, 0, 1500),
                                 "/nosuch7": (4, 0, -2)}
    assert nv.find_swap(f"{dev}/nbd0") == (f"{dev}/nbd0", (524284, 1024, 1500))
