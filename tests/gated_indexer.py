"""The indexing command, held at known points so a test can signal or kill
it there: mid-run, with work still to do, however loaded the machine is.

    python tests/gated_indexer.py GATE_DIR [--hold POINT]... [--gate-before MODULE:NAME]... [--] ARGS...

runs the real command, `create_imagenet_features.main(ARGS)` through
`cli.run` as its `__main__` does (same model, same engine, same signal
handling and messages), and passes *gate points* on the way:

    batch-N   the extractor is about to embed batch N+1: batches 1..N were
              embedded and each was checkpointed in the indexing state
              (the engine embeds the next batch only after committing the
              last one). batch-0: the model is built, nothing embedded yet.
              Reached only while something is left to embed; a batch whose
              files are all unreadable calls no model and counts no batch.
    NAME-N    the N-th call (from 1) of MODULE:NAME, named with --gate-before,
              is about to start, e.g. `--gate-before search_utils.engine:save_features`
              gives `save_features-1`: every batch is checkpointed, the
              features file is not written yet. NAME may be dotted
              (`search_utils.catalog:IndexState.publish` gives `publish-1`).

At each point the run creates the marker GATE_DIR/POINT. At a point named
with --hold it then waits until GATE_DIR/go-POINT exists, polling with short
sleeps, which SIGINT and SIGTERM interrupt (cli.run turns both into
KeyboardInterrupt in the main thread, where the wait is): a signal sent while
the marker exists lands while the run is provably held there.

Tests use `GatedRun` below rather than this command line: it starts the run,
waits for markers and for the exit with a deadline, and fails with the run's
stderr if the run ends early. Features are the real extractor's: the wrapper
only waits, then calls it.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
COMMAND = REPO / "create_imagenet_features.py"
DEADLINE = 300.0  # seconds any wait of a test may take, on a loaded machine
POLL = 0.01
ABANDONED = 1800.0  # a held run whose test never released or stopped it exits


# -- inside the held run -----------------------------------------------------


class Gate:
    """Where the run tells GATE_DIR how far it got, and waits if told to."""

    def __init__(self, folder: Path, holds: Sequence[str]):
        self.folder = folder
        self.holds = set(holds)
        self.parent = os.getppid()

    def point(self, name: str) -> None:
        temporary = self.folder / f".{name}.tmp"
        temporary.write_text(f"{os.getpid()}\n")
        temporary.rename(self.folder / name)  # the marker appears whole, at once
        if name in self.holds:
            self._wait(self.folder / f"go-{name}")

    def _wait(self, go: Path) -> None:
        since = time.monotonic()
        while not go.exists():
            if os.getppid() != self.parent or time.monotonic() - since > ABANDONED:
                print(f"gated_indexer: abandoned at {go.name[3:]}, exiting", file=sys.stderr)
                os._exit(3)  # the test is gone: don't linger, don't go on
            time.sleep(POLL)  # a signal's KeyboardInterrupt is raised here


class GatedExtractor:
    """The real extractor, passing gate point batch-N before each embedding."""

    def __init__(self, extractor, gate: Gate):
        self._extractor = extractor
        self._gate = gate
        self._batches = 0

    def embed(self, batch):
        self._gate.point(f"batch-{self._batches}")
        features = self._extractor.embed(batch)
        self._batches += 1
        return features

    def __getattr__(self, name):
        return getattr(self._extractor, name)


def gate_before(target: str, gate: Gate) -> None:
    """Wrap MODULE:NAME (NAME may be dotted) so that each call first passes
    gate point `<last part of NAME>-<call number>`."""
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        raise SystemExit(f"gated_indexer: --gate-before wants MODULE:NAME, got {target!r}")
    owner = importlib.import_module(module_name)
    *parents, name = qualname.split(".")
    for part in parents:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = 0

    @functools.wraps(real)
    def gated(*args, **kwargs):
        nonlocal calls
        calls += 1
        gate.point(f"{name}-{calls}")
        return real(*args, **kwargs)

    setattr(owner, name, gated)


def parse(argv: list[str]) -> tuple[Path, list[str], list[str], list[str]]:
    if not argv:
        raise SystemExit(__doc__)
    folder, rest = Path(argv[0]), argv[1:]
    holds: list[str] = []
    befores: list[str] = []
    while rest and rest[0] in ("--hold", "--gate-before") and len(rest) > 1:
        (holds if rest[0] == "--hold" else befores).append(rest[1])
        rest = rest[2:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    return folder, holds, befores, rest


def main(argv: list[str]) -> int:
    folder, holds, befores, args = parse(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    # As a shell starts a command: Ctrl-C raises KeyboardInterrupt, even if
    # the test runner was started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [str(COMMAND), *args]  # the command's name in its messages, its arguments

    import create_imagenet_features
    from search_utils import cli

    gate = Gate(folder, holds)
    load_extractor = create_imagenet_features.load_extractor
    create_imagenet_features.load_extractor = lambda *a, **k: GatedExtractor(load_extractor(*a, **k), gate)
    for target in befores:
        gate_before(target, gate)
    return cli.run(create_imagenet_features.main)


# -- in the test -------------------------------------------------------------


class GatedRun:
    """One run of the command held at `hold` points, in a subprocess.

        with GatedRun(tmp_path / "gate", args, cwd=work, env=offline_env(work), hold=["batch-2"]) as run:
            run.wait_for("batch-2")          # held: 2 batches checkpointed
            run.send(signal.SIGINT)
            assert run.wait() == 130
            stderr = run.stderr

    `folder` must not exist yet (it is made, and holds the markers and the
    run's stdout and stderr). Leaving the block kills a run still going.
    """

    def __init__(self, folder: Path, args: Sequence, *, cwd: Path, env: dict[str, str] | None = None,
                 hold: Sequence[str] = (), gate_before: Sequence[str] = ()):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True)
        options = [item for point in hold for item in ("--hold", point)]
        options += [item for target in gate_before for item in ("--gate-before", target)]
        command = [sys.executable, str(HERE), str(self.folder), *options, "--", *map(str, args)]
        with open(self.folder / "stdout", "wb") as stdout, open(self.folder / "stderr", "wb") as stderr:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr").read_text(encoding="utf-8", errors="surrogateescape")

    @property
    def stdout(self) -> str:
        return (self.folder / "stdout").read_text(encoding="utf-8", errors="surrogateescape")

    def reached(self, point: str) -> bool:
        return (self.folder / point).exists()

    def wait_for(self, point: str, timeout: float = DEADLINE) -> None:
        """Until the run reaches `point` (if held there, it stays there).

        Raises:
            AssertionError: the run ended first, or `timeout` passed.
        """
        deadline = time.monotonic() + timeout
        while not self.reached(point):
            code = self.process.poll()
            if code is not None and not self.reached(point):
                raise AssertionError(f"the run ended (exit {code}) before reaching {point}:\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the run didn't reach {point} in {timeout:.0f} s:\n{self.stderr}")
            time.sleep(POLL)

    def release(self, point: str) -> None:
        """Let a run held at `point` go on."""
        (self.folder / f"go-{point}").touch()

    def send(self, signum: int) -> None:
        """Send `signum`; the run must still be going (held, if you waited
        for a held point)."""
        code = self.process.poll()
        assert code is None, f"the run ended (exit {code}) before it could be signalled:\n{self.stderr}"
        self.process.send_signal(signum)

    def wait(self, timeout: float = DEADLINE) -> int:
        """The run's exit code (negative: killed by that signal)."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the run didn't end in {timeout:.0f} s:\n{self.stderr}") from None

    def __enter__(self) -> "GatedRun":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
