#!/bin/bash
# Server CPU per WebSocket connection (connect, upgrade, subscribe, hold, close) on an open node and
# with an HS256 JWT in ?access_token=, measured with pubgate-loadtest connect. Needs release builds:
#   cargo build --release -p gateway -p loadtest && bash scripts/token-cost.sh
# Prints one line per run; compare the open and jwt lines (the machine's noise shows in the spread).
set -euo pipefail
cd "$(dirname "$0")/.."
SECRET=bench-secret-bench-secret-bench-secret
N=${N:-8000}
ROUNDS=${ROUNDS:-3}
TOKEN=$(python3 - "$SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
claims = {"sub": "bench", "exp": int(time.time()) + 3600, "subscribe": ["bench.*"], "publish": []}
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
print(head + "." + b64(hmac.new(sys.argv[1].encode(), head.encode(), hashlib.sha256).digest()))
PY
)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq "$ROUNDS"); do
  for mode in open jwt; do
    if [ "$mode" = jwt ]; then export PUBGATE__AUTH__JWT_SECRET=$SECRET; query="?access_token=$TOKEN"
    else unset PUBGATE__AUTH__JWT_SECRET; query=""; fi
    ./target/release/pubgate --listen 127.0.0.1:0 >"$out" 2>/dev/null &
    pid=$!
    until grep -q listening "$out"; do sleep 0.1; done
    addr=$(grep -o '127.0.0.1:[0-9]*' "$out" | head -1)
    before=$(ticks "$pid")
    ./target/release/pubgate-loadtest connect --url "ws://$addr/ws$query" --connections "$N" \
      --topics 10 --hold 0.5 --settle 0.5 --connect-rate 4000 --quiet >/dev/null
    sleep 1
    after=$(ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    # /proc ticks are 10 ms: µs per connection = ticks * 10000 / N.
    echo "$mode: $(( (after - before) * 10000 / N )) µs server CPU per connection ($N connections)"
  done
done
