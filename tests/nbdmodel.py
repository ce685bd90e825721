"""A reference model of an NBD server, written from proto.md rather than from nbd_vram.py: the fuzz oracle.

expect(stream, ...) reads the bytes a client sends the way a fixed-newstyle server with simple replies must,
and says what the server has to answer: a reply (or a choice of replies) for every option and every request,
the data every read returns, and whether the connection ends cleanly (EOF at a request boundary,
NBD_OPT_ABORT, NBD_CMD_DISC) or is dropped (framing lost: bad magic, unknown client flags, an oversized
option, a stream cut in the middle of something).  check(expectation, output) then holds the bytes the server
really sent against it.

Where the spec leaves the server a choice, the model accepts any of them; where it leaves none, the model
accepts exactly one answer.  Policies of this server that the spec allows but does not require are marked
"(policy)": any export name selects the one export, a trimmed range reads back as zeroes, an option over
max_option bytes or unknown client flags end the connection.

The model's view of the export (Shadow) is changed as the requests are parsed, which is the order the
server must apply them in; reads snapshot it at that point.  Writes cut off by the end of the stream may or
may not have landed: they are listed in Expectation.uncertain for the caller to overwrite.
"""
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2                    # handshake flags (server and client)
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_PEEK_EXPORT, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 4, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR = 1 << 31
REP_ERRORS = {REP_ERR | i for i in range(1, 10)}              # ERR_UNSUP .. ERR_TOO_BIG
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, RESIZE = range(9)
CMD_NAMES = {READ: "READ", WRITE: "WRITE", DISC: "DISC", FLUSH: "FLUSH", TRIM: "TRIM", CACHE: "CACHE",
             WRITE_ZEROES: "WRITE_ZEROES", BLOCK_STATUS: "BLOCK_STATUS", RESIZE: "RESIZE"}
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN = 1, 2, 4, 8, 16, 32
# Transmission flags
TX_HAS_FLAGS, TX_READ_ONLY, TX_SEND_FLUSH, TX_SEND_FUA, TX_SEND_TRIM, TX_SEND_WRITE_ZEROES, TX_SEND_DF = (
    1, 2, 4, 8, 32, 64, 128)

# The error numbers proto.md allows in a reply.
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
NBD_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

REQUEST = struct.Struct("!IHHQQI")
REQ_SIZE = REQUEST.size
OPTION = struct.Struct("!QII")


class Shadow:
    """What the export must hold."""

    def __init__(self, size):
        self.size = size
        self.data = bytearray(size)

    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data

    def zero(self, offset, length):
        self.data[offset:offset + length] = bytes(length)

    def read(self, offset, length):
        return bytes(self.data[offset:offset + length])


class Request:
    __slots__ = ("cookie", "typ", "flags", "offset", "length", "allowed", "data", "index")

    def __init__(self, index, cookie, typ, flags, offset, length, allowed, data):
        self.index, self.cookie, self.typ, self.flags, self.offset, self.length = index, cookie, typ, flags, offset, length
        self.allowed, self.data = allowed, data        # allowed error numbers (0: success); data a read returns

    def __repr__(self):
        name = CMD_NAMES.get(self.typ, f"cmd{self.typ}")
        return (f"#{self.index} {name} flags={self.flags:#x} offset={self.offset} length={self.length} "
                f"cookie={self.cookie:#x} allowed={sorted(self.allowed)}")


class Expectation:
    def __init__(self):
        self.cflags = None
        self.no_zeroes = False
        self.options = []           # (option, what the server must answer: err|list|info|go|abort|export_name, data)
        self.transmission = False   # the stream reached the transmission phase
        self.requests = []          # Request, in stream order: each needs exactly one reply
        self.end = None             # "clean" or "drop"
        self.why = ""               # what ended it
        self.uncertain = []         # (offset, length) of writes cut off by the end of the stream
        self.written = []           # (offset, length) of writes/zeroes/trims that must have landed

    def __repr__(self):
        return (f"Expectation(options={[o[:2] for o in self.options]}, transmission={self.transmission}, "
                f"{len(self.requests)} requests, end={self.end} ({self.why}))")


def request_errors(typ, flags, offset, length, size, max_request):
    """The set of replies proto.md allows for one request (0 is success) on this export.

    Hard faults (the request cannot be carried out) allow only their errors; soft ones (a zero length, a
    FLUSH with an offset or length: behaviour the spec leaves open) allow success or EINVAL."""
    if typ not in (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES):
        return {EINVAL}                        # unknown, or not advertised (CACHE, BLOCK_STATUS, RESIZE)
    hard, soft = set(), False
    allowed_flags = FLAG_FUA | (FLAG_NO_HOLE if typ == WRITE_ZEROES else 0)
    if flags & ~allowed_flags:
        hard.add(EINVAL)                       # DF needs structured replies; FAST_ZERO was not advertised
    if typ == FLUSH:
        soft = bool(offset or length)
    else:
        if length == 0:
            soft = True
        if offset + length > size:
            hard |= {ENOSPC, EINVAL} if typ in (WRITE, WRITE_ZEROES) else {EINVAL}
        if typ in (READ, WRITE) and length > max_request:
            hard |= {EINVAL, EOVERFLOW}
    if hard:
        return hard | ({EINVAL} if soft else set())
    return {0, EINVAL} if soft else {0}


class _Stream:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def left(self):
        return len(self.data) - self.pos

    def take(self, n):
        """n bytes, or None (and the rest consumed) if the stream ends first."""
        if self.left() < n:
            self.pos = len(self.data)
            return None
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _parse_info_request(data):
    if len(data) < 6:
        return None
    (nlen,) = struct.unpack_from("!I", data)
    if len(data) < 4 + nlen + 2:
        return None
    (count,) = struct.unpack_from("!H", data, 4 + nlen)
    if len(data) != 4 + nlen + 2 + 2 * count:
        return None
    return data[4:4 + nlen], set(struct.unpack_from(f"!{count}H", data, 6 + nlen))


def expect(stream, shadow, max_request, max_option, handshake=True):
    """What a correct server answers to `stream`; the shadow is updated for every request that must succeed."""
    e = Expectation()
    s = _Stream(bytes(stream))
    if handshake:
        raw = s.take(4)
        if raw is None:
            e.end, e.why = "drop", "stream ended in the client flags"
            return e
        (e.cflags,) = struct.unpack("!I", raw)
        if e.cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            e.end, e.why = "drop", f"unknown client flags {e.cflags:#x}"       # (policy) proto.md: MAY close
            return e
        e.no_zeroes = bool(e.cflags & FLAG_NO_ZEROES)
        while True:
            hdr = s.take(OPTION.size)
            if hdr is None:
                e.end, e.why = "drop", "stream ended in the negotiation"
                return e
            magic, opt, length = OPTION.unpack(hdr)
            if magic != IHAVEOPT:
                e.end, e.why = "drop", f"bad option magic {magic:#x}"
                return e
            if length > max_option:
                e.end, e.why = "drop", f"option of {length} bytes"              # (policy)
                return e
            data = s.take(length)
            if data is None:
                e.end, e.why = "drop", "stream ended in option data"
                return e
            if opt == OPT_EXPORT_NAME:
                e.options.append((opt, "export_name", data))                      # (policy) any name
                break
            if opt == OPT_ABORT:
                e.options.append((opt, "abort", data))
                e.end, e.why = "clean", "NBD_OPT_ABORT"
                return e
            if opt == OPT_LIST:
                e.options.append((opt, "err" if length else "list", data))
                continue
            if opt in (OPT_INFO, OPT_GO):
                parsed = _parse_info_request(data)
                if parsed is None or len(parsed[0]) > 4096:
                    e.options.append((opt, "err", data))
                    continue
                e.options.append((opt, "info", parsed))                           # (policy) any name
                if opt == OPT_GO:
                    break
                continue
            # STARTTLS, STRUCTURED_REPLY, the meta contexts, EXTENDED_HEADERS, PEEK_EXPORT, unknown: none
            # is supported, and a server that does not support an option must answer an error.
            e.options.append((opt, "err", data))
    e.transmission = True
    size = shadow.size
    index = 0
    while True:
        if s.left() == 0:
            e.end, e.why = "clean", "EOF at a request boundary"
            return e
        hdr = s.take(REQ_SIZE)
        if hdr is None:
            e.end, e.why = "drop", "stream ended in a request header"
            return e
        magic, flags, typ, cookie, offset, length = REQUEST.unpack(hdr)
        if magic != REQUEST_MAGIC:
            e.end, e.why = "drop", f"bad request magic {magic:#x}"
            return e
        if typ == DISC:
            e.end, e.why = "clean", "NBD_CMD_DISC"
            return e
        allowed = request_errors(typ, flags, offset, length, size, max_request)
        payload = None
        if typ == WRITE:
            payload = s.take(length)
            if payload is None:
                if 0 in allowed and length:
                    e.uncertain.append((offset, length))
                e.end, e.why = "drop", f"stream ended in the payload of a {length}-byte write"
                return e
        data = None
        if 0 in allowed:            # (a zero-length request, allowed to succeed, changes nothing)
            if typ == WRITE and length:
                shadow.write(offset, payload)
                e.written.append((offset, length))
            elif typ in (TRIM, WRITE_ZEROES) and length:
                shadow.zero(offset, length)                                   # (policy) TRIM reads back zeroes
                e.written.append((offset, length))
            elif typ == READ:
                data = shadow.read(offset, length)
        e.requests.append(Request(index, cookie, typ, flags, offset, length, allowed, data))
        index += 1


class OutputError(AssertionError):
    pass


class _Out:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n, what):
        if len(self.data) - self.pos < n:
            raise OutputError(f"server output ends at byte {len(self.data)} in {what} "
                              f"(needed {n} bytes at {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def check(e, output, size, export_flags, max_request):
    """Hold the server's output against the expectation; raises OutputError (an AssertionError) if it is wrong."""
    out = _Out(bytes(output))
    magic, opt_magic, hflags = struct.unpack("!QQH", out.take(18, "the greeting"))
    if (magic, opt_magic) != (NBDMAGIC, IHAVEOPT) or not hflags & FLAG_FIXED_NEWSTYLE:
        raise OutputError(f"bad greeting {magic:#x} {opt_magic:#x} flags {hflags:#x}")
    if e.no_zeroes and not hflags & FLAG_NO_ZEROES:
        raise OutputError("client asked for NO_ZEROES that the server never offered")
    for opt, kind, data in e.options:
        if kind == "export_name":
            esize, eflags = struct.unpack("!QH", out.take(10, "the NBD_OPT_EXPORT_NAME reply"))
            _check_export(esize, eflags, size, export_flags)
            if not e.no_zeroes:
                pad = out.take(124, "the NBD_OPT_EXPORT_NAME padding")
                if pad != bytes(124):
                    raise OutputError("NBD_OPT_EXPORT_NAME padding is not zeroes")
            continue
        seen_export = False
        servers = 0
        while True:
            rmagic, ropt, rtype, rlen = struct.unpack("!QIII", out.take(20, f"a reply to option {opt}"))
            if rmagic != REP_MAGIC:
                raise OutputError(f"option {opt}: reply magic {rmagic:#x}")
            if ropt != opt:
                raise OutputError(f"option {opt}: the reply names option {ropt}")
            rdata = out.take(rlen, f"the {rlen}-byte reply data to option {opt}")
            if rtype & REP_ERR:
                if rtype not in REP_ERRORS:
                    raise OutputError(f"option {opt}: unknown error reply {rtype:#x}")
                if kind != "err":
                    raise OutputError(f"option {opt} ({kind}): error reply {rtype:#x} {rdata!r}")
                try:
                    rdata.decode("utf-8")
                except UnicodeDecodeError:
                    raise OutputError(f"option {opt}: error message is not UTF-8: {rdata!r}") from None
                break
            if kind == "err":
                raise OutputError(f"option {opt}: reply {rtype} where an error was due")
            if rtype == REP_ACK:
                if rlen:
                    raise OutputError(f"option {opt}: NBD_REP_ACK with {rlen} bytes of data")
                if kind == "info" and not seen_export:
                    raise OutputError(f"option {opt}: NBD_REP_ACK without NBD_INFO_EXPORT")
                break
            if rtype == REP_SERVER and kind == "list":
                if rlen < 4 or struct.unpack_from("!I", rdata)[0] > rlen - 4:
                    raise OutputError(f"NBD_REP_SERVER malformed: {rdata!r}")
                servers += 1
                continue
            if rtype == REP_INFO and kind == "info":
                if rlen < 2:
                    raise OutputError(f"option {opt}: NBD_REP_INFO of {rlen} bytes")
                (itype,) = struct.unpack_from("!H", rdata)
                if itype == INFO_EXPORT:
                    if rlen != 12:
                        raise OutputError(f"NBD_INFO_EXPORT of {rlen} bytes")
                    _check_export(*struct.unpack_from("!QH", rdata, 2), size, export_flags)
                    seen_export = True
                elif itype == INFO_BLOCK_SIZE:
                    if rlen != 14:
                        raise OutputError(f"NBD_INFO_BLOCK_SIZE of {rlen} bytes")
                    mn, pref, mx = struct.unpack_from("!III", rdata, 2)
                    if not (mn & (mn - 1) == 0 and mn <= pref and pref & (pref - 1) == 0 and mx >= pref
                            and mx >= max_request):
                        raise OutputError(f"NBD_INFO_BLOCK_SIZE {mn} {pref} {mx}")
                elif itype in (INFO_NAME, INFO_DESCRIPTION):
                    try:
                        rdata[2:].decode("utf-8")
                    except UnicodeDecodeError:
                        if itype == INFO_DESCRIPTION:
                            raise OutputError(f"NBD_INFO_DESCRIPTION is not UTF-8: {rdata!r}") from None
                else:
                    raise OutputError(f"option {opt}: unknown info type {itype}")
                continue
            raise OutputError(f"option {opt} ({kind}): unexpected reply type {rtype:#x}")
        if kind == "list" and servers == 0:
            raise OutputError("NBD_OPT_LIST: no NBD_REP_SERVER for the export")
    # Transmission: simple replies, matched to requests by cookie (the spec allows any order).
    waiting = {}
    for r in e.requests:
        waiting.setdefault(r.cookie, []).append(r)
    answered = 0
    while answered < len(e.requests):
        magic, err, cookie = struct.unpack("!IIQ", out.take(16, f"reply {answered + 1} of {len(e.requests)}"))
        if magic != SIMPLE_REPLY_MAGIC:
            raise OutputError(f"reply {answered + 1}: magic {magic:#x}")
        pending = waiting.get(cookie)
        if not pending:
            raise OutputError(f"reply {answered + 1}: cookie {cookie:#x} answers no request in flight")
        r = pending.pop(0)
        if err and err not in NBD_ERRORS:
            raise OutputError(f"{r}: error {err} is not one proto.md allows")
        if err not in r.allowed:
            raise OutputError(f"{r}: replied {err}")
        if r.typ == READ and err == 0:
            got = out.take(r.length, f"the data of {r}")
            if got != r.data:
                first = next(i for i in range(len(got)) if got[i] != r.data[i])
                raise OutputError(f"{r}: wrong data from byte {first} (offset {r.offset + first}): "
                                  f"got {got[first:first + 16].hex()} want {r.data[first:first + 16].hex()}")
        answered += 1
    if out.pos != len(out.data):
        raise OutputError(f"{len(out.data) - out.pos} bytes after the last reply due: "
                          f"{out.data[out.pos:out.pos + 32].hex()} ({e})")


def _check_export(esize, eflags, size, export_flags):
    if esize != size:
        raise OutputError(f"export size {esize}, want {size}")
    if eflags != export_flags:
        raise OutputError(f"transmission flags {eflags:#x}, want {export_flags:#x}")
