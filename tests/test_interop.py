"""Real NBD clients nobody here wrote (libnbd's nbdinfo/nbdcopy, qemu-io, qemu-img, fio) against `serve`."""
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import ROOT
from nbdclient import Client

MiB = 1 << 20


def need(tool):
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} is not installed (apt: libnbd-bin for nbdinfo/nbdcopy, qemu-utils for qemu-io/qemu-img)")
    return path


def run(argv, timeout=120, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def sha256_file(path, length=None):
    h = hashlib.sha256()
    left = os.path.getsize(path) if length is None else length
    with open(path, "rb") as f:
        while left:
            chunk = f.read(min(left, 8 * MiB))
            assert chunk, f"{path} is shorter than {length}"
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def random_file(path, size, chunk=8 * MiB):
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
        f.write(os.urandom(size % chunk))
    return str(path)


# -- nbdinfo ----------------------------------------------------------------------------------------------

def test_nbdinfo_json(server):
    nbdinfo = need("nbdinfo")
    p = run([nbdinfo, "--json", server.uri])
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["protocol"] == "newstyle-fixed" and len(info["exports"]) == 1
    e = info["exports"][0]
    assert e["export-size"] == 256 * MiB
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (1, 4096, 32 * MiB)
    for key in ("can_multi_conn", "can_trim", "can_zero", "can_fua", "can_flush"):
        assert e[key] is True, key
    assert e["is_read_only"] is False and e["can_df"] is False and e["can_fast_zero"] is False


def test_nbdinfo_list(server):
    nbdinfo = need("nbdinfo")
    p = run([nbdinfo, "--list", "--json", server.uri])
    assert p.returncode == 0, p.stderr
    assert [e["export-name"] for e in json.loads(p.stdout)["exports"]] == [""]


# -- nbdcopy ----------------------------------------------------------------------------------------------

def test_nbdcopy_round_trip(make_server, tmp_path):
    nbdcopy = need("nbdcopy")
    srv = make_server(size="320M")
    size = 256 * MiB
    src = random_file(tmp_path / "src.raw", size)
    want = sha256_file(src)
    p = run([nbdcopy, "--flush", src, srv.uri])
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out.raw"
    p = run([nbdcopy, srv.uri, str(out)])
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(out) == 320 * MiB
    assert sha256_file(out, size) == want
    with open(out, "rb") as f:                           # the part nbdcopy did not write reads as zeroes
        f.seek(size)
        assert f.read() == bytes(64 * MiB)
    # and the export itself, read by another client, holds the same bytes
    c = Client(srv.sock)
    c.go()
    err, tail = c.read(size - 4096, 4096)
    c.disconnect()
    with open(src, "rb") as f:
        f.seek(size - 4096)
        assert err == 0 and tail == f.read()


# -- qemu-io ----------------------------------------------------------------------------------------------

def qemu_io(uri, *cmds):
    argv = [need("qemu-io"), "-f", "raw", uri]
    for c in cmds:
        argv += ["-c", c]
    return run(argv)


def test_qemu_io_patterns(server):
    size = 256 * MiB
    p = qemu_io(server.uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k",
                "write -P 0x5c 12345 100001", "read -P 0x5c 12345 100001", "read -P 0xab 0 12345",
                f"write -P 0x77 {size - 512} 512", f"read -P 0x77 {size - 512} 512",
                f"write -P 0x31 {size - 1} 1", f"read -P 0x31 {size - 1} 1",
                "write -z 4096 4096", "read -P 0 4096 4096", "read -P 0xab 8192 4096",
                "discard 32768 4096", "read -P 0 32768 4096",
                "flush", "write -f -P 0x42 1M 64k", "read -P 0x42 1M 64k",
                "read -P 0 100M 1M")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Pattern verification failed" not in p.stdout + p.stderr
    assert "failed" not in p.stdout + p.stderr, p.stdout + p.stderr


def test_qemu_io_detects_wrong_pattern(server):
    """The pattern check above can fail: a wrong expectation is reported."""
    p = qemu_io(server.uri, "write -P 0xab 0 4k", "read -P 0xac 0 4k")
    assert "Pattern verification failed" in p.stdout + p.stderr


def test_qemu_io_write_past_end_fails(server):
    size = 256 * MiB
    p = qemu_io(server.uri, f"write -P 1 {size - 512} 1024")
    assert p.returncode != 0 and "failed" in p.stdout + p.stderr, p.stdout + p.stderr
    p = qemu_io(server.uri, f"read -P 0 {size - 512} 512")          # and nothing was written
    assert p.returncode == 0 and "failed" not in p.stdout + p.stderr, p.stdout + p.stderr


# -- qemu-img ---------------------------------------------------------------------------------------------

def test_qemu_img_convert_and_compare(make_server, tmp_path):
    qemu_img = need("qemu-img")
    srv = make_server(size="64M")
    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:                            # data, holes and an unaligned tail of data
        f.write(os.urandom(3 * MiB))
        f.seek(20 * MiB + 777)
        f.write(os.urandom(5 * MiB))
        f.truncate(64 * MiB)
    p = run([qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
    assert p.returncode == 0, p.stderr
    p = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), srv.uri])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Images are identical" in p.stdout
    # one byte changed behind qemu's back: compare must notice
    c = Client(srv.sock)
    c.go()
    assert c.write(20 * MiB + 1000, b"\0" if open(src, "rb").read()[20 * MiB + 1000] else b"\1") == 0
    c.disconnect()
    p = run([qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), srv.uri])
    assert p.returncode == 1, p.stdout + p.stderr
    # and back out again
    out = tmp_path / "back.raw"
    p = run([qemu_img, "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
    assert p.returncode == 0, p.stderr
    assert os.path.getsize(out) == 64 * MiB


# -- fio --------------------------------------------------------------------------------------------------

def find_fio():
    """A fio with the nbd engine: the portable one in shared/anchors (beside or inside the repo), else the system's."""
    candidates = []
    for anchors in (ROOT / "shared" / "anchors", ROOT.parent / "shared" / "anchors", ROOT.parent.parent / "shared" / "anchors"):
        exe = anchors / "bench" / "bin" / "fio"
        if exe.is_file():
            candidates.append((str(exe), dict(os.environ, LD_LIBRARY_PATH=str(anchors / "bench" / "lib"))))
    if shutil.which("fio"):
        candidates.append((shutil.which("fio"), dict(os.environ)))
    for exe, env in candidates:
        try:
            p = subprocess.run([exe, "--enghelp=nbd"], capture_output=True, text=True, env=env, timeout=30)
        except OSError:
            continue
        if p.returncode == 0 and "uri" in p.stdout:
            return exe, env
    return None, None


@pytest.mark.parametrize("bs,rw", [("4k", "randwrite"), ("128k", "randwrite"), ("1m", "write")])
def test_fio_verify(make_server, tmp_path, bs, rw):
    fio, env = find_fio()
    if not fio:
        pytest.skip("no fio with the nbd engine (looked in shared/anchors/bench/bin and PATH; `fio --enghelp=nbd`)")
    srv = make_server(size="128M")
    out = tmp_path / "fio.json"
    size = {"4k": "16M", "128k": "64M", "1m": "96M"}[bs]
    p = subprocess.run([fio, "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}", f"--rw={rw}", f"--bs={bs}",
                        "--iodepth=16", f"--size={size}", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                        "--numjobs=1", "--output-format=json", f"--output={out}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == int(size[:-1]) * MiB
    assert job["read"]["io_bytes"] == job["write"]["io_bytes"]      # the verify pass read everything back
    assert job.get("total_err", 0) == 0
