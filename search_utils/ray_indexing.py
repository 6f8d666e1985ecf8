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

import argparse
import ipaddress
import logging
import os
import signal
import socket
import threading
from typing import Callable, Iterator, Sequence

import numpy as np

from . import errors
from .errors import ImageReadError, SearchUtilsError
from .indexing import EmbeddingResult, PathEmbedder
from .models import native_logs_held_back

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS_PER_ACTOR = 0.5  # whole CPUs hang a 2-CPU cluster (see above)
LOCAL = "local"  # what the command line passes for a bare --ray
AUTO = "auto"  # RAY_ADDRESS, else the cluster last started on this machine
CONNECT_TIMEOUT = 5.0  # seconds to reach the cluster's address, and for it to answer as Ray, before giving up
ADDRESS_FORM = "host:port of the cluster's head, auto, or nothing for a local cluster"


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
        self.address = resolved_address(checked_address(address))
        try:
            _connect(self.ray, self.address)
            self.actors = self._pool_size(actors)
        except BaseException:  # e.g. interrupted while a local cluster was starting: none is left behind
            self.close()
            raise

    def embed_files(self, paths: Sequence[str], batch_size: int) -> Iterator[EmbeddingResult]:
        blocks = None
        try:
            blocks = iter(self._blocks(paths, batch_size))  # a generator: closed below, however the run ends
            for block in blocks:
                yield _as_result(block, paths)
        except Exception as error:
            user_error = _user_error(error)
            if user_error is None:
                raise
            raise user_error from None  # e.g. the actors' model can't load: its one line, as locally
        finally:
            try:
                if hasattr(blocks, "close"):
                    blocks.close()  # Ray Data shuts its executor down: the actors are killed now, not later
            finally:
                self.close()

    def close(self) -> None:
        """Disconnect, and stop the cluster if this process started it."""
        self.ray.shutdown()  # also after a failed or interrupted start (a no-op if nothing was started)

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


def ray_address(text: str) -> str:
    """argparse type of --ray: the address checked for form (one line if
    not), so that a wrong one is refused even when nothing needs embedding."""
    try:
        return checked_address(text, source="")
    except ClusterError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def checked_address(text: str, source: str = "--ray") -> str:
    """LOCAL, AUTO or host:port (port 1-65535; an IPv6 host in brackets).
    `source`: where the address came from, for the message.

    Raises:
        ClusterError: any other form, e.g. a Ray Client address (ray://...).
    """
    address = text.strip()
    if not address:
        raise ClusterError(_said(source, f"empty; give {ADDRESS_FORM}"))
    if address in (LOCAL, AUTO):
        return address
    if address.startswith("ray://"):
        raise ClusterError(_said(source, "Ray Client addresses (ray://) are not supported; give host:port of the "
                                         "cluster's head (its GCS port: 6379 unless `ray start --head --port` "
                                         "said otherwise)"))
    _host_and_port(address, source)
    return address


def _said(source: str, message: str) -> str:
    return f"{source}: {message}" if source else message


def _host_and_port(address: str, source: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    bad = (not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535
           or "://" in address or any(char.isspace() or char in "/@?#" for char in host))
    if not bad and ":" in host:  # IPv6: only in brackets, as host:port can't be told apart otherwise
        try:
            bad = not bracketed or not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            bad = True
    if bad:
        out_of_range = port.isascii() and port.isdigit() and not 1 <= int(port) <= 65535
        raise ClusterError(_said(source, f"not an address: {address!r}; give {ADDRESS_FORM}"
                                         + (" (ports are 1-65535)" if out_of_range else "")))
    return host, int(port)


def resolved_address(address: str) -> str:
    """The host:port that `address` means (LOCAL stays LOCAL): for AUTO,
    RAY_ADDRESS if set, else the cluster last started on this machine with
    `ray start` (Ray's record of it in its temporary folder).

    Raises:
        ClusterError: AUTO and no cluster to be found, or RAY_ADDRESS malformed.
    """
    if address != AUTO:
        return address
    environment = os.environ.get("RAY_ADDRESS", "").strip()
    if environment and environment != AUTO:
        resolved = checked_address(environment, "RAY_ADDRESS")
        return resolved
    try:
        from ray._private import services

        found = services.find_bootstrap_address(None)
    except Exception:  # Ray's private helper moved or its record is unreadable: then only RAY_ADDRESS tells
        found = None
    if not found:
        raise ClusterError("--ray auto: no Ray cluster found (RAY_ADDRESS is not set, and none was started on this "
                           "machine with `ray start --head`); give host:port of the cluster's head")
    return checked_address(found, "--ray auto")


def _connect(ray, address: str) -> None:
    """ray.init: a new local cluster for LOCAL (whatever RAY_ADDRESS says),
    else the one at host:port `address`, checked first: something must
    listen there and answer as a Ray head (GCS) does, within seconds (Ray
    itself would retry an address where nothing listens for ever, logging
    as it goes, and wait on one that listens but isn't Ray for as long).

    ray.init sets its own SIGTERM handler (exit status 15, Ray's log lines);
    the command's (cli.run: `kill` stops as Ctrl-C does) is put back.

    Raises:
        ClusterError: one line naming the address.
    """
    if address != LOCAL:
        _probe(address)
    # The driver's C++ core logs to stderr (e.g. a warning per actor pool,
    # and a line saying it obeys this); its log files keep everything.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    options = {"log_to_driver": False, "logging_level": logging.ERROR,
               "runtime_env": {"env_vars": {"PYTHONPATH": f"{REPO_DIR}{os.pathsep}${{PYTHONPATH}}"}}}
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        with native_logs_held_back():  # replayed if starting fails
            if address == LOCAL:  # "local": a new cluster, even if RAY_ADDRESS names one
                ray.init(address=LOCAL, include_dashboard=False, **options)
            else:
                ray.init(address=address, **options)
    except SystemExit as stop:  # Ray's SIGTERM handler, while it was starting
        if stop.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {_one_line(error)}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _probe(address: str) -> None:
    """Refuse within seconds an address where nothing listens, or where
    something listens that doesn't answer as a Ray cluster's head: a TCP
    connection, then one gRPC call to its GCS with a deadline."""
    host, port = _host_and_port(address, "--ray")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        reason = error.strerror or ("timed out" if isinstance(error, TimeoutError) else type(error).__name__)
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {reason.lower()}") from None
    problem = _gcs_problem(address)
    if problem:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {problem}")


def _gcs_problem(address: str) -> str | None:
    """Why `address` is not a Ray head's GCS, or None if it answers as one
    (a GCS that wants a token it didn't get counts: ray.init says more)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    try:
        from ray._private.gcs_utils import create_gcs_channel  # Ray's TLS and token settings

        channel = create_gcs_channel(address)
    except Exception:
        channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])  # as Ray's own
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=CONNECT_TIMEOUT)
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return (f"something listens there but gave no answer within {CONNECT_TIMEOUT:g} s: not a Ray "
                    "cluster's head (give its GCS port, 6379 by default)")
        return ("something listens there but does not answer as a Ray cluster's head does "
                "(give its GCS port, 6379 by default)")
    finally:
        channel.close()
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


__all__ = ["AUTO", "ClusterError", "LOCAL", "RayEmbedder", "BatchEmbedder", "checked_address", "ray_address",
           "resolved_address"]
