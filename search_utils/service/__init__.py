"""The search service: a FastAPI app over one features file, with a warm
model, a REST API and a web page. The library's only web code: the library
never imports it; `search_server.py` runs it under uvicorn, and tests use
`create_app` in-process.

    config      ServiceConfig (what the command passes), ServiceError
    live        what stays warm: the features file, followed across
                re-indexing (FollowedIndex), and the model (WarmModel)
    files       uploads judged from their bytes; indexed images served by row id
    middleware  security headers, errors as JSON, bounded requests, deadlines and
                caps for bodies, HEAD as GET, a 500 backstop
    protocol    uvicorn's HTTP/1.1 protocol with a deadline for request headers
    app         the routes and JSON errors
    web/        the page: index.html, app.js, style.css (no build step)

The model is built (and its compiled call traced) once at start-up, before
the first request is answered: no request ever waits for it, the first
upload is as fast as the rest, and TensorFlow's start-up lines (held back)
never mix with the service's log. It is rebuilt only if a re-index changes
the file's model.
"""

from .app import create_app
from .config import MAX_UPLOAD_BYTES, MULTIPART_OVERHEAD, ServiceConfig, ServiceError

__all__ = ["MAX_UPLOAD_BYTES", "MULTIPART_OVERHEAD", "ServiceConfig", "ServiceError", "create_app"]
