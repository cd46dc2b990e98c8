# Sourced by the module VM's /init scripts (tests/kmod/guest.sh, the
# benchmark's bench/kmod_guest.sh): the guest's mounts, the distribution
# modules, and the three network namespaces:
#
#   cli  c0 10.77.0.2/24 (+ .66, in the prefix steered to the destination)
#        fd77::2/64                 | default via the gateway
#   gw   g0 10.77.0.1 fd77::1       g1 10.77.1.1 fd77:1::1
#        forwarding; mailshift.ko's table
#   srv  s0 10.77.1.2 fd77:1::2 (the source, the service address)
#           10.77.1.3 fd77:1::3 (the destination)
export PATH=/usr/sbin:/bin:/sbin
R=/dev/ttyS1

ip() { /usr/sbin/ip "$@"; }
in_ns() { ns=$1; shift; /usr/sbin/ip netns exec "$ns" "$@"; }
say() { echo "$*" > $R; echo "$*"; }

vm_mounts() {
	mount -t proc proc /proc
	mount -t sysfs sys /sys
	mount -t devtmpfs dev /dev
	mount -t tmpfs tmp /tmp
	mount -t tmpfs run /run
	mkdir -p /run/netns
}

# Distribution modules in dependency order: each pass loads what it can.
vm_modules() {
	for _ in 1 2 3 4 5 6 7 8; do
		for m in $(cat /modules.list); do
			n=$(basename "$m" .ko | tr - _)
			grep -q "^$n " /proc/modules ||
				insmod "/lib/modules/$m" 2>/dev/null
		done
	done
}

vm_topology() {
	for n in cli gw srv; do ip netns add $n; in_ns $n ip link set lo up; done
	ip link add c0 netns cli type veth peer name g0 netns gw
	ip link add s0 netns srv type veth peer name g1 netns gw
	in_ns cli ip addr add 10.77.0.2/24 dev c0
	in_ns cli ip addr add 10.77.0.66/24 dev c0
	in_ns cli ip addr add fd77::2/64 dev c0 nodad
	in_ns gw ip addr add 10.77.0.1/24 dev g0
	in_ns gw ip addr add fd77::1/64 dev g0 nodad
	in_ns gw ip addr add 10.77.1.1/24 dev g1
	in_ns gw ip addr add fd77:1::1/64 dev g1 nodad
	for a in 10.77.1.2/24 10.77.1.3/24; do
		in_ns srv ip addr add $a dev s0
	done
	for a in fd77:1::2/64 fd77:1::3/64; do
		in_ns srv ip addr add $a dev s0 nodad
	done
	for l in cli:c0 gw:g0 gw:g1 srv:s0; do
		in_ns ${l%:*} ip link set ${l#*:} up
	done
	in_ns cli ip route add default via 10.77.0.1
	in_ns cli ip -6 route add default via fd77::1
	in_ns srv ip route add default via 10.77.1.1
	in_ns srv ip -6 route add default via fd77:1::1
	in_ns gw sysctl -qw net.ipv4.ip_forward=1
	in_ns gw sysctl -qw net.ipv6.conf.all.forwarding=1
}

# The VM ends with status N (qemu's isa-debug-exit).
vm_exit() {
	sync
	kt exit "$1"
	poweroff -f
}
