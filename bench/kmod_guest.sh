#!/bin/sh
# /init of the kernel module benchmark's VM (bench/kmod_bench.py): in the
# namespaces of tests/kmod/vmlib.sh, the same load through each way of
# steering, one after the other. Lines "BENCH SCENARIO METRIC VALUE" go to
# the second serial port; the last is "BENCH-END".
#
#   plain     no steering: the client connects to the destination itself
#   nftdnat   a plain nftables DNAT rule, service address -> destination
#   nft       mailshift's nft backend (steer install, action destination)
#   kmod      mailshift.ko (steer --backend kmod install, the same)
#   session   kmod, with the stream's connection in the session map
#
# ROUNDS rounds (default 2), each scenario once per round.
#
# The load (bench/kmod_load.c): TCP connections made and closed for
# $SECS seconds, one stream's throughput, 64-byte UDP datagrams to a
# server port nothing steers (what a table costs other traffic).
. /vmlib.sh
CONF=/etc/mailshift-bench.conf
SECS=${SECS:-3}

ctl() { in_ns gw mailshiftctl steer -c $CONF "$@"; }
load() { in_ns cli kmod_load "$@"; }

# Runs the load against ADDR:143 as SCENARIO; extra stream arguments after.
measure() {
	name=$1 addr=$2
	shift 2
	extra="$*"
	set -- $(load rate "$addr" 143 "$SECS")
	say "BENCH $name connections_per_s $4"
	set -- $(load stream $extra "$addr" 143 "$SECS")
	say "BENCH $name stream_mb_per_s $4"
	set -- $(load udp 10.77.1.3 9000 "$SECS")
	say "BENCH $name udp_packets_per_s $4"
}

vm_mounts
vm_modules
insmod /lib/mailshift.ko || { say "BENCH-FAILED insmod"; vm_exit 1; }
vm_topology
# Many short connections: ports and conntrack entries to spare.
sysctl -qw net.netfilter.nf_conntrack_max=262144
in_ns cli sysctl -qw net.ipv4.ip_local_port_range="10000 65000"
in_ns cli sysctl -qw net.ipv4.tcp_tw_reuse=1
cat > $CONF <<EOT
[listen]
imap = 0.0.0.0:10143

[steer]
address = 10.77.1.2
port = 143 10143
destination = 10.77.1.3
action = destination
EOT

in_ns srv kmod_load sink 10.77.1.3 143 > /tmp/sink.log &
in_ns srv kmod_load udpsink 10.77.1.3 9000 > /tmp/udpsink.log &
sleep 1

on_plain() { :; }
off_plain() { :; }
on_nftdnat() {
	in_ns gw nft -f - <<EOT
table ip bench {
	chain pre {
		type nat hook prerouting priority dstnat;
		ip daddr 10.77.1.2 tcp dport 143 dnat to 10.77.1.3
	}
}
EOT
}
off_nftdnat() { in_ns gw nft delete table ip bench; }
on_nft() { ctl --backend nft install > /dev/null; }
off_nft() { ctl --backend nft remove > /dev/null; }
on_kmod() { ctl --backend kmod install > /dev/null; }
off_kmod() { ctl --backend kmod remove > /dev/null; }
# session: kmod, with the stream's connection (from port $sport) in the
# session map: its packets are looked up and counted there. Not collected
# meanwhile.
on_session() {
	on_kmod &&
	echo 3600 > /sys/module/mailshift/parameters/gc_interval &&
	in_ns gw ktnl add bench 10.77.0.2 "$sport" 10.77.1.2 143 destination
}
off_session() {
	say "INFO $(ctl --backend kmod sessions | tr '\n' '|')"
	off_kmod
}

# Each round runs every scenario (in a rotated order, so that a busy
# spell of the host does not hit one alone); the host keeps the best.
order="plain nftdnat nft kmod session"
for round in $(seq 1 "${ROUNDS:-2}"); do
	sport=4000$round
	for sc in $order; do
		addr=10.77.1.2 extra=
		[ $sc = plain ] && addr=10.77.1.3
		[ $sc = session ] && extra="-p $sport"
		if ! on_$sc; then
			say "BENCH-FAILED $sc"
			continue
		fi
		measure $sc $addr $extra
		off_$sc
	done
	order="${order#* } ${order%% *}"
done
say "BENCH-END"
vm_exit 0
