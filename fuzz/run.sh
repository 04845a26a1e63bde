#!/usr/bin/env bash
# Run every cargo-fuzz target for a fixed time budget (seconds per target, default 15), seeding
# the corpora first. A crash, leak, timeout or OOM fails the script and leaves the reproducer in
# fuzz/artifacts/<target>/. Usage: bash fuzz/run.sh [SECONDS] [TARGET...]
# CI runs it briefly; for a soak: bash fuzz/run.sh 3600
set -euo pipefail
cd "$(dirname "$0")"
budget=${1:-15}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(qcow2_open qed_open nbd_handshake nbd_transmission qmp_input keyval)
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
bash seed.sh >/dev/null
export RUSTC_BOOTSTRAP=1   # cargo-fuzz needs nightly flags; the stable toolchain allows them this way
cargo fuzz build -O >/dev/null 2>&1 || cargo fuzz build -O
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    out=$(cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$budget" -rss_limit_mb=2048 -timeout=10 2>&1) || {
        echo "$out" | tail -40
        echo "fuzz target $t FAILED; reproducer in fuzz/artifacts/$t/"
        exit 1
    }
    echo "$out" | grep -E "^Done" | sed "s/^/$t: /"
done
