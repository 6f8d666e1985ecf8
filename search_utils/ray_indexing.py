"""Indexing on a Ray cluster: `create_imagenet_features.py --ray [ADDRESS]`.

The driver (this process) stays what it is without Ray: it lists the folder,
plans with the indexing state what is new or changed, and commits each batch
as it comes back (engine `_Update._embed`), so a run stopped at any moment
resumes exactly like the single-machine one. Only the embedding moves out:

* the paths to embed become a Ray Dataset with one row, and one block, per
  batch (`from_items(..., override_num_blocks=batches)`): a block is the unit
  Ray schedules, retries and streams back, so a batch is committed whole
  and a lost worker costs only its batches in flight;
* `map_batches` runs them through a fixed pool of actors
  (`ActorPoolStrategy`), each of which builds the model once
  (`models.load_extractor`, as the single-machine run does) and decodes
  and embeds its batch itself (`indexing.embed_batch`, the single-machine
  code): the workers read the same paths, so a shared file system is
  assumed, and pixels never cross
  the network, only paths in and features out. Paths travel absolute and as
  bytes (a file name need not be UTF-8) with their position in the plan, so
  the driver gives each result back under the path it planned;
* the driver streams the blocks back with `iter_batches` (nothing is held
  whole) and turns each into an `EmbeddingResult`; an unreadable file comes
  back as its reason and is skipped as it would be locally.

Actors ask for half a CPU each: with whole CPUs a 2-CPU cluster hung in
ray 2.60 (Ray Data keeps some CPU for itself), and TensorFlow uses every core
of its node anyway. Ray Data restarts actors that die (a worker killed, a
node lost) and retries their tasks, so the run goes on. Workers find
`search_utils` through PYTHONPATH set to this repository's folder, the same
path on every node of a shared file system.

Measured on the 2-core test machine (bench/bench_ray.py, efficientnet_lite0,
600 generated 256x192 JPEGs, batch 32, local cluster): steady 82.6 images/s
on one machine, 65.4 with one actor (decode and model no longer overlap),
86.6 with two; 15-25 s of start-up per run (cluster, one model per actor).
On one machine Ray splits the same work; it pays off with more machines.
A worker node killed mid-run (tests/test_ray_indexing.py) cost its batches
in flight: the run finished on the other node, features unchanged.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Iterator, Sequence

import numpy as np

from . import errors
from .errors import ImageReadError, SearchUtilsError
from .indexing import EmbeddingResult, PathEmbedder
from .models import native_logs_held_back

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS_PER_ACTOR = 0.5  # whole CPUs hang a 2-CPU cluster (see above)
LOCAL = "local"  # what the command line passes for a bare --ray
CONNECT_TIMEOUT = 5.0  # seconds to reach the cluster's address before giving up


class ClusterError(SearchUtilsError):
    """The Ray cluster can't be used: Ray missing, or the address unreachable."""

    exit_code = 2


class RayEmbedder(PathEmbedder):
    """Embeds files on a Ray cluster with `actors` copies of the model.

    Connecting happens here, so an unreachable cluster is reported before
    any work; the connection (and a local cluster started here) ends when
    `embed_files` ends, however it ends.
    """

    def __init__(self, address: str, choice, actors: int | None = None,
                 note: Callable[[str], None] | None = None):
        self.choice = choice
        self.note = note or (lambda text: None)
        self.ray = _import_ray()
        self.address = address
        _connect(self.ray, address)
        self.actors = self._pool_size(actors)

    def embed_files(self, paths: Sequence[str], batch_size: int) -> Iterator[EmbeddingResult]:
        try:
            for block in self._blocks(paths, batch_size):
                yield _as_result(block, paths)
        except Exception as error:
            user_error = _user_error(error)
            if user_error is None:
                raise
            raise user_error from None  # e.g. the actors' model can't load: its one line, as locally
        finally:
            self.close()

    def close(self) -> None:
        """Disconnect, and stop the cluster if this process started it."""
        if self.ray.is_initialized():
            self.ray.shutdown()

    def _pool_size(self, requested: int | None) -> int:
        """`requested`, or one actor per CPU; never more than fit, since a
        fixed pool waits for actors the cluster has no room for."""
        cpus = self.ray.cluster_resources().get("CPU", 1.0)
        room = max(1, int(cpus / CPUS_PER_ACTOR))
        actors = requested or max(1, int(cpus))
        if actors > room:
            self.note(f"the Ray cluster has {cpus:g} CPUs: room for {room} actors, not {actors}")
            actors = room
        nodes = sum(1 for node in self.ray.nodes() if node.get("Alive"))
        where = "a local Ray cluster" if self.address == LOCAL else f"the Ray cluster at {self.address}"
        self.note(f"embedding on {where}: {_count(actors, 'actor')} on {_count(nodes, 'node')} ({cpus:g} CPUs)")
        return actors

    def _blocks(self, paths: Sequence[str], batch_size: int) -> Iterator[dict]:
        """The embedded batches as Ray hands them back, in any order."""
        data = self.ray.data
        rows = [{"index": list(range(start, min(start + batch_size, len(paths)))),
                 "path": [os.fsencode(os.path.abspath(p)) for p in paths[start:start + batch_size]]}
                for start in range(0, len(paths), batch_size)]
        spec, choice = self.choice.spec, self.choice
        weights = None if choice.weights is None else os.path.abspath(choice.weights)
        # No more actors than batches: each would build a model for nothing.
        dataset = data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            BatchEmbedder, fn_constructor_args=(spec, weights, choice.precision, choice.runtime),
            batch_size=1, compute=data.ActorPoolStrategy(size=min(self.actors, len(rows))), num_cpus=CPUS_PER_ACTOR)
        return dataset.iter_batches(batch_size=None, batch_format="numpy")


class BatchEmbedder:
    """One per actor: the model is built once, in `__init__`; each call gets
    one row holding one batch's paths, decodes them and embeds them."""

    def __init__(self, spec, weights: str | None, precision: str, runtime: str):
        from search_utils.errors import SearchUtilsError as UserError
        from search_utils.models import load_extractor

        self.spec = spec
        self.extractor, self.failure = None, None
        try:
            self.extractor = load_extractor(spec, weights, precision, runtime)
        except UserError as error:  # kept to be sent back: Ray would keep only a traceback of it
            self.failure = f"{type(error).__name__}:{error}"

    def __call__(self, rows: dict) -> dict:
        from search_utils.indexing import embed_batch

        if self.failure is not None:
            return {"index": np.array([-1]), "features": np.zeros((1, self.spec.feature_dim), np.float32),
                    "reason": np.array([self.failure.encode("utf-8", "surrogateescape")], dtype=object)}
        indices = np.concatenate(list(rows["index"])).astype(np.int64)
        paths = [os.fsdecode(bytes(p)) for batch in rows["path"] for p in batch]
        batch = embed_batch(paths, self.extractor)  # as the single-machine run embeds a batch
        features = np.zeros((len(paths), self.spec.feature_dim), np.float32)  # a skipped file's row stays zero
        position = {path: i for i, path in enumerate(paths)}
        features[[position[p] for p in batch.paths]] = batch.features
        reasons = [b""] * len(paths)  # empty: embedded
        for error in batch.skipped:
            reasons[position[error.path]] = error.reason.encode("utf-8", "surrogateescape")
        return {"index": indices, "features": features, "reason": np.array(reasons, dtype=object)}


def _as_result(block: dict, paths: Sequence[str]) -> EmbeddingResult:
    """One returned block as the engine takes it, under the planned paths."""
    indices = [int(i) for i in block["index"]]
    reasons = [bytes(r).decode("utf-8", "surrogateescape") for r in block["reason"]]
    if indices == [-1]:  # the actor's model couldn't be built: its error, as locally
        name, _, message = reasons[0].partition(":")
        error_class = getattr(errors, name, None)
        raise (error_class if isinstance(error_class, type) else SearchUtilsError)(message)
    kept = [k for k, reason in enumerate(reasons) if not reason]
    features = np.asarray(block["features"], dtype=np.float32)[kept]
    skipped = [ImageReadError(paths[indices[k]], reason) for k, reason in enumerate(reasons) if reason]
    return EmbeddingResult([paths[indices[k]] for k in kept], features, skipped)


def _user_error(error: BaseException) -> SearchUtilsError | None:
    """The SearchUtilsError a worker raised, found inside Ray's wrappers
    (an actor that died in __init__, a failed task), if there is one."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, SearchUtilsError):
            return current
        todo += [current.__cause__, current.__context__]
        todo += [getattr(current, name, None) for name in ("cause", "base_exception")
                 if isinstance(getattr(current, name, None), BaseException)]
    return None


def _import_ray():
    """Ray, imported only when --ray asks for it (it is an optional extra)."""
    try:
        import ray
        import ray.data  # noqa: F401 -- the part we use; fails alike if missing
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install -r requirements-scale.txt (or make setup-scale)") from None
    _quiet_ray_data(ray.data)
    return ray


def _quiet_ray_data(data) -> None:
    """Our progress bar and one-line errors are all the user should see:
    Ray Data's bars and console logs go (its log files keep everything)."""
    context = data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)


def _connect(ray, address: str) -> None:
    """ray.init: a new local cluster for LOCAL, else the one at `address`
    ("auto", or host:port, which is tried first: Ray itself would retry an
    address where nothing listens for ever, logging as it goes).

    Raises:
        ClusterError: one line naming the address.
    """
    if address not in (LOCAL, "auto") and "://" not in address:
        _probe(address)
    # The driver's C++ core logs to stderr (e.g. a warning per actor pool,
    # and a line saying it obeys this); its log files keep everything.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    options = {"log_to_driver": False, "logging_level": logging.ERROR,
               "runtime_env": {"env_vars": {"PYTHONPATH": f"{REPO_DIR}{os.pathsep}${{PYTHONPATH}}"}}}
    try:
        with native_logs_held_back():  # replayed if starting fails
            if address == LOCAL:
                ray.init(include_dashboard=False, **options)
            else:
                ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {_one_line(error)}") from None


def _probe(address: str) -> None:
    """Refuse at once an address where nothing answers."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray takes host:port or auto (or nothing, for a local cluster), not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {reason.lower()}") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


__all__ = ["ClusterError", "RayEmbedder", "BatchEmbedder"]
