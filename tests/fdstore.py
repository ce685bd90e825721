#!/usr/bin/env python3
"""fdstore.py STATE_DIR -- COMMAND...: what systemd does for vram-swap-nbd.service, for machines
without systemd as init (the CPU tests; the kernel tests boot systemd itself: tests/vm/guest-systemd.sh).

Runs COMMAND with NOTIFY_SOCKET pointing here and keeps what it sends: READY=1 and STATUS=
(written to STATE_DIR/ready and STATE_DIR/status; every STATUS= is also a line, after its time,
in STATE_DIR/status.log), fds with FDSTORE=1 + FDNAME= (one per name and
inode, as systemd dedups them; without FDPOLL=0 an fd that polls EPOLLERR or EPOLLHUP is dropped, as
systemd does), FDSTOREREMOVE=1 + FDNAME=.  When COMMAND dies of a signal or exits
non-zero (Restart=on-failure), it is started again after RESTART_S (1 s) with the stored fds as
LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID, from fd 3 on.  When it exits 0, so does this, closing
the store (a `systemctl stop`).  The pid of the running COMMAND is in STATE_DIR/pid; every start
and exit is a line on stdout.
"""
import array
import os
import select
import socket
import subprocess
import sys
import threading
import time

RESTART_S = 1.0


def polled_error(fd):
    """What systemd's poll of a stored fd sees at once (it keeps polling; this looks once): an error or hangup."""
    p = select.poll()
    p.register(fd, 0)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))


def main():
    state, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    os.makedirs(state, exist_ok=True)
    path = os.path.join(state, "notify")
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    store, lock = {}, threading.Lock()          # name -> fd

    def listen():
        while True:
            fds = array.array("i")
            msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
            name = fields.get("FDNAME", "stored")
            with lock:
                if fields.get("FDSTORE") == "1":
                    for fd in fds:
                        old = store.get(name)
                        if old is not None and os.fstat(old).st_ino == os.fstat(fd).st_ino:
                            os.close(fd)        # the same file again: kept once
                        elif fields.get("FDPOLL") != "0" and polled_error(fd):
                            os.close(fd)        # systemd polls stored fds and drops them on EPOLLERR/EPOLLHUP
                            print(f"fdstore: dropped {name!r}: EPOLLERR or EPOLLHUP, and no FDPOLL=0", flush=True)
                        else:
                            if old is not None:
                                os.close(old)
                            store[name] = fd
                            print(f"fdstore: stored {name!r}", flush=True)
                    fds = array.array("i")
                if fields.get("FDSTOREREMOVE") == "1" and name in store:
                    os.close(store.pop(name))
                    print(f"fdstore: removed {name!r}", flush=True)
            for fd in fds:
                os.close(fd)
            if fields.get("READY") == "1":
                open(os.path.join(state, "ready"), "w").write(f"{time.time()}\n")
            if "STATUS" in fields:
                open(os.path.join(state, "status"), "w").write(fields["STATUS"] + "\n")
                with open(os.path.join(state, "status.log"), "a") as f:
                    f.write(f"{time.time():.3f} {fields['STATUS']}\n")

    threading.Thread(target=listen, daemon=True).start()
    while True:
        with lock:
            names = list(store)
            fds = [store[n] for n in names]

        def to_listen_fds(fds=fds):
            # In the child: the stored fds become 3, 4, ... (moved out of the way first).
            high = [os.dup(fd) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=True)

        env = dict(os.environ, NOTIFY_SOCKET=path)
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        # LISTEN_PID must be the pid that reads it: set by the shell that then becomes COMMAND.
        argv = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"' if fds else 'exec "$@"', "sh", *cmd]
        for f in ("ready", "status"):
            if os.path.exists(os.path.join(state, f)):
                os.unlink(os.path.join(state, f))
        # preexec_fn runs before close_fds, which then keeps only 3.. (no other fd of ours leaks).
        proc = subprocess.Popen(argv, env=env, preexec_fn=to_listen_fds, close_fds=True,
                                pass_fds=tuple(range(3, 3 + len(fds))))
        open(os.path.join(state, "pid"), "w").write(f"{proc.pid}\n")
        print(f"fdstore: started pid {proc.pid} with {len(fds)} stored fd(s) {names}", flush=True)
        rc = proc.wait()
        print(f"fdstore: pid {proc.pid} exited with {rc}", flush=True)
        if rc == 0:
            return 0
        time.sleep(RESTART_S)


if __name__ == "__main__":
    sys.exit(main())
