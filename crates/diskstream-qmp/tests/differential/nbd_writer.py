#!/usr/bin/python3
"""A guest for the device-switch and kill tests: one libnbd connection (python3-libnbd, the
system python3) that writes random 64 KiB slots with random patterns and reads back slots it
wrote, until the file STOP exists or the server goes away. Every acknowledged write is printed
as "ack SLOT PATTERN", preceded by "try SLOT PATTERN" when it is sent (after a flush every 4 writes: "flushed"); a read-back mismatch prints
"bad SLOT" and exits 3; losing the connection prints "lost" and exits 4 (unless the caller
expects it). Exit 0 after STOP.

Usage: /usr/bin/python3 nbd_writer.py URL STOP SEED [SLOTS...]   (slots default: all)
"""

import os
import random
import sys

import nbd

SLOT = 64 * 1024
url, stop, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(url)
size = h.get_size()
slots = [int(x) for x in sys.argv[4:]] or list(range(size // SLOT))
print("ready", flush=True)
mine = {}
n = 0
try:
    while not os.path.exists(stop):
        i = rng.choice(slots)
        pat = rng.randrange(1, 256)
        print(f"try {i} {pat}", flush=True)
        h.pwrite(bytes([pat]) * SLOT, i * SLOT)
        mine[i] = pat
        print(f"ack {i} {pat}", flush=True)
        n += 1
        if n % 4 == 0:
            h.flush()
            print("flushed", flush=True)
            j = rng.choice(list(mine))
            if h.pread(SLOT, j * SLOT) != bytes([mine[j]]) * SLOT:
                print(f"bad {j}", flush=True)
                sys.exit(3)
    h.flush()
    print("flushed", flush=True)
    for j, pat in mine.items():
        if h.pread(SLOT, j * SLOT) != bytes([pat]) * SLOT:
            print(f"bad {j}", flush=True)
            sys.exit(3)
    h.shutdown()
    print(f"done {n}", flush=True)
except nbd.Error as e:
    print(f"lost {e}", flush=True)
    sys.exit(4)
