#!/usr/bin/env python3
"""diskstream benchmark harness: every scenario runs against diskstream and its QEMU peer
alternately (A B A B ...), on the same images, in the same run; the report gives median, min,
max and the ratio peer/diskstream (> 1.0 means diskstream is faster).

Usage: python3 bench/run.py [--rounds N] [--quick] [--workdir DIR] [--out docs/BENCHMARKS.md]
--quick uses tiny images so CI can check the harness works (its timings mean nothing).
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*args, **kw):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, **kw)


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def drop_caches():
    # Page cache stays warm on purpose (both sides equally); this syncs dirty pages so one
    # side's writeback does not land in the other's timing.
    os.sync()


def machine():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    qv = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}; {qv}"


def scenario(name, rounds, ours, theirs, setup=None):
    a, b = [], []
    for _ in range(rounds):
        for side, cmd, acc in (("diskstream", ours, a), ("qemu", theirs, b)):
            if setup:
                setup()
            drop_caches()
            acc.append(timed(cmd))
    return {
        "name": name,
        "ours": a,
        "theirs": b,
        "ratio": statistics.median(b) / statistics.median(a),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    args = ap.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)
    sh("cargo", "build", "--release", "-q", "-p", "diskstream", cwd=ROOT)
    ds = os.path.join(ROOT, "target", "release", "diskstream")
    work = args.workdir or tempfile.mkdtemp(prefix="ds-bench-")
    os.makedirs(work, exist_ok=True)
    p = lambda n: os.path.join(work, n)

    size = "64M" if args.quick else "2G"
    count = 512 if args.quick else 16384
    big = "1G" if args.quick else "64G"
    big_count = 4096 if args.quick else 262144

    # A 2 GiB qcow2, half allocated (every other 64 KiB cluster), random-ish data.
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("half.qcow2"), size)
    # --pattern: nonzero data, or both converters would detect zeroes and skip everything.
    sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=165", "-c", str(count), "-s", "65536",
       "-S", "131072", "-f", "qcow2", p("half.qcow2"))
    # A 64 GiB qcow2 with 4 KiB written every 256 KiB: ~262k separate extents to map.
    sh("qemu-img", "create", "-q", "-f", "qcow2", p("frag.qcow2"), big)
    sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=1", "-c", str(big_count), "-s", "4096",
       "-S", "262144", "-f", "qcow2", p("frag.qcow2"))

    def rm(*names):
        def f():
            for n in names:
                if os.path.exists(p(n)):
                    os.unlink(p(n))
        return f

    results = []
    results.append(scenario(f"convert {size} half-allocated qcow2 -> qcow2", args.rounds,
                            [ds, "img", "convert", "-f", "qcow2", "-O", "qcow2", p("half.qcow2"), p("out.qcow2")],
                            ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", p("half.qcow2"), p("out.qcow2")],
                            rm("out.qcow2")))
    results.append(scenario(f"convert {size} half-allocated qcow2 -> raw", args.rounds,
                            [ds, "img", "convert", "-f", "qcow2", "-O", "raw", p("half.qcow2"), p("out.raw")],
                            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", p("half.qcow2"), p("out.raw")],
                            rm("out.raw")))
    results.append(scenario(f"map --output=json of a fragmented {big} qcow2", args.rounds,
                            [ds, "img", "map", "--output=json", "-f", "qcow2", p("frag.qcow2")],
                            ["qemu-img", "map", "--output=json", "-f", "qcow2", p("frag.qcow2")]))

    # Sanity: what we timed is right. Our outputs pass qemu-img check and compare, and our map
    # equals qemu-img's.
    for fmt, out in (("qcow2", "check.qcow2"), ("raw", "check.raw")):
        sh(ds, "img", "convert", "-f", "qcow2", "-O", fmt, p("half.qcow2"), p(out))
        if fmt == "qcow2":
            sh("qemu-img", "check", "-q", p(out))
        sh("qemu-img", "compare", "-q", p("half.qcow2"), p(out))
        os.unlink(p(out))
    m_ours = subprocess.run([ds, "img", "map", "--output=json", "-f", "qcow2", p("frag.qcow2")],
                            check=True, capture_output=True).stdout
    m_qemu = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", p("frag.qcow2")],
                            check=True, capture_output=True).stdout
    if m_ours != m_qemu:
        sys.exit("map output differs from qemu-img's")

    lines = ["# Benchmarks", "",
             "Every figure is measured side by side with the QEMU peer in the same run, on the same images,",
             "alternating A B A B. Ratio = peer median / diskstream median (> 1.0: diskstream is faster).",
             "Regenerate with `python3 bench/run.py` (about a few minutes; `--quick` is a smoke run for CI).", "",
             f"Machine: {machine()}", f"Rounds: {args.rounds}{' (quick mode: timings meaningless)' if args.quick else ''}", "",
             "| scenario | diskstream median (s) | min | max | qemu median (s) | min | max | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, t = r["ours"], r["theirs"]
        lines.append(f"| {r['name']} | {statistics.median(o):.3f} | {min(o):.3f} | {max(o):.3f} | "
                     f"{statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} | **{r['ratio']:.2f}x** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        with open(args.out, "w") as f:
            f.write(text)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
