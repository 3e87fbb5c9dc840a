"""``dicomnode compare MODEL_A MODEL_B``: two models' findings on the same images, from the node's
own results (a route's reporting model against its shadow, see docs/models.md)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode.cli._output import EXIT_OK, print_json
from dicomnode.config import Config


def cmd_compare(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.cli.admin import existing_database
    from dicomnode.lifecycle.evaluation.compare import (
        ModelRef,
        compare,
        format_comparison,
        load_labels,
        paired_results,
        parse_since,
    )

    model_a, model_b = ModelRef.parse(args.model_a), ModelRef.parse(args.model_b)
    since = datetime.now(UTC) - parse_since(args.since)
    labels = load_labels(Path(args.labels)) if args.labels else None  # a CSV mistake before the query
    with existing_database(config) as services:
        pairs = paired_results(services.sessions, model_a, model_b, since)
    result = compare(pairs, str(model_a), str(model_b), args.since, labels, args.labels)
    if args.json:
        print_json(result.to_dict())
    else:
        print(format_comparison(result))
    return EXIT_OK


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``compare`` on the main parser."""
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="agreement, score correlation and AUROC of two models on the jobs where both ran",
    )
    p.add_argument("model_a", metavar="MODEL_A", help="NAME or NAME@VERSION (e.g. the reporting model)")
    p.add_argument("model_b", metavar="MODEL_B", help="NAME or NAME@VERSION (e.g. its shadow)")
    p.add_argument("--since", default="7d", help="how far back: 7d, 12h, 30m (default 7d)")
    p.add_argument(
        "--labels",
        metavar="CSV",
        help="truths: a sop_instance_uid or study_instance_uid column and 0/1 label columns",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)
