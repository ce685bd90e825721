#!/usr/bin/env bash
# install.sh: install nbd-vram (nbd_vram.py, its systemd units or OpenRC script, and
# /etc/nbd-vram.conf) from this checkout, or remove it again with --uninstall.  Run as root;
# see --help.
# SPDX-License-Identifier: MIT
set -euo pipefail
umask 022

usage() {
    cat <<'EOF'
usage: install.sh [options]          install or update nbd-vram from this checkout
       install.sh --uninstall [--purge]

Installs /usr/local/bin/nbd_vram.py, the service for the init system that runs (systemd:
/etc/systemd/system/vram-swap-nbd.service and vram-swap-nbd-sleep.service; OpenRC:
/etc/init.d/nbd-vram, /etc/conf.d/nbd-vram and the elogind sleep hook
/etc/elogind/system-sleep/nbd-vram), a udev rule for power events and /etc/nbd-vram.conf
(never overwritten: if the shipped one sets other things than yours, it goes to
/etc/nbd-vram.conf.new; a change of its comments alone does not), then enables and starts
the service.  Running it again installs only what changed; a running service is
stopped (a full swapoff) only when its files are replaced, and upgraded in place (swap
stays on) when only the program changed.

options:
  --size SIZE               VRAM to use as swap (e.g. 6G), written to the config on first
                            install; default: proposed from the GPU (total minus 1G, minus
                            3G if it drives a display, at least 1G)
  --power-management yes|no answer to the power-aware management question (default no):
                            yes writes "power = ac" (VRAM swap only on AC power)
  -y, --yes                 accept every proposal without asking (also implied when
                            standard input is not a terminal)
  --init systemd|openrc     the init system to install for (default: the one running, PID
                            1's; systemd's units where neither runs, as in a staging root)
  --no-enable               do not enable the service (not started at boot)
  --no-start                do not start (or restart) the service
  --uninstall               stop the service (swapoff), disable and remove the units or
                            the OpenRC script, the binary and the README; keeps
                            /etc/nbd-vram.conf and /etc/conf.d/nbd-vram
  --purge                   with --uninstall: remove those (and their .new) too
  --root DIR, --prefix DIR  install into DIR instead of / (a staging tree, for packaging and
                            tests): no root needed, nothing is started or stopped, and units
                            are enabled with `systemctl --root=DIR` where systemctl exists
                            (OpenRC: a link in DIR/etc/runlevels/default)
  --no-checks               with --root: skip the checks of this machine (NVIDIA driver, nbd
                            module), for a tree built on one machine for others (packages)
  -n, --dry-run             print the steps, change nothing
  -h, --help                this text
EOF
}

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=""
SIZE=""
POWER=""
YES=0
ENABLE=1
START=1
UNINSTALL=0
PURGE=0
INIT=""
DRY=0
CHECKS=1
UNIT=vram-swap-nbd.service
SLEEP_UNIT=vram-swap-nbd-sleep.service
SERVICE=nbd-vram                # OpenRC's name for it
UDEV_RULE=90-nbd-vram-power.rules
MARK="# Written by install.sh on first install."

die() { echo "install.sh: error: $*" >&2; exit 1; }
note() { echo "install.sh: $*"; }
# run CMD...: print it as "+ CMD" (as ukify does), then run it unless --dry-run.
run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if (( DRY )); then return 0; fi
    "$@"
}

while (( $# )); do
    case $1 in
        --size) [ $# -ge 2 ] || die "--size needs a value (e.g. --size 6G)"; SIZE=$2; shift ;;
        --size=*) SIZE=${1#*=} ;;
        --power-management) [ $# -ge 2 ] || die "--power-management needs yes or no"; POWER=$2; shift ;;
        --power-management=*) POWER=${1#*=} ;;
        -y|--yes) YES=1 ;;
        --init) [ $# -ge 2 ] || die "--init needs systemd or openrc"; INIT=$2; shift ;;
        --init=*) INIT=${1#*=} ;;
        --no-enable) ENABLE=0 ;;
        --no-start) START=0 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --root|--prefix) [ $# -ge 2 ] || die "$1 needs a directory"; ROOT=$2; shift ;;
        --root=*|--prefix=*) ROOT=${1#*=} ;;
        --no-checks) CHECKS=0 ;;
        -n|--dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case $POWER in
    ""|yes|no) ;;
    *) die "--power-management takes yes or no, not '$POWER'" ;;
esac
case $INIT in
    ""|systemd|openrc) ;;
    *) die "--init takes systemd or openrc, not '$INIT'" ;;
esac
if (( PURGE && ! UNINSTALL )); then die "--purge goes with --uninstall"; fi
if (( ! CHECKS )) && [ -z "$ROOT" ]; then die "--no-checks goes with --root (a tree for other machines)"; fi
if [ -n "$ROOT" ]; then
    ROOT=$(realpath -m -- "$ROOT")
    [ "$ROOT" != / ] || ROOT=""
fi

# sbin directories: sudo and root shells have them, `su` without '-' may not.
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin
BIN=$ROOT/usr/local/bin/nbd_vram.py
UNITDIR=$ROOT/etc/systemd/system
CONF=$ROOT/etc/nbd-vram.conf
DOC=$ROOT/usr/local/share/doc/nbd-vram/README.md
LINK=$ROOT/usr/local/bin/nbd-vram               # the command's other name
MAN8=$ROOT/usr/local/share/man/man8/nbd-vram.8
MAN8_LINK=$ROOT/usr/local/share/man/man8/nbd_vram.py.8
MAN5=$ROOT/usr/local/share/man/man5/nbd-vram.conf.5
COMPLETION=$ROOT/usr/local/share/bash-completion/completions/nbd_vram.py
COMPLETION_LINK=$ROOT/usr/local/share/bash-completion/completions/nbd-vram
RULE=$ROOT/etc/udev/rules.d/$UDEV_RULE
INITD=$ROOT/etc/init.d/$SERVICE
CONFD=$ROOT/etc/conf.d/$SERVICE
SLEEP_HOOK=$ROOT/etc/elogind/system-sleep/$SERVICE
RUNLEVEL_LINK=$ROOT/etc/runlevels/default/$SERVICE
RUNDIR=${NBD_VRAM_RUNTIME_DIR:-/run/nbd-vram}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The init system: systemd where it runs (/run/systemd/system), OpenRC where it runs (it booted
# the machine: /run/openrc/softlevel, whatever PID 1 is), else --init or systemd's units.
openrc_running() { [ -e /run/openrc/softlevel ]; }
if [ -z "$INIT" ]; then
    if [ -z "$ROOT" ] && [ ! -d /run/systemd/system ] && openrc_running; then INIT=openrc; else INIT=systemd; fi
fi
# How systemctl can be used: live (PID 1 is systemd), offline (staging root: enable and
# disable only, with --root) or none.  OpenRC's tools: live (OpenRC booted this machine) or none
# (a staging root, or another init: files only).
SYSTEMD=none
OPENRC=none
if [ "$INIT" = openrc ]; then
    if [ -z "$ROOT" ] && openrc_running; then
        { command -v openrc-run >/dev/null && command -v rc-service >/dev/null; } ||
            die "OpenRC runs but openrc-run or rc-service is not on PATH: install OpenRC's tools (openrc)"
        command -v supervise-daemon >/dev/null ||
            die "OpenRC's supervise-daemon is not installed (OpenRC 0.21 or later has it; the init script needs it)"
        OPENRC=live
    elif [ -z "$ROOT" ]; then
        note "OpenRC did not boot this machine (no /run/openrc/softlevel): installing its files, skipping every rc-service and rc-update step"
    fi
elif [ -n "$ROOT" ]; then
    if command -v systemctl >/dev/null; then SYSTEMD=offline; fi
elif ! command -v systemctl >/dev/null; then
    note "systemctl not found: skipping every systemctl step (daemon-reload, enable, start, stop)"
elif [ ! -d /run/systemd/system ]; then
    note "PID 1 is not systemd (a container or VM?), and OpenRC did not boot it: installing systemd's units, skipping every systemctl step (daemon-reload, enable, start, stop); --init openrc installs OpenRC's script instead"
else
    SYSTEMD=live
fi

require_root() {
    if [ -n "$ROOT" ] || (( DRY )) || [ "$(id -u)" -eq 0 ]; then return 0; fi
    die "must run as root (sudo bash install.sh ...): it writes /usr/local/bin and /etc and manages the service; --dry-run shows the steps without root"
}

unit_active() {  # active, or on its way (activating, deactivating, reloading)
    [ "$SYSTEMD" = live ] || return 1
    case $(systemctl is-active "$UNIT" 2>/dev/null || true) in
        active|activating|deactivating|reloading) return 0 ;;
        *) return 1 ;;
    esac
}

openrc_active() {  # started, or stopping (a stop whose swapoff failed: the daemon still runs)
    [ "$OPENRC" = live ] && [ -e "$INITD" ] || return 1
    rc-service "$SERVICE" status >/dev/null 2>&1 && return 0
    [ -e "/run/openrc/stopping/$SERVICE" ]
}

service_active() { unit_active || openrc_active; }

# state_key KEY: KEY from the running daemon's state.json ("" if none)
state_key() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$RUNDIR/state.json" "$1" 2>/dev/null || true
}

# progress_line: the stopping daemon's own line for the swapoff in progress (as `status` shows it:
# "stopping: swapoff /dev/nbd3 (slice 3 of 7), 1.2 GiB left, 150 MiB/s"), "" if it has none
progress_line() {
    python3 -c 'import json, sys
print(((json.load(open(sys.argv[1])).get("progress") or {}).get("line") or ""))' "$RUNDIR/state.json" 2>/dev/null || true
}

# run_stop CMD...: run (print it, then run it) `systemctl stop`, which is a swapoff of minutes with
# GiBs in VRAM swap and prints nothing meanwhile: the daemon's progress line every 10 s instead.
run_stop() {
    local pid waited=0 line
    printf '+'; printf ' %q' "$@"; printf '\n'
    if (( DRY )); then return 0; fi
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        waited=$(( waited + 1 ))
        if (( waited % 10 == 0 )); then
            line=$(progress_line)
            note "${line:-stopping} (${waited} s)"
        fi
    done
    wait "$pid"
}

# Stop the service: its stop is a swapoff, which can take minutes and is never forced.
stop_service() {
    if unit_active; then
        note "stopping $UNIT: a full swapoff, every page on VRAM comes back to RAM (can take minutes)"
        if run_stop systemctl stop "$UNIT" && { (( DRY )) || ! unit_active; }; then
            return 0
        fi
        die "$UNIT did not stop (swapoff still running or failing, see journalctl -u $UNIT); nothing was changed: free some RAM and run install.sh again"
    fi
    if openrc_active; then
        note "stopping $SERVICE: a full swapoff, every page on VRAM comes back to RAM (can take minutes)"
        # (the init script's stop says how far its swapoff is itself, every 10 s)
        if run rc-service "$SERVICE" stop && { (( DRY )) || ! openrc_active; }; then
            return 0
        fi
        die "$SERVICE did not stop (swapoff still running or failing, see /var/log/nbd-vram.log); nothing was changed: free some RAM and run install.sh again"
    fi
}

# daemon_pid: the pid of the daemon that $RUNDIR/state.json describes if that very process still
# runs, else "".  A pid alone proves nothing (a daemon killed with -9 leaves its state, and the pid
# goes to the next process): nbd_vram.py's daemon_pid() checks its start time and the boot id.
daemon_pid() {
    NBD_VRAM_RUNTIME_DIR=$RUNDIR python3 -c 'import importlib.util as u, sys
spec = u.spec_from_file_location("nbd_vram", sys.argv[1])
nv = u.module_from_spec(spec)
spec.loader.exec_module(nv)
print(nv.daemon_pid(nv.read_state()) or "")' "$SRC/nbd_vram.py" 2>/dev/null || true
}

# A daemon not started by systemd (test_smoke.sh, or `nbd_vram.py run` by hand) would make
# the service refuse to start: stop it with SIGTERM (its own swapoff path) and wait.
stop_stray_daemon() {
    [ -z "$ROOT" ] || return 0
    local pid main=0 waited=0
    pid=$(daemon_pid)
    [ -n "$pid" ] || return 0
    if [ "$SYSTEMD" = live ]; then
        main=$(systemctl show -p MainPID --value "$UNIT" 2>/dev/null || echo 0)
    elif [ "$OPENRC" = live ]; then
        main=$(cat "/run/openrc/options/$SERVICE/child_pid" 2>/dev/null || echo 0)
    fi
    [ "$pid" != "$main" ] || return 0
    note "an nbd_vram.py daemon not started by the service is running (pid $pid, a smoke test?): stopping it"
    run kill -TERM "$pid"
    (( ! DRY )) || return 0
    while [ -d "/proc/$pid" ]; do
        if (( waited >= 1800 )); then
            die "pid $pid still runs after 30 minutes (its swapoff keeps failing?); stop it, then run install.sh again"
        fi
        if (( waited % 10 == 0 && waited )); then note "waiting for pid $pid to swapoff and exit (${waited}s)"; fi
        sleep 1
        waited=$(( waited + 1 ))
    done
}

# differs SRC DEST MODE: true if installing SRC as DEST (with MODE) would change anything.
differs() {
    [ -f "$2" ] && [ ! -L "$2" ] && cmp -s "$1" "$2" && [ "$(stat -c %04a "$2")" = "$3" ] && return 1
    return 0
}

install_file() {  # SRC DEST MODE
    if differs "$1" "$2" "$3"; then
        run install -D -m "$3" "$1" "$2"
    else
        note "up to date: $2"
    fi
}

install_link() {  # TARGET LINK: a relative symlink
    if [ "$(readlink "$2" 2>/dev/null)" = "$1" ]; then
        note "up to date: $2"
    else
        run mkdir -p "$(dirname "$2")"
        run ln -sfn "$1" "$2"
    fi
}

remove_file() {
    if [ -e "$1" ] || [ -L "$1" ]; then run rm -f "$1"; fi
}

# propose_size: set PROPOSED (e.g. 9G) and PROPOSED_WHY from GPU 0's memory: total minus
# 1 GiB (3 GiB if it drives a display), at least 1 GiB.  Fails without nvidia-smi.
PROPOSED=""
PROPOSED_WHY=""
propose_size() {
    local line total display mib headroom=1024 what="drives no display"
    command -v nvidia-smi >/dev/null || return 1
    line=$(nvidia-smi --query-gpu=memory.total,display_active --format=csv,noheader,nounits -i 0 2>/dev/null | head -n 1) || return 1
    total=${line%%,*}; total=${total//[[:space:]]/}
    display=${line#*,}; display=${display//[[:space:]]/}
    [[ $total =~ ^[0-9]+$ ]] || return 1
    if [ "$display" = Enabled ]; then headroom=3072; what="drives a display"; fi
    mib=$(( total - headroom ))
    PROPOSED_WHY="GPU 0 has $total MiB and $what: total minus $(( headroom / 1024 )) GiB"
    if (( mib < 1024 )); then
        mib=1024
        PROPOSED_WHY="GPU 0 has only $total MiB: the 1 GiB minimum"
    fi
    if (( mib % 1024 == 0 )); then PROPOSED="$(( mib / 1024 ))G"; else PROPOSED="${mib}M"; fi
    note "proposed size: $PROPOSED ($PROPOSED_WHY)"
}

valid_size() {  # the daemon's own parser decides (with the least min_size: see below_min_size)
    python3 "$SRC/nbd_vram.py" check-config --config /dev/null --size "$1" --min-size 64M >/dev/null
}

below_min_size() {  # SIZE is smaller than min_size's default (1G): the config then needs min_size = SIZE
    ! python3 "$SRC/nbd_vram.py" check-config --config /dev/null --size "$1" >/dev/null 2>&1
}

# settings_of FILE: the settings FILE gives, every key, as nbd_vram.py reads them (so comments, blank
# lines and how a value is spelt do not count); nothing if FILE is not a valid configuration.
settings_of() {
    python3 -c 'import importlib.util as u, sys
spec = u.spec_from_file_location("nbd_vram", sys.argv[1])
nv = u.module_from_spec(spec)
spec.loader.exec_module(nv)
print(sorted(nv.load_config(sys.argv[2], environ={})[0].items()))' "$SRC/nbd_vram.py" "$1" 2>/dev/null || true
}

# config_is_current: CONF, up to the block install.sh appended, sets what the shipped file sets.  It is
# then the shipped file of this version, or of an earlier one that differs in comments only (every key
# is documented in nbd-vram.conf(5) as well), or its edits changed no setting: not worth a .new.
config_is_current() {
    local mine
    awk -v m="$MARK" '$0 == m {exit} {print}' "$CONF" >"$TMP/conf-before-mark"
    mine=$(settings_of "$TMP/conf-before-mark")
    [ -n "$mine" ] && [ "$mine" = "$(settings_of "$SRC/nbd-vram.conf")" ]
}

# The first-install config: the shipped file plus the size and the power answer.
write_first_config() {
    local out=$TMP/nbd-vram.conf size=$SIZE why="chosen with --size" power=$POWER answer
    if [ -z "$size" ]; then
        if propose_size; then
            size=$PROPOSED
            why="proposed by install.sh: $PROPOSED_WHY"
        else
            note "nvidia-smi could not tell the GPU's memory: no size proposed"
        fi
        if [ -t 0 ] && (( ! YES )); then
            while :; do
                read -r -p "VRAM to use as swap [${size:-7G (the default)}]: " answer
                if [ -z "$answer" ]; then break; fi
                if valid_size "$answer"; then size=$answer; why="chosen at install"; break; fi
            done
        elif [ -n "$size" ]; then
            note "using the proposed size (--yes, or standard input is not a terminal; --size chooses another)"
        else
            note "keeping the default size (7G); pass --size to choose"
        fi
    fi
    if [ -n "$size" ]; then valid_size "$size" || die "--size $size is not usable (see the message above)"; fi
    if [ -z "$power" ]; then
        power=no
        if [ -t 0 ] && (( ! YES )); then
            read -r -p "Turn on power-aware management (stop VRAM swap on battery, start it on AC)? [y/N]: " answer
            case $answer in [yY]*) power=yes ;; esac
        fi
    fi
    {
        cat "$SRC/nbd-vram.conf"
        echo
        echo "$MARK"
        if [ -n "$size" ]; then
            echo "# size: $why."
            echo "size = $size"
            if below_min_size "$size"; then
                echo "min_size = $size"
            fi
        fi
        if [ "$power" = yes ]; then
            echo "# power management: asked by install.sh (power = always turns it off)."
            echo "power = ac"
        fi
    } >"$out"
    note "first install: size ${size:-7G (the default)}, power management $power"
    run install -D -m 0644 "$out" "$CONF"
}

install_config() {
    if [ ! -e "$CONF" ]; then
        write_first_config
        return
    fi
    if [ -n "$SIZE" ] || [ -n "$POWER" ]; then
        note "$CONF exists: --size and --power-management only apply on first install; edit the file instead"
    fi
    if config_is_current; then
        note "up to date: $CONF"
    elif differs "$SRC/nbd-vram.conf" "$CONF.new" 0644; then
        run install -m 0644 "$SRC/nbd-vram.conf" "$CONF.new"
        note "kept your $CONF; the shipped one is $CONF.new: compare them and merge what you want"
    else
        note "kept your $CONF; the shipped one is already $CONF.new"
    fi
    if (( ! DRY )) && ! python3 "$SRC/nbd_vram.py" check-config --config "$CONF" >/dev/null; then
        CONF_BAD=1
        echo "install.sh: warning: $CONF is not valid for this version (left by the original nbd-vram?); fix it or replace it with $CONF.new" >&2
    fi
}

# The udev rule: every power_supply change (AC plugged or not, battery level) wakes the daemon at
# once instead of at its next poll.  `nbd_vram.py power-event` signals only a daemon that is up and
# has its signals blocked, so an event at any moment is harmless.
write_udev_rule() {
    cat >"$TMP/$UDEV_RULE" <<EOF
# nbd-vram (installed by install.sh): tell the daemon the power supply changed.
SUBSYSTEM=="power_supply", ACTION=="change", RUN+="/usr/local/bin/nbd_vram.py power-event"
EOF
}

reload_udev() {
    if [ -z "$ROOT" ] && command -v udevadm >/dev/null; then run udevadm control --reload || true; fi
}

systemctl_offline() {  # enable/disable in the staging root
    run systemctl --root="$ROOT" "$@"
}

# service_files_differ: installing would change the service's files (a running service is stopped first)
service_files_differ() {
    if [ "$INIT" = openrc ]; then
        differs "$SRC/openrc/nbd-vram.initd" "$INITD" 0755 || differs "$SRC/openrc/nbd-vram.sleep" "$SLEEP_HOOK" 0755
    else
        differs "$SRC/$UNIT" "$UNITDIR/$UNIT" 0644 || differs "$SRC/$SLEEP_UNIT" "$UNITDIR/$SLEEP_UNIT" 0644
    fi
}

install_service_files() {
    if [ "$INIT" = systemd ]; then
        install_file "$SRC/$UNIT" "$UNITDIR/$UNIT" 0644
        install_file "$SRC/$SLEEP_UNIT" "$UNITDIR/$SLEEP_UNIT" 0644
        return
    fi
    install_file "$SRC/openrc/nbd-vram.initd" "$INITD" 0755
    install_file "$SRC/openrc/nbd-vram.sleep" "$SLEEP_HOOK" 0755
    # conf.d is the admin's, as /etc/nbd-vram.conf is: never overwritten
    if [ ! -e "$CONFD" ]; then
        install_file "$SRC/openrc/nbd-vram.confd" "$CONFD" 0644
    elif cmp -s "$SRC/openrc/nbd-vram.confd" "$CONFD"; then
        note "up to date: $CONFD"
    elif differs "$SRC/openrc/nbd-vram.confd" "$CONFD.new" 0644; then
        run install -m 0644 "$SRC/openrc/nbd-vram.confd" "$CONFD.new"
        note "kept your $CONFD; the shipped one is $CONFD.new"
    fi
    if [ -z "$ROOT" ] && [ -d /etc/elogind ] && ! grep -Eqs '^[[:space:]]*AllowSuspendInterrupts[[:space:]]*=[[:space:]]*yes' /etc/elogind/sleep.conf /etc/elogind/sleep.conf.d/*.conf; then
        echo "install.sh: warning: elogind lets the machine sleep even when the release of VRAM swap fails (the GPU's pages would be lost): set AllowSuspendInterrupts=yes in /etc/elogind/sleep.conf" >&2
    fi
}

enable_service() {
    if (( ! ENABLE )); then
        note "not enabling the service (--no-enable)"
        return
    fi
    case $INIT:$SYSTEMD:$OPENRC in
        systemd:live:*)
            run systemctl daemon-reload
            # reenable: an older sleep unit was WantedBy=sleep.target, this one is RequiredBy=
            run systemctl enable "$UNIT" && run systemctl reenable "$SLEEP_UNIT" ;;
        systemd:offline:*)
            systemctl_offline enable "$UNIT" && systemctl_offline reenable "$SLEEP_UNIT" ;;
        systemd:none:*)
            if [ -n "$ROOT" ]; then note "systemctl not found: units not enabled in $ROOT"; fi ;;
        openrc:*:live)
            if [ -L "$RUNLEVEL_LINK" ]; then note "up to date: $SERVICE is in the default runlevel"; else run rc-update add "$SERVICE" default; fi ;;
        openrc:*:none)
            # what rc-update add does: a link in the runlevel's directory
            if [ "$(readlink "$RUNLEVEL_LINK" 2>/dev/null)" = "/etc/init.d/$SERVICE" ]; then
                note "up to date: $RUNLEVEL_LINK"
            else
                run mkdir -p "$(dirname "$RUNLEVEL_LINK")"
                run ln -sfn "/etc/init.d/$SERVICE" "$RUNLEVEL_LINK"
            fi ;;
    esac
}

do_uninstall() {
    require_root
    note "uninstalling nbd-vram${ROOT:+ from $ROOT}"
    stop_service
    if [ -e "$UNITDIR/$UNIT" ] || [ -e "$UNITDIR/$SLEEP_UNIT" ]; then
        case $SYSTEMD in
            live) run systemctl disable "$UNIT" "$SLEEP_UNIT" ;;
            offline) systemctl_offline disable "$UNIT" "$SLEEP_UNIT" ;;
        esac
    fi
    remove_file "$UNITDIR/$SLEEP_UNIT"
    remove_file "$UNITDIR/$UNIT"
    # OpenRC's files, whichever init runs now (a machine may have moved from one to the other)
    if [ "$OPENRC" = live ] && [ -L "$RUNLEVEL_LINK" ]; then run rc-update del "$SERVICE" default; fi
    remove_file "$RUNLEVEL_LINK"
    remove_file "$INITD"
    remove_file "$SLEEP_HOOK"
    remove_file "$RULE"
    reload_udev
    remove_file "$BIN"
    remove_file "$DOC"
    remove_file "$LINK"
    remove_file "$MAN8"
    remove_file "$MAN8_LINK"
    remove_file "$MAN5"
    remove_file "$COMPLETION"
    remove_file "$COMPLETION_LINK"
    if [ -d "$(dirname "$DOC")" ]; then run rmdir --ignore-fail-on-non-empty "$(dirname "$DOC")"; fi
    if [ "$SYSTEMD" = live ]; then
        run systemctl daemon-reload
        systemctl reset-failed "$UNIT" "$SLEEP_UNIT" 2>/dev/null || true
    fi
    if [ -z "$ROOT" ]; then
        remove_file "$RUNDIR/sleep-stopped"     # left by versions whose sleep unit stopped the service
        remove_file "$RUNDIR/sleeping"
        local pid
        pid=$(daemon_pid)
        if [ -n "$pid" ]; then
            echo "install.sh: warning: an nbd-vram daemon (pid $pid) still serves swap: stop it with kill -TERM $pid (it swapoffs first)" >&2
        fi
    fi
    if (( PURGE )); then
        remove_file "$CONF"
        remove_file "$CONF.new"
        remove_file "$CONFD"
        remove_file "$CONFD.new"
    else
        if [ -e "$CONF" ]; then note "kept $CONF (--purge removes it)"; fi
        if [ -e "$CONFD" ]; then note "kept $CONFD (--purge removes it)"; fi
    fi
    note "nbd-vram is uninstalled"
}

do_install() {
    require_root
    local f
    for f in nbd_vram.py nbd-vram.conf "$UNIT" "$SLEEP_UNIT" openrc/nbd-vram.initd openrc/nbd-vram.confd openrc/nbd-vram.sleep \
             docs/nbd-vram.8 docs/nbd-vram.conf.5 docs/nbd-vram.bash-completion; do
        [ -f "$SRC/$f" ] || die "$SRC/$f is missing: run install.sh from a complete nbd-vram checkout"
    done
    command -v python3 >/dev/null || die "python3 is not installed (nbd_vram.py needs Python 3)"
    for f in mkswap swapon swapoff; do
        command -v "$f" >/dev/null || die "$f is not installed (install util-linux)"
    done
    # grep without -q: -q exits at the first match, and ldconfig's SIGPIPE fails the pipeline under pipefail
    if (( ! CHECKS )); then
        note "--no-checks: not checking this machine for the NVIDIA driver and the nbd module"
    elif ! { ldconfig -p 2>/dev/null | grep 'libcuda\.so\.1' >/dev/null; } && ! command -v nvidia-smi >/dev/null; then
        die "no NVIDIA driver: libcuda.so.1 is not in the linker cache (ldconfig -p) and nvidia-smi is not installed; install the NVIDIA driver first"
    fi
    if (( CHECKS )) && [ ! -d /sys/module/nbd ] && ! modprobe -n nbd >/dev/null 2>&1; then
        die "this kernel has no nbd module (modprobe -n nbd fails): install your distribution's extra kernel modules (e.g. linux-modules-extra-$(uname -r)), or build CONFIG_BLK_DEV_NBD"
    fi
    if [ -e "$UNITDIR/vram-swap-nbd-suspend.service" ]; then
        echo "install.sh: warning: the original nbd-vram's vram-swap-nbd-suspend.service is installed; $SLEEP_UNIT replaces it: remove it (systemctl disable --now vram-swap-nbd-suspend.service)" >&2
    fi
    note "installing nbd-vram from $SRC${ROOT:+ into $ROOT}"

    stop_stray_daemon
    local changed=0 inplace=0
    if service_files_differ; then
        changed=1
        stop_service
    elif differs "$SRC/nbd_vram.py" "$BIN" 0755; then
        # Only the program changed: a running daemon that can re-execute itself keeps swap on
        # (`nbd_vram.py upgrade`); anything else is stopped (a full swapoff) and started again.
        if service_active && (( START )) && [ "$(state_key handover)" = True ]; then
            inplace=1
        else
            changed=1
            stop_service
        fi
    fi
    install_file "$SRC/nbd_vram.py" "$BIN" 0755
    install_service_files
    write_udev_rule
    if differs "$TMP/$UDEV_RULE" "$RULE" 0644; then
        install_file "$TMP/$UDEV_RULE" "$RULE" 0644
        reload_udev
    fi
    if [ -f "$SRC/README.md" ]; then install_file "$SRC/README.md" "$DOC" 0644; fi
    install_link nbd_vram.py "$LINK"
    install_file "$SRC/docs/nbd-vram.8" "$MAN8" 0644
    install_file "$SRC/docs/nbd-vram.conf.5" "$MAN5" 0644
    printf '.so man8/nbd-vram.8\n' >"$TMP/nbd_vram.py.8"      # man nbd_vram.py shows the same page
    install_file "$TMP/nbd_vram.py.8" "$MAN8_LINK" 0644
    install_file "$SRC/docs/nbd-vram.bash-completion" "$COMPLETION" 0644
    install_link nbd_vram.py "$COMPLETION_LINK"
    CONF_BAD=0
    install_config

    enable_service
    # The name and the commands of the service, for the lines below.
    local svc=$UNIT start="systemctl start $UNIT" restart="systemctl restart $UNIT" logs="journalctl -u $UNIT"
    if [ "$INIT" = openrc ]; then
        svc=$SERVICE start="rc-service $SERVICE start" restart="rc-service $SERVICE restart" logs="/var/log/nbd-vram.log"
    fi
    if [ "$SYSTEMD" != live ] && [ "$OPENRC" != live ]; then
        if [ -n "$ROOT" ]; then note "staging root: nothing started or stopped"; fi
    elif (( inplace )); then
        note "upgrading the running daemon in place: swap stays on, the new version takes its VRAM over"
        run "$BIN" upgrade || die "the in-place upgrade failed (see above and $logs); $restart starts the new version after a full swapoff"
    elif (( ! START )); then
        if (( changed )); then
            note "not starting $svc (--no-start); if it was running, it is now stopped"
        else
            note "not starting $svc (--no-start)"
        fi
    elif (( CONF_BAD )); then
        note "not starting $svc: fix $CONF first, then: $start"
    elif [ "$INIT" = openrc ] && openrc_active; then
        note "$svc is running and nothing of it changed"
    else
        note "starting $svc (allocates VRAM, attaches /dev/nbdX, swapon)"
        if [ "$INIT" = openrc ]; then
            run rc-service "$SERVICE" start || die "$SERVICE failed to start: see the line above and $logs"
        elif ! run systemctl start "$UNIT"; then
            systemctl --no-pager status "$UNIT" 2>&1 | tail -n 15 >&2 || true
            die "$UNIT failed to start: see $logs"
        fi
    fi
    if [ -z "$ROOT" ] && command -v swapon >/dev/null; then run swapon --show; fi
    note "done"
}

if (( UNINSTALL )); then do_uninstall; else do_install; fi
