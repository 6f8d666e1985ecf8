"""Features files and everything written beside them, one room per role:

    feature_store   FeatureStore: paths, features, metadata, whitening in memory
    formats         the API over both formats: save, load, append, iterate
    csv_format      the post's CSV (paths and values, no header)
    hdf5_format     one self-contained binary file, memory-mappable
    metadata        how a file was made (.meta.json beside a CSV)
    generation      a CSV, its metadata and whitening published and read
                    as one consistent generation
    atomic          writes that never leave a half-written file

Knows nothing about models or distances.
"""

from .atomic import (
    FileWriteError, NotRegularFileError, atomic_write, open_regular, regular_file_problem, remove_stale_temporaries,
)
from .feature_store import ENCODING_ERRORS, FORMAT_VERSION, WHITENING_KEYS, FeatureStore
from .formats import (
    CSV_EXTENSIONS, SUPPORTED_EXTENSIONS, append_features, file_format, iter_feature_chunks, load_features,
    output_format, save_features,
)
from .generation import NEXT_SUFFIX, WHITENING_SUFFIX, files_signature, finish_interrupted_publish, whitening_path
from .hdf5_format import HDF5_EXTENSIONS, HDF5_SIGNATURE
from .metadata import METADATA_SUFFIX, metadata_path, read_metadata


def recover_interrupted_write(path: str) -> None:
    """Tidy what a writer of `path` killed -9 left: finish (or drop) its
    publish, delete its temporary files (those of dead writers only: see
    atomic.remove_stale_temporaries). Only call while no one writes `path`
    (e.g. holding its indexing lock): a publish under way looks killed."""
    finish_interrupted_publish(path)
    remove_stale_temporaries(path)

__all__ = [
    "CSV_EXTENSIONS", "ENCODING_ERRORS", "NEXT_SUFFIX", "FORMAT_VERSION", "HDF5_EXTENSIONS", "HDF5_SIGNATURE",
    "METADATA_SUFFIX",
    "SUPPORTED_EXTENSIONS", "WHITENING_KEYS", "WHITENING_SUFFIX", "FeatureStore", "FileWriteError",
    "NotRegularFileError", "open_regular", "regular_file_problem",
    "append_features", "atomic_write", "file_format", "files_signature", "finish_interrupted_publish",
    "iter_feature_chunks",
    "load_features", "metadata_path", "output_format", "read_metadata", "recover_interrupted_write",
    "remove_stale_temporaries",
    "save_features", "whitening_path",
]
