#!/usr/bin/env python3
"""Copy-on-read benchmark: first reads and re-reads through an NBD export of a copy-on-read
filter whose backing sits behind a slow link, diskstream daemon vs qemu-storage-daemon.

Setup (identical for both, alternated A B A B per round, fresh top image every round):

    base.raw (random data) --nbdkit --filter=delay rdelay=5ms--> NBD (unix socket)
    top.qcow2 (empty overlay) <- backing: that NBD export (blockdev driver=nbd)
    copy-on-read filter over top, exported over NBD (block-export-add / --export)

Both daemons get the same command line (`--blockdev` nbd, qcow2, copy-on-read; `--nbd-server`;
`--export`): diskstream with its default copy-on-read fetch unit (1 MiB) and read-ahead (4
units), QEMU with its copy-on-read filter (copies the clusters a request touches).

Workloads, run by a libnbd client (the system python's `nbd` module) against the export:
  * seq first read: the whole disk in 64 KiB requests, one at a time (a booting guest);
  * seq re-read: the same again (now local);
  * random first read: 4 KiB reads at random 64 KiB-aligned offsets of a fresh area, one at a
    time, latency per request;
  * random re-read: the same offsets again;
  * local baseline (the issue's target is "re-reads at local speed"): the same daemon then
    exports the populated top as a plain qcow2 node (no copy-on-read filter, same NBD backing)
    and the client repeats the sequential read and the random offsets; every byte read is in
    the top by then, so this is what a re-read would cost without the filter.

After each round the top must pass `qemu-img check`, read as the base (`qemu-img compare`,
through the backing recorded in its header) and hold the whole sequentially read half itself
(`qemu-img map`). Timings are a benchmark, never a test assertion.

Usage: python3 bench/cor.py [--rounds 3] [--size-mib 256] [--delay-ms 5] [--quick]
       [--out docs/BENCHMARKS.md]   (replaces the "Copy-on-read" section)
The main harness calls run_cor(ds_binary, workdir, rounds, size_mib, delay_ms) and
markdown(results) for the section's lines.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYS_PY = "/usr/bin/python3"  # libnbd's python binding lives in the system python
MiB = 1 << 20
SECTION = "## Copy-on-read over a slow NBD backing"


def wait_for(path, proc, what, timeout=20):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"{what} did not create {path}")
        time.sleep(0.02)


def daemon_argv(kind, exe, work, cor=True):
    base = [exe] if kind == "qsd" else [exe, "daemon"]
    sock = os.path.join(work, "backing.sock")
    node = "cor" if cor else "top"
    filt = ["--blockdev", json.dumps({"driver": "copy-on-read", "node-name": "cor",
                                      "file": "top"})] if cor else []
    return base + [
        "--blockdev", json.dumps({"driver": "nbd", "node-name": "base", "read-only": True,
                                  "server": {"type": "unix", "path": sock}}),
        "--blockdev", json.dumps({"driver": "qcow2", "node-name": "top", "backing": "base",
                                  "file": {"driver": "file",
                                           "filename": os.path.join(work, "top.qcow2")}}),
    ] + filt + [
        "--nbd-server", f"addr.type=unix,addr.path={os.path.join(work, 'export.sock')}",
        "--export", f"type=nbd,id=e,node-name={node},name=disk,writable=on",
        "--chardev", f"socket,id=m,path={os.path.join(work, 'qmp.sock')},server=on,wait=off",
        "--monitor", "chardev=m",
    ]


READER = r"""
import json, random, sys, time, nbd
url, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
baseline = sys.argv[4] == "baseline"
h = nbd.NBD()
h.connect_uri(url)
out = {}
def seq(name):
    t = time.perf_counter()
    lat = []
    off = 0
    while off < half:
        s = time.perf_counter()
        h.pread(65536, off)
        lat.append(time.perf_counter() - s)
        off += 65536
    out[name] = {"secs": time.perf_counter() - t, "bytes": half, "lat": sorted(lat)}
def rnd(name, offs):
    t = time.perf_counter()
    lat = []
    for o in offs:
        s = time.perf_counter()
        h.pread(4096, o)
        lat.append(time.perf_counter() - s)
    out[name] = {"secs": time.perf_counter() - t, "bytes": 4096 * len(offs), "lat": sorted(lat)}
half = size // 2
rng = random.Random(seed)
offs = [half + rng.randrange(0, half // 65536) * 65536 for _ in range(300)]
if baseline:
    seq("local baseline seq read")
    rnd("local baseline random 4k read", offs)
else:
    seq("seq first read")
    seq("seq re-read")
    rnd("random 4k first read", offs)
    rnd("random 4k re-read", offs)
h.shutdown()
for v in out.values():
    l = v.pop("lat")
    v["p50_ms"] = l[len(l) // 2] * 1000
    v["p99_ms"] = l[min(len(l) - 1, int(len(l) * 0.99))] * 1000
print(json.dumps(out))
"""


def one_round(kind, exe, work, size, seed):
    top = os.path.join(work, "top.qcow2")
    if os.path.exists(top):
        os.unlink(top)
    # The header records the NBD backing too (the daemons are given it explicitly), so that
    # qemu-img can compare the result with the base afterwards.
    url = f"nbd+unix:///?socket={os.path.join(work, 'backing.sock')}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", url, "-F", "raw", top,
                    str(size)], check=True)
    res = run_reader(kind, exe, work, size, seed, cor=True)
    # What was timed is right: the image is sound and holds the base's bytes where read.
    subprocess.run(["qemu-img", "check", "-q", top], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", top,
                    os.path.join(work, "base.raw")], check=True)
    m = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "--max-length",
                                   str(size // 2), top], check=True, capture_output=True,
                                  text=True).stdout)
    if any(e["depth"] != 0 for e in m):
        raise RuntimeError(f"{kind}: the sequentially read half is not all in the top: {m}")
    res.update(run_reader(kind, exe, work, size, seed, cor=False))
    return res


def run_reader(kind, exe, work, size, seed, cor):
    """Start the daemon (exporting the copy-on-read filter, or the plain top for the local
    baseline), run the client, stop the daemon; returns the client's results."""
    for s in ("export.sock", "qmp.sock"):
        p = os.path.join(work, s)
        if os.path.exists(p):
            os.unlink(p)
    log = open(os.path.join(work, f"{kind}{'' if cor else '-baseline'}.log"), "w")
    d = subprocess.Popen(daemon_argv(kind, exe, work, cor), stdout=log,
                         stderr=subprocess.STDOUT, cwd=work)
    try:
        wait_for(os.path.join(work, "export.sock"), d, kind)
        url = f"nbd+unix:///disk?socket={os.path.join(work, 'export.sock')}"
        r = subprocess.run([SYS_PY, "-c", READER, url, str(size), str(seed),
                            "cor" if cor else "baseline"],
                           check=True, capture_output=True, text=True)
        return json.loads(r.stdout)
    finally:
        d.terminate()
        try:
            d.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()
        log.close()


def run_cor(ds, work, rounds=3, size_mib=256, delay_ms=5, qsd="qemu-storage-daemon"):
    """Run the benchmark; returns {"config": ..., "results": {workload: {side: [round
    dicts]}}}."""
    os.makedirs(work, exist_ok=True)
    size = size_mib * MiB
    base = os.path.join(work, "base.raw")
    with open(base, "wb") as f:
        rng = random.Random(1)
        for _ in range(size // MiB):
            f.write(rng.randbytes(MiB))
    sock = os.path.join(work, "backing.sock")
    kit = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=delay", "file", base,
                            f"rdelay={delay_ms}ms", "--exit-with-parent"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        wait_for(sock, kit, "nbdkit")
        for rnd in range(rounds):
            for kind, exe in (("diskstream", ds), ("qsd", qsd)):
                res = one_round("qsd" if kind == "qsd" else "ours", exe, work, size, rnd)
                for w, v in res.items():
                    results.setdefault(w, {}).setdefault(kind, []).append(v)
                print(f"round {rnd + 1} {kind}: " + ", ".join(
                    f"{w} {v['bytes'] / v['secs'] / MiB:.1f} MiB/s p50 {v['p50_ms']:.2f} ms"
                    for w, v in res.items()), file=sys.stderr)
    finally:
        kit.terminate()
        kit.wait()
    return {"config": {"size_mib": size_mib, "delay_ms": delay_ms, "rounds": rounds},
            "results": results}


def run(h):
    """Entry point for bench/run.py's `cor` scenario: the same measurement, its throughputs
    recorded as harness results (higher is better) so they appear in the generated report."""
    rounds = 1 if h.quick else max(3, min(h.rounds, 5))
    size_mib = 32 if h.quick else 256
    res = run_cor(h.ds, h.p("cor"), rounds=rounds, size_mib=size_mib)
    for w, sides in res["results"].items():
        def tput(side):
            return [v["bytes"] / v["secs"] / MiB for v in sides[side]]
        h.add_result("cor", f"copy-on-read {w} over a {res['config']['delay_ms']} ms NBD backing",
                     "MiB/s", tput("diskstream"), tput("qsd"), "qemu-storage-daemon",
                     higher_better=True)


def markdown(run):
    c = run["config"]
    lines = [SECTION, "",
             f"`python3 bench/cor.py` ({c['rounds']} rounds, A/B alternated, fresh overlay per "
             f"round): a {c['size_mib']} MiB raw base served by nbdkit with "
             f"`--filter=delay rdelay={c['delay_ms']}ms`, an empty qcow2 overlay over it "
             "(blockdev `nbd` backing), a `copy-on-read` filter node over the overlay exported "
             "over NBD; the same `--blockdev`/`--nbd-server`/`--export` command line for "
             "`diskstream daemon` (fetch unit 1 MiB, read-ahead 4 units) and "
             "qemu-storage-daemon 10.0.2. The client (libnbd) reads one request at a time: "
             "the first half of the disk sequentially in 64 KiB requests, twice, then 300 "
             "random 4 KiB reads in the second half, twice. The local baseline rows: the same "
             "daemon then exports the populated overlay as a plain qcow2 node (no filter) and "
             "the client repeats the sequential read and the random offsets, all local by "
             "then: the speed re-reads through the filter aim at. Medians over the rounds "
             "(throughput in MiB/s; latency per request p50/p99 in ms); ratio = diskstream / "
             "QSD throughput.", "",
             "| workload | diskstream MiB/s | p50 ms | p99 ms | QSD MiB/s | p50 ms | p99 ms | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for w, sides in run["results"].items():
        def med(side, key):
            return statistics.median(v[key] for v in sides[side])

        def tput(side):
            return statistics.median(v["bytes"] / v["secs"] / MiB for v in sides[side])
        o, q = tput("diskstream"), tput("qsd")
        lines.append(f"| {w} | {o:.1f} | {med('diskstream', 'p50_ms'):.2f} | "
                     f"{med('diskstream', 'p99_ms'):.2f} | {q:.1f} | {med('qsd', 'p50_ms'):.2f} | "
                     f"{med('qsd', 'p99_ms'):.2f} | **{o / q:.2f}x** |")
    return lines


def replace_section(path, lines):
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start].rstrip("\n") + ("\n" + text[nxt:] if nxt >= 0 else "")
    text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--delay-ms", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run, nothing written")
    ap.add_argument("--ours", help="diskstream binary (default: build target/release)")
    ap.add_argument("--workdir")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.size_mib = 1, 8
    ds = args.ours
    if not ds:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "diskstream"], cwd=ROOT,
                       check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        ds = os.path.join(target, "release", "diskstream")
    work = args.workdir or tempfile.mkdtemp(prefix="ds-bench-cor-")
    try:
        run = run_cor(os.path.abspath(ds), work, args.rounds, args.size_mib, args.delay_ms)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    lines = markdown(run)
    print("\n".join(lines))
    if not args.quick:
        replace_section(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
