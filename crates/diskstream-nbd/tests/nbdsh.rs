//! `nbdsh` (libnbd's Python shell) against our server: block status for both metadata contexts
//! over a qcow2 chain (whole range and REQ_ONE), reads (sparse and DF), writes with FUA, write
//! zeroes (NO_HOLE, FAST_ZERO success and ENOTSUP), trim, cache, flush, pipelined async I/O, and
//! the errnos qemu-nbd uses (EINVAL/ENOSPC past the end, EPERM on a read-only export). libnbd's
//! client-side checks are switched off so the server's own answers are what is tested.

mod common;

use common::*;

const SCRIPT: &str = r#"
import os, errno
import nbd

M = 1024 * 1024
K = 1024

def status(h, off, count, flags=0):
    got = {}
    def cb(ctx, offset, entries, err):
        got.setdefault(ctx, []).append((offset, list(entries)))
        return 0
    h.block_status(count, off, cb, flags)
    return got

def pairs(entries):
    return [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]

def expect_errno(code, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        # libnbd reports the errno by name ("ENOTSUP").
        got = getattr(errno, e.errno) if isinstance(e.errno, str) else e.errno
        assert got == code, (fn.__name__, e.errno, e.string)
        return
    raise AssertionError(f"{fn.__name__} did not fail")

h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(os.environ["URI"])
size = h.get_size()
assert size == 16 * M, size
assert h.get_structured_replies_negotiated()
for ctx in ("base:allocation", "qemu:allocation-depth"):
    assert h.can_meta_context(ctx), ctx
for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_df"):
    assert getattr(h, cap)(), cap
assert not h.is_read_only()

# Block status over the whole chain.
st = status(h, 0, size)
base = pairs(st["base:allocation"][0][1])
depth = pairs(st["qemu:allocation-depth"][0][1])
assert base == [(512 * K, 0), (64 * K, 3), (448 * K, 0), (M, 3), (M, 0), (13 * M, 3)], base
assert depth == [(512 * K, 2), (64 * K, 1), (448 * K, 2), (M, 0), (M, 1), (13 * M, 0)], depth
# A query in the middle starts at its offset.
st = status(h, 2 * M + 4 * K, 4 * K)
assert pairs(st["base:allocation"][0][1])[0] == (4 * K, 0), st
# REQ_ONE: one extent per context, never longer than asked.
st = status(h, 0, 100 * K, nbd.CMD_FLAG_REQ_ONE)
for ctx, chunks in st.items():
    (off, ent), = chunks
    assert len(ent) == 2 and ent[0] == 100 * K, (ctx, ent)

# Reads: backing data, a zero cluster over it, an unallocated hole, top data; DF too.
assert h.pread(4 * K, 0) == b"\x11" * 4 * K
buf = h.pread(M, 0)
assert buf[:512 * K] == b"\x11" * 512 * K
assert buf[512 * K:576 * K] == bytes(64 * K)
assert buf[576 * K:] == b"\x11" * 448 * K
assert h.pread(3 * M, M) == bytes(M) + b"\x22" * M + bytes(M)
assert h.pread(M, 0, nbd.CMD_FLAG_DF) == buf

# Writes, FUA, zeroes, trim, cache, flush.
h.pwrite(b"\x55" * 64 * K, 4 * M, nbd.CMD_FLAG_FUA)
assert h.pread(64 * K, 4 * M) == b"\x55" * 64 * K
h.pwrite(b"\x66" * 512, 4 * M + 3)
assert h.pread(515, 4 * M) == b"\x55" * 3 + b"\x66" * 512
h.zero(8 * K, 4 * M + 8 * K, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8 * K, 4 * M + 8 * K) == bytes(8 * K)
h.zero(64 * K, 2 * M)
assert h.pread(64 * K, 2 * M) == bytes(64 * K)
h.trim(64 * K, 2 * M + 64 * K, nbd.CMD_FLAG_FUA)
h.cache(M, 0)
h.flush()
# FAST_ZERO: a whole-cluster range is metadata only; an unaligned one over data is not.
h.zero(128 * K, 6 * M, nbd.CMD_FLAG_FAST_ZERO)
expect_errno(errno.ENOTSUP, h.zero, 4 * K, 4 * M + 20 * K, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4 * K, 4 * M + 20 * K) == b"\x55" * 4 * K, "failed fast zero changed data"
# ...unless the rest of the partial cluster already reads as zeroes.
h.zero(4 * K, 10 * M + 4 * K, nbd.CMD_FLAG_FAST_ZERO)

# Errors qemu-nbd returns.
expect_errno(errno.EINVAL, h.pread, 4 * K, size)
expect_errno(errno.EINVAL, h.pread, 4 * K, size - 512)
expect_errno(errno.ENOSPC, h.pwrite, b"x" * 4 * K, size - 512)
expect_errno(errno.ENOSPC, h.zero, 4 * K, size - 512)
expect_errno(errno.EINVAL, h.trim, 4 * K, size)
expect_errno(errno.EINVAL, h.cache, 4 * K, size)
expect_errno(errno.EINVAL, status, h, size, 512)
expect_errno(errno.EINVAL, h.pread, 33 * M, 0)
h.pwrite(b"\x77" * 512, size - 512)
assert h.pread(512, size - 512) == b"\x77" * 512

# Pipelining: 96 requests in flight at once, completions in any order.
bufs = []
for i in range(48):
    h.aio_pwrite(bytes([i]) * 4 * K, 8 * M + i * 4 * K)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(48):
    b = nbd.Buffer(4 * K)
    h.aio_pread(b, 8 * M + i * 4 * K)
    bufs.append(b)
for i in range(48):
    h.aio_flush() if i == 47 else h.aio_cache(4 * K, i * 4 * K)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, b in enumerate(bufs):
    assert b.to_bytearray() == bytes([i]) * 4 * K, i
h.shutdown()

# The read-only export refuses every write with EPERM.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(os.environ["RO_URI"])
assert r.is_read_only()
assert not r.can_trim() and not r.can_zero()
expect_errno(errno.EPERM, r.pwrite, b"x" * 512, 0)
expect_errno(errno.EPERM, r.trim, 512, 0)
expect_errno(errno.EPERM, r.zero, 512, 0)
assert r.pread(512, 0) == bytes(512)
r.shutdown()
print("nbdsh: all checks passed")
"#;

#[test]
fn nbdsh_block_status_and_io() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let ro = dir.path().join("ro.raw");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "16M"]);
    qemu_io("qcow2", b, &["write -P 0x11 0 1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    qemu_io("qcow2", t, &["write -P 0x22 2M 1M", "write -z 512k 64k"]);
    qemu_img(&["create", "-q", "-f", "raw", ro.to_str().unwrap(), "1M"]);
    let srv = TestServer::start(
        dir.path(),
        vec![
            Spec {
                allocation_depth: true,
                ..Spec::new("disk", &top)
            },
            Spec {
                read_only: true,
                ..Spec::new("ro", &ro)
            },
        ],
        |_| {},
    );
    let out = stdout(
        nbdsh()
            .env("URI", srv.unix_uri("disk"))
            .env("RO_URI", srv.tcp_uri("ro"))
            .arg("-c")
            .arg(SCRIPT),
    );
    assert!(out.contains("all checks passed"), "{out}");
    srv.stop();
    // The writes landed in the top image, which QEMU finds consistent.
    qemu_img(&["check", "-q", t]);
    qemu_io(
        "qcow2",
        t,
        &[
            "read -P 0x55 4M 3",
            "read -P 0x66 4194307 512",
            "read -P 0 4202496 8k",
            "read -P 0 6M 128k",
            "read -P 0x77 16776704 512",
            "read -P 0x2f 8581120 4k",
        ],
    );
}
