#!/usr/bin/env python3
"""watchdog.py PID [INTERVAL_S=5] [MAX_DUMPS=3] [DUMP_AT=S1,S2,...]: livelock detector for guest scripts (start it in the
background before the pressure; PID's child processes are watched too; guest-lib.sh's start_watchdog also enables sysrq and console logging).
Every INTERVAL_S it reads /proc and prints one "WATCHDOG" line to the console when something looks
stuck: a thread in state R whose system time grows while its user time and page faults are
frozen, or direct reclaim scanning (pgscan_direct) hard while stealing nothing and swap-out is frozen.
After three suspicious samples in a row it dumps every one of those threads (state, ticks, faults, syscall,
kernel stack), raises the console log level and asks for a backtrace of every CPU (sysrq-l; needs
kernel.sysrq=1; its "Call Trace" lines make fail_on_kernel_errors fail), at most MAX_DUMPS times. Exits when PID does. It is mlocked, but in a hard livelock it may still need a page and
stay silent: silence from it is itself a sign.
DUMP_AT: also dump every thread of PID and its children S1, S2... seconds after the start, whatever they
look like (a stall where every thread sleeps, e.g. on a page that swap cannot bring back).
At most MAX_DUMPS of either kind."""
import ctypes, glob, os, sys, time

libc = ctypes.CDLL(None)
libc.mlockall(3)                       # MCL_CURRENT | MCL_FUTURE
libc.prctl(57, 1, 0, 0, 0)             # PR_SET_IO_FLUSHER
open("/proc/self/oom_score_adj", "w").write("-1000")
console = open("/dev/console", "w")
pid = sys.argv[1]
interval = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
max_dumps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
dump_at = sorted(float(x) for x in sys.argv[4].split(",")) if len(sys.argv) > 4 and sys.argv[4] else []
started = time.monotonic()
HZ = os.sysconf("SC_CLK_TCK")
VM_KEYS = ("allocstall_normal", "pgscan_direct", "pgsteal_direct", "oom_kill", "pswpout", "pswpin")


def say(text):
    console.write(text + "\n")
    console.flush()


def tasks():
    """Every thread of PID and of its children (the daemon's worker processes)."""
    found = glob.glob(f"/proc/{pid}/task/*")
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            if open(stat).read().rsplit(")", 1)[1].split()[1] == pid:
                found += glob.glob(stat[:-len("stat")] + "task/*")
        except (OSError, IndexError):
            pass
    return found


def threads():
    out = {}
    for task in tasks():
        try:
            st = open(task + "/stat").read().rsplit(")", 1)[1].split()
            out[task] = (st[0], int(st[11]), int(st[12]), int(st[7]) + int(st[9]))  # state utime stime faults
        except (OSError, IndexError):
            pass
    return out


def vmstat():
    vm = dict(x.split() for x in open("/proc/vmstat"))
    return {k: int(vm.get(k, 0)) for k in VM_KEYS}


def dump():
    lines = []
    for task in sorted(tasks()):
        try:
            lines.append(f"TASK {task} stat={open(task + '/stat').read().strip()} "
                         f"syscall={open(task + '/syscall').read().strip()}")
            lines.append(open(task + "/stack").read().rstrip())
        except OSError as e:
            lines.append(f"TASK {task} {e!r}")
    mem = {k: v.strip() for k, v in (x.split(":", 1) for x in open("/proc/meminfo"))}
    lines.append(f"MEM free={mem['MemFree']} swapfree={mem['SwapFree']}")
    return "\n".join(lines)


prev_t, prev_vm, bad_in_row, dumps = threads(), vmstat(), 0, 0
while os.path.exists(f"/proc/{pid}") and dumps < max_dumps:
    time.sleep(interval)
    if dump_at and time.monotonic() - started >= dump_at[0]:
        dumps += 1
        say(f"WATCHDOG dump {dumps}/{max_dumps} at {dump_at.pop(0):.0f} s, as asked\n{dump()}")
    t, vm = threads(), vmstat()
    d = {k: vm[k] - prev_vm[k] for k in VM_KEYS}
    why = []
    for task, (state, ut, stime, flt) in t.items():
        if task in prev_t:
            _, put, pst, pflt = prev_t[task]
            if state == "R" and stime - pst >= 0.8 * interval * HZ and ut == put and flt == pflt:
                why.append(f"{task.rsplit('/', 1)[1]} R stime+{stime - pst}")
    if (d["pgscan_direct"] > 20000 * interval and d["pgsteal_direct"] * 100 < d["pgscan_direct"]
            and d["pswpout"] == 0):
        why.append(f"direct reclaim scans {d['pgscan_direct']} steals {d['pgsteal_direct']}, swap-out frozen")
    if why:
        say(f"WATCHDOG pid {pid}: " + "; ".join(why) + " | " + " ".join(f"{k}+{v}" for k, v in d.items()))
        bad_in_row += 1
        if bad_in_row >= 3:
            dumps += 1
            try:
                open("/proc/sys/kernel/printk", "w").write("8")
            except OSError:
                pass
            say(f"WATCHDOG dump {dumps}/{max_dumps}\n{dump()}")
            try:
                open("/proc/sysrq-trigger", "w").write("l")
            except OSError:
                pass
    else:
        bad_in_row = 0
    prev_t, prev_vm = t, vm
