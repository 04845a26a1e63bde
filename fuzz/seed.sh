#!/usr/bin/env bash
# Seed the qcow2_open corpus with small real images written by qemu-img/qemu-io, so the fuzzer
# starts past the header checks. Usage: bash fuzz/seed.sh && RUSTC_BOOTSTRAP=1 cargo fuzz run qcow2_open
set -euo pipefail
cd "$(dirname "$0")"
out=corpus/qcow2_open
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
i=0
for o in "compat=1.1,cluster_size=512" "compat=0.10,cluster_size=512" "cluster_size=4096,refcount_bits=1" \
         "cluster_size=4096,refcount_bits=64" "cluster_size=16384,extended_l2=on" "cluster_size=1024,lazy_refcounts=on"; do
    f="$tmp/img$i.qcow2"
    qemu-img create -q -f qcow2 -o "$o" "$f" 256k
    qemu-io -c 'write -P 0x11 0 3000' -c 'write -z 8k 4k' -c 'write -P 0x22 100k 512' "$f" >/dev/null
    cp "$f" "$out/seed$i"
    i=$((i + 1))
done
qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/c.qcow2" 64k
qemu-io -c 'write -P 0x33 0 64k' "$tmp/c.qcow2" >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 "$tmp/c.qcow2" "$out/seed-compressed"
qemu-img create -q -f qcow2 -o cluster_size=4096 -u -b c.qcow2 -F qcow2 "$out/seed-backing" 64k
echo "seeded $(ls "$out" | wc -l) images into fuzz/$out"
