"""Helpers for the service tests: a small real collection indexed by the
real command, and the real server started in a subprocess on a free
loopback port, stopped when done."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from conftest import REPO, offline_env, run_command

ICONS = sorted((REPO / "icons").glob("*.png"))
SERVING = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+/)")
START_SECONDS = 120  # the server lists its port before the model loads; loaded machines are slow


def index_icons(folder: Path, count: int = 60, features: str = "features.csv") -> Path:
    """`count` of the demo icons copied under folder/icons, indexed with
    efficientnet_lite0 (weights from pip: no network) into folder/features."""
    images = folder / "icons"
    images.mkdir(parents=True)
    for icon in ICONS[:count]:
        shutil.copy(icon, images / icon.name)
    result = run_command("create_imagenet_features.py", "--dataset", "icons", "--output", features,
                         "--model", "efficientnet_lite0", "-q", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / features


class Server:
    """search_server.py in a subprocess; `url` once it listens. `preexec_fn`:
    run in the child before it starts (conftest.permission_runner's, to obey
    file permissions even as root)."""

    def __init__(self, features: Path, *args: str, cwd: Path, env: dict | None = None, preexec_fn=None):
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "search_server.py"), "--featuresPath", str(features), "--port", "0", *args],
            cwd=cwd, env=env or offline_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=preexec_fn)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put("")  # end of output

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line == "":
                raise AssertionError(f"the server exited: {''.join(self.stderr)}")
            found = SERVING.search(line)
            if found:
                return found.group(1)
        raise AssertionError(f"the server did not start: {''.join(self.stderr)}")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rstrip("/").split(":")
        return host, int(port)

    def get_json(self, path: str) -> dict:
        with _no_proxy().open(self.url + path.lstrip("/"), timeout=60) as response:
            return json.load(response)

    def wait_for_model(self) -> None:
        """Until /api/health says the model is ready (uploads then never wait for the build)."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            state = self.get_json("api/health")["model"]
            if state == "ready":
                return
            assert not state.startswith("unavailable"), state
            time.sleep(0.2)
        raise AssertionError("the model did not load")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _no_proxy() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def running_server(features: Path, *args: str, cwd: Path, env: dict | None = None, preexec_fn=None):
    server = Server(features, *args, cwd=cwd, env=env, preexec_fn=preexec_fn)
    try:
        yield server
    finally:
        server.stop()


__all__ = ["ICONS", "Server", "index_icons", "running_server"]
