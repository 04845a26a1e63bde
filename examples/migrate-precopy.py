#!/usr/bin/env python3
"""Pre-copy block migration between two QMP storage daemons, as plain QMP commands.

QEMU's recipe (the guest stays on the source until the copy has converged), spelled out with no
dependencies beyond Python 3 and qemu-img:

    examples/migrate-precopy.py [options] SRC_QMP SRC_NODE DST_QMP DST_NBD DST_IMAGE

DST_IMAGE is created (qcow2, the size of SRC_NODE) on the destination host and added to the
destination daemon as node `mig-target`, exported writable at DST_NBD (HOST:PORT, as the source
reaches it; the NBD server is started unless one runs). The source adds an `nbd` node connected
to that export and mirrors SRC_NODE into it (`blockdev-mirror`, sync=full) while the guest keeps
running; the script prints progress until the job is READY (from then on every guest write goes
to both sides), waits for Enter (pause the guest now), then ends the job:

* `--finish cancel` (default): `block-job-cancel` after READY, a soft cancel: the job completes
  without a pivot and the destination holds a point-in-time copy; the source's `nbd` node and
  the destination export are removed. Start the guest on the destination's `mig-target`.
* `--finish complete`: `block-job-complete`: the source's users (its guest export, a VM) pivot to
  the `nbd` node, so they keep running on the source host while their disk lives on the
  destination.

Exit status 0: done; 2: the job failed or was cancelled (the guest is still on the source).
Only standard QMP commands (tested from a `diskstream daemon` into a `diskstream daemon` and into
a qemu-storage-daemon).
"""

import argparse
import json
import socket
import subprocess
import sys
import time


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.events = []
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, execute, **args):
        msg = {"execute": execute, **({"arguments": args} if args else {})}
        print(f"  -> {json.dumps(msg)}", file=sys.stderr)
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise SystemExit(f"{execute}: {r['error']['desc']}")
            return r["return"]

    def event(self, *names):
        """The first recorded event of job 'precopy' among `names`, or None."""
        for e in self.events:
            if e["event"] in names and e["data"].get("device") == "precopy":
                return e
        return None


def ended(src):
    """Exit 2 if the job has failed or was cancelled with an error."""
    e = src.event("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")
    if e and (e["event"] == "BLOCK_JOB_CANCELLED" or "error" in e["data"]):
        print(f"mirror failed: {e['data'].get('error', 'cancelled')}; the guest stays on the "
              "source", file=sys.stderr)
        sys.exit(2)
    return e


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a in ["src_qmp", "node", "dst_qmp", "dst_nbd", "image"]:
        p.add_argument(a)
    p.add_argument("--finish", choices=["cancel", "complete"], default="cancel")
    p.add_argument("--speed", type=int, default=0, help="mirror bytes/s (0: unlimited)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    a = p.parse_args()
    src, dst = Qmp(a.src_qmp), Qmp(a.dst_qmp)
    dhost, dport = a.dst_nbd.rsplit(":", 1)

    # 1. Destination: a target of the same size, exported writable over NBD.
    size = next(n for n in src.cmd("query-named-block-nodes", flat=True)
                if n["node-name"] == a.node)["image"]["virtual-size"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", a.image, str(size)], check=True)
    dst.cmd("blockdev-add", driver="qcow2", **{"node-name": "mig-target"},
            file={"driver": "file", "filename": a.image})
    try:
        dst.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": dhost, "port": dport}})
    except SystemExit as e:
        if "already running" not in str(e):
            raise
    dst.cmd("block-export-add", type="nbd", id="mig-in", **{"node-name": "mig-target"},
            name="mig-in", writable=True)

    # 2. Source: an nbd node on that export, and the mirror into it.
    src.cmd("blockdev-add", driver="nbd", **{"node-name": "mig-remote"},
            server={"type": "inet", "host": dhost, "port": dport}, export="mig-in")
    src.cmd("blockdev-mirror", **{"job-id": "precopy"}, device=a.node, target="mig-remote",
            sync="full", speed=a.speed)

    # 3. Until READY: progress with an ETA.
    t0 = time.monotonic()
    while not src.event("BLOCK_JOB_READY"):
        time.sleep(a.interval)
        ended(src)
        jobs = [j for j in src.cmd("query-block-jobs") if j["device"] == "precopy"]
        if jobs:
            j = jobs[0]
            rate = j["offset"] / max(time.monotonic() - t0, 1e-3)
            eta = (j["len"] - j["offset"]) / rate if rate else float("inf")
            print(f"{100 * j['offset'] / max(j['len'], 1):5.1f}%  ETA {eta:.0f}s  {j['status']}",
                  file=sys.stderr)
    print("ready: the destination follows every guest write", file=sys.stderr)
    input("pause the guest, then press Enter ")

    # 4. Switch-over.
    src.cmd("block-job-cancel" if a.finish == "cancel" else "block-job-complete",
            device="precopy")
    while not ended(src):
        time.sleep(min(a.interval, 0.2))
        src.cmd("query-block-jobs")  # pumps events
    if a.finish == "cancel":
        src.cmd("blockdev-del", **{"node-name": "mig-remote"})
        dst.cmd("block-export-del", id="mig-in", mode="hard")
        print("destination: node mig-target holds the disk; start the guest there")
    else:
        print(f"pivoted: the source's users of {a.node} now write to the destination")


if __name__ == "__main__":
    main()
