#!/usr/bin/env bash
# The JavaScript client's unit tests, then the live page end to end in a real browser: Debian's
# chromium driven by playwright-core against real pubgate nodes on a real Redis, and through HAProxy
# (clients/js/e2e/browser.mjs says what it checks). Installs chromium, redis, haproxy and the npm
# packages itself. Artifacts: target/e2e/page.png (screenshot), target/e2e/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/apt-missing.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-missing.sh"
apt_missing e2e-browser chromium:chromium redis-server:redis-server haproxy:haproxy "node:nodejs npm"

echo "== js client unit tests"
(cd clients/js && node --test test/*.test.js)

echo "== browser end to end"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error)
# The build the test run made (features resolved with the tests'), not a second one.
cargo test -q --workspace --all-targets --no-run
mkdir -p target/e2e
PUBGATE_BIN="$PWD/target/debug/pubgate" E2E_OUT="$PWD/target/e2e" CHROMIUM=/usr/bin/chromium \
  timeout 180 node clients/js/e2e/browser.mjs
