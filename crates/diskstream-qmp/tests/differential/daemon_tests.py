#!/usr/bin/env python3
"""Tests of `diskstream daemon` alone (no QSD counterpart): crash safety of block-stream
(kill -9 during and right after a stream, then reopen: qemu-img check clean, contents
unchanged, re-running the stream finishes), graceful shutdown on SIGTERM and `quit`, the
QSD-style command line (--blockdev key=value and JSON, --pidfile, --daemonize, the default
socket), and the seed design's `block_stream` / `query-block-stream`.

Usage: daemon_tests.py --ours PATH/TO/diskstream [--only NAME ...]
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20


def run(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r


class Qmp:
    """A minimal synchronous QMP client (line-based)."""

    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rwb")
        self.events = []
        greeting = json.loads(self.f.readline())
        assert "QMP" in greeting, greeting
        assert self.cmd("qmp_capabilities") == {}

    def cmd(self, name, args=None, ok=True):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise EOFError(f"connection closed during {name}")
            r = json.loads(line)
            if "event" in r:
                self.events.append(r)
                continue
            if ok and "error" in r:
                raise AssertionError(f"{name} {args}: {r['error']}")
            return r.get("return", r)

    def wait_event(self, name, timeout=60, **data):
        deadline = time.time() + timeout
        while True:
            for e in self.events:
                if e["event"] == name and all(e.get("data", {}).get(k) == v for k, v in data.items()):
                    self.events.remove(e)
                    return e
            if time.time() > deadline:
                raise AssertionError(f"timeout waiting for {name} {data}")
            self.s.settimeout(max(0.01, deadline - time.time()))
            try:
                line = self.f.readline()
            finally:
                self.s.settimeout(None)
            if not line:
                raise EOFError("connection closed")
            self.events.append(json.loads(line))


def mkchain(d, size=64 * MiB):
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/base.qcow2", str(size))
    run("qemu-io", "-c", "write -P 0x11 0 16M", "-c", "write -P 0x22 32M 8M", f"{d}/base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{d}/mid.qcow2")
    run("qemu-io", "-c", "write -P 0x33 8M 8M", "-c", "write -z 36M 1M", f"{d}/mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", f"{d}/top.qcow2")
    run("qemu-io", "-c", "write -P 0x44 48M 1M", f"{d}/top.qcow2")
    run("qemu-img", "convert", "-O", "raw", f"{d}/top.qcow2", f"{d}/ref.raw")


def check_clean(path):
    r = run("qemu-img", "check", "--output=json", path, check=False)
    v = json.loads(r.stdout or "{}")
    assert r.returncode == 0 and v.get("leaks", 0) == 0 and v.get("corruptions", 0) == 0, \
        f"qemu-img check {path}: {r.stdout}{r.stderr}"


def same_content(d):
    r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", f"{d}/ref.raw", f"{d}/top.qcow2", check=False)
    assert r.returncode == 0, f"contents changed: {r.stdout}{r.stderr}"


def backing_of(path):
    return json.loads(run("qemu-img", "info", "--output=json", "-U", path).stdout).get("backing-filename")


class Daemon:
    def __init__(self, exe, d, extra=(), sock=True, env=None):
        self.d = d
        self.sock = os.path.join(d, "qmp.sock")
        args = [exe, "daemon"]
        if sock:
            args += ["--chardev", f"socket,id=m,path={self.sock},server=on,wait=off", "--monitor", "chardev=m"]
        self.p = subprocess.Popen(args + list(extra), cwd=d, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  env=None if env is None else {**os.environ, **env})

    def qmp(self):
        return Qmp(self.sock)

    def kill9(self):
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()

    def wait(self, timeout=30):
        return self.p.wait(timeout=timeout)


TOP = "driver=qcow2,node-name=top,file.driver=file,file.filename=top.qcow2"


def test_kill_during_stream(exe, d):
    rng = random.Random(7)
    mkchain(d)
    for attempt in range(3):
        dm = Daemon(exe, d, ["--blockdev", TOP])
        q = dm.qmp()
        q.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 16 * MiB})
        time.sleep(rng.uniform(0.05, 0.5))
        dm.kill9()
        check_clean(f"{d}/top.qcow2")
        same_content(d)
        assert backing_of(f"{d}/top.qcow2") == "mid.qcow2", "backing link untouched mid-stream"
    # Re-running the stream finishes it.
    dm = Daemon(exe, d, ["--blockdev", TOP])
    q = dm.qmp()
    q.cmd("block-stream", {"job-id": "s", "device": "top"})
    e = q.wait_event("BLOCK_JOB_COMPLETED", device="s")
    assert "error" not in e["data"] and e["data"]["offset"] == e["data"]["len"], e
    q.cmd("quit")
    assert dm.wait() == 0
    check_clean(f"{d}/top.qcow2")
    same_content(d)
    assert backing_of(f"{d}/top.qcow2") is None


def check_no_corruption(path):
    """qemu-img check: no corruption (leaked clusters are allowed after a kill -9)."""
    r = run("qemu-img", "check", "--output=json", path, check=False)
    v = json.loads(r.stdout or "{}")
    assert v.get("corruptions", 0) == 0 and v.get("check-errors", 0) == 0, \
        f"qemu-img check {path}: {r.stdout}{r.stderr}"


def test_kill_during_stream_with_writer(exe, d):
    """kill -9 at random times while a stream runs and a guest writes through an NBD export
    (batches of qemu-io writes to 64 KiB slots, each batch flushed): after every kill, each
    slot of a completed batch holds its data, each slot of an interrupted batch holds the old
    or the new data, everything else is unchanged, and qemu-img check finds no corruption;
    the restarted daemon finishes the stream with the same contents."""
    rng = random.Random(11)
    mkchain(d)
    ref = open(f"{d}/ref.raw", "rb").read()
    size = len(ref)
    slot = 64 * 1024
    free = list(range(size // slot))
    rng.shuffle(free)
    done, maybe = {}, {}
    exports = ["--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
               "--export", "type=nbd,id=e,node-name=top,writable=on"]

    def verify():
        check_no_corruption(f"{d}/top.qcow2")
        # Completed batches are durable; an interrupted batch's slots may hold old or new data.
        state = {i: (p, []) for i, p in done.items()}
        state.update({i: (None, [p]) for i, p in maybe.items()})
        check_slots(image_bytes(f"{d}/top.qcow2"), ref, state, "after kill -9")

    for attempt in range(4):
        dm = Daemon(exe, d, ["--blockdev", TOP] + exports)
        q = dm.qmp()
        q.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 1 * MiB})
        deadline = time.time() + rng.uniform(0.3, 1.2)
        url = f"nbd+unix:///top?socket={d}/nbd.sock"
        while time.time() < deadline and len(free) > 8:
            batch = [free.pop() for _ in range(4)]
            pats = {i: rng.randrange(1, 256) for i in batch}
            args = ["qemu-io", "-f", "raw"]
            for i, pat in pats.items():
                args += ["-c", f"write -P {pat} {i * slot} {slot}"]
            args += ["-c", "flush", url]
            maybe.update(pats)
            r = subprocess.run(args, capture_output=True, text=True)
            if r.returncode == 0 and "failed" not in r.stdout + r.stderr:
                for i, pat in pats.items():
                    done[i] = pat
                    maybe.pop(i, None)
        # A slow machine (each batch ends in an fsync) may let the stream finish before the
        # kill; the link must stay only while the job is still running.
        running = any(j["device"] == "s" and j["offset"] < j["len"]
                      for j in q.cmd("query-block-jobs"))
        dm.kill9()
        verify()
        if running:
            assert backing_of(f"{d}/top.qcow2") == "mid.qcow2", "backing link untouched mid-stream"
    assert len(done) >= 8, f"only {len(done)} slots written"
    dm = Daemon(exe, d, ["--blockdev", TOP])
    q = dm.qmp()
    q.cmd("block-stream", {"job-id": "s", "device": "top"})
    e = q.wait_event("BLOCK_JOB_COMPLETED", device="s")
    assert "error" not in e["data"], e
    q.cmd("quit")
    assert dm.wait() == 0
    verify()
    assert backing_of(f"{d}/top.qcow2") is None


def test_kill_right_after_completion(exe, d):
    """QEMU 10 loses the streamed data here (no flush before the header rewrite)."""
    mkchain(d)
    dm = Daemon(exe, d, ["--blockdev", TOP])
    q = dm.qmp()
    q.cmd("block-stream", {"job-id": "s", "device": "top"})
    q.wait_event("BLOCK_JOB_COMPLETED", device="s")
    dm.kill9()
    check_clean(f"{d}/top.qcow2")
    same_content(d)
    assert backing_of(f"{d}/top.qcow2") is None


def test_kill_right_after_partial_stream(exe, d):
    """Intermediate stream (base stays): kill -9 right after completion keeps mid's data."""
    mkchain(d)
    dm = Daemon(exe, d, ["--blockdev", TOP])
    q = dm.qmp()
    nodes = q.cmd("query-named-block-nodes", {"flat": True})
    base = [n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"].endswith("base.qcow2")][0]
    q.cmd("block-stream", {"job-id": "s", "device": "top", "base-node": base})
    q.wait_event("BLOCK_JOB_COMPLETED", device="s")
    dm.kill9()
    check_clean(f"{d}/top.qcow2")
    same_content(d)
    assert backing_of(f"{d}/top.qcow2") == "base.qcow2"


def test_sigterm_graceful(exe, d):
    mkchain(d)
    pidfile = os.path.join(d, "pid")
    dm = Daemon(exe, d, ["--blockdev", TOP, "--pidfile", pidfile])
    q = dm.qmp()
    assert int(open(pidfile).read()) == dm.p.pid
    q.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 2 * MiB})
    time.sleep(0.3)
    os.kill(dm.p.pid, signal.SIGTERM)
    assert dm.wait(20) == 0, dm.p.stderr.read()
    assert not os.path.exists(pidfile) and not os.path.exists(dm.sock)
    check_clean(f"{d}/top.qcow2")
    same_content(d)


def test_cli_forms_and_daemonize(exe, d):
    mkchain(d)
    pidfile = os.path.join(d, "pid")
    sock = os.path.join(d, "qmp.sock")
    blk = json.dumps({"driver": "qcow2", "node-name": "base",
                      "file": {"driver": "file", "filename": "base.qcow2"}})
    r = subprocess.run([exe, "daemon", "--blockdev", blk,
                        "--blockdev", "driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename=mid.qcow2,read-only=on",
                        "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                        "--monitor", "chardev=m", "--pidfile", pidfile, "--daemonize"],
                       cwd=d, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(sock), "socket ready when the parent exits"
    pid = int(open(pidfile).read())
    q = Qmp(sock)
    names = {n["node-name"]: n for n in q.cmd("query-named-block-nodes", {"flat": True})}
    assert names["mid"]["ro"] is True and names["base"]["ro"] is False, names
    q.cmd("quit")
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("daemon did not exit after quit")
    # Bad --blockdev: exit 1 with QEMU's message.
    r = subprocess.run([exe, "daemon", "--blockdev", "driver=qcow2,node-name=x,file.driver=file,file.filename=nope.qcow2",
                        "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m"],
                       cwd=d, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Could not open 'nope.qcow2': No such file or directory" in r.stderr, r.stderr


def test_default_socket(exe, d):
    env = dict(os.environ, XDG_RUNTIME_DIR=d)
    p = subprocess.Popen([exe, "daemon"], cwd=d, env=env, stderr=subprocess.PIPE)
    sock = os.path.join(d, "diskstream", "qmp.sock")
    q = Qmp(sock)
    assert q.cmd("query-version")["qemu"]["major"] == 10
    q.cmd("quit")
    assert p.wait(timeout=20) == 0
    assert not os.path.exists(sock)


def test_seed_interface(exe, d):
    mkchain(d)
    dm = Daemon(exe, d, ["--blockdev", TOP])
    q = dm.qmp()
    # One chunk at a time: offsets grow until the whole device is done.
    last = 0
    steps = 0
    while True:
        r = q.cmd("block_stream", {"device": "top"})
        assert r["device"] == "top" and r["len"] == 64 * MiB, r
        assert r["offset"] > last, (r, last)
        last = r["offset"]
        steps += 1
        if r["offset"] == r["len"]:
            break
        assert steps < 100
    assert q.cmd("query-block-stream") == []
    q.cmd("quit")
    dm.wait()
    check_clean(f"{d}/top.qcow2")
    same_content(d)
    assert backing_of(f"{d}/top.qcow2") is None
    # all=true starts the background job, query-block-stream shows it, stop=true cancels.
    shutil.rmtree(d)
    os.makedirs(d)
    mkchain(d)
    dm = Daemon(exe, d, ["--blockdev", TOP])
    q = dm.qmp()
    q.cmd("block_stream", {"device": "top", "all": True, "base": "base.qcow2"})
    st = q.cmd("query-block-stream")
    assert len(st) == 1 and st[0]["device"] == "top" and st[0]["len"] == 64 * MiB, st
    q.cmd("block-job-set-speed", {"device": "top", "speed": 1})
    q.cmd("block_stream", {"device": "top", "stop": True})
    assert q.cmd("query-block-stream") == []
    r = q.cmd("block_stream", {"device": "top", "stop": True}, ok=False)
    assert r["error"]["class"] == "DeviceNotActive", r
    q.cmd("block_stream", {"device": "top", "all": True, "base": "base.qcow2"})
    q.wait_event("BLOCK_JOB_COMPLETED", device="top")
    q.cmd("quit")
    dm.wait()
    check_clean(f"{d}/top.qcow2")
    same_content(d)
    assert backing_of(f"{d}/top.qcow2") == "base.qcow2"


def wait_path(path, timeout=30):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def test_enospc_through_export(exe, d):
    """ENOSPC from the storage under an exported qcow2 (nbdkit's error filter in front of the
    image file, switched on by a trigger file): the NBD client's writes fail with ENOSPC and
    nothing else happens; once space is back, writes succeed; acknowledged data is intact,
    failed writes left no trace, and the image passes qemu-img check."""
    if shutil.which("nbdkit") is None:
        raise AssertionError("nbdkit is required (bash .ci/run installs it)")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/top.qcow2", "64M")
    # An NBD export has a fixed size: give the qcow2 file room to allocate clusters in.
    os.truncate(f"{d}/top.qcow2", 256 * MiB)
    full = f"{d}/full"
    kit = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-U", f"{d}/kit.sock", "--filter=error",
         "file", f"{d}/top.qcow2", "error=ENOSPC",
         "error-pwrite-rate=100%", f"error-pwrite-file={full}",
         "error-zero-rate=100%", f"error-zero-file={full}",
         "error-trim-rate=100%", f"error-trim-file={full}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dm = None
    try:
        wait_path(f"{d}/kit.sock")
        dm = Daemon(exe, d, [
            "--blockdev", "driver=qcow2,node-name=top,file.driver=nbd,file.server.type=unix,"
                          f"file.server.path={d}/kit.sock",
            "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
            "--export", "type=nbd,id=e,node-name=top,writable=on"])
        q = dm.qmp()
        url = f"nbd+unix:///top?socket={d}/nbd.sock"

        def io(*cmds):
            args = ["qemu-io", "-f", "raw"]
            for c in cmds:
                args += ["-c", c]
            return run(*args, url, check=False)

        r = io("write -P 0x55 0 1M", "write -P 0x56 16M 64k")
        assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
        open(full, "w").close()
        for c in ("write -P 0x66 4M 1M", "write -P 0x67 0 4k", "write -z 16M 64k",
                  "write -P 0x68 32M 512"):
            r = io(c)
            out = r.stdout + r.stderr
            assert "No space left on device" in out, f"{c}: expected ENOSPC, got: {out}"
        os.unlink(full)
        r = io("write -P 0x77 8M 1M", "flush")
        assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
        # Reads: acknowledged data; the in-place overwrite that failed may have reached the
        # file or not (NBD leaves that undefined), newly allocated clusters must not exist.
        r = io("read -P 0x55 4k 1020k", "read -P 0 4M 1M", "read -P 0x77 8M 1M",
               "read -P 0 32M 512")
        assert "Pattern verification failed" not in r.stdout + r.stderr and r.returncode == 0, \
            r.stdout + r.stderr
        # The write-zeroes of an allocated v3 cluster is a metadata change: the request
        # itself may succeed and only qemu-io's closing flush meet ENOSPC. Either outcome is
        # fine, as long as the range reads as before or as zeroes.
        ok = [c for c in ("read -P 0x56 16M 64k", "read -P 0 16M 64k")
              if "Pattern verification failed" not in (lambda x: x.stdout + x.stderr)(io(c))]
        assert ok, "16M: neither the old data nor zeroes"
        q.cmd("quit")
        assert dm.wait() == 0
    finally:
        if dm is not None and dm.p.poll() is None:
            dm.kill9()
        kit.kill()
        kit.wait(timeout=10)
    check_clean(f"{d}/top.qcow2")
    m = json.loads(run("qemu-img", "map", "--output=json", f"{d}/top.qcow2").stdout)
    data = [(e["start"], e["length"]) for e in m if e["data"]]
    assert all(not (s < 4 * MiB + MiB and 4 * MiB < s + n) for s, n in data), \
        f"a failed write left an allocation: {data}"


HERE = os.path.dirname(os.path.abspath(__file__))


class Writer:
    """nbd_writer.py running against URL: a guest writing random 64 KiB slots over one NBD
    connection (kept across switches and pivots)."""

    def __init__(self, url, d, seed, slots=()):
        self.stop = os.path.join(d, f"stop-{seed}")
        self.p = subprocess.Popen(["/usr/bin/python3", os.path.join(HERE, "nbd_writer.py"), url,
                                   self.stop, str(seed)] + [str(s) for s in slots],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.strip() == "ready", f"writer: {line}{self.p.stderr.read()}"
        # Its output, read as it comes with the time each line arrived (so a test can tell
        # what was acknowledged after a given moment).
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append((time.time(), line))

    def acked_since(self, t):
        """The writes acknowledged after time t."""
        return sum(1 for when, line in list(self.lines) if when > t and line.startswith("ack "))

    def finish(self, expect_ok=True):
        """Stop it; returns (acknowledged {slot: pattern}, flushed {slot: pattern}, tail)."""
        open(self.stop, "w").close()
        out, err = self.read_all()
        acked, flushed, pending = {}, {}, {}
        for line in out.splitlines():
            w = line.split()
            if w and w[0] == "ack":
                acked[int(w[1])] = int(w[2])
                pending[int(w[1])] = int(w[2])
            elif w and w[0] == "flushed":
                flushed.update(pending)
                pending = {}
        if expect_ok:
            assert self.p.returncode == 0, f"writer exit {self.p.returncode}: {out[-300:]}{err}"
        return acked, flushed, out.splitlines()[-1:] if out else []


    def read_all(self):
        self.reader.join(timeout=60)
        out = "".join(line for _, line in self.lines)
        err = self.p.stderr.read()
        self.p.wait(timeout=60)
        return out, err

    def outcome(self):
        """After the daemon was killed: {slot: (durable, maybe)}: the pattern a flushed write
        left (None = the original data) and the patterns written since the last flush that
        was acknowledged (a slot may hold any of those, or the durable one)."""
        out, _ = self.read_all()
        if os.environ.get("DS_DEBUG"):
            sys.stderr.write(out)
        state, since = {}, {}
        for line in out.splitlines():
            w = line.split()
            if w and w[0] == "try":
                since.setdefault(int(w[1]), []).append(int(w[2]))
            elif w and w[0] == "flushed":
                for i, pats in since.items():
                    state[i] = (pats[-1], [])
                since = {}
        for i, pats in since.items():
            state[i] = (state.get(i, (None, []))[0], pats)
        return state


def check_slots(got, ref, state, what):
    """`got` is `ref` with each slot of `state` (see Writer.outcome) durable or maybe."""
    assert len(got) == len(ref), what
    S = 65536
    for i in range(len(ref) // S):
        a, old = got[i * S:(i + 1) * S], ref[i * S:(i + 1) * S]
        if i not in state:
            assert a == old, f"{what}: slot {i} changed (now {sorted(set(a))[:4]}, was {sorted(set(old))[:4]})"
            continue
        durable, maybe = state[i]
        ok = [old if durable is None else bytes([durable]) * S] + [bytes([p]) * S for p in maybe]
        assert a in ok, f"{what}: slot {i} lost an acknowledged write or is torn"


def image_bytes(path, fmt="qcow2"):
    out = path + ".got.raw"
    run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def apply_slots(ref, slots):
    b = bytearray(ref)
    for i, pat in slots.items():
        b[i * 65536:(i + 1) * 65536] = bytes([pat]) * 65536
    return bytes(b)


def test_precopy_mirror_to_nbd(exe, d):
    """Pre-copy block migration (QEMU's recipe) between two daemons: the destination exports
    a writable target over NBD; the source mirrors its device into an `nbd` node connected to
    it while a guest writes through the source's export; at READY the guest stops and a soft
    cancel completes the job without a pivot; the target then equals the source byte for byte
    and both pass qemu-img check."""
    sd, dd = os.path.join(d, "src"), os.path.join(d, "dst")
    os.makedirs(sd)
    os.makedirs(dd)
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{sd}/disk.qcow2", "64M")
    run("qemu-io", "-c", "write -P 0x11 0 16M", "-c", "write -P 0x22 40M 8M",
        "-c", "write -z 20M 1M", f"{sd}/disk.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{dd}/disk.qcow2", "64M")
    dst = Daemon(exe, dd, ["--blockdev", "driver=qcow2,node-name=disk,file.driver=file,"
                                         f"file.filename={dd}/disk.qcow2",
                           "--nbd-server", f"addr.type=unix,addr.path={dd}/nbd.sock",
                           "--export", "type=nbd,id=t,node-name=disk,writable=on"])
    src = Daemon(exe, sd, ["--blockdev", "driver=qcow2,node-name=disk,file.driver=file,"
                                         f"file.filename={sd}/disk.qcow2",
                           "--nbd-server", f"addr.type=unix,addr.path={sd}/nbd.sock",
                           "--export", "type=nbd,id=g,node-name=disk,writable=on"])
    try:
        qd, qs = dst.qmp(), src.qmp()
        w = Writer(f"nbd+unix:///disk?socket={sd}/nbd.sock", d, 21)
        qs.cmd("blockdev-add", {"driver": "nbd", "node-name": "tgt",
                                "server": {"type": "unix", "path": f"{dd}/nbd.sock"},
                                "export": "disk"})
        qs.cmd("blockdev-mirror", {"job-id": "m", "device": "disk", "target": "tgt",
                                   "sync": "full"})
        qs.wait_event("BLOCK_JOB_READY", device="m")
        time.sleep(0.5)  # the guest keeps writing in READY: the mirror follows
        acked, _, _ = w.finish()
        assert len(acked) >= 4, f"only {len(acked)} guest writes"
        qs.cmd("block-job-cancel", {"device": "m"})
        e = qs.wait_event("BLOCK_JOB_COMPLETED", device="m")
        assert "error" not in e["data"], e
        qs.cmd("blockdev-del", {"node-name": "tgt"})
        qs.cmd("quit")
        qd.cmd("quit")
        assert src.wait() == 0 and dst.wait() == 0
    finally:
        for dm in (src, dst):
            if dm.p.poll() is None:
                dm.kill9()
    check_clean(f"{sd}/disk.qcow2")
    check_clean(f"{dd}/disk.qcow2")
    r = run("qemu-img", "compare", f"{sd}/disk.qcow2", f"{dd}/disk.qcow2", check=False)
    assert r.returncode == 0, f"target differs from the source: {r.stdout}{r.stderr}"


def test_switch_under_io(exe, d):
    """x-blockdev-switch with an NBD client writing and reading through the export across the
    switch (one connection, never dropped): the export moves to an image opened on the spot
    (backed by the old one, which becomes its read-only backing node), every acknowledged
    write reads back, before and after; the old image holds exactly what was written before
    the switch; refusals (sizes differ, no format, read-only target, busy node) change
    nothing."""
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/src.qcow2", "32M")
    run("qemu-io", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 20M 4M", f"{d}/src.qcow2")
    ref = image_bytes(f"{d}/src.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", f"{d}/dst.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/small.qcow2", "16M")
    run("qemu-img", "create", "-q", "-f", "raw", f"{d}/ro.raw", "32M")
    dm = Daemon(exe, d, ["--blockdev", "driver=qcow2,node-name=src,file.driver=file,file.filename=src.qcow2",
                         "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
                         "--export", "type=nbd,id=e,node-name=src,writable=on"])
    try:
        q = dm.qmp()
        q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "small",
                               "file": {"driver": "file", "filename": f"{d}/small.qcow2"}})
        q.cmd("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                               "file": {"driver": "file", "filename": f"{d}/ro.raw"}})
        w = Writer(f"nbd+unix:///src?socket={d}/nbd.sock", d, 5)
        time.sleep(0.5)
        errs = [
            ({"device": "src", "target": "small"},
             "Cannot switch 'src' to 'small': the sizes differ (33554432 and 16777216 bytes)"),
            ({"device": "src", "target": "ro"},
             "Cannot switch writable users of 'src' to read-only node 'ro'"),
            ({"device": "src", "filename": f"{d}/dst.qcow2", "node-name": "dst"},
             "Parameter 'format' is missing (formats are never probed)"),
            ({"device": "src"}, "Exactly one of 'target' and 'filename' must be given"),
            ({"device": "src", "target": "src"}, "Node 'src' cannot be switched to itself"),
            ({"device": "nope", "target": "small"}, "Cannot find device='nope' nor node-name='nope'"),
            ({"device": "src", "filename": f"{d}/small.qcow2", "format": "qcow2", "node-name": "s2"},
             "Failed to get \"write\" lock"),
        ]
        for args, text in errs:
            r = q.cmd("x-blockdev-switch", args, ok=False)
            assert r.get("error", {}).get("desc") == text, (args, r)
        # The refused file open left nothing behind; the export is still on src.
        names = [n["node-name"] for n in q.cmd("query-named-block-nodes", {"flat": True})]
        assert "s2" not in names and "dst" not in names, names
        # Writes acknowledged before this point are in src.qcow2.
        t0 = time.time()
        q.cmd("x-blockdev-switch", {"device": "src", "filename": f"{d}/dst.qcow2",
                                    "format": "qcow2", "node-name": "dst"})
        print(f"     switch took {1000 * (time.time() - t0):.1f} ms under I/O")
        exports = q.cmd("query-block-exports")
        assert exports == [{"id": "e", "type": "nbd", "node-name": "dst", "shutting-down": False}], exports
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes", {"flat": True})}
        assert nodes["src"]["ro"] is True, nodes["src"]
        assert nodes["dst"]["ro"] is False and nodes["dst"]["backing_file"].endswith("src.qcow2"), nodes["dst"]
        # The old node is now dst's backing: it cannot be switched or deleted.
        r = q.cmd("blockdev-del", {"node-name": "src"}, ok=False)
        assert "error" in r, r
        # Give the guest time to write after the switch (generous: CI machines are loaded).
        t_switched = time.time()
        time.sleep(2.0)
        after = w.acked_since(t_switched)
        acked, _, tail = w.finish()
        assert after > 0, "the guest made no write in the 2 s after the switch (I/O stalled)"
        assert len(acked) >= 8, f"only {len(acked)} writes"
        q.cmd("quit")
        assert dm.wait() == 0
    finally:
        if dm.p.poll() is None:
            dm.kill9()
    check_clean(f"{d}/src.qcow2")
    check_clean(f"{d}/dst.qcow2")
    assert backing_of(f"{d}/dst.qcow2") == "src.qcow2"
    got = image_bytes(f"{d}/dst.qcow2")
    assert got == apply_slots(ref, acked), "the chain after the switch lost or changed data"
    # src.qcow2 holds the writes made before the switch, nothing after: every slot reads as
    # the original or as some pattern the guest wrote there.
    old = image_bytes(f"{d}/src.qcow2")
    assert old != ref or not acked, "writes before the switch should be in src.qcow2"
    for i in range(len(ref) // 65536):
        a = old[i * 65536:(i + 1) * 65536]
        assert a == ref[i * 65536:(i + 1) * 65536] or len(set(a)) == 1, f"slot {i} torn in src"
    # dst.qcow2 allocates only what was written after the switch.
    m = json.loads(run("qemu-img", "map", "--output=json", f"{d}/dst.qcow2").stdout)
    assert any(e["depth"] == 0 and e["data"] for e in m), \
        f"none of the {after} writes acknowledged after the switch landed in dst.qcow2"



def test_mirror_pivot_under_io(exe, d):
    """Pivot under continuous guest writes through the NBD export (one libnbd connection,
    never dropped): a mirror in each copy mode and an active commit run while the guest
    writes, and the guest keeps writing across block-job-complete and after it. The export
    ends on the new node, whose image equals the original disk plus every acknowledged
    write (before, during and after the pivot); every image passes qemu-img check."""
    cases = [("mirror background", "tgt", {"copy-mode": "background"}),
             ("mirror write-blocking", "tgt", {"copy-mode": "write-blocking"}),
             ("active commit", "base", None)]
    for n, (label, new, mode) in enumerate(cases):
        mkchain(d)
        ref = open(f"{d}/ref.raw", "rb").read()
        run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/tgt.qcow2", "64M")
        dm = Daemon(exe, d, ["--blockdev", TOP] + nbd_args(d))
        try:
            q = dm.qmp()
            w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, 400 + n)
            if mode is None:
                new_node = node_by_file(q, "base.qcow2")
                q.cmd("block-commit", {"job-id": "j", "device": "top", "base-node": new_node})
            else:
                q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {
                    "driver": "file", "filename": f"{d}/tgt.qcow2"}})
                new_node = "tgt"
                q.cmd("blockdev-mirror", dict({"job-id": "j", "device": "top", "target": "tgt",
                                               "sync": "full"}, **mode))
            q.wait_event("BLOCK_JOB_READY", device="j")
            time.sleep(0.3)  # the guest keeps writing in READY
            before = len(w.lines)
            q.cmd("block-job-complete", {"device": "j"})
            e = q.wait_event("BLOCK_JOB_COMPLETED", device="j")
            assert "error" not in e["data"], (label, e)
            t_pivot = time.time()
            time.sleep(0.5)  # and after the pivot
            after = w.acked_since(t_pivot)
            acked, _, _ = w.finish()
            exports = q.cmd("query-block-exports")
            assert [x["node-name"] for x in exports] == [new_node], (label, exports)
            q.cmd("quit")
            assert dm.wait() == 0
        finally:
            if dm.p.poll() is None:
                dm.kill9()
        print(f"     {label}: {len(acked)} slots written, {before} writer lines before "
              f"complete, {after} writes acknowledged after the pivot")
        assert after > 0, f"{label}: the guest made no write after the pivot"
        for img in ("base", "mid", "top") + (("tgt",) if mode else ()):
            check_clean(f"{d}/{img}.qcow2")
        got = image_bytes(f"{d}/{new}.qcow2")
        assert got == apply_slots(ref, acked), \
            f"{label}: {new}.qcow2 is not the disk plus every acknowledged write"


def nbd_io_ok(url, *cmds):
    """Run qemu-io commands against the NBD export at `url`; fail on any failed command."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = run(*(args + [url]), check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "failed" not in out, f"{cmds}: {out}"


def test_switch_under_cor(exe, d):
    """x-blockdev-switch of a node under a copy-on-read filter exported writable: the filter's
    file child moves to the new image with the export (QEMU's bdrv_replace_node moves every
    parent), so guest writes after the switch land in the new image (not in the old one, now
    read-only), reads still copy into the active layer, and a second switch to a named node
    moves the filter again."""
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/src.qcow2", "32M")
    run("qemu-io", "-c", "write -P 0x11 0 8M", f"{d}/src.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", f"{d}/dst.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/other.qcow2", "32M")
    url = f"nbd+unix:///cor?socket={d}/nbd.sock"

    def io(*cmds):
        nbd_io_ok(url, *cmds)

    dm = Daemon(exe, d, ["--blockdev", "driver=qcow2,node-name=src,file.driver=file,file.filename=src.qcow2",
                         "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock"])
    try:
        q = dm.qmp()
        q.cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "src"})
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "cor", "writable": True})
        io("write -P 0x55 0 1M")
        q.cmd("x-blockdev-switch", {"device": "src", "filename": f"{d}/dst.qcow2",
                                    "format": "qcow2", "node-name": "dst"})
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes", {"flat": True})}
        assert nodes["src"]["ro"] is True, nodes["src"]
        assert "dst.qcow2" in nodes["cor"]["file"], nodes["cor"]
        io("write -P 0x66 1M 1M", "read -P 0x55 0 1M", "read -P 0x11 4M 1M")
        # To a named node: the filter (and the export through it) moves again.
        q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "other",
                               "file": {"driver": "file", "filename": f"{d}/other.qcow2"}})
        q.cmd("x-blockdev-switch", {"device": "dst", "target": "other"})
        nodes = {n["node-name"]: n for n in q.cmd("query-named-block-nodes", {"flat": True})}
        assert "other.qcow2" in nodes["cor"]["file"], nodes["cor"]
        io("write -P 0x77 2M 1M", "read -P 0x77 2M 1M", "read -P 0 0 1M")
        q.cmd("quit")
        assert dm.wait() == 0
    finally:
        if dm.p.poll() is None:
            dm.kill9()
    for img in ("src", "dst", "other"):
        check_clean(f"{d}/{img}.qcow2")
    # src holds the write before the first switch only; dst the one after it and the copy
    # its read made; other the write after the second switch.
    run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x55 0 1M", "-c", "read -P 0x11 1M 1M",
        f"{d}/src.qcow2")
    m = json.loads(run("qemu-img", "map", "--output=json", f"{d}/dst.qcow2").stdout)
    own = [(e["start"], e["length"]) for e in m if e["depth"] == 0 and e["data"]]
    assert any(s <= MiB < s + n for s, n in own), f"the write after the switch is not in dst: {own}"
    r = run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x66 1M 1M", f"{d}/dst.qcow2")
    assert "failed" not in r.stdout, r.stdout
    r = run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x77 2M 1M", f"{d}/other.qcow2")
    assert "failed" not in r.stdout, r.stdout


def test_switch_qed(exe, d):
    """x-blockdev-switch with QED images, as with qcow2: a QED device exported writable is
    switched to a QED image opened on the spot whose header names the device's file (QED
    records only "not raw", which the open QED node satisfies), so the old node becomes its
    read-only backing node; then to a qcow2 overlay recording backing format "qed" over the
    new node, then back to a named QED node. A QED header that records raw for a QED node is
    refused and leaves nothing behind. Every write reads back through the export, each image
    holds exactly what was written while it was active, and qemu-img check is clean."""
    run("qemu-img", "create", "-q", "-f", "qed", f"{d}/src.qed", "32M")
    run("qemu-io", "-f", "qed", "-c", "write -P 0x11 0 8M", f"{d}/src.qed")
    run("qemu-img", "create", "-q", "-f", "qed", "-b", "src.qed", "-F", "qed", f"{d}/dst.qed")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "dst.qed", "-F", "qed", f"{d}/top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qed", "-b", "src.qed", "-F", "raw", f"{d}/wrong.qed")
    run("qemu-img", "create", "-q", "-f", "qed", f"{d}/other.qed", "32M")
    url = f"nbd+unix:///src?socket={d}/nbd.sock"

    def io(*cmds):
        nbd_io_ok(url, *cmds)

    def nodes(q):
        return {n["node-name"]: n for n in q.cmd("query-named-block-nodes", {"flat": True})}

    dm = Daemon(exe, d, ["--blockdev", "driver=qed,node-name=src,file.driver=file,file.filename=src.qed",
                         "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
                         "--export", "type=nbd,id=e,node-name=src,writable=on"])
    try:
        q = dm.qmp()
        io("write -P 0x22 1M 1M")
        r = q.cmd("x-blockdev-switch", {"device": "src", "filename": f"{d}/wrong.qed",
                                        "format": "qed", "node-name": "w"}, ok=False)
        assert r.get("error", {}).get("desc") == (
            f"'{d}/wrong.qed' records backing format 'raw' for 'src.qed', which is open as 'qed'"), r
        assert "w" not in nodes(q)
        q.cmd("x-blockdev-switch", {"device": "src", "filename": f"{d}/dst.qed",
                                    "format": "qed", "node-name": "dst"})
        exports = q.cmd("query-block-exports")
        assert [x["node-name"] for x in exports] == ["dst"], exports
        n = nodes(q)
        assert n["src"]["ro"] is True and n["dst"]["ro"] is False, n
        assert n["dst"]["drv"] == "qed" and n["dst"]["backing_file"].endswith("src.qed"), n["dst"]
        io("write -P 0x33 2M 1M", "read -P 0x22 1M 1M", "read -P 0x11 4M 1M")
        # A qcow2 overlay whose header records backing format qed, over the new QED node.
        q.cmd("x-blockdev-switch", {"device": "dst", "filename": f"{d}/top.qcow2",
                                    "format": "qcow2", "node-name": "top"})
        n = nodes(q)
        assert n["dst"]["ro"] is True and n["top"]["backing_file"].endswith("dst.qed"), n
        io("write -P 0x44 3M 1M", "read -P 0x33 2M 1M", "read -P 0x22 1M 1M")
        # To a named QED node.
        q.cmd("blockdev-add", {"driver": "qed", "node-name": "other",
                               "file": {"driver": "file", "filename": f"{d}/other.qed"}})
        q.cmd("x-blockdev-switch", {"device": "top", "target": "other"})
        io("write -P 0x55 5M 1M", "read -P 0x55 5M 1M", "read -P 0 0 1M")
        q.cmd("quit")
        assert dm.wait() == 0
    finally:
        if dm.p.poll() is None:
            dm.kill9()
    for img in ("src.qed", "dst.qed", "top.qcow2", "other.qed"):
        check_clean(f"{d}/{img}")
    assert backing_of(f"{d}/dst.qed") == "src.qed"
    assert backing_of(f"{d}/top.qcow2") == "dst.qed"
    # Each image holds the writes made while it was active, and nothing later.
    def check_reads(fmt, path, *cmds):
        args = ["qemu-io", "-f", fmt, "-r"]
        for c in cmds:
            args += ["-c", c]
        out = run(*(args + [path])).stdout
        assert "failed" not in out, f"{path}: {out}"

    check_reads("qed", f"{d}/src.qed", "read -P 0x22 1M 1M", "read -P 0x11 2M 2M")
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "qed", f"{d}/dst.qed").stdout)
    own = [(e["start"], e["length"]) for e in m if e["depth"] == 0 and e["data"]]
    assert own == [(2 * MiB, MiB)], f"dst.qed should hold the 0x33 write only: {own}"
    check_reads("qcow2", f"{d}/top.qcow2", "read -P 0x44 3M 1M", "read -P 0x33 2M 1M",
                "read -P 0x22 1M 1M", "read -P 0x11 4M 4M")
    check_reads("qed", f"{d}/other.qed", "read -P 0x55 5M 1M", "read -P 0 0 5M")


def test_copy_helper(exe, d):
    """`diskstream copy` (live block copy via streaming) while a guest writes and reads over
    NBD: with --base the destination ends up backed by the base only, without it
    self-contained; both read what the chain held plus every acknowledged write; the source
    files pass qemu-img check; refusals (existing destination, unknown node) leave the
    device where it was."""
    mkchain(d)
    ref = open(f"{d}/ref.raw", "rb").read()
    for with_base in (True, False):
        for f in ("dst.qcow2",):
            if os.path.exists(f"{d}/{f}"):
                os.unlink(f"{d}/{f}")
        run("cp", f"{d}/ref.raw", f"{d}/ref-keep.raw")
        blockdevs = [
            "--blockdev", f"driver=qcow2,node-name=base,file.driver=file,file.filename={d}/base.qcow2",
            "--blockdev", f"driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename={d}/mid.qcow2",
            "--blockdev", f"driver=qcow2,node-name=top,backing=mid,file.driver=file,file.filename={d}/top.qcow2",
            "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
            "--export", "type=nbd,id=e,node-name=top,writable=on"]
        dm = Daemon(exe, d, blockdevs)
        try:
            q = dm.qmp()
            open(f"{d}/exists.qcow2", "w").close()
            for extra, text in ((["--node", "top", "--dest", f"{d}/exists.qcow2"], "exists"),
                                (["--node", "nope", "--dest", f"{d}/x.qcow2"], "no node 'nope'")):
                r = run(exe, "copy", "--qmp", dm.sock, *extra, check=False)
                assert r.returncode == 1 and text in r.stderr, r.stderr
            assert q.cmd("query-block-exports")[0]["node-name"] == "top"
            w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, 21 if with_base else 22)
            time.sleep(0.3)
            args = [exe, "copy", "--qmp", dm.sock, "--node", "top", "--dest", f"{d}/dst.qcow2",
                    "--speed", str(8 * MiB)]
            if with_base:
                args += ["--base", "base"]
            r = run(*args)
            print("     " + r.stderr.strip().splitlines()[-1])
            assert "switched 'top' to 'top-copy'" in r.stderr and "streaming:" in r.stderr, r.stderr
            assert q.cmd("query-block-exports")[0]["node-name"] == "top-copy"
            time.sleep(0.3)
            acked, _, _ = w.finish()
            assert len(acked) >= 8, f"only {len(acked)} writes"
            q.cmd("quit")
            assert dm.wait() == 0
        finally:
            if dm.p.poll() is None:
                dm.kill9()
        for img in ("base", "mid", "top", "dst"):
            check_clean(f"{d}/{img}.qcow2")
        assert backing_of(f"{d}/dst.qcow2") == (f"{d}/base.qcow2" if with_base else None)
        assert image_bytes(f"{d}/dst.qcow2") == apply_slots(ref, acked), "copy lost or changed data"
        if not with_base:
            os.rename(f"{d}/base.qcow2", f"{d}/base.moved")
            assert image_bytes(f"{d}/dst.qcow2") == apply_slots(ref, acked)
            os.rename(f"{d}/base.moved", f"{d}/base.qcow2")
        # Start the next round from the original chain's content.
        mkchain(d)


EXPORT_TOP = ["--export", "type=nbd,id=e,node-name=top,writable=on"]


def nbd_args(d):
    return ["--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock"] + EXPORT_TOP


def node_by_file(q, suffix):
    nodes = q.cmd("query-named-block-nodes", {"flat": True})
    return [n["node-name"] for n in nodes if n["drv"] == "qcow2" and n["file"].endswith(suffix)][0]


def test_kill_during_mirror(exe, d):
    """kill -9 at random points of a mirror (background and write-blocking, before and after
    READY) while a guest writes over NBD: the source chain holds every flushed write and
    otherwise old-or-new data per slot, no image is corrupt, and a mirror restarted on the
    same target reaches READY and pivots to a target equal to the source."""
    rng = random.Random(31)
    mkchain(d)
    ref = open(f"{d}/ref.raw", "rb").read()
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/tgt.qcow2", "64M")
    tgt = {"driver": "qcow2", "node-name": "tgt", "file": {"driver": "file", "filename": f"{d}/tgt.qcow2"}}
    state = {}
    for attempt in range(4):
        dm = Daemon(exe, d, ["--blockdev", TOP] + nbd_args(d))
        q = dm.qmp()
        q.cmd("blockdev-add", tgt)
        w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, 100 + attempt)
        mode = "write-blocking" if attempt % 2 else "background"
        q.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                                  "copy-mode": mode, "speed": 24 * MiB if attempt < 2 else 0})
        time.sleep(rng.uniform(0.1, 1.5))
        dm.kill9()
        got = w.outcome()
        for i, (durable, maybe) in got.items():
            prev = state.get(i, (None, []))
            state[i] = (durable if durable is not None or maybe else prev[0],
                        maybe + ([prev[0]] if durable is None and prev[0] is not None else []) + prev[1])
        for img in ("base", "mid", "top", "tgt"):
            check_no_corruption(f"{d}/{img}.qcow2")
        check_slots(image_bytes(f"{d}/top.qcow2"), ref, state, f"attempt {attempt} ({mode})")
        assert backing_of(f"{d}/top.qcow2") == "mid.qcow2"
    dm = Daemon(exe, d, ["--blockdev", TOP])
    q = dm.qmp()
    q.cmd("blockdev-add", tgt)
    q.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full"})
    q.wait_event("BLOCK_JOB_READY", device="m")
    q.cmd("block-job-complete", {"device": "m"})
    e = q.wait_event("BLOCK_JOB_COMPLETED", device="m")
    assert "error" not in e["data"], e
    q.cmd("quit")
    assert dm.wait() == 0
    # Clusters a killed daemon had allocated but not yet linked stay leaked (as with QEMU,
    # until `check -r leaks`); nothing may be corrupt.
    check_no_corruption(f"{d}/tgt.qcow2")
    r = run("qemu-img", "compare", f"{d}/top.qcow2", f"{d}/tgt.qcow2", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kill_during_commit(exe, d):
    """kill -9 at random points of an intermediate commit (mid into base) and an active
    commit (top into mid): the top chain reads exactly as before, every 64 KiB slot of the
    commit's base reads as before or as the committed data, nothing is corrupt; the commit
    run again completes with the same contents."""
    rng = random.Random(41)
    for active in (False, True):
        mkchain(d)
        base_view = image_bytes(f"{d}/base.qcow2")
        mid_view = image_bytes(f"{d}/mid.qcow2")
        ref = open(f"{d}/ref.raw", "rb").read()
        old, new, img = (mid_view, ref, "mid") if active else (base_view, mid_view, "base")
        for attempt in range(3):
            dm = Daemon(exe, d, ["--blockdev", TOP])
            q = dm.qmp()
            if active:
                args = {"job-id": "c", "device": "top", "base-node": node_by_file(q, "mid.qcow2")}
            else:
                args = {"job-id": "c", "device": "top", "top-node": node_by_file(q, "mid.qcow2"),
                        "base-node": node_by_file(q, "base.qcow2")}
            q.cmd("block-commit", dict(args, speed=16 * MiB))
            time.sleep(rng.uniform(0.05, 1.2))
            if active and attempt == 2:
                q.wait_event("BLOCK_JOB_READY", device="c")
            dm.kill9()
            for i in ("base", "mid", "top"):
                check_no_corruption(f"{d}/{i}.qcow2")
            same_content(d)
            got = image_bytes(f"{d}/{img}.qcow2")
            S = 65536
            for s in range(len(got) // S):
                a = got[s * S:(s + 1) * S]
                assert a in (old[s * S:(s + 1) * S], new[s * S:(s + 1) * S]), \
                    f"{'active' if active else 'intermediate'} commit, attempt {attempt}: {img} slot {s}"
            assert backing_of(f"{d}/top.qcow2") == "mid.qcow2"
        dm = Daemon(exe, d, ["--blockdev", TOP])
        q = dm.qmp()
        q.cmd("block-commit", dict(args, **({"base-node": node_by_file(q, "mid.qcow2")} if active else
                                            {"top-node": node_by_file(q, "mid.qcow2"),
                                             "base-node": node_by_file(q, "base.qcow2")})))
        if active:
            q.wait_event("BLOCK_JOB_READY", device="c")
            q.cmd("block-job-complete", {"device": "c"})
        e = q.wait_event("BLOCK_JOB_COMPLETED", device="c")
        assert "error" not in e["data"], e
        q.cmd("quit")
        assert dm.wait() == 0
        for i in ("base", "mid", "top"):
            check_clean(f"{d}/{i}.qcow2")
        if active:
            r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", f"{d}/ref.raw", f"{d}/mid.qcow2", check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        else:
            same_content(d)
            assert backing_of(f"{d}/top.qcow2") == "base.qcow2"


def test_kill_during_snapshot(exe, d):
    """kill -9 at random points around blockdev-snapshot-sync while a guest writes over NBD:
    the images pass qemu-img check (an overlay cut off while being created is ignored), and
    the newest valid chain (overlay, else the old image) holds every flushed write and
    old-or-new data elsewhere."""
    rng = random.Random(51)
    for attempt in range(5):
        for f in ("snap.qcow2",):
            if os.path.exists(f"{d}/{f}"):
                os.unlink(f"{d}/{f}")
        mkchain(d)
        ref = open(f"{d}/ref.raw", "rb").read()
        dm = Daemon(exe, d, ["--blockdev", TOP] + nbd_args(d))
        q = dm.qmp()
        w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, 200 + attempt)
        time.sleep(rng.uniform(0.05, 0.3))
        msg = {"execute": "blockdev-snapshot-sync",
               "arguments": {"node-name": "top", "snapshot-file": f"{d}/snap.qcow2",
                             "snapshot-node-name": "snap", "format": "qcow2"}}
        q.f.write(json.dumps(msg).encode() + b"\n")
        q.f.flush()
        time.sleep(rng.choice([0, 0.001, 0.005, 0.02, 0.2]))
        dm.kill9()
        state = w.outcome()
        check_no_corruption(f"{d}/top.qcow2")
        chain = f"{d}/top.qcow2"
        if os.path.exists(f"{d}/snap.qcow2"):
            info = run("qemu-img", "info", "-U", "-f", "qcow2", "--output=json", f"{d}/snap.qcow2",
                       check=False)
            v = json.loads(info.stdout) if info.returncode == 0 else {}
            print(f"     attempt {attempt}: overlay {v.get('virtual-size')} bytes, backing {v.get('backing-filename')}")
            # Creation cut off before the header was complete: the command had not
            # returned and no user was switched; the old image is the disk.
            if v.get("virtual-size") == len(ref) and v.get("backing-filename") in ("top.qcow2", f"{d}/top.qcow2"):
                check_no_corruption(f"{d}/snap.qcow2")
                chain = f"{d}/snap.qcow2"
        check_reopen(exe, chain, ref, state, [f"{d}/top.qcow2"],
                     f"attempt {attempt} ({os.path.basename(chain)})")


def drain_after_kill(q):
    """Everything the killed daemon had written to this QMP connection (replies and events
    still in the socket buffer): what a management client had been told before the kill."""
    msgs = []
    try:
        q.s.settimeout(5)
        for line in q.f:
            try:
                msgs.append(json.loads(line))
            except ValueError:
                break
    except OSError:
        pass
    return q.events + msgs


def completed_ok(msgs, job):
    return any(m.get("event") == "BLOCK_JOB_COMPLETED" and m["data"].get("device") == job
               and "error" not in m["data"] for m in msgs)


def check_reopen(exe, chain, ref, state, images, what):
    """After a kill -9: no image is corrupt (leaks allowed), the chain the user reopens opens
    with qemu-img and with `diskstream img`, both read the same bytes, and every 64 KiB slot
    holds its last flushed write or a newer acknowledged one (Writer.outcome)."""
    for img in images:
        if os.path.exists(img):
            check_no_corruption(img)
    run("qemu-img", "info", "-U", chain)
    run(exe, "img", "info", chain)
    got = image_bytes(chain)
    ours = chain + ".ours.raw"
    run(exe, "img", "convert", "-f", "qcow2", "-O", "raw", chain, ours)
    with open(ours, "rb") as f:
        same = f.read() == got
    os.unlink(ours)
    assert same, f"{what}: diskstream img convert and qemu-img convert of {chain} differ"
    check_slots(got, ref, state, what)


def kill_job_rounds(exe, d, rng, label, rounds, start, new_chain):
    """Rounds of: fresh chain, daemon with an NBD export of `top`, a guest writing flushed
    batches over it, `start(q, point)` (returns the job id or None), kill -9 at the point,
    then check_reopen on the chain the user reopens: `new_chain` once the daemon reported
    the job COMPLETED (the pivot happened), else top.qcow2 (the source)."""
    for n, point in enumerate(rounds):
        for f in ("tgt.qcow2", "dst.qcow2"):
            if os.path.exists(f"{d}/{f}"):
                os.unlink(f"{d}/{f}")
        mkchain(d)
        ref = open(f"{d}/ref.raw", "rb").read()
        dm = Daemon(exe, d, ["--blockdev", TOP] + nbd_args(d))
        try:
            q = dm.qmp()
            w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, rng.randrange(1 << 30))
            time.sleep(rng.uniform(0.05, 0.2))
            job = start(q, point)
            dm.kill9()
        finally:
            if dm.p.poll() is None:
                dm.kill9()
        msgs = drain_after_kill(q)
        state = w.outcome()
        pivoted = job is not None and completed_ok(msgs, job)
        chain = new_chain if pivoted else f"{d}/top.qcow2"
        flushed = sum(1 for v in state.values() if v[0] is not None)
        print(f"     {label} [{point}]: reopen {os.path.basename(chain)}, {flushed} slots flushed")
        images = [f"{d}/{i}.qcow2" for i in ("base", "mid", "top", "tgt", "dst")]
        check_reopen(exe, chain, ref, state, images, f"{label} [{point}] round {n}")


def wait_ready_then(q, job, rng, complete):
    q.wait_event("BLOCK_JOB_READY", device=job)
    if complete:
        # Sent without waiting for the reply: the kill lands somewhere in the quiesce, the
        # final copy, the pivot or just after it.
        q.f.write(json.dumps({"execute": "block-job-complete",
                              "arguments": {"device": job}}).encode() + b"\n")
        q.f.flush()
        time.sleep(rng.choice([0, 0.0005, 0.002, 0.01, 0.05]))
    else:
        time.sleep(rng.uniform(0.05, 0.4))


def test_kill9_mirror_commit_under_writer(exe, d):
    """kill -9 (a real process kill) at seeded random points of blockdev-mirror sync=full
    (before READY, after READY, during block-job-complete), intermediate commit and active
    commit (before READY, after READY, during complete) while a guest writes flushed batches
    through the NBD export: see kill_job_rounds / check_reopen."""
    rng = random.Random(61)

    def mirror(q, point):
        run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/tgt.qcow2", "64M")
        q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                               "file": {"driver": "file", "filename": f"{d}/tgt.qcow2"}})
        mode = rng.choice(["background", "write-blocking"])
        q.cmd("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                                  "copy-mode": mode,
                                  "speed": 16 * MiB if point == "before READY" else 0})
        if point == "before READY":
            time.sleep(rng.uniform(0.05, 1.0))
        else:
            wait_ready_then(q, "m", rng, point == "during complete")
        return "m"

    kill_job_rounds(exe, d, rng, "mirror sync=full", ["before READY", "after READY",
                                                      "during complete", "during complete"],
                    mirror, f"{d}/tgt.qcow2")

    def commit_intermediate(q, point):
        q.cmd("block-commit", {"job-id": "c", "device": "top", "speed": 8 * MiB,
                               "top-node": node_by_file(q, "mid.qcow2"),
                               "base-node": node_by_file(q, "base.qcow2")})
        time.sleep(rng.uniform(0.05, 1.5))
        return "c"

    # The active layer stays top.qcow2 whether or not the commit finished (its backing link
    # then names base.qcow2).
    kill_job_rounds(exe, d, rng, "intermediate commit", ["running", "running"],
                    commit_intermediate, f"{d}/top.qcow2")

    def commit_active(q, point):
        q.cmd("block-commit", {"job-id": "c", "device": "top",
                               "base-node": node_by_file(q, "mid.qcow2"),
                               "speed": 16 * MiB if point == "before READY" else 0})
        if point == "before READY":
            time.sleep(rng.uniform(0.05, 0.5))
        else:
            wait_ready_then(q, "c", rng, point == "during complete")
        return "c"

    # After the pivot the disk is mid.qcow2 (backed by base.qcow2).
    kill_job_rounds(exe, d, rng, "active commit", ["before READY", "after READY",
                                                   "during complete"],
                    commit_active, f"{d}/mid.qcow2")


def test_kill9_switch_and_copy_under_writer(exe, d):
    """kill -9 at seeded random points of x-blockdev-switch (to an image file backed by the
    device's) and of the `diskstream copy` CLI (create, switch, stream) while a guest writes
    flushed batches through the NBD export. The user reopens the new image: it is backed by
    the old one, so it reads as the device whether or not the switch happened (it must, once
    the switch was reported); see check_reopen. The CLI keeps the destination when the daemon
    dies during the switch (it deletes it only after a refusal)."""
    rng = random.Random(71)

    def switch(q, point):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2",
            f"{d}/dst.qcow2")
        q.f.write(json.dumps({"execute": "x-blockdev-switch", "id": "sw", "arguments": {
            "device": "top", "filename": f"{d}/dst.qcow2", "format": "qcow2",
            "node-name": "dst"}}).encode() + b"\n")
        q.f.flush()
        time.sleep(point)
        return None

    # The switch is a command, not a job: its reply tells whether it happened.
    for n, point in enumerate([rng.choice([0, 0.0005]), rng.uniform(0.001, 0.01), 0.2]):
        for f in ("dst.qcow2",):
            if os.path.exists(f"{d}/{f}"):
                os.unlink(f"{d}/{f}")
        mkchain(d)
        ref = open(f"{d}/ref.raw", "rb").read()
        dm = Daemon(exe, d, ["--blockdev", TOP] + nbd_args(d))
        try:
            q = dm.qmp()
            w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, 700 + n)
            time.sleep(rng.uniform(0.05, 0.3))
            switch(q, point)
            dm.kill9()
        finally:
            if dm.p.poll() is None:
                dm.kill9()
        msgs = drain_after_kill(q)
        state = w.outcome()
        switched = any(m.get("id") == "sw" and "return" in m for m in msgs)
        # dst.qcow2 is backed by top.qcow2: it reads as the device whether or not the switch
        # happened, so it is what the user reopens (it must, once the switch was reported).
        chain = f"{d}/dst.qcow2"
        print(f"     x-blockdev-switch [+{point:.4f}s]: switch {'reported' if switched else 'not reported'}")
        images = [f"{d}/{i}.qcow2" for i in ("base", "mid", "top", "dst")]
        check_reopen(exe, chain, ref, state, images, f"switch round {n}")

    for n, (with_base, delay) in enumerate([(False, 0.02), (True, 0.3), (False, 1.0)]):
        if os.path.exists(f"{d}/dst.qcow2"):
            os.unlink(f"{d}/dst.qcow2")
        mkchain(d)
        ref = open(f"{d}/ref.raw", "rb").read()
        blockdevs = [
            "--blockdev", f"driver=qcow2,node-name=base,file.driver=file,file.filename={d}/base.qcow2",
            "--blockdev", f"driver=qcow2,node-name=mid,backing=base,file.driver=file,file.filename={d}/mid.qcow2",
            "--blockdev", f"driver=qcow2,node-name=top,backing=mid,file.driver=file,file.filename={d}/top.qcow2",
        ] + nbd_args(d)
        dm = Daemon(exe, d, blockdevs)
        try:
            dm.qmp()
            w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, 800 + n)
            args = [exe, "copy", "--qmp", dm.sock, "--node", "top", "--dest", f"{d}/dst.qcow2",
                    "--speed", str(8 * MiB)] + (["--base", "base"] if with_base else [])
            cli = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(delay * rng.uniform(0.5, 1.5))
            dm.kill9()
            _, err = cli.communicate(timeout=30)
        finally:
            if dm.p.poll() is None:
                dm.kill9()
        state = w.outcome()
        # The CLI creates dst.qcow2 (backed by top.qcow2) before the switch and keeps it when
        # it cannot tell whether the switch happened: dst.qcow2 is the image to reopen.
        assert "done:" not in err, err
        if "created" in err:
            assert os.path.exists(f"{d}/dst.qcow2"), f"the CLI deleted its destination: {err}"
        chain = f"{d}/dst.qcow2" if os.path.exists(f"{d}/dst.qcow2") else f"{d}/top.qcow2"
        print(f"     diskstream copy [{'--base' if with_base else 'full'}, ~{delay}s]: "
              f"reopen {os.path.basename(chain)}; cli: {err.strip().splitlines()[-1][:100]}")
        images = [f"{d}/{i}.qcow2" for i in ("base", "mid", "top", "dst")]
        check_reopen(exe, chain, ref, state, images, f"copy round {n}")


# Cancel under load must finish well within this (the goal is < 1 s; see the test).
CANCEL_BOUND_MS = 5000


def test_cancel_latency_under_load(exe, d):
    """Cancel a mirror while a guest writes over NBD (two libnbd writers): force cancel
    mid-copy, non-force cancel after READY in write-blocking mode (completes without pivot),
    job-cancel after READY in background mode. Prints each latency (command to final event;
    the issue's goal is < 1 s, measured figures in docs/RELIABILITY.md) and asserts only a
    generous bound, 5 s, far above what any run measured: it catches a cancel that waits for
    the copy or the guest instead of stopping, not a slow machine. The event must arrive and
    the guest must keep its connection."""
    mkchain(d)
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{d}/tgt.qcow2", "64M")
    dm = Daemon(exe, d, ["--blockdev", TOP] + nbd_args(d))
    try:
        q = dm.qmp()
        q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                               "file": {"driver": "file", "filename": f"{d}/tgt.qcow2"}})
        url = f"nbd+unix:///top?socket={d}/nbd.sock"
        ws = [Writer(url, d, 300, range(0, 512)), Writer(url, d, 301, range(512, 1024))]
        cases = [("force cancel mid-copy", {"copy-mode": "background", "speed": 16 * MiB}, False,
                  "block-job-cancel", {"device": "m", "force": True}, "BLOCK_JOB_CANCELLED"),
                 ("cancel after READY (write-blocking)", {"copy-mode": "write-blocking"}, True,
                  "block-job-cancel", {"device": "m"}, "BLOCK_JOB_COMPLETED"),
                 ("job-cancel after READY (background)", {"copy-mode": "background"}, True,
                  "job-cancel", {"id": "m"}, "BLOCK_JOB_CANCELLED")]
        for label, mode, ready, cmd, args, ev in cases:
            q.cmd("blockdev-mirror", dict({"job-id": "m", "device": "top", "target": "tgt",
                                           "sync": "full"}, **mode))
            if ready:
                q.wait_event("BLOCK_JOB_READY", device="m")
            time.sleep(0.3)
            t0 = time.time()
            q.cmd(cmd, args)
            e = q.wait_event(ev, device="m")
            ms = 1000 * (time.time() - t0)
            print(f"     {label}: {ms:.0f} ms")
            assert "error" not in e["data"], e
            assert ms < CANCEL_BOUND_MS, f"{label}: cancel took {ms:.0f} ms (bound {CANCEL_BOUND_MS} ms)"
            while any(j["id"] == "m" for j in q.cmd("query-jobs")):
                time.sleep(0.01)
        for w in ws:
            acked, _, _ = w.finish()
            assert acked, "a writer made no progress"
        q.cmd("quit")
        assert dm.wait() == 0
    finally:
        if dm.p.poll() is None:
            dm.kill9()
    for img in ("top", "tgt"):
        check_clean(f"{d}/{img}.qcow2")


SERVERS = os.path.join(HERE, "..", "..", "..", "diskstream-http", "tests", "servers.py")


class ObjectServer:
    """crates/diskstream-http/tests/servers.py: `range DIR` (a static HTTP server with Range
    support) or `s3 DIR BUCKET` (moto's S3 server); it stops when its stdin closes."""

    def __init__(self, *args):
        self.p = subprocess.Popen([sys.executable, SERVERS] + list(args), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.startswith("PORT "), f"servers.py {args}: {line!r}"
        self.port = int(line.split()[1])

    def stop(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


def http_base(d, size=32 * MiB):
    """objects/base.raw with data, a hole and zeroes; returns its bytes."""
    os.makedirs(f"{d}/objects")
    run("qemu-img", "create", "-q", "-f", "raw", f"{d}/objects/base.raw", str(size))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 6M", "-c", "write -P 0x22 10M 5M",
        "-c", "write -P 0x33 24M 3M", f"{d}/objects/base.raw")
    with open(f"{d}/objects/base.raw", "rb") as f:
        return f.read()


def test_http_backing_stream(exe, d):
    """A qcow2 overlay whose backing file is http:// (qemu-img create -u: QEMU here has no
    curl driver): the daemon opens the header's URL as an implicit read-only `http` node
    (refused when the backing allow-list lacks http://), a guest writes through the NBD export
    while block-stream copies the remote data in; afterwards the overlay has no backing,
    equals the source plus the guest's writes (qemu-img compare) and passes qemu-img check."""
    base = http_base(d)
    srv = ObjectServer("range", f"{d}/objects")
    url = f"http://127.0.0.1:{srv.port}/base.raw"
    try:
        run("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", url, "-F", "raw",
            f"{d}/top.qcow2", str(len(base)))
        # The allow-list applies to URL backing files as to local ones.
        dm = Daemon(exe, d, ["--nbd-server", "none", "--blockdev", TOP],
                    env={"DISKSTREAM_BACKING_ALLOW": f"{d}:nbd://"})
        assert dm.wait() != 0
        err = dm.p.stderr.read().decode()
        assert "URL scheme 'http' is not in the backing allow-list" in err, err
        env = {"DISKSTREAM_BACKING_ALLOW": f"{d}:http://", "DISKSTREAM_HTTP_BLOCK_SIZE": "65536"}
        dm = Daemon(exe, d, ["--blockdev", TOP] + nbd_args(d), env=env)
        try:
            q = dm.qmp()
            nodes = q.cmd("query-named-block-nodes", {"flat": True})
            remote = [n for n in nodes if n["drv"] == "http"]
            assert len(remote) == 1 and remote[0]["file"] == url and remote[0]["ro"], nodes
            top = [n for n in nodes if n["node-name"] == "top"][0]
            assert top["backing_file"] == url, top
            w = Writer(f"nbd+unix:///top?socket={d}/nbd.sock", d, 31)
            q.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 8 * MiB})
            time.sleep(0.5)
            jobs = q.cmd("query-block-jobs")
            e = q.wait_event("BLOCK_JOB_COMPLETED", device="s", timeout=120)
            assert "error" not in e["data"] and e["data"]["offset"] == e["data"]["len"], e
            t_done = time.time()
            time.sleep(0.3)
            acked, _, _ = w.finish()
            assert len(acked) >= 8, f"only {len(acked)} guest writes"
            assert jobs and jobs[0]["offset"] < jobs[0]["len"], f"stream already done: {jobs}"
            assert w.acked_since(t_done) > 0, "no guest write after the stream"
            nodes = q.cmd("query-named-block-nodes", {"flat": True})
            assert not [n for n in nodes if n["drv"] in ("http", "raw")], nodes
            q.cmd("quit")
            assert dm.wait() == 0
        finally:
            if dm.p.poll() is None:
                dm.kill9()
    finally:
        srv.stop()
    assert backing_of(f"{d}/top.qcow2") is None
    check_clean(f"{d}/top.qcow2")
    with open(f"{d}/expect.raw", "wb") as f:
        f.write(apply_slots(base, acked))
    r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", f"{d}/expect.raw",
            f"{d}/top.qcow2", check=False)
    assert r.returncode == 0, f"overlay differs from source + guest writes: {r.stdout}{r.stderr}"
    # Regions the guest never wrote equal the raw source itself.
    got = image_bytes(f"{d}/top.qcow2")
    untouched = [i for i in range(len(base) // 65536) if i not in acked]
    assert all(got[i * 65536:(i + 1) * 65536] == base[i * 65536:(i + 1) * 65536]
               for i in untouched)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_http_server_stopped_mid_stream(exe, d):
    """The HTTP server of a backing file stops during a throttled block-stream with
    on-error=stop: once its retries are spent the job reports BLOCK_JOB_ERROR (read, stop) and
    pauses; the server comes back at the same URL, the job is resumed and completes; the overlay
    then has no backing, equals the source (qemu-img compare) and passes qemu-img check."""
    base = http_base(d)
    port = free_port()
    srv = ObjectServer("range", f"{d}/objects", "--port", str(port))
    url = f"http://127.0.0.1:{port}/base.raw"
    run("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", url, "-F", "raw",
        f"{d}/top.qcow2", str(len(base)))
    env = {"DISKSTREAM_BACKING_ALLOW": f"{d}:http://", "DISKSTREAM_HTTP_BLOCK_SIZE": "65536",
           "DISKSTREAM_HTTP_READAHEAD": "0", "DISKSTREAM_HTTP_RETRIES": "2",
           "DISKSTREAM_HTTP_RETRY_DELAY_MS": "50"}
    dm = Daemon(exe, d, ["--nbd-server", "none", "--blockdev", TOP], env=env)
    try:
        q = dm.qmp()
        q.cmd("block-stream", {"job-id": "s", "device": "top", "speed": 4 * MiB,
                               "on-error": "stop"})
        time.sleep(0.5)
        srv.stop()
        e = q.wait_event("BLOCK_JOB_ERROR", device="s", timeout=60)
        assert e["data"]["operation"] == "read" and e["data"]["action"] == "stop", e
        for _ in range(100):
            jobs = q.cmd("query-block-jobs")
            if jobs and jobs[0]["paused"]:
                break
            time.sleep(0.05)
        assert jobs and jobs[0]["paused"] and jobs[0]["io-status"] == "failed", jobs
        assert 0 < jobs[0]["offset"] < jobs[0]["len"], jobs
        srv = ObjectServer("range", f"{d}/objects", "--port", str(port))
        q.cmd("block-job-set-speed", {"device": "s", "speed": 0})
        q.cmd("block-job-resume", {"device": "s"})
        e = q.wait_event("BLOCK_JOB_COMPLETED", device="s", timeout=120)
        assert "error" not in e["data"] and e["data"]["offset"] == e["data"]["len"], e
        q.cmd("quit")
        assert dm.wait() == 0
    finally:
        if dm.p.poll() is None:
            dm.kill9()
        if srv.p.poll() is None:
            srv.stop()
    assert backing_of(f"{d}/top.qcow2") is None
    check_clean(f"{d}/top.qcow2")
    r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", f"{d}/objects/base.raw",
            f"{d}/top.qcow2", check=False)
    assert r.returncode == 0, f"overlay differs from the source: {r.stdout}{r.stderr}"


def test_http_blockdev_and_cor(exe, d):
    """QEMU's curl driver names through blockdev-add: `http` nodes with url, readahead and
    timeout (read-only; QEMU's texts for a writable request, a bad readahead or timeout, a URL
    of another scheme; `sslverify` only for https), a 404 refused with one clear error; then a
    copy-on-read filter over an overlay whose header names an http:// backing: reading the
    whole device through the filter's export equals the source and populates the overlay
    (with the backing removed it still reads the same). An s3:// header backing (moto) opens
    too."""
    base = http_base(d)
    srv = ObjectServer("range", f"{d}/objects")
    url = f"http://127.0.0.1:{srv.port}/base.raw"
    dm = Daemon(exe, d, ["--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock"])
    try:
        q = dm.qmp()

        def err(opts):
            r = q.cmd("blockdev-add", opts, ok=False)
            assert "error" in r, f"{opts}: {r}"
            return r["error"]["desc"]

        assert err({"driver": "http", "node-name": "h"}) == "Parameter 'url' is missing"
        assert err({"driver": "http", "node-name": "h", "url": url, "read-only": True,
                    "sslverify": False}) == "Parameter 'sslverify' is unexpected"
        assert err({"driver": "http", "node-name": "h", "url": url}) == \
            "curl driver does not support writes"
        assert err({"driver": "http", "node-name": "h", "url": url, "read-only": True,
                    "readahead": 1000}) == "HTTP_READAHEAD_SIZE 1000 is not a multiple of 512"
        assert err({"driver": "http", "node-name": "h", "url": url, "read-only": True,
                    "timeout": 20000}) == "timeout parameter is too large or negative"
        assert err({"driver": "https", "node-name": "h", "url": url, "read-only": True}) == \
            f"https curl driver cannot handle the URL '{url}' (does not start with 'https://')"
        e = err({"driver": "http", "node-name": "h", "read-only": True,
                 "url": f"http://127.0.0.1:{srv.port}/missing.raw"})
        assert "not found (HTTP 404)" in e, e
        q.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "read-only": True,
                               "file": {"driver": "http", "node-name": "h", "url": url,
                                        "readahead": 1 * MiB, "timeout": 10}})
        q.cmd("block-export-add", {"type": "nbd", "id": "r", "node-name": "r"})
        run("qemu-img", "convert", "-f", "raw", "-O", "raw",
            f"nbd+unix:///r?socket={d}/nbd.sock", f"{d}/r.raw")
        assert open(f"{d}/r.raw", "rb").read() == base, "http node reads differ from the source"
        q.cmd("block-export-del", {"id": "r"})
        q.cmd("blockdev-del", {"node-name": "r"})

        run("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", url, "-F", "raw",
            f"{d}/top.qcow2", str(len(base)))
        q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top",
                               "file": {"driver": "file", "filename": f"{d}/top.qcow2"}})
        q.cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top"})
        q.cmd("block-export-add", {"type": "nbd", "id": "c", "node-name": "cor", "name": "c"})
        run("qemu-img", "convert", "-f", "raw", "-O", "raw",
            f"nbd+unix:///c?socket={d}/nbd.sock", f"{d}/c.raw")
        assert open(f"{d}/c.raw", "rb").read() == base, "copy-on-read reads differ"
        q.cmd("block-export-del", {"id": "c"})
        q.cmd("blockdev-del", {"node-name": "cor"})
        q.cmd("blockdev-del", {"node-name": "top"})

        # s3:// backing file named by the header (diskstream's s3 node).
        s3 = ObjectServer("s3", f"{d}/objects", "images")
        try:
            run("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", "s3://images/base.raw",
                "-F", "raw", f"{d}/s3top.qcow2", str(len(base)))
            q.cmd("quit")
            assert dm.wait() == 0
            env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}",
                   "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_REGION": "us-east-1"}
            dm = Daemon(exe, d, ["--blockdev", "driver=qcow2,node-name=s3top,file.driver=file,"
                                               f"file.filename={d}/s3top.qcow2",
                                 "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
                                 "--export", "type=nbd,id=s,node-name=s3top"], env=env)
            q = dm.qmp()
            nodes = q.cmd("query-named-block-nodes", {"flat": True})
            assert [n["file"] for n in nodes if n["drv"] == "s3"] == ["s3://images/base.raw"], \
                nodes
            run("qemu-img", "convert", "-f", "raw", "-O", "raw",
                f"nbd+unix:///s3top?socket={d}/nbd.sock", f"{d}/s.raw")
            assert open(f"{d}/s.raw", "rb").read() == base, "s3 backing reads differ"
            q.cmd("quit")
            assert dm.wait() == 0
        finally:
            s3.stop()
    finally:
        if dm.p.poll() is None:
            dm.kill9()
        srv.stop()
    # Populated: without its backing file the overlay still reads as the source.
    run("qemu-img", "rebase", "-u", "-b", "", f"{d}/top.qcow2")
    check_clean(f"{d}/top.qcow2")
    r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", f"{d}/objects/base.raw",
            f"{d}/top.qcow2", check=False)
    assert r.returncode == 0, f"copy-on-read left holes: {r.stdout}{r.stderr}"


def slow_nbd_base(d, size, rdelay):
    """A raw base of `size` bytes (0x11) served by nbdkit with every read delayed by
    `rdelay`, and an empty qcow2 top over it (header backing: that NBD export)."""
    if shutil.which("nbdkit") is None:
        raise AssertionError("nbdkit is required (bash .ci/run installs it)")
    with open(f"{d}/base.raw", "wb") as f:
        f.write(b"\x11" * size)
    kit = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-U", f"{d}/kit.sock", "--filter=delay",
         "file", f"{d}/base.raw", f"rdelay={rdelay}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_path(f"{d}/kit.sock")
    run("qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b",
        f"nbd+unix:///?socket={d}/kit.sock", "-F", "raw", f"{d}/top.qcow2", str(size))
    return kit


def slow_nbd_blockdevs(d):
    return ["--blockdev", json.dumps({"driver": "nbd", "node-name": "base", "read-only": True,
                                      "server": {"type": "unix", "path": f"{d}/kit.sock"}}),
            "--blockdev", json.dumps({"driver": "qcow2", "node-name": "top", "backing": "base",
                                      "file": {"driver": "file",
                                               "filename": f"{d}/top.qcow2"}})]


def qemu_io_nbd(url, *cmds):
    args = ["qemu-io", "-f", "raw"]
    if all(c.startswith("read") for c in cmds):
        args.append("-r")
    for c in cmds:
        args += ["-c", c]
    r = run(*args, url, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "failed" not in out, f"{cmds}: {out}"
    return out


def nbd_pread_runs(url, length, offset):
    """Read with libnbd (the system python's `nbd` module) and return the bytes as runs of
    equal values: [(value, count), ...]."""
    code = ("import nbd, sys, json\n"
            "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
            "b = h.pread(int(sys.argv[2]), int(sys.argv[3]))\n"
            "runs = []\n"
            "for x in b:\n"
            "    if runs and runs[-1][0] == x: runs[-1][1] += 1\n"
            "    else: runs.append([x, 1])\n"
            "h.shutdown(); print(json.dumps(runs))\n")
    r = run("/usr/bin/python3", "-c", code, url, str(length), str(offset))
    return [tuple(x) for x in json.loads(r.stdout)]


def test_cor_read_after_write_through_another_export(exe, d):
    """A copy-on-read export and a second writable export of the same top: a read through the
    filter issued after a write through the other export completed returns the written
    bytes, although it joins a fetch of the unit (1.5 s backing delay) planned before the
    write, whose bounce buffer holds the old backing bytes."""
    kit = slow_nbd_base(d, 4 * MiB, "1500ms")
    dm = None
    try:
        dm = Daemon(exe, d, slow_nbd_blockdevs(d) + [
            "--blockdev", "driver=copy-on-read,node-name=cor,file=top",
            "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
            "--export", "type=nbd,id=c,node-name=cor,name=c,writable=on",
            "--export", "type=nbd,id=t,node-name=top,name=t,writable=on"])
        q = dm.qmp()
        cor_url = f"nbd+unix:///c?socket={d}/nbd.sock"
        # The first read starts the fetch of unit 0 (0..1 MiB) and waits for the backing.
        first = threading.Thread(target=qemu_io_nbd, args=(cor_url, "read -P 0x11 0 4k"))
        first.start()
        time.sleep(0.4)
        qemu_io_nbd(f"nbd+unix:///t?socket={d}/nbd.sock", "write -P 0xab 192k 64k")
        # One read over the written cluster and a missing one: it joins the fetch.
        got = nbd_pread_runs(cor_url, 128 * 1024, 192 * 1024)
        assert got == [(0xab, 65536), (0x11, 65536)], got
        first.join(timeout=30)
        st = q.cmd("x-query-cor-stats")
        assert len(st) == 1 and st[0]["deduplicated"] >= 1, st
        q.cmd("quit")
        assert dm.wait() == 0
        # The copy did not overwrite the write (the backing is still up for qemu-io).
        check_clean(f"{d}/top.qcow2")
        r = run("qemu-io", "-f", "qcow2", "-c", "read -P 0xab 192k 64k", "-c",
                "read -P 0x11 0 192k", "-c", "read -P 0x11 256k 768k", f"{d}/top.qcow2",
                check=False)
        assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        if dm is not None and dm.p.poll() is None:
            dm.kill9()
        kit.kill()
        kit.wait(timeout=10)


def test_cor_export_option_and_qmp_knobs(exe, d):
    """`copy-on-read=on` on `--export` and `block-export-add` (a diskstream extension; QSD
    says "Parameter 'copy-on-read' is unexpected"): the export reads through a hidden filter
    node of its own (x-query-cor-stats lists it, query-block-exports names the exported
    node), reads populate the top, deleting the export removes the filter; a read-only node
    is exported as it is. A blockdev-added copy-on-read node takes `x-granularity` and
    `x-readahead`, shown by x-query-cor-stats; bad values are refused."""
    kit = slow_nbd_base(d, 4 * MiB, "1ms")
    dm = None
    try:
        dm = Daemon(exe, d, slow_nbd_blockdevs(d) + [
            "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
            "--export", "type=nbd,id=c,node-name=top,name=c,copy-on-read=on"])
        q = dm.qmp()
        st = q.cmd("x-query-cor-stats")
        assert len(st) == 1 and st[0]["file"] == "top" and st[0]["node-name"].startswith("#"), st
        ex = q.cmd("query-block-exports")
        assert ex == [{"id": "c", "type": "nbd", "node-name": "top", "shutting-down": False}], ex
        qemu_io_nbd(f"nbd+unix:///c?socket={d}/nbd.sock", "read -P 0x11 0 1M",
                    "read -P 0x11 3M 4k")
        st = q.cmd("x-query-cor-stats")[0]
        assert st["fetches"] >= 1 and st["misses"] >= 1, st
        r = q.cmd("blockdev-del", {"node-name": "top"}, ok=False)
        assert "error" in r, r
        q.cmd("block-export-del", {"id": "c"})
        q.wait_event("BLOCK_EXPORT_DELETED", id="c")
        assert q.cmd("x-query-cor-stats") == [], "the export's filter outlived it"
        # block-export-add with the option; then a read-only node: exported without a filter.
        q.cmd("block-export-add", {"type": "nbd", "id": "c2", "node-name": "top", "name": "c2",
                                   "copy-on-read": True})
        assert len(q.cmd("x-query-cor-stats")) == 1
        qemu_io_nbd(f"nbd+unix:///c2?socket={d}/nbd.sock", "read -P 0x11 2M 64k")
        q.cmd("block-export-del", {"id": "c2"})
        q.wait_event("BLOCK_EXPORT_DELETED", id="c2")
        q.cmd("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True,
                               "file": {"driver": "file", "filename": f"{d}/base.raw"}})
        q.cmd("block-export-add", {"type": "nbd", "id": "r", "node-name": "ro",
                                   "copy-on-read": True})
        assert q.cmd("x-query-cor-stats") == []
        q.cmd("block-export-del", {"id": "r"})
        # QMP knobs of a copy-on-read node.
        q.cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top",
                               "x-granularity": 262144, "x-readahead": 0})
        st = q.cmd("x-query-cor-stats")
        assert [(s["node-name"], s["unit"], s["readahead"]) for s in st] == \
            [("cor", 262144, 0)], st
        for bad in ({"x-granularity": 3000}, {"x-readahead": 1000}):
            r = q.cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cor2",
                                       "file": "top", **bad}, ok=False)
            assert "error" in r, (bad, r)
        q.cmd("blockdev-del", {"node-name": "cor"})
        q.cmd("quit")
        assert dm.wait() == 0
        check_clean(f"{d}/top.qcow2")
        m = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2",
                           f"{d}/top.qcow2").stdout)
        local = sum(e["length"] for e in m if e["depth"] == 0 and e["present"])
        assert local >= 3 * MiB, f"copy-on-read exports left the top empty: {m}"
    finally:
        if dm is not None and dm.p.poll() is None:
            dm.kill9()
        kit.kill()
        kit.wait(timeout=10)


def test_cor_export_filter_follows_stream_filter_and_keeps_counters(exe, d):
    """The hidden copy-on-read filter of a `copy-on-read=on` export is a parent of the
    exported node like any other: `block-stream` with a `filter-node-name` puts its filter
    between them (QEMU's bdrv_replace_node moves every parent), and the job's end puts the
    export's filter back on the node; a snapshot moves it to the overlay. Its counters
    (x-query-cor-stats) survive each of these rebuilds instead of starting from zero, and
    reads through the export stay correct all along."""
    kit = slow_nbd_base(d, 4 * MiB, "1ms")
    dm = None
    url = f"nbd+unix:///c?socket={d}/nbd.sock"

    def hidden(q):
        st = [s for s in q.cmd("x-query-cor-stats") if s["node-name"].startswith("#")]
        assert len(st) == 1, st
        return st[0]

    def grew(a, b):
        keys = ("hits", "misses", "fetches", "backing-reads", "bytes-copied")
        assert all(b[k] >= a[k] for k in keys), (a, b)

    try:
        dm = Daemon(exe, d, slow_nbd_blockdevs(d) + [
            "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
            "--export", "type=nbd,id=c,node-name=top,name=c,copy-on-read=on"])
        q = dm.qmp()
        qemu_io_nbd(url, "read -P 0x11 0 1M")
        s1 = hidden(q)
        assert s1["file"] == "top" and s1["fetches"] >= 1 and s1["bytes-copied"] > 0, s1
        # A throttled stream: its filter goes between the export's filter and the node.
        q.cmd("block-stream", {"job-id": "s", "device": "top", "filter-node-name": "sf",
                               "speed": 65536})
        s2 = hidden(q)
        assert s2["file"] == "sf", s2
        grew(s1, s2)
        qemu_io_nbd(url, "read -P 0x11 2M 64k", "read -P 0x11 0 4k")
        s3 = hidden(q)
        grew(s2, s3)
        assert s3["misses"] > s2["misses"] and s3["hits"] > s2["hits"], (s2, s3)
        q.cmd("block-job-set-speed", {"device": "s", "speed": 0})
        q.wait_event("BLOCK_JOB_COMPLETED")
        s4 = hidden(q)
        assert s4["file"] == "top", s4
        grew(s3, s4)
        # A snapshot of the node: the export's filter moves to the overlay, counters kept.
        q.cmd("blockdev-snapshot-sync", {"node-name": "top", "snapshot-file": f"{d}/snap.qcow2",
                                         "snapshot-node-name": "snap", "format": "qcow2"})
        s5 = hidden(q)
        assert s5["file"] == "snap", s5
        grew(s4, s5)
        qemu_io_nbd(url, "read -P 0x11 0 4M")
        grew(s5, hidden(q))
        q.cmd("quit")
        assert dm.wait() == 0
        for img in ("top", "snap"):
            check_clean(f"{d}/{img}.qcow2")
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", f"{d}/base.raw",
            f"{d}/snap.qcow2")
    finally:
        if dm is not None and dm.p.poll() is None:
            dm.kill9()
        kit.kill()
        kit.wait(timeout=10)


def test_https_sslverify(exe, d):
    """`driver: https` against a local HTTPS server with a self-signed certificate: refused
    while `sslverify` is on (the default), read correctly with `sslverify: false`."""
    base = http_base(d)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", f"{d}/key.pem", "-out", f"{d}/cert.pem")
    srv = ObjectServer("range", f"{d}/objects", "--tls", f"{d}/cert.pem", f"{d}/key.pem")
    url = f"https://127.0.0.1:{srv.port}/base.raw"
    env = {"DISKSTREAM_HTTP_RETRIES": "0"}
    dm = Daemon(exe, d, ["--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock"], env=env)
    try:
        q = dm.qmp()
        r = q.cmd("blockdev-add", {"driver": "https", "node-name": "h", "url": url,
                                   "read-only": True}, ok=False)
        assert "error" in r and "certificate" in r["error"]["desc"].lower(), r
        q.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "read-only": True,
                               "file": {"driver": "https", "url": url, "sslverify": False}})
        nodes = q.cmd("query-named-block-nodes", {"flat": True})
        assert [n["file"] for n in nodes if n["drv"] == "https"] == [url], nodes
        q.cmd("block-export-add", {"type": "nbd", "id": "r", "node-name": "r"})
        run("qemu-img", "convert", "-f", "raw", "-O", "raw",
            f"nbd+unix:///r?socket={d}/nbd.sock", f"{d}/r.raw")
        assert open(f"{d}/r.raw", "rb").read() == base, "https reads differ from the source"
        q.cmd("quit")
        assert dm.wait() == 0
    finally:
        if dm.p.poll() is None:
            dm.kill9()
        srv.stop()


TESTS = {name[5:]: f for name, f in dict(globals()).items() if name.startswith("test_")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    exe = os.path.abspath(args.ours)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            print(f"FATAL: '{tool}' not found", file=sys.stderr)
            return 2
    passed = failed = 0
    for name in args.only or list(TESTS):
        d = tempfile.mkdtemp(prefix=f"dsdaemon-{name}-")
        t0 = time.time()
        try:
            TESTS[name](exe, d)
            print(f"ok   {name} ({time.time() - t0:.1f}s)")
            passed += 1
        except Exception as e:
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            failed += 1
        finally:
            shutil.rmtree(d, ignore_errors=True)
        sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
