"""CLI commands about models: models, rules, infer, explain, dataset, evaluate, threshold, train.

Kept apart from ``cli.py`` so that the listener's commands never import torch: each command imports
the model side only when it runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.errors import ConfigurationError, ModelUnavailableError


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _package_path(config: Config, model: str) -> Path:
    """A model given by name (in the models folder) or by the path of a package folder."""
    as_path = Path(model)
    if (as_path / "model.toml").exists():
        return as_path
    candidate = config.models.path / model
    if (candidate / "model.toml").exists():
        return candidate
    raise ModelUnavailableError(
        f"no model package {model!r} in {config.models.path} (nor a folder of that name with a model.toml); "
        "install the default model with: dicomnode models install-default"
    )


# --- models ---------------------------------------------------------------------------------------


def cmd_models_list(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.models import discover_models

    packages = discover_models(config.models.path)
    rows: list[dict[str, Any]] = [
        {
            "name": p.card.name,
            "version": p.card.version,
            "task": p.card.task,
            "architecture": p.card.architecture,
            "labels": [label.name for label in p.card.labels],
            "path": str(p.path),
            "not_for_clinical_use": p.card.not_for_clinical_use,
        }
        for p in packages
    ]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(
            f"no models in {config.models.path}; install the default with: dicomnode models install-default"
        )
        return 0
    for row in rows:
        flag = "  [not for clinical use]" if row["not_for_clinical_use"] else ""
        print(
            f"{row['name']} {row['version']}  {row['task']}  {row['architecture']}  "
            f"labels: {', '.join(row['labels'])}{flag}"
        )
    return 0


def cmd_models_show(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.models import load_model_package

    package = load_model_package(_package_path(config, args.name))
    if args.json:
        from dataclasses import asdict

        _print_json(
            {
                "path": str(package.path),
                "device_observer_uid": package.card.device_observer_uid,
                **asdict(package.card),
            }
        )
        return 0
    print((package.path / "model.toml").read_text(encoding="utf-8"))
    print(f"# device observer UID: {package.card.device_observer_uid}")
    return 0


def cmd_models_install_default(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.install import install_default_model

    path = install_default_model(config.models.path, pip_install=not args.no_pip, force=args.force)
    print(f"default model installed in {path}")
    return 0


# --- rules and inference ----------------------------------------------------------------------------


def cmd_rules_test(config: Config, args: argparse.Namespace) -> int:
    """Show which model each file would get, and why."""
    from pydicom import dcmread

    from dicomnode.work.routing import route_image

    results = []
    for name in args.files:
        try:
            header = dcmread(name, stop_before_pixels=True)
        except Exception as exc:
            results.append(
                {"file": name, "route": None, "model": None, "reason": f"unreadable: {type(exc).__name__}"}
            )
            continue
        decision = route_image(config.routes, header, args.calling_ae)
        results.append({"file": name, **decision.to_dict()})
    if args.json:
        _print_json(results)
    else:
        for item in results:
            print(f"{item['file']}: {item['model'] or 'no model'} — {item['reason']}")
    return 0


def cmd_infer(config: Config, args: argparse.Namespace) -> int:
    """Routing + preprocessing + model on files, without the server."""
    from dicomnode.sandbox import DecodePool
    from dicomnode.work.inference import ModelRegistry, decode_inputs, predict, route_files

    registry = ModelRegistry(
        config.models.path, device=config.worker.device, max_batch_size=config.worker.max_batch_size
    )
    images = route_files(config, [(i, Path(name), args.calling_ae) for i, name in enumerate(args.files)])
    missing = sorted(
        {
            i.decision.model
            for i in images
            if i.decision.model is not None
            and not (config.models.path / i.decision.model / "model.toml").exists()
        }
    )
    if missing:
        raise ModelUnavailableError(
            f"model {missing[0]!r} is not installed in {config.models.path}; "
            "install the default model with: dicomnode models install-default"
        )
    with DecodePool(workers=1) as pool:
        decode_inputs(images, registry, pool, config.worker.decode_timeout_seconds)
        predict(images, registry)
    results = []
    for name, image in zip(args.files, images, strict=True):
        reason = None if image.decision.model else image.decision.reason
        if image.decision.model and image.error:
            reason = image.error
        results.append(
            {
                "file": name,
                "model": image.decision.model,
                "findings": [
                    {
                        "label": f.label,
                        "code": f.concept.compact,
                        "probability": round(f.probability, 6),
                        "present": f.present,
                    }
                    for f in image.findings
                ],
                "reason": reason,
            }
        )
    if args.json:
        _print_json(results)
    else:
        for item in results:
            found = ", ".join(
                f"{f['label']} {100 * f['probability']:.1f} % ({'present' if f['present'] else 'absent'})"
                for f in item["findings"]
            )
            print(f"{item['file']}: {item['model'] or 'no model'}: {found or item['reason']}")
    return 1 if any(r["model"] and not r["findings"] for r in results) else 0


def cmd_explain(config: Config, args: argparse.Namespace) -> int:
    """Render the class-activation heat map of a model over an image (the key image's map)."""
    import numpy as np
    from PIL import Image

    from dicomnode.imaging.frames import read_header
    from dicomnode.report.key_image import blend_heatmap
    from dicomnode.sandbox import DecodePool
    from dicomnode.work.inference import ImageInput, ModelRegistry, compute_heatmaps, predict
    from dicomnode.work.routing import RouteDecision

    path = _package_path(config, args.model)
    registry = ModelRegistry(path.parent, device=config.worker.device)
    card = registry.package(path.name).card
    label_index = 0
    if args.label:
        names = [label.name for label in card.labels]
        if args.label not in names:
            raise ConfigurationError("--label", f"model {card.name} has labels {names}")
        label_index = names.index(args.label)
    image = ImageInput(
        0, Path(args.file), read_header(args.file), RouteDecision("explain", path.name, "explain")
    )
    with DecodePool(workers=1) as pool:
        image.array = pool.read_model_input(
            image.path, card.preprocessing, timeout_s=config.worker.decode_timeout_seconds
        )
        display = pool.read_display_image(
            image.path, max_size=1024, timeout_s=config.worker.decode_timeout_seconds
        )
    predict([image], registry)
    compute_heatmaps([image], registry, max_side=1024, labels="all")
    heat = image.heatmaps[card.labels[label_index].name]
    rgb = display if display.ndim == 3 else np.repeat(display[..., None], 3, axis=2)
    blended = blend_heatmap(rgb, heat)
    Image.fromarray(blended).save(args.out)
    finding = image.findings[label_index]
    print(
        f"{args.file}: {finding.display_name} {100 * finding.probability:.1f} % "
        f"({'present' if finding.present else 'absent'} at threshold {finding.threshold:.2f}); "
        f"heat map -> {args.out}"
    )
    return 0


# --- datasets, evaluation, thresholds, training --------------------------------------------------------


def cmd_dataset_check(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.datasets import check_dataset, load_labelled_dataset

    report = check_dataset(load_labelled_dataset(args.csv))
    if args.json:
        _print_json(report.to_dict())
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

    path = _package_path(config, model)
    registry = ModelRegistry(
        path.parent, device=config.worker.device, max_batch_size=config.worker.max_batch_size
    )
    card = registry.package(path.name).card
    dataset = load_labelled_dataset(csv)
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
        _print_json(summary)
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
    path = _package_path(config, args.model)
    if not args.dry_run:
        set_label_threshold(path / "model.toml", label, threshold, note)
    print(
        f"{card.name} {label}: threshold {threshold:.4f} ({note})"
        + (" [dry run: card unchanged]" if args.dry_run else f"; written to {path / 'model.toml'}")
    )
    return 0


def cmd_train(config: Config, args: argparse.Namespace) -> int:
    from dicomnode.lifecycle.training import train

    path = train(args.train_config, progress=not args.no_progress)
    print(f"model package written to {path}")
    return 0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the model-side subcommands on the main parser."""
    models = sub.add_parser("models", help="model packages").add_subparsers(
        dest="models_command", required=True
    )
    p = models.add_parser("list", parents=[common], help="the installed model packages")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("show", parents=[common], help="a model's card")
    p.add_argument("name", help="model name (in models.path) or package folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_show)
    p = models.add_parser(
        "install-default", parents=[common], help="install and convert the default pneumonia model"
    )
    p.add_argument("--no-pip", action="store_true", help="do not pip install pneumonia_model_package")
    p.add_argument("--force", action="store_true", help="convert again even if installed")
    p.set_defaults(func=cmd_models_install_default)

    rules = sub.add_parser("rules", help="routing rules").add_subparsers(dest="rules_command", required=True)
    p = rules.add_parser("test", parents=[common], help="show which model would run on each file and why")
    p.add_argument("files", nargs="+")
    p.add_argument("--calling-ae", help="pretend the files came from this calling AE title")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rules_test)

    p = sub.add_parser(
        "infer", parents=[common], help="route, preprocess and run the model on files, without the server"
    )
    p.add_argument("files", nargs="+")
    p.add_argument("--calling-ae", help="route as if the files came from this calling AE title")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "explain", parents=[common], help="render a model's class-activation heat map over an image"
    )
    p.add_argument("model", help="model name or package folder")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--label", help="which label (default: the first)")
    p.set_defaults(func=cmd_explain)

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
    p.add_argument("--sensitivity", type=float, required=True)
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
