"""packaging/build.sh: the .deb (built with dpkg-deb, checked by lintian, installed, upgraded to a
rebuilt version and purged by dpkg) and the Arch PKGBUILD (built by makepkg from Debian's makepkg
package).  dpkg runs in a mount namespace with overlays on /etc, /usr and /var (tests/conftest.py
Namespace): the host's package database and files do not change.  Without systemd running there
the maintainer scripts only enable the units (deb-systemd-helper); the kernel guest under systemd
installs the same .deb with the service running (tests/vm/guest-systemd.sh, part deb).
"""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, Namespace

BUILD = ROOT / "packaging" / "build.sh"
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "nbd_vram.py").read_text(), re.M).group(1)
# What the packages hold: install.sh's files at a package's paths (Debian 12 keeps units and udev rules
# under /lib), plus Debian's copyright and changelog.
SHARED = {"usr/bin/nbd_vram.py", "usr/bin/nbd-vram", "usr/share/bash-completion/completions/nbd_vram.py",
          "usr/share/bash-completion/completions/nbd-vram", "etc/nbd-vram.conf"}
DEB_FILES = SHARED | {"lib/systemd/system/vram-swap-nbd.service", "lib/systemd/system/vram-swap-nbd-sleep.service",
                      "lib/udev/rules.d/90-nbd-vram-power.rules", "usr/share/doc/nbd-vram/README.md.gz",
                      "usr/share/doc/nbd-vram/changelog.gz", "usr/share/doc/nbd-vram/copyright",
                      "usr/share/man/man8/nbd-vram.8.gz", "usr/share/man/man8/nbd_vram.py.8.gz",
                      "usr/share/man/man5/nbd-vram.conf.5.gz"}
ARCH_FILES = SHARED | {"usr/lib/systemd/system/vram-swap-nbd.service", "usr/lib/systemd/system/vram-swap-nbd-sleep.service",
                       "usr/lib/udev/rules.d/90-nbd-vram-power.rules", "usr/share/doc/nbd-vram/README.md",
                       "usr/share/licenses/nbd-vram/LICENSE", "usr/share/man/man8/nbd-vram.8.gz",
                       "usr/share/man/man8/nbd_vram.py.8.gz", "usr/share/man/man5/nbd-vram.conf.5.gz"}
# lintian's remaining tag, with its reason (docs/PACKAGING.md):
LINTIAN_ACCEPTED = {
    "script-with-language-extension",   # nbd_vram.py is the program's documented name (nbd-vram is the other)
}

needs_dpkg = pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")


def build_deb(out, version=None):
    p = subprocess.run(["bash", str(BUILD), "deb", "--out", str(out), *(["--version", version] if version else [])],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    debs = list(out.glob(f"nbd-vram_{version or VERSION}_all.deb"))
    assert len(debs) == 1, list(out.iterdir())
    return debs[0]


@needs_dpkg
def test_deb_holds_the_installed_files_at_package_paths_and_lintian_accepts_it(tmp_path):
    deb = build_deb(tmp_path)
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    files = {(line.split(" -> ")[0] if " -> " in line else line).split()[-1].removeprefix("./")
             for line in listing.splitlines() if not line.startswith("d")}
    assert files == DEB_FILES
    assert "/usr/local" not in subprocess.run(
        ["sh", "-c", f"dpkg-deb --fsys-tarfile {deb} | tar -xO ./lib/systemd/system/vram-swap-nbd.service "
                     "./lib/systemd/system/vram-swap-nbd-sleep.service ./lib/udev/rules.d/90-nbd-vram-power.rules"],
        capture_output=True, text=True, check=True).stdout
    info = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, check=True).stdout
    assert f"Version: {VERSION}\n" in info and "Architecture: all\n" in info
    assert subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True).stdout
    conffiles = subprocess.run(["sh", "-c", f"dpkg-deb --ctrl-tarfile {deb} | tar -xO ./conffiles"],
                               capture_output=True, text=True, check=True).stdout
    assert conffiles.split() == ["/etc/nbd-vram.conf"]
    if not shutil.which("lintian"):
        pytest.skip("lintian is not installed (apt-get install lintian)")
    p = subprocess.run(["lintian", "--tag-display-limit", "0", str(deb)], capture_output=True, text=True, timeout=300)
    tags = {m.group(1) for m in re.finditer(r"^[EWIX]: nbd-vram: (\S+)", p.stdout, re.M)}
    assert tags <= LINTIAN_ACCEPTED, p.stdout
    assert not re.search(r"^E: ", p.stdout, re.M), p.stdout


@needs_dpkg
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_deb_installs_upgrades_to_a_rebuilt_version_and_purges(tmp_path):
    v1 = build_deb(tmp_path / "v1")
    v2 = build_deb(tmp_path / "v2", f"{VERSION}+rebuilt1")
    ns = Namespace(tmp_path, overlays=("/etc", "/usr", "/var"))
    try:
        p = ns.run("dpkg", "-i", v1)
        assert p.returncode == 0, p.out
        for f in DEB_FILES:
            assert ns.run("test", "-e", "/" + f).returncode == 0, f
        assert ns.run("nbd_vram.py", "--version").stdout.strip() == f"nbd-vram {VERSION}"
        # enabled as on a first install: the units' [Install] links
        for link in ("multi-user.target.wants/vram-swap-nbd.service", "sleep.target.requires/vram-swap-nbd-sleep.service"):
            assert ns.run("test", "-L", f"/etc/systemd/system/{link}").returncode == 0, link
        check = ns.run("nbd_vram.py", "check-config", "--config", "/etc/nbd-vram.conf")
        assert check.returncode == 0, check.out

        # the admin's edit of the conffile survives the upgrade, without a question
        ns.run("sh", "-c", "echo 'size = 3G' >> /etc/nbd-vram.conf")
        p = ns.run("dpkg", "-i", v2)
        assert p.returncode == 0, p.out
        assert "Configuration file '/etc/nbd-vram.conf'" not in p.out
        assert ns.run("dpkg-query", "-W", "-f", "${Version}", "nbd-vram").stdout == f"{VERSION}+rebuilt1"
        assert "size = 3G" in ns.run("cat", "/etc/nbd-vram.conf").stdout

        p = ns.run("dpkg", "--purge", "nbd-vram")
        assert p.returncode == 0, p.out
        for f in DEB_FILES:
            assert ns.run("test", "-e", "/" + f).returncode != 0, f
        left = ns.run("sh", "-c", "find /etc/systemd /var/lib/systemd -name '*vram-swap-nbd*' 2>/dev/null").stdout
        assert not left.strip(), left
        assert ns.run("dpkg-query", "-W", "nbd-vram").returncode != 0
    finally:
        ns.close()


@pytest.mark.skipif(not shutil.which("makepkg") or not shutil.which("bsdtar"),
                    reason="needs makepkg and bsdtar (apt-get install makepkg libarchive-tools)")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run makepkg as nobody (makepkg refuses root)")
def test_pkgbuild_builds_with_makepkg():
    # (not under tmp_path: makepkg runs as nobody, who cannot enter pytest's root-only directory)
    work = Path(tempfile.mkdtemp(prefix="nbd-vram-makepkg-"))
    try:
        check_pkgbuild(work / "arch")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_pkgbuild(out):
    p = subprocess.run(["bash", str(BUILD), "pkgbuild", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {f.name for f in out.iterdir()} == {"PKGBUILD", "nbd-vram.install", f"nbd-vram-{VERSION}.tar.gz"}
    out.parent.chmod(0o755)
    shutil.chown(out, "nobody")
    for f in out.iterdir():
        shutil.chown(f, "nobody")
    b = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env", f"HOME={out}",
                        "PATH=/usr/bin:/bin", "makepkg", "--nodeps", "--noconfirm"],
                       cwd=out, capture_output=True, text=True, timeout=300)
    pkgs = list(out.glob(f"nbd-vram-{VERSION}-1-any.pkg.tar.*"))
    assert b.returncode == 0 and len(pkgs) == 1, b.stdout + b.stderr      # (the sha256 in PKGBUILD was checked)
    listing = subprocess.run(["bsdtar", "-tf", str(pkgs[0])], capture_output=True, text=True, check=True).stdout
    assert {f for f in listing.split() if not f.endswith("/") and not f.startswith(".")} == ARCH_FILES
    info = subprocess.run(["bsdtar", "-xOf", str(pkgs[0]), ".PKGINFO"], capture_output=True, text=True,
                          check=True).stdout
    assert f"pkgver = {VERSION}-1\n" in info and "backup = etc/nbd-vram.conf\n" in info
    assert "post_upgrade()" in subprocess.run(["bsdtar", "-xOf", str(pkgs[0]), ".INSTALL"], capture_output=True,
                                              text=True, check=True).stdout
