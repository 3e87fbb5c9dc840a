"""The default model's card tells the truth: the node reproduces the numbers it states."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dicomnode.cli import main

if (
    importlib.util.find_spec("pneumonia_model_package") is None
):  # importing it needs pydantic; finding it does not
    pytest.skip("pneumonia_model_package is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dicomnode.lifecycle.install import install_default_model

    return install_default_model(tmp_path_factory.mktemp("models"), pip_install=False)


def test_card_numbers_are_reproduced_through_dicom(
    default_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dataset demo` + `evaluate` on the 16 shipped images reproduce the card's stated numbers."""
    from dicomnode.models import load_model_package

    config = tmp_path / "config.toml"
    config.write_text(
        f'[models]\npath = "{default_model.parent}"\n[storage]\npath = "{tmp_path}/var"\n'
        f'database_url = "sqlite:///{tmp_path}/var/db.sqlite"\n',
        encoding="utf-8",
    )
    assert main(["--config", str(config), "dataset", "demo", str(tmp_path / "demo")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "--config",
                str(config),
                "evaluate",
                "pneumonia-xception",
                str(tmp_path / "demo" / "labels.csv"),
                "--json",
                "--out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    measured = result["overall"]["pneumonia"]
    card = load_model_package(default_model).card
    stated = {
        m.metric: m.value
        for m in card.performance.measurements
        if m.source.startswith("measured by dicomnode 0.1")
    }
    assert stated.keys() == {"auroc", "sensitivity", "specificity"}
    for metric, value in stated.items():
        assert measured[metric] == pytest.approx(value, abs=1e-3), metric
    assert card.not_for_clinical_use
    assert "paediatric" in card.training_data.lower() or "children" in card.training_data.lower()
    assert "no licence" in card.licence.lower()
    for name in ("report.md", "report.html", "per_case.csv"):
        assert (tmp_path / "report" / name).exists()


def test_threshold_writes_the_operating_point_into_the_card(default_model: Path, tmp_path: Path) -> None:
    """`dicomnode threshold --sensitivity 1.0` picks a threshold catching every positive and records it."""
    import shutil

    from dicomnode.models import load_model_package

    package = tmp_path / "models" / "pneumonia-xception"
    shutil.copytree(default_model, package)
    config = tmp_path / "config.toml"
    config.write_text(f'[models]\npath = "{package.parent}"\n', encoding="utf-8")
    assert main(["--config", str(config), "dataset", "demo", str(tmp_path / "demo")]) == 0
    assert (
        main(
            [
                "--config",
                str(config),
                "threshold",
                "pneumonia-xception",
                str(tmp_path / "demo" / "labels.csv"),
                "--sensitivity",
                "1.0",
            ]
        )
        == 0
    )
    card = load_model_package(package).card
    threshold = card.labels[0].threshold
    assert 0.0 < threshold < 0.5  # two positives score below 0.5
    assert "chosen by `dicomnode threshold`" in (package / "model.toml").read_text(encoding="utf-8")


def test_explain_and_dataset_check_from_the_command_line(
    default_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dicomnode explain` writes the heat map over the image; `dataset check --json` counts the demo set."""
    from PIL import Image

    config = tmp_path / "config.toml"
    config.write_text(f'[models]\npath = "{default_model.parent}"\n', encoding="utf-8")
    assert main(["--config", str(config), "dataset", "demo", str(tmp_path / "demo")]) == 0
    capsys.readouterr()
    assert (
        main(["--config", str(config), "dataset", "check", str(tmp_path / "demo" / "labels.csv"), "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert "pneumonia" in json.dumps(report) and report.get("unreadable", []) == []
    source = next((tmp_path / "demo").glob("person*.dcm"))
    out = tmp_path / "heat.png"
    assert (
        main(["--config", str(config), "explain", "pneumonia-xception", str(source), "--out", str(out)]) == 0
    )
    assert "Pneumonia" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.mode == "RGB" and max(image.size) <= 1024 and min(image.size) > 100
