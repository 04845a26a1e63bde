#!/usr/bin/env bash
# Seed the qcow2_open, qed_open and NBD corpora with small real images written by qemu-img/qemu-io, so the fuzzer
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

# QED: small images with data, zero clusters, a backing name, and one left dirty.
qout=corpus/qed_open
mkdir -p "$qout"
j=0
for o in "cluster_size=4096,table_size=1" "cluster_size=4096,table_size=2" "cluster_size=8192"; do
    f="$tmp/q$j.qed"
    qemu-img create -q -f qed -o "$o" "$f" 1M
    # (qemu-io cannot open table_size=1 images; those seeds stay empty)
    qemu-io -c 'write -P 0x11 0 3000' -c 'write -z 8k 4k' -c 'write -P 0x22 100k 512' "$f" >/dev/null 2>&1 || true
    cp "$f" "$qout/seed$j"
    j=$((j + 1))
done
qemu-img create -q -f qed -o cluster_size=4096 -u -b base.raw -F raw "$qout/seed-backing" 64k
qemu-img create -q -f qed -o cluster_size=4096 "$tmp/d.qed" 64k
qemu-io -c 'write -P 0x33 0 8k' -c 'sigraise 9' "$tmp/d.qed" >/dev/null 2>&1 || true
cp "$tmp/d.qed" "$qout/seed-dirty"
echo "seeded $(ls "$qout" | wc -l) images into fuzz/$qout"

# NBD targets: a few valid client streams (python3 writes the bytes), so the fuzzer starts with
# every option and command in the corpus.
python3 - <<'PY'
import os, struct
IHAVEOPT = 0x49484156454F5054
def opt(code, payload=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload
def s32(b):
    return struct.pack(">I", len(b)) + b
def meta(queries):
    return s32(b"fuzz") + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)
def go(name=b"fuzz", infos=(3,)):
    return s32(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
flags = struct.pack(">I", 3)
hs = "corpus/nbd_handshake"
os.makedirs(hs, exist_ok=True)
seeds = {
    "list": flags + opt(3) + opt(2),
    "info": flags + opt(6, go(infos=(0, 1, 2, 3))) + opt(2),
    "meta": flags + opt(8) + opt(9, meta([b"base:", b"qemu:"])) + opt(10, meta([b"base:allocation"])) + opt(7, go()),
    "ext": flags + opt(11) + opt(10, meta([b"qemu:allocation-depth"])) + opt(7, go()),
    "tls": flags + opt(5) + opt(99, b"junk") + opt(1, b"fuzz"),
}
for k, v in seeds.items():
    open(f"{hs}/{k}", "wb").write(v)
tr = "corpus/nbd_transmission"
os.makedirs(tr, exist_ok=True)
def req(ext, flags, cmd, cookie, off, length, payload=b""):
    if ext:
        return struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, cookie, off, length) + payload
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, off, length) + payload
for mode in range(4):
    ext = mode == 2
    body = (req(ext, 1, 1, 1, 4096, 512, b"\x5a" * 512) + req(ext, 0, 0, 2, 0, 8192)
            + req(ext, 4 if mode else 0, 0, 3, 512 * 1024, 4096) + req(ext, 2, 6, 4, 8192, 4096)
            + req(ext, 16, 6, 5, 0, 4096) + req(ext, 0, 4, 6, 0, 4096) + req(ext, 0, 5, 7, 0, 65536)
            + req(ext, 8, 7, 8, 0, 1 << 20) + req(ext, 0, 7, 9, 0, 1 << 20) + req(ext, 0, 3, 10, 0, 0)
            + req(ext, 0, 2, 11, 0, 0))
    open(f"{tr}/mode{mode}", "wb").write(bytes([mode]) + body)
print("seeded NBD corpora")
PY
