"""Kernel-mode worker processes and the GPU process (what `run` starts): the control channels (allocate,
free and copy in the GPU process; serve a slice's sockets, drop it, become a dead worker's replacement in
a worker), with the kernel's ends of the sockets held here."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT


class Gpu:
    """A GPU process on the fake GPU 0 (the daemon's side of it) with two 64 MiB slices."""

    def __init__(self, nv, fakecuda):
        self.nv, self.fakecuda = nv, fakecuda
        cuda = nv.Cuda(fakecuda)
        cuda.init()
        self.uuid = cuda.device_info(0)["uuid"]
        self.proc, self.ctl = nv.spawn_worker(fakecuda, 256 << 10, gpu=self.uuid)
        nv.wait_worker_ready(self.proc, self.ctl)
        self.slices = []            # (address in the GPU process, fd)
        for sid in range(2):
            answer, fds = nv.ctl_call(self.ctl, nv.CTL_ALLOC, sid, 64 << 20)
            if not fds:
                pytest.skip("this libcuda exports no VRAM fd")
            self.slices.append((nv._U64.unpack(answer)[0], fds[0]))

    def worker(self, standby=0, index=1):
        """A kernel-mode worker registered with this GPU process."""
        nv = self.nv
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        nv.ctl_call(self.ctl, nv.CTL_CLIENT, index, fds=[mine.fileno()])
        proc, ctl = nv.spawn_worker(self.fakecuda, 256 << 10, index=index, gpu=self.uuid, standby=standby,
                                    copier=theirs)
        mine.close()
        theirs.close()
        nv.wait_worker_ready(proc, ctl)
        return proc, ctl

    def close(self):
        self.ctl.close()
        self.proc.wait(30)
        for _, fd in self.slices:
            os.close(fd)


@pytest.fixture
def gpu(nv, fakecuda, monkeypatch):
    monkeypatch.setenv("NBD_VRAM_CUINIT_TRIES", "1")
    g = Gpu(nv, fakecuda)
    yield g
    g.close()


def spawn(nv, gpu, standby=0, index=1):
    return gpu.worker(standby=standby, index=index)


def serve(nv, ctl, gpu, sid, n, known=False):
    """Give the worker slice SID and N connections to it; returns the kernel's ends."""
    if not known:
        nv.ctl_call(ctl, nv.CTL_SLICE, sid, 64 << 20, gpu.slices[sid][0])
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(n)]
    nv.ctl_call(ctl, nv.CTL_SERVE, sid, n, fds=[ours.fileno() for ours, _ in pairs])
    for ours, _ in pairs:
        ours.close()
    return [kernel for _, kernel in pairs]


def roundtrip(nv, k, offset, data, cookie=7):
    """An NBD write then read of DATA at OFFSET on the kernel's end K; returns what was read."""
    k.settimeout(10)
    k.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.WRITE, cookie, offset, len(data)) + data)
    k.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.READ, cookie + 1, offset, len(data)))
    got = b""
    while len(got) < 2 * nv.SIMPLE_REPLY.size + len(data):
        got += k.recv(1 << 20)
    assert nv.SIMPLE_REPLY.unpack_from(got, 0)[1:] == (0, cookie)
    assert nv.SIMPLE_REPLY.unpack_from(got, nv.SIMPLE_REPLY.size)[1:] == (0, cookie + 1)
    return got[2 * nv.SIMPLE_REPLY.size:]


def read(nv, k, offset, n, cookie=50):
    k.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.READ, cookie, offset, n))
    got = b""
    while len(got) < nv.SIMPLE_REPLY.size + n:
        got += k.recv(1 << 20)
    assert nv.SIMPLE_REPLY.unpack_from(got, 0)[1:] == (0, cookie)
    return got[nv.SIMPLE_REPLY.size:]


def test_one_worker_serves_two_slices_each_on_its_own_vram(nv, gpu, fakecuda):
    proc, ctl = spawn(nv, gpu)
    k0 = serve(nv, ctl, gpu, 0, 2)
    k1 = serve(nv, ctl, gpu, 1, 1)
    a, b = b"A" * 8192, b"B" * 8192
    assert roundtrip(nv, k0[0], 4096, a) == a
    assert roundtrip(nv, k1[0], 4096, b) == b
    assert read(nv, k0[1], 4096, 8192) == a         # the other connection of slice 0 sees slice 0
    # Dropping slice 1 (its device disconnected) leaves slice 0 served.
    k1[0].close()
    nv.ctl_call(ctl, nv.CTL_DROP, 1)
    assert read(nv, k0[0], 4096, 8192) == a
    with pytest.raises(nv.Fatal, match="not known"):
        nv.ctl_call(ctl, nv.CTL_SERVE, 1, 0)
    for k in k0:
        k.close()
    ctl.close()                    # the daemon stops: the worker exits once its connections ended
    assert proc.wait(30) == nv.EXIT_OK


def test_worker_serves_on_when_the_kernel_drops_one_connection(nv, gpu, fakecuda):
    """The kernel gave up on one connection (a timed-out request): the worker keeps serving the
    others (status shows the device degraded) rather than exiting, which under memory pressure
    would cost a new process."""
    proc, ctl = spawn(nv, gpu)
    kernel = serve(nv, ctl, gpu, 0, 2)
    kernel[0].close()
    time.sleep(2)
    assert proc.poll() is None
    assert roundtrip(nv, kernel[1], 8192, b"x" * 4096) == b"x" * 4096
    kernel[1].close()
    ctl.close()
    assert proc.wait(30) == nv.EXIT_OK


def test_worker_serves_on_when_the_daemon_dies(nv, gpu, fakecuda):
    """The daemon's end of the control socket closes (it was killed): live swap is served until
    the kernel ends the connections."""
    proc, ctl = spawn(nv, gpu)
    kernel = serve(nv, ctl, gpu, 0, 1)
    ctl.close()
    time.sleep(1)
    assert proc.poll() is None
    assert roundtrip(nv, kernel[0], 0, b"k" * 4096) == b"k" * 4096
    kernel[0].close()
    assert proc.wait(30) == nv.EXIT_OK


def test_spare_takes_a_dead_workers_connections_with_the_data(nv, gpu, fakecuda):
    proc, ctl = spawn(nv, gpu)
    kernel = serve(nv, ctl, gpu, 0, 1)
    data = bytes(range(256)) * 16
    assert roundtrip(nv, kernel[0], 65536, data) == data
    spare, sctl = spawn(nv, gpu, standby=2, index=0)
    nv.ctl_call(sctl, nv.CTL_SLICE, 0, 64 << 20, gpu.slices[0][0])
    nv.ctl_call(sctl, nv.CTL_POOL, 3)
    proc.kill()
    proc.wait()
    kernel[0].close()
    new = serve(nv, sctl, gpu, 0, 1, known=True)
    nv.ctl_call(sctl, nv.CTL_BECOME, 1, 2)
    assert read(nv, new[0], 65536, len(data)) == data
    new[0].close()
    sctl.close()
    assert spare.wait(30) == nv.EXIT_OK


def test_bad_control_messages_get_an_error_and_change_nothing(nv, gpu, fakecuda):
    proc, ctl = spawn(nv, gpu)
    kernel = serve(nv, ctl, gpu, 0, 1)
    with pytest.raises(nv.Fatal, match="already served"):
        nv.ctl_call(ctl, nv.CTL_SLICE, 0, 64 << 20, gpu.slices[0][0])
    with pytest.raises(nv.Fatal, match="2 fds for 1 connections|fds for"):
        a, b = socket.socketpair()
        nv.ctl_call(ctl, nv.CTL_SERVE, 0, 1, fds=[a.fileno(), b.fileno()])
    ctl.sendall(b"Zjunk")
    assert ctl.recv(100).startswith(nv.CTL_ERROR)
    assert roundtrip(nv, kernel[0], 0, b"s" * 4096) == b"s" * 4096
    kernel[0].close()
    ctl.close()
    assert proc.wait(30) == nv.EXIT_OK


def maps(pid):
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_only_the_gpu_process_loads_cuda(nv, gpu):
    """One CUDA context a GPU: workers and the spare never load libcuda; the GPU process copies for them."""
    proc, ctl = spawn(nv, gpu)
    spare, sctl = spawn(nv, gpu, standby=2, index=0)
    kernel = serve(nv, ctl, gpu, 0, 2)
    assert roundtrip(nv, kernel[0], 0, b"c" * 4096) == b"c" * 4096
    assert "libcuda" in maps(gpu.proc.pid)
    assert "libcuda" not in maps(proc.pid) and "libcuda" not in maps(spare.pid)
    for k in kernel:
        k.close()
    ctl.close()
    sctl.close()
    assert proc.wait(30) == spare.wait(30) == nv.EXIT_OK


def test_gpu_process_copies_on_when_the_daemon_dies_and_exits_after_the_workers(nv, gpu):
    """The daemon's end of the GPU process's control socket closes (it was killed): the workers' swap
    is still copied until their connections end; then the GPU process exits by itself."""
    proc, ctl = spawn(nv, gpu)
    kernel = serve(nv, ctl, gpu, 1, 1)
    gpu.ctl.close()
    ctl.close()
    time.sleep(1)
    assert gpu.proc.poll() is None and proc.poll() is None
    data = os.urandom(65536)
    assert roundtrip(nv, kernel[0], 1 << 20, data) == data
    kernel[0].close()
    assert proc.wait(30) == nv.EXIT_OK
    assert gpu.proc.wait(30) == nv.EXIT_OK


def test_gpu_process_free_zeroes_unless_told_not_to_and_meminfo(nv, gpu, fakecuda):
    """CTL_FREE with scrub zeroes the slice before releasing it (the next program must not read swapped
    pages); without (the daemon died: the pages are for its successor) it leaves them.  The fake's
    exported fd is the memfd behind its "VRAM", so the bytes can be looked at after the release."""
    if "fakecuda" not in fakecuda:
        pytest.skip("looks into the fake's VRAM")
    import mmap
    proc, ctl = spawn(nv, gpu)
    kernel = serve(nv, ctl, gpu, 0, 1) + serve(nv, ctl, gpu, 1, 1)
    secret = b"S" * 4096
    assert roundtrip(nv, kernel[0], 0, secret) == secret
    assert roundtrip(nv, kernel[1], 0, secret) == secret
    for k in kernel:
        k.close()
    nv.ctl_call(ctl, nv.CTL_DROP, 0)
    nv.ctl_call(ctl, nv.CTL_DROP, 1)
    answer, _ = nv.ctl_call(gpu.ctl, nv.CTL_MEMINFO)
    free, total = nv.struct.unpack("=QQ", answer)
    assert 0 < free < total
    nv.ctl_call(gpu.ctl, nv.CTL_FREE, 0, 1)
    nv.ctl_call(gpu.ctl, nv.CTL_FREE, 1, 0)
    for (_, fd), want in zip(gpu.slices, (bytes(4096), secret)):
        with mmap.mmap(fd, 4096) as m:
            assert m[:4096] == want
    with pytest.raises(nv.Fatal, match="not mapped"):
        nv.ctl_call(gpu.ctl, nv.CTL_FREE, 7, 1)
    ctl.close()
    assert proc.wait(30) == nv.EXIT_OK


def test_children_run_from_bytecode_cached_only_where_no_one_else_can_write(nv, monkeypatch, tmp_path):
    """A worker's start compiles nothing once the first has cached this file's bytecode in the runtime
    directory; a runtime directory that others can write gets no cache (whoever writes it runs code
    as the daemon), and the child still runs."""
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir(mode=0o700)
    shared.mkdir()
    shared.chmod(0o777)
    for where, cached in ((private, True), (shared, False)):
        monkeypatch.setenv("NBD_VRAM_RUNTIME_DIR", str(where))
        argv = nv.child_argv("--version")
        assert argv[3] == (str(where / "pycache") if cached else "")
        assert f"{nv.__file__} --version" in " ".join(argv)       # as `pgrep -f 'nbd_vram.py worker'` expects
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and nv.__version__ in out.stdout + out.stderr, out
        pycs = list(where.rglob("*.pyc"))
        assert [p.name.split(".")[0] for p in pycs] == (["nbd_vram"] if cached else []), pycs


HEAP_PROBE = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
import nbd_vram as nv
libc = nv._libc()
want = int(sys.argv[2])
junk = [bytes(100) for _ in range(20000)]       # ~2.5 MiB of objects, then freed: free heap already there
del junk
before = libc.mallinfo2()
nv.prepare_memory(libc, want)
after = libc.mallinfo2()
nv.prepare_memory(libc, want)                   # enough is free now: nothing more is grown
again = libc.mallinfo2()
print(json.dumps({"free_before": before.fordblks, "arena_before": before.arena, "free_after": after.fordblks,
                  "arena_after": after.arena, "arena_again": again.arena}))
"""


@pytest.mark.parametrize("want", [4 << 20, 48 << 20], ids=["less-than-free", "more-than-free"])
def test_heap_reserve_counts_what_is_free_already(want):
    """prepare_memory grows the heap only until WANT bytes are free (nothing where that much is free
    already: not WANT on top of it), and a second call grows nothing."""
    p = subprocess.run([sys.executable, "-c", HEAP_PROBE, str(ROOT), str(want)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONMALLOC="malloc"), timeout=60)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)
    assert m["free_after"] >= want, m
    assert m["arena_after"] - m["arena_before"] <= max(0, want - m["free_before"]) + (2 << 20), m  # + M_TOP_PAD and rounding
    assert m["arena_again"] == m["arena_after"], m
