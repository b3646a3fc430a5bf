# Shared helpers for the bash scripts (sourced, not run).

# Installs Debian packages when a command is missing (apt-get, as root or with sudo).
ensure_cmd() {
  local cmd=$1 pkg=${2:-$1}
  command -v "$cmd" >/dev/null 2>&1 && return 0
  echo "==> $cmd not found; installing Debian package $pkg" >&2
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $cmd is required; install $pkg with your package manager" >&2
    return 1
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$pkg" >/dev/null
  command -v "$cmd" >/dev/null 2>&1
}

# Prints the directory of PostgreSQL's server programs (initdb, postgres, pg_isready, psql):
# $PG_BIN, else the newest /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH), else
# `pg_config --bindir`. Fails when there is none.
pg_bindir() {
  local d
  for d in "${PG_BIN:-}" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1) \
           "$(command -v pg_config >/dev/null 2>&1 && pg_config --bindir)"; do
    [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

# Like ensure_cmd for PostgreSQL's server (Debian package postgresql); prints its bin directory.
ensure_postgres() {
  pg_bindir && return 0
  echo "==> PostgreSQL not found; installing Debian package postgresql" >&2
  ensure_cmd initdb postgresql >/dev/null 2>&1 || true
  pg_bindir
}

# Prints a free loopback TCP port.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits until a TCP port accepts connections.
wait_port() {
  local port=$1 tries=${2:-200}
  for _ in $(seq "$tries"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "error: nothing listens on port $port" >&2
  return 1
}

# Exports the NAME=value lines of an env file (such as .env) — only the variables the
# environment does not already set, as the binary (dotenvy) does: `WINDOW=10s script` wins over
# a WINDOW in .env. Comments and blank lines are skipped; values may be quoted.
load_env_file() {
  local file=$1 line name value
  [ -f "$file" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"
    case "$line" in ''|'#'*) continue ;; esac
    line="${line#export }"
    name="${line%%=*}"
    [ "$name" = "$line" ] && continue
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    value="${line#*=}"
    case "$value" in \"*\") value="${value:1:${#value}-2}" ;; \'*\') value="${value:1:${#value}-2}" ;; esac
    [ -n "${!name+x}" ] && continue
    export "$name=$value"
  done <"$file"
}
