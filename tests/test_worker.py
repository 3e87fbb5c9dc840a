"""The worker with real models, a real SQLite file and real DICOM files (no network peers needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import torch
from conftest import make_config
from factories import ct_like
from pydicom import dcmread
from pydicom.uid import generate_uid
from torch import nn

from dicomnode.config import Config
from dicomnode.db import Job, JobState, Outbox, Result
from dicomnode.findings import StudyFindings
from dicomnode.node.services import Services, open_services
from dicomnode.queue.jobs import InstanceRecord
from dicomnode.sandbox import DecodePool
from dicomnode.work.pipeline import Worker, pipeline_chunks
from dicomnode.work.watchdog import Watchdog

VOLUME_CARD = """
name = "{name}"
version = "1"
display_name = "Test volume model"
task = "series-classification"
architecture = "torchscript"
weights = "model.ts"
output_activation = "sigmoid"

[architecture_parameters]
num_classes = 1
in_channels = 1

[[labels]]
name = "finding"
display_name = "Finding"
code = "SCT:404684003"
code_meaning = "Clinical finding"
threshold = 0.5
output_index = 0

[preprocessing]
size = [32, 32]
channels = 1
interpolation = "bilinear"
frames = "all"

[card]
not_for_clinical_use = true
"""


class MeanSlope(nn.Module):
    """Scores a (1, C, slices, H, W) volume by how brightness changes along the slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_slice = x.mean(dim=(1, 3, 4))  # (1, slices)
        return (per_slice[:, -1:] - per_slice[:, :1]) * 50.0


class Spin(nn.Module):
    """Never returns: a model that hangs in its forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        while bool(y.sum() > -1.0):
            y = y + 1.0
        return y[:, :1, 0, 0, 0]


def write_package(folder: Path, module: nn.Module) -> Path:
    folder.mkdir(parents=True)
    with warnings.catch_warnings():  # torch deprecates TorchScript; the node still loads it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(folder / "model.ts"))
    (folder / "model.toml").write_text(VOLUME_CARD.format(name=folder.name), encoding="utf-8")
    return folder


def ct_config(tmp_path: Path, model: str, **worker: Any) -> Config:
    return make_config(
        tmp_path,
        models={"path": str(tmp_path / "models")},
        routes=[{"name": "ct", "model": model, "modality": ["CT"]}],
        worker={"poll_interval_seconds": 0.05, **worker},
    )


def store_series(services: Services, slices: int, *, study: str | None = None, brighter: bool = True) -> str:
    """Store a CT series (pixel values rising or falling along the slices) as the listener would."""
    store = services.store()
    study = study or generate_uid()
    series = generate_uid()
    order = sorted(range(slices), key=lambda i: (i * 7) % slices)  # received out of order
    for index in order:
        ds = ct_like(study, series, index, size=48)
        ds.InstanceNumber = slices - index  # numbering against position: sorting must use the position
        ds.WindowCenter, ds.WindowWidth = 4096, 10000  # one display mapping for every slice
        level = index if brighter else slices - index
        ds.PixelData = bytes([0, 4 * level]) * (48 * 48)  # little-endian 16-bit, value 1024 * level
        path = store.relative_path(study, series, ds.SOPInstanceUID)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        stored = store.write(path, buffer.getvalue())
        services.queue.record_instance(
            InstanceRecord(
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                study,
                series,
                "1.2.840.10008.1.2.1",
                path,
                stored.size_bytes,
                patient_id="TEST-0001",
                modality="CT",
            )
        )
    return study


def drain(config: Config, services: Services) -> None:
    worker = Worker(config, services)  # in-process decoding: the files are the test's own
    try:
        worker.run(threading.Event(), burst=True)
    finally:
        worker.close()


def results(services: Services) -> list[StudyFindings]:
    with services.sessions() as session:
        return [StudyFindings.from_json(r.findings_json) for r in session.query(Result).order_by(Result.id)]


def test_volume_model_sees_the_series_sorted_by_position(tmp_path: Path) -> None:
    """Slices arrive in any order; the model gets them along the slice normal and its SR is written."""
    config = ct_config(tmp_path, "volume")
    write_package(config.models.path / "volume", MeanSlope())
    services = open_services(config, upgrade=True)
    try:
        rising = store_series(services, 6, brighter=True)
        falling = store_series(services, 6, brighter=False)
        drain(config, services)
        by_study = {f.study_instance_uid: f for f in results(services)}
        assert by_study[rising].study_findings[0].present
        assert not by_study[falling].study_findings[0].present
        with services.sessions() as session:
            jobs = session.query(Job).all()
            assert {j.state for j in jobs} == {JobState.DONE} and {j.outcome for j in jobs} == {"reported"}
            objects = json.loads(session.query(Result).first().objects_json or "[]")  # type: ignore[union-attr]
        sr = hd.sr.srread(config.storage.path / objects[0]["path"])
        assert sr.StudyInstanceUID in by_study
    finally:
        services.close()


def test_pipelined_worker_with_decode_and_report_processes(tmp_path: Path) -> None:
    """Many jobs through the three-stage pipeline (decode processes, model, report process): each
    job done once with its files on disk; a report process that cannot build fails the attempt only."""
    config = ct_config(tmp_path, "volume", max_batch_size=4)
    write_package(config.models.path / "volume", MeanSlope())
    services = open_services(config, upgrade=True)
    try:
        studies = [store_series(services, 3, brighter=i % 2 == 0) for i in range(9)]
        with DecodePool(workers=2) as pool:
            worker = Worker(config, services, pool=pool)
            try:
                assert worker.report_pool is not None
                worker.run(threading.Event(), burst=True)
            finally:
                worker.close()
        by_study = {f.study_instance_uid: f for f in results(services)}
        assert set(by_study) == set(studies)
        for index, study in enumerate(studies):
            assert by_study[study].study_findings[0].present == (index % 2 == 0)
        with services.sessions() as session:
            jobs = session.query(Job).all()
            assert len(jobs) == 9 and {j.state for j in jobs} == {JobState.DONE}
            for row in session.query(Result).all():
                for obj in json.loads(row.objects_json or "[]"):
                    assert (config.storage.path / obj["path"]).stat().st_size > 0

        # a report process that cannot build: the job fails (to be retried), no result row, nothing lost
        store_series(services, 3)
        with DecodePool(workers=1) as pool:
            worker = Worker(config, services, pool=pool)
            assert worker.report_pool is not None
            worker.report_pool.close()  # every build now fails
            try:
                worker.run(threading.Event(), burst=True)
            finally:
                worker.close()
        with services.sessions() as session:
            failed = session.query(Job).filter(Job.state != JobState.DONE).all()
            assert len(failed) == 1 and failed[0].error is not None
            assert "building results failed" in failed[0].error
            assert session.query(Result).count() == 9
    finally:
        services.close()


def test_pipeline_chunks_and_watchdog_batches() -> None:
    """A claimed batch runs as two halves from four jobs on; the watchdog tracks batches apart."""
    jobs = [Any] * 7  # stand-ins: only counted
    assert [len(c) for c in pipeline_chunks(jobs)] == [4, 3]  # type: ignore[arg-type]
    assert [len(c) for c in pipeline_chunks(jobs[:3])] == [3]  # type: ignore[arg-type]
    assert pipeline_chunks([]) == []

    class Quiet:
        queue = None

    watchdog = Watchdog(Quiet(), lease_seconds=60)  # type: ignore[arg-type]
    try:
        first = watchdog.watch([], 60)
        second = watchdog.watch([], 60)
        assert first != second and len(watchdog._batches) == 2
        watchdog.rearm(first, 120)
        watchdog.clear(first)
        assert list(watchdog._batches) == [second]
        watchdog.clear()
        assert not watchdog._batches
    finally:
        watchdog.close()


def test_rerun_on_new_images_supersedes_the_previous_sr(tmp_path: Path) -> None:
    """Instances arriving after a job make a new job; its SR lists the earlier SR as predecessor."""
    config = ct_config(tmp_path, "volume")
    write_package(config.models.path / "volume", MeanSlope())
    services = open_services(config, upgrade=True)
    try:
        study = store_series(services, 3)
        drain(config, services)
        store_series(services, 3, study=study)  # a second series of the same study
        drain(config, services)
        with services.sessions() as session:
            rows = session.query(Result).order_by(Result.id).all()
            first, second = (json.loads(r.objects_json or "[]") for r in rows)
        first_sr = next(o for o in first if o["kind"] == "sr")
        second_sr = next(o for o in second if o["kind"] == "sr")
        assert first_sr["sop_instance_uid"] != second_sr["sop_instance_uid"]
        sr = dcmread(config.storage.path / second_sr["path"])
        predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == first_sr["sop_instance_uid"]
        assert len(results(services)[1].images) == 6  # the new job covers the whole study
    finally:
        services.close()


def test_outbox_rows_for_every_destination_commit_with_the_job(tmp_path: Path) -> None:
    """Each result object is queued once per destination in the transaction that completes the job."""
    config = make_config(
        tmp_path,
        models={"path": str(tmp_path / "models")},
        routes=[{"name": "ct", "model": "volume", "modality": ["CT"]}],
        destinations=[
            {"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": 1},
            {"name": "b", "ae_title": "B", "host": "127.0.0.1", "port": 2},
        ],
    )
    write_package(config.models.path / "volume", MeanSlope())
    services = open_services(config, upgrade=True)
    try:
        store_series(services, 3)
        drain(config, services)
        with services.sessions() as session:
            rows = session.query(Outbox).all()
        kinds = {(r.destination, r.sop_class_uid) for r in rows}
        assert len(rows) == 6  # SR, one key image (the series' middle slice), KOS to each of two destinations
        assert {d for d, _ in kinds} == {"a", "b"}
    finally:
        services.close()


def test_a_hanging_model_fails_its_job_and_the_worker_is_replaced(tmp_path: Path) -> None:
    """The watchdog fails the job with the reason and ends the process; nothing waits forever."""
    config = ct_config(tmp_path, "spin", job_timeout_seconds=3, decode_timeout_seconds=2, max_attempts=1)
    write_package(config.models.path / "spin", Spin())
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        "destinations = []\n"
        f'[storage]\npath = "{config.storage.path}"\ndatabase_url = "{config.storage.database_url}"\n'
        f'[studies]\nstable_after_seconds = 0\n[models]\npath = "{config.models.path}"\n'
        "[worker]\njob_timeout_seconds = 3\ndecode_timeout_seconds = 2\nmax_attempts = 1\n"
        "poll_interval_seconds = 0.05\n"
        '[[routes]]\nname = "ct"\nmodel = "spin"\nmodality = ["CT"]\n',
        encoding="utf-8",
    )
    services = open_services(config, upgrade=True)
    try:
        store_series(services, 2)
        worker = subprocess.run(
            [sys.executable, "-m", "dicomnode", "--config", str(config_file), "worker", "--burst"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert worker.returncode == 70, worker.stderr[-2000:]
        with services.sessions() as session:
            [job] = session.query(Job).all()
        assert job.state == JobState.FAILED
        assert job.error is not None and "timed out after 3 s" in job.error
    finally:
        services.close()
