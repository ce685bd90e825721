"""The command line: help, exit codes, GPU selection, allocation back-off, socket safety, run/status refusals."""
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest

from conftest import SCRIPT, fake_env
from nbdclient import Client

MiB = 1 << 20
FAKE_UUID0 = "GPU-facec0da-0000-4000-0000-000000000001"


def cli(*args, env=None, timeout=60, prefix=()):
    return subprocess.run([*prefix, sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_clean(p):
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out


def error_lines(p):
    return [line for line in p.stderr.splitlines() if "ERROR" in line]


def serve_fails(tmp_path, fakecuda, *args, code, env=None, **fake):
    e = fake_env(fakecuda, **fake)
    e.update(env or {})
    p = cli("serve", "--socket", str(tmp_path / "s.sock"), *args, env=e)
    assert p.returncode == code, (p.returncode, p.stderr)
    assert_clean(p)
    errs = error_lines(p)
    assert len(errs) == 1, p.stderr                 # one line says what is wrong
    assert not os.path.exists(tmp_path / "s.sock")
    return errs[0]


def start_serve(tmp_path, fakecuda, *args, sock=None, **fake):
    """Run serve until it listens; returns (process, socket path, log path)."""
    sock = sock or str(tmp_path / "s.sock")
    log = tmp_path / "serve.log"
    logf = open(log, "w")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "serve", "--socket", sock, *args],
                            env=fake_env(fakecuda, **fake), stdout=logf, stderr=subprocess.STDOUT)
    logf.close()
    deadline = time.monotonic() + 20
    while "serving " not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start (rc {proc.poll()}): {log.read_text()}")
        time.sleep(0.05)
    return proc, sock, log


def stop_serve(proc, log):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
    return log.read_text()


def export_size(sock):
    c = Client(sock)
    c.go()
    size = c.size
    data = os.urandom(4096)
    assert c.write(size - 4096, data) == 0 and c.read(size - 4096, 4096) == (0, data)
    c.disconnect()
    return size


# -- help and version -------------------------------------------------------------------------------------

def test_help_lists_exit_codes():
    p = cli("--help")
    assert p.returncode == 0
    for code, words in [(0, "success"), (2, "bad command line"), (3, "no daemon is running"), (4, "configuration"),
                        (5, "libcuda.so.1"), (6, "no usable NVIDIA GPU"), (7, "minimum size"), (8, "nbd"),
                        (9, "root"), (10, "errors were seen"), (11, "cryptsetup")]:
        assert any(line.split()[:1] == [str(code)] and words in line for line in p.stdout.splitlines()), (code, words)
    for command in ("serve", "run", "check-config", "status", "detach"):
        assert command in p.stdout


def test_serve_help_lists_exit_codes():
    p = cli("serve", "--help")
    assert p.returncode == 0 and "exit status:" in p.stdout and "--min-size" in p.stdout


def test_version():
    p = cli("--version")
    assert p.returncode == 0 and p.stdout.strip().startswith("nbd-vram ")
    assert p.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("args", [["bogus"], ["serve"], ["serve", "--socket", "/tmp/x", "--size", "1G", "--nope"],
                                  ["serve", "--socket", "/tmp/x", "--size", "1G", "--max-connections", "many"]])
def test_usage_errors(args):
    p = cli(*args)
    assert p.returncode == 2, p.stderr
    assert_clean(p)
    assert len(p.stderr.strip().splitlines()) == 1 and "(see --help)" in p.stderr


def test_no_command_prints_help():
    p = cli()
    assert p.returncode == 2 and "usage:" in p.stdout


def usage_error_line(p, command, argument):
    """The one line of a bad command line: exit 2, argparse's wording, nothing else said or done."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert_clean(p)
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"nbd_vram.py {command}: argument {argument}: ") and "(see --help)" in p.stderr
    return p.stderr


@pytest.mark.parametrize("size,min_size,bad", [("tiny", "64M", "--size"), ("32M", "16M", "--size"),
                                               ("9" * 400, "64M", "--size"), ("1G", "lots", "--min-size")])
def test_serve_bad_sizes(tmp_path, fakecuda, size, min_size, bad):
    p = cli("serve", "--socket", str(tmp_path / "s.sock"), "--size", size, "--min-size", min_size,
            env=fake_env(fakecuda))
    usage_error_line(p, "serve", bad)
    assert not os.path.exists(tmp_path / "s.sock")


@pytest.mark.parametrize("argv, argument", [
    (["run", "--size", "12X"], "--size"),
    (["run", "--config", "/dev/null", "--slice-size", "1M"], "--slice-size"),
    (["check-config", "--reserve", "lots"], "--reserve"),
    (["shrink", "foo"], "SIZE"),
    (["grow", "0"], "SIZE"),
    (["serve", "--socket", "/tmp/x.sock", "--size", "12X"], "--size"),
    (["serve", "--socket", "/tmp/x.sock", "--size"], "--size"),
    (["serve", "--socket", "/tmp/x.sock", "--size", "1G", "--buffer-size", "1K"], "--buffer-size"),
    (["detach", "/dev/sda"], "DEVICE"),
])
def test_bad_value_on_the_command_line_is_a_usage_error(argv, argument):
    """Exit 2 (bad command line), not 4 (bad configuration), and before anything else: root, a daemon."""
    usage_error_line(cli(*argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}), argv[0], argument)


COMMANDS = ["serve", "run", "check-config", "status", "detach", "sleep", "wake", "power-event", "shrink", "grow",
            "upgrade"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_a_description_and_its_exit_codes(nv, command):
    p = cli(command, "--help")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    usage, description, *_ = p.stdout.split("\n\n")
    assert usage.startswith(f"usage: nbd_vram.py {command}") and len(description.split()) >= 8, p.stdout
    codes = p.stdout.split("\nexit status:\n")[1].splitlines()
    listed = {int(line.split()[0]) for line in codes}
    assert {0, 1, 2} <= listed and listed <= set(nv.EXIT_MEANINGS), codes
    for line in codes:
        assert line.split(None, 1)[1] == nv.EXIT_MEANINGS[int(line.split()[0])], line


@pytest.mark.parametrize("command, codes, not_codes", [
    ("serve", {5, 6, 7}, {3, 4}), ("run", {4, 5, 7, 8, 9, 11}, {3, 10}), ("check-config", {4, 11}, {3, 9}),
    ("status", {3, 10}, {4}), ("shrink", {3, 9}, {4}), ("detach", {9}, {4}), ("power-event", set(), {3, 4, 9}),
])
def test_command_help_lists_the_codes_it_can_return(command, codes, not_codes):
    listed = {int(line.split()[0]) for line in cli(command, "--help").stdout.split("\nexit status:\n")[1].splitlines()}
    assert codes <= listed and not listed & not_codes, listed


# -- driver and GPU ---------------------------------------------------------------------------------------

def test_no_driver(tmp_path, fakecuda):
    p = cli("serve", "--socket", str(tmp_path / "s.sock"), "--size", "256M",
            env=dict(os.environ, NBD_VRAM_LIBCUDA="/nonexistent/libcuda.so.1"))
    assert p.returncode == 5, p.stderr
    assert_clean(p)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "NBD_VRAM_LIBCUDA" in p.stderr and "/nonexistent/libcuda.so.1" in p.stderr


def test_no_device(tmp_path, fakecuda):
    line = serve_fails(tmp_path, fakecuda, "--size", "256M", code=6, FAKECUDA_NO_DEVICE=1)
    assert "no NVIDIA GPU" in line


def test_cuinit_keeps_failing(tmp_path, fakecuda):
    line = serve_fails(tmp_path, fakecuda, "--size", "256M", code=5, FAKECUDA_INIT_FAILS=5)
    assert "CUDA_ERROR_UNKNOWN" in line


@pytest.mark.parametrize("gpu,devices,fragment", [
    ("5", 1, "there are only 1 GPU(s)"),
    ("GPU-facec0da-0000-4000-0000-000000000002", 1, "no GPU has that UUID"),
    ("0000:02:00.0", 1, "no GPU at that PCI bus id"),
    ("zz:zz", 1, "no GPU at that PCI bus id"),
    ("2", 2, "numbered 0 to 1"),
])
def test_gpu_not_found(tmp_path, fakecuda, gpu, devices, fragment):
    line = serve_fails(tmp_path, fakecuda, "--size", "256M", "--gpu", gpu, code=6, FAKECUDA_DEVICES=devices)
    assert f"--gpu {gpu}" in line and fragment in line


@pytest.mark.parametrize("gpu,want", [("0", 0), (FAKE_UUID0, 0), (FAKE_UUID0.lower()[4:], 0), ("0000:01:00.0", 0),
                                      ("01:00.0", 0), ("1", 1), ("GPU-facec0da-0000-4000-0000-000000000002", 1),
                                      ("0000:02:00.0", 1)])
def test_gpu_selection(tmp_path, fakecuda, gpu, want):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M", "--gpu", gpu,
                                  FAKECUDA_DEVICES=2)
    export_size(sock)
    text = stop_serve(proc, log)
    assert f"GPU {want}: Fake CUDA Device {want} (GPU-facec0da-0000-4000-0000-00000000000{want + 1}, " \
           f"0000:0{want + 1}:00.0)" in text, text


# -- allocation -------------------------------------------------------------------------------------------

def test_not_enough_vram(tmp_path, fakecuda):
    line = serve_fails(tmp_path, fakecuda, "--size", "1G", "--min-size", "256M", code=7,
                       FAKECUDA_FAIL_ALLOC_ABOVE=128 * MiB, FAKECUDA_TOTAL_MB=4096)
    assert "could not allocate even 256 MiB" in line and "4 GiB of 4 GiB is free" in line


def test_backoff(tmp_path, fakecuda):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "1G", "--min-size", "256M",
                                  FAKECUDA_FAIL_ALLOC_ABOVE=600 * MiB)
    assert export_size(sock) == 512 * MiB
    text = stop_serve(proc, log)
    assert "allocating 1 GiB of VRAM failed (out of memory), trying 512 MiB less" in text
    assert "allocated 512 MiB of VRAM (1 GiB asked" in text


def test_backoff_limited_by_total_memory(tmp_path, fakecuda):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "2G", "--min-size", "256M", FAKECUDA_TOTAL_MB=1200)
    assert export_size(sock) == 1 * 1024 * MiB
    stop_serve(proc, log)


def test_no_vmm_falls_back_to_cumemalloc(tmp_path, fakecuda):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M", FAKECUDA_NO_VMM=1)
    assert export_size(sock) == 128 * MiB
    text = stop_serve(proc, log)
    assert "cuMemAlloc)" in text and "cuMemCreate" not in text


def test_vmm_used_by_default(tmp_path, fakecuda):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M")
    export_size(sock)
    assert "cuMemCreate+fd" in stop_serve(proc, log)


# -- the socket path --------------------------------------------------------------------------------------

def test_socket_mode_0600(tmp_path, fakecuda):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M")
    try:
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        stop_serve(proc, log)
    assert not os.path.exists(sock)                            # removed on the way out


def test_world_writable_directory_refused(tmp_path, fakecuda):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    line = serve_fails(d, fakecuda, "--size", "128M", "--min-size", "64M", code=1)
    assert "world-writable without the sticky bit" in line


def test_group_writable_directory_refused(tmp_path, fakecuda):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o770)
    line = serve_fails(d, fakecuda, "--size", "128M", "--min-size", "64M", code=1)
    assert "group-writable without the sticky bit" in line


def test_directory_of_another_user_refused(tmp_path, fakecuda):
    d = tmp_path / "theirs"
    d.mkdir()
    os.chown(d, 65534, 65534)          # nobody's, mode 0755: only they can write it
    line = serve_fails(d, fakecuda, "--size", "128M", "--min-size", "64M", code=1)
    assert "belongs to another user (uid 65534)" in line


def test_no_chmod_through_a_symlink_raced_in_after_bind(nv, tmp_path, monkeypatch):
    """Someone who swaps the fresh socket for a symlink between bind and listen must not get
    the link's target chmodded: the socket's mode comes from the umask alone."""
    victim = tmp_path / "victim"
    victim.write_text("theirs")
    os.chmod(victim, 0o644)
    path = str(tmp_path / "s.sock")
    real_bind = socket.socket.bind

    def racing_bind(self, addr):
        real_bind(self, addr)
        os.rename(addr, addr + ".moved")
        os.symlink(victim, addr)
    monkeypatch.setattr(socket.socket, "bind", racing_bind)
    srv = nv.UnixServer(path, None, 1, 64 << 10)
    try:
        srv.open()
    finally:
        monkeypatch.setattr(socket.socket, "bind", real_bind)
        if srv.listener:
            srv.listener.close()
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(path + ".moved").st_mode) == 0o600


def test_sticky_world_writable_directory_allowed(tmp_path, fakecuda):
    d = tmp_path / "tmpish"
    d.mkdir()
    os.chmod(d, 0o1777)
    proc, sock, log = start_serve(d, fakecuda, "--size", "128M", "--min-size", "64M")
    stop_serve(proc, log)


def test_missing_directory_refused(tmp_path, fakecuda):
    p = cli("serve", "--socket", str(tmp_path / "nope" / "s.sock"), "--size", "128M", "--min-size", "64M",
            env=fake_env(fakecuda))
    assert p.returncode == 1 and "does not exist" in p.stderr
    assert_clean(p)
    assert len(error_lines(p)) == 1


def test_existing_file_refused(tmp_path, fakecuda):
    (tmp_path / "s.sock").write_text("precious")
    p = cli("serve", "--socket", str(tmp_path / "s.sock"), "--size", "128M", "--min-size", "64M",
            env=fake_env(fakecuda))
    assert p.returncode == 1 and "is not a socket" in p.stderr
    assert_clean(p)
    assert len(error_lines(p)) == 1
    assert (tmp_path / "s.sock").read_text() == "precious"


def test_stale_socket_replaced(tmp_path, fakecuda):
    path = str(tmp_path / "s.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()                                                # the file stays; nothing listens
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M", sock=path)
    assert export_size(sock) == 128 * MiB
    assert "removing stale socket" in stop_serve(proc, log)


def test_socket_in_use_refused(tmp_path, fakecuda):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M")
    try:
        p = cli("serve", "--socket", sock, "--size", "128M", "--min-size", "64M", env=fake_env(fakecuda))
        assert p.returncode == 1 and "in use by another server" in p.stderr
        assert_clean(p)
        assert export_size(sock) == 128 * MiB                   # the first server still answers
    finally:
        stop_serve(proc, log)


# -- run and status ---------------------------------------------------------------------------------------

def test_run_config_file_missing(tmp_path):
    """--config naming no file: one line saying so, exit 4, before anything else (root, the driver)."""
    p = cli("run", "--config", str(tmp_path / "absent.conf"), env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert p.returncode == 4, (p.returncode, p.stderr)
    assert_clean(p)
    assert len(p.stderr.strip().splitlines()) == 1 and "absent.conf: no such file (named by --config)" in p.stderr


def test_run_needs_root(tmp_path):
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0:
        if not setpriv:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop privileges")
        prefix = (setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups")
    else:
        prefix = ()
    p = cli("run", "--config", "/dev/null", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, prefix=prefix)
    assert p.returncode == 9, (p.returncode, p.stderr)
    assert_clean(p)
    assert len(p.stderr.strip().splitlines()) == 1 and "run needs root" in p.stderr


def as_nobody():
    """The prefix that runs a command as uid/gid 65534 (skips the test where that is not possible)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop privileges")
    return (setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups")


@pytest.mark.parametrize("argv, words", [
    (["status"], "cannot read the daemon's state"),
    (["status", "--json"], "cannot read the daemon's state"),
    (["shrink", "1G"], "shrink needs root"),
    (["grow", "1G"], "grow needs root"),
    (["upgrade"], "upgrade needs root"),
    (["sleep"], "sleep needs root"),
    (["wake"], "wake needs root"),
    (["detach", "/dev/nbd0"], "detach needs root"),
])
def test_commands_without_root_say_so(tmp_path, argv, words):
    """Not "not running" or "no daemon" (wrong), nor a PermissionError traceback: one line, exit 9."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    (run / "state.json").write_text('{"pid": 1, "mode": "serving"}')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NBD_VRAM_RUNTIME_DIR": str(run)}
    p = cli(*argv, env=env, prefix=as_nobody())
    assert p.returncode == 9, (p.returncode, p.stdout, p.stderr)
    assert_clean(p)
    assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr and "root" in p.stderr, p.stderr
    assert p.stdout == ""


def test_socket_path_too_long_refused_before_allocating(tmp_path, fakecuda):
    sock = str(tmp_path / ("s" * (107 - len(str(tmp_path)))))     # 108 bytes: one more than sun_path holds
    assert len(sock) == 108
    calls = tmp_path / "cuda.log"
    p = cli("serve", "--socket", sock, "--size", "128M", "--min-size", "64M",
            env=fake_env(fakecuda, FAKECUDA_LOG=str(calls)))
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert_clean(p)
    assert len(error_lines(p)) == 1 and "at most 107" in p.stderr and "shorter --socket" in p.stderr
    assert not calls.exists() or "cuMemCreate" not in calls.read_text()


@pytest.mark.parametrize("value, words", [("8M", "less than one connection's buffers"), ("lots", "argument --max-pinned")])
def test_max_pinned_checked_before_allocating(tmp_path, fakecuda, value, words):
    calls = tmp_path / "cuda.log"
    p = cli("serve", "--socket", str(tmp_path / "s.sock"), "--size", "128M", "--min-size", "64M",
            "--buffer-size", "8M", "--max-pinned", value, env=fake_env(fakecuda, FAKECUDA_LOG=str(calls)))
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert_clean(p)
    assert len(p.stderr.strip().splitlines()) == 1 and words in p.stderr, p.stderr
    assert not calls.exists() or "cuMemCreate" not in calls.read_text()


def test_status_not_running(tmp_path):
    env = dict(os.environ, NBD_VRAM_RUNTIME_DIR=str(tmp_path))
    p = cli("status", env=env)
    assert p.returncode == 3, p.stderr
    assert_clean(p)
    assert p.stdout.strip() == "nbd-vram is not running"
    p = cli("status", "--json", env=env)
    assert p.returncode == 3 and '"running": false' in p.stdout


def test_status_stale_state(tmp_path):
    (tmp_path / "state.json").write_text('{"pid": 999999999, "device": "/dev/nbd0"}')
    p = cli("status", env=dict(os.environ, NBD_VRAM_RUNTIME_DIR=str(tmp_path)))
    assert p.returncode == 3 and "stale state of pid 999999999" in p.stdout
    assert_clean(p)


def test_detach_bad_device():
    assert "is not an nbd device" in usage_error_line(cli("detach", "/dev/sda"), "detach", "DEVICE")


def test_serve_sigint_is_clean(tmp_path, fakecuda):
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M")
    c = Client(sock)
    c.go()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0, log.read_text()
    assert "SIGINT received: stopping" in log.read_text() and "freed 128 MiB of VRAM" in log.read_text()
    assert "Traceback" not in log.read_text()
    c.close()


def test_serve_stops_with_a_client_mid_request(tmp_path, fakecuda):
    """SIGTERM while a client is connected and half-way through a write: exit 0, VRAM freed."""
    proc, sock, log = start_serve(tmp_path, fakecuda, "--size", "128M", "--min-size", "64M")
    c = Client(sock)
    c.go()
    c.sock.sendall(struct.pack("!IHHQQI", 0x25609513, 0, 1, 1, 0, 65536) + b"x" * 100)
    text = stop_serve(proc, log)
    assert "freed 128 MiB of VRAM" in text
    c.close()
