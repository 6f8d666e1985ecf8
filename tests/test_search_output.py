"""What imagenet_search.py writes: the results picture (where, whether, how
it fails) and result paths a user can open from wherever the search runs.
Real files, real permissions, the real command in a subprocess."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    REPO,
    assert_one_line_error,
    draw_picture,
    offline_env,
    permission_runner,
    run_as_user,
    run_command,
)
from PIL import Image

from search_utils import plot
from search_utils.errors import PictureError

INDEX = "create_imagenet_features.py"
SEARCH = "imagenet_search.py"
IMAGES = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """`imgs/` (six pictures and a byte copy of a.png) indexed from this
    folder into f.csv, so the stored paths are relative to it."""
    work = tmp_path_factory.mktemp("work")
    (work / "imgs").mkdir()
    for seed, name in enumerate(IMAGES):
        draw_picture(40 + seed).save(work / "imgs" / name)
    shutil.copy(work / "imgs" / "a.png", work / "imgs" / "a_copy.png")
    result = run_command(INDEX, "--dataset", "imgs", "--output", "f.csv", "--model", "efficientnet_lite0", "-q",
                         cwd=work)
    assert result.returncode == 0, result.stderr
    return work


def search(cwd, *args, query=None, features=None, env=None):
    """The search command with a stored query (no model is built)."""
    return run_command(SEARCH, "--query", query or "imgs/b.png", "--featuresPath", features or "f.csv", *args,
                       cwd=cwd, env=env)


def reused(features="f.csv") -> str:
    """The line that says a stored query's features were reused."""
    return f"reused the query's stored features: it is indexed in {features}"


def needs_permissions():
    _, why_not = permission_runner()
    if why_not:
        pytest.skip(why_not)


# ------------------------------------------------ a picture that can't be written


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("missing/r.png", "folder missing does not exist"),
        ("notes.txt/r.png", "notes.txt is a file, not a folder"),
        ("a" * 252 + ".png", "its name is too long for the file system (256 bytes)"),  # 255 is the limit
    ],
)
def test_unwritable_picture_is_refused_before_the_search(work, target, fragment):
    (work / "notes.txt").write_text("a file where a folder should be")
    # The features file doesn't exist: only a check made before loading it can speak.
    result = search(work, "--save", target, features="no such features.csv")
    assert_one_line_error(result, fragment)
    assert result.returncode == 1 and result.stdout == ""


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("", "argument --save: the picture's file name is empty"),
        ("name.xyz", "argument --save: name.xyz: matplotlib cannot write .xyz pictures (it can write: "),
        ("out/", "argument --save: out/ names a folder, not a file"),
        # An existing folder is as much a wrong --save as a name ending in a slash (it was exit 1).
        ("imgs", "argument --save: imgs is a folder; name a file in it, e.g. imgs/search_results.png"),
        ("taken", "argument --save: taken.png (.png appended: the name has no extension) is a folder; name a file"),
    ],
)
def test_a_picture_name_that_can_never_work_is_a_usage_error(work, target, fragment):
    (work / "taken.png").mkdir(exist_ok=True)
    result = search(work, "--save", target, features="no such features.csv")
    assert_one_line_error(result, fragment)
    assert result.returncode == 2 and result.stdout == ""


def test_read_only_folder_is_refused_before_the_search(work, tmp_path):
    needs_permissions()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = run_as_user(SEARCH, "--query", "imgs/b.png", "--featuresPath", "no such features.csv",
                         "--save", locked / "r.png", cwd=work)
    assert_one_line_error(result, f"cannot write the picture {locked / 'r.png'} in folder {locked}: permission denied")
    assert os.listdir(locked) == []


def test_read_only_picture_is_not_replaced(work, tmp_path):
    needs_permissions()
    old = tmp_path / "old.png"
    draw_picture(1).save(old)
    before = old.read_bytes()
    old.chmod(0o444)
    result = run_as_user(SEARCH, "--query", "imgs/b.png", "--featuresPath", "f.csv", "--save", old, cwd=work)
    assert_one_line_error(result, f"cannot write the picture {old}: the file is read-only")
    assert old.read_bytes() == before


def test_a_failing_write_is_one_line_and_keeps_the_earlier_picture(work, tmp_path):
    """A write that fails part-way (as on a full disk): here the file size
    limit (RLIMIT_FSIZE) makes the real write fail with EFBIG."""
    old = tmp_path / "old.png"
    draw_picture(2, size=(40, 40)).save(old)
    before = old.read_bytes()
    limit = 20_000  # the results picture is several times larger

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail instead

    result = subprocess.run(
        [sys.executable, str(REPO / SEARCH), "--query", "imgs/b.png", "--featuresPath", "f.csv", "--save", str(old)],
        cwd=work, env=offline_env(work), capture_output=True, text=True, timeout=600, preexec_fn=small_files,
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [  # the search itself was done, then the picture failed
        reused(),
        f"{SEARCH}: error: cannot write the picture {old}: file too large; an earlier file there is as it was"]
    assert result.stdout.splitlines()[1].split()[2] == "imgs/b.png"
    assert old.read_bytes() == before
    assert os.listdir(tmp_path) == ["old.png"]  # no temporary file left


def test_headless_search_from_a_read_only_folder_says_what_to_do(work, tmp_path):
    needs_permissions()
    here = tmp_path / "read-only"
    here.mkdir()
    here.chmod(0o555)
    args = ["--query", work / "imgs" / "b.png", "--featuresPath", work / "no such features.csv"]
    result = run_as_user(SEARCH, *args, cwd=here)
    assert_one_line_error(result, "cannot write the picture search_results.png in the current folder: permission "
                                  "denied; there is no display to show it, so pass --save PATH", "or --no-plot")
    args[-1] = work / "f.csv"
    assert run_as_user(SEARCH, *args, "--no-plot", cwd=here).returncode == 0


def test_saving_over_the_query_is_refused(work):
    before = (work / "imgs" / "b.png").read_bytes()
    result = search(work, "--save", "imgs/b.png")
    assert_one_line_error(result, "cannot save the picture to imgs/b.png: it is the query image")
    assert (work / "imgs" / "b.png").read_bytes() == before


def test_save_and_no_plot_together_are_refused(work):
    result = search(work, "--save", "x.png", "--no-plot")
    assert_one_line_error(result, "argument --no-plot: not allowed with argument --save")
    assert result.returncode == 2


# ------------------------------------------------ where the picture goes


def test_a_name_without_extension_gets_png_and_the_message_says_so(work, tmp_path):
    result = search(work, "--save", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [reused(), f"saved the results picture to {tmp_path / 'r.png'} "
                                                    f"(.png appended: --save had no extension)"]
    assert os.listdir(tmp_path) == ["r.png"]
    assert Image.open(tmp_path / "r.png").format == "PNG"


def test_saving_replaces_an_earlier_picture_whole(work, tmp_path):
    picture = tmp_path / "p.jpg"
    picture.write_bytes(b"an earlier picture")
    picture.chmod(0o640)
    result = search(work, "--save", picture, "-n", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [reused(), f"saved the results picture to {picture}"]
    assert Image.open(picture).format == "JPEG"
    assert Image.open(picture).size == plot.figure_size_pixels(2)
    assert picture.stat().st_mode & 0o777 == 0o640  # kept its permissions
    assert os.listdir(tmp_path) == ["p.jpg"]  # no temporary file left


def test_a_symlinked_picture_is_written_through(work, tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "real" / "picture.png")
    result = search(work, "--save", link)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and Image.open(tmp_path / "real" / "picture.png").format == "PNG"


@pytest.mark.parametrize("name", ["new\nline.png", os.fsdecode(b"caf\xe9.png")])
def test_awkward_picture_names_are_written_and_named_on_one_line(work, tmp_path, name):
    result = run_as_user(SEARCH, "--query", "imgs/b.png", "--featuresPath", "f.csv", "--save", tmp_path / name,
                         cwd=work)
    assert result.returncode == 0, result.stderr
    shown = name.replace("\n", "\\n").replace("\udce9", "\\xe9")
    assert result.stderr.splitlines() == [reused(), f"saved the results picture to {tmp_path}/{shown}"]
    assert Image.open(tmp_path / name).format == "PNG"


def test_json_writes_no_picture_unless_asked(work, tmp_path):
    result = search(tmp_path, "--json", features=work / "f.csv", query=work / "imgs" / "b.png")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["distance"] == 0.0
    assert result.stderr.splitlines() == [reused(work / "f.csv")] and os.listdir(tmp_path) == []
    saved = search(tmp_path, "--json", "--save", "j.png", features=work / "f.csv", query=work / "imgs" / "b.png")
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout)["results"][0]["distance"] == 0.0
    assert os.listdir(tmp_path) == ["j.png"]


def test_a_display_that_cant_be_opened_saves_the_picture_instead(work, tmp_path):
    env = offline_env(tmp_path)
    env["DISPLAY"] = ":4242"  # no X server there
    result = search(tmp_path, features=work / "f.csv", query=work / "imgs" / "b.png", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [reused(work / "f.csv"),  # no "cannot be shown" warning
                                          "saved the results picture to search_results.png"]
    assert Image.open(tmp_path / "search_results.png").size == plot.figure_size_pixels(5)


def test_every_format_matplotlib_offers_is_written_or_refused_up_front(tmp_path):
    """The --save check and the real save agree: a format the check accepts
    is written; one it refuses (pgf without TeX) fails before any work."""
    figure = plot.results_figure(str(tmp_path / "missing.png"), [])
    for picture_format in sorted(figure.canvas.get_supported_filetypes()):
        name = str(tmp_path / f"r.{picture_format}")
        try:
            plot.check_picture_name(name)
        except PictureError as error:
            assert "cannot write .pgf pictures here" in str(error) and picture_format == "pgf"
            continue
        plot.save_figure(figure, plot.picture_file(name))
        assert os.path.getsize(name) > 0, picture_format
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ------------------------------------------------ how many results


def test_more_results_than_images_says_so(work):
    result = search(work, "-n", "50", "--no-plot")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 + len(IMAGES)  # a.png and its copy are one result
    assert result.stderr.splitlines() == [reused(), "note: 6 results, fewer than the 50 asked for: f.csv holds 7 "
                                                    "images (copies of one image count once)"]


def test_the_picture_shows_at_most_a_readable_number_of_results(tmp_path):
    rows = np.random.default_rng(0).random((70, 2048)).astype(np.float32)  # no metadata: the post's resnet50
    (tmp_path / "many.csv").write_text("".join(f"p{i}.png," + ",".join(map(str, r)) + "\n" for i, r in enumerate(rows)))
    draw_picture(0, size=(32, 32)).save(tmp_path / "p0.png")  # the query must exist
    result = run_command(SEARCH, "--query", "p0.png", "--featuresPath", "many.csv", "-n", "70", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 71
    assert f"note: the picture shows the first {plot.MOST_RESULTS_SHOWN} of the 70 results" in result.stderr
    assert Image.open(tmp_path / "search_results.png").size == plot.figure_size_pixels(plot.MOST_RESULTS_SHOWN)


# ------------------------------------------------ result paths from another folder


def printed_paths(result) -> list[str]:
    return [line.split(None, 2)[2] for line in result.stdout.splitlines()[1:]]


def json_paths(result) -> list[str]:
    hits = json.loads(result.stdout)["results"]
    return [h["path"] for h in hits] + [copy for h in hits for copy in h["copies"]]


def assert_open_from(cwd, paths):
    for path in paths:
        with Image.open(cwd / path) as image:  # cwd / an absolute path is that path
            image.load()


def test_from_the_indexing_folder_paths_are_printed_as_stored(work):
    result = search(work, "--json", query="imgs/a.png")
    assert result.returncode == 0, result.stderr
    assert json_paths(result)[0] == "imgs/a.png" and "imgs/a_copy.png" in json_paths(result)
    assert all(p.startswith("imgs/") for p in json_paths(result))


def test_from_an_unrelated_folder_paths_are_absolute_and_open(work, tmp_path):
    args = ["--query", work / "imgs" / "a.png", "--featuresPath", work / "f.csv", "-n", "3"]
    table = run_command(SEARCH, *args, "--no-plot", cwd=tmp_path)
    answer = run_command(SEARCH, *args, "--json", cwd=tmp_path)
    assert table.returncode == 0 and answer.returncode == 0, table.stderr + answer.stderr
    assert printed_paths(table)[0] == f"{work / 'imgs' / 'a.png'}  (+1 copy: {work / 'imgs' / 'a_copy.png'})"
    paths = json_paths(answer)
    assert paths[0] == str(work / "imgs" / "a.png") and all(os.path.isabs(p) for p in paths)
    assert_open_from(tmp_path, paths)


def test_from_a_folder_above_paths_are_relative_to_it_and_open(work):
    above = work.parent
    result = run_command(SEARCH, "--query", f"{work.name}/imgs/b.png", "--featuresPath", f"{work.name}/f.csv",
                         "--json", "-n", "3", cwd=above)
    assert result.returncode == 0, result.stderr
    paths = json_paths(result)
    assert paths[0] == f"{work.name}/imgs/b.png" and all(p.startswith(f"{work.name}/imgs/") for p in paths)
    assert_open_from(above, paths)


def test_a_same_named_file_in_the_current_folder_is_not_taken_for_the_result(work, tmp_path):
    (tmp_path / "imgs").mkdir()
    draw_picture(99).save(tmp_path / "imgs" / "b.png")  # imgs/b.png here, but not the indexed one
    result = run_command(SEARCH, "--query", work / "imgs" / "b.png", "--featuresPath", work / "f.csv", "--json",
                         "-n", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json_paths(result) == [str(work / "imgs" / "b.png")]


def test_the_picture_loads_the_results_from_another_folder(work, tmp_path):
    """The picture shows file names only: made from the indexing folder and
    from elsewhere, the two must be the same pixels (not "cannot show")."""
    args = ["--query", work / "imgs" / "b.png", "--featuresPath", work / "f.csv", "-n", "3"]
    here = run_command(SEARCH, *args, "--save", tmp_path / "here.png", cwd=work)
    elsewhere = run_command(SEARCH, *args, "--save", tmp_path / "elsewhere.png", cwd=tmp_path)
    assert here.returncode == 0 and elsewhere.returncode == 0, here.stderr + elsewhere.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "here.png")),
                          np.asarray(Image.open(tmp_path / "elsewhere.png")))
