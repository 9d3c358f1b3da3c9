#!/usr/bin/env bash
# The JavaScript client's unit tests, then the live page end to end in a real browser: Debian's
# chromium driven by playwright-core against real pubgate nodes on a real Redis, and through HAProxy
# (clients/js/e2e/browser.mjs says what it checks), after the client's Node tests against real nodes
# (clients/js/e2e/*.test.js). Installs chromium, redis, haproxy and the npm
# packages itself. Artifacts: target/e2e/page.png (screenshot), target/e2e/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/apt-missing.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-missing.sh"
apt_missing e2e-browser chromium:chromium redis-server:redis-server haproxy:haproxy "node:nodejs npm"

echo "== js client unit tests"
(cd clients/js && node --test test/*.test.js)

(cd clients/js && npm ci --no-audit --no-fund --loglevel=error)
# The build the test run made (features resolved with the tests'), not a second one.
cargo test -q --workspace --all-targets --no-run
bin_dir="${CARGO_TARGET_DIR:-$PWD/target}/debug"

echo "== js client in Node against real nodes (restart, JWT refresh and 4001, hostile server)"
(cd clients/js && PUBGATE_BIN="$bin_dir/pubgate" timeout 120 node --test e2e/*.test.js)

echo "== browser end to end"
mkdir -p target/e2e
PUBGATE_BIN="$bin_dir/pubgate" E2E_OUT="$PWD/target/e2e" CHROMIUM=/usr/bin/chromium \
  timeout 240 node clients/js/e2e/browser.mjs
