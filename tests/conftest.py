"""Shared fixtures: small real image folders, a random-weights file, and a
helper that runs the real commands in a subprocess."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Names the CLI tests look for.
AWKWARD_NAME = 'odd, "quoted" name.png'


def draw_picture(seed: int, size=(160, 120), mode="RGB") -> Image.Image:
    """A small deterministic picture: coloured background and shapes."""
    rng = np.random.default_rng(seed)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        x1, y1 = x0 + int(rng.integers(10, size[0] // 2)), y0 + int(rng.integers(10, size[1] // 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour())
    return img.convert(mode)


def transparent_icon(hidden=(0, 255, 0)) -> Image.Image:
    """RGBA icon: a blue square on fully transparent pixels whose hidden
    colour is `hidden` (what dropping alpha would expose)."""
    img = Image.new("RGBA", (64, 64), hidden + (0,))
    ImageDraw.Draw(img).rectangle((16, 16, 47, 47), fill=(0, 0, 255, 255))
    return img


def make_dataset(root: Path) -> dict[str, list[str]]:
    """A folder with good images (JPEG, PNG, transparent PNG, nested, awkward
    names) and bad files (truncated, zero-byte, text named .jpg).

    Returns {"good": [...], "bad": [...]} as paths inside `root`.
    """
    (root / "sub").mkdir(parents=True)
    good = []
    for i in range(4):
        name = f"photo{i}.jpg"
        draw_picture(i).save(root / name, quality=90)
        good.append(name)
    draw_picture(10, size=(90, 90)).save(root / "sub" / "drawing.PNG")
    good.append("sub/drawing.PNG")
    transparent_icon().save(root / "sub" / "icon.png")
    good.append("sub/icon.png")
    draw_picture(11).save(root / AWKWARD_NAME)
    good.append(AWKWARD_NAME)

    jpeg = (root / "photo0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image\n")
    (root / "readme.txt").write_text("not listed: wrong extension\n")
    return {"good": good, "bad": ["truncated.jpg", "empty.png", "notes.jpg"]}


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "images"
    return root, make_dataset(root)


@pytest.fixture(scope="session")
def random_resnet50():
    """ResNet50 without top, average pooling, seeded random weights."""
    import keras

    keras.utils.set_random_seed(1234)
    return keras.applications.ResNet50(weights=None, include_top=False, pooling="avg")


@pytest.fixture(scope="session")
def random_weights_file(tmp_path_factory, random_resnet50) -> Path:
    """A local ResNet50 weights file, as a user would pass with --weights."""
    path = tmp_path_factory.mktemp("weights") / "resnet50_random.weights.h5"
    random_resnet50.save_weights(path)
    return path


def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess: an empty Keras cache, no display, and
    every download sent to a closed local port, so nothing leaves the machine."""
    env = dict(os.environ)
    env.update(
        KERAS_HOME=str(tmp_path / "keras_home"),
        HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
        PYTHONPATH=str(REPO),
    )
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    return env


def run_command(script: str, *args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    """Run one of the repo's commands as a user would."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        cwd=cwd, env=env or offline_env(cwd), capture_output=True, text=True, timeout=600,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, no traceback, exactly one line on stderr holding `fragments`."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- permissions

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)  # loaded in the parent: the child only calls it


def _obey_file_permissions() -> None:
    """Run in the child before exec: drop the two capabilities that let root
    read any file. Root's new program then gets no such capability, so
    chmod 000 stops it as it stops any user: a real denial, not a mock."""
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if _libc().prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@functools.cache
def permission_runner() -> tuple[Callable[[], None] | None, str | None]:
    """(preexec_fn or None, None) if a chmod 000 file is truly unreadable to
    the commands this way; (None, why not) otherwise, to skip honestly."""
    preexec = None
    if os.geteuid() == 0:
        _libc()
        preexec = _obey_file_permissions
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "locked"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            result = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"],
                                    preexec_fn=preexec, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"running as root and can't drop the file-permission override: {error}"
    if result.returncode != 0 and "PermissionError" in result.stderr:
        return preexec, None
    return None, "this process can read chmod 000 files (root with CAP_DAC_OVERRIDE that can't be dropped)"


def run_as_user(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command as a user would (see conftest.run_command), obeying file
    permissions even as root where that can be arranged. Output is decoded
    with surrogateescape so that raw non-UTF-8 bytes show up in asserts
    instead of crashing the test."""
    preexec, _ = permission_runner()
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=offline_env(cwd),
        capture_output=True, encoding="utf-8", errors="surrogateescape", timeout=600, preexec_fn=preexec,
    )


# -- in-process indexing runs (test_incremental, test_index_outputs) ----------

INDEX_SUMMARY = re.compile(r"(\d+) new, (\d+) changed, (\d+) renamed, (\d+) removed, (\d+) unchanged \((\d+) skipped\)")
_EXTRACTORS: dict = {}


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """Model builds of in-process runs (the model itself is built once)."""
    import create_imagenet_features  # here: the repo is on sys.path only once this module has run
    from search_utils import models

    built: list[str] = []

    def cached(spec, weights=None, precision="float32", runtime="tensorflow"):
        built.append(spec.name)
        key = (spec, weights, precision, runtime)
        if key not in _EXTRACTORS:
            _EXTRACTORS[key] = models.load_extractor(spec, weights, precision, runtime)
        return _EXTRACTORS[key]

    monkeypatch.setattr(create_imagenet_features, "load_extractor", cached)
    return built


def index(capsys, *args) -> str:
    """Run the command in process; return its stderr (it must succeed)."""
    import create_imagenet_features

    capsys.readouterr()
    assert create_imagenet_features.main([*map(str, args), "-q"]) == 0
    return capsys.readouterr().err


def counts(stderr: str) -> tuple[int, ...]:
    return tuple(int(n) for n in INDEX_SUMMARY.search(stderr).groups())


def embedded(stderr: str) -> int:
    match = re.search(r"embedded (\d+) in", stderr)
    return int(match.group(1)) if match else 0
