#!/usr/bin/env python3
"""Build the small labelled emoji test set in tests/data/emoji/.

About 60 emoji, each drawn by two vendors (Google's Noto, Twitter's Twemoji),
taken unchanged from the 64x64 PNGs of the npm packages
emoji-datasource-google and emoji-datasource-twitter 16.0.0. The emoji are
spread evenly over the categories of emoji.json (Flags and Component skipped,
no skin-tone variants), so a search for one vendor's drawing can be scored by
whether it finds the other vendor's drawing of the same code point.

Usage:
    python tools/build_emoji_testset.py
    python tools/build_emoji_testset.py --tarballs ~/npm-tgz   # keep/reuse the .tgz files

Needs npm (for `npm pack`). The output is rebuilt byte-identically.

The fetch and emoji.json helpers (npm_pack, fetch_package, load_emoji,
eligible_emoji, select_spread, ...) are meant to be imported by other builders.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

EMOJI_DATA_VERSION = "16.0.0"
TESTSET_VENDORS = ("google", "twitter")
IMAGE_SIZE = 64
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "emoji"
APACHE_LICENSE = Path("/usr/share/common-licenses/Apache-2.0")  # from Debian's base-files

# npm's "integrity" of each tarball; a tarball that doesn't match is refused.
# Vendors missing here are not checked (npm itself checks what it downloads).
TARBALL_INTEGRITY = {
    "google": "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    "twitter": "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    "apple": "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw==",
    "facebook": "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
}
# How the packages' README.md starts the line stating each vendor's image licence.
README_LICENCE_LINE = {
    "google": "* Android/Google/Noto images",
    "twitter": "* Twitter images",
    "apple": "* Apple images",
    "facebook": "* Facebook images",
}
SKIN_TONE_MODIFIERS = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
SKIPPED_CATEGORIES = frozenset({"Flags", "Component"})
TWEMOJI_ATTRIBUTION = (
    "Copyright 2020 Twitter, Inc and other contributors; "
    "graphics licensed under CC-BY 4.0: https://creativecommons.org/licenses/by/4.0/"
)


class BuildError(Exception):
    """A problem the user can fix, described in one line."""


@dataclass(frozen=True)
class Emoji:
    """One top-level entry of emoji.json (skin-tone variations not included)."""

    unified: str
    short_name: str
    category: str
    sort_order: int
    image: str
    vendors: frozenset[str]

    def codepoints(self) -> list[str]:
        """The code points of `unified`, e.g. ['1F44B', '1F3FB']."""
        return self.unified.split("-")


# --- fetching npm packages -------------------------------------------------

def package_name(vendor: str) -> str:
    """npm package name for a vendor's image set, e.g. 'emoji-datasource-google'."""
    return f"emoji-datasource-{vendor}"


def tarball_name(vendor: str, version: str = EMOJI_DATA_VERSION) -> str:
    """File name `npm pack` gives the vendor's tarball."""
    return f"{package_name(vendor)}-{version}.tgz"


def _npm_error(stderr: str, returncode: int) -> str:
    """The most telling line of a failed npm run."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("npm error", "npm ERR!"))]
    telling = [ln for ln in errors if not ln.split(None, 2)[-1].startswith(("code ", "A complete log"))]
    if telling or errors:
        return (telling or errors)[0]
    return lines[-1] if lines else f"exit status {returncode}"


def npm_pack(spec: str, dest: Path) -> Path:
    """Download `spec` (name@version) with `npm pack` into dest; return the tarball."""
    cmd = ["npm", "pack", spec, "--json", "--pack-destination", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError("npm not found; install Node.js and npm to fetch the emoji packages") from None
    if proc.returncode != 0:
        raise BuildError(f"npm pack {spec} failed: {_npm_error(proc.stderr, proc.returncode)}")
    try:
        filename = json.loads(proc.stdout)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        raise BuildError(f"npm pack {spec}: could not read its --json output") from None
    path = dest / filename
    if not path.is_file():
        raise BuildError(f"npm pack {spec}: {path} was not written")
    return path


def integrity_of(path: Path) -> str:
    """npm-style integrity string ('sha512-<base64>') of a file."""
    digest = hashlib.sha512()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def check_integrity(path: Path, expected: str | None) -> None:
    """Refuse a tarball whose integrity differs from `expected` (None: no check)."""
    if expected is not None and integrity_of(path) != expected:
        raise BuildError(f"{path}: checksum differs from the published package")


def get_tarball(vendor: str, tarball_dir: Path, version: str = EMOJI_DATA_VERSION) -> Path:
    """The vendor's tarball in tarball_dir, fetched with npm pack if not there yet."""
    path = tarball_dir / tarball_name(vendor, version)
    if not path.is_file():
        path = npm_pack(f"{package_name(vendor)}@{version}", tarball_dir)
    if version == EMOJI_DATA_VERSION:
        check_integrity(path, TARBALL_INTEGRITY.get(vendor))
    return path


# --- unpacking ---------------------------------------------------------------

def safe_member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's relative path if it is a regular file inside package/, else None."""
    path = PurePosixPath(member.name)
    if not member.isreg() or path.is_absolute() or ".." in path.parts:
        return None
    if len(path.parts) < 2 or path.parts[0] != "package":
        return None
    return path


def extract_package(tgz: Path, dest: Path, wanted: Callable[[str], bool]) -> Path:
    """Unpack the regular files of an npm tarball whose path (below package/)
    satisfies `wanted` into dest; return dest/'package'.

    Links, devices, absolute paths and '..' are never written, and every
    target is checked to resolve inside dest.
    """
    root = dest.resolve()
    try:
        with tarfile.open(tgz, mode="r|gz") as tf:
            for member in tf:
                path = safe_member_path(member)
                if path is None or not wanted(str(PurePosixPath(*path.parts[1:]))):
                    continue
                _write_member(tf, member, root, path)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BuildError(f"{tgz}: cannot unpack ({exc})") from None
    return root / "package"


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, root: Path,
                  path: PurePosixPath) -> None:
    """Copy one regular-file member to root/path, refusing paths that escape root."""
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise BuildError(f"refusing tar member outside the target folder: {member.name}")
    src = tf.extractfile(member)
    if src is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)


def image_filter(vendor: str, size: int = IMAGE_SIZE) -> Callable[[str], bool]:
    """Select the package's metadata files and its size x size images."""
    meta = {"emoji.json", "LICENSE", "README.md", "package.json"}
    prefix = f"img/{vendor}/{size}/"
    return lambda rel: rel in meta or (rel.startswith(prefix) and rel.endswith(".png"))


def fetch_package(vendor: str, tarball_dir: Path, unpack_dir: Path,
                  size: int = IMAGE_SIZE) -> Path:
    """Fetch (if needed) and unpack a vendor package's metadata and images; return its root."""
    tgz = get_tarball(vendor, tarball_dir)
    root = extract_package(tgz, unpack_dir / vendor, image_filter(vendor, size))
    if not (root / "emoji.json").is_file():
        raise BuildError(f"{tgz}: has no package/emoji.json")
    return root


# --- emoji.json ----------------------------------------------------------------

def parse_entry(entry: dict) -> Emoji:
    """Turn one emoji.json entry into an Emoji."""
    vendors = frozenset(
        key[len("has_img_"):] for key, value in entry.items()
        if key.startswith("has_img_") and value is True
    )
    return Emoji(
        unified=entry["unified"],
        short_name=entry["short_name"],
        category=entry["category"],
        sort_order=int(entry["sort_order"]),
        image=entry["image"],
        vendors=vendors,
    )


def load_emoji(path: Path) -> list[Emoji]:
    """All top-level entries of an emoji.json file, in sort_order."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        emoji = [parse_entry(e) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"{path}: not a usable emoji.json ({exc!r})") from None
    return sorted(emoji, key=lambda e: e.sort_order)


def same_emoji_json(roots: Sequence[Path]) -> Path:
    """Check that all packages ship the same emoji.json; return the first one's path."""
    first = roots[0] / "emoji.json"
    data = first.read_bytes()
    for root in roots[1:]:
        if (root / "emoji.json").read_bytes() != data:
            raise BuildError(f"emoji.json differs between {roots[0]} and {root}")
    return first


def has_skin_tone(emoji: Emoji) -> bool:
    """True if the emoji's code points include a skin-tone modifier (1F3FB-1F3FF)."""
    return any(cp in SKIN_TONE_MODIFIERS for cp in emoji.codepoints())


def eligible_emoji(emoji: Iterable[Emoji], vendors: Sequence[str],
                   skip_categories: frozenset[str] = SKIPPED_CATEGORIES) -> list[Emoji]:
    """Emoji drawn by all `vendors`, outside skip_categories, without skin tones."""
    return [
        e for e in emoji
        if set(vendors) <= e.vendors and e.category not in skip_categories and not has_skin_tone(e)
    ]


def shared_images(emoji: Sequence[Emoji], roots: dict[str, Path]) -> set[str]:
    """`unified` of the emoji whose image, for some vendor, is byte-identical to
    another emoji's (e.g. Twemoji draws all two-adult families alike): such
    labels can't be told apart from the pixels."""
    shared: set[str] = set()
    for vendor, root in roots.items():
        seen: dict[str, list[str]] = {}
        for e in emoji:
            digest = hashlib.sha256(vendor_image(root, vendor, e).read_bytes()).hexdigest()
            seen.setdefault(digest, []).append(e.unified)
        shared.update(u for group in seen.values() if len(group) > 1 for u in group)
    return shared


def by_category(emoji: Sequence[Emoji]) -> dict[str, list[Emoji]]:
    """Group emoji by category; categories and members in sort_order."""
    groups: dict[str, list[Emoji]] = {}
    for e in sorted(emoji, key=lambda e: e.sort_order):
        groups.setdefault(e.category, []).append(e)
    return groups


def quotas(sizes: Sequence[int], total: int) -> list[int]:
    """Share `total` picks round-robin over groups of the given sizes (capped at each size)."""
    counts = [0] * len(sizes)
    remaining = min(total, sum(sizes))
    while remaining:
        for i, size in enumerate(sizes):
            if remaining and counts[i] < size:
                counts[i] += 1
                remaining -= 1
    return counts


def evenly_spaced(items: Sequence[Emoji], k: int) -> list[Emoji]:
    """k items at evenly spaced positions (centres of k equal slices)."""
    n = len(items)
    return [items[(2 * i + 1) * n // (2 * k)] for i in range(k)]


def select_spread(emoji: Sequence[Emoji], total: int) -> list[Emoji]:
    """About `total` emoji spread evenly over the categories, in sort_order."""
    groups = by_category(emoji)
    shares = quotas([len(g) for g in groups.values()], total)
    chosen = [e for g, k in zip(groups.values(), shares) for e in evenly_spaced(g, k)]
    return sorted(chosen, key=lambda e: e.sort_order)


def vendor_image(root: Path, vendor: str, emoji: Emoji, size: int = IMAGE_SIZE) -> Path:
    """Path of the emoji's PNG inside an unpacked vendor package."""
    return root / "img" / vendor / str(size) / emoji.image


def readme_licence_line(readme: str, vendor: str) -> str:
    """The package README's line stating the vendor's image licence."""
    prefix = README_LICENCE_LINE[vendor]
    for line in readme.splitlines():
        if line.startswith(prefix):
            return line[2:].strip()
    raise BuildError(f"README.md: no line starting {prefix!r}")


def readme_source_row(readme: str, vendor: str) -> str:
    """The README's 'Image Sources' table row for a vendor, cells joined by ' | '."""
    label = "Twitter" if vendor == "twitter" else vendor.capitalize()
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return " | ".join(cells)
    raise BuildError(f"README.md: no image-source row for {label}")


# --- writing the test set --------------------------------------------------------

def label_rows(chosen: Sequence[Emoji], vendors: Sequence[str]) -> list[list[str]]:
    """labels.csv rows (without header): path,label,vendor,short_name,category."""
    return [
        [f"{v}/{e.unified}.png", e.unified, v, e.short_name, e.category]
        for e in chosen for v in vendors
    ]


def csv_text(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """CSV with '\\n' line ends."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def distribution(chosen: Sequence[Emoji]) -> list[tuple[str, int]]:
    """(category, count) pairs in sort_order of the categories."""
    return [(cat, len(items)) for cat, items in by_category(chosen).items()]


def notice_text(chosen: Sequence[Emoji], readme: str, extra_files: Sequence[str]) -> str:
    """The NOTICE.md text."""
    google_licence = readme_licence_line(readme, "google")
    twitter_licence = readme_licence_line(readme, "twitter")
    table = "\n".join(f"| {cat} | {n} |" for cat, n in distribution(chosen))
    files = "\n".join(f"- `{name}`" for name in extra_files)
    return f"""# Emoji test set: sources and licences

{len(chosen)} emoji, each drawn by two vendors: `google/<unified>.png` and
`twitter/<unified>.png`, {IMAGE_SIZE}x{IMAGE_SIZE} PNGs copied byte for byte (not modified)
from the npm packages

- `{package_name("google")}@{EMOJI_DATA_VERSION}`, `package/img/google/{IMAGE_SIZE}/`
- `{package_name("twitter")}@{EMOJI_DATA_VERSION}`, `package/img/twitter/{IMAGE_SIZE}/`

`labels.csv` lists every image with its label (the emoji's `unified` code
points), vendor, and the `short_name` and `category` from the packages'
`emoji.json`.

## Licences

The packages themselves (code and emoji.json data, by Cal Henderson,
https://github.com/iamcal/emoji-data) are under the MIT licence, see
`LICENSE-emoji-datasource.txt`; that licence does not cover the images.
The packages' README.md states the image licences as:

> {google_licence}
>
> {twitter_licence}

and names the image sources:

> {readme_source_row(readme, "google")}
>
> {readme_source_row(readme, "twitter")}

- **Google (Noto Emoji) images**: Apache License 2.0, full text in
  `LICENSE-Apache-2.0.txt` (the npm package does not ship it; this copy is
  Debian's `/usr/share/common-licenses/Apache-2.0`).
- **Twitter (Twemoji) images**: CC BY 4.0. Attribution, as Twemoji asks:
  {TWEMOJI_ATTRIBUTION}.
  The graphics come from the maintained Twemoji fork,
  https://github.com/jdecked/twemoji.

No Apple or Facebook images are included: the README says Apple's are not
licensed for commercial use and Facebook's have no clear licensing.

## Choice of emoji

Top-level entries of `emoji.json` that have both a Google and a Twitter
image, outside the Flags and Component categories and without a skin-tone
modifier (U+1F3FB-U+1F3FF), leaving out those whose image is byte-identical
to another such emoji's for either vendor (Twemoji, for one, draws most family
emoji alike), so that every label can be told apart. {len(chosen)} picks are dealt round-robin over the
categories (in `sort_order`), and taken at evenly spaced positions within each
category.

| category | emoji |
| --- | --- |
{table}

## Other files

{files}

## Rebuilding

    python tools/build_emoji_testset.py

(needs npm; fetches both packages with `npm pack` and checks their checksums).
"""


def copy_images(chosen: Sequence[Emoji], roots: dict[str, Path], out: Path) -> None:
    """Copy each chosen emoji's PNG for every vendor into out/<vendor>/<unified>.png."""
    for vendor, root in roots.items():
        (out / vendor).mkdir()
        for e in chosen:
            src = vendor_image(root, vendor, e)
            if not src.is_file():
                raise BuildError(f"{package_name(vendor)} has no image {src.name}")
            shutil.copyfile(src, out / vendor / f"{e.unified}.png")


def write_testset(chosen: Sequence[Emoji], roots: dict[str, Path], out: Path) -> None:
    """Write images, labels.csv, NOTICE.md and licence files into the empty folder out."""
    copy_images(chosen, roots, out)
    header = ["path", "label", "vendor", "short_name", "category"]
    (out / "labels.csv").write_text(csv_text(header, label_rows(chosen, list(roots))), encoding="utf-8")
    first = next(iter(roots.values()))
    shutil.copyfile(first / "LICENSE", out / "LICENSE-emoji-datasource.txt")
    if not APACHE_LICENSE.is_file():
        raise BuildError(f"{APACHE_LICENSE} not found (Debian's base-files ships it)")
    shutil.copyfile(APACHE_LICENSE, out / "LICENSE-Apache-2.0.txt")
    readme = (first / "README.md").read_text(encoding="utf-8")
    extra = ["LICENSE-Apache-2.0.txt", "LICENSE-emoji-datasource.txt"]
    (out / "NOTICE.md").write_text(notice_text(chosen, readme, extra), encoding="utf-8")


def replace_dir(new: Path, out: Path) -> None:
    """Put the finished folder `new` in place of out (which must be ours, or absent)."""
    if out.exists() and any(out.iterdir()) and not (out / "labels.csv").is_file():
        raise BuildError(f"{out} is not empty and has no labels.csv; not replacing it")
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def build(out: Path, count: int, tarball_dir: Path) -> list[Emoji]:
    """Fetch the packages, choose the emoji and write the test set; return the chosen emoji."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emoji-unpack-") as unpack:
        roots = {v: fetch_package(v, tarball_dir, Path(unpack)) for v in TESTSET_VENDORS}
        emoji = load_emoji(same_emoji_json(list(roots.values())))
        candidates = eligible_emoji(emoji, TESTSET_VENDORS)
        ambiguous = shared_images(candidates, roots)
        chosen = select_spread([e for e in candidates if e.unified not in ambiguous], count)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new", dir=out.parent))
        try:
            write_testset(chosen, roots, staging)
            staging.chmod(0o755)
            replace_dir(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output folder (default: tests/data/emoji in this repository)")
    ap.add_argument("--count", type=int, default=60, help="number of emoji (default: 60)")
    ap.add_argument("--tarballs", type=Path,
                    help="folder to keep the npm tarballs in and reuse them from (default: a temp folder)")
    args = ap.parse_args(argv)
    if args.count < 1:
        ap.error("--count must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit status."""
    args = parse_args(argv)
    try:
        if args.tarballs is not None:
            args.tarballs.mkdir(parents=True, exist_ok=True)
            chosen = build(args.out, args.count, args.tarballs)
        else:
            with tempfile.TemporaryDirectory(prefix="emoji-npm-") as tmp:
                chosen = build(args.out, args.count, Path(tmp))
    except (BuildError, OSError) as exc:
        print(f"build_emoji_testset: error: {exc}", file=sys.stderr)
        return 1
    n_vendors = len(TESTSET_VENDORS)
    print(f"wrote {len(chosen)} emoji x {n_vendors} vendors = {len(chosen) * n_vendors} PNGs to {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
