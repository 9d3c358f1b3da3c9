#!/usr/bin/env bash
# Coverage-guided fuzzing of pubgate's input parsers with cargo-fuzz (libFuzzer + AddressSanitizer),
# each target for a bounded time.
#
#   scripts/fuzz.sh                      # every target, 60 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh ws_frames
#
# Environment:
#   FUZZ_SECONDS=N      time per target (default 60)
#   FUZZ_TOOLCHAIN=X    rustup toolchain to build with (default: the active one, with
#                       RUSTC_BOOTSTRAP=1 to unlock the -Z flags cargo-fuzz passes; not set for a
#                       nightly* toolchain)
#   FUZZ_REQUIRED=1     fail instead of skipping when cargo-fuzz cannot run here
#
# Corpora grow in fuzz/corpus/TARGET (gitignored), seeded from fuzz/seeds/TARGET. A crash leaves its
# input in fuzz/artifacts/TARGET/ and makes the script fail; turn it into a regression test in
# gateway/tests/fuzz_inputs.rs. The bounded property tests in that file are the CI gate; this script
# is for longer runs by hand.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
ALL_TARGETS=(protocol_parse topic ws_frames config_toml)
if [[ $# -gt 0 ]]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

log() { printf 'fuzz: %s\n' "$*" >&2; }
skip() {
    log "$*"
    if [[ "${FUZZ_REQUIRED:-0}" == 1 ]]; then exit 1; fi
    log "skipped (the property tests in gateway/tests/fuzz_inputs.rs still cover these parsers)"
    exit 0
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    skip "cargo-fuzz is not installed (cargo install cargo-fuzz --locked)"
fi

# cargo-fuzz needs unstable rustc flags (-Zsanitizer, sancov passes): a nightly toolchain, or the
# stable one with RUSTC_BOOTSTRAP=1 (its x86_64 Linux std ships the sanitizer runtimes). The
# default is the project's own toolchain with RUSTC_BOOTSTRAP=1, which works here.
CARGO=(cargo)
RUSTC=(rustc)
if [[ -n "${FUZZ_TOOLCHAIN:-}" ]]; then
    CARGO=(cargo "+$FUZZ_TOOLCHAIN")
    RUSTC=(rustc "+$FUZZ_TOOLCHAIN")
fi
if [[ "${FUZZ_TOOLCHAIN:-}" != nightly* ]]; then export RUSTC_BOOTSTRAP=1; fi
RUSTC_VERSION="$("${RUSTC[@]}" --version 2>&1)" || skip "no usable rustc: $RUSTC_VERSION"
log "toolchain: $RUSTC_VERSION${RUSTC_BOOTSTRAP:+ (RUSTC_BOOTSTRAP=1)}"

cd "$ROOT"
mkdir -p target
build() {
    if [[ $# -eq 0 ]]; then
        "${CARGO[@]}" fuzz build -O
    else
        for t in "$@"; do "${CARGO[@]}" fuzz build -O "$t" || return 1; done
    fi
}
log "building (release + ASan; the first build takes a few minutes)"
if ! build "$@" >"$ROOT/target/fuzz-build.log" 2>&1; then
    tail -n 30 "$ROOT/target/fuzz-build.log" >&2
    skip "cargo fuzz build failed ($RUSTC_VERSION) (log: target/fuzz-build.log)"
fi

failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log "running $t for ${SECONDS_PER_TARGET}s"
    # -timeout: one input may take at most 10 s; -rss_limit_mb bounds memory on a shared machine.
    if "${CARGO[@]}" fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>"$ROOT/target/fuzz-$t.log"; then
        log "$t: no crash ($(grep -E '^stat::number_of_executed_units' "$ROOT/target/fuzz-$t.log" | awk '{print $2}') runs)"
    else
        tail -n 40 "$ROOT/target/fuzz-$t.log" >&2
        log "$t: CRASH (inputs in fuzz/artifacts/$t/, log target/fuzz-$t.log)"
        failed+=("$t")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    log "crashes in: ${failed[*]}"
    exit 1
fi
log "all targets ran ${SECONDS_PER_TARGET}s without a crash"
