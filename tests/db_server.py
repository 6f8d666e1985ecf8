"""A real PostgreSQL + pgvector server for the tests (pgserver's binaries,
started by search_utils.vector_db.local_server): loopback only, a free port,
a password, its files in a temporary folder; stopped and removed when done.

    from db_server import db_server_fixture  # noqa: F401  (the module-scoped fixture `db_server`)

    def test_something(db_server):
        database = open_database(db_server.uri)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

import conftest  # noqa: F401  (puts the repository on sys.path)
from search_utils.vector_db import local_server


@dataclass
class DatabaseServer:
    uri: str  # with the password
    data_dir: str

    @property
    def password(self) -> str:
        return urlsplit(self.uri).password

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(self.data_dir, "pgdata", "postmaster.pid")) as handle:
                return int(handle.readline())
        return None


def closed_port() -> int:
    """A loopback port where nothing listens (free once the probe closes)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent hasn't collected it yet


def new_folder_name(prefix: str = "search-pg-") -> str:
    """A name for a folder `local_server.start` creates itself, under the
    system's temporary folder (as root, the server's user must reach it:
    pytest's own tmp folders are private, and a folder that exists keeps
    its owner)."""
    return os.path.join(tempfile.gettempdir(), f"{prefix}{secrets.token_hex(6)}")


@contextlib.contextmanager
def running_database():
    """A server in a new folder (`new_folder_name`); stopped, checked gone,
    and removed on exit."""

    data_dir = new_folder_name()
    server = None
    try:
        server = DatabaseServer(local_server.start(data_dir), data_dir)
        yield server
    finally:
        pid = server.postmaster_pid() if server else None
        local_server.stop(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
        assert not process_alive(pid), f"the database server (pid {pid}) outlived its test"


@pytest.fixture(scope="module", name="db_server")
def db_server_fixture():
    with running_database() as server:
        yield server


__all__ = ["DatabaseServer", "closed_port", "db_server_fixture", "new_folder_name", "process_alive",
           "running_database"]
