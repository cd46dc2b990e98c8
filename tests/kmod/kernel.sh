#!/bin/sh
# The kernel the module test boots: Debian's current cloud kernel (the
# version linux-image-cloud-amd64 names), its image downloaded with apt (not
# installed) and unpacked into CACHE/KVER, with a modules.dep made by
# busybox's depmod (the .deb ships none; its postinst makes it).
# Usage: kernel.sh CACHE -> prints CACHE/KVER. Exits 1 with a message when
# it cannot get it.
set -eu
cache=$1
kver=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
	sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | head -n 1)
if [ -z "$kver" ]; then
	echo "kernel.sh: apt-cache names no linux-image-cloud-amd64 version" \
		"(run apt-get update)" >&2
	exit 1
fi
dir=$cache/$kver
if [ ! -f "$dir/lib/modules/$kver/modules.dep" ]; then
	rm -rf "$dir" "$cache/deb"
	mkdir -p "$cache/deb"
	(cd "$cache/deb" && apt-get download -q "linux-image-$kver" \
		>/dev/null 2>&1) || {
		echo "kernel.sh: apt-get download linux-image-$kver failed" >&2
		exit 1
	}
	dpkg-deb -x "$cache"/deb/linux-image-"$kver"_*.deb "$dir"
	busybox depmod -b "$dir" "$kver"
	rm -rf "$cache/deb"
fi
echo "$dir"
