#!/usr/bin/env bash
# packaging/build.sh: nbd-vram's packages, built from this checkout with no build service.
# SPDX-License-Identifier: MIT
#
#   packaging/build.sh deb [--version V] [--out DIR]
#       a .deb: install.sh's staging tree (--root) moved to the paths a package owns, with
#       maintainer scripts that start the service, upgrade it in place and stop it (swapoff) on removal
#   packaging/build.sh pkgbuild [--out DIR]
#       an Arch Linux PKGBUILD and the source tarball it names (makepkg builds the package from them)
#   packaging/build.sh stage DEST [--layout debian|arch]
#       the package's file tree under DEST (the PKGBUILD's package() runs this)
#
# The packages carry the systemd units; OpenRC users install with install.sh (--init openrc): a
# script of OpenRC's in /etc/init.d would also be picked up by systemd's sysv generator.
set -euo pipefail
umask 022

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=nbd-vram

die() { echo "packaging/build.sh: error: $*" >&2; exit 1; }
note() { echo "packaging/build.sh: $*"; }

usage() { sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

version() { python3 "$SRC/nbd_vram.py" --version | awk '{print $NF}'; }

# stage DEST LAYOUT: install.sh --root into a scratch tree, then every file moved to where a
# package installs it (/usr, not /usr/local; units and udev rules under the distribution's lib
# directory), the paths inside the units and the udev rule changed to match, and the shipped
# configuration file as /etc/nbd-vram.conf (install.sh writes a first-install one with a size
# proposed from this machine's GPU).  A path this does not know about is an error: the package
# must carry what install.sh installs, no more and no less.
stage() {
    local dest=$1 layout=$2 tmp lib rel to f
    case $layout in
        debian) lib=lib ;;          # Debian 12 packages put units and udev rules under /lib
        arch) lib=usr/lib ;;
        *) die "--layout takes debian or arch, not '$layout'" ;;
    esac
    tmp=$(mktemp -d)
    bash "$SRC/install.sh" --root "$tmp/root" --init systemd --yes --no-start --no-enable --no-checks >"$tmp/install.log" 2>&1 ||
        { cat "$tmp/install.log" >&2; die "install.sh --root failed"; }
    mkdir -p "$dest"
    while IFS= read -r rel; do
        case $rel in
            usr/local/bin/*) to=usr/bin/${rel#usr/local/bin/} ;;
            usr/local/share/*) to=usr/share/${rel#usr/local/share/} ;;
            etc/systemd/system/*.service) to=$lib/systemd/system/${rel#etc/systemd/system/} ;;
            etc/udev/rules.d/*) to=$lib/udev/rules.d/${rel#etc/udev/rules.d/} ;;
            etc/nbd-vram.conf) to=$rel; cp "$SRC/nbd-vram.conf" "$tmp/root/$rel" ;;
            *) die "install.sh installed $rel, which this script does not know where to put in a package" ;;
        esac
        if [ -L "$tmp/root/$rel" ]; then          # (install.sh's links are relative, within one directory)
            mkdir -p "$(dirname "$dest/$to")"
            ln -sfn "$(readlink "$tmp/root/$rel")" "$dest/$to"
            continue
        fi
        install -D -m "$(stat -c %a "$tmp/root/$rel")" "$tmp/root/$rel" "$dest/$to"
        case $to in
            *.service|*.rules)
                sed -i -e 's#/usr/local/bin/#/usr/bin/#g' -e 's#/usr/local/share/doc/#/usr/share/doc/#g' "$dest/$to" ;;
            usr/share/man/*)
                if [ "$layout" = debian ]; then gzip -9n "$dest/$to"; fi ;;      # (makepkg compresses its own)
        esac
    done < <(cd "$tmp/root" && find . \( -type f -o -type l \) ! -path './etc/systemd/system/*.*/*' | sed 's#^\./##' | sort)
    for f in "$dest/$lib/systemd/system/"*.service "$dest/$lib/udev/rules.d/"*; do
        ! grep -q /usr/local "$f" || die "$f still names /usr/local"
    done
    rm -rf "$tmp"
}

deb() {
    local version=$1 out=$2 pkg ctl
    pkg=$(mktemp -d)/$NAME
    stage "$pkg" debian
    ctl=$pkg/DEBIAN
    mkdir -p "$ctl"
    # /usr/share/doc: the copyright file and a changelog, as every Debian package has
    local doc=$pkg/usr/share/doc/$NAME
    { echo "nbd-vram: NVIDIA VRAM as Linux swap."; echo; cat "$SRC/LICENSE"; } >"$doc/copyright"
    printf '%s (%s) unstable; urgency=medium\n\n  * Built from the checkout by packaging/build.sh.\n\n -- %s  %s\n' \
        "$NAME" "$version" "nbd-vram developers <nbd-vram@users.noreply.github.com>" \
        "$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$SRC" log -1 --format=%ct 2>/dev/null || date +%s)}")" |
        gzip -9n >"$doc/changelog.gz"
    chmod 0644 "$doc/copyright" "$doc/changelog.gz"
    gzip -9n "$doc/README.md"
    cat >"$ctl/control" <<EOF
Package: $NAME
Version: $version
Architecture: all
Maintainer: nbd-vram developers <nbd-vram@users.noreply.github.com>
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: python3 (>= 3.9), kmod
Recommends: cryptsetup-bin
Section: admin
Priority: optional
Description: NVIDIA GPU memory (VRAM) as high-priority Linux swap
 A small daemon allocates VRAM through the CUDA driver API, serves it over
 the NBD protocol to the kernel's nbd driver and makes the /dev/nbdX device
 swap, above zram and disk. For laptops with soldered RAM and an idle GPU, and
 any machine whose VRAM sits idle. Needs the NVIDIA driver (libcuda.so.1).
EOF
    echo /etc/nbd-vram.conf >"$ctl/conffiles"
    install -m 0755 "$SRC/packaging/debian/postinst" "$SRC/packaging/debian/prerm" "$SRC/packaging/debian/postrm" "$ctl/"
    (cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) >"$ctl/md5sums"
    chmod 0644 "$ctl/control" "$ctl/conffiles" "$ctl/md5sums"
    mkdir -p "$out"
    dpkg-deb --root-owner-group -Zxz --build "$pkg" "$out/${NAME}_${version}_all.deb" >/dev/null
    rm -rf "$(dirname "$pkg")"
    note "built $out/${NAME}_${version}_all.deb"
}

pkgbuild() {
    local out=$1 version tarball sum
    version=$(version)
    mkdir -p "$out"
    tarball=$out/$NAME-$version.tar.gz
    # What git tracks or would track, as it is in the checkout (uncommitted changes included); no git:
    # every file but the build's output.
    (cd "$SRC" && { git ls-files -z --cached --others --exclude-standard 2>/dev/null ||
                    find . -path ./packaging/out -prune -o -type f -printf '%P\0'; } |
        sort -zu | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) |
        tar -C "$SRC" --null -T - --transform "s#^#$NAME-$version/#" --owner=0 --group=0 --sort=name -czf "$tarball"
    sum=$(sha256sum "$tarball" | cut -d' ' -f1)
    sed -e "s/@VERSION@/$version/" -e "s/@SHA256@/$sum/" "$SRC/packaging/arch/PKGBUILD.in" >"$out/PKGBUILD"
    install -m 0644 "$SRC/packaging/arch/$NAME.install" "$out/$NAME.install"
    note "wrote $out/PKGBUILD, $out/$NAME.install and $tarball (makepkg -si in $out builds and installs it)"
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
cmd=$1; shift
case $cmd in
    deb)
        command -v dpkg-deb >/dev/null || die "dpkg-deb is not installed (apt-get install dpkg)"
        version="" out=$SRC/packaging/out
        while (( $# )); do
            case $1 in
                --version) [ $# -ge 2 ] || die "--version needs a value"; version=$2; shift ;;
                --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift ;;
                *) die "unknown option '$1' (see --help)" ;;
            esac
            shift
        done
        deb "${version:-$(version)}" "$(realpath -m "$out")" ;;
    pkgbuild)
        out=$SRC/packaging/out
        if [ "${1:-}" = --out ]; then [ $# -ge 2 ] || die "--out needs a directory"; out=$2; fi
        pkgbuild "$(realpath -m "$out")" ;;
    stage)
        [ $# -ge 1 ] || die "stage needs a destination directory"
        dest=$1 layout=debian; shift
        if [ "${1:-}" = --layout ]; then [ $# -ge 2 ] || die "--layout needs debian or arch"; layout=$2; fi
        stage "$(realpath -m "$dest")" "$layout" ;;
    -h|--help) usage ;;
    *) echo "packaging/build.sh: unknown command '$cmd' (deb, pkgbuild or stage; see --help)" >&2; exit 2 ;;
esac
