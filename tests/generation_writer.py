"""A writer of features files for tests/test_generation.py, run as a real
process so it can be killed for real.

    generation_writer.py PATH write NAME [--count] [--stop-at K --signal KILL|TERM] [--limit BYTES]
    generation_writer.py PATH alternate STOP_FILE

`write` saves generation NAME ("A" or "B", see make_store) over PATH.
--count prints how many renames and deletes it took; --stop-at K sends the
process SIGKILL or SIGTERM just before the K-th of them (SIGTERM raises
KeyboardInterrupt, as the commands' handler does; exit status 130).
--limit caps the size of any file it writes (RLIMIT_FSIZE: writes past it
fail as on a full disk); errors are reported as the commands report them.
`alternate` saves A, B, A, ... until STOP_FILE exists.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search_utils import cli, store  # noqa: E402

ROWS = {"A": 10, "B": 9}
DIM = 16


def make_store(name: str) -> store.FeatureStore:
    """Generation `name`: its own rows, values, metadata and whitening."""
    rng = np.random.default_rng(ord(name))
    rows = ROWS[name]
    features = rng.random((rows, DIM), dtype=np.float32)
    whitening = {"mean": rng.random(DIM).astype(np.float32),
                 "projection": rng.random((DIM, 8)).astype(np.float32),
                 "vectors": rng.random((rows, 8)).astype(np.float32)}
    return store.FeatureStore([f"img/{name}{i}.png" for i in range(rows)], features,
                              {"model": "efficientnet_lite0", "label": name}, whitening)


def stop_at(step: int, signum: int) -> list[int]:
    """Count the file system's renames and deletes; signal before the `step`-th."""
    calls = [0]

    def counted(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] - 1 == step:  # counted first: the cleanup's own calls must not signal again
                os.kill(os.getpid(), signum)
            return real(*args, **kwargs)
        return call

    os.replace, os.unlink = counted(os.replace), counted(os.unlink)
    return calls


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("action", choices=["write", "alternate"])
    parser.add_argument("arg")
    parser.add_argument("--count", action="store_true")
    parser.add_argument("--stop-at", type=int, default=-1)
    parser.add_argument("--signal", choices=["KILL", "TERM"], default="KILL")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    if args.action == "alternate":
        turn = 0
        while not os.path.exists(args.arg):
            store.save_features(args.path, make_store("AB"[turn % 2]))
            turn += 1
        return 0
    calls = stop_at(args.stop_at, getattr(signal, f"SIG{args.signal}"))
    if args.limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.limit, args.limit))
    status = cli.run(lambda argv: store.save_features(args.path, make_store(args.arg)) or 0, [])
    if status:
        return status
    if args.count:
        print(calls[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
