#!/usr/bin/env python
"""Find the indexed images that look most like a query image.

    python imagenet_search.py --query search.jpg --featuresPath imagenet_features.csv
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from search_utils import cli

with cli.interrupts_while_starting():
    from search_utils import plot, vector_db
    from search_utils.errors import PictureError, SearchUtilsError, printable_path
    from search_utils.models import MODELS, load_extractor
    from search_utils.modes import DEFAULT_MODE, MODES
    from search_utils.searcher import Searcher, check_query_file, features_file_at, read_query

DEFAULT_PICTURE = "search_results.png"


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-q", "--query", required=True, help="query image")
    parser.add_argument("-f", "--featuresPath", required=True, help="features file made by create_imagenet_features.py")
    parser.add_argument("-n", "--numResults", type=int, default=5, help="how many results (default: 5)")
    parser.add_argument("--metric", default=DEFAULT_MODE, choices=list(MODES),
                        help=f"search mode (default: {DEFAULT_MODE}, the post's); "
                             "whitened: the best measured, see README")
    parser.add_argument("--exact", action="store_true",
                        help="scan every row, even where an ANN index (<features>.ann) would be used "
                             "(chi2 on large collections)")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="list copies of the same image separately (default: one entry with its copies)")
    parser.add_argument("--model", choices=sorted(MODELS),
                        help="expected model; refuse a features file made with another")
    parser.add_argument("--weights", metavar="PATH",
                        help="local weights file for embedding an outside query (default: as recorded when indexing)")
    parser.add_argument("--db", metavar="URI", type=vector_db.database_uri,
                        help="take chi2 candidates from this PostgreSQL + pgvector database (kept by "
                             "create_imagenet_features.py --db) and re-rank them exactly from the features file")
    parser.add_argument("--json", action="store_true",
                        help="print results as JSON; no picture then, unless --save is given (JSON is for scripts)")
    picture = parser.add_mutually_exclusive_group()
    picture.add_argument("--save", metavar="FILE",
                         help="save the results picture to FILE instead of showing it, in the format its extension "
                              "names (png, jpg, pdf, svg, ...: what matplotlib can write); with no extension, "
                              ".png is appended and the message names the file written. A folder is refused: "
                              "name a file in it. Without --save the picture opens in a window, or, with no "
                              f"display, is saved to {DEFAULT_PICTURE} in the current folder")
    picture.add_argument("--no-plot", action="store_true", help="no results picture")
    args = parser.parse_args(argv)
    check_working_folder()
    if args.numResults < 1:
        parser.error(f"argument -n/--numResults: must be at least 1, got {args.numResults}")
    for option, value in (("-q/--query", args.query), ("-f/--featuresPath", args.featuresPath),
                          ("--weights", args.weights)):
        if value is not None and not value:
            parser.error(f"argument {option}: empty")
    if args.weights is not None and not os.path.isfile(args.weights):
        why = "is a folder, not a weights file" if os.path.isdir(args.weights) else "file not found"
        parser.error(f"argument --weights: {printable_path(args.weights)}: {why}")
    if args.save is not None:
        try:
            plot.check_picture_name(args.save)
            plot.check_not_a_folder(args.save)
        except PictureError as error:
            parser.error(f"argument --save: {error}")
    return args


class WorkingFolderError(SearchUtilsError):
    """The current folder was deleted (or moved away) under the command."""


def check_working_folder() -> None:
    """Relative paths and the default picture need the current folder.

    Raises:
        WorkingFolderError: it no longer exists.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        raise WorkingFolderError("the current folder no longer exists (deleted or moved away): change to an "
                                 "existing folder and run the command again") from None


@dataclass(frozen=True)
class PicturePlan:
    file: str | None = None  # where the picture is saved; None: not saved
    show: bool = False  # open it in a window


def plan_picture(args) -> PicturePlan:
    """Where the picture goes, checked before the search does any work, so a
    picture that can't be written fails at once, not after the search.

    Raises:
        PictureError: the file can't be written (see plot.picture_file).
    """
    if args.no_plot or (args.json and args.save is None):
        return PicturePlan()
    if args.save is not None:
        return PicturePlan(file=checked_picture_file(args.save, args))
    if plot.display_available():
        return PicturePlan(show=True)
    try:
        return PicturePlan(file=checked_picture_file(DEFAULT_PICTURE, args))
    except PictureError as error:
        raise PictureError(f"{error}; there is no display to show it, so pass --save PATH to save it "
                           f"elsewhere, or --no-plot") from None


def checked_picture_file(name: str, args) -> str:
    """The picture's file (plot.picture_file), refused if it is the query
    or one of the features file's own files: saving would replace it."""
    file = plot.picture_file(name)
    try:
        overwrites_query = os.path.samefile(file, args.query)
    except OSError:  # either is missing: not the same file
        overwrites_query = False
    if overwrites_query:  # the picture would replace the very image it shows
        raise PictureError(f"cannot save the picture to {printable_path(file)}: it is the query image")
    features_file = features_file_at(file, args.featuresPath)
    if features_file:
        raise PictureError(f"cannot save the picture to {printable_path(file)}: it is {features_file}")
    return file


def check_picture_not_indexed(args, picture: PicturePlan, searcher) -> None:
    """Refuse, before the search, a picture file that is one of the indexed
    images (saving would replace the user's image).

    Raises:
        PictureError: naming the image.
    """
    if picture.file is None:
        return
    image = searcher.indexed_at(picture.file)
    if image is not None:
        extra = ("" if args.save is not None else
                 "; there is no display to show it, so pass --save PATH to save it elsewhere, or --no-plot")
        raise PictureError(f"cannot save the picture to {printable_path(picture.file)}: it is an indexed image "
                           f"of {printable_path(args.featuresPath)} ({printable_path(image)}){extra}")


def query_vector(args, searcher) -> tuple:
    """The query's features, and whether they are its stored ones: an
    indexed query that is unchanged since it was indexed reuses its row
    (no model); any other query is read, then embedded with the model the
    features file was made with.

    Raises:
        ImageReadError: the query is missing or not a readable image.
    """
    check_query_file(args.query)
    stored = searcher.stored_query(args.query)
    if stored.row is not None:
        return searcher.store.features[stored.row], True
    model = searcher.model
    image = read_query(args.query, model.spec.input_size, model.spec.resize)
    if stored.note:  # once the image is known to be readable: a refused query is its one error line
        print(stored.note, file=sys.stderr)
    extractor = load_extractor(model.spec, args.weights or model.weights, model.precision)
    return extractor.embed(image[None])[0], False


def main(argv=None) -> int:
    args = parse_args(argv)
    picture = plan_picture(args)
    note_what_the_database_serves(args)
    searcher = Searcher(args.featuresPath, args.model, backend=vector_db.search_backend(args.db))
    model = searcher.model
    check_picture_not_indexed(args, picture, searcher)
    query, reused = query_vector(args, searcher)
    found = searcher.search(query, args.metric, args.numResults, args.exact, collapse=not args.keep_duplicates)
    # Notes once the search went through: a refused search is its one error line.
    if found.method:
        print(found.method, file=sys.stderr)
    if model.assumed:
        shown = printable_path(args.featuresPath)
        why = f"the metadata of {shown} names no model" if searcher.store.metadata else f"{shown} has no metadata file"
        print(f"note: {why}; took it for the post's {model.spec.name} features", file=sys.stderr)
    if reused:
        print(f"reused the query's stored features: it is indexed in {printable_path(args.featuresPath)}",
              file=sys.stderr)
    else:
        print(f"embedded the query with {model.spec.name}", file=sys.stderr)
    print_results(args, found.hits)
    note_fewer_results(args, len(searcher), found.hits)
    show_picture(args, picture, found.hits)
    return 0


def note_what_the_database_serves(args) -> None:
    if args.db and (args.metric != "chi2" or args.exact):
        why = "--exact" if args.exact else f"--metric {args.metric}"
        print(f"note: {why} scans every row of the features file; the database serves chi2 candidates",
              file=sys.stderr)


def note_fewer_results(args, rows: int, hits: list) -> None:
    if len(hits) >= args.numResults:
        return
    folded = "" if args.keep_duplicates else " (copies of one image count once)"
    results, images = ("result" if len(hits) == 1 else "results"), ("image" if rows == 1 else "images")
    print(f"note: {len(hits)} {results}, fewer than the {args.numResults} asked for: "
          f"{printable_path(args.featuresPath)} holds {rows} {images}{folded}", file=sys.stderr)


def print_results(args, hits) -> None:
    if args.json:
        results = [{"rank": h.rank, "distance": h.distance, "path": h.path, "copies": list(h.copies)}
                   for h in hits]
        print(json.dumps({"query": args.query, "metric": args.metric, "results": results}, indent=2))
        return
    width = max([8] + [len(f"{h.distance:.4f}") for h in hits])
    print(f"rank  {'distance':>{width}}  path")
    for h in hits:
        print(f"{h.rank:>4}  {h.distance:>{width}.4f}  {printable_path(h.path)}{copies_note(h)}")


def copies_note(hit) -> str:
    if not hit.copies:
        return ""
    noun = "copy" if len(hit.copies) == 1 else "copies"
    return f"  (+{len(hit.copies)} {noun}: {', '.join(map(printable_path, hit.copies))})"


def show_picture(args, picture: PicturePlan, hits: list) -> None:
    if picture.file is None and not picture.show:
        return
    shown = hits[:plot.MOST_RESULTS_SHOWN]
    if len(shown) < len(hits):
        print(f"note: the picture shows the first {len(shown)} of the {len(hits)} results", file=sys.stderr)
    figure = plot.results_figure(args.query, shown)
    if picture.file is not None:
        plot.save_figure(figure, picture.file)
        renamed = args.save is not None and picture.file != args.save
        print(f"saved the results picture to {printable_path(picture.file)}"
              f"{' (.png appended: --save had no extension)' if renamed else ''}", file=sys.stderr)
    if picture.show:
        plot.show_figure(figure)


if __name__ == "__main__":
    sys.exit(cli.run(main))
