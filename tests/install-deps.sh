#!/bin/sh
# Install the Debian 12 packages mailshift's build, tests, demo and benchmarks
# need, when any is missing. Idempotent; quiet when everything is there.
set -e

PKGS="build-essential pkg-config libuv1-dev libssl-dev libsqlite3-dev
libjansson-dev libcmocka-dev libcap-ng-dev libnftables-dev libnl-route-3-dev python3 python3-pytest python3-pytest-xdist openssl
libpq-dev postgresql-15 python3-psycopg2
dovecot-core dovecot-imapd dovecot-pop3d isync offlineimap3 time
fetchmail mpop
postfix dovecot-lmtpd
nginx libnginx-mod-mail perdition
nftables iproute2 gdb iptables libnetfilter-queue-dev systemd
clang libclang-rt-14-dev
qemu-system-x86 busybox-static cpio libnl-genl-3-dev linux-source-6.1"

# The kernel module (kmod/, docs/kmod.md) builds against the headers of
# Debian's current cloud kernel: the version its metapackage names, never a
# fixed one (Debian drops an ABI's packages when the next one comes).
cloud_kver() {
	apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | head -n 1
}
KVER=$(cloud_kver)
if [ -z "$KVER" ] && [ "$(id -u)" = 0 ]; then
	apt-get update -qq && KVER=$(cloud_kver)
fi
[ -n "$KVER" ] && PKGS="$PKGS linux-headers-$KVER"

missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
	echo "mailshift: missing packages:$missing (run as root, or install them)" >&2
	exit 1
fi
echo "mailshift: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Never start the distribution's own Dovecot (nor nginx, nor Perdition, which
# bench/gateway_bench.py compares against): the tests run their own.
policy=/usr/sbin/policy-rc.d
if [ ! -e $policy ]; then
	printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy
	trap 'rm -f $policy' EXIT
fi
# Postfix (the SMTP tests' MTAs, started by the tests): no questions, no
# system configuration.
echo 'postfix postfix/main_mailer_type select No configuration' |
	debconf-set-selections
apt-get install -y -qq --no-install-recommends $missing >/dev/null
# Should a package's service have started anyway, stop it by its PID file.
for pidfile in /run/nginx.pid /run/perdition*/perdition*.pid; do
	[ -f "$pidfile" ] || continue
	pid=$(cat "$pidfile" 2>/dev/null) || continue
	case "$pid" in '' | *[!0-9]*) continue ;; esac
	case "$(cat /proc/"$pid"/comm 2>/dev/null)" in
	nginx | perdition*)
		kill "$pid" 2>/dev/null && echo "mailshift: stopped $pidfile ($pid)" || true ;;
	esac
done
