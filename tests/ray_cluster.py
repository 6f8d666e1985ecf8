"""A real two-node Ray cluster for tests, on loopback in a private network.

Ray's services listen on every interface whatever --node-ip-address says,
so the cluster lives in a network namespace of its own where only loopback
exists: `unshare -n` starts a holder process there (`sleep`), and every
command of the test that must reach the cluster (`ray start` for each node,
the indexing command) enters that namespace with `nsenter -n`. Only the
network is private: the test sees the processes (to signal them) and the
files (to watch the indexing state) as usual, and nothing can reach or
disturb the cluster from outside. Ports can be fixed: the namespace has
its own.

Each node is one `ray start` run in a session of its own: every process
Ray starts for the node (GCS, raylet, workers, their helpers) inherits that
session id, so stopping a node kills exactly those processes, by id
(`ray stop` would kill every Ray process of the machine). Needs root
(CI runs as root); without it the cluster refuses to start with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_PORT = 6379  # inside the private namespace: no clash with anything outside
DEADLINE = 120.0  # seconds for the cluster to come up, on a loaded machine
RAY = str(Path(sys.executable).with_name("ray"))


class ClusterUnavailable(RuntimeError):
    """The test machine can't host the cluster (not root, no unshare)."""


class Node:
    """One `ray start` and everything it spawned: its session."""

    def __init__(self, name: str, session: int):
        self.name, self.session = name, session

    def pids(self) -> list[int]:
        return session_pids(self.session)

    def kill(self) -> None:
        """SIGKILL every process of the node at once (a machine lost), then
        reap them: no process of it is left."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.1)
        raise RuntimeError(f"ray node {self.name}: processes {self.pids()} survived SIGKILL")

    def has_process(self, fragment: str) -> bool:
        return any(fragment in _cmdline(pid) for pid in self.pids())


class RayCluster:
    """A head node and one worker node, one CPU each, in a private network.

    Use as a context manager; `run(...)` runs a command inside the network;
    `address` is the head's, for `--ray`.
    """

    def __init__(self, env: dict[str, str], cpus_per_node: int = 1):
        self.env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.cpus = cpus_per_node
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # unix sockets need a short path
        self.holder: subprocess.Popen | None = None
        self.nodes: list[Node] = []

    def __enter__(self) -> "RayCluster":
        try:
            self.holder = private_network()
            self.nodes.append(self._start_node("head", ["--head", f"--port={HEAD_PORT}",
                                                        "--include-dashboard=false"]))
            self.nodes.append(self._start_node("worker", [f"--address={self.address}"]))
            self.wait_for_nodes(2)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def inside(self, command: list[str]) -> list[str]:
        """`command`, run inside the cluster's private network."""
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--", *command]

    def run(self, command: list[str], **options) -> subprocess.CompletedProcess:
        return subprocess.run(self.inside(command), env=options.pop("env", self.env), capture_output=True,
                              text=True, timeout=options.pop("timeout", 600), **options)

    def popen(self, command: list[str], **options) -> subprocess.Popen:
        return subprocess.Popen(self.inside(command), env=options.pop("env", self.env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **options)

    def _start_node(self, name: str, args: list[str]) -> Node:
        command = [RAY, "start", *args, "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
                   f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        process = subprocess.Popen(self.inside(command), env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        node = Node(name, process.pid)  # the session's id is its leader's pid
        self.nodes.append(node)  # stopped even if it fails to start
        output, _ = process.communicate(timeout=DEADLINE)
        self.nodes.remove(node)
        if process.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{output}")
        return node

    def wait_for_nodes(self, count: int) -> None:
        """Until the cluster counts `count` alive nodes."""
        script = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                  "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            result = self.run([sys.executable, "-c", script, self.address], timeout=DEADLINE)
            if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not reach {count} alive nodes")

    def stop(self) -> None:
        """Kill every node's processes and the namespace's holder; remove the
        temp dir. Safe to call twice."""
        for node in reversed(self.nodes):
            node.kill()
        self.nodes.clear()
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def private_network() -> subprocess.Popen:
    """A process holding a new network namespace with loopback up, and
    nothing else; it exits with the test (killed), or after an hour."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        raise ClusterUnavailable("the Ray cluster tests need unshare and nsenter (util-linux)")
    holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && echo ready && exec sleep 3600"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "ready":
        reason = holder.stderr.read().strip()
        holder.wait()
        raise ClusterUnavailable(f"can't make a private network namespace for the Ray cluster "
                                 f"(needs root, as CI runs): {reason}")
    return holder


def session_pids(session: int) -> list[int]:
    """Processes (not zombies) whose session id is `session`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
