"""`jina-v4 embed` that stops after writing its Nth shard and waits there for a signal, so that a test interrupts
a run provably mid-way instead of racing it. argv: N MARKER ARGS...: writes MARKER once paused, then sleeps
until a signal ends it (SIGINT must give the CLI's exit status 130, SIGKILL leaves the shards written)."""

import signal
import sys
import time
from pathlib import Path

import jina_v4.apps.jobs as jobs
from jina_v4.apps.cli import main

n, marker, args = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
write, written = jobs.write_vectors, []


def pausing(path, *rest, **kwargs):
    write(path, *rest, **kwargs)
    written.append(path)
    if len(written) == n:
        marker.write_text(str(path))
        while True:
            time.sleep(0.05)


jobs.write_vectors = pausing
# Ctrl-C as at a terminal: a shell's background job (`bash .ci/run &`) starts its children with SIGINT ignored,
# and Python then leaves it ignored instead of raising KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main(args))
