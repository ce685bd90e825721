"""A small NBD client for the tests: fixed newstyle, simple replies, raw access for hostile cases."""
import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
FLAG_FUA, FLAG_NO_HOLE = 1, 2


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


class OptionReply:
    def __init__(self, opt, rtype, data):
        self.opt, self.type, self.data = opt, rtype, data


class Client:
    def __init__(self, path, connect=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.cookie = 0
        self.size = self.flags = None
        if connect:
            self.greet()

    def greet(self, client_flags=3):
        magic, opt, hflags = struct.unpack("!QQH", recv_exact(self.sock, 18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, (hex(magic), hex(opt))
        self.handshake_flags = hflags
        self.sock.sendall(struct.pack("!I", client_flags))

    def send_option(self, opt, data=b""):
        self.sock.sendall(struct.pack("!QII", IHAVEOPT, opt, len(data)) + data)

    def read_option_reply(self):
        magic, opt, rtype, length = struct.unpack("!QIII", recv_exact(self.sock, 20))
        assert magic == REP_MAGIC, hex(magic)
        return OptionReply(opt, rtype, recv_exact(self.sock, length))

    def go(self, name=b"", infos=(), opt=7):
        self.send_option(opt, struct.pack("!I", len(name)) + name + struct.pack("!H", len(infos))
                         + b"".join(struct.pack("!H", i) for i in infos))
        replies = []
        while True:
            r = self.read_option_reply()
            replies.append(r)
            if r.type == 3 and struct.unpack_from("!H", r.data)[0] == 0:
                _, self.size, self.flags = struct.unpack("!HQH", r.data)
            if r.type != 3:
                return replies

    def request(self, typ, offset, length, flags=0, payload=b"", cookie=None):
        if cookie is None:
            self.cookie += 1
            cookie = self.cookie
        self.sock.sendall(struct.pack("!IHHQQI", REQUEST_MAGIC, flags, typ, cookie, offset, length) + payload)
        return cookie

    def reply(self, data_len=0):
        magic, error, cookie = struct.unpack("!IIQ", recv_exact(self.sock, 16))
        assert magic == REPLY_MAGIC, hex(magic)
        data = recv_exact(self.sock, data_len) if (data_len and error == 0) else b""
        return error, cookie, data

    def write(self, offset, data, flags=0):
        c = self.request(WRITE, offset, len(data), flags, data)
        err, cookie, _ = self.reply()
        assert cookie == c
        return err

    def read(self, offset, length):
        c = self.request(READ, offset, length)
        err, cookie, data = self.reply(length)
        assert cookie == c
        return err, data

    def simple(self, typ, offset=0, length=0, flags=0):
        c = self.request(typ, offset, length, flags)
        err, cookie, _ = self.reply()
        assert cookie == c
        return err

    def disconnect(self):
        try:
            self.request(DISC, 0, 0)
        finally:
            self.sock.close()

    def close(self):
        self.sock.close()
