"""Small reads, and small writes, are grouped into one cuMemcpyBatchAsync call each (the fake runs a batch
last copy first); the groups must never reorder what the client ordered.  Pipelined writes that overlap (whole pages, partial pages, spanning pages, large ones copied on in
pieces while they arrive), reads in between, and TRIMs, with random payloads, checked against a model of the
export, with grouping on, off, and refused by the driver."""
import queue
import random
import struct
import threading

import pytest

from conftest import Server
from nbdclient import Client, READ, WRITE, TRIM, REPLY_MAGIC, recv_exact

SIZE = 1 << 20


@pytest.fixture(scope="module")
def server_for(tmp_path_factory, fakecuda):
    """One `serve` (64M) per environment for the module: the three seeds share it (a start each saved);
    each test trims the MiB it uses first, so it starts from zeros as on a fresh server."""
    made = {}

    def get(env):
        key = ",".join(f"{k}={v}" for k, v in sorted(env.items())) or "default"
        if key not in made:
            made[key] = Server(tmp_path_factory.mktemp("grouped"), fakecuda, "64M", **env)
        return made[key]
    yield get
    for s in made.values():
        assert s.stop() == 0, s.log()
        assert "Traceback" not in s.log(), s.log()


@pytest.mark.parametrize("env", [{}, {"NBD_VRAM_GROUP_WRITES": "0"}, {"NBD_VRAM_BATCH_COPY": "0"},
                                 {"FAKECUDA_NO_BATCH": "1"}],
                         ids=["grouped", "writes-alone", "ungrouped", "driver-refuses"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pipelined_overlapping_requests_keep_their_order(server_for, fakecuda, env, seed):
    if env.get("FAKECUDA_NO_BATCH") and "fakecuda" not in fakecuda:
        pytest.skip("the refusing driver is a switch of the fake libcuda")
    srv = server_for(env)
    c = Client(srv.sock)
    c.go()
    assert c.simple(TRIM, 0, SIZE) == 0 and c.read(0, SIZE) == (0, bytes(SIZE))    # the last seed's data gone
    rng = random.Random(seed)
    model = bytearray(SIZE)
    expected = queue.Queue()   # per request: (cookie, data expected for a read or None)
    failures = []

    def check_replies(count):
        # Replies are read while requests are still being sent: neither side may block the other.
        for _ in range(count):
            cookie, want = expected.get()
            magic, err, got_cookie = struct.unpack("!IIQ", recv_exact(c.sock, 16))
            if (magic, err, got_cookie) != (REPLY_MAGIC, 0, cookie):
                failures.append(f"request {cookie}: reply {(hex(magic), err, got_cookie)}")
                return
            if want is not None and recv_exact(c.sock, len(want)) != want:
                failures.append(f"request {cookie}: wrong data")
                return

    count = 400
    reader = threading.Thread(target=check_replies, args=(count,))
    reader.start()
    for i in range(count):
        kind = rng.random()
        page = rng.randrange(0, 16)            # few pages: many overlaps inside one batch
        off = page * 4096 + rng.choice([0, 0, 0, 100, 4000, 4001])
        length = rng.choice([4096, 4096, 4096, 512, 8192, 65536, 70000, 4097, 300000, 600001])
        length = min(length, SIZE - off)
        if kind < 0.55:
            data = rng.randbytes(length)        # a payload put anywhere but its place shows
            model[off:off + length] = data
            expected.put((c.cookie + 1, None))
            c.request(WRITE, off, length, payload=data)
        elif kind < 0.9:
            expected.put((c.cookie + 1, bytes(model[off:off + length])))
            c.request(READ, off, length)
        else:
            model[off:off + length] = bytes(length)
            expected.put((c.cookie + 1, None))
            c.request(TRIM, off, length)
    reader.join(60)
    assert not reader.is_alive(), "replies stopped coming"
    assert not failures, failures
    err, data = c.read(0, SIZE)
    assert err == 0 and data == bytes(model)
    c.disconnect()
    if env.get("FAKECUDA_NO_BATCH"):
        assert srv.logged("one driver call per copy"), srv.log()

