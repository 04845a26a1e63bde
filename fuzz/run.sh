#!/usr/bin/env bash
# Run every cargo-fuzz target for a fixed time budget (seconds per target, default 15), seeding
# the corpora first. A crash, leak, timeout or OOM fails the script and leaves the reproducer in
# fuzz/artifacts/<target>/. Usage: bash fuzz/run.sh [SECONDS] [TARGET...]
# CI runs it briefly; for a soak: bash fuzz/run.sh 3600
# FUZZ_BUILD_ONLY=1 builds the targets and stops (CI builds them in the background while the
# tests run, then runs them).
#
# With cargo-fuzz installed the targets are built by `cargo fuzz` with AddressSanitizer (the
# soak setup). Without it (CI, or FUZZ_DIRECT=1) they are built by plain cargo with the same
# libFuzzer coverage instrumentation and no sanitizer, and run directly: that saves installing
# cargo-fuzz and the ASan build (minutes on a 2-core CI box); safe Rust needs ASan little.
set -euo pipefail
cd "$(dirname "$0")"
budget=${1:-15}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(qcow2_open qed_open nbd_handshake nbd_transmission qmp_input keyval)
fi
bash seed.sh >/dev/null
triple=$(rustc -vV | sed -n 's/^host: //p')
if [ "${FUZZ_DIRECT:-0}" != 1 ] && command -v cargo-fuzz >/dev/null 2>&1; then
    export RUSTC_BOOTSTRAP=1   # cargo-fuzz needs nightly flags; the stable toolchain allows them this way
    cargo fuzz build -O >/dev/null 2>&1 || cargo fuzz build -O
    run_target() { cargo fuzz run -O "$1" "corpus/$1" -- "${@:2}"; }
else
    # What `cargo fuzz build -O -s none` passes to rustc (coverage for libFuzzer's feedback,
    # `cfg(fuzzing)` for the targets). --target keeps build scripts and proc macros plain.
    export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth"
    bins=()
    for t in "${targets[@]}"; do bins+=(--bin "$t"); done
    cargo build --release --quiet --target "$triple" --target-dir target/direct "${bins[@]}"
    run_target() { "target/direct/$triple/release/$1" -artifact_prefix="artifacts/$1/" "corpus/$1" "${@:2}"; }
fi
if [ "${FUZZ_BUILD_ONLY:-0}" = 1 ]; then
    echo "fuzz targets built: ${targets[*]}"
    exit 0
fi
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    out=$(run_target "$t" -max_total_time="$budget" -rss_limit_mb=2048 -timeout=10 2>&1) || {
        echo "$out" | tail -40
        echo "fuzz target $t FAILED; reproducer in fuzz/artifacts/$t/"
        exit 1
    }
    echo "$out" | grep -E "^Done" | sed "s/^/$t: /"
done
