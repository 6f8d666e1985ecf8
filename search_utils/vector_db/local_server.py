"""A local PostgreSQL + pgvector server for `make db`, the tests and the
bench: the binaries that pip's `pgserver` package bundles (PostgreSQL 16.2,
pgvector 0.6.2), run as a plain server process with its files in one folder.

    python -m search_utils.vector_db.local_server start DIR [--port N]   # last line: the URI
    python -m search_utils.vector_db.local_server stop DIR

DIR holds the cluster (`pgdata/`), its log (`server.log`), the generated
password (`password`, readable by its owner only) and the unix socket. The
server listens on 127.0.0.1 (or another loopback address) and that socket,
nowhere else, and every connection needs the password (scram-sha-256).
Starting a running server returns its URI; a stopped one restarts on the
port it had (a free port the first time, unless --port says which).

PostgreSQL refuses to run as root: as root, the server runs as the system
user `postgres` (created as a system user if missing), which must be able to
reach DIR (a folder under /tmp works; /root/... does not: refused before
anything is made). A DIR that exists keeps its owner and mode: the server's
own files go into `pgdata/` (where its socket then lives too) and
`server.log`, which are made for it; only a DIR that `start` creates is
handed to it whole. A `start` that fails removes what it created.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Sequence

from ..errors import SearchUtilsError, printable_path

USER = "search"  # the database role the URI logs in as (a superuser of this local cluster)
DATABASE = "postgres"
SERVICE_USER = "postgres"  # the system user the server runs as when we are root
START_SECONDS = 60
SETTINGS_FILE = "search_server.conf"  # rewritten at each start: port and where to listen
PGDATA, LOG = "pgdata", "server.log"  # in DIR; the programs get them relative to DIR (no quoting trouble)
MAX_SOCKET_PATH = 103  # sun_path holds 108 bytes, minus room for ".s.PGSQL.NNNNN"
# The server's own tuning, fixed at initdb: room to build a graph index in memory,
# and a parallel build on every core.
TUNING = {
    "shared_buffers": "'256MB'",
    "maintenance_work_mem": "'1GB'",
    "max_parallel_maintenance_workers": str(max(1, (os.cpu_count() or 2) - 1)),
}


class LocalServerError(SearchUtilsError):
    """The local database server can't be set up, started or stopped."""

    exit_code = 2


def pg_install() -> str:
    """The folder of pgserver's PostgreSQL install (bin/, lib/, share/)."""
    import importlib.util

    # found, not imported: importing pgserver sets up its own server machinery
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError("the local database server needs pgserver: pip install -r requirements-scale.txt "
                               "(or make setup-scale)")
    return os.path.join(list(spec.submodule_search_locations)[0], "pginstall")


def pg_bin(name: str, install: str | None = None) -> str:
    """A PostgreSQL program of `install` (default: pgserver's own)."""
    path = os.path.join(install or pg_install(), "bin", name)
    if not os.access(path, os.X_OK):
        raise LocalServerError(f"pgserver has no {name} program at {path}")
    return path


def _install_reachable_by(user: str) -> str:
    """pgserver's install if `user` can run it; else a copy it can, made
    once in the system's temporary folder. As root, the venv often lies in a
    folder only root may enter (/root/..., a mode-700 temporary checkout),
    and the server's user must run the programs and read their libraries."""
    install = pg_install()
    if _can_run(user, pg_bin("postgres", install)):
        return install
    info = os.stat(pg_bin("postgres", install))
    key = f"{install}:{info.st_size}:{info.st_mtime_ns}".encode("utf-8", "surrogateescape")
    name = f"search-utils-pginstall-{hashlib.blake2b(key, digest_size=6).hexdigest()}"
    copy = os.path.join(tempfile.gettempdir(), name)
    copied_install = os.path.join(copy, "pgserver", "pginstall")
    program = os.path.join(copied_install, "bin", "postgres")
    ours = os.path.isfile(program) and os.stat(copy).st_uid == os.geteuid()  # not planted by another user
    if not (ours and _can_run(user, program)):
        _copy_for_all(install, copy)
    return copied_install


def _copy_for_all(install: str, copy: str) -> None:
    """site-packages/pgserver/pginstall and pgserver.libs (the programs find
    their shared libraries at $ORIGIN/../../../pgserver.libs) copied to `copy`
    with the same layout, readable by everyone; in place whole or not at all."""
    site = os.path.dirname(os.path.dirname(install))
    staging = tempfile.mkdtemp(prefix=".pginstall-", dir=os.path.dirname(copy))
    shutil.copytree(install, os.path.join(staging, "pgserver", "pginstall"), symlinks=True)
    libs = os.path.join(site, "pgserver.libs")
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(staging, "pgserver.libs"), symlinks=True)
    for folder in (staging, os.path.join(staging, "pgserver")):
        os.chmod(folder, 0o755)
    shutil.rmtree(copy, ignore_errors=True)
    os.rename(staging, copy)


def _can_run(user: str, program: str) -> bool:
    return subprocess.run(["test", "-x", program], user=user, capture_output=True).returncode == 0


def start(data_dir: str, port: int | None = None, host: str = "127.0.0.1") -> str:
    """Start (initialising on first use) the server in `data_dir`; return its URI.

    Already running: its URI, whatever `port` says.

    Raises:
        LocalServerError: one line saying what failed (with the log's last
            line); what this call created is removed again.
    """
    _check_loopback(host)
    if port is not None:
        check_port(port)
    data_dir = os.path.abspath(data_dir)
    runner = _Runner(data_dir)
    made: list[str] = []  # what this call created, removed again if it fails
    try:
        runner.prepare(made)
        fresh = not os.path.exists(os.path.join(_pgdata(data_dir), "PG_VERSION"))
        if not fresh and _running(runner, data_dir):
            return uri_of(data_dir)
        if port is not None and not _port_free(host, port):
            raise LocalServerError(f"port {port} on {host} is in use: choose another with --port, "
                                   "or leave --port out for a free one")
        if fresh:
            _initdb(runner, data_dir, made)
        port = port or _recorded_port(data_dir, host) or _free_port(host)
        _write_settings(data_dir, host, port)
        try:
            runner.run([runner.program("pg_ctl"), "-D", PGDATA, "-l", LOG, "-w", "-t", str(START_SECONDS),
                        "start"], "start the database server")
        except LocalServerError:
            if not _port_free(host, port):  # taken meanwhile (its log says "could not create any TCP/IP sockets")
                raise LocalServerError(f"port {port} on {host} is in use: choose another with --port, "
                                       "or leave --port out for a free one") from None
            raise
        return uri_of(data_dir)
    except BaseException:
        _remove_made(runner, data_dir, made)
        raise


def stop(data_dir: str) -> bool:
    """Stop the server in `data_dir` (fast: open sessions are ended).
    Returns whether one was running."""
    data_dir = os.path.abspath(data_dir)
    if not os.path.exists(os.path.join(_pgdata(data_dir), "PG_VERSION")):
        return False
    runner = _Runner(data_dir)
    if not _running(runner, data_dir):
        return False
    runner.run([runner.program("pg_ctl"), "-D", PGDATA, "-m", "fast", "-w", "-t", str(START_SECONDS),
                "stop"], "stop the database server")
    return True


def check_port(port: int) -> None:
    if not 1 <= int(port) <= 65535:
        raise LocalServerError(f"port {port} is not a port number (1-65535)")


def _remove_made(runner: "_Runner", data_dir: str, made: list[str]) -> None:
    """Undo a failed start: stop a server it left running, remove what it created."""
    if not made:
        return
    with contextlib.suppress(Exception):
        if os.path.exists(os.path.join(_pgdata(data_dir), "PG_VERSION")) and _running(runner, data_dir):
            runner.run([runner.program("pg_ctl"), "-D", PGDATA, "-m", "immediate", "-w", "stop"], "")
    for path in reversed(made):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def uri_of(data_dir: str) -> str:
    """The URI of the server in `data_dir`, password included (as it was started last)."""
    settings = _read_settings(os.path.abspath(data_dir))
    with open(os.path.join(data_dir, "password"), encoding="utf-8") as handle:
        password = handle.read().strip()
    host = settings["listen_addresses"]
    shown_host = f"[{host}]" if ":" in host else host
    return f"postgresql://{USER}:{password}@{shown_host}:{settings['port']}/{DATABASE}"


def _pgdata(data_dir: str) -> str:
    return os.path.join(data_dir, PGDATA)


def _log(data_dir: str) -> str:
    return os.path.join(data_dir, LOG)


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LocalServerError(f"the local database server listens on a loopback address only, not {host!r}")


class _Runner:
    """Runs the server's programs as the user that owns the cluster: ourselves,
    or, as root, SERVICE_USER (PostgreSQL won't run as root). The programs
    run in DIR and are given its files by relative names."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.user = _service_user() if os.geteuid() == 0 else None
        self.install = pg_install() if self.user is None else _install_reachable_by(self.user)

    def program(self, name: str) -> str:
        return pg_bin(name, self.install)

    def prepare(self, made: list[str]) -> None:
        """DIR (created if missing) and, as root, what the service user
        writes in it; every path created is appended to `made`. As root, a
        DIR that exists keeps its owner and mode; one created here is the
        service user's."""
        if self.user is not None:
            reachable = self.data_dir
            while not os.path.exists(reachable):
                reachable = os.path.dirname(reachable)
            if not self._can("-x", reachable):
                raise LocalServerError(f"the database server runs as user {self.user} (PostgreSQL won't run as "
                                       f"root), which can't reach {printable_path(reachable)}: choose a folder it "
                                       "can reach, e.g. under /tmp")
        _make_folders(self.data_dir, made)
        if self.user is None:
            return
        entry = pwd.getpwnam(self.user)
        if made and made[-1] == self.data_dir:  # ours: the service user's whole
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            os.chmod(self.data_dir, 0o700)
        pgdata = _pgdata(self.data_dir)
        if not os.path.exists(pgdata):
            os.mkdir(pgdata, 0o700)
            made.append(pgdata)
            os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        log = _log(self.data_dir)
        if not os.path.exists(log):
            _write_private(log, "")
            made.append(log)
            os.chown(log, entry.pw_uid, entry.pw_gid)
        if not self._can("-w", pgdata):
            raise LocalServerError(f"the database server runs as user {self.user} (not as root), which can't write "
                                   f"{printable_path(pgdata)}: choose a folder it can reach, e.g. under /tmp")

    def _can(self, test: str, path: str) -> bool:
        return subprocess.run(["test", test, path], user=self.user, capture_output=True).returncode == 0

    def run(self, command: list[str], what: str) -> subprocess.CompletedProcess:
        kwargs = {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid, "extra_groups": []} if self.user else {}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        if self.user:
            env["HOME"] = _pgdata(self.data_dir)
        # stdout/stderr to files, not pipes: the server started by pg_ctl inherits them and outlives us
        with open(os.devnull, "rb") as devnull, _scratch_output() as output:
            result = subprocess.run(command, stdin=devnull, stdout=output, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.data_dir, **kwargs)
            if result.returncode != 0 and what:
                output.seek(0)
                raise LocalServerError(f"could not {what} in {printable_path(self.data_dir)}: "
                                       f"{_last_line(output.read().decode(errors='replace'), self.data_dir)}")
        return result


def _make_folders(path: str, made: list[str]) -> None:
    """os.makedirs, recording each folder it creates (outermost first)."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        os.mkdir(folder)
        made.append(folder)


@contextlib.contextmanager
def _scratch_output():
    with tempfile.TemporaryFile() as handle:
        yield handle


def _last_line(output: str, data_dir: str) -> str:
    """The most telling line: the command's own, else the server log's last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    log_lines = []
    with contextlib.suppress(OSError):
        with open(_log(data_dir), encoding="utf-8", errors="replace") as handle:
            log_lines = [line.strip() for line in handle.read().splitlines()[-20:] if line.strip()]
    errors = [line for line in log_lines if "FATAL" in line or "ERROR" in line]
    return (errors or lines or log_lines or ["no output"])[-1]


def _service_user() -> str:
    """SERVICE_USER, created as a system user if this machine has none."""
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None or subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                              SERVICE_USER], capture_output=True).returncode != 0:
            raise LocalServerError(f"PostgreSQL won't run as root and there is no user {SERVICE_USER} "
                                   f"(useradd --system {SERVICE_USER} failed): run as another user") from None
    return SERVICE_USER


def _initdb(runner: _Runner, data_dir: str, made: list[str]) -> None:
    """A new cluster: role USER with a generated password, scram everywhere,
    settings read from SETTINGS_FILE."""
    password = secrets.token_urlsafe(24)  # URL-safe: goes into the URI as is
    password_file = os.path.join(data_dir, "password")
    if not os.path.exists(password_file):
        made.append(password_file)
    _write_private(password_file, password + "\n")
    pwfile = os.path.join(data_dir, ".initdb-password")
    _write_private(pwfile, password + "\n")
    pgdata = _pgdata(data_dir)
    if os.path.isdir(pgdata) and os.listdir(pgdata):  # a half-made cluster from an interrupted initdb
        for entry in os.listdir(pgdata):
            inside = os.path.join(pgdata, entry)
            if os.path.isdir(inside) and not os.path.islink(inside):
                shutil.rmtree(inside)
            else:
                os.unlink(inside)
    if not os.path.exists(pgdata):
        os.mkdir(pgdata, 0o700)
        made.append(pgdata)
    if runner.user:
        entry = pwd.getpwnam(runner.user)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    try:
        runner.run([runner.program("initdb"), "-D", PGDATA, "-U", USER, "--auth=scram-sha-256",
                    "--pwfile=.initdb-password", "-E", "UTF8", "--no-locale", "--no-instructions"],
                   "initialise the database cluster")
    finally:
        os.unlink(pwfile)
    conf = os.path.join(pgdata, "postgresql.conf")
    with open(conf, "a", encoding="utf-8") as handle:
        handle.write("\n# search_utils.vector_db.local_server\n")
        handle.writelines(f"{key} = {value}\n" for key, value in TUNING.items())
        handle.write(f"include_if_exists = '{SETTINGS_FILE}'\n")


def _write_private(path: str, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def _running(runner: _Runner, data_dir: str) -> bool:
    """pg_ctl status: 0 running, 3 not running (a stale postmaster.pid counts as not)."""
    return runner.run([runner.program("pg_ctl"), "-D", PGDATA, "status"], "").returncode == 0


def _write_settings(data_dir: str, host: str, port: int) -> None:
    # as root, DIR may not be the service user's: the socket goes into pgdata, which is
    socket_dir = _pgdata(data_dir) if os.geteuid() == 0 else data_dir
    if len(socket_dir) > MAX_SOCKET_PATH or any(char in socket_dir for char in ',"'):
        socket_dir = ""  # a path too long for a socket, or one the setting's list syntax can't hold: TCP only
    quoted = lambda value: "'" + str(value).replace("'", "''") + "'"  # noqa: E731
    path = os.path.join(_pgdata(data_dir), SETTINGS_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"listen_addresses = {quoted(host)}\nport = {int(port)}\n"
                     f"unix_socket_directories = {quoted(socket_dir)}\n")
    if os.geteuid() == 0:
        entry = pwd.getpwnam(_service_user())
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _read_settings(data_dir: str) -> dict[str, str]:
    settings = {}
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(_pgdata(data_dir), SETTINGS_FILE), encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition("=")
                settings[key.strip()] = value.strip().strip("'")
    return settings


def _recorded_port(data_dir: str, host: str) -> int | None:
    """The port of the last start, if it is free now (the URI then stays the same)."""
    try:
        port = int(_read_settings(data_dir).get("port", ""))
    except ValueError:
        return None
    if not 1 <= port <= 65535 or not _port_free(host, port):  # e.g. recorded by an older version's bad --port
        return None
    return port


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import ArgumentParser

    parser = ArgumentParser(prog="python -m search_utils.vector_db.local_server",
                            description="a local PostgreSQL + pgvector server (pgserver's binaries) in a folder")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("data_dir", help="the server's folder (created and initialised on first start)")
    parser.add_argument("--port", type=port_number,
                        help="port on 127.0.0.1, 1-65535 (default: the last one, else a free one)")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("argument data_dir: empty")
    shown = printable_path(args.data_dir)
    if args.action == "start":
        uri = start(args.data_dir, args.port)
        print(f"database server running in {shown} (stop: python -m search_utils.vector_db.local_server "
              f"stop {printable_path(shlex.quote(args.data_dir))}); its URI, with the password:", file=sys.stderr)
        print(uri)
    else:
        print(f"database server in {shown}: {'stopped' if stop(args.data_dir) else 'was not running'}",
              file=sys.stderr)
    return 0


def port_number(text: str) -> int:
    """argparse type of --port: 1-65535."""
    try:
        port = int(text)
        check_port(port)
    except (ValueError, LocalServerError):
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {text!r}") from None
    return port


if __name__ == "__main__":
    from ..cli import run

    sys.exit(run(main))
