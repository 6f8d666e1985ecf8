#!/usr/bin/env python
"""Index a folder of images: one feature vector per image, into a features file.

    python create_imagenet_features.py --dataset icons --output imagenet_features.csv

Running it again embeds only what changed (new, changed and renamed files;
removed ones are dropped); an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from search_utils import cli

with cli.interrupts_while_starting():
    from search_utils import ann, ray_indexing, vector_db
    from search_utils.engine import (IndexEvents, ModelChoice, UpdateReport, check_output, list_dataset,
                                     update_index)
    from search_utils.locking import exclusive_output
    from search_utils.models import (DEFAULT_MODEL, MODELS, PRECISIONS, RUNTIMES, bf16_supported, get_model_spec,
                                     load_extractor)
    from search_utils.store import load_features


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-d", "--dataset", required=True, help="folder of images to index (searched recursively)")
    parser.add_argument("-o", "--output", required=True, help="features file to write (CSV, as in the post)")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                        help=f"backbone (default: {DEFAULT_MODEL}, the post's)")
    parser.add_argument("--weights", metavar="PATH",
                        help="local weights file, for machines without internet (default: the model's own: "
                             "Keras downloads ImageNet weights; efficientnet_lite0's come with pip)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="float32 (default: features identical to the post's) or bf16 "
                             "(faster on CPUs with bfloat16 instructions; features within about 1%%)")
    parser.add_argument("--runtime", default="tensorflow", choices=RUNTIMES,
                        help="tensorflow (default) or openvino: the same model converted by OpenVINO, "
                             "about 1.4x faster on CPUs, features equal to about 1e-6")
    parser.add_argument("--resize", choices=["nearest", "bilinear", "bicubic", "lanczos"],
                        help="resize filter (default: the model's: nearest for resnet50, as in the post; "
                             "bilinear for the others, which measured better)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per model call (default: 32)")
    parser.add_argument("--rebuild", action="store_true",
                        help="forget what earlier runs embedded and index everything again "
                             "(needed to switch an existing features file to another model)")
    parser.add_argument("--ann-threshold", type=positive_int, default=ann.DEFAULT_THRESHOLD, metavar="N",
                        help="build an approximate-search index beside the features once the collection has "
                             f"N images or more (default: {ann.DEFAULT_THRESHOLD:,}; below it an exact scan "
                             "is fast enough)")
    parser.add_argument("--include-hidden", action="store_true",
                        help="also index hidden files and folders (names starting with a dot, e.g. .thumbnails/, "
                             "which usually hold copies of the real pictures)")
    scale = parser.add_argument_group("large collections and clusters (pip install -r requirements-scale.txt)")
    scale.add_argument("--ray", nargs="?", const=ray_indexing.LOCAL, metavar="ADDRESS", type=ray_indexing.ray_address,
                       help="embed on a Ray cluster: host:port of a running one's head, or `auto` (RAY_ADDRESS, "
                            "else the cluster started on this machine); without ADDRESS, a local one is started "
                            "for the run. Workers read the same paths (a shared file system)")
    scale.add_argument("--ray-actors", type=positive_int, metavar="N",
                       help="model copies on the cluster (default: one per 2 CPUs it has)")
    scale.add_argument("--db", metavar="URI", type=vector_db.database_uri,
                       help="also keep the vectors in this PostgreSQL + pgvector database (postgresql://...), "
                            "for imagenet_search.py --db; only the difference is sent")
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
        print("note: this CPU has no AMX bfloat16 units (amx_bf16), where bf16 would be slower than float32: "
              "using float32", file=sys.stderr)
        return "float32"
    return requested


def main(argv=None) -> int:
    args = parse_args(argv)
    # one line and exit 2 if down, or if the tables can't be made, before any work
    database = vector_db.open_database(args.db, writing=True) if args.db else None
    spec = get_model_spec(args.model)
    if args.resize:
        spec = dataclasses.replace(spec, resize=args.resize)
    # Fail fast, before the model loads; name each subfolder that can't be listed.
    unlisted = []  # subfolders that can't be listed: their recorded images keep their rows

    def folder_error(error):
        unlisted.append(error.path)
        print(f"skipping {error}", file=sys.stderr)

    paths = list_dataset(args.dataset, on_error=folder_error, include_hidden=args.include_hidden)
    check_output(args.output)  # every file the run writes, before its lock file is made beside it
    choice = ModelChoice(spec, args.weights, choose_precision(spec, args.precision), args.runtime)
    with exclusive_output(args.output), Progress(args.quiet) as progress:  # lock before any work
        events = progress.events()
        report = update_index(args.dataset, args.output, choice, extractor_factory(args, choice, events.note),
                              paths, args.batch_size, args.rebuild, events, unlisted)
        keep_ann_index(args.output, report.rows, args.ann_threshold)  # under the lock: nobody replaces the file
        if database is not None:
            sync_database(database, args.output, args.rebuild)
    print(summary(report), file=sys.stderr)
    return 0


def extractor_factory(args, choice: ModelChoice, note):
    """What embeds: this process's model, or an actor pool on a Ray cluster
    (built only if something needs embedding)."""
    if args.ray is None:
        return lambda: load_extractor(choice.spec, args.weights, choice.precision, choice.runtime)
    return lambda: ray_indexing.RayEmbedder(args.ray, choice, actors=args.ray_actors, note=note)


def sync_database(database, output: str, rebuild: bool) -> None:
    """Send the database what changed in the features file just published
    (a failure here leaves the file published: the next run sends the rest)."""
    try:
        report = database.sync(output, load_features(output, mmap=True), rebuild=rebuild,
                               note=lambda text: print(f"note: {text}", file=sys.stderr))
    except vector_db.DatabaseError as error:
        raise vector_db.DatabaseError(f"{output} is written, but the database was not updated: {error}; "
                            f"run the same command again to send the difference") from None
    finally:
        database.close()
    print(str(report), file=sys.stderr)


def keep_ann_index(output: str, rows: int, threshold: int) -> None:
    """Build or refresh `<output>.ann` for large collections; drop it when the
    collection shrank below `threshold`. Small collections read nothing more.
    A failed write names the index and says the features file is written."""
    from search_utils.engine import keep_ann_index as keep

    if rows < threshold and not os.path.exists(ann.index_path(output)):
        return
    keep(output, rows, threshold, note=lambda text: print(f"note: {text}", file=sys.stderr))


def summary(report: UpdateReport) -> str:
    """The last line of a run: what changed, what was done."""
    from search_utils.errors import printable_path

    output = printable_path(report.output)
    head = (f"indexed {report.rows} images with {report.model} into {output}: "
            f"{report.changes.counts()} ({report.skipped} skipped)")
    if report.embedded or report.failed:
        return (f"{head}; embedded {report.embedded} in {report.seconds:.1f} s, "
                f"{report.images_per_second:.1f} images/s")
    if report.written:
        return f"{head}; nothing to embed, features file written from the indexing state"
    return f"{head}; nothing to embed, {output} left as it was"


class Progress:
    """Notes and skipped files on stderr, and a progress bar over the images
    to embed (none when nothing needs embedding, or with --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def events(self) -> IndexEvents:
        return IndexEvents(note=lambda text: self._line(f"note: {text}"),
                           skip=lambda error: self._line(f"skipping {error}"),
                           embedding=self._start, progress=self._advance)

    def _start(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", file=sys.stderr, disable=self.quiet, desc="indexing",
                        dynamic_ncols=True)

    def _advance(self, count: int) -> None:
        self.bar.update(count)
        if self.bar.n >= self.bar.total:
            self.bar.close()  # done: its time is the embedding's, not the writing's

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(cli.run(main))
