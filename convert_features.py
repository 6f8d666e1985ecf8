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
import tempfile

from search_utils import cli

with cli.interrupts_while_starting():
    import numpy as np

    from search_utils.errors import FeaturesFileError, printable_path
    from search_utils.store import (
        HDF5_EXTENSIONS, NEXT_SUFFIX, file_format, load_features, output_format, save_features,
    )
    from search_utils.store.atomic import (
        TEMPORARY_SUFFIX, name_length_problem, regular_file_problem, temporary_prefix,
    )
    from search_utils.store.hdf5_format import FLOAT16_MAX


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("input", help="features file to read (CSV or HDF5)")
    parser.add_argument("output", help="features file to write: .csv (the post's text format), .h5 or .hdf5 (binary)")
    parser.add_argument("--float16", action="store_true",
                        help="store the features as float16 (HDF5 only): half the size, about 3 significant "
                             "digits; still read as float32")
    args = parser.parse_args(argv)
    if args.float16 and os.path.splitext(args.output)[1].lower() not in HDF5_EXTENSIONS:
        parser.error(f"--float16 needs an HDF5 output ({', '.join(HDF5_EXTENSIONS)}), not "
                     f"{printable_path(args.output)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    target = output_format(args.output)  # an unsupported extension fails before any reading
    check_writable(args.output)  # so does a place that can't be written
    store = load_features(args.input)  # refuses NaN, infinity, empty paths: neither reader would take them back
    source = f"{file_format(args.input)}, {_size(args.input)}"
    dtype = "float16" if args.float16 else "float32"
    check_storable(args.input, store, target, dtype)
    if store.whitening_arrays is not None and not all(np.isfinite(a).all() for a in store.whitening_arrays.values()):
        # Either reader would drop it as damaged: don't copy it.
        print(f"note: the whitening stored with {printable_path(args.input)} holds values that are not finite "
              f"numbers (damaged?); not copied (search learns it again when needed)", file=sys.stderr)
        store.whitening_arrays = None
    save_features(args.output, store, dtype=dtype)
    whitening = "with" if store.whitening_arrays is not None else "no"
    stored = f"{target}, {dtype}" if target == "hdf5" else target
    print(
        f"converted {len(store)} images x {store.dim} values ({whitening} whitening): "
        f"{printable_path(args.input)} ({source}) -> {printable_path(args.output)} ({stored}, {_size(args.output)})",
        file=sys.stderr,
    )
    return 0


def check_writable(output: str) -> None:
    """Refuse, before the input is read, an output that can't be written:
    a folder's name, a FIFO, socket or device, a folder that doesn't exist
    or isn't a folder, a folder this user can't write in (tried for real,
    with a temporary file that is removed at once), a name too long for the
    file system (with the sidecars a CSV gets beside it).

    Raises:
        FeaturesFileError: which, in one line.
    """
    shown = printable_path(output)
    if os.path.isdir(output):
        raise FeaturesFileError(f"cannot write {shown}: it is a folder; name a file in it")
    problem = regular_file_problem(output)
    if problem:
        raise FeaturesFileError(f"cannot write {shown}: {problem}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        missing = "does not exist" if not os.path.exists(folder) else "is a file, not a folder"
        raise FeaturesFileError(f"cannot write {shown}: folder {printable_path(folder)} {missing}")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(output), suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise FeaturesFileError(f"cannot write {shown}: folder {printable_path(folder)}: "
                                f"{error.strerror or error}") from None
    os.close(handle)
    os.unlink(probe)
    sidecars = {".whitening.npz" + NEXT_SUFFIX: "the whitening file being published"}
    problem = name_length_problem(output, sidecars if output_format(output) == "csv" else {})
    if problem:
        raise FeaturesFileError(f"cannot write {shown}: {problem}")


def check_storable(input_path: str, store, target: str, dtype: str) -> None:
    """Refuse, before writing, what the output format can't hold: values
    beyond float16's range (--float16), a NUL character in a path (HDF5;
    no file name holds one, but a CSV row can).

    Raises:
        FeaturesFileError: naming the input's row where it helps.
    """
    if dtype == "float16" and store.features.size:
        largest = float(np.abs(store.features).max())
        if largest > FLOAT16_MAX:
            row = int(np.flatnonzero((np.abs(store.features) > FLOAT16_MAX).any(axis=1))[0])
            raise FeaturesFileError(
                f"{printable_path(input_path)} holds values up to {largest:g} (first in row {row + 1}, "
                f"{printable_path(store.paths[row])}), beyond float16's {FLOAT16_MAX:g}: convert without --float16"
            )
    if target == "hdf5":
        for row, image_path in enumerate(store.paths, start=1):
            if "\0" in image_path:
                raise FeaturesFileError(
                    f"malformed features file {printable_path(input_path)}: row {row} ({printable_path(image_path)}) "
                    f"has a NUL character in its image path, which no file name can hold"
                )


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
