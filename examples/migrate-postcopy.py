#!/usr/bin/env python3
"""Post-copy block migration between two QMP storage daemons, as plain QMP commands.

The same sequence `diskstream migrate` runs, spelled out (no dependencies beyond Python 3):

    examples/migrate-postcopy.py [options] SRC_QMP SRC_NODE SRC_NBD DST_QMP DST_NBD DST_IMAGE

SRC_NBD / DST_NBD are HOST:PORT NBD server addresses (the destination reaches the source at
SRC_NBD, the guest reaches the destination at DST_NBD). DST_IMAGE is created with `qemu-img`
(or `diskstream img`) on the destination host; the script prints the guest's new URL, waits
for Enter (move the guest now), removes the guest's writable export on the source if
--source-guest-export names it (so the source cannot take a write after the switch), then
streams, printing progress with an ETA.

The stream runs with on-error=stop: when it pauses on an I/O error (the source gone for longer
than --reconnect-delay), it is resumed after --retry-delay seconds, doubling with every error in
a row (the count restarts when the job makes progress), at most --retries times in a row; then
the script exits with status 3 and leaves the job paused with its data (block-job-resume it
once the source is back). Exit status 2: the job failed or was cancelled.
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


def inet(addr):
    host, port = addr.rsplit(":", 1)
    return host, port


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a in ["src_qmp", "node", "src_nbd", "dst_qmp", "dst_nbd", "image"]:
        p.add_argument(a)
    p.add_argument("--source-guest-export", help="the guest's export id on the source, "
                   "removed at the switch")
    p.add_argument("--reconnect-delay", type=int, default=10,
                   help="seconds the destination waits for a lost source (default 10)")
    p.add_argument("--retries", type=int, default=3,
                   help="resumes after I/O errors in a row before giving up (default 3)")
    p.add_argument("--retry-delay", type=float, default=1.0,
                   help="seconds before the first resume, doubling (default 1)")
    p.add_argument("--speed", type=int, default=0, help="stream bytes/s (0: unlimited)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    return p.parse_args()


def main():
    a = parse_args()
    src_qmp, node, src_nbd, dst_qmp, dst_nbd, image = (a.src_qmp, a.node, a.src_nbd, a.dst_qmp,
                                                       a.dst_nbd, a.image)
    src, dst = Qmp(src_qmp), Qmp(dst_qmp)
    shost, sport = inet(src_nbd)
    dhost, dport = inet(dst_nbd)
    export = f"migrate-{node}"

    # 1. Source: export the disk read-only (start the NBD server unless one runs).
    size = next(n for n in src.cmd("query-named-block-nodes", flat=True)
                if n["node-name"] == node)["image"]["virtual-size"]
    try:
        src.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": shost, "port": sport}})
    except SystemExit as e:
        if "already running" not in str(e):
            raise
    src.cmd("block-export-add", type="nbd", id="migrate-src", **{"node-name": node},
            name=export, writable=False)
    url = f"nbd://{shost}:{sport}/{export}"

    # 2. Destination: a qcow2 over the source's URL, explicit backing format; nbd node (it
    #    reconnects for reconnect-delay seconds) as its backing; a writable export.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", url, "-F", "raw",
                    image, str(size)], check=True)
    dst.cmd("blockdev-add", driver="nbd", **{"node-name": "mig-source", "read-only": True,
            "reconnect-delay": a.reconnect_delay, "open-timeout": 10},
            server={"type": "inet", "host": shost, "port": sport}, export=export)
    dst.cmd("blockdev-add", driver="qcow2", **{"node-name": "mig-dst"},
            file={"driver": "file", "filename": image}, backing="mig-source")
    try:
        dst.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": dhost, "port": dport}})
    except SystemExit as e:
        if "already running" not in str(e):
            raise
    dst.cmd("block-export-add", type="nbd", id="migrate-dst", **{"node-name": "mig-dst"},
            name="mig-dst", writable=True)

    # 3. Switch the guest (it must not write to the source any more).
    print(f"destination: nbd://{dhost}:{dport}/mig-dst")
    input("move the guest to the destination, then press Enter ")
    if a.source_guest_export:
        # Fence the source: nothing can write there after the switch.
        src.cmd("block-export-del", id=a.source_guest_export, mode="hard")

    # 4. Stream with a copy-on-read filter over the destination image.
    dst.cmd("block-stream", **{"job-id": "migrate", "device": "mig-dst",
            "filter-node-name": "mig-cor", "on-error": "stop", "speed": a.speed})
    t0 = time.monotonic()
    in_row, error_offset, resume_at = 0, None, None
    while True:
        time.sleep(a.interval)
        jobs = [j for j in dst.cmd("query-block-jobs") if j["device"] == "migrate"]
        ended = [e for e in dst.events
                 if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                 and e["data"].get("device") == "migrate"]
        if ended:
            e = ended[0]
            if e["event"] == "BLOCK_JOB_CANCELLED" or "error" in e["data"]:
                print(f"stream failed: {e['data'].get('error', 'cancelled')}", file=sys.stderr)
                sys.exit(2)
            break
        dst.events = [e for e in dst.events if e["event"] != "BLOCK_JOB_ERROR"]
        if not jobs:
            continue
        j = jobs[0]
        rate = j["offset"] / max(time.monotonic() - t0, 1e-3)
        eta = (j["len"] - j["offset"]) / rate if rate else float("inf")
        print(f"{100 * j['offset'] / max(j['len'], 1):5.1f}%  ETA {eta:.0f}s  {j['status']}",
              file=sys.stderr)
        if in_row and resume_at is None and j["offset"] > error_offset:
            in_row = 0  # progress since the last error: the count restarts
        if j["status"] != "paused" or j["io-status"] != "failed":
            continue
        if resume_at is None:
            in_row += 1
            error_offset = j["offset"]
            if in_row > a.retries:
                print(f"the stream stopped on I/O errors {in_row} times in a row; job "
                      "'migrate' stays paused with its data (block-job-resume once the "
                      "source is back)", file=sys.stderr)
                sys.exit(3)
            wait = a.retry_delay * 2 ** (in_row - 1)
            print(f"I/O error: retry {in_row}/{a.retries} in {wait:.1f}s", file=sys.stderr)
            resume_at = time.monotonic() + wait
        elif time.monotonic() >= resume_at:
            resume_at = None
            dst.cmd("block-job-resume", device="migrate")

    # 5. Done: the backing link is gone; drop the nbd node and the source export.
    dst.cmd("blockdev-del", **{"node-name": "mig-source"})
    src.cmd("block-export-del", id="migrate-src", mode="hard")
    print("migration complete", file=sys.stderr)


if __name__ == "__main__":
    main()
