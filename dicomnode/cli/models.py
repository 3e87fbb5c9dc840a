"""Commands about models: models | rules | infer | explain.

Kept apart from ``cli/node.py`` so that the listener's commands never import torch: each command imports
the model side only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.cli._output import EXIT_FAILURE, EXIT_OK, print_json
from dicomnode.config import Config
from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.models import install_hint

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def package_path(config: Config, model: str) -> Path:
    """A model given by name (in the models folder) or by the path of a package folder."""
    as_path = Path(model)
    if (as_path / "model.toml").exists():
        return as_path
    candidate = config.models.path / model
    if (candidate / "model.toml").exists():
        return candidate
    raise ModelUnavailableError(
        f"no model package {model!r} in {config.models.path} (nor a folder of that name with a model.toml); "
        + install_hint(model)
    )


def dicom_file_header(name: str) -> tuple[Dataset | None, str | None]:
    """The header of a DICOM file, or why ``name`` is not one (missing, a folder, not DICOM).

    Shared by ``rules test`` and ``infer`` so that both say the same thing about the same input. pydicom
    reads almost any bytes with ``force``; a data set without a SOP Class UID is not an image to route.
    """
    from dicomnode.imaging.frames import read_header

    path = Path(name)
    if not path.exists():
        return None, f"{name}: no such file; give the path of a DICOM file"
    if path.is_dir():
        return None, f"{name} is a folder; give the DICOM files in it (e.g. {name}/*.dcm)"
    not_dicom = f"{name}: not a DICOM file (no DICOM header with a SOP Class UID); give a DICOM file"
    try:
        header = read_header(path)
        is_image = "SOPClassUID" in header or "MediaStorageSOPClassUID" in header.file_meta
    except Exception:
        return None, not_dicom
    return (header, None) if is_image else (None, not_dicom)


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
        print_json(rows)
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

    package = load_model_package(package_path(config, args.name))
    if args.json:
        from dataclasses import asdict

        print_json(
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

    from dicomnode.work.completeness import explain_arrival
    from dicomnode.work.registry import ModelRegistry
    from dicomnode.work.routing import route_image

    registry = ModelRegistry(config.models.path, device=config.worker.device)  # cards only: no torch
    results: list[dict[str, Any]] = []
    studies: dict[str, list[tuple[int, Any]]] = {}
    for name in args.files:
        header, error = dicom_file_header(name)
        if header is None:
            results.append(
                {
                    "file": name,
                    "route": None,
                    "model": None,
                    "reason": None,
                    "intended_use": None,
                    "error": error,
                }
            )
            continue
        decision = route_image(config.routes, header, args.calling_ae)
        intended = _intended_use(registry, decision, header)
        results.append({"file": name, **decision.to_dict(), "intended_use": intended, "error": None})
        studies.setdefault(str(header.get("StudyInstanceUID", "")), []).append((len(results) - 1, header))
    for members in studies.values():  # study completeness: the condition that would start it
        start = explain_arrival(config, [(header, args.calling_ae) for _, header in members]).condition
        for index, _ in members:
            results[index]["start"] = start
    if args.json:
        print_json(results)
    else:
        for item in results:
            if item["error"]:
                print(f"error: {item['error']}", file=sys.stderr)
                continue
            print(f"{item['file']}: {item['model'] or 'no model'} — {item['reason']}")
            if item["intended_use"] is not None:
                print(f"  intended use: {_intended_use_line(item['intended_use'])}")
            if "start" in item:
                print(f"  start: {item['start']}")
    return EXIT_FAILURE if any(item["error"] for item in results) else EXIT_OK


def _intended_use(registry: Any, decision: Any, header: Any) -> dict[str, Any] | None:
    """The header against the routed model's intended population, as the worker checks it before
    inference (None when no model is routed); a model not installed is said so, not checked."""
    from dicomnode.errors import ModelUnavailableError
    from dicomnode.work.intended import check_intended_use

    if decision.model is None:
        return None
    try:
        card = registry.package(decision.model).card
    except ModelUnavailableError as exc:
        return {"checked": False, "why": str(exc)}
    overridden = decision.intended_use == "ignore"
    return {"checked": True, **check_intended_use(card.applies_to, header, overridden=overridden).to_dict()}


def _intended_use_line(intended: dict[str, Any]) -> str:
    """One line for ``rules test``: within, refused (why), or analysed anyway by the route's override."""
    if not intended["checked"]:
        return f"not checked ({intended['why']})"
    notes = f"; {'; '.join(intended['notes'])}" if intended["notes"] else ""
    if intended["refused"]:
        return f"outside — would be refused, no finding ({'; '.join(intended['outside'])}){notes}"
    if intended["outside"]:
        outside = "; ".join(intended["outside"])
        return f'outside ({outside}), analysed anyway: route intended_use = "ignore"{notes}'
    return f"within the model's intended population{notes}"


def cmd_infer(config: Config, args: argparse.Namespace) -> int:
    """Routing + preprocessing + model on files, without the server."""
    from dicomnode.findings import format_percent
    from dicomnode.sandbox import DecodePool
    from dicomnode.work.inference import ModelRegistry, decode_inputs, predict, route_files

    errors: dict[str, str] = {}
    for name in args.files:
        _header, error = dicom_file_header(name)
        if error:
            errors[name] = error
    readable = [name for name in args.files if name not in errors]
    registry = ModelRegistry(
        config.models.path, device=config.worker.device, max_batch_size=config.worker.max_batch_size
    )
    images = route_files(config, [(i, Path(name), args.calling_ae) for i, name in enumerate(readable)])
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
            f"model {missing[0]!r} is not installed in {config.models.path}; {install_hint(missing[0])}"
        )
    if any(i.decision.model for i in images):
        with DecodePool(workers=1) as pool:
            decode_inputs(images, registry, pool, config.worker.decode_timeout_seconds)
            predict(images, registry)
    by_name = dict(zip(readable, images, strict=True))
    results: list[dict[str, Any]] = []
    for name in args.files:
        if name in errors:
            results.append(
                {"file": name, "model": None, "findings": [], "reason": None, "error": errors[name]}
            )
            continue
        image = by_name[name]
        reason = None if image.decision.model else image.decision.reason
        if image.decision.model and image.error:
            reason = image.error
        if image.refusal is not None:  # outside the card's intended use, or refused by the OOD gate
            reason = image.refusal
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
                "error": None,
            }
        )
    if args.json:
        print_json(results)
    else:
        for item in results:
            if item["error"]:
                print(f"error: {item['error']}", file=sys.stderr)
                continue
            found = ", ".join(
                f"{f['label']} {format_percent(f['probability'])} ({'present' if f['present'] else 'absent'})"
                for f in item["findings"]
            )
            print(f"{item['file']}: {item['model'] or 'no model'}: {found or item['reason']}")
    failed = any(r["error"] or (r["model"] and not r["findings"]) for r in results)
    return EXIT_FAILURE if failed else EXIT_OK


def cmd_explain(config: Config, args: argparse.Namespace) -> int:
    """Render the class-activation heat map of a model over an image (the key image's map)."""
    import numpy as np
    from PIL import Image

    from dicomnode.findings import format_percent
    from dicomnode.imaging.frames import read_header
    from dicomnode.imaging.overlay import blend_heatmap
    from dicomnode.sandbox import DecodePool
    from dicomnode.work.inference import ImageInput, ModelRegistry, compute_heatmaps, predict
    from dicomnode.work.intended import check_intended_use
    from dicomnode.work.routing import RouteDecision

    path = package_path(config, args.model)
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
    intended = check_intended_use(card.applies_to, image.header)
    if intended.outside:  # explain still draws the map (it shows the model), but says what the node does
        detail = "; ".join(intended.outside)
        print(f"warning: {args.file}: would be refused: {detail} (the model's intended use)", file=sys.stderr)
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
        f"{args.file}: {finding.display_name} {format_percent(finding.probability)} "
        f"({'present' if finding.present else 'absent'} at threshold {finding.threshold:.2f}); "
        f"heat map -> {args.out}"
    )
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
