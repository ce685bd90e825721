"""Hostile input, fuzzed: the handshake and the transmission phase of a real `serve` (fake libcuda), and
configuration files.  Bounded for CI (about 40 s on 2 cores); NBD_VRAM_FUZZ_SCALE=K runs K times as many
cases in every fuzz test, for a longer run on demand (docs/FUZZING.md).

The oracle for the NBD cases is tests/nbdmodel.py, a model of the protocol written from proto.md: every
byte the server sends must be what the model allows (magic, option echoed, a reply for each request with a
cookie that was sent, an error the spec lists and the request deserves, the data last written), the server
must end the connection where the model says (a drop always with a log line, a clean end without one),
within a timeout, with no traceback; and after every case a fresh, well-behaved client must still connect and
read back what was written before.
"""
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import nbdmodel as m
from conftest import SCRIPT, Server, load_module
from nbdclient import Client

nv = load_module()

MiB = 1 << 20
SIZE = 64 * MiB                 # the export: small enough to shadow in the test process
MAX_REQUEST = 32 * MiB          # nbd_vram.MAX_REQUEST, the advertised maximum block size
MAX_OPTION = 64 * 1024          # nbd_vram.MAX_OPTION
EXPORT_FLAGS = (m.TX_HAS_FLAGS | m.TX_SEND_FLUSH | m.TX_SEND_FUA | m.TX_SEND_TRIM | m.TX_SEND_WRITE_ZEROES
                | 256)          # CAN_MULTI_CONN
PAYLOAD_CAP = MAX_REQUEST + 64 * 1024   # write payloads up to this are sent whole; a longer one ends the stream
CASE_TIMEOUT_S = 20             # no byte and no close for this long: the server hangs
CANARY = [(8 * MiB + 12345, 65536), (40 * MiB, 4096), (SIZE - 4096, 4096)]   # written once, checked every case

SCALE = float(os.environ.get("NBD_VRAM_FUZZ_SCALE", "1"))


def examples(ci):
    """Cases for one fuzz test: its CI count, times NBD_VRAM_FUZZ_SCALE."""
    return max(1, round(ci * SCALE))


def say(capsys, line):
    """Print to the real terminal, also under pytest's output capture (CI runs without -s)."""
    with capsys.disabled():
        sys.stdout.write("\n" + line + "\n")
        sys.stdout.flush()


def payload(seed, n):
    """n bytes that differ from case to case without costing hypothesis a draw per byte."""
    r = random.Random(seed)
    if n <= 256 * 1024:
        return r.randbytes(n)
    block = r.randbytes(65536)
    return (block * (n // 65536 + 1))[:n]


# -- the server under test -------------------------------------------------------------------------------

class Target:
    """One `serve` per buffer size for the whole module, the model's copy of its export, and the checks."""

    def __init__(self, tmp_path_factory, fakecuda, buffer_size):
        self.factory, self.fakecuda, self.buffer_size = tmp_path_factory, fakecuda, buffer_size
        self.servers = []
        self.start()

    def start(self):
        d = self.factory.mktemp(f"fuzz-{self.buffer_size}")
        self.server = Server(d, self.fakecuda, size="64M", args=["--buffer-size", self.buffer_size])
        self.servers.append(self.server)
        self.shadow = m.Shadow(SIZE)
        c = self.client()
        for i, (off, n) in enumerate(CANARY):
            data = payload(1000 + i, n)
            assert c.write(off, data) == 0
            self.shadow.write(off, data)
        c.disconnect()

    def client(self):
        c = Client(self.server.sock)
        c.go()
        assert c.size == SIZE, c.size
        return c

    def log_size(self):
        return self.server.log_path.stat().st_size

    def log_since(self, at):
        with open(self.server.log_path, "rb") as f:
            f.seek(at)
            return f.read().decode("utf-8", "replace")

    def recover(self):
        """After a failed case: restart a server that died or logged a traceback, else resynchronise the model
        (a failed case may have left the export and the shadow apart); hypothesis then shrinks on a sound base."""
        if self.server.proc.poll() is not None or "Traceback" in self.server.log():
            self.server.stop()
            self.start()
            return
        try:
            c = self.client()
            assert c.simple(m.WRITE_ZEROES, 0, SIZE) == 0
            self.shadow = m.Shadow(SIZE)
            for i, (off, n) in enumerate(CANARY):
                data = payload(1000 + i, n)
                assert c.write(off, data) == 0
                self.shadow.write(off, data)
            c.disconnect()
        except Exception:
            self.server.stop()
            self.start()

    def stop(self):
        for s in self.servers:
            rc = s.stop()
            assert rc == 0, s.log()
        assert "Traceback" not in self.server.log(), self.server.log()


@pytest.fixture(scope="module")
def targets(tmp_path_factory, fakecuda):
    made = {}

    def get(buffer_size="8M"):
        if buffer_size not in made:
            made[buffer_size] = Target(tmp_path_factory, fakecuda, buffer_size)
        return made[buffer_size]
    yield get
    for t in made.values():
        t.stop()


def exchange(path, stream, timeout=CASE_TIMEOUT_S):
    """Send the whole stream (then shut down our sending side) while reading everything until the server closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)

    def send():
        try:
            s.sendall(stream)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass                    # the server dropped us first: judged from what it sent and logged
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    try:
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except ConnectionResetError:
        pass                        # closed with our bytes unread: what it sent before is still all here
    except socket.timeout:
        raise AssertionError(f"server hung: no byte and no close for {timeout} s after "
                             f"{sum(map(len, chunks))} bytes of output") from None
    finally:
        sender.join(timeout)
        s.close()
    assert not sender.is_alive(), "the server stopped reading and did not close"
    return b"".join(chunks)


DROP_LINES = ("closing this connection", "connection lost")


class Tally:
    def __init__(self, name):
        self.name, self.cases, self.bytes, self.t0 = name, 0, 0, time.monotonic()
        self.ends = {}

    def add(self, e, n):
        self.cases += 1
        self.bytes += n
        key = re.sub(r"0x[0-9a-f]+|\d+", "N", e.why)
        self.ends[key] = self.ends.get(key, 0) + 1

    def line(self):
        top = ", ".join(f"{k}: {v}" for k, v in sorted(self.ends.items(), key=lambda kv: -kv[1])[:6])
        return (f"test_fuzz: {self.name}: {self.cases} cases, {self.bytes / MiB:.1f} MiB sent, "
                f"{time.monotonic() - self.t0:.1f} s; all survived ({top})")


def run_case(target, stream, tally, handshake=True):
    """One fuzz case against the live server, judged by the model; then a well-behaved client checks the export."""
    try:
        at = target.log_size()
        e = m.expect(stream, target.shadow, MAX_REQUEST, MAX_OPTION, handshake=handshake)
        out = exchange(target.server.sock, stream)
        m.check(e, out, SIZE, EXPORT_FLAGS, MAX_REQUEST)
        # serve's log lines are written by a thread of their own: a drop's line may come a moment
        # after the connection closed (a late line of a clean end shows in the next case's log).
        deadline = time.monotonic() + 5
        while True:
            log = target.log_since(at)
            drops = sum(line.endswith(DROP_LINES) or "connection lost" in line for line in log.splitlines())
            if e.end != "drop" or drops or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert "Traceback" not in log and "unexpected error" not in log, log
        assert target.server.proc.poll() is None, f"serve exited: {log}"
        if e.end == "drop":
            assert drops == 1, f"{e}: the server closed the connection with {drops} log lines: {log!r}"
        else:
            assert drops == 0, f"{e}: a clean end logged as a drop: {log!r}"
        probe(target, e)
        tally.add(e, len(stream))
    except BaseException:
        target.recover()
        raise


def probe(target, e):
    """A new, well-behaved client: what the case wrote and what was written before it read back right."""
    c = target.client()
    try:
        for off, n in e.uncertain:      # a write cut off mid-payload may or may not have landed: settle it
            assert c.simple(m.WRITE_ZEROES, off, n) == 0
            target.shadow.zero(off, n)
        checks = list(CANARY) + [(off, min(n, 256 * 1024)) for off, n in e.written[-4:]]
        for off, n in checks:
            err, data = c.read(off, n)
            assert err == 0 and data == target.shadow.read(off, n), f"read-back of {n} bytes at {off} differs"
    finally:
        c.disconnect()


# -- strategies --------------------------------------------------------------------------------------------

def option(opt, data=b"", magic=m.IHAVEOPT, length=None):
    return struct.pack("!QII", magic, opt, len(data) if length is None else length) + data


def info_data(name, infos):
    return struct.pack("!I", len(name)) + name + struct.pack("!H", len(infos)) + struct.pack(f"!{len(infos)}H", *infos)


ALL_OPTIONS = list(range(0, 13)) + [0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
names = st.one_of(st.binary(max_size=24), st.sampled_from([b"", b"x" * 4096, b"x" * 4097, "é".encode()]))
info_types = st.lists(st.one_of(st.integers(0, 4), st.integers(0, 0xFFFF)), max_size=6)
any_option = st.one_of(
    st.builds(option, st.sampled_from(ALL_OPTIONS), st.binary(max_size=48)),
    st.builds(lambda o, n, i: option(o, info_data(n, i)), st.sampled_from([m.OPT_INFO, m.OPT_GO]), names, info_types),
    st.builds(lambda o, n, i, cut: option(o, info_data(n, i)[:cut]), st.sampled_from([m.OPT_INFO, m.OPT_GO]),
              names, info_types, st.integers(0, 12)),                      # malformed INFO/GO data
    st.builds(lambda o, n, i, extra: option(o, info_data(n, i) + extra), st.sampled_from([m.OPT_INFO, m.OPT_GO]),
              names, info_types, st.binary(min_size=1, max_size=4)),
    st.just(option(m.OPT_LIST)),
    st.builds(lambda d: option(m.OPT_LIST, d), st.binary(min_size=1, max_size=8)),
    st.builds(lambda o, d, n: option(o, d, length=n), st.sampled_from(ALL_OPTIONS), st.binary(max_size=32),
              st.one_of(st.integers(0, 64), st.sampled_from([MAX_OPTION, MAX_OPTION + 1, 1 << 31, 2**32 - 1]),
                        st.integers(0, 2**32 - 1))),                       # a length the data disagrees with
    st.builds(lambda mg, o: option(o, magic=mg), st.integers(0, 2**64 - 1), st.sampled_from(ALL_OPTIONS)),
    st.builds(lambda o: option(o, b"\0" * MAX_OPTION), st.sampled_from([m.OPT_INFO, 99])),   # exactly the limit
    st.binary(min_size=1, max_size=40),
)
client_flags = st.one_of(st.sampled_from([0, 1, 2, 3, 3, 3]), st.sampled_from([1, 3]), st.sampled_from([3]),
                         st.integers(0, 2**32 - 1))
endings = st.one_of(
    st.just(b""),
    st.builds(lambda n, i: option(m.OPT_GO, info_data(n, i)), names, info_types),
    st.builds(lambda d: option(m.OPT_EXPORT_NAME, d), st.binary(max_size=16)),
    st.just(option(m.OPT_ABORT)),
)

HOT = 4 * MiB                   # most valid requests land here, so reads meet earlier writes
offsets = st.one_of(
    st.integers(0, HOT), st.integers(0, HOT), st.integers(SIZE - 2 * MiB, SIZE + 8192),
    st.sampled_from([0, 1, 4095, 4096, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 4096, 2**64 - 1]),
    st.integers(0, 2**64 - 1))
lengths = st.one_of(
    st.integers(1, 4096), st.integers(1, 4096), st.integers(0, 200_000),
    st.sampled_from([0, 1, 4096, 65536 - 28, 65536, 65537, 2 * MiB, 8 * MiB, 8 * MiB + 1]),
    st.sampled_from([MAX_REQUEST, MAX_REQUEST + 1, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1))
commands = st.one_of(st.sampled_from([m.READ, m.READ, m.WRITE, m.WRITE, m.WRITE, m.FLUSH, m.TRIM, m.WRITE_ZEROES,
                                      m.DISC, m.CACHE, m.BLOCK_STATUS, m.RESIZE, 9]),
                     st.integers(0, 0xFFFF))
cmd_flags = st.one_of(st.sampled_from([0, 0, 0, 0, m.FLAG_FUA, m.FLAG_NO_HOLE, m.FLAG_FUA | m.FLAG_NO_HOLE,
                                       m.FLAG_DF, m.FLAG_REQ_ONE, m.FLAG_FAST_ZERO, m.FLAG_PAYLOAD_LEN]),
                      st.integers(0, 0xFFFF))


def header(typ, flags, cookie, offset, length, magic=m.REQUEST_MAGIC):
    return struct.pack("!IHHQQI", magic, flags, typ, cookie, offset, length)


# An op is a tuple; build() turns a list of them into bytes.  Body ops keep the framing (a DISC or a write
# too long to send in full ends the stream early); a tail op ends it: a bad magic, or junk.
body_ops = st.one_of(
    st.tuples(st.just("req"), commands, cmd_flags, offsets, lengths, st.integers(0, 2**32)),
    st.tuples(st.just("req"), commands, cmd_flags, offsets, lengths, st.integers(0, 2**32)),
    st.tuples(st.just("rw"), st.integers(0, HOT), st.integers(1, 150_000), st.integers(0, 2**32)),
    st.tuples(st.just("read"), st.integers(0, HOT), st.integers(1, 150_000)),
)
tail_ops = st.one_of(
    st.none(), st.none(),
    st.tuples(st.just("badmagic"), st.integers(0, 2**32 - 1), commands),
    st.tuples(st.just("junk"), st.binary(min_size=1, max_size=40)),
)


def ops_and_tail(body, tail):
    return body + ([tail] if tail else [])


def build(op_list, cookie_base):
    parts = []
    for i, op in enumerate(op_list):
        cookie = (cookie_base + i * 0x9E3779B97F4A7C15) % 2**64
        kind = op[0]
        if kind == "req":
            _, typ, flags, offset, length, seed = op
            parts.append(header(typ, flags, cookie, offset, length))
            if typ == m.WRITE:
                if length > PAYLOAD_CAP:        # not worth sending in full: cut it off, which ends the stream
                    parts.append(payload(seed, seed % (256 * 1024)))
                    break
                parts.append(payload(seed, length))
        elif kind == "rw":
            _, offset, length, seed = op
            parts.append(header(m.WRITE, 0, cookie, offset, length) + payload(seed, length))
            parts.append(header(m.READ, 0, cookie ^ (1 << 63), offset, length))
        elif kind == "read":
            _, offset, length = op
            parts.append(header(m.READ, 0, cookie, offset, length))
        elif kind == "badmagic":
            _, magic, typ = op
            if magic == m.REQUEST_MAGIC:
                magic ^= 1
            parts.append(header(typ, 0, cookie, 0, 4096, magic=magic))
        else:
            parts.append(op[1])
    return b"".join(parts)


def handshake_go(cflags=3):
    return struct.pack("!I", cflags) + option(m.OPT_GO, info_data(b"", []))


good_handshakes = st.one_of(
    st.just(handshake_go()),
    st.builds(lambda f, n, i: struct.pack("!I", f) + option(m.OPT_GO, info_data(n, i)), st.sampled_from([1, 3]),
              names, info_types),
    st.builds(lambda f, n: struct.pack("!I", f) + option(m.OPT_EXPORT_NAME, n), st.sampled_from([0, 1, 2, 3]), names),
    st.builds(lambda f: struct.pack("!I", f) + option(m.OPT_LIST) + option(m.OPT_INFO, info_data(b"", [3]))
              + option(m.OPT_STRUCTURED_REPLY) + option(m.OPT_GO, info_data(b"", [])), st.sampled_from([1, 3])),
)

FUZZ_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example, HealthCheck.filter_too_much])


# -- (a) the handshake -------------------------------------------------------------------------------------

def test_fuzz_handshake(targets, capsys):
    """Random option streams, junk and cut-offs in the negotiation; some go on into transmission."""
    target = targets("8M")
    tally = Tally("handshake")

    @settings(max_examples=examples(500), **FUZZ_SETTINGS)
    @given(cflags=client_flags, options=st.lists(any_option, max_size=8), ending=endings,
           then=st.lists(body_ops, max_size=4), tail=tail_ops, cookie=st.integers(0, 2**64 - 1), cut=st.integers(0, 60))
    def case(cflags, options, ending, then, tail, cookie, cut):
        stream = struct.pack("!I", cflags) + b"".join(options) + ending + build(ops_and_tail(then, tail), cookie)
        if cut < 30:                                # most streams are cut somewhere near their end
            stream = stream[:max(0, len(stream) - cut)]
        run_case(target, stream, tally)

    case()
    say(capsys, tally.line())


# -- (b) the transmission phase ----------------------------------------------------------------------------

@pytest.mark.parametrize("buffer_size", ["64K", "8M"])
def test_fuzz_transmission(targets, capsys, buffer_size):
    """After a valid handshake: valid and invalid requests, huge lengths, bad magic, junk, cut-off payloads."""
    target = targets(buffer_size)
    tally = Tally(f"transmission, {buffer_size} buffers")

    @settings(max_examples=examples(300), **FUZZ_SETTINGS)
    @given(hs=good_handshakes, op_list=st.lists(body_ops, min_size=1, max_size=24), tail=tail_ops,
           cookie=st.integers(0, 2**64 - 1), cut=st.integers(0, 100))
    def case(hs, op_list, tail, cookie, cut):
        stream = build(ops_and_tail(op_list, tail), cookie)
        if cut < 20:
            stream = stream[:max(0, len(stream) - cut)]
        run_case(target, hs + stream, tally)

    case()
    say(capsys, tally.line())


def test_fuzz_transmission_pipelined_valid(targets, capsys):
    """Long pipelines of valid writes, reads, trims and zeroes: batching, compaction and the large paths."""
    target = targets("64K")
    tally = Tally("pipelined valid requests, 64K buffers")
    valid = st.one_of(
        st.tuples(st.just("rw"), st.integers(0, HOT), st.integers(1, 100_000), st.integers(0, 2**32)),
        st.tuples(st.just("read"), st.integers(0, HOT), st.integers(1, 100_000)),
        st.tuples(st.just("req"), st.sampled_from([m.TRIM, m.WRITE_ZEROES, m.FLUSH]), st.just(0),
                  st.integers(0, HOT), st.integers(1, 300_000), st.just(0)),
        st.tuples(st.just("req"), st.just(m.WRITE), st.sampled_from([0, m.FLAG_FUA]), st.integers(0, HOT),
                  st.integers(1, 300_000), st.integers(0, 2**32)),
    )

    @settings(max_examples=examples(60), **FUZZ_SETTINGS)
    @given(op_list=st.lists(valid, min_size=20, max_size=300), cookie=st.integers(0, 2**64 - 1))
    def case(op_list, cookie):
        # FLUSH must have offset and length 0 to be valid: fix those up
        fixed = [("req", m.FLUSH, 0, 0, 0, 0) if op[0] == "req" and op[1] == m.FLUSH else op for op in op_list]
        run_case(target, handshake_go() + build(fixed, cookie), tally)

    case()
    say(capsys, tally.line())


# -- resource limits not covered in test_server.py ---------------------------------------------------------

def test_option_of_exactly_max_option_bytes_is_answered(targets):
    target = targets("8M")
    c = Client(target.server.sock)
    c.send_option(99, b"\0" * MAX_OPTION)
    r = c.read_option_reply()
    assert (r.opt, r.type) == (99, m.REP_ERR | 1)
    c.go()
    assert c.size == SIZE
    assert c.read(*CANARY[0]) == (0, target.shadow.read(*CANARY[0]))
    c.disconnect()


def rss_kib(pid):
    total = 0
    for p in [str(pid)] + [d for d in os.listdir("/proc") if d.isdigit()]:
        try:
            with open(f"/proc/{p}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if p == str(pid) or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total


def test_huge_invalid_write_is_streamed_not_buffered(targets):
    """A write that declares 4 GiB - 1 bytes: its payload goes through the staging buffer, never into memory
    of its own (it is refused once read: test_server.py covers that with 40 MiB); a client that gives up in
    the middle is dropped with a log line, and the others keep being served."""
    target = targets("64K")
    c = target.client()
    base = rss_kib(target.server.proc.pid)
    c.sock.sendall(header(m.WRITE, 0, 7, 0, 2**32 - 1))
    chunk = b"\xab" * (4 * MiB)
    for i in range(64):                     # 256 MiB of it
        c.sock.sendall(chunk)
        if i % 16 == 15:
            grown = rss_kib(target.server.proc.pid) - base
            assert grown < 32 * 1024, f"serve grew by {grown} KiB while taking a 4 GiB write"
    at = target.log_size()
    c.close()
    deadline = time.monotonic() + 10
    while not any(s in target.log_since(at) for s in DROP_LINES):
        assert time.monotonic() < deadline, f"no log line for the dropped writer: {target.log_since(at)!r}"
        time.sleep(0.05)
    other = target.client()
    assert other.read(*CANARY[0]) == (0, target.shadow.read(*CANARY[0]))
    other.disconnect()


def test_client_that_never_reads_replies(targets):
    """A client pipelines 16 GiB of reads and reads none of the replies: the serving thread blocks on a full
    socket (its memory bounded by its buffers), the others keep serving, and its end frees the thread."""
    target = targets("64K")
    hog = target.client()
    base = rss_kib(target.server.proc.pid)
    req = b"".join(header(m.READ, 0, i, 0, MiB) for i in range(16384))
    hog.sock.settimeout(2)
    try:
        hog.sock.sendall(req)
    except socket.timeout:
        pass                                # the server stopped reading: its replies fill our buffer
    time.sleep(0.5)
    grown = rss_kib(target.server.proc.pid) - base
    assert grown < 32 * 1024, f"serve grew by {grown} KiB"
    other = target.client()
    assert other.read(*CANARY[1]) == (0, target.shadow.read(*CANARY[1]))
    other.disconnect()
    at = target.log_size()
    hog.close()
    deadline = time.monotonic() + 10
    while not any(s in target.log_since(at) for s in DROP_LINES):
        assert time.monotonic() < deadline, f"no log line for the hog's end: {target.log_since(at)!r}"
        time.sleep(0.05)
    c = target.client()
    c.disconnect()


# -- (c) configuration files -------------------------------------------------------------------------------

KEYS = list(nv.OPTION_BY_KEY)
conf_keys = st.one_of(st.sampled_from(KEYS), st.sampled_from([k.replace("_", "-").upper() for k in KEYS]),
                      st.sampled_from(["", "bogus", "size size", "=", "#size", "size\0", "sïze"]),
                      st.text(max_size=12))
conf_values = st.one_of(
    st.sampled_from(["512M", "7G", "1.5G", "64M", "1T", "yes", "no", "keep", "auto", "ac", "battery", "always",
                     "netlink", "-1", "0", "32767", "32768", "99" * 30, "9" * 5000, "1e9", "0x10", "\x00", "٣",
                     "1.5.5G", "inf", "nan", "= 3", "#", " # x", "GPU-" + "f" * 40, "0000:01:00.0"]),
    st.text(max_size=16),
    st.integers(-2**70, 2**70).map(str),
)
conf_lines = st.one_of(
    st.builds(lambda k, v, sep, c: f"{k}{sep}{v}{c}", conf_keys, conf_values,
              st.sampled_from([" = ", "=", " =", "\t=\t", " ", ""]), st.sampled_from(["", " # c", "\t#c", "#c"])),
    st.sampled_from(["", "# comment", "   ", "[section]", "size = 2G\nsize = 3G"]),
    st.text(max_size=60),
)
conf_files = st.one_of(
    st.lists(conf_lines, max_size=14).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
    st.lists(conf_lines, max_size=8).map(lambda ls: "\r\n".join(ls).encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),                                              # invalid UTF-8, NULs, anything
    st.builds(lambda k, n: f"{k} = {'9' * n}\n".encode(), st.sampled_from(KEYS), st.integers(1000, 200_000)),
    st.builds(lambda n: ("# " + "x" * n + "\nsize = 2G\n").encode(), st.integers(1000, 1_100_000)),  # long lines
    st.builds(lambda b, t: b + t.encode(), st.binary(max_size=8), st.sampled_from(["size = 2G\n", "debug = yes"])),
)


def judge_config(path, text):
    try:
        s, origin = nv.load_config(str(path), environ={})
    except nv.ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg, repr(msg)
        assert msg.startswith(str(path)) or msg.startswith("min_size "), msg
        if msg.startswith(f"{path}:") and msg[len(str(path)) + 1:].split(":")[0].isdigit():
            lineno = int(msg[len(str(path)) + 1:].split(":")[0])
            assert 1 <= lineno <= text.count(b"\n") + text.count(b"\r") + 1, msg
        return "error"
    assert set(s) == set(nv.OPTION_BY_KEY) and s["min_size"] <= s["size"]
    for key, where in origin.items():
        assert where == "default" or where.startswith(f"{path}:"), (key, where)
    return "ok"


def test_fuzz_config_files(tmp_path, capsys):
    """Random bytes as /etc/nbd-vram.conf: load_config either returns every setting or raises one ConfigError
    on one line that names the file (and the line where there is one); never anything else."""
    t0, counts = time.monotonic(), {"ok": 0, "error": 0}
    path = tmp_path / "fuzz.conf"

    @settings(max_examples=examples(1500), **FUZZ_SETTINGS)
    @given(text=conf_files)
    def case(text):
        path.write_bytes(text)
        counts[judge_config(path, text)] += 1

    case()
    say(capsys, f"test_fuzz: config files (load_config): {sum(counts.values())} cases, "
                f"{time.monotonic() - t0:.1f} s; {counts['ok']} valid, {counts['error']} one-line ConfigErrors")


def test_fuzz_check_config_command(tmp_path, capsys):
    """The same through `nbd_vram.py check-config --config FILE` (a process per case, so fewer cases): exit 0
    and every setting printed, or exit 4 and one line on stderr; never a traceback."""
    t0, counts = time.monotonic(), {0: 0, 4: 0}
    path = tmp_path / "fuzz.conf"

    @settings(max_examples=examples(25), **FUZZ_SETTINGS)
    @given(text=conf_files)
    def case(text):
        path.write_bytes(text)
        p = subprocess.run([sys.executable, str(SCRIPT), "check-config", "--config", str(path)],
                           capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
        err = p.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, err
        assert p.returncode in (0, 4), (p.returncode, err)
        if p.returncode == 0:
            assert len(p.stdout.decode().splitlines()) == len(KEYS) and err == ""
        else:
            assert p.stdout == b"" and len(err.strip().splitlines()) == 1, err
        counts[p.returncode] += 1

    case()
    say(capsys, f"test_fuzz: config files (check-config): {sum(counts.values())} cases, "
                f"{time.monotonic() - t0:.1f} s; {counts[0]} exit 0, {counts[4]} exit 4 with one line")
