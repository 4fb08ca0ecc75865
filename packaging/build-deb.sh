#!/usr/bin/env bash
# Builds the iothub .deb from this checkout without touching it: copies the source tree to a
# scratch directory, puts packaging/debian there as debian/, runs dpkg-buildpackage in it and
# copies the results to OUT_DIR (default: build/deb). No sudo: install the build dependencies
# first (see packaging/README).
#
#   packaging/build-deb.sh                              native build, tests included
#   DEB_BUILD_OPTIONS=nocheck packaging/build-deb.sh    without the unit tests
#   packaging/build-deb.sh -aarm64 -Pcross,nocheck      Raspberry Pi 64-bit (cross)
#   packaging/build-deb.sh -aarmhf -Pcross,nocheck      Raspberry Pi 32-bit (cross)
#   (packaging/cross.sh ARCH also installs the cross packages, lints and tests under qemu-user)
#
# Arguments are passed to dpkg-buildpackage, after the defaults -b -us -uc.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT_DIR:-$top/build/deb}
version=$(cat "$top/VERSION")

work=$(mktemp -d "${TMPDIR:-/tmp}/iothub-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/iothub-$version
mkdir -p "$src"

# The tree as it is (committed or not), without build outputs, VCS data or Node modules.
tar -C "$top" \
	--exclude=./.git --exclude=./build --exclude=./build-asan --exclude=./build-fuzz \
	--exclude=./debian --exclude=node_modules \
	-cf - . | tar -C "$src" -xf -
cp -a "$top/packaging/debian" "$src/debian"

(cd "$src" && dpkg-buildpackage -b -us -uc "$@")

mkdir -p "$out"
shopt -s nullglob
files=("$work"/*.deb "$work"/*.ddeb "$work"/*.buildinfo "$work"/*.changes)
cp -a "${files[@]}" "$out/"
for f in "${files[@]}"; do echo "$out/${f##*/}"; done
