"""What the service keeps warm: the features file, followed across
re-indexing runs, and the model that embeds uploaded queries."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

import numpy as np

from ..engine import StoreModel
from ..errors import SearchUtilsError
from ..models import FeatureExtractor, load_extractor
from ..searcher import Searcher
from .config import Busy, ServiceConfig, ServiceError

RELOAD_RETRY_SECONDS = 1.0


class FollowedIndex:
    """The current generation of the features file as a Searcher.

    Each request asks `current()`: a stat of the generation's files tells
    whether a re-indexing run published a new one. The first request that
    notices loads it while the others go on with the old one (still whole:
    its files stay open or mapped), then it replaces the old one; a
    generation that can't be read (yet) is retried, the old one served.
    """

    def __init__(self, config: ServiceConfig, log: Callable[[str], None]):
        self._config, self._log = config, log
        self._searcher = self._load()
        self.loaded_at = time.time()
        self._reloading = threading.Lock()
        self._failed_at = 0.0
        self._problem: str | None = None  # the last failure logged: said once, not once per retry

    def _load(self) -> Searcher:
        return Searcher(self._config.features_path, self._config.model, note=self._log,
                        backend=self._config.backend)

    def current(self) -> Searcher:
        searcher = self._searcher
        if searcher.is_current() or time.monotonic() - self._failed_at < RELOAD_RETRY_SECONDS:
            return searcher
        if not self._reloading.acquire(blocking=False):
            return searcher  # another request is loading the new generation
        try:
            if self._searcher is searcher:
                self._searcher = self._load()
                self.loaded_at, self._problem = time.time(), None
                self._log(f"loaded the new generation of {self._config.features_path} "
                          f"({len(self._searcher):,} images)")
        except (SearchUtilsError, OSError) as error:
            self._failed_at = time.monotonic()
            if str(error) != self._problem:
                self._problem = str(error)
                self._log(f"warning: could not load the new {self._config.features_path} ({error}); "
                          "serving the previous one")
        finally:
            self._reloading.release()
        return self._searcher


class WarmModel:
    """The extractor for the features file's model, built once, shared by
    every uploaded query. An upload takes two turns: decoding (at most
    `decodes` at once: one can take a few hundred MB) and embedding (at most
    `model_calls` at once); at most `max_waiting` wait for either, and each
    waits at most `wait_seconds` for both together (then 503), so a burst of
    uploads slows down instead of piling up in memory."""

    def __init__(self, config: ServiceConfig, log: Callable[[str], None]):
        self._config, self._log = config, log
        self._decodes = threading.BoundedSemaphore(config.decodes)
        self._slots = threading.BoundedSemaphore(config.model_calls)
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._key: tuple | None = None
        self._extractor: FeatureExtractor | None = None
        self._failed: tuple[tuple, str] | None = None  # (key, why) of the build that failed
        self.state = "not loaded"  # "loading", "ready", or "unavailable: <why>"

    def warm_up(self, model: StoreModel) -> list[str]:
        """Build the model now; returns the lines to log (ready, or why
        not), for the caller to write once TensorFlow's are held back no more."""
        lines: list[str] = []
        try:
            self._extractor_for(model, lines.append)
        except ServiceError:
            pass  # the state says why; uploads get 503 with it
        return lines

    def deadline(self) -> float:
        """When an upload that starts waiting now must have had both its turns."""
        return time.monotonic() + self._config.wait_seconds

    def decoding(self, deadline: float):
        """A turn to decode an upload (a context manager)."""
        return self._turn(self._decodes, deadline, "a turn to decode it")

    def embed(self, image: np.ndarray, model: StoreModel, deadline: float | None = None) -> np.ndarray:
        with self._turn(self._slots, deadline or self.deadline(), "the model"):
            return self._extractor_for(model, self._log).embed(image[np.newaxis])[0]

    @contextlib.contextmanager
    def _turn(self, slots: threading.BoundedSemaphore, deadline: float, what: str) -> Iterator[None]:
        with self._count_lock:
            if self._waiting >= self._config.max_waiting:
                raise Busy(f"busy: {self._waiting} uploaded queries are waiting; try again shortly")
            self._waiting += 1
        try:
            if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise Busy(f"busy: waited {self._config.wait_seconds:g} s for {what}; try again shortly")
        finally:
            with self._count_lock:
                self._waiting -= 1
        try:
            yield
        finally:
            slots.release()

    def _extractor_for(self, model: StoreModel, log: Callable[[str], None]) -> FeatureExtractor:
        weights = self._config.weights or model.weights
        key = (model.spec, weights, model.precision)
        if self._key == key and self._extractor is not None:
            return self._extractor
        if not self._build_lock.acquire(timeout=max(self._config.wait_seconds, 120.0)):
            raise Busy("the model is still loading; try again shortly")
        try:
            if self._failed is not None and self._failed[0] == key:
                # Not retried (nor logged again) for the same model and weights: a failed build
                # can take seconds (Keras builds the model, then reads the weights), each upload
                # would pay it, and the weights won't mend while the service runs. A re-index
                # to another model tries again; so does a restart.
                raise ServiceError(503, f"the model can't be loaded: {self._failed[1]}")
            if self._key != key or self._extractor is None:
                self._build(model, weights, key, log)
            return self._extractor
        finally:
            self._build_lock.release()

    def _build(self, model: StoreModel, weights: str | None, key: tuple, log: Callable[[str], None]) -> None:
        self.state = "loading"
        started = time.perf_counter()
        try:
            if self._config.make_extractor is not None:
                self._extractor = self._config.make_extractor(model, weights)
            else:
                self._extractor = load_extractor(model.spec, weights, model.precision, hold_native_logs=False)
            # The compiled call is traced on first use (~0.7 s): not on a user's first upload.
            self._extractor.embed(np.zeros((1, *model.spec.input_size, 3), np.uint8))
        except SearchUtilsError as error:
            self._key, self._extractor, self._failed = None, None, (key, str(error))
            self.state = f"unavailable: {error}"
            log(f"warning: uploaded queries can't be embedded: {error}")
            raise ServiceError(503, f"the model can't be loaded: {error}") from None
        self._key, self._failed, self.state = key, None, "ready"
        log(f"model {model.spec.name} ready ({time.perf_counter() - started:.1f} s)")
