"""Job scenarios of bench/run.py: mirror, mirror-latency, commit and http (imported by run.py,
which passes its Harness `h`; see run.py's docstring for the A B alternation and the report).

* mirror: `blockdev-mirror sync=full` of a fully allocated qcow2 (random-ish data) into (a) a
  fresh local qcow2 and (b) an `nbd` node on nbdkit's file plugin behind `--filter=delay`
  (every data request +N ms), timed from the command to BLOCK_JOB_READY and on through
  `block-job-complete` to BLOCK_JOB_COMPLETED; the target must then read as the source.
* mirror-latency: the same local mirror while fio (nbd engine, QD1, 4 KiB random writes at a
  fixed rate) writes through the NBD export of the source, copy-mode background and
  write-blocking; write latency percentiles over the I/Os between the command and READY.
  fio stops at READY, then the job completes and the target must equal the source.
* commit: active `block-commit` of a fully written qcow2 overlay into its half allocated base
  (READY, then `block-job-complete`); the base must then read as the overlay did.
* http: an empty qcow2 overlay over a raw image served by a local HTTP server with Range
  support (crates/diskstream-http/tests/servers.py). diskstream reads `http://` backings
  itself; QEMU here has no curl block driver, so its side reads the same URL through
  `nbdkit curl` as an `nbd://` backing. Measured: `img rebase -b ""` (the offline stream: all
  backing data copied into the overlay) and `img convert -O qcow2` of the overlay against
  qemu-img, and a plain `curl -o` download of the raw file as the line rate.
* http-stream: the daemon's `block-stream` of an empty qcow2 overlay whose backing file is a
  1 GiB qcow2 (random data) on `http://`, served by the test range server (sendfile, a thread
  per connection) with +N ms before every response (--delay-ms); against qemu-storage-daemon
  streaming the same overlay over an `nbd://` backing from `nbdkit curl` on the same URL, and
  `curl -o` of the same object through the same delay (the issue's target: within 1.2x of it),
  and that download followed by an fsync of the file (the stream ends with its overlay flushed,
  so on a disk-backed work dir the job also pays for the write-back; on tmpfs both are free).
"""
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

from run import GiB, MiB, BenchError, Daemon, free_port, gib_label, pct, read_lat_log

QSD = "qemu-storage-daemon"
SIDES = ("diskstream", QSD)


# ---- images ----------------------------------------------------------------------------------
RANDOM_RAW = r"""
import os, random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blk = min(16 << 20, size)
buf = random.Random(seed).randbytes(blk)
with open(path + ".tmp", "wb") as f:
    for i in range(size // blk):
        k = (i * 4099) % blk
        f.write(buf[k:])
        f.write(buf[:k])
os.rename(path + ".tmp", path)
"""


def make_random_raw(h, path, size, seed):
    """A raw file of `size` bytes of random-ish data: one random block written rotated by a
    different amount each time (no zero runs, no two blocks alike, cheap to generate). Written
    by a child process: the harness's own peak RSS must stay small (see Harness.timed)."""
    h.sh(sys.executable, "-c", RANDOM_RAW, path, str(size), str(seed), timeout=1800)


def make_full_qcow2(h, name, size, seed):
    """A fully allocated qcow2 holding random-ish data (converted from a raw file, removed
    afterwards unless `keep_raw`)."""
    img = h.p(name)
    if not os.path.exists(img):
        raw = img + ".raw"
        make_random_raw(h, raw, size, seed)
        h.sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img, timeout=1800)
        os.unlink(raw)
    return img


def compare(h, a, b, fa="qcow2", fb="qcow2"):
    """The two images read identically (qemu-img compare; a difference fails the scenario)."""
    h.sh("qemu-img", "compare", "-q", "-f", fa, "-F", fb, a, b, timeout=1800)


def node(name, filename, fmt="qcow2"):
    return json.dumps({"driver": fmt, "node-name": name,
                       "file": {"driver": "file", "filename": filename}})


def nbd_node(name, port):
    return json.dumps({"driver": "nbd", "node-name": name,
                       "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)}})


# ---- one job ---------------------------------------------------------------------------------
def job_once(h, side, name, blockdevs, command, args, timeout, export=None, probe=None):
    """Start a fresh daemon with `blockdevs`, run `command` (a job that reaches READY: mirror
    or active commit), then `block-job-complete`. Returns (seconds to READY, seconds to
    COMPLETED, peak RSS KiB, CPU seconds of the daemon). probe(phase, daemon) is called with 'before' (daemon up),
    'start' (just before the command) and 'ready' (READY received, before the completion)."""
    d = Daemon(h, side, name, blockdevs, export=export)
    try:
        if probe:
            probe("before", d)
        os.sync()
        if probe:
            probe("start", d)
        t0 = time.perf_counter()
        d.cmd(command, **args)
        ev = d.wait_event({"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, timeout)
        t_ready = time.perf_counter() - t0
        if ev["event"] != "BLOCK_JOB_READY":
            raise BenchError(f"{side} {command}: {ev} before READY")
        if probe:
            probe("ready", d)
        d.cmd("block-job-complete", device=args["job-id"])
        ev = d.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, timeout)
        t_done = time.perf_counter() - t0
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise BenchError(f"{side} {command} failed: {ev}")
        rss, cpu = d.rss(), d.cpu()
    finally:
        d.close()
    return t_ready, t_done, rss, cpu


def job_scenario(h, scenario, title, size, setup, verify, timeout):
    """A B rounds of job_once; setup(side, i) -> (blockdevs, command, args[, cleanup]);
    verify(side, i) after each round. Two results: time to READY and to COMPLETED."""
    rss = {s: 0 for s in SIDES}
    ready = {s: [] for s in SIDES}
    cpu = {s: [] for s in SIDES}

    def run(side):
        def f(i):
            blockdevs, command, args = setup(side, i)
            tr, td, r, c = job_once(h, side, f"{scenario}-{side}", blockdevs, command, args, timeout)
            rss[side] = max(rss[side], r or 0)
            if c is not None:
                cpu[side].append(c)
            verify(side, i)
            ready[side].append(tr)
            return td
        return f
    a, b = h.alternate(run("diskstream"), run(QSD))
    mo, mt = statistics.median(a), statistics.median(b)
    extra = {"mib_per_s_ours": size / MiB / mo, "mib_per_s_theirs": size / MiB / mt}
    if cpu["diskstream"] and cpu[QSD]:
        extra.update(cpu_s_ours=statistics.median(cpu["diskstream"]),
                     cpu_s_theirs=statistics.median(cpu[QSD]))
    h.add_result(scenario, f"{title}: command to COMPLETED", "s", a, b, QSD, rss["diskstream"], rss[QSD],
                 extra=extra)
    # The rounds that reached READY are those measured above (a retried round only counts once).
    h.add_result(scenario, f"{title}: command to READY", "s", ready["diskstream"][-len(a):],
                 ready[QSD][-len(b):], QSD, rss["diskstream"], rss[QSD])


# ---- mirror ----------------------------------------------------------------------------------
def sc_mirror(h):
    size = 64 * MiB if h.quick else h.args.mirror_size * GiB
    src = make_full_qcow2(h, f"mirror-src-{size}.qcow2", size, seed=11)
    tgt = h.p("mirror-tgt.qcow2")

    def setup_local(side, i):
        if os.path.exists(tgt):
            os.unlink(tgt)
        h.sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size))
        return ([node("src", src), node("tgt", tgt)], "blockdev-mirror",
                {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"})

    def verify_local(side, i):
        h.sh("qemu-img", "check", "-q", tgt)
        compare(h, src, tgt)
        os.unlink(tgt)
    job_scenario(h, "mirror", f"mirror sync=full of a {gib_label(size)} allocated qcow2 -> local qcow2",
                 size, setup_local, verify_local, timeout=1800)

    # (b) Into an NBD server behind a slow link: nbdkit's file plugin on a fresh raw file.
    nsize = 8 * MiB if h.quick else h.args.mirror_nbd_size * MiB
    nsrc = make_full_qcow2(h, f"mirror-src-{nsize}.qcow2", nsize, seed=12)
    raw = h.p("mirror-tgt.raw")
    delay = h.args.delay_ms
    kit = {}

    def setup_nbd(side, i):
        if kit.get("p"):
            h.stop(kit.pop("p"))
        with open(raw, "wb") as f:
            f.truncate(nsize)
        port = free_port()
        kit["p"] = h.spawn(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                            "--filter=delay", "file", raw] +
                           [f"delay-{k}={delay}ms" for k in ("read", "write", "zero", "trim", "extents")],
                           log=f"nbdkit-mirror-{side}.log")
        h.wait_port(port, kit["p"])
        return ([node("src", nsrc), nbd_node("tgt", port)], "blockdev-mirror",
                {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"})

    def verify_nbd(side, i):
        h.stop(kit.pop("p"))  # flushed and closed: the raw file holds what the job wrote
        compare(h, nsrc, raw, fb="raw")
    job_scenario(h, "mirror", f"mirror sync=full of a {gib_label(nsize)} allocated qcow2 -> nbd node "
                 f"(nbdkit file, +{delay} ms per request)", nsize, setup_nbd, verify_nbd, timeout=3600)


def sc_mirror_latency(h):
    """Guest 4 KiB random writes at QD1 through the source's NBD export during a local mirror."""
    size = 32 * MiB if h.quick else h.args.mirror_lat_size * MiB
    orig = make_full_qcow2(h, f"mirror-src-{size}.qcow2", size, seed=13)
    src, tgt = h.p("mlat-src.qcow2"), h.p("mlat-tgt.qcow2")
    idle = 1.0 if h.quick else 3.0
    iops = h.args.mirror_lat_iops
    for mode in ("background", "write-blocking"):
        lat = {s: [] for s in SIDES}
        rss = {s: 0 for s in SIDES}
        ready = {s: [] for s in SIDES}

        def run(side):
            def f(i):
                for p in (src, tgt):
                    if os.path.exists(p):
                        os.unlink(p)
                h.sh("cp", "--sparse=always", orig, src)
                h.sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size))
                prefix = h.p(f"mlat-{mode}-{side}-{i}")
                st = {}

                def probe(phase, d):
                    if phase == "before":
                        uri = f"nbd+unix:///src?socket={d.nbd_sock}"
                        st["fio"] = h.spawn(["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}",
                                             "--rw=randwrite", "--bs=4k", "--iodepth=1", f"--size={size}",
                                             f"--rate_iops={iops}", "--time_based", "--runtime=3600",
                                             f"--write_lat_log={prefix}", "--log_avg_msec=0",
                                             "--log_unix_epoch=1", "--output-format=json",
                                             f"--output={prefix}.json"], log=f"mlat-{side}-{i}.fio.log")
                        time.sleep(idle)
                    elif phase == "start":
                        st["t0"] = time.time()
                    else:
                        st["t1"] = time.time()
                        # fio stops on SIGINT and still writes its logs; the writes it made
                        # are then all in the source, and the completion syncs the target.
                        h.stop(st["fio"], sig=signal.SIGINT, timeout=30)
                tr, td, r, _ = job_once(h, side, f"mlat-{side}", [node("src", src), node("tgt", tgt)],
                                     "blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                                         "sync": "full", "copy-mode": mode},
                                     1800, export="src", probe=probe)
                rss[side] = max(rss[side], r or 0)
                log = read_lat_log(f"{prefix}_lat.1.log")
                a0, a1 = st["t0"] * 1000, st["t1"] * 1000
                during = [ns for t, ns, d in log if a0 <= t <= a1 and d == 1]
                before = [ns for t, ns, d in log if t < a0 and d == 1]
                if not during:
                    raise BenchError(f"fio logged no write during the {side} mirror\n{h.log_tail(st['fio'])}")
                lat[side].append({"ready_s": tr, "write_p50_us": pct(during, 50) / 1000,
                                  "write_p99_us": pct(during, 99) / 1000,
                                  "write_max_us": max(during) / 1000,
                                  "idle_write_p50_us": pct(before, 50) / 1000, "writes_during": len(during)})
                ready[side].append(tr)
                h.sh("qemu-img", "check", "-q", tgt)
                compare(h, src, tgt)
                return td
            return f
        a, b = h.alternate(run("diskstream"), run(QSD))
        label = f"mirror {gib_label(size)} copy-mode={mode}, guest 4k random writes at {iops}/s QD1"
        extra = {"mirror_latency": {s: {k: statistics.median(x[k] for x in lat[s])
                                        for k in lat[s][0] if k != "writes_during"} for s in SIDES},
                 "latency_rounds": lat}
        h.add_result("mirror-latency", f"{label}: command to READY", "s", ready["diskstream"][-len(a):],
                     ready[QSD][-len(b):], QSD, rss["diskstream"], rss[QSD], extra=extra)
        for k in ("write_p50_us", "write_p99_us"):
            h.add_result("mirror-latency", f"{label}: write {k.split('_')[1]} until READY", "us",
                         [x[k] for x in lat["diskstream"]], [x[k] for x in lat[QSD]], QSD)


# ---- commit ----------------------------------------------------------------------------------
def sc_commit(h):
    size = 64 * MiB if h.quick else h.args.commit_size * MiB
    from run import make_base
    base_orig = make_base(h, size)
    top_orig = h.p(f"commit-top-{size}.orig.qcow2")
    base, top = h.p("commit-base.qcow2"), h.p("commit-top.qcow2")
    if not os.path.exists(top_orig):
        h.sh("cp", "--sparse=always", base_orig, base)
        h.sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", "qcow2",
             top_orig, str(size))
        # Fully written: 1 MiB requests over the whole disk (nonzero data).
        h.sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=51", "-c", str(size // MiB),
             "-s", str(MiB), "-f", "qcow2", top_orig, timeout=1800)

    def setup(side, i):
        h.sh("cp", "--sparse=always", base_orig, base)
        h.sh("cp", "--sparse=always", top_orig, top)
        return [f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}"], "block-commit", \
            {"job-id": "c", "device": "top"}

    def verify(side, i):
        h.sh("qemu-img", "check", "-q", base)
        # The overlay is fully allocated: it reads as itself whatever its backing holds.
        compare(h, top_orig, base)
    job_scenario(h, "commit", f"active commit of a fully written {gib_label(size)} overlay into its "
                 "half allocated base", size, setup, verify, timeout=1800)


# ---- http --------------------------------------------------------------------------------------
def http_server(h, root, *extra):
    """The Range-capable static server of the HTTP protocol tests; stops when its stdin closes
    (or when the harness stops its process group)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "crates", "diskstream-http", "tests", "servers.py")
    proc = subprocess.Popen([sys.executable, script, "range", root, *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    proc.log = None
    h.procs.append(proc)
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise BenchError(f"servers.py range did not start: {line!r}")
    return proc, int(line.split()[1])


def sc_http(h):
    size = 16 * MiB if h.quick else h.args.http_size * MiB
    root = h.p("http")
    os.makedirs(root, exist_ok=True)
    raw = os.path.join(root, "base.raw")
    if not os.path.exists(raw) or os.path.getsize(raw) != size:
        make_random_raw(h, raw, size, seed=21)
    srv, port = http_server(h, root)
    h.keep_procs.append(srv)
    kport = free_port()
    kit = h.spawn(["nbdkit", "-f", "--exit-with-parent", "-r", "-i", "127.0.0.1", "-p", str(kport),
                   "curl", f"url=http://127.0.0.1:{port}/base.raw"], log="nbdkit-curl.log")
    h.keep_procs.append(kit)
    try:
        h.wait_port(kport, kit)
        url = f"http://127.0.0.1:{port}/base.raw"
        ov = {"diskstream": h.p("http-ov-ds.orig.qcow2"), "qemu-img": h.p("http-ov-q.orig.qcow2")}
        # qemu-img cannot open http:// here (no curl block driver): -u writes the header only.
        h.sh("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", url, "-F", "raw", ov["diskstream"], str(size))
        h.sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"nbd://127.0.0.1:{kport}", "-F", "raw",
             ov["qemu-img"], str(size))
        exe = {"diskstream": [h.ds, "img"], "qemu-img": ["qemu-img"]}
        rss = {}

        def rebase(side):
            def f(i):
                work = h.p(f"http-rebase-{side}.qcow2")
                h.sh("cp", ov[side], work)
                dt, r = h.timed(exe[side] + ["rebase", "-f", "qcow2", "-b", "", work], timeout=1800)
                rss[("rebase", side)] = max(rss.get(("rebase", side), 0), r)
                info = json.loads(h.sh("qemu-img", "info", "--output=json", work))
                if "backing-filename" in info:
                    raise BenchError(f"{side} rebase left a backing file")
                h.sh("qemu-img", "check", "-q", work)
                compare(h, work, raw, fb="raw")
                os.unlink(work)
                return dt
            return f

        def convert(side):
            def f(i):
                out = h.p(f"http-convert-{side}.qcow2")
                if os.path.exists(out):
                    os.unlink(out)
                dt, r = h.timed(exe[side] + ["convert", "-f", "qcow2", "-O", "qcow2", ov[side], out], timeout=1800)
                rss[("convert", side)] = max(rss.get(("convert", side), 0), r)
                h.sh("qemu-img", "check", "-q", out)
                compare(h, out, raw, fb="raw")
                os.unlink(out)
                return dt
            return f

        def download(i):
            out = h.p("http-curl.raw")
            dt, r = h.timed(["curl", "-sS", "--fail", "-o", out, url], timeout=1800)
            rss["curl"] = max(rss.get("curl", 0), r)
            h.sh("cmp", out, raw)
            os.unlink(out)
            return dt
        rb_ds, rb_q, cv_ds, cv_q, dl = h.alternate_n(
            [rebase("diskstream"), rebase("qemu-img"), convert("diskstream"), convert("qemu-img"), download])
        lab = f"{gib_label(size)} raw over HTTP under an empty qcow2 overlay"
        peer = "qemu-img (nbd:// via nbdkit curl)"
        h.add_result("http", f"img rebase -b '' (offline stream), {lab}", "s", rb_ds, rb_q, peer,
                     rss[("rebase", "diskstream")], rss[("rebase", "qemu-img")],
                     extra={"mib_per_s_ours": size / MiB / statistics.median(rb_ds),
                            "mib_per_s_theirs": size / MiB / statistics.median(rb_q)})
        h.add_result("http", f"img convert -O qcow2 of the overlay, {lab}", "s", cv_ds, cv_q, peer,
                     rss[("convert", "diskstream")], rss[("convert", "qemu-img")])
        h.add_result("http", f"img rebase -b '' vs plain download (curl -o) of the {gib_label(size)} raw",
                     "s", rb_ds, dl, "curl -o", rss[("rebase", "diskstream")], rss["curl"])
    finally:
        for p in (kit, srv):
            h.stop(p)
        h.keep_procs.clear()


def sc_http_stream(h):
    size = 32 * MiB if h.quick else h.args.http_stream_size * MiB
    delay = h.args.delay_ms
    root = h.p("http-stream")
    os.makedirs(root, exist_ok=True)
    base = os.path.join(root, "base.qcow2")
    if not os.path.exists(base) or json.loads(h.sh("qemu-img", "info", "--output=json", base))[
            "virtual-size"] != size:
        raw = base + ".raw"
        make_random_raw(h, raw, size, seed=23)
        h.sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base, timeout=1800)
        os.unlink(raw)
    srv, port = http_server(h, root, "--delay-ms", str(delay))
    h.keep_procs.append(srv)
    url = f"http://127.0.0.1:{port}/base.qcow2"
    kport = free_port()
    kit = h.spawn(["nbdkit", "-f", "--exit-with-parent", "-r", "-i", "127.0.0.1", "-p", str(kport),
                   "curl", f"url={url}"], log="nbdkit-curl-stream.log")
    h.keep_procs.append(kit)
    try:
        h.wait_port(kport, kit)
        ov = {"diskstream": h.p("http-stream-ds.orig.qcow2"), QSD: h.p("http-stream-q.orig.qcow2")}
        # -u: qemu-img cannot open http:// here (no curl block driver).
        h.sh("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", url, "-F", "qcow2",
             ov["diskstream"], str(size))
        h.sh("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", f"nbd://127.0.0.1:{kport}",
             "-F", "qcow2", ov[QSD], str(size))
        rss = {}

        def stream(side):
            def f(i):
                work = h.p(f"http-stream-{side}.qcow2")
                h.sh("cp", ov[side], work)
                d = Daemon(h, side, f"http-stream-{side}", [node("top", work)])
                try:
                    os.sync()
                    t0 = time.perf_counter()
                    d.cmd("block-stream", **{"job-id": "s", "device": "top"})
                    ev = d.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, 1800)
                    dt = time.perf_counter() - t0
                    if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
                        raise BenchError(f"{side} block-stream failed: {ev}")
                    rss[side] = max(rss.get(side, 0), d.rss() or 0)
                finally:
                    d.close()
                info = json.loads(h.sh("qemu-img", "info", "--output=json", work))
                if "backing-filename" in info:
                    raise BenchError(f"{side}: the stream left a backing file")
                h.sh("qemu-img", "check", "-q", work)
                compare(h, work, base)
                os.unlink(work)
                return dt
            return f

        durable = []

        def download(i):
            out = h.p("http-stream-curl.qcow2")
            dt, r = h.timed(["curl", "-sS", "--fail", "-o", out, url], timeout=1800)
            # The stream ends with the overlay flushed (its data durable); a download is only
            # in the page cache when curl exits. The same download plus an fsync of the file
            # is the durable equivalent (a second row; on tmpfs the two are the same).
            t0 = time.perf_counter()
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            durable.append(dt + time.perf_counter() - t0)
            rss["curl"] = max(rss.get("curl", 0), r)
            h.sh("cmp", out, base)
            os.unlink(out)
            return dt
        ds, q, dl = h.alternate_n([stream("diskstream"), stream(QSD), download])
        lab = (f"daemon block-stream of an empty qcow2 overlay over a {gib_label(size)} qcow2 on "
               f"http:// (+{delay} ms per response)")
        h.add_result("http-stream", lab, "s", ds, q, f"{QSD} (nbd:// via nbdkit curl)",
                     rss["diskstream"], rss[QSD],
                     extra={"mib_per_s_ours": size / MiB / statistics.median(ds),
                            "mib_per_s_theirs": size / MiB / statistics.median(q)})
        h.add_result("http-stream", f"{lab} vs plain download (curl -o, same delay)", "s", ds, dl,
                     "curl -o", rss["diskstream"], rss["curl"],
                     extra={"mib_per_s_ours": size / MiB / statistics.median(ds),
                            "mib_per_s_theirs": size / MiB / statistics.median(dl)})
        h.add_result("http-stream", f"{lab} vs download + fsync (curl -o, then fsync of the file)",
                     "s", ds, durable, "curl -o + fsync", rss["diskstream"], rss["curl"],
                     extra={"mib_per_s_ours": size / MiB / statistics.median(ds),
                            "mib_per_s_theirs": size / MiB / statistics.median(durable)})
    finally:
        for p in (kit, srv):
            h.stop(p)
        h.keep_procs.clear()
