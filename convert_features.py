#!/usr/bin/env python
"""Convert a features file between the post's CSV and the binary HDF5 format,
keeping its metadata and stored whitening.

    python convert_features.py imagenet_features.csv imagenet_features.h5
    python convert_features.py imagenet_features.h5 imagenet_features.csv

The input's format is recognised by its content, the output's by its
extension (.csv, .h5, .hdf5). Converting float32 HDF5 back to CSV gives the
CSV byte for byte. Converting a file onto itself rewrites it (an HDF5 file
that was appended to becomes memory-mappable again).
"""

from __future__ import annotations

import os
import sys

from search_utils import cli
from search_utils.store import HDF5_EXTENSIONS, file_format, load_features, output_format, save_features


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("input", help="features file to read (CSV or HDF5)")
    parser.add_argument("output", help="features file to write: .csv (the post's text format), .h5 or .hdf5 (binary)")
    parser.add_argument("--float16", action="store_true",
                        help="store the features as float16 (HDF5 only): half the size, about 3 significant "
                             "digits; still read as float32")
    args = parser.parse_args(argv)
    if args.float16 and os.path.splitext(args.output)[1].lower() not in HDF5_EXTENSIONS:
        parser.error(f"--float16 needs an HDF5 output ({', '.join(HDF5_EXTENSIONS)}), not {args.output}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    target = output_format(args.output)  # an unsupported extension fails before any reading
    store = load_features(args.input)
    source = f"{file_format(args.input)}, {_size(args.input)}"
    dtype = "float16" if args.float16 else "float32"
    save_features(args.output, store, dtype=dtype)
    whitening = "with" if store.whitening_arrays is not None else "no"
    stored = f"{target}, {dtype}" if target == "hdf5" else target
    print(
        f"converted {len(store)} images x {store.dim} values ({whitening} whitening): "
        f"{args.input} ({source}) -> {args.output} ({stored}, {_size(args.output)})",
        file=sys.stderr,
    )
    return 0


def _size(path: str) -> str:
    size = os.path.getsize(path)
    if size < 1000:
        return f"{size} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}"


if __name__ == "__main__":
    sys.exit(cli.run(main))
