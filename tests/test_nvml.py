"""Nvml: the optional libnvidia-ml.so.1 binding, against the fake NVML (tests/fakenvml).

The fake reads its environment at nvmlInit_v2 and its files at every call, so these
tests run it in this process, one Nvml.open() per test."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT, fake_env

MiB = 1 << 20
UUID0 = "GPU-facec0da-0000-4000-0000-000000000001"
UUID1 = "GPU-facec0da-0000-4000-0000-000000000002"
CLOCKS = [9501, 5001, 810, 405]


NVML_DEVICE_UUID_V2_BUFFER_SIZE = 96


def bind_lookups(nv, n):
    """The lookups the daemon does not use (it only asks by UUID), bound on n for the cross-check
    below: the daemon binds only what it calls, so that a missing one does not turn NVML off."""
    ct, dev = nv.ctypes, nv.nvmlDevice_t
    for name, argtypes in (("nvmlDeviceGetCount_v2", [ct.POINTER(ct.c_uint)]),
                           ("nvmlDeviceGetHandleByIndex_v2", [ct.c_uint, ct.POINTER(dev)]),
                           ("nvmlDeviceGetHandleByPciBusId_v2", [ct.c_char_p, ct.POINTER(dev)]),
                           ("nvmlDeviceGetUUID", [dev, ct.c_char_p, ct.c_uint])):
        fn = getattr(n._lib, name)
        fn.restype, fn.argtypes = nv.nvmlReturn_t, argtypes
        setattr(n, name, fn)


@pytest.fixture
def open_nvml(nv, fakenvml, monkeypatch):
    """open_nvml(**env) -> Nvml of the fake with exactly these FAKECUDA_*/FAKENVML_* variables."""
    opened = []

    def make(**env):
        for k in list(os.environ):
            if k.startswith(("FAKECUDA_", "FAKENVML_")):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, str(v))
        n = nv.Nvml.open(fakenvml)
        assert n is not None
        opened.append(n)
        return n
    yield make
    for n in opened:
        n.close()


def test_open_absent_library(nv, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="nbd-vram")
    assert nv.Nvml.open(str(tmp_path / "libnvidia-ml.so.1")) is None
    assert "NVML not used" in caplog.text
    monkeypatch.setenv("NBD_VRAM_LIBNVML", str(tmp_path / "nope.so"))
    assert nv.Nvml.open() is None


def test_open_library_without_nvml(nv, fakecuda, caplog):
    """A library that lacks the symbols (here: the fake libcuda) is as good as absent."""
    caplog.set_level(logging.DEBUG, logger="nbd-vram")
    assert nv.Nvml.open(fakecuda) is None
    assert "nvmlInit_v2" in caplog.text


def test_open_init_fails(nv, fakenvml, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="nbd-vram")
    monkeypatch.setenv("FAKENVML_NO_DRIVER", "1")
    assert nv.Nvml.open(fakenvml) is None
    assert "NVML_ERROR_DRIVER_NOT_LOADED" in caplog.text


def test_same_gpus_as_the_fake_libcuda(nv, fakecuda, fakenvml, open_nvml, tmp_path):
    """UUID, PCI bus id and total memory of each index agree with what Cuda.device_info() says."""
    bars = []
    for i, size in enumerate((64, 32)):
        bars.append(tmp_path / f"bar{i}")
        bars[-1].write_bytes(b"")
        os.truncate(bars[-1], size * MiB)
    for env in ({"FAKECUDA_DEVICES": 3, "FAKECUDA_TOTAL_MB": 1024}, {"FAKECUDA_BACKING": f"{bars[0]}:{bars[1]}"}):
        code = ("import importlib.util, json, sys\n"
                f"spec = importlib.util.spec_from_file_location('nbd_vram', {str(SCRIPT)!r})\n"
                "nv = importlib.util.module_from_spec(spec); spec.loader.exec_module(nv)\n"
                "c = nv.Cuda(); c.init(tries=1)\n"
                "print(json.dumps([c.device_info(i) for i in range(c.device_count())]))\n")
        clean = {k: v for k, v in fake_env(fakecuda, **env).items()
                 if not k.startswith(("FAKECUDA_", "FAKENVML_")) or k in env}
        p = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
        infos = json.loads(p.stdout)
        n = open_nvml(**env)
        bind_lookups(nv, n)
        count = nv.ctypes.c_uint()
        n.call("nvmlDeviceGetCount_v2", nv.ctypes.byref(count))
        assert count.value == len(infos)
        for info in infos:
            by_index, by_bus = nv.nvmlDevice_t(), nv.nvmlDevice_t()
            n.call("nvmlDeviceGetHandleByIndex_v2", info["index"], nv.ctypes.byref(by_index))
            n.call("nvmlDeviceGetHandleByPciBusId_v2", info["pci_bus_id"].encode(), nv.ctypes.byref(by_bus))
            buf = nv.ctypes.create_string_buffer(NVML_DEVICE_UUID_V2_BUFFER_SIZE)
            n.call("nvmlDeviceGetUUID", by_index, buf, len(buf))
            assert buf.value.decode() == info["uuid"]
            assert by_bus.value == by_index.value == n._device(info["uuid"]).value
            assert n.memory_info(info["uuid"]) == (info["total_bytes"], info["total_bytes"])
        n.close()


def test_memory_info_follows_other_usage(open_nvml, tmp_path):
    usage = tmp_path / "other"
    n = open_nvml(FAKECUDA_DEVICES=2, FAKECUDA_TOTAL_MB=1024, FAKECUDA_OTHER_USAGE=usage)
    assert n.memory_info(UUID1) == (1024 * MiB, 1024 * MiB)
    usage.write_text("100\n200\n")
    assert n.memory_info(UUID0) == (924 * MiB, 1024 * MiB)
    assert n.memory_info(UUID1) == (824 * MiB, 1024 * MiB)


def test_processes(open_nvml):
    """Compute and graphics lists merged by pid; unknown usage is None; a pid without /proc entry is '?'."""
    me = os.getpid()
    with open(f"/proc/{me}/comm") as f:
        comm = f.read().strip()
    gone = 4194304 + 1                         # above pid_max: never a live process
    many = ",".join(f"1:{100000 + i}:1" for i in range(40))      # more than the first buffer holds
    n = open_nvml(FAKECUDA_DEVICES=2,
                  FAKENVML_PROCESSES=f"0:{me}:100,0:{me}:100:g,0:{gone}:-:cg,{many}")
    got = sorted(n.processes(UUID0))
    assert got == sorted([(me, 100 * MiB, comm), (gone, None, "?")])
    assert sorted(p for p, _, _ in n.processes(UUID1)) == list(range(100000, 100040))
    assert open_nvml(FAKECUDA_DEVICES=2).processes(UUID0) == []


def test_memory_clock_lock_and_reset(open_nvml, tmp_path):
    state = tmp_path / "nvml-state"
    n = open_nvml(FAKECUDA_DEVICES=2, FAKENVML_STATE=state)
    assert n.supported_memory_clocks(UUID1) == CLOCKS
    assert n.memory_clock(UUID1) == (9501, 9501)
    assert n.lock_memory_clock(UUID1, 6000) == 5001
    assert state.read_text() == "1 405 5001\n"         # device 1: lowest supported .. highest <= 6000
    assert n.memory_clock(UUID1) == (5001, 9501)
    assert n.memory_clock(UUID0) == (9501, 9501)
    assert n.lock_memory_clock(UUID0, 9501) == 9501
    assert state.read_text() == "0 405 9501\n1 405 5001\n"
    n.reset_memory_clock(UUID1)
    assert state.read_text() == "0 405 9501\n"
    assert n.memory_clock(UUID1) == (9501, 9501)
    with pytest.raises(Exception) as e:
        n.lock_memory_clock(UUID0, 100)
    assert "405 MHz" in str(e.value)


@pytest.mark.parametrize("env, name, words", [
    ({"FAKENVML_CLOCKS_UNSUPPORTED": 1}, "NVML_ERROR_NOT_SUPPORTED", "cannot lock its memory clock"),
    ({"FAKENVML_NO_PERMISSION": 1}, "NVML_ERROR_NO_PERMISSION", "needs root"),
])
def test_clock_lock_errors(nv, open_nvml, tmp_path, env, name, words):
    state = tmp_path / "nvml-state"
    n = open_nvml(FAKENVML_STATE=state, **env)
    for call in (lambda: n.lock_memory_clock(UUID0, 5001), lambda: n.reset_memory_clock(UUID0)):
        with pytest.raises(nv.NvmlError) as e:
            call()
        msg = str(e.value)
        assert e.value.name == name and name in msg and words in msg
        assert "\n" not in msg
        assert e.value.func.startswith("nvmlDevice")
    assert not state.exists()
    assert n.memory_clock(UUID0) == (9501, 9501)     # reading still works


def test_unknown_and_lost_gpus(nv, open_nvml, tmp_path):
    lost = tmp_path / "lost"
    n = open_nvml(FAKECUDA_DEVICES=2, FAKECUDA_LOST_DEVICES=lost)
    with pytest.raises(nv.NvmlError) as e:
        n.memory_info("GPU-00000000-0000-0000-0000-000000000000")
    assert e.value.name == "NVML_ERROR_NOT_FOUND" and e.value.func == "nvmlDeviceGetHandleByUUID"
    assert n.memory_clock(UUID1) == (9501, 9501)      # handle cached from here on
    lost.write_text("1\n")
    with pytest.raises(nv.NvmlError) as e:
        n.processes(UUID1)
    assert e.value.name == "NVML_ERROR_GPU_IS_LOST"
    assert n.memory_info(UUID0)[1] == 8192 * MiB


def test_close(open_nvml, nv):
    n = open_nvml()
    n.close()
    n.close()                                          # idempotent
    assert n.closed


def test_fake_abi_check():
    """tests/fakenvml/abi_check.c compiles fakenvml.c against the real nvml.h (where the CUDA toolkit has one)."""
    inc = [d for d in (os.environ.get("CUDA_HOME", "") + "/include", "/usr/local/cuda/include", "/usr/include")
           if os.path.exists(os.path.join(d, "nvml.h"))]
    if not inc or not shutil.which("gcc"):
        pytest.skip("needs gcc and nvml.h (the CUDA toolkit's cuda-nvml-dev)")
    p = subprocess.run(["gcc", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I" + inc[0],
                        str(ROOT / "tests" / "fakenvml" / "abi_check.c")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
