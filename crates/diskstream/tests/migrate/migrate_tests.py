#!/usr/bin/python3
"""End-to-end post-copy migration scenarios for `diskstream migrate`, with real peers.

Run by crates/diskstream/tests/migrate.rs as `migrate_tests.py BINARY SCENARIO`. Every scenario
starts two `diskstream daemon` processes (source and destination; loopback TCP, or the source in
its own network namespace when `ip netns` works and DISKSTREAM_TEST_NETNS=1), a guest writer
(libnbd) where the scenario has one, nbdkit with the log/error/delay filters in front of the source
where it injects faults, and checks the result with qemu-img (check, compare, info).
"""

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nbd

BIN = sys.argv[1]
MiB = 1 << 20
# Every process started, killed at the end whatever happens.
PROCS = []


def log(msg):
    print(f"[migrate-test] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(pred, what, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Qmp:
    """A tiny QMP client (the harness's own view of a daemon)."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                self.events.append(r)
                continue
            return r

    def ok(self, name, **args):
        r = self.cmd(name, **args)
        assert "return" in r, f"{name}: {r}"
        return r["return"]

    def wait_event(self, name, device, timeout=60):
        """Wait for event `name` of job `device` (query-block-jobs pumps the socket)."""
        def seen():
            for e in self.events:
                if e["event"] == name and e["data"].get("device") == device:
                    return e
            self.cmd("query-block-jobs")
            return None
        return wait_for(seen, f"{name} of {device}", timeout)

    def close(self):
        self.s.close()


class Daemon:
    def __init__(self, d, name, nbd_port, args=(), netns=None, host="127.0.0.1", qsd=False):
        # qsd: run qemu-storage-daemon instead (same command-line syntax for these options).
        self.program = ["qemu-storage-daemon"] if qsd else [BIN, "daemon"]
        self.qmp_path = os.path.join(d, f"{name}.qmp")
        self.name = name
        self.nbd_port = nbd_port
        self.args = list(args)
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.host = host
        self.log = open(os.path.join(d, f"{name}.log"), "ab")
        self.proc = None
        self.start()

    def start(self):
        if os.path.exists(self.qmp_path):
            os.unlink(self.qmp_path)
        cmd = self.prefix + self.program + [
               "--nbd-server", f"addr.type=inet,addr.host={self.host},addr.port={self.nbd_port}",
               "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
               "--monitor", "chardev=m"] + self.args
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        PROCS.append(self.proc)
        wait_for(lambda: os.path.exists(self.qmp_path), f"{self.name} QMP socket")

    def qmp(self, name, **args):
        q = Qmp(self.qmp_path)
        try:
            return q.cmd(name, **args)
        finally:
            q.close()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def make_disk(path, size, data_bytes, seed):
    """A sparse raw disk with `data_bytes` of random data in random extents."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        written = 0
        while written < data_bytes:
            n = rng.choice([64 << 10, 256 << 10, 1 * MiB, 4 * MiB])
            off = rng.randrange(0, size - n) & ~0xFFFF
            f.seek(off)
            f.write(rng.randbytes(n))
            written += n


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def check_destination(dst_image, model):
    r = run(["qemu-img", "check", dst_image])
    assert r.returncode == 0, f"qemu-img check: {r.stdout}{r.stderr}"
    info = json.loads(run(["qemu-img", "info", "--output=json", dst_image]).stdout)
    assert "backing-filename" not in info, f"backing link left: {info}"
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", model, dst_image])
    assert r.returncode == 0, f"qemu-img compare: {r.stdout}{r.stderr}"
    log(f"destination checked: {r.stdout.strip()}, no backing file, check clean")


class Netns:
    """The source's own network namespace, joined to ours by a veth pair (10.231.N.1 here,
    10.231.N.2 there). Only when `ip netns` works (root, a kernel that allows it) and
    DISKSTREAM_TEST_NETNS is not 0; the scenarios fall back to loopback otherwise."""

    def __init__(self):
        n = os.getpid() % 250 + 1
        self.name = f"dsmig{os.getpid()}"
        self.here, self.peer = f"dsm{os.getpid()}a", f"dsm{os.getpid()}b"
        self.local, self.remote = f"10.231.{n}.1", f"10.231.{n}.2"
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.here, "type", "veth", "peer", "name", self.peer],
            ["ip", "link", "set", self.peer, "netns", self.name],
            ["ip", "addr", "add", f"{self.local}/24", "dev", self.here],
            ["ip", "link", "set", self.here, "up"],
            ["ip", "netns", "exec", self.name, "ip", "addr", "add", f"{self.remote}/24",
             "dev", self.peer],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", self.peer, "up"],
            ["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
        ]
        for c in steps:
            r = run(c)
            if r.returncode != 0:
                self.close()
                raise OSError(f"{' '.join(c)}: {r.stderr.strip()}")

    def link(self, up):
        subprocess.run(["ip", "link", "set", self.here, "up" if up else "down"], check=True)

    def blackhole(self, on):
        """Silently drop everything the source sends us (a blackhole route for our address
        inside its namespace): no reset, no ICMP, the link stays up -- from our side the source
        just goes quiet, like a lost link in the middle of the network."""
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "route", "add" if on else "del",
                        "blackhole", f"{self.local}/32"], check=True)

    def close(self):
        run(["ip", "link", "del", self.here])
        run(["ip", "netns", "del", self.name])

    @staticmethod
    def open():
        if os.environ.get("DISKSTREAM_TEST_NETNS", "1") == "0":
            return None
        try:
            return Netns()
        except OSError as e:
            log(f"ip netns unavailable ({e}); using loopback")
            return None


class Migrate:
    """`diskstream migrate` in the background, with its progress lines collected."""

    def __init__(self, d, args):
        self.lines = []
        self.times = []
        self.out = []
        self.proc = subprocess.Popen([BIN, "migrate"] + args, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        PROCS.append(self.proc)
        self.t_err = threading.Thread(target=self._pump,
                                      args=(self.proc.stderr, self.lines, self.times))
        self.t_out = threading.Thread(target=self._pump, args=(self.proc.stdout, self.out, []))
        self.t_err.start()
        self.t_out.start()

    @staticmethod
    def _pump(stream, into, times):
        for line in stream:
            times.append(time.monotonic())
            into.append(line.rstrip("\n"))
            print(f"  | {line.rstrip()}", file=sys.stderr, flush=True)

    def percent(self):
        for line in reversed(self.lines):
            if line.startswith("migrate:") and "% " in line:
                try:
                    return float(line.split()[1].rstrip("%"))
                except ValueError:
                    pass
        return 0.0

    def wait(self, timeout=120):
        rc = self.proc.wait(timeout=timeout)
        self.t_err.join()
        self.t_out.join()
        return rc


class Writer(threading.Thread):
    """The guest: random writes and checked reads over NBD, on a model file. Switches from the
    source to the destination when the switch command asks (flush, disconnect, reconnect)."""

    def __init__(self, d, model, size, url, seed):
        super().__init__()
        self.d, self.model, self.size, self.url = d, model, size, url
        self.rng = random.Random(seed)
        self.stop_flag = threading.Event()
        self.ops = {"write": 0, "read": 0, "zero": 0}
        self.ops_after_switch = 0
        self.error = None
        self.source_sha_at_switch = None
        self.switched = threading.Event()
        self.mfd = os.open(model, os.O_RDWR)

    def connect(self, url):
        h = nbd.NBD()
        h.connect_uri(url)
        return h

    def one_op(self, h):
        kind = self.rng.choice(["write", "write", "read", "read", "zero"])
        n = self.rng.choice([512, 4096, 65536, 200 * 1024, 1 * MiB])
        off = self.rng.randrange(0, self.size - n) & ~511
        if kind == "write":
            buf = self.rng.randbytes(n)
            h.pwrite(buf, off)
            os.pwrite(self.mfd, buf, off)
        elif kind == "zero":
            h.zero(n, off)
            os.pwrite(self.mfd, bytes(n), off)
        else:
            got = h.pread(n, off)
            want = os.pread(self.mfd, n, off)
            if got != want:
                raise AssertionError(f"guest read at {off}+{n} returned wrong data")
        self.ops[kind] += 1
        if self.switched.is_set():
            self.ops_after_switch += 1

    def run(self):
        try:
            h = self.connect(self.url)
            switch_req = os.path.join(self.d, "switch")
            while not self.stop_flag.is_set():
                if not self.switched.is_set() and os.path.exists(switch_req):
                    with open(switch_req) as f:
                        dest_url = f.read().strip()
                    h.flush()
                    h.shutdown()
                    del h
                    # Nothing may write to the source from here on.
                    self.source_sha_at_switch = sha256(os.path.join(self.d, "src.raw"))
                    h = self.connect(dest_url)
                    self.switched.set()
                    open(os.path.join(self.d, "switched"), "w").close()
                    log(f"guest switched to {dest_url} after {sum(self.ops.values())} ops")
                self.one_op(h)
            h.flush()
            h.shutdown()
        except Exception as e:  # noqa: BLE001 -- reported by the scenario
            log(f"guest writer failed: {e!r}")
            self.error = e
            open(os.path.join(self.d, "writer-failed"), "w").close()


SWITCH_CMD = ('echo "$DISKSTREAM_MIGRATE_DEST_URL" > {d}/switch.tmp && mv {d}/switch.tmp {d}/switch'
               ' && while [ ! -e {d}/switched ]; do [ -e {d}/writer-failed ] && exit 1; sleep 0.02; done')


def scenario_postcopy(d):
    """The whole migration under a random guest writer: source -> destination. With `ip netns`
    the source lives in its own network namespace and the link goes down for a moment during
    the stream (the NBD client rides it out)."""
    ns = Netns.open()
    try:
        postcopy(d, ns)
    finally:
        if ns:
            ns.close()


def postcopy(d, ns):
    size = int(os.environ.get("DISKSTREAM_MIGRATE_SIZE", str(1024 * MiB)))
    data = size // 4
    src_img, model = os.path.join(d, "src.raw"), os.path.join(d, "model.raw")
    make_disk(src_img, size, data, seed=7)
    subprocess.run(["cp", "--sparse=always", src_img, model], check=True)
    sp, dp = free_port(), free_port()
    shost = ns.remote if ns else "127.0.0.1"
    src = Daemon(d, "src", sp, [
        "--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}",
        "--export", "type=nbd,id=guest,node-name=disk,writable=on,name=guest"],
        netns=ns.name if ns else None, host=shost)
    dst = Daemon(d, "dst", dp)
    log(f"source at {shost}" + (f" in network namespace {ns.name}" if ns else " (loopback)"))
    w = Writer(d, model, size, f"nbd://{shost}:{sp}/guest", seed=11)
    w.start()
    try:
        wait_for(lambda: sum(w.ops.values()) >= 200 or w.error, "writer on the source")
        dst_image = os.path.join(d, "dst.qcow2")
        t0 = time.monotonic()
        m = Migrate(d, ["--source-qmp", src.qmp_path, "--source-node", "disk",
                        "--dest-qmp", dst.qmp_path, "--dest-image", dst_image,
                        "--source-nbd", f"{shost}:{sp}", "--dest-nbd", f"127.0.0.1:{dp}",
                        "--dest-export", "guest", "--source-guest-export", "guest",
                        "--switch-command", SWITCH_CMD.format(d=d),
                        "--progress-interval", "250", "--speed", str(128 * MiB)])
        if ns:
            wait_for(lambda: m.percent() >= 30 or m.proc.poll() is not None, "30% streamed")
            ns.link(False)
            pct = m.percent()
            log(f"link down at {pct:.1f}%")
            # The drop must hit a running stream, or it tests nothing.
            assert m.proc.poll() is None and pct < 100, "migration over before the link drop"
            assert not any("stream completed" in l for l in m.lines), m.lines
            time.sleep(1.0)
            ns.link(True)
            log("link up")
        rc = m.wait()
        elapsed = time.monotonic() - t0
        assert rc == 0, f"migrate exited {rc}"
        assert f"destination: nbd://127.0.0.1:{dp}/guest" in m.out, m.out
        assert any("ETA" in l for l in m.lines), "no progress line with an ETA"
        # Keep the guest running a little on the finished destination.
        n = sum(w.ops.values())
        wait_for(lambda: sum(w.ops.values()) >= n + 100 or w.error, "writer after completion")
    finally:
        w.stop_flag.set()
        w.join()
    if w.error:
        raise w.error
    assert w.switched.is_set(), "the guest never switched"
    log(f"migrated {size // MiB} MiB in {elapsed:.1f}s; guest ops {w.ops}, "
        f"{w.ops_after_switch} on the destination")
    assert w.ops_after_switch >= 100
    # Source untouched since the switch; its migration export is gone.
    assert sha256(src_img) == w.source_sha_at_switch, "the source changed after the switch"
    exports = src.qmp("query-block-exports")["return"]
    assert exports == [], exports
    src.stop()
    dst.stop()
    check_destination(dst_image, model)


def nbdkit_proxy(d, name, upstream_port, export, filters, params):
    """nbdkit's nbd plugin in front of the source export, with filters; returns (proc, port)."""
    port = free_port()
    cmd = ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), "-i", "127.0.0.1"]
    for f in filters:
        cmd += ["--filter=" + f]
    cmd += ["nbd", "hostname=127.0.0.1", f"port={upstream_port}", f"export={export}"] + params
    proc = subprocess.Popen(cmd, stderr=open(os.path.join(d, f"{name}.nbdkit.err"), "ab"))
    PROCS.append(proc)
    wait_for(lambda: _port_open(port), "nbdkit listening")
    return proc, port


def _port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def bytes_read(logfile):
    """Bytes the destination read from the source, from nbdkit's log filter."""
    total = 0
    if not os.path.exists(logfile):
        return 0
    with open(logfile) as f:
        for line in f:
            if " Read " in line and "..." in line:
                # "... Read id=N offset=0x.. count=0x.. ..."
                for tok in line.split():
                    if tok.startswith("count="):
                        total += int(tok[6:], 0)
    return total


def source_setup(d, size, data, sp, seed):
    src_img = os.path.join(d, "src.raw")
    make_disk(src_img, size, data, seed=seed)
    args = ["--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}",
            "--export", "type=nbd,id=migrate-src-migrate-disk,node-name=disk,name=migrate-disk"]
    return src_img, Daemon(d, "src", sp, args)


def migrate_args(src, dst, dst_image, source_nbd_port, dp, extra=()):
    return ["--source-qmp", src.qmp_path, "--source-node", "disk", "--dest-qmp", dst.qmp_path,
            "--dest-image", dst_image, "--source-nbd", f"127.0.0.1:{source_nbd_port}",
            "--dest-nbd", f"127.0.0.1:{dp}", "--progress-interval", "100"] + list(extra)


def top_map(dst_image):
    """The destination image's own allocation (its backing link ignored: the source may be
    down)."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": dst_image}})
    r = run(["qemu-img", "map", "--output=json", "-U", "json:" + spec])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def guest_read_missing(url, src_img):
    """Read (on the destination) 4 KiB of the source's last data extent: the stream copies in
    ascending order and was stopped early, so the destination does not hold it yet. Returns
    (("data", equal) or ("errno", n)), seconds taken."""
    src_map = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", src_img]).stdout)
    last = [e for e in src_map if e["data"]][-1]
    off = last["start"] + last["length"] - 4096
    h = nbd.NBD()
    h.connect_uri(url)
    t0 = time.monotonic()
    try:
        got = h.pread(4096, off)
        res = ("data", got == _pread(src_img, off, 4096))
    except nbd.Error as e:
        res = ("errno", e.errnum)
    h.shutdown()
    return res, time.monotonic() - t0


class Reader(threading.Thread):
    """guest_read_missing in the background (it may wait for a reconnect)."""

    def __init__(self, url, src_img):
        super().__init__(daemon=True)
        self.url, self.src_img, self.result, self.t_end = url, src_img, None, None
        self.start()

    def run(self):
        self.result = guest_read_missing(self.url, self.src_img)
        self.t_end = time.monotonic()

    def finish(self, timeout, what):
        """Wait at most `timeout` seconds: a read still blocked then is a hang (the failure
        this suite exists to catch), reported instead of waited for."""
        self.join(timeout=timeout)
        assert not self.is_alive(), f"guest read {what} still blocked after {timeout}s (hang)"
        return self.result


def _pread(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def scenario_source_restart(d):
    """Source killed mid-stream and restarted within reconnect-delay: the stream goes on."""
    size, data = 128 * MiB, 64 * MiB
    sp, dp = free_port(), free_port()
    src_img, src = source_setup(d, size, data, sp, seed=3)
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    m = Migrate(d, migrate_args(src, dst, dst_image, sp, dp,
                                ["--reconnect-delay", "30", "--speed", str(16 * MiB),
                                 "--dest-export", "guest"]))
    wait_for(lambda: m.percent() >= 20 or m.proc.poll() is not None, "20% streamed")
    src.kill()
    log("source killed")
    # A guest read of data the destination lacks waits for the reconnect, then is right.
    reader = Reader(f"nbd://127.0.0.1:{dp}/guest", src_img)
    time.sleep(1.0)
    src.start()
    log("source restarted")
    (kind, val), took = reader.finish(30 + 10, "across the source restart")
    log(f"guest read of missing data across the restart: {kind} {val} after {took:.1f}s")
    assert (kind, val) == ("data", True), (kind, val)
    rc = m.wait()
    assert rc == 0, f"migrate exited {rc}"
    dst.stop()
    src.stop()
    check_destination(dst_image, src_img)


def scenario_source_dead_stop_resume(d):
    """Source gone beyond reconnect-delay: on-error=stop pauses the job after bounded retries
    (exit 3), guest reads of missing data fail with EIO (no hang, no wrong data), data already
    copied stays readable; after the source is back, --resume finishes the migration."""
    size, data = 128 * MiB, 64 * MiB
    sp, dp = free_port(), free_port()
    src_img, src = source_setup(d, size, data, sp, seed=4)
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    args = migrate_args(src, dst, dst_image, sp, dp,
                        ["--reconnect-delay", "1", "--retries", "1", "--retry-delay", "0.2",
                         "--speed", str(16 * MiB), "--dest-export", "guest"])
    m = Migrate(d, args)
    wait_for(lambda: m.percent() >= 20 or m.proc.poll() is not None, "20% streamed")
    assert m.proc.poll() is None, "migration over before the source was killed"
    src.kill()
    t_kill = time.monotonic()
    log("source killed for good")
    # A guest read of missing data fails with EIO once reconnect-delay is over (no hang).
    delay = 1.0
    reader = Reader(f"nbd://127.0.0.1:{dp}/guest", src_img)
    (kind, val), took = reader.finish(delay + 10, "with the source dead")
    since_kill = reader.t_end - t_kill
    log(f"guest read of missing data, source down: {kind} {val} after {took:.1f}s "
        f"({since_kill:.1f}s after the kill)")
    assert (kind, val) == ("errno", 5), (kind, val)
    # Not before the reconnect window is over (counted from the loss, which the kill causes at
    # once), and not much after it.
    assert 0.8 * delay <= since_kill <= delay + 5, since_kill
    rc = m.wait()
    assert rc == 3, f"migrate exited {rc}, expected 3 (stopped)"
    assert any("I/O error" in l for l in m.lines), "no BLOCK_JOB_ERROR reported"
    jobs = dst.qmp("query-block-jobs")["return"]
    assert len(jobs) == 1 and jobs[0]["status"] == "paused", jobs
    assert jobs[0]["io-status"] == "failed", jobs
    # Guest read of data the destination lacks: EIO after reconnect-delay, never wrong data.
    url = f"nbd://127.0.0.1:{dp}/guest"
    (kind, val), took = guest_read_missing(url, src_img)
    log(f"guest read of missing data, job stopped: {kind} {val} after {took:.1f}s")
    assert kind == "errno" and val == 5, (kind, val)
    # Data already on the destination is still served.
    h = nbd.NBD()
    h.connect_uri(url)
    src_map = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", src_img]).stdout)
    off = [e for e in src_map if e["data"]][0]["start"]
    assert h.pread(4096, off) == _pread(src_img, off, 4096)
    h.shutdown()
    src.start()
    log("source back; resuming")
    m2 = Migrate(d, args + ["--resume"])
    rc = m2.wait()
    assert rc == 0, f"migrate --resume exited {rc}"
    assert any("attached" in l for l in m2.lines), m2.lines
    dst.stop()
    src.stop()
    check_destination(dst_image, src_img)


def scenario_link_blackhole(d):
    """The link to the source goes silent (packets dropped, no reset, no ICMP) for longer than
    reconnect-delay + the dead-peer timeout: the NBD client notices through its TCP keepalive /
    TCP_USER_TIMEOUT, a guest read of missing data fails with EIO in bounded time (never a
    hang), the job stops (on-error=stop); once the link is back the client reconnects by
    itself and --resume finishes the migration."""
    ns = Netns.open()
    if ns is None:
        log("link_blackhole needs ip netns (a black hole on loopback would cut everything); "
            "skipped")
        return
    try:
        link_blackhole(d, ns)
    finally:
        ns.close()


def link_blackhole(d, ns):
    size, data = 64 * MiB, 32 * MiB
    sp, dp = free_port(), free_port()
    src_img = os.path.join(d, "src.raw")
    make_disk(src_img, size, data, seed=12)
    src = Daemon(d, "src", sp, [
        "--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}"],
        netns=ns.name, host=ns.remote)
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    # reconnect-delay 2 s: the client's dead-peer timeout is then 2 s too (it is tied to the
    # delay, at least 2 s), so a request waits at most about 4 s before EIO.
    delay, dead_peer = 2.0, 2.0
    args = ["--source-qmp", src.qmp_path, "--source-node", "disk", "--dest-qmp", dst.qmp_path,
            "--dest-image", dst_image, "--source-nbd", f"{ns.remote}:{sp}",
            "--dest-nbd", f"127.0.0.1:{dp}", "--progress-interval", "100",
            "--reconnect-delay", str(int(delay)), "--retries", "1", "--retry-delay", "0.2",
            "--speed", str(8 * MiB), "--dest-export", "guest"]
    m = Migrate(d, args)
    wait_for(lambda: m.percent() >= 15 or m.proc.poll() is not None, "15% streamed")
    assert m.proc.poll() is None, "migration over before the link went silent"
    ns.blackhole(True)
    t_drop = time.monotonic()
    log(f"link black-holed at {m.percent():.1f}%")
    try:
        reader = Reader(f"nbd://127.0.0.1:{dp}/guest", src_img)
        bound = dead_peer + delay + 5
        (kind, val), took = reader.finish(bound + 10, "over the silent link")
        since = reader.t_end - t_drop
        log(f"guest read of missing data over the silent link: {kind} {val} after {took:.1f}s "
            f"({since:.1f}s after the drop)")
        assert (kind, val) == ("errno", 5), (kind, val)
        # EIO only once the reconnect window is over, and well before TCP's own limit.
        assert 0.8 * delay <= since <= bound, since
        rc = m.wait(timeout=60)
        assert rc == 3, f"migrate exited {rc}, expected 3 (stopped)"
        assert any("I/O error in the stream" in l and "action: stop" in l for l in m.lines), \
            m.lines
        jobs = dst.qmp("query-block-jobs")["return"]
        assert len(jobs) == 1 and jobs[0]["status"] == "paused", jobs
    finally:
        ns.blackhole(False)
    log("link back")
    # The client reconnects in the background (backoff at most 5 s, a connect attempt caught
    # in the black hole ends within its 10 s timeout): missing data becomes readable again,
    # and right.
    url = f"nbd://127.0.0.1:{dp}/guest"
    res = wait_for(lambda: (lambda r: r if r[0] == ("data", True) else None)(
        guest_read_missing(url, src_img)), "guest read after the link is back", timeout=40)
    log(f"guest read of missing data after the link is back: {res[0]}")
    m2 = Migrate(d, args + ["--resume"])
    rc = m2.wait()
    assert rc == 0, f"migrate --resume exited {rc}"
    dst.stop()
    src.stop()
    check_destination(dst_image, src_img)


def scenario_errors_report_then_resume(d):
    """nbdkit's error filter in front of the source with on-error=report: the job fails
    (exit 2, never silently); --resume restreams only what is missing (nbdkit's log filter counts
    the bytes read from the source: nothing is read twice beyond the chunks in flight)."""
    size, data = 128 * MiB, 64 * MiB
    sp, dp = free_port(), free_port()
    src_img, src = source_setup(d, size, data, sp, seed=5)
    errfile, logfile = os.path.join(d, "inject"), os.path.join(d, "nbdkit.log")
    kit, kp = nbdkit_proxy(d, "err", sp, "migrate-disk", ["error", "delay", "log"],
                           ["error=EIO", "error-pread-rate=100%", f"error-pread-file={errfile}",
                            "rdelay=2ms", f"logfile={logfile}"])
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    args = migrate_args(src, dst, dst_image, kp, dp,
                        ["--on-error", "report", "--speed", str(16 * MiB),
                         "--source-export", "migrate-disk"])
    m = Migrate(d, args)
    wait_for(lambda: m.percent() >= 30 or m.proc.poll() is not None, "30% streamed")
    open(errfile, "w").close()
    log("read errors switched on")
    rc = m.wait()
    assert rc == 2, f"migrate exited {rc}, expected 2 (job failed)"
    # The BLOCK_JOB_ERROR event (action report) was seen and reported, then the failure.
    assert any("I/O error in the stream" in l and "action: report" in l for l in m.lines), \
        m.lines
    assert any("the stream failed" in l for l in m.lines), m.lines
    first = bytes_read(logfile)
    os.unlink(errfile)
    m2 = Migrate(d, args + ["--resume"])
    rc = m2.wait()
    assert rc == 0, f"migrate --resume exited {rc}"
    total = bytes_read(logfile)
    allocated = sum(e["length"] for e in json.loads(run(
        ["qemu-img", "map", "--output=json", "-f", "raw", src_img]).stdout) if e["data"])
    log(f"source reads: {first} bytes before the failure, {total} in all, "
        f"{allocated} bytes of data on the source")
    # Chunks in flight when the errors started (at most 8 x 1 MiB) may be read twice.
    assert total <= allocated + 8 * MiB, (total, allocated)
    dst.stop()
    src.stop()
    kit.terminate()
    check_destination(dst_image, src_img)


def scenario_transient_errors_retried(d):
    """Read errors that last about a second (nbdkit's error filter, switched on and off through
    its error-pread-file) with on-error=stop: migrate's bounded retries resume the job, it gets
    past the errors and exits 0; each retry is announced (`retry k/N`) and waits its backoff
    (doubling from --retry-delay)."""
    size, data = 32 * MiB, 16 * MiB
    sp, dp = free_port(), free_port()
    src_img, src = source_setup(d, size, data, sp, seed=13)
    errfile = os.path.join(d, "inject")
    kit, kp = nbdkit_proxy(d, "err", sp, "migrate-disk", ["error"],
                           ["error=EIO", "error-pread-rate=100%", f"error-pread-file={errfile}"])
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    retries, retry_delay = 5, 0.3
    args = migrate_args(src, dst, dst_image, kp, dp,
                        ["--retries", str(retries), "--retry-delay", str(retry_delay),
                         "--speed", str(8 * MiB), "--source-export", "migrate-disk"])
    m = Migrate(d, args)
    wait_for(lambda: m.percent() >= 20 or m.proc.poll() is not None, "20% streamed")
    assert m.proc.poll() is None, "migration over before the errors"
    open(errfile, "w").close()
    log("read errors on")
    wait_for(lambda: any("I/O error in the stream" in l for l in m.lines)
             or m.proc.poll() is not None, "the first BLOCK_JOB_ERROR")
    time.sleep(1.0)
    os.unlink(errfile)
    log("read errors off")
    rc = m.wait()
    assert rc == 0, f"migrate exited {rc}, expected 0 (the retries got past the errors)"
    retry = [(t, l) for t, l in zip(m.times, m.lines) if "retry " in l]
    log(f"{len(retry)} retries: {[l for _, l in retry]}")
    assert 1 <= len(retry) <= retries, retry
    # k counts errors in a row (it restarts when the job progressed in between).
    for k, (_, line) in enumerate(retry, 1):
        n = int(line.split("retry ")[1].split("/")[0])
        assert 1 <= n <= min(k, retries) and f"/{retries} in " in line, (k, line)
    # Backoff doubles: each retry waits its announced delay before the job is resumed, so the
    # next error (and retry line) cannot come sooner. Loose: half the announced delay.
    for (t0, l0), (t1, _) in zip(retry, retry[1:]):
        wait = float(l0.split(" in ")[1].rstrip("s"))
        assert t1 - t0 >= 0.5 * wait, (l0, t1 - t0)
    assert any("job resumed" in l for l in m.lines), m.lines
    dst.stop()
    src.stop()
    kit.terminate()
    check_destination(dst_image, src_img)


def scenario_dest_restart(d):
    """Destination killed mid-stream and restarted: --resume continues from the allocation
    (source reads counted by nbdkit's log filter: nothing recopied beyond the chunks in flight)."""
    size, data = 128 * MiB, 64 * MiB
    sp, dp = free_port(), free_port()
    src_img, src = source_setup(d, size, data, sp, seed=6)
    logfile = os.path.join(d, "nbdkit.log")
    kit, kp = nbdkit_proxy(d, "log", sp, "migrate-disk", ["log"], [f"logfile={logfile}"])
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    args = migrate_args(src, dst, dst_image, kp, dp,
                        ["--speed", str(8 * MiB), "--source-export", "migrate-disk"])
    m = Migrate(d, args)
    wait_for(lambda: m.percent() >= 75 or m.proc.poll() is not None, "75% streamed")
    dst.kill()
    log("destination killed")
    rc = m.wait()
    assert rc == 4, f"migrate exited {rc}, expected 4 (lost the destination)"
    first = bytes_read(logfile)
    r = run(["qemu-img", "check", dst_image])
    assert r.returncode == 0, f"after the kill: {r.stdout}{r.stderr}"
    dst.start()
    m2 = Migrate(d, args + ["--resume"])
    rc = m2.wait()
    assert rc == 0, f"migrate --resume exited {rc}"
    total = bytes_read(logfile)
    allocated = sum(e["length"] for e in json.loads(run(
        ["qemu-img", "map", "--output=json", "-f", "raw", src_img]).stdout) if e["data"])
    log(f"source reads: {first} before the kill, {total} in all; {allocated} bytes of data")
    # The stream checkpoints (flushes) every second: what is read again is at most one second
    # of copying (8 MiB/s) plus the chunks in flight (8 x 1 MiB) -- far less than what was
    # copied before the kill, which a stream without checkpoints would fetch again.
    bound = 8 * MiB + 8 * MiB
    assert first > bound, (first, bound)
    assert total - allocated <= bound, (first, total, allocated)
    dst.stop()
    src.stop()
    kit.terminate()
    check_destination(dst_image, src_img)


def precopy(d, finish, qsd_target):
    """Pre-copy (QEMU's recipe) over TCP, the source in its own network namespace when `ip
    netns` works: the destination exports a writable target, the source mirrors its disk into an
    `nbd` node connected to it while a guest writes through the source's export; at READY the
    guest keeps writing a little (the mirror follows), then pauses, and the job ends with a
    soft cancel (`finish="cancel"`: the target is a point-in-time copy, the source stays in use)
    or `block-job-complete` (the source's users pivot to the target: guest writes made through
    the source export afterwards land on the destination, the source file no longer changes).
    The target then equals the guest's model and passes qemu-img check."""
    ns = Netns.open()
    try:
        size, data = 32 * MiB, 8 * MiB
        sp, dp = free_port(), free_port()
        src_img, model = os.path.join(d, "src.raw"), os.path.join(d, "model.raw")
        make_disk(src_img, size, data, seed=21)
        subprocess.run(["cp", "--sparse=always", src_img, model], check=True)
        tgt_img = os.path.join(d, "target.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", tgt_img, str(size)])
        shost = ns.remote if ns else "127.0.0.1"
        dhost = ns.local if ns else "127.0.0.1"
        dst = Daemon(d, "dst", dp, [
            "--blockdev", f"driver=qcow2,node-name=target,file.driver=file,file.filename={tgt_img}",
            "--export", "type=nbd,id=in,node-name=target,name=in,writable=on"],
            host=dhost, qsd=qsd_target)
        src = Daemon(d, "src", sp, [
            "--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}",
            "--export", "type=nbd,id=guest,node-name=disk,writable=on,name=guest"],
            netns=ns.name if ns else None, host=shost)
        log(f"pre-copy {'diskstream' if not qsd_target else 'qemu-storage-daemon'} target at "
            f"{dhost}, source at {shost}, finish with {finish}")
        guest_url = f"nbd://{shost}:{sp}/guest"
        w = Writer(d, model, size, guest_url, seed=22)
        w.start()
        q = Qmp(src.qmp_path)
        try:
            wait_for(lambda: sum(w.ops.values()) >= 20 or w.error, "guest on the source")
            q.ok("blockdev-add", driver="nbd", **{"node-name": "remote"},
                 server={"type": "inet", "host": dhost, "port": str(dp)}, export="in")
            q.ok("blockdev-mirror", **{"job-id": "pre"}, device="disk", target="remote",
                 sync="full")
            n0 = sum(w.ops.values())
            q.wait_event("BLOCK_JOB_READY", "pre")
            # The guest wrote during the bulk copy and keeps writing in READY.
            n1 = sum(w.ops.values())
            wait_for(lambda: sum(w.ops.values()) >= n1 + 30 or w.error, "guest writes in READY")
        finally:
            w.stop_flag.set()
            w.join()
        if w.error:
            raise w.error
        log(f"guest ops: {w.ops} ({n1 - n0} during the bulk copy)")
        if finish == "cancel":
            q.ok("block-job-cancel", device="pre")
        else:
            q.ok("block-job-complete", device="pre")
        e = q.wait_event("BLOCK_JOB_COMPLETED", "pre")
        assert "error" not in e["data"], e
        assert not [x for x in q.events if x["event"] == "BLOCK_JOB_CANCELLED"], q.events
        if finish == "cancel":
            q.ok("blockdev-del", **{"node-name": "remote"})
        else:
            # Pivoted: the guest's export now writes to the destination through the source.
            src_sha = sha256(src_img)
            w2 = Writer(d, model, size, guest_url, seed=23)
            w2.start()
            try:
                wait_for(lambda: sum(w2.ops.values()) >= 40 or w2.error, "guest after the pivot")
            finally:
                w2.stop_flag.set()
                w2.join()
            if w2.error:
                raise w2.error
            assert w2.ops["write"] + w2.ops["zero"] > 0, w2.ops
            assert sha256(src_img) == src_sha, "the source file changed after the pivot"
        q.close()
        src.stop()
        dst.stop()
        check_destination(tgt_img, model)
        if finish == "cancel":
            # Soft cancel: the source still holds the same data.
            r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", model, src_img])
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        if ns:
            ns.close()


def scenario_precopy_cancel(d):
    precopy(d, "cancel", qsd_target=False)


def scenario_precopy_complete(d):
    precopy(d, "complete", qsd_target=False)


def scenario_precopy_qsd_target(d):
    precopy(d, "complete", qsd_target=True)


def scenario_qsd_source(d):
    """`diskstream migrate` with qemu-storage-daemon as the source (it serves the disk over NBD
    and takes the same QMP commands): nbd-server-start finds QSD's server running, the
    migration export is added and removed, the guest's export on QSD is removed at the switch;
    the destination ends complete and independent."""
    size, data = 32 * MiB, 16 * MiB
    sp, dp = free_port(), free_port()
    src_img = os.path.join(d, "src.raw")
    make_disk(src_img, size, data, seed=31)
    src = Daemon(d, "src", sp, [
        "--blockdev", f"driver=file,node-name=file0,filename={src_img}",
        "--blockdev", "driver=raw,node-name=disk,file=file0",
        "--export", "type=nbd,id=guest,node-name=disk,writable=on,name=guest"], qsd=True)
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    m = Migrate(d, migrate_args(src, dst, dst_image, sp, dp,
                                ["--source-guest-export", "guest", "--dest-export", "guest",
                                 "--speed", str(64 * MiB)]))
    rc = m.wait()
    assert rc == 0, f"migrate exited {rc}"
    assert f"destination: nbd://127.0.0.1:{dp}/guest" in m.out, m.out
    exports = src.qmp("query-block-exports")["return"]
    assert exports == [], f"exports left on qemu-storage-daemon: {exports}"
    dst.stop()
    src.stop()
    check_destination(dst_image, src_img)


EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..",
                       "examples", "migrate-postcopy.py")


def scenario_example_script(d):
    """examples/migrate-postcopy.py (the documented QMP sequence) between two daemons: the
    source's guest export is removed at the switch; then, in a second migration, the source is
    killed mid-stream and the script gives up after its bounded retries (exit 3, the job left
    paused with its data)."""
    size, data = 64 * MiB, 16 * MiB
    sp, dp = free_port(), free_port()
    src_img = os.path.join(d, "src.raw")
    make_disk(src_img, size, data, seed=8)
    src = Daemon(d, "src", sp, [
        "--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}",
        "--export", "type=nbd,id=guest,node-name=disk,writable=on,name=guest"])
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    r = subprocess.run([sys.executable, EXAMPLE, "--source-guest-export", "guest",
                        "--interval", "0.2", src.qmp_path, "disk", f"127.0.0.1:{sp}",
                        dst.qmp_path, f"127.0.0.1:{dp}", dst_image],
                       input="\n", capture_output=True, text=True, timeout=120)
    sys.stderr.write(r.stderr)
    assert r.returncode == 0, r.stderr
    assert f"destination: nbd://127.0.0.1:{dp}/mig-dst" in r.stdout, r.stdout
    # Both the migration export and the guest's export are gone from the source.
    assert src.qmp("query-block-exports")["return"] == []
    dst.stop()
    src.stop()
    check_destination(dst_image, src_img)
    example_dead_source(d)


def example_dead_source(d):
    sp, dp = free_port(), free_port()
    src_img = os.path.join(d, "src2.raw")
    make_disk(src_img, 32 * MiB, 16 * MiB, seed=14)
    src = Daemon(d, "src2", sp, [
        "--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}"])
    dst = Daemon(d, "dst2", dp)
    dst_image = os.path.join(d, "dst2.qcow2")
    enter = os.path.join(d, "enter")
    with open(enter, "w") as f:
        f.write("\n")
    p = subprocess.Popen([sys.executable, EXAMPLE, "--reconnect-delay", "1", "--retries", "2",
                          "--retry-delay", "0.2", "--interval", "0.1", "--speed", str(4 * MiB),
                          src.qmp_path, "disk", f"127.0.0.1:{sp}", dst.qmp_path,
                          f"127.0.0.1:{dp}", dst_image],
                         stdin=open(enter), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    PROCS.append(p)

    def offset():
        jobs = dst.qmp("query-block-jobs")["return"]
        return jobs[0]["offset"] if jobs else 0
    wait_for(lambda: offset() > 0 or p.poll() is not None, "the example's stream")
    assert p.poll() is None, "the example finished before the source was killed"
    src.kill()
    log("source killed under the example script")
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("examples/migrate-postcopy.py hung with the source dead")
    sys.stderr.write(err)
    assert p.returncode == 3, f"example exited {p.returncode}, expected 3"
    assert "retry 1/2" in err and "retry 2/2" in err and "stays paused" in err, err
    jobs = dst.qmp("query-block-jobs")["return"]
    assert len(jobs) == 1 and jobs[0]["status"] == "paused", jobs
    dst.stop()


def scenario_example_precopy(d):
    """examples/migrate-precopy.py between two diskstream daemons, soft cancel (the target
    equals the source, the source's nbd node and the destination's export are gone), then
    again with --finish complete into a qemu-storage-daemon destination (the source's disk
    node now has the remote node's data path: its export writes to the destination)."""
    script = os.path.join(os.path.dirname(EXAMPLE), "migrate-precopy.py")
    for finish, qsd in (("cancel", False), ("complete", True)):
        sp, dp = free_port(), free_port()
        src_img = os.path.join(d, f"src-{finish}.raw")
        make_disk(src_img, 32 * MiB, 8 * MiB, seed=41)
        src = Daemon(d, f"src-{finish}", sp, [
            "--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}"])
        dst = Daemon(d, f"dst-{finish}", dp, qsd=qsd)
        tgt = os.path.join(d, f"tgt-{finish}.qcow2")
        r = subprocess.run([sys.executable, script, "--finish", finish, "--interval", "0.1",
                            src.qmp_path, "disk", dst.qmp_path, f"127.0.0.1:{dp}", tgt],
                           input="\n", capture_output=True, text=True, timeout=120)
        sys.stderr.write(r.stderr)
        assert r.returncode == 0, r.stderr
        if finish == "cancel":
            assert "node mig-target holds the disk" in r.stdout, r.stdout
            assert dst.qmp("query-block-exports")["return"] == []
            nodes = [n["node-name"] for n in src.qmp("query-named-block-nodes")["return"]]
            assert "mig-remote" not in nodes, nodes
        else:
            assert "pivoted" in r.stdout, r.stdout
        src.stop()
        dst.stop()
        check_destination(tgt, src_img)


def scenario_setup_errors(d):
    """Refusals are clear, exit 1, and leave nothing behind."""
    size = 16 * MiB
    sp, dp = free_port(), free_port()
    src_img = os.path.join(d, "src.raw")
    make_disk(src_img, size, 4 * MiB, seed=9)
    src = Daemon(d, "src", sp, [
        "--blockdev", f"driver=raw,node-name=disk,file.driver=file,file.filename={src_img}"])
    dst = Daemon(d, "dst", dp)
    dst_image = os.path.join(d, "dst.qcow2")
    base = {"--source-qmp": src.qmp_path, "--dest-qmp": dst.qmp_path, "--dest-image": dst_image,
            "--source-nbd": f"127.0.0.1:{sp}", "--dest-nbd": f"127.0.0.1:{dp}",
            "--source-node": "disk"}

    def argv(**over):
        o = dict(base)
        o.update({"--" + k.replace("_", "-"): v for k, v in over.items()})
        return [BIN, "migrate"] + [x for kv in o.items() for x in kv]

    cases = [
        ({"source_node": "nope"}, "source has no node named 'nope'"),
        ({"source_nbd": "localhost"}, "is not HOST:PORT"),
        ({"dest_qmp": os.path.join(d, "missing.qmp")}, "destination QMP"),
        # Not where the destination's NBD server listens: the guest URL is probed before it is
        # printed, and everything set up is undone.
        ({"dest_nbd": "192.0.2.1:10809"}, "the guest could not use nbd://192.0.2.1:10809/"),
    ]
    for over, want in cases:
        r = run(argv(**over))
        log(f"{over} -> {r.returncode}: {r.stderr.strip()}")
        assert r.returncode == 1, (over, r.returncode, r.stderr)
        assert want in r.stderr, (want, r.stderr)
        assert not os.path.exists(dst_image), "image left behind"
        assert src.qmp("query-block-exports")["return"] == [], "source export left behind"
        nodes = dst.qmp("query-named-block-nodes")["return"]
        assert nodes == [], f"destination nodes left behind: {nodes}"
    open(dst_image, "w").close()
    r = run(argv())
    assert r.returncode == 1 and "pass --resume" in r.stderr, r.stderr
    src.stop()
    dst.stop()


SCENARIOS = {
    "setup_errors": scenario_setup_errors,
    "example_script": scenario_example_script,
    "postcopy": scenario_postcopy,
    "source_restart": scenario_source_restart,
    "source_dead_stop_resume": scenario_source_dead_stop_resume,
    "link_blackhole": scenario_link_blackhole,
    "errors_report_then_resume": scenario_errors_report_then_resume,
    "dest_restart": scenario_dest_restart,
    "transient_errors_retried": scenario_transient_errors_retried,
    "precopy_cancel": scenario_precopy_cancel,
    "precopy_complete": scenario_precopy_complete,
    "precopy_qsd_target": scenario_precopy_qsd_target,
    "qsd_source": scenario_qsd_source,
    "example_precopy": scenario_example_precopy,
}


def main():
    name = sys.argv[2]
    d = tempfile.mkdtemp(prefix=f"ds-migrate-{name}-")
    ok = False
    try:
        SCENARIOS[name](d)
        ok = True
        log(f"{name}: ok")
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.kill()
                p.wait()
        if ok or not os.environ.get("DISKSTREAM_KEEP_TEST_DIR"):
            subprocess.run(["rm", "-rf", d])
        else:
            log(f"kept {d}")


if __name__ == "__main__":
    main()
