"""The out-of-distribution gate: chest radiographs pass, what the model was not made for is refused."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pydicom
import pytest
from conftest import make_config
from e2e_helpers import dciodvfy_errors
from factories import store_as_own_study
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.cli import main
from dicomnode.db import Job, Result, Study
from dicomnode.errors import ConfigurationError
from dicomnode.findings import StudyFindings
from dicomnode.models import ModelPackage, load_model_package
from dicomnode.models.card import ModelCard, OodSpec, set_ood_section
from dicomnode.node.services import Services, open_services
from dicomnode.work.pipeline import Worker

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
    # no age: the gate, not the intended-use check (these are adults), must refuse them here
    for keyword in ("PatientAge", "PatientBirthDate"):
        if keyword in ds:
            delattr(ds, keyword)
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


@pytest.fixture(scope="module")
def gated(
    corpus: tuple[ModelPackage, list[Path], dict[str, Path]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, OodSpec]:
    """A models folder whose default model got its gate from `dicomnode ood fit` on the 16 chests."""
    root = tmp_path_factory.mktemp("gated")
    fitted = package_copy(root / "models")
    config = root / "config.toml"
    config.write_text(f'[models]\npath = "{root / "models"}"\n', encoding="utf-8")
    chests = corpus[1]
    assert main(["--config", str(config), "ood", "fit", "pneumonia-xception", str(chests[0].parent)]) == 0
    spec = load_model_package(fitted.path).card.ood
    assert spec is not None and spec.kind == "feature-distance" and spec.reference_images == 16
    assert (fitted.path / spec.file).is_file()
    return root / "models", spec


@needs_model
def test_ood_check_prints_score_and_decision(
    corpus: tuple[ModelPackage, list[Path], dict[str, Path]],
    gated: tuple[Path, OodSpec],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dicomnode ood check` scores each file and exits 1 when one is refused; `infer` gives the
    refused knee no finding and says why."""
    _, chests, others = corpus
    models, spec = gated
    config = models.parent / "config.toml"
    knee = others["RG3 tibia CR relabelled CHEST PA"]
    capsys.readouterr()
    argv = [
        "--config",
        str(config),
        "ood",
        "check",
        "pneumonia-xception",
        str(chests[3]),
        str(knee),
        "--json",
    ]
    assert main(argv) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [row["refused"] for row in rows] == [False, True]
    assert rows[1]["score"] > spec.threshold >= rows[0]["score"]
    assert main(["--config", str(config), "ood", "check", "pneumonia-xception", str(chests[3])]) == 0
    assert "accepted" in capsys.readouterr().out
    assert main(["--config", str(config), "infer", "--json", str(knee)]) == 1  # routed as a chest PA
    (row,) = json.loads(capsys.readouterr().out)
    assert row["findings"] == [] and row["reason"].startswith("refused: out-of-distribution")


def _store(services: Services, path: Path) -> str:
    return store_as_own_study(services, path)


@needs_model
def test_worker_refuses_an_out_of_distribution_image_and_says_so_in_the_sr(
    corpus: tuple[ModelPackage, list[Path], dict[str, Path]], gated: tuple[Path, OodSpec], tmp_path: Path
) -> None:
    """A knee labelled CHEST PA gets no finding: the job's routing records the refusal with its score,
    the SR carries the coded "not analysed" evaluation and passes dciodvfy; a chest gets its finding."""
    from dicomnode.report.sr import NOT_ANALYSED

    _, chests, others = corpus
    models, spec = gated
    config = make_config(
        tmp_path,
        models={"path": str(models)},
        routes=[
            {
                "name": "chest",
                "model": "pneumonia-xception",
                "modality": ["CR"],
                "body_part_examined": ["CHEST"],
            }
        ],
        worker={"poll_interval_seconds": 0.05},
    )
    services = open_services(config, upgrade=True)
    try:
        knee = _store(services, others["RG3 tibia CR relabelled CHEST PA"])
        chest = _store(services, chests[0])
        worker = Worker(config, services)
        try:
            worker.run(threading.Event(), burst=True)
        finally:
            worker.close()
        with services.sessions() as session:
            jobs = {
                study.study_instance_uid: job
                for job, study in session.query(Job, Study).join(Study, Job.study_id == Study.id)
            }
            routing = {uid: json.loads(job.routing_json)[0] for uid, job in jobs.items()}
            found = {}
            for row in session.query(Result):
                findings = StudyFindings.from_json(row.findings_json)
                found[findings.study_instance_uid] = findings
    finally:
        services.close()
    assert routing[knee]["decision"] == "refused: out-of-distribution"
    assert routing[knee]["ood"]["refused"] and routing[knee]["ood"]["score"] > spec.threshold
    assert "decision" not in routing[chest] and not routing[chest]["ood"]["refused"]
    assert found[knee].images[0].findings == () and found[knee].study_findings == ()
    assert (found[knee].images[0].refusal or "").startswith("refused: out-of-distribution")
    assert found[chest].images[0].findings and found[chest].images[0].refusal is None
    srs = sorted(config.storage.results_path.joinpath(knee).rglob("sr-*.dcm"))
    assert len(srs) == 1
    sr = pydicom.dcmread(srs[0])
    codes_in_sr = [
        item.ConceptCodeSequence[0].CodeMeaning for item in _walk(sr) if "ConceptCodeSequence" in item
    ]
    assert NOT_ANALYSED.meaning in codes_in_sr
    assert "Certainty of Finding" not in [
        item.ConceptNameCodeSequence[0].CodeMeaning for item in _walk(sr) if "ConceptNameCodeSequence" in item
    ]
    if shutil.which("dciodvfy") is not None:
        assert dciodvfy_errors(srs[0]) == []


def _walk(ds: Dataset) -> list[Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(_walk(item))
    return items


@needs_model
def test_autoencoder_gate_refuses_noise_and_a_photograph(
    corpus: tuple[ModelPackage, list[Path], dict[str, Path]], tmp_path: Path
) -> None:
    """The autoencoder kind, fitted and loaded through the card: its held-out chests are under the
    threshold, uniform noise and a photograph are refused (it is weaker than feature-distance: on
    the full evidence set it lets the CT slice pass, docs/models.md)."""
    from dicomnode.lifecycle.ood import fit_gate, model_inputs
    from dicomnode.models.ood import AutoencoderGate, decide, load_gate

    _, chests, others = corpus
    package = package_copy(tmp_path / "models")
    spec = fit_gate(package, chests, kind="autoencoder", fitted_on="the 16 chests", copies=4)
    gate = load_gate(load_model_package(package.path))
    assert isinstance(gate, AutoencoderGate) and gate.spec == spec
    names = ["uniform noise", "photograph (matplotlib grace_hopper.jpg)"]
    decisions = decide(gate, model_inputs([others[n] for n in names], package), None)
    assert all(d.refused for d in decisions), decisions
