#!/bin/sh
# Install the Debian 12 packages mailshift's build, tests, demo and benchmarks
# need, when any is missing. Idempotent; quiet when everything is there.
set -e

PKGS="build-essential pkg-config libuv1-dev libssl-dev libsqlite3-dev
libjansson-dev libcmocka-dev python3 python3-pytest openssl
dovecot-core dovecot-imapd dovecot-pop3d isync time
postfix dovecot-lmtpd"

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
# Never start the distribution's own Dovecot: the tests run their own.
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
