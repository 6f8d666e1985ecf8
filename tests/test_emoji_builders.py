"""Fast tests (no npm, no network) of tools/build_emoji_benchmark.py and the
build_emoji_testset.py helpers it reuses, on tiny fake emoji-datasource
packages built in tmp_path."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import build_emoji_benchmark as bench  # noqa: E402

testset = bench.testset
ALL = ("google", "twitter", "apple", "facebook")

FAKE_README = """# emoji-data

## Image Sources

| Image Set | Source Version | Supported Emoji | Missing Images |
| --------- | -------------- | --------------- | -------------- |
| Apple     | macOS 15.5     | Emoji 16.0      | 3              |
| Google    | Noto v2.048    | Emoji 16.0      | 0              |
| Twitter   | Twemoji 16.0.1 | Emoji 16.0      | 0              |
| Facebook  | v9             | Emoji 15.0      | 141            |

## Licence

* Apple images, Copyright Apple Inc., are not licensed for commercial usage.
* Android/Google/Noto images, are available under the Apache License 2.0.
* Twitter images are available under the Creative Commons Attribution 4.0 license.
* Facebook images, Facebook, Inc., have no clear licensing.
"""


def entry(unified, short_name, category, sort_order, vendors, **extra):
    """One emoji.json entry drawn by `vendors`."""
    e = {
        "name": short_name.upper(),
        "unified": unified,
        "image": unified.lower() + ".png",
        "short_name": short_name,
        "short_names": [short_name],
        "category": category,
        "subcategory": "x",
        "sort_order": sort_order,
    }
    e.update({f"has_img_{v}": v in vendors for v in ALL})
    e.update(extra)
    return e


# sort_order runs against the order of `unified`, so sorting by label is visible.
ENTRIES = [
    entry("1F600", "grinning", "Smileys & Emotion", 9, ALL,
          skin_variations={"1F3FB": {"unified": "1F600-1F3FB", "image": "1f600-1f3fb.png"}}),
    entry("1F44B-1F3FB", "wave_light", "People & Body", 8, ALL),       # skin tone: skipped
    entry("1F9B0", "red_hair", "Component", 7, ALL),                   # Component: skipped
    entry("1F3FB", "skin-tone-2", "Component", 6, ALL),                # Component + tone: skipped
    entry("1FAE9", "only_google", "Smileys & Emotion", 5, ("google",)),  # one vendor: skipped
    entry("2764-FE0F", "heart", "Smileys & Emotion", 4, ("google", "twitter", "facebook")),
    entry("1F1EB-1F1F7", "flag-fr", "Flags", 3, ("google", "twitter")),  # Flags kept
    entry("1F98A", "fox", "Animals & Nature", 2, ("google", "apple")),
    entry("0023-FE0F-20E3", "hash", "Symbols", 1, ("google", "twitter", "apple")),
]


def png_bytes(vendor: str, unified: str) -> bytes:
    """Distinct fake image content (the builder copies bytes, never decodes)."""
    return b"\x89PNG\r\n\x1a\n" + f"{vendor}:{unified}".encode()


def make_package(base: Path, vendor: str, entries=ENTRIES, extra_images=()) -> Path:
    """A fake unpacked emoji-datasource-<vendor> package; returns its root."""
    root = base / vendor / "package"
    img = root / "img" / vendor / "64"
    img.mkdir(parents=True)
    (root / "emoji.json").write_text(json.dumps(entries), encoding="utf-8")
    (root / "README.md").write_text(FAKE_README, encoding="utf-8")
    (root / "LICENSE").write_text("The MIT License (MIT)\n", encoding="utf-8")
    for e in entries:
        if e[f"has_img_{vendor}"]:
            (img / e["image"]).write_bytes(png_bytes(vendor, e["unified"]))
    for unified in extra_images:
        (img / (unified.lower() + ".png")).write_bytes(png_bytes(vendor, unified))
    return root


def make_roots(base: Path, vendors=ALL, **kw) -> dict[str, Path]:
    return {v: make_package(base, v, **kw) for v in vendors}


EXPECTED_LABELS = """\
path,label,vendor,short_name,category
apple/0023-FE0F-20E3.png,0023-FE0F-20E3,apple,hash,Symbols
google/0023-FE0F-20E3.png,0023-FE0F-20E3,google,hash,Symbols
twitter/0023-FE0F-20E3.png,0023-FE0F-20E3,twitter,hash,Symbols
google/1F1EB-1F1F7.png,1F1EB-1F1F7,google,flag-fr,Flags
twitter/1F1EB-1F1F7.png,1F1EB-1F1F7,twitter,flag-fr,Flags
apple/1F600.png,1F600,apple,grinning,Smileys & Emotion
facebook/1F600.png,1F600,facebook,grinning,Smileys & Emotion
google/1F600.png,1F600,google,grinning,Smileys & Emotion
twitter/1F600.png,1F600,twitter,grinning,Smileys & Emotion
apple/1F98A.png,1F98A,apple,fox,Animals & Nature
google/1F98A.png,1F98A,google,fox,Animals & Nature
facebook/2764-FE0F.png,2764-FE0F,facebook,heart,Smileys & Emotion
google/2764-FE0F.png,2764-FE0F,google,heart,Smileys & Emotion
twitter/2764-FE0F.png,2764-FE0F,twitter,heart,Smileys & Emotion
"""


def emoji_of(entries=ENTRIES):
    return [testset.parse_entry(e) for e in entries]


# --- selection -------------------------------------------------------------------

def test_selection_rules():
    chosen = bench.benchmark_emoji(emoji_of(), ALL)
    assert [e.unified for e in chosen] == ["0023-FE0F-20E3", "1F1EB-1F1F7", "1F600", "1F98A", "2764-FE0F"]


def test_selection_counts_only_the_chosen_vendors():
    chosen = bench.benchmark_emoji(emoji_of(), ("google", "twitter"))
    # the fox (google + apple) has just one of these vendors
    assert [e.unified for e in chosen] == ["0023-FE0F-20E3", "1F1EB-1F1F7", "1F600", "2764-FE0F"]
    rows = bench.benchmark_rows(chosen, ("google", "twitter"))
    assert {r[2] for r in rows} == {"google", "twitter"}


def test_drawn_by_respects_has_img():
    heart = next(e for e in emoji_of() if e.unified == "2764-FE0F")
    assert bench.drawn_by(heart, ALL) == ("google", "twitter", "facebook")
    assert bench.drawn_by(heart, ("apple", "facebook")) == ("facebook",)


def test_rows_sorted_by_label_then_vendor():
    rows = bench.benchmark_rows(bench.benchmark_emoji(emoji_of(), ALL), ALL)
    assert rows == sorted(rows, key=lambda r: (r[1], r[2]))
    assert testset.csv_text(bench.LABELS_HEADER, rows) == EXPECTED_LABELS


def test_counts():
    chosen = bench.benchmark_emoji(emoji_of(), ALL)
    assert bench.images_per_vendor(chosen, ALL) == {"google": 5, "twitter": 4, "apple": 3, "facebook": 2}
    assert bench.all_vendor_count(chosen, ALL) == 1


@pytest.mark.parametrize("given, expected", [
    (["facebook", "google"], ("google", "facebook")),
    (["twitter,apple"], ("twitter", "apple")),
    (["Google", "google,twitter"], ("google", "twitter")),
])
def test_canonical_vendors(given, expected):
    assert bench.canonical_vendors(given) == expected


@pytest.mark.parametrize("given", [["google"], ["google", "nokia"], [""]])
def test_canonical_vendors_refuses(given):
    with pytest.raises(bench.BuildError):
        bench.canonical_vendors(given)


# --- writing -------------------------------------------------------------------------

def test_write_benchmark(tmp_path):
    # apple has a stray image for the heart although has_img_apple is false
    roots = {v: make_package(tmp_path / "pkg", v, extra_images=("2764-FE0F",) if v == "apple" else ())
             for v in ALL}
    out = tmp_path / "out"
    chosen = bench.write_benchmark(roots, out)
    assert len(chosen) == 5
    assert (out / "labels.csv").read_text(encoding="utf-8") == EXPECTED_LABELS
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    listed = [line.split(",")[0] for line in EXPECTED_LABELS.splitlines()[1:]]
    assert written == sorted(listed)
    assert not (out / "apple" / "2764-FE0F.png").exists()
    for rel in written:
        vendor, name = rel.split("/")
        assert (out / rel).read_bytes() == png_bytes(vendor, name[:-4])
    assert sorted(p.name for p in out.iterdir()) == [
        "LICENSE-emoji-datasource.txt", "README.md", "apple", "facebook", "google", "labels.csv", "twitter"]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "Do not commit or redistribute" in readme
    assert "5 emoji, 14 images" in readme
    assert "not licensed for commercial usage" in readme and "no clear licensing" in readme


def test_write_benchmark_two_vendors(tmp_path):
    roots = make_roots(tmp_path / "pkg", ("google", "twitter"))
    out = tmp_path / "out"
    bench.write_benchmark(roots, out)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["google", "twitter"]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "redistribute" not in readme.split("\n\n")[1]  # no Apple/Facebook warning
    assert "--vendors google twitter" in readme


def test_write_benchmark_is_deterministic(tmp_path):
    roots = make_roots(tmp_path / "pkg")
    a, b = tmp_path / "a", tmp_path / "b"
    bench.write_benchmark(roots, a)
    bench.write_benchmark(dict(reversed(list(roots.items()))), b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files if f.name != "README.md")


def test_missing_image_is_an_error(tmp_path):
    roots = make_roots(tmp_path / "pkg")
    (roots["twitter"] / "img" / "twitter" / "64" / "1f600.png").unlink()
    with pytest.raises(bench.BuildError, match="1f600.png"):
        bench.write_benchmark(roots, tmp_path / "out")


def test_different_emoji_json_is_an_error(tmp_path):
    roots = make_roots(tmp_path / "pkg", ("google", "twitter"))
    (roots["twitter"] / "emoji.json").write_text(json.dumps(ENTRIES[:3]), encoding="utf-8")
    with pytest.raises(bench.BuildError, match="emoji.json differs"):
        bench.write_benchmark(roots, tmp_path / "out")


# --- whole command, from fake tarballs ---------------------------------------------

def make_tarball(pkg_base: Path, vendor: str, dest: Path) -> Path:
    """Pack a fake package folder the way npm does (members below package/)."""
    tgz = dest / testset.tarball_name(vendor)
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(pkg_base / vendor / "package", arcname="package")
        evil = tarfile.TarInfo("package/../../evil.txt")  # must never be written
        evil.size = 4
        tf.addfile(evil, io.BytesIO(b"evil"))
    return tgz


@pytest.fixture
def fake_tarballs(tmp_path, monkeypatch):
    """--tarballs folder with fake packages of all vendors, their integrity pinned."""
    pkgs, tgz_dir = tmp_path / "pkgs", tmp_path / "tgz"
    tgz_dir.mkdir()
    make_roots(pkgs)
    pinned = {v: testset.integrity_of(make_tarball(pkgs, v, tgz_dir)) for v in ALL}
    monkeypatch.setattr(testset, "TARBALL_INTEGRITY", pinned)
    monkeypatch.setattr(testset, "npm_pack", lambda *a: pytest.fail("npm must not be called"))
    return tgz_dir


def test_main_builds_and_replaces(tmp_path, fake_tarballs, capsys):
    out = tmp_path / "bench" / "emoji"
    args = ["--out", str(out), "--tarballs", str(fake_tarballs)]
    assert bench.main(args) == 0
    assert (out / "labels.csv").read_text(encoding="utf-8") == EXPECTED_LABELS
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert bench.main(args + ["--vendors", "google,twitter"]) == 0  # replaces the previous build
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["google", "twitter"]
    assert bench.main(args) == 0
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["emoji"]  # no staging left behind
    assert not list(tmp_path.rglob("evil.txt"))
    assert "wrote 5 emoji, 14 PNGs" in capsys.readouterr().err


def test_main_refuses_foreign_folder(tmp_path, fake_tarballs, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert bench.main(["--out", str(out), "--tarballs", str(fake_tarballs)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("build_emoji_benchmark: error:") and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_main_refuses_tampered_tarball(tmp_path, fake_tarballs, capsys):
    tgz = fake_tarballs / testset.tarball_name("apple")
    tgz.write_bytes(tgz.read_bytes() + b"\0")
    out = tmp_path / "out"
    assert bench.main(["--out", str(out), "--tarballs", str(fake_tarballs)]) == 1
    err = capsys.readouterr().err
    assert "checksum differs" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_main_unknown_vendor(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path / "o"), "--vendors", "google", "nokia"]) == 1
    err = capsys.readouterr().err
    assert err == "build_emoji_benchmark: error: unknown vendor 'nokia' (choose from google, twitter, apple, facebook)\n"
