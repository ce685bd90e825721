#!/usr/bin/env python3
"""`nbd_vram.py run` with the kernel's part played by this script, for tests of the power policy
on machines without the nbd driver (this CPU machine with the fake libcuda, the GPU machine with
the real one).  Everything else is the daemon's own code: config, power readings, VRAM, worker
processes, sd_notify, the re-exec that drops the GPU, status.  The kernel tests
(tests/vm/guest-power.sh) run the same policy against the real nbd driver.

Stand-ins:
- attach: keeps the kernel's ends of the socketpairs and answers nothing on them; it can send one
  NBD write and read back the pattern through a worker (HARNESS_PROBE=1) to show that VRAM is served;
  "disconnect" closes them, so the workers see the end of the stream and exit, as with the kernel.
- mkswap/swapon/swapoff: a line each in HARNESS_EVENTS; swapoff fails while the file
  HARNESS_SWAPOFF_FAILS exists (RAM that cannot take the pages back).
- With HARNESS_FREE_EVENT=1, freeing the VRAM is a line too ("free VRAM"), for tests of the
  teardown order.  (cryptsetup, for encrypt = yes, is whatever the PATH has: tests put a stub there.)
Re-execs run this script again (the daemon re-executes sys.argv[0]), so the stand-ins stay in place.
"""
import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nbd_vram as nv  # noqa: E402

EVENTS = os.environ["HARNESS_EVENTS"]
SWAPOFF_FAILS = os.environ.get("HARNESS_SWAPOFF_FAILS", "")
DEVICE = "/dev/nbd-harness"


def event(text):
    with open(EVENTS, "a") as f:
        f.write(f"{os.getpid()} {text}\n")


def probe(sock, size):
    """One NBD write and read at the end of the device, through a worker; the pattern must come back."""
    pattern = os.urandom(4096)
    offset = size - 4096
    sock.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.WRITE, 1, offset, 4096) + pattern)
    sock.sendall(nv.REQUEST.pack(nv.NBD_REQUEST_MAGIC, 0, nv.Cmd.READ, 2, offset, 4096))
    got = b""
    while len(got) < 2 * nv.SIMPLE_REPLY.size + 4096:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("worker closed the connection during the probe")
        got += chunk
    magic1, err1, cookie1 = nv.SIMPLE_REPLY.unpack_from(got, 0)
    magic2, err2, cookie2 = nv.SIMPLE_REPLY.unpack_from(got, nv.SIMPLE_REPLY.size)
    data = got[2 * nv.SIMPLE_REPLY.size:]
    ok = (err1, err2, cookie1, cookie2) == (0, 0, 1, 2) and data == pattern
    event(f"probe {'ok' if ok else 'BAD'}")


def attach(self, socks):
    self.kernel_ends = [socket.socket(fileno=os.dup(s.fileno())) for s in socks]
    self.index, self.attach_kind, self.backend, self.device = 99, "harness", "harness", DEVICE
    self.undo.append(("disconnect " + DEVICE, lambda: disconnect(self)))
    event(f"attach {len(socks)}")
    if os.environ.get("HARNESS_PROBE") == "1":
        probe(self.kernel_ends[0], self.export.size)


def disconnect(self):
    for s in self.kernel_ends:
        s.close()
    event("disconnect")


def swap_enable(dev, priority, discard):
    event(f"swapon {dev} {priority}")


def swap_disable(dev):
    if SWAPOFF_FAILS and os.path.exists(SWAPOFF_FAILS):
        event(f"swapoff {dev} failed")
        return False
    event(f"swapoff {dev}")
    return True


def free_with_event(free):
    def wrapped(self, scrub=True):
        free(self, scrub)
        event("free VRAM")
    return wrapped


nv.load_nbd_module = lambda: None
nv.Daemon._check_stale = lambda self: None
nv.Daemon._attach = attach
nv.swap_enable = swap_enable
nv.swap_disable = swap_disable
if os.environ.get("HARNESS_FREE_EVENT") == "1":
    nv.VramStore.free = free_with_event(nv.VramStore.free)

if __name__ == "__main__":
    event("exec")
    sys.exit(nv.main())
