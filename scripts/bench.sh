#!/usr/bin/env bash
# Benchmark suite, end to end: builds pubgate and pubgate-loadtest (release), starts a fresh pubgate
# on a free loopback port for each one-node scenario (and, for the multi-node ones, Redis + nodes +
# HAProxy through deploy/local-cluster.sh), runs it, stops what it started by PID, and writes one
# JSON result per scenario (plus the exact commands) into the output directory.
#
#   scripts/bench.sh [--out DIR] [--quick] [--only NAMES] [--charts DIR]
#
#   --out DIR     results directory (default target/bench-results/<UTC timestamp>)
#   --quick       small and short: a smoke run of every scenario (about a minute)
#   --only NAMES  comma-separated subset of: memory,limit,cpu40k,p99at20k,step,ceiling,churn,
#                 wss (idle memory per wss:// connection, and CPU per delivery at 40k/s on wss://
#                 against ws://, three interleaved rounds; needs openssl),
#                 ticker (1,000 price topics at 50k ticks/s, 20 dashboards on one wildcard each,
#                 10 of them slow and conflated), redis3 (3 nodes + Redis: fan-out at 20k/40k and
#                 a step), scale100k (100k connections over 6 nodes + Redis), hop (2 nodes + Redis
#                 at 20k deliveries/s, three rounds, the hop split into its parts with tcpdump),
#                 hopvs (the same 2-node load against pubgate and nginx + nchan, rounds
#                 interleaved; HOPVS_ROUNDS (3), HOPVS_VARIANTS ("ws ws-deflate", also wss wss-deflate));
#                 the last four need redis-server and haproxy, hopvs also nginx + libnginx-mod-nchan
#   --charts DIR  also draw memory-per-connection.svg and latency-vs-rate.svg into DIR
#   --nice N      run the server and the tool at this nice level (e.g. -10 on a machine shared with
#                 builds, so they are scheduled first; negative values need root)
#
# Everything targets 127.0.0.1 only and every run is bounded in connections and time.
# See docs/benchmarks.md for what each scenario measures and the numbers of the last full run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${CARGO_TARGET_DIR:-target}/bench-results/$(date -u +%Y%m%dT%H%M%SZ)"
QUICK=0
ONLY="memory,limit,cpu40k,p99at20k,step,ceiling,churn,wss,ticker,redis3,scale100k,hop,hopvs"
CHARTS=""
NICE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    --charts) CHARTS="$2"; shift 2 ;;
    --nice) NICE="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

echo "== building (release)" >&2
cargo build --release -p gateway -p loadtest >&2
TARGET="${CARGO_TARGET_DIR:-target}/release"
# Private copies, so a concurrent rebuild of the tree cannot swap the binaries mid-run.
BIN="$OUT/bin"
mkdir -p "$BIN"
cp "$TARGET/pubgate" "$TARGET/pubgate-loadtest" "$BIN/"
PUBGATE="$BIN/pubgate"
LT="$BIN/pubgate-loadtest"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || true
{ nproc; grep MemTotal /proc/meminfo; uname -r; } > "$OUT/machine.txt"

SERVER_PID=""
SERVER_ADDR=""
SERVER_ARGS=() # extra pubgate arguments for the next start_server (e.g. --config FILE)

start_server() { # env assignments for the server as arguments
  local log="$OUT/server-$1.log"; shift
  env "$@" PUBGATE__LOG__LEVEL=warn nice -n "$NICE" "$PUBGATE" --listen 127.0.0.1:0 ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"} >"$log.out" 2>"$log.err" &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    SERVER_ADDR="$(sed -n 's/^pubgate listening on //p' "$log.out" 2>/dev/null || true)"
    [[ -n "$SERVER_ADDR" ]] && break
    sleep 0.1
  done
  if [[ -z "$SERVER_ADDR" ]]; then
    echo "bench.sh: pubgate did not start; see $log.err" >&2
    stop_server
    exit 1
  fi
  echo "== pubgate pid $SERVER_PID on $SERVER_ADDR" >&2
}

stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
  SERVER_ADDR=""
}

# The URL scheme of one-node runs, and the tool's TLS arguments when it is wss.
SCHEME=ws
TLS_ARGS=()
run() { # name, then loadtest arguments
  local name="$1"; shift
  local cmd=(nice -n "$NICE" "$LT" "$@" --url "$SCHEME://$SERVER_ADDR/ws" "${TLS_ARGS[@]}" --server-pid "$SERVER_PID" --json "$OUT/$name.json")
  echo "$name: ${cmd[*]}" >> "$OUT/commands.txt"
  echo "== $name: ${cmd[*]}" >&2
  "${cmd[@]}" > /dev/null || echo "bench.sh: $name exited with $?" >&2
}

want() { [[ ",$ONLY," == *",$1,"* ]]; }

if [[ $QUICK == 1 ]]; then
  MEM_SIZES="500 2000"; HOLD=3; DUR=3; STEP_DUR=2; SUBS=200; LIMIT_N=2000
  HOP_CAPTURE_DELAY=3; HOP_CAPTURE_SECS=1
else
  MEM_SIZES="1000 5000 10000 19000"; HOLD=15; DUR=20; STEP_DUR=10; SUBS=2000; LIMIT_N=20000
  HOP_CAPTURE_DELAY=6; HOP_CAPTURE_SECS=3
fi

# 1. Memory per idle subscribed connection: a fresh server per size.
if want memory; then
  for n in $MEM_SIZES; do
    start_server "connect-$n" PUBGATE__SERVER__MAX_CONNECTIONS=20000
    run "connect-$n" connect --connections "$n" --topics 100 --connect-rate 2000 --hold "$HOLD" --settle 3
    stop_server
  done
fi

# 2. The 20,000 limit: the server's own open-files limit (20,000) is reached before 20,000
#    connections; two worker processes hold the client side.
if want limit; then
  start_server "connect-limit" PUBGATE__SERVER__MAX_CONNECTIONS=20000
  run "connect-limit-$LIMIT_N" connect --connections "$LIMIT_N" --procs 2 --topics 100 --connect-rate 2000 --hold "$HOLD" --settle 3
  stop_server
fi

# 3. Server CPU per delivery at 40k deliveries/s: 2,000 subscribers over 20 topics, 256-byte payloads.
if want cpu40k; then
  start_server "fanout-40k"
  run "fanout-40k" fanout --subscribers "$SUBS" --topics 20 --delivery-rate 40000 --payload 256 --duration "$DUR" --warmup 2 --publishers 8
  stop_server
fi

# 4. Latency at 20k deliveries/s, same shape.
if want p99at20k; then
  start_server "fanout-20k"
  run "fanout-20k" fanout --subscribers "$SUBS" --topics 20 --delivery-rate 20000 --payload 256 --duration "$DUR" --warmup 2 --publishers 8
  stop_server
fi

# 5. Highest sustainable delivery rate: steps of x1.25 from 20k/s until loss, p99 > 50 ms or the
#    delivered rate falls under 95% of the offered one.
if want step; then
  start_server "step"
  run "step" step --subscribers "$SUBS" --topics 20 --payload 256 --duration "$STEP_DUR" --warmup 2 --publishers 16 --start 20000 --factor 1.25 --max 400000 --p99-limit-ms 50
  stop_server
fi

# 6. Throughput ceiling: the same steps from 40k/s, failing only on loss, a delivered rate under 95%
#    of the offered one, or p99 above 1 s (on a shared 2-core box the 50 ms limit above trips on
#    scheduling noise first).
if want ceiling; then
  start_server "ceiling"
  run "ceiling" step --subscribers "$SUBS" --topics 20 --payload 256 --duration "$STEP_DUR" --warmup 2 --publishers 16 --start 40000 --factor 1.25 --max 400000 --p99-limit-ms 1000
  stop_server
fi

# 7. Churn: 200 connections/s joining and leaving (2 s each, 20% dropped without a close) during a
#    20k deliveries/s fan-out.
if want churn; then
  start_server "churn"
  run "churn" churn --subscribers "$SUBS" --topics 20 --delivery-rate 20000 --payload 256 --duration "$DUR" --warmup 1 --publishers 8 --churn-rate 200 --churn-life 2 --churn-drop-pct 20
  stop_server
fi

# 8. TLS (wss://): idle memory per connection at the largest memory size, then server CPU per
#    delivery at 40k/s on wss:// and ws://, three rounds interleaved so that other load on a shared
#    machine hits both alike. ECDSA P-256 leaf signed by a private CA; TLS 1.3 is negotiated.
# A private CA and an ECDSA P-256 leaf for 127.0.0.1 in $OUT/tls (once per run).
make_tls() {
  [[ -f "$OUT/tls/tls.crt" ]] && return 0
  mkdir -p "$OUT/tls"
  (
    cd "$OUT/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
      -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
      -keyout tls.key -out tls.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext
    openssl x509 -req -in tls.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out leaf.pem -extfile ext 2>/dev/null
    cat leaf.pem ca.pem > tls.crt
  )
}

if want wss; then
  make_tls
  TLS_ENV=(PUBGATE__TLS__CERT="$OUT/tls/tls.crt" PUBGATE__TLS__KEY="$OUT/tls/tls.key")
  n="${MEM_SIZES##* }"
  SCHEME=wss TLS_ARGS=(--tls-ca "$OUT/tls/ca.pem")
  start_server "connect-wss-$n" PUBGATE__SERVER__MAX_CONNECTIONS=20000 "${TLS_ENV[@]}"
  run "connect-wss-$n" connect --connections "$n" --topics 100 --connect-rate 2000 --hold "$HOLD" --settle 3
  stop_server
  for round in 1 2 3; do
    SCHEME=wss TLS_ARGS=(--tls-ca "$OUT/tls/ca.pem")
    start_server "fanout-40k-wss-$round" "${TLS_ENV[@]}"
    run "fanout-40k-wss-$round" fanout --subscribers "$SUBS" --topics 20 --delivery-rate 40000 --payload 256 --duration "$DUR" --warmup 2 --publishers 8
    stop_server
    SCHEME=ws TLS_ARGS=()
    start_server "fanout-40k-ws-$round"
    run "fanout-40k-ws-$round" fanout --subscribers "$SUBS" --topics 20 --delivery-rate 40000 --payload 256 --duration "$DUR" --warmup 2 --publishers 8
    stop_server
  done
fi

# 8b. Conflation, a price ticker: 1,000 topics at 50k ticks/s (HTTP batches of 100) for 10 s,
#     20 dashboards each on one `prices.>` subscription, 10 reading at most 2,000 frames/s, against a
#     node with the `prices` namespace set to conflate (deploy/bench/ticker.toml). The tool exits
#     non-zero when an order check fails, a fast dashboard misses a tick or a slow one does not end
#     on every final value. --quick: 1,000 topics at 5k/s for 2 s, with 2 KB ticks so they overflow
#     the kernel's socket buffer (up to 4 MB) and reach the node's conflation within the run.
if want ticker; then
  if [[ $QUICK == 1 ]]; then TICK_ARGS=(--topics 1000 --rate 5000 --duration 2 --dashboards 4 --slow 2 --slow-rate 1000 --payload 2000); else TICK_ARGS=(); fi
  SERVER_ARGS=(--config deploy/bench/ticker.toml)
  start_server "ticker"
  SERVER_ARGS=()
  run "ticker" ticker ${TICK_ARGS[@]+"${TICK_ARGS[@]}"}
  stop_server
fi

# Multi-node scenarios: a local stack of N nodes on one Redis (deploy/local-cluster.sh), the load
# spread over the nodes directly; Redis's CPU counts with the nodes' (--broker-pid).
STACK_UP=0
STACK_SCHEME=ws # wss when the nodes get PUBGATE__TLS__* (then STACK_TLS_ARGS holds --tls-ca)
STACK_TLS_ARGS=()
stack_start() { # nodes, then env assignments for the nodes
  local n="$1"; shift
  env "$@" PUBGATE__LOG__LEVEL=warn PUBGATE_BIN="$PUBGATE" PUBGATE_STACK_DIR="$OUT/stack" \
    deploy/local-cluster.sh start "$n" >&2
  STACK_UP=1
  # shellcheck disable=SC1091
  . "$OUT/stack/state"
  STACK_ARGS=()
  for i in $(seq 1 "$n"); do
    local port="NODE${i}_PORT" pid="NODE${i}_PID"
    STACK_ARGS+=(--url "$STACK_SCHEME://127.0.0.1:${!port}/ws" --server-pid "${!pid}")
  done
  STACK_ARGS+=(${STACK_TLS_ARGS[@]+"${STACK_TLS_ARGS[@]}"})
  # Redis's CPU in each measured window counts with the nodes' (server_and_broker_us_per_delivery).
  STACK_ARGS+=(--broker-pid "$REDIS_PID")
}
stack_stop() {
  if [[ $STACK_UP == 1 ]]; then
    PUBGATE_STACK_DIR="$OUT/stack" deploy/local-cluster.sh stop >&2 || true
    STACK_UP=0
  fi
}
NCHAN_UP=0
nchan_stop() {
  if [[ $NCHAN_UP == 1 ]]; then
    NCHAN_STACK_DIR="$OUT/nchan-stack" scripts/nchan/stack.sh stop >&2 || true
    NCHAN_UP=0
  fi
}
trap 'stop_server; stack_stop; nchan_stop' EXIT
run_multi() { # name, then loadtest arguments (the stack's --url/--server-pid are added)
  local name="$1"; shift
  local cmd=(nice -n "$NICE" "$LT" "$@" "${STACK_ARGS[@]}" --json "$OUT/$name.json")
  echo "$name: ${cmd[*]}" >> "$OUT/commands.txt"
  echo "== $name: ${cmd[*]}" >&2
  "${cmd[@]}" > /dev/null || echo "bench.sh: $name exited with $?" >&2
}
have_stack_tools() {
  if command -v redis-server >/dev/null && command -v haproxy >/dev/null; then
    return 0
  fi
  echo "bench.sh: skipping $1: needs redis-server and haproxy (scripts/test-deps.sh installs them)" >&2
  return 1
}

# 9. Three nodes + Redis: fan-out at 20k and 40k deliveries/s, and the highest sustainable rate.
if want redis3 && have_stack_tools redis3; then
  stack_start 3
  for rate in 20000 40000; do
    run_multi "redis3-fanout-$((rate / 1000))k" fanout --subscribers "$SUBS" --topics 20 --delivery-rate "$rate" --payload 256 --duration "$DUR" --warmup 2 --publishers 8 --shared-broker
  done
  run_multi "redis3-step" step --subscribers "$SUBS" --topics 20 --payload 256 --duration "$STEP_DUR" --warmup 2 --publishers 16 --start 40000 --factor 1.4 --max 300000 --p99-limit-ms 50 --shared-broker
  stack_stop
fi

# 10. 100k idle subscribed connections over six nodes (each under the 20,000 open-files limit) and
#    six load processes.
if want scale100k && have_stack_tools scale100k; then
  if [[ $QUICK == 1 ]]; then SCALE_N=6000; else SCALE_N=100000; fi
  stack_start 6 PUBGATE__SERVER__MAX_CONNECTIONS=20000
  run_multi "scale-$SCALE_N" connect --connections "$SCALE_N" --procs 6 --topics 100 --connect-rate 3000 --hold "$HOLD" --settle 3
  stack_stop
fi

# 11. Cross-node hop: 2 nodes + Redis, fan-out at 20k deliveries/s (2,000 subscribers over 20
#     topics, 256 B, publishes spread over both nodes), three rounds, each on a fresh stack so that one
#     round's Redis state cannot favour the next. Per round: the measured run (latency, CPU per
#     delivery with Redis's, and Redis's own cost of the publish script from INFO commandstats), then,
#     with tcpdump, a shorter run on the same stack whose loopback capture scripts/hop-breakdown.py
#     splits into the hop's parts (kept apart so that capturing cannot slow the measured run).
#     hop-summary.json holds the medians and spread over the rounds. With perf (linux-perf), the
#     capture run also records the scheduler, and each step is split into waking the process and
#     the process's own work. Against nchan: see hopvs below.
# CLOCK_REALTIME minus CLOCK_MONOTONIC in ns: puts tcpdump's timestamps on perf's clock (-k mono).
clock_offset() {
  python3 -c 'import time; print(time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_MONOTONIC))'
}
if want hop && have_stack_tools hop; then
  HOP_ARGS=(fanout --subscribers "$SUBS" --topics 20 --delivery-rate 20000 --payload 256 --warmup 2 --publishers 8 --shared-broker)
  for round in 1 2 3; do
    stack_start 2
    redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    run_multi "hop-$round" "${HOP_ARGS[@]}" --duration "$DUR"
    redis-cli -p "$REDIS_PORT" INFO commandstats > "$OUT/hop-$round.commandstats"
    if command -v tcpdump >/dev/null; then
      # The capture starts after the run's connect ramp and warm-up and stops by its own PID.
      # With perf, the scheduler's events of the same seconds split each step into waking the
      # process and its own work (hop-breakdown.py --sched); they slow this run, not the measured one.
      SCHED_ARGS=()
      (
        sleep "$HOP_CAPTURE_DELAY"
        tcpdump -i lo -s 0 -U -w "$OUT/hop-$round.pcap" \
          "tcp port $REDIS_PORT or tcp port $NODE1_PORT or tcp port $NODE2_PORT" 2>"$OUT/hop-$round.tcpdump.err" &
        tpid=$!
        sleep 1
        ss -tnpH > "$OUT/hop-$round.ss"
        if command -v perf >/dev/null; then
          clock_offset > "$OUT/hop-$round.clock"
          perf record -q -e sched:sched_waking -e sched:sched_switch -a -k mono \
            -o "$OUT/hop-$round.sched.data" -- sleep "$HOP_CAPTURE_SECS" 2>"$OUT/hop-$round.perf.err" \
            || rm -f "$OUT/hop-$round.sched.data"
        else
          sleep "$HOP_CAPTURE_SECS"
        fi
        kill -INT "$tpid" 2>/dev/null || true
        wait "$tpid" 2>/dev/null || true
      ) &
      capture_pid=$!
      run_multi "hop-capture-$round" "${HOP_ARGS[@]}" --duration "$((HOP_CAPTURE_SECS + 5))"
      wait "$capture_pid" 2>/dev/null || true
      if [[ -s "$OUT/hop-$round.sched.data" ]] \
        && perf script -i "$OUT/hop-$round.sched.data" --ns -F comm,pid,tid,cpu,time,event,trace \
          > "$OUT/hop-$round.sched.txt" 2>/dev/null; then
        SCHED_ARGS=(--sched "$OUT/hop-$round.sched.txt" --clock-offset "$(cat "$OUT/hop-$round.clock")"
          --redis-pid "$REDIS_PID")
      fi
      scripts/hop-breakdown.py "$OUT/hop-$round.pcap" --redis-port "$REDIS_PORT" \
        --node "$NODE1_PORT:$NODE1_PID" --node "$NODE2_PORT:$NODE2_PID" --ss "$OUT/hop-$round.ss" \
        ${SCHED_ARGS[@]+"${SCHED_ARGS[@]}"} \
        --json "$OUT/hop-$round.breakdown.json" >/dev/null || echo "bench.sh: hop-$round breakdown failed" >&2
      rm -f "$OUT/hop-$round.pcap" "$OUT/hop-$round.sched.data" "$OUT/hop-$round.sched.txt"
    fi
    stack_stop
  done
  scripts/hop-summary.py "$OUT" > "$OUT/hop-summary.json" && cat "$OUT/hop-summary.json" >&2
fi

# 12. pubgate against nginx + nchan on the cross-node hop, in one run: the same load on both
#     (2,000 subscribers split over two nodes/instances, 20 topics, 256 B, 20k deliveries/s, 8 HTTP
#     publishers all posting to the first node/instance, so the second one's subscribers get every
#     message across Redis), each round a fresh pubgate stack (deploy/local-cluster.sh) then a
#     fresh nchan stack (scripts/nchan/stack.sh: nginx with as many workers as cores, as pubgate
#     has runtime threads; nchan's Redis storage on its own redis-server). The tool checks every
#     message of both (loss, duplicates, per-topic order) and measures the servers' and Redis's CPU
#     (nginx: master and workers). Variants: ws, ws-deflate (every subscriber offers
#     permessage-deflate; pubgate accepts by default, nchan with nchan_deflate_message_for_websocket),
#     wss and wss-deflate (TLS 1.3 on both, the bench CA's P-256 leaf; publishes over https).
#     hop-summary.py --compare writes hopvs-summary.json: medians [min–max] per system and variant.
have_nchan() {
  if command -v nginx >/dev/null && [[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ]]; then
    return 0
  fi
  echo "bench.sh: skipping $1: needs nginx and libnginx-mod-nchan" >&2
  return 1
}
if want hopvs && have_stack_tools hopvs && have_nchan hopvs; then
  VS_ARGS=(fanout --subscribers "$SUBS" --topics 20 --delivery-rate 20000 --payload 256 --warmup 2
    --publishers 8 --shared-broker --publish-nodes 1 --duration "$DUR")
  for round in $(seq 1 "${HOPVS_ROUNDS:-3}"); do
    for variant in ${HOPVS_VARIANTS:-ws ws-deflate}; do
      EXTRA=()
      [[ $variant == *deflate* ]] && EXTRA=(--deflate)
      PG_ENV=() NC_SCHEME=ws
      STACK_SCHEME=ws STACK_TLS_ARGS=()
      if [[ $variant == wss* ]]; then
        make_tls
        PG_ENV=(PUBGATE__TLS__CERT="$OUT/tls/tls.crt" PUBGATE__TLS__KEY="$OUT/tls/tls.key")
        STACK_SCHEME=wss STACK_TLS_ARGS=(--tls-ca "$OUT/tls/ca.pem") NC_SCHEME=wss
      fi
      stack_start 2 ${PG_ENV[@]+"${PG_ENV[@]}"}
      redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
      echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/hopvs-pubgate-$variant-$round.load"
      run_multi "hopvs-pubgate-$variant-$round" "${VS_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
      STACK_SCHEME=ws STACK_TLS_ARGS=()
      redis-cli -p "$REDIS_PORT" INFO commandstats > "$OUT/hopvs-pubgate-$variant-$round.commandstats"
      stack_stop

      nchan_env=(NCHAN_STACK_DIR="$OUT/nchan-stack")
      [[ $variant == *deflate* ]] && nchan_env+=(NCHAN_DEFLATE=1)
      [[ $NC_SCHEME == wss ]] && nchan_env+=(NCHAN_TLS_CERT="$OUT/tls/tls.crt" NCHAN_TLS_KEY="$OUT/tls/tls.key")
      env "${nchan_env[@]}" scripts/nchan/stack.sh start 2 >&2
      NCHAN_UP=1
      # shellcheck disable=SC1091
      . "$OUT/nchan-stack/state"
      NCHAN_ARGS=(--protocol nchan --broker-pid "$REDIS_PID")
      [[ $NC_SCHEME == wss ]] && NCHAN_ARGS+=(--tls-ca "$OUT/tls/ca.pem")
      for i in 1 2; do
        port="NODE${i}_PORT" pid="NODE${i}_PID" workers="NODE${i}_WORKERS"
        NCHAN_ARGS+=(--url "$NC_SCHEME://127.0.0.1:${!port}" --server-pid "${!pid}")
        for w in ${!workers}; do NCHAN_ARGS+=(--server-pid "$w"); done
      done
      redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
      echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/hopvs-nchan-$variant-$round.load"
      name="hopvs-nchan-$variant-$round"
      cmd=(nice -n "$NICE" "$LT" "${VS_ARGS[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "${NCHAN_ARGS[@]}" --json "$OUT/$name.json")
      echo "$name: ${cmd[*]}" >> "$OUT/commands.txt"
      echo "== $name: ${cmd[*]}" >&2
      "${cmd[@]}" > /dev/null || echo "bench.sh: $name exited with $?" >&2
      redis-cli -p "$REDIS_PORT" INFO commandstats > "$OUT/$name.commandstats"
      nchan_stop
    done
  done
  scripts/hop-summary.py "$OUT" --compare > "$OUT/hopvs-summary.json" && cat "$OUT/hopvs-summary.json" >&2
fi

if [[ -n "$CHARTS" ]]; then
  shopt -s nullglob
  inputs=()
  for f in "$OUT"/connect-[0-9]*.json "$OUT"/scale-[0-9]*.json "$OUT"/step.json; do
    inputs+=(--input "$f")
  done
  if [[ ${#inputs[@]} -gt 0 ]]; then
    "$LT" chart "${inputs[@]}" --out-dir "$CHARTS"
  fi
fi

echo "results in $OUT" >&2
