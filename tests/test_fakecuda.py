"""The fake libcuda itself: its smoke test, its ABI check against the real cuda.h, and the
switches that the elastic-VRAM tests rely on (several backing files, a real allocator,
per-block export, other processes' usage, lost devices).

Each scenario runs in a child process: the fake reads its environment once, at cuInit."""
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FAKEDIR = HERE / "fakecuda"
MiB = 1 << 20

pytestmark = pytest.mark.skipif(bool(os.environ.get("NBD_VRAM_TEST_LIBCUDA")),
                                reason="tests of the fake libcuda, not of a real driver")

# Shared by every child: the ctypes binding of smoke.py plus a few helpers that raise.
PRELUDE = """
import ctypes as C, os, socket, sys, time
sys.path.insert(0, {fakedir!r})
import smoke
lib = smoke.load({lib!r})
MiB = 1 << 20
CUhandle, CUdeviceptr = smoke.CUhandle, smoke.CUdeviceptr
pattern = smoke.pattern

def ok(rc, what):
    assert rc == 0, "%s: CUresult %d" % (what, rc)

assert lib.cuInit(0) == 0
CTX = {{}}

def use(dev):
    if dev not in CTX:
        c = C.c_void_p()
        ok(lib.cuDevicePrimaryCtxRetain(C.byref(c), dev), "retain %d" % dev)
        CTX[dev] = c
    ok(lib.cuCtxSetCurrent(CTX[dev]), "set current %d" % dev)

def alloc(n):
    d = CUdeviceptr()
    rc = lib.cuMemAlloc_v2(C.byref(d), n)
    return rc, d.value

def create(n, dev=0):
    h = CUhandle()
    rc = lib.cuMemCreate(C.byref(h), n, C.byref(smoke.vmm_prop(dev=dev)), 0)
    return rc, h.value

def vmap(h, n, dev=0):
    va = CUdeviceptr()
    ok(lib.cuMemAddressReserve(C.byref(va), n, 0, 0, 0), "reserve")
    ok(lib.cuMemMap(va.value, n, 0, h, 0), "map")
    acc = smoke.CUmemAccessDesc()
    acc.location.type, acc.location.id, acc.flags = 1, dev, 3
    ok(lib.cuMemSetAccess(va.value, n, C.byref(acc), 1), "set access")
    return va.value

def unmap(va, n):
    ok(lib.cuMemUnmap(va, n), "unmap")
    ok(lib.cuMemAddressFree(va, n), "address free")

def export(h):
    fd = C.c_int(-1)
    ok(lib.cuMemExportToShareableHandle(C.byref(fd), h, 1, 0), "export")
    return fd.value

def import_fd(fd):
    h = CUhandle()
    ok(lib.cuMemImportFromShareableHandle(C.byref(h), C.c_void_p(fd), 1), "import")
    return h.value

def write(d, data):
    ok(lib.cuMemcpyHtoD_v2(d, data, len(data)), "HtoD")

def read(d, n):
    buf = C.create_string_buffer(n)
    ok(lib.cuMemcpyDtoH_v2(buf, d, n), "DtoH")
    return buf.raw

def meminfo():
    free, total = C.c_size_t(), C.c_size_t()
    ok(lib.cuMemGetInfo_v2(C.byref(free), C.byref(total)), "meminfo")
    return free.value, total.value
"""


def run_child(fakecuda, body, env=None, pass_fds=()):
    """Runs PRELUDE + body in a fresh python with only the given FAKECUDA_* variables."""
    code = PRELUDE.format(fakedir=str(FAKEDIR), lib=fakecuda) + textwrap.dedent(body)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKECUDA_", "FAKENVML_"))}
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    p = subprocess.run([sys.executable, "-c", code], env=full_env, pass_fds=pass_fds,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def backing(tmp_path, name, size):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(n, seed):
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def test_smoke(fakecuda):
    p = subprocess.run([sys.executable, str(FAKEDIR / "smoke.py"), fakecuda], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "checks passed" in p.stdout


def test_abi_check():
    """abi_check.c compiles fakecuda.c against the real cuda.h (where the CUDA toolkit is installed)."""
    inc = [d for d in (os.environ.get("CUDA_HOME", "") + "/include", "/usr/local/cuda/include", "/usr/include")
           if os.path.exists(os.path.join(d, "cuda.h"))]
    if not inc or not shutil.which("gcc"):
        pytest.skip("needs gcc and the CUDA toolkit's cuda.h")
    p = subprocess.run(["gcc", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I" + inc[0],
                        str(FAKEDIR / "abi_check.c")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_two_backing_files(fakecuda, tmp_path):
    """Each device writes into its own file, at the block's offset; the count follows the paths."""
    a, b = backing(tmp_path, "bar0", 8 * MiB), backing(tmp_path, "bar1", 16 * MiB)
    run_child(fakecuda, """
        n, t = C.c_int(), C.c_size_t()
        ok(lib.cuDeviceGetCount(C.byref(n)), "count")
        assert n.value == 2, n.value
        for dev, size in ((0, 8), (1, 16)):
            ok(lib.cuDeviceTotalMem_v2(C.byref(t), dev), "total")
            assert t.value == size * MiB, (dev, t.value)
        use(1)
        assert meminfo() == (16 * MiB, 16 * MiB)
        rc, d1a = alloc(MiB); ok(rc, "alloc 1a")
        rc, d1b = alloc(MiB); ok(rc, "alloc 1b")
        write(d1b, pattern(MiB, 11))
        use(0)
        rc, h = create(2 * MiB, dev=0); ok(rc, "create on 0")
        va = vmap(h, 2 * MiB)
        write(va, pattern(2 * MiB, 22))
        assert meminfo() == (6 * MiB, 8 * MiB), meminfo()
    """, {"FAKECUDA_BACKING": f"{a}:{b}"})
    da, db = a.read_bytes(), b.read_bytes()
    assert da[:2 * MiB] == pattern(2 * MiB, 22)
    assert da[2 * MiB:] == bytes(6 * MiB)
    assert db[:MiB] == bytes(MiB)
    assert db[MiB:2 * MiB] == pattern(MiB, 11)
    assert db[2 * MiB:] == bytes(14 * MiB)
    # FAKECUDA_DEVICES overrides the number of paths; one path alone is one device, as before.
    run_child(fakecuda, """
        n = C.c_int()
        ok(lib.cuDeviceGetCount(C.byref(n)), "count")
        assert n.value == 1, n.value
    """, {"FAKECUDA_BACKING": f"{a}:{b}", "FAKECUDA_DEVICES": 1})
    run_child(fakecuda, """
        n, t = C.c_int(), C.c_size_t()
        ok(lib.cuDeviceGetCount(C.byref(n)), "count")
        ok(lib.cuDeviceTotalMem_v2(C.byref(t), 0), "total")
        assert (n.value, t.value) == (1, 8 * MiB)
    """, {"FAKECUDA_BACKING": str(a)})
    # A PCI BAR's sysfs path is full of ':': a value that names an existing file is that one path.
    (tmp_path / "0000:00:03.0").mkdir()
    bar = backing(tmp_path / "0000:00:03.0", "resource2_wc", 4 * MiB)
    run_child(fakecuda, """
        n, t = C.c_int(), C.c_size_t()
        ok(lib.cuDeviceGetCount(C.byref(n)), "count")
        ok(lib.cuDeviceTotalMem_v2(C.byref(t), 0), "total")
        assert (n.value, t.value) == (1, 4 * MiB)
    """, {"FAKECUDA_BACKING": str(bar)})


def test_free_middle_block(fakecuda, tmp_path):
    """First fit with coalescing: a freed middle block is handed out again, and merges with its neighbours."""
    a = backing(tmp_path, "bar0", 8 * MiB)
    run_child(fakecuda, """
        use(0)
        hs = []
        for i in range(3):
            rc, h = create(2 * MiB); ok(rc, "create %d" % i)
            hs.append(h)
        assert meminfo()[0] == 2 * MiB
        ok(lib.cuMemRelease(hs[1]), "release the middle one")
        assert meminfo()[0] == 4 * MiB
        assert create(4 * MiB)[0] == 2, "4 MiB free, but in two 2 MiB pieces"
        rc, d = create(2 * MiB); ok(rc, "re-create")
        va = vmap(d, 2 * MiB)
        write(va, pattern(2 * MiB, 33))            # must land at offset 2 MiB
        unmap(va, 2 * MiB)
        ok(lib.cuMemRelease(d), "release again")
        ok(lib.cuMemRelease(hs[2]), "release the last one")   # [2, 8) MiB coalesced
        rc, big = create(6 * MiB); ok(rc, "6 MiB in one piece after coalescing")
        assert meminfo()[0] == 0
        ok(lib.cuMemRelease(big), "release big")
        # cuMemAlloc_v2 uses the same allocator (page granularity).
        rc, p0 = alloc(MiB); ok(rc, "alloc p0")
        rc, p1 = alloc(MiB); ok(rc, "alloc p1")
        rc, p2 = alloc(MiB); ok(rc, "alloc p2")
        ok(lib.cuMemFree_v2(p1), "free the middle one")
        rc, p3 = alloc(MiB); ok(rc, "alloc again")
        assert p3 == p1, (hex(p1), hex(p3))
    """, {"FAKECUDA_BACKING": str(a)})
    assert a.read_bytes()[2 * MiB:4 * MiB] == pattern(2 * MiB, 33)


def test_export_imports_the_block_elsewhere(fakecuda, tmp_path):
    """An exported fd stands for its block: another process (same FAKECUDA_BACKING) maps block B's
    bytes, not block A's, whether the fd came by inheritance or by SCM_RIGHTS."""
    a = backing(tmp_path, "bar0", 16 * MiB)
    env = {"FAKECUDA_BACKING": str(a)}
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # The creator is a child (the fake reads its environment at cuInit); it starts the importer.
    importer = tmp_path / "importer.py"
    importer.write_text(PRELUDE.format(fakedir=str(FAKEDIR), lib=fakecuda) + textwrap.dedent("""
        fb, sockfd = int(sys.argv[1]), int(sys.argv[2])
        _, fds, _, _ = socket.recv_fds(socket.socket(fileno=sockfd), 16, 1)
        fa = fds[0]
        use(0)
        hb, ha = import_fd(fb), import_fd(fa)      # several blocks of one device in one process
        vb, va = vmap(hb, 4 * MiB), vmap(ha, 2 * MiB)
        assert read(vb, 4 * MiB) == pattern(4 * MiB, 2), "block B, through the inherited fd"
        assert read(va, 2 * MiB) == pattern(2 * MiB, 1), "block A, through the fd sent by SCM_RIGHTS"
        write(vb, pattern(MiB, 99))
        # This process's allocator keeps off the blocks it imported while they are mapped.
        rc, h = create(2 * MiB); ok(rc, "create in the importer")
        v = vmap(h, 2 * MiB)
        write(v, pattern(2 * MiB, 44))
        assert read(vb, 4 * MiB)[MiB:] == pattern(4 * MiB, 2)[MiB:], "new block overlapped imported B"
        assert read(va, 2 * MiB) == pattern(2 * MiB, 1), "new block overlapped imported A"
        print("importer ok")
    """))
    out = run_child(fakecuda, f"""
        import subprocess
        use(0)
        rc, ha = create(2 * MiB); ok(rc, "create A")
        rc, hb = create(4 * MiB); ok(rc, "create B")
        va, vb = vmap(ha, 2 * MiB), vmap(hb, 4 * MiB)
        write(va, pattern(2 * MiB, 1))
        write(vb, pattern(4 * MiB, 2))
        fa, fb = export(ha), export(hb)
        assert os.lseek(fa, 0, os.SEEK_CUR) == 0
        assert os.lseek(fb, 0, os.SEEK_CUR) == 2 * MiB
        assert os.fstat(fb).st_size == 16 * MiB      # a file description of the backing file
        sock = socket.socket(fileno={parent.fileno()})
        p = subprocess.Popen([sys.executable, {str(importer)!r}, str(fb), "{child.fileno()}"],
                             pass_fds=(fb, {child.fileno()}))
        socket.send_fds(sock, [b"A"], [fa])
        assert p.wait(30) == 0, "importer failed"
        assert read(vb, MiB) == pattern(MiB, 99), "the importer's write into B"
        assert read(vb, 4 * MiB)[MiB:] == pattern(4 * MiB, 2)[MiB:]
        assert read(va, 2 * MiB) == pattern(2 * MiB, 1)
        assert os.lseek(fb, 0, os.SEEK_CUR) == 2 * MiB, "the import left the shared position alone"
        print("creator ok")
    """, env, pass_fds=(parent.fileno(), child.fileno()))
    parent.close()
    child.close()
    assert "importer ok" in out and "creator ok" in out, out
    data = a.read_bytes()
    assert data[2 * MiB:3 * MiB] == pattern(MiB, 99)
    assert data[6 * MiB:8 * MiB] == pattern(2 * MiB, 44)      # the importer's own block: first free after B


def test_other_usage(fakecuda, tmp_path):
    """FAKECUDA_OTHER_USAGE, re-read at every call, takes memory away from one device."""
    usage = tmp_path / "other"
    run_child(fakecuda, f"""
        path = {str(usage)!r}
        use(0)
        assert meminfo() == (1024 * MiB, 1024 * MiB), "no file: nobody else"
        with open(path, "w") as f:
            f.write("300\\n")
        assert meminfo() == (724 * MiB, 1024 * MiB)
        assert alloc(800 * MiB)[0] == 2, "does not fit beside the other process"
        rc, d = alloc(700 * MiB); ok(rc, "fits")
        assert meminfo()[0] == 24 * MiB
        assert create(100 * MiB)[0] == 2, "cuMemCreate sees it too"
        os.unlink(path)
        rc, h = create(100 * MiB); ok(rc, "pressure gone")
        use(1)
        with open(path, "w") as f:
            f.write("0\\n500\\n")
        assert meminfo() == (524 * MiB, 1024 * MiB), "line 2 is device 1"
        use(0)
        assert meminfo()[0] == 224 * MiB, "device 0 unaffected by line 2"
        with open(path, "w") as f:
            f.write("2000\\n")
        assert meminfo()[0] == 0, "never below 0"
    """, {"FAKECUDA_TOTAL_MB": 1024, "FAKECUDA_DEVICES": 2, "FAKECUDA_OTHER_USAGE": usage})


def test_lost_devices(fakecuda, tmp_path):
    """FAKECUDA_LOST_DEVICES fails device 1 only; device 0 serves on."""
    lost = tmp_path / "lost"
    run_child(fakecuda, f"""
        path = {str(lost)!r}
        use(0)
        rc, d0 = alloc(MiB); ok(rc, "alloc 0")
        use(1)
        rc, d1 = alloc(MiB); ok(rc, "alloc 1")
        use(0)
        buf = C.create_string_buffer(4096)
        ok(lib.cuMemcpyHtoD_v2(d1, buf, 4096), "device 1 fine before")
        with open(path, "w") as f:
            f.write("1\\n")
        time.sleep(0.12)                           # re-read at most every 50 ms
        ok(lib.cuMemcpyHtoD_v2(d0, buf, 4096), "device 0 copy")
        ok(lib.cuMemsetD8_v2(d0, 0, 4096), "device 0 memset")
        assert lib.cuMemcpyHtoD_v2(d1, buf, 4096) == 46, "copy into lost device 1"
        assert lib.cuMemcpyDtoH_v2(buf, d1, 4096) == 46, "copy from lost device 1"
        assert lib.cuMemsetD8_v2(d1, 0, 4096) == 46, "memset on lost device 1"
        assert create(2 * MiB, dev=1)[0] == 46, "cuMemCreate on lost device 1"
        ok(lib.cuCtxSetCurrent(CTX[1]), "set current 1")
        f, t = C.c_size_t(), C.c_size_t()
        assert lib.cuMemGetInfo_v2(C.byref(f), C.byref(t)) == 46, "call in device 1's context"
        assert lib.cuMemFree_v2(d1) == 46, "cleanup reports the loss"
        use(0)
        ok(lib.cuMemcpyDtoH_v2(buf, d0, 4096), "device 0 still fine")
        with open(path, "w") as f:
            f.write(" 0\\t1 ")
        time.sleep(0.12)
        assert lib.cuMemcpyDtoH_v2(buf, d0, 4096) == 46, "both lost"
        os.unlink(path)
        time.sleep(0.12)
        ok(lib.cuMemcpyDtoH_v2(buf, d0, 4096), "missing file: none lost")
    """, {"FAKECUDA_DEVICES": 2, "FAKECUDA_LOST_DEVICES": lost})


def test_uuid_and_bus_id_per_index(fakecuda):
    """Distinct and stable per index: the fake NVML reports the same ones."""
    out = run_child(fakecuda, """
        for dev in range(4):
            u, bus = smoke.CUuuid(), C.create_string_buffer(32)
            ok(lib.cuDeviceGetUuid_v2(C.byref(u), dev), "uuid")
            ok(lib.cuDeviceGetPCIBusId(bus, 32, dev), "bus id")
            print(bytes(u.bytes).hex(), bus.value.decode())
    """, {"FAKECUDA_DEVICES": 4})
    lines = out.split("\n")[:4]
    assert lines == [f"facec0da000040000000000000000{i + 1:03x} 0000:{i + 1:02x}:00.0" for i in range(4)]
