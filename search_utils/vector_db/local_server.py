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
reach DIR (a folder under /tmp works; /root/... does not).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Sequence

from ..errors import SearchUtilsError

USER = "search"  # the database role the URI logs in as (a superuser of this local cluster)
DATABASE = "postgres"
SERVICE_USER = "postgres"  # the system user the server runs as when we are root
START_SECONDS = 60
SETTINGS_FILE = "search_server.conf"  # rewritten at each start: port and where to listen
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
        LocalServerError: one line saying what failed (with the log's last line).
    """
    _check_loopback(host)
    data_dir = os.path.abspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    runner = _Runner(data_dir)
    if not os.path.exists(os.path.join(_pgdata(data_dir), "PG_VERSION")):
        _initdb(runner, data_dir)
    if _running(runner, data_dir):
        return uri_of(data_dir)
    port = port or _recorded_port(data_dir, host) or _free_port(host)
    _write_settings(data_dir, host, port)
    runner.run([runner.program("pg_ctl"), "-D", _pgdata(data_dir), "-l", _log(data_dir), "-w", "-t", str(START_SECONDS),
                "start"], "start the database server")
    return uri_of(data_dir)


def stop(data_dir: str) -> bool:
    """Stop the server in `data_dir` (fast: open sessions are ended).
    Returns whether one was running."""
    data_dir = os.path.abspath(data_dir)
    if not os.path.exists(os.path.join(_pgdata(data_dir), "PG_VERSION")):
        return False
    runner = _Runner(data_dir)
    if not _running(runner, data_dir):
        return False
    runner.run([runner.program("pg_ctl"), "-D", _pgdata(data_dir), "-m", "fast", "-w", "-t", str(START_SECONDS),
                "stop"], "stop the database server")
    return True


def uri_of(data_dir: str) -> str:
    """The URI of the server in `data_dir`, password included (as it was started last)."""
    settings = _read_settings(os.path.abspath(data_dir))
    with open(os.path.join(data_dir, "password"), encoding="utf-8") as handle:
        password = handle.read().strip()
    host = settings["listen_addresses"]
    shown_host = f"[{host}]" if ":" in host else host
    return f"postgresql://{USER}:{password}@{shown_host}:{settings['port']}/{DATABASE}"


def _pgdata(data_dir: str) -> str:
    return os.path.join(data_dir, "pgdata")


def _log(data_dir: str) -> str:
    return os.path.join(data_dir, "server.log")


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LocalServerError(f"the local database server listens on a loopback address only, not {host!r}")


class _Runner:
    """Runs the server's programs as the user that owns the cluster: ourselves,
    or, as root, SERVICE_USER (PostgreSQL won't run as root)."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.user = _service_user() if os.geteuid() == 0 else None
        self.install = pg_install()
        if self.user is not None:
            self._hand_over(data_dir)
            self.install = _install_reachable_by(self.user)

    def program(self, name: str) -> str:
        return pg_bin(name, self.install)

    def _hand_over(self, data_dir: str) -> None:
        """Let the service user own the folder (it writes the cluster, log and socket there)."""
        entry = pwd.getpwnam(self.user)
        if os.stat(data_dir).st_uid != entry.pw_uid:
            os.chown(data_dir, entry.pw_uid, entry.pw_gid)
        os.chmod(data_dir, 0o700)
        if subprocess.run(["test", "-w", data_dir, "-a", "-x", data_dir], user=self.user,
                          capture_output=True).returncode != 0:
            raise LocalServerError(f"the database server runs as user {self.user} (not as root), which can't reach "
                                   f"{data_dir}: choose a folder it can reach, e.g. under /tmp")

    def run(self, command: list[str], what: str) -> subprocess.CompletedProcess:
        kwargs = {"user": self.user, "group": pwd.getpwnam(self.user).pw_gid, "extra_groups": []} if self.user else {}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        if self.user:
            env["HOME"] = self.data_dir
        # stdout/stderr to files, not pipes: the server started by pg_ctl inherits them and outlives us
        with open(os.devnull, "rb") as devnull, _scratch_output() as output:
            result = subprocess.run(command, stdin=devnull, stdout=output, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.data_dir, **kwargs)
            if result.returncode != 0 and what:
                output.seek(0)
                raise LocalServerError(f"could not {what} in {self.data_dir}: "
                                       f"{_last_line(output.read().decode(errors='replace'), self.data_dir)}")
        return result


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


def _initdb(runner: _Runner, data_dir: str) -> None:
    """A new cluster: role USER with a generated password, scram everywhere,
    settings read from SETTINGS_FILE."""
    password = secrets.token_urlsafe(24)  # URL-safe: goes into the URI as is
    password_file = os.path.join(data_dir, "password")
    _write_private(password_file, password + "\n")
    pwfile = os.path.join(data_dir, ".initdb-password")
    _write_private(pwfile, password + "\n")
    if runner.user:
        entry = pwd.getpwnam(runner.user)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    shutil.rmtree(_pgdata(data_dir), ignore_errors=True)  # a half-made cluster from an interrupted initdb
    try:
        runner.run([runner.program("initdb"), "-D", _pgdata(data_dir), "-U", USER, "--auth=scram-sha-256",
                    f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale", "--no-instructions"],
                   "initialise the database cluster")
    finally:
        os.unlink(pwfile)
    conf = os.path.join(_pgdata(data_dir), "postgresql.conf")
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
    return runner.run([runner.program("pg_ctl"), "-D", _pgdata(data_dir), "status"], "").returncode == 0


def _write_settings(data_dir: str, host: str, port: int) -> None:
    socket_dir = data_dir if len(data_dir) <= MAX_SOCKET_PATH else ""  # too long a path: TCP only
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
    port = _read_settings(data_dir).get("port")
    if port is None:
        return None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, int(port)))
        except OSError:
            return None
    return int(port)


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
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: the last one, else a free one)")
    args = parser.parse_args(argv)
    if args.action == "start":
        uri = start(args.data_dir, args.port)
        print(f"database server running in {args.data_dir} (stop: python -m search_utils.vector_db.local_server "
              f"stop {args.data_dir}); its URI, with the password:", file=sys.stderr)
        print(uri)
    else:
        print(f"database server in {args.data_dir}: {'stopped' if stop(args.data_dir) else 'was not running'}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from ..cli import run

    sys.exit(run(main))
