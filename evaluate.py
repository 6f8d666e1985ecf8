#!/usr/bin/env python
"""Measure retrieval quality: every labelled image in a features file queries
all the others; images with the same label are the relevant ones.

    python evaluate.py imagenet_features.csv --labels labels.csv --group vendor
"""

from __future__ import annotations

import json
import sys

from search_utils import cli

with cli.interrupts_while_starting():
    from search_utils.errors import LabelsError, printable_path
    from search_utils.evaluation import evaluate, labels_from_folders, labels_from_records, read_label_records
    from search_utils.metrics import METRIC_NAMES
    from search_utils.modes import DEFAULT_MODE, MODES, search_space
    from search_utils.result_paths import path_base
    from search_utils.store import load_features


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("features", help="features file made by create_imagenet_features.py")
    parser.add_argument("--labels", help="CSV (with a header) or JSON list of records with 'path' and 'label'; "
                                         "paths relative to the labels file (default: each image's folder name)")
    parser.add_argument("--group", metavar="KEY",
                        help="a field of the records (e.g. vendor): count only hits from another group")
    parser.add_argument("--metric", default=DEFAULT_MODE, choices=list(MODES),
                        help=f"search mode to score (default: {DEFAULT_MODE})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.group and not args.labels:
        parser.error("--group needs --labels")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    store = load_features(args.features)
    # Where relative image paths start (a base_dir that is no folder's absolute path is noted, not used).
    base = path_base(store.metadata.get("base_dir"), args.features, store.paths)
    if base.note:
        print(base.note, file=sys.stderr)
    base_dir = base.folder
    if args.labels:
        records = read_label_records(args.labels)
        labels = labels_from_records(store.paths, records, args.labels, args.group, base_dir)
    else:
        labels = labels_from_folders(store.paths)
    if labels.labelled == 0:
        source = printable_path(args.labels) if args.labels else "its folder name"
        raise LabelsError(f"no image of {printable_path(args.features)} has a label in {source}")
    space = search_space(store, args.metric, source=args.features)  # refuses values the mode can't use
    result = evaluate(space.vectors, labels, metric=space.metric)
    if result["queries"] == 0:
        raise LabelsError("no query has a relevant image to find (every label is unique)")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'metric':<8}{'value':>8}")
        for name in METRIC_NAMES:
            print(f"{name:<8}{result[name]:>8.4f}")
        print(f"{'queries':<8}{result['queries']:>8}")
    print(f"scored {result['queries']} queries ({labels.labelled} labelled of {len(store)} images), "
          f"mode {args.metric}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
