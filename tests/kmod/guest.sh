#!/bin/sh
# /init of the module test's VM: loads mailshift.ko, builds three network
# namespaces, installs the steering table with mailshiftctl (backend kmod,
# generic netlink) and checks what it does. PASS/FAIL/INFO lines and the
# counters go to the second serial port, which the host reads; the last
# line is "KTEST-RESULT rc=N" (N checks failed), then the VM exits. The
# namespaces are tests/kmod/vmlib.sh's; kt tproxy listens on port 10143
# in gw ("PROXY").
. /vmlib.sh
failed=0
CONF=/etc/mailshift.conf

pass() { say "PASS: $*"; }
fail() { say "FAIL: $*"; failed=$((failed + 1)); }
# check NAME WANT GOT: GOT starts with WANT.
check() {
	case "$3" in
	"$2"*) pass "$1" ;;
	*) fail "$1 (want \"$2...\", got \"$3\")" ;;
	esac
}
ok() { name=$1; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }
finish() {
	say "KTEST-RESULT rc=$failed uptime=$(cut -d" " -f1 /proc/uptime)"
	vm_exit "$failed"
}
# Waits (up to 10 s) for a line in a file.
wait_for() {
	i=0
	while ! grep -q "$2" "$1" 2>/dev/null; do
		i=$((i + 1))
		[ $i -gt 200 ] && return 1
		sleep 0.05
	done
}
ctl() { in_ns gw mailshiftctl steer -c $CONF "$@"; }
# The gateway namespace's map for the host: between NAME-BEGIN and NAME-END.
say_sessions() {
	say "$1-BEGIN"
	ctl --json sessions > $R
	say "$1-END"
}
# Waits (up to 10 s) until the gateway namespace's map holds N sessions.
wait_sessions() {
	i=0
	while ! ctl sessions | grep -q "^sessions: $1 "; do
		i=$((i + 1))
		[ $i -gt 100 ] && return 1
		sleep 0.1
	done
}
connect() { in_ns cli kt connect "$@"; }

vm_mounts
vm_modules
# The session map's collection every second: the test waits for it.
ok "insmod mailshift.ko" insmod /lib/mailshift.ko gc_interval=1
grep -q "^mailshift " /proc/modules || finish

vm_topology

in_ns srv kt serve 10.77.1.2 143 SOURCE > /tmp/source.log &
in_ns srv kt serve fd77:1::2 143 SOURCE > /tmp/source6.log &
in_ns srv kt serve 10.77.1.3 143 DEST > /tmp/dest.log &
in_ns srv kt serve fd77:1::3 143 DEST > /tmp/dest6.log &
in_ns srv kt serve 10.77.1.2 8080 SOURCE-WEB > /tmp/web.log &
# Not through in_ns: $! must be kt's own PID (ip netns exec execs it).
/usr/sbin/ip netns exec gw kt tproxy 10143 PROXY > /tmp/proxy.log &
proxy=$!
for f in source source6 dest dest6 web proxy; do
	wait_for /tmp/$f.log listening || fail "kt $f did not start"
done

ok "steer install (genl)" ctl install
check "the nft backend refuses to steer what the module steers" \
	"mailshiftctl steer: the mailshift kernel module holds a steering table" \
	"$(ctl --backend nft install 2>&1)"
say "INFO: $(ctl show | tr '\n' '|')"

check "proxy: IPv4 to the transparent listener, original destination" \
	"PROXY orig=10.77.1.2:143 peer=10.77.0.2:" "$(connect 10.77.1.2 143)"
check "proxy: IPv6 to the transparent listener, original destination" \
	"PROXY orig=[fd77:1::2]:143 peer=[fd77::2]:" "$(connect fd77:1::2 143)"
check "destination: DNAT, the reply comes back translated" \
	"DEST sees 10.77.0.66:" "$(connect -b 10.77.0.66 10.77.1.2 143)"
check "other ports: straight to the source" \
	"SOURCE-WEB sees 10.77.0.2:" "$(connect 10.77.1.2 8080)"

# Two connections stay open across two table changes that would steer
# them elsewhere now.
connect -h /tmp/go 10.77.1.2 143 > /tmp/held-proxy &
held1=$!
connect -b 10.77.0.66 -h /tmp/go 10.77.1.2 143 > /tmp/held-dest &
held2=$!
wait_for /tmp/held-proxy PROXY && wait_for /tmp/held-dest DEST ||
	fail "held connections did not open"
ok "steer set 10.77.1.2 143 destination" \
	ctl set 10.77.1.2 143 destination
ok "steer set 10.77.1.2 143 10.77.0.64/26 proxy" \
	ctl set 10.77.1.2 143 10.77.0.64/26 proxy
check "after the change: new connections to the destination" \
	"DEST sees 10.77.0.2:" "$(connect 10.77.1.2 143)"
check "after the change: the prefix's new connections to the proxy" \
	"PROXY orig=10.77.1.2:143 peer=10.77.0.66:" \
	"$(connect -b 10.77.0.66 10.77.1.2 143)"
touch /tmp/go
wait $held1 $held2
check "table change: the open proxied connection goes on" \
	"held: again" "$(tail -n 1 /tmp/held-proxy)"
check "table change: the open DNATed connection goes on" \
	"held: again" "$(tail -n 1 /tmp/held-dest)"

# The session map, written as mailshiftd writes it (ktnl add/del/state
# call steer_kmod.c): three proxied connections of alice, two the gateway
# sent to the source, one to the destination. Once alice is moved, the
# first, still going to the source, is reset at the hook; the one to the
# destination goes on; the third, taken out of the map first, goes on.
# A fourth, bob's, to the destination, is reset once he is in a cutover.
for n in 1 2 3 4; do
	g=/tmp/go-sess; [ $n = 3 ] && g=/tmp/go-sess3
	connect -b 10.77.0.66 -h $g 10.77.1.2 143 > /tmp/sess$n &
	eval sess$n=\$!
done
for n in 1 2 3 4; do
	wait_for /tmp/sess$n PROXY || fail "session connection $n did not open"
done
port() { sed -n 's/.*peer=10.77.0.66:\([0-9]*\).*/\1/p' /tmp/sess$1; }
kmap() { in_ns gw /bin/ktnl "$@"; }
kmap add alice 10.77.0.66 "$(port 1)" 10.77.1.2 143 source
kmap add alice 10.77.0.66 "$(port 2)" 10.77.1.2 143 destination
# As a dual-stack listener sees an IPv4 client.
kmap add alice ::ffff:10.77.0.66 "$(port 3)" ::ffff:10.77.1.2 143 source
# bob, in a cutover: no session of his may flow anywhere.
kmap add bob 10.77.0.66 "$(port 4)" 10.77.1.2 143 destination
say_sessions SESSIONS-ADDED
say "INFO: alice's ports $(port 1) $(port 2) $(port 3)"
kmap state alice destination
kmap state bob cutover
touch /tmp/go-sess
wait $sess1 $sess2 $sess4
check "moved: the session still going to the source is reset" \
	"held: lost" "$(tail -n 1 /tmp/sess1)"
check "moved: the session to the destination goes on" \
	"held: again" "$(tail -n 1 /tmp/sess2)"
check "cutover: even a session to the destination is reset" \
	"held: lost" "$(tail -n 1 /tmp/sess4)"
say_sessions SESSIONS-MOVED
ctl sessions
# The third, still open, goes only when deleted; the other two when the
# collection finds their connections over.
kmap del 10.77.0.66 "$(port 3)" 10.77.1.2 143
wait_sessions 0
check "sessions: deleted, or gone with their connection" "sessions: 0 " \
	"$(ctl sessions | head -n 1)"
touch /tmp/go-sess3
wait $sess3
check "moved: a session to the source deleted from the map goes on" \
	"held: again" "$(tail -n 1 /tmp/sess3)"
check "steer sessions with the nft backend: a clear error" \
	"mailshiftctl steer: the nft backend keeps no session map" \
	"$(ctl --backend nft sessions 2>&1)"

# Fail closed: nothing listens, and nothing reaches the source.
ok "steer set 10.77.1.2 143 default" ctl set 10.77.1.2 143 default
kill $proxy
wait $proxy
before=$(wc -l < /tmp/source.log)
before6=$(wc -l < /tmp/source6.log)
check "fail closed: IPv4 refused when no listener" \
	"refused" "$(connect 10.77.1.2 143)"
check "fail closed: IPv6 refused when no listener" \
	"refused" "$(connect fd77:1::2 143)"
ok "fail closed: nothing reached the source" \
	test "$(wc -l < /tmp/source.log)" = "$before" -a \
	"$(wc -l < /tmp/source6.log)" = "$before6"

# Changes under traffic: connections keep being made while the table is
# replaced twenty times; every one gets its greeting (from the proxy or
# the destination, whichever the table said at its first packet).
/usr/sbin/ip netns exec gw kt tproxy 10143 PROXY > /tmp/proxy2.log &
proxy=$!
wait_for /tmp/proxy2.log listening || fail "kt proxy did not start again"
(
	for i in $(seq 1 40); do
		connect 10.77.1.2 143
	done > /tmp/churn.log
) &
churn=$!
for i in $(seq 1 10); do
	ctl set 10.77.1.2 143 destination > /dev/null
	ctl set 10.77.1.2 143 default > /dev/null
done
wait $churn
ok "40 connections during 20 table changes all answered" \
	test "$(grep -cE '^(PROXY|DEST) ' /tmp/churn.log)" = 40
kill $proxy
wait $proxy

# mailshiftd itself writes the map: this tree's gateway on the transparent
# listener (/etc/mailshift.conf: backend kmod, policy off), scripted IMAP
# servers (kt imapd) as the source and the destination. alice logs in
# through the service address and is relayed to the source; the operator
# sets her to the destination (the control socket); her open session's
# next command is reset at the hook; her new login goes to the
# destination, and its entry goes with her logout. The collection is held
# off: only mailshiftd's delete takes an entry away.
echo 3600 > /sys/module/mailshift/parameters/gc_interval
in_ns srv kt imapd 10.77.1.2 1143 SOURCE > /tmp/isrc.log &
in_ns srv kt imapd 10.77.1.3 1143 DEST > /tmp/idst.log &
for f in isrc idst; do
	wait_for /tmp/$f.log listening || fail "kt imapd $f did not start"
done
/usr/sbin/ip netns exec gw mailshiftd -v -c $CONF 2> /tmp/mailshiftd.log &
msd=$!
wait_for /tmp/mailshiftd.log "mailshiftd ready" || fail "mailshiftd did not start"
# alice's login N (kt imap, held until /tmp/go-e2eN), relayed to the
# server NAME: check TEXT; mailshiftd wrote it, the map holds N sessions.
e2e_login() {
	in_ns cli kt imap -h /tmp/go-e2e$1 10.77.1.2 143 alice > /tmp/e2e$1 &
	imap=$!
	wait_for /tmp/e2e$1 "^login: " || fail "alice's login $1 did not end"
	check "mailshiftd: $3" "login: OK $2 logged in" \
		"$(grep '^login: ' /tmp/e2e$1)"
	say "INFO: alice's session $1 $(sed -n 's/^from //p' /tmp/e2e$1)"
	ok "mailshiftd: alice's session $1 written" wait_sessions $1
}
e2e_login 1 SOURCE "alice's login relayed to the source"
e2e1=$imap
say_sessions E2E-SOURCE
ok "mailshiftctl user set alice state destination" \
	in_ns gw mailshiftctl user set alice state destination --force -c $CONF
touch /tmp/go-e2e1
wait $e2e1
check "mailshiftd: moved, the open session to the source is reset" \
	"noop: reset" "$(tail -n 1 /tmp/e2e1)"
e2e_login 2 DEST "alice's new login relayed to the destination"
e2e2=$imap
say_sessions E2E-MOVED
touch /tmp/go-e2e2
wait $e2e2
check "mailshiftd: the session to the destination goes on" \
	"noop: OK DEST NOOP" "$(grep '^noop: ' /tmp/e2e2)"
check "mailshiftd: alice logs out" "logout: OK" "$(tail -n 1 /tmp/e2e2)"
# The reset session's entry stays (mailshiftd's session is still open).
ok "mailshiftd: the logged out session's entry deleted" wait_sessions 1
say_sessions E2E-LOGOUT
kill $msd
wait $msd
ok "mailshiftd stopped: its sessions deleted" wait_sessions 0
ok "mailshiftd: every write into the module worked" \
	test -z "$(grep 'steering:' /tmp/mailshiftd.log)"
cat /tmp/mailshiftd.log
echo 1 > /sys/module/mailshift/parameters/gc_interval

# A namespace with a table of its own, deleted with it.
ip netns add gone
in_ns gone ip link set lo up
in_ns gone nft add table inet mailshift
check "the module refuses to steer what an nft table steers" \
	"mailshiftctl steer: the nftables table inet mailshift is installed" \
	"$(in_ns gone mailshiftctl steer -c $CONF install 2>&1)"
in_ns gone nft delete table inet mailshift
ok "a second namespace's own table" \
	in_ns gone mailshiftctl steer -c $CONF install
# A session without a connection: the collection is held off meanwhile.
echo 3600 > /sys/module/mailshift/parameters/gc_interval
in_ns gone /bin/ktnl add erin 10.79.0.9 4000 10.77.1.2 143 source
check "a second namespace's own session map" "sessions: 1 " \
	"$(in_ns gone mailshiftctl steer -c $CONF sessions | head -n 1)"
ok "the second namespace deleted with its table" ip netns del gone
echo 1 > /sys/module/mailshift/parameters/gc_interval

# The counters, for the host to check.
say "STATS-BEGIN"
ctl --json stats > $R
say "STATS-END"

# Bad netlink input against the installed table, a dump interrupted by a
# change, no privilege (ktnl prints its own PASS/FAIL lines).
in_ns gw ktnl > /tmp/ktnl.log 2>&1
grep -E '^(PASS|FAIL|INFO): ' /tmp/ktnl.log > $R
failed=$((failed + $(grep -c '^FAIL' /tmp/ktnl.log)))
cat /tmp/ktnl.log

ok "steer remove" ctl remove
check "after remove: straight to the source" \
	"SOURCE sees 10.77.0.2:" "$(connect 10.77.1.2 143)"
ok "rmmod mailshift with live namespaces" rmmod mailshift
check "without the module: a clear error" \
	"mailshiftctl steer: the mailshift kernel module is not loaded" \
	"$(ctl show 2>&1)"
finish
