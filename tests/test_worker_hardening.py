"""The worker against hostile input and a failing host: hanging decoders, unreadable headers, a
database that fails, and CPU priority. Real parts: SQLite under tmp_path, real decode processes,
a real (TorchScript) model package, real DICOM files."""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import make_config
from factories import ct_like
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from test_worker import MeanSlope, ct_config, write_package

from dicomnode.config import Config
from dicomnode.db import Job, JobState, Result, Study
from dicomnode.errors import ConfigurationError
from dicomnode.findings import StudyFindings
from dicomnode.node.inventory import list_studies
from dicomnode.node.services import Services, open_services
from dicomnode.queue.jobs import InstanceRecord
from dicomnode.sandbox import CpuPriority, DecodePool, current_cpu_priority
from dicomnode.work.pipeline import Worker
from dicomnode.work.watchdog import Backoff

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str, timeout: float) -> T:
    """Poll ``condition`` until it returns something truthy, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def store_dataset(services: Services, ds: Dataset, data: bytes | None = None) -> None:
    """Write one instance into the spool and record it, as the listener does."""
    store = services.store()
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    path = store.relative_path(study, series, ds.SOPInstanceUID)
    if data is None:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    stored = store.write(path, data)
    services.queue.record_instance(
        InstanceRecord(
            str(ds.SOPInstanceUID),
            str(ds.SOPClassUID),
            study,
            series,
            str(ds.file_meta.TransferSyntaxUID),
            path,
            stored.size_bytes,
            patient_id="TEST-0001",
            modality="CT",
        )
    )


def store_study(services: Services, slices: int = 3, *, hanging: bool = False) -> str:
    """A CT series (brightness rising along the slices); with ``hanging``, one more slice whose
    pixel data is a 36-byte JPEG 2000 stub that makes pydicom 3.0.2's decoder spin forever."""
    study, series = generate_uid(), generate_uid()
    for index in range(slices):
        ds = ct_like(study, series, index, size=32)
        ds.PixelData = bytes([0, 4 * index]) * (32 * 32)
        store_dataset(services, ds)
    if hanging:
        ds = ct_like(study, series, slices, size=16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        codestream = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x00ftyp" + b"\x00" * 16
        assert len(codestream) == 36
        ds.PixelData = encapsulate([codestream])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        store_dataset(services, ds)
    return study


def job_of(services: Services, study: str) -> Job | None:
    """The study's latest job (a study stored while the worker runs may get several)."""
    with services.sessions() as session:
        return (
            session.query(Job)
            .join(Study)
            .filter(Study.study_instance_uid == study)
            .order_by(Job.id.desc())
            .first()
        )


def done(services: Services, study: str) -> Job | None:
    """The study's latest job once every job of the study has ended, else None."""
    with services.sessions() as session:
        jobs = session.query(Job).join(Study).filter(Study.study_instance_uid == study).all()
    if jobs and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs):
        return max(jobs, key=lambda j: j.id)
    return None


class RunningWorker:
    """A non-burst worker looping in a thread until :meth:`stop`."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-worker")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run(self.stop_event)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(120)
        assert not self.thread.is_alive()
        self.worker.close()
        assert self.error is None


# --- 1. a decode hang costs only the image that hangs --------------------------------------------


def test_contradicting_timeouts_are_refused_naming_both_keys(tmp_path: Path) -> None:
    """A batch deadline no longer than one image's decode limit is refused at config load."""
    with pytest.raises(ConfigurationError) as caught:
        make_config(tmp_path, worker={"job_timeout_seconds": 10, "decode_timeout_seconds": 30})
    message = str(caught.value)
    assert "worker.job_timeout_seconds" in message and "worker.decode_timeout_seconds" in message
    with pytest.raises(ConfigurationError):
        make_config(tmp_path, worker={"job_timeout_seconds": 30, "decode_timeout_seconds": 30})
    assert make_config(tmp_path, worker={"job_timeout_seconds": 31}).worker.decode_timeout_seconds == 30


def test_a_hanging_decode_costs_only_its_image(tmp_path: Path) -> None:
    """One JPEG 2000 stub that hangs its decoder: the other jobs of its batch finish without
    waiting for it, a study arriving meanwhile is assembled and reported, and the hanging image's
    own study is reported on its other images once the decoder is killed, the stub undecodable."""
    decode_timeout = 20.0
    config = ct_config(
        tmp_path, "volume", decode_timeout_seconds=decode_timeout, job_timeout_seconds=60, max_batch_size=8
    )
    write_package(config.models.path / "volume", MeanSlope())
    services = open_services(config, upgrade=True)
    try:
        hanging = store_study(services, hanging=True)
        others = [store_study(services) for _ in range(2)]
        with DecodePool(workers=2) as pool:
            pool.ping()  # both processes up: the clock below times decoding, not spawning
            running = RunningWorker(Worker(config, services, pool=pool))
            try:
                started = time.monotonic()
                for study in others:
                    job = wait_for(partial(done, services, study), "the other jobs", decode_timeout)
                    assert job.state == JobState.DONE and job.outcome == "reported"
                assert time.monotonic() - started < decode_timeout
                assert done(services, hanging) is None  # still decoding its stub

                arrived = store_study(services)  # arrives while the stub still hangs a decoder
                job = wait_for(lambda: done(services, arrived), "the new study", decode_timeout)
                assert job.state == JobState.DONE
                assert done(services, hanging) is None

                job = wait_for(lambda: done(services, hanging), "the hanging study", 3 * decode_timeout)
                assert time.monotonic() - started >= decode_timeout
            finally:
                running.stop()
        assert job.state == JobState.DONE and job.outcome == "reported", job.error
        routing = json.loads(job.routing_json or "[]")
        errors = [r["error"] for r in routing if r["error"]]
        assert len(routing) == 4 and len(errors) == 1 and "did not finish within" in errors[0]
        with services.sessions() as session:
            [row] = session.query(Result).filter(Result.job_id == job.id).all()
        assert len(StudyFindings.from_json(row.findings_json).images) == 3
    finally:
        services.close()


# --- 3. an unreadable header fails the job with the reason ------------------------------------------


def nested_sequence_instance(depth: int = 300) -> tuple[Dataset, bytes]:
    """A CT image whose routing attributes are fine, followed by ``depth`` nested sequences of
    undefined length: pydicom raises RecursionError reading its header."""
    ds = ct_like(generate_uid(), generate_uid(), 0, size=16)
    inner = Dataset()
    inner.CodeMeaning = "x"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        outer["ContentSequence"].is_undefined_length = True
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    ds["ContentSequence"].is_undefined_length = True
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # writing it recurses as deep as reading it
    try:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    finally:
        sys.setrecursionlimit(limit)
    return ds, buffer.getvalue()


def test_an_unreadable_header_fails_the_job_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A header pydicom cannot read (RecursionError) fails the job for good, saying why, shown by
    ``dicomnode studies``; the worker goes on and no patient data reaches the log."""
    config = ct_config(tmp_path, "volume")
    write_package(config.models.path / "volume", MeanSlope())
    services = open_services(config, upgrade=True)
    try:
        ds, data = nested_sequence_instance()
        store_dataset(services, ds, data)
        fine = store_study(services)
        worker = Worker(config, services)
        try:
            with caplog.at_level(logging.INFO):
                worker.run(threading.Event(), burst=True)
        finally:
            worker.close()
        job = job_of(services, str(ds.StudyInstanceUID))
        assert job is not None and job.state == JobState.FAILED
        assert job.error is not None and job.error.startswith("header unreadable: RecursionError")
        good = job_of(services, fine)
        assert good is not None and good.state == JobState.DONE and good.outcome == "reported"
        [entry] = [
            s
            for s in list_studies(services.sessions, config.storage.path)
            if s["study_instance_uid"] == ds.StudyInstanceUID
        ]
        assert "header unreadable: RecursionError" in json.dumps(entry)
        for text in ("Test^Patient", "TEST-0001", "19700101", "ACC0001"):
            assert text not in caplog.text
    finally:
        services.close()


# --- 5. back-off while the database fails ------------------------------------------------------------


def test_database_errors_back_off_exponentially_and_the_worker_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every statement fails as on a full disk: one log line per back-off step, no traceback above
    DEBUG, waits doubling up to the cap; once the database works the queued study is reported."""
    config = ct_config(tmp_path, "volume")
    write_package(config.models.path / "volume", MeanSlope())
    services = open_services(config, upgrade=True)
    failing = threading.Event()

    def full_disk(*_: Any) -> None:
        if failing.is_set():
            raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))

    event.listen(services.engine, "before_cursor_execute", full_disk)
    try:
        study = store_study(services)
        failing.set()
        worker = Worker(config, services)
        worker.backoff = Backoff(initial_seconds=0.1, max_seconds=0.8)
        with caplog.at_level(logging.INFO, logger="dicomnode.work"):
            running = RunningWorker(worker)
            try:

                def steps() -> list[logging.LogRecord]:
                    return [r for r in caplog.records if r.getMessage().startswith("worker pass failed")]

                wait_for(lambda: len(steps()) >= 6, "six back-off steps", 30)
                failing.clear()
                job = wait_for(lambda: done(services, study), "the study after recovery", 60)
            finally:
                running.stop()
        assert job.state == JobState.DONE
        failed = steps()
        assert all(r.levelno == logging.WARNING and r.exc_info is None for r in failed)
        assert "database or disk is full" in failed[0].getMessage()
        waits = [float(r.getMessage().split("retrying in ")[1].split(" s")[0]) for r in failed]
        assert waits[:6] == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]  # doubling up to the cap
        gaps = [b.created - a.created for a, b in itertools.pairwise(failed[:6])]
        assert all(gap >= wait * 0.9 for gap, wait in zip(gaps, waits, strict=False)), gaps
        assert any("works again after" in r.getMessage() for r in caplog.records)
    finally:
        event.remove(services.engine, "before_cursor_execute", full_disk)
        services.close()


# --- 9. the worker yields the CPU to reception --------------------------------------------------------


def test_decode_processes_run_at_the_priority_asked_for() -> None:
    """A pool's children (replacements included) run nice and SCHED_BATCH; the caller is unchanged."""
    before = current_cpu_priority()
    with DecodePool(workers=1, cpu_priority=CpuPriority(7, "batch")) as pool:
        pool.ping()
        [pid] = pool.pids()
        assert current_cpu_priority(pid) == CpuPriority(7, "batch")
    assert current_cpu_priority() == before


def test_run_worker_lowers_its_own_priority(tmp_path: Path) -> None:
    """``run_worker`` applies [worker] nice and cpu_policy to itself (so to all it starts)."""
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        'destinations = []\n[storage]\npath = "var"\ndatabase_url = "sqlite:///var/dicomnode.db"\n'
        '[worker]\nnice = 5\ncpu_policy = "batch"\n',
        encoding="utf-8",
    )
    script = (
        "import sys\n"
        "from dicomnode.config import load_config\n"
        "from dicomnode.node.services import open_services\n"
        "from dicomnode.sandbox import current_cpu_priority\n"
        "from dicomnode.work.pipeline import run_worker\n"
        f"config = load_config({str(config_file)!r})\n"
        "open_services(config, upgrade=True).close()\n"
        "run_worker(config, burst=True)\n"
        "print(tuple(current_cpu_priority()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "(5, 'batch')"


def test_cpu_priority_settings_are_validated(tmp_path: Path) -> None:
    """[worker] nice is 0..19 and cpu_policy batch, idle or normal, with the key named on error."""
    config: Config = make_config(tmp_path)
    assert (config.worker.nice, config.worker.cpu_policy) == (10, "batch")
    with pytest.raises(ConfigurationError, match=r"worker\.nice"):
        make_config(tmp_path, worker={"nice": 25})
    with pytest.raises(ConfigurationError, match=r"worker\.cpu_policy"):
        make_config(tmp_path, worker={"cpu_policy": "fifo"})
