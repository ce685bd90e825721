#!/usr/bin/env python3
"""Coverage-guided fuzzing of the NBD server with atheris (libFuzzer for Python), on demand; never in CI.

Each input is the byte stream one client sends.  It is fed, in this process, to nbd_vram.serve_connection
(negotiate, then Transmission) over a socketpair, with the fake libcuda (tests/fakecuda) behind a 4 MiB
export and 64 KiB staging buffers, so the large-request paths are reached with small inputs.  The oracle is
tests/nbdmodel.py, as in tests/test_fuzz.py: every byte sent back must be what proto.md allows for that
stream, the data read must be the data written, a dropped connection must be logged and a clean end not,
and no exception may escape to the "unexpected error" handler.  A violation raises, and atheris saves the
input as crash-<sha1> (run the script with that file as its argument to replay it).

    pip install atheris
    python3 bench/fuzz_atheris.py --seconds 600 [--corpus DIR] [-- extra libFuzzer flags]

It ends after --seconds with one line: executions, seconds, executions per second, how the streams ended.
See docs/FUZZING.md.
"""
import argparse
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import atheris                              # noqa: E402  (development only: pip install atheris)

with atheris.instrument_imports(include=["nbd_vram"]):
    import nbd_vram as nv                   # noqa: E402

import nbdmodel as m                        # noqa: E402  (the oracle: not instrumented)

SIZE = 4 << 20
BUFFER = 64 << 10


def build_fakecuda(out_dir):
    lib = os.path.join(out_dir, "libcuda.so.1")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib, os.path.join(ROOT, "tests", "fakecuda", "fakecuda.c"),
                    "-lpthread"], check=True)
    return lib


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


class Harness:
    def __init__(self, libcuda):
        nv.log.handlers[:] = []
        self.records = Records()
        nv.log.addHandler(self.records)
        nv.log.setLevel(logging.INFO)
        nv.log.propagate = False
        self.cuda = nv.Cuda(libcuda)
        dev, ctx = nv.VramStore.open_device(self.cuda, "0")
        self.store = nv.VramStore.allocate(self.cuda, dev, ctx, SIZE, SIZE)
        self.export = nv.Export(self.store)
        self.io = nv.IoContext(self.store, BUFFER, BUFFER)
        self.runs, self.ends, self.t0, self.failed = 0, {}, time.monotonic(), None

    def one(self, data):
        cuda, io = self.cuda, self.io
        cuda.cuCtxSetCurrent(self.store.ctx)
        cuda.cuMemsetD8Async(self.store.dptr, 0, SIZE, io.stream)      # every input starts from zeroes
        cuda.cuStreamSynchronize(io.stream)
        shadow = m.Shadow(SIZE)
        e = m.expect(data, shadow, nv.MAX_REQUEST, nv.MAX_OPTION)
        ours, theirs = socket.socketpair()
        ours.settimeout(20)
        out = []

        def send():
            try:
                ours.sendall(data)
                ours.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        def receive():
            try:
                while True:
                    chunk = ours.recv(1 << 20)
                    if not chunk:
                        return
                    out.append(chunk)
            except ConnectionResetError:
                return
            except socket.timeout:
                out.append(None)

        threads = [threading.Thread(target=send, daemon=True), threading.Thread(target=receive, daemon=True)]
        for t in threads:
            t.start()
        self.records.records.clear()
        nv.serve_connection(theirs, self.export, "fuzz", io=io)       # closes theirs
        for t in threads:
            t.join(20)
            if t.is_alive():
                raise AssertionError("client side stuck after serve_connection returned")
        ours.close()
        if None in out:
            raise AssertionError("no output and no close for 20 s")
        lines = [r.getMessage() for r in self.records.records]
        bad = [r for r in self.records.records if r.exc_info or "unexpected error" in r.getMessage()]
        if bad:
            raise AssertionError(f"serve_connection logged an exception: {lines}")
        m.check(e, b"".join(out), SIZE, int(nv.EXPORT_FLAGS), nv.MAX_REQUEST)
        drops = sum("closing this connection" in s or "connection lost" in s for s in lines)
        if drops != (1 if e.end == "drop" else 0):
            raise AssertionError(f"{e}: {drops} drop lines: {lines}")
        self.runs += 1
        key = re.sub(r"0x[0-9a-f]+|\d+", "N", e.why)
        self.ends[key] = self.ends.get(key, 0) + 1

    def summary(self):
        wall = time.monotonic() - self.t0
        top = ", ".join(f"{k}: {v}" for k, v in sorted(self.ends.items(), key=lambda kv: -kv[1])[:8])
        verdict = f"FAILED: {self.failed}" if self.failed else "no failure"
        return (f"fuzz_atheris: {self.runs} executions in {wall:.0f} s ({self.runs / max(wall, 1e-9):.0f}/s), "
                f"{verdict}; ends: {top}")


def seeds():
    """A few well-formed conversations for the corpus to start from."""
    def opt(o, d=b""):
        return struct.pack("!QII", m.IHAVEOPT, o, len(d)) + d

    def req(t, off, n, cookie=1, flags=0):
        return struct.pack("!IHHQQI", m.REQUEST_MAGIC, flags, t, cookie, off, n)
    go = struct.pack("!I", 3) + opt(m.OPT_GO, struct.pack("!IH", 0, 0))
    return [
        go + req(m.WRITE, 4096, 512, 1) + b"\xa5" * 512 + req(m.READ, 4000, 1024, 2) + req(m.DISC, 0, 0, 3),
        go + req(m.WRITE, 0, 70000, 1) + bytes(range(256)) * 273 + b"\x01" * 112 + req(m.READ, 0, 70000, 2),
        go + req(m.TRIM, 0, 8192, 1) + req(m.WRITE_ZEROES, 1, 5, 2, 2) + req(m.FLUSH, 0, 0, 3, 1) + req(9, 0, 1, 4),
        struct.pack("!I", 1) + opt(m.OPT_LIST) + opt(m.OPT_INFO, struct.pack("!I", 3) + b"abc" + struct.pack("!HHH", 2, 1, 2))
        + opt(m.OPT_STRUCTURED_REPLY) + opt(m.OPT_EXPORT_NAME, b"x") + bytes(28),
        struct.pack("!I", 3) + opt(m.OPT_ABORT),
    ]


DICTIONARY = [struct.pack("!Q", m.IHAVEOPT), struct.pack("!I", m.REQUEST_MAGIC)] + [
    struct.pack("!I", o) for o in range(1, 12)] + [struct.pack("!H", c) for c in range(0, 9)] + [
    struct.pack("!I", v) for v in (0, 4096, 65536, 65536 - 28, 1 << 25, (1 << 25) + 1, SIZE, 0xFFFFFFFF)] + [
    struct.pack("!Q", v) for v in (SIZE - 1, SIZE, 2**64 - 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="stop after this long (default 60)")
    ap.add_argument("--corpus", help="corpus directory (kept, and seeded when empty); default a temporary one")
    ap.add_argument("--libcuda", help="fake libcuda.so.1 to use (default: build tests/fakecuda with gcc)")
    args, rest = ap.parse_known_args()
    tmp = tempfile.mkdtemp(prefix="nbd-vram-atheris-")
    libcuda = args.libcuda or build_fakecuda(tmp)
    os.environ.setdefault("NBD_VRAM_CUINIT_TRIES", "1")
    harness = Harness(libcuda)
    rest = [a for a in rest if a != "--"]
    replay = [a for a in rest if not a.startswith("-")]         # crash files given on the command line
    corpus = args.corpus or os.path.join(tmp, "corpus")
    if not replay:
        os.makedirs(corpus, exist_ok=True)
        if not os.listdir(corpus):
            for i, s in enumerate(seeds()):
                with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                    f.write(s)
    dict_path = os.path.join(tmp, "nbd.dict")
    with open(dict_path, "w") as f:
        for tok in DICTIONARY:
            f.write('"' + "".join(f"\\x{b:02x}" for b in tok) + '"\n')
    deadline = time.monotonic() + args.seconds

    def test_one(data):
        if time.monotonic() > deadline:
            print(harness.summary(), flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os._exit(0)
        try:
            harness.one(data)
        except BaseException as e:
            harness.failed = f"{type(e).__name__}: {e}"[:300]
            raise

    argv = [sys.argv[0], f"-dict={dict_path}", "-max_len=200000", "-timeout=30", "-rss_limit_mb=4096",
            f"-max_total_time={int(args.seconds) + 30}"] + rest + ([] if replay else [corpus])
    atheris.Setup(argv, test_one)
    try:
        atheris.Fuzz()
    finally:
        print(harness.summary(), flush=True)


if __name__ == "__main__":
    main()
