"""Kernel-mode worker processes (what `run` starts): the control channel (map a slice, serve its
sockets, drop it, become a dead worker's replacement), with the kernel's ends of the sockets held here."""
import socket
import time

import pytest


@pytest.fixture
def gpu(nv, fakecuda, monkeypatch):
    """Two slices' VRAM on the fake GPU 0, and the spawn arguments of a kernel-mode worker."""
    monkeypatch.setenv("NBD_VRAM_CUINIT_TRIES", "1")
    cuda = nv.Cuda(fakecuda)
    dev, ctx = nv.VramStore.open_device(cuda, "0")
    stores = [nv.VramStore.allocate(cuda, dev, ctx, 64 << 20, 64 << 20) for _ in range(2)]
    if stores[0].fd is None:
        pytest.skip("this libcuda exports no VRAM fd: no worker processes")
    yield cuda.device_info(dev)["uuid"], stores
    for st in stores:
        st.free()


def spawn(nv, fakecuda, uuid, standby=0, index=1):
    proc, ctl = nv.spawn_worker(None, fakecuda, 256 << 10, index=index, gpu=uuid, standby=standby)
    nv.wait_worker_ready(proc, ctl)
    return proc, ctl


def serve(nv, ctl, store, sid, n, imported=False):
    """Map slice SID in the worker and give it N connections; returns the kernel's ends."""
    if not imported:
        nv.ctl_call(ctl, nv.CTL_IMPORT, sid, store.size_bytes, fds=[store.fd])
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
    uuid, stores = gpu
    proc, ctl = spawn(nv, fakecuda, uuid)
    k0 = serve(nv, ctl, stores[0], 0, 2)
    k1 = serve(nv, ctl, stores[1], 1, 1)
    a, b = b"A" * 8192, b"B" * 8192
    assert roundtrip(nv, k0[0], 4096, a) == a
    assert roundtrip(nv, k1[0], 4096, b) == b
    assert read(nv, k0[1], 4096, 8192) == a         # the other connection of slice 0 sees slice 0
    # Dropping slice 1 (its device disconnected) leaves slice 0 served.
    k1[0].close()
    nv.ctl_call(ctl, nv.CTL_DROP, 1)
    assert read(nv, k0[0], 4096, 8192) == a
    with pytest.raises(nv.Fatal, match="not mapped"):
        nv.ctl_call(ctl, nv.CTL_SERVE, 1, 0)
    for k in k0:
        k.close()
    ctl.close()                    # the daemon stops: the worker exits once its connections ended
    assert proc.wait(30) == nv.EXIT_OK


def test_worker_serves_on_when_the_kernel_drops_one_connection(nv, gpu, fakecuda):
    """The kernel gave up on one connection (a timed-out request): the worker keeps serving the
    others (status shows the device degraded) rather than exiting, which under memory pressure
    would cost a new process."""
    uuid, stores = gpu
    proc, ctl = spawn(nv, fakecuda, uuid)
    kernel = serve(nv, ctl, stores[0], 0, 2)
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
    uuid, stores = gpu
    proc, ctl = spawn(nv, fakecuda, uuid)
    kernel = serve(nv, ctl, stores[0], 0, 1)
    ctl.close()
    time.sleep(1)
    assert proc.poll() is None
    assert roundtrip(nv, kernel[0], 0, b"k" * 4096) == b"k" * 4096
    kernel[0].close()
    assert proc.wait(30) == nv.EXIT_OK


def test_spare_takes_a_dead_workers_connections_with_the_data(nv, gpu, fakecuda):
    uuid, stores = gpu
    proc, ctl = spawn(nv, fakecuda, uuid)
    kernel = serve(nv, ctl, stores[0], 0, 1)
    data = bytes(range(256)) * 16
    assert roundtrip(nv, kernel[0], 65536, data) == data
    spare, sctl = spawn(nv, fakecuda, uuid, standby=2, index=0)
    nv.ctl_call(sctl, nv.CTL_IMPORT, 0, stores[0].size_bytes, fds=[stores[0].fd])
    nv.ctl_call(sctl, nv.CTL_POOL, 3)
    proc.kill()
    proc.wait()
    kernel[0].close()
    new = serve(nv, sctl, stores[0], 0, 1, imported=True)
    nv.ctl_call(sctl, nv.CTL_BECOME, 1, 2)
    assert read(nv, new[0], 65536, len(data)) == data
    new[0].close()
    sctl.close()
    assert spare.wait(30) == nv.EXIT_OK


def test_bad_control_messages_get_an_error_and_change_nothing(nv, gpu, fakecuda):
    uuid, stores = gpu
    proc, ctl = spawn(nv, fakecuda, uuid)
    kernel = serve(nv, ctl, stores[0], 0, 1)
    with pytest.raises(nv.Fatal, match="already mapped"):
        nv.ctl_call(ctl, nv.CTL_IMPORT, 0, stores[0].size_bytes, fds=[stores[0].fd])
    with pytest.raises(nv.Fatal, match="2 fds for 1 connections|fds for"):
        a, b = socket.socketpair()
        nv.ctl_call(ctl, nv.CTL_SERVE, 0, 1, fds=[a.fileno(), b.fileno()])
    ctl.sendall(b"Zjunk")
    assert ctl.recv(100).startswith(nv.CTL_ERROR)
    assert roundtrip(nv, kernel[0], 0, b"s" * 4096) == b"s" * 4096
    kernel[0].close()
    ctl.close()
    assert proc.wait(30) == nv.EXIT_OK
