#!/usr/bin/env python3
"""A stand-in trainer that replays a real nnUNetv2_train console log through
the terminal nnguard gives it, then ends the way the real process did:
replay.py LOG RC [ignored nnUNetv2_train arguments...]. RC < 0 means killed by
signal -RC (the log's main process died of it)."""
import os
import signal
import sys

log, rc = sys.argv[1], int(sys.argv[2])
with open(log, 'rb') as f:
    data = f.read()
out = sys.stdout.buffer
for i in range(0, len(data), 512):  # in chunks, as a process writes
    out.write(data[i:i + 512])
    out.flush()
if rc < 0:
    os.kill(os.getpid(), -rc)
sys.exit(rc)
