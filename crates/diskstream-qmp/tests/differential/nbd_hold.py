#!/usr/bin/python3
"""Hold an NBD connection open for the differential harness: connect to URL with libnbd
(python3-libnbd, installed for the system python3), read the first sector, print "ready",
then keep the connection until stdin closes (or the server drops it), and exit 0 either way.

Usage: /usr/bin/python3 nbd_hold.py URL
"""

import sys

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(512, 0)
print("ready", flush=True)
sys.stdin.read()
try:
    h.shutdown()
except nbd.Error:
    pass
