"""Every awkward or broken input of issue 6, made as real files, through the
real commands.

Indexing must skip each bad file with one line naming it and why, and carry
on; searching with it as the query must fail with one line and a non-zero
exit; odd but valid images must be indexed and found again. Most of the
bad files go through one indexing run (a module fixture), whose stderr is
then checked line by line: one subprocess instead of one per file.

docs/RELIABILITY.md lists these cases and the test that proves each.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import (
    assert_one_line_error, draw_picture, permission_runner, run_as_user, transparent_icon,
)
from search_utils import images as images_module
from search_utils.errors import ImageReadError, printable_path
from search_utils.images import find_images, load_image
from search_utils.store import FeatureStore, load_features, save_features

INDEX = "create_imagenet_features.py"
SEARCH = "imagenet_search.py"
EVALUATE = "evaluate.py"
CONVERT = "convert_features.py"
MODEL = "efficientnet_lite0"  # real weights from pip, no download
NON_UTF8_NAME = os.fsdecode(b"latin1-caf\xe9.png")  # a byte that is not UTF-8

# ---------------------------------------------------------------- the files


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: Path, side: int) -> None:
    """A real, complete PNG of side x side black pixels (1 bit each): tiny
    on disk (tens of KB), hundreds of megapixels once decoded."""
    compressor = zlib.compressobj(9)
    rows = (b"\0" + b"\0" * ((side + 7) // 8)) * 1000  # filter byte + one row, 1000 times
    parts = [compressor.compress(rows) for _ in range(side // 1000)]
    parts.append(compressor.compress(rows[: (side % 1000) * len(rows) // 1000]))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                     + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def save_palette_with_transparency(path: Path) -> None:
    img = transparent_icon(hidden=(0, 255, 0)).convert("RGB").convert("P")
    img.save(path, transparency=img.getpixel((0, 0)))  # the hidden green's index is transparent
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info


def save_animated_gif(path: Path) -> None:
    frames = [draw_picture(40 + i, size=(64, 48)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


def sixteen_bit_png(path: Path) -> None:
    ramp = np.linspace(0, 65535, 96 * 64).reshape(64, 96).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # mode I;16
    assert Image.open(path).mode == "I;16"


# Valid but unusual images, and file names that need quoting or escaping:
# each must be indexed and found again.
GOOD_MAKERS: dict[str, Callable[[Path], None]] = {
    "cmyk.jpg": lambda p: draw_picture(1).convert("CMYK").save(p, "JPEG", quality=92),
    "deep16.png": sixteen_bit_png,
    "grey.png": lambda p: draw_picture(2, mode="L").save(p),
    "palette_transparent.png": save_palette_with_transparency,
    "animated.gif": save_animated_gif,
    "huge.jpg": lambda p: draw_picture(3, size=(8000, 8000)).save(p, quality=85),  # 64 megapixels
    "big.png": lambda p: draw_picture(4, size=(4200, 4200), mode="RGBA").save(p, compress_level=1),
    "with space.png": lambda p: draw_picture(5).save(p),
    " leading and trailing space .png": lambda p: draw_picture(6).save(p),
    "comma,separated,name.png": lambda p: draw_picture(7).save(p),
    'say "cheese".png': lambda p: draw_picture(8).save(p),
    "it's.png": lambda p: draw_picture(9).save(p),
    "new\nline.png": lambda p: draw_picture(10).save(p),
    NON_UTF8_NAME: lambda p: draw_picture(11).save(p),
    "sub/nested.png": lambda p: draw_picture(12).save(p),
}
ODD_FORMATS = ["cmyk.jpg", "deep16.png", "grey.png", "palette_transparent.png", "animated.gif",
               "huge.jpg", "big.png"]

# Broken files: name -> (maker, what the one-line message must say).
BAD_MAKERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated.jpg": (lambda p: p.write_bytes(encoded(draw_picture(20), "JPEG")[:1500]), "truncated"),
    "truncated.png": (lambda p: p.write_bytes(encoded(draw_picture(21), "PNG")[:500]), "truncated"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "text.png": (lambda p: p.write_text("this is a text file\n"), "not an image file"),
    "bomb.png": (lambda p: write_bomb_png(p, 20000), "decompression-bomb limit"),
    "broken.jpg": (lambda p: p.symlink_to("gone.jpg"), "broken symbolic link"),
    "loop_a.jpg": (lambda p: p.symlink_to("loop_b.jpg"), "symbolic link loop"),
    "loop_b.jpg": (lambda p: p.symlink_to("loop_a.jpg"), "symbolic link loop"),
    "fifo.png": (lambda p: os.mkfifo(p), "not a regular file"),
    "bad\nname.jpg": (lambda p: p.write_text("not an image either"), "not an image file"),
}
LOCKED = "locked.png"  # chmod 000: only where the commands really can't read it
CLOSED = "closed"  # a subfolder chmod 000, with an image inside: likewise


# ---------------------------------------------------------------- the indexed zoo


@dataclass
class Zoo:
    work: Path  # cwd of the commands; the images are in work/zoo
    good: list[str]  # names inside zoo/
    bad: dict[str, str]  # name inside zoo/ -> reason fragment
    result: subprocess.CompletedProcess
    skip_lines: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        return os.path.join("zoo", name)


def make_zoo(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Write every good and bad file into `folder`; return their names."""
    (folder / "sub").mkdir(parents=True)
    for name, make in GOOD_MAKERS.items():
        make(folder / name)
    (folder / "sub" / "loop").symlink_to("..")  # a folder link back up: must not be walked forever
    bad = {}
    for name, (make, reason) in BAD_MAKERS.items():
        make(folder / name)
        bad[name] = reason
    if permission_runner()[1] is None:  # chmod 000 really stops the commands
        draw_picture(30).save(folder / LOCKED)
        (folder / LOCKED).chmod(0)
        bad[LOCKED] = "permission denied"
        (folder / CLOSED).mkdir()
        draw_picture(31).save(folder / CLOSED / "inside.png")
        (folder / CLOSED).chmod(0)
        bad[CLOSED] = "folder can't be listed (permission denied); its images are not indexed"
    return list(GOOD_MAKERS), bad


def reopen(folder: Path) -> None:
    """Undo make_zoo's chmod 000, so pytest can delete the files."""
    for name, mode in ((LOCKED, 0o644), (CLOSED, 0o755)):
        if (folder / name).exists():
            (folder / name).chmod(mode)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    work = tmp_path_factory.mktemp("zoo_work")
    good, bad = make_zoo(work / "zoo")
    result = run_as_user(INDEX, "--dataset", "zoo", "--output", "features.csv", "--model", MODEL, "--quiet", cwd=work)
    zoo = Zoo(work, good, bad, result)
    zoo.skip_lines = [line for line in result.stderr.splitlines() if line.startswith("skipping ")]
    yield zoo
    reopen(work / "zoo")


# ---------------------------------------------------------------- indexing


def test_indexing_carries_on_past_every_bad_file(zoo):
    result = zoo.result
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    others = [line for line in result.stderr.splitlines() if not line.startswith("skipping ")]
    assert len(others) == 1, result.stderr  # the summary
    assert others[0].startswith(f"indexed {len(zoo.good)} images with {MODEL}")
    assert f"({len(zoo.bad) - (CLOSED in zoo.bad)} skipped)" in others[0]  # files; the folder is named apart


@pytest.mark.parametrize("name", list(BAD_MAKERS) + [LOCKED, CLOSED])
def test_each_bad_file_gets_one_line_naming_it_and_why(zoo, name):
    if name not in zoo.bad:
        pytest.skip(permission_runner()[1])
    shown = printable_path(zoo.path(name))
    lines = [line for line in zoo.skip_lines if line.startswith(f"skipping {shown}: ")]
    assert len(lines) == 1, zoo.result.stderr
    assert zoo.bad[name] in lines[0]


def test_bad_file_names_are_shown_escaped_on_one_line(zoo):
    assert "skipping zoo/bad\\nname.jpg: not an image file Pillow can read" in zoo.skip_lines
    assert len(zoo.skip_lines) == len(zoo.bad)  # a newline in a name didn't split a message


def test_every_good_file_is_indexed_once_with_its_exact_name(zoo):
    store = load_features(str(zoo.work / "features.csv"))
    assert sorted(store.paths) == sorted(zoo.path(name) for name in zoo.good)
    assert store.features.shape == (len(zoo.good), 1280) and np.isfinite(store.features).all()
    assert not any("loop/" in p for p in store.paths)  # the folder link loop wasn't followed


def test_awkward_names_survive_the_csv_byte_for_byte(zoo):
    raw = (zoo.work / "features.csv").read_bytes()
    assert b"zoo/latin1-caf\xe9.png," in raw  # the original byte, not an escape
    assert b'"zoo/new\nline.png",' in raw and b'"zoo/say ""cheese"".png",' in raw


# ---------------------------------------------------------------- searching


# Spaces, commas and double quotes in one name: tests/test_cli.py::test_awkward_file_names_survive_to_the_results
@pytest.mark.parametrize("name", ["new\nline.png", NON_UTF8_NAME, " leading and trailing space .png", "it's.png"])
def test_awkward_names_are_found_again_as_stored_queries(zoo, name):
    result = run_as_user(SEARCH, "--query", zoo.path(name), "--featuresPath", "features.csv", "--json", "--no-plot",
                 "-n", "3", cwd=zoo.work)
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)["results"][0]
    assert top["path"] == zoo.path(name) and top["distance"] == 0.0
    assert "embedded" not in result.stderr  # its stored row was reused: the name matched exactly


def test_results_table_and_picture_show_awkward_names_on_one_line(zoo):
    result = run_as_user(SEARCH, "--query", zoo.path("new\nline.png"), "--featuresPath", "features.csv",
                 "-n", str(len(zoo.good)), "--save", "picture.png", cwd=zoo.work)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + len(zoo.good)  # header + one line per result
    assert lines[1].split(None, 2)[2] == "zoo/new\\nline.png"
    assert any(line.endswith("zoo/latin1-caf\\xe9.png") for line in lines)
    assert (zoo.work / "picture.png").stat().st_size > 0


@pytest.fixture(scope="module")
def search_in_process():
    """imagenet_search's main, called in this process with the model built
    once: a dozen outside queries in seconds instead of minutes."""
    import imagenet_search
    from search_utils import cli
    from search_utils.models import load_extractor

    cached = functools.cache(load_extractor)
    previous_sigterm = signal.getsignal(signal.SIGTERM)  # cli.run installs its own
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imagenet_search, "load_extractor", lambda *args: cached(*args))
        yield lambda argv: cli.run(imagenet_search.main, argv)
    signal.signal(signal.SIGTERM, previous_sigterm)


@pytest.mark.parametrize("name", ODD_FORMATS + ["new\nline.png", NON_UTF8_NAME])
def test_odd_images_as_outside_queries_find_themselves(zoo, name, search_in_process, capsys, tmp_path):
    query = tmp_path / f"outside {name}"
    shutil.copy(zoo.work / "zoo" / name, query)
    code = search_in_process(["--query", str(query), "--featuresPath", str(zoo.work / "features.csv"),
                              "--json", "--no-plot", "--metric", "cosine", "-n", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"embedded the query with {MODEL}" in err
    top = json.loads(out)["results"][0]
    assert top["path"] == os.path.join(zoo.work, zoo.path(name)) and top["distance"] < 1e-4  # opens from here


def test_huge_jpeg_query_through_the_real_command(zoo, tmp_path):
    query = tmp_path / "huge copy.jpg"
    shutil.copy(zoo.work / "zoo" / "huge.jpg", query)
    result = run_as_user(SEARCH, "--query", query, "--featuresPath", zoo.work / "features.csv", "--json",
                 "--no-plot", "--metric", "cosine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)["results"][0]
    assert top["path"] == str(zoo.work / "zoo" / "huge.jpg") and top["distance"] < 1e-4  # opens from here


@pytest.mark.parametrize("name", list(BAD_MAKERS) + [LOCKED, "missing.png"])
def test_each_bad_file_as_a_query_is_a_one_line_error(zoo, name):
    if name not in zoo.bad and name != "missing.png":
        pytest.skip(permission_runner()[1])
    result = run_as_user(SEARCH, "--query", zoo.path(name), "--featuresPath", "features.csv", cwd=zoo.work)
    reason = zoo.bad.get(name, "file not found")
    assert result.returncode == 1
    assert_one_line_error(result, printable_path(zoo.path(name)), reason)
    assert result.stdout == ""


def test_a_folder_as_the_query_is_a_one_line_error(zoo):
    result = run_as_user(SEARCH, "--query", "zoo/sub", "--featuresPath", "features.csv", cwd=zoo.work)
    assert_one_line_error(result, "zoo/sub: is a folder, not an image file")


# ---------------------------------------------------------------- datasets


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing", "dataset folder not found"),
        (lambda d: _folder(d / "empty"), "no image files"),
        (lambda d: _folder(d / "texts", {"a.txt": "x", "b.md": "y"}), "no image files"),
    ],
)
def test_dataset_that_is_missing_or_holds_no_images(tmp_path, make, fragment):
    result = run_as_user(INDEX, "--dataset", make(tmp_path), "--output", "f.csv", "--model", MODEL, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "f.csv").exists()


def _folder(path: Path, files: dict[str, str] | None = None) -> Path:
    path.mkdir()
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


# ---------------------------------------------------------------- features files


@pytest.fixture
def features_files(tmp_path) -> Path:
    """A valid features file (efficientnet_lite0-sized, with metadata) and
    damaged copies of it, written without any model."""
    rng = np.random.default_rng(6)
    paths = ["imgs/a/0.png", "imgs/a/1.png", "imgs/b/new\nline.png", "imgs/b/3.png"]
    meta = {"model": MODEL, "weights": "packaged", "base_dir": str(tmp_path)}
    save_features(str(tmp_path / "good.csv"), FeatureStore(paths, rng.random((4, 1280)).astype(np.float32), meta))
    text = (tmp_path / "good.csv").read_text()
    lines = text.splitlines(keepends=True)  # the quoted newline splits row 3 over two lines
    meta_text = (tmp_path / "good.csv.meta.json").read_text()

    def variant(name: str, body: str, with_meta: bool = True) -> None:
        (tmp_path / name).write_text(body)
        if with_meta:
            (tmp_path / f"{name}.meta.json").write_text(meta_text)

    variant("cut_mid_row.csv", text[: len(text) - len(lines[-1]) // 2])
    variant("cut_in_quotes.csv", "".join(lines[:2]) + lines[2][:-1])  # ends inside "imgs/b/new
    variant("cut_at_row_end.csv", "".join(lines[:2]))
    first = lines[0].rstrip("\n")
    variant("extra_column.csv", first + ",0.5\n" + "".join(lines[1:]))
    variant("missing_column.csv", first.rsplit(",", 1)[0] + "\n" + "".join(lines[1:]))
    variant("not_a_number.csv", first.rsplit(",", 1)[0] + ",zero\n" + "".join(lines[1:]))
    variant("zero_bytes.csv", "")
    variant("other_model.csv", text, with_meta=False)  # 1280 values, no metadata: taken for resnet50's
    variant("unknown_model.csv", text, with_meta=False)
    (tmp_path / "unknown_model.csv.meta.json").write_text(meta_text.replace(MODEL, "alexnet"))
    return tmp_path


FEATURE_FILE_FAULTS = [
    ("cut_mid_row.csv", "row 4 (imgs/b/3.png) has"),
    ("cut_in_quotes.csv", "row 3 is cut off or badly quoted"),
    ("cut_at_row_end.csv", "has 2 rows but its metadata says 4"),
    ("extra_column.csv", "row 1 (imgs/a/0.png) has 1281 values, expected 1280"),
    ("missing_column.csv", "row 1 (imgs/a/0.png) has 1279 values, expected 1280"),
    ("not_a_number.csv", "row 1, column 1281 is not a number: 'zero'"),
    ("zero_bytes.csv", "features file is empty"),
]


# Every fault through search; the truncations and a wrong column count also
# through evaluate.py and convert_features.py (the same loader behind them).
COMMAND_FAULTS = ([(SEARCH, name, fragment) for name, fragment in FEATURE_FILE_FAULTS]
                  + [(command, name, fragment) for command in (EVALUATE, CONVERT)
                     for name, fragment in FEATURE_FILE_FAULTS[:4]])


@pytest.mark.parametrize("command, name, fragment", COMMAND_FAULTS)
def test_damaged_features_files_are_one_line_errors_for_every_command(features_files, command, name, fragment):
    args = {SEARCH: ["--query", "imgs/a/0.png", "--featuresPath", name],
            EVALUATE: [name],
            CONVERT: [name, "out.h5"]}[command]
    result = run_as_user(command, *args, cwd=features_files)
    assert result.returncode == 1
    assert_one_line_error(result, name, fragment)
    assert result.stdout == "" and not (features_files / "out.h5").exists()


@pytest.mark.parametrize(
    "name, extra, fragments",
    [
        ("other_model.csv", [], ["1280 values per image but the post's resnet50 (no metadata file) gives 2048"]),
        ("good.csv", ["--model", "resnet50"], [f"made with {MODEL}, not resnet50"]),
        ("unknown_model.csv", [], ["unknown model 'alexnet'"]),
    ],
)
def test_features_from_another_model_are_refused_by_search(features_files, name, extra, fragments):
    result = run_as_user(SEARCH, "--query", "imgs/a/0.png", "--featuresPath", name, *extra, cwd=features_files)
    assert result.returncode == 1
    assert_one_line_error(result, *fragments)


def write_like_the_posts_script(path: Path, image_paths: list[str], dim: int = 2048) -> np.ndarray:
    """A features file exactly as the post's create_imagenet_features.py
    wrote it: `output.write("%s,%s\\n" % (imagePath, ",".join(features)))`,
    with str() of each float32 value, no header, no metadata."""
    rows = np.random.default_rng(8).gamma(0.5, 1.0, (len(image_paths), dim)).astype(np.float32)
    with open(path, "w") as output:
        for image_path, features in zip(image_paths, rows):
            output.write("%s,%s\n" % (image_path, ",".join(str(f) for f in features)))
    return rows


def test_a_file_from_the_posts_script_is_taken_for_resnet50_with_one_note(tmp_path):
    paths = [f"dataset/{i}.jpg" for i in range(4)]
    rows = write_like_the_posts_script(tmp_path / "index.csv", paths)
    (tmp_path / "dataset").mkdir()
    draw_picture(2, size=(32, 32)).save(tmp_path / "dataset/2.jpg")  # search takes a query that exists
    result = run_as_user(SEARCH, "--query", "dataset/2.jpg", "--featuresPath", "index.csv", "--json", "--no-plot",
                 "-n", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("note:")] == [
        "note: index.csv has no metadata file; took it for the post's resnet50 features"]  # said once
    assert json.loads(result.stdout)["results"][0] == {"rank": 1, "distance": 0.0, "path": "dataset/2.jpg",
                                                        "copies": []}
    assert not (tmp_path / "index.csv.meta.json").exists()  # searching doesn't write beside it
    converted = run_as_user(CONVERT, "index.csv", "index.h5", cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    assert np.array_equal(load_features(str(tmp_path / "index.h5")).features, rows)


# ---------------------------------------------------------------- decoding, in process


def test_a_real_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch, recwarn):
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original_load(self))
    for side in (20000, 10000):  # over twice Pillow's limit (an error), and between once and twice (a warning)
        path = tmp_path / f"bomb{side}.png"
        write_bomb_png(path, side)
        assert path.stat().st_size < 100_000
        with pytest.raises(ImageReadError, match="decompression-bomb limit"):
            load_image(str(path))
    assert decoded == []  # not one pixel decoded
    assert len(recwarn) == 0  # the warning case printed nothing either


def _full_size_reference(path: Path, size=(224, 224)) -> np.ndarray:
    """What decoding at full size (the post's way) gives, for comparison."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(images_module.to_rgb(img).resize(size, Image.Resampling.NEAREST))


@pytest.mark.parametrize("name, largest_decode", [("huge.jpg", 1000 * 1000), ("big.png", 4200 * 4200)])
def test_very_large_images_are_decoded_reduced_and_still_right(tmp_path, monkeypatch, name, largest_decode):
    path = tmp_path / name
    GOOD_MAKERS[name](path)
    decoded, converted = [], []
    original_load, original_to_rgb = ImageFile.ImageFile.load, images_module.to_rgb
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original_load(self))
    monkeypatch.setattr(images_module, "to_rgb", lambda img, *a: converted.append(img.size) or original_to_rgb(img, *a))
    ours = load_image(str(path))
    monkeypatch.undo()
    # JPEG: libjpeg decodes at 1/8 scale, 8000 -> 1000 pixels a side; PNG can't
    # decode reduced, but is reduced before any conversion copies it.
    assert max(w * h for w, h in decoded) <= largest_decode
    assert converted == [(1050, 1050)] if name == "big.png" else converted == [(1000, 1000)]
    difference = np.abs(ours.astype(int) - _full_size_reference(path).astype(int))
    assert difference.mean() < 2 and np.mean(difference > 32) < 0.01, (difference.mean(), np.mean(difference > 32))


def test_images_up_to_the_large_limit_are_decoded_exactly_as_the_post(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "LARGE_IMAGE_PIXELS", 1200 * 1000)
    path = tmp_path / "edge.jpg"
    draw_picture(13, size=(1200, 1000)).save(path)
    assert images_module.reduce_large(Image.open(path), (224, 224)).size == (1200, 1000)
    assert np.array_equal(load_image(str(path)), _full_size_reference(path))
    monkeypatch.setattr(images_module, "LARGE_IMAGE_PIXELS", 1200 * 1000 - 1)
    assert images_module.reduce_large(Image.open(path), (100, 100)).size == (600, 500)  # JPEG draft 1/2


@pytest.mark.parametrize("mode", ["P", "I;16", "1", "LA"])
def test_reducing_keeps_every_mode_meaningful(mode, monkeypatch):
    monkeypatch.setattr(images_module, "LARGE_IMAGE_PIXELS", 1000)
    if mode == "I;16":
        img = Image.fromarray(np.full((400, 600), 40000, np.uint16))
    else:
        img = Image.new("RGB", (600, 400), (200, 30, 30)).convert(mode)
    reduced = images_module.reduce_large(img, (10, 10))
    assert reduced.mode == img.mode and reduced.size == (60, 40)
    assert np.array_equal(np.asarray(images_module.to_rgb(reduced))[0, 0], np.asarray(images_module.to_rgb(img))[0, 0])


@pytest.mark.parametrize("name, reason", [(n, r) for n, (_, r) in BAD_MAKERS.items()])
def test_load_image_says_why_for_each_bad_file(tmp_path, name, reason):
    loops = {"loop_a.jpg": ["loop_a.jpg", "loop_b.jpg"], "loop_b.jpg": ["loop_a.jpg", "loop_b.jpg"]}
    for made in loops.get(name, [name]):
        BAD_MAKERS[made][0](tmp_path / made)
    with pytest.raises(ImageReadError, match=reason.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_image(str(tmp_path / name))
    assert "\n" not in str(caught.value) and caught.value.path == str(tmp_path / name)


def test_find_images_survives_link_loops_and_lists_awkward_names(tmp_path):
    make_zoo(tmp_path / "zoo")
    reopen(tmp_path / "zoo")
    found = [os.path.relpath(p, tmp_path / "zoo") for p in find_images(str(tmp_path / "zoo"))]
    in_closed = [os.path.join(CLOSED, "inside.png")] if (tmp_path / "zoo" / CLOSED).exists() else []
    locked = [LOCKED] if (tmp_path / "zoo" / LOCKED).exists() else []
    assert sorted(found) == sorted(list(GOOD_MAKERS) + list(BAD_MAKERS) + in_closed + locked)


@pytest.mark.parametrize(
    "text, message",
    [
        # the edited row, not row 2
        ("a.png,1,2,3,4\nb.png,1,2,3\nc.png,1,2,3\n", "row 1 (a.png) has 4 values, expected 3"),
        ("a.png,1,2,3\nb.png,1,2,3\nc.png,1,2\n", "row 3 (c.png) has 2 values, expected 3"),
        ('a.png,1,2\n"b\nc.png,1', "row 2 is cut off or badly quoted"),
        ("a.png,1,,3\n", "row 1, column 3 is empty"),
        ("a.png,1,nan,3\n", "row 1, column 3 is not a finite number (nan)"),
        ("a.png,1,2,-inf\n", "row 1, column 4 is not a finite number (-inf)"),
    ],
)
def test_csv_faults_name_the_row_that_is_wrong(tmp_path, text, message):
    (tmp_path / "f.csv").write_text(text)
    from search_utils.errors import FeaturesFileError

    with pytest.raises(FeaturesFileError) as caught:
        load_features(str(tmp_path / "f.csv"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "failure, reason",
    [(struct.error("unpack requires a buffer of 4 bytes"), "unreadable image (unpack requires"),
     (zlib.error("Error -3 while decompressing data"), "unreadable image (Error -3"),
     (MemoryError(), "not enough memory to decode it"),
     (IndexError("list index out of range"), "unreadable image (list index")],
)
def test_any_decoder_failure_costs_one_file_not_the_run(tmp_path, monkeypatch, failure, reason):
    """Pillow's decoders fail in more ways than OSError on hostile files; a
    decoder that raises anything is simulated here, since no small real file
    is known to trigger each of these."""
    draw_picture(1).save(tmp_path / "ok.png")

    def fail(self):
        raise failure

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(ImageReadError, match=reason.replace("(", r"\(")):
        load_image(str(tmp_path / "ok.png"))


@pytest.mark.parametrize("command, make", [
    (CONVERT, lambda p: draw_picture(5).save(p, format="PNG")),
    (EVALUATE, lambda p: p.write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 16)),
], ids=["picture-to-convert", "database-to-evaluate"])
def test_a_file_that_is_not_a_features_file_is_one_short_line(tmp_path, command, make):
    """Not a "row 4 (IHDR\\x00...) has 1 values, expected 0" of 500
    characters of escaped binary: what the file is, in one short line."""
    make(tmp_path / "thing.bin")
    args = ["thing.bin", "out.h5"] if command == CONVERT else ["thing.bin"]
    result = run_as_user(command, *args, cwd=tmp_path)
    assert_one_line_error(result, "thing.bin is not a features file (binary data, neither the CSV nor the HDF5 format)")
    assert len(result.stderr) < 150 and not (tmp_path / "out.h5").exists()
