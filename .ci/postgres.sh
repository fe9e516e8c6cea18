#!/usr/bin/env bash
# A PostgreSQL server for Optuna studies shared by several tune workers (and for the PostgreSQL
# test of tests/test_tune.py): installs PostgreSQL from Debian apt when missing, starts the main
# cluster listening on 127.0.0.1 only, creates a login role (CREATEDB: tests/test_server.py makes a fresh
# database for each tracking server it starts) and a database owned by it, and prints
# the database URL on stdout (everything else goes to stderr). Idempotent: run it again and it
# finds each piece in place (it resets the role's password to the one given).
#
#   export TRUTHSTEER_TEST_PG_URL="$(.ci/postgres.sh)"
#
# Settings (environment): TRUTHSTEER_PG_USER (truthsteer), TRUTHSTEER_PG_PASSWORD (truthsteer),
# TRUTHSTEER_PG_DB (truthsteer_optuna), TRUTHSTEER_PG_PORT (5432; used when the cluster is created).
# Needs root or sudo (apt-get, and running commands as the postgres user).
set -euo pipefail

PG_USER=${TRUTHSTEER_PG_USER:-truthsteer}
PG_PASSWORD=${TRUTHSTEER_PG_PASSWORD:-truthsteer}
PG_DB=${TRUTHSTEER_PG_DB:-truthsteer_optuna}
PG_PORT=${TRUTHSTEER_PG_PORT:-5432}

log() { echo "postgres.sh: $*" >&2; }
fail() { log "error: $*"; exit 1; }

for name in "$PG_USER" "$PG_DB"; do
  [[ "$name" =~ ^[a-z_][a-z0-9_]*$ ]] || fail "'$name' must be a lowercase SQL identifier ([a-z_][a-z0-9_]*)"
done
[[ "$PG_PASSWORD" != *"'"* && "$PG_PASSWORD" != *"@"* && "$PG_PASSWORD" != *"/"* && "$PG_PASSWORD" != *":"* ]] ||
  fail "TRUTHSTEER_PG_PASSWORD must not contain ' @ / or : (it goes into SQL and a URL unescaped)"

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
  as_postgres() { runuser -u postgres -- "$@"; }
else
  command -v sudo >/dev/null || fail "run as root or install sudo: apt-get and the postgres user need it"
  SUDO=(sudo)
  as_postgres() { sudo -u postgres -- "$@"; }
fi

if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
  log "installing postgresql from Debian apt"
  "${SUDO[@]}" apt-get update -qq >&2
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi

VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$VERSION main"; then
  log "creating cluster $VERSION/main on port $PG_PORT"
  "${SUDO[@]}" pg_createcluster "$VERSION" main --port "$PG_PORT" >&2
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $3}')

# Loopback only: nothing outside this machine can connect.
CONF_DIR=/etc/postgresql/$VERSION/main/conf.d
"${SUDO[@]}" mkdir -p "$CONF_DIR"
echo "listen_addresses = '127.0.0.1'" | "${SUDO[@]}" tee "$CONF_DIR/truthsteer.conf" >/dev/null

STATUS=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $4}')
if [ "$STATUS" != "online" ]; then
  log "starting cluster $VERSION/main"
  "${SUDO[@]}" pg_ctlcluster "$VERSION" main start >&2
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || fail "PostgreSQL does not accept connections on 127.0.0.1:$PORT; see /var/log/postgresql/"

psql_admin() { as_postgres psql -p "$PORT" -X -q -t -A -v ON_ERROR_STOP=1 "$@"; }
if [ "$(psql_admin -c 'SHOW listen_addresses')" != "127.0.0.1" ]; then
  log "restarting cluster $VERSION/main to listen on 127.0.0.1 only"
  "${SUDO[@]}" pg_ctlcluster "$VERSION" main restart >&2
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p "$PORT" && break; sleep 0.5; done
fi

if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != "1" ]; then
  log "creating role $PG_USER"
  psql_admin -c "CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
else
  psql_admin -c "ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != "1" ]; then
  log "creating database $PG_DB"
  psql_admin -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
fi

URL="postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PORT/$PG_DB"
PGPASSWORD=$PG_PASSWORD psql "postgresql://$PG_USER@127.0.0.1:$PORT/$PG_DB" -X -q -t -A -c "SELECT 1" >/dev/null ||
  fail "cannot log in as $PG_USER on 127.0.0.1:$PORT/$PG_DB"
log "ready: $PG_USER@127.0.0.1:$PORT/$PG_DB (PostgreSQL $VERSION)"
echo "$URL"
