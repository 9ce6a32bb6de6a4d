#!/usr/bin/env bash
# A throwaway PostgreSQL server for the storage tests (`make test` runs it).
#
#   scripts/postgres.sh start   # prints the SQLAlchemy URL on stdout, nothing else
#   scripts/postgres.sh stop    # stops the server and deletes its data
#
# RLHF_CHAT_PG_BINDIR=/usr/lib/postgresql/16/bin picks one installed version.
#
# Why a real server and not only SQLite: a shared deployment points --db at
# PostgreSQL, and the one guarantee that matters most (a vote is stored exactly
# once, by an atomic UPDATE ... WHERE choice IS NULL) depends on the database's
# locking and isolation (READ COMMITTED there, a single writer in SQLite).
#
# The server listens on 127.0.0.1 only, on a free port, with its unix socket
# inside its data folder, so it never meets a system cluster on 5432 nor
# another checkout's test server. Authentication is `trust`: the data is
# throwaway and only this machine can connect.
#
# If PostgreSQL is not installed and we are root with apt-get (CI: Debian 12,
# a fresh clone), the `postgresql` package is installed. initdb refuses to run
# as root, so as root the server runs as the `postgres` user (which the package
# creates) and its data folder lives under /tmp, which that user can reach even
# when the clone sits in a home folder it cannot enter (/root is 0700).
# Where the data folder lives is recorded in .pg/ (git-ignored) so that `stop`
# finds it. Any failure prints one line saying why to stderr and into
# .pg/error, which `make test` passes on to pytest as the skip reason.
set -Eeuo pipefail

cd "$(dirname "$0")/.."
STATE=.pg
DB=rlhf_chat_test
SUPERUSER=postgres

say() { echo "postgres.sh: $*" >&2; }
fail() {
    mkdir -p "$STATE"
    echo "$*" >"$STATE/error"
    say "$*"
    exit 1
}
# Any other failing command still leaves a reason for the skip message (the first one wins).
REPORTED=
on_error() {
    local status=$? line=$1
    [ -z "$REPORTED" ] || return 0
    REPORTED=1
    [ ! -s "$STATE/error" ] || return 0 # fail() has said why (perhaps in a subshell)
    local why="scripts/postgres.sh failed at line $line (exit $status)"
    { mkdir -p "$STATE" && echo "$why" >"$STATE/error"; } 2>/dev/null || true
    say "$why"
}
trap 'on_error $LINENO' ERR

# Run a PostgreSQL program as the server's owner: ourselves, or `postgres` when root.
as_owner() {
    if [ "$(id -u)" -ne 0 ]; then
        (cd / && "$@")
    elif command -v runuser >/dev/null; then
        (cd / && runuser -u "$OWNER" -- "$@")
    else
        (cd / && su "$OWNER" -s /bin/sh -c "$(printf '%q ' "$@")")
    fi
}

# The folder with initdb/pg_ctl: on PATH, else Debian's versioned folder (newest).
find_bindir() {
    if [ -n "${RLHF_CHAT_PG_BINDIR:-}" ]; then # a chosen PostgreSQL; no fallback, no install
        [ -x "$RLHF_CHAT_PG_BINDIR/initdb" ] && [ -x "$RLHF_CHAT_PG_BINDIR/pg_ctl" ] ||
            fail "RLHF_CHAT_PG_BINDIR=$RLHF_CHAT_PG_BINDIR has no initdb and pg_ctl"
        echo "$RLHF_CHAT_PG_BINDIR"
        return
    fi
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
        # Resolve links: /usr/local/bin/pg_ctl may point into /usr/lib/postgresql/15/bin.
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
        echo "$dir"
    fi
}

install_postgres() {
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        fail "PostgreSQL is not installed and cannot be installed here (needs root and apt-get); install the postgresql package"
    fi
    say "installing the postgresql package (apt-get)"
    # The package would create and start a system cluster on port 5432 that
    # outlives the tests; we only want the programs.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/rlhf-chat-tests.conf
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends postgresql >&2; then
        # A fresh container has no package lists yet.
        apt-get update -q >&2 && apt-get install -y -q --no-install-recommends postgresql >&2 ||
            fail "apt-get install postgresql failed"
    fi
}

free_port() {
    python3 - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

stop() {
    [ -f "$STATE/datadir" ] || return 0
    local data bindir
    data=$(cat "$STATE/datadir")
    bindir=$(cat "$STATE/bindir" 2>/dev/null || find_bindir)
    OWNER=$(cat "$STATE/owner" 2>/dev/null || echo "$SUPERUSER")
    if [ -n "$bindir" ] && [ -f "$data/postmaster.pid" ]; then
        as_owner "$bindir/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 || say "pg_ctl stop failed; removing $data anyway"
    fi
    rm -rf "$data"
    rm -f "$STATE/datadir" "$STATE/bindir" "$STATE/owner" "$STATE/url"
}

start() {
    stop # a server left over by an interrupted run
    rm -f "$STATE/error"
    mkdir -p "$STATE"

    local bindir
    bindir=$(find_bindir)
    if [ -z "$bindir" ]; then
        install_postgres
        bindir=$(find_bindir)
        [ -n "$bindir" ] || fail "postgresql was installed but initdb/pg_ctl are not in /usr/lib/postgresql/*/bin"
    fi
    command -v python3 >/dev/null || fail "python3 is needed to pick a free port"

    local data
    if [ "$(id -u)" -eq 0 ]; then
        if id -u "$SUPERUSER" >/dev/null 2>&1; then
            OWNER=$SUPERUSER
        else
            OWNER=nobody # PostgreSQL programs without the Debian package's user
        fi
        data=$(mktemp -d "${TMPDIR:-/tmp}/rlhf-chat-pg.XXXXXX")
        chown "$OWNER" "$data"
    else
        OWNER=$(id -un)
        data=$(mktemp -d "$PWD/$STATE/data.XXXXXX")
    fi
    chmod 700 "$data"
    echo "$data" >"$STATE/datadir"
    echo "$bindir" >"$STATE/bindir"
    echo "$OWNER" >"$STATE/owner"

    # --no-sync, fsync=off: a crash loses nothing we care about, and the tests run faster.
    as_owner "$bindir/initdb" -D "$data" -U "$SUPERUSER" --auth=trust -E UTF8 --no-locale --no-sync \
        >"$STATE/initdb.log" 2>&1 || fail "initdb failed (see $STATE/initdb.log)"

    local port tries=0
    while :; do
        port=$(free_port)
        # -k: the unix socket lives in the data folder, not /var/run/postgresql.
        if as_owner "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k '$data' -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
            start >/dev/null 2>&1; then
            break
        fi
        tries=$((tries + 1))
        # Another process may have taken the port between our probe and the start.
        if [ "$tries" -ge 3 ]; then
            cp "$data/server.log" "$STATE/server.log" 2>/dev/null || true
            fail "the PostgreSQL server did not start (see $STATE/server.log)"
        fi
    done

    local psql="$bindir/psql"
    [ -x "$psql" ] || psql=$(command -v psql) || fail "psql not found"
    as_owner "$psql" -h 127.0.0.1 -p "$port" -U "$SUPERUSER" -d postgres -v ON_ERROR_STOP=1 -q \
        -c "CREATE DATABASE $DB" >/dev/null 2>"$STATE/createdb.log" ||
        fail "creating the test database failed (see $STATE/createdb.log)"

    local url="postgresql+psycopg://$SUPERUSER@127.0.0.1:$port/$DB"
    echo "$url" >"$STATE/url"
    say "PostgreSQL $("$bindir/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$port, data in $data"
    echo "$url"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
