"""``dicomnode train``: configuration errors name the key, a small network learns a synthetic finding from
DICOM files, the package it writes loads and runs in the production runner, and a re-run resumes."""

from __future__ import annotations

import csv
import json
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomnode._toml import to_toml
from dicomnode.cli import main as cli_main
from dicomnode.errors import ConfigurationError
from dicomnode.findings import findings_for
from dicomnode.imaging.preprocess import decode_model_input
from dicomnode.imaging.spec import PreprocessSpec
from dicomnode.lifecycle.training.config import (
    BEST_WEIGHTS,
    LAST_CHECKPOINT,
    SUMMARY_FILE_NAME,
    TO_BE_COMPLETED,
    TrainConfig,
)
from dicomnode.lifecycle.training.data import InputScaling, augment_batch
from dicomnode.lifecycle.training.loop import train
from dicomnode.models import load_model_package
from dicomnode.models.runner import ModelRunner

DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
N_PATIENTS = 40
IMAGE_SIZE = 96


def _radiograph(rng: np.random.Generator, positive: bool, bits: int) -> np.ndarray:
    """Smooth noisy background; a positive image has a bright Gaussian blob at a random position."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    image = 0.35 + 0.1 * np.sin(xx / 17.0 + rng.uniform(0, 6)) + rng.normal(0, 0.06, (IMAGE_SIZE, IMAGE_SIZE))
    if positive:
        cy, cx = rng.uniform(20, IMAGE_SIZE - 20, size=2)
        image += 0.45 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 5.0**2))
    top = 2**bits - 1
    return np.clip(image * top, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def _write_image(path: Path, pixels: np.ndarray, patient: int, bits: int) -> str:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = f"Synthetic^{patient:03d}"
    ds.PatientID = f"SYN-{patient:03d}"
    ds.PatientSex = "FM"[patient % 2]
    ds.PatientAge = f"{30 + patient:03d}Y"
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if bits > 8:  # a window as a modality would set; 8-bit images use their full range
        ds.WindowCenter, ds.WindowWidth = 2**bits // 2, 2**bits
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def dataset_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 patients x 2 images (8- and 12-bit MONOCHROME2), about half of the patients positive."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(1234)
    rows = []
    for patient in range(N_PATIENTS):
        positive = patient % 2 == 0
        for image in range(2):
            bits = 8 if image == 0 else 12
            relative = f"images/p{patient:03d}_{image}.dcm"
            _write_image(root / relative, _radiograph(rng, positive, bits), patient, bits)
            rows.append({"path": relative, "blob": int(positive), "comment": "synthetic"})
    csv_path = root / "labels.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "blob", "comment"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def _scratch_toml(csv_path: Path, *, size: int, epochs: int, extra: str = "") -> str:
    return f"""
[data]
csv = "{csv_path.as_posix()}"
split_seed = 0
fractions = [0.6, 0.2, 0.2]

[model]
architecture = "densenet121"
name = "synthetic-blob"
version = "1.0.0"
display_name = "Synthetic blob detector"

[model.preprocessing]
size = [{size}, {size}]
channels = 1
interpolation = "area"

[[model.labels]]
name = "blob"
code = "SCT:4147007"
code_meaning = "Mass"

[training]
epochs = {epochs}
batch_size = 8
learning_rate = 1e-3
early_stopping_patience = 3
checkpoint_dir = "checkpoints"
device = "cpu"

[thresholds]
target_sensitivity = 0.9

[card]
intended_use = "Tests of dicomnode train only."

[output]
path = "models/synthetic-blob"
{extra}
"""


def _write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_training_from_scratch_learns_and_writes_a_package_the_runner_uses(
    dataset_csv: Path, tmp_path: Path
) -> None:
    """A DenseNet-121 trained from scratch on CPU separates blob from no blob (validation AUROC >= 0.95);
    its package loads unchanged, gives findings in the runner and carries test metrics but no IDs."""
    config_path = _write_config(tmp_path, _scratch_toml(dataset_csv, size=48, epochs=6))
    started = time.perf_counter()
    output = train(config_path, progress=False)
    elapsed = time.perf_counter() - started
    assert output == tmp_path / "models" / "synthetic-blob"

    summary = json.loads((output / SUMMARY_FILE_NAME).read_text(encoding="utf-8"))
    best = summary["training"]["best_val_auroc"]
    print(f"trained {summary['training']['epochs_run']} epochs in {elapsed:.1f} s, best val AUROC {best:.3f}")
    assert best >= 0.95
    assert (
        summary["splits"]["train"]["patients"]
        + summary["splits"]["validation"]["patients"]
        + summary["splits"]["test"]["patients"]
        == N_PATIENTS
    )
    assert summary["test_metrics"]["blob"]["auroc"] >= 0.9
    package_text = (output / "model.toml").read_text(encoding="utf-8") + json.dumps(summary)
    assert "SYN-0" not in package_text and "Synthetic^" not in package_text  # no patient data

    package = load_model_package(output)
    card = package.card
    assert (card.name, card.version, card.architecture) == ("synthetic-blob", "1.0.0", "densenet121")
    assert card.preprocessing == PreprocessSpec(size=(48, 48), channels=1, interpolation="area")
    assert card.not_for_clinical_use and card.licence == TO_BE_COMPLETED
    assert card.intended_use == "Tests of dicomnode train only."
    assert card.trained_by.startswith("dicomnode train")
    assert "blob auroc" in {m.metric for m in card.performance.measurements}
    assert card.labels[0].threshold == summary["thresholds"]["values"]["blob"]

    runner = ModelRunner(package, device="cpu")
    folder = dataset_csv.parent / "images"
    positive = decode_model_input(folder / "p000_1.dcm", card.preprocessing)
    negative = decode_model_input(folder / "p001_1.dcm", card.preprocessing)
    probabilities = runner.predict(np.concatenate([positive, negative]))
    assert probabilities[0, 0] > probabilities[1, 0]
    findings = findings_for(probabilities[0], card)
    assert findings[0].label == "blob" and findings[0].concept.value == "4147007"


def test_rerun_resumes_from_the_last_checkpoint(dataset_csv: Path, tmp_path: Path) -> None:
    """epochs=1, then epochs=2 with the same checkpoint folder: the second run trains only epoch 2 and
    keeps epoch 1's history; replacing its own earlier package is allowed; a checkpoint of another
    model is refused."""
    config_path = _write_config(tmp_path, _scratch_toml(dataset_csv, size=32, epochs=1))
    output = train(config_path, progress=False)
    first = json.loads((output / SUMMARY_FILE_NAME).read_text(encoding="utf-8"))
    assert first["training"]["epochs_run"] == 1 and first["training"]["resumed_from_epoch"] is None
    checkpoint = torch.load(tmp_path / "checkpoints" / LAST_CHECKPOINT, weights_only=False)
    assert checkpoint["epoch"] == 1 and set(checkpoint["rng"]) >= {"augment", "torch"}
    assert "optimizer" in checkpoint and (tmp_path / "checkpoints" / BEST_WEIGHTS).is_file()

    config_path.write_text(_scratch_toml(dataset_csv, size=32, epochs=2), encoding="utf-8")
    # the second run goes through the command line: `dicomnode train --config train.toml`
    assert cli_main(["train", "--config", str(config_path), "--no-progress"]) == 0
    second = json.loads((output / SUMMARY_FILE_NAME).read_text(encoding="utf-8"))
    assert second["training"]["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]  # epoch 1 was not trained again
    assert torch.load(tmp_path / "checkpoints" / LAST_CHECKPOINT, weights_only=False)["epoch"] == 2

    # another preprocessing makes the checkpoint foreign: refused, naming the key
    config_path.write_text(_scratch_toml(dataset_csv, size=40, epochs=3), encoding="utf-8")
    with pytest.raises(ConfigurationError) as excinfo:
        train(config_path, progress=False)
    assert excinfo.value.key == "training.checkpoint_dir"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("epochs = 1", "epochs = 0"), "training.epochs"),
        (("epochs = 1", "epoch = 1"), "training.epoch"),
        (("fractions = [0.6, 0.2, 0.2]", "fractions = [0.6, 0.2, 0.3]"), "data.fractions"),
        (('architecture = "densenet121"', 'architecture = "resnet50"'), "model.architecture"),
        (('architecture = "densenet121"', 'base = "models/x"\narchitecture = "xception"'), "model.base"),
        (('code = "SCT:4147007"', 'code = "4147007"'), "model.labels[0].code"),
        (("size = [32, 32]", "size = [32]"), "model.preprocessing.size"),
        (('device = "cpu"', 'device = "tpu9"'), "training.device"),
        (("target_sensitivity = 0.9", "target_sensitivity = 1.5"), "thresholds.target_sensitivity"),
        (('intended_use = "Tests of dicomnode train only."', "intended_use = 3"), "card.intended_use"),
        (('path = "models/synthetic-blob"', "path = 1"), "output.path"),
    ],
)
def test_configuration_errors_name_the_key(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    """Every invalid entry of train.toml raises ConfigurationError whose key names it."""
    text = _scratch_toml(tmp_path / "labels.csv", size=32, epochs=1)
    assert edit[0] in text
    with pytest.raises(ConfigurationError) as excinfo:
        TrainConfig.from_file(_write_config(tmp_path, text.replace(edit[0], edit[1])))
    assert excinfo.value.key == key


def test_example_configuration_parses_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    """The train.toml of docs/training.md parses; relative paths start at the file's folder."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "training.md"
    text = docs.read_text(encoding="utf-8").split("```toml\n", 1)[1].split("```", 1)[0]
    config = TrainConfig.from_file(_write_config(tmp_path, text))
    assert config.data.csv == tmp_path / "labels.csv"
    assert config.model.base == tmp_path / "models" / "pneumonia-xception"
    assert config.training.checkpoint_dir == tmp_path / "checkpoints"
    assert not config.training.horizontal_flip and config.training.augment
    assert config.output.path == tmp_path / "models" / "my-site-pneumonia"


def test_output_folder_of_something_else_is_not_replaced(dataset_csv: Path, tmp_path: Path) -> None:
    """An existing folder that this training did not write is refused before any work is done."""
    (tmp_path / "models" / "synthetic-blob").mkdir(parents=True)
    (tmp_path / "models" / "synthetic-blob" / "precious.txt").write_text("keep", encoding="utf-8")
    config_path = _write_config(tmp_path, _scratch_toml(dataset_csv, size=32, epochs=1))
    with pytest.raises(ConfigurationError) as excinfo:
        train(config_path, progress=False)
    assert excinfo.value.key == "output.path"
    assert not (tmp_path / "checkpoints").exists()


def test_augmentation_keeps_range_and_does_not_flip_by_default() -> None:
    """Augmented inputs stay in the card's value range and a left-side blob stays on the left."""
    spec = PreprocessSpec(size=(64, 64), channels=3, scale=2.0, offset=-1.0)
    scaling = InputScaling.from_spec(spec)
    display = torch.zeros((32, 3, 64, 64))
    display[:, :, 28:36, 8:16] = 1.0  # a bright square on the left
    batch = display * 2.0 - 1.0
    out = augment_batch(batch, scaling, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    left, right = out[..., :32].mean(dim=(1, 2, 3)), out[..., 32:].mean(dim=(1, 2, 3))
    assert bool((left > right).all())
    assert not torch.equal(out[0], out[1])  # parameters differ per image
    flipped = augment_batch(batch, scaling, torch.Generator().manual_seed(0), horizontal_flip=True)
    assert bool((flipped[..., 32:].mean(dim=(1, 2, 3)) > flipped[..., :32].mean(dim=(1, 2, 3))).any())


def test_card_writer_round_trips_through_tomllib() -> None:
    """to_toml writes tables, arrays of tables and escaped strings that tomllib reads back equal."""
    data = {
        "name": 'a "quoted"\nname — ü',
        "size": [1, 2],
        "scale": 1e-4,
        "flag": True,
        "table": {"x": 1.5, "nested": {"y": "z"}},
        "labels": [{"name": "a", "threshold": 0.25}, {"name": "b", "threshold": 0.5}],
    }
    assert tomllib.loads(to_toml(data)) == data


@pytest.mark.slow
def test_fine_tuning_the_default_xception_keeps_its_card(dataset_csv: Path, tmp_path: Path) -> None:
    """One epoch of fine-tuning the installed default model writes a package with the base's
    architecture, preprocessing, labels and threshold, and the base named in its provenance."""
    install = pytest.importorskip("dicomnode.lifecycle.install")
    try:
        base = install.install_default_model(tmp_path / "models", pip_install=False, measure=False)
    except Exception as exc:  # the pneumonia package is not installed here
        pytest.skip(f"default model not installable offline: {exc}")
    base_card = load_model_package(base).card
    text = f"""
[data]
csv = "{dataset_csv.as_posix()}"
fractions = [0.6, 0.2, 0.2]
[model]
base = "models/pneumonia-xception"
name = "site-pneumonia"
version = "0.1.0"
[training]
epochs = 1
batch_size = 16
device = "cpu"
[output]
path = "models/site-pneumonia"
"""
    (dataset_csv.parent / "pneumonia.csv").write_text(
        dataset_csv.read_text(encoding="utf-8").replace("blob", "pneumonia"), encoding="utf-8"
    )
    text = text.replace("labels.csv", "pneumonia.csv")
    output = train(_write_config(tmp_path, text), progress=False)
    card = load_model_package(output).card
    assert (card.architecture, card.preprocessing, card.output_activation) == (
        base_card.architecture,
        base_card.preprocessing,
        base_card.output_activation,
    )
    assert card.labels == base_card.labels  # threshold kept (no target_sensitivity)
    assert "fine-tuned from pneumonia-xception 0.3.0" in card.trained_by
    assert card.licence == TO_BE_COMPLETED and card.not_for_clinical_use
    ModelRunner(load_model_package(output), device="cpu")
