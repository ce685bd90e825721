#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""nbd_vram - use spare NVIDIA GPU memory (VRAM) as a Linux swap device.

The data path:  kernel nbd driver -> socket -> this process -> cuMemcpy -> VRAM.

`run` (the daemon that systemd starts) allocates VRAM through the CUDA driver
API, hands the kernel's nbd driver connected socketpairs over generic netlink
(no nbd-client, no listening socket), serves the NBD transmission phase on
them, and turns /dev/nbdX into a high-priority swap device.  `serve` exports
the same store on a Unix socket to any NBD client (nbdinfo, qemu-io, fio),
which is how it is tested and benchmarked.

One file, standard library only: ctypes for libcuda.so.1, struct and socket
for NBD and netlink, subprocess for mkswap/swapon/swapoff.

Memory safety.  A process that serves swap I/O must never need memory that
can only be found by swapping to itself: the kernel would wait on I/O that
only we can complete.  Before swapon the daemon therefore locks everything it
has and will have (mlockall), marks every serving thread PR_SET_IO_FLUSHER,
sets oom_score_adj to -1000, allocates every buffer once up front, grows and
locks the C heap in advance and stops it from being given back (Python's
objects come from glibc malloc, see prepare_memory()), and freezes the garbage
collector.  The serving path then asks the kernel for no new pages.

What it deliberately does not do: compression, overcommit, or serving
anything but the one VRAM-backed export.
"""

import argparse
import array
import collections
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import gc
import json
import logging
import mmap
import os
import queue
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import types

__version__ = "0.1.0"

############################################################################
# Constants ################################################################
############################################################################

DEFAULT_CONFIG = "/etc/nbd-vram.conf"
RUNTIME_DIR = "/run/nbd-vram"
MiB = 1 << 20
GiB = 1 << 30

# The environment.  Settings come from the config file, the VRAM_* variables (ENV_KEYS, under
# Configuration) and flags.  These NBD_VRAM_* variables are hooks for tests, benchmarks and
# development, each read where it is used:
#   NBD_VRAM_CONFIG          the config file instead of DEFAULT_CONFIG; it must exist (load_config_as_written)
#   NBD_VRAM_LIBCUDA         the CUDA driver library, as `libcuda =` in the config (Cuda)
#   NBD_VRAM_LIBNVML         the NVML library (Nvml.open)
#   NBD_VRAM_CUINIT_TRIES    cuInit attempts, 2 s apart, while a GPU wakes up (Cuda.init; 10; the tests make it 1)
#   NBD_VRAM_RUNTIME_DIR     instead of RUNTIME_DIR (runtime_dir)
#   NBD_VRAM_SYSFS_ROOT      prefix of every /sys and /proc read (sys_root): fixture trees in the tests
#   NBD_VRAM_POWER_SUPPLY    the power_supply class directory itself (power_supply_dir)
#   NBD_VRAM_BATCH_COPY=0    no cuMemcpyBatchAsync: grouped copies one by one (CopyEngine)
#   NBD_VRAM_GROUP_WRITES=0  small writes are not grouped (Transmission)
#   NBD_VRAM_REPLY_SPIN_US, NBD_VRAM_COPY_SPIN_US, NBD_VRAM_COPY_STREAMS: tuning the copy loop (bench/)
#   NBD_VRAM_PROFILE=DIR     a cProfile file per connection in DIR (bench/profile-worker.sh)
# The daemon sets these for itself over its own re-exec (cmd_run), never by hand:
LOCK_ENV = "NBD_VRAM_LOCK_FD"               # the daemon lock's fd, kept open over every re-exec
HANDOVER_ENV = "NBD_VRAM_HANDOVER_FD"       # `upgrade`: the VRAM fds, kept open over the re-exec
RELEASED_ENV = "NBD_VRAM_POWER_RELEASED"    # after a power release
NO_VRAM_ENV = "NBD_VRAM_NO_VRAM"            # after taking swap back failed for want of VRAM: why

# Exit codes: `nbd_vram.py --help` lists them all, each command's --help those it can return.
EXIT_OK = 0
EXIT_FAILURE = 1        # anything not listed below
EXIT_USAGE = 2          # bad command line
EXIT_NOT_RUNNING = 3    # status, upgrade, shrink, grow: no daemon is running
EXIT_CONFIG = 4         # bad configuration file or value
EXIT_NO_DRIVER = 5      # libcuda.so.1 missing or too old
EXIT_NO_GPU = 6         # no usable NVIDIA GPU, or --gpu names none
EXIT_NO_VRAM = 7        # not even the minimum size could be allocated
EXIT_NO_NBD = 8         # the kernel has no nbd driver, or no free device
EXIT_NOT_ROOT = 9       # run, sleep, wake, shrink, grow, upgrade, detach need root; status, where nothing can be read
EXIT_DEGRADED = 10      # status: running, but I/O errors were seen
EXIT_NO_CRYPT = 11      # encrypt = yes, but cryptsetup or the kernel's dm-crypt is missing

EXIT_MEANINGS = {
    EXIT_OK: "success",
    EXIT_FAILURE: "failure not listed below",
    EXIT_USAGE: "bad command line",
    EXIT_NOT_RUNNING: "status, upgrade, shrink, grow: no daemon is running",
    EXIT_CONFIG: "bad configuration",
    EXIT_NO_DRIVER: "the NVIDIA driver (libcuda.so.1) is missing or too old",
    EXIT_NO_GPU: "no usable NVIDIA GPU, or --gpu names none",
    EXIT_NO_VRAM: "not even the minimum size of VRAM could be allocated",
    EXIT_NO_NBD: "the kernel has no nbd driver, or no free /dev/nbdX",
    EXIT_NOT_ROOT: "needs root: run, sleep, wake, shrink, grow, upgrade, detach; status, where nothing of the daemon's can be read",
    EXIT_DEGRADED: "status: running, but GPU or I/O errors were seen",
    EXIT_NO_CRYPT: "encrypt = yes, but cryptsetup or the kernel's dm-crypt is missing",
}


def exit_codes_help(*codes):
    """The exit status part of a --help: what CODES (by default every one) mean."""
    return "exit status:\n" + "\n".join(f"  {c:<3} {EXIT_MEANINGS[c]}" for c in codes or EXIT_MEANINGS)


EXIT_CODES_HELP = exit_codes_help()

############################################################################
# Errors and logging #######################################################
############################################################################

log = logging.getLogger("nbd-vram")


class Fatal(Exception):
    """An error that stops the command; the message is one line for the user."""
    exit_code = EXIT_FAILURE


class UsageError(Fatal):
    """A bad command line that only shows once the values are put together (argparse reports the rest)."""
    exit_code = EXIT_USAGE


class ConfigError(Fatal):
    exit_code = EXIT_CONFIG


class DriverError(Fatal):
    exit_code = EXIT_NO_DRIVER


class NoGpuError(Fatal):
    exit_code = EXIT_NO_GPU


class NoVramError(Fatal):
    exit_code = EXIT_NO_VRAM


class NbdKernelError(Fatal):
    exit_code = EXIT_NO_NBD


class NoCryptError(Fatal):
    exit_code = EXIT_NO_CRYPT


class NotRootError(Fatal):
    exit_code = EXIT_NOT_ROOT


class CudaError(Fatal):
    """A failed CUDA driver call; .name is the CUDA_ERROR_* name."""

    def __init__(self, func, code, name, text):
        super().__init__(f"{func}: {name} ({code}): {text}")
        self.func, self.code, self.name = func, code, name


class _JournalFormatter(logging.Formatter):
    """Under systemd: no timestamps, and a <N> syslog prefix for journald."""
    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{record.getMessage()}"


LOG_QUEUE_LINES = 1000
LOG_THREAD_STACK = 256 * 1024
LOG_FLUSH_S = 5.0


class _LogWriter(logging.Handler):
    """Log lines written to stderr by a thread of their own, so that a process on the swap I/O path
    never waits on its log: stderr may be a file on tmpfs whose last page is out in this very swap
    (appending reads it back first), or a pipe whose reader's pages are.  Seen: the daemon stuck
    appending "worker 1 ... exited" to /tmp/daemon.log while the kernel waited for the new worker's
    sockets it was about to give.  Lines are formatted by the caller; past LOG_QUEUE_LINES waiting
    lines, new ones are dropped and counted (said once the output moves again)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.lines = collections.deque()
        self.dropped = 0
        self.writing = False
        self.moved = threading.Condition()
        old = threading.stack_size(LOG_THREAD_STACK)     # mlockall locks a thread's whole stack
        try:
            threading.Thread(target=self._write_lines, name="log writer", daemon=True).start()
        finally:
            threading.stack_size(old)

    def emit(self, record):
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self.moved:
            if len(self.lines) >= LOG_QUEUE_LINES:
                self.dropped += 1
                return
            self.lines.append(line)
            self.moved.notify_all()

    def _write_lines(self):
        while True:
            with self.moved:
                while not self.lines:
                    self.writing = False
                    self.moved.notify_all()
                    self.moved.wait()
                self.writing = True
                text, dropped = "".join(self.lines), self.dropped
                self.lines.clear()
                self.dropped = 0
            if dropped:
                text += f"nbd-vram: WARNING: {dropped} log lines dropped: the log output was blocked\n"
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass            # nowhere left to say it

    def wait_written(self, timeout):
        """Until every line so far is out (or TIMEOUT seconds: the output may be blocked for good)."""
        with self.moved:
            return self.moved.wait_for(lambda: not self.lines and not self.writing, timeout)


def flush_log(timeout=LOG_FLUSH_S):
    """Before an exit or exec: the background writer's lines out (bounded: its output may be stuck)."""
    for h in log.handlers:
        if isinstance(h, _LogWriter):
            h.wait_written(timeout)


def setup_logging(debug=False, background=False):
    """BACKGROUND: for the processes on the swap I/O path (run, serve, workers): see _LogWriter."""
    flush_log()
    old = log.handlers[0] if log.handlers else None
    if not background:
        handler = logging.StreamHandler(sys.stderr)
    elif isinstance(old, _LogWriter) and old.stream is sys.stderr:
        handler = old           # one writer thread a process
    else:
        handler = _LogWriter(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("nbd-vram: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def sd_notify(*lines, fds=()):
    """Send lines to systemd's notify socket; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        s.sendmsg(["\n".join(lines).encode()], anc, 0, path)
    return True


SD_LISTEN_FDS_START = 3


def sd_listen_fds():
    """The fds systemd passed us, {FDNAME: fd}: after a restart, those stored with FDSTORE=1."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)       # not for our children
    fds = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds[names[i] if i < len(names) and names[i] else f"fd{i}"] = fd
    return fds


def run_undo(steps, label, failed=None):
    """Pop and run (what, fn) undo steps, last pushed first; a failing step is logged (and
    failed(what) called) and the rest still run."""
    while steps:
        what, fn = steps.pop()
        try:
            fn()
        except Exception as e:
            log.error("%s: %s failed: %s", label, what, e)
            if failed:
                failed(what)


def need_root(command, why):
    """One line and exit 9 for a command that only root can do, instead of a wrong answer or a traceback."""
    if os.geteuid() != 0:
        raise NotRootError(f"{command} needs root: {why} (use sudo)")


############################################################################
# Sizes ####################################################################
############################################################################

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNIT = {"": MiB, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}


def parse_size(text):
    """'512M', '7G', '1.5G', '7168' (MiB, as VRAM_SETUP_SIZE_MB) -> bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (use e.g. 512M, 7G or 7168 for MiB)")
    value = float(m.group(1)) * _SIZE_UNIT[m.group(2).upper()]
    if value >= 1 << 64:        # also float('9' * 400) == inf, which int() cannot take
        raise ValueError(f"{text!r} is too large")
    return int(value)


def format_size(n):
    for unit, scale in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n} B"


############################################################################
# Runtime and system files #################################################
############################################################################
# The daemon's files in the runtime dir (its lock, state, the requests of shrink and grow, the sleep
# marker) and the readers of /proc and /sys that swap, power, the daemon and status share.  Every
# /proc and /sys path goes through sys_root(), so that the tests can use fixture trees.


def runtime_dir():
    return os.environ.get("NBD_VRAM_RUNTIME_DIR", RUNTIME_DIR)


def sys_root():
    """Prefix for /proc and /sys reads, so tests can use fixture trees."""
    return os.environ.get("NBD_VRAM_SYSFS_ROOT", "/")


def read_text(path, default=None):
    """A sysfs/procfs file's stripped contents, or default if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _read(path, default=None):
    return read_text(os.path.join(sys_root(), path.lstrip("/")), default)


def nbd_devices():
    """Indexes of every /dev/nbdN the kernel has, in order."""
    try:
        names = os.listdir(os.path.join(sys_root(), "sys/block"))
    except OSError:
        return []
    return sorted(int(n[3:]) for n in names if n.startswith("nbd") and n[3:].isdigit())


def nbd_connected(index):
    return _read(f"/sys/block/nbd{index}/pid") is not None


DEV_DIR = "/dev"


def active_swaps():
    """{device path: (size KiB, used KiB, priority)} from /proc/swaps.

    The kernel prints the path swapon opened as seen from the mount it was opened through.  A
    swapon made in a mount namespace of its own (a unit with ProtectSystem=, PrivateTmp= and the
    like) opened /dev/nbd0 through that namespace's /dev; once the namespace's last process is gone
    (after a crash, the dead daemon's workers) that mount is detached and the kernel prints /nbd0,
    or /mapper/NAME.  Such a name that does not exist here is put back under /dev."""
    swaps = {}
    text = _read("/proc/swaps", "")
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) >= 5:
            path = f[0]
            if not os.path.exists(path) and os.path.exists(DEV_DIR + path):
                path = DEV_DIR + path
            swaps[path] = (int(f[2]), int(f[3]), int(f[4]))
    return swaps


def make_runtime_dir():
    """The runtime dir, mode 0755: anyone may read the public summary in it (status), no one but
    root write.  A dir an older version made 0700 (or a umask narrowed) is opened up to 0755; one
    that is wider than that (a shared dir named by NBD_VRAM_RUNTIME_DIR) is left as it is."""
    path = runtime_dir()
    os.makedirs(path, mode=0o755, exist_ok=True)
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == os.geteuid() and mode != 0o755 and not mode & ~0o755:
        os.chmod(path, 0o755)
    return path


def write_json(path, obj, mode=0o600):
    """Replace PATH with OBJ as JSON, in one step (a reader never sees half a file), with MODE."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with open(fd, "w") as f:
        os.fchmod(fd, mode)     # whatever the umask
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def state_path():
    return os.path.join(runtime_dir(), "state.json")


def public_state_path():
    return os.path.join(runtime_dir(), "status.json")


# The daemon's state, private (0600: it names what the daemon signals and takes over), and beside it
# a public summary (0644) for `status` run by any user: the same but for these keys, which only the
# daemon's own commands use.  Nothing ever signals or takes over a process on the summary's word.
PRIVATE_STATE_KEYS = ("request", "sysctl_saved", "worker_starts", "handover")


def publish_state(state, status_line):
    """The one place where what the daemon serves is told: the private state, the public summary and
    systemd's STATUS= (`systemctl status`), together."""
    write_json(public_state_path(), {k: v for k, v in state.items() if k not in PRIVATE_STATE_KEYS}, mode=0o644)
    write_json(state_path(), state)
    sd_notify(f"STATUS={status_line}")


def read_state():
    try:
        with open(state_path()) as f:
            return json.load(f)
    except PermissionError:
        raise NotRootError(f"cannot read the daemon's state ({state_path()}): permission denied; "
                           "run this as root (sudo)") from None
    except (OSError, ValueError):
        return None


def read_public_state():
    """The public summary, for status only (never for signalling): None if there is none."""
    try:
        with open(public_state_path()) as f:
            return json.load(f)
    except PermissionError:
        raise NotRootError(f"cannot read the daemon's state ({state_path()}) nor its public summary "
                           f"({public_state_path()}): permission denied; run this as root (sudo)") from None
    except (OSError, ValueError):
        return None


def remove_state():
    for path in (public_state_path(), state_path()):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def request_path():
    return os.path.join(runtime_dir(), "request.json")


SLEEP_MARKER = "sleeping"           # in the runtime dir: `nbd_vram.py sleep` made it, `wake` removes it


def sleep_marker():
    return os.path.join(runtime_dir(), SLEEP_MARKER)


def process_start(pid):
    """When PID started: field 22 of /proc/PID/stat (clock ticks after boot); None if no such process.
    The kernel reuses a pid as soon as its process is gone, never a (boot id, pid, start time)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()       # the name in () may hold spaces
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_id():
    return read_text("/proc/sys/kernel/random/boot_id")


def identity():
    """What the state names this process by: the pid, and what tells it from a later one with that pid."""
    return {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "boot_id": boot_id()}


def _runs_daemon(pid):
    """PID runs `nbd_vram.py run` (all that can be checked of a daemon older than pid_start)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"run" in argv and any(a.endswith(b"nbd_vram.py") for a in argv)


def daemon_pid(state):
    """The pid of the daemon STATE describes if that very process still runs, else None.

    Its pid alone proves nothing: a daemon killed with -9 leaves its state behind, and the kernel
    gives the pid to the next process.  The state names the daemon by pid, start time and boot id."""
    pid = (state or {}).get("pid")
    if type(pid) is not int or pid <= 0:
        return None
    if "pid_start" not in state:
        return pid if _runs_daemon(pid) else None
    start = process_start(pid)
    if start is None or start != state["pid_start"] or state.get("boot_id") != boot_id():
        return None
    return pid


def signal_daemon(sig=signal.SIGUSR1, state=None):
    """Send SIG to the daemon the state (read now, or STATE) describes; its pid, or None if none runs.

    The pid is checked through a pidfd opened first, so the signal cannot reach a process that got
    the pid in between (SIGUSR1 and SIGUSR2 kill a process that does not expect them)."""
    st = read_state() if state is None else state
    pid = daemon_pid(st)
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (AttributeError, OSError):
        pidfd = None        # no pidfd (Linux before 5.3): the check just made has to do
    try:
        if daemon_pid(st) != pid:
            return None
        if pidfd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return None
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return pid


def hold_daemon_lock():
    """Take the lock that says a daemon runs (flock of RUNTIME_DIR/daemon.lock), or keep it after a
    re-exec: its fd stays open over exec (its number in LOCK_ENV), and the kernel drops it only when
    this process ends, however it ends.  Refuses to start while another daemon holds it."""
    make_runtime_dir()
    path = os.path.join(runtime_dir(), "daemon.lock")
    fd = os.environ.pop(LOCK_ENV, "")
    fd = int(fd) if fd.isdigit() else None
    if fd is not None:
        try:
            if not os.path.samestat(os.fstat(fd), os.stat(path)):
                fd = None
        except OSError:
            fd = None
    if fd is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # a no-op on our own (inherited) lock
    except BlockingIOError:
        os.close(fd)
        pid = daemon_pid(read_state())
        raise Fatal(f"another nbd-vram daemon{f' (pid {pid})' if pid else ''} is running (it holds {path}); "
                    "stop it first (systemctl stop vram-swap-nbd)") from None
    os.set_inheritable(fd, True)        # subprocesses do not get it all the same: Popen closes every other fd
    os.environ[LOCK_ENV] = str(fd)
    return fd


############################################################################
# CUDA driver binding (libcuda.so.1 via ctypes) ############################
############################################################################

CUresult = ctypes.c_int
CUdevice = ctypes.c_int
CUcontext = ctypes.c_void_p             # opaque handle
CUstream = ctypes.c_void_p              # opaque handle
CUdeviceptr = ctypes.c_uint64           # unsigned long long
CUmemGenericAllocationHandle = ctypes.c_uint64
_p = ctypes.POINTER
_size_t = ctypes.c_size_t


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", CUmemLocation), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", CUmemAllocFlags)]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


class CUmemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", CUmemLocation), ("dstLocHint", CUmemLocation),
                ("flags", ctypes.c_uint)]


CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NOT_SUPPORTED = 801
CU_DEVICE_ATTRIBUTE_PCI_BUS_ID = 33
CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID = 34
CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID = 50
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103
CU_STREAM_NON_BLOCKING = 0x1
CU_MEM_ALLOCATION_TYPE_PINNED = 0x1
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 0x1
CU_MEM_LOCATION_TYPE_DEVICE = 0x1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1
CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 0x1

# name: (restype, *argtypes); the comment is the prototype from cuda.h.
# Sizes are size_t: a bare Python int above 2**31 would be truncated to a C int.
_PROTOTYPES = {
    # CUresult cuGetErrorName(CUresult error, const char **pStr);
    "cuGetErrorName": (CUresult, CUresult, _p(ctypes.c_char_p)),
    # CUresult cuGetErrorString(CUresult error, const char **pStr);
    "cuGetErrorString": (CUresult, CUresult, _p(ctypes.c_char_p)),
    # CUresult cuInit(unsigned int Flags);
    "cuInit": (CUresult, ctypes.c_uint),
    # CUresult cuDeviceGetCount(int *count);
    "cuDeviceGetCount": (CUresult, _p(ctypes.c_int)),
    # CUresult cuDeviceGet(CUdevice *device, int ordinal);
    "cuDeviceGet": (CUresult, _p(CUdevice), ctypes.c_int),
    # CUresult cuDeviceGetName(char *name, int len, CUdevice dev);
    "cuDeviceGetName": (CUresult, ctypes.c_char_p, ctypes.c_int, CUdevice),
    # CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev);
    "cuDeviceGetUuid_v2": (CUresult, _p(CUuuid), CUdevice),
    # CUresult cuDeviceGetPCIBusId(char *pciBusId, int len, CUdevice dev);
    "cuDeviceGetPCIBusId": (CUresult, ctypes.c_char_p, ctypes.c_int, CUdevice),
    # CUresult cuDeviceGetByPCIBusId(CUdevice *dev, const char *pciBusId);
    "cuDeviceGetByPCIBusId": (CUresult, _p(CUdevice), ctypes.c_char_p),
    # CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev);
    "cuDeviceTotalMem_v2": (CUresult, _p(_size_t), CUdevice),
    # CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev);
    "cuDeviceGetAttribute": (CUresult, _p(ctypes.c_int), ctypes.c_int, CUdevice),
    # CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev);
    "cuDevicePrimaryCtxRetain": (CUresult, _p(CUcontext), CUdevice),
    # CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev);
    "cuDevicePrimaryCtxRelease_v2": (CUresult, CUdevice),
    # CUresult cuCtxSetCurrent(CUcontext ctx);
    "cuCtxSetCurrent": (CUresult, CUcontext),
    # CUresult cuCtxSynchronize(void);
    "cuCtxSynchronize": (CUresult,),
    # CUresult cuMemGetInfo_v2(size_t *free, size_t *total);
    "cuMemGetInfo_v2": (CUresult, _p(_size_t), _p(_size_t)),
    # CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize);
    "cuMemAlloc_v2": (CUresult, _p(CUdeviceptr), _size_t),
    # CUresult cuMemFree_v2(CUdeviceptr dptr);
    "cuMemFree_v2": (CUresult, CUdeviceptr),
    # CUresult cuMemAllocHost_v2(void **pp, size_t bytesize);
    "cuMemAllocHost_v2": (CUresult, _p(ctypes.c_void_p), _size_t),
    # CUresult cuMemFreeHost(void *p);
    "cuMemFreeHost": (CUresult, ctypes.c_void_p),
    # CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int Flags);
    "cuMemHostRegister_v2": (CUresult, ctypes.c_void_p, _size_t, ctypes.c_uint),
    # CUresult cuMemHostUnregister(void *p);
    "cuMemHostUnregister": (CUresult, ctypes.c_void_p),
    # CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s);
    "cuMemcpyHtoDAsync_v2": (CUresult, CUdeviceptr, ctypes.c_void_p, _size_t, CUstream),
    # CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s);
    "cuMemcpyDtoHAsync_v2": (CUresult, ctypes.c_void_p, CUdeviceptr, _size_t, CUstream),
    # CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char uc, size_t N);
    "cuMemsetD8_v2": (CUresult, CUdeviceptr, ctypes.c_ubyte, _size_t),
    # CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char uc, size_t N, CUstream s);
    "cuMemsetD8Async": (CUresult, CUdeviceptr, ctypes.c_ubyte, _size_t, CUstream),
    # CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags);
    "cuStreamCreate": (CUresult, _p(CUstream), ctypes.c_uint),
    # CUresult cuStreamDestroy_v2(CUstream hStream);
    "cuStreamDestroy_v2": (CUresult, CUstream),
    # CUresult cuStreamSynchronize(CUstream hStream);
    "cuStreamSynchronize": (CUresult, CUstream),
}

# The virtual memory management API (CUDA 10.2+); optional: cuMemAlloc_v2 is the fallback.
_VMM_PROTOTYPES = {
    # CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *prop, CUmemAllocationGranularity_flags option);
    "cuMemGetAllocationGranularity": (CUresult, _p(_size_t), _p(CUmemAllocationProp), ctypes.c_int),
    # CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop, unsigned long long flags);
    "cuMemCreate": (CUresult, _p(CUmemGenericAllocationHandle), _size_t, _p(CUmemAllocationProp), ctypes.c_ulonglong),
    # CUresult cuMemRelease(CUmemGenericAllocationHandle handle);
    "cuMemRelease": (CUresult, CUmemGenericAllocationHandle),
    # CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr, unsigned long long flags);
    "cuMemAddressReserve": (CUresult, _p(CUdeviceptr), _size_t, _size_t, CUdeviceptr, ctypes.c_ulonglong),
    # CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size);
    "cuMemAddressFree": (CUresult, CUdeviceptr, _size_t),
    # CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle, unsigned long long flags);
    "cuMemMap": (CUresult, CUdeviceptr, _size_t, _size_t, CUmemGenericAllocationHandle, ctypes.c_ulonglong),
    # CUresult cuMemUnmap(CUdeviceptr ptr, size_t size);
    "cuMemUnmap": (CUresult, CUdeviceptr, _size_t),
    # CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count);
    "cuMemSetAccess": (CUresult, CUdeviceptr, _size_t, _p(CUmemAccessDesc), _size_t),
    # CUresult cuMemExportToShareableHandle(void *shareableHandle, CUmemGenericAllocationHandle handle, CUmemAllocationHandleType handleType, unsigned long long flags);
    "cuMemExportToShareableHandle": (CUresult, ctypes.c_void_p, CUmemGenericAllocationHandle, ctypes.c_int, ctypes.c_ulonglong),
    # CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *osHandle, CUmemAllocationHandleType shHandleType);
    "cuMemImportFromShareableHandle": (CUresult, _p(CUmemGenericAllocationHandle), ctypes.c_void_p, ctypes.c_int),
}

# Optional, CUDA 12.8+ drivers: many copies in one call (the per-call cost dominates at 4 KiB).
_BATCH_PROTOTYPES = {
    # CUresult cuMemcpyBatchAsync_v2(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
    #                                CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs, CUstream hStream);
    "cuMemcpyBatchAsync_v2": (CUresult, _p(CUdeviceptr), _p(CUdeviceptr), _p(_size_t), _size_t,
                              ctypes.c_void_p, _p(_size_t), _size_t, CUstream),
}

DRIVER_NOT_FOUND_MSG = ("cannot load the NVIDIA driver library {path!r}: {why} "
                        "(install the NVIDIA driver, or set NBD_VRAM_LIBCUDA to libcuda.so.1's path)")


class Cuda:
    """Thin, checked access to the CUDA driver API.  One instance per process.

    Every bound function is an attribute with its C name (self.cuMemAlloc_v2),
    so the hot path calls it without a lookup; check() turns a CUresult into
    CudaError with the driver's own name and text for it.
    """

    def __init__(self, path=None):
        self.path = path or os.environ.get("NBD_VRAM_LIBCUDA") or "libcuda.so.1"
        try:
            self._lib = ctypes.CDLL(self.path)
        except OSError as e:
            raise DriverError(DRIVER_NOT_FOUND_MSG.format(path=self.path, why=e)) from None
        for name, (restype, *argtypes) in _PROTOTYPES.items():
            try:
                fn = getattr(self._lib, name)
            except AttributeError:
                raise DriverError(f"the NVIDIA driver at {self.path!r} is too old: it has no {name} "
                                  "(install a driver from 2019 or newer)") from None
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        self.has_vmm = True
        for name, (restype, *argtypes) in _VMM_PROTOTYPES.items():
            fn = getattr(self._lib, name, None)
            if fn is None:
                self.has_vmm = False
                continue
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        self.has_batch = hasattr(self._lib, "cuMemcpyBatchAsync_v2")
        if self.has_batch:
            for name, (restype, *argtypes) in _BATCH_PROTOTYPES.items():
                fn = getattr(self._lib, name)
                fn.restype, fn.argtypes = restype, argtypes
                setattr(self, name, fn)
        self.pid = None

    def error(self, func, rc):
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        if self.cuGetErrorName(rc, ctypes.byref(name)) != CUDA_SUCCESS or not name.value:
            return CudaError(func, rc, f"CUDA error {rc}", "unknown error code")
        self.cuGetErrorString(rc, ctypes.byref(text))
        return CudaError(func, rc, name.value.decode(), (text.value or b"").decode())

    def check(self, func, rc):
        if rc != CUDA_SUCCESS:
            raise self.error(func, rc)

    def call(self, name, *args):
        """Call a bound function by name and raise CudaError on failure."""
        self.check(name, getattr(self, name)(*args))

    def init(self, tries=None, delay_s=2.0):
        """cuInit, retried: a sleeping laptop GPU can take seconds to answer."""
        if tries is None:
            tries = int(os.environ.get("NBD_VRAM_CUINIT_TRIES") or 10)   # the tests make it 1
        # Number GPUs as nvidia-smi does (PCI order), not fastest first.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        for attempt in range(1, tries + 1):
            rc = self.cuInit(0)
            if rc == CUDA_SUCCESS:
                self.pid = os.getpid()
                return
            err = self.error("cuInit", rc)
            if rc == CUDA_ERROR_NO_DEVICE:
                raise NoGpuError("no NVIDIA GPU found (cuInit: CUDA_ERROR_NO_DEVICE): check `nvidia-smi`, "
                                 "and that CUDA_VISIBLE_DEVICES does not hide it")
            if rc == CUDA_ERROR_INSUFFICIENT_DRIVER or attempt == tries:
                raise DriverError(f"the NVIDIA driver did not initialise: {err} "
                                  "(check `nvidia-smi` and dmesg)")
            log.warning("cuInit failed (%s), attempt %d of %d; retrying in %.0f s", err.name, attempt, tries, delay_s)
            time.sleep(delay_s)

    def device_count(self):
        n = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(n))
        return n.value

    def device_info(self, dev):
        """Name, UUID ("GPU-..."), PCI bus id and total memory of one device."""
        name = ctypes.create_string_buffer(256)
        self.call("cuDeviceGetName", name, 256, dev)
        uuid = CUuuid()
        self.call("cuDeviceGetUuid_v2", ctypes.byref(uuid), dev)
        busid = ctypes.create_string_buffer(64)
        self.call("cuDeviceGetPCIBusId", busid, 64, dev)
        total = _size_t()
        self.call("cuDeviceTotalMem_v2", ctypes.byref(total), dev)
        h = bytes(uuid.bytes).hex()
        return {"index": dev, "name": name.value.decode(errors="replace"),
                "uuid": f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                "pci_bus_id": busid.value.decode().lower(), "total_bytes": total.value}

    def attribute(self, attr, dev):
        v = ctypes.c_int()
        self.call("cuDeviceGetAttribute", ctypes.byref(v), attr, dev)
        return v.value

    def select_device(self, spec):
        """--gpu: an index ('0'), a UUID ('GPU-8f...' or without 'GPU-'), or a PCI bus id ('0000:01:00.0')."""
        spec = str(spec).strip()
        count = self.device_count()
        if count == 0:
            raise NoGpuError("no NVIDIA GPU found: check `nvidia-smi`")
        if spec.isdigit():
            if int(spec) >= count:
                raise NoGpuError(f"--gpu {spec}: there are only {count} GPU(s), numbered 0 to {count - 1}")
            dev = CUdevice()
            self.call("cuDeviceGet", ctypes.byref(dev), int(spec))
            return dev.value
        if ":" in spec:
            dev = CUdevice()
            rc = self.cuDeviceGetByPCIBusId(ctypes.byref(dev), spec.encode())
            if rc != CUDA_SUCCESS:
                raise NoGpuError(f"--gpu {spec}: no GPU at that PCI bus id ({self.error('cuDeviceGetByPCIBusId', rc).name}); "
                                 "see `nvidia-smi --query-gpu=pci.bus_id --format=csv`")
            return dev.value
        want = spec.lower().removeprefix("gpu-")
        for i in range(count):
            if self.device_info(i)["uuid"].lower().removeprefix("gpu-") == want:
                return i
        raise NoGpuError(f"--gpu {spec}: no GPU has that UUID; see `nvidia-smi -L`")

    def mem_info(self):
        free, total = _size_t(), _size_t()
        self.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value


############################################################################
# NVML (libnvidia-ml.so.1 via ctypes), optional ############################
############################################################################

# Only for what the CUDA driver API does not tell: which processes use a GPU, and
# its memory clock.  Everything works without it (a box without the library, a
# container without /dev/nvidiactl access): Nvml.open() then returns None.

NVML_SUCCESS = 0
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_CLOCK_MEM = 2                       # nvmlClockType_t
NVML_VALUE_NOT_AVAILABLE = 2**64 - 1     # (unsigned long long)-1, e.g. usedGpuMemory without per-process accounting

# nvmlReturn_t values, by name (nvml.h's enum nvmlReturn_enum).
NVML_ERROR_NAMES = {
    0: "NVML_SUCCESS", 1: "NVML_ERROR_UNINITIALIZED", 2: "NVML_ERROR_INVALID_ARGUMENT",
    3: "NVML_ERROR_NOT_SUPPORTED", 4: "NVML_ERROR_NO_PERMISSION", 5: "NVML_ERROR_ALREADY_INITIALIZED",
    6: "NVML_ERROR_NOT_FOUND", 7: "NVML_ERROR_INSUFFICIENT_SIZE", 8: "NVML_ERROR_INSUFFICIENT_POWER",
    9: "NVML_ERROR_DRIVER_NOT_LOADED", 10: "NVML_ERROR_TIMEOUT", 11: "NVML_ERROR_IRQ_ISSUE",
    12: "NVML_ERROR_LIBRARY_NOT_FOUND", 13: "NVML_ERROR_FUNCTION_NOT_FOUND", 14: "NVML_ERROR_CORRUPTED_INFOROM",
    15: "NVML_ERROR_GPU_IS_LOST", 16: "NVML_ERROR_RESET_REQUIRED", 17: "NVML_ERROR_OPERATING_SYSTEM",
    18: "NVML_ERROR_LIB_RM_VERSION_MISMATCH", 19: "NVML_ERROR_IN_USE", 20: "NVML_ERROR_MEMORY",
    21: "NVML_ERROR_NO_DATA", 22: "NVML_ERROR_VGPU_ECC_NOT_ENABLED", 23: "NVML_ERROR_INSUFFICIENT_RESOURCES",
    24: "NVML_ERROR_FREQ_NOT_SUPPORTED", 25: "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", 26: "NVML_ERROR_DEPRECATED",
    27: "NVML_ERROR_NOT_READY", 28: "NVML_ERROR_GPU_NOT_FOUND", 29: "NVML_ERROR_INVALID_STATE",
    999: "NVML_ERROR_UNKNOWN",
}

nvmlReturn_t = ctypes.c_int
nvmlDevice_t = ctypes.c_void_p          # opaque handle
_uint = ctypes.c_uint
_ull = ctypes.c_ulonglong


class nvmlMemory_t(ctypes.Structure):
    _fields_ = [("total", _ull), ("free", _ull), ("used", _ull)]


class nvmlProcessInfo_t(ctypes.Structure):      # nvmlProcessInfo_v2_t, what the _v3 calls fill in
    _fields_ = [("pid", _uint), ("usedGpuMemory", _ull), ("gpuInstanceId", _uint), ("computeInstanceId", _uint)]


_NVML_PROTOTYPES = {
    # nvmlReturn_t nvmlInit_v2(void);
    "nvmlInit_v2": (nvmlReturn_t,),
    # nvmlReturn_t nvmlShutdown(void);
    "nvmlShutdown": (nvmlReturn_t,),
    # const char *nvmlErrorString(nvmlReturn_t result);
    "nvmlErrorString": (ctypes.c_char_p, nvmlReturn_t),
    # nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device);
    "nvmlDeviceGetHandleByUUID": (nvmlReturn_t, ctypes.c_char_p, _p(nvmlDevice_t)),
    # nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory);
    "nvmlDeviceGetMemoryInfo": (nvmlReturn_t, nvmlDevice_t, _p(nvmlMemory_t)),
    # nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount, nvmlProcessInfo_t *infos);
    "nvmlDeviceGetComputeRunningProcesses_v3": (nvmlReturn_t, nvmlDevice_t, _p(_uint), _p(nvmlProcessInfo_t)),
    # nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount, nvmlProcessInfo_t *infos);
    "nvmlDeviceGetGraphicsRunningProcesses_v3": (nvmlReturn_t, nvmlDevice_t, _p(_uint), _p(nvmlProcessInfo_t)),
    # nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock);
    "nvmlDeviceGetClockInfo": (nvmlReturn_t, nvmlDevice_t, ctypes.c_int, _p(_uint)),
    # nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, nvmlClockType_t type, unsigned int *clock);
    "nvmlDeviceGetMaxClockInfo": (nvmlReturn_t, nvmlDevice_t, ctypes.c_int, _p(_uint)),
    # nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t device, unsigned int *count, unsigned int *clocksMHz);
    "nvmlDeviceGetSupportedMemoryClocks": (nvmlReturn_t, nvmlDevice_t, _p(_uint), _p(_uint)),
    # nvmlReturn_t nvmlDeviceSetMemoryLockedClocks(nvmlDevice_t device, unsigned int minMemClockMHz, unsigned int maxMemClockMHz);
    "nvmlDeviceSetMemoryLockedClocks": (nvmlReturn_t, nvmlDevice_t, _uint, _uint),
    # nvmlReturn_t nvmlDeviceResetMemoryLockedClocks(nvmlDevice_t device);
    "nvmlDeviceResetMemoryLockedClocks": (nvmlReturn_t, nvmlDevice_t),
}


class NvmlError(Exception):
    """A failed NVML call; .name is the NVML_ERROR_* name.  str() is one line, with what to do if known."""

    def __init__(self, func, code, text="", hint=""):
        self.func, self.code = func, code
        self.name = NVML_ERROR_NAMES.get(code, f"NVML error {code}")
        super().__init__(f"{func}: {self.name} ({code})" + (f": {text}" if text else "") + (f"; {hint}" if hint else ""))


class Nvml:
    """libnvidia-ml.so.1 through ctypes: optional, only for what the CUDA driver API does not tell.

    Devices are named by the UUID strings ("GPU-...") that Cuda.device_info()
    gives; handles are looked up with nvmlDeviceGetHandleByUUID and cached.
    """

    def __init__(self, lib, path):
        self._lib, self.path = lib, path
        self._handles = {}
        self.closed = False

    @classmethod
    def open(cls, path=None):
        """The library, initialised; None (and a debug line) if it is absent or nvmlInit_v2 fails."""
        path = path or os.environ.get("NBD_VRAM_LIBNVML") or "libnvidia-ml.so.1"
        try:
            lib = ctypes.CDLL(path)
            for name, (restype, *argtypes) in _NVML_PROTOTYPES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except (OSError, AttributeError) as e:
            log.debug("NVML not used: cannot load %s: %s", path, e)
            return None
        self = cls(lib, path)
        for name in _NVML_PROTOTYPES:
            setattr(self, name, getattr(lib, name))
        rc = self.nvmlInit_v2()
        if rc != NVML_SUCCESS:
            log.debug("NVML not used: %s", self.error("nvmlInit_v2", rc))
            return None
        return self

    def error(self, func, rc, hint=""):
        text = self.nvmlErrorString(rc)
        return NvmlError(func, rc, (text or b"").decode(errors="replace"), hint)

    def call(self, name, *args, hint=""):
        """Call a bound function by name and raise NvmlError on failure."""
        rc = getattr(self, name)(*args)
        if rc != NVML_SUCCESS:
            raise self.error(name, rc, hint)

    def _device(self, uuid):
        dev = self._handles.get(uuid)
        if dev is None:
            dev = nvmlDevice_t()
            self.call("nvmlDeviceGetHandleByUUID", uuid.encode(), ctypes.byref(dev))
            self._handles[uuid] = dev
        return dev

    def _process_list(self, name, dev):
        """One of the *RunningProcesses_v3 lists, grown until it fits (processes come and go meanwhile)."""
        count = _uint(0)
        for _ in range(5):
            infos = (nvmlProcessInfo_t * max(count.value, 1))()
            count.value = len(infos)
            rc = getattr(self, name)(dev, ctypes.byref(count), infos)
            if rc == NVML_SUCCESS:
                return infos[:count.value]
            if rc != NVML_ERROR_INSUFFICIENT_SIZE:
                raise self.error(name, rc)
            count.value += 8
        raise self.error(name, NVML_ERROR_INSUFFICIENT_SIZE)

    def processes(self, uuid):
        """[(pid, used_bytes or None, name)] of the compute and graphics processes on one GPU, one entry per pid."""
        dev = self._device(uuid)
        seen = {}
        for name in ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3"):
            for p in self._process_list(name, dev):
                used = None if p.usedGpuMemory == NVML_VALUE_NOT_AVAILABLE else p.usedGpuMemory
                if p.pid not in seen or seen[p.pid] is None:
                    seen[p.pid] = used
        out = []
        for pid, used in seen.items():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip() or "?"
            except OSError:
                comm = "?"              # gone, or in another pid namespace
            out.append((pid, used, comm))
        return out

    def memory_info(self, uuid):
        """(free, total) bytes, as NVML counts them (all processes)."""
        mem = nvmlMemory_t()
        self.call("nvmlDeviceGetMemoryInfo", self._device(uuid), ctypes.byref(mem))
        return mem.free, mem.total

    def memory_clock(self, uuid):
        """(current, max) memory clock in MHz."""
        dev, cur, top = self._device(uuid), _uint(), _uint()
        self.call("nvmlDeviceGetClockInfo", dev, NVML_CLOCK_MEM, ctypes.byref(cur))
        self.call("nvmlDeviceGetMaxClockInfo", dev, NVML_CLOCK_MEM, ctypes.byref(top))
        return cur.value, top.value

    def supported_memory_clocks(self, uuid):
        """The memory clocks (MHz) the GPU can be locked to, highest first."""
        dev, count = self._device(uuid), _uint(0)
        rc = self.nvmlDeviceGetSupportedMemoryClocks(dev, ctypes.byref(count), None)
        if rc not in (NVML_SUCCESS, NVML_ERROR_INSUFFICIENT_SIZE):
            raise self.error("nvmlDeviceGetSupportedMemoryClocks", rc)
        clocks = (_uint * max(count.value, 1))()
        count.value = len(clocks)
        self.call("nvmlDeviceGetSupportedMemoryClocks", dev, ctypes.byref(count), clocks)
        return sorted(set(clocks[:count.value]), reverse=True)

    @staticmethod
    def _clock_hint(rc):
        if NVML_ERROR_NAMES.get(rc) == "NVML_ERROR_NOT_SUPPORTED":
            return "this GPU or driver cannot lock its memory clock: leave the memory clock cap unset"
        if NVML_ERROR_NAMES.get(rc) == "NVML_ERROR_NO_PERMISSION":
            return "locking GPU clocks needs root: run nbd-vram as root, or leave the memory clock cap unset"
        return ""

    def lock_memory_clock(self, uuid, max_mhz):
        """Lock the memory clock to [lowest supported, highest supported <= max_mhz]; returns that highest MHz."""
        clocks = self.supported_memory_clocks(uuid)
        if not clocks:
            raise NvmlError("nvmlDeviceGetSupportedMemoryClocks", 3, "no memory clocks listed",
                            self._clock_hint(3))
        fits = [c for c in clocks if c <= max_mhz]
        if not fits:
            raise NvmlError("nvmlDeviceSetMemoryLockedClocks", 2, f"no supported memory clock is at most {max_mhz} MHz",
                            f"the lowest this GPU supports is {clocks[-1]} MHz")
        rc = self.nvmlDeviceSetMemoryLockedClocks(self._device(uuid), clocks[-1], fits[0])
        if rc != NVML_SUCCESS:
            raise self.error("nvmlDeviceSetMemoryLockedClocks", rc, self._clock_hint(rc))
        return fits[0]

    def reset_memory_clock(self, uuid):
        """Undo lock_memory_clock(): the driver picks the memory clock again."""
        rc = self.nvmlDeviceResetMemoryLockedClocks(self._device(uuid))
        if rc != NVML_SUCCESS:
            raise self.error("nvmlDeviceResetMemoryLockedClocks", rc, self._clock_hint(rc))

    def close(self):
        """nvmlShutdown; the library stays loaded (ctypes cannot unload it)."""
        if not self.closed:
            self.closed = True
            self._handles.clear()
            self.nvmlShutdown()


############################################################################
# VRAM store ###############################################################
############################################################################

BACKOFF_STEP = 512 * MiB       # as the original: give back 512 MiB per failed try
SIZE_ALIGN = 2 * MiB           # the VMM granularity of current GPUs; sizes are rounded down to it


class VramStore:
    """The export's bytes: one contiguous range of device memory.

    Allocated with cuMemCreate and exported as a POSIX fd where the device
    supports it (the fd keeps the memory alive in another process, which is
    what a restart without losing swapped pages needs), else cuMemAlloc_v2.
    NBD code sees only .dptr and .size_bytes and never calls CUDA itself.
    """

    def __init__(self, cuda, device, ctx, dptr, size_bytes, handle=None, fd=None):
        self.cuda, self.device, self.ctx = cuda, device, ctx
        self.dptr, self.size_bytes = dptr, size_bytes
        self.handle, self.fd = handle, fd
        self.imported = False       # mapped from another process's fd: that process owns the memory
        self.freed = False
        self.quiet = False          # the GPU process frees for the daemon, which logs it

    @property
    def kind(self):
        return "cuMemCreate+fd" if self.handle is not None else "cuMemAlloc"

    @classmethod
    def open_device(cls, cuda, gpu):
        """cuInit, pick the GPU, retain its primary context and make it current."""
        cuda.init()
        dev = cuda.select_device(gpu)
        ctx = CUcontext()
        cuda.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
        cuda.call("cuCtxSetCurrent", ctx)
        return dev, ctx

    @classmethod
    def allocate(cls, cuda, dev, ctx, want_bytes, floor_bytes, use_vmm=True):
        """Try want_bytes; on out-of-memory back off by 512 MiB down to floor_bytes."""
        vmm = (use_vmm and cuda.has_vmm
               and cuda.attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev)
               and cuda.attribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev))
        align = cls._granularity(cuda, dev) if vmm else SIZE_ALIGN
        size = want_bytes // align * align
        floor_bytes = max(align, floor_bytes)
        last = None
        while size >= floor_bytes:
            try:
                store = cls._create(cuda, dev, ctx, size) if vmm else cls._alloc(cuda, dev, ctx, size)
            except CudaError as e:
                if e.code != CUDA_ERROR_OUT_OF_MEMORY:
                    raise
                last = e
                log.info("allocating %s of VRAM failed (out of memory), trying %s less",
                         format_size(size), format_size(BACKOFF_STEP))
                size = (size - BACKOFF_STEP) // align * align
                continue
            cuda.check("cuMemsetD8_v2", cuda.cuMemsetD8_v2(store.dptr, 0, size))
            cuda.check("cuCtxSynchronize", cuda.cuCtxSynchronize())
            log.info("allocated %s of VRAM (%s asked, %s)", format_size(size), format_size(want_bytes), store.kind)
            return store
        free, total = cuda.mem_info()
        raise NoVramError(f"could not allocate even {format_size(floor_bytes)} of VRAM ({last.name if last else 'too small'}); "
                          f"{format_size(free)} of {format_size(total)} is free: close GPU programs (see `nvidia-smi`) "
                          "or lower the size / min_size")

    @staticmethod
    def _prop(dev):
        prop = CUmemAllocationProp()
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = dev
        return prop

    @classmethod
    def _granularity(cls, cuda, dev):
        g = _size_t()
        cuda.call("cuMemGetAllocationGranularity", ctypes.byref(g), ctypes.byref(cls._prop(dev)),
                  CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        return max(g.value, SIZE_ALIGN)

    @classmethod
    def _alloc(cls, cuda, dev, ctx, size):
        dptr = CUdeviceptr()
        cuda.call("cuMemAlloc_v2", ctypes.byref(dptr), size)
        return cls(cuda, dev, ctx, dptr.value, size)

    @classmethod
    def _create(cls, cuda, dev, ctx, size):
        handle = CUmemGenericAllocationHandle()
        cuda.call("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(cls._prop(dev)), 0)
        try:
            fd = ctypes.c_int(-1)
            cuda.call("cuMemExportToShareableHandle", ctypes.byref(fd), handle,
                      CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0)
            os.set_inheritable(fd.value, False)
            dptr = cls._map(cuda, dev, handle, size)
        except BaseException:
            cuda.cuMemRelease(handle)
            raise
        return cls(cuda, dev, ctx, dptr, size, handle=handle.value, fd=fd.value)

    @classmethod
    def import_fd(cls, cuda, dev, ctx, fd, size):
        """Map memory that another process exported (a restart keeps the swapped pages)."""
        handle = CUmemGenericAllocationHandle()
        cuda.call("cuMemImportFromShareableHandle", ctypes.byref(handle), ctypes.c_void_p(fd),
                  CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        try:
            dptr = cls._map(cuda, dev, handle, size)
        except BaseException:
            cuda.cuMemRelease(handle)
            raise
        store = cls(cuda, dev, ctx, dptr, size, handle=handle.value, fd=fd)
        store.imported = True
        return store

    @staticmethod
    def _map(cuda, dev, handle, size):
        dptr = CUdeviceptr()
        cuda.call("cuMemAddressReserve", ctypes.byref(dptr), size, 0, 0, 0)
        try:
            cuda.call("cuMemMap", dptr, size, 0, handle, 0)
            access = CUmemAccessDesc()
            access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = dev
            access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            cuda.call("cuMemSetAccess", dptr, size, ctypes.byref(access), 1)
        except BaseException:
            cuda.cuMemUnmap(dptr, size)
            cuda.cuMemAddressFree(dptr, size)
            raise
        return dptr.value

    def free(self, scrub=True):
        """Zero the memory (the next CUDA program must not read swapped-out secrets), then free it."""
        if self.freed:
            return
        self.freed = True
        cuda = self.cuda
        cuda.cuCtxSetCurrent(self.ctx)
        if scrub:
            rc = cuda.cuMemsetD8_v2(self.dptr, 0, self.size_bytes) or cuda.cuCtxSynchronize()
            if rc:
                log.warning("scrubbing VRAM before freeing it failed: %s", cuda.error("cuMemsetD8_v2", rc))
        if self.handle is None:
            cuda.cuMemFree_v2(self.dptr)
        else:
            cuda.cuMemUnmap(self.dptr, self.size_bytes)
            cuda.cuMemAddressFree(self.dptr, self.size_bytes)
            cuda.cuMemRelease(self.handle)
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        log.log(logging.DEBUG if self.imported or self.quiet else logging.INFO, "%s %s of VRAM",
                "unmapped" if self.imported else "freed", format_size(self.size_bytes))


############################################################################
# NBD protocol: constants and wire formats #################################
############################################################################
# Numbers and layouts from the NBD protocol (NetworkBlockDevice/nbd doc/proto.md).

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9     # option reply magic
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0       # handshake flags (server)
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0     # client flags
NBD_FLAG_C_NO_ZEROES = 1 << 1


class TxFlag(enum.IntFlag):
    """Transmission flags: what the export supports."""
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8


# What we advertise, and why each is true:
#  SEND_FLUSH, SEND_FUA: a write is replied to only after its copy to VRAM has
#    completed (one stream sync per batch), so FLUSH and FUA are already met.
#  SEND_TRIM, SEND_WRITE_ZEROES: both zero the range in VRAM (cuMemsetD8Async);
#    a trimmed range reads back as zeroes, which the spec allows.
#  CAN_MULTI_CONN: every connection writes the same VRAM and replies after the
#    sync, so a write acknowledged on one connection is visible on all.
EXPORT_FLAGS = (TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.SEND_TRIM
                | TxFlag.SEND_WRITE_ZEROES | TxFlag.CAN_MULTI_CONN)


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


NBD_REP_ERR = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    ERR_UNSUP = NBD_REP_ERR | 1
    ERR_POLICY = NBD_REP_ERR | 2
    ERR_INVALID = NBD_REP_ERR | 3
    ERR_PLATFORM = NBD_REP_ERR | 4
    ERR_TLS_REQD = NBD_REP_ERR | 5
    ERR_UNKNOWN = NBD_REP_ERR | 6
    ERR_SHUTDOWN = NBD_REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = NBD_REP_ERR | 8
    ERR_TOO_BIG = NBD_REP_ERR | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


# Plain ints for the hot path (an IntEnum comparison costs an attribute lookup each time).
_CMD_READ, _CMD_WRITE, _CMD_DISC = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC)
NBD_CMD_FLAG_FUA = int(CmdFlag.FUA)

# The NBD error numbers are Linux's, and the spec lists which may be sent.
NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW = 1, 5, 12, 22, 28, 75

# Flags each command accepts; anything else is EINVAL (NBD_CMD_FLAG_DF needs
# structured replies, which we do not negotiate).  FUA on every command: with
# NBD_FLAG_SEND_FUA advertised the server MUST accept it everywhere (proto.md),
# and old qemu sends FLUSH|FUA.  Plain ints: since Python 3.11, ~ of an IntFlag
# inverts only the defined bits, so `flags & ~allowed` would miss unknown ones.
CMD_FLAGS_ALLOWED = {
    Cmd.READ: int(CmdFlag.FUA),
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.FLUSH: int(CmdFlag.FUA),
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE),
    Cmd.DISC: int(CmdFlag.FUA),
}

MIN_BLOCK = 1                  # any byte offset and length works: copies are byte-granular
PREFERRED_BLOCK = 4096         # the page size: what swap sends
MAX_REQUEST = 32 * MiB         # largest READ/WRITE payload (nbdkit's MAX_REQUEST_SIZE, the kernel's max_hw_sectors)
MAX_OPTION = 64 * 1024         # longest option payload we read (names are at most 4096 bytes)
MAX_BATCH = 256                # requests answered by one stream sync and one sendmsg (2 iovecs each, IOV_MAX 1024)
GROUP_COPY_MAX = 64 * 1024     # reads up to this size share one cuMemcpyBatchAsync; larger ones go alone
STREAM_WRITE_MIN = 256 * 1024  # a write this large is copied on in pieces while the rest of its payload arrives
STREAM_PIECE = 128 * 1024      # the smallest such piece
MAX_SOCKET_PATH = 107         # sockaddr_un's sun_path is 108 bytes with the final NUL
HANDSHAKE_TIMEOUT_S = 30       # the whole handshake, not each receive: a client dripping a byte at a time is dropped
MAX_HANDSHAKE_OPTIONS = 64     # options in one handshake; a client needs a handful (nbdinfo --list: about 5)

# S: NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct("!QQH")
# C: client flags
CLIENT_FLAGS = struct.Struct("!I")
# C: IHAVEOPT, option, length of data
OPTION = struct.Struct("!QII")
# S: reply magic, option, reply type, length of data
OPTION_REPLY = struct.Struct("!QIII")
# S (NBD_OPT_EXPORT_NAME): export size, transmission flags, then 124 zeroes unless NO_ZEROES
EXPORT_NAME_REPLY = struct.Struct("!QH")
# S (NBD_REP_INFO): NBD_INFO_EXPORT, size, transmission flags
INFO_EXPORT = struct.Struct("!HQH")
# S (NBD_REP_INFO): NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
INFO_BLOCK_SIZE = struct.Struct("!HIII")
# C: magic, command flags, type, cookie, offset, length
REQUEST = struct.Struct("!IHHQQI")
# S: magic, error, cookie
SIMPLE_REPLY = struct.Struct("!IIQ")
REQ_SIZE = REQUEST.size
REPLY_SIZE = SIMPLE_REPLY.size


class ProtocolError(Exception):
    """The connection cannot go on (framing lost, client gone): close it, and only it."""


def check_request(typ, flags, offset, length, size):
    """Validate one request; returns 0 or the NBD error to reply with, and why."""
    allowed = CMD_FLAGS_ALLOWED.get(typ)
    if allowed is None:
        return NBD_EINVAL, "unknown command"
    if flags & ~allowed:
        return NBD_EINVAL, f"flags {flags:#x} not allowed"
    if typ == Cmd.FLUSH:
        return (NBD_EINVAL, "offset and length must be 0") if offset or length else (0, None)
    if length == 0:
        return NBD_EINVAL, "length is 0"
    if offset > size or length > size - offset:        # overflow-safe form of offset+length > size
        err = NBD_ENOSPC if typ in (Cmd.WRITE, Cmd.WRITE_ZEROES) else NBD_EINVAL
        return err, f"offset {offset} + length {length} is beyond the end ({size})"
    if length > MAX_REQUEST and typ in (Cmd.READ, Cmd.WRITE):
        return NBD_EINVAL, f"length {length} is over the maximum {MAX_REQUEST}"
    return 0, None


def recv_exact(sock, n, what):
    """Read exactly n bytes (handshake only: allocates)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ProtocolError(f"client closed the connection: read {got} of {n} {what} bytes")
        got += k
    return bytes(buf)


def recv_into_exact(sock, view, what):
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ProtocolError(f"client closed the connection: read {got} of {n} {what} bytes")
        got += k


def send_all(sock, bufs):
    """sendmsg a list of buffers, going on after a partial send."""
    while bufs:
        sent = sock.sendmsg(bufs)
        while bufs and sent >= len(bufs[0]):
            sent -= len(bufs[0])
            bufs.pop(0)
        if bufs and sent:
            bufs[0] = memoryview(bufs[0])[sent:]


############################################################################
# Copy batches: the GPU side of a batch of requests ########################
############################################################################
# Only one process per GPU holds a CUDA context (each context costs about 520 MiB of VRAM on a
# Hopper card, and its locked host memory): the worker processes that speak NBD never load
# libcuda.  A serving thread describes the copies a batch of requests needs in one message; the
# process with the context runs them (CopyEngine) and answers once for the batch.  The message
# goes over a SOCK_SEQPACKET pair to that process's copy thread (RemoteIoContext, CopyServer), or,
# in a process that has the context itself, to the engine in the same thread (IoContext).  The
# payloads do not travel: they stay in staging buffers that both processes map (a memfd the GPU
# process pins with cuMemHostRegister), and the message carries addresses as the GPU process sees
# them.  Workers are this program's own processes, and are trusted with those addresses.
#
# A message: COPY_HEADER (segments, flags), then each segment: COPY_SEGMENT (kind, count k), then
# k destination addresses, k source addresses and k sizes (u64 each), the layout
# cuMemcpyBatchAsync takes.  The copies of one segment may run in any order (only reads, which
# never conflict, share one); segments run in order on one stream.  With COPY_SYNC set, the
# stream is synchronized and COPY_REPLY answers: a failed synchronization (every copy of the
# batch is suspect), the indices of the segments whose copies failed when issued, and the first
# error's text.  A message without it (the pieces of a large write, sent while the rest arrives)
# gets no answer; a failure it meets is reported by the next answer as a failed synchronization.

COPY_HEADER = struct.Struct("=II")
COPY_SEGMENT = struct.Struct("=HHI")
COPY_ONE = struct.Struct("=HHIQQQ")         # a segment of one copy: header, dst, src, size
assert COPY_ONE.size == 32                  # Transmission._batch adds it as a literal
COPY_REPLY = struct.Struct("=II")           # synchronization failed, failed segments (u16 each, then the text)
COPY_HTOD, COPY_DTOH, COPY_MEMSET = 1, 2, 3
COPY_SYNC = 1
COPY_MSG_BYTES = COPY_HEADER.size + MAX_BATCH * COPY_ONE.size + 256
COPY_REPLY_BYTES = COPY_REPLY.size + 2 * MAX_BATCH + 1024
COPY_NAMES = {COPY_HTOD: "cuMemcpyHtoDAsync_v2", COPY_DTOH: "cuMemcpyDtoHAsync_v2", COPY_MEMSET: "cuMemsetD8Async"}


def _received_fds(anc):
    fds = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(data) // struct.calcsize("i")
            fds += struct.unpack(f"{n}i", data[:n * struct.calcsize("i")])
    return fds


def mapping_address(mapping):
    """Where an mmap object's memory is (it never moves while mapped)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class CopyLost(OSError):
    """The GPU process stopped answering: the connection ends unanswered (the kernel sends its
    requests again on the connections it gets next), never with an I/O error."""


class CopyEngine:
    """Runs copy messages on one stream of one context: the only code that issues I/O copies."""

    def __init__(self, cuda, ctx, nstreams=1):
        self.cuda, self.ctx = cuda, ctx
        cuda.call("cuCtxSetCurrent", ctx)
        self.streams = []
        for _ in range(nstreams):
            stream = CUstream()
            cuda.call("cuStreamCreate", ctypes.byref(stream), CU_STREAM_NON_BLOCKING)
            self.streams.append(stream.value)
        self.stream = self.streams[0]
        self.late_error = None      # from a message that had no answer; the next answer reports it
        # Cleared by the first grouped copy if the driver has the symbol but not the feature.
        self.batch = None
        if cuda.has_batch and os.environ.get("NBD_VRAM_BATCH_COPY", "1") != "0":
            # The same function with plain addresses for the arrays: they lie inside the message.
            self.batch = cuda._lib["cuMemcpyBatchAsync_v2"]
            self.batch.restype = CUresult
            self.batch.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _size_t, ctypes.c_void_p,
                                   _p(_size_t), _size_t, CUstream)
        self.attr = CUmemcpyAttributes(srcAccessOrder=CU_MEMCPY_SRC_ACCESS_ORDER_STREAM)
        self.attr_ref = ctypes.cast(ctypes.pointer(self.attr), ctypes.c_void_p)
        self.attr_idx = (_size_t * 1)(0)
        self.failed = []
        self.calls = {COPY_HTOD: cuda.cuMemcpyHtoDAsync_v2, COPY_DTOH: cuda.cuMemcpyDtoHAsync_v2}

    def issue(self, msg, addr, failed, stream=None):
        """Issue the copies of the message in msg (a view of the bytes at addr) on a stream (the
        first by default); the indices of the segments whose copies failed go into failed.
        Returns (flags, the first error or None)."""
        cuda = self.cuda
        stream = stream or self.stream
        nseg, flags = COPY_HEADER.unpack_from(msg, 0)
        off = COPY_HEADER.size
        error = None
        for s in range(nseg):
            kind, k, _ = COPY_SEGMENT.unpack_from(msg, off)
            if k == 1:
                _, _, _, dst, src, size = COPY_ONE.unpack_from(msg, off)
                off += COPY_ONE.size
                if kind == COPY_MEMSET:
                    rc = cuda.cuMemsetD8Async(dst, 0, size, stream)
                else:
                    rc = self.calls[kind](dst, src, size, stream)
                if rc:
                    failed.append(s)
                    error = error or cuda.error(COPY_NAMES.get(kind, "copy"), rc)
                continue
            arrays = addr + off + COPY_SEGMENT.size
            off += COPY_SEGMENT.size + 24 * k
            rc = -1
            if self.batch is not None and kind != COPY_MEMSET:
                rc = self.batch(arrays, arrays + 8 * k, arrays + 16 * k, k, self.attr_ref, self.attr_idx, 1, stream)
                if rc == CUDA_ERROR_NOT_SUPPORTED:
                    log.info("cuMemcpyBatchAsync is not supported here: one driver call per copy from now on")
                    self.batch, rc = None, -1
                elif rc:
                    error = error or cuda.error("cuMemcpyBatchAsync_v2", rc)
            if rc == -1:
                rc = 0
                first = off - 24 * k
                for i in range(k):
                    (dst,) = _U64.unpack_from(msg, first + 8 * i)
                    (src,) = _U64.unpack_from(msg, first + 8 * (k + i))
                    (size,) = _U64.unpack_from(msg, first + 8 * (2 * k + i))
                    one = (cuda.cuMemsetD8Async(dst, 0, size, stream) if kind == COPY_MEMSET
                           else self.calls[kind](dst, src, size, stream))
                    if one and not rc:
                        rc = one
                        error = error or cuda.error(COPY_NAMES.get(kind, "copy"), one)
            if rc:
                failed.append(s)
        return flags, error

    def sync(self, stream=None):
        """Wait for every copy issued so far on a stream; the error if one failed (CUresult, else 0)."""
        return self.cuda.cuStreamSynchronize(stream or self.stream)

    def run(self, msg, addr, reply):
        """issue() one message; with COPY_SYNC, wait for it and pack the answer into reply.
        Returns the answer's length, 0 without one."""
        failed = self.failed
        flags, error = self.issue(msg, addr, failed)
        if not flags & COPY_SYNC:
            if error is not None:
                self.late_error = self.late_error or error
            failed.clear()
            return 0
        # Also after a call that failed when issued: it may have left its error on the stream,
        # and that error belongs to this batch, not to the next one.
        rc = self.sync()
        if rc:
            error = self.cuda.error("cuStreamSynchronize", rc)
        if self.late_error is not None:
            error, rc = self.late_error, rc or 1
            self.late_error = None
        n = pack_copy_reply(reply, bool(rc), failed, error)
        failed.clear()
        return n

    def close(self):
        if self.streams:
            self.cuda.cuCtxSetCurrent(self.ctx)
            for stream in self.streams:
                self.cuda.cuStreamDestroy_v2(stream)
            self.streams, self.stream = [], None


_U64 = struct.Struct("=Q")
_U16 = struct.Struct("=H")


def pack_copy_reply(reply, sync_failed, failed, error):
    """COPY_REPLY into reply; returns its length."""
    COPY_REPLY.pack_into(reply, 0, int(sync_failed), len(failed))
    n = COPY_REPLY.size
    for s in failed:
        _U16.pack_into(reply, n, s)
        n += 2
    if error is not None:
        text = str(error).encode()[:1000]
        reply[n:n + len(text)] = text
        n += len(text)
    return n


def read_copy_reply(reply, n):
    """COPY_REPLY: (synchronization failed, [failed segment indices], error text)."""
    sync_failed, nfailed = COPY_REPLY.unpack_from(reply, 0)
    at = COPY_REPLY.size
    failed = [_U16.unpack_from(reply, at + 2 * i)[0] for i in range(nfailed)]
    return sync_failed, failed, bytes(reply[at + 2 * nfailed:n]).decode(errors="replace")


class _Buffers:
    """What both kinds of IoContext share: the staging buffers and the message being built.

    rx receives request headers and write payloads (copied to VRAM straight
    from it), tx receives read data (sent straight from it).  rx_addr is rx's
    address here (to move bytes within it); rx_far and tx_far are the
    addresses the copying process uses for them.
    """

    def _views(self, addr, rx_bytes, tx_bytes):
        view = memoryview((ctypes.c_char * (rx_bytes + tx_bytes)).from_address(addr)).cast("B")
        self.rx, self.tx = view[:rx_bytes], view[rx_bytes:]
        self.rx_addr, self.tx_addr = addr, addr + rx_bytes
        self._msg = ctypes.create_string_buffer(COPY_MSG_BYTES)
        self.msg = memoryview(self._msg).cast("B")
        self.msg_addr = ctypes.addressof(self._msg)
        self.reply = bytearray(COPY_REPLY_BYTES)


class IoContext(_Buffers):
    """A serving thread's buffers and copies in a process that holds the GPU's context itself.

    Pinned staging buffers (cuMemAllocHost) and a CopyEngine of its own;
    allocated once, before the thread serves anything: the I/O path itself
    never allocates.
    """

    def __init__(self, store, rx_bytes, tx_bytes):
        self.cuda = store.cuda
        self.engine = CopyEngine(store.cuda, store.ctx)
        self.stream = self.engine.stream
        self._host = None
        try:
            p = ctypes.c_void_p()
            self.cuda.call("cuMemAllocHost_v2", ctypes.byref(p), rx_bytes + tx_bytes)
            self._host = p.value
        except BaseException:
            self.close()
            raise
        self._views(self._host, rx_bytes, tx_bytes)
        self.rx_far, self.tx_far = self._host, self._host + rx_bytes

    def enter(self):
        """Call first in the thread that uses it: the engine runs in this thread."""
        self.cuda.call("cuCtxSetCurrent", self.engine.ctx)

    def submit(self, mlen):
        """Run the message in msg[:mlen]; its answer, as read_copy_reply gives it, or None without COPY_SYNC."""
        n = self.engine.run(self.msg, self.msg_addr, self.reply)
        return read_copy_reply(self.reply, n) if n else None

    def close(self):
        if self._host:
            self.cuda.cuCtxSetCurrent(self.engine.ctx)
            self.cuda.cuMemFreeHost(self._host)
            self._host = None
        if getattr(self, "engine", None) is not None:
            self.engine.close()


# Polling for a copy's answer (a worker) or the next message (the copy thread) saves a wakeup per
# request, by burning a CPU while I/O flows; the threads are real-time, so only where CPUs are to
# spare: with fewer than SPIN_MIN_CPUS a spinning thread would take the CPU reclaim needs.
SPIN_MIN_CPUS = 4
_SPIN_OK = (os.cpu_count() or 1) >= SPIN_MIN_CPUS
REPLY_SPIN_S = float(os.environ.get("NBD_VRAM_REPLY_SPIN_US", "30" if _SPIN_OK else "0")) / 1e6


class RemoteIoContext(_Buffers):
    """A serving thread's buffers in a worker without CUDA: the GPU process (CopyServer) copies.

    The staging buffers are a memfd both processes map; the GPU process pins
    its mapping.  Made with a CopyClient, before the thread serves anything.
    """

    def __init__(self, client, rx_bytes, tx_bytes):
        size = rx_bytes + tx_bytes
        fd = os.memfd_create("nbd-vram-io", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            self.chan, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                base = client.register(fd, size, far)
            finally:
                far.close()
        finally:
            os.close(fd)
        self._views(mapping_address(self._map), rx_bytes, tx_bytes)
        self.rx_far, self.tx_far = base, base + rx_bytes

    def enter(self):
        pass

    def submit(self, mlen):
        flags = COPY_HEADER.unpack_from(self.msg, 0)[1]
        try:
            self.chan.send(self.msg[:mlen])
            if not flags & COPY_SYNC:
                return None
            n = -1
            if REPLY_SPIN_S:
                # The answer usually comes within microseconds: poll for it before sleeping on it.
                until = time.monotonic() + REPLY_SPIN_S
                while n < 0 and time.monotonic() < until:
                    try:
                        n = self.chan.recv_into(self.reply, 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        pass
            if n < 0:
                n = self.chan.recv_into(self.reply)
        except OSError as e:
            raise CopyLost(f"the GPU process's copy channel failed: {e.strerror or e}") from None
        if not n:
            raise CopyLost("the GPU process is gone")
        return read_copy_reply(self.reply, n)

    def close(self):
        self.chan.close()       # the GPU process unpins and unmaps its side when it sees the end
        self.rx = self.tx = None
        self._map.close()


class CopyClient:
    """A worker's end of its registration socket to the GPU process (see CopyServer)."""

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()

    def register(self, fd, size, chan):
        """Have the GPU process pin the buffers in fd and serve chan; their address there."""
        with self.lock:
            try:
                self.sock.sendmsg([b"A" + _U64.pack(size)],
                                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", fd, chan.fileno()))])
                answer = self.sock.recv(4096)
            except OSError as e:
                raise CopyLost(f"the GPU process's registration socket failed: {e.strerror or e}") from None
        if answer[:1] == b"k" and len(answer) == 1 + _U64.size:
            return _U64.unpack_from(answer, 1)[0]
        raise CopyLost("the GPU process refused a buffer set: " + (answer[1:].decode(errors="replace") or "it exited"))


COPY_SPIN_S = float(os.environ.get("NBD_VRAM_COPY_SPIN_US", "50" if _SPIN_OK else "0")) / 1e6
COPY_STREAMS = int(os.environ.get("NBD_VRAM_COPY_STREAMS", "4"))


class CopyServer:
    """The GPU side of CUDA-free workers, in the one process that holds the GPU's context.

    Each worker has a registration socket (add_client); for each buffer set it
    registers, the buffers are pinned here and its channel joins the copy
    loop.  One thread runs every copy: it takes the messages waiting on every
    channel, issues all their copies on one stream, waits once, and answers
    each.  Under load the batches of several connections thus share one
    synchronization, and one thread never contends for the interpreter lock
    with others.  After a round it polls again for up to COPY_SPIN_S (where CPUs
    are to spare) before sleeping: a request that follows within that time (the
    next one of a busy connection) is taken without a wakeup.  thread_setup runs first in
    the copy thread (it is on the swap I/O path).
    """

    def __init__(self, cuda, ctx, label, thread_setup=None):
        self.cuda, self.ctx, self.label, self.thread_setup = cuda, ctx, label, thread_setup
        self.lock = threading.Lock()
        self.live = 0               # channels in the loop now
        self.attached = 0           # channels so far (they take the streams in turn)
        self.clients = 0            # registration sockets open now
        self.poll = select.epoll()
        self.chans = {}             # fd -> [socket, mapping, address, late error]
        self.engine = None
        self.thread = None

    def busy(self):
        """True while a worker is registered (it may still send copies)."""
        with self.lock:
            return self.clients > 0 or self.live > 0

    def add_client(self, sock, name):
        with self.lock:
            self.clients += 1
            if self.thread is None:
                self.engine = CopyEngine(self.cuda, self.ctx, COPY_STREAMS)
                self.thread = threading.Thread(target=self._loop, name=f"{self.label} copies", daemon=True)
                self.thread.start()
        t = threading.Thread(target=self._client, args=(sock, name), name=f"{self.label} {name} registration",
                             daemon=True)
        t.start()

    def _client(self, sock, name):
        try:
            self._registrations(sock, name)
        finally:
            sock.close()
            with self.lock:
                self.clients -= 1

    def _registrations(self, sock, name):
        while True:
            try:
                msg, anc, _flags, _addr = sock.recvmsg(64, socket.CMSG_SPACE(2 * 4))
            except OSError:
                return
            fds = _received_fds(anc)
            if not msg:
                for fd in fds:
                    os.close(fd)
                return
            try:
                if msg[:1] != b"A" or len(msg) != 1 + _U64.size or len(fds) != 2:
                    raise Fatal(f"bad registration message {msg[:16]!r} with {len(fds)} fds")
                chan_fd = fds.pop()         # _attach owns it from here on
                base = self._attach(fds[0], _U64.unpack_from(msg, 1)[0], chan_fd)
                answer = b"k" + _U64.pack(base)
            except (Fatal, CudaError, OSError, ValueError) as e:
                log.error("%s: %s: %s", self.label, name, e)
                answer = b"e" + str(e).encode()[:4000]
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                sock.send(answer)
            except OSError:
                return

    def _attach(self, fd, size, chan_fd):
        chan = socket.socket(fileno=chan_fd)
        try:
            mapping = mmap.mmap(fd, size)
        except BaseException:
            chan.close()
            raise
        base = mapping_address(mapping)
        try:
            self.cuda.call("cuCtxSetCurrent", self.ctx)
            self.cuda.call("cuMemHostRegister_v2", base, size, 0)
        except BaseException:
            mapping.close()
            chan.close()
            raise
        with self.lock:
            self.attached += 1
            stream = self.engine.streams[self.attached % len(self.engine.streams)]
            self.chans[chan.fileno()] = [chan, mapping, base, None, stream]
            self.poll.register(chan.fileno(), select.EPOLLIN)
            self.live += 1
        return base

    def _detach(self, fd):
        # Out of the table and the poll set before the fd is closed: a channel registered meanwhile
        # may get the same number only after that.
        with self.lock:
            chan, mapping, base, _, _ = self.chans.pop(fd)
            self.poll.unregister(fd)
            self.live -= 1
        self.cuda.cuMemHostUnregister(base)
        mapping.close()
        chan.close()

    def _loop(self):
        if self.thread_setup is not None:
            self.thread_setup()
        cuda, engine, chans, poll = self.cuda, self.engine, self.chans, self.poll.poll
        cuda.cuCtxSetCurrent(self.ctx)
        msg_buf = ctypes.create_string_buffer(COPY_MSG_BYTES)
        msg, addr = memoryview(msg_buf).cast("B"), ctypes.addressof(msg_buf)
        reply = bytearray(COPY_REPLY_BYTES)
        answers = []                # (fd, failed segments, first error) of each message waiting for the sync
        used = []                   # the streams those messages' copies went on
        timeout = -1
        quiet_since = 0.0
        while True:
            events = poll(timeout)
            if not events:
                if time.monotonic() - quiet_since > COPY_SPIN_S:
                    timeout = -1    # nothing came while spinning: sleep until something does
                continue
            for fd, _ in events:
                c = chans.get(fd)
                if c is None:
                    continue
                while True:         # every message waiting on this channel, up to one that wants an answer
                    try:
                        n = c[0].recv_into(msg, 0, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        n = 0
                    if n < COPY_HEADER.size:
                        self._detach(fd)
                        break
                    failed = []
                    try:
                        flags, error = engine.issue(msg, addr, failed, c[4])
                    except (struct.error, KeyError):
                        log.error("%s: a malformed copy message; closing that channel", self.label)
                        self._detach(fd)
                        break
                    if flags & COPY_SYNC:
                        answers.append((fd, failed, error))
                        if c[4] not in used:
                            used.append(c[4])
                        break
                    if error is not None and c[3] is None:
                        c[3] = error        # reported with this channel's next answer
            if answers:
                rc = 0
                for stream in used:
                    rc = engine.sync(stream) or rc
                used.clear()
                sync_error = cuda.error("cuStreamSynchronize", rc) if rc else None
                for fd, failed, error in answers:
                    c = chans.get(fd)
                    if c is None:
                        continue
                    late, c[3] = c[3], None
                    k = pack_copy_reply(reply, rc or late is not None, failed, sync_error or late or error)
                    try:
                        c[0].send(memoryview(reply)[:k])
                    except OSError:
                        self._detach(fd)
                answers.clear()
            timeout = 0
            quiet_since = time.monotonic()


############################################################################
# NBD server: handshake + transmission #####################################
############################################################################

class Stats:
    """I/O counters of one connection (plain ints: updated under the GIL)."""
    FIELDS = ("reads", "writes", "bytes_read", "bytes_written", "trims", "zeroes", "flushes",
              "invalid", "io_errors")
    __slots__ = FIELDS

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)

    def add(self, other):
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def as_dict(self):
        return {f: getattr(self, f) for f in self.FIELDS}


class Export:
    """The one export: a VRAM store, its size and flags, and the I/O counters of every connection."""

    def __init__(self, store, name="", description=None):
        self.store, self.size = store, store.size_bytes
        self.flags = EXPORT_FLAGS
        self.name = name
        self.description = description or f"nbd-vram {format_size(self.size)} of VRAM"
        self._lock = threading.Lock()
        self._closed = Stats()
        self._live = set()
        self.last_error = None

    def open_stats(self):
        st = Stats()
        with self._lock:
            self._live.add(st)
        return st

    def close_stats(self, st):
        with self._lock:
            self._live.discard(st)
            self._closed.add(st)

    def totals(self):
        total = Stats()
        with self._lock:
            total.add(self._closed)
            for st in self._live:
                total.add(st)
        return total

    @property
    def connections(self):
        return len(self._live)


def _option_reply(sock, opt, rep, data=b""):
    sock.sendall(OPTION_REPLY.pack(NBD_REP_MAGIC, opt, rep, len(data)) + data)


class _Deadline:
    """A socket whose every receive and send must end by one deadline: its timeout is set to the time left."""

    def __init__(self, sock, timeout_s):
        self.sock, self.timeout_s = sock, timeout_s
        self.end = time.monotonic() + timeout_s

    def _left(self):
        left = self.end - time.monotonic()
        if left <= 0:
            raise socket.timeout(f"the handshake took more than {self.timeout_s:g} s")
        self.sock.settimeout(left)

    def recv_into(self, view):
        self._left()
        return self.sock.recv_into(view)

    def sendall(self, data):
        self._left()
        return self.sock.sendall(data)


def negotiate(sock, export, timeout_s=None, max_options=None):
    """Fixed newstyle handshake.  True: go on to transmission; False: the client is done.

    All of it must end within timeout_s (HANDSHAKE_TIMEOUT_S), in at most max_options options
    (MAX_HANDSHAKE_OPTIONS): else socket.timeout or ProtocolError, and the caller closes."""
    timeout_s = HANDSHAKE_TIMEOUT_S if timeout_s is None else timeout_s
    max_options = MAX_HANDSHAKE_OPTIONS if max_options is None else max_options
    before = sock.gettimeout()
    try:
        return _negotiate(_Deadline(sock, timeout_s), export, max_options)
    finally:
        sock.settimeout(before)


def _negotiate(sock, export, max_options):
    sock.sendall(GREETING.pack(NBDMAGIC, IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
    (cflags,) = CLIENT_FLAGS.unpack(recv_exact(sock, CLIENT_FLAGS.size, "client flag"))
    if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
        raise ProtocolError(f"client sent unknown handshake flags {cflags:#x}")
    no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
    count = 0
    while True:
        count += 1
        magic, opt, length = OPTION.unpack(recv_exact(sock, OPTION.size, "option header"))
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if count > max_options:
            raise ProtocolError(f"more than {max_options} options in one handshake")
        if length > MAX_OPTION:
            raise ProtocolError(f"option {opt} has {length} bytes of data, more than the {MAX_OPTION} allowed")
        data = recv_exact(sock, length, "option data")
        if opt == Opt.EXPORT_NAME:
            # No error reply exists for this option; any name selects the one export.
            sock.sendall(EXPORT_NAME_REPLY.pack(export.size, export.flags) + (b"" if no_zeroes else bytes(124)))
            return True
        if opt == Opt.ABORT:
            _option_reply(sock, opt, Rep.ACK)
            return False
        if opt == Opt.LIST:
            if length:
                _option_reply(sock, opt, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                continue
            name = export.name.encode()
            _option_reply(sock, opt, Rep.SERVER, struct.pack("!I", len(name)) + name)
            _option_reply(sock, opt, Rep.ACK)
            continue
        if opt in (Opt.INFO, Opt.GO):
            requests = _parse_info_request(data)
            if requests is None:
                _option_reply(sock, opt, Rep.ERR_INVALID, b"malformed NBD_OPT_INFO/GO request")
                continue
            name, wanted = requests
            _option_reply(sock, opt, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags))
            _option_reply(sock, opt, Rep.INFO, INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_REQUEST))
            if Info.NAME in wanted:
                _option_reply(sock, opt, Rep.INFO, struct.pack("!H", Info.NAME) + name)
            if Info.DESCRIPTION in wanted:
                _option_reply(sock, opt, Rep.INFO, struct.pack("!H", Info.DESCRIPTION) + export.description.encode())
            _option_reply(sock, opt, Rep.ACK)
            if opt == Opt.GO:
                return True
            continue
        _option_reply(sock, opt, Rep.ERR_UNSUP, f"option {opt} is not supported".encode())


def _parse_info_request(data):
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, u16 info types. None if malformed."""
    if len(data) < 6:
        return None
    (nlen,) = struct.unpack_from("!I", data, 0)
    if nlen > 4096 or len(data) < 4 + nlen + 2:
        return None
    name = data[4:4 + nlen]
    (count,) = struct.unpack_from("!H", data, 4 + nlen)
    if len(data) != 4 + nlen + 2 + 2 * count:
        return None
    return name, set(struct.unpack_from(f"!{count}H", data, 6 + nlen))


class CopyGroup:
    """Small copies of one kind waiting to become one segment: the segment's three arrays, the
    batch index of the first request in it, and the pages (4 KiB) its requests touch."""
    __slots__ = ("kind", "n", "first", "dst", "src", "size", "views", "pages")

    def __init__(self, kind):
        self.kind, self.n, self.first = kind, 0, 0
        self.dst, self.src, self.size = (array.array("Q", bytes(8 * MAX_BATCH)) for _ in range(3))
        self.views = [memoryview(a).cast("B") for a in (self.dst, self.src, self.size)]
        self.pages = set()


def _touches(pages, first, last):
    """Does the page range first..last meet the set?"""
    return first in pages or last in pages or (last - first > 1 and not pages.isdisjoint(range(first + 1, last)))


class Transmission:
    """The transmission phase on one socket: the I/O path.

    Callable with no handshake: the kernel speaks only this on the sockets it
    is given.  Requests are taken in batches: everything already waiting on
    the socket is parsed in place in the rx staging buffer, and the copies the
    batch needs (write payloads from rx to VRAM, reads from VRAM into tx) are
    described in one copy message; the process with the GPU's context runs
    them and answers once, then one sendmsg answers the whole batch, in order.
    Every list used here is allocated once, in __init__.
    """

    MAX_LOGGED = 10    # invalid requests logged per connection; the rest are only counted

    def __init__(self, sock, export, io, stats, label="client"):
        self.sock, self.export, self.io, self.stats, self.label = sock, export, io, stats, label
        self.cookies = [0] * MAX_BATCH
        self.errors = [0] * MAX_BATCH
        self.data_off = [0] * MAX_BATCH       # offset in tx of a read's data
        self.data_len = [0] * MAX_BATCH       # 0: no data follows the reply header
        self.uses_gpu = [False] * MAX_BATCH
        self.hdr = bytearray(REPLY_SIZE * MAX_BATCH)
        self.hdr_view = memoryview(self.hdr)
        self.iov = []
        self.logged = 0
        self.start = self.end = 0             # rx[start:end] holds received, unparsed bytes
        # The copy message being built (io.msg): its length, its segments, and the requests
        # each segment serves (seg_first[s] up to seg_end[s]), to charge a failed copy to them.
        self.mlen, self.nseg = COPY_HEADER.size, 0
        self.seg_first = [0] * MAX_BATCH
        self.seg_end = [0] * MAX_BATCH
        # Small reads and small writes waiting to become one segment each, whose copies may run in
        # any order: a request that touches a page of a waiting write, or a write that touches a
        # page of a waiting read, first sends both groups on (as does a memset or a large copy).
        self.reads, self.writes = CopyGroup(COPY_DTOH), CopyGroup(COPY_HTOD)
        self.group_writes = os.environ.get("NBD_VRAM_GROUP_WRITES", "1") != "0"
        # Is more already waiting?  poll(0) answers without raising, unlike a MSG_DONTWAIT recv.
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        # Everything _batch needs, looked up once per connection rather than once per batch.
        self.hot = (stats, io.msg, COPY_ONE.pack_into, io.rx, len(io.rx), io.rx_far, io.tx_far, len(io.tx),
                    export.store.dptr, export.size, self.cookies, self.errors, self.data_off, self.data_len,
                    self.uses_gpu, self.seg_first, self.seg_end, REQUEST.unpack_from, poller.poll,
                    self.reads, self.writes)

    # -- helpers used outside the fast path ------------------------------------------

    def _invalid(self, typ, offset, length, why):
        self.stats.invalid += 1
        if self.logged < self.MAX_LOGGED:
            self.logged += 1
            name = Cmd(typ).name if typ in Cmd._value2member_map_ else f"command {typ}"
            log.warning("%s: invalid request: %s offset=%d length=%d: %s%s", self.label, name, offset, length, why,
                        "; further invalid requests on this connection are only counted" if self.logged == self.MAX_LOGGED else "")

    def _gpu_error(self, text, what):
        self.stats.io_errors += 1
        self.export.last_error = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}"
        log.error("%s: GPU I/O error, replying EIO: %s (%s)", self.label, text, what)

    def _compact(self):
        """Move the unparsed bytes to the front of rx.  Only between batches: no copy reads rx then."""
        n = self.end - self.start
        if self.start and n:
            ctypes.memmove(self.io.rx_addr, self.io.rx_addr + self.start, n)
        self.start, self.end = 0, n

    def _fill(self, want):
        """Block until rx holds at least `want` unparsed bytes.  False at a clean end of stream."""
        rx = self.io.rx
        while self.end - self.start < want:
            if len(rx) - self.start < want:
                self._compact()
            k = self.sock.recv_into(rx[self.end:])
            if not k:
                if self.end == self.start:
                    return False
                raise ProtocolError(f"client closed the connection: read {self.end - self.start} of {want} bytes "
                                    "of a request")
            self.end += k
        return True

    # -- the loop ---------------------------------------------------------------------

    def run(self):
        """Serve until the client disconnects.  Raises ProtocolError on a framing error."""
        while True:
            if not self._fill(REQ_SIZE):
                return "client closed the connection"
            verdict = self._batch()
            if verdict:
                return verdict

    def _batch(self):
        (stats, msg, one, rx, rx_cap, rx_far, tx_far, tx_cap, base, size, cookies, errors, data_off, data_len,
         uses_gpu, seg_first, seg_end, unpack, poll, rg, wg) = self.hot
        n = tx_used = 0
        gpu_work = False
        then = None             # once this batch is answered: a step of _end_batch, or the ProtocolError to raise
        while n < MAX_BATCH:
            avail = self.end - self.start
            if avail < REQ_SIZE:
                # Take whatever else is already waiting, without blocking.
                if rx_cap - self.end < REQ_SIZE or not poll(0):
                    break
                try:
                    k = self.sock.recv_into(rx[self.end:], 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                if not k:
                    then = "eof"
                    break
                self.end += k
                continue
            magic, flags, typ, cookie, offset, length = unpack(rx, self.start)
            if magic != NBD_REQUEST_MAGIC:
                then = ProtocolError(f"bad request magic {magic:#x}")
                break
            if typ == _CMD_WRITE:
                need = REQ_SIZE + length
                done = 0                # bytes of the payload already on their way to VRAM
                if avail < need:
                    if self.start + need > rx_cap:
                        if n == 0:
                            then = "large-write" if need > rx_cap else "compact"
                        break
                    try:
                        if (length >= STREAM_WRITE_MIN and not flags & ~NBD_CMD_FLAG_FUA and length <= MAX_REQUEST
                                and offset <= size - length):
                            gpu_work = True     # pieces are in flight from here on, even if the client hangs up
                            done = self._recv_streaming(n, need, base + offset)
                        else:
                            recv_into_exact(self.sock, rx[self.end:self.start + need], "write payload")
                    except ProtocolError as e:
                        then = e            # the client hung up mid-payload: answer what came before, then close
                        break
                    self.end = self.start + need
                if flags & ~NBD_CMD_FLAG_FUA or not 0 < length <= MAX_REQUEST or offset > size - length:
                    err, why = check_request(typ, flags, offset, length, size)
                else:
                    err = 0         # the common case, checked inline: check_request agrees
                payload = rx_far + self.start + REQ_SIZE
                self.start += need
                cookies[n], data_len[n], uses_gpu[n], errors[n] = cookie, 0, False, err
                if err:
                    self._invalid(typ, offset, length, why)
                elif length <= GROUP_COPY_MAX and not done and self.group_writes:
                    first, last = offset >> 12, (offset + length - 1) >> 12
                    if ((wg.n and _touches(wg.pages, first, last)) or (rg.n and _touches(rg.pages, first, last))):
                        self._close_groups(n)
                    k = wg.n
                    if not k:
                        wg.first = n
                    wg.dst[k], wg.src[k], wg.size[k] = base + offset, payload, length
                    wg.n = k + 1
                    wg.pages.update(range(first, last + 1))
                    uses_gpu[n] = gpu_work = True
                    stats.writes += 1
                    stats.bytes_written += length
                else:
                    if rg.n or wg.n:
                        self._close_groups(n)
                    s = self.nseg
                    one(msg, self.mlen, COPY_HTOD, 1, 0, base + offset + done, payload + done, length - done)
                    self.mlen += 32
                    seg_first[s], seg_end[s] = n, n + 1
                    self.nseg = s + 1
                    uses_gpu[n] = gpu_work = True
                    stats.writes += 1
                    stats.bytes_written += length
                n += 1
                continue
            if typ == _CMD_READ:
                if flags & ~NBD_CMD_FLAG_FUA or not 0 < length <= MAX_REQUEST or offset > size - length:
                    err, why = check_request(typ, flags, offset, length, size)
                else:
                    err = 0
                if not err and length > tx_cap - tx_used:
                    if n == 0:
                        then = "large-read"
                    break
                self.start += REQ_SIZE
                cookies[n], data_len[n], uses_gpu[n], errors[n] = cookie, 0, False, err
                if err:
                    self._invalid(typ, offset, length, why)
                else:
                    if length <= GROUP_COPY_MAX:
                        first, last = offset >> 12, (offset + length - 1) >> 12
                        if wg.n and _touches(wg.pages, first, last):
                            self._close_groups(n)
                        k = rg.n
                        if not k:
                            rg.first = n
                        rg.dst[k], rg.src[k], rg.size[k] = tx_far + tx_used, base + offset, length
                        rg.n = k + 1
                        rg.pages.update(range(first, last + 1))
                    else:
                        if rg.n or wg.n:
                            self._close_groups(n)
                        s = self.nseg
                        one(msg, self.mlen, COPY_DTOH, 1, 0, tx_far + tx_used, base + offset, length)
                        self.mlen += 32
                        seg_first[s], seg_end[s] = n, n + 1
                        self.nseg = s + 1
                    uses_gpu[n] = gpu_work = True
                    data_off[n], data_len[n] = tx_used, length
                    tx_used += length
                    stats.reads += 1
                    stats.bytes_read += length
                n += 1
                continue
            self.start += REQ_SIZE
            if typ == _CMD_DISC:
                then = "disc"
                break
            cookies[n], data_len[n], uses_gpu[n] = cookie, 0, False
            err, why = check_request(typ, flags, offset, length, size)
            if err:
                self._invalid(typ, offset, length, why)
            elif typ == Cmd.TRIM or typ == Cmd.WRITE_ZEROES:
                if rg.n or wg.n:
                    self._close_groups(n)
                s = self.nseg
                one(msg, self.mlen, COPY_MEMSET, 1, 0, base + offset, 0, length)
                self.mlen += 32
                seg_first[s], seg_end[s] = n, n + 1
                self.nseg = s + 1
                uses_gpu[n] = gpu_work = True
                if typ == Cmd.TRIM:
                    stats.trims += 1
                else:
                    stats.zeroes += 1
            else:
                stats.flushes += 1      # FLUSH: answered after this batch's sync, like every write before it
            errors[n] = err
            n += 1

        if rg.n or wg.n:
            self._close_groups(n)
        if gpu_work:
            self._submit(n)
        if n:
            self._reply(n)
        if then is None:
            return None
        return self._end_batch(then)

    def _end_batch(self, then):
        """What a batch ended with, once it is answered: a close, a request too large for the buffers,
        or a protocol error."""
        if then == "compact":
            self._compact()
            return None
        if then == "large-write":
            self._large_write()
            return None
        if then == "large-read":
            return self._large_read()
        if then == "disc":
            return "client sent NBD_CMD_DISC"
        if then == "eof":
            if self.end > self.start:
                raise ProtocolError(f"client closed the connection: read {self.end - self.start} of {REQ_SIZE} "
                                    "header bytes")
            return "client closed the connection"
        raise then

    def _close_groups(self, n):
        """The waiting groups (their requests up to n) become one segment each of the message."""
        msg = self.io.msg
        for g in (self.reads, self.writes):
            k = g.n
            if not k:
                continue
            s, at = self.nseg, self.mlen
            if k == 1:
                COPY_ONE.pack_into(msg, at, g.kind, 1, 0, g.dst[0], g.src[0], g.size[0])
                self.mlen = at + COPY_ONE.size
            else:
                COPY_SEGMENT.pack_into(msg, at, g.kind, k, 0)
                at += COPY_SEGMENT.size
                for b in g.views:
                    msg[at:at + 8 * k] = b[:8 * k]
                    at += 8 * k
                self.mlen = at
            # A failed copy fails every request since the group began that used the GPU.
            self.seg_first[s], self.seg_end[s] = g.first, n
            self.nseg = s + 1
            g.n = 0
            g.pages.clear()

    def _submit(self, n):
        """Run the batch's copies and wait for them; a failed copy makes its requests EIO."""
        COPY_HEADER.pack_into(self.io.msg, 0, self.nseg, COPY_SYNC)
        sync_failed, failed, text = self.io.submit(self.mlen)
        self.mlen, self.nseg = COPY_HEADER.size, 0
        if not sync_failed and not failed:
            return
        uses_gpu, errors, data_len = self.uses_gpu, self.errors, self.data_len
        self._gpu_error(text, f"batch of {n} requests")
        if sync_failed:
            spans = [(0, n)]
        else:
            spans = [(self.seg_first[s], self.seg_end[s]) for s in failed]
        for first, end in spans:
            for i in range(first, end):
                if uses_gpu[i]:
                    errors[i], data_len[i] = NBD_EIO, 0

    def _push(self, n):
        """Send the copies described so far without waiting (their errors come with the batch's answer)."""
        if self.reads.n or self.writes.n:
            self._close_groups(n)
        if self.nseg:
            COPY_HEADER.pack_into(self.io.msg, 0, self.nseg, 0)
            self.io.submit(self.mlen)
            self.mlen, self.nseg = COPY_HEADER.size, 0

    def _copy_now(self, kind, dst, src, size, what):
        """One copy, waited for, outside a batch.  True if it failed (logged and counted)."""
        msg = self.io.msg
        COPY_HEADER.pack_into(msg, 0, 1, COPY_SYNC)
        COPY_ONE.pack_into(msg, COPY_HEADER.size, kind, 1, 0, dst, src, size)
        sync_failed, failed, text = self.io.submit(COPY_HEADER.size + COPY_ONE.size)
        if sync_failed or failed:
            self._gpu_error(text, what)
            return True
        return False

    def _recv_streaming(self, n, need, dst):
        """Receive the rest of a large write's payload, sending each STREAM_PIECE that has arrived on to VRAM
        while the next one comes in.  Returns the bytes already on their way."""
        self._push(n)
        io, sock = self.io, self.sock
        rx, msg = io.rx, io.msg
        first, last = self.start + REQ_SIZE, self.start + need
        src = io.rx_far + first
        done = 0
        while self.end < last:
            k = sock.recv_into(rx[self.end:last])
            if not k:
                raise ProtocolError(f"client closed the connection: read {self.end - first} of {need - REQ_SIZE} "
                                    "write payload bytes")
            self.end += k
            ready = self.end - first - done
            if ready >= STREAM_PIECE and self.end < last:
                COPY_HEADER.pack_into(msg, 0, 1, 0)
                COPY_ONE.pack_into(msg, COPY_HEADER.size, COPY_HTOD, 1, 0, dst + done, src + done, ready)
                io.submit(COPY_HEADER.size + COPY_ONE.size)
                done += ready
        return done

    def _reply(self, n):
        hdr, hv, tx = self.hdr, self.hdr_view, self.io.tx
        iov = self.iov
        pack = SIMPLE_REPLY.pack_into
        errors, cookies, data_off, data_len = self.errors, self.cookies, self.data_off, self.data_len
        for i in range(n):
            at = i * REPLY_SIZE
            pack(hdr, at, NBD_SIMPLE_REPLY_MAGIC, errors[i], cookies[i])
            iov.append(hv[at:at + REPLY_SIZE])
            if data_len[i]:
                iov.append(tx[data_off[i]:data_off[i] + data_len[i]])
        try:
            send_all(self.sock, iov)
        finally:
            iov.clear()

    # -- requests larger than a staging buffer (never from the kernel's swap path) -------

    def _large_write(self):
        """A write whose payload does not fit in rx: copy it through in rx-sized pieces."""
        io = self.io
        magic, flags, typ, cookie, offset, length = REQUEST.unpack_from(io.rx, self.start)
        err, why = check_request(typ, flags, offset, length, self.export.size)
        if err:
            self._invalid(typ, offset, length, why)
        buffered = self.end - self.start - REQ_SIZE
        self.start += REQ_SIZE
        self._compact()
        done, rx_cap = 0, len(io.rx)
        while done < length:
            piece = min(rx_cap, length - done)
            if buffered < piece:
                recv_into_exact(self.sock, io.rx[buffered:piece], "write payload")
            buffered = 0
            if not err and self._copy_now(COPY_HTOD, self.export.store.dptr + offset + done, io.rx_far, piece,
                                          f"write offset={offset} length={length}"):
                err = NBD_EIO
            done += piece
        self.start = self.end = 0
        if not err:
            self.stats.writes += 1
            self.stats.bytes_written += length
        send_all(self.sock, [SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, err, cookie)])

    def _large_read(self):
        """A read larger than tx: sent in tx-sized pieces.  A GPU error after the
        first piece cannot be reported any more, so it closes the connection
        (never zeroes in place of data)."""
        io = self.io
        magic, flags, typ, cookie, offset, length = REQUEST.unpack_from(io.rx, self.start)
        self.start += REQ_SIZE
        done, tx_cap = 0, len(io.tx)
        while done < length:
            piece = min(tx_cap, length - done)
            if self._copy_now(COPY_DTOH, io.tx_far, self.export.store.dptr + offset + done, piece,
                              f"read offset={offset} length={length}"):
                if done == 0:
                    send_all(self.sock, [SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, NBD_EIO, cookie)])
                    return None
                raise ProtocolError("GPU error in the middle of a large read; closing the connection")
            bufs = [io.tx[:piece]]
            if done == 0:
                bufs.insert(0, SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
            send_all(self.sock, bufs)
            done += piece
        self.stats.reads += 1
        self.stats.bytes_read += length
        return None


def serve_connection(sock, export, label, io=None, make_io=None, handshake=True):
    """One connection from start to end: the per-connection error policy lives here.

    A framing error or a vanished client closes this connection only; every
    other connection keeps working.  The connection's buffers are io, made
    before swapon by a process that serves the kernel, or made here by
    make_io() once the handshake is done (serve), and closed at the end.
    """
    stats = export.open_stats()
    own_io = io is None
    try:
        if handshake:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            if not negotiate(sock, export):
                log.debug("%s: client ended the negotiation", label)
                return
            sock.settimeout(None)
        if own_io:
            io = make_io()
        io.enter()
        tx = Transmission(sock, export, io, stats, label)
        if os.environ.get("NBD_VRAM_PROFILE"):
            # Development aid (bench/profile-worker.sh): one cProfile file per connection.
            import cProfile
            prof = cProfile.Profile()
            try:
                why = prof.runcall(tx.run)
            finally:
                prof.dump_stats(os.path.join(os.environ["NBD_VRAM_PROFILE"], f"{os.getpid()}-{time.monotonic_ns()}.prof"))
        else:
            why = tx.run()
        log.debug("%s: %s", label, why)
    except ProtocolError as e:
        log.warning("%s: %s; closing this connection", label, e)
    except socket.timeout:
        log.warning("%s: the handshake did not end within %d s; closing this connection", label, HANDSHAKE_TIMEOUT_S)
    except CopyLost as e:
        log.error("%s: %s; closing this connection unanswered", label, e)
    except OSError as e:
        log.info("%s: connection lost: %s", label, e)
    except CudaError as e:
        log.error("%s: %s; closing this connection", label, e)
    except Exception:
        log.exception("%s: unexpected error; closing this connection", label)
    finally:
        if own_io and io is not None:
            io.close()
        export.close_stats(stats)
        sock.close()


def check_socket_path(path):
    """Refuse a socket path that cannot be bound, or that others could swap out from under us."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(f"socket {path!r}: {len(os.fsencode(path))} bytes long; a Unix socket path has at most "
                         f"{MAX_SOCKET_PATH}: choose a shorter --socket")
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        raise Fatal(f"socket {path!r}: directory {parent!r} does not exist (create it, mode 0700)") from None
    # Another user who can write the directory could put a link or a socket of theirs at the path.
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        who = "world-writable" if st.st_mode & stat.S_IWOTH else "group-writable"
        raise Fatal(f"socket {path!r}: directory {parent!r} is {who} without the sticky bit; "
                    "others could replace the socket (use a directory only you can write, e.g. /run/nbd-vram)")
    if st.st_uid not in (0, os.geteuid()):
        raise Fatal(f"socket {path!r}: directory {parent!r} belongs to another user (uid {st.st_uid}), who could "
                    "replace the socket (use a directory of your own or root's, e.g. /run/nbd-vram)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Fatal(f"socket {path!r}: the path exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s (nothing listens on it)", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise Fatal(f"socket {path!r} is in use by another server; stop it first or choose another --socket")


def unix_connections(path):
    """Connected sockets bound to PATH, in any process: the accepted ends of a listener's clients
    (/proc/net/unix: state 03, SS_CONNECTED; the listener itself is 01)."""
    n = 0
    with open("/proc/net/unix", errors="surrogateescape") as f:
        next(f)
        for line in f:
            fields = line.rstrip("\n").split(None, 7)
            if len(fields) == 8 and fields[5] == "03" and fields[7] == path:
                n += 1
    return n


class UnixServer:
    """`serve`: the export on a Unix socket (mode 0600); each accepted client
    is passed to handoff (serve hands clients to worker processes)."""

    def __init__(self, path, handoff, idle=None, buffer_bytes=0, max_pinned_bytes=None):
        self.path, self.handoff, self.idle = path, handoff, idle
        self.buffer_bytes = buffer_bytes
        self.max_pinned_bytes = max_pinned_bytes    # each connection pins 2 x buffer_bytes (rx and tx)
        self.stopping = False
        self.listener = None

    def open(self):
        check_socket_path(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)        # the socket is made 0600; no chmod after bind: that follows a symlink
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        s.listen(128)
        self.listener = s

    def serve(self):
        """Accept until SIGTERM or SIGINT."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        sel.register(rfd, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in sel.select(1.0):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        try:
                            os.read(rfd, 512)
                        except BlockingIOError:
                            pass
                if self.idle is not None and not self.stopping:
                    self.idle()
        finally:
            sel.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, h in handlers.items():
                signal.signal(sig, h)
            os.close(rfd)
            os.close(wfd)

    def _on_signal(self, signum, frame):
        if not self.stopping:
            log.info("%s received: stopping", signal.Signals(signum).name)
        self.stopping = True

    def _accept(self):
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if self._over_budget():
            conn.close()
            return
        try:
            self.handoff(conn)
        finally:
            conn.close()

    def _over_budget(self):
        """True (and a log line) if one more connection's buffers would pass max_pinned_bytes."""
        if self.max_pinned_bytes is None:
            return False
        live = unix_connections(self.path) - 1      # served by the workers; less the one just accepted
        per = 2 * self.buffer_bytes
        if (live + 1) * per <= self.max_pinned_bytes:
            return False
        log.warning("refusing a connection: %d clients pin %s of buffers, and one more would pass the pinned-memory "
                    "budget of %s (--max-pinned)", live, format_size(live * per), format_size(self.max_pinned_bytes))
        return True

    def close(self):
        """Stop listening (the workers end their own connections)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


############################################################################
# Memory safety for a process that serves swap #############################
############################################################################

PR_SET_IO_FLUSHER = 57          # linux/prctl.h, Linux 5.6+
MCL_CURRENT, MCL_FUTURE = 1, 2
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8   # malloc.h
# Free heap kept ready (touched, so locked) before serving: every Python object made while serving
# comes from it.  A worker only relays: measured, its heap in use grows by under 64 KiB from idle to
# 4K and 1M loads at full speed (8.6 MiB in use after start); 4 MiB is 60 times that.  The daemon
# (respawns, status, swapon/swapoff, JSON) and the GPU process keep 16.
HEAP_RESERVE = 16 * MiB
RELAY_HEAP_RESERVE = 4 * MiB
THREAD_STACK = 512 * 1024       # mlockall locks whole stacks: keep them small (the serving code does not recurse)


class mallinfo2(ctypes.Structure):        # malloc.h, glibc 2.33+
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    libc.mlockall.argtypes, libc.mlockall.restype = [ctypes.c_int], ctypes.c_int
    try:
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], mallinfo2
    except AttributeError:          # glibc before 2.33
        pass
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    return libc


def heap_free_bytes(libc):
    """Bytes free in the C heap (mallinfo2's fordblks), or None where glibc has no mallinfo2."""
    if not hasattr(libc, "mallinfo2") or libc.mallinfo2.restype is not mallinfo2:
        return None
    return libc.mallinfo2().fordblks


def prepare_memory(libc, heap_bytes=HEAP_RESERVE):
    """Make the C heap one arena that never shrinks, and grow it until HEAP_BYTES of it are free.

    With PYTHONMALLOC=malloc (run re-executes itself with it) every Python
    object comes from glibc malloc; these settings keep glibc from mapping
    new memory or giving free memory back, so that a request served under
    memory pressure reuses heap pages that are already present and locked.
    What is free already counts (the GPU process has ~14 MiB free after the
    driver's start-up): only the rest is grown.
    """
    for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, MiB)):
        if libc.mallopt(param, value) != 1:
            log.warning("mallopt(%d, %d) failed; the heap may shrink and grow while serving", param, value)
    free = heap_free_bytes(libc)
    grow = heap_bytes - (free or 0)
    if grow <= 0:
        return
    p = libc.malloc(grow)
    if p:
        ctypes.memset(p, 1, grow)
        libc.free(p)


def lock_memory(libc):
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        e = ctypes.get_errno()
        log.warning("mlockall failed (%s): under heavy memory pressure the daemon could wait on its own swap; "
                    "run it as root with LimitMEMLOCK=infinity", os.strerror(e))
        return False
    return True


def set_io_flusher(libc):
    """PR_SET_IO_FLUSHER: this thread's allocations never wait on I/O (it is the I/O)."""
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        log.warning("PR_SET_IO_FLUSHER failed (%s; needs Linux 5.6 and CAP_SYS_RESOURCE)", os.strerror(e))
        return False
    return True


REALTIME_PRIORITY = 1          # SCHED_RR's lowest: above every normal task, below the kernel's own RT threads
_realtime_warned = False


def set_realtime():
    """SCHED_RR for this thread: the reply it sends must not wait on reclaim.

    Every reply is a sendmsg, and the kernel allocates the socket buffer for it.
    Under pressure free memory sits at the min watermark; this thread may not do
    I/O to reclaim (PR_SET_IO_FLUSHER), and the dirty pages waiting to go out are
    the swap writes only its reply completes: seen in the kernel tests as a thread
    spinning in direct reclaim inside unix_stream_sendmsg until the kernel's 30 s
    timeout.  The page allocator lets real-time tasks dip a quarter below the min
    watermark (ALLOC_HARDER, ALLOC_MIN_RESERVE since 6.3), a reserve the process
    filling memory cannot take.  The thread blocks in recv when idle, and the
    kernel's RT throttling leaves the rest of the system 5 % of the CPU even if not.
    """
    global _realtime_warned
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(REALTIME_PRIORITY))
        return True
    except OSError as e:
        if _realtime_warned:
            return False
        _realtime_warned = True
        log.warning("serving thread not real-time (%s): under heavy memory pressure a reply can wait on "
                    "reclaim; set realtime = no to silence this, or give the service CAP_SYS_NICE", e.strerror)
        return False


def prepare_serving_thread(libc, realtime):
    """Call first in every thread that answers the kernel's requests."""
    set_io_flusher(libc)
    if realtime:
        set_realtime()


def set_oom_score_adj(value=-1000):
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as e:
        log.warning("could not set oom_score_adj to %d: %s", value, e.strerror)


def locked_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    return 0


############################################################################
# Kernel attach: generic netlink (+ ioctl fallback) ########################
############################################################################
# Layouts from linux/netlink.h, linux/genetlink.h and linux/nbd-netlink.h.

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = ~((1 << 15) | (1 << 14))

# struct nlmsghdr: length, type, flags, sequence, port id
NLMSGHDR = struct.Struct("=IHHII")
# struct genlmsghdr: command, version, reserved
GENLMSGHDR = struct.Struct("=BBH")
# struct nlattr: length, type
NLATTR = struct.Struct("=HH")

NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1


class NbdCmd(enum.IntEnum):
    UNSPEC = 0
    CONNECT = 1
    DISCONNECT = 2
    RECONFIGURE = 3
    LINK_DEAD = 4
    STATUS = 5


class NbdAttr(enum.IntEnum):
    UNSPEC = 0
    INDEX = 1
    SIZE_BYTES = 2
    BLOCK_SIZE_BYTES = 3
    TIMEOUT = 4
    SERVER_FLAGS = 5
    CLIENT_FLAGS = 6
    SOCKETS = 7
    DEAD_CONN_TIMEOUT = 8
    DEVICE_LIST = 9
    BACKEND_IDENTIFIER = 10


NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1
NBD_MAJOR = 43                 # linux/major.h
BLOCK_SIZE = 4096              # the kernel's logical block size for the device: the page size, what swap uses

_IO = lambda t, nr: (t << 8) | nr    # noqa: E731 (linux/ioctl.h for _IO: no direction, no size)
NBD_SET_SOCK = _IO(0xAB, 0)
NBD_SET_BLKSIZE = _IO(0xAB, 1)
NBD_DO_IT = _IO(0xAB, 3)
NBD_CLEAR_SOCK = _IO(0xAB, 4)
NBD_SET_SIZE_BLOCKS = _IO(0xAB, 7)
NBD_DISCONNECT = _IO(0xAB, 8)
NBD_SET_FLAGS = _IO(0xAB, 10)


def _nla(atype, payload):
    """One netlink attribute, padded to 4 bytes."""
    data = NLATTR.pack(NLATTR.size + len(payload), atype) + payload
    return data + bytes(-len(data) % 4)


def _nla_u32(atype, v):
    return _nla(atype, struct.pack("=I", v))


def _nla_u64(atype, v):
    return _nla(atype, struct.pack("=Q", v))


def _nest(atype, *attrs):
    return _nla(atype | NLA_F_NESTED, b"".join(attrs))


def _parse_attrs(data):
    attrs, off = {}, 0
    while off + NLATTR.size <= len(data):
        alen, atype = NLATTR.unpack_from(data, off)
        if alen < NLATTR.size:
            break
        attrs[atype & NLA_TYPE_MASK] = data[off + NLATTR.size:off + alen]
        off += (alen + 3) & ~3
    return attrs


class GenericNetlink:
    """Just enough generic netlink to talk to one family (hostap's netlink.py shape)."""

    def __init__(self, family):
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        except OSError as e:
            raise NbdKernelError(f"cannot open a generic netlink socket: {e.strerror}") from None
        self.sock.bind((0, 0))
        self.seq = int(time.time())
        reply = self._transact(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1,
                               _nla(CTRL_ATTR_FAMILY_NAME, family.encode() + b"\0"), family=family)
        self.family_id = struct.unpack_from("=H", reply[CTRL_ATTR_FAMILY_ID])[0]

    def close(self):
        self.sock.close()

    def _transact(self, msg_type, cmd, version, payload, family=None):
        """Send one request with NLM_F_ACK; return the attributes of the reply (if any)."""
        self.seq += 1
        body = GENLMSGHDR.pack(cmd, version, 0) + payload
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK,
                                     self.seq, 0) + body)
        result = {}
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + NLMSGHDR.size <= len(data):
                mlen, mtype, _flags, seq, _pid = NLMSGHDR.unpack_from(data, off)
                if mlen < NLMSGHDR.size:
                    raise OSError(errno.EPROTO, "truncated netlink message")
                msg = data[off + NLMSGHDR.size:off + mlen]
                off += (mlen + 3) & ~3
                if seq != self.seq:
                    continue
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", msg)
                    if err == 0:
                        return result
                    if family is not None and err == -errno.ENOENT:
                        raise NbdKernelError(f"netlink family {family!r} not found (is the nbd module loaded? "
                                             "try: modprobe nbd)")
                    raise OSError(-err, os.strerror(-err))
                if mtype == NLMSG_DONE:
                    return result
                result = _parse_attrs(msg[GENLMSGHDR.size:])


class NbdNetlink(GenericNetlink):
    """NBD_CMD_CONNECT / DISCONNECT / RECONFIGURE, as nbd-client's netlink_configure() builds them."""

    def __init__(self):
        super().__init__(NBD_GENL_FAMILY_NAME)

    def connect(self, socks, size_bytes, server_flags, index=None, dead_conn_timeout_s=0, backend=None):
        attrs = [_nla_u64(NbdAttr.SIZE_BYTES, size_bytes), _nla_u64(NbdAttr.BLOCK_SIZE_BYTES, BLOCK_SIZE),
                 _nla_u64(NbdAttr.SERVER_FLAGS, int(server_flags))]
        # No NBD_ATTR_TIMEOUT: without it a request never times out, which is
        # what swap needs (a timed-out page-in kills its process).
        if index is not None:
            attrs.append(_nla_u32(NbdAttr.INDEX, index))
        if dead_conn_timeout_s:
            attrs.append(_nla_u64(NbdAttr.DEAD_CONN_TIMEOUT, dead_conn_timeout_s))
        if backend:
            attrs.append(_nla(NbdAttr.BACKEND_IDENTIFIER, backend.encode() + b"\0"))
        attrs.append(_nest(NbdAttr.SOCKETS, *(_nest(NBD_SOCK_ITEM, _nla_u32(NBD_SOCK_FD, s.fileno())) for s in socks)))
        reply = self._transact(self.family_id, NbdCmd.CONNECT, NBD_GENL_VERSION, b"".join(attrs))
        if NbdAttr.INDEX not in reply:
            raise NbdKernelError("the kernel accepted NBD_CMD_CONNECT but named no device (check dmesg)")
        return struct.unpack_from("=I", reply[NbdAttr.INDEX])[0]

    def reconfigure(self, index, socks, dead_conn_timeout_s=None, backend=None):
        attrs = [_nla_u32(NbdAttr.INDEX, index)]
        if backend:     # the kernel refuses (EINVAL, "must specify backend") without the one given at connect
            attrs.append(_nla(NbdAttr.BACKEND_IDENTIFIER, backend.encode() + b"\0"))
        if dead_conn_timeout_s is not None:
            attrs.append(_nla_u64(NbdAttr.DEAD_CONN_TIMEOUT, dead_conn_timeout_s))
        attrs.append(_nest(NbdAttr.SOCKETS, *(_nest(NBD_SOCK_ITEM, _nla_u32(NBD_SOCK_FD, s.fileno())) for s in socks)))
        self._transact(self.family_id, NbdCmd.RECONFIGURE, NBD_GENL_VERSION, b"".join(attrs))

    def disconnect(self, index):
        self._transact(self.family_id, NbdCmd.DISCONNECT, NBD_GENL_VERSION, _nla_u32(NbdAttr.INDEX, index))


def reconfigure(index, socks, backend, timeout_s):
    """NBD_CMD_RECONFIGURE, retried while the kernel answers ENOSPC (it has not yet seen the old
    sockets close, so no slot is free); raises the last OSError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        nl = NbdNetlink()
        try:
            nl.reconfigure(index, socks, backend=backend)
            return
        except OSError as e:
            if e.errno != errno.ENOSPC or time.monotonic() > deadline:
                raise
        finally:
            nl.close()
        time.sleep(0.2)


def load_nbd_module():
    if os.path.isdir(os.path.join(sys_root(), "sys/module/nbd")):
        return
    p = subprocess.run(["modprobe", "nbd"], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.isdir(os.path.join(sys_root(), "sys/module/nbd")):
        raise NbdKernelError("this kernel has no nbd driver (`modprobe nbd` failed: "
                             f"{(p.stderr or '').strip() or 'no output'}); it needs CONFIG_BLK_DEV_NBD: "
                             "install your distribution's extra kernel modules (e.g. linux-modules-extra-$(uname -r))")


class IoctlAttach:
    """The classic attach, for kernels without netlink nbd: NBD_SET_SOCK per socket, then NBD_DO_IT in a thread."""

    def __init__(self):
        self.fd = None
        self.thread = None

    def connect(self, socks, size_bytes, server_flags):
        import fcntl
        for index in nbd_devices():
            if nbd_connected(index) or _read(f"/sys/block/nbd{index}/size", "0") != "0":
                continue
            try:
                fd = os.open(f"/dev/nbd{index}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.ioctl(fd, NBD_SET_BLKSIZE, BLOCK_SIZE)
                fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, size_bytes // BLOCK_SIZE)
                fcntl.ioctl(fd, NBD_SET_FLAGS, int(server_flags))
                for s in socks:
                    fcntl.ioctl(fd, NBD_SET_SOCK, s.fileno())
            except OSError as e:
                os.close(fd)
                if e.errno == errno.EBUSY:
                    continue
                raise NbdKernelError(f"attach /dev/nbd{index}: {e.strerror} (check dmesg)") from None
            self.fd = fd
            self.thread = threading.Thread(target=self._do_it, name=f"nbd{index} NBD_DO_IT", daemon=True)
            self.thread.start()
            return index
        raise NbdKernelError("no free /dev/nbdX (all are connected); raise the nbd module's nbds_max")

    def _do_it(self):
        import fcntl
        try:
            fcntl.ioctl(self.fd, NBD_DO_IT)
        except OSError as e:
            log.debug("NBD_DO_IT returned: %s", e)

    def disconnect(self):
        import fcntl
        if self.fd is None:
            return
        for req in (NBD_DISCONNECT, NBD_CLEAR_SOCK):
            try:
                fcntl.ioctl(self.fd, req)
            except OSError as e:
                log.debug("ioctl %#x: %s", req, e)
        if self.thread:
            self.thread.join(10)
        os.close(self.fd)
        self.fd = None


############################################################################
# Swap manager (dm-crypt / mkswap / swapon / swapoff) ######################
############################################################################

PROVIDED_BY = {"cryptsetup": "cryptsetup-bin"}      # Debian packages of the commands not in util-linux


def run_cmd(argv, *, check=True, while_running=None, poll_s=1.0):
    """Run ARGV, its output captured; WHILE_RUNNING, if given, is called every POLL_S until it ends
    (a swapoff's progress).  With CHECK, a failure is Fatal with the command's own words."""
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    except FileNotFoundError:
        raise Fatal(f"{argv[0]}: command not found (install {PROVIDED_BY.get(argv[0], 'util-linux')})") from None
    while True:
        try:
            out, err = proc.communicate(timeout=poll_s if while_running else None)
            break
        except subprocess.TimeoutExpired:
            while_running()
    p = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and p.returncode != 0:
        why = f"exit code {p.returncode}" if p.returncode > 0 else f"signal {-p.returncode}"
        raise Fatal(f"{argv[0]} failed ({why}): {p.stderr.strip() or p.stdout.strip() or 'no output'}")
    return p


def swap_enable(dev, priority, discard):
    run_cmd(["mkswap", "--label", "nbd-vram", dev])
    argv = ["swapon", "--priority", str(priority)]
    if discard:
        argv.append("--discard")    # the kernel TRIMs freed slots; we zero them in VRAM
    run_cmd(argv + [dev])
    log.info("swap on %s at priority %d%s", dev, priority, " with discard" if discard else "")


def find_swap(*paths, swaps=None):
    """The /proc/swaps entry (path, (size KiB, used KiB, priority)) of the device at any of PATHS, or None.

    The kernel lists the path that swapon opened with its links resolved: a dm-crypt mapping is
    /dev/dm-N where udev made /dev/mapper/NAME a link to it, /dev/mapper/NAME where libdevmapper
    made the node itself (no udev).  So device numbers are compared too."""
    swaps = active_swaps() if swaps is None else swaps
    for p in paths:
        if p in swaps:
            return p, swaps[p]
    want = {st.st_rdev for st in map(_stat_block, paths) if st}
    for p, entry in swaps.items():
        st = _stat_block(p)
        if st and st.st_rdev in want:
            return p, entry
    return None


def _stat_block(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISBLK(st.st_mode) else None


SWAPOFF_POLL_S = 1.0        # while a swapoff runs, /proc/swaps is read this often for its progress


def swap_disable(dev, progress=None):
    """swapoff; True on success or when it was not active.

    A swapoff reads every page on the device back into RAM: minutes for a few GiB.  While it runs
    the kernel still lists the device in /proc/swaps, its Used column going down: PROGRESS, if
    given, is called with the /proc/swaps entries every SWAPOFF_POLL_S."""
    if find_swap(dev) is None:
        return True
    p = run_cmd(["swapoff", dev], check=False, poll_s=SWAPOFF_POLL_S,
                while_running=(lambda: progress(active_swaps())) if progress else None)
    if p.returncode == 0:
        log.info("swap off on %s", dev)
        return True
    log.error("swapoff %s failed: %s; keeping the device: disconnecting live swap would kill every process "
              "with pages on it", dev, p.stderr.strip() or p.stdout.strip() or f"exit code {p.returncode}")
    return False


# Encrypted swap (encrypt = yes), set up as /etc/crypttab's `swap` option does: a dm-crypt plain
# mapping (no header: nothing on the device but ciphertext) whose key cryptsetup reads from
# /dev/urandom and hands to the kernel.  The key lives in the kernel's dm table until the mapping
# is closed and is never written anywhere: a new one at every start, so pages left in VRAM are
# unreadable once the mapping is gone.
CRYPT_PREFIX = "nbd-vram-"      # mapping names: nbd-vram-N over /dev/nbdN
CRYPT_CIPHER = "aes-xts-plain64"
CRYPT_KEY_BITS = 512            # XTS splits it in two: AES-256


def crypt_name(index):
    return f"{CRYPT_PREFIX}{index}"


def crypt_open_argv(device, name, discard):
    """cryptsetup's command line that maps NAME over DEVICE with a random key."""
    argv = ["cryptsetup", "open", "--type", "plain", "--cipher", CRYPT_CIPHER, "--key-size", str(CRYPT_KEY_BITS),
            # plain mode reads exactly key-size bits from a key file, unhashed
            "--key-file", "/dev/urandom",
            # one IV per 4 KiB page, the device's block size, instead of eight (plain mode: cryptsetup >= 2.0)
            "--sector-size", str(BLOCK_SIZE)]
    if discard:
        # so that swapon --discard reaches VRAM: it shows which slots are free, never what they held
        argv.append("--allow-discards")
    return argv + [device, name]


def crypt_close_argv(name):
    return ["cryptsetup", "close", name]


def check_crypt_support(load=True):
    """encrypt = yes: cryptsetup on PATH and dm-crypt in the kernel, else one NoCryptError saying what to do.

    With load=False (check-config) nothing is loaded: `modprobe --dry-run` only looks for the module."""
    if not shutil.which("cryptsetup"):
        raise NoCryptError("encrypt = yes needs cryptsetup, which is not installed (not on PATH): "
                           "install it (apt install cryptsetup-bin) or set encrypt = no")
    if os.path.isdir(os.path.join(sys_root(), "sys/module/dm_crypt")):
        return
    argv = ["modprobe"] + ([] if load else ["--dry-run"]) + ["dm_crypt"]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        ok, why = p.returncode == 0, " ".join((p.stderr or "").split()) or f"exit code {p.returncode}"
    except FileNotFoundError:
        ok, why = False, "modprobe not found"
    if not ok:     # rc 0 with no /sys/module/dm_crypt: built into the kernel
        raise NoCryptError(f"encrypt = yes needs the kernel's dm-crypt (`{shlex.join(argv)}` failed: {why}); "
                           "it needs CONFIG_DM_CRYPT: install your distribution's kernel modules or set encrypt = no")


def crypt_open(device, name, discard):
    """Map NAME over DEVICE with a new random key; returns the path of the plaintext side."""
    run_cmd(crypt_open_argv(device, name, discard))
    path = f"/dev/mapper/{name}"
    log.info("encrypted swap: %s over %s (dm-crypt plain %s, a new %d-bit key from /dev/urandom, never stored)",
             path, device, CRYPT_CIPHER, CRYPT_KEY_BITS)
    return path


def crypt_close(name):
    run_cmd(crypt_close_argv(name))
    log.info("closed the dm-crypt mapping %s: its key is gone", name)


def crypt_mappings():
    """{nbd index: (mapping name, "dm-N")} of the mappings that nbd-vram made (nbd-vram-N) over /dev/nbdN."""
    found = {}
    block = os.path.join(sys_root(), "sys/block")
    try:
        names = sorted(n for n in os.listdir(block) if n.startswith("dm-"))
    except OSError:
        return found
    for dm in names:
        name = _read(f"/sys/block/{dm}/dm/name", "") or ""
        if not name.startswith(CRYPT_PREFIX):
            continue
        try:
            slaves = os.listdir(os.path.join(block, dm, "slaves"))
        except OSError:
            continue
        for s in slaves:
            if re.fullmatch(r"nbd\d+", s):
                found[int(s[3:])] = (name, dm)
    return found


SYSCTLS = {"swappiness": "vm/swappiness", "min_free_kbytes": "vm/min_free_kbytes", "page_cluster": "vm/page-cluster"}


def sysctl_set(key, value):
    """Set a vm sysctl; returns the old value (for restoring on stop)."""
    path = os.path.join("/proc/sys", SYSCTLS[key])
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write(str(value))
    log.info("sysctl vm.%s = %s (was %s; restored on stop)", SYSCTLS[key].split("/")[1], value, old)
    return old


############################################################################
# Configuration ############################################################
############################################################################

def _parse_bool(text):
    t = str(text).strip().lower()
    if t in ("yes", "true", "on", "1"):
        return True
    if t in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def _int_range(lo, hi):
    def parse(text):
        try:
            v = int(str(text).strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo}..{hi}")
        return v
    return parse


def _optional(parse):
    """'' or 'keep' leaves the kernel's setting alone."""
    def wrapped(text):
        return None if str(text).strip().lower() in ("", "keep") else parse(text)
    return wrapped


def _choice(*choices):
    def parse(text):
        t = str(text).strip().lower()
        if t not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return t
    return parse


def _size(text):
    v = parse_size(text)
    if v < 64 * MiB:
        raise ValueError(f"{text!r} is less than 64M")
    return v


def _mib(text):
    """VRAM_SETUP_SIZE_MB: MiB as a plain number."""
    if not str(text).strip().isdigit():
        raise ValueError(f"{text!r} is not a number of MiB")
    return _size(str(text).strip())


def _buffer_size(text):
    v = parse_size(text)
    if not 64 << 10 <= v <= 256 * MiB:
        raise ValueError(f"{text!r} is outside 64K..256M")
    return v


def _workers(text):
    return 0 if str(text).strip().lower() == "auto" else _int_range(1, 32)(text)


def _text(text):
    return str(text).strip()


def _off_or(parse):
    """'off' (or '') turns the feature off: None."""
    def wrapped(text):
        return None if str(text).strip().lower() in ("", "off", "no") else parse(text)
    return wrapped


def _reserve(text):
    v = parse_size(text)
    if v < 0:
        raise ValueError(f"{text!r} is negative")
    return v


def _gpus(text):
    t = str(text).strip()
    if t.lower() == "all":
        return "all"
    specs = [x.strip() for x in t.split(",")]
    if not t or not all(specs):
        raise ValueError(f"{text!r} is not a GPU list")
    return ",".join(specs)


class Option:
    """One setting: its config key (also the --flag), parser, default and help."""

    def __init__(self, key, default, parse, allowed, help, env=None, env_parse=None):
        self.key, self.default, self.parse, self.allowed, self.help = key, default, parse, allowed, help
        self.env, self.env_parse = env, env_parse or parse

    @property
    def flag(self):
        return "--" + self.key.replace("_", "-")


OPTIONS = [
    Option("size", "7G", _size, "a size such as 512M, 8G, or MiB as a number",
           "VRAM to use on each GPU: a ceiling; what a GPU cannot give (or would leave under the reserve) is "
           "not taken",
           env="VRAM_SETUP_SIZE_MB", env_parse=_mib),
    Option("min_size", "1G", _size, "a size such as 1G", "the least VRAM worth starting with (all GPUs together)"),
    Option("gpus", "0", _gpus, "all, or a comma-separated list of indexes (0), UUIDs (GPU-...) or PCI bus ids "
           "(0000:01:00.0)", "which GPUs to use (see nvidia-smi -L); each gets its own slices"),
    Option("slice_size", "1G", _size, "a size such as 1G, at least 64M",
           "VRAM swap is served as slices of this size, one nbd device and swap priority each, so that one "
           "can be given back alone"),
    Option("reserve", "off", _off_or(_reserve), "a size such as 2G, or off",
           "VRAM kept free for other GPU programs: below it the emptiest slice is released, one at a time"),
    Option("reclaim_after", "300", _int_range(0, 86400), "0..86400 seconds",
           "how long VRAM must have had room for a slice above the reserve before the slice is taken back"),
    Option("vram_poll", "5", _int_range(1, 3600), "1..3600 seconds", "how often free VRAM is read"),
    Option("memory_clock_max", "off", _off_or(_int_range(100, 100000)), "MHz, or off",
           "cap the GPU's memory clock (NVML locked clocks, where the GPU allows it) while the daemon runs: a "
           "cooler laptop, slower swap"),
    Option("priority", "1500", _int_range(-1, 32767), "-1..32767",
           "swap priority of slice 0 (each next slice one lower): above zram (100) and disk swap, so VRAM fills "
           "first after RAM",
           env="VRAM_SWAP_PRIORITY"),
    Option("connections", "4", _int_range(1, 64), "1..64",
           "sockets handed to the kernel for each slice: one blk-mq queue and one serving thread each",
           env="VRAM_NBD_CONNECTIONS"),
    Option("discard", "yes", _parse_bool, "yes or no", "swapon --discard: freed swap slots are TRIMmed"),
    Option("encrypt", "no", _parse_bool, "yes or no",
           "swap on a dm-crypt plain mapping (/dev/mapper/nbd-vram-N) over the nbd device, with a new random key "
           "at every start: VRAM holds only ciphertext; needs cryptsetup"),
    Option("swappiness", "keep", _optional(_int_range(0, 200)), "0..200 or keep",
           "vm.swappiness while the daemon runs (restored on stop)"),
    Option("min_free_kbytes", "keep", _optional(_int_range(1024, 4 << 20)), "1024..4194304 or keep",
           "vm.min_free_kbytes while the daemon runs: reserve RAM so reclaim can always make progress"),
    Option("page_cluster", "keep", _optional(_int_range(0, 10)), "0..10 or keep",
           "vm.page-cluster while the daemon runs (0: swap in single pages, best for VRAM's low latency)"),
    Option("attach", "auto", _choice("auto", "netlink", "ioctl"), "auto, netlink or ioctl",
           "how to hand sockets to the kernel: netlink, or the classic ioctls (auto: netlink if present)"),
    Option("dead_conn_timeout", "600", _int_range(0, 86400), "0..86400 seconds",
           "if the daemon dies, the kernel holds swap I/O this long waiting for it to come back"),
    Option("workers", "auto", _workers, "auto or 1..32",
           "serving processes (auto: one per two CPUs, at most one per connection and 8)"),
    Option("buffer_size", "512K", _buffer_size, "64K..256M",
           "pinned staging per connection, each way (a larger request is copied in pieces of this size)"),
    Option("realtime", "yes", _parse_bool, "yes or no",
           "serving threads run SCHED_RR (priority 1), so a reply under memory pressure may use the kernel's "
           "real-time reserve instead of waiting on reclaim"),
    Option("libcuda", "libcuda.so.1", _text, "a path", "the CUDA driver library", env="NBD_VRAM_LIBCUDA"),
    Option("power", "always", _choice("always", "ac", "battery"), "always, ac or battery",
           "power-aware management: always (ignore power), ac (VRAM swap only on AC power), battery (release it "
           "when the battery drops below battery_threshold); after a release it comes back when AC returns"),
    Option("battery_threshold", "20", _int_range(1, 99), "1..99 (percent)",
           "with power = battery: release VRAM swap below this charge"),
    Option("power_poll", "60", _int_range(1, 3600), "1..3600 seconds",
           "how often the power supply is read (a udev rule also wakes the daemon on every change)"),
    Option("debug", "no", _parse_bool, "yes or no", "log every decision and invalid request"),
]
POWER_KEYS = ("power", "battery_threshold", "power_poll")     # the settings SIGHUP reloads
OPTION_BY_KEY = {o.key: o for o in OPTIONS}
OPTION_ALIASES = {"gpu": "gpus"}        # the key's name before several GPUs
OFF_KEYS = ("reserve", "memory_clock_max")


CONFIG_MAX_CHARS = 1 << 20      # a configuration is a few KiB; this much is none (--config /dev/zero never ends)


def read_config_file(path):
    """key = value lines; '#' starts a comment.  Returns {key: (value text, line number)}."""
    values = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(CONFIG_MAX_CHARS + 1)
        if len(text) > CONFIG_MAX_CHARS:
            raise ConfigError(f"{path}: longer than {CONFIG_MAX_CHARS >> 20} MiB: not a configuration file")
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ConfigError(f"{path}:{lineno}: expected 'key = value', got {raw.strip()!r}")
            key, value = (s.strip() for s in line.split("=", 1))
            key = key.replace("-", "_").lower()
            key = OPTION_ALIASES.get(key, key)
            if key not in OPTION_BY_KEY:
                raise ConfigError(f"{path}:{lineno}: unknown key {key!r} (known keys: {', '.join(OPTION_BY_KEY)})")
            if key in values:
                raise ConfigError(f"{path}:{lineno}: {key!r} is set twice (first on line {values[key][1]})")
            values[key] = (value, lineno)
    return values


def load_config_as_written(path=None, flags=None, environ=None):
    """Defaults, then the file, then the environment, then command-line flags.  The file is PATH, else
    $NBD_VRAM_CONFIG, else DEFAULT_CONFIG; only the default one may be absent (all defaults then).

    Returns (settings dict, {key: where it came from}, {key: its text as written}): check-config shows
    the text, which reads back as the same setting where a formatted value would not always (1025M)."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    named = "--config" if path else "$NBD_VRAM_CONFIG" if environ.get("NBD_VRAM_CONFIG") else None
    path = path or environ.get("NBD_VRAM_CONFIG") or DEFAULT_CONFIG
    settings, origin, written = {}, {}, {}
    for o in OPTIONS:
        settings[o.key], origin[o.key], written[o.key] = o.parse(o.default), "default", o.default
    try:
        file_values = read_config_file(path)
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: no such file (named by {named}): correct the name, or create the file "
                              "(an empty one means every default)") from None
        file_values = {}
    except (OSError, UnicodeDecodeError) as e:      # a directory, no permission, ENOTDIR, ELOOP, ENAMETOOLONG, EIO
        raise ConfigError(f"{path}: cannot read it: {e}") from None
    for key, (text, lineno) in file_values.items():
        o = OPTION_BY_KEY[key]
        try:
            settings[key] = o.parse(text)
        except ValueError as e:
            raise ConfigError(f"{path}:{lineno}: {key}: {e} (allowed: {o.allowed})") from None
        origin[key], written[key] = f"{path}:{lineno}", text
    for o in OPTIONS:
        if o.env and environ.get(o.env) not in (None, ""):
            try:
                settings[o.key] = o.env_parse(environ[o.env])
            except ValueError as e:
                raise ConfigError(f"environment {o.env}: {e} (allowed: {o.allowed})") from None
            origin[o.key], written[o.key] = f"${o.env}", environ[o.env].strip()
    for key, text in flags.items():
        if text is None:
            continue
        o = OPTION_BY_KEY[key]
        try:
            settings[key] = o.parse(text)
        except ValueError as e:
            raise ConfigError(f"{o.flag}: {e} (allowed: {o.allowed})") from None
        origin[key], written[key] = o.flag, text.strip()
    if settings["min_size"] > settings["size"]:
        raise ConfigError(f"min_size ({format_size(settings['min_size'])}) is larger than size "
                          f"({format_size(settings['size'])}); lower min_size or raise size")
    return settings, origin, written


def load_config(path=None, flags=None, environ=None):
    """load_config_as_written without the texts: (settings dict, {key: where it came from})."""
    settings, origin, _ = load_config_as_written(path, flags, environ)
    return settings, origin


def format_setting(key, value):
    if value is None:
        return "off" if key in OFF_KEYS else "keep"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in ("size", "min_size", "buffer_size", "slice_size", "reserve"):
        return format_size(value).replace(" ", "").replace("iB", "")
    return str(value)


def sample_config():
    lines = []
    for o in OPTIONS:
        lines.append(f"# {o.help}. Allowed: {o.allowed}." + (f" Environment: {o.env}." if o.env else ""))
        lines.append(f"#{o.key} = {o.default}")
    return "\n".join(lines)


class FromConfig:
    """For a frozen value (a namedtuple) of a few settings, its fields named as they are: a part of
    the daemon gets only those, fixed at the start, not the whole configuration."""
    __slots__ = ()

    @classmethod
    def from_config(cls, cfg):
        return cls(*(cfg[key] for key in cls._fields))


############################################################################
# Power policy #############################################################
############################################################################
# A dGPU kept awake by swap drains a laptop's battery, and a GPU that powers
# off under live swap hangs the machine.  Readings come from
# /sys/class/power_supply (under NBD_VRAM_SYSFS_ROOT in tests); the decision
# is a pure function of the settings, the readings and what was done before.

POWER_SUPPLY = "/sys/class/power_supply"


def power_supply_dir():
    """NBD_VRAM_POWER_SUPPLY: a fixture tree in place of the power supplies alone (the kernel tests
    unplug a pretend AC adapter while the rest of /sys stays real)."""
    return os.environ.get("NBD_VRAM_POWER_SUPPLY") or os.path.join(sys_root(), POWER_SUPPLY.lstrip("/"))
AC_SUPPLY_TYPES = ("Mains", "USB", "USB_C", "USB_PD", "USB_PD_DRP", "Wireless")


class PowerReadings(collections.namedtuple("PowerReadings", "ac capacity batteries")):
    """ac: True, False, or None where no AC adapter nor battery exists (a desktop).
    capacity: the charge in percent of every system battery together, None if unknown.
    batteries: [(name, capacity or None, status)]."""

    def describe(self):
        if self.ac is None:
            return "no AC adapter or battery found (a desktop)"
        where = "on AC power" if self.ac else "on battery"
        if self.capacity is not None:
            where += f", battery {self.capacity}%"
        return where


def read_power():
    """The machine's power state from sysfs."""
    base = power_supply_dir()
    try:
        names = sorted(os.listdir(base))
    except OSError:
        names = []
    adapters, batteries, energy_now, energy_full = [], [], 0, 0
    for name in names:
        d = os.path.join(base, name)
        if read_text(f"{d}/scope", "System") == "Device":
            continue        # a mouse's or a headset's battery says nothing about the machine
        kind = read_text(f"{d}/type", "")
        if kind in AC_SUPPLY_TYPES:
            online = read_text(f"{d}/online")
            if online is not None:
                adapters.append(online.strip() == "1")
        elif kind == "Battery":
            if read_text(f"{d}/present", "1") == "0":
                continue
            cap = read_text(f"{d}/capacity")
            cap = int(cap) if cap and cap.isdigit() else None
            batteries.append((name, cap, read_text(f"{d}/status", "Unknown")))
            for now, full in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
                n, f = read_text(f"{d}/{now}"), read_text(f"{d}/{full}")
                if n and f and n.isdigit() and f.isdigit() and int(f) > 0:
                    energy_now, energy_full = energy_now + int(n), energy_full + int(f)
                    break
            else:
                energy_full = -1        # one battery without the figures: average the percentages instead
    if adapters:
        ac = any(adapters)
    elif batteries:
        ac = not any(status == "Discharging" for _, _, status in batteries)
    else:
        ac = None
    caps = [c for _, c, _ in batteries if c is not None]
    if energy_full > 0:
        capacity = round(100 * energy_now / energy_full)
    elif caps:
        capacity = round(sum(caps) / len(caps))
    else:
        capacity = None
    return PowerReadings(ac, capacity, batteries)


def power_decision(policy, threshold, readings, released, sleeping=False):
    """(VRAM swap wanted?, why).  `released`: this daemon gave swap up for power reasons
    and has not had it back since; such a release lasts until AC returns."""
    if sleeping:
        return False, "the system is going to sleep"
    if policy == "always":
        return True, "power = always"
    if readings.ac is None:
        return True, "no AC adapter or battery found: a desktop, treated as on AC"
    if readings.ac:
        return True, "on AC power"
    if policy == "ac":
        return False, "on battery (power = ac)"
    if released:
        return False, "released on battery; comes back on AC"
    if readings.capacity is None:
        return True, "on battery, charge unknown (power = battery releases below a known charge)"
    if readings.capacity < threshold:
        return False, f"on battery at {readings.capacity}%, below battery_threshold {threshold}%"
    return True, f"on battery at {readings.capacity}%, releases below {threshold}%"


def power_inputs():
    """What the power policy decides on: (the supplies' readings, whether `nbd_vram.py sleep` runs)."""
    return read_power(), os.path.exists(sleep_marker())


class PowerPolicy:
    """The daemon's view of power: given readings, the decision, and what status shows.

    settings: its own {key: value} of POWER_KEYS (a SIGHUP replaces it: see reload_config)."""

    def __init__(self, settings):
        self.settings = {key: settings[key] for key in POWER_KEYS}
        self.released = os.environ.get(RELEASED_ENV) == "1"
        self.readings = None
        self.sleeping = False
        self.want, self.why = True, "not yet read"
        self.checked = 0.0
        self._desktop_logged = False

    @property
    def poll_s(self):
        return float(self.settings["power_poll"])

    def evaluate(self, readings, sleeping):
        """Decide on READINGS (PowerReadings) and SLEEPING; logs a change of mind once.  True: VRAM swap wanted."""
        self.readings = readings
        if self.readings.ac is None and not self._desktop_logged and self.settings["power"] != "always":
            log.info("power: no AC adapter or battery in %s: a desktop, VRAM swap stays on", POWER_SUPPLY)
            self._desktop_logged = True
        self.sleeping = sleeping
        want, why = power_decision(self.settings["power"], self.settings["battery_threshold"], self.readings,
                                   self.released, self.sleeping)
        if (want, why) != (self.want, self.why):
            log.info("power: %s: VRAM swap %s (%s)", why, "wanted" if want else "not wanted",
                     self.readings.describe())
        self.want, self.why, self.checked = want, why, time.monotonic()
        if want and self.readings.ac:
            self.released = False
        return want

    def due(self):
        return time.monotonic() - self.checked >= self.poll_s

    def state(self):
        r = self.readings
        return {"policy": self.settings["power"], "battery_threshold": self.settings["battery_threshold"],
                "poll_s": self.settings["power_poll"], "wanted": self.want, "why": self.why,
                "released": self.released, "sleeping": self.sleeping,
                "ac": None if r is None else r.ac, "battery_percent": None if r is None else r.capacity,
                "readings": None if r is None else r.describe()}


def hibernation_resume_warning(device=None):
    """A line to log if the kernel would resume from hibernation off an nbd device, else None."""
    targets = []
    resume = _read("/sys/power/resume", "0:0")
    if resume and resume not in ("0:0", "") and resume.split(":")[0] == str(NBD_MAJOR):
        targets.append(f"/sys/power/resume is {resume} (an nbd device)")
    cmdline = _read("/proc/cmdline", "") or ""
    for word in cmdline.split():
        if word.startswith("resume=") and ("/dev/nbd" in word or (device and word == f"resume={device}")):
            targets.append(f"the kernel command line has {word}")
    if not targets:
        return None
    return ("VRAM swap can never hold a hibernation image (the GPU is off while the machine resumes): "
            + "; ".join(targets) + "; point resume= at disk swap and update the initramfs")


############################################################################
# Worker processes #########################################################
############################################################################
# One Python process serves about 100k small requests a second: the GIL
# serializes the per-request work of every thread.  Where the VRAM was
# allocated with an exported fd (cuMemCreate), worker processes import that
# fd and map the same memory, so connections are served on as many cores as
# there are workers.  A worker owns no VRAM: it unmaps on exit, and only the
# parent scrubs and frees.  A worker serving the kernel ignores SIGTERM and
# SIGINT and ends only when its connections end (the kernel disconnects them
# after swapoff): a stray `pkill` or a parent killed with -9 never takes live
# swap down with it.

WORKER_READY = b"R"

# The counters published for `status`: a page in RUNTIME_DIR, mapped and locked
# before swapon so that updating it never needs a new page.  One slot per
# serving process (0: the daemon itself, w: worker w), each: magic, updated
# (ms since the epoch), live connections, then Stats.FIELDS.
COUNTERS = struct.Struct("=8sQQ" + "Q" * len(Stats.FIELDS))
COUNTERS_MAGIC = b"nbdvram1"
MAX_GPUS = 16
WORKER_SLOTS = 40           # counter slots a GPU: its slot 0 (threads of the daemon) and workers 1..32
COUNTERS_BYTES = 1 << 16    # 682 slots: 1 + MAX_GPUS * WORKER_SLOTS fit
STATUS_INTERVAL_S = 2.0


def default_workers(connections):
    return max(1, min(connections, (os.cpu_count() or 2) // 2, 8))


# A child process of this file (GPU process, worker, spare) runs its code from bytecode cached in the
# runtime directory: compiling these ~6,000 lines is most of a Python start on a slow machine (5 s of
# 10 in the kernel tests' emulated guest), and a daemon starts four or more children, one of them
# while swap is stalled if a worker dies without a spare.  Only this file's bytecode goes there
# (the prefix is unset again before its imports run), and only into a directory that no one but
# this user can write: whoever can write the cache runs code as this process.
_CHILD_BOOT = "; ".join((
    "import importlib.machinery, importlib.util, sys",
    "sys.pycache_prefix, path = sys.argv[1] or None, sys.argv[2]",
    "sys.dont_write_bytecode = not sys.argv[1]",
    "del sys.argv[1:3]",
    "sys.argv[0], sys.path[0] = path, path.rpartition('/')[0] or '.'",
    "loader = importlib.machinery.SourceFileLoader('nbd_vram', path)",
    "code = loader.get_code('nbd_vram')",
    "sys.pycache_prefix, sys.dont_write_bytecode = None, False",
    "m = sys.modules['nbd_vram'] = importlib.util.module_from_spec(importlib.util.spec_from_loader('nbd_vram', loader))",
    "exec(code, m.__dict__)",
    "sys.exit(m.main())"))


def child_argv(*args):
    """argv of a new process of this file with ARGS (see _CHILD_BOOT).  The file's path comes just
    before ARGS, as in `python3 nbd_vram.py worker ...`: pgrep -f 'nbd_vram.py worker' finds them."""
    cache = os.path.join(runtime_dir(), "pycache")
    try:
        st = os.stat(runtime_dir())
        private = st.st_uid == os.geteuid() and not st.st_mode & 0o022
    except OSError:
        private = False
    return [sys.executable, "-c", _CHILD_BOOT, cache if private else "", os.path.abspath(__file__), *args]


def spawn_worker(libcuda, buffer_bytes, lock=False, debug=False, index=0, max_connections=256,
                 standby=0, realtime=False, gpu=None, slot=None, copier=None, vram=None):
    """Start `nbd_vram.py worker`; returns (Popen, parent's end of its control socket).

    Without copier, the GPU process of gpu (a UUID).  With copier (the child's
    end of its registration socket to the GPU's CopyServer) a worker without
    CUDA: given vram ((address, size) of the export as the GPU process sees
    it), it serves that one export to the clients `serve` passes it;
    otherwise it is a kernel-mode worker that takes its slices and sockets
    over the control socket (KernelWorker)."""
    # SOCK_SEQPACKET: each control message arrives whole, with its fds.
    ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [child_ctl.fileno()]
    argv = child_argv("worker", "--ctl-fd", str(child_ctl.fileno()), "--buffer-size", str(buffer_bytes),
                      "--index", str(index), "--max-connections", str(max_connections))
    if copier is None:
        argv += ["--gpu-process", "--gpu", gpu]
        if libcuda:
            argv += ["--libcuda", libcuda]
    else:
        fds.append(copier.fileno())
        argv += ["--copier-fd", str(copier.fileno())]
        if vram is not None:
            argv += ["--vram-address", str(vram[0]), "--vram-size", str(vram[1])]
        else:
            argv += ["--kernel", "--gpu", gpu, "--slot", str(index if slot is None else slot)]
    if standby:
        argv += ["--standby", str(standby)]
    if lock:
        argv.append("--lock")
    if realtime:
        argv.append("--realtime")
    if debug:
        argv.append("--debug")
    env = dict(os.environ, CUDA_DEVICE_ORDER=os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))
    if lock:
        env["PYTHONMALLOC"] = "malloc"
    proc = subprocess.Popen(argv, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
    child_ctl.close()
    return proc, ctl


def wait_worker_ready(proc, ctl, timeout_s=60):
    """Wait for a new worker's ready byte; one that does not send it is killed (and its control
    socket closed) before Fatal says so."""
    ctl.settimeout(timeout_s)
    try:
        got = ctl.recv(1)
    except socket.timeout:
        got = b""
    ctl.settimeout(None)
    if got != WORKER_READY:
        rc = proc.poll()
        if rc is None:
            proc.kill()
        proc.wait()
        ctl.close()
        raise Fatal(f"worker process {proc.pid} did not start ({'exit code ' + str(rc) if rc is not None else 'no answer'}); "
                    "see the lines above")


def send_fd(ctl, fd):
    ctl.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])


def recv_fd(ctl):
    msg, anc, _flags, _addr = ctl.recvmsg(1, socket.CMSG_SPACE(struct.calcsize("i")))
    if not msg:
        return None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            return struct.unpack("i", data[:struct.calcsize("i")])[0]
    return -1


# The control channel of a kernel-mode worker and of a GPU process: the daemon sends one message (a
# tag, its fields, fds attached) and waits for CTL_OK (with the request's answer and fds, if it has
# any), or CTL_ERROR and one line of text.
CTL_SLICE = b"V"       # to a worker: slice id, size, address in the GPU process: serve from that slice
CTL_SERVE = b"C"       # to a worker: slice id, count; fds: serve these kernel connections on it
CTL_DROP = b"X"        # to a worker: slice id: its device is disconnected; end its connections
CTL_BECOME = b"G"      # to the spare: index, counters slot: take a dead worker's place
CTL_POOL = b"P"        # to the spare: count: keep this many buffer sets allocated and locked
CTL_ALLOC = b"A"       # to a GPU process: slice id, size: allocate and zero it; answer: address (fd: its export)
CTL_IMPORT = b"I"      # to a GPU process: slice id, size; fd: map a stored slice; answer: address
CTL_FREE = b"R"        # to a GPU process: slice id, scrub: (zero,) unmap and release the slice
CTL_MEMINFO = b"M"     # to a GPU process: answer: free and total VRAM
CTL_CLIENT = b"L"      # to a GPU process: worker index; fd: that worker's registration socket (CopyServer)
CTL_ENDED = b"E"       # to a worker: answer: (slice id, count) of connections that ended while their slice is served
CTL_FIELDS = {CTL_SLICE: struct.Struct("=IQQ"), CTL_SERVE: struct.Struct("=II"), CTL_DROP: struct.Struct("=I"),
              CTL_BECOME: struct.Struct("=II"), CTL_POOL: struct.Struct("=I"), CTL_ALLOC: struct.Struct("=IQ"),
              CTL_IMPORT: struct.Struct("=IQ"), CTL_FREE: struct.Struct("=IB"), CTL_MEMINFO: struct.Struct("="),
              CTL_CLIENT: struct.Struct("=I"), CTL_ENDED: struct.Struct("=")}
CTL_ENDED_ITEM = struct.Struct("=II")
CTL_OK, CTL_ERROR = b"k", b"e"
CTL_MAX_FDS = 64       # connections of one slice (the connections setting's limit)


def ctl_call(ctl, tag, *fields, fds=(), timeout_s=60.0, who="worker"):
    """One request over a control socket: (the answer's bytes after CTL_OK, the fds that came with it).
    Raises Fatal with the other side's reason if it fails."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    got = []
    ctl.settimeout(timeout_s)
    try:
        ctl.sendmsg([tag + CTL_FIELDS[tag].pack(*fields)], anc)
        answer, anc, _flags, _addr = ctl.recvmsg(4096, socket.CMSG_SPACE(4))
        got = _received_fds(anc)
    except socket.timeout:
        answer = b"e" + f"no answer in {timeout_s:.0f} s".encode()
    except OSError as e:
        answer = b"e" + f"its control socket failed: {e.strerror}".encode()
    finally:
        ctl.settimeout(None)
    if answer.startswith(CTL_OK):
        return answer[1:], got
    for fd in got:
        os.close(fd)
    why = answer[1:].decode(errors="replace") if answer.startswith(CTL_ERROR) else "it exited"
    err = Fatal(f"{who}: {tag.decode()} request failed: {why}")
    err.why = why
    raise err


def control_loop(ctl, handle, label, tick=None):
    """Answer the daemon's requests until it closes the control socket (or dies).

    handle(tag, fields, fds) returns (answer bytes, fds to send with it); tick() runs at
    least every STATUS_INTERVAL_S."""
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    try:
        while True:
            if tick is not None:
                tick()
            if not sel.select(STATUS_INTERVAL_S):
                continue
            msg, anc, _flags, _addr = ctl.recvmsg(64, socket.CMSG_SPACE(CTL_MAX_FDS * 4))
            fds = _received_fds(anc)
            if not msg:
                return
            out = []
            try:
                answer, out = handle(msg[:1], CTL_FIELDS[msg[:1]].unpack(msg[1:]), fds)
            except (Fatal, KeyError, struct.error, OSError) as e:
                for fd in fds:
                    os.close(fd)
                text = e if not isinstance(e, (KeyError, struct.error)) else f"bad control message {msg!r}"
                log.debug("%s: %s", label, text)        # the daemon says what it means for the service
                ctl.sendall(CTL_ERROR + str(text).encode()[:4000])
            else:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(out)}i", *out))] if out else []
                ctl.sendmsg([CTL_OK + answer], anc)
    finally:
        sel.close()


def lock_process(libc, label):
    """Everything a process on the swap I/O path does once its memory is all there: lock it, never
    be the OOM killer's choice, never wait on I/O to allocate, no garbage collector pauses."""
    if lock_memory(libc):
        log.info("%s: memory locked: %d KiB", label, locked_kib())
    set_oom_score_adj(-1000)
    set_io_flusher(libc)
    gc.collect()
    gc.freeze()
    gc.disable()


class GpuProcess:
    """`worker --gpu-process`: the one process that holds a GPU's CUDA context.

    It allocates, maps, zeroes and frees every slice of its GPU for the daemon
    (which holds no context), and copies for every worker of that GPU
    (CopyServer): the VRAM the service uses beyond the swap it lends is one
    context a GPU, however many workers serve.  If the daemon dies it serves on
    until the workers' connections have ended, then unmaps without zeroing:
    the slices' fds in systemd's fd store keep the swapped pages for the
    restarted daemon.
    """

    def __init__(self, args, cuda, dev, ctx, libc, ctl):
        self.args, self.cuda, self.dev, self.ctx, self.libc, self.ctl = args, cuda, dev, ctx, libc, ctl
        self.label = f"GPU process of {args.gpu}"
        self.stores = {}        # slice id -> VramStore
        setup = (lambda: prepare_serving_thread(libc, args.realtime)) if args.lock else None
        self.copier = CopyServer(cuda, ctx, self.label, thread_setup=setup)
        self.vmm = (cuda.has_vmm and cuda.attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev)
                    and cuda.attribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev))

    def run(self):
        if self.args.lock:
            lock_process(self.libc, self.label)
        self.ctl.sendall(WORKER_READY)
        control_loop(self.ctl, self._handle, self.label)
        # The daemon stopped, or died: copy on for the workers until their connections have ended.
        while self.copier.busy():
            time.sleep(STATUS_INTERVAL_S)
        for sid in list(self.stores):
            self.stores.pop(sid).free(scrub=False)
        log.debug("%s: no worker left; exiting", self.label)
        return EXIT_OK

    def _handle(self, tag, fields, fds):
        cuda = self.cuda
        cuda.call("cuCtxSetCurrent", self.ctx)
        if tag == CTL_ALLOC:
            sid, size = fields
            if sid in self.stores:
                raise Fatal(f"slice {sid} is already mapped")
            try:
                store = VramStore.allocate(cuda, self.dev, self.ctx, size, size, use_vmm=bool(self.vmm))
            except NoVramError:
                raise Fatal("out of VRAM") from None
            self.stores[sid] = store
            return _U64.pack(store.dptr), ([store.fd] if store.fd is not None else [])
        if tag == CTL_IMPORT:
            sid, size = fields
            if sid in self.stores or len(fds) != 1:
                raise Fatal(f"slice {sid}: {'already mapped' if sid in self.stores else 'no fd'}")
            store = VramStore.import_fd(cuda, self.dev, self.ctx, fds[0], size)
            store.imported = False      # ours now: zeroed and released when the daemon frees it
            self.stores[sid] = store
            return _U64.pack(store.dptr), []
        if tag == CTL_FREE:
            sid, scrub = fields
            store = self.stores.pop(sid, None)
            if store is None:
                raise Fatal(f"slice {sid} is not mapped")
            store.quiet = True
            store.free(scrub=bool(scrub))
            return b"", []
        if tag == CTL_MEMINFO:
            return struct.pack("=QQ", *cuda.mem_info()), []
        if tag == CTL_CLIENT:
            (index,) = fields
            if len(fds) != 1:
                raise Fatal("a worker's registration socket is missing")
            self.copier.add_client(socket.socket(fileno=fds[0]), f"worker {index}")
            return b"", []
        raise Fatal(f"unknown request {tag!r}")


class ServingThread:
    """A buffer set and a thread already running, waiting for a kernel connection to serve.

    Made before the worker says ready (or, for the spare, before any worker
    dies): taking a connection over then starts no thread, whose stack under
    mlockall would need memory at the moment swap is stalled.
    """

    def __init__(self, io, setup=None):
        self.io, self.setup = io, setup
        self.work = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        if self.setup is not None:
            self.setup()
        while True:
            fd, export, name = self.work.get()
            try:
                serve_connection(socket.socket(fileno=fd), export, name, io=self.io, handshake=False)
            finally:
                self.idle.set()

    def serve(self, fd, export, name):
        self.idle.clear()
        self.work.put((fd, export, name))

    def busy(self):
        return not self.idle.is_set()

    def wait(self, timeout_s):
        """True once the connection it serves has ended."""
        return self.idle.wait(timeout_s)


class KernelWorker:
    """`worker --kernel`: serves the kernel's connections to every slice of one GPU, without CUDA.

    The daemon hands it slices (where the GPU process mapped each) and sockets
    over the control channel; each connection gets a thread and a buffer set
    (RemoteIoContext, registered with the GPU process) from a pool filled
    before it says ready, so that a spare can take a dead worker's connections
    without allocating.  It ends when the daemon closes the control socket and
    its connections have ended; until then a connection the kernel gave up on
    just ends (status shows the device degraded) and the others go on serving.
    """

    def __init__(self, args, libc, ctl, client):
        self.args, self.libc, self.ctl, self.client = args, libc, ctl, client
        self.exports = {}       # slice id -> Export of the slice
        self.conns = {}         # slice id -> [ServingThread]
        self.pool = []          # idle ServingThreads
        self.slot = args.slot if not args.standby else None
        self.label = "spare worker" if args.standby else f"worker {args.index}"

    def _buffers(self):
        setup = (lambda: prepare_serving_thread(self.libc, self.args.realtime)) if self.args.lock else None
        return ServingThread(RemoteIoContext(self.client, self.args.buffer_size, self.args.buffer_size), setup)

    def run(self):
        args = self.args
        try:
            self.pool = [self._buffers() for _ in range(args.standby)]
        except CopyLost as e:
            raise Fatal(f"{self.label}: {e}") from None
        if args.lock:
            lock_process(self.libc, self.label)
        self.ctl.sendall(WORKER_READY)
        counters = _map_counters()

        def publish():
            if counters is not None and self.slot is not None:
                _publish_counters(counters, self.slot, list(self.exports.values()))
        control_loop(self.ctl, self._handle, self.label, tick=publish)
        # The daemon stopped, or died: serve on until the kernel ends these connections (after a
        # crash the restarted daemon stops this process once its own workers are ready).
        while True:
            busy = [t for ts in self.conns.values() for t in ts if t.busy()]
            publish()
            if not busy:
                break
            busy[0].wait(STATUS_INTERVAL_S)
        log.debug("%s: every connection closed; exiting", self.label)
        return EXIT_OK

    def _handle(self, tag, fields, fds):
        if tag == CTL_SLICE:
            sid, size, address = fields
            if sid in self.exports:
                raise Fatal(f"slice {sid} is already served")
            self.exports[sid] = Export(types.SimpleNamespace(dptr=address, size_bytes=size))
            log.debug("%s: slice %d (%s)", self.label, sid, format_size(size))
        elif tag == CTL_SERVE:
            sid, n = fields
            if sid not in self.exports or len(fds) != n:
                raise Fatal(f"slice {sid}: {'not known' if sid not in self.exports else f'{len(fds)} fds for {n} connections'}")
            conns = self.conns.setdefault(sid, [])
            for fd in fds:
                t = self.pool.pop() if self.pool else self._buffers()
                t.serve(fd, self.exports[sid], f"{self.label} slice {sid} connection {len(conns)}")
                conns.append(t)
        elif tag == CTL_DROP:
            (sid,) = fields
            for t in self.conns.get(sid, []):
                if not t.wait(30):
                    raise Fatal(f"slice {sid}: a connection still serves 30 s after the disconnect")
            self.pool += self.conns.pop(sid, [])
            self.exports.pop(sid, None)
        elif tag == CTL_POOL:
            (n,) = fields
            while len(self.pool) < n:
                self.pool.append(self._buffers())
        elif tag == CTL_ENDED:
            # Connections the kernel gave up on (a request past its timeout: it shuts its end down)
            # while the slice is still served: their threads and buffers back to the pool.
            answer = b""
            for sid, ts in self.conns.items():
                ended = [t for t in ts if not t.busy()]
                if ended:
                    self.conns[sid] = [t for t in ts if t.busy()]
                    self.pool += ended
                    answer += CTL_ENDED_ITEM.pack(sid, len(ended))
            return answer, []
        elif tag == CTL_BECOME:
            self.args.index, self.slot = fields
            self.label = f"worker {self.args.index}"
            log.info("%s: spare worker (pid %d) now serving %d connections", self.label, os.getpid(),
                     sum(len(c) for c in self.conns.values()))
        else:
            raise Fatal(f"unknown request {tag!r}")
        return b"", []


class ServeWorkers:
    """`serve`'s worker processes: CUDA-free, each registered with the parent's CopyServer.

    A worker that dies is replaced (its clients lost their connections and
    reconnect, as after any server restart); serve goes on serving.
    """

    def __init__(self, args, buffer_bytes, store, copier, count):
        self.args, self.buffer_bytes, self.store, self.copier = args, buffer_bytes, store, copier
        self.per_worker = -(-args.max_connections // count)
        self.workers = [None] * count       # (Popen, ctl) of each
        self.turn = 0

    def _spawn(self, w):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc, ctl = spawn_worker(self.args.libcuda, self.buffer_bytes, debug=self.args.debug, index=w + 1,
                                     max_connections=self.per_worker, copier=theirs,
                                     vram=(self.store.dptr, self.store.size_bytes))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.copier.add_client(mine, f"worker {w + 1}")
        self.workers[w] = (proc, ctl)
        return proc, ctl

    def start(self):
        for w in range(len(self.workers)):
            self._spawn(w)
        for proc, ctl in self.workers:
            wait_worker_ready(proc, ctl)
        log.info("%d worker processes serve the clients", len(self.workers))

    def check(self):
        """Replace any worker that died."""
        for w, (proc, ctl) in enumerate(self.workers):
            if proc.poll() is not None:
                self._replace(w)

    def _replace(self, w):
        proc, ctl = self.workers[w]
        proc.poll()
        log.error("worker %d (pid %d) exited with %s; its clients lost their connections; starting a new one",
                  w + 1, proc.pid, proc.returncode)
        ctl.close()
        new, new_ctl = self._spawn(w)
        wait_worker_ready(new, new_ctl)
        log.info("worker %d restarted (pid %d)", w + 1, new.pid)

    def handoff(self, conn):
        """Pass an accepted client to the next worker in turn (a dead one is replaced first)."""
        w = self.turn % len(self.workers)
        self.turn += 1
        for attempt in (1, 2):
            proc, ctl = self.workers[w]
            if proc.poll() is None:
                try:
                    send_fd(ctl, conn.fileno())
                    return
                except OSError:
                    proc.wait(5)
            self._replace(w)
        log.error("could not pass a client to worker %d; closing it", w + 1)

    def stop(self, timeout_s=20):
        """Stop every worker (each ends its clients); False if one did not exit in time."""
        for proc, ctl in self.workers:
            ctl.close()          # a worker ends its clients and exits when its control socket closes
        clean = True
        for proc, ctl in self.workers:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                clean = False
        return clean


def sum_counters(raw, slots=None):
    """The counters file's slots (or those in SLOTS) added up: ({field: total}, live connections, newest update in ms)."""
    totals, conns, newest = dict.fromkeys(Stats.FIELDS, 0), 0, 0
    for i, off in enumerate(range(0, len(raw) - COUNTERS.size + 1, COUNTERS.size)):
        if slots is not None and i not in slots:
            continue
        magic, updated_ms, live, *values = COUNTERS.unpack_from(raw, off)
        if magic != COUNTERS_MAGIC:
            continue
        conns += live
        newest = max(newest, updated_ms)
        for k, v in zip(Stats.FIELDS, values):
            totals[k] += v
    return totals, conns, newest


def _map_counters():
    path = os.path.join(runtime_dir(), "counters")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, COUNTERS_BYTES)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _publish_counters(counters, slot, exports):
    total, live = Stats(), 0
    for export in exports:
        total.add(export.totals())
        live += export.connections
    COUNTERS.pack_into(counters, slot * COUNTERS.size, COUNTERS_MAGIC, int(time.time() * 1000), live,
                       *(getattr(total, f) for f in Stats.FIELDS))


############################################################################
# Slice: one allocation = one nbd device = one swap area ###################
############################################################################
# A GPU's VRAM is served as slices, so that one can be given back alone when another program
# needs the memory: each its own allocation (SliceMemory), nbd device and swap priority.  A slice
# lives by a few settings (SliceSettings), fixed when the daemon starts; its GPU (GpuShare, below)
# allocates its memory and has its workers serve its connections.

FDNAME_PREFIX = "vram"      # a slice's VRAM fd in systemd's fd store is named vram-GPU_UUID-NUMBER
OLD_FDNAME = FDNAME_PREFIX  # ... and before slices, the one fd was named just "vram"


def connection_pairs(n):
    """N connections of an nbd device to be: (our end, the kernel's end) each."""
    return [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(n)]


class SliceSettings(FromConfig, collections.namedtuple("SliceSettings", "priority connections encrypt discard "
                                                                         "attach dead_conn_timeout")):
    """What a slice needs of the configuration."""
    __slots__ = ()


def slice_sizes(size, slice_size, align=SIZE_ALIGN):
    """The sizes of one GPU's slices: size cut into slice_size pieces, the last one the rest."""
    sizes, left = [], size // align * align
    while left >= align:
        sizes.append(min(slice_size, left))
        left -= sizes[-1]
    return sizes


def slice_priority(base, number):
    """Slice 0 at the configured priority, each next one a step lower, so the kernel fills them in
    order and the last stay empty longest; slice N of every GPU shares a priority (the kernel
    stripes swap over devices of equal priority)."""
    return max(base - number, min(base, 0))


class SliceMemory:
    """A slice's VRAM as the daemon sees it: the GPU process maps it (at dptr, in its own address
    space) and frees it when asked; the daemon holds the exported fd (None with cuMemAlloc), which
    systemd's fd store keeps a copy of."""

    def __init__(self, gpu, number, size_bytes, dptr, fd):
        self.gpu, self.number, self.size_bytes, self.dptr, self.fd = gpu, number, size_bytes, dptr, fd
        self.freed = False

    @property
    def kind(self):
        return "cuMemCreate+fd" if self.fd is not None else "cuMemAlloc"

    def free(self, scrub=True):
        """Zero the memory (the next CUDA program must not read swapped-out secrets), then free it."""
        if self.freed:
            return
        self.freed = True
        try:
            self.gpu.gpu_call(CTL_FREE, self.number, int(scrub))
            log.info("freed %s of VRAM (slice %d of %s)", format_size(self.size_bytes), self.number, self.gpu.label)
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class Slice:
    """One piece of VRAM swap: its own allocation, nbd device and swap priority.

    Released alone: swapoff moves only its pages; then its undo steps run in
    reverse (close the mapping, disconnect, end its connections, scrub and free).
    """

    def __init__(self, gpu, number, store, settings):
        self.gpu, self.number, self.store, self.settings = gpu, number, store, settings
        self.export = Export(store)
        self.priority = slice_priority(settings.priority, number)
        self.fdname = f"{FDNAME_PREFIX}-{gpu.info['uuid']}-{number}"
        self.index = self.device = self.swap_device = self.crypt = self.backend = self.attach_kind = None
        self.swap_on = False
        self.undo = []

    @property
    def name(self):
        return f"slice {self.number} of GPU {self.gpu.info['index']}"

    def used_kib(self, swaps):
        found = find_swap(self.swap_device, swaps=swaps) if self.swap_device else None
        return found[1][1] if found else 0

    def run_undo(self):
        def failed(what):
            if what.startswith("end the connections"):
                # Something may still serve from this VRAM: freeing it now could serve garbage.
                log.error("%s: leaving its VRAM allocated; the driver reclaims it when the daemon exits", self.name)
                self.undo[:] = [u for u in self.undo if not u[0].startswith("free")]
        run_undo(self.undo, self.name, failed)

    def describe(self, swaps=None):
        d = {"gpu": self.gpu.info["uuid"], "gpu_index": self.gpu.info["index"], "number": self.number,
             "fdname": self.fdname, "index": self.index, "device": self.device, "swap_device": self.swap_device,
             "size_bytes": self.store.size_bytes, "priority": self.priority, "encrypted": bool(self.crypt), "mapping": self.crypt,
             "backend": self.backend, "attach": self.attach_kind, "swap_on": self.swap_on,
             "connections": self.settings.connections, "allocation": self.store.kind}
        if swaps is not None:
            d["used_bytes"] = self.used_kib(swaps) * 1024
        return d

    # -- its life, in order ------------------------------------------------------------

    @classmethod
    def prepare(cls, g, number, store, settings):
        """A new slice of G on STORE, and everything of it that comes before the kernel: fd stored,
        workers serving its sockets.  Returns (slice, the kernel's ends of the socketpairs)."""
        sl = cls(g, number, store, settings)
        g.slices[number] = sl
        sl.undo.append((f"free the VRAM of {sl.name}", store.free))
        # FDPOLL=0: systemd polls a stored fd and drops it, silently (a debug line), on EPOLLERR or
        # EPOLLHUP, which is meant for sockets.  This fd is memory, not a connection: a driver's
        # poll (sysfs, seen under systemd 252) must not take the VRAM and its pages out of the store.
        if store.fd is not None and sd_notify("FDSTORE=1", "FDPOLL=0", f"FDNAME={sl.fdname}", fds=[store.fd]):
            # systemd keeps a reference: if this process dies, the memory and the pages in it
            # survive, and the restarted daemon gets the fd back (LISTEN_FDS) and reattaches.
            sl.undo.append((f"drop the stored fd of {sl.name}",
                            lambda: sd_notify("FDSTOREREMOVE=1", f"FDNAME={sl.fdname}")))
        pairs = connection_pairs(settings.connections)
        g.serve(sl, [ours for ours, _ in pairs])
        return sl, [k for _, k in pairs]

    def attach(self, socks):
        """Give the kernel SOCKS as a new nbd device (netlink, or the classic ioctls)."""
        settings, size, flags = self.settings, self.export.size, self.export.flags
        backend = self.backend = f"nbd-vram:{os.getpid()}:{self.gpu.info['uuid']}:{self.number}"
        if settings.attach in ("auto", "netlink"):
            try:
                nl = NbdNetlink()
            except NbdKernelError:
                if settings.attach == "netlink":
                    raise
                log.info("netlink nbd is missing; attaching with the classic ioctls")
            else:
                try:
                    self.index = nl.connect(socks, size, flags, dead_conn_timeout_s=settings.dead_conn_timeout,
                                          backend=backend)
                except OSError as e:
                    raise NbdKernelError(f"attach: NBD_CMD_CONNECT failed: {e.strerror} "
                                         f"({'are you root?' if e.errno == errno.EPERM else 'check dmesg'})") from None
                finally:
                    nl.close()
                self.attach_kind = "netlink"
                self.undo.append((f"disconnect /dev/nbd{self.index}", self.detach))
        if self.index is None:
            ia = IoctlAttach()
            self.index = ia.connect(socks, size, flags)
            self.attach_kind = "ioctl"
            self.undo.append((f"disconnect /dev/nbd{self.index}", ia.disconnect))
        self.device = f"/dev/nbd{self.index}"
        want = str(size // 512)
        deadline = time.monotonic() + 10
        while _read(f"/sys/block/nbd{self.index}/size") != want or not os.path.exists(self.device):
            if time.monotonic() > deadline:
                raise NbdKernelError(f"attach {self.device}: the kernel did not show the device's size in 10 s "
                                     "(check dmesg)")
            time.sleep(0.05)
        log.info("attached %s (%s, %s, %d connections): %s", self.device, format_size(size), self.attach_kind,
                 len(socks), self.name)

    def reattach(self, old, socks):
        """NBD_CMD_RECONFIGURE: new sockets for the device the dead daemon served (OLD: its state of the slice)."""
        self.index, self.device, self.backend, self.attach_kind = old["index"], old["device"], old["backend"], "netlink"
        try:
            reconfigure(self.index, socks, self.backend, timeout_s=60)
        except OSError as e:
            raise NbdKernelError(f"reattach {self.device}: NBD_CMD_RECONFIGURE failed: {e.strerror}; its swap "
                                 f"waits for dead_conn_timeout, then fails") from None
        self.undo.append((f"disconnect {self.device}", self.detach))
        log.info("reattached %s with %d new connections", self.device, len(socks))

    def detach(self):
        """Disconnect a device attached over netlink (the ioctl attach pushes its own undo step)."""
        nl = NbdNetlink()
        try:
            nl.disconnect(self.index)
        finally:
            nl.close()
        log.info("disconnected %s", self.device)

    def enable_swap(self, old=None):
        """dm-crypt (encrypt = yes) and swapon, for a slice attached to the kernel."""
        settings = self.settings
        self.swap_device = self.device
        if settings.encrypt or (old and old.get("encrypted")):
            name = crypt_name(self.index)
            if old and os.path.exists(f"/dev/mapper/{name}"):
                # The dead daemon's mapping, its key still in the kernel: the swapped pages read back through it.
                self.swap_device = f"/dev/mapper/{name}"
            else:
                self.swap_device = crypt_open(self.device, name, settings.discard)
            self.crypt = name
            # Pushed after the disconnect, so run before it: swapoff, close, disconnect, free.
            self.undo.append((f"close the dm-crypt mapping {name}", lambda: crypt_close(name)))
        if old and find_swap(self.swap_device):
            log.info("%s is still swap: nothing lost", self.swap_device)
        else:
            swap_enable(self.swap_device, self.priority, settings.discard)
        self.swap_on = True

    def release(self, why, progress):
        """swapoff (never forced; PROGRESS: the SwapoffProgress that tells it), then the slice's undo
        steps, and its GPU forgets it.  False if swapoff failed."""
        g = self.gpu
        if self.swap_on:
            used = self.used_kib(active_swaps())
            log.info("%s: releasing %s (%s): swapoff %s (%s of pages on it)", g.label, self.name, why, self.swap_device,
                     format_size(used * 1024))
            t0 = time.monotonic()
            if not swap_disable(self.swap_device, progress.begin(self)):
                log.warning("%s: swapoff %s failed (RAM cannot take its pages back now); %s stays", g.label,
                            self.swap_device, self.name)
                return False
            self.swap_on = False
            log.info("%s: swapoff %s took %.1f s for %s", g.label, self.swap_device, time.monotonic() - t0,
                     format_size(used * 1024))
        self.run_undo()
        del g.slices[self.number]
        g.last_action = f"{time.strftime('%H:%M:%S')} released slice {self.number} ({why})"
        log.info("%s: %s released (%s); %s of VRAM still swap on this GPU", g.label, self.name, why,
                 format_size(g.held_bytes()))
        return True


############################################################################
# One GPU: its GPU process, workers and slices #############################
############################################################################

SPARE_RETRY_S = 30.0         # a spare worker that failed to start is tried again this often
HEAL_RETRY_S = 30.0          # and a connection the kernel gave up on that could not be replaced


class GpuSettings(FromConfig, collections.namedtuple("GpuSettings", "size slice_size libcuda buffer_size debug "
                                                                     "realtime workers connections")):
    """What a GPU's share needs of the configuration."""
    __slots__ = ()


class WorkerProc:
    """A kernel-mode worker as the daemon sees it: its process, control socket and connections."""

    def __init__(self, proc, ctl, index, slot):
        self.proc, self.ctl, self.index, self.slot = proc, ctl, index, slot
        self.conns = {}         # slice number -> how many of its connections this worker serves
        self.pool = 0           # a spare's buffer sets

    @property
    def nconns(self):
        return sum(self.conns.values())


class GpuShare:
    """One GPU's part of the daemon: its GPU process, worker processes and slices."""

    def __init__(self, ordinal, cuda, dev, settings, slice_settings, counters, state_changed):
        """SETTINGS: GpuSettings; SLICE_SETTINGS: for its slices; COUNTERS: () -> the I/O counters'
        mmap (None before they exist); STATE_CHANGED: () -> None, after a change status must show
        (a worker replaced)."""
        self.ordinal, self.cuda, self.dev = ordinal, cuda, dev
        self.settings, self.slice_settings = settings, slice_settings
        self.counters, self.state_changed = counters, state_changed
        self.info = cuda.device_info(dev)
        self.vmm = (cuda.has_vmm and cuda.attribute(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev)
                    and cuda.attribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev))
        self.sizes = slice_sizes(settings.size, settings.slice_size)
        self.ceiling = len(self.sizes)      # most slices allowed now (shrink/grow move it)
        self.slices = {}                    # number -> Slice
        self.workers, self.spare = [], None
        self.spare_retry_at = None          # the spare failed to start: when to try again
        self.heal_retry_at = 0.0            # a connection could not be replaced: not before then
        self.gpu_proc = None                # WorkerProc of the GPU process: the one CUDA context
        self.calm_since = None
        self.free_bytes = None
        self.failed = None                  # why this GPU was given up
        self.io_errors_seen = 0
        self.fault_swapoff_at = None
        self.last_action = None
        self.undo = []

    @property
    def label(self):
        return f"GPU {self.info['index']}"

    @property
    def slots(self):
        return range(1 + self.ordinal * WORKER_SLOTS, 1 + (self.ordinal + 1) * WORKER_SLOTS)

    def held_bytes(self):
        return sum(s.store.size_bytes for s in self.slices.values())

    def mem_free(self):
        """Free VRAM on this GPU now (the last known figure if the GPU process cannot answer)."""
        try:
            answer, _ = self.gpu_call(CTL_MEMINFO)
        except Fatal as e:
            log.warning("%s", e)
            return self.free_bytes or 0
        self.free_bytes = struct.unpack("=QQ", answer)[0]
        return self.free_bytes

    def gpu_call(self, tag, *fields, fds=()):
        if self.gpu_proc is None:
            raise Fatal(f"{self.label}: its GPU process is not running")
        return ctl_call(self.gpu_proc.ctl, tag, *fields, fds=fds, who=f"{self.label}'s GPU process")

    def free_number(self):
        """The lowest slice number not in use (a slice taken back gets the place of one released)."""
        return next(n for n in range(len(self.sizes) + 1) if n not in self.slices)

    # -- VRAM -----------------------------------------------------------------------------

    def allocate(self, number, reserve=None):
        """A new slice's VRAM, or None (logged) if the GPU cannot give it (above the reserve)."""
        want = self.sizes[number]
        if reserve is not None and self.mem_free() - want < reserve:
            log.info("%s: slice %d (%s) not taken: %s free, the reserve is %s", self.label, number,
                     format_size(want), format_size(self.free_bytes), format_size(reserve))
            return None
        try:
            answer, fds = self.gpu_call(CTL_ALLOC, number, want)
        except Fatal as e:
            log.info("%s: slice %d (%s) not taken: %s (%s free)", self.label, number, format_size(want),
                     getattr(e, "why", e), format_size(self.mem_free()))
            return None
        return SliceMemory(self, number, want, _U64.unpack(answer)[0], fds[0] if fds else None)

    def import_slice(self, number, fd, size):
        """A slice stored by a daemon before this one (crash restart, upgrade): mapped again, pages and all."""
        try:
            answer, _ = self.gpu_call(CTL_IMPORT, number, size, fds=[fd])
        except BaseException:
            os.close(fd)
            raise
        return SliceMemory(self, number, size, _U64.unpack(answer)[0], fd)

    def take_slice(self, reserve):
        """Take one more slice (the RESERVE allows it): allocate, serve, attach, swapon."""
        number = self.free_number()
        store = self.allocate(number, reserve)
        if store is None:
            return False
        sl, kernel_ends = Slice.prepare(self, number, store, self.slice_settings)
        try:
            sl.attach(kernel_ends)
            sl.enable_swap()
        except Exception:
            for k in kernel_ends:
                k.close()
            sl.run_undo()
            del self.slices[number]
            raise
        for k in kernel_ends:
            k.close()
        self.last_action = f"{time.strftime('%H:%M:%S')} took slice {number} ({format_size(store.size_bytes)}) on {sl.swap_device}"
        log.info("%s: took slice %d back: %s on %s, swap priority %d", self.label, number,
                 format_size(store.size_bytes), sl.swap_device, sl.priority)
        return True

    # -- serving processes ----------------------------------------------------------------

    def start_gpu_process(self):
        """The process that holds this GPU's CUDA context; ready on return."""
        settings = self.settings
        proc, ctl = spawn_worker(settings.libcuda, settings.buffer_size, lock=True, debug=settings.debug,
                                 realtime=settings.realtime, gpu=self.info["uuid"])
        wait_worker_ready(proc, ctl)
        self.gpu_proc = WorkerProc(proc, ctl, 0, None)
        log.info("%s: GPU process: pid %d", self.label, proc.pid)

    def stop_gpu_process(self):
        gp, self.gpu_proc = self.gpu_proc, None
        if gp is None:
            return
        gp.ctl.close()          # with no worker left, it exits
        try:
            gp.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise Fatal(f"the GPU process {gp.proc.pid} did not exit after its workers") from None

    def start_workers(self):
        """The worker processes that will serve every slice of this GPU; ready on return."""
        settings = self.settings
        n = min(settings.workers or default_workers(settings.connections), settings.connections)
        self.workers = [self._spawn(w + 1) for w in range(n)]
        self.undo.append((f"stop the workers of {self.label}", self._join_workers))
        log.info("%s: %d worker process%s: pids %s", self.label, n, "" if n == 1 else "es",
                 " ".join(str(w.proc.pid) for w in self.workers))

    def _spawn(self, index, standby=0):
        settings = self.settings
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.gpu_call(CTL_CLIENT, index, fds=[mine.fileno()])
            proc, ctl = spawn_worker(settings.libcuda, settings.buffer_size, lock=True, debug=settings.debug, index=index,
                                     standby=standby, realtime=settings.realtime, gpu=self.info["uuid"],
                                     slot=self.slots[index], copier=theirs)
        finally:
            mine.close()
            theirs.close()
        wait_worker_ready(proc, ctl)
        return WorkerProc(proc, ctl, index, self.slots[index])

    def spawn_spare(self):
        """A worker with every slice mapped and buffers for the busiest worker's connections, ready
        before any worker dies: taking over then needs no new process and no memory."""
        if not self.workers:
            return
        n = max([w.nconns for w in self.workers] + [self.settings.connections])
        spare = None
        try:
            spare = self._spawn(0, standby=n)
            self._map_all(spare.ctl, "spare worker")
        except Fatal as e:
            log.warning("%s: no spare worker (%s): a dead worker would be replaced by a new process; "
                        "trying again in %.0f s", self.label, e, SPARE_RETRY_S)
            if spare is not None:
                spare.ctl.close()
                spare.proc.kill()
                spare.proc.wait()
            self.spare_retry_at = time.monotonic() + SPARE_RETRY_S
            return
        self.spare_retry_at = None
        spare.pool = n
        self.spare = spare
        log.info("%s: spare worker ready: pid %d", self.label, spare.proc.pid)

    def stop_spare(self):
        if self.spare:
            spare, self.spare = self.spare, None
            spare.ctl.close()           # it exits on EOF: it serves nothing
            try:
                spare.proc.wait(60)
            except subprocess.TimeoutExpired:
                spare.proc.kill()
                spare.proc.wait()

    def _join_workers(self):
        self.stop_spare()
        for w in self.workers:
            w.ctl.close()               # with no connection left, it exits
        for w in self.workers:
            try:
                w.proc.wait(60)
            except subprocess.TimeoutExpired:
                raise Fatal(f"worker {w.proc.pid} did not exit after the devices were disconnected") from None
        self.workers = []

    def serve(self, sl, socks):
        """Have the workers serve SL's connections SOCKS."""
        for w in self.workers + ([self.spare] if self.spare else []):
            self._map(w.ctl, sl, f"worker pid {w.proc.pid}")
        for k, w in enumerate(self.workers):
            mine = socks[k::len(self.workers)]
            if mine:
                ctl_call(w.ctl, CTL_SERVE, sl.number, len(mine), fds=[s.fileno() for s in mine],
                         who=f"worker {w.index}")
                w.conns[sl.number] = len(mine)
        for s in socks:
            s.close()           # the workers have them now
        busiest = max(w.nconns for w in self.workers)
        if self.spare and busiest > self.spare.pool:
            try:
                ctl_call(self.spare.ctl, CTL_POOL, busiest, who="spare worker")
                self.spare.pool = busiest
            except Fatal as e:
                log.warning("%s: %s", self.label, e)
        sl.undo.append((f"end the connections of {sl.name}", lambda: self._drop(sl)))

    def _drop(self, sl):
        """After the disconnect: every worker forgets the slice (its connections have ended)."""
        for w in self.workers + ([self.spare] if self.spare else []):
            if w.proc.poll() is None:
                ctl_call(w.ctl, CTL_DROP, sl.number, who=f"worker pid {w.proc.pid}")
            w.conns.pop(sl.number, None)

    @staticmethod
    def _map(ctl, sl, who):
        ctl_call(ctl, CTL_SLICE, sl.number, sl.store.size_bytes, sl.store.dptr, who=who)

    def _map_all(self, ctl, who):
        """Every slice of this GPU made known to a new worker (or spare)."""
        for sl in self.slices.values():
            self._map(ctl, sl, who)

    @staticmethod
    def _give(ctl, pairs, who):
        """{slice number: [(ours, kernel's)]}: our ends to a worker, to serve."""
        for sid, ps in pairs.items():
            ctl_call(ctl, CTL_SERVE, sid, len(ps), fds=[ours.fileno() for ours, _ in ps], who=who)

    def respawn(self, k):
        """Worker k died: new sockets for its connections (NBD_CMD_RECONFIGURE), served by the spare or a new process."""
        dead = self.workers[k]
        log.error("%s: worker %d (pid %d) exited with %s; its %d connection%s to the kernel died: starting a new one",
                  self.label, dead.index, dead.proc.pid, dead.proc.returncode, dead.nconns, "" if dead.nconns == 1 else "s")
        dead.ctl.close()
        pairs = {sid: connection_pairs(n) for sid, n in dead.conns.items() if sid in self.slices}
        spare, self.spare = self.spare, None
        new = None
        if spare and spare.proc.poll() is None:
            # The spare takes over: no new process (and no memory) needed while swap is stalled.
            try:
                self._give(spare.ctl, pairs, "spare worker")
                ctl_call(spare.ctl, CTL_BECOME, dead.index, dead.slot, who="spare worker")
                new = WorkerProc(spare.proc, spare.ctl, dead.index, dead.slot)
            except Fatal as e:
                log.error("%s: %s; starting a new worker instead", self.label, e)
                spare.ctl.close()
                spare.proc.kill()
                spare.proc.wait()
                for ps in pairs.values():       # the spare may hold some of them: new pairs for a new worker
                    for ours, kernel in ps:
                        ours.close()
                        kernel.close()
                pairs = {sid: connection_pairs(len(ps)) for sid, ps in pairs.items()}
        if new is None:
            new = self._spawn(dead.index)
            self._map_all(new.ctl, f"worker {dead.index}")
            self._give(new.ctl, pairs, f"worker {dead.index}")
        new.conns = {sid: len(ps) for sid, ps in pairs.items()}
        self.workers[k] = new
        for ps in pairs.values():
            for ours, _ in ps:
                ours.close()
        for sid, ps in pairs.items():
            sl = self.slices[sid]
            try:
                reconfigure(sl.index, [kernel for _, kernel in ps], sl.backend, timeout_s=30)
                log.info("%s: worker %d restarted (pid %d); %s has its connections back", self.label, new.index,
                         new.proc.pid, sl.device)
            except OSError as e:
                log.error("NBD_CMD_RECONFIGURE of %s failed: %s; worker %d's connections stay dead (the kernel "
                          "sends their I/O over the others); restart the service when swap is idle",
                          sl.device, e.strerror, new.index)
            for _, kernel in ps:
                kernel.close()
        self.spawn_spare()      # swap works again: a new process can get its memory
        self.state_changed()    # the worker pids a restart after a crash must stop

    def heal(self, w, counters):
        """Connections the kernel gave up on (a request past its timeout marks one dead; the device
        serves on over the others): new sockets for them (NBD_CMD_RECONFIGURE), so that a stall
        under pressure does not leave the device degraded for good.  Cheap when nothing ended: the
        worker is asked only when its live count in the counters is short."""
        if counters is None or w.slot is None or time.monotonic() < self.heal_retry_at:
            return
        if sum_counters(counters, {w.slot})[1] >= w.nconns:
            return
        try:
            answer, _ = ctl_call(w.ctl, CTL_ENDED, who=f"worker {w.index}")
        except Fatal as e:
            log.warning("%s: %s", self.label, e)
            return
        for off in range(0, len(answer), CTL_ENDED_ITEM.size):
            sid, n = CTL_ENDED_ITEM.unpack_from(answer, off)
            sl = self.slices.get(sid)
            if sl is None:
                continue
            w.conns[sid] = w.conns.get(sid, n) - n
            if sl.attach_kind != "netlink":
                log.error("%s: %d connection%s of %s ended (a request past the kernel's timeout?); with the "
                          "ioctl attach it cannot get new ones: restart the service when swap is idle",
                          self.label, n, "" if n == 1 else "s", sl.device)
                continue
            pairs = connection_pairs(n)
            try:
                self._give(w.ctl, {sid: pairs}, f"worker {w.index}")
                w.conns[sid] += n
                reconfigure(sl.index, [kernel for _, kernel in pairs], sl.backend, timeout_s=10)
                log.warning("%s: the kernel gave up on %d connection%s of %s (a request past its timeout): "
                            "gave it %s new", self.label, n, "" if n == 1 else "s", sl.device,
                            "a" if n == 1 else n)
            except (Fatal, OSError) as e:
                log.error("%s: %d connection%s of %s ended and could not be replaced (%s); trying again in "
                          "%.0f s", self.label, n, "" if n == 1 else "s", sl.device,
                          getattr(e, "strerror", None) or e, HEAL_RETRY_S)
                self.heal_retry_at = time.monotonic() + HEAL_RETRY_S
            finally:
                for ours, kernel in pairs:
                    ours.close()
                    kernel.close()

    def check_workers(self):
        if self.gpu_proc is not None and self.gpu_proc.proc.poll() is not None:
            self.restart_gpu_process()
        for k, w in enumerate(self.workers):
            if w.proc.poll() is not None:
                self.respawn(k)
            else:
                self.heal(w, self.counters())
        if self.spare and self.spare.proc.poll() is not None:
            log.warning("%s: the spare worker (pid %d) exited with %s: starting another", self.label,
                        self.spare.proc.pid, self.spare.proc.returncode)
            self.spare.ctl.close()
            self.spare = None
            self.spawn_spare()
            self.state_changed()
        elif self.spare is None and self.spare_retry_at is not None and time.monotonic() >= self.spare_retry_at:
            self.spawn_spare()
            if self.spare:
                self.state_changed()

    def restart_gpu_process(self):
        """The GPU process died: every worker's copies died with it.  A new one maps every slice again
        from the daemon's fds (the pages are still there), then every worker is replaced and the
        kernel gets new sockets for every connection (NBD_CMD_RECONFIGURE)."""
        dead = self.gpu_proc
        log.error("%s: the GPU process (pid %d) exited with %s; every connection of this GPU stalls until "
                  "it is replaced: starting a new one", self.label, dead.proc.pid, dead.proc.returncode)
        dead.ctl.close()
        self.gpu_proc = None
        if not self.vmm:
            raise Fatal(f"{self.label}: the GPU process died, and with cuMemAlloc (no exportable VRAM) the "
                        "swapped pages died with it")
        self.start_gpu_process()
        for sl in self.slices.values():
            fd = os.dup(sl.store.fd)
            answer, _ = self.gpu_call(CTL_IMPORT, sl.number, sl.store.size_bytes, fds=[fd])
            os.close(fd)
            sl.store.dptr = _U64.unpack(answer)[0]
        if self.spare:
            self.spare.proc.kill()
            self.stop_spare()
        for w in self.workers:
            w.proc.kill()       # its copies went to the dead process: none of its connections can be served
            w.proc.wait()
        for k in range(len(self.workers)):
            self.respawn(k)

    def stop(self):
        """After its slices are gone: the workers' undo steps."""
        run_undo(self.undo, "stopping")

    def worker_pids(self):
        return ([w.proc.pid for w in self.workers] + ([self.spare.proc.pid] if self.spare else [])
                + ([self.gpu_proc.proc.pid] if self.gpu_proc else []))

    def describe(self):
        return dict(self.info, ordinal=self.ordinal, free_bytes=self.free_bytes, ceiling=self.ceiling,
                    max_slices=len(self.sizes), held_bytes=self.held_bytes(), failed=self.failed,
                    last_action=self.last_action, worker_pids=self.worker_pids())


############################################################################
# Takeover (crash restart, upgrade) ########################################
############################################################################
# A daemon that starts where another one left off: after a crash (systemd hands back the VRAM fds
# it stored, and the old workers still serve the devices) or an upgrade in place (the same process,
# re-executed).  Which slices can be taken over, what was left behind and must be refused or cleaned
# up, and the old processes to stop once the new ones are ready.

LET_GO_SLICE = 1 << 30      # slice ids the GPU process maps a let-go stored fd under, to zero it


def _reap(pid):
    """True if PID was an exited child of this process (now reaped)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


def check_stale():
    """Refuse to start over a device an earlier daemon left behind, and never reuse live swap."""
    old = read_state()
    # (A daemon of this version holds the lock that run took; this finds an older one.)
    if daemon_pid(old) not in (None, os.getpid()):
        raise Fatal(f"another nbd-vram daemon (pid {old['pid']}) is serving {old.get('device')}; "
                    "stop it first (systemctl stop vram-swap-nbd)")
    swaps = active_swaps()
    mappings = crypt_mappings()
    for index in nbd_devices():
        backend = _read(f"/sys/block/nbd{index}/backend", "") or ""
        ours = backend.startswith("nbd-vram:") and nbd_connected(index)
        if not ours and index not in mappings:
            continue
        dev = f"/dev/nbd{index}"
        owner = int(backend.split(":")[1]) if ours and backend.split(":")[1].isdigit() else 0
        if owner and owner != os.getpid() and _runs_daemon(owner):
            raise Fatal(f"{dev} is served by another nbd-vram daemon (pid {owner}); stop it first")
        if index in mappings:
            close_stale_mapping(dev, owner, *mappings[index], swaps)
        if not ours:
            continue
        if find_swap(dev, swaps=swaps):
            raise Fatal(f"{dev} is still active swap from an nbd-vram daemon (pid {owner}) that died; "
                        f"refusing to start over it: run `swapoff {dev}` (it fails if the pages are lost), "
                        f"then `nbd_vram.py detach {dev}`")
        log.warning("%s was left connected by an nbd-vram daemon (pid %d) that died, and is not swap: "
                    "disconnecting it", dev, owner)
        nl = NbdNetlink()
        try:
            nl.disconnect(index)
        finally:
            nl.close()


def close_stale_mapping(dev, owner, name, dm, swaps):
    """A dm-crypt mapping that a dead daemon left over DEV: refuse if it is swap, else close it."""
    mapper = f"/dev/mapper/{name}"
    by = f"an nbd-vram daemon (pid {owner}) that died" if owner else "an nbd-vram daemon that is gone"
    if find_swap(mapper, f"/dev/{dm}", swaps=swaps):
        raise Fatal(f"{mapper} (dm-crypt over {dev}) is still active swap from {by}; refusing to start over it: "
                    f"run `swapoff {mapper}` (it fails if the pages are lost), `cryptsetup close {name}`, "
                    f"then `nbd_vram.py detach {dev}`")
    if not shutil.which("cryptsetup"):
        raise Fatal(f"{mapper} (dm-crypt over {dev}) was left by {by}, and cryptsetup is not installed "
                    f"to close it: run `dmsetup remove {name}`")
    log.warning("%s (dm-crypt over %s) was left by %s, and is not swap: closing it", mapper, dev, by)
    crypt_close(name)


def adoptable(stored_fds, slice_size):
    """After a crash (or an upgrade in place): (the old state, its slices that can be taken over,
    the stored VRAM let go that is to be zeroed first: see let_go).

    A slice can if systemd gave us back its VRAM fd (in STORED_FDS, {fd name: fd}) and its device
    still waits for it (dead_conn_timeout); a stored fd that cannot be used is let go (and taken
    out of stored_fds)."""
    to_scrub = []
    if not stored_fds:
        return None, [], to_scrub
    old = read_state() or {}
    slices = old.get("slices")
    if slices is None and old.get("device"):
        # The state of a version before slices: one device, its fd stored as "vram".
        slices = [{"gpu": (old.get("gpu") or {}).get("uuid"), "number": 0, "fdname": OLD_FDNAME,
                   "index": old.get("index"), "device": old.get("device"), "swap_device": old.get("swap_device"),
                   "size_bytes": old.get("size_bytes"), "encrypted": old.get("encrypted")}]
    why_all, in_use = None, False
    if old.get("mode") != "serving" or old.get("attach") != "netlink":
        why_all = "no state of a daemon that served over netlink"
    elif daemon_pid(old) not in (None, os.getpid()):
        why_all, in_use = f"its daemon (pid {old['pid']}) still runs", True
    kept = []
    for s in slices or []:
        if s.get("fdname") not in stored_fds:
            continue
        index, why = s.get("index"), why_all
        backend = _read(f"/sys/block/nbd{index}/backend", "") if index is not None else ""
        if not why and (not nbd_connected(index) or not (backend or "").startswith("nbd-vram:")):
            why = f"{s.get('device')} is no longer attached (dead_conn_timeout ran out?)"
        if why:
            log.warning("systemd handed back the stored VRAM fd of %s, but %s: releasing it", s.get("device"), why)
            # Zeroed first, unless a daemon still serves it (an older one: it holds no lock).
            let_go(stored_fds, to_scrub, s["fdname"], s.get("gpu"), s.get("size_bytes"), scrub=not in_use)
            continue
        s["backend"] = backend
        kept.append(s)
    kept_names = {s["fdname"] for s in kept}
    for name in [n for n in stored_fds if n not in kept_names]:
        log.warning("systemd handed back a stored fd %r that no slice of the last daemon names: releasing it", name)
        uuid = re.fullmatch(r"vram-(GPU-[0-9a-fA-F-]+)-\d+", name)
        let_go(stored_fds, to_scrub, name, uuid.group(1) if uuid else (old.get("gpu") or {}).get("uuid"),
                     old.get("size_bytes") if name == OLD_FDNAME else slice_size, scrub=not in_use)
    if kept:
        devices = ", ".join(s["device"] for s in kept)
        if old.get("pid") == os.getpid():
            log.info("upgrade in place: taking %s over: same VRAM, new workers and connections", devices)
        else:
            log.warning("the daemon before this one (pid %s) died with %s as swap; taking over: same VRAM, "
                        "new connections", old.get("pid"), devices)
    return old, kept, to_scrub


def let_go(stored_fds, to_scrub, name, uuid=None, size_bytes=None, scrub=True):
    """A stored VRAM fd that is not taken over: put on TO_SCRUB ((fd name, fd, GPU UUID, bytes), zeroed
    by scrub_let_go once CUDA is up), else released now."""
    fd = stored_fds.pop(name, None)
    if fd is not None and scrub and size_bytes:
        to_scrub.append((name, fd, uuid, size_bytes))
        return
    if fd is not None:
        os.close(fd)
    sd_notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def scrub_let_go(cuda, gpus, to_scrub):
    """The swapped pages of the daemon before are in the VRAM let go: zero it before the driver
    hands it to the next program, then unmap, release and close it, and drop systemd's copy.
    The GPU's process does it; for a GPU no longer configured, a context of this process does,
    for as long as it takes."""
    for k, (name, fd, uuid, size) in enumerate(to_scrub):
        g = next((g for g in gpus if g.info["uuid"] == uuid), None)
        dev = store = None
        try:
            if g is not None:
                sid = LET_GO_SLICE + k
                g.gpu_call(CTL_IMPORT, sid, size, fds=[fd])
                g.gpu_call(CTL_FREE, sid, 1)
            else:
                dev, ctx = VramStore.open_device(cuda, uuid or "0")
                store = VramStore.import_fd(cuda, dev, ctx, fd, size)
                fd = None               # the store's now
                cuda.check("cuMemsetD8_v2", cuda.cuMemsetD8_v2(store.dptr, 0, size))
                cuda.check("cuCtxSynchronize", cuda.cuCtxSynchronize())
            log.info("zeroed and released %s of VRAM from the stored fd %r", format_size(size), name)
        except Fatal as e:
            log.warning("could not zero the stored VRAM %r before releasing it (%s): it goes back to the "
                        "driver as it is", name, getattr(e, "why", e))
        finally:
            if store is not None:
                store.free(scrub=False)      # unmap, release, close the fd
            if fd is not None:
                os.close(fd)
            if dev is not None:
                cuda.cuDevicePrimaryCtxRelease_v2(dev)
        sd_notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def stop_orphans(old):
    """The dead daemon's workers may still serve its sockets: end them, so the kernel marks those dead."""
    for pid in old.get("worker_pids", []):
        if _reap(pid):
            continue        # our child (an upgrade re-executes the same process) that already exited
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        starts = old.get("worker_starts") or {}
        if (b"worker" not in argv or not any(a.endswith(b"nbd_vram.py") for a in argv)
                or (str(pid) in starts and starts[str(pid)] != process_start(pid))):
            log.debug("pid %d is no longer a worker of ours (%r): left alone", pid, argv[:3])
            continue
        try:
            os.kill(pid, signal.SIGKILL)     # workers ignore SIGTERM: a stray one must not end live swap
        except ProcessLookupError:
            continue
        for _ in range(100):
            if _reap(pid) or not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)
        log.info("stopped worker pid %d of the daemon that died", pid)


############################################################################
# Daemon ###################################################################
############################################################################

SWAPOFF_RETRY_S = 10.0
# Blocked in every thread from the start of `run` (and kept over its re-execs), taken by the main
# thread with sigtimedwait.  SIGUSR1 (udev, `nbd_vram.py sleep`): read the power state now.
# SIGUSR2 (`nbd_vram.py upgrade`): re-execute the file on disk, which takes the VRAM and the device over.
DAEMON_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
RELEASED = "released"       # Daemon.loop: the power policy had swap turned off
HANDOVER = "handover"       # Daemon.loop: SIGUSR2
GPU_FAILED = "gpu-failed"   # Daemon.loop: GPU I/O errors, swap moved off the GPU


def reexec(argv, environ=None):
    """Replace this process with a fresh `nbd_vram.py ARGV` (same pid, so systemd keeps tracking it)."""
    flush_log()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(sys.argv[0])] + list(argv), environ or os.environ)


def reload_config(path, flags, running, power):
    """SIGHUP: read the configuration again.  The power settings take effect now (the power policy
    gets them); the rest only at the next restart: RUNNING, the settings the daemon started with,
    stays as it is."""
    try:
        new, _ = load_config(path, flags)
    except ConfigError as e:
        log.error("SIGHUP: configuration not reloaded, the old one stays: %s", e)
        return
    old = power.settings
    for key in POWER_KEYS:
        if new[key] != old[key]:
            log.info("SIGHUP: %s = %s (was %s)", key, format_setting(key, new[key]), format_setting(key, old[key]))
    power.settings = {key: new[key] for key in POWER_KEYS}
    other = [k for k in OPTION_BY_KEY if k not in POWER_KEYS and new[k] != running[k]]
    if other:
        log.info("SIGHUP: %s changed; takes effect at the next restart (systemctl restart vram-swap-nbd)",
                 ", ".join(other))


def wait_for_power(power, reload, no_vram=None):
    """Idle until the power policy wants VRAM swap: no CUDA, no device, no GPU handle.

    no_vram: why taking VRAM back failed just now; the next try is at the next power poll.
    Returns False when told to stop meanwhile."""
    if power.evaluate(*power_inputs()) and not no_vram:
        return True
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    make_runtime_dir()
    if not no_vram:
        log.info("idle, holding no VRAM: %s", power.why)
    while True:
        why = f"out of VRAM ({no_vram}); trying again every {power.poll_s:g} s" if no_vram else power.why
        publish_state({**identity(), "version": __version__, "mode": "idle", "ready": True,
                       "started": started, "power": power.state(), "idle_why": why},
                      f"idle, holding no VRAM: {why}")
        sd_notify("READY=1")
        info = signal.sigtimedwait(DAEMON_SIGNALS, power.poll_s)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            log.info("%s received while idle: stopping", signal.Signals(info.si_signo).name)
            remove_state()
            return False
        if info is not None and info.si_signo == signal.SIGHUP:
            reload()
        if power.evaluate(*power_inputs()):
            (log.debug if no_vram else log.info)("power: taking VRAM swap back (%s)", power.why)
            if not no_vram:     # (a retry keeps saying why it is idle until it serves)
                remove_state()  # the daemon writes its own once it serves; a failed start leaves none
            return True
        no_vram = None          # not wanted now anyway: idle for the power policy's reason


PROGRESS_NOTIFY_S = 2.0     # a swapoff in progress: STATUS= and the state (status) this often
PROGRESS_LOG_S = 10.0       # ... and a log line this often
PROGRESS_RATE_S = 10.0      # ... its rate over the last this many seconds


def approx_size(n):
    """A size as a progress line shows it: 1.2 GiB, 150 MiB, 12 KiB."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


class SwapoffProgress:
    """A phase of the daemon that swaps slices off (a stop, a release for power or sleep, a shrink,
    the reserve, a failing GPU), told while it runs: which swapoff, which of how many, how much is
    left to read back into RAM and how fast.  One line says it all: STATUS= and state.json
    (`status`, and `shrink` and `sleep` waiting) every PROGRESS_NOTIFY_S, the log every PROGRESS_LOG_S.

    PHASE: what the daemon does ("stopping", "shrinking", ...); SLICES: those it means to swap off
    (a slice begun that is not among them is added); PUBLISH: the daemon's write_state."""

    def __init__(self, phase, slices, publish):
        self.phase, self.slices, self.publish = phase, list(slices), publish
        self.current, self.number = None, 0
        self.left = self.rate = self.note = None
        self.samples = collections.deque()     # (monotonic time, bytes left)
        self.published = self.logged = 0.0
        self.since = time.time()

    def begin(self, sl):
        """The swapoff of SL starts (or starts again after a failure): told at once.  Returns the
        callback for swap_disable."""
        if sl not in self.slices:
            self.slices.append(sl)
        if sl is not self.current:
            self.current, self.number = sl, self.number + 1
        self.note = None
        self.tick(active_swaps(), log_now=True)
        return self.tick

    def end(self, note):
        """Every swapoff of the phase is done; NOTE: what comes next."""
        self.current, self.note, self.left, self.rate = None, note, 0, None
        self.publish()

    def failed(self, note):
        """The swapoff failed and will be tried again: said until the next begin."""
        self.note = note
        self.published = 0.0
        self.tick(active_swaps())

    def tick(self, swaps, log_now=False):
        """/proc/swaps now (SWAPS: active_swaps()): what is left, the rate, and tell it when due."""
        now = time.monotonic()
        self.left = sum(sl.used_kib(swaps) for sl in self.slices if sl.swap_on) * 1024
        self.samples.append((now, self.left))
        while now - self.samples[0][0] > PROGRESS_RATE_S:
            self.samples.popleft()
        (t0, left0), (t1, left1) = self.samples[0], self.samples[-1]
        self.rate = (left0 - left1) / (t1 - t0) if t1 - t0 >= 1 and left0 > left1 else None
        if log_now or now - self.logged >= PROGRESS_LOG_S:
            self.logged = now
            log.info("%s", self.line())
        if log_now or now - self.published >= PROGRESS_NOTIFY_S:
            self.published = now
            self.publish()

    def line(self):
        if self.current is None:
            return f"{self.phase}: {self.note}"
        n = max(len(self.slices), self.number)
        dev = self.current.swap_device
        parts = [f"swapoff {dev}" + (f" (slice {self.number} of {n})" if n > 1 else "")]
        if self.left is not None:
            parts.append(f"{approx_size(self.left)} left")
        if self.rate:
            parts.append(f"{approx_size(self.rate)}/s")
        return f"{self.phase}: {', '.join(parts)}" + (f"; {self.note}" if self.note else "")

    def describe(self):
        return {"phase": self.phase, "device": self.current.swap_device if self.current else None,
                "slice": self.number, "slices": max(len(self.slices), self.number), "left_bytes": self.left,
                "rate_bytes_s": round(self.rate) if self.rate else None, "since": self.since, "note": self.note,
                "line": self.line()}


def elastic_decision(reserve, free, held, ceiling, next_bytes, calm_since, now, reclaim_after):
    """What one GPU's slices should do now: (action, calm_since).

    action: "release" (one slice: a manual shrink lowered the ceiling, or another program left
    less than the reserve free), "grow" (one slice: there is room for it above the reserve, and
    there has been for reclaim_after seconds), or None.  reserve None: only the ceiling counts.
    calm_since: since when there has been room for one more slice (None: there is none now);
    the caller keeps it for the next call.
    """
    if held > ceiling:
        return "release", None
    if reserve is not None and free < reserve and held > 0:
        return "release", None
    if held < ceiling and free - next_bytes >= (reserve or 0):
        calm_since = now if calm_since is None else calm_since
        if now - calm_since >= reclaim_after:
            return "grow", None
        return None, calm_since
    return None, None


def move_ceilings(live, op, units):
    """A shrink or grow of UNITS slices: one at a time, off the GPU that holds the most (shrink) or
    onto the one that holds the fewest (grow), lowest ordinal first among equals.  Returns the set
    of GPUs whose ceiling moved."""
    moved = set()
    for _ in range(units):
        if op == "shrink":
            cands = [g for g in live if min(g.ceiling, len(g.slices)) > 0]
            if not cands:
                break
            g = max(cands, key=lambda g: (min(g.ceiling, len(g.slices)), -g.ordinal))
            g.ceiling = min(g.ceiling, len(g.slices)) - 1
            moved.add(g)
        elif op == "grow":
            cands = [g for g in live if max(g.ceiling, len(g.slices)) < len(g.sizes)]
            if not cands:
                break
            g = min(cands, key=lambda g: (max(g.ceiling, len(g.slices)), g.ordinal))
            g.ceiling = max(g.ceiling, len(g.slices)) + 1
            moved.add(g)
    return moved


def gpu_specs(text, count):
    """The gpus setting as a list of --gpu specs: 'all' is every index."""
    text = str(text).strip()
    if text.lower() == "all":
        if count == 0:
            raise NoGpuError("no NVIDIA GPU found: check `nvidia-smi`")
        return [str(i) for i in range(count)]
    return [s.strip() for s in text.split(",") if s.strip()]


class Daemon:
    """`run`: VRAM -> kernel nbd -> swap, and back again on SIGTERM.

    The VRAM of each GPU is served as slices, each its own allocation and nbd
    device with its own swap priority, so that a slice can be given back alone
    when another program needs the memory.  Startup in a fixed order, each step
    logged once; every step that must be undone pushes its undo (a slice's on
    its own list), and stop() runs them in reverse.  Signals are blocked in
    every thread and taken by the main thread with sigtimedwait, so no handler
    ever runs in the middle of serving.
    """

    def __init__(self, settings, power=None, reload=None, stored_fds=None):
        self.cfg = settings
        self.slice_settings = SliceSettings.from_config(settings)
        self.stored_fds = dict(stored_fds or {})     # from systemd's fd store: a restart after a crash
        self.power = power or PowerPolicy(settings)
        self.reload = reload or (lambda: None)      # SIGHUP: re-read the power settings
        self.release_failed = None                  # (time, why) of the last swapoff the power policy asked for
        self.started = None
        self.ready = False      # in state.json: swap is on (what READY=1 tells systemd; init scripts wait for it)
        self.adopted_at = None          # when this daemon took a dead (or re-executed) one's devices over
        self.libc = _libc()
        self.undo = []
        self.gpus = []
        self.counters = None
        self.sysctl_saved = {}
        self.nvml = None
        self.next_elastic = 0.0
        self.elastic_retry_at = 0.0
        self.request = None             # the last shrink/grow request and its result
        self.progress = None            # the SwapoffProgress of a phase that swaps slices off, while it runs

    @property
    def slices(self):
        return [sl for g in self.gpus for sl in sorted(g.slices.values(), key=lambda s: s.number)]

    @property
    def swap_on(self):
        return any(sl.swap_on for sl in self.slices)

    # -- start: in call order -----------------------------------------------------------

    def start(self):
        cfg = self.cfg
        threading.stack_size(THREAD_STACK)
        signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
        log.info("nbd-vram %s starting: size %s a GPU (min %s) in slices of %s, gpus %s, priority %d, "
                 "%d connections a slice, reserve %s", __version__, format_size(cfg["size"]), format_size(cfg["min_size"]),
                 format_size(cfg["slice_size"]), cfg["gpus"], cfg["priority"], cfg["connections"],
                 format_size(cfg["reserve"]) if cfg["reserve"] is not None else "off")
        make_runtime_dir()
        load_nbd_module()
        old, adopt, to_scrub = adoptable(self.stored_fds, cfg["slice_size"])
        if not adopt:
            check_stale()

        cuda = Cuda(cfg["libcuda"])
        cuda.init()
        self.nvml = Nvml.open()
        self._open_gpus(cuda, [s["gpu"] for s in adopt])
        for g in self.gpus:
            g.start_gpu_process()
            # Stopped after the workers (it copies for them until they are gone).
            g.undo.append((f"stop the GPU process of {g.label}", g.stop_gpu_process))
        scrub_let_go(cuda, self.gpus, to_scrub)
        self._open_counters()
        # Locked like a worker even when workers serve: this process must be able to replace a dead
        # worker while memory is full and the swap on that worker's connections is stalled.
        prepare_memory(self.libc)

        prepared = []      # (slice, the kernel's ends of its sockets, the old state to take over or None)
        for g in self.gpus:
            g.start_workers()
            mine = [s for s in adopt if s["gpu"] == g.info["uuid"]]
            for s in mine:
                store = g.import_slice(s["number"], self.stored_fds.pop(s["fdname"]), s["size_bytes"])
                log.info("%s: took back slice %d (%s of VRAM) from systemd's fd store, with the swapped pages in it",
                         g.label, s["number"], format_size(store.size_bytes))
                prepared.append((Slice.prepare(g, s["number"], store, self.slice_settings), s))
                if s["fdname"] == OLD_FDNAME:
                    # Stored again under the slice's name just now: drop systemd's copy under the old one.
                    sd_notify("FDSTOREREMOVE=1", f"FDNAME={OLD_FDNAME}")
            if old and "ceilings" in old:
                g.ceiling = min(old["ceilings"].get(g.info["uuid"], g.ceiling), len(g.sizes))
            if not adopt:
                for number in range(g.ceiling):
                    store = g.allocate(number, cfg["reserve"])
                    if store is None:
                        break
                    prepared.append((Slice.prepare(g, number, store, self.slice_settings), None))
            g.spawn_spare()
        total = sum(sl.store.size_bytes for (sl, _), _ in prepared)
        if not adopt and total < cfg["min_size"]:
            free = sum(g.mem_free() for g in self.gpus)
            raise NoVramError(f"could not allocate even {format_size(cfg['min_size'])} of VRAM (got {format_size(total)}); "
                              f"{format_size(free)} is free: close GPU programs (see `nvidia-smi`) "
                              "or lower the size / min_size" + (" / reserve" if cfg["reserve"] else ""))
        for g in [g for g in self.gpus if not g.slices]:
            log.warning("%s: no slice could be allocated: serving from the other GPUs", g.label)

        set_oom_score_adj(-1000)
        if lock_memory(self.libc):
            log.info("memory locked: %d KiB", locked_kib())
        set_io_flusher(self.libc)
        gc.collect()
        gc.freeze()
        gc.disable()   # no collector pauses or heap growth while serving; nothing here makes cycles

        if adopt:
            # Only now, with the new workers ready and locked: until here the old ones serve the swap
            # (starting processes needs memory that only that swap may be able to free).
            stop_orphans(old)
            self.sysctl_saved = dict(old.get("sysctl_saved") or {})    # what to restore is what was there first
            self.adopted_at = time.time()
        for (sl, kernel_ends), s in prepared:
            if s:
                sl.reattach(s, kernel_ends)
            else:
                sl.attach(kernel_ends)
            for k in kernel_ends:
                k.close()      # the kernel holds its own references now
        self.write_state()
        for key in ("swappiness", "min_free_kbytes", "page_cluster"):
            if cfg[key] is not None:
                old_value = sysctl_set(key, cfg[key])
                self.sysctl_saved.setdefault(key, old_value)
        if self.sysctl_saved:
            self.undo.append(("restore sysctls", self._restore_sysctls))
        for (sl, _), s in prepared:
            sl.enable_swap(s)
        self._memory_clock_cap()
        for g in self.gpus:
            g.mem_free()        # for status: what is free now that every slice is taken
        self.ready = True
        self.write_state()
        status = self._status_line()
        sd_notify("READY=1", f"STATUS={status}")
        log.info("ready: %s", status)

    def _open_gpus(self, cuda, adopted_uuids):
        specs = gpu_specs(self.cfg["gpus"], cuda.device_count())
        devs = []
        for spec in specs + [u for u in adopted_uuids if u not in specs]:
            dev = cuda.select_device(spec)
            if dev not in devs:
                devs.append(dev)
        for dev in devs:
            g = GpuShare(len(self.gpus), cuda, dev, GpuSettings.from_config(self.cfg), self.slice_settings,
                         counters=lambda: self.counters, state_changed=self.write_state)
            self.gpus.append(g)
            log.info("%s: %s (%s, %s), %s", g.label, g.info["name"], g.info["uuid"], g.info["pci_bus_id"],
                     format_size(g.info["total_bytes"]))
        if len(self.gpus) > MAX_GPUS:
            raise ConfigError(f"gpus: {len(self.gpus)} GPUs; at most {MAX_GPUS} are supported")

    def _open_counters(self):
        path = os.path.join(runtime_dir(), "counters")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, bytes(COUNTERS_BYTES))
            self.counters = mmap.mmap(fd, COUNTERS_BYTES)
        finally:
            os.close(fd)
        self.undo.append(("remove counters", lambda: os.unlink(path)))

    def write_state(self):
        if self.started is None:
            self.started = time.strftime("%Y-%m-%d %H:%M:%S")
            self.undo.append(("remove state", remove_state))
        swaps = active_swaps()
        slices = [sl.describe(swaps) for sl in self.slices]
        first = slices[0] if slices else {}
        cfg = self.cfg
        state = {**identity(), "version": __version__, "mode": "serving", "ready": self.ready,
                 "device": first.get("device"), "swap_device": first.get("swap_device"),
                 "attach": first.get("attach") or ("netlink" if cfg["attach"] != "ioctl" else "ioctl"),
                 "encrypted": any(s["encrypted"] for s in slices),
                 "encryption": {"mapping": first.get("mapping"), "cipher": CRYPT_CIPHER, "key_bits": CRYPT_KEY_BITS,
                                "sector_bytes": BLOCK_SIZE} if any(s["encrypted"] for s in slices) else None,
                 "size_bytes": sum(s["size_bytes"] for s in slices), "size_asked_bytes": cfg["size"],
                 "slice_bytes": cfg["slice_size"], "reserve_bytes": cfg["reserve"], "reclaim_after_s": cfg["reclaim_after"],
                 "priority": cfg["priority"], "connections": cfg["connections"],
                 "slices": slices, "gpus": [g.describe() for g in self.gpus],
                 "ceilings": {g.info["uuid"]: g.ceiling for g in self.gpus},
                 "started": self.started, "power": self.power.state()}
        state["gpu"] = state["gpus"][0] if state["gpus"] else None
        state["worker_pids"] = [pid for g in self.gpus for pid in g.worker_pids()]
        state["worker_starts"] = {str(pid): process_start(pid) for pid in state["worker_pids"]}
        state["handover"] = bool(slices) and all(sl.store.fd is not None and sl.attach_kind == "netlink"
                                                 for sl in self.slices)
        state["sysctl_saved"] = self.sysctl_saved
        if self.adopted_at:
            state["adopted_at"] = self.adopted_at
        if self.release_failed:
            state["release_failed"], state["release_error"] = self.release_failed
        if self.request:
            state["request"] = self.request
        if self.progress:
            state["progress"] = self.progress.describe()
        publish_state(state, self._status_line())

    def _publish_progress(self):
        """write_state for a SwapoffProgress: a state that cannot be written must not stop a swapoff."""
        try:
            self.write_state()
        except OSError as e:
            log.warning("could not write the state in %s: %s", runtime_dir(), e.strerror)

    def _swapoff_phase(self, phase, slices):
        self.progress = SwapoffProgress(phase, slices, self._publish_progress)
        return self.progress

    def _restore_sysctls(self):
        for key, old in self.sysctl_saved.items():
            try:
                sysctl_set(key, old)
            except OSError as e:
                log.warning("could not restore vm.%s to %s: %s", key, old, e.strerror)

    def _memory_clock_cap(self):
        mhz = self.cfg["memory_clock_max"]
        if mhz is None:
            return
        if self.nvml is None:
            log.warning("memory_clock_max = %d: NVML (libnvidia-ml.so.1) is not available, so the memory clock "
                        "is not capped; install the driver's NVML library or set memory_clock_max = off", mhz)
            return
        for g in self.gpus:
            try:
                got = self.nvml.lock_memory_clock(g.info["uuid"], mhz)
            except NvmlError as e:
                log.warning("%s: memory clock not capped: %s", g.label, e)
                continue
            log.info("%s: memory clock capped at %d MHz (memory_clock_max = %d)", g.label, got, mhz)
            self.undo.append((f"reset the memory clock of {g.label}", lambda g=g: self.nvml.reset_memory_clock(g.info["uuid"])))

    def _status_line(self):
        """What systemctl status shows (STATUS=): what is served now, or the swapoff in progress."""
        if self.progress:
            return self.progress.line()
        parts = []
        for g in self.gpus:
            if g.slices:
                devs = ", ".join(sl.swap_device or sl.device for sl in sorted(g.slices.values(), key=lambda s: s.number))
                parts.append(f"{format_size(g.held_bytes())} of {g.label} on {devs}")
        enc = " (encrypted)" if any(sl.crypt for sl in self.slices) else ""
        line = (f"{'serving' if self.ready else 'starting:'} {'; '.join(parts) or 'nothing'}{enc}, swap priority "
                f"{self.cfg['priority']} and down, {self.cfg['connections']} connections a slice")
        for g in self.gpus:
            if g.failed:
                line += f"; {g.label} given up ({g.failed})"
        if self.release_failed and not self.power.want:
            line += f"; power wants VRAM swap released ({self.power.why}) but swapoff failed; retrying"
        return line

    # -- serve until told to stop, and the checks of every round ---------------------------

    def loop(self):
        """Serve until a stop signal (EXIT_OK), the power policy's release (RELEASED), GPU failures
        (GPU_FAILED) or an upgrade (HANDOVER)."""
        while True:
            info = signal.sigtimedwait(DAEMON_SIGNALS, STATUS_INTERVAL_S)
            self._update_counters()
            if info is not None and info.si_signo == signal.SIGUSR2:
                if not all(sl.store.fd is not None and sl.attach_kind == "netlink" for sl in self.slices):
                    log.error("SIGUSR2: an upgrade in place needs exportable VRAM and a netlink attach; this "
                              "daemon has neither: use systemctl restart (a full swapoff)")
                    continue
                log.info("SIGUSR2: re-executing %s; the new version takes the devices and their VRAM over",
                         sys.argv[0])
                return HANDOVER
            if info is not None and info.si_signo in (signal.SIGHUP, signal.SIGUSR1):
                if info.si_signo == signal.SIGHUP:
                    self.reload()
                else:
                    self._take_request()
                if self._power_check():
                    return RELEASED
                continue
            if info is not None:
                log.info("%s received: stopping", signal.Signals(info.si_signo).name)
                return EXIT_OK
            if self.power.due() and self._power_check():
                return RELEASED
            if self._gpu_fault_check():
                return GPU_FAILED
            for g in self.gpus:
                g.check_workers()
            if time.monotonic() >= self.next_elastic:
                self.next_elastic = time.monotonic() + self.cfg["vram_poll"]
                self._elastic()

    def _update_counters(self):
        """Slices served from threads of this process (no workers): their counters, one slot a GPU."""
        for g in self.gpus:
            if not g.workers:
                _publish_counters(self.counters, g.slots[0], [sl.export for sl in g.slices.values()])

    def _take_request(self):
        """`nbd_vram.py shrink/grow SIZE`: move the ceilings, then release or take slices until they hold."""
        path = request_path()
        try:
            with open(path) as f:
                req = json.load(f)
            os.unlink(path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("ignoring an unreadable shrink/grow request %s: %s", path, e)
            return
        op, nbytes = req.get("op"), int(req.get("bytes") or 0)
        units = max(1, -(-nbytes // self.cfg["slice_size"]))
        live = [g for g in self.gpus if not g.failed]
        moved = move_ceilings(live, op, units)
        log.info("%s %s requested: slices allowed now %s", op, format_size(nbytes),
                 ", ".join(f"{g.label} {g.ceiling} of {len(g.sizes)}" for g in self.gpus))
        done = []
        if op == "shrink":
            # What _elastic will release, in its order (the emptiest slices first), as far as known now.
            swaps = active_swaps()
            self._swapoff_phase("shrinking", [sl for g in live for sl in sorted(
                g.slices.values(), key=lambda s: (s.used_kib(swaps), -s.number))[:max(0, len(g.slices) - g.ceiling)]])
        try:
            for _ in range(units * len(self.gpus) + len(self.gpus)):
                step = self._elastic(hurry=True)
                done += step
                if not step or any(s.startswith("could not") for s in step):
                    break
        finally:
            self.progress = None
        held = sum(g.held_bytes() for g in self.gpus)
        # Done when every GPU is at or under its ceiling (shrink), and every GPU whose ceiling was
        # raised has reached it (grow); a GPU held under its ceiling by the reserve is not this request's.
        ok = all(len(g.slices) <= g.ceiling for g in live) and all(len(g.slices) >= g.ceiling for g in moved
                                                                      if op == "grow")
        failed = [s for s in done if s.startswith("could not")]
        if not ok and not failed:
            failed = ["not every GPU reached its new size (out of VRAM, or the reserve)"]
        self.request = {"id": req.get("id"), "op": op, "bytes": nbytes, "ok": ok, "done": done, "held_bytes": held,
                        "result": "; ".join([f"{format_size(held)} of VRAM is swap now"] + failed)}
        self.write_state()

    def _power_check(self):
        """Ask the power policy; if it wants VRAM swap gone, swapoff every slice.  True when all are off."""
        if self.power.evaluate(*power_inputs()) or not self.swap_on:
            self.write_state()
            return False
        why = self.power.why
        log.info("power: releasing VRAM swap (%s)", why)
        todo = [sl for sl in sorted(self.slices, key=lambda s: -s.priority) if sl.swap_on]
        progress = self._swapoff_phase("releasing for sleep" if self.power.sleeping else "releasing (power)", todo)
        for sl in todo:
            if not swap_disable(sl.swap_device, progress.begin(sl)):
                # Never forced: the pages on VRAM belong to running processes.
                self.release_failed = (time.time(),
                                       f"swapoff {sl.swap_device} failed: RAM cannot take the swapped pages back now")
                log.warning("power: VRAM swap stays on (%s); trying again in %d s", self.release_failed[1],
                            self.power.poll_s)
                self.progress = None
                self.write_state()
                return False
            sl.swap_on = False
        progress.end("swap is off; freeing the VRAM")
        self.power.released = not self.power.sleeping
        return True     # stop() then closes the mappings, disconnects and frees (the phase goes on)

    def _gpu_fault_check(self):
        """CUDA errors on I/O (each already an EIO to its request): move swap off that GPU while RAM
        allows, and give the GPU up; the others serve on.  True once no GPU is left."""
        for g in self.gpus:
            if g.failed:
                continue
            errors = sum_counters(self.counters, set(g.slots))[0]["io_errors"]
            new, g.io_errors_seen = errors > g.io_errors_seen, errors    # a replaced worker's slot restarts at 0
            if not (new or g.fault_swapoff_at) or not g.slices:
                continue
            if g.fault_swapoff_at and time.monotonic() < g.fault_swapoff_at:
                continue
            log.error("%s: %d GPU I/O errors (the requests got EIO; see the lines above): moving its swap off "
                      "the GPU, back into RAM (swapoff)", g.label, errors)
            todo = sorted(g.slices.values(), key=lambda s: -s.number)
            progress = self._swapoff_phase(f"moving swap off {g.label} (GPU I/O errors)", todo)
            for sl in todo:
                if not sl.release("GPU I/O errors", progress):
                    g.fault_swapoff_at = time.monotonic() + SWAPOFF_RETRY_S
                    log.error("%s: swapoff failed (RAM cannot take the pages back now); retrying every %d s; pages "
                              "on the failing GPU fail their page-in with an I/O error", g.label, SWAPOFF_RETRY_S)
                    break
            else:
                g.failed = f"GPU I/O errors at {time.strftime('%H:%M:%S')}"
                g.ceiling = 0
                g.stop()
                log.error("%s: swap is off this GPU; it is given up until the service restarts%s", g.label,
                          "" if any(not h.failed for h in self.gpus) else
                          "; no GPU is left: stopping (systemd starts the service again with new CUDA contexts)")
            self.progress = None
            self.write_state()
        return bool(self.gpus) and all(g.failed for g in self.gpus)

    def _elastic(self, hurry=False):
        """One step for every GPU: give a slice back if the reserve or a shrink asks, take one if allowed.

        Returns a list of what was done (for a shrink/grow request)."""
        cfg, done = self.cfg, []
        if not self.power.want or (time.monotonic() < self.elastic_retry_at and not hurry):
            return done
        for g in self.gpus:
            if g.failed:
                continue
            try:
                free = g.mem_free()
            except CudaError as e:
                log.warning("%s: cuMemGetInfo failed: %s", g.label, e)
                continue
            number = g.free_number()
            next_bytes = g.sizes[number] if number < len(g.sizes) else 0
            action, g.calm_since = elastic_decision(cfg["reserve"], free, len(g.slices), g.ceiling, next_bytes,
                                                    g.calm_since, time.monotonic(),
                                                    0 if hurry else cfg["reclaim_after"])
            if action == "release":
                if len(g.slices) > g.ceiling:
                    why = f"shrink to {g.ceiling} slice{'' if g.ceiling == 1 else 's'}"
                else:
                    why = f"{format_size(free)} of VRAM free, below the reserve of {format_size(cfg['reserve'])}"
                    self._log_gpu_users(g)
                swaps = active_swaps()
                sl = min(g.slices.values(), key=lambda s: (s.used_kib(swaps), -s.number))
                own = self.progress is None         # a shrink request has its phase already
                phase = "shrinking" if len(g.slices) > g.ceiling else "releasing (reserve)"
                progress = self._swapoff_phase(phase, [sl]) if own else self.progress
                try:
                    released = sl.release(why, progress)
                finally:
                    if own:
                        self.progress = None
                if released:
                    done.append(f"released {sl.name}")
                else:
                    self.elastic_retry_at = time.monotonic() + SWAPOFF_RETRY_S * 6
                    done.append(f"could not release {sl.name}: swapoff failed (RAM cannot take its pages back now)")
                self.write_state()
            elif action == "grow":
                try:
                    ok = g.take_slice(cfg["reserve"])
                except Fatal as e:
                    log.error("%s: taking a slice back failed: %s", g.label, e)
                    ok = False
                done.append(f"took slice {number} of {g.label}" if ok else f"could not take a slice on {g.label}")
                if not ok:
                    g.calm_since = None
                self.write_state()
        return done

    def _log_gpu_users(self, g):
        if self.nvml is None:
            return
        try:
            users = [p for p in self.nvml.processes(g.info["uuid"]) if p[0] not in set(g.worker_pids()) | {os.getpid()}]
        except NvmlError as e:
            log.debug("NVML: %s", e)
            return
        if users:
            log.info("%s: other programs on the GPU: %s", g.label, ", ".join(
                f"{name} (pid {pid}{', ' + format_size(used) if used else ''})" for pid, used, name in users))

    # -- stop -----------------------------------------------------------------------------

    def stop(self):
        """Strictly in reverse: swapoff (retried until it succeeds), close the mappings, disconnect, free VRAM."""
        todo = [sl for sl in sorted(self.slices, key=lambda s: s.priority) if sl.swap_on]
        if todo:
            sd_notify("STOPPING=1")
            progress = self._swapoff_phase("stopping", todo)
        for sl in todo:
            while not swap_disable(sl.swap_device, progress.begin(sl)):
                progress.failed(f"swapoff failed (RAM cannot take the pages back now); retrying every "
                                f"{SWAPOFF_RETRY_S:.0f} s")
                signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, SWAPOFF_RETRY_S)
            sl.swap_on = False
        if todo:
            progress.end("swap is off; freeing the VRAM")
        for sl in reversed(self.slices):
            sl.run_undo()
            del sl.gpu.slices[sl.number]
        for g in self.gpus:
            g.stop()
        run_undo(self.undo, "stopping")
        if self.nvml is not None:
            self.nvml.close()
            self.nvml = None

    def stored_fds_for_handover(self):
        """{fd name: fd} of every slice, kept open over an upgrade's exec."""
        return {sl.fdname: sl.store.fd for sl in self.slices}


############################################################################
# Status ###################################################################
############################################################################

def status_state():
    """The state as status may read it: the daemon's own (root), else the public summary beside it.
    NotRootError where neither can be read: never "not running" when that is not known."""
    try:
        return read_state()
    except NotRootError:
        state = read_public_state()
        if state is None:
            raise NotRootError(f"status needs root here: the daemon's state ({state_path()}) is root's, and "
                               f"there is no public summary ({public_state_path()}: an older daemon writes "
                               "none); run this as root (sudo)") from None
        pid = state.get("pid")
        if type(pid) is int and pid > 0 and process_start(pid) is None:
            try:
                os.kill(pid, 0)
            except PermissionError:
                # It exists, but /proc hides it from us (mounted with hidepid): whether it is the daemon
                # or a process that got its pid cannot be told.
                raise NotRootError(f"status needs root here: /proc hides the daemon's process (pid {pid}) "
                                   "from other users (hidepid); run this as root (sudo)") from None
            except OSError:
                pass
        return state


def gather_status():
    state = status_state()
    if not state:
        return {"running": False}
    running = daemon_pid(state) is not None
    status = dict(state, running=running)
    if state.get("mode") == "idle":
        status["healthy"] = running
        return status
    try:
        with open(os.path.join(runtime_dir(), "counters"), "rb") as f:
            totals, conns, newest = sum_counters(f.read())
        if newest:
            status["connections_live"] = conns
            status["counters"] = totals
            status["counters_age_s"] = round(time.time() - newest / 1000, 1)
    except OSError:
        pass
    swaps = active_swaps()
    slices = state.get("slices") or []
    for sl in slices:
        found = find_swap(sl["swap_device"], swaps=swaps) if sl.get("swap_device") else None
        sl["swap"] = ({"active": True, "size_bytes": found[1][0] * 1024, "used_bytes": found[1][1] * 1024,
                       "priority": found[1][2]} if found else {"active": False})
    active = [sl["swap"] for sl in slices if sl["swap"]["active"]]
    status["swap"] = {"active": bool(active), "slices": len(slices), "active_slices": len(active),
                      "size_bytes": sum(a["size_bytes"] for a in active), "used_bytes": sum(a["used_bytes"] for a in active),
                      "priority": max((a["priority"] for a in active), default=None),
                      "device": state.get("swap_device"), "encrypted": bool(state.get("encrypted"))}
    c = status.get("counters", {})
    # A connection the kernel marked dead and nobody reconnected: its queue's I/O goes over the others.
    want = state.get("connections", 0) * len(slices)
    missing = "connections_live" in status and status["connections_live"] < want
    failed = [g for g in state.get("gpus") or [] if g.get("failed")]
    # A slice the daemon itself has just swapped off (a stop, a release in progress) is not missing.
    off = sum(1 for sl in slices if not sl["swap"]["active"] and not (state.get("progress") and not sl.get("swap_on")))
    status["healthy"] = (running and not off and (bool(slices) or bool(state.get("gpus")))
                         and not c.get("io_errors") and not missing and not failed)
    return status


class ProgressView:
    """shrink, grow and sleep while they wait on the daemon: its swapoff in progress (the state's
    "progress") on stderr.  On a terminal one line redrawn in place; otherwise (a log, the journal)
    a plain line when it first shows and every PROGRESS_LOG_S after."""

    def __init__(self, label, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.drawn = None               # the line on the terminal now
        self.printed = None             # when the last plain line was

    def show(self, state):
        progress = (state or {}).get("progress")
        if not progress:
            return
        line = f"{self.label}: {progress['line']}"
        if self.tty:
            if line != self.drawn:
                width = shutil.get_terminal_size().columns - 1        # a wrapped line cannot be redrawn
                self.stream.write(f"\r{line[:width]}\x1b[K")
                self.stream.flush()
                self.drawn = line
        elif self.printed is None or time.monotonic() - self.printed >= PROGRESS_LOG_S:
            log.info("%s", line)
            self.printed = time.monotonic()

    def clear(self):
        """Before any other line: the progress line off the terminal."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = None


def describe_power(p):
    line = f"{p['policy']}: {p.get('readings') or 'not read yet'}; VRAM swap {'wanted' if p['wanted'] else 'not wanted'}"
    return line + (f" ({p['why']})" if p.get("why") else "")


############################################################################
# Command line #############################################################
############################################################################
# One cmd_* for each command word, in the parser's order, each taking the parsed arguments and
# returning the exit status; build_parser names each one with set_defaults(cmd=...).

def config_flags(args):
    """The settings given as flags to run and check-config: {key: text}, unset ones None."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_")}


def cmd_serve(args):
    setup_logging(args.debug, background=True)
    size, min_size, buffer_bytes, max_pinned = args.size, args.min_size, args.buffer_size, args.max_pinned
    if max_pinned < 2 * buffer_bytes:
        raise UsageError(f"serve: --max-pinned {format_size(max_pinned)} is less than one connection's buffers "
                         f"(2 x --buffer-size = {format_size(2 * buffer_bytes)}): raise it or lower --buffer-size")
    if min_size > size:
        min_size = size
    check_socket_path(args.socket)      # before any VRAM is taken (UnixServer.open checks it again)
    cuda = Cuda(args.libcuda)
    dev, ctx = VramStore.open_device(cuda, args.gpu)
    gpu = cuda.device_info(dev)
    log.info("GPU %d: %s (%s, %s), %s", dev, gpu["name"], gpu["uuid"], gpu["pci_bus_id"],
             format_size(gpu["total_bytes"]))
    store = VramStore.allocate(cuda, dev, ctx, size, min_size)
    copier = CopyServer(cuda, ctx, "GPU process")
    workers = ServeWorkers(args, buffer_bytes, store, copier, args.workers or min(8, os.cpu_count() or 1))
    server = UnixServer(args.socket, workers.handoff, idle=workers.check, buffer_bytes=buffer_bytes,
                        max_pinned_bytes=max_pinned)
    log.info("at most %d clients at once (--max-connections %d; --max-pinned %s / 2 x %s of buffers each)",
             min(args.max_connections, max_pinned // (2 * buffer_bytes)), args.max_connections,
             format_size(max_pinned), format_size(buffer_bytes))
    clean = False
    try:
        workers.start()
        server.open()
        log.info("serving %s of VRAM on %s (NBD, fixed newstyle; any export name)", format_size(store.size_bytes),
                 args.socket)
        sd_notify("READY=1")
        server.serve()
    finally:
        server.close()
        clean = workers.stop()
        if clean:
            store.free()
        else:
            log.error("some connections did not stop; leaving VRAM to the driver at exit")
    return EXIT_OK


def cmd_run(args):
    # First of all, and inherited over the re-execs below: the default action of these ends the process.
    signal.pthread_sigmask(signal.SIG_BLOCK, DAEMON_SIGNALS)
    flags = config_flags(args)
    settings, origin = load_config(args.config, flags)
    setup_logging(settings["debug"], background=True)
    if os.geteuid() != 0:
        raise NotRootError(
            "run needs root: it loads the nbd module, attaches /dev/nbdX and runs swapon "
            "(use sudo, or `nbd_vram.py serve` for an NBD server that needs none of that)")
    hold_daemon_lock()      # before anything else; kept over the re-execs below
    if os.environ.get("PYTHONMALLOC") != "malloc":
        # Python's own allocator maps and unmaps arenas as it goes; under memory
        # pressure a new arena is a page the serving thread may not get.  glibc's
        # heap can be grown once and kept (prepare_memory), so run on it.
        os.environ["PYTHONMALLOC"] = "malloc"
        reexec(args.argv)
    stored = {name: fd for name, fd in sd_listen_fds().items()}
    handed = os.environ.pop(HANDOVER_ENV, "")
    for item in filter(None, handed.split(",")):
        name, _, fd = item.rpartition("=")
        if fd.isdigit():
            stored[name or OLD_FDNAME] = int(fd)         # a bare number: a version before slices
            os.set_inheritable(int(fd), False)
    for name in [n for n in stored if not n.startswith(FDNAME_PREFIX)]:
        log.warning("systemd passed an fd named %r that this version does not use: closing it", name)
        os.close(stored.pop(name))
    old = read_state()
    if old and not stored and daemon_pid(old) is None:
        # (With stored fds, the state says what to take over: the new one replaces it.)
        log.info("removing the state that a daemon (pid %s) left when it died", old.get("pid"))
        remove_state()
    if settings["encrypt"]:
        check_crypt_support()       # before anything is allocated, and while idle on battery too
    power = PowerPolicy(settings)
    warning = hibernation_resume_warning()
    if warning:
        log.warning("%s", warning)
    no_vram = os.environ.pop(NO_VRAM_ENV, None)

    def reload():       # SIGHUP
        reload_config(args.config, flags, settings, power)

    if not stored and not wait_for_power(power, reload, no_vram):
        return EXIT_OK      # (after a crash, live swap is taken back first; the power policy decides next)
    daemon = Daemon(settings, power, reload, stored)
    try:
        daemon.start()
        rc = daemon.loop()
    except NoVramError as e:
        daemon.stop()
        if stored or RELEASED_ENV not in os.environ:
            raise       # at the service's start: exit 7, and systemd tries again a few times
        # Taking swap back after a power release: another program has the VRAM now.  Nothing was
        # swapped there, so nothing is lost: idle again (a fresh process: no CUDA) and retry.
        (log.debug if no_vram else log.warning)("power: taking VRAM swap back failed: %s; idle, trying again "
                                                "every %g s", e, power.poll_s)
        reexec(args.argv, dict(os.environ, **{NO_VRAM_ENV: str(e).split(";")[0]}))
    except BaseException:
        daemon.stop()
        raise
    if rc == GPU_FAILED:
        daemon.stop()
        return EXIT_FAILURE
    if rc == HANDOVER:
        # An upgrade in place: no teardown.  Swap stays on, the workers serve on until the new
        # version stops them, and the VRAM fds stay open over the exec (and in systemd's store).
        daemon.write_state()
        fds = daemon.stored_fds_for_handover()
        for fd in fds.values():
            os.set_inheritable(fd, True)
        reexec(args.argv, dict(os.environ, **{HANDOVER_ENV: ",".join(f"{n}={fd}" for n, fd in fds.items())}))
    daemon.stop()
    if rc == RELEASED:
        # Swap is off, the devices gone, the VRAM scrubbed and freed.  Start over as a fresh process:
        # only that drops every handle on the GPU (libcuda keeps the device files open after the last
        # context), so the dGPU can power down while we wait for AC.
        log.info("power: VRAM swap released (%s); idle until it is wanted again", power.why)
        reexec(args.argv, dict(os.environ, **{RELEASED_ENV: "1" if power.released else ""}))
    return rc


def cmd_check_config(args):
    settings, origin, written = load_config_as_written(args.config, config_flags(args))
    # Each line a configuration line: the value as written (so it reads back the same), its origin a comment.
    for o in OPTIONS:
        print(f"{o.key:<17} = {written[o.key]:<14} # {origin[o.key]}")
    if settings["encrypt"]:
        # A setting that run would refuse on this machine: fail here too (exit 11), touching nothing.
        sys.stdout.flush()
        check_crypt_support(load=False)
    return EXIT_OK


def cmd_status(args):
    st = gather_status()
    if args.json:
        print(json.dumps(st, indent=1))
    if not st.get("running"):
        if not args.json:
            print("nbd-vram is not running" + (f" (stale state of pid {st['pid']})" if st.get("pid") else ""))
        return EXIT_NOT_RUNNING
    if not args.json and st.get("mode") == "idle":
        rows = [("daemon", f"idle, pid {st['pid']}, since {st['started']}, version {st['version']}"),
                ("swap", f"off, no VRAM held: {st.get('idle_why') or st['power']['why']}"),
                ("power", describe_power(st["power"]))]
        for k, v in rows:
            print(f"{k:<8} {v}")
        return EXIT_OK
    if not args.json:
        c, sw = st.get("counters", {}), st["swap"]
        enc = st.get("encryption") or {}
        crypt = (f"encrypted (dm-crypt {enc.get('cipher')}, a {enc.get('key_bits')}-bit key for this run only), "
                 if sw["encrypted"] else "")
        reserve = st.get("reserve_bytes")
        progress = st.get("progress")
        doing = "stopping" if progress and progress["phase"] == "stopping" else "running"
        rows = [
            ("daemon", f"{doing}, pid {st['pid']}, since {st['started']}, version {st['version']}"),
            ("swap", f"{'on' if sw['active'] else 'off'}, {crypt}{sw['active_slices']} of {sw['slices']} slices, "
                     f"{format_size(sw['used_bytes'])} used of {format_size(sw['size_bytes'])}"),
            ("elastic", f"slices of {format_size(st.get('slice_bytes') or 0)}, reserve "
                        f"{format_size(reserve) if reserve is not None else 'off'}, taken back after "
                        f"{st.get('reclaim_after_s')} s with room"),
        ]
        if progress:
            rows.insert(2, ("progress", progress["line"]))
        for g in st.get("gpus") or []:
            free = f", {format_size(g['free_bytes'])} free" if g.get("free_bytes") is not None else ""
            state = f"FAILED ({g['failed']})" if g.get("failed") else (
                f"{format_size(g['held_bytes'])} as swap, {g['ceiling']} of {g['max_slices']} slices allowed")
            rows.append((f"gpu {g['index']}", f"{g['name']} ({g['uuid']}, {g['pci_bus_id']}): {state}{free}"
                         + (f"; last: {g['last_action']}" if g.get("last_action") else "")))
        for sl in st.get("slices") or []:
            sw1 = sl["swap"]
            use = (f"priority {sw1['priority']}, {format_size(sw1['used_bytes'])} used" if sw1["active"] else "NOT swap")
            rows.append((f"slice {sl['gpu_index']}.{sl['number']}",
                         f"{sl['swap_device']}{' on ' + sl['device'] if sl['swap_device'] != sl['device'] else ''} "
                         f"({format_size(sl['size_bytes'])}, {sl['attach']}): {use}"))
        rows += [
            ("links", f"{st.get('connections_live', '?')} of {st['connections'] * len(st.get('slices') or [])} "
                      f"connections ({st['connections']} a slice)"),
            ("reads", f"{c.get('reads', 0)} ({format_size(c.get('bytes_read', 0))})"),
            ("writes", f"{c.get('writes', 0)} ({format_size(c.get('bytes_written', 0))})"),
            ("trims", f"{c.get('trims', 0)} trims, {c.get('zeroes', 0)} zeroes, {c.get('flushes', 0)} flushes"),
            ("errors", f"{c.get('io_errors', 0)} GPU I/O errors, {c.get('invalid', 0)} invalid requests"),
            ("health", "healthy" if st["healthy"] else "DEGRADED: see `journalctl -u vram-swap-nbd`"),
        ]
        if st.get("power"):
            line = describe_power(st["power"])
            if st.get("release_failed"):
                line += f"; last release failed at {time.strftime('%H:%M:%S', time.localtime(st['release_failed']))}: {st['release_error']}"
            rows.insert(2, ("power", line))
        for k, v in rows:
            print(f"{k:<10} {v}")
    return EXIT_OK if st["healthy"] else EXIT_DEGRADED


def cmd_worker(args):
    """A serving process: serves the sockets it is given (see spawn_worker)."""
    setup_logging(args.debug, background=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    libc = _libc()
    if args.lock:
        prepare_memory(libc, HEAP_RESERVE if args.gpu_process else RELAY_HEAP_RESERVE)
    threading.stack_size(THREAD_STACK)
    ctl = socket.socket(fileno=args.ctl_fd)
    if args.gpu_process:
        cuda = Cuda(args.libcuda)
        dev, ctx = VramStore.open_device(cuda, args.gpu)
        return GpuProcess(args, cuda, dev, ctx, libc, ctl).run()
    if args.copier_fd is None:
        raise Fatal("worker: --copier-fd is needed without --gpu-process")
    if args.kernel:
        return KernelWorker(args, libc, ctl, CopyClient(socket.socket(fileno=args.copier_fd))).run()
    if args.vram_address is None or args.vram_size is None:
        raise Fatal("worker: --copier-fd, --vram-address and --vram-size are needed without --kernel")
    # Serve mode: no CUDA here; the parent copies (CopyServer) and passes accepted client sockets.
    client = CopyClient(socket.socket(fileno=args.copier_fd))
    export = Export(types.SimpleNamespace(dptr=args.vram_address, size_bytes=args.vram_size))
    label = f"worker {args.index}"

    def make_io():
        return RemoteIoContext(client, args.buffer_size, args.buffer_size)

    # The parent closes ctl to stop us.
    ctl.sendall(WORKER_READY)
    clients = {}
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    while True:
        if not sel.select(1.0):
            if signal.SIGTERM in signal.sigpending():
                break
            continue
        fd = recv_fd(ctl)
        if fd is None:
            break
        if fd < 0:
            continue
        conn = socket.socket(fileno=fd)
        clients = {th: c for th, c in clients.items() if th.is_alive()}
        if len(clients) >= args.max_connections:
            log.warning("%s: refusing a connection: already %d clients (the limit, --max-connections)",
                        label, len(clients))
            conn.close()
            continue
        t = threading.Thread(target=serve_connection, args=(conn, export, f"{label} client {len(clients) + 1}"),
                             kwargs={"make_io": make_io}, daemon=True)
        clients[t] = conn
        t.start()
    for s in clients.values():
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    for t in clients:
        t.join(10)
    return EXIT_OK


def cmd_detach(args):
    """Disconnect an nbd device this tool attached, after checking it is not live swap."""
    need_root("detach", "it disconnects the device through the kernel's nbd netlink interface")
    index = args.device
    dev = f"/dev/nbd{index}"
    if find_swap(dev):
        raise Fatal(f"{dev} is active swap; run `swapoff {dev}` first (disconnecting live swap kills "
                    "every process with pages on it)")
    mapping = crypt_mappings().get(index)
    if mapping:
        name, dm = mapping
        mapper = f"/dev/mapper/{name}"
        first = f"`swapoff {mapper}`, then " if find_swap(mapper, f"/dev/{dm}") else ""
        raise Fatal(f"{dev} holds the encrypted swap mapping {mapper}; run {first}`cryptsetup close {name}` first")
    if not nbd_connected(index):
        print(f"{dev} is not connected")
        return EXIT_OK
    nl = NbdNetlink()
    try:
        nl.disconnect(index)
    finally:
        nl.close()
    print(f"{dev} disconnected")
    return EXIT_OK


def cmd_sleep(args):
    """Before the system sleeps: have the daemon release VRAM swap; fail, so that the sleep is refused, if it cannot."""
    need_root("sleep", "it marks the daemon's runtime directory and signals the daemon")
    make_runtime_dir()
    with open(os.open(sleep_marker(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "w") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    asked = time.time()
    asked_state = read_state()
    pid = signal_daemon(state=asked_state)
    if pid is None:
        log.info("sleep: no nbd-vram daemon is running: nothing to release")
        return EXIT_OK
    log.info("sleep: asking the daemon (pid %d) to release VRAM swap", pid)
    deadline = time.monotonic() + args.timeout
    view = ProgressView("sleep")
    while True:
        if daemon_pid(asked_state) is None:
            view.clear()
            log.info("sleep: the daemon has stopped: nothing to release")
            return EXIT_OK
        st = read_state() or {}      # none for a moment while the daemon starts over
        if st.get("mode") == "idle":
            view.clear()
            log.info("sleep: VRAM swap released; the GPU holds nothing of ours")
            return EXIT_OK
        if st.get("release_failed", 0) >= asked:
            why = st.get("release_error", "swapoff failed")
            break
        if time.monotonic() > deadline:
            why = f"the daemon did not release VRAM swap within {args.timeout} s"
            break
        view.show(st)
        time.sleep(0.2)
    view.clear()
    os.unlink(sleep_marker())
    signal_daemon(state=asked_state)
    raise Fatal(f"refusing to let the system sleep with swap on the GPU (its pages would be lost when it powers off): "
                f"{why}; close some programs to free RAM, then try again")


def cmd_wake(args):
    """After resume: let the daemon take VRAM swap back (a daemon someone stopped stays stopped)."""
    need_root("wake", "it clears the mark in the daemon's runtime directory and signals the daemon")
    try:
        os.unlink(sleep_marker())
    except FileNotFoundError:
        pass
    pid = signal_daemon()
    log.info("wake: %s", f"told the daemon (pid {pid})" if pid else "no nbd-vram daemon is running")
    return EXIT_OK


def cmd_power_event(args):
    """udev, on every power_supply change: have a running daemon read the power state now."""
    signal_daemon()
    return EXIT_OK


def cmd_resize(args):
    """shrink / grow SIZE: ask the running daemon to give back or take more VRAM, and wait for its answer."""
    nbytes = args.size
    need_root(args.command, "it hands the daemon its request in the daemon's runtime directory and signals it")
    st = read_state()
    if daemon_pid(st) is None or st.get("mode") != "serving":
        log.error("%s: no nbd-vram daemon is serving: nothing to %s", args.command, args.command)
        return EXIT_NOT_RUNNING
    rid = time.time()
    write_json(request_path(), {"id": rid, "op": args.command, "bytes": nbytes})
    if signal_daemon(signal.SIGUSR1, st) is None:
        raise Fatal(f"the daemon (pid {st['pid']}) exited: see journalctl -u vram-swap-nbd")
    deadline = time.monotonic() + args.timeout
    view = ProgressView(args.command)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read_state() or {}
        req = now.get("request") or {}
        if req.get("id") == rid:
            view.clear()
            (log.info if req["ok"] else log.warning)("%s %s: %s", args.command, format_size(nbytes), req["result"])
            return EXIT_OK if req["ok"] else EXIT_FAILURE
        if daemon_pid(st) is None:
            view.clear()
            raise Fatal(f"the daemon (pid {st['pid']}) exited: see journalctl -u vram-swap-nbd")
        view.show(now)
    view.clear()
    raise Fatal(f"the daemon did not answer the {args.command} request within {args.timeout:.0f} s (a swapoff can "
                "take long: see `nbd_vram.py status` and journalctl -u vram-swap-nbd)")


def cmd_upgrade(args):
    """After a new nbd_vram.py is in place: have the running daemon re-execute it, keeping swap."""
    need_root("upgrade", "it signals the daemon")
    st = read_state()
    if daemon_pid(st) is None:
        log.error("upgrade: no nbd-vram daemon is running: nothing to upgrade")
        return EXIT_NOT_RUNNING
    if st.get("mode") != "serving" or not st.get("handover"):
        raise Fatal(f"the running daemon (pid {st['pid']}, version {st.get('version')}) cannot be upgraded in place "
                    f"({'it is idle' if st.get('mode') == 'idle' else 'it predates that, or serves without an exportable VRAM fd or netlink'}): "
                    "use systemctl restart vram-swap-nbd (a full swapoff first)")
    pid, started = st["pid"], time.time()
    if signal_daemon(signal.SIGUSR2, st) is None:
        raise Fatal(f"the daemon (pid {pid}) exited before the upgrade: see journalctl -u vram-swap-nbd")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read_state() or {}
        if daemon_pid(st) is None:
            raise Fatal(f"the daemon (pid {pid}) exited during the upgrade: see journalctl -u vram-swap-nbd")
        if now.get("mode") == "serving" and now.get("adopted_at", 0) >= started:
            log.info("upgraded: pid %d runs version %s, %s kept as swap", pid, now.get("version"), now.get("device"))
            return EXIT_OK
    raise Fatal(f"the daemon (pid {pid}) did not report the upgrade within {args.timeout:.0f} s: "
                "see journalctl -u vram-swap-nbd")


def _arg_type(parse):
    """An argparse type from a parser of ours: a bad value is then a usage error (exit 2) in one line,
    "argument --size: '12X' is not a size ..."."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _setting_flag(o):
    """The type of run's and check-config's --KEY flags: checked as the file's value would be, and kept
    as text, for load_config to parse with the rest (and check-config to show as written)."""
    def check(text):
        try:
            o.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e} (allowed: {o.allowed})") from None
        return text
    return check


def _request_size(text):
    """shrink and grow SIZE."""
    v = parse_size(text)
    if v <= 0:
        raise ValueError(f"{text!r} is nothing (give e.g. 2G)")
    return v


def _nbd_index(text):
    """detach's /dev/nbdN (or nbdN) -> N."""
    m = re.fullmatch(r"(?:/dev/)?nbd(\d+)", text)
    if not m:
        raise ValueError(f"{text!r} is not an nbd device (e.g. /dev/nbd0)")
    return int(m.group(1))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; text of several lines (the exit codes, the sample
    configuration) kept line for line."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser():
    p = _Parser(prog="nbd_vram.py", allow_abbrev=False,
                description="Use spare NVIDIA GPU memory as a Linux swap device, served over NBD.",
                epilog=EXIT_CODES_HELP, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"nbd-vram {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help, description, codes, epilog=""):
        """A documented command: its one line in the list, its description, and the exit codes it can return."""
        return sub.add_parser(name, allow_abbrev=False, help=help, description=description,
                              epilog=epilog + exit_codes_help(EXIT_OK, EXIT_FAILURE, EXIT_USAGE, *codes),
                              formatter_class=_HelpFormatter)

    s = command("serve", "serve VRAM to NBD clients on a Unix socket",
                "Serve VRAM as an NBD export on a Unix socket (mode 0600) until SIGTERM or Ctrl-C, then free it. "
                "For tests, benchmarks and NBD clients such as nbdinfo, qemu-io, fio and nbd-client.",
                (EXIT_NO_DRIVER, EXIT_NO_GPU, EXIT_NO_VRAM))
    s.add_argument("--socket", required=True, help="Unix socket path to listen on")
    s.add_argument("--size", required=True, type=_arg_type(_size), help="VRAM to use: 512M, 7G, or MiB as a "
                   "number; a ceiling, backed off by 512M on out-of-memory")
    s.add_argument("--min-size", default="1G", type=_arg_type(_size), help="least VRAM worth serving (default 1G)")
    s.add_argument("--gpu", default="0", help="GPU index, UUID or PCI bus id (default 0)")
    s.add_argument("--max-connections", type=int, default=256, help="clients at once (default 256)")
    s.add_argument("--workers", type=int, default=0, help="serving processes (default: one per CPU, at most 8)")
    s.add_argument("--buffer-size", default="8M", type=_arg_type(_buffer_size),
                   help="pinned staging per connection, each way (default 8M)")
    s.add_argument("--max-pinned", default="2G", type=_arg_type(parse_size), help="pinned buffers of all clients "
                   "together, 2 x --buffer-size each: a client past it is refused (default 2G)")
    s.add_argument("--libcuda", default=None, help="path of libcuda.so.1 (default: $NBD_VRAM_LIBCUDA or the system's)")
    s.add_argument("--debug", action="store_true", help="log every connection and invalid request")
    s.set_defaults(cmd=cmd_serve)

    r = command("run", "the swap daemon (what the systemd unit starts)",
                "Allocate VRAM, attach it to the kernel as /dev/nbdX and make it swap; on SIGTERM swapoff, "
                "disconnect and free it. Settings: " + DEFAULT_CONFIG + " (or --config, or $NBD_VRAM_CONFIG), "
                "then the environment, then these flags.",
                (EXIT_CONFIG, EXIT_NO_DRIVER, EXIT_NO_GPU, EXIT_NO_VRAM, EXIT_NO_NBD, EXIT_NOT_ROOT, EXIT_NO_CRYPT),
                epilog="settings (config key = default):\n" + sample_config() + "\n\n")
    c = command("check-config", "validate the configuration and print it",
                "Read the configuration as run would, print every setting and where it came from (lines that "
                "can be pasted into the configuration file), and touch nothing. With encrypt = yes, also check "
                "that cryptsetup and dm-crypt are there.",
                (EXIT_CONFIG, EXIT_NO_CRYPT))
    r.set_defaults(cmd=cmd_run)
    c.set_defaults(cmd=cmd_check_config)
    for q in (r, c):
        q.add_argument("--config", default=None, metavar="FILE",
                       help=f"configuration file (default {DEFAULT_CONFIG}, which may be absent; a file named "
                            "here must exist)")
        for o in OPTIONS:
            boolean = o.parse is _parse_bool     # --debug alone means --debug=yes
            aliases = [f"--{a}" for a, k in OPTION_ALIASES.items() if k == o.key]
            q.add_argument(o.flag, *aliases, dest="opt_" + o.key, default=None, metavar="VALUE",
                           type=_setting_flag(o), nargs="?" if boolean else None, const="yes" if boolean else None,
                           help=f"{o.help} ({o.allowed}; default {o.default})")

    st = command("status", "show the running daemon's GPUs, slices, swap use and I/O counts",
                 "Show the running daemon's GPUs, slices, swap use and I/O counts. Also its power policy, and "
                 "whether it is healthy (exit 10 if not).",
                 (EXIT_NOT_RUNNING, EXIT_NOT_ROOT, EXIT_DEGRADED))
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(cmd=cmd_status)

    w = sub.add_parser("worker", allow_abbrev=False, help="(internal) a serving process started by serve and run")
    w.add_argument("--copier-fd", type=int, default=None)
    w.add_argument("--vram-address", type=int, default=None)
    w.add_argument("--vram-size", type=int, default=None)
    w.add_argument("--gpu", default=None)
    w.add_argument("--kernel", action="store_true")
    w.add_argument("--gpu-process", action="store_true")
    w.add_argument("--slot", type=int, default=None)
    w.add_argument("--ctl-fd", type=int, required=True)
    w.add_argument("--buffer-size", type=int, required=True)
    w.add_argument("--index", type=int, default=1)
    w.add_argument("--max-connections", type=int, default=256)
    w.add_argument("--libcuda", default=None)
    w.add_argument("--lock", action="store_true")
    w.add_argument("--realtime", action="store_true")
    w.add_argument("--standby", type=int, default=0)
    w.add_argument("--debug", action="store_true")
    w.set_defaults(cmd=cmd_worker)

    d = command("detach", "disconnect an nbd device left behind (refuses live swap)",
                "Disconnect an nbd device left behind (refuses live swap). Such a device is one that a daemon "
                "which could not hand its VRAM over left attached; one that is swap, or under an encrypted swap "
                "mapping, is refused, saying what to run first.",
                (EXIT_NO_NBD, EXIT_NOT_ROOT))
    d.add_argument("device", type=_arg_type(_nbd_index), metavar="DEVICE", help="/dev/nbdN")
    d.set_defaults(cmd=cmd_detach)
    sl = command("sleep", "before system sleep: release VRAM swap; fails (refusing the sleep) if swapoff cannot",
                 "Before system sleep: release VRAM swap; fails (refusing the sleep) if swapoff cannot. "
                 "The sleep unit (vram-swap-nbd-sleep.service) runs it: the daemon swaps off, frees the VRAM and idles until "
                 "wake; if RAM cannot take the pages back, the sleep is refused rather than lose them when the "
                 "GPU powers off.",
                 (EXIT_NOT_ROOT,))
    sl.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                    help="give up (and refuse the sleep) after this long (default 900)")
    sl.set_defaults(cmd=cmd_sleep)
    command("wake", "after resume: let the daemon take VRAM swap back",
            "After resume: let the daemon take VRAM swap back. The sleep unit runs it when it stops; a daemon "
            "that someone stopped stays stopped.",
            (EXIT_NOT_ROOT,)).set_defaults(cmd=cmd_wake)
    command("power-event", "tell the daemon the power supply changed (the udev rule runs this)",
            "Tell the daemon the power supply changed (the udev rule runs this). It reads the power supply now "
            "instead of at its next poll; without a running daemon this does nothing.",
            ()).set_defaults(cmd=cmd_power_event)
    for op, what in (("shrink", "give SIZE of VRAM back to GPU programs now (the emptiest slices: swapoff, "
                                "then free)"),
                     ("grow", "take SIZE of VRAM back as swap (up to size a GPU, above the reserve)")):
        rs = command(op, what, what[0].upper() + what[1:] + ". Rounded up to whole slices; stays in force until "
                     "the next grow/shrink or restart. Waits for the daemon's answer.",
                     (EXIT_NOT_RUNNING, EXIT_NOT_ROOT))
        rs.add_argument("size", metavar="SIZE", type=_arg_type(_request_size), help="e.g. 2G")
        rs.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="how long to wait for the daemon's answer (default 600)")
        rs.set_defaults(cmd=cmd_resize)
    u = command("upgrade", "have the running daemon re-execute nbd_vram.py from disk, keeping swap and VRAM",
                "Have the running daemon re-execute nbd_vram.py from disk, keeping swap and VRAM. Waits for the "
                "new version to report (install.sh runs this when only the program changed).",
                (EXIT_NOT_RUNNING, EXIT_NOT_ROOT))
    u.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="how long to wait for the new version to report (default 120)")
    u.set_defaults(cmd=cmd_upgrade)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if not log.handlers:
        setup_logging(False)
    try:
        return args.cmd(args)
    except Fatal as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    finally:
        flush_log()


if __name__ == "__main__":
    sys.exit(main())
