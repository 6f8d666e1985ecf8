"""The two jobs the commands do, as library calls: index a folder into a
features file, and find a query's features (stored, or embedded with the
model the features file was made with).

Collaborators that are expensive or that the tests replace (the extractor)
are passed in, never built here unasked.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import __version__
from .errors import DatasetError, ModelMismatchError
from .images import RESAMPLING, find_images, load_image
from .indexing import EmbeddingResult, embed_images
from .models import DEFAULT_MODEL, FeatureExtractor, ModelSpec, bf16_supported, get_model_spec
from .modes import learn_whitening, whitening_input
from .search import find_row
from .store import FORMAT_VERSION, FeatureStore, save_features

POST_MODEL = "resnet50"  # what the post's original script used


@dataclass
class IndexReport:
    result: EmbeddingResult
    seconds: float
    output: str

    @property
    def images_per_second(self) -> float:
        done = len(self.result.paths) + len(self.result.skipped)
        return done / self.seconds if self.seconds > 0 else 0.0


def list_dataset(dataset: str) -> list[str]:
    """Image files of `dataset`; raises DatasetError if there are none."""
    paths = find_images(dataset)
    if not paths:
        raise DatasetError(f"no image files (jpg, jpeg, png, gif, bmp, webp, tif, tiff) in {dataset}")
    return paths


def index_folder(
    dataset: str,
    output: str,
    extractor: FeatureExtractor,
    paths: list[str] | None = None,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
    on_skip=None,
) -> IndexReport:
    """Embed every image of `dataset` and write the features file `output`.

    Raises:
        DatasetError: no image in the folder, or none could be read (the
            previous `output`, if any, is left as it was).
    """
    paths = list_dataset(dataset) if paths is None else paths
    start = time.perf_counter()
    result = embed_images(paths, extractor, batch_size, on_progress, on_skip)
    seconds = time.perf_counter() - start
    if not result.paths:
        raise DatasetError(
            f"none of the {len(paths)} image files in {dataset} could be read; nothing written"
        )
    metadata = features_metadata(extractor, dataset)
    save_features(output, FeatureStore(result.paths, result.features, metadata, whitening_arrays(result.features)))
    return IndexReport(result, seconds, output)


def whitening_arrays(features: np.ndarray) -> dict[str, np.ndarray] | None:
    """Learn the "whitened" search mode's transform from the collection and
    apply it to every row now, so that mode costs nothing extra per query."""
    if len(features) < 3:
        return None
    whitening = learn_whitening(features)
    vectors = whitening.apply(whitening_input(features))
    return {**whitening.to_arrays(), "vectors": vectors}


def features_metadata(extractor: FeatureExtractor, dataset: str) -> dict:
    """How a features file was made, so search can embed queries the same way."""
    spec = extractor.spec
    return {
        "format_version": FORMAT_VERSION,
        "tool": "search_utils",
        "tool_version": __version__,
        "model": spec.name,
        "weights": extractor.weights,
        "precision": extractor.precision,
        "runtime": "tensorflow",
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

    Args:
        requested: a model name the user asked for; it must match the file.

    Raises:
        ModelMismatchError: the file's model or dimension contradicts the
            request or the registry.
    """
    name = store.metadata.get("model")
    assumed = name is None
    spec = get_model_spec(name or POST_MODEL)
    if requested is not None and requested != spec.name:
        raise ModelMismatchError(
            f"features file was made with {spec.name}, not {requested}; "
            f"re-index with --model {requested} or drop --model"
        )
    if store.dim != spec.feature_dim:
        source = "the post's resnet50 (no metadata file)" if assumed else spec.name
        raise ModelMismatchError(
            f"features file has {store.dim} values per image but {source} gives {spec.feature_dim}"
        )
    recorded_resize = store.metadata.get("preprocessing", {}).get("resize")
    if recorded_resize in RESAMPLING:  # indexed with --resize: embed queries alike
        spec = dataclasses.replace(spec, resize=recorded_resize)
    weights = store.metadata.get("weights")
    if weights in (None, spec.default_weights):
        weights = None
    precision = store.metadata.get("precision", "float32")
    if precision == "bf16" and not bf16_supported():
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
    row = find_row(store.paths, query_path, store.metadata.get("base_dir"))
    if row is not None:
        return store.features[row], True
    image = load_image(query_path, size=spec.input_size, interpolation=spec.resize)
    extractor = make_extractor()
    return extractor.embed(image[np.newaxis])[0], False


__all__ = [
    "DEFAULT_MODEL",
    "IndexReport",
    "StoreModel",
    "features_metadata",
    "index_folder",
    "list_dataset",
    "query_features",
    "store_model",
]
