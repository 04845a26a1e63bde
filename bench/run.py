#!/usr/bin/env python3
"""diskstream benchmark harness: every scenario runs against diskstream and its QEMU peer
alternately (A B A B ...), on the same images, in the same run. The report gives median, min
and max of each side, the ratio (> 1.0 means diskstream is better: peer time / our time, or
our throughput / peer throughput), each side's peak RSS, and the load average while the
scenario ran. Results go to docs/bench/results.json (merged, so `--only` refreshes one
scenario), docs/BENCHMARKS.md and the plots under docs/bench/.

    python3 bench/run.py                      # every scenario, 5 rounds
    python3 bench/run.py --only stream,nbd    # some scenarios (merged into the existing report)
    python3 bench/run.py --quick              # CI smoke run: tiny images, 2 rounds, report in the
                                              # work dir; checks the harness, not the timings

Scenarios (--only names): convert, map, nbd, stream, stream-nbd, latency, cor, mirror,
mirror-latency, commit, http, http-stream (the last five are in bench/jobs.py).

Hook for bench/cor.py (copy-on-read; written separately): if the file exists it is imported
and `cor.run(h)` is called with the Harness `h` (see the class: `h.quick`, `h.rounds`,
`h.work`, `h.ds`, `h.spawn`/`h.stop`, `h.timed`, `h.alternate`/`h.alternate_n`, `h.add_result`, `h.fio`).
"""
import argparse
import atexit
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
SCENARIOS = ["convert", "map", "nbd", "stream", "stream-nbd", "latency", "cor", "mirror", "mirror-latency",
             "commit", "http", "http-stream"]
MiB = 1 << 20
GiB = 1 << 30


class BenchError(Exception):
    """A scenario could not be measured (a tool failed, a check failed, a timeout)."""


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_kib(pid):
    """Peak resident set size of a running process, from /proc (KiB), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid):
    """User + system CPU time a running process has used so far (seconds), or None. Less
    sensitive to a loaded machine than wall time: what the work itself costs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


class Harness:
    """Process registry (everything spawned is killed on exit or failure), timing with
    rusage, A B alternation and the result list."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds
        self.procs = []
        self.results = []
        self.failures = []
        self.notes = []
        self.keep_procs = []  # scenario-wide servers (nbdkit) a retried round must not stop
        self.latency_series = {}
        self.work = args.workdir or tempfile.mkdtemp(prefix="ds-bench-", dir=args.tmpdir)
        os.makedirs(self.work, exist_ok=True)
        self.keep_work = bool(args.workdir)
        self.ds = args.diskstream
        self.loads = []
        atexit.register(self.cleanup)

    # ---- paths and processes -------------------------------------------------------------
    def p(self, name):
        return os.path.join(self.work, name)

    def sh(self, *cmd, timeout=600, cwd=None, env=None):
        """Run a setup/check command; its output is kept for the error message."""
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               cwd=cwd or self.work, env=env)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"timeout after {timeout}s: {' '.join(map(str, cmd))}") from e
        if r.returncode != 0:
            raise BenchError(f"exit {r.returncode}: {' '.join(map(str, cmd))}\n{r.stderr[-2000:]}")
        return r.stdout

    def spawn(self, cmd, log=None, env=None, cwd=None):
        """Start a long-running process in its own process group; stopped by cleanup()."""
        out = open(self.p(log), "wb") if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd or self.work, env=env)
        proc.log = log
        self.procs.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM, timeout=30):
        """Stop a process we started (its group), politely first; returns its exit code."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def cleanup(self):
        for proc in list(self.procs):
            try:
                self.stop(proc, timeout=5)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        if not self.keep_work and os.path.isdir(self.work):
            shutil.rmtree(self.work, ignore_errors=True)

    def log_tail(self, proc):
        if getattr(proc, "log", None):
            try:
                with open(self.p(proc.log), errors="replace") as f:
                    return f.read()[-2000:]
            except OSError:
                pass
        return ""

    def wait_for(self, cond, what, proc=None, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{what}: process exited {proc.returncode}\n{self.log_tail(proc)}")
            time.sleep(0.02)
        raise BenchError(f"timeout waiting for {what}\n{self.log_tail(proc) if proc else ''}")

    def wait_port(self, port, proc):
        def up():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False
        self.wait_for(up, f"port {port}", proc)

    def timed(self, cmd, timeout=900, env=None):
        """Run cmd to completion: (wall seconds, peak RSS KiB of the process tree's largest
        child). The RSS comes from GNU time (`%M`) when /usr/bin/time exists: wait4's own
        ru_maxrss of a child python starts includes the python process's high-water mark
        (Linux records the pre-exec address space's peak, and subprocess uses vfork), so any
        command would report at least the harness's own peak. Without GNU time: wait4's
        rusage, with that floor."""
        os.sync()  # one side's writeback must not land in the other's timing
        rss_file = None
        if os.path.exists("/usr/bin/time"):
            rss_file = tempfile.NamedTemporaryFile(dir=self.work, delete=False)
            rss_file.close()
            cmd = ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name] + list(cmd)
        t = time.perf_counter()
        errf = tempfile.TemporaryFile(dir=self.work)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf,
                                start_new_session=True, cwd=self.work, env=env)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        dt = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read().decode(errors="replace")
        errf.close()
        if proc.returncode != 0:
            raise BenchError(f"exit {proc.returncode} after {dt:.1f}s: {' '.join(cmd)}\n{err[-2000:]}")
        rss = ru.ru_maxrss
        if rss_file is not None:
            try:
                with open(rss_file.name) as f:
                    rss = int(f.read().split()[-1])
            except (OSError, ValueError, IndexError):
                pass
            os.unlink(rss_file.name)
        return dt, rss

    def fio(self, name, uri, args, timeout=300):
        """Run fio's nbd engine; returns its JSON job list."""
        out = self.p(f"fio-{name}.json")
        self.sh("fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
                f"--output={out}", *args, timeout=timeout)
        with open(out) as f:
            text = f.read()
        return json.loads(text[text.index("{"):])["jobs"]

    # ---- measurement ---------------------------------------------------------------------
    def sample_load(self):
        self.loads.append(loadavg())

    def alternate(self, ours, theirs, rounds=None):
        """A B A B: call ours(i) then theirs(i) for each round; each returns a value (seconds
        or a throughput). Returns the two lists."""
        a, b = self.alternate_n([ours, theirs], rounds)
        return a, b

    def alternate_n(self, fns, rounds=None):
        """A B C ... per round: call each of fns(i) in turn; returns one list per function."""
        out = [[] for _ in fns]
        for i in range(rounds or self.rounds):
            for f, acc in zip(fns, out):
                self.sample_load()
                try:
                    acc.append(f(i))
                except BenchError as e:
                    # Once: a daemon killed from outside (a shared machine) should not lose the
                    # scenario; a real failure fails again.
                    self.notes.append(f"round {i} retried after: {str(e).splitlines()[0][:300]}")
                    print(f"  retrying round {i}: {str(e).splitlines()[0][:300]}", flush=True)
                    for proc in list(self.procs):
                        if proc not in self.keep_procs:
                            self.stop(proc, timeout=5)
                    acc.append(f(i))
        self.sample_load()
        return out

    def add_result(self, scenario, name, unit, ours, theirs, peer, rss_ours=None, rss_theirs=None,
                   higher_better=False, extra=None):
        mo, mt = statistics.median(ours), statistics.median(theirs)
        ratio = (mo / mt) if higher_better else (mt / mo)
        r = {"scenario": scenario, "name": name, "unit": unit, "peer": peer,
             "higher_better": higher_better, "ours": ours, "theirs": theirs, "ratio": ratio,
             "rss_ours_kib": rss_ours, "rss_theirs_kib": rss_theirs,
             "load_max": max(self.loads) if self.loads else None,
             "load_min": min(self.loads) if self.loads else None,
             "rounds": len(ours), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": self.quick}
        if extra:
            r.update(extra)
        self.results.append(r)
        self.loads = self.loads[-1:]
        print(f"  {name}: diskstream {mo:.4g} {unit}, {peer} {mt:.4g} {unit}, ratio {ratio:.2f}x "
              f"(load {load_range(r)})", flush=True)
        return r


# ---- QMP daemons ---------------------------------------------------------------------------
class Daemon:
    """diskstream daemon or qemu-storage-daemon with one QMP socket (qemu.qmp's legacy client)."""

    def __init__(self, h, side, name, blockdevs, export=None, env=None):
        self.h = h
        self.side = side
        self.sock = h.p(f"{name}-qmp.sock")
        self.nbd_sock = h.p(f"{name}-nbd.sock")
        for s in (self.sock, self.nbd_sock):
            if os.path.exists(s):
                os.unlink(s)
        exe = [h.ds, "daemon"] + h.args.daemon_arg if side == "diskstream" else ["qemu-storage-daemon"]
        cmd = exe + ["--chardev", f"socket,id=m,path={self.sock},server=on,wait=off",
                     "--monitor", "chardev=m"]
        for b in blockdevs:
            cmd += ["--blockdev", b]
        if export:
            cmd += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
                    "--export", f"type=nbd,id=exp0,node-name={export},name={export},writable=on"]
        elif side == "diskstream":
            cmd += ["--nbd-server", "none"]
        self.proc = h.spawn(cmd, log=f"{name}.log", env=env)
        h.wait_for(lambda: os.path.exists(self.sock), f"{side} QMP socket", self.proc)
        if export:
            h.wait_for(lambda: os.path.exists(self.nbd_sock), f"{side} NBD socket", self.proc)
        from qemu.qmp.legacy import QEMUMonitorProtocol
        # The socket file appears at bind(), a moment before listen(): retry briefly.
        deadline = time.monotonic() + 10
        while True:
            self.qmp = QEMUMonitorProtocol(self.sock)
            try:
                self.qmp.connect(negotiate=True)
                self.qmp.settimeout(120)  # a command that hangs fails the scenario
                break
            except Exception as e:  # noqa: BLE001 - qemu.qmp's ConnectError
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise BenchError(f"{side}: QMP connect: {e}\n{h.log_tail(self.proc)}") from e
                time.sleep(0.05)

    def cmd(self, name, **args):
        r = self.qmp.cmd_raw(name, args)
        if "error" in r:
            raise BenchError(f"{self.side} {name}: {r['error']}")
        return r["return"]

    def wait_event(self, names, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.side}: no {names} within {timeout}s")
            ev = self.qmp.pull_event(wait=left)
            if ev and ev["event"] in names:
                return ev

    def rss(self):
        return vm_hwm_kib(self.proc.pid)

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def close(self):
        try:
            self.cmd("quit")
        except Exception:  # noqa: BLE001 - the daemon may already be gone
            pass
        try:
            self.qmp.close()
        except Exception:  # noqa: BLE001
            pass
        if self.h.stop(self.proc, sig=signal.SIGTERM, timeout=60) not in (0, None, -15):
            raise BenchError(f"{self.side} exited {self.proc.returncode}\n{self.h.log_tail(self.proc)}")


def stream_once(h, side, top, name, timeout, export=False, probe=None, backing=None):
    """Open top (its backing chain from the header) in a fresh daemon and stream the whole
    chain into it; returns (seconds from block-stream to BLOCK_JOB_COMPLETED, peak RSS KiB,
    extra). probe(daemon) may start a guest load on the export before the job starts and is
    called back with ('start'|'end', time)."""
    if backing is None:
        bds = [f"driver=qcow2,node-name=top,file.driver=file,file.filename={h.p(top)}"]
    else:
        # An explicit backing node, added first and referenced by name (as libvirt does; QEMU
        # would merge an inline backing dict with the header's file name): the same JSON for
        # both daemons.
        bds = [json.dumps(backing), json.dumps({"driver": "qcow2", "node-name": "top",
                                                "file": {"driver": "file", "filename": h.p(top)},
                                                "backing": backing["node-name"]})]
    d = Daemon(h, side, name, bds, export="top" if export else None)
    try:
        if probe:
            probe("before", d)
        os.sync()
        if probe:
            probe("start", d)
        t0 = time.perf_counter()
        d.cmd("block-stream", **{"job-id": "s", "device": "top"})
        ev = d.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, timeout)
        dt = time.perf_counter() - t0
        if probe:
            probe("end", d)
        if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
            raise BenchError(f"{side} stream failed: {ev}")
        rss = d.rss()
    finally:
        d.close()
    return dt, rss


# ---- scenarios -----------------------------------------------------------------------------
def make_half(h):
    """A qcow2 half allocated with nonzero data (64 KiB every 128 KiB), as in issue #2."""
    size = 64 * MiB if h.quick else 2 * GiB
    if not os.path.exists(h.p("half.qcow2")):
        h.sh("qemu-img", "create", "-q", "-f", "qcow2", h.p("half.qcow2"), str(size))
        # --pattern: nonzero data, or both converters would detect zeroes and skip everything.
        h.sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=165", "-c", str(size // (128 << 10)),
             "-s", "65536", "-S", "131072", "-f", "qcow2", h.p("half.qcow2"))
    return size


def sc_convert(h):
    size = make_half(h)
    label = f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"
    for fmt in ("qcow2", "raw"):
        out = h.p(f"out.{fmt}")

        rss = {"o": 0, "t": 0}

        def run(exe, k):
            def f(_):
                if os.path.exists(out):
                    os.unlink(out)
                dt, r = h.timed(exe + ["convert", "-f", "qcow2", "-O", fmt, h.p("half.qcow2"), out])
                rss[k] = max(rss[k], r)
                return dt
            return f
        a, b = h.alternate(run([h.ds, "img"], "o"), run(["qemu-img"], "t"))
        # What we timed is right: our output passes qemu-img check and equals the source.
        os.unlink(out)
        h.sh(h.ds, "img", "convert", "-f", "qcow2", "-O", fmt, h.p("half.qcow2"), out)
        if fmt == "qcow2":
            h.sh("qemu-img", "check", "-q", out)
        h.sh("qemu-img", "compare", "-q", h.p("half.qcow2"), out)
        os.unlink(out)
        h.add_result("convert", f"convert {label} half-allocated qcow2 -> {fmt}", "s", a, b, "qemu-img",
                     rss["o"], rss["t"])


def sc_map(h):
    big = GiB if h.quick else 64 * GiB
    img = h.p("frag.qcow2")
    if not os.path.exists(img):
        # 4 KiB written every 256 KiB: ~262k separate extents to map in 64 GiB.
        h.sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(big))
        h.sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=1", "-c", str(big // (256 << 10)),
             "-s", "4096", "-S", "262144", "-f", "qcow2", img, timeout=1800)
    rss = {"o": 0, "t": 0}

    def run(exe, k):
        def f(_):
            dt, r = h.timed(exe + ["map", "--output=json", "-f", "qcow2", img])
            rss[k] = max(rss[k], r)
            return dt
        return f
    a, b = h.alternate(run([h.ds, "img"], "o"), run(["qemu-img"], "t"))
    if h.sh(h.ds, "img", "map", "--output=json", "-f", "qcow2", img) != \
            h.sh("qemu-img", "map", "--output=json", "-f", "qcow2", img):
        raise BenchError("map output differs from qemu-img's")
    h.add_result("map", f"map --output=json of a fragmented {big // GiB} GiB qcow2", "s", a, b,
                 "qemu-img", rss["o"], rss["t"])


class NbdServer:
    """diskstream serve or qemu-nbd on loopback TCP, persistent, 8 clients, same options."""

    def __init__(self, h, side, image, name):
        self.h = h
        self.port = free_port()
        exe = [h.ds, "serve"] if side == "diskstream" else ["qemu-nbd"]
        self.proc = h.spawn(exe + ["-f", "qcow2", "-b", "127.0.0.1", "-p", str(self.port), "-e", "8", "-t",
                                   image], log=f"{name}.log")
        h.wait_port(self.port, self.proc)
        self.uri = f"nbd://127.0.0.1:{self.port}/"

    def close(self):
        rss = vm_hwm_kib(self.proc.pid)
        self.h.stop(self.proc)
        return rss


def sc_nbd(h):
    size = 64 * MiB if h.quick else 2 * GiB
    img = h.p("full.qcow2")
    if not os.path.exists(img):
        h.sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
        h.sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=90", "-c", str(size // MiB),
             "-s", str(MiB), "-f", "qcow2", img)
        h.sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, h.p("full.raw"))
    # Each server gets its own copy: two servers must never have one image open read-write.
    imgs = {}
    for side in ("diskstream", "qemu-nbd"):
        imgs[side] = h.p(f"full-{side}.qcow2")
        h.sh("cp", "--sparse=always", img, imgs[side])
    runtime = "1" if h.quick else "10"
    fio_cases = [
        ("fio 4k randread QD32", "IOPS", ["--rw=randread", "--bs=4k", "--iodepth=32"],
         lambda j: j["read"]["iops"]),
        ("fio 1 MiB sequential read QD8", "MiB/s", ["--rw=read", "--bs=1M", "--iodepth=8"],
         lambda j: j["read"]["bw_bytes"] / MiB),
        ("fio 1 MiB sequential write QD8", "MiB/s", ["--rw=write", "--bs=1M", "--iodepth=8"],
         lambda j: j["write"]["bw_bytes"] / MiB),
    ]
    label = f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"
    for name, unit, args, metric in fio_cases:
        srv = {"diskstream": NbdServer(h, "diskstream", imgs["diskstream"], "serve"),
               "qemu-nbd": NbdServer(h, "qemu-nbd", imgs["qemu-nbd"], "qemu-nbd")}
        try:
            def run(side):
                def f(i):
                    os.sync()
                    jobs = h.fio(f"{side}-{i}", srv[side].uri,
                                 args + [f"--size={size}", f"--runtime={runtime}", "--time_based",
                                         "--ramp_time=1" if not h.quick else "--ramp_time=0"])
                    if jobs[0]["error"]:
                        raise BenchError(f"fio against {side}: error {jobs[0]['error']}")
                    return metric(jobs[0])
                return f
            a, b = h.alternate(run("diskstream"), run("qemu-nbd"))
        finally:
            rss = {k: s.close() for k, s in srv.items()}
        h.add_result("nbd", f"NBD {name} ({label} qcow2)", unit, a, b, "qemu-nbd",
                     rss["diskstream"], rss["qemu-nbd"], higher_better=True)
    for side in imgs:
        h.sh("qemu-img", "check", "-q", imgs[side])

    # nbdcopy: the whole image to null: (read), and a raw file into a fresh empty qcow2 (write).
    srv = {"diskstream": NbdServer(h, "diskstream", imgs["diskstream"], "serve"),
           "qemu-nbd": NbdServer(h, "qemu-nbd", imgs["qemu-nbd"], "qemu-nbd")}
    try:
        def rd(side):
            return lambda i: size / MiB / h.timed(["nbdcopy", srv[side].uri, "null:"])[0]
        a, b = h.alternate(rd("diskstream"), rd("qemu-nbd"))
    finally:
        rss = {k: s.close() for k, s in srv.items()}
    h.add_result("nbd", f"NBD nbdcopy {label} export -> null:", "MiB/s", a, b, "qemu-nbd",
                 rss["diskstream"], rss["qemu-nbd"], higher_better=True)

    rss = {"diskstream": 0, "qemu-nbd": 0}

    def wr(side):
        def f(i):
            dst = h.p(f"copy-{side}.qcow2")
            if os.path.exists(dst):
                os.unlink(dst)
            h.sh("qemu-img", "create", "-q", "-f", "qcow2", dst, str(size))
            s = NbdServer(h, side, dst, f"{side}-w")
            try:
                dt = h.timed(["nbdcopy", "--flush", h.p("full.raw"), s.uri])[0]
            finally:
                rss[side] = max(rss[side], s.close() or 0)
            if i == 0:
                h.sh("qemu-img", "check", "-q", dst)
                h.sh("qemu-img", "compare", "-q", h.p("full.raw"), dst)
            return size / MiB / dt
        return f
    a, b = h.alternate(wr("diskstream"), wr("qemu-nbd"))
    h.add_result("nbd", f"NBD nbdcopy {label} raw -> export of an empty qcow2 (--flush)", "MiB/s", a, b,
                 "qemu-nbd", rss["diskstream"], rss["qemu-nbd"], higher_better=True)


def chain_size(h, nbd=False):
    if h.quick:
        return 8 * MiB if nbd else 256 * MiB
    return h.args.stream_nbd_size * MiB if nbd else h.args.stream_size * GiB


def make_base(h, size):
    """The base of a two-level chain: half of the disk, 64 KiB every 128 KiB."""
    base = h.p(f"base-{size}.qcow2")
    if not os.path.exists(base):
        h.sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(size))
        h.sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=77", "-c", str(size // (128 << 10)),
             "-s", "65536", "-S", "131072", "-f", "qcow2", base, timeout=1800)
    return base


def make_top(h, size, top_name, backing, backing_fmt):
    """The top of the chain: 64 KiB every 1 MiB (over some of the base's data)."""
    h.sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt, h.p(top_name), str(size))
    h.sh("qemu-img", "bench", "-q", "-w", "-t", "none", "--pattern=33", "-c", str(size // MiB),
         "-s", "65536", "-S", str(MiB), "-f", "qcow2", h.p(top_name))


def make_local_chain(h, size, orig):
    if not os.path.exists(h.p(orig)):
        base = make_base(h, size)
        make_top(h, size, orig, os.path.basename(base), "qcow2")


def fresh_top(h, orig, name):
    h.sh("cp", "--sparse=always", h.p(orig), h.p(name))
    return name


def verify_stream(h, top, reference):
    """The streamed image is standalone, passes qemu-img check and reads as the chain did."""
    info = json.loads(h.sh("qemu-img", "info", "--output=json", h.p(top)))
    if "backing-filename" in info:
        raise BenchError(f"{top} still has a backing file after the stream")
    h.sh("qemu-img", "check", "-q", h.p(top))
    h.sh("qemu-img", "compare", "-q", h.p(reference), h.p(top), timeout=1200)


def stream_scenario(h, scenario, title, size, orig, timeout, backing=None):
    rss = {"diskstream": 0, "qemu-storage-daemon": 0}

    def run(side):
        def f(i):
            top = fresh_top(h, orig, f"top-{side}.qcow2")
            dt, r = stream_once(h, side, top, f"{scenario}-{side}", timeout, backing=backing)
            rss[side] = max(rss[side], r or 0)
            if i == 0 or h.quick:
                verify_stream(h, top, orig)
            return dt
        return f
    a, b = h.alternate(run("diskstream"), run("qemu-storage-daemon"))
    h.add_result(scenario, title, "s", a, b, "qemu-storage-daemon", rss["diskstream"],
                 rss["qemu-storage-daemon"],
                 extra={"mib_per_s_ours": size / MiB / statistics.median(a),
                        "mib_per_s_theirs": size / MiB / statistics.median(b)})


def gib_label(size):
    return f"{size // MiB} MiB" if size < GiB else f"{size // GiB} GiB"


def sc_stream(h):
    size = chain_size(h)
    make_local_chain(h, size, "top-local.orig.qcow2")
    stream_scenario(h, "stream", f"stream a {gib_label(size)} two-level chain (local files)", size,
                    "top-local.orig.qcow2", timeout=1800)


def sc_stream_nbd(h):
    size = chain_size(h, nbd=True)
    base = make_base(h, size)
    raw = h.p(f"base-{size}.raw")
    if not os.path.exists(raw):
        h.sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", base, raw)
    port = free_port()
    delay = h.args.delay_ms
    nbdkit = h.spawn(["nbdkit", "-f", "--exit-with-parent", "-r", "-i", "127.0.0.1", "-p", str(port),
                      "--filter=delay", "file", raw, f"delay-read={delay}ms", f"delay-extents={delay}ms",
                      f"delay-cache={delay}ms"], log="nbdkit.log")
    try:
        h.wait_port(port, nbdkit)
        h.keep_procs.append(nbdkit)
        url = f"nbd://127.0.0.1:{port}"
        make_top(h, size, "top-nbd.orig.qcow2", url, "raw")
        stream_scenario(h, "stream-nbd",
                        f"stream a {gib_label(size)} chain, base raw behind NBD (nbdkit, +{delay} ms per request)",
                        size, "top-nbd.orig.qcow2", timeout=3600,
                        backing={"driver": "raw", "node-name": "base", "read-only": True,
                                 "file": {"driver": "nbd", "read-only": True,
                                          "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)}}})
    finally:
        h.stop(nbdkit)
        h.keep_procs.clear()


def read_lat_log(path):
    """fio per-I/O latency log: (ms since start, ns, direction)."""
    out = []
    with open(path) as f:
        for line in f:
            parts = [x.strip() for x in line.split(",")]
            if len(parts) >= 3:
                out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def sc_latency(h):
    """Guest 4 KiB random read/write latency through the NBD export of the top while an
    unthrottled stream runs: fio at QD1, 200 reads/s + 200 writes/s, every I/O logged."""
    size = chain_size(h)
    orig = "top-local.orig.qcow2"
    make_local_chain(h, size, orig)
    idle = 1.0 if h.quick else 3.0
    rss = {"diskstream": 0, "qemu-storage-daemon": 0}
    lat = {"diskstream": [], "qemu-storage-daemon": []}

    def run(side):
        def f(i):
            top = fresh_top(h, orig, f"top-lat-{side}.qcow2")
            prefix = h.p(f"lat-{side}-{i}")
            st = {}

            def probe(phase, d):
                if phase == "before":
                    uri = f"nbd+unix:///top?socket={d.nbd_sock}"
                    st["fio"] = h.spawn(["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}",
                                         "--rw=randrw", "--bs=4k", "--iodepth=1", f"--size={size}",
                                         "--rate_iops=200,200", "--time_based", "--runtime=3600",
                                         f"--write_lat_log={prefix}", "--log_avg_msec=0",
                                         "--log_unix_epoch=1",
                                         "--output-format=json", f"--output={prefix}.json"],
                                        log=f"lat-{side}-{i}.fio.log")
                    time.sleep(idle)
                elif phase == "start":
                    st["t0"] = time.time()
                else:
                    st["t1"] = time.time()
                    time.sleep(1.0)
                    # fio stops on SIGINT and still writes its logs.
                    h.stop(st["fio"], sig=signal.SIGINT, timeout=30)
            dt, r = stream_once(h, side, top, f"lat-{side}", 1800, export=True, probe=probe)
            rss[side] = max(rss[side], r or 0)
            log = read_lat_log(f"{prefix}_lat.1.log")
            if not log:
                raise BenchError(f"fio logged no I/O against {side}\n{h.log_tail(st['fio'])}")
            # fio logs completion times in Unix ms (log_unix_epoch).
            a0, a1 = st["t0"] * 1000, st["t1"] * 1000
            during = [(t, ns, d) for t, ns, d in log if a0 <= t <= a1]
            before = [(t, ns, d) for t, ns, d in log if t < a0]
            lat[side].append({
                "stream_s": dt,
                "read_p50_us": pct([ns for _, ns, d in during if d == 0], 50) / 1000,
                "read_p99_us": pct([ns for _, ns, d in during if d == 0], 99) / 1000,
                "write_p50_us": pct([ns for _, ns, d in during if d == 1], 50) / 1000,
                "write_p99_us": pct([ns for _, ns, d in during if d == 1], 99) / 1000,
                "idle_read_p50_us": pct([ns for _, ns, d in before if d == 0], 50) / 1000,
                "idle_write_p50_us": pct([ns for _, ns, d in before if d == 1], 50) / 1000,
                "ios_during": len(during),
            })
            if i == 0:
                # Keep the first round's series for the plot: (s relative to the job start, us, dir).
                h.latency_series[side] = {"stream_s": dt, "points": [((t - a0) / 1000, ns / 1000, d)
                                                                     for t, ns, d in log]}
                h.sh("qemu-img", "check", "-q", h.p(top))
            return dt
        return f
    a, b = h.alternate(run("diskstream"), run("qemu-storage-daemon"))

    def med(side, key):
        return statistics.median(x[key] for x in lat[side])
    keys = ["read_p50_us", "read_p99_us", "write_p50_us", "write_p99_us", "idle_read_p50_us",
            "idle_write_p50_us"]
    extra = {"latency": {side: {k: med(side, k) for k in keys} for side in lat},
             "latency_rounds": lat}
    h.add_result("latency", f"stream a {gib_label(size)} chain with guest I/O on its NBD export "
                 "(time to completion)", "s", a, b, "qemu-storage-daemon",
                 rss["diskstream"], rss["qemu-storage-daemon"], extra=extra)
    for k in ("read_p50_us", "read_p99_us", "write_p50_us", "write_p99_us"):
        h.add_result("latency", f"guest 4k random {k.split('_')[0]} {k.split('_')[1]} during the stream",
                     "us", [x[k] for x in lat["diskstream"]], [x[k] for x in lat["qemu-storage-daemon"]],
                     "qemu-storage-daemon")


def sc_cor(h):
    sys.path.insert(0, BENCH)
    if importlib.util.find_spec("cor") is None:
        print("  bench/cor.py not present: skipped")
        return
    importlib.import_module("cor").run(h)


def job_runner(name):
    """A scenario of bench/jobs.py (which imports this module as `run`: alias it, so both share
    one BenchError and the harness's retry catches the jobs' failures)."""
    def f(h):
        sys.modules.setdefault("run", sys.modules[__name__])
        sys.path.insert(0, BENCH)
        getattr(importlib.import_module("jobs"), name)(h)
    return f


RUNNERS = {"convert": sc_convert, "map": sc_map, "nbd": sc_nbd, "stream": sc_stream,
           "stream-nbd": sc_stream_nbd, "latency": sc_latency, "cor": sc_cor,
           "mirror": job_runner("sc_mirror"), "mirror-latency": job_runner("sc_mirror_latency"),
           "commit": job_runner("sc_commit"), "http": job_runner("sc_http"),
           "http-stream": job_runner("sc_http_stream")}


# ---- report --------------------------------------------------------------------------------
def machine(h):
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    fs = subprocess.run(["df", "-T", h.work], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {
        "cpu": f"{os.cpu_count()} CPUs ({cpu})", "ram": f"{mem:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}", "fs": fs,
        "qemu": tool_version(["qemu-img", "--version"]), "fio": tool_version(["fio", "--version"]),
        "nbdkit": tool_version(["nbdkit", "--version"]), "nbdcopy": tool_version(["nbdcopy", "--version"]),
        "diskstream": commit,
    }


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f}"
    if unit == "IOPS":
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def mib(kib):
    return "-" if not kib else f"{kib / 1024:.0f}"


def cpu_pair(r):
    """Median CPU seconds per round of each side's measured process, where recorded."""
    a, b = r.get("cpu_s_ours"), r.get("cpu_s_theirs")
    return "-" if a is None or b is None else f"{a:.2f} / {b:.2f}"


def plots(results, series, outdir):
    """Ratio bars per scenario and guest latency over time during the stream."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    rs = [r for r in results if r["unit"] != "us"]
    if rs:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rs) + 1.2))
        names = [r["name"] if len(r["name"]) < 60 else r["name"][:57] + "..." for r in rs]
        vals = [r["ratio"] for r in rs]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
        ax.barh(range(len(rs)), vals, color=colors)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(rs)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ratio (> 1: diskstream better; log scale)")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
        ax.set_title("diskstream vs QEMU peer, median of the rounds")
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "ratios.png"), dpi=110)
        plt.close(fig)
        made.append("ratios.png")
    if series:
        fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for ax, d, dname in ((axes[0], 0, "read"), (axes[1], 1, "write")):
            for side, color in (("diskstream", "tab:blue"), ("qemu-storage-daemon", "tab:orange")):
                s = series.get(side)
                if not s:
                    continue
                pts = [(t, us) for t, us, dd in s["points"] if dd == d]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, color=color, alpha=0.5,
                           label=f"{side} (stream {s['stream_s']:.1f} s)")
                ax.axvline(s["stream_s"], color=color, linestyle="--", linewidth=1)
            ax.axvline(0, color="black", linewidth=1)
            ax.set_yscale("log")
            ax.set_ylabel(f"4k {dname} latency (us)")
            ax.legend(fontsize=8, markerscale=4)
        axes[1].set_xlabel("seconds since block-stream (dashed: job completed)")
        axes[0].set_title("guest I/O through the NBD export during a stream (first round)")
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "latency.png"), dpi=110)
        plt.close(fig)
        made.append("latency.png")
    return made


def load_range(r):
    """The load average range of a result ('-' when none was sampled)."""
    if r.get("load_min") is None or r.get("load_max") is None:
        return "-"
    return f"{r['load_min']:.1f}-{r['load_max']:.1f}"


def report(h, data, out_md, plot_dir, rel_plot_dir):
    results = data["results"]
    m = data["machine"]
    made = plots(results, h.latency_series, plot_dir)
    if os.path.exists(os.path.join(plot_dir, "latency.png")) and "latency.png" not in made:
        made.append("latency.png")  # from an earlier run that measured the latency scenario
    loaded = [r for r in results if (r.get("load_max") or 0) > 1.5]
    L = ["# Benchmarks", "",
         "Every figure is measured side by side with the QEMU peer in the same run, on the same images,",
         "alternating A B A B (diskstream first in each round). **Ratio > 1.0 means diskstream is better**:",
         "peer median time / diskstream median time, or diskstream median throughput / peer median",
         "throughput (for latencies: peer / diskstream). Peak RSS is the largest resident set of the",
         "measured process over the rounds (wait4 rusage for commands, VmHWM for servers and daemons).",
         "Load is the 1-minute load average sampled before and after each run of the scenario.", "",
         "Regenerate with `python3 bench/run.py` (all scenarios, about 25 minutes on this machine),",
         "`python3 bench/run.py --only stream,latency` (some; merged into this report), or",
         "`python3 bench/run.py --quick` (tiny images, CI smoke test of the harness: timings mean nothing).",
         "A full run needs about 40 GiB free in its temp dir (`--tmpdir`; the 64 GiB map image alone",
         "allocates 16 GiB) and deletes it at the end. Raw numbers: [bench/results.json](bench/results.json).", "",
         "## Machine", ""]
    for k in ("cpu", "ram", "os", "fs", "qemu", "fio", "nbdkit", "nbdcopy", "diskstream"):
        L.append(f"- {k}: {m.get(k)}")
    L.append("")
    if loaded:
        L += [f"**The machine was loaded during {len(loaded)} of {len(results)} measurements** (1-minute load",
              "average above 1.5 on this 2-CPU machine, see the load column). Those timings are noisy;",
              "the A B alternation spreads the noise over both sides but does not remove it. Take the",
              "ratios as indicative and rerun on an idle machine before quoting them.", ""]
    L += ["## Results", ""]
    if "ratios.png" in made:
        L += [f"![ratios]({rel_plot_dir}/ratios.png)", ""]
    L += ["| scenario | unit | diskstream median | min | max | peer | peer median | min | max | ratio | "
          "RSS MiB ds / peer | CPU s ds / peer | load | measured |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, t, u = r["ours"], r["theirs"], r["unit"]
        L.append(f"| {r['name']} | {u}{' (more is better)' if r['higher_better'] else ''} | "
                 f"{fmt(statistics.median(o), u)} | {fmt(min(o), u)} | {fmt(max(o), u)} | {r['peer']} | "
                 f"{fmt(statistics.median(t), u)} | {fmt(min(t), u)} | {fmt(max(t), u)} | **{r['ratio']:.2f}x** | "
                 f"{mib(r.get('rss_ours_kib'))} / {mib(r.get('rss_theirs_kib'))} | "
                 f"{cpu_pair(r)} | {load_range(r)} | {r.get('when', '-')[5:16]} |")
    L.append("")
    lat = next((r for r in results if r.get("latency")), None)
    if lat:
        L += ["## Guest latency during a stream", "",
              "fio (nbd engine, QD1, 4 KiB random reads and writes at 200 + 200 per second, every I/O",
              "logged) runs against the NBD export of the top image from before the job starts until it",
              "ends; percentiles are over the I/Os completed between `block-stream` and",
              "`BLOCK_JOB_COMPLETED`, median over the rounds. Idle = the seconds before the job.", "",
              "| side | read p50 (us) | read p99 | write p50 | write p99 | idle read p50 | idle write p50 |",
              "|---|---|---|---|---|---|---|"]
        for side, v in lat["latency"].items():
            L.append(f"| {side} | {v['read_p50_us']:.0f} | {v['read_p99_us']:.0f} | {v['write_p50_us']:.0f} | "
                     f"{v['write_p99_us']:.0f} | {v['idle_read_p50_us']:.0f} | {v['idle_write_p50_us']:.0f} |")
        L.append("")
        if "latency.png" in made:
            L += [f"![latency]({rel_plot_dir}/latency.png)", ""]
    L += ["## Scenarios", "",
          "- **convert / map**: `diskstream img` vs `qemu-img` on the same files; outputs are checked",
          "  (`qemu-img check`, `compare`; map output byte-identical).",
          "- **nbd**: `diskstream serve` vs `qemu-nbd`, both `-f qcow2 -e 8 -t` on loopback TCP, a fresh",
          "  server pair per case; fio's nbd engine (one connection, 10 s + 1 s ramp) and nbdcopy",
          "  (its default 4 connections). The write copy goes into a fresh empty qcow2 each round.",
          "- **stream**: a fresh daemon per round opens the top (`--blockdev driver=qcow2,...`, the chain",
          "  from the header) and runs `block-stream` over QMP (python qemu.qmp) on the whole chain;",
          "  time from the command to `BLOCK_JOB_COMPLETED`. The base holds half the disk (64 KiB",
          "  every 128 KiB), the top 64 KiB every 1 MiB. The first round's result of each side is",
          "  checked (standalone, `qemu-img check`, `compare` with the original chain).",
          "- **stream-nbd**: the same layout, but the base is a raw file served by nbdkit's file plugin",
          "  with `--filter=delay` (reads, block status and cache requests delayed), the top's header",
          "  names `nbd://127.0.0.1:PORT` (`-F raw`), and both daemons get the backing as an explicit",
          "  node (`--blockdev` raw over `driver=nbd`, referenced by the top's `backing`), because",
          "  `diskstream daemon` does not open an `nbd://` backing name from a header yet (see the analysis).",
          "- **latency**: as stream, with the top exported over NBD (`--nbd-server`/`--export",
          "  writable=on`) and the fio probe above.",
          "- **cor**: copy-on-read first read and re-read (bench/cor.py, when present).",
          "- **mirror**: a fresh daemon per round with the source (a fully allocated qcow2 of",
          "  random-ish data) and the target as `--blockdev` nodes; `blockdev-mirror sync=full`, time",
          "  to `BLOCK_JOB_READY` and, after `block-job-complete`, to `BLOCK_JOB_COMPLETED`. Targets: a",
          "  fresh local qcow2, and an `nbd` node on nbdkit's file plugin with `--filter=delay` (read,",
          "  write, zero, trim and block status each delayed; smaller image, see the row). Every round's",
          "  target is compared with the source (`qemu-img compare`; qcow2 targets also `check`).",
          "- **mirror-latency**: the local mirror while fio (nbd engine, QD1, 4 KiB random writes at a",
          "  fixed rate) writes through the NBD export of the source, `copy-mode` background and",
          "  write-blocking; percentiles over the writes between `blockdev-mirror` and READY (median",
          "  over the rounds). fio stops at READY, the job completes, target compared with the source.",
          "- **commit**: active `block-commit` of a fully written overlay (its chain from the header)",
          "  into its half allocated base, READY then `block-job-complete`; the base is then checked and",
          "  compared with the overlay.",
          "- **http**: an empty qcow2 overlay over a raw file served by the Range-capable test server",
          "  (`crates/diskstream-http/tests/servers.py`). diskstream reads the `http://` backing itself;",
          "  QEMU here has no curl block driver, so qemu-img reads the same URL through `nbdkit curl` as",
          "  an `nbd://` backing. `img rebase -b ''` (the offline stream) and `img convert -O qcow2`,",
          "  results compared with the raw file; `curl -o` of the raw file is the line rate (the",
          "  server adds no delay here; the daemon's own HTTP streaming is **http-stream**).",
          "- **http-stream**: `block-stream` in the daemon of an empty qcow2 overlay whose header names",
          "  a 1 GiB qcow2 (random data) on `http://`, served by the same test server using sendfile",
          "  with +5 ms (--delay-ms) before every response; qemu-storage-daemon streams the same",
          "  overlay over an `nbd://` backing from `nbdkit curl` on that URL; `curl -o` of the object",
          "  through the same delay is the download it is held to (target: within 1.2x). Each round's",
          "  overlay must then have no backing file, pass `qemu-img check` and equal the base.",
          ""]
    # Hand-written reading of the numbers (diagnoses of slow cases), kept next to the harness.
    analysis = os.path.join(BENCH, "analysis.md")
    if os.path.exists(analysis) and not h.quick:
        with open(analysis) as f:
            L += ["## Analysis", "", f.read().strip(), ""]
    if data.get("retries"):
        L += ["## Rounds retried in the last run", ""] + [f"- {n}" for n in data["retries"]] + [""]
    fails = data.get("failures") or []
    if fails:
        L += ["## Scenarios that failed in the last run", ""] + [f"- {f}" for f in fails] + [""]
    # Sections written by other scripts (bench/cor.py, bench/migrate.py) are kept as they are.
    ours = {l for l in L if l.startswith("## ")}
    if os.path.exists(out_md):
        keep, cur = [], None
        for line in open(out_md).read().splitlines():
            if line.startswith("## "):
                cur = [] if line not in ours else None
                if cur is not None:
                    keep.append(cur)
            if cur is not None:
                cur.append(line)
        for sec in keep:
            # Trailing blank lines are the separator: strip them so a rerun adds none.
            while sec and not sec[-1].strip():
                sec.pop()
            L += [""] + sec + [""]
    with open(out_md, "w") as f:
        f.write("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", help="scenario(s), comma separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--workdir", help="keep images here (reused by later runs)")
    ap.add_argument("--tmpdir", help="parent of the temporary work dir (default: $TMPDIR)")
    ap.add_argument("--diskstream", help="diskstream binary (default: cargo build --release)")
    ap.add_argument("--stream-size", type=int, default=4, help="GiB, local stream chain")
    # Both sides cross the link serially per 64 KiB extent today (see the analysis): 4 GiB
    # would take about an hour per round for QSD, so the default is smaller.
    ap.add_argument("--stream-nbd-size", type=int, default=256, help="MiB, chain behind the NBD link")
    ap.add_argument("--delay-ms", type=int, default=5)
    ap.add_argument("--mirror-size", type=int, default=4, help="GiB, local mirror source")
    ap.add_argument("--mirror-nbd-size", type=int, default=256, help="MiB, mirror into the delayed NBD target")
    ap.add_argument("--mirror-lat-size", type=int, default=1024, help="MiB, mirror with guest writes")
    ap.add_argument("--mirror-lat-iops", type=int, default=200, help="guest writes per second during the mirror")
    ap.add_argument("--commit-size", type=int, default=1024, help="MiB, active commit overlay")
    ap.add_argument("--http-size", type=int, default=512, help="MiB, raw image served over HTTP")
    ap.add_argument("--http-stream-size", type=int, default=1024,
                    help="MiB, qcow2 base streamed over HTTP (+--delay-ms per response)")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="extra argument for diskstream daemon (experiments, e.g. --daemon-arg=--stream-parallel=2)")
    ap.add_argument("--out", help="report (default docs/BENCHMARKS.md; quick: in the work dir)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report and plots from docs/bench/results.json without measuring")
    args = ap.parse_args()
    only = SCENARIOS
    if args.only:
        only = [s.strip() for o in args.only for s in o.split(",") if s.strip()]
        bad = [s for s in only if s not in SCENARIOS]
        if bad:
            ap.error(f"unknown scenario {bad}; known: {SCENARIOS}")
    if args.quick:
        args.rounds = min(args.rounds, 2)
    if args.report_only:
        only = []
        args.diskstream = args.diskstream or "diskstream"
    if not args.diskstream:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "diskstream"], cwd=ROOT, check=True)
        tdir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
        args.diskstream = os.path.join(tdir if os.path.isabs(tdir) else os.path.join(ROOT, tdir),
                                       "release", "diskstream")
    h = Harness(args)
    # Killed by a signal: the atexit cleanup stops every server and daemon.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        out_md = args.out or h.p("BENCHMARKS.md")
        plot_dir = os.path.join(os.path.dirname(out_md), "bench")
        json_path = os.path.join(plot_dir, "results.json")
    else:
        out_md = args.out or os.path.join(ROOT, "docs", "BENCHMARKS.md")
        plot_dir = os.path.join(os.path.dirname(out_md), "bench")
        json_path = os.path.join(plot_dir, "results.json")
    os.makedirs(plot_dir, exist_ok=True)
    print(f"work dir {h.work}; diskstream {args.diskstream}; rounds {args.rounds}", flush=True)

    for name in only:
        print(f"== {name}", flush=True)
        h.loads = []
        t = time.monotonic()
        try:
            RUNNERS[name](h)
        except Exception as e:  # noqa: BLE001 - report the scenario as failed, go on with the next
            msg = f"{name}: {e}"
            print(f"FAILED {msg}", file=sys.stderr, flush=True)
            h.failures.append(msg.splitlines()[0])
            for proc in list(h.procs):
                h.stop(proc, timeout=5)
        print(f"   ({time.monotonic() - t:.0f} s)", flush=True)

    data = {"results": []}
    if os.path.exists(json_path) and not args.quick:
        with open(json_path) as f:
            data = json.load(f)
    ran = {r["scenario"] for r in h.results}
    data["results"] = [r for r in data.get("results", []) if r["scenario"] not in ran] + h.results
    order = {s: i for i, s in enumerate(SCENARIOS)}
    data["results"].sort(key=lambda r: order.get(r["scenario"], 99))
    if not args.report_only or "machine" not in data:
        data["machine"] = machine(h)
        data["failures"] = h.failures
        data["retries"] = h.notes
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1)
    report(h, data, out_md, plot_dir, os.path.relpath(plot_dir, os.path.dirname(out_md)))
    print(f"report: {out_md}")
    if h.failures:
        print("failed: " + "; ".join(h.failures), file=sys.stderr)
        return 1
    if args.quick and not h.results:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
