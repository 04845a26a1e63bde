#!/usr/bin/python3
"""Count the NBD requests a pre-copy mirror sends over the link (nbdkit `log` filter between the
source's `nbd` node and the destination's target export), diskstream vs qemu-storage-daemon.

Same setup as `bench/migrate.py --mode precopy` (raw source with random data extents, fresh
qcow2 target exported by the destination daemon, `blockdev-mirror` sync=full into an `nbd`
node, READY, soft cancel); prints per daemon the job length, the time to READY and the
requests by type. `--discard-unmap` adds the nbd node with `discard: unmap` (the target can
write zeroes with unmap: QEMU's zero_target pre-zeroing); `--guest-ms N` has a guest write a
random 4 KiB block every N ms until READY; `--delay-ms` adds nbdkit's delay filter.

Usage: /usr/bin/python3 bench/precopy_requests.py [--bin PATH] [--size-mib 256] [--data-mib 64]
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import migrate as M  # noqa: E402


def one(kind, binary, a):
    size, data = a.size_mib * M.MiB, a.data_mib * M.MiB
    d = tempfile.mkdtemp(prefix=f"ds-precopy-req-{kind}-")
    src = os.path.join(d, "src.raw")
    M.make_disk(src, size, data)
    tgt = os.path.join(d, "tgt.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    sp, dp = M.free_port(), M.free_port()
    if kind == "diskstream":
        sb = [f"driver=raw,node-name=disk,file.driver=file,file.filename={src}"]
        db = [f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}"]
    else:
        sb = [f"driver=file,node-name=f,filename={src}", "driver=raw,node-name=disk,file=f"]
        db = [f"driver=file,node-name=f,filename={tgt}", "driver=qcow2,node-name=tgt,file=f"]
    procs = []
    try:
        p, sq = M.start_daemon(kind, binary, d, "src", sp, sb)
        procs.append(p)
        p, dq = M.start_daemon(kind, binary, d, "dst", dp, db)
        procs.append(p)
        s, t = M.Qmp(sq), M.Qmp(dq)
        t.cmd("block-export-add", type="nbd", id="in", **{"node-name": "tgt"}, name="in",
              writable=True)
        s.cmd("block-export-add", type="nbd", id="g", **{"node-name": "disk"}, name="g",
              writable=True)
        kp = M.free_port()
        log = os.path.join(d, "nbd.log")
        cmd = ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(kp),
               "--filter=log"]
        if a.delay_ms:
            cmd += ["--filter=delay"]
        cmd += ["nbd", "hostname=127.0.0.1", f"port={dp}", "export=in", f"logfile={log}"]
        if a.delay_ms:
            cmd += [f"delay-{op}={a.delay_ms}ms" for op in ("write", "zero", "extents")]
        procs.append(subprocess.Popen(cmd, stderr=subprocess.DEVNULL))
        M.wait_for(lambda: M._open(kp), "nbdkit")
        extra = {"discard": "unmap"} if a.discard_unmap else {}
        s.cmd("blockdev-add", driver="nbd", **{"node-name": "remote"}, export="in",
              server={"type": "inet", "host": "127.0.0.1", "port": str(kp)}, **extra)
        stop, lat = threading.Event(), []
        g = None
        if a.guest_ms:
            g = threading.Thread(target=M.guest_writes, args=(
                f"nbd://127.0.0.1:{sp}/g", size, stop, lat, a.guest_ms / 1000))
            g.start()
        t0 = time.perf_counter()
        s.cmd("blockdev-mirror", **{"job-id": "m"}, device="disk", target="remote", sync="full")
        ev = s.wait_event("BLOCK_JOB_READY", timeout=600)
        dt = time.perf_counter() - t0
        stop.set()
        if g:
            g.join()
        s.cmd("block-job-cancel", device="m")
        s.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        s.cmd("blockdev-del", **{"node-name": "remote"})
        time.sleep(0.3)
        c = collections.Counter()
        with open(log) as f:
            for line in f:
                m = re.search(r" (Write|Zero|Trim|Extents|Read|Flush|BlockStatus) id=", line)
                if m:
                    c[m.group(1)] += 1
        print(f"{kind:10} len={ev['data']['len']} READY after {dt:.2f}s requests {dict(c)}",
              flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["rm", "-rf", d])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(M.ROOT, "target/release/diskstream"))
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--data-mib", type=int, default=64)
    ap.add_argument("--discard-unmap", action="store_true")
    ap.add_argument("--guest-ms", type=float, default=0)
    ap.add_argument("--delay-ms", type=float, default=0)
    a = ap.parse_args()
    for kind, b in (("diskstream", a.bin), ("qsd", "qemu-storage-daemon")):
        one(kind, b, a)


if __name__ == "__main__":
    main()
