"""The out-of-distribution gate: chest radiographs pass, what the model was not made for is refused."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.errors import ConfigurationError
from dicomnode.models import ModelPackage, load_model_package
from dicomnode.models.card import ModelCard, OodSpec, set_ood_section

REPO_MODEL = Path(__file__).resolve().parents[1] / "models" / "pneumonia-xception"
needs_model = pytest.mark.skipif(
    importlib.util.find_spec("pneumonia_model_package") is None or not (REPO_MODEL / "weights.pt").is_file(),
    reason="the default model (dicomnode models install-default) is not installed",
)


def _cr(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Dataset:
    """An 8-bit CR instance labelled as a chest PA (what a wrongly labelled modality would send)."""
    from dicomnode.lifecycle.demo import COMPUTED_RADIOGRAPHY

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = COMPUTED_RADIOGRAPHY
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = COMPUTED_RADIOGRAPHY
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _forced_chest(name: str, path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    return _save(ds, path)


def out_of_distribution_files(root: Path, chest: Path) -> dict[str, Path]:
    """The images the gate must refuse (no honest lateral view can be made from the test data)."""
    grey = pydicom.dcmread(chest).pixel_array
    grey = (grey.mean(axis=2) if grey.ndim == 3 else grey).astype(np.uint8)
    photo_path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(str(photo_path)) as photo:
        photo_pixels = np.asarray(photo.convert("L"))
    noise = np.random.default_rng(0).integers(0, 256, (512, 512))
    return {
        "RG3 tibia CR relabelled CHEST PA": _forced_chest("RG3_UNCR.dcm", root / "knee.dcm"),
        "CT slice through the chest route": _forced_chest("CT_small.dcm", root / "ct.dcm"),
        "MR slice through the chest route": _forced_chest("MR_small.dcm", root / "mr.dcm"),
        "inverted radiograph (MONOCHROME1 mishandled)": _save(
            _cr(grey, "MONOCHROME1"), root / "inverted.dcm"
        ),
        "uniform noise": _save(_cr(noise), root / "noise.dcm"),
        "photograph (matplotlib grace_hopper.jpg)": _save(_cr(photo_pixels), root / "photo.dcm"),
    }


def package_copy(root: Path) -> ModelPackage:
    """The repository's default model in a folder of its own (weights linked, card copied)."""
    folder = root / "pneumonia-xception"
    folder.mkdir(parents=True)
    shutil.copy(REPO_MODEL / "model.toml", folder / "model.toml")
    (folder / "weights.pt").symlink_to(REPO_MODEL / "weights.pt")
    return load_model_package(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPackage, list[Path], dict[str, Path]]:
    from dicomnode.lifecycle.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("ood")
    write_demo_dataset(root / "chest")
    chests = sorted((root / "chest").glob("*.dcm"))
    return package_copy(root / "models"), chests, out_of_distribution_files(root, chests[0])


def test_card_ood_section_round_trips_and_names_bad_keys(tmp_path: Path) -> None:
    """`[ood]` is parsed with the card's validator: written, read back equal; a bad kind names its key."""
    card_path = tmp_path / "model.toml"
    shutil.copy(REPO_MODEL / "model.toml", card_path)
    spec = OodSpec("feature-distance", 1.5, "ood-features.npz", "16 chest radiographs", 16, "", "AUROC 1.0")
    assert set_ood_section(card_path, spec).ood == spec
    again = OodSpec("autoencoder", 0.02, "ood-autoencoder.pt", "other", 3)
    assert set_ood_section(card_path, again).ood == again  # replaced, not appended twice
    assert card_path.read_text(encoding="utf-8").count("[ood]") == 1
    text = card_path.read_text(encoding="utf-8").replace('kind = "autoencoder"', 'kind = "knn"')
    with pytest.raises(ConfigurationError, match=r"ood\.kind"):
        ModelCard.from_toml(text)


@needs_model
def test_feature_distance_gate_accepts_held_out_chests_and_refuses_the_rest(
    corpus: tuple[ModelPackage, list[Path], dict[str, Path]],
) -> None:
    """Leave-one-out: >= 15 of the 16 chests are accepted by a gate fitted without them; every
    out-of-distribution image is refused by the gate fitted on all 16; the AUROC is 1.0 on 16 + 6."""
    from dicomnode.lifecycle.ood import auroc, fit_feature_distance, model_inputs, network_features
    from dicomnode.models.ood import FeatureDistance
    from dicomnode.models.runner import ModelRunner

    package, chests, others = corpus
    runner = ModelRunner(package, "cpu")
    inside = network_features(runner, model_inputs(chests, package))
    outside = network_features(runner, model_inputs(list(others.values()), package))
    accepted = 0
    for held in range(len(chests)):
        keep = [i for i in range(len(chests)) if i != held]
        fitted = fit_feature_distance(inside[keep], None, 0)
        accepted += (
            FeatureDistance.fit(inside[keep]).distances(inside[held : held + 1])[0] <= fitted.threshold
        )
    assert accepted >= 15
    fitted = fit_feature_distance(inside, None, 0)
    scores = FeatureDistance.fit(inside).distances(outside)
    refused = {name for name, score in zip(others, scores, strict=True) if score > fitted.threshold}
    assert refused == set(others)
    assert auroc(list(fitted.held_out_scores), list(scores)) == 1.0
