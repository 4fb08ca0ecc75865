#!/usr/bin/env bash
# Raspberry Pi packages, cross-built on amd64 and tested under qemu-user:
#
#   packaging/cross.sh arm64     # Raspberry Pi OS / Debian 64-bit
#   packaging/cross.sh armhf     # 32-bit
#
# 1. Installs what it lacks (as root; otherwise prints the commands and stops): the foreign
#    architecture in dpkg, crossbuild-essential-ARCH, the -dev packages for ARCH,
#    qemu-user-static, debhelper, lintian. The :ARCH -dev packages are Multi-Arch: same and sit
#    next to the amd64 ones without replacing them (they must be the same version: apt upgrades
#    the amd64 twin if it lags).
# 2. Builds the .deb with packaging/build-deb.sh -aARCH -Pcross,nocheck (into OUT_DIR, default
#    build/deb) and runs packaging/lintian.sh on it.
# 3. Builds the unit tests (cmocka) and the fuzz corpus replay with the cross compiler, in
#    build/ARCH, and runs them under qemu-user ("qemu-aarch64-static -L /": the libraries are
#    the multiarch ones in /usr/lib/ARCH-triplet; TESTBED.md says why not -L /usr/<triplet>).
#    test-hubkey and test-tokenstore start the host's swtpm (a native process exec'd from the
#    emulated one) and talk to it over TCP on 127.0.0.1.
#
# Every step is bounded (timeout); the whole run takes about 3 minutes on 2 cores, apt aside.
# Prints the time of each step and the size of the package.
set -euo pipefail

arch=${1:-}
case "$arch" in
arm64) triplet=aarch64-linux-gnu qemu=qemu-aarch64-static ;;
armhf) triplet=arm-linux-gnueabihf qemu=qemu-arm-static ;;
*)
	echo "usage: $0 arm64|armhf" >&2
	exit 2
	;;
esac

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
out=${OUT_DIR:-$top/build/deb}
version=$(cat VERSION)

# The -dev packages of packaging/debian/control's Build-Depends (cmocka for the unit tests).
dev_pkgs="libcurl4-openssl-dev libssl-dev libtss2-dev libmosquitto-dev libsystemd-dev
	libjansson-dev libinih-dev libsqlite3-dev libqrencode-dev libcmocka-dev pkg-config"
# debhelper (13.11 in bookworm) provides dh-sequence-installsysusers.
host_pkgs="crossbuild-essential-$arch qemu-user-static debhelper scdoc lintian swtpm"
want=()
for p in $dev_pkgs; do want+=("$p:$arch"); done
for p in $host_pkgs; do want+=("$p"); done

step_start=$SECONDS
step() {
	echo "== cross $arch: $*"
	step_start=$SECONDS
}
step_done() { echo "== cross $arch: done in $((SECONDS - step_start)) s"; }

step "packages"
missing=()
for p in "${want[@]}"; do
	st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[ "$st" = installed ] || missing+=("$p")
done
# (Not `dpkg ... | grep -q`: grep's early exit would fail the pipe under pipefail.)
foreign=$(dpkg --print-foreign-architectures)
if ! grep -qx "$arch" <<<"$foreign" || [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "missing: ${missing[*]:-(architecture $arch)}. As root:" >&2
		echo "  dpkg --add-architecture $arch && apt-get update" >&2
		echo "  apt-get install -y --no-install-recommends ${want[*]}" >&2
		exit 1
	fi
	dpkg --add-architecture "$arch"
	export DEBIAN_FRONTEND=noninteractive
	timeout 300 apt-get update -qq
	# --no-install-recommends: debhelper alone recommends ~270 packages.
	timeout 900 apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
step_done

step "package build (dpkg-buildpackage -a$arch -Pcross,nocheck)"
# CC for dpkg-architecture's check (it warns when $CC is the build machine's compiler);
# debian/rules takes the same one from buildtools.mk.
CC=$triplet-gcc DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:+$DEB_BUILD_OPTIONS }nocheck" OUT_DIR=$out \
	timeout 900 packaging/build-deb.sh -a"$arch" -Pcross,nocheck
step_done
deb=$out/iothub_${version}_$arch.deb
# The package must hold binaries for the target, not for the build machine: e_machine, the
# 16-bit field at offset 18 of the ELF header, is 183 (AArch64) or 40 (ARM).
case "$arch" in
arm64) want_machine=183 ;;
armhf) want_machine=40 ;;
esac
x=$(mktemp -d)
dpkg-deb -x "$deb" "$x"
for bin in usr/sbin/iothubd usr/bin/iothubctl usr/libexec/iothub/iothub-signer; do
	machine=$(od -An -tu2 -j18 -N2 "$x/$bin" | tr -d ' ')
	if [ "$machine" != "$want_machine" ]; then
		echo "$deb: $bin has ELF machine ${machine:-(missing)}, not $want_machine" >&2
		rm -rf "$x"
		exit 1
	fi
done
rm -rf "$x"
echo "== cross $arch: $deb $(stat -c %s "$deb") bytes (installed size $(dpkg-deb -f "$deb" Installed-Size) KiB)"

step "lintian"
packaging/lintian.sh "$out/iothub_${version}_$arch.changes"
step_done

step "unit tests and fuzz corpus replay under $qemu"
# The test binaries built as the package build builds (same Makefile, flags probed against the
# cross compiler), with WERROR=1 as in CI. Each binary gets at most 600 s under emulation
# (test-hubkey, the slowest, takes ~60 s on arm64).
timeout 1800 nice -n 10 make -j"$(nproc)" BUILD="build/$arch" WERROR=1 \
	CC="$triplet-gcc" PKG_CONFIG="$triplet-pkg-config" \
	TEST_RUNNER="timeout 600 $qemu -L /" unit fuzz-corpus
step_done
echo "== cross $arch: passed"
