"""`serve` over a Unix socket with the fake libcuda: handshake, transmission, hostile clients, GPU faults."""
import hashlib
import os
import random
import resource
import signal
import socket
import struct
import threading
import time

import pytest

from conftest import Server
from nbdclient import (DISC, FLAG_FUA, FLAG_NO_HOLE, FLUSH, IHAVEOPT, NBDMAGIC, READ, REPLY_MAGIC, REQUEST_MAGIC,
                       TRIM, WRITE, WRITE_ZEROES, Client, recv_exact)

MiB = 1 << 20
SIZE = 256 * MiB        # the `server` fixture's export
MAX_REQUEST = 32 * MiB
EIO, EINVAL, ENOSPC = 5, 22, 28
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_INVALID = (1 << 31) | 1, (1 << 31) | 3
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3
# HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN
EXPECTED_FLAGS = 1 | 4 | 8 | 32 | 64 | 256


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def connect(srv):
    c = Client(srv.sock)
    c.go()
    assert c.size is not None
    return c


def check_usable(c, offset=100 * MiB, seed=12345):
    """A write and a read-back on this connection still work."""
    data = pattern(seed, 4096 + 17)
    assert c.write(offset, data) == 0
    err, got = c.read(offset, len(data))
    assert err == 0 and got == data


def wait_closed(c, timeout=10):
    """True once the server has closed this connection (EOF or reset)."""
    c.sock.settimeout(timeout)
    try:
        while c.sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


@pytest.fixture(scope="module")
def shared(tmp_path_factory, fakecuda):
    """One server for the tests that leave nothing behind that another test could trip on (it saves a start each)."""
    s = Server(tmp_path_factory.mktemp("shared"), fakecuda)
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


def trim_all(srv):
    c = connect(srv)
    assert c.simple(TRIM, 0, SIZE) == 0
    assert c.read(0, 4096) == (0, bytes(4096)) and c.read(SIZE - 4096, 4096) == (0, bytes(4096))
    c.disconnect()


@pytest.fixture
def blank(shared):
    """The shared server with its whole export trimmed before and after, so that it reads as zeros as a
    fresh one does (test_trim_whole_export proves that) and the data is gone for the next test: for the
    data tests, which then need no server of their own (a start and a stop each saved)."""
    trim_all(shared)
    yield shared
    trim_all(shared)


# -- handshake ----------------------------------------------------------------------------------------------

def test_greeting(shared):
    c = Client(shared.sock, connect=False)
    magic, opt, flags = struct.unpack("!QQH", recv_exact(c.sock, 18))
    assert (magic, opt, flags) == (NBDMAGIC, IHAVEOPT, 3)       # FIXED_NEWSTYLE | NO_ZEROES
    c.close()


def test_go_without_info_requests(shared):
    c = Client(shared.sock)
    replies = c.go()
    assert replies[-1].type == REP_ACK and all(r.type == REP_INFO for r in replies[:-1])
    assert c.size == SIZE and c.flags == EXPECTED_FLAGS
    check_usable(c)
    c.disconnect()


def test_go_with_info_requests(shared):
    c = Client(shared.sock)
    replies = c.go(name=b"whatever", infos=[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION])
    infos = {struct.unpack_from("!H", r.data)[0]: r.data for r in replies if r.type == REP_INFO}
    assert set(infos) == {INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE}
    assert struct.unpack("!HQH", infos[INFO_EXPORT]) == (INFO_EXPORT, SIZE, EXPECTED_FLAGS)
    assert struct.unpack("!HIII", infos[INFO_BLOCK_SIZE]) == (INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)
    assert infos[INFO_NAME][2:] == b"whatever"
    assert b"VRAM" in infos[INFO_DESCRIPTION][2:]
    assert replies[-1].type == REP_ACK
    check_usable(c)
    c.disconnect()


def test_info_then_go(shared):
    c = Client(shared.sock)
    replies = c.go(infos=[INFO_BLOCK_SIZE], opt=OPT_INFO)
    assert replies[-1].type == REP_ACK and c.size == SIZE
    c.size = None
    c.go()
    assert c.size == SIZE
    check_usable(c)
    c.disconnect()


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(shared, no_zeroes):
    c = Client(shared.sock, connect=False)
    c.greet(client_flags=3 if no_zeroes else 1)
    c.send_option(OPT_EXPORT_NAME, b"any-name")
    size, flags = struct.unpack("!QH", recv_exact(c.sock, 10))
    assert (size, flags) == (SIZE, EXPECTED_FLAGS)
    if not no_zeroes:
        assert recv_exact(c.sock, 124) == bytes(124)
    check_usable(c)          # a stray pad would corrupt the first reply
    c.disconnect()


def test_list_then_abort(shared):
    c = Client(shared.sock)
    c.send_option(OPT_LIST)
    r = c.read_option_reply()
    assert (r.opt, r.type) == (OPT_LIST, REP_SERVER) and r.data == struct.pack("!I", 0)
    assert c.read_option_reply().type == REP_ACK
    c.send_option(OPT_LIST, b"x")                          # LIST takes no data
    assert c.read_option_reply().type == REP_ERR_INVALID
    c.send_option(OPT_ABORT)
    r = c.read_option_reply()
    assert (r.opt, r.type) == (OPT_ABORT, REP_ACK)
    assert c.sock.recv(1) == b""                           # and the server hangs up
    c.close()


@pytest.mark.parametrize("opt,data,want", [
    (200, b"", REP_ERR_UNSUP),
    (0xFFFFFFFF, b"payload", REP_ERR_UNSUP),
    (OPT_STRUCTURED_REPLY, b"", REP_ERR_UNSUP),
    (OPT_GO, b"\0\0", REP_ERR_INVALID),
    (OPT_GO, struct.pack("!I", 50) + b"short", REP_ERR_INVALID),
    (OPT_INFO, struct.pack("!IH", 0, 2) + b"\0\3", REP_ERR_INVALID),     # count 2, one info given
])
def test_refused_option_then_go(shared, opt, data, want):
    c = Client(shared.sock)
    c.send_option(opt, data)
    r = c.read_option_reply()
    assert (r.opt, r.type) == (opt, want)
    c.go()                                                 # negotiation goes on
    assert c.size == SIZE
    check_usable(c)                                        # simple replies, not structured ones
    c.disconnect()


def test_oversized_option_closes_only_that_client(shared):
    c = Client(shared.sock)
    c.sock.sendall(struct.pack("!QII", IHAVEOPT, 200, 1 << 30))
    assert wait_closed(c)
    c.close()
    other = connect(shared)
    check_usable(other)
    other.disconnect()


def test_65th_option_closes(shared):
    """20,000 NBD_OPT_LIST would all be answered: the handshake takes at most 64 options."""
    c = Client(shared.sock)
    for _ in range(64):
        c.send_option(OPT_LIST)
        assert c.read_option_reply().type == REP_SERVER
        assert c.read_option_reply().type == REP_ACK
    c.send_option(OPT_LIST)
    assert wait_closed(c)
    c.close()
    assert shared.logged("more than 64 options in one handshake; closing this connection"), shared.log()
    other = connect(shared)
    check_usable(other)
    other.disconnect()


def test_handshake_deadline_drops_a_slow_drip_client(nv):
    """A byte every 0.4 s never lets one receive time out; the handshake's deadline (1 s here,
    HANDSHAKE_TIMEOUT_S in serve) still ends it."""
    ours, theirs = socket.socketpair()
    export = type("Export", (), {"size": 1 << 20, "flags": 1, "name": "", "description": ""})()
    stop = threading.Event()

    def drip():
        recv_exact(theirs, 18)                              # the greeting
        msg = struct.pack("!I", 3) + struct.pack("!QII", IHAVEOPT, OPT_LIST, 0) * 10
        for b in msg:
            if stop.wait(0.4):
                return
            try:
                theirs.send(bytes([b]))
            except OSError:
                return
    t = threading.Thread(target=drip, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(socket.timeout):
            nv.negotiate(ours, export, timeout_s=1.0)
        assert 0.9 < time.monotonic() - t0 < 2.0
    finally:
        stop.set()
        t.join(5)
        ours.close()
        theirs.close()


@pytest.mark.parametrize("no_vmm", ["0", "1"])          # clients served by worker processes / by threads
def test_pinned_budget_refuses_connections_over_it(make_server, no_vmm):
    """Each client pins 2 x --buffer-size: with 1M buffers, 4M is two clients; a third is refused."""
    srv = make_server(args=["--buffer-size", "1M", "--max-pinned", "4M"], FAKECUDA_NO_VMM=no_vmm)
    assert srv.logged("at most 2 clients at once"), srv.log()
    a, b = connect(srv), connect(srv)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(10)
    extra.connect(srv.sock)
    assert extra.recv(1) == b""                              # closed without a greeting
    extra.close()
    assert srv.logged("one more would pass the pinned-memory budget of 4 MiB (--max-pinned)"), srv.log()
    check_usable(a)
    a.disconnect()
    deadline = time.monotonic() + 10
    while True:                                              # a's buffers are free again
        try:
            c = connect(srv)
            break
        except (EOFError, ConnectionError):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
    check_usable(c)
    c.disconnect()
    b.disconnect()


# -- transmission: data ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offset,length", [
    (0, 4096), (0, 1), (1, 4095), (4095, 2), (12345, 100000), (7 * MiB + 3, 3 * MiB),
    (SIZE - 1, 1), (SIZE - 4096, 4096), (SIZE - 12345, 12345),
])
def test_write_read(blank, offset, length):
    c = connect(blank)
    data = pattern(offset * 7 + length, length)
    assert c.write(offset, data) == 0
    err, got = c.read(offset, length)
    assert err == 0 and got == data
    # the bytes just around it were not touched
    if offset:
        assert c.read(offset - 1, 1) == (0, b"\0")
    if offset + length < SIZE:
        assert c.read(offset + length, 1) == (0, b"\0")
    c.disconnect()


def test_never_written_reads_zero(server):
    c = connect(server)
    for off, n in ((0, 4096), (123457, 65536), (SIZE - MiB, MiB)):
        err, got = c.read(off, n)
        assert err == 0 and got == bytes(n)
    c.disconnect()


@pytest.mark.parametrize("offset,length", [(0, MAX_REQUEST), (1, MAX_REQUEST), (SIZE - MAX_REQUEST, MAX_REQUEST),
                                           (5 * MiB + 1, 8 * MiB + 1), (3, 9 * MiB - 7)])
def test_large_requests(blank, offset, length):
    """Bigger than the 8 MiB staging buffers: the large-request paths, piece by piece."""
    c = connect(blank)
    data = pattern(length, length)
    assert c.write(offset, data, flags=FLAG_FUA) == 0
    err, got = c.read(offset, length)
    assert err == 0 and sha(got) == sha(data)
    assert c.read(offset + 4096, 8192) == (0, data[4096:4096 + 8192])
    c.disconnect()


def test_writes_visible_on_other_connections(shared):
    a, b = connect(shared), connect(shared)
    data = pattern(3, 65536)
    assert a.write(MiB, data) == 0
    assert b.read(MiB, len(data)) == (0, data)
    a.disconnect()
    b.disconnect()


@pytest.mark.parametrize("cmd,flags", [(TRIM, 0), (TRIM, FLAG_FUA), (WRITE_ZEROES, 0),
                                       (WRITE_ZEROES, FLAG_NO_HOLE | FLAG_FUA)])
def test_trim_and_write_zeroes(blank, cmd, flags):
    c = connect(blank)
    data = pattern(cmd, 3 * 65536)
    assert c.write(65536, data) == 0
    assert c.simple(cmd, 65536 + 1000, 65536, flags) == 0
    err, got = c.read(65536, len(data))
    assert err == 0
    assert got == data[:1000] + bytes(65536) + data[1000 + 65536:]
    c.disconnect()


def test_trim_whole_export(server):
    c = connect(server)
    assert c.write(SIZE - 4096, pattern(1, 4096)) == 0
    assert c.write(0, pattern(2, 4096)) == 0
    assert c.simple(TRIM, 0, SIZE) == 0                 # larger than MAX_REQUEST: no payload, allowed
    assert c.read(0, 4096) == (0, bytes(4096))
    assert c.read(SIZE - 4096, 4096) == (0, bytes(4096))
    c.disconnect()


def test_flush_and_fua(shared):
    c = connect(shared)
    data = pattern(9, 8192)
    assert c.write(0, data, flags=FLAG_FUA) == 0
    assert c.simple(FLUSH) == 0
    assert c.simple(FLUSH, flags=FLAG_FUA) == 0         # proto.md: FUA is valid on every command
    err, got = c.read(0, 8192)
    assert err == 0 and got == data
    c.request(READ, 0, 8192, flags=FLAG_FUA)
    assert c.reply(8192) == (0, c.cookie, data)
    c.disconnect()


def test_pipelined_requests(blank):
    """200 writes and reads sent before any reply is read: replies in order, data right."""
    c = connect(blank)
    slot = 8192
    old = {i: pattern(i, random.Random(i).randint(1, 2048)) for i in range(100, 150)}
    for i, data in old.items():                          # acknowledged before the pipeline starts
        assert c.write(i * slot + 7, data) == 0
    new = {i: pattern(1000 + i, random.Random(1000 + i).randint(1, 2048)) for i in range(100)}
    reqs, buf = [], []
    for k in range(200):
        if k % 2 == 0:
            i = k // 2
            cookie = 10000 + k
            buf.append(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, WRITE, cookie, i * slot + 7, len(new[i])) + new[i])
            reqs.append((cookie, None))
        else:
            i = 100 + k // 2
            want = old.get(i, bytes(300))
            cookie = 10000 + k
            buf.append(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, READ, cookie, i * slot + 7, len(want)))
            reqs.append((cookie, want))
    c.sock.sendall(b"".join(buf))
    for cookie, want in reqs:
        err, got_cookie, data = c.reply(len(want) if want is not None else 0)
        assert (err, got_cookie) == (0, cookie)
        if want is not None:
            assert data == want
    for i, data in new.items():
        assert c.read(i * slot + 7, len(data)) == (0, data)
    c.disconnect()


def test_pipelined_beyond_staging_buffers(blank):
    """Pipelined writes and reads adding up to more than the 8 MiB rx/tx buffers (compaction, batch splits)."""
    c = connect(blank)
    sizes = [random.Random(i).choice([4096, 65536, 512 * 1024, 1024 * 1024 + 1, 3 * MiB]) for i in range(40)]
    offsets = [sum(sizes[:i]) + i for i in range(len(sizes))]
    datas = [pattern(50 + i, n) for i, n in enumerate(sizes)]
    replies = []

    def reader():
        for _ in sizes:
            replies.append(c.reply(0))
        for n in sizes:
            replies.append(c.reply(n))

    t = threading.Thread(target=reader)
    t.start()
    c.sock.sendall(b"".join(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, WRITE, i, off, len(d)) + d
                            for i, (off, d) in enumerate(zip(offsets, datas))))
    c.sock.sendall(b"".join(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, READ, 100 + i, off, n)
                            for i, (off, n) in enumerate(zip(offsets, sizes))))
    t.join(60)
    assert not t.is_alive()
    assert [(e, k) for e, k, _ in replies] == [(0, i) for i in range(40)] + [(0, 100 + i) for i in range(40)]
    for (_, _, got), want in zip(replies[40:], datas):
        assert sha(got) == sha(want)
    c.disconnect()


# -- transmission: invalid requests ----------------------------------------------------------------------

def test_write_beyond_end(shared):
    c = connect(shared)
    assert c.write(SIZE, b"x") == ENOSPC
    assert c.write(SIZE - 10, b"y" * 11) == ENOSPC
    assert c.write(2**64 - 4, b"z" * 8) == ENOSPC              # offset + length wraps around 2**64
    assert c.read(SIZE - 10, 10) == (0, bytes(10))             # nothing was written
    check_usable(c)
    c.disconnect()


@pytest.mark.parametrize("cmd,offset,length,flags,want", [
    (READ, SIZE, 1, 0, EINVAL),                                 # one past the end
    (READ, SIZE - 1, 2, 0, EINVAL),
    (READ, 2**64 - 1, 2, 0, EINVAL),                            # offset + length overflows
    (READ, 2**64 - 4096, 8192, 0, EINVAL),
    (TRIM, 2**64 - 1, 2, 0, EINVAL),
    (WRITE_ZEROES, SIZE - 1, 2, 0, ENOSPC),
    (READ, 0, MAX_REQUEST + 1, 0, EINVAL),                      # over the advertised maximum
    (READ, 0, 0xFFFFFFFF, 0, EINVAL),
    (READ, 0, 0, 0, EINVAL),                                    # zero length
    (TRIM, 0, 0, 0, EINVAL),
    (WRITE_ZEROES, 4096, 0, 0, EINVAL),
    (FLUSH, 4096, 0, 0, EINVAL),                                # FLUSH must have offset and length 0
    (FLUSH, 0, 4096, 0, EINVAL),
    (5, 0, 4096, 0, EINVAL),                                    # NBD_CMD_CACHE: not advertised
    (7, 0, 4096, 0, EINVAL),                                    # BLOCK_STATUS
    (9, 0, 4096, 0, EINVAL),                                    # unknown command
    (0xFFFF, 0, 0, 0, EINVAL),
    (READ, 0, 4096, 1 << 15, EINVAL),                           # unknown flag
    (READ, 0, 4096, 1 << 2, EINVAL),                            # DF without structured replies
    (TRIM, 0, 4096, FLAG_NO_HOLE, EINVAL),                      # NO_HOLE is for WRITE_ZEROES only
    (WRITE_ZEROES, 0, 4096, 1 << 4, EINVAL),                    # FAST_ZERO was not advertised
])
def test_invalid_request_keeps_connection(shared, cmd, offset, length, flags, want):
    c = connect(shared)
    c.request(cmd, offset, length, flags)
    err, cookie, _ = c.reply(length if cmd == READ else 0)   # no data follows an error reply
    assert (err, cookie) == (want, c.cookie)
    check_usable(c)
    c.disconnect()
    assert shared.logged("invalid request:"), shared.log()


@pytest.mark.parametrize("length,flags,want", [
    (40 * MiB, 0, EINVAL),                    # over MAX_REQUEST: the payload is read and dropped
    (MAX_REQUEST + 1, 0, EINVAL),
    (4096, 1 << 15, EINVAL),                  # unknown flag
    (4096, FLAG_NO_HOLE, EINVAL),
])
def test_invalid_write_payload_is_skipped(shared, length, flags, want):
    c = connect(shared)
    old = pattern(77, 65536)
    assert c.write(0, old) == 0
    payload = b"\xee" * length
    c.request(WRITE, 0, length, flags, payload)
    err, cookie, _ = c.reply()
    assert (err, cookie) == (want, c.cookie)
    assert c.read(0, 65536) == (0, old)        # nothing of the refused payload landed
    check_usable(c)
    c.disconnect()


def test_invalid_requests_logged_then_counted(server):
    c = connect(server)
    for _ in range(30):
        assert c.simple(9, 0, 1) == EINVAL
    check_usable(c)
    c.disconnect()
    assert server.logged("invalid request:", count=10) and server.log().count("invalid request:") == 10, server.log()
    assert server.logged("only counted"), server.log()


def test_disconnect_ends_connection(shared):
    c = connect(shared)
    check_usable(c)
    c.request(DISC, 0, 0)
    assert c.sock.recv(1) == b""
    c.close()


# -- hostile clients -------------------------------------------------------------------------------------

def test_bad_magic_closes_only_that_connection(server):
    good = connect(server)
    data = pattern(5, 65536)
    assert good.write(MiB, data) == 0
    bad = connect(server)
    bad.sock.sendall(struct.pack("!IHHQQI", 0xDEADBEEF, 0, READ, 1, 0, 4096))
    assert wait_closed(bad)
    bad.close()
    assert good.read(MiB, len(data)) == (0, data)
    check_usable(good)
    good.disconnect()
    assert server.logged("bad request magic 0xdeadbeef"), server.log()


def test_truncated_header_then_close(server):
    c = connect(server)
    c.sock.sendall(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, READ, 1, 0, 4096)[:10])
    c.close()
    other = connect(server)
    check_usable(other)
    other.disconnect()
    deadline = time.monotonic() + 5
    while "read 10 of 28" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.logged("read 10 of 28"), server.log()


@pytest.mark.parametrize("length,sent", [(65536, 1000), (20 * MiB, 9 * MiB)])
def test_disconnect_in_write_payload(server, length, sent):
    keep = connect(server)
    data = pattern(11, 8192)
    assert keep.write(0, data) == 0
    c = connect(server)
    c.sock.sendall(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, WRITE, 1, 4 * MiB, length) + b"\x11" * sent)
    c.close()
    assert keep.read(0, 8192) == (0, data)
    other = connect(server)
    check_usable(other)
    other.disconnect()
    keep.disconnect()


def test_requests_before_a_cut_off_write_are_answered(server):
    """A READ, then a WRITE whose payload the client never finishes (it shuts down its side): the READ, already
    carried out, is answered before the connection closes.  Its reply used to be lost (found by test_fuzz.py)."""
    c = connect(server)
    data = pattern(31, 4096)
    assert c.write(MiB, data) == 0
    c.sock.sendall(struct.pack("!IHHQQI", REQUEST_MAGIC, 0, READ, 41, MiB, 4096)
                   + struct.pack("!IHHQQI", REQUEST_MAGIC, 0, WRITE, 42, 0, 10000) + b"x" * 5000)
    c.sock.shutdown(socket.SHUT_WR)
    err, cookie, got = c.reply(4096)
    assert (err, cookie, got) == (0, 41, data)
    assert wait_closed(c)
    c.close()
    assert server.logged("write payload"), server.log()
    other = connect(server)
    assert other.read(0, 10000) == (0, bytes(10000))        # nothing of the cut-off write landed
    check_usable(other)
    other.disconnect()


def test_garbage_instead_of_handshake(server):
    for seed in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(server.sock)
        s.sendall(pattern(seed, 200))
        recv_exact(s, 18)                                   # the greeting, then the server hangs up
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        s.close()
    c = connect(server)
    check_usable(c)
    c.disconnect()


def test_silent_client_does_not_block_others(server):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(server.sock)                             # never reads the greeting, never writes
    half = Client(server.sock)                              # stalls in the middle of negotiation
    half.sock.sendall(struct.pack("!QII", IHAVEOPT, OPT_GO, 100) + b"abc")
    t0 = time.monotonic()
    c = connect(server)
    check_usable(c)
    c.disconnect()
    assert time.monotonic() - t0 < 5
    silent.close()
    half.close()


def test_300_connections_at_once(make_server):
    n = 300
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n + 100:                                  # raise it for us and for the server we start
        if hard != resource.RLIM_INFINITY and hard < 2 * n + 100:
            pytest.skip(f"ulimit -n is {soft} (hard {hard}): {n} connections need about {2 * n + 100} descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 100, hard))
    srv = make_server(args=["--max-connections", "400", "--buffer-size", "64K"])
    barrier = threading.Barrier(n + 1, timeout=120)
    errors, clients = [], []

    def worker(i):
        try:
            for _ in range(200):
                try:
                    c = Client(srv.sock)
                    break
                except BlockingIOError:         # the listen backlog is full (a timeout socket gets EAGAIN): retry
                    time.sleep(0.05)
            c.go()
            clients.append(c)
            data = pattern(i, 4096 + i)
            assert c.write(i * 65536, data) == 0
            barrier.wait()                                  # all n are connected and have written
            err, got = c.read(i * 65536, len(data))
            assert err == 0 and got == data, f"client {i}: wrong data"
            barrier.wait()
            c.disconnect()
        except Exception as e:          # reported by the main thread
            errors.append(f"client {i}: {e!r}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
        barrier.wait()
    except threading.BrokenBarrierError:
        pass                                                # a worker failed: its error is reported below
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert len(clients) == n
    assert "refusing" not in srv.log()
    c = connect(srv)
    for i in (0, 150, 299):                                 # everything written is still there
        assert c.read(i * 65536, 4096 + i) == (0, pattern(i, 4096 + i))
    c.disconnect()


def test_max_connections_refuses_extra(make_server):
    srv = make_server(args=["--max-connections", "2"])
    a, b = connect(srv), connect(srv)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.settimeout(10)
    extra.connect(srv.sock)
    assert extra.recv(1) == b""                              # closed without a greeting
    extra.close()
    check_usable(a)
    a.disconnect()
    b.disconnect()
    deadline = time.monotonic() + 10
    while True:                                              # a slot is free again, once the server has seen them go
        try:
            c = connect(srv)
            break
        except (EOFError, ConnectionError):
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
    check_usable(c)
    c.disconnect()
    assert srv.logged("refusing a connection"), srv.log()


def rss_kib(pid):
    """VmRSS of pid and of its child processes (serve may hand connections to worker processes)."""
    def status(p):
        try:
            with open(f"/proc/{p}/status") as f:
                return dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return {}
    total = int(status(pid)["VmRSS"].split()[0])
    for p in os.listdir("/proc"):
        if p.isdigit() and status(p).get("PPid", "").strip() == str(pid):
            total += int(status(p).get("VmRSS", "0 kB").split()[0])
    return total


def test_no_per_connection_leak(make_server):
    srv = make_server()
    data = pattern(1, 4096)

    def cycle(i):
        c = Client(srv.sock)
        c.go()
        off = (i % 1000) * 4096
        assert c.write(off, data) == 0
        assert c.read(off, 4096) == (0, data)
        c.disconnect()

    for i in range(200):
        cycle(i)
    time.sleep(0.2)
    base = rss_kib(srv.proc.pid)
    for i in range(200, 2000):
        cycle(i)
    time.sleep(0.2)
    grown = rss_kib(srv.proc.pid) - base
    assert grown < 4096, f"RSS grew by {grown} KiB over 1800 connections (from {base} KiB)"


# -- GPU faults (the fake's knobs) -------------------------------------------------------------------------

def test_copy_failure_gets_eio_and_connection_survives(make_server):
    srv = make_server(FAKECUDA_FAIL_COPY_N=3)
    c = connect(srv)
    data = pattern(21, 65536)
    assert c.write(0, data) == 0                           # copy 1
    assert c.read(0, 65536) == (0, data)                   # copy 2
    c.request(READ, 0, 65536)                              # copy 3 fails
    magic, err, cookie = struct.unpack("!IIQ", recv_exact(c.sock, 16))
    assert (magic, err, cookie) == (REPLY_MAGIC, EIO, c.cookie)
    # No data follows the EIO reply: the next reply header comes straight after it.
    assert c.read(0, 65536) == (0, data)
    check_usable(c)
    other = connect(srv)
    assert other.read(0, 65536) == (0, data)
    other.disconnect()
    c.disconnect()
    assert srv.logged("CUDA_ERROR_ILLEGAL_ADDRESS"), srv.log()


@pytest.mark.parametrize("fail_n", [1, 2])
def test_failed_write_does_not_poison_next_request(make_server, fail_n):
    """The failed copy's error must be charged to its own request, not to whatever follows."""
    srv = make_server(FAKECUDA_FAIL_COPY_N=fail_n)
    c = connect(srv)
    data = pattern(22, 4096)
    if fail_n == 2:
        assert c.write(0, data) == 0
    assert c.write(8192, data) == EIO
    for k in range(3):
        assert c.write(16384 + k * 4096, data) == 0
        assert c.read(16384 + k * 4096, 4096) == (0, data)
    c.disconnect()


def test_large_write_copy_failure(make_server):
    srv = make_server(FAKECUDA_FAIL_COPY_N=2)              # the second 8 MiB piece
    c = connect(srv)
    assert c.write(0, pattern(23, MAX_REQUEST)) == EIO     # the whole payload is still consumed
    check_usable(c)
    c.disconnect()


def test_large_read_copy_failure_first_piece(make_server):
    srv = make_server(FAKECUDA_FAIL_COPY_N=5)              # 4 pieces written, the read's first piece fails
    c = connect(srv)
    data = pattern(24, MAX_REQUEST)
    assert c.write(0, data) == 0
    c.request(READ, 0, MAX_REQUEST)
    assert c.reply(MAX_REQUEST)[0] == EIO
    err, got = c.read(0, MAX_REQUEST)
    assert err == 0 and sha(got) == sha(data)
    c.disconnect()


def test_large_read_copy_failure_later_piece_closes(make_server):
    """Once data has been sent, a GPU error cannot be reported: the connection closes, never zeroes as data."""
    srv = make_server(FAKECUDA_FAIL_COPY_N=6)              # the read's second piece
    c = connect(srv)
    data = pattern(25, MAX_REQUEST)
    assert c.write(0, data) == 0
    c.request(READ, 0, MAX_REQUEST)
    magic, err, cookie = struct.unpack("!IIQ", recv_exact(c.sock, 16))
    assert (magic, err, cookie) == (REPLY_MAGIC, 0, c.cookie)
    got = bytearray()
    while True:
        chunk = c.sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    assert 0 < len(got) < MAX_REQUEST
    assert bytes(got) == data[:len(got)]
    c.close()
    other = connect(srv)
    err, back = other.read(0, MAX_REQUEST)
    assert err == 0 and sha(back) == sha(data)
    other.disconnect()


def test_device_lost(make_server):
    srv = make_server(FAKECUDA_LOST_AFTER_COPIES=3)
    c = connect(srv)
    data = pattern(26, 4096)
    assert c.write(0, data) == 0                           # copy 1
    assert c.read(0, 4096) == (0, data)                    # copy 2
    assert c.read(0, 4096) == (EIO, b"")                   # copy 3 succeeds, then the device is gone
    for _ in range(3):
        assert c.read(0, 4096) == (EIO, b"")
        assert c.write(0, data) == EIO
        assert c.simple(TRIM, 0, 4096) == EIO
        assert c.simple(WRITE_ZEROES, 0, 4096) == EIO
        assert c.read(0, MAX_REQUEST) == (EIO, b"")
        assert c.write(0, b"\1" * MAX_REQUEST) == EIO
    c.disconnect()
    assert srv.proc.poll() is None
    assert srv.logged("CUDA_ERROR_DEVICE_UNAVAILABLE"), srv.log()
    # A new client gets through the handshake, and the server stays up.
    d = Client(srv.sock)
    d.go()
    assert d.size == SIZE
    d.close()
    assert srv.proc.poll() is None


# -- worker processes (issue 14, finding 4) --------------------------------------------------------------

def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return sorted(out)


def test_a_dead_worker_is_replaced_and_serve_serves_on(make_server):
    """kill -9 of one of two workers: its client is cut off, the other worker's client is not, new
    clients are served (by a new worker), and serve neither ends nor reports success early."""
    srv = make_server(args=("--workers", "2"))
    a, b = connect(srv), connect(srv)           # one client each: handed out in turn
    data = pattern(41, 8192)
    assert a.write(0, data) == 0 and b.read(0, 8192) == (0, data)
    first = children(srv.proc.pid)
    assert len(first) == 2, first
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while " restarted (pid " not in srv.log():
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()
        time.sleep(0.1)
    assert wait_closed(a)
    check_usable(b)
    for _ in range(3):
        c = connect(srv)
        assert c.read(0, 8192) == (0, data)     # the data is in VRAM, not in the dead worker
        c.disconnect()
    b.disconnect()
    assert srv.proc.poll() is None
    assert len(children(srv.proc.pid)) == 2 and first[0] not in children(srv.proc.pid)
    assert srv.logged(f"(pid {first[0]}) exited with -9"), srv.log()
