"""Tests against the real NVIDIA driver; skipped (with the reason) where there is no GPU.

Run on the GPU machine: python3 -m pytest -q tests/test_gpu.py
NBD_VRAM_TEST_LIBCUDA=path/to/fake/libcuda.so.1 runs the same tests against the fake (CI does).
"""
import array
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPT, load_module

nv = load_module()


LIB = os.environ.get("NBD_VRAM_TEST_LIBCUDA", "libcuda.so.1")
os.environ["NBD_VRAM_LIBCUDA"] = LIB      # for the child processes and serve


def _real_gpu():
    if LIB == "libcuda.so.1" and not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU here (/dev/nvidiactl missing); run on the GPU machine"
    try:
        cuda = nv.Cuda(LIB)
        cuda.init(tries=1)
        if cuda.device_count() < 1:
            return "the driver sees no GPU"
    except nv.Fatal as e:
        return f"the NVIDIA driver does not work here: {e}"
    return None


SKIP = _real_gpu()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def _pattern(n, seed):
    return hashlib.shake_256(str(seed).encode()).digest(n)


@pytest.fixture(scope="module")
def gpu():
    cuda = nv.Cuda(LIB)
    dev, ctx = nv.VramStore.open_device(cuda, "0")
    return cuda, dev, ctx


def test_binding_reports_the_device(gpu):
    cuda, dev, ctx = gpu
    info = cuda.device_info(dev)
    assert info["uuid"].startswith("GPU-") and len(info["uuid"]) == 40
    assert info["total_bytes"] > 1 << 30
    free, total = cuda.mem_info()
    assert 0 < free <= total
    # the same device is found by its UUID and by its PCI bus id
    assert cuda.select_device(info["uuid"]) == dev
    assert cuda.select_device(info["pci_bus_id"]) == dev


def test_error_names_come_from_the_driver(gpu):
    cuda, dev, ctx = gpu
    err = cuda.error("cuMemAlloc_v2", nv.CUDA_ERROR_OUT_OF_MEMORY)
    assert err.name == "CUDA_ERROR_OUT_OF_MEMORY" and "out of memory" in str(err)


@pytest.mark.parametrize("use_vmm", [True, False])
def test_store_round_trip_at_the_edges(gpu, use_vmm):
    cuda, dev, ctx = gpu
    store = nv.VramStore.allocate(cuda, dev, ctx, 3 << 30, 1 << 30, use_vmm=use_vmm)
    assert store.kind == ("cuMemCreate+fd" if use_vmm else "cuMemAlloc")
    assert store.size_bytes == 3 << 30     # above 2**31: size_t all the way
    io = nv.IoContext(store, 8 << 20, 8 << 20)
    try:
        for i, (off, n) in enumerate([(0, 4096), (store.size_bytes - 4096, 4096), ((2 << 30) + 513, 1 << 20),
                                      (12345, 8 << 20)]):
            data = _pattern(n, i)
            ctypes.memmove(io.rx_addr, data, n)
            cuda.call("cuMemcpyHtoDAsync_v2", store.dptr + off, io.rx_addr, n, io.stream)
            cuda.call("cuMemcpyDtoHAsync_v2", io.tx_addr, store.dptr + off, n, io.stream)
            cuda.call("cuStreamSynchronize", io.stream)
            assert bytes(io.tx[:n]) == data
    finally:
        io.close()
        store.free()


CHILD = r"""
import ctypes, os, socket, sys, array, hashlib
sys.path.insert(0, {root!r})
import importlib.util
spec = importlib.util.spec_from_file_location("nbd_vram", {script!r}); nv = importlib.util.module_from_spec(spec); spec.loader.exec_module(nv)
cuda = nv.Cuda(None); dev, ctx = nv.VramStore.open_device(cuda, "0")
size = 1 << 30
data = hashlib.shake_256(b"survive").digest(4 << 20)
buf = ctypes.create_string_buffer(data, len(data))
if sys.argv[1] == "create":
    store = nv.VramStore.allocate(cuda, dev, ctx, size, size)
    cuda.call("cuMemcpyHtoDAsync_v2", store.dptr + (512 << 20), ctypes.addressof(buf), len(data), None)
    cuda.call("cuCtxSynchronize")
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[2])
    s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [store.fd]))])
    s.recv(1)
    os._exit(0)    # exit without freeing: only the fd held by the test keeps the memory
else:
    fd = int(sys.argv[2])
    store = nv.VramStore.import_fd(cuda, dev, ctx, fd, size)
    out = ctypes.create_string_buffer(len(data))
    cuda.call("cuMemcpyDtoHAsync_v2", ctypes.addressof(out), store.dptr + (512 << 20), len(data), None)
    cuda.call("cuCtxSynchronize")
    print("INTACT" if out.raw == data else "CORRUPT")
"""


def test_exported_fd_keeps_vram_after_its_creator_exits(tmp_path):
    """The restart path: memory and contents survive the creating process, a new process imports them."""
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(root=str(ROOT / "tests"), script=str(SCRIPT)))
    path = str(tmp_path / "fd.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    creator = subprocess.Popen([sys.executable, str(child), "create", path])
    conn, _ = srv.accept()
    msg, anc, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
    fd = array.array("i", anc[0][2][:4])[0]
    conn.send(b"x")
    assert creator.wait(60) == 0
    p = subprocess.run([sys.executable, str(child), "import", str(fd)], pass_fds=[fd], capture_output=True, text=True,
                       timeout=60)
    os.close(fd)
    assert p.stdout.strip() == "INTACT", p.stdout + p.stderr


def _fio():
    for base in (ROOT / ".anchors", ROOT.parent / "shared" / "anchors"):
        if (base / "bench" / "run-fio.sh").exists():
            return str(base / "bench" / "run-fio.sh")
    return None


@pytest.mark.skipif(_fio() is None, reason="no portable fio with the nbd engine (copy ../shared/anchors to .anchors)")
@pytest.mark.parametrize("bs", ["4k", "128k", "1m"])
def test_fio_verify_on_real_vram(tmp_path, bs):
    sock = str(tmp_path / "nbd.sock")
    log = open(tmp_path / "serve.log", "w")
    srv = subprocess.Popen([sys.executable, str(SCRIPT), "serve", "--socket", sock, "--size", "2G"],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        p = subprocess.run([_fio(), "--name=verify", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                            "--size=1g", "--rw=randwrite", f"--bs={bs}", "--iodepth=16", "--numjobs=2",
                            "--offset_increment=1g", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                            "--output-format=json"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        assert '"error" : 0' in p.stdout
        print(f"fio verify bs={bs}: ok")
    finally:
        srv.terminate()
        assert srv.wait(30) == 0
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def _compute_pids():
    """Pids with a CUDA context on any GPU, per nvidia-smi (None where there is no nvidia-smi: the fake)."""
    if LIB != "libcuda.so.1" or not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    return {int(x) for x in out.split() if x.strip().isdigit()}


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root")
def test_power_release_leaves_nothing_on_the_gpu(tmp_path):
    """`run` under tests/power_harness.py (the kernel's part played by the test): on AC its
    processes hold the GPU; unplugged, the daemon swaps off, frees the VRAM and re-executes
    itself: no process of ours keeps a CUDA context, libcuda is no longer mapped."""
    from test_power import Harness
    h = Harness(tmp_path, LIB, policy="ac")
    try:
        h.wait_mode("serving", timeout=120)
        ours = {h.proc.pid, *h.children()}
        pids = _compute_pids()
        if pids is not None:
            # One CUDA context a GPU: the GPU process; the daemon, the workers and the spare hold none.
            assert len(pids & ours) == 1, f"nvidia-smi shows not one of our processes while serving: {pids} vs {ours}"
        print(f"serving: our pids {sorted(ours)}, nvidia-smi compute pids {sorted(pids) if pids is not None else '-'}")
        h.ac(False)
        h.proc.send_signal(signal.SIGUSR1)
        h.wait_mode("idle", timeout=120)
        assert "libcuda" not in h.maps() and h.children() == []
        pids = _compute_pids()
        if pids is not None:
            deadline = time.monotonic() + 10
            while pids & ours and time.monotonic() < deadline:     # the driver lets go of exited processes
                time.sleep(0.5)
                pids = _compute_pids()
            assert not pids & ours, f"nvidia-smi still shows our processes after the release: {pids & ours}"
        print(f"released: nvidia-smi compute pids {sorted(pids) if pids is not None else '-'}; "
              f"pid {h.proc.pid} idle, libcuda not mapped")
        h.ac(True)
        h.wait_mode("serving", timeout=120)
        assert h.stop() == 0
    finally:
        h.stop()
        h.log.close()
