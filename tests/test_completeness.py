"""Study completeness: a study whose route requirements are met starts at once; others wait."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicomnode.config import Config
from dicomnode.db import Job
from dicomnode.errors import ConfigurationError
from dicomnode.node.services import Services, open_services
from dicomnode.queue.jobs import InstanceRecord
from dicomnode.work.completeness import CompletenessTracker
from dicomnode.work.pipeline import Worker


def chest_config(tmp_path: Path, **route: Any) -> Config:
    """A chest route with the given completeness keys and a long quiet period (60 s)."""
    return make_config(
        tmp_path,
        studies={"stable_after_seconds": 60},
        routes=[{"name": "chest", "model": "pneumonia-xception", "modality": ["CR", "DX"], **route}],
    )


def store(
    services: Services, study: str, *, view: str = "PA", related: int | None = None, modality: str = "CR"
) -> str:
    """Store one CR radiograph of ``study`` as the listener would; returns its SOP Instance UID."""
    ds = dcmread(get_testdata_file("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.ViewPosition, ds.Modality = view, modality
    if related is not None:
        ds.NumberOfStudyRelatedInstances = related
    spool = services.store()
    path = spool.relative_path(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    stored = spool.write(path, buffer.getvalue())
    services.queue.record_instance(
        InstanceRecord(
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            study,
            str(ds.SeriesInstanceUID),
            str(ds.file_meta.TransferSyntaxUID),
            path,
            stored.size_bytes,
            modality="CR",
        )
    )
    return str(ds.SOPInstanceUID)


def jobs(services: Services) -> int:
    with services.sessions() as session:
        return session.query(Job).count()


def assemble(config: Config, services: Services) -> None:
    """One assembly pass of the worker (what it runs before each claim)."""
    worker = Worker(config, services)
    try:
        worker._assemble()
    finally:
        worker.close()


def test_single_pa_radiograph_starts_at_once_when_required_series_is_met(tmp_path: Path) -> None:
    """required_series = PA: one PA image makes a job on the next pass, without the 60 s quiet period."""
    config = chest_config(tmp_path, required_series={"view_position": ["PA"]})
    services = open_services(config, upgrade=True)
    try:
        store(services, generate_uid(), view="PA")
        assemble(config, services)
        assert jobs(services) == 1
    finally:
        services.close()


def test_unmet_requirements_wait_until_the_ceiling(tmp_path: Path) -> None:
    """An AP image does not meet required_series = PA: it waits, saying why, until max_wait_seconds."""
    config = chest_config(tmp_path, required_series={"view_position": ["PA"]}, max_wait_seconds=30)
    services = open_services(config, upgrade=True)
    try:
        store(services, generate_uid(), view="AP")
        tracker = CompletenessTracker(config, services.queue)
        assert tracker.ready_studies() == []
        assemble(config, services)
        assert jobs(services) == 0
        ((_, readiness),) = tracker.ready_studies(datetime.now(UTC) + timedelta(seconds=31))
        assert readiness.condition.startswith("max_wait_seconds 30 reached")
    finally:
        services.close()


def test_expected_instances_from_the_header(tmp_path: Path) -> None:
    """expected_instances = "header": 1 of 2 waits; the second instance makes the study ready at once."""
    config = chest_config(tmp_path, expected_instances="header")
    services = open_services(config, upgrade=True)
    try:
        study = generate_uid()
        store(services, study, related=2)
        tracker = CompletenessTracker(config, services.queue)
        assert tracker.ready_studies() == []
        store(services, study, related=2, view="LL")
        ((_, readiness),) = tracker.ready_studies()
        assert "expected_instances met (2 of 2)" in readiness.condition
        assemble(config, services)
        assert jobs(services) == 1
        store(services, study, related=2)  # a late instance: a new job, as before
        assemble(config, services)
        assert jobs(services) == 2
    finally:
        services.close()


def test_route_without_requirements_keeps_the_quiet_period(tmp_path: Path) -> None:
    """A study no requirement route matches waits for stable_after_seconds, as before."""
    config = make_config(
        tmp_path,
        studies={"stable_after_seconds": 60},
        routes=[
            {"name": "chest", "model": "m", "modality": ["CR"], "required_series": {"view_position": ["PA"]}},
            {"name": "ct", "model": "m", "modality": ["CT"]},
        ],
    )
    services = open_services(config, upgrade=True)
    try:
        store(services, generate_uid(), view="PA")
        other = generate_uid()
        tracker = CompletenessTracker(config, services.queue)
        assert len(tracker.ready_studies()) == 1
        assert other  # the CR study is the only ready one; an unmatched study waits 60 s
        ((_, readiness),) = tracker.ready_studies()
        assert readiness.condition.startswith("requirements met at once")
    finally:
        services.close()


@pytest.mark.parametrize(
    ("route", "key"),
    [
        ({"required_series": {"view": ["PA"]}}, "routes[0].required_series.view"),
        ({"required_series": {}}, "routes[0].required_series"),
        ({"expected_instances": 0}, "routes[0].expected_instances"),
        ({"expected_instances": "dicom"}, "routes[0].expected_instances"),
        ({"max_wait_seconds": -1}, "routes[0].max_wait_seconds"),
    ],
)
def test_completeness_keys_are_validated(tmp_path: Path, route: dict[str, Any], key: str) -> None:
    """Each bad completeness key is refused with its full name."""
    with pytest.raises(ConfigurationError) as caught:
        chest_config(tmp_path, **route)
    assert caught.value.key == key


def test_rules_test_explains_which_condition_fires(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rules test --json` says a PA starts at once (required_series met) and an AP waits."""
    import json

    from dicomnode.cli import main

    config = tmp_path / "config.toml"
    config.write_text(
        '[studies]\nstable_after_seconds = 10\n\n[[routes]]\nname = "chest"\nmodel = "m"\n'
        'modality = ["CR"]\nrequired_series = { view_position = ["PA"] }\n',
        encoding="utf-8",
    )
    files = []
    for view in ("PA", "AP"):
        ds = dcmread(get_testdata_file("RG1_UNCR.dcm"))
        ds.StudyInstanceUID, ds.ViewPosition = generate_uid(), view
        files.append(tmp_path / f"{view}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    capsys.readouterr()
    assert main(["--config", str(config), "rules", "test", "--json", *map(str, files)]) == 0
    pa, ap = json.loads(capsys.readouterr().out)
    assert pa["start"].startswith("requirements met at once") and "required_series met" in pa["start"]
    assert ap["start"].startswith("waiting for stable_after_seconds 10")
    assert "ViewPosition AP not in ['PA']" in ap["start"]
