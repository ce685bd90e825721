#!/usr/bin/env python3
"""Standalone smoke test of the fake libcuda.so.1 (stdlib ctypes only).

    python3 tests/fakecuda/smoke.py path/to/libcuda.so.1

Builds nothing.  Fault knobs are exercised in child processes (they are read
once, at the first cuInit).  Prints "fakecuda smoke: N checks passed"; exits
non-zero on any failure.
"""
import ctypes as C
import os
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20

# --- ABI, as the nbd-vram binding must declare it ------------------------------
CUdeviceptr = C.c_uint64          # CUdeviceptr_v2: unsigned long long
CUhandle = C.c_uint64             # CUmemGenericAllocationHandle: unsigned long long


class CUuuid(C.Structure):
    # c_ubyte, not c_char: a c_char array reads back truncated at the first NUL.
    _fields_ = [("bytes", C.c_ubyte * 16)]


class CUmemLocation(C.Structure):
    _fields_ = [("type", C.c_int), ("id", C.c_int)]


class CUmemAllocFlags(C.Structure):
    _fields_ = [("compressionType", C.c_ubyte), ("gpuDirectRDMACapable", C.c_ubyte),
                ("usage", C.c_ushort), ("reserved", C.c_ubyte * 4)]


class CUmemAllocationProp(C.Structure):        # 32 bytes
    _fields_ = [("type", C.c_int), ("requestedHandleTypes", C.c_int),
                ("location", CUmemLocation), ("win32HandleMetaData", C.c_void_p),
                ("allocFlags", CUmemAllocFlags)]


class CUmemAccessDesc(C.Structure):            # 12 bytes
    _fields_ = [("location", CUmemLocation), ("flags", C.c_int)]


P = C.POINTER
SIGS = {
    "cuInit": [C.c_uint],
    "cuDriverGetVersion": [P(C.c_int)],
    "cuDeviceGetCount": [P(C.c_int)],
    "cuDeviceGet": [P(C.c_int), C.c_int],
    "cuDeviceGetName": [C.c_char_p, C.c_int, C.c_int],
    "cuDeviceGetUuid_v2": [P(CUuuid), C.c_int],
    "cuDeviceGetPCIBusId": [C.c_char_p, C.c_int, C.c_int],
    "cuDeviceGetByPCIBusId": [P(C.c_int), C.c_char_p],
    "cuDeviceTotalMem_v2": [P(C.c_size_t), C.c_int],
    "cuDeviceGetAttribute": [P(C.c_int), C.c_int, C.c_int],
    "cuDevicePrimaryCtxRetain": [P(C.c_void_p), C.c_int],
    "cuDevicePrimaryCtxRelease_v2": [C.c_int],
    "cuDevicePrimaryCtxReset_v2": [C.c_int],
    "cuCtxSetCurrent": [C.c_void_p],
    "cuCtxGetCurrent": [P(C.c_void_p)],
    "cuCtxSynchronize": [],
    "cuMemGetInfo_v2": [P(C.c_size_t), P(C.c_size_t)],
    "cuMemAlloc_v2": [P(CUdeviceptr), C.c_size_t],
    "cuMemFree_v2": [CUdeviceptr],
    "cuMemAllocHost_v2": [P(C.c_void_p), C.c_size_t],
    "cuMemFreeHost": [C.c_void_p],
    "cuMemHostRegister_v2": [C.c_void_p, C.c_size_t, C.c_uint],
    "cuMemHostUnregister": [C.c_void_p],
    "cuMemcpyHtoDAsync_v2": [CUdeviceptr, C.c_void_p, C.c_size_t, C.c_void_p],
    "cuMemcpyDtoHAsync_v2": [C.c_void_p, CUdeviceptr, C.c_size_t, C.c_void_p],
    "cuMemcpyHtoD_v2": [CUdeviceptr, C.c_void_p, C.c_size_t],
    "cuMemcpyDtoH_v2": [C.c_void_p, CUdeviceptr, C.c_size_t],
    "cuMemcpyDtoD_v2": [CUdeviceptr, CUdeviceptr, C.c_size_t],
    "cuMemsetD8_v2": [CUdeviceptr, C.c_ubyte, C.c_size_t],
    "cuMemsetD8Async": [CUdeviceptr, C.c_ubyte, C.c_size_t, C.c_void_p],
    "cuStreamCreate": [P(C.c_void_p), C.c_uint],
    "cuStreamDestroy_v2": [C.c_void_p],
    "cuStreamSynchronize": [C.c_void_p],
    "cuGetErrorName": [C.c_int, P(C.c_char_p)],
    "cuGetErrorString": [C.c_int, P(C.c_char_p)],
    "cuMemGetAllocationGranularity": [P(C.c_size_t), P(CUmemAllocationProp), C.c_int],
    "cuMemCreate": [P(CUhandle), C.c_size_t, P(CUmemAllocationProp), C.c_ulonglong],
    "cuMemRelease": [CUhandle],
    "cuMemAddressReserve": [P(CUdeviceptr), C.c_size_t, C.c_size_t, CUdeviceptr, C.c_ulonglong],
    "cuMemAddressFree": [CUdeviceptr, C.c_size_t],
    "cuMemMap": [CUdeviceptr, C.c_size_t, C.c_size_t, CUhandle, C.c_ulonglong],
    "cuMemUnmap": [CUdeviceptr, C.c_size_t],
    "cuMemSetAccess": [CUdeviceptr, C.c_size_t, P(CUmemAccessDesc), C.c_size_t],
    "cuMemExportToShareableHandle": [C.c_void_p, CUhandle, C.c_int, C.c_ulonglong],
    # osHandle is the fd VALUE passed as a pointer: c_void_p(fd), not byref(c_int(fd)).
    "cuMemImportFromShareableHandle": [P(CUhandle), C.c_void_p, C.c_int],
}


def load(path):
    lib = C.CDLL(os.path.abspath(path))
    for name, argtypes in SIGS.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = C.c_int, argtypes
    return lib


# --- checks --------------------------------------------------------------------
checks, failures = 0, []


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


def eq(got, want, what):
    check(got == want, "%s: got %r, want %r" % (what, got, want))


def g(lib, ctype, name):
    return ctype.in_dll(lib, name).value


def pattern(n, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def setup(lib):
    """cuInit, device 0, primary context made current; returns the context."""
    eq(lib.cuInit(0), 0, "cuInit")
    ctx = C.c_void_p()
    eq(lib.cuDevicePrimaryCtxRetain(C.byref(ctx), 0), 0, "ctx retain")
    eq(lib.cuCtxSetCurrent(ctx), 0, "ctx set current")
    return ctx


def alloc(lib, n):
    d = CUdeviceptr()
    rc = lib.cuMemAlloc_v2(C.byref(d), n)
    return rc, d.value


def vmm_prop(handle_types=1, dev=0):
    prop = CUmemAllocationProp()
    prop.type, prop.requestedHandleTypes = 1, handle_types      # PINNED, POSIX fd
    prop.location.type, prop.location.id = 1, dev               # DEVICE
    return prop


def vmm_map(lib, handle, size):
    """Reserve + map + set RW access; returns the VA."""
    va = CUdeviceptr()
    eq(lib.cuMemAddressReserve(C.byref(va), size, 0, 0, 0), 0, "reserve")
    eq(lib.cuMemMap(va.value, size, 0, handle, 0), 0, "map")
    acc = CUmemAccessDesc()
    acc.location.type, acc.location.id, acc.flags = 1, 0, 3
    eq(lib.cuMemSetAccess(va.value, size, C.byref(acc), 1), 0, "set access")
    return va.value


def read_dev(lib, dptr, n):
    buf = C.create_string_buffer(n)
    eq(lib.cuMemcpyDtoH_v2(buf, dptr, n), 0, "DtoH %d bytes" % n)
    return buf.raw


# --- child-process scenarios (run via python -c, see run_child) -----------------
def child(lib_path, name, *args):
    lib = load(lib_path)
    if name == "import":                        # fd, size, seed
        fd, size, seed = map(int, args)
        setup(lib)
        h = CUhandle()
        eq(lib.cuMemImportFromShareableHandle(C.byref(h), C.c_void_p(fd), 1), 0, "import")
        va = vmm_map(lib, h.value, size)
        eq(read_dev(lib, va, size), pattern(size, seed), "pattern seen through imported fd")
        eq(lib.cuMemUnmap(va, size), 0, "child unmap")
        eq(lib.cuMemRelease(h.value), 0, "child release")
    elif name == "no_device":
        eq(lib.cuInit(0), 100, "FAKECUDA_NO_DEVICE cuInit")
        eq(lib.cuDeviceGetCount(C.byref(C.c_int())), 3, "calls after failed init")
    elif name == "init_fails":
        eq([lib.cuInit(0) for _ in range(4)], [999, 999, 0, 0], "FAKECUDA_INIT_FAILS=2")
    elif name == "alloc_above":                 # FAKECUDA_FAIL_ALLOC_ABOVE=2 MiB
        setup(lib)
        eq(alloc(lib, 2 * MiB + 1)[0], 2, "alloc above limit")
        eq(alloc(lib, 2 * MiB)[0], 0, "alloc at limit")
        h = CUhandle()
        eq(lib.cuMemCreate(C.byref(h), 4 * MiB, C.byref(vmm_prop()), 0), 2, "cuMemCreate above limit")
        eq(lib.cuMemCreate(C.byref(h), 2 * MiB, C.byref(vmm_prop()), 0), 0, "cuMemCreate at limit")
    elif name in ("copy_n", "copy_every"):      # FAIL_COPY_N=3 / FAIL_COPY_EVERY=2
        setup(lib)
        d = alloc(lib, MiB)[1]
        buf, s = C.create_string_buffer(4096), C.c_void_p()
        eq(lib.cuStreamCreate(C.byref(s), 0), 0, "stream")
        rcs = [lib.cuMemcpyHtoD_v2(d, buf, 4096), lib.cuMemcpyDtoH_v2(buf, d, 4096),
               lib.cuMemcpyHtoDAsync_v2(d, buf, 4096, s), lib.cuMemcpyDtoHAsync_v2(buf, d, 4096, s),
               lib.cuMemcpyDtoD_v2(d + 4096, d, 4096)]
        want = [0, 0, 700, 0, 0] if name == "copy_n" else [0, 700, 0, 700, 0]
        eq(rcs, want, name)
        eq(lib.cuStreamSynchronize(s), 700, "sync after failed async copy")
        eq(lib.cuStreamSynchronize(s), 0, "latched error is reported once")
        eq(g(lib, C.c_long, "fake_copy_count"), 5 - want.count(700), "fake_copy_count")
    elif name == "lost":                        # FAKECUDA_LOST_AFTER_COPIES=2
        setup(lib)
        d, buf = alloc(lib, MiB)[1], C.create_string_buffer(16)
        eq([lib.cuMemcpyHtoD_v2(d, buf, 16) for _ in range(3)], [0, 0, 46], "copies until lost")
        eq(g(lib, C.c_int, "fake_device_lost"), 1, "fake_device_lost set")
        eq(lib.cuMemsetD8_v2(d, 0, 16), 46, "memset after loss")
        eq(lib.cuStreamSynchronize(None), 46, "sync after loss")
        eq(alloc(lib, MiB)[0], 46, "alloc after loss")
        eq(lib.cuMemFree_v2(d), 46, "free after loss (resources still freed)")
        eq(g(lib, C.c_long, "fake_alloc_bytes"), 0, "free released memory anyway")
    elif name == "no_vmm":
        setup(lib)
        v = C.c_int(-1)
        for attr in (102, 103):
            eq((lib.cuDeviceGetAttribute(C.byref(v), attr, 0), v.value), (0, 0), "attr %d" % attr)
        gran, h = C.c_size_t(), CUhandle()
        eq(lib.cuMemGetAllocationGranularity(C.byref(gran), C.byref(vmm_prop()), 0), 801, "granularity")
        eq(lib.cuMemCreate(C.byref(h), 2 * MiB, C.byref(vmm_prop()), 0), 801, "cuMemCreate")
    elif name == "total_mb":                    # FAKECUDA_TOTAL_MB=128
        setup(lib)
        eq(alloc(lib, 256 * MiB)[0], 2, "alloc over total")
        eq(alloc(lib, 100 * MiB)[0], 0, "alloc under total")
        free, total = C.c_size_t(), C.c_size_t()
        eq(lib.cuMemGetInfo_v2(C.byref(free), C.byref(total)), 0, "meminfo")
        eq((free.value, total.value), (28 * MiB, 128 * MiB), "free/total")
        eq(alloc(lib, 29 * MiB)[0], 2, "alloc over free")
    elif name == "devices":                     # FAKECUDA_DEVICES=3
        eq(lib.cuInit(0), 0, "init")
        n, d, v = C.c_int(), C.c_int(), C.c_int()
        eq((lib.cuDeviceGetCount(C.byref(n)), n.value), (0, 3), "device count")
        bus = C.create_string_buffer(32)
        eq((lib.cuDeviceGetPCIBusId(bus, 32, 2), bus.value), (0, b"0000:03:00.0"), "bus id of dev 2")
        for s in (b"0000:03:00.0", b"03:00.0", b"00000000:03:00.0"):
            eq((lib.cuDeviceGetByPCIBusId(C.byref(d), s), d.value), (0, 2), "by bus id %r" % s)
        eq(lib.cuDeviceGetByPCIBusId(C.byref(d), b"0000:04:00.0"), 101, "unknown bus id")
        eq((lib.cuDeviceGetAttribute(C.byref(v), 33, 1), v.value), (0, 2), "PCI_BUS_ID of dev 1")
        uu = set()
        for i in range(3):
            u = CUuuid()
            eq(lib.cuDeviceGetUuid_v2(C.byref(u), i), 0, "uuid")
            uu.add(bytes(u.bytes))
        eq(len(uu), 3, "distinct UUIDs")
    elif name == "backing":                     # FAKECUDA_BACKING=file of 64 MiB
        path = args[0]
        setup(lib)
        t = C.c_size_t()
        eq((lib.cuDeviceTotalMem_v2(C.byref(t), 0), t.value), (0, 64 * MiB), "total = backing size")
        rc, d = alloc(lib, MiB)
        eq(rc, 0, "alloc from backing")
        eq(lib.cuMemcpyHtoD_v2(d, pattern(MiB, 5), MiB), 0, "HtoD into backing")
        h = CUhandle()
        eq(lib.cuMemCreate(C.byref(h), 2 * MiB, C.byref(vmm_prop()), 0), 0, "cuMemCreate from backing")
        va = vmm_map(lib, h.value, 2 * MiB)
        eq(lib.cuMemcpyHtoD_v2(va, pattern(2 * MiB, 9), 2 * MiB), 0, "HtoD into VMM block")
        fd = C.c_int(-1)
        eq(lib.cuMemExportToShareableHandle(C.byref(fd), h.value, 1, 0), 0, "export backing")
        eq(os.fstat(fd.value).st_size, 64 * MiB, "exported fd is the backing file")
        with open(path, "rb") as f:
            data = f.read()
        eq(data[:MiB], pattern(MiB, 5), "cuMemAlloc block at offset 0 of the file")
        eq(data[2 * MiB:4 * MiB], pattern(2 * MiB, 9), "cuMemCreate block at next 2 MiB")
        eq(alloc(lib, 61 * MiB)[0], 2, "61 MiB free but not in one piece")
    elif name == "log":                         # FAKECUDA_LOG=path
        setup(lib)
        alloc(lib, MiB)
        with open(args[0]) as f:
            lines = f.read().split()
        eq(lines[:4], ["cuInit", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuMemAlloc_v2"], "log")
    else:
        check(False, "unknown child scenario " + name)
    print("CHILD %s %d %d" % (name, checks, len(failures)))
    return 1 if failures else 0


def run_child(lib_path, name, env=None, args=(), pass_fds=()):
    code = ("import sys; sys.path.insert(0, %r); import smoke; sys.exit(smoke.child(*sys.argv[1:]))" % HERE)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKECUDA_")}
    full_env.update(env or {})
    p = subprocess.run([sys.executable, "-c", code, lib_path, name] + [str(a) for a in args],
                       env=full_env, pass_fds=pass_fds, capture_output=True, text=True)
    sys.stderr.write(p.stderr)
    words = (p.stdout.split() or ["", "", "0"])
    global checks
    checks += int(words[2]) if len(words) >= 3 and words[2].isdigit() else 0
    check(p.returncode == 0, "child %s exited %d: %s" % (name, p.returncode, p.stdout.strip()))


# --- main-process checks --------------------------------------------------------
def main(lib_path):
    lib = load(lib_path)
    n, v, d = C.c_int(), C.c_int(), C.c_int()
    s = C.c_char_p()

    eq((C.sizeof(CUmemAllocationProp), C.sizeof(CUmemAccessDesc), C.sizeof(CUuuid)), (32, 12, 16), "struct sizes")

    # Before cuInit.
    eq(lib.cuDeviceGetCount(C.byref(n)), 3, "before cuInit: NOT_INITIALIZED")
    eq((lib.cuDriverGetVersion(C.byref(v)), v.value > 0), (0, True), "driver version before init")
    eq(lib.cuInit(1), 1, "cuInit flags must be 0")
    eq(lib.cuInit(0), 0, "cuInit")

    # Devices.
    eq((lib.cuDeviceGetCount(C.byref(n)), n.value), (0, 1), "device count")
    eq((lib.cuDeviceGet(C.byref(d), 0), d.value), (0, 0), "cuDeviceGet")
    eq(lib.cuDeviceGet(C.byref(d), 1), 101, "cuDeviceGet out of range")
    eq(lib.cuDeviceGet(None, 0), 1, "NULL out-pointer")
    name = C.create_string_buffer(64)
    eq((lib.cuDeviceGetName(name, 64, 0), name.value), (0, b"Fake CUDA Device 0"), "name")
    u1, u2 = CUuuid(), CUuuid()
    lib.cuDeviceGetUuid_v2(C.byref(u1), 0)
    lib.cuDeviceGetUuid_v2(C.byref(u2), 0)
    check(bytes(u1.bytes) == bytes(u2.bytes) and any(bytes(u1.bytes)), "stable non-zero UUID")
    bus = C.create_string_buffer(32)
    eq((lib.cuDeviceGetPCIBusId(bus, 32, 0), bus.value), (0, b"0000:01:00.0"), "bus id")
    for sid in (b"0000:01:00.0", b"01:00.0", b"0000:01:00.0".upper(), b"00000000:01:00.0", b"1:0.0"):
        eq((lib.cuDeviceGetByPCIBusId(C.byref(d), sid), d.value), (0, 0), "by bus id %r" % sid)
    eq(lib.cuDeviceGetByPCIBusId(C.byref(d), b"garbage"), 1, "bad bus id")
    for attr, want in ((33, 1), (34, 0), (50, 0), (102, 1), (103, 1), (1, 0)):
        eq((lib.cuDeviceGetAttribute(C.byref(v), attr, 0), v.value), (0, want), "attr %d" % attr)
    eq(lib.cuDeviceGetAttribute(C.byref(v), 100000, 0), 1, "attr out of enum range")
    total = C.c_size_t()
    eq((lib.cuDeviceTotalMem_v2(C.byref(total), 0), total.value), (0, 8192 * MiB), "total mem")

    # Contexts.
    dptr = CUdeviceptr()
    eq(lib.cuMemAlloc_v2(C.byref(dptr), MiB), 201, "alloc without context")
    cur = C.c_void_p(1)
    eq((lib.cuCtxGetCurrent(C.byref(cur)), cur.value), (0, None), "no current context")
    ctx = setup(lib)
    check(ctx.value is not None, "primary context non-null")
    eq((lib.cuCtxGetCurrent(C.byref(cur)), cur.value), (0, ctx.value), "current context")
    other = []
    th = threading.Thread(target=lambda: other.append(alloc(lib, MiB)[0]))
    th.start(); th.join()
    eq(other, [201], "current context is per thread")

    # Classic allocation, copies, memset.
    size = 64 * MiB
    rc, d0 = alloc(lib, size)
    eq(rc, 0, "cuMemAlloc_v2 64 MiB")
    eq(g(lib, C.c_long, "fake_alloc_bytes"), size, "fake_alloc_bytes")
    free = C.c_size_t()
    eq((lib.cuMemGetInfo_v2(C.byref(free), C.byref(total)), total.value - free.value), (0, size), "meminfo")
    pat = pattern(MiB, 1)
    eq(lib.cuMemcpyHtoD_v2(d0 + 4096, pat, MiB), 0, "HtoD")
    eq(read_dev(lib, d0 + 4096, MiB), pat, "HtoD/DtoH round trip")
    eq(lib.cuMemcpyDtoD_v2(d0 + 32 * MiB, d0 + 4096, MiB), 0, "DtoD")
    eq(read_dev(lib, d0 + 32 * MiB, MiB), pat, "DtoD result")
    buf = C.create_string_buffer(64)
    eq(lib.cuMemcpyHtoD_v2(d0 + size - 10, buf, 20), 1, "HtoD past the end")
    eq(lib.cuMemcpyDtoH_v2(buf, d0 - 1, 20), 1, "DtoH before the start")
    eq(lib.cuMemcpyDtoH_v2(buf, 12345, 20), 1, "DtoH from a wild pointer")
    eq(lib.cuMemsetD8_v2(d0, 0xAB, 4096), 0, "memset")
    eq(read_dev(lib, d0, 4096), b"\xab" * 4096, "memset result")
    eq(lib.cuMemsetD8_v2(d0 + size - 1, 0, 2), 1, "memset past the end")
    eq(g(lib, C.c_long, "fake_memset_count"), 1, "fake_memset_count")
    eq(g(lib, C.c_long, "fake_copy_count"), 5, "fake_copy_count")

    # Streams and async copies.
    s1, s2 = C.c_void_p(), C.c_void_p()
    eq(lib.cuStreamCreate(C.byref(s1), 0) + lib.cuStreamCreate(C.byref(s2), 1), 0, "stream create")
    check(s1.value and s2.value and s1.value != s2.value, "streams are distinct non-null handles")
    hb = C.c_void_p()
    eq(lib.cuMemAllocHost_v2(C.byref(hb), MiB), 0, "cuMemAllocHost_v2")
    check(hb.value and hb.value % 4096 == 0, "pinned host memory is page aligned")
    C.memmove(hb, pattern(MiB, 3), MiB)
    eq(lib.cuMemcpyHtoDAsync_v2(d0, hb, MiB, s1), 0, "HtoDAsync")
    eq(lib.cuMemsetD8Async(d0 + MiB, 0x5A, MiB, s2), 0, "memset async")
    eq(lib.cuMemcpyDtoHAsync_v2(hb, d0 + MiB, MiB, s1), 0, "DtoHAsync")
    eq(lib.cuStreamSynchronize(s1) + lib.cuStreamSynchronize(s2), 0, "stream sync")
    eq(C.string_at(hb, MiB), b"\x5a" * MiB, "async results")
    eq(read_dev(lib, d0, MiB), pattern(MiB, 3), "async HtoD result")
    eq(lib.cuMemcpyHtoDAsync_v2(d0, hb, 16, C.c_void_p(0xdead0)), 400, "bogus stream")
    eq(lib.cuStreamSynchronize(None) + lib.cuCtxSynchronize(), 0, "default stream / ctx sync")
    eq(lib.cuStreamDestroy_v2(s2), 0, "stream destroy")
    eq(lib.cuStreamDestroy_v2(s2), 400, "double stream destroy")
    eq(lib.cuMemFreeHost(hb), 0, "cuMemFreeHost")
    eq(lib.cuMemFreeHost(hb), 1, "double cuMemFreeHost")
    reg = C.create_string_buffer(8192)
    eq(lib.cuMemHostRegister_v2(reg, 8192, 0), 0, "host register")
    eq(lib.cuMemHostRegister_v2(reg, 8192, 0), 712, "host register twice")
    eq(lib.cuMemHostUnregister(reg), 0, "host unregister")
    eq(lib.cuMemHostUnregister(reg), 713, "host unregister twice")

    # Runtime fault switches.
    C.c_int.in_dll(lib, "fake_fail_copy_n").value = g(lib, C.c_long, "fake_copy_attempts") + 1
    eq([lib.cuMemcpyDtoH_v2(buf, d0, 64), lib.cuMemcpyDtoH_v2(buf, d0, 64)], [700, 0], "fake_fail_copy_n")
    C.c_int.in_dll(lib, "fake_fail_copy_n").value = 0
    C.c_int.in_dll(lib, "fake_device_lost").value = 1
    eq([lib.cuMemcpyDtoH_v2(buf, d0, 64), alloc(lib, MiB)[0]], [46, 46], "fake_device_lost=1")
    C.c_int.in_dll(lib, "fake_device_lost").value = 0

    # VMM.
    gran = C.c_size_t()
    for opt in (0, 1):
        eq((lib.cuMemGetAllocationGranularity(C.byref(gran), C.byref(vmm_prop()), opt), gran.value),
           (0, 2 * MiB), "granularity %d" % opt)
    h, h0 = CUhandle(), CUhandle()
    bad = vmm_prop(); bad.type = 0
    eq(lib.cuMemCreate(C.byref(h), 2 * MiB, C.byref(bad), 0), 1, "cuMemCreate bad prop")
    eq(lib.cuMemCreate(C.byref(h), 3 * MiB, C.byref(vmm_prop()), 0), 1, "cuMemCreate unaligned size")
    eq(lib.cuMemCreate(C.byref(h0), 2 * MiB, C.byref(vmm_prop(0)), 0), 0, "cuMemCreate, no handle type")
    fd = C.c_int(-1)
    eq(lib.cuMemExportToShareableHandle(C.byref(fd), h0.value, 1, 0), 1, "export needs handle type")
    eq(lib.cuMemRelease(h0.value), 0, "release unmapped handle")
    vsize = 4 * MiB
    eq(lib.cuMemCreate(C.byref(h), vsize, C.byref(vmm_prop()), 0), 0, "cuMemCreate 4 MiB")
    va = CUdeviceptr()
    eq(lib.cuMemAddressReserve(C.byref(va), 2 * vsize, 0, 0, 0), 0, "reserve")
    check(va.value % (2 * MiB) == 0, "reservation aligned to granularity")
    eq(lib.cuMemMap(va.value, vsize, 2 * MiB, h.value, 0), 1, "map with offset != 0")
    eq(lib.cuMemMap(va.value, vsize, 0, h.value, 0), 0, "map")
    eq(lib.cuMemMap(va.value, vsize, 0, h.value, 0), 1, "map over a mapping")
    eq(lib.cuMemcpyHtoD_v2(va.value, buf, 64), 1, "copy before cuMemSetAccess")
    acc = CUmemAccessDesc()
    acc.location.type, acc.location.id, acc.flags = 1, 0, 1
    eq(lib.cuMemSetAccess(va.value, vsize, C.byref(acc), 1), 1, "set access READ only")
    acc.flags = 3
    eq(lib.cuMemSetAccess(va.value, vsize, C.byref(acc), 1), 0, "set access RW")
    vpat = pattern(vsize, 7)
    eq(lib.cuMemcpyHtoD_v2(va.value, vpat, vsize), 0, "HtoD into VMM")
    eq(lib.cuMemcpyHtoD_v2(va.value + vsize - 8, buf, 16), 1, "HtoD past the mapping")
    eq(lib.cuMemExportToShareableHandle(C.byref(fd), h.value, 1, 0), 0, "export fd")
    eq(os.fstat(fd.value).st_size, vsize, "exported fd size")
    eq(lib.cuMemRelease(h.value), 0, "release while mapped")
    eq(read_dev(lib, va.value, vsize), vpat, "mapping outlives cuMemRelease")
    eq(lib.cuMemAddressFree(va.value, 2 * vsize), 1, "address free with live mapping")
    eq(lib.cuMemUnmap(va.value, 2 * MiB), 1, "partial unmap")
    eq(lib.cuMemUnmap(va.value, vsize), 0, "unmap")
    eq(lib.cuMemAddressFree(va.value, 2 * vsize), 0, "address free")
    eq(g(lib, C.c_long, "fake_alloc_bytes"), size, "VMM memory uncounted after release+unmap")
    # The creator has dropped everything; only the exported fd keeps the memory.
    run_child(lib_path, "import", args=(fd.value, vsize, 7), pass_fds=(fd.value,))
    os.close(fd.value)
    eq(lib.cuMemImportFromShareableHandle(C.byref(h), C.c_void_p(9999), 1), 1, "import of a closed fd")

    # Error names and strings.
    for code, nm in ((0, "CUDA_SUCCESS"), (1, "CUDA_ERROR_INVALID_VALUE"), (2, "CUDA_ERROR_OUT_OF_MEMORY"),
                     (3, "CUDA_ERROR_NOT_INITIALIZED"), (46, "CUDA_ERROR_DEVICE_UNAVAILABLE"),
                     (100, "CUDA_ERROR_NO_DEVICE"), (101, "CUDA_ERROR_INVALID_DEVICE"),
                     (201, "CUDA_ERROR_INVALID_CONTEXT"), (400, "CUDA_ERROR_INVALID_HANDLE"),
                     (700, "CUDA_ERROR_ILLEGAL_ADDRESS"), (801, "CUDA_ERROR_NOT_SUPPORTED"),
                     (999, "CUDA_ERROR_UNKNOWN")):
        eq((lib.cuGetErrorName(code, C.byref(s)), s.value), (0, nm.encode()), "name of %d" % code)
        check(lib.cuGetErrorString(code, C.byref(s)) == 0 and s.value, "string of %d" % code)
    eq((lib.cuGetErrorName(12345, C.byref(s)), s.value), (1, None), "unknown error code")

    # Teardown.
    eq(lib.cuMemFree_v2(d0), 0, "free")
    eq(lib.cuMemFree_v2(d0), 1, "double free")
    eq(g(lib, C.c_long, "fake_alloc_bytes"), 0, "everything freed")
    eq(lib.cuStreamDestroy_v2(s1), 0, "stream destroy")
    eq(lib.cuDevicePrimaryCtxRelease_v2(0), 0, "ctx release")
    eq(alloc(lib, MiB)[0], 201, "alloc after primary ctx released")

    # Fault knobs, each in a fresh process.
    run_child(lib_path, "no_device", {"FAKECUDA_NO_DEVICE": "1"})
    run_child(lib_path, "init_fails", {"FAKECUDA_INIT_FAILS": "2"})
    run_child(lib_path, "alloc_above", {"FAKECUDA_FAIL_ALLOC_ABOVE": str(2 * MiB)})
    run_child(lib_path, "copy_n", {"FAKECUDA_FAIL_COPY_N": "3"})
    run_child(lib_path, "copy_every", {"FAKECUDA_FAIL_COPY_EVERY": "2"})
    run_child(lib_path, "lost", {"FAKECUDA_LOST_AFTER_COPIES": "2"})
    run_child(lib_path, "no_vmm", {"FAKECUDA_NO_VMM": "1"})
    run_child(lib_path, "total_mb", {"FAKECUDA_TOTAL_MB": "128"})
    run_child(lib_path, "devices", {"FAKECUDA_DEVICES": "3"})
    with tempfile.TemporaryDirectory() as tmp:
        backing = os.path.join(tmp, "backing")
        with open(backing, "wb") as f:
            f.truncate(64 * MiB)
        run_child(lib_path, "backing", {"FAKECUDA_BACKING": backing}, args=(backing,))
        log = os.path.join(tmp, "log")
        run_child(lib_path, "log", {"FAKECUDA_LOG": log}, args=(log,))

    if failures:
        print("fakecuda smoke: %d of %d checks FAILED" % (len(failures), checks))
        return 1
    print("fakecuda smoke: %d checks passed" % checks)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: smoke.py path/to/libcuda.so.1")
    sys.exit(main(sys.argv[1]))
