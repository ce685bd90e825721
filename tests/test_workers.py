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


def test_worker_exits_when_the_kernel_drops_one_connection(nv, store, fakecuda):
    """The kernel gave up on one connection (a timed-out request): the worker must go, so that
    the daemon hands the kernel new sockets for all of them (it only acts on a worker's exit)."""
    proc, ctl, kernel = start(nv, store, fakecuda, 2)
    t0 = time.monotonic()
    kernel[0].close()
    assert proc.wait(30) == nv.EXIT_FAILURE
    assert time.monotonic() - t0 >= nv.PARTIAL_GRACE_S * 0.9     # not before a disconnect could close the rest
    kernel[1].settimeout(5)
    assert kernel[1].recv(1) == b""                                # its other connection is closed with it
    ctl.close()


def test_worker_ends_cleanly_on_disconnect(nv, store, fakecuda):
    proc, ctl, kernel = start(nv, store, fakecuda, 2)
    kernel[0].close()
    time.sleep(0.5)                  # the kernel closes its sockets one after the other
    kernel[1].close()
    assert proc.wait(30) == nv.EXIT_OK
    ctl.close()
