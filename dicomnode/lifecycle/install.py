"""Install the default model: the Keras Xception pneumonia classifier of ``pneumonia_model_package``.

The PyPI package ``pneumonia_model_package==0.3.0`` ships a trained Keras 3 model
(``trained_models/pneumonia_xception_model_val-acc_0.861.keras``) and 16 validation radiographs. It
declares TensorFlow as a dependency, so it is installed with ``--no-deps`` and never imported: the
``.keras`` archive is read with h5py (:mod:`dicomnode.lifecycle.keras_import`), converted to a torch
state dict (``weights.pt``) and described by a model card (``model.toml``) in
``<models_dir>/pneumonia-xception/``. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dicomnode._toml import toml_value
from dicomnode.errors import ModelUnavailableError
from dicomnode.fsio import durable_write
from dicomnode.lifecycle.keras_import import ConvertedXception, convert_keras_xception
from dicomnode.models import DEFAULT_MODEL_NAME, ModelPackage, load_model_package
from dicomnode.models.card import CARD_FILE_NAME, ModelCard
from dicomnode.models.xception import Xception

logger = logging.getLogger(__name__)

SOURCE_DISTRIBUTION = "pneumonia_model_package"
SOURCE_VERSION = "0.3.0"
WEIGHTS_FILE_NAME = "weights.pt"
CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # the package's config.yml class_names, in output order
# Measured with `dicomnode dataset demo DIR && dicomnode evaluate pneumonia-xception DIR/labels.csv`
# (the 16 JPEGs wrapped unchanged as JPEG Baseline CR instances; bootstrap 1000, seed 0);
# tests/test_model_card.py checks that the node still reproduces them.
NODE_MEASUREMENTS = (
    ("auroc", 0.9062, "0.70-1.00 (percentile bootstrap)"),
    ("sensitivity", 0.75, "0.41-0.93 (Wilson)"),
    ("specificity", 0.875, "0.53-0.98 (Wilson)"),
)
NODE_DATASET = (
    "the 16 radiographs shipped in pneumonia_model_package (8 normal, 8 bacterial pneumonia), as DICOM "
    "through the node's production path, threshold 0.5;"
)
NODE_SOURCE = "measured by dicomnode 0.1 (dicomnode evaluate)"

CARD_TRAINED_BY = (
    "the author of the PyPI package pneumonia_model_package (chibuikeeugene); "
    "converted to torch by dicomnode without retraining"
)
CARD_TRAINING_DATA = (
    "Paediatric chest radiographs (anterior-posterior) of children aged about 1 to 5 years from "
    "Guangzhou Women and Children's Medical Center, the cohort published by Kermany et al., Cell 2018 "
    "(data licensed CC BY 4.0), labelled normal or pneumonia (bacterial and viral pooled). The package "
    "source shows an ImageNet-pretrained Xception backbone kept frozen and a dense head trained for "
    "5 epochs on 150x150 8-bit JPEG exports; the exact copy and split of the data are not published."
)
REPORTED_DATASET = (
    "the test folder the package trained against (Keras val_accuracy; the checkpoint was selected on "
    "the same data, so the number is optimistic; size and composition not published)"
)
MEASURED_DATASET = (
    "the {total} validation JPEGs shipped in pneumonia_model_package (half normal, half bacterial "
    "pneumonia), Keras-style preprocessing from JPEG, argmax decision"
)
# The intended population: the training cohort's children were "one to five years old" (Kermany et al.
# 2018); a five-year-old is up to 6.0 years by birth date, so the band is 1-6 years. Nothing is known
# below one year or above six; the worker refuses such images (docs/models.md, intended use).
DEFAULT_PATIENT_AGE_YEARS = (1, 6)
CARD_INTENDED_USE = (
    "Research and demonstration of the dicomnode pipeline only. Not a medical device. Intended "
    "population, enforced by the node from each image's header ([applies_to]): children aged 1 to 6 "
    "years (the training cohort was 'one to five years old'; a five-year-old is up to 6.0 years by "
    "birth date), CR or DX chest radiographs in AP or PA view. Older or younger patients and lateral "
    "views are not analysed; an image without an age is analysed and the missing age is recorded."
)
APPLIES_TO_LINES = (
    "[applies_to]",
    'modalities = ["CR", "DX"]',
    'body_parts = ["CHEST"]',
    'views = ["AP", "PA"]',
    "# the training cohort's ages in years (Kermany et al. 2018); see [card] intended_use",
    f"patient_age_years = [{DEFAULT_PATIENT_AGE_YEARS[0]}, {DEFAULT_PATIENT_AGE_YEARS[1]}]",
)
CARD_LIMITATIONS = (
    "Trained only on paediatric images from one centre; adult radiographs (such as the CR test files), "
    "other centres and detectors, lateral views and other diseases are out of distribution and its "
    "output there is meaningless. Trained from 8-bit JPEG exports, not DICOM. Bacterial and viral "
    "pneumonia are not distinguished. Not calibrated; the 0.5 threshold is not a clinical operating point."
)
CARD_LICENCE = (
    "No licence is stated for the trained weights by pneumonia_model_package; the training images are "
    "CC BY 4.0 (Kermany et al. 2018). Check before any redistribution."
)


@dataclass(frozen=True)
class ValidationImage:
    """One of the radiographs shipped in the package, with its ground truth from the file name."""

    path: Path
    pneumonia: bool


def source_package_dir(*, pip_install: bool = False) -> Path:
    """Folder of the installed ``pneumonia_model_package`` (installing it with pip if allowed).

    Located through ``importlib.metadata`` without importing the package (whose modules import
    TensorFlow).
    """
    try:
        dist = importlib.metadata.distribution(SOURCE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        if not pip_install:
            raise ModelUnavailableError(
                f"{SOURCE_DISTRIBUTION} is not installed; run "
                f"`python -m pip install --no-deps {SOURCE_DISTRIBUTION}=={SOURCE_VERSION}`"
            ) from None
        _pip_install()
        dist = importlib.metadata.distribution(SOURCE_DISTRIBUTION)
    if dist.version != SOURCE_VERSION:
        raise ModelUnavailableError(
            f"{SOURCE_DISTRIBUTION} {dist.version} is installed; dicomnode's card describes {SOURCE_VERSION}"
        )
    folder = Path(str(dist.locate_file(SOURCE_DISTRIBUTION)))
    if not folder.is_dir():
        raise ModelUnavailableError(f"{SOURCE_DISTRIBUTION} has no package folder at {folder}")
    return folder


def _pip_install() -> None:
    """``python -m pip install --no-deps pneumonia_model_package==0.3.0`` in this interpreter."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        f"{SOURCE_DISTRIBUTION}=={SOURCE_VERSION}",
    ]
    logger.info("installing %s==%s with pip", SOURCE_DISTRIBUTION, SOURCE_VERSION)
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise ModelUnavailableError(
            f"pip could not install {SOURCE_DISTRIBUTION}: {completed.stderr.strip()[-500:]}"
        )
    importlib.invalidate_caches()


def keras_archive(package_dir: Path) -> Path:
    """The trained ``.keras`` model inside the package folder."""
    archives = sorted((package_dir / "trained_models").glob("*.keras"))
    if len(archives) != 1:
        raise ModelUnavailableError(
            f"expected one .keras model in {package_dir / 'trained_models'}, found {len(archives)}"
        )
    return archives[0]


def validation_images(package_dir: Path) -> list[ValidationImage]:
    """The 16 shipped validation radiographs (8 NORMAL*, 8 person*_bacteria*), sorted by name."""
    folder = package_dir / "datasets" / "pneumonia-data" / "val"
    return [
        ValidationImage(path=p, pneumonia="bacteria" in p.name or "virus" in p.name)
        for p in sorted(folder.glob("*.jpeg"))
    ]


def keras_style_input(path: Path, size: tuple[int, int] = (150, 150)) -> np.ndarray:
    """(3, rows, cols) float32 input made exactly as the package's Keras ImageDataGenerator does.

    PIL RGB, nearest-neighbour resize to ``size``, then ``x / 127.5 - 1`` (Xception's preprocess_input).
    """
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.NEAREST)
        array = np.asarray(rgb, dtype=np.float32)
    return np.ascontiguousarray((array / 127.5 - 1.0).transpose(2, 0, 1))


def install_default_model(
    models_dir: Path | str, *, pip_install: bool = True, force: bool = False, measure: bool = True
) -> Path:
    """Convert the packaged Keras model into ``models_dir/pneumonia-xception`` and return that folder.

    Idempotent: an existing valid package is kept unless ``force``. With ``measure`` the converted
    model's accuracy on the 16 shipped images (Keras-style preprocessing) is written to the card.
    """
    target = Path(models_dir) / DEFAULT_MODEL_NAME
    if not force and (target / CARD_FILE_NAME).is_file():
        try:
            package = load_model_package(target)
        except ModelUnavailableError:
            package = None
        if package is not None and package.card.version == SOURCE_VERSION:
            refresh_intended_use(target / CARD_FILE_NAME)
            if package.card.ood is None and measure:
                fit_default_gate(package)
            return target
    package_dir = source_package_dir(pip_install=pip_install)
    archive = keras_archive(package_dir)
    converted = convert_keras_xception(archive)
    _check_head(converted)
    network = Xception(
        converted.num_classes, converted.in_channels, converted.hidden_units, converted.dropout
    )
    network.load_state_dict(converted.state_dict, strict=True)
    network.eval()

    target.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(converted.state_dict, target / WEIGHTS_FILE_NAME)
    accuracy = _measure(network, validation_images(package_dir), converted.input_size) if measure else None
    durable_write(target / CARD_FILE_NAME, default_card_toml(converted, archive.name, accuracy).encode())
    package = load_model_package(target)  # the card must validate and the weights must be there
    if measure:
        fit_default_gate(package)
    logger.info("installed model %s %s into %s", DEFAULT_MODEL_NAME, SOURCE_VERSION, target)
    return target


def refresh_intended_use(card_path: Path) -> bool:
    """Bring an installed default card's ``[applies_to]`` and ``intended_use`` up to this version's
    (a card written before the intended population existed); everything else is kept as written.
    Returns whether the file changed. The new text is validated before it replaces the file."""
    lines = card_path.read_text(encoding="utf-8").rstrip("\n").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "[applies_to]"), None)
    if start is None:
        return False
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("[")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines[start:end] = APPLIES_TO_LINES
    lines = [
        f"intended_use = {toml_value(CARD_INTENDED_USE)}" if line.startswith("intended_use = ") else line
        for line in lines
    ]
    new_text = "\n".join(lines) + "\n"
    if new_text == card_path.read_text(encoding="utf-8"):
        return False
    ModelCard.from_toml(new_text)  # never write a card the loader would refuse
    durable_write(card_path, new_text.encode("utf-8"))
    logger.info("model card %s: intended population brought up to date", card_path)
    return True


OOD_FITTED_ON = (
    "the 16 paediatric chest radiographs (AP, 8 normal, 8 bacterial pneumonia) shipped in "
    "pneumonia_model_package, as DICOM through the node's decoder (dicomnode dataset demo); no "
    "augmentation (it let uniform noise pass). Sixteen images are very few: an adult chest radiograph "
    "or one from another detector may well be refused too"
)
OOD_EVIDENCE = (
    "Measured by tests/test_ood.py: each of the 16 reference radiographs scored by a gate fitted without "
    "it: 16/16 accepted; the gate fitted on all 16 refuses all 6 images it must refuse (pydicom-data's "
    "RG3 tibia CR relabelled CHEST PA, CT_small and MR_small forced through the chest route, an inverted "
    "radiograph, uniform noise, a photograph): AUROC 1.00 of the score on 22 images (16 in, 6 out). No "
    "lateral view could be made honestly from the available data; the margin to the nearest refused "
    "image (noise, 1.66 against a threshold of 1.56) is small"
)


def fit_default_gate(package: ModelPackage) -> None:
    """Fit the default model's feature-distance gate on the 16 shipped radiographs (as DICOM)."""
    import tempfile

    from dicomnode.lifecycle.demo import write_demo_dataset
    from dicomnode.lifecycle.ood import fit_gate, reference_paths

    with tempfile.TemporaryDirectory() as tmp:
        paths = reference_paths(write_demo_dataset(Path(tmp)))
        fit_gate(package, paths, fitted_on=OOD_FITTED_ON, evidence=OOD_EVIDENCE)


def _check_head(converted: ConvertedXception) -> None:
    if (converted.num_classes, converted.in_channels, converted.input_size) != (2, 3, (150, 150)):
        raise ModelUnavailableError("the packaged model is not the expected 150x150x3 two-class Xception")
    if converted.final_activation != "linear":
        raise ModelUnavailableError("expected logits from the packaged model (trained with from_logits=True)")


def _measure(
    network: Xception, images: list[ValidationImage], size: tuple[int, int]
) -> tuple[int, int] | None:
    """(correct, total) of the converted model on the shipped images, argmax decision."""
    if not images:
        return None
    batch = torch.from_numpy(np.stack([keras_style_input(image.path, size) for image in images]))
    with torch.inference_mode():
        predicted = torch.softmax(network(batch), dim=1).argmax(dim=1).numpy()
    correct = sum(int(bool(p == 1) == image.pneumonia) for p, image in zip(predicted, images, strict=True))
    return correct, len(images)


def atomic_torch_save(state: Any, path: Path) -> None:
    """torch.save through :func:`dicomnode.fsio.durable_write`: a crash never leaves half a weights file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    durable_write(path, buffer.getbuffer())


def default_card_toml(
    converted: ConvertedXception, archive_name: str, accuracy: tuple[int, int] | None
) -> str:
    """The model card of the converted default model: what it is, where it comes from, its limits."""
    measurements = [
        "[[card.performance.measurements]]",
        'metric = "accuracy"',
        "value = 0.861",
        f"dataset = {toml_value(REPORTED_DATASET)}",
        "source = "
        + toml_value(f"reported by {SOURCE_DISTRIBUTION} {SOURCE_VERSION} (model file {archive_name})"),
        "",
    ]
    if accuracy is not None:
        correct, total = accuracy
        measurements += [
            "[[card.performance.measurements]]",
            'metric = "accuracy"',
            f"value = {correct / total:.4f}",
            f"n = {total}",
            f"dataset = {toml_value(MEASURED_DATASET.format(total=total))}",
            f"source = {toml_value('measured by dicomnode at install time on the converted torch model')}",
            "",
        ]
    for metric, value, interval in NODE_MEASUREMENTS:
        measurements += [
            "[[card.performance.measurements]]",
            f"metric = {toml_value(metric)}",
            f"value = {value}",
            "n = 16",
            f"dataset = {toml_value(NODE_DATASET + f' 95 % CI {interval}.')}",
            f"source = {toml_value(NODE_SOURCE)}",
            "",
        ]
    summary = (
        "Reported by the package author: validation accuracy 0.861 (the number in the model file name); "
        "no sensitivity, specificity, AUC or confidence interval is published. Measured by dicomnode through "
        "its own DICOM path (`dicomnode dataset demo` + `dicomnode evaluate`) on the 16 shipped paediatric "
        "images (8 normal, 8 bacterial pneumonia): AUROC 0.91 (95 % CI 0.70-1.00), sensitivity 0.75 "
        "(0.41-0.93) and specificity 0.88 (0.53-0.98) at threshold 0.5, ECE 0.17. Sixteen images are far "
        "too few to estimate performance; the intervals are wide and the images may overlap the data the "
        "package was developed on. Nothing is known about performance on adults or other centres."
    )
    return "\n".join(
        [
            "# dicomnode model card: the default model, converted from pneumonia_model_package 0.3.0.",
            "# Written by dicomnode.lifecycle.install; see docs/models.md for every key.",
            f"name = {toml_value(DEFAULT_MODEL_NAME)}",
            f"version = {toml_value(SOURCE_VERSION)}",
            f"display_name = {toml_value('Paediatric pneumonia classifier (Xception, research use only)')}",
            'task = "image-classification"',
            'architecture = "xception"',
            f"weights = {toml_value(WEIGHTS_FILE_NAME)}",
            "# Two logits out: index 0 NORMAL, index 1 PNEUMONIA (trained with from_logits=True).",
            'output_activation = "softmax"',
            "",
            "[architecture_parameters]",
            f"num_classes = {converted.num_classes}",
            f"in_channels = {converted.in_channels}",
            f"hidden_units = {converted.hidden_units}",
            f"dropout = {converted.dropout}",
            "",
            "[[labels]]",
            'name = "pneumonia"',
            'display_name = "Pneumonia"',
            'code = "SCT:233604007"',
            'code_meaning = "Pneumonia"',
            "threshold = 0.5",
            "output_index = 1",
            "",
            "# As Keras' ImageDataGenerator fed it in training: 8-bit RGB, 150x150 nearest, x/127.5 - 1.",
            "[preprocessing]",
            f"size = [{converted.input_size[0]}, {converted.input_size[1]}]",
            "channels = 3",
            'interpolation = "nearest"',
            "scale = 2.0",
            "offset = -1.0",
            "quantize_8bit = true",
            'frames = "first"',
            "",
            *APPLIES_TO_LINES,
            "",
            "[card]",
            f"trained_by = {toml_value(CARD_TRAINED_BY)}",
            f"training_data = {toml_value(CARD_TRAINING_DATA)}",
            f"intended_use = {toml_value(CARD_INTENDED_USE)}",
            f"limitations = {toml_value(CARD_LIMITATIONS)}",
            f"licence = {toml_value(CARD_LICENCE)}",
            "not_for_clinical_use = true",
            "",
            "[card.performance]",
            f"summary = {toml_value(summary)}",
            "",
            *measurements,
        ]
    )
