"""Model versioning and shadow mode: two versions of a model side by side, a route naming one by
version and running another as its shadow (stored, compared, never sent)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from conftest import make_config
from factories import store_as_own_study
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from dicomnode import migrate
from dicomnode.cli import main
from dicomnode.config import Config, config_from_mapping
from dicomnode.db import Job, JobState, Outbox, Result, UTCDateTime, make_engine
from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.findings import StudyFindings
from dicomnode.node.services import Services, open_services
from dicomnode.work.inference import ModelRegistry
from dicomnode.work.pipeline import Worker

REPO_CARD = Path(__file__).resolve().parents[1] / "models" / "pneumonia-xception" / "model.toml"


def install_version(models: Path, folder: str, version: str) -> None:
    """A copy of the default model's card with another version (weights: a placeholder file)."""
    target = models / folder
    target.mkdir(parents=True)
    text = REPO_CARD.read_text(encoding="utf-8").replace('version = "0.3.0"', f'version = "{version}"', 1)
    (target / "model.toml").write_text(text, encoding="utf-8")
    (target / "weights.pt").write_bytes(b"placeholder")


@pytest.mark.skipif(not REPO_CARD.is_file(), reason="the default model's card is not installed")
def test_two_versions_side_by_side_are_named_by_version(tmp_path: Path) -> None:
    """`NAME@VERSION` picks the package by its card, whatever its folder; the folder name still works;
    an unknown version names the version it looked for."""
    models = tmp_path / "models"
    install_version(models, "pneumonia-xception", "0.3.0")
    install_version(models, "pneumonia-xception-next", "0.4.0")
    registry = ModelRegistry(models)
    assert registry.package("pneumonia-xception@0.4.0").card.version == "0.4.0"
    assert registry.package("pneumonia-xception@0.3.0").path.name == "pneumonia-xception"
    assert registry.package("pneumonia-xception").card.version == "0.3.0"
    with pytest.raises(ModelUnavailableError, match=r"version '9\.9'"):
        registry.package("pneumonia-xception@9.9")


# --- shadow mode: a route's shadow models run on the same images, stored, never sent -----------------

REPO_MODEL = REPO_CARD.parent
needs_model = pytest.mark.skipif(
    not (REPO_MODEL / "weights.pt").is_file(), reason="the default model's weights are not installed"
)
DESTINATION = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def install_real_version(models: Path, folder: str, version: str) -> None:
    """The default model under another version: its card copied, its weights and gate linked."""
    target = models / folder
    target.mkdir(parents=True)
    text = REPO_CARD.read_text(encoding="utf-8").replace('version = "0.3.0"', f'version = "{version}"', 1)
    assert f'version = "{version}"' in text
    (target / "model.toml").write_text(text, encoding="utf-8")
    for name in ("weights.pt", "ood-features.npz"):
        if (REPO_MODEL / name).is_file():
            (target / name).symlink_to(REPO_MODEL / name)


def store_file(services: Services, path: Path) -> str:
    return store_as_own_study(services, path, patient_id=None)


@dataclass
class ShadowedNode:
    """A node that ran its worker once over a few chest studies with a shadow on its route."""

    root: Path
    config: Config
    config_file: Path
    studies: list[str]
    results: list[Result]
    outbox: list[Outbox]
    jobs: list[Job]


def run_node(root: Path, models: Path, chests: list[Path], shadow: list[str]) -> ShadowedNode:
    """Store ``chests`` (a study each), run a burst worker, and read back its rows."""
    route = {"name": "chest", "model": "pneumonia-xception", "modality": ["CR", "DX"], "shadow": shadow}
    config = make_config(
        root,
        models={"path": str(models)},
        routes=[route],
        destinations=[DESTINATION],
        worker={"poll_interval_seconds": 0.05},
    )
    config_file = root / "config.toml"
    config_file.write_text(
        f'[storage]\npath = "{root / "var"}"\ndatabase_url = "sqlite:///{root / "var" / "dicomnode.db"}"\n'
        f'[models]\npath = "{models}"\n',
        encoding="utf-8",
    )
    services = open_services(config, upgrade=True)
    try:
        studies = [store_file(services, chest) for chest in chests]
        worker = Worker(config, services)
        try:
            worker.run(threading.Event(), burst=True)
        finally:
            worker.close()
        with services.sessions() as session:
            results = list(session.scalars(select(Result).order_by(Result.id)))
            outbox = list(session.scalars(select(Outbox)))
            jobs = list(session.scalars(select(Job)))
            session.expunge_all()
    finally:
        services.close()
    return ShadowedNode(root, config, config_file, studies, results, outbox, jobs)


@pytest.fixture(scope="module")
def chests(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from dicomnode.lifecycle.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("chests")
    write_demo_dataset(root)
    return sorted(root.glob("*.dcm"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model twice: 0.3.0 (its own folder) and 0.4.0 (same weights, another folder)."""
    folder = tmp_path_factory.mktemp("models")
    install_real_version(folder, "pneumonia-xception", "0.3.0")
    install_real_version(folder, "pneumonia-xception-next", "0.4.0")
    return folder


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory: pytest.TempPathFactory, models: Path, chests: list[Path]) -> ShadowedNode:
    return run_node(tmp_path_factory.mktemp("node"), models, chests[:4], ["pneumonia-xception@0.4.0"])


def test_a_route_names_its_shadows_and_each_is_checked(tmp_path: Path) -> None:
    """`shadow` is a list of other models; a bad entry is named by its index, the route's own
    model is refused as its shadow."""
    base = {"name": "chest", "model": "pneumonia-xception", "modality": ["CR"]}
    config = config_from_mapping(
        {"routes": [{**base, "shadow": ["pneumonia-xception@0.4"]}]}, base_dir=tmp_path
    )
    assert config.routes[0].shadow == ("pneumonia-xception@0.4",)
    assert config_from_mapping({"routes": [base]}, base_dir=tmp_path).routes[0].shadow == ()
    cases = {
        "routes[0].shadow[1]": ["a@1", 3],
        "routes[0].shadow[0]": ["pneumonia-xception"],
        "routes[0].shadow": "pneumonia-xception@0.4",
    }
    for key, shadow in cases.items():
        with pytest.raises(ConfigurationError) as caught:
            config_from_mapping({"routes": [{**base, "shadow": shadow}]}, base_dir=tmp_path)
        assert caught.value.key == key
    with pytest.raises(ConfigurationError, match="listed twice"):
        config_from_mapping({"routes": [{**base, "shadow": ["a@1", "a@1"]}]}, base_dir=tmp_path)


@needs_model
def test_the_shadow_runs_on_the_same_images_is_stored_and_never_sent(shadowed: ShadowedNode) -> None:
    """Each job has a reporting row (0.3.0, with objects) and a shadow row (0.4.0, findings only,
    same probabilities: same weights); outbox rows and SR name only the reporting model."""
    assert {job.state for job in shadowed.jobs} == {JobState.DONE}
    assert len(shadowed.results) == 2 * len(shadowed.studies)
    by_job: dict[int, dict[str, Result]] = {}
    for row in shadowed.results:
        by_job.setdefault(row.job_id, {})[row.role] = row
    reported_uids = set()
    for rows in by_job.values():
        reporting, shadow = rows["reporting"], rows["shadow"]
        assert (reporting.model_name, reporting.model_version) == ("pneumonia-xception", "0.3.0")
        assert (shadow.model_name, shadow.model_version) == ("pneumonia-xception", "0.4.0")
        assert shadow.error is None and shadow.objects_json is None
        a, b = StudyFindings.from_json(reporting.findings_json), StudyFindings.from_json(shadow.findings_json)
        assert [i.sop_instance_uid for i in a.images] == [i.sop_instance_uid for i in b.images]
        assert [f.probability for f in a.study_findings] == pytest.approx(
            [f.probability for f in b.study_findings]
        )
        assert all(image.heatmaps == {} for image in b.images)  # findings only: no heat maps either
        reported_uids |= {obj["sop_instance_uid"] for obj in json.loads(reporting.objects_json or "[]")}
    assert reported_uids and {row.sop_instance_uid for row in shadowed.outbox} == reported_uids
    assert len(shadowed.outbox) == len(reported_uids)  # one destination
    files = sorted(shadowed.config.storage.results_path.rglob("*.dcm"))
    assert len(files) == len(reported_uids)  # nothing built for the shadow
    shadow_identity = StudyFindings.from_json(by_job[shadowed.jobs[0].id]["shadow"].findings_json).model
    for path in files:
        ds = pydicom.dcmread(path)
        text = str(ds)
        assert "0.4.0" not in str(ds.get("SoftwareVersions", "")) and "pneumonia-xception 0.4.0" not in text
        assert shadow_identity.device_observer_uid not in text
    (sr,) = [pydicom.dcmread(p) for p in files if p.name.startswith("sr-") and shadowed.studies[0] in str(p)]
    assert sr.SoftwareVersions == "0.3.0"


@needs_model
def test_compare_finds_identical_weights_in_full_agreement(
    shadowed: ShadowedNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dicomnode compare` over the reporting model and its shadow: agreement 1, correlation 1,
    mean difference 0; with labels, both AUROCs are the same number."""
    args = [
        "--config",
        str(shadowed.config_file),
        "compare",
        "pneumonia-xception@0.3.0",
        "pneumonia-xception@0.4.0",
    ]
    capsys.readouterr()
    assert main([*args, "--since", "1h", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["jobs"] == len(shadowed.studies)
    (label,) = result["labels"]
    assert label["label"] == "pneumonia" and label["images"] == len(shadowed.studies) == label["studies"]
    assert label["agreement"] == 1.0
    assert label["pearson"] == pytest.approx(1.0) and label["spearman"] == pytest.approx(1.0)
    assert label["mean_absolute_difference"] == pytest.approx(0.0, abs=1e-6)
    assert label["auroc_a"] is None
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "agreement of the positive decision 1.000" in text and "no labels" in text
    labels = shadowed.root / "labels.csv"
    rows = ["study_instance_uid,pneumonia"] + [f"{uid},{i % 2}" for i, uid in enumerate(shadowed.studies)]
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert main([*args, "--labels", str(labels), "--json"]) == 0
    (label,) = json.loads(capsys.readouterr().out)["labels"]
    assert label["labelled_images"] == len(shadowed.studies)
    assert label["auroc_a"] is not None and label["auroc_a"] == pytest.approx(label["auroc_b"])


@needs_model
def test_a_missing_shadow_leaves_the_job_done_and_delivered_with_its_error(
    tmp_path: Path, models: Path, chests: list[Path]
) -> None:
    """A shadow version that is not installed costs nothing but its own row, which says why."""
    node = run_node(tmp_path, models, chests[:1], ["pneumonia-xception@9.9"])
    (job,) = node.jobs
    assert job.state == JobState.DONE and job.outcome == "reported"
    reporting, shadow = sorted(node.results, key=lambda r: r.role)
    assert reporting.role == "reporting" and reporting.error is None
    assert shadow.role == "shadow" and (shadow.model_name, shadow.model_version) == (
        "pneumonia-xception",
        "9.9",
    )
    assert "version '9.9'" in (shadow.error or "") and shadow.objects_json is None
    assert node.outbox and all(row.job_id == job.id for row in node.outbox)


def test_migration_0003_keys_results_by_version_and_keeps_old_rows(database_url: str) -> None:
    """On SQLite and PostgreSQL: a row from before 0003 becomes a reporting row; two versions of one
    model then fit in one job; going back to 0002 removes the shadow rows and restores the old key."""
    now = datetime.now(UTC)
    studies = sa.table(
        "studies",
        sa.column("id"),
        sa.column("study_instance_uid"),
        sa.column("first_received_at", UTCDateTime()),
        sa.column("last_received_at", UTCDateTime()),
    )
    jobs = sa.table(
        "jobs",
        sa.column("id"),
        sa.column("study_id"),
        sa.column("state"),
        sa.column("attempts"),
        sa.column("max_attempts"),
        sa.column("created_at", UTCDateTime()),
        sa.column("updated_at", UTCDateTime()),
        sa.column("not_before", UTCDateTime()),
    )
    results = sa.table(
        "results",
        sa.column("id"),
        sa.column("job_id"),
        sa.column("model_name"),
        sa.column("model_version"),
        sa.column("findings_json"),
        sa.column("created_at", UTCDateTime()),
    )
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0002")
        with engine.begin() as connection:
            connection.execute(
                studies.insert().values(
                    id=1, study_instance_uid="1.2.3", first_received_at=now, last_received_at=now
                )
            )
            connection.execute(
                jobs.insert().values(
                    id=1,
                    study_id=1,
                    state="done",
                    attempts=1,
                    max_attempts=3,
                    created_at=now,
                    updated_at=now,
                    not_before=now,
                )
            )
            row = {"job_id": 1, "model_name": "m", "findings_json": "{}", "created_at": now}
            connection.execute(results.insert().values(id=1, model_version="1", **row))
        migrate.upgrade(engine)
        with engine.begin() as connection:
            assert connection.execute(sa.text("SELECT role, error FROM results")).one() == ("reporting", None)
            connection.execute(
                sa.text(
                    "INSERT INTO results (id, job_id, model_name, model_version, findings_json, "
                    "created_at, role) VALUES (2, 1, 'm', '2', '{}', :now, 'shadow')"
                ),
                {"now": now},
            )
        with pytest.raises(IntegrityError), engine.begin() as connection:  # the same version twice
            connection.execute(results.insert().values(id=3, model_version="2", **row))
        migrate.check(engine)
        migrate.downgrade(engine, "0002")
        with engine.begin() as connection:
            assert connection.execute(sa.text("SELECT id FROM results")).scalars().all() == [1]
        with pytest.raises(IntegrityError), engine.begin() as connection:  # the old key is back
            connection.execute(results.insert().values(id=4, model_version="3", **row))
    finally:
        engine.dispose()


@needs_model
def test_studies_and_status_show_shadow_results(
    shadowed: ShadowedNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """`studies --json` lists each job's results with their role; `status --json` counts shadow runs."""
    capsys.readouterr()
    assert main(["--config", str(shadowed.config_file), "studies", "--json"]) == 0
    studies = json.loads(capsys.readouterr().out)
    for study in studies:
        (job,) = study["jobs"]
        roles = {(r["role"], r["model_version"]) for r in job["results"]}
        assert roles == {("reporting", "0.3.0"), ("shadow", "0.4.0")}
        assert all(r["study_findings"][0]["label"] == "pneumonia" for r in job["results"])
    assert main(["--config", str(shadowed.config_file), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    count = len(shadowed.studies)
    assert status["results"] == {"reporting": count, "shadow": count, "shadow_errors": 0}


def test_a_hanging_shadow_is_recorded_after_the_job_is_delivered_and_ends_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shadow past job_timeout_seconds: the job is already done with its outbox rows, the shadow's
    row says it timed out, and the worker asks to exit (a hung model thread cannot be stopped)."""
    from test_worker import MeanSlope, store_series, write_package

    import dicomnode.work.shadow as shadow_module
    from dicomnode.work.watchdog import EXIT_WATCHDOG

    write_package(tmp_path / "models" / "ct-a", MeanSlope())
    write_package(tmp_path / "models" / "ct-b", MeanSlope())
    release = threading.Event()
    real_predict = shadow_module.predict

    def hanging(images: list[Any], registry: Any, **kwargs: Any) -> dict[str, float]:
        if any(image.decision.model == "ct-b" for image in images):
            release.wait(30)  # a model stuck in its forward pass
        return real_predict(images, registry, **kwargs)

    monkeypatch.setattr(shadow_module, "predict", hanging)
    config = make_config(
        tmp_path,
        models={"path": str(tmp_path / "models")},
        routes=[{"name": "ct", "model": "ct-a", "modality": ["CT"], "shadow": ["ct-b"]}],
        destinations=[DESTINATION],
        worker={"poll_interval_seconds": 0.05, "job_timeout_seconds": 2, "decode_timeout_seconds": 1},
    )
    services = open_services(config, upgrade=True)
    exits: list[int] = []
    try:
        store_series(services, 4)
        worker = Worker(config, services)
        worker.shadows.exit_process = exits.append
        try:
            worker.run(threading.Event(), burst=True)
        finally:
            release.set()
            worker.close()
        with services.sessions() as session:
            (job,) = session.scalars(select(Job)).all()
            rows = {r.role: r for r in session.scalars(select(Result))}
            outbox = session.scalars(select(Outbox)).all()
    finally:
        services.close()
    assert job.state == JobState.DONE and outbox
    assert rows["reporting"].model_name == "ct-a" and rows["reporting"].error is None
    assert rows["shadow"].model_name == "ct-b" and "timed out after 2 s" in (rows["shadow"].error or "")
    assert exits == [EXIT_WATCHDOG]


def test_a_crashing_shadow_leaves_the_job_reported_with_its_error(tmp_path: Path) -> None:
    """A shadow whose forward pass raises: the job is done with its outbox rows, the shadow's row
    holds the exception, and no object was built for it."""
    from test_worker import MeanSlope, store_series, write_package
    from torch import Tensor, nn

    class Broken(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("broken shadow")

    write_package(tmp_path / "models" / "ct-a", MeanSlope())
    write_package(tmp_path / "models" / "ct-broken", Broken())
    config = make_config(
        tmp_path,
        models={"path": str(tmp_path / "models")},
        routes=[{"name": "ct", "model": "ct-a", "modality": ["CT"], "shadow": ["ct-broken"]}],
        destinations=[DESTINATION],
        worker={"poll_interval_seconds": 0.05},
    )
    services = open_services(config, upgrade=True)
    try:
        store_series(services, 3)
        worker = Worker(config, services)
        try:
            worker.run(threading.Event(), burst=True)
        finally:
            worker.close()
        with services.sessions() as session:
            (job,) = session.scalars(select(Job)).all()
            rows = {r.role: r for r in session.scalars(select(Result))}
            outbox = session.scalars(select(Outbox)).all()
    finally:
        services.close()
    assert job.state == JobState.DONE and job.outcome == "reported"
    reported = {o["sop_instance_uid"] for o in json.loads(rows["reporting"].objects_json or "[]")}
    assert reported and {o.sop_instance_uid for o in outbox} == reported
    assert "shadow model failed" in (rows["shadow"].error or "") and "broken shadow" in (
        rows["shadow"].error or ""
    )
    assert rows["shadow"].objects_json is None
    assert StudyFindings.from_json(rows["shadow"].findings_json).images == ()
