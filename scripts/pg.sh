#!/usr/bin/env bash
# A throwaway local PostgreSQL for curation tests and benchmarks: data dir and unix socket inside the project.
#   scripts/pg.sh start|stop|status|url [DIR]    (DIR defaults to $KREA2_PG_DIR or <project>/.pg)
# PostgreSQL refuses to run as root, so under root the server runs as the `postgres` (or `nobody`) system user.
set -euo pipefail
cmd=${1:-}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${2:-${KREA2_PG_DIR:-$root/.pg}}")
port=${KREA2_PG_PORT:-5432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[ -n "$bin" ] || bin=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
if [ ! -x "$bin/initdb" ]; then
  echo "PostgreSQL server binaries not found: apt-get install postgresql" >&2
  exit 3
fi
as_user() {
  if [ "$(id -u)" = 0 ]; then
    local u=postgres
    id -u postgres >/dev/null 2>&1 || u=nobody
    runuser -u "$u" -- "$@"
  else
    "$@"
  fi
}
url() { echo "postgresql:///krea2?host=$dir/sock&port=$port&user=postgres"; }

case "$cmd" in
  start)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
      u=postgres; id -u postgres >/dev/null 2>&1 || u=nobody
      chown "$u" "$dir"
    fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_user "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
      as_user mkdir -p "$dir/sock"
    fi
    if ! as_user "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      # Unix socket only (no TCP), relaxed durability: this server holds test and benchmark data only.
      as_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-k $dir/sock -p $port -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c max_connections=200" \
        >/dev/null || { tail -20 "$dir/server.log" >&2; exit 1; }
    fi
    as_user "$bin/psql" -h "$dir/sock" -p "$port" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='krea2'" | grep -q 1 \
      || as_user "$bin/createdb" -h "$dir/sock" -p "$port" -U postgres krea2
    url
    ;;
  stop)
    [ -f "$dir/data/PG_VERSION" ] && as_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    ;;
  status)
    as_user "$bin/pg_ctl" -D "$dir/data" status
    ;;
  url)
    url
    ;;
  *)
    echo "usage: scripts/pg.sh start|stop|status|url [DIR]" >&2
    exit 2
    ;;
esac
