"""What the service is told at start, and how a request is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..engine import StoreModel
from ..models import FeatureExtractor
from ..searcher import EMBEDDED, SearchBackend

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around the uploaded file


@dataclass
class ServiceConfig:
    features_path: str
    model: str | None = None  # expected model: refuse a file made with another
    weights: str | None = None  # local weights for uploaded queries (default: as recorded when indexing)
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    model_calls: int = 1  # model calls at once (each uses every core)
    decodes: int = 2  # uploads decoded at once (one can take a few hundred MB: Pillow's pixel limit)
    max_waiting: int = 32  # uploaded queries waiting to be decoded or embedded; more get 503 at once
    max_requests: int = 64  # requests in progress at once, and uploads arriving at once; more get 503
    wait_seconds: float = 30.0  # the longest an uploaded query waits to be decoded and embedded, then 503
    read_timeout: float = 30.0  # the longest a request's body may take to arrive, then 408
    cors_origins: list[str] = field(default_factory=list)
    backend: SearchBackend = EMBEDDED  # where chi2 candidates come from (a vector database: --db)
    load_model: bool = True  # build the model at start-up (tests of stored queries pass False)
    make_extractor: Callable[[StoreModel, str | None], FeatureExtractor] | None = None  # tests: a fake


class ServiceError(Exception):
    """A request that can't be answered: `status` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Busy(ServiceError):
    """503: the decoders or the model are taken for longer than a request may wait."""

    def __init__(self, message: str):
        super().__init__(503, message)


def size_text(size: int) -> str:
    """A byte count as people read a limit: 20 MB, 100 kB."""
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.3g} MB"
    return f"{max(1, round(size / 1024))} kB"
