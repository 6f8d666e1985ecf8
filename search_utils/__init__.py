"""search_utils: the library behind the image search engine's commands.

Pieces, one job each:
    images   find image files; open one robustly (EXIF, alpha, frames)
    models   registry of backbones; batched, compiled feature extractor
    indexing files -> features, decoding overlapped with inference
    catalog  indexing state beside a features file: checkpoints, what was embedded
    statedb  the SQLite connection under it: schema, transactions, errors
    changes  what changed in a folder since its last indexing run
    store    features files (the post's CSV, HDF5), metadata, whitening,
             published as one consistent generation; atomic writes
    search   distances over all rows, top N
    result_paths  result paths that open from the folder you search in
    plot     the results picture
    engine   the commands' two jobs as library calls
    searcher a features file loaded for many searches (command and service)
    service  the search service's web app (FastAPI): the only web code,
             imported by search_server.py, never by the library
    cli      shared command-line plumbing (one-line errors, exit codes)

Importing this package is cheap: its names below load their module on
first use (PEP 562), so a command can set up its signal handling before
numpy and pandas load, and TensorFlow loads only when a model is built.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "errors": ["DatasetError", "FeaturesFileError", "ImageReadError", "ModelMismatchError",
               "SearchUtilsError", "UnknownModelError", "WeightsUnavailableError"],
    "images": ["IMAGE_EXTENSIONS", "find_images", "load_image"],
    "models": ["MODELS", "FeatureExtractor", "ModelSpec", "get_model_spec", "load_extractor"],
    "search": ["METRICS", "chi2_distance", "distances", "nearest", "top_n"],
    "store": ["FeatureStore", "load_features", "metadata_path", "save_features"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
