"""CLI commands about models: models, rules, infer, explain, datasets, evaluate, threshold, train.

Kept apart from ``cli.py`` so that the listener's commands never import torch: each command imports
the model side only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dicomnode.config import Config


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def cmd_rules_test(config: Config, args: argparse.Namespace) -> int:
    """Show which model each file would get, and why."""
    from pydicom import dcmread

    from dicomnode.routing import route_image

    results = []
    for name in args.files:
        try:
            header = dcmread(name, stop_before_pixels=True)
        except Exception as exc:
            results.append({"file": name, "route": None, "model": None, "reason": f"unreadable: {exc}"})
            continue
        decision = route_image(config.routes, header, args.calling_ae)
        results.append({"file": name, **decision.to_dict()})
    if args.json:
        _print_json(results)
    else:
        for item in results:
            print(f"{item['file']}: {item['model'] or 'no model'} — {item['reason']}")
    return 0


def add_commands(sub: Any) -> None:
    """Register the model-side subcommands on the main parser."""
    rules = sub.add_parser("rules", help="routing rules").add_subparsers(dest="rules_command", required=True)
    p = rules.add_parser("test", help="show which model would run on each file and why")
    p.add_argument("files", nargs="+")
    p.add_argument("--calling-ae", help="pretend the files came from this calling AE title")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules_test)


__all__ = ["add_commands"]
