#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the multi-worker search test, and print
# its URL on stdout (the last line, nothing else on stdout):
#
#   export EVOMERGE_TEST_PG_URL=$(scripts/ci_postgres.sh)
#   pytest -m slow tests/test_postgres.py
#   scripts/ci_postgres.sh stop     # stop the server and remove its data folder
#
# Installs Debian's postgresql when missing (needs root). The server runs as user `postgres`
# from a data folder under ${TMPDIR:-/tmp}; its location is kept in $STATE for `stop`.
set -euo pipefail

PORT="${EVOMERGE_PG_PORT:-54329}"
DB="${EVOMERGE_PG_DB:-evomerge_test}"
STATE="${TMPDIR:-/tmp}/evomerge-ci-postgres.state"

log() { echo "ci_postgres: $*" >&2; }

as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
        if [ "$(id -u)" != 0 ]; then
            log "postgresql is not installed and this is not root: apt-get install postgresql"
            exit 1
        fi
        log "installing postgresql (apt-get)"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        d=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    echo "$d"
}

stop() {
    [ -f "$STATE" ] || { log "no server recorded in $STATE"; return 0; }
    local dir bin
    dir=$(sed -n 1p "$STATE")
    bin=$(sed -n 2p "$STATE")
    as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate stop >&2 || true
    rm -rf "$dir" "$STATE"
    log "stopped and removed $dir"
}

if [ "${1:-}" = stop ]; then
    stop
    exit 0
fi

BIN=$(pg_bin)
if [ -f "$STATE" ]; then
    stop  # one throwaway server at a time
fi
DIR=$(mktemp -d "${TMPDIR:-/tmp}/evomerge-pg.XXXXXX")
chmod 755 "$DIR"
chown postgres "$DIR" 2>/dev/null || true
printf '%s\n%s\n' "$DIR" "$BIN" >"$STATE"

as_postgres "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
# unix socket in the temp folder too: /var/run/postgresql may not exist or be writable
as_postgres "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" start >&2
as_postgres "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
log "server up: data $DIR/data, log $DIR/server.log"
# the driver is named: SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, we ship psycopg2
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/$DB"
