"""The two jobs the commands do, as library calls: index a folder into a
features file, and find a query's features (stored, or embedded with the
model the features file was made with).

Indexing is incremental (`update_index`): the indexing state beside the
features file (catalog) remembers what was embedded, so a re-run embeds only
new and changed content (changes), checkpoints every batch, and rewrites the
features file only at the end.

Collaborators that are expensive or that the tests replace (the extractor)
are passed in, never built here unasked.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import __version__, ann, catalog, locking
from .changes import Changes, Entry, classify, scan
from .errors import (
    DatasetError, FeaturesFileError, ImageReadError, ModelMismatchError, SearchUtilsError, UnknownModelError,
    WeightsUnavailableError, printable_path,
)
from .images import RESAMPLING, find_images, load_image
from .indexing import batches_of
from .models import DEFAULT_MODEL, PRECISIONS, FeatureExtractor, ModelSpec, bf16_supported, get_model_spec
from .modes import learn_whitening, whitening_input
from .search import find_row
from .store import (
    FORMAT_VERSION, FeatureStore, FileWriteError, file_format, load_features, metadata_path, output_format,
    read_metadata, NEXT_SUFFIX, recover_interrupted_write, save_features, whitening_path,
)
from .store.atomic import name_length_problem, regular_file_problem
from .store.formats import features_file_problem

POST_MODEL = "resnet50"  # what the post's original script used


def list_dataset(dataset: str, on_error: Callable[[ImageReadError], None] | None = None,
                 include_hidden: bool = False) -> list[str]:
    """Image files of `dataset`; raises DatasetError if there are none.
    `on_error` hears of each subfolder that can't be listed; hidden files
    and folders are left out unless `include_hidden` (see find_images)."""
    paths = find_images(dataset, on_error, include_hidden)
    if not paths:
        hint = "" if include_hidden else " (hidden files and folders are skipped: --include-hidden)"
        raise DatasetError(f"no image files (jpg, jpeg, png, gif, bmp, webp, tif, tiff) in "
                           f"{printable_path(dataset)}{hint}")
    return paths


def whitening_arrays(features: np.ndarray) -> dict[str, np.ndarray] | None:
    """Learn the "whitened" search mode's transform from the collection and
    apply it to every row now, so that mode costs nothing extra per query."""
    if len(features) < 3:
        return None
    whitening = learn_whitening(features)
    vectors = whitening.apply(whitening_input(features))
    return {**whitening.to_arrays(), "vectors": vectors}


def _metadata(spec: ModelSpec, weights: str, precision: str, dataset: str, runtime: str) -> dict:
    """How a features file was made, so search can embed queries the same way."""
    return {
        "format_version": FORMAT_VERSION,
        "tool": "search_utils",
        "tool_version": __version__,
        "model": spec.name,
        "weights": weights,
        "precision": precision,
        "runtime": runtime,
        "feature_dim": spec.feature_dim,
        "preprocessing": spec.describe_preprocessing(),
        "dataset": dataset,
        "base_dir": os.getcwd(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class StoreModel:
    """Which model made a features file, and how we know."""

    spec: ModelSpec
    weights: str | None  # None: the model's default source
    assumed: bool  # no metadata: taken to be the post's ResNet50
    precision: str = "float32"  # what indexing computed in, for outside queries


def store_model(store: FeatureStore, requested: str | None = None) -> StoreModel:
    """The model (and weights) a features file was made with.

    A file whose metadata names no model (no metadata file: the post's
    script; or "model" missing or null) is taken for the post's ResNet50.

    Args:
        requested: a model name the user asked for; it must match the file.

    Raises:
        ModelMismatchError: the file's model or dimension contradicts the
            request or the registry.
        FeaturesFileError: the metadata names a model that is not a name.
        UnknownModelError: the metadata names a model this tool doesn't know.
    """
    metadata = store.metadata
    name = metadata.get("model")
    if name is not None and not isinstance(name, str):
        raise FeaturesFileError(f"the features file's metadata names model {json.dumps(name)}, which is not "
                                f"a model name; re-index the images")
    assumed = not name
    if metadata:  # when assumed: why
        why = "its metadata names no model"
    elif store.metadata_file is not None:
        why = f"metadata file {printable_path(store.metadata_file)} holds no model"
    else:
        why = "no metadata file"
    try:
        spec = get_model_spec(POST_MODEL if assumed else name)
    except UnknownModelError as error:
        raise UnknownModelError(f"the features file's metadata names {error}") from None
    if requested is not None and requested != spec.name:
        raise ModelMismatchError(
            f"features file was made with {spec.name}, not {requested}; "
            f"re-index with --model {requested} or drop --model"
        )
    if store.dim != spec.feature_dim:
        source = f"the post's resnet50 ({why})" if assumed else spec.name
        raise ModelMismatchError(
            f"features file has {store.dim} values per image but {source} gives {spec.feature_dim}"
        )
    preprocessing = metadata.get("preprocessing")
    recorded_resize = preprocessing.get("resize") if isinstance(preprocessing, dict) else None
    if isinstance(recorded_resize, str) and recorded_resize in RESAMPLING:  # indexed with --resize: embed queries alike
        spec = dataclasses.replace(spec, resize=recorded_resize)
    weights = metadata.get("weights")
    if not isinstance(weights, str) or weights == spec.default_weights:
        weights = None  # a value that names no file (hand-edited): the model's default source
    precision = metadata.get("precision", "float32")
    if precision not in PRECISIONS or (precision == "bf16" and not bf16_supported()):
        precision = "float32"
    return StoreModel(spec, weights, assumed, precision)


def query_features(
    store: FeatureStore,
    query_path: str,
    spec: ModelSpec,
    make_extractor: Callable[[], FeatureExtractor],
) -> tuple[np.ndarray, bool]:
    """Features of the query and whether they were reused from the store.

    A query that is in the store (the same file, however its path is
    spelled) reuses its row and never builds the model. Any other image is
    read first (so a bad query fails before the slow model build), then
    embedded by `make_extractor()`.

    Raises:
        ImageReadError: the query is not a readable image.
    """
    base_dir = store.metadata.get("base_dir")
    if not isinstance(base_dir, str) or not base_dir:  # hand-edited: relative paths start here
        base_dir = None
    row = find_row(store.paths, query_path, base_dir)
    if row is not None:
        return store.features[row], True
    image = load_image(query_path, size=spec.input_size, interpolation=spec.resize)
    extractor = make_extractor()
    return extractor.embed(image[np.newaxis])[0], False


# -- incremental indexing --------------------------------------------------


class IndexingInterrupted(SearchUtilsError):
    """Ctrl-C or SIGTERM during an update; what was embedded is checkpointed."""

    exit_code = 130


@dataclass(frozen=True)
class ModelChoice:
    """The model an indexing run asks for, known before it is built (so a run
    with nothing to embed never builds it)."""

    spec: ModelSpec
    weights: str | None = None  # a local weights file; None: the model's default source
    precision: str = "float32"
    runtime: str = "tensorflow"  # not part of the identity: features equal to 1e-6

    @property
    def weights_source(self) -> str:
        """The weights as the extractor (and the metadata) will name them."""
        return self.spec.default_weights if self.weights is None else os.path.abspath(self.weights)


# What makes two runs' features comparable. The weights file counts by its
# content, so moving it is no change of model.
IDENTITY_KEYS = ("model", "feature_dim", "weights", "precision", "preprocessing")


def model_identity(choice: ModelChoice) -> dict:
    """The identity recorded in the indexing state (IDENTITY_KEYS, plus the
    weights path, for messages).

    Raises:
        WeightsUnavailableError: the weights file is missing or unreadable.
    """
    weights = choice.weights_source
    if choice.weights is not None:
        problem = weights_file_problem(choice.weights)
        if problem:
            raise WeightsUnavailableError(problem)
        try:
            weights = f"{catalog.HASH_NAME}:{catalog.content_hash(choice.weights)}"
        except OSError as error:
            raise WeightsUnavailableError(f"cannot read weights file {printable_path(choice.weights)}: "
                                          f"{error.strerror}") from None
    spec = choice.spec
    return {"model": spec.name, "feature_dim": spec.feature_dim, "weights": weights,
            "precision": choice.precision, "preprocessing": spec.describe_preprocessing(),
            "weights_path": choice.weights_source}


def weights_file_problem(path: str) -> str | None:
    """Why `path` can't be a weights file (missing, a folder, a FIFO or
    device, which reading would block on or never finish), or None."""
    shown = printable_path(path)
    if not os.path.lexists(path):
        return f"weights file not found: {shown}"
    if os.path.isdir(path):
        return f"weights file {shown} is a folder, not a weights file"
    if not os.path.exists(path):
        return f"weights file {shown} is a broken symbolic link"
    if regular_file_problem(path):
        return f"weights file {shown} is not a regular file (a FIFO, socket or device)"
    return None


def _ignore(*_args) -> None:
    pass


@dataclass
class IndexEvents:
    """What an update tells its caller as it goes (all optional)."""

    note: Callable[[str], None] = _ignore  # one line worth knowing
    skip: Callable[[ImageReadError], None] = _ignore  # a file that is not indexed, and why
    embedding: Callable[[int], None] = _ignore  # model built, about to embed this many
    progress: Callable[[int], None] = _ignore  # this many more files embedded (or failed)


@dataclass
class UpdateReport:
    output: str
    model: str
    changes: Changes
    rows: int  # images in the features file
    skipped: int  # listed files that could not be read
    embedded: int = 0  # contents embedded by this run (byte-identical files count once)
    failed: int = 0  # files this run tried to read and couldn't
    seconds: float = 0.0  # spent embedding
    written: bool = False  # the features file was (re)written

    @property
    def images_per_second(self) -> float:
        done = self.embedded + self.failed
        return done / self.seconds if self.seconds > 0 else 0.0


def update_index(
    dataset: str,
    output: str,
    choice: ModelChoice,
    make_extractor: Callable[[], FeatureExtractor],
    paths: list[str] | None = None,
    batch_size: int = 32,
    rebuild: bool = False,
    events: IndexEvents | None = None,
    unlisted: Sequence[str] = (),
) -> UpdateReport:
    """Bring features file `output` up to date with `dataset`, embedding only
    files whose content the indexing state (catalog) doesn't hold yet.

    Each batch is checkpointed in the state as it is done; `output` is
    replaced whole, atomically, only at the end, and not at all if nothing
    changed. `make_extractor` is called only if something needs embedding.
    The caller holds `locking.exclusive_output(output)`.

    A run that fails or is interrupted before its first checkpoint leaves
    no state behind if there was none before it (a state holding features
    is never deleted).

    Args:
        rebuild: forget the state and embed everything. The rebuild is
            recorded in the state before anything else, so a run killed at
            any point of it leaves the next run, with or without `rebuild`,
            to finish it; the model is built before the state forgets
            anything: if it can't be, the state is left as it was. A
            rebuild already under way with the same model resumes.
        unlisted: subfolders of `dataset` that couldn't be listed this time
            (see list_dataset's on_error): the files recorded under them
            keep their rows, as they were, instead of counting as removed.

    Raises:
        DatasetError: no image in the folder, or none could be read.
        ModelMismatchError: `output` or its state holds another model's
            features (`rebuild` replaces them).
        WeightsUnavailableError, FeaturesFileError, catalog.StateFileError.
        IndexingInterrupted: Ctrl-C or SIGTERM; `output` is as it was.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_output(output)
    events = events or IndexEvents()
    paths = list_dataset(dataset) if paths is None else paths
    identity = model_identity(choice)
    recover_interrupted_write(output)  # what a run killed while writing left
    # No state, or an empty file (it records nothing, not even a model): made by this run, and
    # removed again if it fails before a checkpoint.
    created = catalog.state_is_empty(output)
    if created and not rebuild:
        _check_stateless_output(output, identity, len(paths), events)
    requested = False  # this run recorded a rebuild that a kill would leave to the next run
    try:
        try:
            state = catalog.IndexState.open(catalog.state_path(output))
        except catalog.DamagedStateError:
            if not rebuild:
                raise
            make_extractor = _built_now(make_extractor)  # a model that can't be had leaves the state as it was
            catalog.remove_state(output)
            created, state = True, catalog.IndexState.open(catalog.state_path(output))
        with state:
            requested = _rebuild_due(state, identity, output, rebuild, created, events)
            if requested:
                make_extractor = _built_now(make_extractor, state)
            _adopt_identity(state, identity, output)
            update = _Update(dataset, output, choice, state, events, unlisted)
            return update.run(paths, make_extractor, batch_size)
    except BaseException as error:
        discarded = created and catalog.discard_if_empty(output)
        if discarded and isinstance(error, (KeyboardInterrupt, IndexingInterrupted)):
            raise IndexingInterrupted("interrupted before any image was embedded: nothing was written; "
                                      "run the same command again") from None
        if isinstance(error, KeyboardInterrupt):  # outside _Update.run: opening the state, or a rebuild's model
            done = ("the --rebuild is recorded, and the next run (with or without --rebuild) finishes it"
                    if requested else "run the same command again")
            raise IndexingInterrupted(f"interrupted before embedding started: {printable_path(output)} is as it "
                                      f"was; {done}") from None
        raise


def _rebuild_due(state: catalog.IndexState, identity: dict, output: str, rebuild: bool, created: bool,
                 events: IndexEvents) -> bool:
    """Whether this run must (re)start a rebuild: asked for with `rebuild`
    (unless the same model's rebuild is under way: that one resumes), or
    recorded by an earlier run killed before it began.

    Raises:
        ModelMismatchError: a plain run while another model's rebuild is
            under way (it would mix models).
    """
    mark, recorded = state.rebuild, state.identity
    same_model = recorded is not None and all(recorded.get(k) == identity[k] for k in IDENTITY_KEYS)
    under_way = mark == catalog.REBUILD_STARTED  # forgotten already, being embedded again
    if created and rebuild:
        state.reset()  # nothing to forget: only the mark, for a resumed run's note
        return False
    if mark == catalog.REBUILD_REQUESTED or (rebuild and not (under_way and same_model)):
        if not rebuild:
            events.note(f"an earlier --rebuild of {printable_path(output)} was stopped before it began: finishing it "
                        f"(everything is embedded again)")
        return True
    if under_way and not same_model and state.holds_features():
        raise ModelMismatchError(
            f"{printable_path(output)} has an unfinished --rebuild with {recorded.get('model')} in its indexing state: "
            f"run that command again to finish it, or pass --rebuild to start again with {identity['model']}"
        )
    return False


# What an indexing run adds to the output's name for the files it writes beside it; the longest
# decides whether the file system takes them all (temporary files are named to fit: store.atomic).
SIDE_FILES = {
    catalog.STATE_SUFFIX + "-journal": "the indexing state's journal",
    ".whitening.npz" + NEXT_SUFFIX: "the whitening file being published",
}


def check_output(output: str) -> None:
    """Refuse, before any work (and before the model loads), an output this
    process can't write, naming the file and why: an unsupported extension;
    a name too long for the file system once the suffixes of the files
    written beside it are added; the features file, or a file written
    beside it (metadata, whitening, approximate-search index, lock,
    indexing state and SQLite's journals, the sidecars being published),
    that is a folder, a FIFO, a socket or a device (a FIFO would block the
    run for ever); an existing file that is not a features file (a labels
    CSV, a text file named .h5: only a features file may be replaced, even
    with --rebuild); a missing folder, or a file where it should be; a
    folder where files can't be created (permissions, a read-only file
    system); a lock or state file that exists but can't be written. Tried
    as the run will write (locking.create_problem, rewrite_problem). A full
    disk often shows only when the lock or the state is first written, which
    is still before the model loads.

    Raises:
        FeaturesFileError: the message names the file and the reason.
    """
    shown = printable_path(output)
    output_format(output)
    problem = locking.create_problem(output)
    if problem:
        raise FeaturesFileError(f"cannot write features file {shown}: {problem}")
    problem = name_length_problem(output, SIDE_FILES)
    if problem:
        raise FeaturesFileError(f"cannot write features file {shown}: {problem}")
    sidecars = (metadata_path(output), whitening_path(output), ann.index_path(output))
    beside = [("", name) for name in sidecars + tuple(name + NEXT_SUFFIX for name in sidecars[:2])]
    beside += [("lock file ", locking.lock_path(output))]
    beside += [("indexing state ", path) for path in catalog.state_files(output)]
    for kind, path in beside:
        problem = regular_file_problem(path)
        if problem:
            raise FeaturesFileError(f"cannot write {kind}{printable_path(path)}: {problem}")
    problem = features_file_problem(output)
    if problem:
        raise FeaturesFileError(f"cannot write features file {shown}: it exists and is not a features file "
                                f"({problem}); only a features file is replaced: choose another --output, "
                                f"or delete it if it may go")
    in_place = [("lock file", locking.lock_path(output))]
    in_place += [("indexing state", path) for path in catalog.state_files(output)]
    for kind, path in in_place:
        problem = locking.rewrite_problem(path)
        if problem:
            raise FeaturesFileError(f"cannot write {kind} {printable_path(path)}: {problem}")


def _check_stateless_output(output: str, identity: dict, count: int, events: IndexEvents) -> None:
    """A features file without state (an older run, or the post's script)
    can't say which rows are still current: it is indexed again in full,
    unless it names another model (then the user must say --rebuild)."""
    if not os.path.exists(output):
        return
    recorded = _recorded_model(output)
    if recorded is not None and recorded != identity["model"]:
        raise _mismatch(output, {"model": recorded}, identity)
    events.note(f"{printable_path(output)} has no indexing state ({printable_path(catalog.state_path(output))}), "
                f"e.g. made by an older run: embedding all {count} images; it is replaced when the run completes")


def _recorded_model(output: str) -> str | None:
    """The model an existing features file's metadata names; None if it has
    none or is unreadable (it is replaced anyway)."""
    try:
        metadata = load_features(output, mmap=True).metadata if file_format(output) == "hdf5" else read_metadata(output)
    except FeaturesFileError:
        return None
    return metadata.get("model")


def _built_now(make_extractor: Callable[[], FeatureExtractor],
               state: catalog.IndexState | None = None) -> Callable[[], FeatureExtractor]:
    """Build the model now, for a rebuild: before the state forgets anything,
    so a model that can't be had leaves it as it was. With `state`, the
    rebuild is recorded in it first (from then on a killed run leaves the
    next one to finish it); once the model is built, the state is reset."""
    previous = state.request_rebuild() if state is not None else None
    try:
        extractor = make_extractor()
    except Exception:  # can't be built: the rebuild doesn't happen (an interrupt keeps the record)
        if state is not None:
            try:
                state.set_rebuild(previous)
            except catalog.StateFileError:
                pass  # the model's error is the one to report
        raise
    if state is not None:
        state.reset()
    return lambda: extractor


def _adopt_identity(state: catalog.IndexState, identity: dict, output: str) -> None:
    """Record the model in a new state; refuse another model's state, unless
    it holds no features yet (a run whose model couldn't be built)."""
    recorded = state.identity
    differs = recorded is not None and any(recorded.get(k) != identity[k] for k in IDENTITY_KEYS)
    if differs and state.holds_features():
        raise _mismatch(output, recorded, identity)
    if recorded != identity:  # new state, or the weights file moved
        state.set_identity(identity)


def _mismatch(output: str, old: dict, new: dict) -> ModelMismatchError:
    old_text, new_text = _describe_difference(old, new)
    return ModelMismatchError(
        f"{printable_path(output)} holds features made with {old_text}, this run would make {new_text} ones, and one "
        f"features file can't mix models: pass --rebuild to re-index everything with {new['model']}, "
        f"or choose another --output"
    )


def _describe_difference(old: dict, new: dict) -> tuple[str, str]:
    """The two models, with the settings that differ (if the names don't)."""
    if old.get("model") != new.get("model"):
        return old.get("model", "an unknown model"), new["model"]
    old_parts, new_parts = [], []
    for key in ("weights", "precision"):
        if old.get(key) != new.get(key):
            shown = "weights_path" if key == "weights" else key
            old_parts.append(f"{key} {old.get(shown)}")
            new_parts.append(f"{key} {new.get(shown)}")
    old_steps, new_steps = old.get("preprocessing", {}), new.get("preprocessing", {})
    for key in sorted(set(old_steps) | set(new_steps)):
        if old_steps.get(key) != new_steps.get(key):
            old_parts.append(f"{key} {old_steps.get(key)}")
            new_parts.append(f"{key} {new_steps.get(key)}")
    return _with_details(old["model"], old_parts), _with_details(new["model"], new_parts)


def _with_details(name: str, details: list[str]) -> str:
    return f"{name} ({', '.join(details)})" if details else name


class _Update:
    """One incremental indexing run: scan, embed what's missing, write."""

    def __init__(self, dataset: str, output: str, choice: ModelChoice, state: catalog.IndexState,
                 events: IndexEvents, unlisted: Sequence[str] = ()):
        self.dataset, self.output, self.choice = dataset, output, choice
        self.unlisted = [os.path.relpath(folder, dataset) for folder in unlisted]
        self.state, self.events = state, events
        self.pending: list[str] | None = None  # content hashes to embed, once known
        self.reported: set[str] = set()  # paths already reported as skipped
        self.hidden: set[str] = set()  # paths recorded under subfolders that can't be listed now
        self.report: UpdateReport | None = None

    def run(self, paths: list[str], make_extractor: Callable[[], FeatureExtractor], batch_size: int) -> UpdateReport:
        try:
            entries = scan(self.dataset, paths, self.state)
            catalogue = self.state.catalogue()
            entries += self._hidden_entries(entries, catalogue)
            self.report = UpdateReport(self.output, self.choice.spec.name, classify(entries, catalogue), 0, 0)
            todo = self._plan(entries, catalogue)
            if todo:
                self._embed(todo, make_extractor, batch_size)
            return self._finish(entries)
        except KeyboardInterrupt:
            raise IndexingInterrupted(self._interrupted()) from None

    def _hidden_entries(self, entries: list[Entry], catalogue: dict[str, str | None]) -> list[Entry]:
        """Files of the last run inside a subfolder that can't be listed now
        (a permission slip, an unmounted share): kept as they were, not
        removed, so a passing problem costs no features."""
        listed = {entry.rel for entry in entries}
        known = self.state.known_contents()  # hash -> None if embedded, else why it couldn't be read
        # Every file recorded there stays recorded (none counts as removed); the images among them keep
        # their rows; the files that couldn't be read are not reported again (they can't be seen now).
        hidden = [Entry(os.path.join(self.dataset, rel), rel, digest) for rel, digest in sorted(catalogue.items())
                  if rel not in listed and self._under_unlisted(rel)]
        self.hidden = {entry.path for entry in hidden}
        images = sum(entry.hash is not None and entry.hash in known and known[entry.hash] is None for entry in hidden)
        if images:
            self.events.note(f"kept the {images} images recorded under folders that can't be listed now")
        return hidden

    def _under_unlisted(self, rel: str) -> bool:
        return any(rel.startswith(os.path.join(folder, "")) for folder in self.unlisted)

    def _plan(self, entries: list[Entry], catalogue: dict[str, str | None]) -> dict[str, str]:
        """Content hash -> one path to embed it from, for contents the state
        lacks; reports the files already known to be unreadable."""
        known = self.state.known_contents()
        published = set(catalogue.values())
        todo: dict[str, str] = {}
        resumed: set[str] = set()
        for entry in entries:
            if entry.path in self.hidden and (entry.hash is None or entry.hash not in known):
                continue  # can't be read now: kept as recorded
            if entry.hash is None:
                self._skip(entry.error)
            elif entry.hash not in known:
                todo.setdefault(entry.hash, entry.path)
            elif known[entry.hash] is not None:
                self._skip(ImageReadError(entry.path, f"{known[entry.hash]} (same content as before: not retried)"))
            elif entry.hash not in published:
                resumed.add(entry.hash)
        if resumed:
            run = "--rebuild" if self.state.rebuild == catalog.REBUILD_STARTED else "run"
            self.events.note(f"resuming an unfinished {run}: {len(resumed)} images were embedded already")
        self.pending = list(todo)
        return todo

    def _skip(self, error: ImageReadError | None) -> None:
        if error is not None and error.path not in self.reported and error.path not in self.hidden:
            self.reported.add(error.path)
            self.events.skip(error)

    def _embed(self, todo: dict[str, str], make_extractor, batch_size: int) -> None:
        """Embed one file per missing content; each batch is one commit.
        `make_extractor` gives a FeatureExtractor or a PathEmbedder (a
        cluster); batches may come back in any order."""
        extractor = make_extractor()
        self.events.embedding(len(todo))
        digest_of = {path: digest for digest, path in todo.items()}
        start = time.perf_counter()
        for batch in batches_of(extractor, list(todo.values()), batch_size):
            self.state.add_contents({digest_of[p]: row for p, row in zip(batch.paths, batch.features)},
                                    {digest_of[e.path]: e.reason for e in batch.skipped})
            for error in batch.skipped:
                self._skip(error)
            self.report.embedded += len(batch.paths)
            self.report.failed += len(batch.skipped)
            self.report.seconds = time.perf_counter() - start
            self.events.progress(len(batch.paths) + len(batch.skipped))

    def _finish(self, entries: list[Entry]) -> UpdateReport:
        """Write `output` from the state unless it already is what it would be."""
        known = self.state.known_contents()
        rows = [e for e in entries if e.hash is not None and known.get(e.hash, "") is None]
        for entry in entries:  # copies of files that failed in this run
            if entry.hash is not None and known.get(entry.hash):
                self._skip(ImageReadError(entry.path, known[entry.hash]))
        if not rows:
            raise DatasetError(
                f"none of the {len(entries)} image files in {printable_path(self.dataset)} could be read; "
                f"nothing written"
            )
        unseen = sum(entry.path in self.hidden and not (entry.hash is not None and known.get(entry.hash, "") is None)
                     for entry in entries)  # files without rows under folders that can't be listed: not skipped
        self.report.rows, self.report.skipped = len(rows), len(entries) - len(rows) - unseen
        metadata = _metadata(self.choice.spec, self.choice.weights_source, self.choice.precision, self.dataset,
                             self.choice.runtime)
        if self._needs_writing(metadata):
            self._write(entries, rows, metadata)
        return self.report

    def _needs_writing(self, metadata: dict) -> bool:
        written = self.state.written
        fingerprint = _fingerprint(self.output)
        if written is not None and written["files"] != fingerprint:
            self.events.note(f"{printable_path(self.output)} is not as the last run left it (edited, replaced or "
                             f"deleted): writing it again from the indexing state")
        return (self.report.changes.any or self.report.embedded > 0 or self.report.failed > 0
                or written != {"metadata": _lasting(metadata), "files": fingerprint})

    def _write(self, entries: list[Entry], rows: list[Entry], metadata: dict) -> None:
        features = self.state.read_features([e.hash for e in rows], self.choice.spec.feature_dim,
                                            [e.path for e in rows])
        store = FeatureStore([e.path for e in rows], features, metadata, whitening_arrays(features))
        save_features(self.output, store)
        self.state.publish({e.rel: e.hash for e in entries},
                           {"metadata": _lasting(metadata), "files": _fingerprint(self.output)})
        self.report.written = True

    def _interrupted(self) -> str:
        if self.pending is None:
            return (f"interrupted before embedding started: {printable_path(self.output)} is as it was; "
                    f"run the same command again to resume")
        try:
            done = self.state.count_contents(self.pending)
        except catalog.StateFileError:
            done = self.report.embedded + self.report.failed
        return (f"interrupted: {done} of {len(self.pending)} images embedded and checkpointed; "
                f"run the same command again to resume")


def keep_ann_index(output: str, rows: int, threshold: int, note: Callable[[str], None]) -> None:
    """Build or refresh `<output>.ann` for large collections (`rows` at
    least `threshold`); drop it when the collection shrank below. Small
    collections read nothing more. Called once `output` is written.

    Raises:
        FileWriteError: the index can't be written (a full disk): the
            message names it and says the features file is written.
    """
    path = ann.index_path(output)
    if rows < threshold and not os.path.exists(path):
        return
    try:
        ann.ensure_index(output, load_features(output, mmap=True), threshold, note=note)
    except (OSError, FileWriteError) as error:
        reason = error.reason if isinstance(error, FileWriteError) else error.strerror or str(error)
        raise FileWriteError(
            f"the features file {printable_path(output)} is written, but its approximate-search index "
            f"{printable_path(path)} could not be ({reason}): searches scan every row until it is; free some "
            f"space and run the same command again"
        ) from None


def _lasting(metadata: dict) -> dict:
    """The metadata without its timestamp: what decides whether the written
    file is still the one this run would write."""
    return {key: value for key, value in metadata.items() if key != "created"}


def _fingerprint(output: str) -> list[list[int] | None]:
    """Size, mtime and inode of the features file and its sidecars: any
    change means someone else wrote them."""
    files = [output]
    if output_format(output) == "csv":
        files += [metadata_path(output), whitening_path(output)]
    fingerprint = []
    for path in files:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            fingerprint.append(None)
        else:
            fingerprint.append([info.st_size, info.st_mtime_ns, info.st_ino])
    return fingerprint


__all__ = [
    "DEFAULT_MODEL",
    "IndexEvents",
    "IndexingInterrupted",
    "ModelChoice",
    "UpdateReport",
    "check_output",
    "keep_ann_index",
    "weights_file_problem",
    "StoreModel",
    "list_dataset",
    "query_features",
    "store_model",
    "update_index",
]
