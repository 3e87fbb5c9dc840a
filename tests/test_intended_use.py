"""Intended use from the header: images outside the model card's population get no finding.

The default model (paediatric chest AP/PA, 1-6 years) runs in a real worker on real files: pydicom-data's
adult chest CR and the shipped paediatric radiographs with their headers set (PatientAge, birth date,
view). A refused image's job is done, its SR says "not analysed" with a coded reason (dciodvfy clean),
its key image says so, and no probability appears anywhere; a route's ``intended_use = "ignore"``
analyses it and records the override; ``explain`` warns.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import make_config
from corpus import find
from e2e_helpers import dciodvfy_errors
from factories import store_as_own_study
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.cli import main
from dicomnode.config import Config
from dicomnode.db import Job, JobState, Result, Study
from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.findings import REFUSED_OUTSIDE_INTENDED_USE, StudyFindings
from dicomnode.lifecycle.install import DEFAULT_PATIENT_AGE_YEARS, refresh_intended_use
from dicomnode.models.card import AppliesTo, ModelCard
from dicomnode.node.services import Services, open_services
from dicomnode.work.inference import ModelRegistry
from dicomnode.work.intended import age_from_dates, check_intended_use, header_age, parse_patient_age
from dicomnode.work.pipeline import Worker

REPO_MODEL = Path(__file__).resolve().parents[1] / "models" / "pneumonia-xception"
needs_model = pytest.mark.skipif(
    not (REPO_MODEL / "weights.pt").exists(),
    reason="the default model (dicomnode models install-default) is not installed",
)
CHEST_ROUTE = {
    "name": "chest",
    "model": "pneumonia-xception",
    "modality": ["CR"],
    "body_part_examined": ["CHEST"],
}
DEFAULT_BAND = AppliesTo(views=("AP", "PA"), patient_age_years=(1.0, 6.0))


def _header(**elements: str) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def test_ages_from_the_age_string_and_from_birth_and_study_dates() -> None:
    """005Y, 018M, 003W, 010D are years, months, weeks, days; birth date against the first date present."""
    assert parse_patient_age("005Y") == 5.0
    assert parse_patient_age("018M") == pytest.approx(1.5)
    assert parse_patient_age("003W") == pytest.approx(21 / 365.25)
    assert parse_patient_age("010D") == pytest.approx(10 / 365.25)
    assert parse_patient_age("5 years") is None and parse_patient_age("") is None
    assert age_from_dates("20150101", "20180101") == 3.0
    assert header_age(_header(PatientAge="034Y", PatientBirthDate="20150101", StudyDate="20180101")) == 34.0
    assert header_age(_header(PatientBirthDate="20150101", StudyDate="20180701")) == pytest.approx(
        3.5, abs=0.01
    )
    # no study date: the acquisition date, then the content date
    assert header_age(_header(PatientBirthDate="20150101", AcquisitionDate="20170101")) == 2.0
    assert header_age(_header(PatientBirthDate="20150101", ContentDate="20160101")) == 1.0
    assert header_age(_header(PatientBirthDate="", StudyDate="20180101")) is None


def test_the_check_names_what_is_outside_and_notes_what_is_unknown() -> None:
    adult = check_intended_use(DEFAULT_BAND, _header(PatientAge="034Y", ViewPosition="PA"))
    assert adult.refused and adult.outside == ("patient age 34 y outside 1-6 y",)
    assert adult.reason == f"{REFUSED_OUTSIDE_INTENDED_USE} (patient age 34 y outside 1-6 y)"
    assert "34" not in adult.log_reason  # log lines carry no patient data
    lateral = check_intended_use(DEFAULT_BAND, _header(PatientAge="003Y", ViewPosition="LL"))
    assert lateral.refused and lateral.outside == ("view LL not in AP/PA",)
    infant = check_intended_use(DEFAULT_BAND, _header(PatientAge="003W", ViewPosition="AP"))
    assert infant.outside == ("patient age 0.06 y outside 1-6 y",)
    unknown = check_intended_use(DEFAULT_BAND, _header())
    assert not unknown.refused and unknown.outside == () and len(unknown.notes) == 2
    assert not check_intended_use(DEFAULT_BAND, _header(PatientAge="006Y", ViewPosition="AP")).refused
    overridden = check_intended_use(DEFAULT_BAND, _header(PatientAge="034Y"), overridden=True)
    assert not overridden.refused and overridden.to_dict()["overridden"] is True
    assert not check_intended_use(AppliesTo(), _header(PatientAge="090Y", ViewPosition="LL")).refused


def _card_text(applies_to: str) -> str:
    text = (REPO_MODEL / "model.toml").read_text(encoding="utf-8")
    start = text.index("\n[applies_to]\n") + 1  # the table headers, not a mention in a comment
    end = text.index("\n[card]\n") + 1
    return text[:start] + applies_to + "\n\n" + text[end:]


@needs_model
@pytest.mark.parametrize(
    "value",
    ["[6, 1]", "[1]", '["1", "5"]', "[-1, 5]", "5"],
)
def test_a_bad_patient_age_band_names_its_key(value: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        ModelCard.from_toml(_card_text(f"[applies_to]\npatient_age_years = {value}"))
    assert raised.value.key == "applies_to.patient_age_years"
    card = ModelCard.from_toml(_card_text('[applies_to]\nviews = ["pa"]\npatient_age_years = [0.5, 6]'))
    assert card.applies_to.patient_age_years == (0.5, 6.0) and card.applies_to.views == ("PA",)


def test_a_route_override_must_be_enforce_or_ignore(tmp_path: Path) -> None:
    assert make_config(tmp_path, routes=[{**CHEST_ROUTE, "intended_use": "ignore"}]).routes[
        0
    ].intended_use == ("ignore")
    assert make_config(tmp_path, routes=[CHEST_ROUTE]).routes[0].intended_use == "enforce"
    with pytest.raises(ConfigurationError) as raised:
        make_config(tmp_path, routes=[{**CHEST_ROUTE, "intended_use": "off"}])
    assert raised.value.key == "routes[0].intended_use"


def test_a_missing_model_names_install_default_only_for_the_default_model(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailableError, match="install-default"):
        ModelRegistry(tmp_path).package("pneumonia-xception")
    with pytest.raises(ModelUnavailableError) as raised:
        ModelRegistry(tmp_path).package("knee-fracture")
    assert "install-default" not in str(raised.value) and "models list" in str(raised.value)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed default model in a folder of its own, its card brought up to this version's
    intended population by the same code `dicomnode models install-default` runs."""
    root = tmp_path_factory.mktemp("intended-models")
    folder = root / "pneumonia-xception"
    folder.mkdir()
    shutil.copy(REPO_MODEL / "model.toml", folder / "model.toml")
    for name in ("weights.pt", "ood-features.npz"):
        if (REPO_MODEL / name).exists():
            (folder / name).symlink_to(REPO_MODEL / name)
    refresh_intended_use(folder / "model.toml")
    card = ModelCard.from_file(folder / "model.toml")
    assert card.applies_to.patient_age_years == tuple(float(v) for v in DEFAULT_PATIENT_AGE_YEARS)
    assert card.applies_to.views == ("AP", "PA")
    assert not refresh_intended_use(folder / "model.toml")  # idempotent
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real radiographs: the adult chest CR as stored, and paediatric ones with their headers set."""
    from dicomnode.lifecycle.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("intended-files")
    write_demo_dataset(root / "demo")
    demo = sorted((root / "demo").glob("*.dcm"))

    def variant(name: str, source: Path, **elements: str) -> Path:
        ds = pydicom.dcmread(source)
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = root / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    return {
        "adult chest CR (RG1, 64 y by birth date)": shutil.copy(find("RG1_UNCR.dcm"), root / "rg1.dcm"),
        "034Y": variant("age34", demo[0], PatientAge="034Y"),
        "003Y PA": variant("age3", demo[1], PatientAge="003Y", ViewPosition="PA"),
        "lateral": variant("lateral", demo[2], PatientAge="003Y", ViewPosition="LL"),
        "adult lateral": variant("adult-lateral", demo[6], PatientAge="040Y", ViewPosition="LATERAL"),
        "born 2015, studied 2018": variant(
            "born", demo[3], PatientBirthDate="20150101", StudyDate="20180101"
        ),
        "born 1990, studied 2018": variant("adult-born", demo[4], PatientBirthDate="19900101"),
        "no age": demo[5],
    }


def _store(services: Services, path: Path) -> str:
    return store_as_own_study(services, path)


def _run_worker(
    config: Config, paths: dict[str, Path], pages: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Each file as a study through one worker burst; per name its job, routing, findings and files
    (and, with ``pages``, the dashboard's study page)."""
    services = open_services(config, upgrade=True)
    try:
        studies = {name: _store(services, path) for name, path in paths.items()}
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
            results = {
                StudyFindings.from_json(row.findings_json).study_instance_uid: row.findings_json
                for row in session.query(Result)
            }
            out: dict[str, dict[str, Any]] = {}
            for name, uid in studies.items():
                job = jobs[uid]
                folder = config.storage.results_path / uid
                out[name] = {
                    "state": job.state,
                    "routing": json.loads(job.routing_json)[0],
                    "findings_json": results[uid],
                    "findings": StudyFindings.from_json(results[uid]),
                    "sr": sorted(folder.rglob("sr-*.dcm")),
                    "key_images": sorted(folder.rglob("key-image-*.dcm")),
                }
        if pages is not None:
            from starlette.testclient import TestClient

            from dicomnode.http.app import create_app

            with TestClient(create_app(config, services.sessions, check_listener=False)) as client:
                for name, uid in studies.items():
                    pages[name] = client.get(f"/studies/{uid}").text
    finally:
        services.close()
    return out


def _walk(ds: Dataset) -> list[Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(_walk(item))
    return items


@needs_model
def test_the_worker_refuses_images_outside_the_intended_population(
    models: Path, files: dict[str, Path], tmp_path: Path
) -> None:
    """Adults (by PatientAge or birth date), a lateral view: no finding, a coded "not analysed" SR and
    a key image saying why, no probability anywhere, the job done. A 3-year-old PA, a child aged by birth
    date and an image without an age are analysed (the missing age noted)."""
    from dicomnode.report.sr import NOT_ANALYSED_INTENDED_USE

    config = make_config(
        tmp_path, models={"path": str(models)}, routes=[CHEST_ROUTE], worker={"poll_interval_seconds": 0.05}
    )
    pages: dict[str, str] = {}
    out = _run_worker(config, files, pages)
    refused = {
        "adult chest CR (RG1, 64 y by birth date)": "patient age 64 y outside 1-6 y",
        "034Y": "patient age 34 y outside 1-6 y",
        "lateral": "view LL not in AP/PA",
        "born 1990, studied 2018": "patient age 28 y outside 1-6 y",
        # two reasons: longer than one LO parameter, so the SR holds one parameter per reason
        "adult lateral": "patient age 40 y outside 1-6 y; view LATERAL not in AP/PA",
    }
    for name, detail in refused.items():
        result = out[name]
        assert result["state"] == JobState.DONE, name
        routing = result["routing"]
        assert routing["decision"] == REFUSED_OUTSIDE_INTENDED_USE, name
        assert routing["intended_use"]["refused"] and routing["intended_use"]["outside"] == detail.split("; ")
        assert "ood" not in routing  # refused before the model ran: no gate score, no probability
        (image,) = result["findings"].images
        assert image.findings == () and result["findings"].study_findings == ()
        assert image.refusal == f"{REFUSED_OUTSIDE_INTENDED_USE} ({detail})"
        assert "probability" not in result["findings_json"]
        (sr_path,) = result["sr"]
        sr = pydicom.dcmread(sr_path)
        items = _walk(sr)
        meanings = [i.ConceptCodeSequence[0].CodeMeaning for i in items if "ConceptCodeSequence" in i]
        assert NOT_ANALYSED_INTENDED_USE.meaning in meanings
        names = [i.ConceptNameCodeSequence[0].CodeMeaning for i in items if "ConceptNameCodeSequence" in i]
        assert "Certainty of Finding" not in names
        percents = [
            i
            for i in items
            for value in i.get("MeasuredValueSequence", [])
            if value.MeasurementUnitsCodeSequence[0].CodeValue == "%"
        ]
        assert not percents  # no certainty, no number from the model
        texts = [str(i.get("TextValue", "")) for i in items]
        for part in detail.split("; "):  # the algorithm's parameters
            assert any(part in text for text in texts), (name, part)
        (key_path,) = result["key_images"]
        comments = str(pydicom.dcmread(key_path, stop_before_pixels=True).ImageComments)
        assert "not analysed" in comments and "%" not in comments
        assert f"not analysed: {REFUSED_OUTSIDE_INTENDED_USE}" in pages[name]  # the dashboard says it
        assert all(part in comments for part in detail.split("; "))
        if shutil.which("dciodvfy") is not None and name in ("034Y", "adult lateral"):
            assert dciodvfy_errors(sr_path) == [] and dciodvfy_errors(key_path) == []
    for name in ("003Y PA", "born 2015, studied 2018", "no age"):
        result = out[name]
        assert result["state"] == JobState.DONE
        assert "decision" not in result["routing"] and not result["routing"]["intended_use"]["refused"], name
        assert result["findings"].images[0].findings and result["findings"].images[0].refusal is None
    assert any("age unknown" in note for note in out["no age"]["routing"]["intended_use"]["notes"])


@needs_model
def test_a_route_override_analyses_the_adult_and_records_it(
    models: Path, files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(
        tmp_path,
        models={"path": str(models)},
        routes=[{**CHEST_ROUTE, "intended_use": "ignore"}],
        worker={"poll_interval_seconds": 0.05},
    )
    with caplog.at_level("WARNING", logger="dicomnode.work.intended"):
        out = _run_worker(config, {"034Y": files["034Y"]})
    result = out["034Y"]
    assert result["routing"]["intended_use"] == {
        "outside": ["patient age 34 y outside 1-6 y"],
        "notes": [],
        "overridden": True,
        "refused": False,
    }
    assert "decision" not in result["routing"]
    assert result["findings"].images[0].findings and result["findings"].images[0].refusal is None
    assert 'intended_use = "ignore"' in caplog.text and "34 y" not in caplog.text


@needs_model
def test_infer_and_explain_say_the_image_would_be_refused(
    models: Path, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[models]\npath = "{models}"\n\n[[routes]]\nname = "chest"\nmodel = "pneumonia-xception"\n'
        'modality = ["CR"]\nbody_part_examined = ["CHEST"]\n',
        encoding="utf-8",
    )
    capsys.readouterr()
    assert main(["--config", str(config), "infer", "--json", str(files["034Y"]), str(files["003Y PA"])]) == 1
    refused, analysed = json.loads(capsys.readouterr().out)
    assert refused["findings"] == [] and refused["reason"] == (
        f"{REFUSED_OUTSIDE_INTENDED_USE} (patient age 34 y outside 1-6 y)"
    )
    assert analysed["findings"] and analysed["reason"] is None
    out = tmp_path / "heat.png"
    argv = [
        "--config",
        str(config),
        "explain",
        "pneumonia-xception",
        str(files["lateral"]),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "would be refused: view LL not in AP/PA" in captured.err and out.is_file()
    assert main([*argv[:4], str(files["003Y PA"]), "--out", str(out)]) == 0
    assert "would be refused" not in capsys.readouterr().err


@needs_model
def test_rules_test_says_whether_each_image_is_within_the_models_intended_use(
    models: Path, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rules test` checks the header against the routed model's card as the worker would (no torch):
    refused images say so and why, a route's override says it analyses anyway, a missing model is
    named rather than checked."""
    routes = 'modality = ["CR"]\nbody_part_examined = ["CHEST"]\n'
    config = tmp_path / "config.toml"
    config.write_text(
        f'[models]\npath = "{models}"\n\n[[routes]]\nname = "chest"\nmodel = "pneumonia-xception"\n{routes}',
        encoding="utf-8",
    )
    capsys.readouterr()
    assert (
        main(["--config", str(config), "rules", "test", "--json", str(files["034Y"]), str(files["003Y PA"])])
        == 0
    )
    adult, child = json.loads(capsys.readouterr().out)
    assert adult["intended_use"]["refused"] is True
    assert adult["intended_use"]["outside"] == ["patient age 34 y outside 1-6 y"]
    assert child["intended_use"] == {
        "checked": True,
        "outside": [],
        "notes": [],
        "overridden": False,
        "refused": False,
    }
    assert main(["--config", str(config), "rules", "test", str(files["lateral"])]) == 0
    assert (
        "intended use: outside — would be refused, no finding (view LL not in AP/PA)"
        in capsys.readouterr().out
    )

    config.write_text(
        f'[models]\npath = "{models}"\n\n[[routes]]\nname = "chest"\nmodel = "pneumonia-xception"\n{routes}'
        'intended_use = "ignore"\n',
        encoding="utf-8",
    )
    assert main(["--config", str(config), "rules", "test", str(files["034Y"])]) == 0
    assert 'analysed anyway: route intended_use = "ignore"' in capsys.readouterr().out

    nowhere = tmp_path / "none"
    config.write_text(
        f'[models]\npath = "{nowhere}"\n\n[[routes]]\nname = "chest"\nmodel = "pneumonia-xception"\n{routes}',
        encoding="utf-8",
    )
    assert main(["--config", str(config), "rules", "test", "--json", str(files["034Y"])]) == 0
    (missing,) = json.loads(capsys.readouterr().out)
    assert missing["intended_use"]["checked"] is False and "install-default" in missing["intended_use"]["why"]
