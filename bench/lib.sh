# Shared by the bench scripts (sourced): Debian installs, a work directory whose processes are
# stopped at exit, and the measurements. Callers set LOAD_CPU and DURATION (and H2_REQUESTS,
# H2_CLIENTS, H2_STREAMS for run_h2), keep their results in the associative array R, and add the
# PIDs they start to `pids`.

# bench_install COMMAND:PACKAGE ...: installs the packages whose command is missing.
bench_install() {
  local need=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null || need+=("${spec#*:}")
  done
  ((${#need[@]})) || return 0
  echo "installing ${need[*]}" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# nginx_top NAME: the start of every bench nginx's configuration — one worker in the
# foreground, its error log and pid in $work as NAME-error.log and NAME.pid, and an open http
# block without an access log or a limit on keep-alive requests (the caller closes it).
nginx_top() {
  cat <<EOC
worker_processes 1;
daemon off;
error_log $work/$1-error.log;
pid $work/$1.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
EOC
}

# nginx_hello NAME LISTEN_LINES: a whole nginx configuration answering "hello world" on the
# addresses of LISTEN_LINES (`listen …;` directives).
nginx_hello() {
  nginx_top "$1"
  printf '  server { %s location / { return 200 "hello world\\n"; } }\n}\n' "$2"
}

# start_backend PORT: the backend every bench proxies to — nginx answering "hello world" on
# PORT, one worker on LOAD_CPU. backend_worker prints its worker's PID (once it listens).
start_backend() {
  nginx_hello backend "listen 127.0.0.1:$1;" >"$work/backend.conf"
  taskset -c "$LOAD_CPU" nginx -c "$work/backend.conf" &
  pids+=($!)
}
# The backend's worker process; fails clearly when the backend did not start (its port taken by
# something else would otherwise be measured in its place).
backend_worker() {
  local pid
  for _ in $(seq 100); do [ -s "$work/backend.pid" ] && break; sleep 0.05; done
  pid=$(cat "$work/backend.pid" 2>/dev/null) && pgrep -P "$pid" | head -1 && return 0
  echo "the backend (nginx) did not start: is its port already taken? see $work/backend-error.log" >&2
  exit 1
}

# nginx_proxy_conf FILE BACKEND_PORT SERVER_LINES [HTTP_LINES]: nginx (one worker, no access log)
# as a reverse proxy with upstream keep-alive to the backend; SERVER_LINES (its listen lines and
# any TLS settings) go in its server block, HTTP_LINES in its http block.
nginx_proxy_conf() {
  {
    nginx_top proxy
    cat <<EOC
${4:-}
  upstream backend { server 127.0.0.1:$2; keepalive 256; keepalive_requests 10000000; }
  server {
$3
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOC
  } >"$1"
}

# weft_proxy_yaml FILE PORT ADMIN_PORT BACKEND_PORT: weft with one plain listener routing
# everything to the backend (HTTP/1.1).
weft_proxy_yaml() {
  cat >"$1" <<EOC
admin: { address: "127.0.0.1:$3" }
listeners:
  - { name: main, address: "127.0.0.1:$2", routes: main }
routes:
  main:
    - to: [{ cluster: backend }]
clusters:
  - { name: backend, endpoints: ["127.0.0.1:$4"], protocol: http1 }
EOC
}

# haproxy_h2c_cfg FILE PORT BACKEND_PORT: haproxy (one thread) taking prior-knowledge h2c on
# PORT, reusing its HTTP/1.1 connections to the backend.
haproxy_h2c_cfg() {
  cat >"$1" <<EOC
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend h2c
  bind 127.0.0.1:$2 proto h2
  default_backend backend
backend backend
  server b1 127.0.0.1:$3
EOC
}

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One wrk run: prints "rps p50_us p99_us cpu_us_per_req" (CPU of process `pid`).
run_wrk() { # url pid conns [extra wrk args...]
  local url=$1 pid=$2 conns=$3 c0 c1 out
  shift 3
  c0=$(cpu_ticks "$pid")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$@" "$url")
  c1=$(cpu_ticks "$pid")
  echo "$out" | awk -v c0="$c0" -v c1="$c1" -v tick="$TICK" '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return (v+0)*1000; if (v ~ /s$/) return (v+0)*1000000; return v }
    / 50% / { p50 = us($2) } / 99% / { p99 = us($2) }
    /requests in/ { n = $1 }
    /Non-2xx/ { bad = $NF }
    /Requests\/sec/ { rps = $2 }
    END { if (bad > 0) print "wrk: " bad " non-2xx answers" > "/dev/stderr";
          printf "%.0f %.0f %.0f %.2f\n", rps, p50, p99, (c1 - c0) * 1000000 / tick / n }'
}

# One h2load run: prints "rps p50_us p99_us cpu_us_per_req" (percentiles from its log).
run_h2() { # url pid
  local c0 c1 out log="$work/h2.log"
  rm -f "$log"
  c0=$(cpu_ticks "$2")
  out=$(taskset -c "$LOAD_CPU" h2load -n "$H2_REQUESTS" -c "$H2_CLIENTS" -m "$H2_STREAMS" -t 1 --log-file="$log" "$1")
  c1=$(cpu_ticks "$2")
  local rps ok
  rps=$(echo "$out" | awk '/^finished in/ { print $4 }')
  ok=$(echo "$out" | awk '/^requests:/ { print $8 }')
  [ "$ok" = "$H2_REQUESTS" ] || { echo "h2load: only $ok of $H2_REQUESTS succeeded" >&2; echo "$out" >&2; }
  # Log columns: start time, status, duration (µs).
  awk '{ print $3 }' "$log" | sort -n | awk -v rps="$rps" -v c0="$c0" -v c1="$c1" -v tick="$TICK" -v n="$H2_REQUESTS" '
    { v[NR] = $1 } END { printf "%.0f %.0f %.0f %.2f\n", rps, v[int(NR*0.5)], v[int(NR*0.99)], (c1 - c0) * 1000000 / tick / n }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# The median of column $2 of the runs of target $1.
col() { echo -n "${R[$1]}" | awk -v c="$2" '{ print $c }' | median; }
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { printf "%.*f", d, a / b }'; }
delta() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.2f", a - b }'; }

# The table of a filter benchmark: `direct` (the backend alone), then each target named (the
# first is weft without filters, which the others are compared with); with BEFORE set, the same
# targets measured on that build (`before-<name>`) and the after/before lines. `$1` is what
# the older build ran (shown with BEFORE).
filter_table() {
  local what=$1; shift
  local names=("$@") k cpu base_rps base_cpu
  _table_row() { printf '%-12s %10s %8s %8s %10s %12s %14s\n' "$@"; }
  _table_row "target" "req/s" "p50 µs" "p99 µs" "CPU µs/req" "vs none rps" "vs none CPU µs"
  base_rps=$(col "${names[0]}" 1); base_cpu=$(col "${names[0]}" 4)
  _table_row direct "$(col direct 1)" "$(col direct 2)" "$(col direct 3)" "($(col direct 4))" "$(ratio "$(col direct 1)" "$base_rps" 3)" "-"
  for k in "${names[@]}"; do
    cpu=$(col "$k" 4)
    _table_row "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "$cpu" "$(ratio "$(col "$k" 1)" "$base_rps" 3)" "$(delta "$cpu" "$base_cpu")"
  done
  [ -n "${BEFORE:-}" ] || return 0
  base_rps=$(col "before-${names[0]}" 1); base_cpu=$(col "before-${names[0]}" 4)
  for k in "${names[@]/#/before-}"; do
    cpu=$(col "$k" 4)
    _table_row "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "$cpu" "$(ratio "$(col "$k" 1)" "$base_rps" 3)" "$(delta "$cpu" "$base_cpu")"
  done
  echo
  echo "after/before ($BEFORE$what), same run:"
  for k in "${names[@]}"; do
    echo "  $k: throughput $(ratio "$(col "$k" 1)" "$(col "before-$k" 1)" 3), CPU µs/request $(delta "$(col "$k" 4)" "$(col "before-$k" 4)")"
  done
}
