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

Importing this package is cheap: TensorFlow loads only when a model is built.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    DatasetError,
    FeaturesFileError,
    ImageReadError,
    ModelMismatchError,
    SearchUtilsError,
    UnknownModelError,
    WeightsUnavailableError,
)
from .images import IMAGE_EXTENSIONS, find_images, load_image  # noqa: E402
from .models import MODELS, FeatureExtractor, ModelSpec, get_model_spec, load_extractor  # noqa: E402
from .search import METRICS, chi2_distance, distances, nearest, top_n  # noqa: E402
from .store import FeatureStore, load_features, metadata_path, save_features  # noqa: E402

__all__ = [
    "DatasetError", "FeaturesFileError", "ImageReadError", "ModelMismatchError",
    "SearchUtilsError", "UnknownModelError", "WeightsUnavailableError",
    "IMAGE_EXTENSIONS", "find_images", "load_image",
    "MODELS", "FeatureExtractor", "ModelSpec", "get_model_spec", "load_extractor",
    "METRICS", "chi2_distance", "distances", "nearest", "top_n",
    "FeatureStore", "load_features", "metadata_path", "save_features",
]
