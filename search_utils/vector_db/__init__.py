"""Candidates for chi2 search from a database server: PostgreSQL with pgvector
(docs/VECTOR_DB.md).

Indexing with `--db URI` also writes each row's sqrt-PCA vector (ann.Projection,
learned from the collection and kept in the database) and path to the
database, sending only what changed, and records which version of the
features file it was made from; searching with `--db URI` asks it for
candidates and re-ranks them with exact chi2 from the features file, or
scans the file exactly (with a note) when the database holds another version.

Importing this package needs nothing beyond the standard library: psycopg is
imported when a database is opened. Messages name a database by
`redacted(uri)`, never by the URI itself (it may hold a password).
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Iterable
from urllib.parse import unquote

from ..errors import SearchUtilsError, printable_path

if TYPE_CHECKING:
    from .pgvector_db import VectorDatabase

INSTALL_HINT = "--db needs psycopg: pip install -r requirements-scale.txt (or make setup-scale)"
URI_FORM = "postgresql://user:password@host:port/database"
PERCENT_ENCODING_HINT = ("percent-encode the special characters of the password in the URI "
                         "(@ as %40, / as %2F, ? as %3F, # as %23, : as %3A, % as %25)")
SECRET_KEYS = ("password", "sslpassword")  # connection parameters whose values are secrets


class DatabaseError(SearchUtilsError):
    """The database can't be reached, logged into or used; one line naming
    it by `redacted(uri)`."""

    exit_code = 2


# scheme://user: ... up to the LAST @ of the text: whatever a password holds
# (an unencoded @, /, ?, # or a newline), it is masked whole. Over-masking a
# URI with an @ further on (in its query) is the price of never showing one.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^:@\s]*:)(.*)(@)", re.DOTALL)
# key=value in a URI's query or in a key=value connection string: the key
# may be percent-encoded (libpq decodes it); a value quoted or not
_PARAMETER = re.compile(r"(?P<head>(?:^|[?&;\s]))(?P<key>[^=&\s?#;]+)(?P<eq>\s*=\s*)"
                        r"(?P<value>'(?:[^'\\]|\\.)*'|[^\s&#]*)")


def redacted(uri: str) -> str:
    """`uri` as it may be shown: any password replaced by *** (in
    user:password@, whatever the password holds; in a ?password= or
    ?sslpassword= parameter; in a key=value connection string), and on one
    line (control characters shown as escapes)."""
    shown = _URL_PASSWORD.sub(r"\1***\3", uri)
    shown = _PARAMETER.sub(_mask_parameter, shown)
    return printable_path(shown)


def _mask_parameter(match: re.Match) -> str:
    if unquote(match["key"]).strip().lower() not in SECRET_KEYS:
        return match[0]
    return f"{match['head']}{match['key']}{match['eq']}***"


def secret_fragments(uri: str) -> tuple[list[str], list[str]]:
    """(secrets, pieces) of `uri`: the secrets are the text between `user:`
    and the last @, and the values of password parameters; the pieces are
    a secret's parts between special characters (a driver that misreads
    the URI quotes such parts back, e.g. as a host name). Each also
    percent-decoded; longest first."""
    secrets: set[str] = set()
    pieces: set[str] = set()
    match = _URL_PASSWORD.search(uri)
    if match:
        secrets.add(match[2])
        pieces.update(re.split(r"[@/?#:&=;,\s\[\]]+", match[2]))
    for parameter in _PARAMETER.finditer(uri):
        if unquote(parameter["key"]).strip().lower() in SECRET_KEYS:
            secrets.update({parameter["value"], parameter["value"].strip("'")})
    secrets |= {unquote(secret) for secret in secrets}
    pieces |= {unquote(piece) for piece in pieces}

    def ordered(values: set[str]) -> list[str]:
        return sorted((value for value in values if value), key=len, reverse=True)

    return ordered(secrets), ordered(pieces - secrets)


MIN_SCRUBBED = 4  # shorter text can't be replaced safely: it would match ordinary words


def scrubbed(text: str, uri: str, more_secrets: Iterable[str] = ()) -> str | None:
    """`text` (e.g. a driver's error) with every secret of `uri` (and
    `more_secrets`) and every piece of one masked, on one line. None when a
    whole secret too short to replace safely shows in it as a word: then
    say nothing of the text. (Pieces that short tell nothing.)"""
    secrets, pieces = secret_fragments(uri)
    secrets = sorted({*secrets, *(s for s in more_secrets if s)}, key=len, reverse=True)
    for secret in secrets:
        if len(secret) >= MIN_SCRUBBED:
            text = text.replace(secret, "***")
        elif re.search(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", text):
            return None
    for piece in pieces:
        if len(piece) >= MIN_SCRUBBED:
            text = text.replace(piece, "***")
    return redacted(text)


def database_uri(text: str) -> str:
    """argparse type of --db: a postgresql:// URI, refused in one line that
    never shows its password (argparse's own message would quote it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty; give the database's URI, {URI_FORM}")
    if not text.startswith(("postgresql://", "postgres://")):
        raise argparse.ArgumentTypeError(f"{redacted(text)} is not a PostgreSQL URI ({URI_FORM})")
    return text


def search_backend(uri: str | None):
    """Where chi2 candidates come from: the embedded index (no `uri`), or
    the database at `uri` (--db of the search command and the service).
    Searching only reads: a read-only role will do.

    Raises:
        DatabaseError: as open_database.
    """
    from ..searcher import EMBEDDED

    return open_database(uri).backend() if uri else EMBEDDED


def open_database(uri: str, writing: bool = False) -> "VectorDatabase":
    """Connect to the PostgreSQL server at `uri` (postgresql://...). With
    `writing` (the indexer), also create the vector extension and this
    package's tables if missing, so that a role that can't is told before
    any work; searching creates nothing.

    Raises:
        DatabaseError: psycopg missing, not a postgres URI, unreachable,
            login refused, no such database, (writing) tables can't be made.
    """
    try:
        import psycopg  # noqa: F401  (only to say what is missing, in one line)
        import pgvector.psycopg  # noqa: F401
    except ImportError:
        raise DatabaseError(INSTALL_HINT) from None
    from .pgvector_db import VectorDatabase

    return VectorDatabase.connect(uri, writing=writing)


__all__ = ["DatabaseError", "INSTALL_HINT", "database_uri", "open_database", "redacted", "scrubbed",
           "search_backend", "secret_fragments"]
