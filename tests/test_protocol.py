"""NBD protocol units without a server: request validation, NBD_OPT_INFO/GO parsing, sizes, the handshake."""
import socket
import struct
import threading
import types

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import load_module

nv = load_module()      # module level: hypothesis strategies below need its constants

MiB = 1 << 20
SIZE = 64 * MiB         # export size for the check_request table (above MAX_REQUEST)
NBD_ERRNOS = {nv.NBD_EPERM, nv.NBD_EIO, nv.NBD_ENOMEM, nv.NBD_EINVAL, nv.NBD_ENOSPC, nv.NBD_EOVERFLOW}
C, F = nv.Cmd, nv.CmdFlag
OK, EINVAL, ENOSPC = 0, 22, 28


# -- check_request ----------------------------------------------------------------------------------------

CASES = [
    # (id, type, flags, offset, length, expected NBD error)
    ("read-first-byte", C.READ, 0, 0, 1, OK),
    ("read-last-byte", C.READ, 0, SIZE - 1, 1, OK),
    ("read-whole-max", C.READ, 0, 0, nv.MAX_REQUEST, OK),
    ("read-max+1", C.READ, 0, 0, nv.MAX_REQUEST + 1, EINVAL),
    ("read-one-past-end", C.READ, 0, SIZE, 1, EINVAL),
    ("read-straddles-end", C.READ, 0, SIZE - 1, 2, EINVAL),
    ("read-offset-far-past-end", C.READ, 0, SIZE + 4096, 4096, EINVAL),
    ("read-overflow-u64", C.READ, 0, 2**64 - 1, 2, EINVAL),
    ("read-overflow-near-2**64", C.READ, 0, 2**64 - 4096, 4096, EINVAL),
    ("read-len-0", C.READ, 0, 0, 0, EINVAL),
    ("read-len-0-at-end", C.READ, 0, SIZE, 0, EINVAL),
    ("read-fua", C.READ, F.FUA, 0, 4096, OK),              # proto.md: FUA MUST be accepted on every command
    ("read-df", C.READ, F.DF, 0, 4096, EINVAL),            # DF needs structured replies, never negotiated
    ("read-no-hole", C.READ, F.NO_HOLE, 0, 4096, EINVAL),
    ("read-unknown-flag", C.READ, 1 << 15, 0, 4096, EINVAL),
    ("write-ok", C.WRITE, 0, 4096, 4096, OK),
    ("write-fua", C.WRITE, F.FUA, 0, 4096, OK),
    ("write-last-byte", C.WRITE, 0, SIZE - 1, 1, OK),
    ("write-max", C.WRITE, 0, SIZE - nv.MAX_REQUEST, nv.MAX_REQUEST, OK),
    ("write-max+1", C.WRITE, 0, 0, nv.MAX_REQUEST + 1, EINVAL),
    ("write-one-past-end", C.WRITE, 0, SIZE, 1, ENOSPC),
    ("write-straddles-end", C.WRITE, 0, SIZE - 4095, 4096, ENOSPC),
    ("write-overflow-u64", C.WRITE, 0, 2**64 - 1, 0xFFFFFFFF, ENOSPC),
    ("write-len-0", C.WRITE, 0, 0, 0, EINVAL),
    ("write-no-hole", C.WRITE, F.NO_HOLE, 0, 4096, EINVAL),
    ("write-fast-zero", C.WRITE, F.FAST_ZERO, 0, 4096, EINVAL),
    ("flush", C.FLUSH, 0, 0, 0, OK),
    ("flush-fua", C.FLUSH, F.FUA, 0, 0, OK),                # old qemu sends FLUSH|FUA
    ("flush-offset", C.FLUSH, 0, 4096, 0, EINVAL),
    ("flush-length", C.FLUSH, 0, 0, 4096, EINVAL),
    ("flush-unknown-flag", C.FLUSH, F.NO_HOLE, 0, 0, EINVAL),
    ("trim", C.TRIM, 0, 0, SIZE, OK),                       # no MAX_REQUEST limit: no payload
    ("trim-fua", C.TRIM, F.FUA, 4096, 4096, OK),
    ("trim-past-end", C.TRIM, 0, SIZE, 1, EINVAL),
    ("trim-len-0", C.TRIM, 0, 0, 0, EINVAL),
    ("trim-no-hole", C.TRIM, F.NO_HOLE, 0, 4096, EINVAL),
    ("zeroes", C.WRITE_ZEROES, 0, 0, nv.MAX_REQUEST + 1, OK),
    ("zeroes-fua-no-hole", C.WRITE_ZEROES, F.FUA | F.NO_HOLE, 0, 4096, OK),
    ("zeroes-past-end", C.WRITE_ZEROES, 0, SIZE - 1, 2, ENOSPC),
    ("zeroes-overflow", C.WRITE_ZEROES, 0, 2**64 - 1, 1, ENOSPC),
    ("zeroes-len-0", C.WRITE_ZEROES, 0, 0, 0, EINVAL),
    ("zeroes-fast-zero", C.WRITE_ZEROES, F.FAST_ZERO, 0, 4096, EINVAL),
    ("disc-bad-flag", C.DISC, F.NO_HOLE, 0, 0, EINVAL),
    ("cache-unsupported", C.CACHE, 0, 0, 4096, EINVAL),
    ("block-status-unsupported", C.BLOCK_STATUS, 0, 0, 4096, EINVAL),
    ("resize-unsupported", C.RESIZE, 0, 0, 4096, EINVAL),
    ("unknown-9", 9, 0, 0, 4096, EINVAL),
    ("unknown-65535", 0xFFFF, 0, 0, 4096, EINVAL),
]


@pytest.mark.parametrize("typ,flags,offset,length,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_request_table(typ, flags, offset, length, want):
    err, why = nv.check_request(typ, flags, offset, length, SIZE)
    assert err == want, why
    if want:
        assert isinstance(why, str) and why
    else:
        assert why is None


def test_check_request_empty_export():
    assert nv.check_request(C.READ, 0, 0, 1, 0)[0] == EINVAL
    assert nv.check_request(C.WRITE, 0, 0, 1, 0)[0] == ENOSPC
    assert nv.check_request(C.FLUSH, 0, 0, 0, 0)[0] == OK


@settings(max_examples=3000, deadline=None)
@given(typ=st.integers(0, 0xFFFF), flags=st.integers(0, 0xFFFF), offset=st.integers(0, 2**64 - 1),
       length=st.integers(0, 2**32 - 1), size=st.sampled_from([0, 1, 4096, SIZE, 2**40, 2**63]))
def test_check_request_never_raises(typ, flags, offset, length, size):
    err, why = nv.check_request(typ, flags, offset, length, size)
    if err == 0:
        assert why is None
        # Anything accepted really is inside the export and within the limits.
        assert typ in (C.READ, C.WRITE, C.FLUSH, C.TRIM, C.WRITE_ZEROES, C.DISC)
        if typ != C.FLUSH:
            assert 0 < length and offset + length <= size
        if typ in (C.READ, C.WRITE):
            assert length <= nv.MAX_REQUEST
    else:
        assert err in NBD_ERRNOS and isinstance(why, str)


# -- _parse_info_request -----------------------------------------------------------------------------------

def info_request(name=b"", infos=()):
    return struct.pack("!I", len(name)) + name + struct.pack("!H", len(infos)) + struct.pack(f"!{len(infos)}H", *infos)


@pytest.mark.parametrize("data,want", [
    (info_request(), (b"", set())),
    (info_request(b"exp", [3]), (b"exp", {3})),
    (info_request(b"", [0, 1, 2, 3, 3]), (b"", {0, 1, 2, 3})),
    (info_request(b"x" * 4096, [1]), (b"x" * 4096, {1})),
    (b"", None),
    (b"\0\0\0\0\0", None),                                  # count cut short
    (info_request(b"x" * 4097), None),                      # name longer than the spec's 4096
    (struct.pack("!I", 10) + b"abc", None),                 # name length beyond the data
    (info_request(b"a", [3])[:-1], None),                   # info list cut short
    (info_request(b"a", [3]) + b"\0", None),                # trailing byte
    (struct.pack("!I", 0xFFFFFFFF) + b"\0\0", None),
    (info_request(b"", [1])[:-2] + struct.pack("!H", 2) + b"\0\1", None),   # count says 2, one given
], ids=lambda v: repr(v)[:40])
def test_parse_info_request(data, want):
    got = nv._parse_info_request(data)
    if want is None:
        assert got is None
    else:
        assert got is not None and (bytes(got[0]), set(got[1])) == want


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_parse_info_request_arbitrary_bytes(data):
    got = nv._parse_info_request(data)
    assert got is None or (isinstance(got, tuple) and len(got) == 2)


@settings(max_examples=500, deadline=None)
@given(name=st.binary(max_size=4096), infos=st.lists(st.integers(0, 0xFFFF), max_size=50))
def test_parse_info_request_round_trip(name, infos):
    got = nv._parse_info_request(info_request(name, infos))
    assert got is not None
    assert bytes(got[0]) == name and set(got[1]) == set(infos)


# -- parse_size --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("512M", 512 * MiB), ("7G", 7 << 30), ("7168", 7168 * MiB), ("1.5G", 3 << 29), ("64m", 64 * MiB),
    ("1T", 1 << 40), ("64K", 64 << 10), ("2GiB", 2 << 30), ("256MB", 256 * MiB), (" 8G ", 8 << 30), (512, 512 * MiB),
])
def test_parse_size(text, want):
    assert nv.parse_size(text) == want


@pytest.mark.parametrize("text", ["", "G", "-1G", "1.5.5G", "12X", "7 G G", "0x10", "1e3", "one", "1G2", "9" * 400, "99999999999T"],
                         ids=lambda t: t[:12])
def test_parse_size_bad(text):
    with pytest.raises(ValueError):
        nv.parse_size(text)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=30))
def test_parse_size_never_raises_anything_else(text):
    try:
        v = nv.parse_size(text)
    except ValueError:
        return
    assert isinstance(v, int) and v >= 0


# -- negotiate, driven over a socketpair ------------------------------------------------------------------

EXPORT = types.SimpleNamespace(size=SIZE, flags=nv.EXPORT_FLAGS, name="", description="test export")


def run_negotiate(client_bytes, timeout=10):
    """Feed client_bytes to nv.negotiate; return (result or exception, everything the server sent)."""
    ours, theirs = socket.socketpair()
    result, received = {}, []

    def server():
        try:
            result["value"] = nv.negotiate(theirs, EXPORT)
        except BaseException as e:      # judged by the test, not here
            result["value"] = e
        finally:
            theirs.close()

    def drain():
        while True:
            try:
                chunk = ours.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            received.append(chunk)

    threads = [threading.Thread(target=server, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    try:
        ours.sendall(client_bytes)
        ours.shutdown(socket.SHUT_WR)
    except OSError:
        pass                            # the server hung up first
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "negotiate hung"
    ours.close()
    assert "value" in result
    return result["value"], b"".join(received)


def option(opt, data=b"", magic=nv.IHAVEOPT, length=None):
    return struct.pack("!QII", magic, opt, len(data) if length is None else length) + data


def parse_replies(data):
    """The greeting, then option replies up to the first thing that is not one."""
    assert data[:18] == struct.pack("!QQH", nv.NBDMAGIC, nv.IHAVEOPT, 3)
    out, off = [], 18
    while off + 20 <= len(data):
        magic, opt, rtype, n = struct.unpack_from("!QIII", data, off)
        if magic != nv.NBD_REP_MAGIC:
            break
        out.append((opt, rtype, data[off + 20:off + 20 + n]))
        off += 20 + n
    return out, data[off:]


def test_negotiate_go():
    res, data = run_negotiate(struct.pack("!I", 3) + option(nv.Opt.GO, info_request(b"", [nv.Info.BLOCK_SIZE])))
    assert res is True
    replies, rest = parse_replies(data)
    assert [r[1] for r in replies] == [nv.Rep.INFO, nv.Rep.INFO, nv.Rep.ACK] and rest == b""
    assert struct.unpack("!HQH", replies[0][2]) == (0, SIZE, nv.EXPORT_FLAGS)
    assert struct.unpack("!HIII", replies[1][2]) == (3, 1, 4096, 32 * MiB)


def test_negotiate_unknown_option_then_abort():
    res, data = run_negotiate(struct.pack("!I", 3) + option(99, b"junk") + option(nv.Opt.ABORT))
    assert res is False
    replies, _ = parse_replies(data)
    assert [(r[0], r[1]) for r in replies] == [(99, nv.Rep.ERR_UNSUP), (nv.Opt.ABORT, nv.Rep.ACK)]


def test_negotiate_export_name_zero_padding():
    res, data = run_negotiate(struct.pack("!I", 1) + option(nv.Opt.EXPORT_NAME, b"any"))
    assert res is True
    assert data[18:] == struct.pack("!QH", SIZE, nv.EXPORT_FLAGS) + bytes(124)


@pytest.mark.parametrize("client_bytes", [
    b"", b"\0\0", struct.pack("!I", 0xFF),                                 # short, unknown client flags
    struct.pack("!I", 3) + option(7, magic=0x1234),                       # bad option magic
    struct.pack("!I", 3) + option(7, length=nv.MAX_OPTION + 1),            # oversized option
    struct.pack("!I", 3) + option(7, b"ab", length=100),                   # truncated option data
    struct.pack("!I", 3) + option(3),                                      # LIST, then EOF
])
def test_negotiate_bad_clients_raise_protocol_error(client_bytes):
    res, _ = run_negotiate(client_bytes)
    assert isinstance(res, nv.ProtocolError), res


KNOWN_OPTS = [int(o) for o in nv.Opt]
option_strategy = st.one_of(
    # well-formed options, some with valid INFO/GO payloads
    st.builds(lambda o, d: option(o, d), st.sampled_from(KNOWN_OPTS), st.binary(max_size=64)),
    st.builds(lambda o, n, i: option(o, info_request(n, i)), st.sampled_from([nv.Opt.INFO, nv.Opt.GO]),
              st.binary(max_size=16), st.lists(st.integers(0, 5), max_size=6)),
    st.builds(lambda o, d: option(o, d), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    # a declared length that disagrees with the data, or a wrong magic
    st.builds(lambda o, d, n: option(o, d, length=n), st.integers(0, 2**32 - 1), st.binary(max_size=32),
              st.integers(0, 2**32 - 1)),
    st.builds(lambda m, o: option(o, magic=m), st.integers(0, 2**64 - 1), st.integers(0, 20)),
    st.binary(min_size=1, max_size=40),                                     # plain garbage
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cflags=st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 2**32 - 1)),
       options=st.lists(option_strategy, max_size=8))
def test_negotiate_fuzz(cflags, options):
    res, data = run_negotiate(struct.pack("!I", cflags) + b"".join(options))
    assert res is True or res is False or isinstance(res, (nv.ProtocolError, OSError)), repr(res)
    assert data.startswith(struct.pack("!QQH", nv.NBDMAGIC, nv.IHAVEOPT, 3))
