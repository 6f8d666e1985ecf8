"""Candidates for chi2 search from a database server: PostgreSQL with pgvector
(docs/VECTOR_DB.md).

Indexing with `--db URI` also writes each row's sqrt-PCA vector (ann.Projection,
learned from the collection and kept in the database) and path to the
database, sending only what changed; searching with `--db URI` asks it for
candidates and re-ranks them with exact chi2 from the features file.

Importing this package needs nothing beyond the standard library: psycopg is
imported when a database is opened. Messages name a database by
`redacted(uri)`, never by the URI itself (it may hold a password).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import SearchUtilsError

if TYPE_CHECKING:
    from .pgvector_db import VectorDatabase

INSTALL_HINT = "--db needs psycopg: pip install -r requirements-scale.txt (or make setup-scale)"


class DatabaseError(SearchUtilsError):
    """The database can't be reached, logged into or used; one line naming
    it by `redacted(uri)`."""

    exit_code = 2


_URL_PASSWORD = re.compile(r"(://[^:/@?#]*:)([^/?#]*)(@)")  # scheme://user:PASSWORD@host (to the last @)
# password=... in a query string or a key=value connection string
_PARAM_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def redacted(uri: str) -> str:
    """`uri` with any password replaced by ***: in user:password@, in a
    ?password= parameter, or in a key=value connection string."""
    shown = _URL_PASSWORD.sub(r"\1***\3", uri)
    return _PARAM_PASSWORD.sub(r"\1***", shown)


def search_backend(uri: str | None):
    """Where chi2 candidates come from: the embedded index (no `uri`), or
    the database at `uri` (--db of the search command and the service).

    Raises:
        DatabaseError: as open_database.
    """
    from ..searcher import EMBEDDED

    return open_database(uri).backend() if uri else EMBEDDED


def open_database(uri: str) -> "VectorDatabase":
    """Connect to the PostgreSQL server at `uri` (postgresql://...), creating
    the vector extension and this package's tables if missing.

    Raises:
        DatabaseError: psycopg missing, not a postgres URI, unreachable, login refused.
    """
    try:
        import psycopg  # noqa: F401  (only to say what is missing, in one line)
        import pgvector.psycopg  # noqa: F401
    except ImportError:
        raise DatabaseError(INSTALL_HINT) from None
    from .pgvector_db import VectorDatabase

    return VectorDatabase.connect(uri)


__all__ = ["DatabaseError", "INSTALL_HINT", "open_database", "redacted"]
