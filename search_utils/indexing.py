"""Turning a list of image files into features, batch by batch.

Decoding and resizing the next batch runs in a background thread while the
model works on the current one (Pillow and TensorFlow both release the GIL),
so the model is never left waiting for the disk.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ImageReadError
from .images import load_images
from .models import FeatureExtractor, Features, ModelSpec


@dataclass
class EmbeddingResult:
    """Features of the images that could be read, and why the rest couldn't."""

    paths: list[str]
    features: Features
    skipped: list[ImageReadError] = field(default_factory=list)


class PathEmbedder:
    """Something that embeds files by path, decoding them itself: a cluster
    (search_utils.ray_indexing) instead of this process's FeatureExtractor.
    `update_index` takes either from its `make_extractor`."""

    def embed_files(self, paths: Sequence[str], batch_size: int) -> Iterator[EmbeddingResult]:
        """Like embed_batches: each batch as it is done, in any order."""
        raise NotImplementedError


def batches_of(source: "FeatureExtractor | PathEmbedder", paths: Sequence[str],
               batch_size: int) -> Iterator[EmbeddingResult]:
    """The batches of `paths` embedded by `source`, whichever kind it is."""
    if isinstance(source, PathEmbedder):
        return source.embed_files(paths, batch_size)
    return embed_batches(paths, source, batch_size)


def embed_images(
    paths: Sequence[str],
    extractor: FeatureExtractor,
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
    on_skip: Callable[[ImageReadError], None] | None = None,
) -> EmbeddingResult:
    """Embed `paths` in order, skipping files that can't be read.

    Args:
        on_progress: called with the number of files finished after each batch.
        on_skip: called once for each file that is skipped, as it happens.
    """
    kept: list[str] = []
    chunks: list[Features] = []
    skipped: list[ImageReadError] = []
    for batch in embed_batches(paths, extractor, batch_size):
        for error in batch.skipped:
            skipped.append(error)
            if on_skip:
                on_skip(error)
        kept.extend(batch.paths)
        chunks.append(batch.features)
        if on_progress:
            on_progress(len(batch.paths) + len(batch.skipped))
    features = (
        np.concatenate(chunks) if chunks else np.zeros((0, extractor.spec.feature_dim), np.float32)
    )
    return EmbeddingResult(kept, features, skipped)


def embed_batches(
    paths: Sequence[str], extractor: FeatureExtractor, batch_size: int = 32
) -> Iterator[EmbeddingResult]:
    """Embed `paths` batch by batch, yielding each batch's result as soon as
    it is done, so a caller can save it before the next one (a checkpoint).

    Closing the generator early (or an exception in the caller) waits only
    for the batch being decoded, then stops.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode_batch, batches[0], extractor.spec) if batches else None
        for index in range(len(batches)):
            decoded = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(decode_batch, batches[index + 1], extractor.spec)
            yield embed_decoded(decoded, extractor)


def embed_batch(paths: Sequence[str], extractor: FeatureExtractor) -> EmbeddingResult:
    """One batch, decoded then embedded (a Ray actor's call: no overlap to gain)."""
    return embed_decoded(decode_batch(paths, extractor.spec), extractor)


def decode_batch(paths: Sequence[str], spec: ModelSpec):
    """(readable paths, their arrays at the model's input size, errors)."""
    return load_images(paths, size=spec.input_size, interpolation=spec.resize)


def embed_decoded(decoded, extractor: FeatureExtractor) -> EmbeddingResult:
    good, arrays, errors = decoded
    dim = extractor.spec.feature_dim
    features = extractor.embed(np.stack(arrays)) if arrays else np.zeros((0, dim), np.float32)
    return EmbeddingResult(good, features, errors)
