#!/usr/bin/env python3
"""Post-copy block migration between two QMP storage daemons, as plain QMP commands.

The same sequence `diskstream migrate` runs, spelled out (no dependencies beyond Python 3):

    examples/migrate-postcopy.py SRC_QMP SRC_NODE SRC_NBD DST_QMP DST_NBD DST_IMAGE

SRC_NBD / DST_NBD are HOST:PORT NBD server addresses (the destination reaches the source at
SRC_NBD, the guest reaches the destination at DST_NBD). DST_IMAGE is created with `qemu-img`
(or `diskstream img`) on the destination host; the script prints the guest's new URL, waits
for Enter (move the guest now), then streams, printing progress with an ETA.
"""

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


def main():
    if len(sys.argv) != 7:
        raise SystemExit(__doc__)
    src_qmp, node, src_nbd, dst_qmp, dst_nbd, image = sys.argv[1:]
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
            "reconnect-delay": 10, "open-timeout": 10},
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

    # 4. Stream with a copy-on-read filter over the destination image.
    dst.cmd("block-stream", **{"job-id": "migrate", "device": "mig-dst",
            "filter-node-name": "mig-cor", "on-error": "stop"})
    t0, last = time.monotonic(), None
    while True:
        time.sleep(1)
        jobs = [j for j in dst.cmd("query-block-jobs") if j["device"] == "migrate"]
        done = [e for e in dst.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        if done:
            if "error" in done[0]["data"]:
                raise SystemExit(f"stream failed: {done[0]['data']['error']}")
            break
        if not jobs:
            continue
        j = jobs[0]
        rate = j["offset"] / max(time.monotonic() - t0, 1e-3)
        eta = (j["len"] - j["offset"]) / rate if rate else float("inf")
        print(f"{100 * j['offset'] / max(j['len'], 1):5.1f}%  ETA {eta:.0f}s  {j['status']}",
              file=sys.stderr)
        if j["status"] == "paused" and j["io-status"] == "failed" and last != j["offset"]:
            last = j["offset"]
            dst.cmd("block-job-resume", device="migrate")

    # 5. Done: the backing link is gone; drop the nbd node and the source export.
    dst.cmd("blockdev-del", **{"node-name": "mig-source"})
    src.cmd("block-export-del", id="migrate-src", mode="hard")
    print("migration complete", file=sys.stderr)


if __name__ == "__main__":
    main()
