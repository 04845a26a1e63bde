"""Differential scenarios on QED chains (QSD 10 opens QED too, so these compare the same
jobs on both): stream, intermediate and active commit, mirror to a created QED target and
to an existing QED overlay of the source's backing file,
a qcow2 overlay whose header names a QED backing file, and a copy-on-read filter exported
over NBD. Loaded by harness.py; images are small (16 MiB) to keep each run to seconds."""

import harness as H

MiB = H.MiB


def mk_qed_chain(d):
    """base.qed (0x11 @0-4M, 0x22 @8-10M) <- mid.qed (0x33 @2-4M) <- top.qed (0x44 @12M),
    16 MiB; hdr.qcow2 is a qcow2 overlay of top.qed (header records format qed)."""
    H.create(f"{d}/base.qed", 16 * MiB, fmt="qed")
    H.qemu_io(f"{d}/base.qed", "qed", "write -P 0x11 0 4M", "write -P 0x22 8M 2M")
    H.create(f"{d}/mid.qed", None, "base.qed", bfmt="qed", fmt="qed")
    H.qemu_io(f"{d}/mid.qed", "qed", "write -P 0x33 2M 2M")
    H.create(f"{d}/top.qed", None, "mid.qed", bfmt="qed", fmt="qed")
    H.qemu_io(f"{d}/top.qed", "qed", "write -P 0x44 12M 1M")
    H.create(f"{d}/hdr.qcow2", None, "top.qed", bfmt="qed")
    return ["base.qed", "mid.qed", "top.qed", "hdr.qcow2"]


async def add_qed_chain(p):
    await p.cmd("blockdev-add", {"driver": "qed", "node-name": "base",
                                 "file": {"driver": "file", "filename": "base.qed"}})
    await p.cmd("blockdev-add", {"driver": "qed", "node-name": "mid", "backing": "base",
                                 "file": {"driver": "file", "filename": "mid.qed"}})
    await p.cmd("blockdev-add", {"driver": "qed", "node-name": "top", "backing": "mid",
                                 "file": {"driver": "file", "filename": "top.qed"}})


async def sc_qed_stream(p):
    """Schema errors of the qed driver, then a stream of the whole chain into top."""
    await p.cmd("blockdev-add", {"driver": "qed", "node-name": "x",
                                 "file": {"driver": "file", "filename": "base.qed"},
                                 "lazy-refcounts": True})
    await p.cmd("blockdev-add", {"driver": "qed", "node-name": "x"})
    await add_qed_chain(p)
    await p.cmd("query-named-block-nodes")
    await p.cmd("block-stream", {"job-id": "s", "device": "top", "base-node": "base",
                                 "speed": 4 * MiB})
    await p.cmd("query-block-jobs", masked=("offset", "busy"))
    await p.cmd("block-job-set-speed", {"device": "s", "speed": 0})
    await p.wait_job_gone("s")
    await p.cmd("block-stream", {"job-id": "s2", "device": "top"})
    await p.wait_job_gone("s2")
    await p.cmd("query-named-block-nodes", {"flat": True})
    await p.cmd("blockdev-del", {"node-name": "top"})


async def sc_qed_header_backing(p):
    """A qcow2 overlay whose header names a QED backing file (format recorded) over QED
    images that record no format (recognised by their magic): the whole chain is opened from
    the headers, then streamed."""
    await p.cmd("blockdev-add", {"driver": "qcow2", "node-name": "hdr",
                                 "file": {"driver": "file", "filename": "hdr.qcow2"}})
    await p.cmd("query-named-block-nodes")
    await p.cmd("block-stream", {"job-id": "s", "device": "hdr"})
    await p.wait_job_gone("s")
    await p.cmd("query-named-block-nodes", {"flat": True})
    await p.cmd("blockdev-add", {"driver": "qed", "node-name": "t2",
                                 "file": {"driver": "file", "filename": "top.qed"}})
    await p.cmd("query-named-block-nodes", {"flat": True})


async def sc_qed_commit(p):
    """Intermediate commit mid -> base, then active commit top -> base."""
    await add_qed_chain(p)
    await p.cmd("block-commit", {"job-id": "c1", "device": "top", "top-node": "mid",
                                 "base-node": "base"})
    await p.wait_job_gone("c1")
    await p.cmd("query-named-block-nodes", {"flat": True})
    await p.cmd("block-commit", {"job-id": "c2", "device": "top"})
    await p.wait_event("BLOCK_JOB_READY", device="c2")
    await p.cmd("query-block-jobs")
    await p.cmd("block-job-complete", {"device": "c2"})
    await p.wait_job_gone("c2")
    await p.cmd("query-named-block-nodes", {"flat": True})


async def sc_qed_mirror(p):
    """drive-mirror to a QED target the daemon creates (sync full and top), a QED external
    snapshot, and writes through an export after the pivot."""
    await add_qed_chain(p)
    await p.cmd(*H.NBD_START)
    await p.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "top",
                                     "writable": True})
    await p.io("top", "write -P 0x55 1M 1M")
    await p.cmd("drive-mirror", {"job-id": "m", "device": "top", "target": "full.qed",
                                 "format": "qed", "sync": "full", "node-name": "tf"})
    await p.wait_event("BLOCK_JOB_READY", device="m")
    await p.cmd("block-job-complete", {"device": "m"})
    await p.wait_job_gone("m")
    await p.cmd("query-named-block-nodes", {"flat": True})
    await p.io("top", "write -P 0x66 5M 1M", "read -P 0x55 1M 1M", "read -P 0x22 8M 2M")
    await p.cmd("blockdev-snapshot-sync", {"node-name": "tf", "snapshot-file": "snap.qed",
                                           "snapshot-node-name": "sn", "format": "qed"})
    await p.io("top", "write -P 0x77 6M 1M", "read -P 0x66 5M 1M")
    await p.cmd("drive-mirror", {"job-id": "m2", "device": "sn", "target": "top2.qed",
                                 "format": "qed", "sync": "top", "node-name": "t2"})
    await p.wait_event("BLOCK_JOB_READY", device="m2")
    await p.cmd("block-job-cancel", {"device": "m2"})
    await p.wait_job_gone("m2")
    await p.cmd("query-named-block-nodes", {"flat": True})
    await p.cmd("block-export-del", {"id": "e"})
    await p.wait_event("BLOCK_EXPORT_DELETED", id="e")


def mk_qed_mirror(d):
    return mk_qed_chain(d)[:3] + ["full.qed", "snap.qed", "top2.qed"]


async def sc_qed_mirror_existing(p):
    """drive-mirror mode=existing sync=top into a pre-created QED overlay of the source's
    backing file (its header records only "not raw"): the daemon links the open backing node
    (QEMU opens the file again), and after the pivot the device reads the backing's data
    through the target and guest writes land in it."""
    # The chain from top.qed's header (see sc_mirror_existing for why not node by node).
    await p.cmd("blockdev-add", {"driver": "qed", "node-name": "top",
                                 "file": {"driver": "file", "filename": "top.qed"}})
    await p.cmd(*H.NBD_START)
    await p.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "top",
                                     "writable": True})
    await p.io("top", "write -P 0x55 0 1M")
    await p.cmd("drive-mirror", {"job-id": "dm", "device": "top", "target": "ex.qed",
                                 "format": "qed", "sync": "top", "mode": "existing",
                                 "node-name": "exnode"})
    await p.wait_event("BLOCK_JOB_READY", device="dm")
    await p.io("top", "write -P 0x66 5M 1M")
    await p.cmd("block-job-complete", {"device": "dm"})
    await p.wait_job_gone("dm")
    await p.cmd("query-block-exports")
    await p.io("top", "read -P 0x55 0 1M", "read -P 0x11 1M 1M", "read -P 0x33 2M 2M",
               "read -P 0x66 5M 1M", "read -P 0x22 8M 2M", "read -P 0x44 12M 1M",
               "write -P 0x77 6M 1M")
    await p.cmd("block-export-del", {"id": "e", "mode": "hard"})
    await p.wait_event("BLOCK_EXPORT_DELETED")


def mk_qed_mirror_existing(d):
    imgs = mk_qed_chain(d)[:3]
    H.create(f"{d}/ex.qed", None, "mid.qed", bfmt="qed", fmt="qed")
    return imgs + ["ex.qed"]


async def sc_qed_cor_export(p):
    """A copy-on-read filter over the QED chain exported over NBD: reads copy into top."""
    await add_qed_chain(p)
    await p.cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "c0", "file": "top"})
    await p.cmd(*H.NBD_START)
    await p.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "c0",
                                     "writable": True, "name": "cor"})
    # Reads more than a fetch unit apart (no sequential stream, so no read-ahead).
    await H.cor_reads(p, "cor", [("0x22", "8M", "1M"), ("0x11", "0", "1M"),
                                 ("0x33", "3M", "1M")])
    await p.io("cor", "write -P 0x66 14M 64k", "read -P 0x66 14M 64k")
    await p.cmd("query-named-block-nodes", {"flat": True})
    await p.cmd("block-export-del", {"id": "e"})
    await p.wait_event("BLOCK_EXPORT_DELETED", id="e")
    await p.cmd("blockdev-del", {"node-name": "c0"})


SCENARIOS = {
    "qed_stream": (mk_qed_chain, sc_qed_stream),
    "qed_header_backing": (mk_qed_chain, sc_qed_header_backing),
    "qed_commit": (mk_qed_chain, sc_qed_commit),
    "qed_mirror": (mk_qed_mirror, sc_qed_mirror),
    "qed_mirror_existing": (mk_qed_mirror_existing, sc_qed_mirror_existing),
    "qed_cor_export": (mk_qed_chain, sc_qed_cor_export),
}
# Every scenario's allocation maps are compared too.
NO_MAP_COMPARE = set()
