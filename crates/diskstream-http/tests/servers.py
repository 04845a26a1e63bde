#!/usr/bin/env python3
"""Local servers for the HTTP/S3 protocol tests (loopback only; they stop when stdin closes).

  servers.py range DIR [--fail-every N] [--truncate-every N] [--tls CERT KEY] [--port N]
                       [--delay-ms N] [--no-etag] [--if-match] [--log FILE]
      A static file server with HTTP Range support (206 with Content-Range, 416, HEAD, ETag
      from size+mtime, Last-Modified). /forbidden/* answers 403. With --fail-every N every
      Nth GET answers 503; with --truncate-every N every Nth ranged GET sends half its body
      and drops the connection (a reset mid-transfer). With --tls it serves HTTPS with the
      PEM certificate CERT and key KEY. --port N listens on port N (default: any free port),
      so a test can stop the server and start it again at the same URL. --delay-ms N waits N ms
      before answering each request (a distant server; used by bench/jobs.py). --no-etag leaves
      the ETag out (Last-Modified is then the only validator); --if-match answers 412 to a GET
      whose If-Match names another ETag than the file's current one. --log FILE appends each
      GET's Range header (or "-") to FILE as it arrives. Bodies are sent
      with sendfile, one thread per connection, so loopback reads reach several GB/s.
  servers.py s3 DIR BUCKET
      moto's S3 server with BUCKET holding every file of DIR (key = file name).

Both print "PORT <n>" once listening, then serve until stdin reaches EOF.
"""
import email.utils
import http.server
import os
import sys
import threading
import time


class Counters:
    gets = 0
    lock = threading.Lock()


def range_handler(root, fail_every, truncate_every, delay=0.0, etag=True, if_match=False,
                  log=None):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _file(self):
            path = os.path.join(root, self.path.lstrip("/").split("?")[0])
            try:
                st = os.stat(path)
            except OSError:
                return None, None
            return path, st

        def _etag(self, st):
            return '"%x-%x"' % (st.st_size, st.st_mtime_ns)

        def _headers(self, st):
            self.send_header("Accept-Ranges", "bytes")
            if etag:
                self.send_header("ETag", self._etag(st))
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))

        def _simple(self, code):
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            self.do_GET(head=True)

        def _send_file(self, path, offset, count):
            with open(path, "rb") as f:
                self.connection.sendfile(f, offset, count)

        def do_GET(self, head=False):
            if log and not head:
                with Counters.lock, open(log, "a") as f:
                    f.write((self.headers.get("Range") or "-") + "\n")
            if delay:
                time.sleep(delay)
            if self.path.startswith("/forbidden/"):
                return self._simple(403)
            path, st = self._file()
            if path is None:
                return self._simple(404)
            with Counters.lock:
                Counters.gets += 1
                n = Counters.gets
            if fail_every and n % fail_every == 0:
                return self._simple(503)
            wanted = self.headers.get("If-Match")
            if if_match and wanted is not None and wanted.strip() not in ("*", self._etag(st)):
                return self._simple(412)
            size = st.st_size
            rng = self.headers.get("Range")
            if rng is None or head:
                self.send_response(200)
                self._headers(st)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if not head:
                    self._send_file(path, 0, size)
                return
            spec = rng.strip().split("=", 1)[1]
            a, b = spec.split("-", 1)
            a = int(a)
            b = min(int(b) if b else size - 1, size - 1)
            if a >= size or a > b:
                self.send_response(416)
                self.send_header("Content-Range", "bytes */%d" % size)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self._headers(st)
            self.send_header("Content-Range", "bytes %d-%d/%d" % (a, b, size))
            self.send_header("Content-Length", str(b - a + 1))
            self.end_headers()
            if not (truncate_every and n % truncate_every == 0 and b > a):
                self._send_file(path, a, b - a + 1)
                return
            # Every Nth ranged GET: half the body, then the connection drops.
            with open(path, "rb") as f:
                f.seek(a)
                body = f.read(b - a + 1)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

    return Handler


def main():
    mode = sys.argv[1]
    if mode == "range":
        root = sys.argv[2]
        args = sys.argv[3:]
        fail = int(args[args.index("--fail-every") + 1]) if "--fail-every" in args else 0
        trunc = int(args[args.index("--truncate-every") + 1]) if "--truncate-every" in args else 0
        port = int(args[args.index("--port") + 1]) if "--port" in args else 0
        http.server.ThreadingHTTPServer.allow_reuse_address = True
        delay = int(args[args.index("--delay-ms") + 1]) / 1000 if "--delay-ms" in args else 0.0
        log = args[args.index("--log") + 1] if "--log" in args else None
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                              range_handler(root, fail, trunc, delay,
                                                            "--no-etag" not in args,
                                                            "--if-match" in args, log))
        srv.daemon_threads = True
        if "--tls" in args:
            import ssl

            i = args.index("--tls")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(args[i + 1], args[i + 2])
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        port = srv.server_address[1]
    elif mode == "s3":
        root, bucket = sys.argv[2], sys.argv[3]
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        srv.start()
        port = srv._server.server_port
        s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:%d" % port, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        for name in sorted(os.listdir(root)):
            # public-read: moto then serves the object over plain HTTP as well.
            s3.upload_file(os.path.join(root, name), bucket, name, ExtraArgs={"ACL": "public-read"})
    else:
        sys.exit("unknown mode " + mode)
    print("PORT %d" % port, flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
