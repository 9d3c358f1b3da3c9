#!/usr/bin/env bash
# A local multi-node pubgate stack on loopback: one redis-server, N pubgate nodes on the Redis broker,
# and HAProxy in front (WebSocket-aware, health-checking /readyz). Every process is started in the
# foreground of its own background job, so the PIDs recorded in the state file are the real ones;
# `stop` signals exactly those PIDs and nothing else.
#
#   deploy/local-cluster.sh start [N]   start N nodes (default 3); prints the addresses
#   deploy/local-cluster.sh status      each process: name, address, PID, and whether it is up/ready
#   deploy/local-cluster.sh stop        stop what `start` started
#
# Environment:
#   PUBGATE_BIN        the pubgate binary (default: target/release/pubgate, else target/debug/pubgate)
#   PUBGATE_STACK_DIR  where state, configs and logs go (default: <repo>/.work/local-cluster)
#   PUBGATE_HISTORY    history.size for the nodes (default 1000)
# Needs: redis-server, redis-cli, haproxy, curl.

set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${PUBGATE_STACK_DIR:-$repo/.work/local-cluster}"
state="$dir/state"

die() { echo "local-cluster: $*" >&2; exit 1; }

# A loopback port nobody listens on and that this run has not handed out yet, taken below the
# kernel's ephemeral range so an outgoing connection cannot grab it between the check and the bind.
used_ports=" "
eph_low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
(( eph_low > 12000 )) || eph_low=32768
free_port() {
  local p tries=0
  while (( tries < 200 )); do
    p=$(( 10000 + RANDOM % (eph_low - 10000) ))
    tries=$(( tries + 1 ))
    [[ "$used_ports" == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      used_ports+="$p "
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Waits up to $2 seconds for command $1 to succeed.
wait_for() {
  local cmd="$1" secs="$2" i
  for (( i = 0; i < secs * 10; i++ )); do
    if eval "$cmd" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

# Writes ALL_PIDS into the state being built, once (each phase of `start` adds to the list).
record_pids() {
  grep -v '^ALL_PIDS=' "$state.tmp" >"$state.tmp2" || true
  echo "ALL_PIDS=\"$1\"" >>"$state.tmp2"
  mv "$state.tmp2" "$state.tmp"
}

start() {
  local n="${1:-3}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, got '$n'"
  if [[ -f "$state" ]]; then
    # shellcheck disable=SC1090
    source "$state"
    for pid in ${ALL_PIDS:-}; do
      alive "$pid" && die "a stack is already running (PID $pid); run '$0 stop' first"
    done
    rm -f "$state"
  fi
  for tool in redis-server redis-cli haproxy curl; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
  done
  local bin="${PUBGATE_BIN:-}"
  if [[ -z "$bin" ]]; then
    if [[ -x "$repo/target/release/pubgate" ]]; then bin="$repo/target/release/pubgate"
    elif [[ -x "$repo/target/debug/pubgate" ]]; then bin="$repo/target/debug/pubgate"
    else die "no pubgate binary: run 'cargo build --release -p gateway' or set PUBGATE_BIN"; fi
  fi
  # Say which one: a stale release build next to a fresh debug one is an easy trap.
  echo "local-cluster: using $bin" >&2
  mkdir -p "$dir/redis"
  local all_pids=""
  {
    echo "# pubgate local stack, started $(date -u +%FT%TZ)"
    echo "STACK_DIR=$dir"
  } >"$state.tmp"

  local redis_port; redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir/redis" --logfile "$dir/redis/redis.log" --daemonize no >/dev/null 2>&1 &
  local redis_pid=$!
  all_pids+="$redis_pid "
  echo "REDIS_PID=$redis_pid" >>"$state.tmp"
  echo "REDIS_PORT=$redis_port" >>"$state.tmp"
  record_pids "$all_pids"; cp "$state.tmp" "$state"
  wait_for "redis-cli -h 127.0.0.1 -p $redis_port PING | grep -q PONG" 10 \
    || die "redis-server did not start; see $dir/redis/redis.log"

  local servers="" i
  # Nodes with TLS (PUBGATE__TLS__CERT/KEY in the environment) serve /readyz over https only: the
  # checks below and HAProxy's then speak TLS to them (the balancer itself stays plain).
  local node_scheme=http node_ssl=""
  if [[ -n "${PUBGATE__TLS__CERT:-}" ]]; then node_scheme=https; node_ssl=" ssl verify none"; fi
  for (( i = 1; i <= n; i++ )); do
    local port; port=$(free_port)
    PUBGATE__BROKER__KIND=redis \
    PUBGATE__BROKER__URL="redis://127.0.0.1:$redis_port" \
    PUBGATE__HISTORY__SIZE="${PUBGATE_HISTORY:-1000}" \
    PUBGATE__DRAIN__GRACE=5s \
      "$bin" --listen "127.0.0.1:$port" >"$dir/node$i.log" 2>&1 &
    local pid=$!
    all_pids+="$pid "
    echo "NODE${i}_PID=$pid" >>"$state.tmp"
    echo "NODE${i}_PORT=$port" >>"$state.tmp"
    servers+="    server node$i 127.0.0.1:$port check inter 1s fall 2 rise 2$node_ssl"$'\n'
  done
  echo "NODES=$n" >>"$state.tmp"
  record_pids "$all_pids"; cp "$state.tmp" "$state"

  local lb_port; lb_port=$(free_port)
  # HAProxy needs two descriptors per proxied connection.
  local maxconn=$(( $(ulimit -n) / 2 - 100 ))
  (( maxconn > 100000 )) && maxconn=100000
  cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn $maxconn

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # Upgraded WebSocket connections live on the tunnel timeout.
    timeout tunnel 1h
    option http-server-close
    # A refused connect (a node that just crashed, before the health check notices) is retried on
    # another node at once, instead of on the same one after HAProxy's one-second turn-around.
    retries 3
    option redispatch 1

frontend pubgate
    bind 127.0.0.1:$lb_port
    default_backend nodes

backend nodes
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
$servers
EOF
  haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
  local lb_pid=$!
  all_pids+="$lb_pid "
  echo "HAPROXY_PID=$lb_pid" >>"$state.tmp"
  echo "HAPROXY_PORT=$lb_port" >>"$state.tmp"
  record_pids "$all_pids"
  mv "$state.tmp" "$state"

  for (( i = 1; i <= n; i++ )); do
    local var="NODE${i}_PORT"
    local port; port=$(grep "^$var=" "$state" | cut -d= -f2)
    wait_for "curl -fsSk $node_scheme://127.0.0.1:$port/readyz" 30 \
      || die "node $i (127.0.0.1:$port) is not ready; see $dir/node$i.log (stack left running: '$0 stop')"
  done
  wait_for "curl -fsS http://127.0.0.1:$lb_port/readyz" 15 \
    || die "haproxy has no ready backend; see $dir/haproxy.log"

  echo "pubgate stack up ($n nodes)"
  echo "  balancer  ws://127.0.0.1:$lb_port/ws   http://127.0.0.1:$lb_port/v1/publish/<topic>"
  for (( i = 1; i <= n; i++ )); do
    echo "  node$i     http://127.0.0.1:$(grep "^NODE${i}_PORT=" "$state" | cut -d= -f2)"
  done
  echo "  redis     redis-cli -p $redis_port"
  echo "  state     $state"
}

status() {
  [[ -f "$state" ]] || { echo "no stack (no $state)"; return 0; }
  # shellcheck disable=SC1090
  source "$state"
  # One line per process: what it is, where it listens, its PID, and whether it is up (for a node:
  # whether /readyz answers 200, i.e. it takes traffic).
  local i var port pid
  printf '%-9s %-22s %-8s %s\n' name address pid state
  row() { # name port pid [ready-url]
    local st="gone"
    if alive "$3"; then
      st="running"
      if [[ -n "${4:-}" ]]; then
        if curl -fsS -o /dev/null --max-time 2 "$4" 2>/dev/null; then st="ready"; else st="running, not ready"; fi
      fi
    fi
    printf '%-9s %-22s %-8s %s\n' "$1" "127.0.0.1:$2" "$3" "$st"
  }
  [[ -n "${HAPROXY_PID:-}" ]] && row balancer "$HAPROXY_PORT" "$HAPROXY_PID"
  for (( i = 1; i <= ${NODES:-0}; i++ )); do
    var="NODE${i}_PID"; pid="${!var:-}"
    var="NODE${i}_PORT"; port="${!var:-}"
    row "node$i" "$port" "$pid" "http://127.0.0.1:$port/readyz"
  done
  [[ -n "${REDIS_PID:-}" ]] && row redis "$REDIS_PORT" "$REDIS_PID"
  return 0
}

stop() {
  [[ -f "$state" ]] || { echo "no stack to stop (no $state)"; return 0; }
  # shellcheck disable=SC1090
  source "$state"
  local pid i order=""
  # Balancer first, then nodes (SIGTERM drains them), then Redis. A PID whose process is no longer
  # the program we started (the PID was reused) is left alone.
  ours() { [[ "$(ps -o comm= -p "$1" 2>/dev/null)" == "$2"* ]]; }
  if alive "${HAPROXY_PID:-}" && ours "$HAPROXY_PID" haproxy; then order+=" $HAPROXY_PID"; fi
  for (( i = 1; i <= ${NODES:-0}; i++ )); do
    local var="NODE${i}_PID"
    if alive "${!var:-}" && ours "${!var}" pubgate; then order+=" ${!var}"; fi
  done
  if alive "${REDIS_PID:-}" && ours "$REDIS_PID" redis-server; then order+=" $REDIS_PID"; fi
  for pid in $order; do
    alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  for (( i = 0; i < 100; i++ )); do
    local left=""
    for pid in $order; do alive "$pid" && left+="$pid "; done
    [[ -z "$left" ]] && break
    sleep 0.1
  done
  for pid in $order; do
    if alive "$pid"; then
      echo "PID $pid did not stop on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$state"
  echo "pubgate stack stopped"
}

case "${1:-}" in
  start) start "${2:-3}" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [N] | status | stop" >&2; exit 2 ;;
esac
