#!/usr/bin/env bash
# Makes sure the real services the integration tests talk to are up on this machine:
# PostgreSQL on 127.0.0.1:5432 (trust auth, database "test") and Redis on 127.0.0.1:6379; rsyslog (the audit
# tests start their own rsyslogd); and the
# DICOM clients the worklist tests use as modalities (DCMTK's findscu and echoscu).
set -uo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt_update=1
apt_install() {
  if [ $need_apt_update -eq 1 ]; then $SUDO apt-get update -qq >/dev/null; need_apt_update=0; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- Redis -----------------------------------------------------------------------------------------
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && break; sleep 0.1; done
fi
(exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && echo "redis: up" || { echo "redis: could not start"; exit 1; }

# --- PostgreSQL ------------------------------------------------------------------------------------
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
if ! command -v pg_isready >/dev/null; then apt_install postgresql; fi
if ! pg_up; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; fi
  version=$(ls /etc/postgresql | sort -V | tail -1)
  conf=/etc/postgresql/$version/main
  # Trust auth on loopback for the test database, as on the development machines.
  if ! grep -q "127.0.0.1/32 *trust" "$conf/pg_hba.conf" 2>/dev/null; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$conf/pg_hba.conf"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 100); do pg_up && break; sleep 0.1; done
fi
pg_up && echo "postgresql: up" || { echo "postgresql: could not start"; exit 1; }
if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1; then
  psql -h 127.0.0.1 -U postgres -d postgres -c 'create database test' >/dev/null
fi

# --- DCMTK -----------------------------------------------------------------------------------------
command -v findscu >/dev/null && command -v echoscu >/dev/null || apt_install dcmtk
command -v findscu >/dev/null && echo "dcmtk: $(findscu --version | head -1)" || { echo "dcmtk: could not install"; exit 1; }

# --- rsyslog (the audit tests' Audit Record Repository: TLS through the openssl stream driver, and UDP) ---
# The tests start their own rsyslogd on free ports; the system's syslog daemon is not used.
[ -x /usr/sbin/rsyslogd ] && [ -e /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_ossl.so -o -e /usr/lib/rsyslog/lmnsd_ossl.so ] \
  || apt_install rsyslog rsyslog-openssl
[ -x /usr/sbin/rsyslogd ] && echo "rsyslog: $(/usr/sbin/rsyslogd -v | head -1)" || { echo "rsyslog: could not install"; exit 1; }

# --- HAProxy (the cluster tests put it in front of several `broker run` nodes; the tests start their own) ---
command -v haproxy >/dev/null || apt_install haproxy
command -v haproxy >/dev/null && echo "haproxy: $(haproxy -v | head -1)" || { echo "haproxy: could not install"; exit 1; }

# --- Chromium (the status board's browser test; Playwright drives Debian's build, nothing is downloaded) ---
command -v chromium >/dev/null || apt_install chromium
command -v chromium >/dev/null && echo "chromium: $(chromium --version 2>/dev/null | head -1)" || { echo "chromium: could not install"; exit 1; }

# --- Node.js + the UPS test's second DICOM client (dcmjs-dimse, tests/js, from its lock file) --------
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
command -v node >/dev/null || { echo "node: could not install"; exit 1; }
cd "$(dirname "$0")/.." || exit 1
if [ ! -d tests/js/node_modules/dcmjs-dimse ] || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
  npm ci --prefix tests/js --no-audit --no-fund --loglevel=error >/dev/null || { echo "npm: could not install tests/js"; exit 1; }
fi
echo "node: $(node --version), dcmjs-dimse $(node -p "require('./tests/js/node_modules/dcmjs-dimse/package.json').version")"
exit 0
