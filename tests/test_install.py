"""System integration files: the systemd units, the shipped config, install.sh and the shell tests.

Needs no GPU, no nbd and no running systemd: `systemd-analyze verify` runs against a
throwaway root, and install.sh installs into a staging root with stubbed nvidia-smi and
modprobe.  .ci/run installs systemd and shellcheck (apt-get install -y systemd shellcheck).
"""
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "nbd_vram.py"
UNITS = ["vram-swap-nbd.service", "vram-swap-nbd-sleep.service"]
CONF = ROOT / "nbd-vram.conf"
INSTALL = ROOT / "install.sh"
OUR_SCRIPTS = ["install.sh", "test_smoke.sh", "test_fill.sh"]
SYSTEM_UNIT_DIRS = ["/usr/lib/systemd/system", "/lib/systemd/system"]


def clean_env(**extra):
    """The environment without settings that would override the config under test."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NBD_VRAM_", "VRAM_"))}
    env.update(extra)
    return env


# -- systemd units ------------------------------------------------------------------------------

def unit_lines(name):
    return (ROOT / name).read_text().splitlines()


def directives(name):
    """[(section, key, value)] of a unit file."""
    out, section = [], None
    for line in unit_lines(name):
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("["):
            section = s.strip("[]")
            continue
        key, _, value = s.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def analyze_root(tmp_path, units):
    """A root that systemd-analyze verify can load the units from: the host's unit
    directory (for the targets they name), the units, and an ExecStart stub."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    for d in SYSTEM_UNIT_DIRS:
        if os.path.isdir(d) and not os.path.islink(d):
            shutil.copytree(d, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
            break
    for tool in ("sh", "kill"):       # ExecStart=/bin/sh -c, ExecReload=/bin/kill
        shutil.copy(f"/bin/{tool}", root / "usr/bin" / tool)
    stub = root / "usr/local/bin/nbd_vram.py"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unitdir = root / "etc/systemd/system"
    unitdir.mkdir(parents=True)
    for name, text in units.items():
        (unitdir / name).write_text(text)
    return root


def verify(tmp_path, units):
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze is not installed (apt-get install -y systemd)")
    root = analyze_root(tmp_path, units)
    p = subprocess.run([exe, "verify", "--man=no", f"--root={root}", *units], capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""))
    if "unrecognized option" in p.stderr:
        pytest.skip(f"this systemd-analyze has no verify --root: {p.stderr.strip()}")
    return p


def test_units_pass_systemd_analyze_verify(tmp_path):
    p = verify(tmp_path, {name: (ROOT / name).read_text() for name in UNITS})
    out = (p.stdout + p.stderr).strip()
    assert p.returncode == 0 and not out, f"systemd-analyze verify (exit {p.returncode}):\n{out}"


def test_systemd_analyze_verify_catches_errors(tmp_path):
    """The check above has teeth: a misspelt key in our unit is reported."""
    broken = (ROOT / UNITS[0]).read_text().replace("\nType=notify", "\nTyp=notify")
    p = verify(tmp_path, {UNITS[0]: broken})
    assert "Typ" in p.stdout + p.stderr


@pytest.mark.parametrize("name", UNITS)
def test_every_unit_line_has_a_comment(name):
    lines = unit_lines(name)
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith(("#", "[")):
            continue
        assert i and lines[i - 1].startswith("#"), f"{name}:{i + 1}: {line!r} has no comment above it saying why"


def test_main_unit_settings():
    d = {(s, k): v for s, k, v in directives("vram-swap-nbd.service")}
    want = {
        ("Service", "Type"): "notify",
        ("Service", "NotifyAccess"): "main",
        ("Service", "ExecStart"): "/usr/local/bin/nbd_vram.py run",
        ("Service", "Environment"): "PYTHONMALLOC=malloc",
        ("Service", "ExecStartPre"): "-/usr/bin/nvidia-smi -pm 1",
        ("Service", "LimitMEMLOCK"): "infinity",
        ("Service", "OOMScoreAdjust"): "-1000",
        ("Service", "TimeoutStopSec"): "1800",
        ("Service", "TimeoutStartSec"): "600",
        ("Service", "SendSIGKILL"): "no",
        ("Service", "KillMode"): "process",
        ("Service", "Restart"): "on-failure",
        ("Service", "RestartSec"): "10",
        ("Service", "FileDescriptorStoreMax"): "16",
        ("Unit", "Wants"): "nvidia-persistenced.service",
        ("Install", "WantedBy"): "multi-user.target",
    }
    for key, value in want.items():
        assert d.get(key) == value, f"{key}: {d.get(key)!r}, want {value!r}"
    after = d[("Unit", "After")].split()
    for unit in ("display-manager.service", "nvidia-persistenced.service", "systemd-modules-load.service"):
        assert unit in after
    assert d[("Unit", "Documentation")]
    for forbidden in ("MemoryMax", "DynamicUser", "PrivateDevices", "RuntimeDirectory"):
        assert not any(k == forbidden for _, k, _ in directives("vram-swap-nbd.service")), forbidden


def test_sleep_unit_settings():
    d = {(s, k): v for s, k, v in directives("vram-swap-nbd-sleep.service")}
    assert d[("Unit", "StopWhenUnneeded")] == "yes"
    assert d[("Service", "Type")] == "oneshot" and d[("Service", "RemainAfterExit")] == "yes"
    before = d[("Unit", "Before")].split()
    for unit in ("sleep.target", "systemd-suspend.service", "systemd-hibernate.service",
                 "nvidia-suspend.service", "nvidia-hibernate.service"):
        assert unit in before
    assert d[("Service", "ExecStart")] == "/usr/local/bin/nbd_vram.py sleep"
    assert d[("Service", "ExecStop")] == "/usr/local/bin/nbd_vram.py wake"
    # Required: a failed release (swapoff impossible) fails sleep.target, so the machine stays awake.
    assert d[("Install", "RequiredBy")] == "sleep.target"
    assert ("Install", "WantedBy") not in d


def test_main_unit_reload_checks_the_file_then_sends_sighup():
    """systemctl reload fails on a bad file (check-config, as OpenRC's reload does) and only then
    signals the daemon: systemd 252 has no Type=notify-reload for the daemon to answer with."""
    reloads = [v for s, k, v in directives("vram-swap-nbd.service") if (s, k) == ("Service", "ExecReload")]
    assert reloads == ["/bin/sh -c 'exec /usr/local/bin/nbd_vram.py check-config >/dev/null'",
                       "/bin/kill -HUP $MAINPID"]
    initd = (ROOT / "openrc/nbd-vram.initd").read_text()
    assert "check-config" in initd.split("reload()", 1)[1], "OpenRC's reload checks the file too"


def test_reload_check_fails_on_a_bad_file_and_passes_a_good_one(tmp_path):
    """What ExecReload's first command does with a bad and a good file: exit non-zero with the
    one-line error on stderr (the journal and `systemctl status` show it), and exit 0 silently."""
    conf = tmp_path / "nbd-vram.conf"
    conf.write_text(CONF.read_text() + "battery_threshold = 0\n")
    cmd = ["/bin/sh", "-c", f"exec {sys.executable} {SCRIPT} check-config >/dev/null"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(NBD_VRAM_CONFIG=str(conf)))
    assert p.returncode == 4 and not p.stdout, p
    assert "battery_threshold: 0 is outside 1..99" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    conf.write_text(CONF.read_text() + "battery_threshold = 30\n")
    p = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(NBD_VRAM_CONFIG=str(conf)))
    assert p.returncode == 0 and not p.stdout and not p.stderr.strip(), p


def security_exposure(tmp_path, name, text=None):
    """systemd-analyze security --offline=true of a unit file: (overall exposure, full output)."""
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze is not installed (apt-get install -y systemd)")
    path = tmp_path / name
    path.write_text((ROOT / name).read_text() if text is None else text)
    p = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(path)], capture_output=True, text=True,
                       env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", SYSTEMD_COLORS="0"))
    out = p.stdout + p.stderr
    if "--offline" in out and ("unrecognized" in out or "Unknown" in out):
        pytest.skip(f"this systemd-analyze has no security --offline (systemd 250 or newer): {out.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, f"no exposure level in systemd-analyze security (exit {p.returncode}):\n{out}"
    return float(m.group(1)), out


# The issue asks for at most 5.5 (4.7 with the sandbox shipped: no directive that makes a mount
# namespace, see the next test).  The sleep unit only signals the daemon: 1.5 with its sandbox.
@pytest.mark.parametrize("name,most", [("vram-swap-nbd.service", 5.5), ("vram-swap-nbd-sleep.service", 2.0)])
def test_units_are_hardened(tmp_path, name, most):
    level, out = security_exposure(tmp_path, name)
    assert level <= most, f"{name}: exposure {level} > {most}:\n{out}"


# Each of these gives the daemon a mount namespace of its own: its swapon then holds /dev/nbdX through
# a mount of that namespace, which goes with the dead daemon's last worker in a crash restart's
# takeover, and /proc/swaps names the device /nbdX from then on (the new daemon no longer finds its
# swap: commit 66dcaaf's sandbox lost the swap in tests/vm/guest-systemd.sh's restart in 3 of 3 boots).
MOUNT_NAMESPACE_KEYS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts", "PrivateDevices", "PrivateNetwork", "PrivateIPC",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountImages",
    "ExtensionImages", "ExtensionDirectories", "MountFlags", "MountAPIVFS", "LogNamespace", "DynamicUser",
    "NetworkNamespacePath", "IPCNamespacePath", "JoinsNamespaceOf",
}


def test_main_unit_makes_no_mount_namespace():
    found = [f"{k}={v}" for s, k, v in directives("vram-swap-nbd.service") if k in MOUNT_NAMESPACE_KEYS]
    assert not found, f"these give the daemon a mount namespace of its own: {found}"


def test_main_unit_alias():
    assert [v for s, k, v in directives("vram-swap-nbd.service") if k == "Alias"] == ["nbd-vram.service"]


def test_sleep_unit_carries_the_daemon_journal_tag():
    tags = {name: [v for s, k, v in directives(name) if (s, k) == ("Service", "SyslogIdentifier")] for name in UNITS}
    assert tags == {"vram-swap-nbd.service": ["nbd-vram"], "vram-swap-nbd-sleep.service": ["nbd-vram"]}


# -- the shipped configuration ---------------------------------------------------------------

KEY_LINE = re.compile(r"^#([a-z_]+) = (.*)$")


def check_config(path):
    return subprocess.run([sys.executable, str(SCRIPT), "check-config", "--config", str(path)],
                          capture_output=True, text=True, env=clean_env())


def test_shipped_conf_is_valid_as_is():
    p = check_config(CONF)
    assert p.returncode == 0, p.stderr
    assert all(line.rstrip().endswith("# default") for line in p.stdout.splitlines()), p.stdout


def test_shipped_conf_lists_every_key_at_its_default(nv):
    text = CONF.read_text()
    keys = {}
    for line in text.splitlines():
        m = KEY_LINE.match(line)
        if m:
            assert m.group(1) not in keys, f"{m.group(1)} listed twice"
            keys[m.group(1)] = m.group(2)
    assert list(keys) == [o.key for o in nv.OPTIONS], "keys missing, unknown or out of order"
    for o in nv.OPTIONS:
        assert keys[o.key] == o.default, f"{o.key}: shown as {keys[o.key]!r}, default is {o.default!r}"
        block = text.split(f"#{o.key} = ")[0].rsplit("\n\n", 1)[-1]
        assert f"Default: {o.default}" in block, f"{o.key}: no 'Default: {o.default}' above it"
    assert "check-config" in text and "precedence" in text.lower()


def test_shipped_conf_is_valid_fully_uncommented(tmp_path):
    text = CONF.read_text()
    uncommented = re.sub(r"(?m)^#([a-z_]+ = )", r"\1", text)
    conf = tmp_path / "all.conf"
    conf.write_text(uncommented)
    p = check_config(conf)
    assert p.returncode == 0, p.stderr
    origins = [line.rsplit("# ", 1)[1] for line in p.stdout.splitlines()]
    assert origins and all(o.startswith(str(conf)) for o in origins), p.stdout


# -- install.sh --------------------------------------------------------------------------------

def make_stubs(tmp_path, nvidia_smi="8192, Disabled", modprobe_rc=0):
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        (stubs / "nvidia-smi").write_text(f'#!/bin/sh\necho "{nvidia_smi}"\n')
    (stubs / "modprobe").write_text(f"#!/bin/sh\nexit {modprobe_rc}\n")
    for f in stubs.iterdir():
        f.chmod(0o755)
    return stubs


def install(staging, stubs, *args, path=None, script=INSTALL):
    env = clean_env(PATH=f"{stubs}:{path or os.environ['PATH']}", NBD_VRAM_RUNTIME_DIR=str(staging) + ".run")
    return subprocess.run(["bash", str(script), "--root", str(staging), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env)


def tree(root):
    """{relative path: (kind, mode, content hash or link target)} of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", None, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), None)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


BIN = "usr/local/bin/nbd_vram.py"
UNIT_PATHS = [f"etc/systemd/system/{u}" for u in UNITS]
ETC_CONF = "etc/nbd-vram.conf"


def test_install_into_staging_root(tmp_path):
    staging = tmp_path / "staging"
    stubs = make_stubs(tmp_path)
    p = install(staging, stubs, "--yes", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr
    t = tree(staging)
    assert t[BIN][:2] == ("file", 0o755)
    assert (staging / BIN).read_bytes() == SCRIPT.read_bytes()
    for rel, name in zip(UNIT_PATHS, UNITS):
        assert t[rel][:2] == ("file", 0o644)
        assert (staging / rel).read_bytes() == (ROOT / name).read_bytes()
    assert t[ETC_CONF][:2] == ("file", 0o644)
    conf = (staging / ETC_CONF).read_text()
    assert conf.startswith(CONF.read_text())
    assert "\nsize = 7G\n" in conf               # 8192 MiB, no display: minus 1 GiB
    assert "\npower = " not in conf              # not asked (--yes): power = always, the default
    assert not (staging / (ETC_CONF + ".new")).exists()
    c = check_config(staging / ETC_CONF)
    assert c.returncode == 0, c.stderr
    assert re.search(r"^size\s+= 7G\s+# .*nbd-vram.conf:\d+$", c.stdout, re.M), c.stdout
    assert "+ install" in p.stdout                # each step echoed, ukify style
    if shutil.which("systemctl"):
        assert t.get("etc/systemd/system/multi-user.target.wants/vram-swap-nbd.service", ("",))[0] == "link"
        assert t.get("etc/systemd/system/sleep.target.requires/vram-swap-nbd-sleep.service", ("",))[0] == "link"
        # Alias=: enable makes the short name (`systemctl status nbd-vram`)
        assert t.get("etc/systemd/system/nbd-vram.service", ("",))[0] == "link"
    rule = (staging / "etc/udev/rules.d/90-nbd-vram-power.rules").read_text()
    assert 'SUBSYSTEM=="power_supply", ACTION=="change", RUN+="/usr/local/bin/nbd_vram.py power-event"' in rule
    # the other name, the manual pages (man nbd_vram.py shows nbd-vram(8)), the bash completion for both names
    assert t["usr/local/bin/nbd-vram"] == ("link", None, "nbd_vram.py")
    for rel, src in (("usr/local/share/man/man8/nbd-vram.8", "docs/nbd-vram.8"),
                     ("usr/local/share/man/man5/nbd-vram.conf.5", "docs/nbd-vram.conf.5"),
                     ("usr/local/share/bash-completion/completions/nbd_vram.py", "docs/nbd-vram.bash-completion")):
        assert t[rel][:2] == ("file", 0o644) and (staging / rel).read_bytes() == (ROOT / src).read_bytes(), rel
    assert (staging / "usr/local/share/man/man8/nbd_vram.py.8").read_text() == ".so man8/nbd-vram.8\n"
    assert t["usr/local/share/bash-completion/completions/nbd-vram"] == ("link", None, "nbd_vram.py")

    again = install(staging, stubs, "--yes", "--no-start")
    assert again.returncode == 0, again.stdout + again.stderr
    assert tree(staging) == t, "a second install changed the tree"
    assert "+ install" not in again.stdout


@pytest.mark.parametrize("smi, want", [("12288, Enabled", "9G"), ("3000, Enabled", "1G"), ("6000, Disabled", "4976M")])
def test_install_proposes_size_from_gpu(tmp_path, smi, want):
    staging = tmp_path / "staging"
    p = install(staging, make_stubs(tmp_path, nvidia_smi=smi), "--yes", "--no-start", "--no-enable")
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"\nsize = {want}\n" in (staging / ETC_CONF).read_text()


def test_install_size_and_power_flags(tmp_path):
    staging = tmp_path / "staging"
    p = install(staging, make_stubs(tmp_path), "--size", "3G", "--power-management", "yes", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr
    conf = (staging / ETC_CONF).read_text()
    assert "\nsize = 3G\n" in conf and "\npower = ac\n" in conf
    c = check_config(staging / ETC_CONF)
    assert c.returncode == 0 and re.search(r"^power\s+= ac\s", c.stdout, re.M), c.stdout + c.stderr
    bad = install(tmp_path / "other", make_stubs(tmp_path), "--size", "lots", "--no-start")
    assert bad.returncode != 0 and "lots" in bad.stderr
    assert not (tmp_path / "other" / ETC_CONF).exists()


def test_install_small_size_sets_min_size(tmp_path):
    """A size under min_size's default (1G) would make the config invalid: install.sh adds min_size."""
    staging = tmp_path / "staging"
    p = install(staging, make_stubs(tmp_path), "--size", "512M", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr
    conf = (staging / ETC_CONF).read_text()
    assert "\nsize = 512M\nmin_size = 512M\n" in conf
    c = check_config(staging / ETC_CONF)
    assert c.returncode == 0, c.stdout + c.stderr


def test_install_keeps_existing_config(tmp_path):
    staging = tmp_path / "staging"
    (staging / "etc").mkdir(parents=True)
    mine = "# mine\npriority = 10\n"
    (staging / ETC_CONF).write_text(mine)
    stubs = make_stubs(tmp_path)
    p = install(staging, stubs, "--yes", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (staging / ETC_CONF).read_text() == mine
    new = staging / (ETC_CONF + ".new")
    assert new.read_bytes() == CONF.read_bytes() and stat.S_IMODE(new.stat().st_mode) == 0o644
    assert ".new" in p.stdout
    t = tree(staging)
    again = install(staging, stubs, "--yes", "--no-start")
    assert again.returncode == 0
    assert tree(staging) == t, "a second install changed the tree"


def test_install_config_new_only_for_a_change_of_settings(tmp_path):
    """A new shipped nbd-vram.conf whose comments changed leaves a config as install.sh wrote it alone: no
    .new; one that sets something gives a .new, and so does an edited config, as before."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "__pycache__", "tests", "bench", "packaging"))
    staging, stubs = tmp_path / "staging", make_stubs(tmp_path)
    conf, new, shipped = staging / ETC_CONF, staging / (ETC_CONF + ".new"), src / "nbd-vram.conf"
    assert install(staging, stubs, "--yes", "--no-start", script=src / "install.sh").returncode == 0
    installed = conf.read_text()
    assert "\nsize = 7G\n" in installed

    text = shipped.read_text()
    reworded = text.replace("Unknown keys and keys set twice are errors.", "Unknown keys, and keys set\n# twice, "
                            "are errors.").replace("\n\n#", "\n\n# A new paragraph.\n#", 1) + "\n# The end.\n"
    assert reworded.count("\n") > text.count("\n") + 2
    shipped.write_text(reworded)
    p = install(staging, stubs, "--yes", "--no-start", script=src / "install.sh")
    assert p.returncode == 0, p.stdout + p.stderr
    assert conf.read_text() == installed and not new.exists(), p.stdout
    assert f"up to date: {conf}" in p.stdout

    shipped.write_text(reworded + "power = ac\n")
    p = install(staging, stubs, "--yes", "--no-start", script=src / "install.sh")
    assert p.returncode == 0 and conf.read_text() == installed, p.stdout + p.stderr
    assert new.read_text() == reworded + "power = ac\n" and "compare them" in p.stdout
    new.unlink()

    shipped.write_text(text)
    conf.write_text(installed.replace("\n#priority = 1500\n", "\npriority = 10\n"))
    p = install(staging, stubs, "--yes", "--no-start", script=src / "install.sh")
    assert p.returncode == 0 and "priority = 10\n" in conf.read_text(), p.stdout + p.stderr
    assert new.read_text() == text


def test_install_warns_about_an_invalid_existing_config(tmp_path):
    staging = tmp_path / "staging"
    (staging / "etc").mkdir(parents=True)
    (staging / ETC_CONF).write_text("VRAM_POWER_MANAGEMENT=0\n")
    p = install(staging, make_stubs(tmp_path), "--yes", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "not valid" in p.stderr


def test_uninstall_keeps_config_unless_purge(tmp_path):
    staging = tmp_path / "staging"
    stubs = make_stubs(tmp_path)
    assert install(staging, stubs, "--yes", "--no-start").returncode == 0
    p = install(staging, stubs, "--uninstall")
    assert p.returncode == 0, p.stdout + p.stderr
    t = tree(staging)
    for rel in [BIN, *UNIT_PATHS, "etc/udev/rules.d/90-nbd-vram-power.rules"]:
        assert rel not in t
    assert not [rel for rel in t if rel.endswith(("/vram-swap-nbd.service", "/vram-swap-nbd-sleep.service",
                                                  "/nbd-vram.service"))]
    assert ETC_CONF in t and "kept" in p.stdout
    again = install(staging, stubs, "--uninstall")
    assert again.returncode == 0 and tree(staging) == t
    purge = install(staging, stubs, "--uninstall", "--purge")
    assert purge.returncode == 0 and ETC_CONF not in tree(staging)


OPENRC_FILES = {"etc/init.d/nbd-vram": ("openrc/nbd-vram.initd", 0o755),
                "etc/conf.d/nbd-vram": ("openrc/nbd-vram.confd", 0o644),
                "etc/elogind/system-sleep/nbd-vram": ("openrc/nbd-vram.sleep", 0o755)}


def test_install_for_openrc_into_staging_root(tmp_path):
    """--init openrc: the init script, its conf.d and the elogind sleep hook instead of the units, in the
    default runlevel as rc-update puts it there; the admin's conf.d is never overwritten; --uninstall
    removes the rest, --purge the configuration too."""
    staging = tmp_path / "staging"
    stubs = make_stubs(tmp_path)
    p = install(staging, stubs, "--init", "openrc", "--yes", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr
    t = tree(staging)
    for rel, (src, mode) in OPENRC_FILES.items():
        assert t[rel][:2] == ("file", mode), rel
        assert (staging / rel).read_bytes() == (ROOT / src).read_bytes()
    assert t["etc/runlevels/default/nbd-vram"] == ("link", None, "/etc/init.d/nbd-vram")
    assert t[BIN][:2] == ("file", 0o755) and ETC_CONF in t and "etc/udev/rules.d/90-nbd-vram-power.rules" in t
    assert not [rel for rel in t if "systemd" in rel]
    again = install(staging, stubs, "--init", "openrc", "--yes", "--no-start")
    assert again.returncode == 0 and tree(staging) == t and "+ " not in again.stdout, again.stdout

    (staging / "etc/conf.d/nbd-vram").write_text("start_timeout=900\n")          # the admin's own
    p = install(staging, stubs, "--init", "openrc", "--yes", "--no-start")
    assert p.returncode == 0 and (staging / "etc/conf.d/nbd-vram").read_text() == "start_timeout=900\n"
    assert (staging / "etc/conf.d/nbd-vram.new").read_bytes() == (ROOT / "openrc/nbd-vram.confd").read_bytes()

    un = install(staging, stubs, "--uninstall")
    assert un.returncode == 0, un.stdout + un.stderr
    t = tree(staging)
    assert not [rel for rel in ("etc/init.d/nbd-vram", "etc/elogind/system-sleep/nbd-vram",
                                "etc/runlevels/default/nbd-vram", BIN) if rel in t]
    assert "etc/conf.d/nbd-vram" in t and "kept" in un.stdout
    purge = install(staging, stubs, "--uninstall", "--purge")
    assert purge.returncode == 0
    assert not [rel for rel in tree(staging) if rel.startswith("etc/conf.d/nbd-vram") or rel == ETC_CONF]


def test_install_init_choice_is_checked(tmp_path):
    p = install(tmp_path / "staging", make_stubs(tmp_path), "--init", "runit")
    assert p.returncode == 1 and p.stderr.strip() == "install.sh: error: --init takes systemd or openrc, not 'runit'"
    assert not (tmp_path / "staging").exists()


def test_install_dry_run_changes_nothing(tmp_path):
    staging = tmp_path / "staging"
    p = install(staging, make_stubs(tmp_path), "--dry-run", "--yes")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "+ install" in p.stdout
    assert not staging.exists() or not any(staging.iterdir())


def system_path_without(tool):
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if shutil.which(tool, path=path):
        pytest.skip(f"{tool} is installed on this machine")
    return path


def test_install_refuses_without_nvidia_driver(tmp_path):
    stubs = make_stubs(tmp_path, nvidia_smi=None)
    path = system_path_without("nvidia-smi")
    ldconfig = shutil.which("ldconfig", path=path)
    if ldconfig and "libcuda.so.1" in subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout:
        pytest.skip("this machine has libcuda.so.1")
    p = install(tmp_path / "staging", stubs, "--yes", "--no-start", path=path)
    assert p.returncode != 0 and "no NVIDIA driver" in p.stderr, p.stderr
    assert not (tmp_path / "staging").exists()


def test_install_refuses_without_nbd(tmp_path):
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has nbd loaded")
    p = install(tmp_path / "staging", make_stubs(tmp_path, modprobe_rc=1), "--yes", "--no-start")
    assert p.returncode != 0 and "no nbd module" in p.stderr, p.stderr
    assert not (tmp_path / "staging").exists()


def run_unprivileged(script, *args, env=None):
    """Run a copy of one of our scripts as nobody (or as ourselves when not root).  The copy
    lives in a world-readable directory: the checkout may sit below a directory that only
    root can enter."""
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if not setpriv:
            pytest.skip("running as root and setpriv is missing")
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    d = tempfile.mkdtemp(prefix="nbd-vram-unpriv.")
    try:
        os.chmod(d, 0o755)
        copy = shutil.copy(ROOT / script, d)
        os.chmod(copy, 0o755)
        return subprocess.run([*prefix, "bash", copy, *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, cwd=d, env=env)
    finally:
        shutil.rmtree(d)


def test_install_refuses_without_root(tmp_path):
    p = run_unprivileged("install.sh", "--yes", env=clean_env(PATH=f"{make_stubs(tmp_path)}:{os.environ['PATH']}"))
    assert p.returncode != 0 and "must run as root" in p.stderr, p.stdout + p.stderr


def test_install_help_and_bad_option():
    assert subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True).returncode == 0
    p = subprocess.run(["bash", str(INSTALL), "--bogus"], capture_output=True, text=True)
    assert p.returncode == 2 and "--bogus" in p.stderr


# -- shell scripts -------------------------------------------------------------------------------

def shell_scripts():
    """Every shell script in the checkout: *.sh and .ci/run."""
    found = sorted({p for p in ROOT.rglob("*.sh") if ".git" not in p.parts}
                   | ({ROOT / ".ci/run"} if (ROOT / ".ci/run").exists() else set()))
    return [str(p.relative_to(ROOT)) for p in found]


@pytest.mark.parametrize("script", shell_scripts())
def test_bash_n(script):
    p = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", shell_scripts())
def test_shellcheck(script):
    """Ours must be clean; the rest must have no errors (warnings are their owners' call)."""
    exe = shutil.which("shellcheck")
    if not exe:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    args = [] if script in OUR_SCRIPTS else ["--severity=error"]
    p = subprocess.run([exe, "--shell=bash", *args, str(ROOT / script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", ["openrc/nbd-vram.initd", "openrc/nbd-vram.sleep"])
def test_openrc_scripts_are_clean_posix_sh(script):
    """OpenRC runs its scripts with /bin/sh (dash, busybox): shellcheck as sh, with its own directives."""
    exe = shutil.which("shellcheck")
    if not exe:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    p = subprocess.run([exe, "--shell=sh", str(ROOT / script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert os.access(ROOT / script, os.X_OK)
    assert "# SPDX-License-Identifier: MIT" in (ROOT / script).read_text()


@pytest.mark.parametrize("script", OUR_SCRIPTS)
def test_script_conventions(script):
    text = (ROOT / script).read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert lines[1].startswith(f"# {script}: "), "the first comment line says what it is"
    assert "set -euo pipefail" in text
    assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    if script.startswith("test_"):
        assert "exit 77" in text


@pytest.mark.parametrize("script", ["test_smoke.sh", "test_fill.sh"])
def test_shell_tests_skip_without_root(script):
    p = run_unprivileged(script, *(["auto"] if script == "test_fill.sh" else []))
    assert p.returncode == 77 and "SKIP" in p.stdout, p.stdout + p.stderr


# -- install.sh --uninstall on a live systemd: the stop's progress -------------------------------

STUB_SYSTEMCTL = """#!/bin/sh
# systemctl as install.sh --uninstall uses it, for the daemon whose pid is in $STUB_PID: is-active
# while it runs; stop is its SIGTERM (a swapoff, then it exits), waited for as systemctl waits.
case "$1" in
    is-active) kill -0 "$(cat "$STUB_PID")" 2>/dev/null && { echo active; exit 0; }; echo inactive; exit 3 ;;
    stop) pid=$(cat "$STUB_PID"); kill -TERM "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done ;;
esac
exit 0
"""


@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter")),
                    reason="needs root and unshare/nsenter (a mount namespace where systemd looks booted)")
def test_uninstall_shows_the_stop_progress_under_systemd(tmp_path, fakecuda):
    """`systemctl stop` is a swapoff that prints nothing for minutes: install.sh --uninstall shows the
    daemon's own progress line every 10 s while it waits.  systemd is played by a mount namespace with
    /run/systemd/system and a systemctl stub; the daemon is `run` under tests/power_harness.py, whose
    swapoff (the daemon's own, through a fake swapoff command) takes 11 s with 64 MiB on the device."""
    from conftest import Namespace
    ns = Namespace(tmp_path, overlays=("/etc", "/usr/local"))
    try:
        rt, stubs = tmp_path / "rt", make_stubs(tmp_path)
        (stubs / "systemctl").write_text(STUB_SYSTEMCTL)
        (stubs / "systemctl").chmod(0o755)
        conf = tmp_path / "nbd-vram.conf"
        conf.write_text("size = 64M\nmin_size = 64M\nconnections = 2\nworkers = 1\npower = always\nbuffer_size = 256K\n")
        env = dict(clean_env(), PATH=f"{stubs}:{os.environ['PATH']}", NBD_VRAM_RUNTIME_DIR=str(rt),
                   STUB_PID=str(tmp_path / "pid"))
        daemon_env = dict(env, NBD_VRAM_LIBCUDA=fakecuda, NBD_VRAM_CONFIG=str(conf), NBD_VRAM_CUINIT_TRIES="1",
                          HARNESS_EVENTS=str(tmp_path / "events"), NBD_VRAM_SYSFS_ROOT=str(tmp_path / "sys"),
                          HARNESS_SWAPOFF_S="11", HARNESS_SWAP_USED_KIB="65536", PYTHONUNBUFFERED="1")
        # Started from a shell that exits at once: the daemon is nobody's child here (no zombie for
        # kill -0 to see after it ends), as under systemd.
        ns.run("sh", "-c", f"mkdir -p /run/systemd/system && {sys.executable} {ROOT / 'tests' / 'power_harness.py'} run "
                           f">{tmp_path / 'daemon.log'} 2>&1 & echo $! >{tmp_path / 'pid'}", env=daemon_env)
        for _ in range(300):
            try:
                if json.loads((rt / "state.json").read_text()).get("ready"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the daemon did not get ready: " + (tmp_path / "daemon.log").read_text())
        un = ns.run("bash", INSTALL, "--uninstall", env=env, timeout=120)
        assert un.returncode == 0, un.out
        assert "+ systemctl stop vram-swap-nbd.service" in un.out, un.out
        assert re.search(r"^install.sh: stopping: swapoff /dev/nbd-harness\S*, \d+ MiB left.* \(1\d s\)$", un.out, re.M), un.out
        assert "swapoff /dev/nbd-harness" in (tmp_path / "events").read_text()
    finally:
        ns.close()
