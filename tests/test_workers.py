"""Kernel-mode worker processes (what `run` starts), with the kernel's ends of the sockets held here."""
import socket
import time

import pytest


@pytest.fixture
def store(nv, fakecuda, monkeypatch):
    monkeypatch.setenv("NBD_VRAM_CUINIT_TRIES", "1")
    cuda = nv.Cuda(fakecuda)
    dev, ctx = nv.VramStore.open_device(cuda, "0")
    st = nv.VramStore.allocate(cuda, dev, ctx, 64 << 20, 64 << 20)
    if st.fd is None:
        pytest.skip("this libcuda exports no VRAM fd: no worker processes")
    yield st
    st.free()


def start(nv, store, fakecuda, n):
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(n)]
    proc, ctl = nv.spawn_worker(store, fakecuda, 256 << 10, socks=[ours for ours, _ in pairs], index=1)
    for ours, _ in pairs:
        ours.close()
    nv.wait_worker_ready(proc, ctl)
    return proc, ctl, [kernel for _, kernel in pairs]


def test_worker_serves_on_when_the_kernel_drops_one_connection(nv, store, fakecuda):
    """The kernel gave up on one connection (a timed-out request): the worker keeps serving the
    others (status shows the device degraded) rather than exiting, which under memory pressure
    would cost a new process."""
    proc, ctl, kernel = start(nv, store, fakecuda, 2)
    kernel[0].close()
    time.sleep(3)
    assert proc.poll() is None
    k = kernel[1]
    k.settimeout(10)
    k.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.WRITE, 7, 8192, 4096) + b"x" * 4096)
    k.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.READ, 8, 8192, 4096))
    got = b""
    while len(got) < 2 * nv.SIMPLE_REPLY.size + 4096:
        got += k.recv(65536)
    assert nv.SIMPLE_REPLY.unpack_from(got, 0)[1:] == (0, 7)
    assert nv.SIMPLE_REPLY.unpack_from(got, nv.SIMPLE_REPLY.size)[1:] == (0, 8)
    assert got[2 * nv.SIMPLE_REPLY.size:] == b"x" * 4096
    k.close()
    assert proc.wait(30) == nv.EXIT_OK
    ctl.close()


def test_worker_ends_cleanly_on_disconnect(nv, store, fakecuda):
    proc, ctl, kernel = start(nv, store, fakecuda, 2)
    kernel[0].close()
    time.sleep(0.5)                  # the kernel closes its sockets one after the other
    kernel[1].close()
    assert proc.wait(30) == nv.EXIT_OK
    ctl.close()
