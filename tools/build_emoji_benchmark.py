#!/usr/bin/env python3
"""Build the cross-vendor emoji retrieval benchmark in bench/data/emoji/.

Every emoji of emoji-datasource 16.0.0 (Flags included; the Component
category and skin-tone variants left out) drawn by at least two of the
vendors Google (Noto), Twitter (Twemoji), Apple and Facebook: about 1,900
emoji and 7,600 images, the 64x64 PNGs of the npm packages
emoji-datasource-<vendor> copied unchanged. A search for one vendor's
drawing is scored by whether it finds the other vendors' drawings of the
same code points.

Built on demand and never committed: Apple's images are not licensed for
commercial use and Facebook's have no clear licensing, so the output may
not be redistributed (bench/data/ is git-ignored).

Usage:
    python tools/build_emoji_benchmark.py
    python tools/build_emoji_benchmark.py --tarballs ~/npm-tgz    # keep/reuse the .tgz files
    python tools/build_emoji_benchmark.py --vendors google twitter --out /tmp/emoji-gt

Needs npm (for `npm pack`) unless --tarballs already holds the packages.
The fetching, unpacking and emoji.json helpers are those of
build_emoji_testset.py. The output is rebuilt byte-identically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

_TOOLS = str(Path(__file__).resolve().parent)
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)

import build_emoji_testset as testset  # noqa: E402
from build_emoji_testset import BuildError, Emoji  # noqa: E402

VENDORS = ("google", "twitter", "apple", "facebook")
UNREDISTRIBUTABLE = frozenset({"apple", "facebook"})
BENCH_SKIPPED_CATEGORIES = frozenset({"Component"})
MIN_VENDORS = 2
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench" / "data" / "emoji"
LABELS_HEADER = ("path", "label", "vendor", "short_name", "category")
VENDOR_TITLES = {
    "google": "Google (Noto Emoji)",
    "twitter": "Twitter (Twemoji)",
    "apple": "Apple",
    "facebook": "Facebook",
}


# --- choosing the emoji ----------------------------------------------------------

def canonical_vendors(names: Iterable[str]) -> tuple[str, ...]:
    """Vendor names (each may be a comma-separated list) in VENDORS order, once each."""
    wanted = {n.strip().lower() for name in names for n in name.split(",") if n.strip()}
    unknown = sorted(wanted - set(VENDORS))
    if unknown:
        raise BuildError(f"unknown vendor {unknown[0]!r} (choose from {', '.join(VENDORS)})")
    if len(wanted) < MIN_VENDORS:
        raise BuildError(f"need at least {MIN_VENDORS} vendors, got {len(wanted)}")
    return tuple(v for v in VENDORS if v in wanted)


def drawn_by(emoji: Emoji, vendors: Sequence[str]) -> tuple[str, ...]:
    """The vendors (of `vendors`, in that order) whose has_img_<vendor> is true."""
    return tuple(v for v in vendors if v in emoji.vendors)


def benchmark_emoji(emoji: Iterable[Emoji], vendors: Sequence[str],
                    skip_categories: frozenset[str] = BENCH_SKIPPED_CATEGORIES,
                    min_vendors: int = MIN_VENDORS) -> list[Emoji]:
    """Emoji outside skip_categories, without a skin-tone modifier, drawn by
    at least min_vendors of `vendors`; sorted by `unified`."""
    chosen = [
        e for e in emoji
        if e.category not in skip_categories
        and not testset.has_skin_tone(e)
        and len(drawn_by(e, vendors)) >= min_vendors
    ]
    return sorted(chosen, key=lambda e: e.unified)


def benchmark_rows(chosen: Iterable[Emoji], vendors: Sequence[str]) -> list[list[str]]:
    """labels.csv rows (no header), one per image, sorted by (label, vendor)."""
    rows = [
        [f"{v}/{e.unified}.png", e.unified, v, e.short_name, e.category]
        for e in chosen for v in drawn_by(e, vendors)
    ]
    return sorted(rows, key=lambda r: (r[1], r[2]))


def images_per_vendor(chosen: Sequence[Emoji], vendors: Sequence[str]) -> dict[str, int]:
    """Number of images each vendor contributes."""
    return {v: sum(1 for e in chosen if v in e.vendors) for v in vendors}


def all_vendor_count(chosen: Sequence[Emoji], vendors: Sequence[str]) -> int:
    """Number of emoji drawn by every one of `vendors`."""
    return sum(1 for e in chosen if set(vendors) <= e.vendors)


# --- writing -----------------------------------------------------------------------

def copy_benchmark_images(chosen: Sequence[Emoji], roots: dict[str, Path], out: Path) -> None:
    """Copy every image of the chosen emoji to out/<vendor>/<unified>.png."""
    vendors = list(roots)
    for vendor in vendors:
        (out / vendor).mkdir()
    for e in chosen:
        for vendor in drawn_by(e, vendors):
            src = testset.vendor_image(roots[vendor], vendor, e)
            if not src.is_file():
                raise BuildError(f"{testset.package_name(vendor)} has no image {src.name} "
                                 f"although emoji.json says has_img_{vendor}")
            shutil.copyfile(src, out / vendor / f"{e.unified}.png")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def readme_text(chosen: Sequence[Emoji], vendors: Sequence[str], package_readme: str) -> str:
    """The README.md written next to labels.csv."""
    per_vendor = images_per_vendor(chosen, vendors)
    n_images = sum(per_vendor.values())
    n_all = all_vendor_count(chosen, vendors)
    categories = testset.by_category(chosen)
    vendor_table = _table(
        ["vendor", "images", "npm package", "integrity"],
        [[v, per_vendor[v], f"`{testset.package_name(v)}@{testset.EMOJI_DATA_VERSION}`",
          f"`{testset.TARBALL_INTEGRITY.get(v, '(not pinned)')}`"] for v in vendors],
    )
    category_table = _table(["category", "emoji"], [[c, len(es)] for c, es in categories.items()])
    licence_quotes = "\n>\n".join(f"> {testset.readme_licence_line(package_readme, v)}" for v in vendors)
    source_quotes = "\n>\n".join(f"> {testset.readme_source_row(package_readme, v)}" for v in vendors)
    restricted = [VENDOR_TITLES[v] for v in vendors if v in UNREDISTRIBUTABLE]
    if restricted:
        warning = (f"**Do not commit or redistribute this folder.** It holds {' and '.join(restricted)} "
                   "images, which may not be redistributed (see Licences). It is built on demand; "
                   "`/bench/data/` is git-ignored.")
    else:
        warning = ("**Do not commit this folder**: it is built on demand (`/bench/data/` is "
                   "git-ignored); the committed emoji test set is `tests/data/emoji/`.")
    vendor_args = "" if tuple(vendors) == VENDORS else " --vendors " + " ".join(vendors)
    return f"""# Cross-vendor emoji retrieval benchmark

{warning}

{len(chosen)} emoji, {n_images} images: each emoji drawn by at least {MIN_VENDORS} of the
vendors {", ".join(vendors)} ({n_all} emoji by all {len(vendors)}). A query is one
vendor's drawing; the relevant items are the other vendors' drawings of the
same emoji (same label).

- `<vendor>/<unified>.png`: {testset.IMAGE_SIZE}x{testset.IMAGE_SIZE} PNGs copied byte for byte (not
  modified) from `package/img/<vendor>/{testset.IMAGE_SIZE}/` of the npm package
  `emoji-datasource-<vendor>@{testset.EMOJI_DATA_VERSION}`.
- `labels.csv`: `{",".join(LABELS_HEADER)}`, one row per image, sorted by
  (label, vendor); `path` is relative to this folder, `label` is the emoji's
  `unified` code points, `short_name` and `category` come from the packages'
  `emoji.json`.
- `LICENSE-emoji-datasource.txt`: the packages' MIT licence (code and data).

{vendor_table}

{category_table}

## Licences

The packages (code and emoji.json data, by Cal Henderson,
https://github.com/iamcal/emoji-data) are under the MIT licence, see
`LICENSE-emoji-datasource.txt`; it does not cover the images. The packages'
README.md states the image licences as:

{licence_quotes}

and names the image sources:

{source_quotes}

Google's Noto Emoji images are under the Apache License 2.0. Twitter's
Twemoji graphics are under CC BY 4.0; attribution, as Twemoji asks:
{testset.TWEMOJI_ATTRIBUTION}.
Apple's images are not licensed for commercial use and Facebook's have no
clear licensing: use them only locally, for evaluation, and never commit,
publish or share them.

## How it was built

    python tools/build_emoji_benchmark.py{vendor_args}

fetches each package with `npm pack` (or reuses the tarballs in `--tarballs
DIR`), refuses a tarball whose sha512 differs from the pinned integrity above,
unpacks only regular files below `package/` (metadata and the
{testset.IMAGE_SIZE}px images), and checks that all packages ship the same `emoji.json`.
Selection, from the top-level entries of `emoji.json`:

- a vendor's image only where `has_img_<vendor>` is true;
- no skin-tone variants (their `skin_variations` are not used, and any
  `unified` containing U+1F3FB-U+1F3FF is skipped);
- every category except {", ".join(sorted(BENCH_SKIPPED_CATEGORIES))} (skin-tone swatches and hair
  components); Flags are included;
- only emoji with images by at least {MIN_VENDORS} vendors, so that every query
  has a relevant item from another vendor.

Rebuilding gives byte-identical files.
"""


def write_benchmark(roots: dict[str, Path], out: Path) -> list[Emoji]:
    """Choose the emoji from already-unpacked packages and write the benchmark.

    roots maps each vendor to its unpacked package folder (the one holding
    emoji.json, README.md, LICENSE and img/<vendor>/64/); out must be an
    empty (or not yet existing) folder. Returns the chosen emoji.
    """
    if not roots:
        raise BuildError("no vendors given")
    vendors = list(roots)
    package_roots = list(roots.values())
    emoji = testset.load_emoji(testset.same_emoji_json(package_roots))
    chosen = benchmark_emoji(emoji, vendors)
    if not chosen:
        raise BuildError(f"no emoji drawn by at least {MIN_VENDORS} of {', '.join(vendors)}")
    first = package_roots[0]
    for name in ("README.md", "LICENSE"):
        if not (first / name).is_file():
            raise BuildError(f"{first} has no {name}")
    package_readme = (first / "README.md").read_text(encoding="utf-8")
    readme = readme_text(chosen, vendors, package_readme)  # fails early on an unexpected README
    out.mkdir(parents=True, exist_ok=True)
    copy_benchmark_images(chosen, roots, out)
    labels = testset.csv_text(LABELS_HEADER, benchmark_rows(chosen, vendors))
    (out / "labels.csv").write_text(labels, encoding="utf-8")
    shutil.copyfile(first / "LICENSE", out / "LICENSE-emoji-datasource.txt")
    (out / "README.md").write_text(readme, encoding="utf-8")
    return chosen


def check_replaceable(out: Path) -> None:
    """Refuse, before any work, an output path that replace_dir would not replace."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "labels.csv").is_file():
        raise BuildError(f"{out} is not empty and has no labels.csv; not replacing it")


def build(out: Path, vendors: Sequence[str], tarball_dir: Path) -> list[Emoji]:
    """Fetch and unpack the packages, then write the benchmark to out (swapped in whole)."""
    out = out.resolve()
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emoji-unpack-") as unpack:
        roots = {v: testset.fetch_package(v, tarball_dir, Path(unpack)) for v in vendors}
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new", dir=out.parent))
        try:
            chosen = write_benchmark(roots, staging)
            staging.chmod(0o755)
            testset.replace_dir(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output folder (default: bench/data/emoji in this repository)")
    ap.add_argument("--tarballs", type=Path,
                    help="folder to keep the npm tarballs in and reuse them from (default: a temp folder)")
    ap.add_argument("--vendors", nargs="+", default=list(VENDORS), metavar="VENDOR",
                    help=f"vendors to include, space- or comma-separated (default: {' '.join(VENDORS)})")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit status."""
    args = parse_args(argv)
    try:
        vendors = canonical_vendors(args.vendors)
        if args.tarballs is not None:
            args.tarballs.mkdir(parents=True, exist_ok=True)
            chosen = build(args.out, vendors, args.tarballs)
        else:
            with tempfile.TemporaryDirectory(prefix="emoji-npm-") as tmp:
                chosen = build(args.out, vendors, Path(tmp))
    except (BuildError, OSError) as exc:
        print(f"build_emoji_benchmark: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build_emoji_benchmark: interrupted", file=sys.stderr)
        return 130
    per_vendor = images_per_vendor(chosen, vendors)
    counts = ", ".join(f"{v} {n}" for v, n in per_vendor.items())
    print(f"wrote {len(chosen)} emoji, {sum(per_vendor.values())} PNGs ({counts}; "
          f"{all_vendor_count(chosen, vendors)} emoji by all {len(vendors)} vendors) to {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
