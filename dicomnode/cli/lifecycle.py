"""Commands of the ML lifecycle: dataset | evaluate | threshold | train. They import torch when they run."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

from dicomnode.cli._output import print_json
from dicomnode.cli.models import package_path
from dicomnode.config import Config
from dicomnode.errors import ConfigurationError


def cmd_dataset_check(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.datasets import check_dataset, load_labelled_dataset

    report = check_dataset(load_labelled_dataset(args.csv))
    if args.json:
        print_json(report.to_dict())
    else:
        print(report)
    return 0


def cmd_dataset_demo(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.demo import write_demo_dataset

    csv_path = write_demo_dataset(Path(args.out))
    print(f"16 demonstration radiographs and their labels written to {csv_path}")
    return 0


def _probabilities(config: Config, model: str, csv: str) -> tuple[Any, Any, list[Any]]:
    """Run the production path (decode under a time limit, the model card's preprocessing) on a dataset."""
    from dicomnode.lifecycle.datasets import load_labelled_dataset
    from dicomnode.sandbox import DecodePool
    from dicomnode.work.inference import ImageInput, ModelRegistry, predict
    from dicomnode.work.routing import RouteDecision

    dataset = load_labelled_dataset(csv)  # first: a CSV mistake is reported before the model loads
    path = package_path(config, model)
    registry = ModelRegistry(
        path.parent, device=config.worker.device, max_batch_size=config.worker.max_batch_size
    )
    card = registry.package(path.name).card
    decision = RouteDecision("evaluate", path.name, "evaluate")
    images = []
    with DecodePool(workers=1) as pool:
        for case in dataset.cases:
            image = ImageInput(case, Path(case.path), _header_or_empty(case.path), decision)
            try:
                image.array = pool.read_model_input(
                    image.path, card.preprocessing, timeout_s=config.worker.decode_timeout_seconds
                )
            except Exception as exc:  # counted and reported, never silently dropped
                image.error = f"{type(exc).__name__}: {exc}"
            images.append(image)
    predict(images, registry)
    return card, dataset, images


def _header_or_empty(path: str | Path) -> Any:
    from pydicom.dataset import Dataset

    from dicomnode.imaging.frames import read_header

    try:
        return read_header(path)
    except Exception:
        return Dataset()


def cmd_evaluate(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.evaluation import CaseResult, evaluate

    card, dataset, images = _probabilities(config, args.model, args.csv)
    labels = [label.name for label in card.labels if label.name in dataset.labels]
    if not labels:
        raise ConfigurationError(
            "labels",
            f"the dataset's labels {list(dataset.labels)} and the model's "
            f"{[label.name for label in card.labels]} have none in common",
        )
    cases = []
    failed = []
    for image in images:
        if image.probabilities is None:
            failed.append({"path": str(image.path), "error": image.error})
            continue
        probabilities = {f.label: f.probability for f in image.findings if f.label in labels}
        cases.append(CaseResult.from_case(image.key, probabilities))
    thresholds = {label.name: label.threshold for label in card.labels if label.name in labels}
    out_dir = Path(args.out) if args.out else None
    result = evaluate(cases, labels, thresholds, out_dir, n_bootstrap=args.bootstrap)
    summary = result.to_dict(include_roc=False)
    summary["model"] = {"name": card.name, "version": card.version}
    summary["unprocessed"] = failed
    if args.json:
        print_json(summary)
    else:
        for label, m in summary["overall"].items():
            print(_metrics_line(label, m))
        for caveat in summary.get("caveats", []):
            print(f"note: {caveat}")
        if failed:
            print(f"{len(failed)} files could not be processed (listed in --json output)")
        if out_dir is not None:
            print(f"report, plots and per-case probabilities written to {out_dir}")
    return 0


def _metrics_line(label: str, m: dict[str, Any]) -> str:
    """One readable line of a label's headline numbers ("undefined" where a metric cannot be computed)."""

    def num(value: Any) -> str:
        return "undefined" if value is None else f"{value:.2f}"

    def ci(value: Any) -> str:
        return "" if not value else f" ({num(value.get('low'))}–{num(value.get('high'))})"

    return (
        f"{label}: n={m['n']} ({m['n_positive']} positive) AUROC {num(m['auroc'])}{ci(m.get('auroc_ci'))}; "
        f"at threshold {m['threshold']:.2f}: "
        f"sensitivity {num(m['sensitivity'])}{ci(m.get('sensitivity_ci'))}, "
        f"specificity {num(m['specificity'])}{ci(m.get('specificity_ci'))}, PPV {num(m['ppv'])}, "
        f"NPV {num(m['npv'])}; ECE {num(m['ece'])}, Brier {num(m['brier'])}"
    )


def cmd_threshold(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.evaluation import choose_threshold
    from dicomnode.models.card import set_label_threshold

    card, _dataset, images = _probabilities(config, args.model, args.csv)
    label = args.label or card.labels[0].name
    probabilities: list[float] = []
    truths: list[int] = []
    for image in images:
        truth = image.key.labels.get(label)
        if image.probabilities is None or truth is None:
            continue
        probabilities.extend(f.probability for f in image.findings if f.label == label)
        truths.append(int(truth))
    threshold = choose_threshold(probabilities, truths, sensitivity=args.sensitivity)
    note = (
        f"chosen by `dicomnode threshold` for sensitivity >= {args.sensitivity} on {Path(args.csv).name} "
        f"({len(truths)} cases, {sum(truths)} positive) on {datetime.date.today().isoformat()}"
    )
    path = package_path(config, args.model)
    if not args.dry_run:
        set_label_threshold(path / "model.toml", label, threshold, note)
    print(
        f"{card.name} {label}: threshold {threshold:.4f} ({note})"
        + (" [dry run: card unchanged]" if args.dry_run else f"; written to {path / 'model.toml'}")
    )
    return 0


def cmd_train(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.training.loop import train

    path = train(args.train_config, progress=not args.no_progress)
    print(f"model package written to {path}")
    return 0


def _fraction(text: str) -> float:
    """A sensitivity as a fraction. 95 is refused rather than read as 95 %: a guess written into a
    model card is worse than a message."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.95") from None
    if not 0.0 < value <= 1.0:
        hint = f" (for {value:g} % write {value / 100:g})" if 1.0 < value <= 100.0 else ""
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}{hint}")
    return value


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the lifecycle subcommands on the main parser."""
    dataset = sub.add_parser("dataset", help="labelled datasets").add_subparsers(
        dest="dataset_command", required=True
    )
    p = dataset.add_parser(
        "check", parents=[common], help="counts per label and patient, unreadable files, patient splits"
    )
    p.add_argument("csv")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dataset_check)

    p = dataset.add_parser(
        "demo", parents=[common], help="write the 16 radiographs shipped with the default model as DICOM"
    )
    p.add_argument("out", help="folder to write (DICOM files and labels.csv)")
    p.set_defaults(func=cmd_dataset_demo)

    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="AUROC, sensitivity, calibration and subgroups on a labelled dataset",
    )
    p.add_argument("model", help="model name or package folder")
    p.add_argument("csv")
    p.add_argument("--out", help="folder for the report, plots and per-case CSV")
    p.add_argument("--json", action="store_true")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "threshold", parents=[common], help="pick an operating point and write it to the model card"
    )
    p.add_argument("model", help="model name or package folder")
    p.add_argument("csv")
    p.add_argument(
        "--sensitivity", type=_fraction, required=True, help="the sensitivity to reach, 0–1 (0.95, not 95)"
    )
    p.add_argument("--label", help="which label (default: the first)")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_threshold)

    p = sub.add_parser("train", help="fine-tune or train a model package on labelled DICOM")
    p.add_argument(
        "--config",
        dest="train_config",
        required=True,
        help="train.toml (the node configuration goes before the command: dicomnode --config X train)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


__all__ = ["add_commands"]
