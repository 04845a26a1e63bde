#!/usr/bin/python3
"""Block migration benchmark: the same QMP sequence against two `diskstream daemon` processes
and against two qemu-storage-daemon processes, with latency added on the link (nbdkit's nbd
plugin with the delay filter in between).

--mode postcopy (default): the link from the destination to the source is delayed. Measured per
run: migration wall time (block-export-add on the source .. backing link dropped, source export
removed) and the latency of a guest's random 4 KiB reads on the destination export during the
stream (copy-on-read filter in place).

--mode precopy: the link from the source to the destination's target export is delayed (every
write, zero and block-status request of the mirror). Measured per run: wall time of
`blockdev-mirror` sync=full .. READY .. soft cancel completed, and the latency of a guest's random 4 KiB writes on the
source's export during the mirror (each write is also tracked or copied by the job).

Rounds alternate diskstream / QSD.

Usage: /usr/bin/python3 bench/migrate.py [--mode postcopy|precopy] [--size-mib 1024]
       [--data-mib 256] [--delay-ms 5] [--rounds 3] [--bin target/release/diskstream]
       [--out docs/BENCHMARKS.md]
Needs python3-libnbd (/usr/bin/python3), nbdkit, qemu-img, qemu-storage-daemon.
"""

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(pred, what, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, execute, **args):
        msg = {"execute": execute, **({"arguments": args} if args else {})}
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

    def wait_event(self, name, timeout=None):
        """The next `name` event; with `timeout` (seconds), give up (SystemExit) after it."""
        self.s.settimeout(timeout)
        try:
            while True:
                for i, e in enumerate(self.events):
                    if e["event"] == name:
                        return self.events.pop(i)
                self.events.append(json.loads(self.f.readline()))
        except (socket.timeout, TimeoutError):
            raise SystemExit(f"no {name} within {timeout}s") from None
        finally:
            if self.s.gettimeout() is not None:
                self.s.settimeout(None)


def start_daemon(kind, binary, d, name, nbd_port, blockdevs):
    qmp = os.path.join(d, f"{name}.qmp")
    if kind == "diskstream":
        cmd = [binary, "daemon"]
    else:
        cmd = ["qemu-storage-daemon"]
    for b in blockdevs:
        cmd += ["--blockdev", b]
    cmd += ["--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={nbd_port}",
            "--chardev", f"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, f"{name}.log"), "ab"))
    wait_for(lambda: os.path.exists(qmp), f"{name} QMP socket")
    return p, qmp


def make_disk(path, size, data, seed=1):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        done = 0
        while done < data:
            n = rng.choice([64 << 10, 256 << 10, MiB, 4 * MiB])
            f.seek(rng.randrange(0, size - n) & ~0xFFFF)
            f.write(rng.randbytes(n))
            done += n


def guest_reads(url, size, stop, lat):
    h = nbd.NBD()
    h.connect_uri(url)
    rng = random.Random(3)
    while not stop.is_set():
        off = rng.randrange(0, size - 4096) & ~4095
        t = time.perf_counter()
        h.pread(4096, off)
        lat.append(time.perf_counter() - t)
        time.sleep(0.005)
    h.shutdown()


def one_run(kind, binary, base, src_img, size, delay_ms):
    d = tempfile.mkdtemp(dir=base, prefix=f"{kind}-")
    sp, dp = free_port(), free_port()
    procs = []
    try:
        if kind == "diskstream":
            src_bd = [f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}"]
        else:
            src_bd = [f"driver=file,node-name=f,filename={src_img}", "driver=raw,node-name=disk,file=f"]
        p, sq = start_daemon(kind, binary, d, "src", sp, src_bd)
        procs.append(p)
        p, dq = start_daemon(kind, binary, d, "dst", dp, [])
        procs.append(p)
        src, dst = Qmp(sq), Qmp(dq)
        t0 = time.perf_counter()
        src.cmd("block-export-add", type="nbd", id="mig", **{"node-name": "disk"},
                name="disk", writable=False)
        # The link: nbdkit with the delay filter in front of the source export.
        kp = free_port()
        kit = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(kp),
             "--filter=delay", "nbd", "hostname=127.0.0.1", f"port={sp}", "export=disk",
             f"delay-read={delay_ms}ms", f"delay-extents={delay_ms}ms"],
            stderr=subprocess.DEVNULL)
        procs.append(kit)
        wait_for(lambda: _open(kp), "nbdkit")
        image = os.path.join(d, "dst.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b",
                        f"nbd://127.0.0.1:{kp}/disk", "-F", "raw", image, str(size)], check=True)
        dst.cmd("blockdev-add", driver="nbd", **{"node-name": "srcnbd", "read-only": True,
                "reconnect-delay": 10}, server={"type": "inet", "host": "127.0.0.1",
                                                "port": str(kp)}, export="disk")
        dst.cmd("blockdev-add", driver="qcow2", **{"node-name": "dst"},
                file={"driver": "file", "filename": image}, backing="srcnbd")
        dst.cmd("block-export-add", type="nbd", id="guest", **{"node-name": "dst"},
                name="guest", writable=True)
        stop, lat = threading.Event(), []
        g = threading.Thread(target=guest_reads,
                             args=(f"nbd://127.0.0.1:{dp}/guest", size, stop, lat))
        g.start()
        dst.cmd("block-stream", **{"job-id": "mig", "device": "dst", "filter-node-name": "cor"})
        ev = dst.wait_event("BLOCK_JOB_COMPLETED")
        stop.set()
        g.join()
        if "error" in ev["data"]:
            raise SystemExit(f"{kind}: stream failed: {ev['data']['error']}")
        dst.cmd("blockdev-del", **{"node-name": "srcnbd"})
        src.cmd("block-export-del", id="mig", mode="hard")
        wall = time.perf_counter() - t0
        dst.cmd("block-export-del", id="guest", mode="hard")
        for q in (src, dst):
            try:
                q.cmd("quit")
            except (SystemExit, OSError, json.JSONDecodeError):
                pass
        for p in procs[:2]:
            p.wait(timeout=30)
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src_img, image],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{kind}: result differs: {r.stdout}")
        lat.sort()
        return wall, lat
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        subprocess.run(["rm", "-rf", d])


def guest_writes(url, size, stop, lat, pause=0.02):
    h = nbd.NBD()
    h.connect_uri(url)
    rng = random.Random(4)
    buf = rng.randbytes(4096)
    while not stop.is_set():
        off = rng.randrange(0, size - 4096) & ~4095
        t = time.perf_counter()
        h.pwrite(buf, off)
        lat.append(time.perf_counter() - t)
        time.sleep(pause)
    h.flush()
    h.shutdown()


def one_precopy(kind, binary, base, src_img0, size, delay_ms):
    d = tempfile.mkdtemp(dir=base, prefix=f"pre-{kind}-")
    sp, dp = free_port(), free_port()
    procs = []
    try:
        src_img = os.path.join(d, "src.raw")
        subprocess.run(["cp", "--sparse=always", src_img0, src_img], check=True)
        tgt = os.path.join(d, "tgt.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
        if kind == "diskstream":
            src_bd = [f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}"]
            dst_bd = [f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}"]
        else:
            src_bd = [f"driver=file,node-name=f,filename={src_img}", "driver=raw,node-name=disk,file=f"]
            dst_bd = [f"driver=file,node-name=f,filename={tgt}", "driver=qcow2,node-name=tgt,file=f"]
        p, sq = start_daemon(kind, binary, d, "src", sp, src_bd)
        procs.append(p)
        p, dq = start_daemon(kind, binary, d, "dst", dp, dst_bd)
        procs.append(p)
        src, dst = Qmp(sq), Qmp(dq)
        dst.cmd("block-export-add", type="nbd", id="in", **{"node-name": "tgt"}, name="in",
                writable=True)
        src.cmd("block-export-add", type="nbd", id="guest", **{"node-name": "disk"},
                name="guest", writable=True)
        # The link: nbdkit with the delay filter in front of the destination's export.
        kp = free_port()
        kit = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(kp),
             "--filter=delay", "nbd", "hostname=127.0.0.1", f"port={dp}", "export=in",
             f"delay-write={delay_ms}ms", f"delay-zero={delay_ms}ms",
             f"delay-extents={delay_ms}ms"],
            stderr=subprocess.DEVNULL)
        procs.append(kit)
        wait_for(lambda: _open(kp), "nbdkit")
        stop, lat = threading.Event(), []
        g = threading.Thread(target=guest_writes,
                             args=(f"nbd://127.0.0.1:{sp}/guest", size, stop, lat))
        g.start()
        t0 = time.perf_counter()
        src.cmd("blockdev-add", driver="nbd", **{"node-name": "remote"},
                server={"type": "inet", "host": "127.0.0.1", "port": str(kp)}, export="in")
        src.cmd("blockdev-mirror", **{"job-id": "pre"}, device="disk", target="remote",
                sync="full")
        # READY needs a moment with nothing dirty and nothing in flight (QEMU's condition too):
        # a guest dirtying a new 64 KiB granule more often than one link round trip can keep a
        # background-mode mirror from ever getting there (a guest every 5 ms over a 5 ms link
        # did, intermittently, on both daemons), hence a guest every 20 ms and a bound.
        src.wait_event("BLOCK_JOB_READY", timeout=600)
        stop.set()
        g.join()
        src.cmd("block-job-cancel", device="pre")
        ev = src.wait_event("BLOCK_JOB_COMPLETED")
        wall = time.perf_counter() - t0
        if "error" in ev["data"]:
            raise SystemExit(f"{kind}: mirror failed: {ev['data']['error']}")
        src.cmd("blockdev-del", **{"node-name": "remote"})
        for q in (src, dst):
            try:
                q.cmd("quit")
            except (SystemExit, OSError, json.JSONDecodeError):
                pass
        for p in procs[:2]:
            p.wait(timeout=30)
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src_img, tgt],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{kind}: target differs: {r.stdout}")
        lat.sort()
        return wall, lat
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        subprocess.run(["rm", "-rf", d])


def _open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def pct(v, q):
    return v[min(len(v) - 1, int(q * len(v)))] * 1000 if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["postcopy", "precopy"], default="postcopy")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--delay-ms", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/diskstream"))
    ap.add_argument("--out")
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="ds-bench-migrate-")
    src_img = os.path.join(base, "src.raw")
    size = a.size_mib * MiB
    make_disk(src_img, size, a.data_mib * MiB)
    res = {"diskstream": [], "qsd": []}
    try:
        for r in range(a.rounds):
            for kind in ("diskstream", "qsd"):
                run = one_precopy if a.mode == "precopy" else one_run
                wall, lat = run(kind, a.bin, base, src_img, size, a.delay_ms)
                res[kind].append((wall, lat))
                what = "write" if a.mode == "precopy" else "read"
                print(f"round {r + 1} {kind}: {wall:.2f}s, guest {what} p50 {pct(lat, 0.5):.1f} ms"
                      f" p99 {pct(lat, 0.99):.1f} ms ({len(lat)} {what}s)", file=sys.stderr)
    finally:
        subprocess.run(["rm", "-rf", base])
    rows = []
    for kind in ("diskstream", "qsd"):
        walls = [w for w, _ in res[kind]]
        lats = sorted(x for _, l in res[kind] for x in l)
        rows.append((kind, statistics.median(walls), min(walls), max(walls),
                     pct(lats, 0.5), pct(lats, 0.99), len(lats)))
    qsd_ver = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    if a.mode == "precopy":
        text = (f"\n## Pre-copy migration over a {a.delay_ms:g} ms link (bench/migrate.py "
                f"--mode precopy)\n\n"
                f"{a.size_mib} MiB disk with {a.data_mib} MiB of data, source and destination "
                f"daemons on one machine ({os.cpu_count()} CPUs, {platform.release()}), nbdkit's "
                f"delay filter adding {a.delay_ms:g} ms to every write, zero and "
                f"block-status request from the source to the destination's target export; the "
                f"same QMP sequence on both (target export, `nbd` node, `blockdev-mirror` "
                f"sync=full, READY, soft cancel) while a guest writes random 4 KiB blocks (one "
                f"every 20 ms) on the source's export until READY. Wall time = mirror start .. "
                f"soft cancel completed. {qsd_ver}. Rounds: {a.rounds}.\n\n"
                "| daemons | wall median (s) | min | max | guest write p50 (ms) | p99 (ms) | "
                "writes |\n|---|---|---|---|---|---|---|\n")
    else:
        text = (f"\n## Post-copy migration over a {a.delay_ms:g} ms link (bench/migrate.py)\n\n"
                f"{a.size_mib} MiB disk with {a.data_mib} MiB of data, source and destination "
                f"daemons on one machine ({os.cpu_count()} CPUs, {platform.release()}), nbdkit's delay "
                f"filter adding {a.delay_ms:g} ms to every read and block-status request from the "
                f"destination to the source; the same QMP sequence on both (export, qcow2 over the "
                f"`nbd` node, writable guest export, `block-stream` with a copy-on-read filter, "
                f"cleanup) while a guest reads random 4 KiB blocks on the destination. Wall time = "
                f"source export added .. source export removed. {qsd_ver}. Rounds: {a.rounds}.\n\n"
                "| daemons | wall median (s) | min | max | guest read p50 (ms) | p99 (ms) | reads |\n"
                "|---|---|---|---|---|---|---|\n")
    for kind, med, lo, hi, p50, p99, n in rows:
        name = "diskstream daemon x2" if kind == "diskstream" else "qemu-storage-daemon x2"
        text += f"| {name} | {med:.2f} | {lo:.2f} | {hi:.2f} | {p50:.1f} | {p99:.1f} | {n} |\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
