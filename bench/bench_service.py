#!/usr/bin/env python
"""The search service against the search command: query latency, same
collection, same run.

The collection: the repo's 300 icons (icons/), copied into a temporary
folder and indexed there with efficientnet_lite0 by the real indexing
command (or --features FILE, already indexed: no indexing).

  command  imagenet_search.py --json --no-plot, a new process per query, as a
           user runs it: an outside query (search.jpg: start, build the model,
           embed, search) and a stored query (an indexed icon: its stored
           features are reused, no model); median of --cli-runs runs each,
           after one untimed run of each (disk cache warm, as for the rest);
  service  search_server.py in a subprocess on 127.0.0.1 (any free port),
           measured once its model is ready: outside queries are POST uploads
           of search.jpg's bytes (upload, decode, one model call, search),
           stored queries GET by id; with 1 client, then with --clients
           concurrent clients (threads, each with its own keep-alive
           httpx.Client); latency as the client sees it (p50, p95),
           requests/s, and errors (anything but a 200 with results).

    python bench/bench_service.py [--clients 8] [--requests 300] [--uploads 100]
                                  [--cli-runs 5] [--features FILE] [--server-env NAME=VALUE]

--server-env sets a variable in the server's environment only (repeatable),
to measure a setting against the default in the same conditions, e.g.
OMP_WAIT_POLICY=passive.

Targets: the command's outside query / the service's outside p50 (1 client)
at least 30x; the service's stored p50 (1 client) under 20 ms. Last line:
the outside-query speed-up of the service over the command.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUERY = REPO / "search.jpg"
SERVING = re.compile(r"serving .* on (http://127\.0\.0\.1:\d+/)")
READY = re.compile(r"model \S+ ready")
START_SECONDS = 300
OUTSIDE_TARGET = 30.0  # x: the command's outside query / the service's
STORED_TARGET_MS = 20.0


def local_env() -> dict[str, str]:
    """The user's environment, except that any download would go to a closed
    local port (nothing is fetched: efficientnet_lite0's weights come with pip)."""
    env = dict(os.environ)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env[name] = "http://127.0.0.1:9"
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return env


def index_icons(folder: Path) -> Path:
    shutil.copytree(REPO / "icons", folder / "icons")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "create_imagenet_features.py"), "--dataset", "icons",
                             "--output", "features.csv", "--model", "efficientnet_lite0", "-q"],
                            cwd=folder, env=local_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"indexing failed: {result.stderr.strip()}")
    print(f"indexed icons/ into a temporary folder in {time.perf_counter() - started:.1f} s: "
          f"{result.stderr.strip().splitlines()[-1]}", flush=True)
    return folder / "features.csv"


# -- the command ----------------------------------------------------------------


def run_cli(query: str, features: Path, cwd: Path) -> tuple[float, dict, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "imagenet_search.py"), "--query", query,
                             "--featuresPath", str(features), "--json", "--no-plot"],
                            cwd=cwd, env=local_env(), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"imagenet_search.py --query {query} failed: {result.stderr.strip()}")
    return seconds, json.loads(result.stdout), result.stderr


def time_cli(query: str, features: Path, cwd: Path, runs: int) -> tuple[float, dict, str]:
    """Median seconds of `runs` runs (after one untimed), the last JSON answer and stderr."""
    run_cli(query, features, cwd)
    times = []
    for _ in range(runs):
        seconds, answer, stderr = run_cli(query, features, cwd)
        times.append(seconds)
    return statistics.median(times), answer, stderr


# -- the service ----------------------------------------------------------------


class Service:
    """search_server.py --port 0 in a subprocess; `url` once it listens, `ready` once the model is."""

    def __init__(self, features: Path, cwd: Path, extra_env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "search_server.py"), "--featuresPath", str(features), "--port", "0"],
            cwd=cwd, env={**local_env(), **extra_env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for(SERVING).group(1)
        self.model_line = self._wait_for(READY).string.strip()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put("")

    def _wait_for(self, pattern: re.Pattern) -> re.Match:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line == "":
                sys.exit(f"the server exited: {''.join(self.stderr)}")
            found = pattern.search(line)
            if found:
                return found
        self.stop()
        sys.exit(f"the server did not get to {pattern.pattern!r}: {''.join(self.stderr)}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Load:
    """One measured phase: every request's latency, the wall time, the errors."""
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")

    def line(self, what: str, clients: int) -> str:
        done = len(self.latencies)
        return (f"  {what:<8} {clients} client{'s' if clients > 1 else ' '}: {done:4d} requests, "
                f"p50 {self.ms(50):7.1f} ms, p95 {self.ms(95):7.1f} ms, {done / self.seconds:7.1f} requests/s, "
                f"{len(self.errors)} errors")


def stored_request(client: httpx.Client, row: int) -> httpx.Response:
    return client.get("api/search", params={"id": row, "n": 5, "metric": "chi2"})


def outside_request(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("api/search", params={"n": 5, "metric": "chi2"},
                       files={"image": ("search.jpg", body, "image/jpeg")})


def check(response: httpx.Response) -> str | None:
    """None if a good answer, else what was wrong."""
    if response.status_code != 200:
        return f"{response.status_code}: {response.text[:200]}"
    if not response.json().get("results"):
        return "200 without results"
    return None


def load(url: str, clients: int, jobs: list, send) -> Load:
    """Send every job (an argument for `send(client, job)`) from `clients`
    threads, each with its own keep-alive connection, all starting together."""
    result = Load()
    lock = threading.Lock()
    shares = [jobs[i::clients] for i in range(clients)]
    start = threading.Barrier(clients + 1, timeout=120)  # a client that fails to connect breaks it: no hang

    def work(share):
        with httpx.Client(base_url=url, trust_env=False, timeout=120) as client:
            client.get("api/health")  # connect before the start: keep-alive from the first request
            start.wait()
            for job in share:
                began = time.perf_counter()
                try:
                    problem = check(send(client, job))
                except httpx.HTTPError as error:
                    problem = f"{type(error).__name__}: {error}"
                took = time.perf_counter() - began
                with lock:
                    result.latencies.append(took)
                    if problem:
                        result.errors.append(problem)

    threads = [threading.Thread(target=work, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - began
    return result


def top_paths(answer: dict) -> list[str]:
    return [hit["path"] for hit in answer["results"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=300, help="stored queries per phase (default: 300)")
    parser.add_argument("--uploads", type=int, default=100, help="outside queries (uploads) per phase (default: 100)")
    parser.add_argument("--cli-runs", type=int, default=5, help="timed runs of the command per kind (default: 5)")
    parser.add_argument("--features", type=Path, help="an indexed features file (default: index icons/ now)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a variable for the server's environment only (repeatable)")
    args = parser.parse_args(argv)
    if not all("=" in item and not item.startswith("=") for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if min(args.clients, args.requests, args.uploads, args.cli_runs) < 1:
        parser.error("--clients, --requests, --uploads and --cli-runs must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-service-") as temp:
        folder = Path(temp)
        if args.features:
            features = args.features.resolve()
            cwd = features.parent  # stored paths are relative to where the file was indexed
        else:
            features, cwd = index_icons(folder), folder
        body = QUERY.read_bytes()

        # The command, as a user runs it: a new process per query.
        cli_outside, cli_outside_answer, outside_err = time_cli(str(QUERY), features, cwd, args.cli_runs)
        if "embedded the query" not in outside_err:
            sys.exit(f"the outside query was not embedded? stderr: {outside_err}")
        stored_query = cli_outside_answer["results"][0]["path"]  # an indexed image
        cli_stored, cli_stored_answer, stored_err = time_cli(stored_query, features, cwd, args.cli_runs)
        if "embedded the query" in stored_err:
            sys.exit(f"the stored query {stored_query} was embedded: not recognised as indexed")
        if cli_stored_answer["results"][0]["distance"] != 0:
            sys.exit(f"the stored query {stored_query} did not find itself first: {cli_stored_answer}")

        service = Service(features, cwd, server_env)
        try:
            with httpx.Client(base_url=service.url, trust_env=False, timeout=120) as client:
                count = client.get("api/stats").json()["count"]
                began = time.perf_counter()
                first = outside_request(client, body)
                first_upload = time.perf_counter() - began
                if check(first):
                    sys.exit(f"the first upload failed: {check(first)}")
                service_answer = first.json()
                began = time.perf_counter()
                first_stored = stored_request(client, 0)
                first_stored_s = time.perf_counter() - began
                if check(first_stored):
                    sys.exit(f"the first search by id failed: {check(first_stored)}")
            rss_ready = service.rss_mb()

            rng = np.random.default_rng(0)
            rows = [int(r) for r in rng.integers(0, count, args.requests)]
            uploads = [body] * args.uploads
            phases = []
            for clients in sorted({1, args.clients}):
                phases.append(("stored", clients, load(service.url, clients, rows, stored_request)))
                phases.append(("outside", clients, load(service.url, clients, uploads, outside_request)))
            rss_end = service.rss_mb()
        finally:
            service.stop()

    agree = top_paths(service_answer) == top_paths(cli_outside_answer)
    measured = {(kind, clients): phase for kind, clients, phase in phases}
    outside_1, stored_1 = measured[("outside", 1)], measured[("stored", 1)]
    speedup = cli_outside / (outside_1.ms(50) / 1000)
    stored_speedup = cli_stored / (stored_1.ms(50) / 1000)
    errors = sum(len(phase.errors) for _, _, phase in phases)

    print(f"{count} icons, efficientnet_lite0, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the "
          f"end); the service's top 5 for search.jpg agree with the command's: {agree}")
    print(f"command (a new process per query, median of {args.cli_runs}):")
    print(f"  outside query (search.jpg: start, build the model, embed, search): {cli_outside:.2f} s")
    print(f"  stored query ({stored_query}: start, load, search):  {cli_stored:.2f} s")
    shown_env = "".join(f"; {name}={value}" for name, value in server_env.items())
    print(f"service ({service.model_line}{shown_env}; RSS {rss_ready:.0f} MB ready, {rss_end:.0f} MB at the end):")
    print(f"  first requests after ready: upload {first_upload * 1000:.0f} ms, by id {first_stored_s * 1000:.0f} ms")
    for kind, clients, phase in phases:
        print(phase.line(kind, clients))
    for problem in sorted({p for _, _, phase in phases for p in phase.errors})[:5]:
        print(f"  error: {problem}")
    outside_ok = speedup >= OUTSIDE_TARGET
    stored_ok = stored_1.ms(50) < STORED_TARGET_MS
    print(f"stored query: command {cli_stored:.2f} s vs service p50 {stored_1.ms(50):.1f} ms: {stored_speedup:.0f}x; "
          f"target p50 < {STORED_TARGET_MS:g} ms at {count} rows: {'PASS' if stored_ok else 'FAIL'}")
    print(f"errors: {errors} (target 0): {'PASS' if errors == 0 else 'FAIL'}")
    print(f"outside query target >= {OUTSIDE_TARGET:g}x: {'PASS' if outside_ok else 'FAIL'}")
    print(f"outside query: command {cli_outside:.2f} s vs service p50 {outside_1.ms(50):.1f} ms: {speedup:.0f}x")
    return 0 if outside_ok and stored_ok and errors == 0 and agree else 1


if __name__ == "__main__":
    sys.exit(main())
