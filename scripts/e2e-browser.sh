#!/usr/bin/env bash
# The JavaScript client's unit tests, then the live page end to end in a real browser: Debian's
# chromium driven by playwright-core against real pubgate nodes on a real Redis, and through HAProxy
# (clients/js/e2e/browser.mjs says what it checks). Installs chromium, redis, haproxy and the npm
# packages itself. Artifacts: target/e2e/page.png (screenshot), target/e2e/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null || need_apt+=(chromium)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v node >/dev/null || need_apt+=(nodejs npm)
if ((${#need_apt[@]})); then
  echo "e2e-browser: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

echo "== js client unit tests"
(cd clients/js && node --test test/*.test.js)

echo "== browser end to end"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error)
cargo build -q -p gateway --bin pubgate
mkdir -p target/e2e
PUBGATE_BIN="$PWD/target/debug/pubgate" E2E_OUT="$PWD/target/e2e" CHROMIUM=/usr/bin/chromium \
  timeout 180 node clients/js/e2e/browser.mjs
