"""Approximate chi-squared search for large collections: an index beside the
features file that proposes a few hundred candidates, re-ranked exactly.

An exact scan reads every stored row per query (0.7 s for a million rows
of 2048 floats on 2 cores, page cache warm; far more from disk). Above `DEFAULT_THRESHOLD` rows, indexing also
writes `<features>.ann` (see `ensure_index`), and chi2 searches go through it:

1. Map each row x to sqrt(x). For non-negative a, b,
   (sqrt a - sqrt b)^2 = (a - b)^2 / (sqrt a + sqrt b)^2 and
   a + b <= (sqrt a + sqrt b)^2 <= 2 (a + b), so the squared L2 distance
   between mapped rows lies between chi2 and 2 * chi2: close neighbours in
   chi2 are close in L2 there. (The Hellinger map, sqrt of the L1-normalised
   row, drops the per-image scale that chi2 sees: at 200,000 synthetic rows
   the exact Hellinger top 300 held 0.993 of the chi2 top 10, plain sqrt 1.000;
   after PCA to 256 dimensions, 0.972 against 0.997.)
2. Reduce to `PCA_DIM` dimensions by PCA learned on a sample of the mapped
   rows (at 1,000,000 synthetic rows the exact top 300 there still held
   every one of the chi2 top 10).
3. FAISS: rows in about 2 sqrt(n) k-means lists, each row stored twice:
   as 4-bit product codes, one per pair of dimensions, scanned with SIMD
   ("fast scan", 64 bytes a row at 256 dimensions), and as 8-bit scalars
   (256 bytes). A query scans one list in `PROBED_SHARE`, re-scores the best
   `REFINE_FACTOR` * k codes with the 8-bit scalars and keeps k.
4. Per query: those `DEFAULT_CANDIDATES` rows are read from the features (a
   memory map reads only them) and ranked by the exact chi2 kernel of
   search.py: the distances returned are exact chi2.

The index records a fingerprint of the features file it was built from (row
count, dimension, size and mtime of the file, a digest of sampled rows); one
that doesn't match is never used: search falls back to the exact scan and
says so on stderr.

Measured on this 2-core machine (bench/bench_ann.py: synthetic features
shaped like a backbone's, see there; recall@10 = share of the exact chi2
top 10 found):

At 1,000,000 x 2048 (8.2 GB, page cache warm, load average 1.5): build
74 s, 334 MB on disk (0.04x the features), loaded in 0.2 s; recall@10
0.9885 over 200 held-out queries; 3.98 ms per query (median; 5.4 ms p95),
re-ranking included, against 713 ms for the exact numba scan and 283 s for
the post's per-row loop. The search command on a 1,000,000-row HDF5 file:
1.7-2.0 s against 2.4-2.7 s with --exact (start-up and reading the paths
dominate), 0.7 GB peak memory against 8.4 GB, the same top 10.

Library and index, at 200,000 rows, 256-d sqrt-PCA, 300 candidates (other
jobs kept the load at 6-8 meanwhile: compare, don't quote):

    FAISS HNSW32 + SQ8          build  98 s  106 MB  1.7 ms  recall 0.962
    FAISS HNSW32 (float32)      build  85 s  259 MB  2.0 ms  recall 0.959
    hnswlib 0.8, M=32           build 105 s  259 MB  2.1 ms  recall 0.954
    usearch 2.26, f16           build 225 s  158 MB  7.6 ms  recall 0.972
    usearch 2.26, i8            build 171 s  106 MB  6.3 ms  recall 0.949
    FAISS IVF1728 + SQ8, 64     build  75 s   55 MB  3.3 ms  recall 0.948

The graphs did not scale: at 1,000,000 rows FAISS HNSW32 + SQ8 took 936 s
to build and found 0.85 of the top 10 (0.92 with a 2000-node search, 39 ms):
on these low-contrast neighbourhoods the greedy walk ends in the wrong
region (4 queries in 100 found none of their 10). Inverted lists don't walk:
IVF2048 + SQ8 reached 0.962 with 128 lists probed but took 14 ms; the same
lists with 4-bit fast-scan codes and an SQ8 re-score, 0.978 in 2.5 ms
(100 candidates). That is the index here: FAISS (faiss-cpu), which also
builds it in about a minute.

Threshold (median ms per query on prefixes of the same synthetic set):

    rows         exact scan   index   index build
       10,000          5.2      1.2        3 s
       30,000         20.3      1.0        7 s
      100,000         69.9      1.4       22 s
      300,000        206        2.0       38 s
    1,000,000        713        4.0       74 s

The scan costs about 0.7 ms per 1,000 rows. Below 100,000 rows it stays
under 70 ms, a few percent of the command's own start-up (about 1.5 s),
so results stay exact there; above, the index saves a growing share, and
the scan's reading of every row (memory, and disk when the page cache is
cold).

Build an index for an existing features file:

    python -m search_utils.ann imagenet_features.h5 [--threshold N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import SearchUtilsError
from .search import SearchHit, distances, duplicate_groups, hit_of, top_n

INDEX_SUFFIX = ".ann"
FORMAT = "search_utils ann"
FORMAT_VERSION = 1

DEFAULT_THRESHOLD = 100_000  # rows; below it the exact scan is fast enough
DEFAULT_CANDIDATES = 300  # rows re-ranked with exact chi2 per query
PCA_DIM = 256
PCA_SAMPLE = 50_000  # rows the PCA is learned from
TRAIN_SAMPLE = 100_000  # rows the lists and codes are learned from
PROBED_SHARE = 8  # one list in 8 is scanned per query
MIN_PROBES = 8
REFINE_FACTOR = 3  # codes re-scored with 8-bit scalars per candidate
BLOCK_ROWS = 32_768  # rows mapped and added at a time while building
DIGEST_ROWS = 64  # rows hashed into the fingerprint
MIN_ROWS = 16  # 4-bit codes need 16 rows to learn their 16 values


class AnnIndexError(SearchUtilsError):
    """An ANN index file is unreadable or not an index file."""


def index_path(features_path: str) -> str:
    """The ANN index file that belongs to `features_path`."""
    return os.fspath(features_path) + INDEX_SUFFIX


def fingerprint(features_path: str, features: np.ndarray) -> dict:
    """What identifies the features an index was built from: shape, the
    file's size and modification time (a rewrite changes them), and a digest
    of evenly spaced rows (an edit that keeps the mtime still shows)."""
    stat = os.stat(features_path)
    rows, dim = features.shape
    sampled = np.unique(np.linspace(0, rows - 1, min(rows, DIGEST_ROWS)).astype(np.int64))
    digest = hashlib.sha256(np.ascontiguousarray(features[sampled], dtype=np.float32).tobytes()).hexdigest()
    return {"rows": int(rows), "dim": int(dim), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "rows_sha256": digest}


def sqrt_map(rows: np.ndarray) -> np.ndarray:
    """Rows mapped so that squared L2 distance brackets chi2 (module doc, 1).
    Negative values (not ReLU features) are clipped to 0."""
    return np.sqrt(np.maximum(np.asarray(rows, dtype=np.float32), 0))


@dataclass
class Projection:
    """sqrt map, then PCA to fewer dimensions: rows -> (rows - mean) @ components."""

    mean: np.ndarray  # (dim,) float32
    components: np.ndarray  # (dim, reduced) float32

    @classmethod
    def learn(cls, features: np.ndarray, reduced: int = PCA_DIM, sample: int = PCA_SAMPLE,
              seed: int = 0) -> "Projection":
        """PCA of the mapped rows, from at most `sample` rows (read in file
        order, which a memory map reads fastest)."""
        rows = len(features)
        picked = np.sort(np.random.default_rng(seed).choice(rows, min(rows, sample), replace=False))
        mapped = sqrt_map(features[picked])
        mean = mapped.mean(axis=0, dtype=np.float64)
        mapped -= mean.astype(np.float32)
        _, eigenvectors = np.linalg.eigh((mapped.T @ mapped).astype(np.float64))
        keep = max(2, min(reduced, features.shape[1]) // 2 * 2)  # the codes take dimensions in pairs
        components = eigenvectors[:, ::-1][:, :keep]
        return cls(mean.astype(np.float32), np.ascontiguousarray(components, dtype=np.float32))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((sqrt_map(rows) - self.mean) @ self.components, dtype=np.float32)


def _faiss():
    import faiss  # imported on first use: the exact path never needs it

    return faiss


@dataclass
class AnnIndex:
    """Inverted lists of compact codes over projected rows (module doc, 3);
    `search` returns candidate row ids."""

    projection: Projection
    lists_index: object  # faiss.IndexRefine over an IndexIVFPQFastScan
    fingerprint: dict
    params: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.lists_index.ntotal)

    def describe(self) -> str:
        return f"IVF{self.params.get('lists')}-PQ over {self.projection.components.shape[1]}-d sqrt-PCA"

    def search(self, query: np.ndarray, k: int = DEFAULT_CANDIDATES, probes: int | None = None) -> np.ndarray:
        """Row ids of (about) the `k` nearest rows to `query` in the
        projected space, nearest first. `probes`: lists scanned (more:
        better candidates, slower; default: as built)."""
        faiss = _faiss()
        k = max(1, min(k, self.rows))
        lists = faiss.SearchParametersIVF()  # kept alive here: params only points to it
        lists.nprobe = probes or self.params["probes"]
        params = faiss.IndexRefineSearchParameters()
        params.k_factor = REFINE_FACTOR
        params.base_index_params = lists
        projected = self.projection(np.asarray(query, dtype=np.float32).reshape(1, -1))
        with _one_thread():
            _, ids = self.lists_index.search(projected, k, params=params)
        return ids[0][ids[0] >= 0]

    def save(self, path: str) -> None:
        """Write the index to `path` atomically (temporary file, then rename).

        Layout: FAISS's own index file (so `load` hands the path to FAISS's
        reader, 5x faster than deserialising bytes from Python), then the
        header (JSON) and the projection (float32), then a trailer saying
        how long those two are (see `_TRAILER`).
        """
        from .store import atomic_write

        faiss = _faiss()
        mean, components = self.projection.mean, self.projection.components
        header = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                             "params": self.params, "faiss_version": faiss.__version__,
                             "dim": int(components.shape[0]), "reduced": int(components.shape[1])}).encode("utf-8")
        arrays = np.ascontiguousarray(mean, "<f4").tobytes() + np.ascontiguousarray(components, "<f4").tobytes()
        with atomic_write(path, binary=True) as handle:
            writer = faiss.PyCallbackIOWriter(handle.write)
            faiss.write_index(self.lists_index, writer)
            del writer  # flushes
            handle.write(header + arrays + _TRAILER.pack(len(header), len(arrays), _MAGIC))

    @classmethod
    def load(cls, path: str) -> "AnnIndex":
        """Read an index written by `save`.

        Raises:
            AnnIndexError: missing, unreadable or not an index file.
        """
        with _reading(path) as handle:
            header, arrays = _read_tail(path, handle, with_arrays=True)
            dim, reduced = header["dim"], header["reduced"]
            mean = np.frombuffer(arrays, "<f4", dim).astype(np.float32)
            components = np.frombuffer(arrays, "<f4", dim * reduced, offset=4 * dim).reshape(dim, reduced)
            # this open file, even if `path` is replaced meanwhile
            same_file = f"/dev/fd/{handle.fileno()}" if os.path.isdir("/dev/fd") else path
            lists_index = _faiss().read_index(same_file)
        return cls(Projection(mean, components.astype(np.float32)), lists_index, header["fingerprint"],
                   header["params"])


_MAGIC = b"SUANN\x00v1"
_TRAILER = struct.Struct("<QQ8s")  # header bytes, projection bytes, magic


def read_header(path: str) -> dict:
    """The header of an index file (format, fingerprint, params) without
    reading the rest.

    Raises:
        AnnIndexError: missing, unreadable or not an index file.
    """
    with _reading(path) as handle:
        return _read_tail(path, handle, with_arrays=False)[0]


@contextlib.contextmanager
def _reading(path: str) -> Iterator:
    """The index file open for reading, every read error turned into AnnIndexError."""
    try:
        with open(path, "rb") as handle:
            yield handle
    except AnnIndexError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, struct.error) as error:
        raise AnnIndexError(f"unreadable ANN index {path}: {str(error).splitlines()[0]}") from None


def _read_tail(path: str, handle, with_arrays: bool) -> tuple[dict, bytes]:
    """The header and (if asked) projection bytes stored after FAISS's part."""
    not_index = AnnIndexError(f"{path} is not a search_utils ANN index (version {FORMAT_VERSION})")
    size = os.fstat(handle.fileno()).st_size
    if size < _TRAILER.size:
        raise not_index
    handle.seek(size - _TRAILER.size)
    header_bytes, array_bytes, magic = _TRAILER.unpack(handle.read(_TRAILER.size))
    if magic != _MAGIC or header_bytes + array_bytes + _TRAILER.size > size:
        raise not_index
    handle.seek(size - _TRAILER.size - array_bytes - header_bytes)
    header = json.loads(handle.read(header_bytes).decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT \
            or header.get("format_version") != FORMAT_VERSION:
        raise not_index
    problem = _header_problem(header)
    if problem:
        raise AnnIndexError(f"damaged ANN index {path}: its header {problem}")
    arrays = handle.read(array_bytes) if with_arrays else b""
    if with_arrays and len(arrays) != 4 * header["dim"] * (1 + header["reduced"]):
        raise not_index
    return header, arrays


def _header_problem(header: dict) -> str | None:
    """What is wrong with an index header that names our format (a
    hand-edited or damaged one), or None: every field the search reads has
    the type it needs."""
    for key in ("dim", "reduced"):
        if not _positive_int(header.get(key)):
            return f"has no whole number as {key!r}"
    if not isinstance(header.get("fingerprint"), dict):
        return "has no fingerprint of the features it was built from"
    params = header.get("params")
    if not isinstance(params, dict) or not _positive_int(params.get("probes")):
        return "has no search parameters (params.probes)"
    return None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def build_index(features: np.ndarray, fingerprint: dict, reduced: int = PCA_DIM,
                threshold: int = DEFAULT_THRESHOLD,
                on_progress: Callable[[int], None] | None = None) -> AnnIndex:
    """Learn the projection, the lists and the codes from samples, then add
    every row of `features` (a memory map is read a block at a time; memory:
    about reduced * 1.25 bytes per row, plus a sample).

    Raises:
        ValueError: fewer than `MIN_ROWS` rows.
    """
    if len(features) < MIN_ROWS:
        raise ValueError(f"an ANN index needs at least {MIN_ROWS} rows, not {len(features)}")
    started = time.perf_counter()
    projection = Projection.learn(features, reduced)
    lists, probes = index_layout(len(features))
    lists_index = _empty_index(projection.components.shape[1], lists)
    sample = np.sort(np.random.default_rng(1).choice(len(features), min(len(features), TRAIN_SAMPLE), replace=False))
    lists_index.train(projection(features[sample]))
    for start in range(0, len(features), BLOCK_ROWS):
        lists_index.add(projection(features[start:start + BLOCK_ROWS]))
        if on_progress is not None:
            on_progress(min(len(features), start + BLOCK_ROWS))
    params = {"map": "sqrt", "reduced_dim": projection.components.shape[1], "lists": lists, "probes": probes,
              "codes": "4-bit PQ fast scan (a code per 2 dims), re-scored with SQ8", "threshold": threshold,
              "build_seconds": round(time.perf_counter() - started, 1)}
    return AnnIndex(projection, lists_index, fingerprint, params)


def index_layout(rows: int) -> tuple[int, int]:
    """(lists, probes): about 2 sqrt(rows) lists (a power of two, with at
    least 39 rows each for k-means), one in `PROBED_SHARE` probed, and at
    least `MIN_PROBES` (a small collection is searched nearly whole)."""
    lists = 2 ** int(round(np.log2(max(1.0, 2 * np.sqrt(rows)))))
    lists = max(1, min(lists, rows // 39))
    return lists, min(lists, max(MIN_PROBES, lists // PROBED_SHARE))


def _empty_index(dim: int, lists: int):
    """IVF over `lists` k-means cells; in each, 4-bit product codes (one
    sub-quantiser per 2 dimensions) scanned with SIMD; the best
    REFINE_FACTOR * k re-scored with 8-bit scalar codes."""
    faiss = _faiss()
    coarse = faiss.IndexFlatL2(dim)
    codes = faiss.IndexIVFPQFastScan(coarse, dim, lists, dim // 2, 4)
    # Small collections give k-means fewer rows than FAISS likes (39 per
    # centroid); it copes, so don't let it print a warning per sub-quantiser.
    codes.cp.min_points_per_centroid = 1
    codes.pq.cp.min_points_per_centroid = 1
    codes.own_fields = True
    coarse.this.disown()
    refine = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit)
    index = faiss.IndexRefine(codes, refine)
    index.own_fields = True
    codes.this.disown()
    refine.this.disown()
    return index


def nearest(index: AnnIndex, features: np.ndarray, paths: Sequence[str], query: np.ndarray, n: int = 5,
            candidates: int = DEFAULT_CANDIDATES, collapse: bool = False,
            probes: int | None = None) -> list[SearchHit]:
    """The `n` nearest rows to `query` among the index's candidates, by exact
    chi2: like search.nearest(..., "chi2"), same distances, for the rows found.

    Copies of one image (identical features) are collapsed among the
    candidates, which hold them all unless there are hundreds.
    """
    rows = np.sort(index.search(query, max(candidates, 4 * n), probes))
    local = np.asarray(features[rows], dtype=np.float32)  # only these rows are read
    with _one_thread():
        dist = distances(local, query, "chi2")
    if not collapse:
        return [hit_of(rank, dist, [i], paths, rows) for rank, i in enumerate(top_n(dist, n), start=1)]
    return [hit_of(rank, dist, group, paths, rows)
            for rank, group in enumerate(duplicate_groups(local, dist, n), start=1)]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run numba's and FAISS's parallel code on the calling thread only: for
    one query and a few hundred rows a parallel region costs more than it
    saves, and on a busy machine it waits for a descheduled worker
    (measured: 15 ms instead of 0.2 ms to re-rank 300 rows at load 7 on 2
    cores). Results are the same: each row's sum is sequential either way."""
    import numba

    faiss = _faiss()
    previous = numba.get_num_threads(), faiss.omp_get_max_threads()
    numba.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous[0])
        faiss.omp_set_num_threads(previous[1])


def fresh_index(features_path: str, features: np.ndarray,
                note: Callable[[str], None] | None = None) -> AnnIndex | None:
    """The index beside `features_path` if there is one and it was built from
    exactly these features; else None, and `note` is told why if an index
    file exists but can't be used (so it never goes unused silently)."""
    path = index_path(features_path)
    if not os.path.exists(path):
        return None
    try:
        if read_header(path)["fingerprint"] != fingerprint(features_path, features):
            _tell(note, f"note: {path} was built from other features (stale); searching exactly "
                        f"(rebuild: python -m search_utils.ann {features_path})")
            return None
        index = AnnIndex.load(path)
        _check_fits(index, path, features)
        return index
    except AnnIndexError as error:
        _tell(note, f"note: {error}; searching exactly")
        return None


def _check_fits(index: AnnIndex, path: str, features: np.ndarray) -> None:
    """Refuse an index whose parts don't fit each other or the features
    (its header edited to match a fingerprint): a search through it would
    fail half-way or read rows that don't exist.

    Raises:
        AnnIndexError: "damaged ANN index ...".
    """
    rows, dim = features.shape
    components = index.projection.components
    lists = getattr(index.lists_index, "d", None), getattr(index.lists_index, "ntotal", None)
    if components.shape[0] != dim or lists != (components.shape[1], rows):
        raise AnnIndexError(f"damaged ANN index {path}: its parts don't fit each other or the {rows:,} x {dim} "
                            f"features")


def _is_fresh(features_path: str, features: np.ndarray, threshold: int) -> bool:
    """An index file beside `features_path` built from these features with this threshold."""
    try:
        header = read_header(index_path(features_path))
    except AnnIndexError:
        return False
    return (header["fingerprint"] == fingerprint(features_path, features)
            and header.get("params", {}).get("threshold") == threshold)


def ensure_index(features_path: str, store, threshold: int = DEFAULT_THRESHOLD,
                 note: Callable[[str], None] | None = None) -> str | None:
    """Keep `<features>.ann` in step with the features file, e.g. after indexing.

    With at least `threshold` rows: build it unless a fresh one exists.
    Below: remove any index (it would be stale, and the exact scan is fast).
    Returns the index path if one is in place afterwards, else None.
    """
    path = index_path(features_path)
    if len(store) < max(threshold, MIN_ROWS):
        if os.path.exists(path):
            os.unlink(path)
        return None
    if _is_fresh(features_path, store.features, threshold):
        return path
    _tell(note, f"building the ANN index for {len(store):,} rows (chi2 searches will use it; "
                "about 2 minutes per million rows on 2 cores)")
    started = time.perf_counter()
    built = build_index(store.features, fingerprint(features_path, store.features), threshold=threshold)
    built.save(path)
    _tell(note, f"built the ANN index {path} ({len(store):,} rows, {time.perf_counter() - started:.0f} s, "
                f"{os.path.getsize(path) / 1e6:.0f} MB)")
    return path


def _tell(note: Callable[[str], None] | None, message: str) -> None:
    (note or _stderr)(message)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m search_utils.ann FEATURES: build (or refresh) the index."""
    from .store import load_features

    parser = argparse.ArgumentParser(prog="python -m search_utils.ann", description="build the ANN index "
                                     "beside a features file (chi2 searches use it above the threshold)")
    parser.add_argument("features", help="features file (.csv, .h5)")
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                        help=f"smallest collection that gets an index (default: {DEFAULT_THRESHOLD:,} rows)")
    args = parser.parse_args(argv)
    store = load_features(args.features, mmap=True)
    path = ensure_index(args.features, store, args.threshold)
    if path is None:
        print(f"{args.features}: {len(store):,} rows, below the threshold of {args.threshold:,}: "
              "no index (exact search)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
