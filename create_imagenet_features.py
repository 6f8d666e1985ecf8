#!/usr/bin/env python
"""Index a folder of images: one feature vector per image, into a features file.

    python create_imagenet_features.py --dataset icons --output imagenet_features.csv
"""

from __future__ import annotations

import dataclasses
import sys

from search_utils import cli
from search_utils.engine import index_folder, list_dataset
from search_utils.locking import exclusive_output
from search_utils.models import DEFAULT_MODEL, MODELS, PRECISIONS, bf16_supported, get_model_spec, load_extractor


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-d", "--dataset", required=True, help="folder of images to index (searched recursively)")
    parser.add_argument("-o", "--output", required=True, help="features file to write (CSV, as in the post)")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                        help=f"backbone (default: {DEFAULT_MODEL}, the post's)")
    parser.add_argument("--weights", metavar="PATH",
                        help="local weights file, for machines without internet (default: the model's own: Keras downloads ImageNet weights; efficientnet_lite0's come with pip)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="float32 (default: features identical to the post's) or bf16 "
                             "(faster on CPUs with bfloat16 instructions; features within about 1%%)")
    parser.add_argument("--resize", choices=["nearest", "bilinear", "bicubic", "lanczos"],
                        help="resize filter (default: the model's: nearest for resnet50, as in the post; "
                             "bilinear for the others, which measured better)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per model call (default: 32)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def choose_precision(spec, requested: str) -> str:
    """`requested`, unless bf16 would cost accuracy or isn't in the CPU."""
    if requested == "bf16" and not spec.bf16_ok:
        print(f"note: bf16 moves {spec.name}'s features by more than 1%: using float32", file=sys.stderr)
        return "float32"
    if requested == "bf16" and not bf16_supported():
        print("note: this CPU has no bfloat16 instructions (avx512_bf16, amx_bf16): using float32", file=sys.stderr)
        return "float32"
    return requested


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    spec = get_model_spec(args.model)
    if args.resize:
        spec = dataclasses.replace(spec, resize=args.resize)
    paths = list_dataset(args.dataset)  # fail fast, before the model loads
    precision = choose_precision(spec, args.precision)
    with exclusive_output(args.output):  # before the slow model build
        extractor = load_extractor(spec, args.weights, precision)
        with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=args.quiet,
                  desc="indexing", dynamic_ncols=True) as bar:
            def skip(error):
                bar.write(f"skipping {error}", file=sys.stderr)

            report = index_folder(args.dataset, args.output, extractor, paths, args.batch_size,
                                  on_progress=bar.update, on_skip=skip)
    done = len(report.result.paths)
    skipped = len(report.result.skipped)
    print(
        f"indexed {done} images with {spec.name} ({skipped} skipped) in {report.seconds:.1f} s, "
        f"{report.images_per_second:.1f} images/s -> {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
