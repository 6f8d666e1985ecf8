#!/usr/bin/env python
"""Serve searches over a features file: a REST API and a web page, model warm.

    python search_server.py --featuresPath imagenet_features.csv

Then open http://127.0.0.1:8000/ (the API is described at /openapi.json).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import sys

# numba's and FAISS's OpenMP workers spin after each parallel search; on 2
# cores they take the CPU from the thread answering the next request
# (measured: a stored query 12 ms instead of 1.5 ms). Set before they load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from search_utils import cli, vector_db
from search_utils.errors import SearchUtilsError
from search_utils.models import MODELS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


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
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                        help=f"largest upload accepted, in MB (default: {MAX_UPLOAD_BYTES / 2**20:g})")
    parser.add_argument("--wait-seconds", type=float, default=30.0,
                        help="longest an uploaded query waits for the model before 503 (default: 30)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable; "
                             "default: none (CORS off)")
    parser.add_argument("--db", metavar="URI",
                        help="take chi2 candidates from this PostgreSQL + pgvector database (kept by "
                             "create_imagenet_features.py --db), re-ranked exactly from the features file")
    parser.add_argument("--access-log", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: must be 0 to 65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.wait_seconds <= 0:
        parser.error("arguments --max-upload-mb and --wait-seconds must be positive")
    return args


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

    config = ServiceConfig(args.featuresPath, model=args.model, weights=args.weights,
                           max_upload_bytes=int(args.max_upload_mb * 2**20), wait_seconds=args.wait_seconds,
                           cors_origins=args.cors_origin, backend=vector_db.search_backend(args.db))
    app = create_app(config)
    count = len(app.state.index.current())
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine on port {port} can "
              "search the collection and see its images", file=sys.stderr)
    print(f"serving {count:,} images from {args.featuresPath} on http://{shown}:{port}/ (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=args.access_log,
                                           timeout_graceful_shutdown=5))
    logging.getLogger("uvicorn.error").addFilter(no_cancelled_traces)
    server.run(sockets=[listener])


def no_cancelled_traces(record: logging.LogRecord) -> bool:
    """A second Ctrl-C quits at once, cancelling the app's start/stop task
    mid-wait; uvicorn would log that cancellation as a traceback (passed on
    as text by Starlette, or as the exception)."""
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    return not str(record.msg).rstrip().endswith("CancelledError")


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
