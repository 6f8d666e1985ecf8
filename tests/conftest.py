"""Shared fixtures: small real image folders, a random-weights file, and a
helper that runs the real commands in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
