#!/usr/bin/env python
"""Serve searches over a features file: a REST API and a web page, model warm.

    python search_server.py --featuresPath imagenet_features.csv

Then open http://127.0.0.1:8000/ (the API is described at /openapi.json).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import socket
import sys
import warnings

# numba's and FAISS's OpenMP workers spin after each parallel search; on 2
# cores they take the CPU from the thread answering the next request
# (measured: a stored query 12 ms instead of 1.5 ms). Set before they load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from search_utils import cli

with cli.interrupts_while_starting():
    from search_utils import vector_db
    from search_utils.errors import SearchUtilsError
    from search_utils.models import MODELS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
UPLOAD_MB = (0.01, 1024.0)  # below 10 kB hardly an image fits; above 1 GB no image needs
SECONDS = (0.1, 3600.0)  # waits and deadlines: an hour is already more than anyone waits


class ServerError(SearchUtilsError):
    """The server can't listen where asked."""


def parse_args(argv):
    from search_utils.service import MAX_UPLOAD_BYTES

    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-f", "--featuresPath", required=True, help="features file made by create_imagenet_features.py")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; "
                             "another address lets other machines in, with a warning)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default: {DEFAULT_PORT}; 0: any free port, named in the first line)")
    parser.add_argument("--model", choices=sorted(MODELS),
                        help="expected model; refuse a features file made with another")
    parser.add_argument("--weights", metavar="PATH",
                        help="local weights file for embedding uploaded queries (default: as recorded when indexing)")
    parser.add_argument("--max-upload-mb", type=between(*UPLOAD_MB), default=MAX_UPLOAD_BYTES / 2**20,
                        help=f"largest upload accepted, in MB, {UPLOAD_MB[0]:g} to {UPLOAD_MB[1]:g} "
                             f"(default: {MAX_UPLOAD_BYTES / 2**20:g})")
    parser.add_argument("--wait-seconds", type=between(*SECONDS), default=30.0,
                        help="longest an uploaded query waits to be decoded and embedded before 503 "
                             f"({SECONDS[0]:g} to {SECONDS[1]:g}; default: 30)")
    parser.add_argument("--read-timeout", type=between(*SECONDS), default=30.0, metavar="SECONDS",
                        help="longest a client may take to send a request's headers, and then its body, "
                             "before the connection is closed (the body: with a 408) "
                             f"({SECONDS[0]:g} to {SECONDS[1]:g}; default: 30)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable; "
                             "default: none (CORS off)")
    parser.add_argument("--db", metavar="URI", type=vector_db.database_uri,
                        help="take chi2 candidates from this PostgreSQL + pgvector database (kept by "
                             "create_imagenet_features.py --db), re-ranked exactly from the features file")
    parser.add_argument("--access-log", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: must be 0 to 65535, got {args.port}")
    return args


def between(low: float, high: float):
    """An argparse type: a number from `low` to `high` (never NaN or infinite)."""

    def number(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be a number from {low:g} to {high:g}, got {text!r}")
        return value

    return number


def main(argv=None) -> int:
    args = parse_args(argv)
    listener = listen(args.host, args.port)  # before the slow start: a taken port fails at once
    try:
        serve(args, listener)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, before uvicorn's handlers or passed on by them
        pass
    finally:
        listener.close()
    print("stopped", file=sys.stderr)
    return 0


def serve(args, listener: socket.socket) -> None:
    import uvicorn

    from search_utils.service import ServiceConfig, create_app
    from search_utils.service.protocol import with_header_deadline

    config = ServiceConfig(args.featuresPath, model=args.model, weights=args.weights,
                           max_upload_bytes=int(args.max_upload_mb * 2**20), wait_seconds=args.wait_seconds,
                           read_timeout=args.read_timeout, cors_origins=args.cors_origin,
                           backend=vector_db.search_backend(args.db))
    app = create_app(config)
    count = len(app.state.index.current())
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine on port {port} can "
              "search the collection and see its images", file=sys.stderr)
    print(f"serving {count:,} images from {args.featuresPath} on http://{shown}:{port}/ (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    # A graceful stop waits up to 5 s for requests in progress (an upload still arriving too).
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=args.access_log,
                                           timeout_graceful_shutdown=5, http=with_header_deadline(args.read_timeout)))
    app.state.stopping = lambda: server.should_exit  # a stop asked while the model loads: no "ready" line
    logging.getLogger("uvicorn.error").addFilter(no_cancelled_traces)
    quiet_request_noise()
    server.run(sockets=[listener])


def quiet_request_noise() -> None:
    """What a client's bytes could make libraries print, kept off the log:
    Pillow's warnings about a damaged or huge upload (the answer says what
    is wrong with it) and python-multipart's notes about a malformed form
    (answered 400)."""
    warnings.filterwarnings("ignore", module=r"PIL\.")
    logging.getLogger("python_multipart").setLevel(logging.CRITICAL)


def no_cancelled_traces(record: logging.LogRecord) -> bool:
    """A second Ctrl-C quits at once, cancelling the app's start/stop task
    mid-wait; uvicorn would log that cancellation as a traceback (passed on
    as text by Starlette, or as the exception). A graceful stop that runs
    out of time cancels the requests left (a client that stalls its upload)
    with an ERROR line of its own: the stop is said by "stopped" alone."""
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    message = str(record.msg).rstrip()
    return not (message.endswith("CancelledError") or "timeout graceful shutdown exceeded" in message)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ServerError(f"cannot listen on {host}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ServerError(f"cannot listen on {host} port {port}: {error.strerror}"
                          f"{' (choose another with --port)' if error.errno == 98 else ''}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(cli.run(main))
