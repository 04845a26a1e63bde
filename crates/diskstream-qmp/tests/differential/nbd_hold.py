#!/usr/bin/python3
"""Hold an NBD connection open for the differential harness: connect to URL with libnbd
(python3-libnbd, installed for the system python3), read the first sector, print "ready",
then keep the connection until stdin closes or the server drops it (checked with a one-byte
read every 100 ms), and exit 0 either way.

Usage: /usr/bin/python3 nbd_hold.py URL
"""

import os
import select
import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(512, 0)
print("ready", flush=True)
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0.1)
    if r and not os.read(sys.stdin.fileno(), 4096):
        break
    try:
        h.pread(1, 0)
    except nbd.Error:
        sys.exit(0)
try:
    h.shutdown()
except nbd.Error:
    pass
