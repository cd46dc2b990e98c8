#!/bin/sh
# Builds the module test's initramfs: busybox-static, the distribution
# modules mailshift.ko needs (its depends= closed over modules.dep) and
# veth and nf_tables, the module, kt, ktnl, mailshiftctl, mailshiftd, nft and iproute2's ip with
# the shared libraries they use, the guest script as /init (INIT, default guest.sh)
# with vmlib.sh, a mailshift.conf, and EXTRA (a static program) if given.
# Usage: mkinitramfs.sh KERNEL-ROOT KVER MODULE KT KTNL MAILSHIFTCTL
#                       MAILSHIFTD OUT [INIT [EXTRA]]
set -eu
root=$1 kver=$2 module=$3 kt=$4 ktnl=$5 ctl=$6 msd=$7 out=$8
here=$(cd "$(dirname "$0")" && pwd)
init=${9:-$here/guest.sh} extra=${10:-}
moddir=$root/lib/modules/$kver
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/bin "$stage"/sbin "$stage"/usr/sbin "$stage"/etc \
	"$stage"/proc "$stage"/sys "$stage"/dev "$stage"/tmp "$stage"/run \
	"$stage"/lib/modules "$stage"/var/lib/mailshift
cp /bin/busybox "$stage"/bin/busybox
for applet in $("$stage"/bin/busybox --list); do
	[ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
done
# iproute2's ip (netns, veth), not busybox's.
rm -f "$stage/bin/ip"

# The path of a module by name in modules.dep (names use - and _ alike).
# One awk over the file: a shell loop with a basename and a tr per line
# started some 100,000 processes for the closure, minutes on a busy box.
mod_path() {
	awk -F: -v n="$1" 'BEGIN { gsub(/-/, "_", n) }
		{ b = $1; sub(/.*\//, "", b); sub(/\.ko$/, "", b); gsub(/-/, "_", b)
		  if (b == n) { print $1; exit } }' "$moddir/modules.dep"
}

# Every module the given ones need, each once.
closure() {
	todo="$*" seen=""
	while [ -n "$todo" ]; do
		set -- $todo
		m=$1
		shift
		todo="$*"
		case " $seen " in *" $m "*) continue ;; esac
		seen="$seen $m"
		p=$(mod_path "$m")
		[ -n "$p" ] || { echo "mkinitramfs: no module $m" >&2; exit 1; }
		echo "$p"
		deps=$(sed -n "s|^$p: *||p" "$moddir/modules.dep")
		for d in $deps; do
			todo="$todo $(basename "$d" .ko)"
		done
	done
}

needs=$(strings -a "$module" | sed -n 's/^depends=//p' | tr , ' ')
# nf_tables and nft: the kmod backend refuses to install over an nft table;
# the nft backend's expressions and plain DNAT for the benchmark.
closure veth nf_tables nft_ct nft_socket nft_tproxy nft_reject_inet nft_objref \
	nft_chain_nat nft_nat $needs > "$stage/modules.list"
while read -r p; do
	cp "$moddir/$p" "$stage/lib/modules/"
done < "$stage/modules.list"
sed -i 's|.*/||' "$stage/modules.list"
cp "$module" "$stage/lib/mailshift.ko"

# Dynamic programs with their libraries and the loader. (Debian's awk is
# mawk: no \s.)
copy_prog() {
	cp "$1" "$stage$2"
	ldd "$1" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' |
		while read -r lib; do
			mkdir -p "$stage$(dirname "$lib")"
			cp -L "$lib" "$stage$lib"
		done
}
copy_prog "$ctl" /bin/mailshiftctl
copy_prog "$msd" /bin/mailshiftd
copy_prog "$ktnl" /bin/ktnl
copy_prog "$(command -v nft || echo /usr/sbin/nft)" /usr/sbin/nft
# busybox prefers its own applets: iproute2's ip is called by full path.
copy_prog "$(command -v ip || echo /usr/sbin/ip)" /usr/sbin/ip
cp "$kt" "$stage/bin/kt"
cp "$init" "$stage/init"
cp "$here/vmlib.sh" "$stage/vmlib.sh"
[ -z "$extra" ] || cp "$extra" "$stage/bin/"
cp "$here/mailshift.conf" "$stage/etc/mailshift.conf"
chmod 755 "$stage/init"

(cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
