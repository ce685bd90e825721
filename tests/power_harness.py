#!/usr/bin/env python3
"""`nbd_vram.py run` with the kernel's part played by this script, for tests of the power policy
and of a restart after a crash, on machines without the nbd driver (this CPU machine with the fake libcuda, the GPU machine with
the real one).  Everything else is the daemon's own code: config, power readings, VRAM, worker
processes, sd_notify, the re-exec that drops the GPU, status.  The kernel tests
(tests/vm/guest-power.sh) run the same policy against the real nbd driver.

Stand-ins:
- attach: keeps the kernel's ends of the socketpairs and answers nothing on them; it can send one
  NBD write and read back the pattern through a worker (HARNESS_PROBE=1) to show that VRAM is served;
  "disconnect" closes them, so the workers see the end of the stream and exit, as with the kernel.
  Under NBD_VRAM_SYSFS_ROOT it writes sys/block/nbd99/{pid,backend}, as the kernel shows a device.
- reattach (NBD_CMD_RECONFIGURE after a crash): takes the new sockets and reads back, through the
  new worker, the pattern the first probe wrote ("probe kept ok": the VRAM outlived the daemon).
- mkswap/swapon/swapoff: a line each in HARNESS_EVENTS; swapoff fails while the file
  HARNESS_SWAPOFF_FAILS exists (RAM that cannot take the pages back).
- With HARNESS_FREE_EVENT=1, freeing the VRAM is a line too ("free VRAM"), for tests of the
  teardown order.  (cryptsetup, for encrypt = yes, is whatever the PATH has: tests put a stub there.)
Re-execs run this script again (the daemon re-executes sys.argv[0]), so the stand-ins stay in place.
HARNESS_OOM_AFTER_RELEASE=1: after a power release every VRAM allocation fails (another program
took the memory).
HARNESS_NBD_DIR=DIR: every attached slice is also an NBD server on DIR/slice-G.N.sock, for clients
such as fio (tests of shrink/grow under load): the handshake is answered here, then each client's
requests go to one of the slice's kernel ends (a client each, never reused) and the worker's
replies come back; NBD_CMD_DISC is not passed on (it would end the kernel's connection).
HARNESS_SWAPOFF_S=S: swapoff is the daemon's own (it runs the `swapoff` command and reads /proc/swaps
meanwhile for its progress), the command tests/fakeswapoff/swapoff, which takes S s, Used going down;
HARNESS_SWAP_USED_KIB=K: each device swapon gives shows K KiB used (0 by default).
HARNESS_PROGRESS_LOG_S=S: the daemon logs a swapoff's progress every S s instead of 10.
HARNESS_SWAPOFF_RETRY_S=S: the daemon retries a failed swapoff every S s instead of 10 (tests that wait
for a second try).  HARNESS_SPARE_RETRY_S=S: the same for a spare worker that failed to start (30).
- reconfigure (NBD_CMD_RECONFIGURE after a worker or GPU process died): the slice's ends whose worker
  is gone (they read as closed) are dropped and the new ones taken; with HARNESS_PROBE=1 the pattern
  is read back through a new one ("probe kept ok").
HARNESS_GIVE_UP=FILE: once FILE exists, the last kernel end of /dev/nbd-harness is shut down, as the
kernel does to a connection with a request past its timeout ("gave up a connection"; FILE is removed).
HARNESS_PROBE=all: each slice gets its own pattern at attach, and at every disconnect the patterns
of all the other slices are read back ("verify ok N" / "verify BAD"): releasing one slice must not
touch the others.
"""
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd_vram as nv  # noqa: E402

EVENTS = os.environ["HARNESS_EVENTS"]
SWAPOFF_FAILS = os.environ.get("HARNESS_SWAPOFF_FAILS", "")
DEVICE = "/dev/nbd-harness"
INDEX = 99
PATTERN = EVENTS + ".pattern"
SYSROOT = os.environ.get("NBD_VRAM_SYSFS_ROOT")


def event(text):
    with open(EVENTS, "a") as f:
        f.write(f"{os.getpid()} {text}\n")


def recv_replies(sock, nbytes):
    """Exactly nbytes from the worker."""
    got = b""
    while len(got) < nbytes:
        chunk = sock.recv(nbytes - len(got))
        if not chunk:
            raise RuntimeError("worker closed the connection during the probe")
        got += chunk
    return got


def probe(sock, size):
    """One NBD write and read at the end of the device, through a worker; the pattern must come back."""
    pattern = os.urandom(4096)
    offset = size - 4096
    with open(PATTERN, "wb") as f:
        f.write(pattern)
    sock.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.WRITE, 1, offset, 4096) + pattern)
    sock.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.READ, 2, offset, 4096))
    _, err1, cookie1 = nv.SIMPLE_REPLY.unpack(recv_replies(sock, nv.SIMPLE_REPLY.size))
    _, err2, cookie2 = nv.SIMPLE_REPLY.unpack(recv_replies(sock, nv.SIMPLE_REPLY.size))
    data = recv_replies(sock, 4096) if err2 == 0 else b""      # an error reply carries no data
    ok = (err1, err2, cookie1, cookie2) == (0, 0, 1, 2) and data == pattern
    event(f"probe {'ok' if ok else 'BAD'}")


def probe_kept(sock, size):
    """Read back what probe() wrote before the crash."""
    with open(PATTERN, "rb") as f:
        pattern = f.read()
    sock.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.READ, 3, size - 4096, 4096))
    got = recv_replies(sock, nv.SIMPLE_REPLY.size + 4096)
    _, err, cookie = nv.SIMPLE_REPLY.unpack_from(got, 0)
    ok = (err, cookie) == (0, 3) and got[nv.SIMPLE_REPLY.size:] == pattern
    event(f"probe kept {'ok' if ok else 'BAD'}")


ATTACHED = set()                # slices with a pattern (HARNESS_PROBE=all)
PROBE_LOCK = threading.Lock()


def write_read(sock, offset, data, what):
    """One NBD write then read of DATA at OFFSET through a worker; an event says whether it came back."""
    with PROBE_LOCK:
        sock.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.WRITE, 11, offset, len(data)) + data)
        _, err, cookie = nv.SIMPLE_REPLY.unpack(recv_replies(sock, nv.SIMPLE_REPLY.size))
        ok = (err, cookie) == (0, 11) and read_back(sock, offset, len(data)) == data
    event(f"{what} {'ok' if ok else 'BAD'}")


def read_back(sock, offset, n):
    """The bytes at OFFSET, or None if the worker answered with an error (which carries no data)."""
    sock.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.READ, 12, offset, n))
    _, err, cookie = nv.SIMPLE_REPLY.unpack(recv_replies(sock, nv.SIMPLE_REPLY.size))
    if err:
        return None
    data = recv_replies(sock, n)
    return data if cookie == 12 else None


def relay(sl):
    """HARNESS_NBD_DIR: serve the slice to NBD clients through its kernel ends (see the top)."""
    path = os.path.join(os.environ["HARNESS_NBD_DIR"], f"slice-{sl.gpu.ordinal}.{sl.number}.sock")
    if os.path.exists(path):
        os.unlink(path)
    sl.listener, sl.listener_path = socket.socket(socket.AF_UNIX), path
    sl.listener.bind(path)
    sl.listener.listen(8)
    ends = list(sl.kernel_ends[1:] if os.environ.get("HARNESS_PROBE") == "all" else sl.kernel_ends)

    def pump(src, dst):
        try:
            while True:
                b = src.recv(1 << 20)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass

    def client(conn, end):
        used = False
        try:
            if not nv.negotiate(conn, sl.export):
                return
            while True:
                hdr = nv.recv_exact(conn, nv.REQ_SIZE, "request")
                _, _, typ, _, _, length = nv.REQUEST.unpack(hdr)
                if typ == nv.Cmd.DISC:
                    break
                if not used:
                    used = True
                    threading.Thread(target=pump, args=(end, conn), daemon=True).start()
                end.sendall(hdr + (nv.recv_exact(conn, length, "payload") if typ == nv.Cmd.WRITE else b""))
        except (OSError, nv.ProtocolError):
            pass
        finally:
            conn.close()
            if not used:
                ends.append(end)        # a client that only asked for the size (fio does, first)

    def accept():
        while True:
            try:
                conn, _ = sl.listener.accept()
            except OSError:
                return
            if not ends:
                conn.close()        # every kernel end has had its client
                continue
            threading.Thread(target=client, args=(conn, ends.pop(0)), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def sysfs(index, name, text=None):
    """Write (or with None remove) sys/block/nbdINDEX/NAME under the fixture root."""
    if not SYSROOT:
        return
    path = os.path.join(SYSROOT, f"sys/block/nbd{index}", name)
    if text is None:
        if os.path.exists(path):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def device_of(sl):
    """Slice 0 of the first GPU is /dev/nbd-harness (index 99), the others /dev/nbd-harnessG.N (98, 97, ...)."""
    if sl.gpu.ordinal == 0 and sl.number == 0:
        return INDEX, DEVICE
    return INDEX - 1 - sl.gpu.ordinal * 16 - sl.number, f"{DEVICE}{sl.gpu.ordinal}.{sl.number}"


BY_INDEX = {}                   # device index -> slice, for reconfigure


def attach(sl, socks):
    sl.kernel_ends = [socket.socket(fileno=os.dup(s.fileno())) for s in socks]
    # "netlink", so that a restart after a crash may take the device over, as with the kernel.
    (sl.index, sl.device), sl.attach_kind = device_of(sl), "netlink"
    sl.backend = f"nbd-vram:{os.getpid()}:{sl.gpu.info['uuid']}:{sl.number}"
    sysfs(sl.index, "pid", str(os.getpid()))
    sysfs(sl.index, "backend", sl.backend)
    BY_INDEX[sl.index] = sl
    sl.undo.append(("disconnect " + sl.device, lambda: disconnect(sl)))
    event(f"attach {len(socks)}" + ("" if sl.device == DEVICE else f" {sl.device}"))
    if os.environ.get("HARNESS_PROBE") == "1" and sl.device == DEVICE:
        probe(sl.kernel_ends[0], sl.export.size)
    if os.environ.get("HARNESS_PROBE") == "all":
        sl.pattern = os.urandom(4096)
        write_read(sl.kernel_ends[0], sl.export.size - 8192, sl.pattern, f"probe {sl.gpu.ordinal}.{sl.number}")
        ATTACHED.add(sl)
    if os.environ.get("HARNESS_NBD_DIR"):
        relay(sl)
    if os.environ.get("HARNESS_GIVE_UP") and sl.device == DEVICE:
        threading.Thread(target=give_up, args=(sl, os.environ["HARNESS_GIVE_UP"]), daemon=True).start()


def give_up(sl, path):
    """HARNESS_GIVE_UP (see the top)."""
    while not os.path.exists(path):
        time.sleep(0.1)
    sl.kernel_ends[-1].shutdown(socket.SHUT_RDWR)
    os.unlink(path)
    event("gave up a connection")


def reattach(sl, old, socks):
    sl.kernel_ends = [socket.socket(fileno=os.dup(s.fileno())) for s in socks]
    sl.index, sl.device, sl.backend, sl.attach_kind = old["index"], old["device"], old["backend"], "netlink"
    sl.undo.append(("disconnect " + sl.device, lambda: disconnect(sl)))
    event(f"reattach {len(socks)}" + ("" if sl.device == DEVICE else f" {sl.device}"))
    if os.environ.get("HARNESS_PROBE") == "1" and sl.device == DEVICE:
        probe_kept(sl.kernel_ends[0], sl.export.size)


def closed(s):
    """Has the other end of this kernel end gone (its worker died)?"""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def reconfigure(index, socks, backend, timeout_s=30):
    sl = BY_INDEX[index]
    new = [socket.socket(fileno=os.dup(s.fileno())) for s in socks]
    for s in [s for s in sl.kernel_ends if closed(s)]:
        sl.kernel_ends.remove(s)
        s.close()
    sl.kernel_ends = new + sl.kernel_ends
    event(f"reconfigure {len(socks)}" + ("" if sl.device == DEVICE else f" {sl.device}"))
    if os.environ.get("HARNESS_PROBE") == "1" and sl.device == DEVICE:
        probe_kept(new[0], sl.export.size)


def disconnect(sl):
    if os.environ.get("HARNESS_PROBE") == "all":
        ATTACHED.discard(sl)
        with PROBE_LOCK:
            bad = [o for o in list(ATTACHED) if read_back(o.kernel_ends[0], o.export.size - 8192, 4096) != o.pattern]
        event(f"verify BAD {' '.join(f'{o.gpu.ordinal}.{o.number}' for o in bad)}" if bad
              else f"verify ok {len(ATTACHED)}")
    if getattr(sl, "listener", None):
        sl.listener.close()
        os.unlink(sl.listener_path)
    for s in sl.kernel_ends:
        try:
            s.shutdown(socket.SHUT_RDWR)    # also wakes a relay thread blocked in recv on it (close alone does not)
        except OSError:
            pass
        s.close()
    sysfs(sl.index, "pid")
    sysfs(sl.index, "backend")
    event("disconnect" + ("" if sl.device == DEVICE else f" {sl.device}"))


def proc_swaps(add=None, remove=None):
    """The fixture's /proc/swaps: the header and the devices swapon was given (Used 0: tests that
    need a slice to look full edit the file)."""
    if not SYSROOT:
        return
    os.makedirs(os.path.join(SYSROOT, "proc"), exist_ok=True)
    path = os.path.join(SYSROOT, "proc/swaps")
    try:
        with open(path) as f:
            rows = [l.split("\t") for l in f.read().splitlines()[1:]]
    except FileNotFoundError:
        rows = []
    rows = [r for r in rows if r[0] != remove]
    if add:
        rows.append([add[0], "partition", "65532", os.environ.get("HARNESS_SWAP_USED_KIB", "0"), str(add[1])])
    with open(path, "w") as f:
        f.write("Filename\tType\tSize\tUsed\tPriority\n")
        for r in rows:
            f.write("\t".join(r) + "\n")


def swap_enable(dev, priority, discard):
    proc_swaps(add=(dev, priority))
    event(f"swapon {dev} {priority}")


def swap_disable(dev, progress=None):
    if os.environ.get("HARNESS_SWAPOFF_S"):
        return daemon_swap_disable(dev, progress)
    if SWAPOFF_FAILS and os.path.exists(SWAPOFF_FAILS):
        event(f"swapoff {dev} failed")
        return False
    proc_swaps(remove=dev)
    event(f"swapoff {dev}")
    return True


def free_with_event(free):
    def wrapped(self, scrub=True):
        free(self, scrub)
        event("free VRAM")
    return wrapped


nv.load_nbd_module = lambda: None
daemon_swap_disable = nv.swap_disable
FAKE_SWAPOFF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakeswapoff")
if os.environ.get("HARNESS_SWAPOFF_S") and not os.environ["PATH"].startswith(FAKE_SWAPOFF + ":"):
    os.environ["PATH"] = f"{FAKE_SWAPOFF}:{os.environ['PATH']}"
if os.environ.get("HARNESS_PROGRESS_LOG_S"):
    nv.PROGRESS_LOG_S = float(os.environ["HARNESS_PROGRESS_LOG_S"])
if os.environ.get("HARNESS_SWAPOFF_RETRY_S"):
    nv.SWAPOFF_RETRY_S = float(os.environ["HARNESS_SWAPOFF_RETRY_S"])
if os.environ.get("HARNESS_SPARE_RETRY_S"):
    nv.SPARE_RETRY_S = float(os.environ["HARNESS_SPARE_RETRY_S"])
nv.check_stale = lambda: None
nv.Slice.attach = attach
nv.Slice.reattach = reattach
nv.reconfigure = reconfigure
nv.swap_enable = swap_enable
nv.swap_disable = swap_disable
if os.environ.get("HARNESS_FREE_EVENT") == "1":
    nv.SliceMemory.free = free_with_event(nv.SliceMemory.free)

if __name__ == "__main__":
    # Out of VRAM in the middle of the daemon's life: once it has released for power, another
    # program holds the GPU's memory (the fake reads this at cuInit, so only the new process sees it).
    if os.environ.get(nv.RELEASED_ENV) == "1" and os.environ.get("HARNESS_OOM_AFTER_RELEASE") == "1":
        os.environ["FAKECUDA_FAIL_ALLOC_ABOVE"] = "1"
    event("exec")
    sys.exit(nv.main())
