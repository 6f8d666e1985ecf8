#!/usr/bin/env python
"""Find the indexed images that look most like a query image.

    python imagenet_search.py --query search.jpg --featuresPath imagenet_features.csv
"""

from __future__ import annotations

import json
import sys

from search_utils import ann, cli, plot
from search_utils.errors import printable_path
from search_utils.engine import query_features, store_model
from search_utils.models import MODELS, load_extractor
from search_utils.modes import DEFAULT_MODE, MODES, search_space
from search_utils.search import nearest
from search_utils.store import load_features

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
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--save", metavar="PNG", help="save the results picture here")
    parser.add_argument("--no-plot", action="store_true", help="no results picture")
    args = parser.parse_args(argv)
    if args.numResults < 1:
        parser.error(f"argument -n/--numResults: must be at least 1, got {args.numResults}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    store = load_features(args.featuresPath, mmap=True)  # HDF5: rows are read when used
    model = store_model(store, args.model)
    weights = args.weights or model.weights
    query, reused = query_features(store, args.query, model.spec,
                                   lambda: load_extractor(model.spec, weights, model.precision))
    if model.assumed:
        print(f"note: {args.featuresPath} has no metadata file; took it for the post's "
              f"{model.spec.name} features", file=sys.stderr)
    if not reused:
        print(f"embedded the query with {model.spec.name}", file=sys.stderr)
    hits = find_hits(args, store, query)
    print_results(args, hits)
    show_picture(args, hits)
    return 0


def find_hits(args, store, query) -> list:
    """chi2 goes through a fresh ANN index beside the features when there is
    one (large collections, see search_utils/ann.py) unless --exact; every
    other case scans every row."""
    index = None
    if args.metric == "chi2" and not args.exact:
        index = ann.fresh_index(args.featuresPath, store.features)
    if index is not None:
        candidates = max(ann.DEFAULT_CANDIDATES, 4 * args.numResults)
        print(f"approximate search ({index.describe()}, {candidates} candidates re-ranked "
              "with exact chi2; --exact scans every row)", file=sys.stderr)
        return ann.nearest(index, store.features, store.paths, query, args.numResults,
                           candidates=candidates, collapse=not args.keep_duplicates)
    if args.exact or len(store) >= ann.DEFAULT_THRESHOLD:
        print(f"exact search ({len(store):,} rows)", file=sys.stderr)
    space = search_space(store, args.metric)
    return nearest(space.vectors, store.paths, space.to_space(query), args.numResults,
                   space.metric, collapse=not args.keep_duplicates)


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


def show_picture(args, hits) -> None:
    if args.no_plot:
        return
    figure = plot.results_figure(args.query, hits)
    target = args.save
    if target is None and not plot.display_available():
        target = DEFAULT_PICTURE
    if target:
        plot.save_figure(figure, target)
        print(f"saved the results picture to {target}", file=sys.stderr)
    if plot.display_available() and args.save is None:
        plot.show_figure(figure)


if __name__ == "__main__":
    sys.exit(cli.run(main))
