"""The service's FastAPI app: the routes of the REST API, the web page,
and every error as JSON: {"error": one line, "status": code}."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
from fastapi import FastAPI, File, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SearchUtilsError, printable_path
from ..models import native_logs_held_back
from ..modes import DEFAULT_MODE, MODES
from ..search import NEGATIVE_ADVICE
from ..searcher import Searcher
from .config import MULTIPART_OVERHEAD, ServiceConfig, ServiceError
from .files import Thumbnails, check_row, etag_matches, image_bytes, indexed_file, read_upload
from .live import FollowedIndex, WarmModel
from .middleware import (Backstop, HeadAsGet, InFlightLimit, JsonErrors, Load, ReadDeadline, SecurityHeaders,
                         UploadLimit)

WEB_DIR = Path(__file__).with_name("web")
MAX_RESULTS = 100
SAMPLE_SIZE = 24


class Result(BaseModel):
    rank: int
    id: int
    distance: float
    path: str
    copies: list[str]
    copy_ids: list[int]


class SearchResponse(BaseModel):
    query: str
    query_id: int | None = None
    metric: str
    results: list[Result]


class SampleItem(BaseModel):
    id: int
    path: str


class ErrorResponse(BaseModel):
    error: str
    status: int


ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 408, 413, 415, 422, 503)}
ModeName = Literal[tuple(MODES)]  # type: ignore[valid-type]
Mode = Annotated[ModeName, Query(description="search mode (as imagenet_search.py --metric)")]
Count = Annotated[int, Query(ge=1, le=MAX_RESULTS, description="how many results")]


def _digits(value):
    """A row id as sent: plain decimal digits only (int() would also take
    " 1", "+1", "1_0"; pydantic "1.0"): one row, one spelling (leading zeros aside)."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,18}", value):
        raise ValueError("a row id is a number of decimal digits (0, 1, 2, ...)")
    return value


RowId = Annotated[int, BeforeValidator(_digits)]


def create_app(config: ServiceConfig, log: Callable[[str], None] | None = None) -> FastAPI:
    """The service's app. Loads the features file now (raising what
    load_features raises: the command turns that into one line); the model
    is built when the app starts (its lifespan), before the first request.
    """
    log = log or _stderr
    index = FollowedIndex(config, log)
    model = WarmModel(config, log)
    thumbnails = Thumbnails()
    load = Load()
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.uploads = tempfile.mkdtemp(prefix="search-server-uploads-")
        try:  # a start-up that fails leaves no folder behind
            if config.load_model and not app.state.stopping():
                with native_logs_held_back():  # TensorFlow's start-up lines
                    lines = model.warm_up(index.current().model)
                if not app.state.stopping():  # a stop asked while it loaded: not "ready" after it
                    for line in lines:
                        log(line)
            yield
        finally:
            shutil.rmtree(app.state.uploads, ignore_errors=True)

    app = FastAPI(title="Image search", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # their pages load scripts from a CDN
                  redirect_slashes=False,  # a redirect would name the request's Host: 404 instead
                  description="Search an indexed image collection by an uploaded image or by an indexed one.")
    app.state.index, app.state.model = index, model
    app.state.stopping = lambda: False  # the command makes it ask its server whether a stop was asked
    _add_error_handlers(app)
    _add_middleware(app, config, load, log)

    @app.get("/api/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search_by_id(id: Annotated[RowId, Query(description="row id of an indexed image")],
                     n: Count = 5, metric: Mode = DEFAULT_MODE, exact: bool = False,
                     keep_duplicates: bool = False) -> SearchResponse:
        """Search by an indexed image, named by its row id (never by a path)."""
        searcher = index.current()
        check_row(searcher, id)
        return _respond(searcher, searcher.store.features[id], searcher.shown_path(id), id,
                        metric, n, exact, keep_duplicates)

    @app.post("/api/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    def search_by_upload(image: Annotated[UploadFile, File(description="the query image")], request: Request,
                         n: Count = 5, metric: Mode = DEFAULT_MODE, exact: bool = False,
                         keep_duplicates: bool = False) -> SearchResponse:
        """Search by an uploaded image (JPEG, PNG, GIF, WebP, BMP or TIFF)."""
        if "id" in request.query_params:
            raise ServiceError(422, "give an image or an id, not both (search by id: GET /api/search?id=ROW)")
        searcher = index.current()
        spec = searcher.model.spec
        deadline = model.deadline()
        with model.decoding(deadline):
            pixels = read_upload(image, app.state.uploads, config.max_upload_bytes, spec.input_size, spec.resize)
        query = model.embed(pixels, searcher.model, deadline)
        label = printable_path(os.path.basename(image.filename or "")) or "upload"
        return _respond(searcher, query, label, None, metric, n, exact, keep_duplicates)

    @app.get("/api/images/{id}", responses={**ERRORS, 200: {"content": {"image/*": {}}}}, tags=["images"])
    def image_file(id: Annotated[RowId, PathParam()]) -> Response:
        """The indexed image of row `id`, as it is on disk."""
        body, media_type = image_bytes(indexed_file(index.current(), id))
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.get("/api/thumbnails/{id}", responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}}, tags=["images"])
    def thumbnail(id: Annotated[RowId, PathParam()], request: Request) -> Response:
        """A JPEG of the indexed image of row `id`, at most 256 pixels a side (cached)."""
        body, etag = thumbnails.get(indexed_file(index.current(), id))
        headers = {"ETag": etag, "Cache-Control": "no-cache"}  # ids follow the index: revalidate (cheap: 304)
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="image/jpeg", headers=headers)

    @app.get("/api/sample", response_model=list[SampleItem], tags=["images"])
    def sample(n: Annotated[int, Query(ge=1, le=MAX_RESULTS)] = SAMPLE_SIZE,
               seed: Annotated[int | None, Query(description="the same seed gives the same sample")] = None
               ) -> list[SampleItem]:
        """Some indexed images to start from (a different sample each time, unless `seed`)."""
        searcher = index.current()
        rows = sorted(random.Random(seed).sample(range(len(searcher)), min(n, len(searcher))))
        return [SampleItem(id=row, path=searcher.shown_path(row)) for row in rows]

    @app.get("/api/health", tags=["service"])
    def health() -> dict:
        """Whether the service answers, whether uploaded queries can be embedded,
        and (with --db) whether the database answers: "degraded" if not."""
        reply = {"status": "ok", "model": model.state}
        database_health = getattr(config.backend, "health", None)  # only a database backend has one
        if database_health is not None:
            problem = database_health()
            reply["database"] = problem or "ok"
            if problem:
                reply["status"] = "degraded"
        return reply

    @app.get("/api/stats", tags=["service"])
    def stats() -> dict:
        """The collection: count, model, modes, and how fresh the loaded index is."""
        searcher = index.current()
        candidates = searcher.candidate_index()
        return {
            "count": len(searcher),
            "features_path": config.features_path,
            "model": searcher.model.spec.name,
            "model_state": model.state,
            "dimension": searcher.store.dim,
            "modes": list(MODES),
            "default_mode": DEFAULT_MODE,
            "generation": searcher.store.generation,
            "indexed_at": searcher.store.metadata.get("updated") or searcher.store.metadata.get("created"),
            "loaded_at": _iso(index.loaded_at),
            "file_modified": _modified(config.features_path),
            "ann_index": candidates is not None,  # chi2 goes through candidates, re-ranked exactly
            "candidates": candidates.describe() if candidates is not None else None,
            "max_upload_bytes": config.max_upload_bytes,
            "requests_in_progress": load.in_progress,  # this one included
            "uploads_arriving": load.arriving,
            "up_since": _iso(started),
        }

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _respond(searcher: Searcher, query: np.ndarray, label: str, query_id: int | None,
             metric: str, n: int, exact: bool, keep_duplicates: bool) -> SearchResponse:
    """The command's --json for this search, plus row ids."""
    try:
        found = searcher.search(query, metric, n, exact, collapse=not keep_duplicates)
    except SearchUtilsError as error:  # e.g. the features file holds values the mode can't use
        # Negative values for chi2: the client can choose another mode (the message says which).
        raise ServiceError(422 if NEGATIVE_ADVICE in str(error) else 503, str(error)) from None
    results = [Result(rank=h.rank, id=h.row, distance=h.distance, path=h.path, copies=list(h.copies),
                      copy_ids=list(h.copy_rows)) for h in found.hits]
    return SearchResponse(query=label, query_id=query_id, metric=metric, results=results)


def _add_error_handlers(app: FastAPI) -> None:
    def reply(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(ServiceError)
    async def service_error(request, error: ServiceError):
        return reply(error.status, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        message = error.detail if isinstance(error.detail, str) else "request refused"
        if error.status_code == 404 and error.detail == "Not Found":
            message = f"no such page or API route: {request.url.path}"
        return reply(error.status_code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        errors = error.errors()
        if any(_no_upload(e) for e in errors):
            return reply(400, "no image uploaded: send it as the multipart form field 'image'")
        return reply(422, "; ".join(_validation_line(e) for e in errors[:3]))


def _no_upload(error: dict) -> bool:
    return tuple(error.get("loc", ())) == ("body", "image") or (
        error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",))


def _validation_line(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "body", "path"))
    message = error.get("msg", "invalid").removeprefix("Value error, ")  # pydantic's prefix for a validator's own
    return f"{where or 'request'}: {message}"


def _add_middleware(app: FastAPI, config: ServiceConfig, load: Load, log: Callable[[str], None]) -> None:
    """Innermost first: each one added wraps those before (middleware.py)."""
    app.add_middleware(Backstop, log=log)
    app.add_middleware(HeadAsGet)
    app.add_middleware(UploadLimit, limit=config.max_upload_bytes + MULTIPART_OVERHEAD)
    app.add_middleware(InFlightLimit, limit=config.max_requests, load=load)
    app.add_middleware(ReadDeadline, seconds=config.read_timeout)
    if config.cors_origins:  # around the middleware's own 408, 413 and 503: an allowed page can read them
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"])
    app.add_middleware(JsonErrors)  # CORS's own refusal of a preflight too
    app.add_middleware(SecurityHeaders)  # on every answer: CORS preflights, 413, 500 and 503 included


def _modified(path: str) -> str | None:
    try:
        return _iso(os.stat(path).st_mtime)
    except OSError:
        return None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
