#!/usr/bin/env bash
# Builds (once) and caches the guest root file systems of `make system-test` under $1:
#   $1/rootfs      minbase bookworm with systemd, udev, tpm-udev, mosquitto-clients and the
#                  shared libraries iothub links against (so that `apt install ./iothub.deb` in
#                  the guest needs no network), booted with systemd-nspawn;
#   $1/vm/         the same plus linux-image-amd64, a small initrd (MODULES=list), vmlinuz,
#                  initrd.img and an ext4 image root.img for QEMU.
# A directory is reused while its stamp file is current, so only the first run pays for debootstrap.
# The Debian mirror is the one in /etc/apt/sources.list(.d) (the only archive CI can reach).
set -euo pipefail

cache=${1:?usage: rootfs.sh CACHE_DIR [vm]}
want_vm=${2:-}
mkdir -p "$cache"

mirror() {
	local m
	# deb822 (.sources) and one-line (.list) formats; the first main archive that is not -security.
	m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
		sed -n -e 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)\/\{0,1\}[[:space:]]*$/\1/p' \
			-e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]\{1,\}\)\{0,1\}\(http[^[:space:]]*\/debian\)\/\{0,1\}[[:space:]]\{1,\}bookworm[[:space:]].*/\2/p' |
		head -n1)
	[ -n "$m" ] || { echo "rootfs.sh: no Debian mirror in /etc/apt/sources.list(.d)" >&2; exit 1; }
	echo "$m"
}

# Runtime libraries of iothubd/iothubctl (what dpkg-shlibdeps gives the package) and the
# user's tools. Listed here so that the package installs offline in the guest.
PKGS=systemd,systemd-sysv,dbus,udev,procps,tpm-udev,mosquitto-clients,jq,libcurl4,libssl3,\
libtss2-esys-3.0.2-0,libtss2-tctildr0,libtss2-rc0,libtss2-mu0,libtss2-tcti-device0,\
libtss2-tcti-swtpm0,libmosquitto1,libjansson4,libinih1,libsqlite3-0,libqrencode4

root=$cache/rootfs
# The stamp holds the package list: a changed list rebuilds the root file system (and the VM's).
if [ "$(cat "$cache/rootfs.stamp" 2>/dev/null)" != "$PKGS" ]; then
	rm -rf "$root" "$cache/vm.stamp"
	m=$(mirror)
	echo "# debootstrap bookworm from $m into $root"
	t0=$(date +%s)
	debootstrap --variant=minbase --include="$PKGS" bookworm "$root" "$m" >"$cache/debootstrap.log" 2>&1 ||
		{ tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }
	# apt in the guest resolves the package's dependencies from what is installed; no lists needed.
	rm -rf "$root"/var/cache/apt/archives/*.deb
	# Each booted copy gets a fresh machine id (nspawn --ephemeral keeps the file otherwise).
	: >"$root/etc/machine-id"
	echo "# debootstrap took $(($(date +%s) - t0)) s"
	echo "$PKGS" >"$cache/rootfs.stamp"
fi

[ "$want_vm" = vm ] || exit 0

vm=$cache/vm
if [ ! -e "$cache/vm.stamp" ]; then
	rm -rf "$vm"
	mkdir -p "$vm"
	t0=$(date +%s)
	cp -a "$root" "$vm/rootfs"
	r=$vm/rootfs
	m=$(mirror)
	echo "deb $m bookworm main" >"$r/etc/apt/sources.list"
	mkdir -p "$r/etc/initramfs-tools"
	# Only what this VM needs: a small initrd, quick to build and to load under TCG.
	mkdir -p "$r/etc/initramfs-tools/conf.d"
	echo "MODULES=list" >"$r/etc/initramfs-tools/conf.d/modules.conf"
	printf '%s\n' virtio_pci virtio_blk ext4 >"$r/etc/initramfs-tools/modules"
	# systemd-nspawn as a chroot that has /proc and /dev: apt and the kernel's postinst need them.
	systemd-nspawn -q --register=no --keep-unit -D "$r" --setenv=DEBIAN_FRONTEND=noninteractive \
		sh -c 'apt-get update -q && apt-get install -y -q --no-install-recommends linux-image-amd64 initramfs-tools && apt-get clean && rm -rf /var/lib/apt/lists/*' \
		>"$cache/vm-kernel.log" 2>&1 || { tail -n 30 "$cache/vm-kernel.log" >&2; exit 1; }
	cp -L "$r/vmlinuz" "$vm/vmlinuz"
	cp -L "$r/initrd.img" "$vm/initrd.img"
	echo "# kernel and initrd in $vm ($(($(date +%s) - t0)) s)"
	touch "$cache/vm.stamp"
fi
