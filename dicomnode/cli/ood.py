"""``dicomnode ood fit|check``: fit a model's out-of-distribution gate, and score files with it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dicomnode.cli.models import package_path
from dicomnode.config import Config
from dicomnode.errors import ConfigurationError


def cmd_ood_fit(config: Config, args: argparse.Namespace) -> int:
    """Fit the gate on the images of a labelled-dataset CSV or a folder; write it into the package."""
    from dicomnode.lifecycle.ood import fit_gate, reference_paths
    from dicomnode.models import load_model_package

    package = load_model_package(package_path(config, args.model))
    paths = reference_paths(Path(args.data))
    fitted_on = args.fitted_on or f"{len(paths)} images of {Path(args.data).name} trusted by the site"
    spec = fit_gate(package, paths, kind=args.kind, fitted_on=fitted_on, copies=args.copies)
    print(
        f"{package.card.name} {package.card.version}: {spec.kind} gate fitted on {spec.reference_images} "
        f"images, threshold {spec.threshold:.4f} -> {package.path / spec.file}"
    )
    return 0


def cmd_ood_check(config: Config, args: argparse.Namespace) -> int:
    """Print each file's gate score and decision (exit 1 when any file is refused)."""
    import numpy as np

    from dicomnode.imaging.preprocess import decode_model_input
    from dicomnode.models.ood import decide
    from dicomnode.work.inference import ModelRegistry

    path = package_path(config, args.model)
    registry = ModelRegistry(path.parent, device=config.worker.device)
    card = registry.package(path.name).card
    gate = registry.gate(path.name)
    if gate is None:
        raise ConfigurationError("ood", f"model {card.name} has no [ood] gate (fit one: dicomnode ood fit)")
    runner = registry.runner(path.name)
    batch = np.stack([decode_model_input(name, card.preprocessing)[0] for name in args.files])
    _, features = (
        runner.predict_with_features(batch) if gate.spec.kind == "feature-distance" else (None, None)
    )
    rows: list[dict[str, Any]] = []
    for name, decision in zip(args.files, decide(gate, batch, features), strict=True):
        rows.append({"file": name, **decision.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            verdict = "refused: out-of-distribution" if row["refused"] else "accepted"
            score, threshold = row["score"], row["threshold"]
            print(f"{row['file']}: {row['kind']} score {score:.4f} (threshold {threshold:.4f}) {verdict}")
    return 1 if any(row["refused"] for row in rows) else 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``ood fit`` and ``ood check``."""
    ood = sub.add_parser("ood", help="out-of-distribution gates").add_subparsers(
        dest="ood_command", required=True
    )
    p = ood.add_parser("fit", parents=[common], help="fit a model's gate on images the site trusts")
    p.add_argument("model", help="model name (in models.path) or package folder")
    p.add_argument("data", help="a labelled-dataset CSV (path column) or a folder of .dcm files")
    p.add_argument("--kind", choices=["feature-distance", "autoencoder"], default="feature-distance")
    p.add_argument("--copies", type=int, help="augmented copies per image (default: 0, autoencoder 8)")
    p.add_argument("--fitted-on", help="what the images are, in words, for the model card")
    p.set_defaults(func=cmd_ood_fit)
    p = ood.add_parser("check", parents=[common], help="score files with a model's gate")
    p.add_argument("model", help="model name (in models.path) or package folder")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ood_check)
