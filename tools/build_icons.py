#!/usr/bin/env python3
"""Rebuild the demo icons in icons/ from the Debian package moka-icon-theme.

The demo data is the first 300 (in sorted file-name order) regular files of
usr/share/icons/Moka/256x256/apps in moka-icon-theme 5.5.0-2, each resized to
128x128 RGBA with Lanczos and saved as a metadata-free PNG under the same
name. Symlinks in that folder are aliases of other icons and are skipped.

Usage:
    python tools/build_icons.py                 # fetches the .deb with apt-get
    python tools/build_icons.py --deb moka-icon-theme_5.5.0-2_all.deb

Needs dpkg-deb (and apt-get when --deb is not given) plus Pillow. Running it
twice gives byte-identical PNGs with the same Pillow/zlib versions.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

PACKAGE = "moka-icon-theme"
VERSION = "5.5.0-2"
# SHA256 of moka-icon-theme_5.5.0-2_all.deb as listed in Debian's archive.
DEB_SHA256 = "b55540ac018cbb2b2d87f9db451e977d43436069070916025d58ad903fc83117"
ICON_DIR = "usr/share/icons/Moka/256x256/apps"
COPYRIGHT_FILE = f"usr/share/doc/{PACKAGE}/copyright"
SOURCE_URL = "https://github.com/ubuntubudgie/moka-icon-theme"
CC_BY_SA_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
# The demo's query (search.jpg, as in the post): an icon of the same theme
# that is NOT among the indexed ones, flattened on white, saved as JPEG.
QUERY_ICON = "opera.png"


class BuildError(Exception):
    """A problem the user can fix, described in one line."""


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a command and return its stdout; raise BuildError on failure."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} not found; it is needed to build the icons") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise BuildError(f"{' '.join(cmd)} failed: {detail}")
    return proc.stdout


def download_deb(dest: Path) -> Path:
    """Fetch the pinned .deb with apt-get into dest and return its path."""
    spec = f"{PACKAGE}={VERSION}"
    try:
        run(["apt-get", "download", spec], cwd=dest)
    except BuildError as exc:
        raise BuildError(f"{exc} (try 'apt-get update' first, or pass --deb)") from None
    debs = sorted(dest.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        raise BuildError(f"apt-get download {spec} did not leave exactly one .deb in {dest}")
    return debs[0]


def sha256_of(path: Path) -> str:
    """Return the hex SHA256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_deb(deb: Path) -> None:
    """Make sure deb is the pinned package version, byte for byte."""
    if not deb.is_file():
        raise BuildError(f"{deb}: no such file")
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version"]).split("\n")
    found = dict(line.split(": ", 1) for line in fields if ": " in line)
    if (found.get("Package"), found.get("Version")) != (PACKAGE, VERSION):
        got = f"{found.get('Package')} {found.get('Version')}"
        raise BuildError(f"{deb}: is {got}, expected {PACKAGE} {VERSION}")
    if sha256_of(deb) != DEB_SHA256:
        raise BuildError(f"{deb}: SHA256 differs from Debian's {PACKAGE} {VERSION}")


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack the .deb's files into dest with dpkg-deb -x; return dest."""
    run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def list_icons(root: Path, count: int) -> list[Path]:
    """The first `count` regular PNG files (no symlinks) of ICON_DIR, sorted by name."""
    folder = root / ICON_DIR
    if not folder.is_dir():
        raise BuildError(f"{ICON_DIR} is missing from the package")
    names = sorted(
        p.name for p in folder.iterdir()
        if p.suffix == ".png" and p.is_file() and not p.is_symlink()
    )
    if len(names) < count:
        raise BuildError(f"{ICON_DIR} has only {len(names)} icons, {count} requested")
    return [folder / name for name in names[:count]]


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to path through a temporary file and os.replace."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resize_icon(src: Path, size: int) -> tuple[bytes, str | None]:
    """Return (PNG bytes of src as size x size RGBA, Author from its metadata)."""
    with Image.open(src) as im:
        author = im.info.get("Author")
        rgba = im.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)
    rgba.info = {}  # no dpi, text, ICC or time chunks: output depends on pixels only
    buf = io.BytesIO()
    rgba.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), author


def write_icons(icons: list[Path], out: Path, size: int) -> dict[str, list[str]]:
    """Resize every icon into out; map each metadata Author to its icons' names."""
    authors: dict[str, list[str]] = {}
    for src in icons:
        data, author = resize_icon(src, size)
        atomic_write(out / src.name, data)
        authors.setdefault(author or "(unnamed)", []).append(src.name)
    return authors


def stale_pngs(out: Path, keep: set[str]) -> list[Path]:
    """PNG files in out that this build did not write."""
    return sorted(p for p in out.glob("*.png") if p.name not in keep)


def copyright_quotes(text: str) -> tuple[str, str]:
    """Return the 'Files: *' paragraph and the CC-BY-SA-4.0 licence's first line."""
    paragraphs = text.split("\n\n")
    files = next((p for p in paragraphs if p.startswith("Files: *\n")), None)
    licence = next((p for p in paragraphs if p.startswith("License: CC-BY-SA-4.0\n")), None)
    if files is None or licence is None:
        raise BuildError(f"{COPYRIGHT_FILE}: no 'Files: *' or 'License: CC-BY-SA-4.0' paragraph")
    return files.strip(), licence.splitlines()[1].strip()


def authors_note(authors: dict[str, list[str]]) -> str:
    """Describe the Author fields found in the source PNGs' metadata."""
    parts = []
    for name, icons in sorted(authors.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        n = len(icons)
        which = f" ({', '.join(icons)})" if n <= 3 else ""
        parts.append(f"{name}, {n} icon{'s' if n != 1 else ''}{which}")
    return "; ".join(parts)


def readme_text(files_para: str, licence_line: str, count: int, size: int,
                authors: str) -> str:
    """The icons/README.md text."""
    quoted_files = "\n".join(f"    {line}" for line in files_para.splitlines())
    return f"""# Demo icons

{count} application icons from the **Moka** icon theme, used as demo data for
the image search engine.

- Source: Debian package `{PACKAGE}` version `{VERSION}`
  (upstream: {SOURCE_URL}), folder `{ICON_DIR}`:
  the first {count} regular files in sorted file-name order (symlinks, which
  are aliases of other icons, are skipped).
- Modified: each icon was resized from 256x256 to {size}x{size} (RGBA, alpha kept,
  Lanczos) and re-encoded as PNG without metadata. File names are unchanged.

## Licence and credits

The theme is dual-licensed, CC-BY-SA-4.0 or GPL-3+. These icons are used and
redistributed here under **CC BY-SA 4.0**
({CC_BY_SA_URL}); the resized copies are under
the same licence. This applies to the files in this folder only,
not to the rest of the repository.

Credits, as the package's copyright file gives them:

{quoted_files}

and its licence paragraph starts:

    {licence_line}

The source PNGs' own metadata (dropped when resizing) names these authors:
{authors}.

`COPYRIGHT` is the package's `{COPYRIGHT_FILE}`, copied
unchanged; it holds the full text of CC BY-SA 4.0.

Many icons show the logos of the applications they stand for; those names and
logos may be trademarks of their owners, which the licence does not cover.

The demo query `search.jpg` at the top of the repository is `{QUERY_ICON}` from
the same folder and package (so under the same licence and credits), which is
not among the indexed icons, flattened on white and saved as JPEG.

## Rebuilding

    python tools/build_icons.py

(fetches the package with `apt-get download {PACKAGE}={VERSION}`; pass
`--deb PATH` to use a .deb already downloaded, `--clean` to remove PNGs in the
folder that the build does not produce).
"""


def write_query(root: Path, icons: list[Path], query: Path) -> None:
    """Save QUERY_ICON, composited on white, as the JPEG `query`."""
    src = root / ICON_DIR / QUERY_ICON
    if src in icons:
        raise BuildError(f"{QUERY_ICON} is among the indexed icons; pick another query")
    with Image.open(src) as im:
        rgba = im.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    buf = io.BytesIO()
    flat.save(buf, format="JPEG", quality=90)
    atomic_write(query, buf.getvalue())


def build(deb: Path, out: Path, count: int, size: int, clean: bool, query: Path | None = None) -> int:
    """Check and unpack deb, write the icons and notices into out (and the
    demo query image if `query` is given); return icon count."""
    check_deb(deb)
    with tempfile.TemporaryDirectory(prefix="moka-") as tmp:
        root = extract_deb(deb, Path(tmp))
        icons = list_icons(root, count)
        out.mkdir(parents=True, exist_ok=True)
        authors = write_icons(icons, out, size)
        if query is not None:
            write_query(root, icons, query)
        copyright_text = (root / COPYRIGHT_FILE).read_text(encoding="utf-8")
    atomic_write(out / "COPYRIGHT", copyright_text.encode("utf-8"))
    files_para, licence_line = copyright_quotes(copyright_text)
    readme = readme_text(files_para, licence_line, count, size, authors_note(authors))
    atomic_write(out / "README.md", readme.encode("utf-8"))
    _handle_stale(out, {p.name for p in icons}, clean)
    return len(icons)


def _handle_stale(out: Path, keep: set[str], clean: bool) -> None:
    """Delete (with --clean) or report PNGs in out that this build did not write."""
    stale = stale_pngs(out, keep)
    if not stale:
        return
    if clean:
        for p in stale:
            p.unlink()
        print(f"removed {len(stale)} old PNG(s) from {out}", file=sys.stderr)
    else:
        print(f"note: {out} holds {len(stale)} other PNG(s); --clean removes them", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deb", type=Path, help=f"use this {PACKAGE}_{VERSION}_all.deb instead of apt-get download")
    ap.add_argument("--out", type=Path, default=Path("icons"), help="output folder (default: icons)")
    ap.add_argument("--count", type=int, default=300, help="number of icons (default: 300)")
    ap.add_argument("--size", type=int, default=128, help="side in pixels (default: 128)")
    ap.add_argument("--clean", action="store_true", help="remove PNGs in --out that this build does not write")
    ap.add_argument("--query", type=Path, default=Path("search.jpg"),
                    help=f"also write the demo query ({QUERY_ICON}, not indexed) here (default: search.jpg)")
    args = ap.parse_args(argv)
    if args.count < 1 or args.size < 1:
        ap.error("--count and --size must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit status."""
    args = parse_args(argv)
    try:
        if args.deb is not None:
            n = build(args.deb, args.out, args.count, args.size, args.clean, args.query)
        else:
            with tempfile.TemporaryDirectory(prefix="moka-deb-") as tmp:
                deb = download_deb(Path(tmp))
                n = build(deb, args.out, args.count, args.size, args.clean, args.query)
    except (BuildError, OSError) as exc:
        print(f"build_icons: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {n} icons ({args.size}x{args.size}) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
