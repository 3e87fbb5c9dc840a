"""Retention on a real SQLite file and real files in tmp_path, with the clock and the disk usage injected:
delivered studies past the age limit go, oldest first above the watermark, never one with pending work;
each deletion is audited; ``purge --dry-run`` deletes nothing."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import make_config
from lxml import etree
from sqlalchemy import func, select

from dicomnode import audit
from dicomnode.db import DeliveryState, Instance, Job, JobState, Outbox, Result, Study
from dicomnode.node.retention import candidates, purge
from dicomnode.node.services import Services, open_services

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SIZE = 100


def add_study(
    services: Services,
    name: str,
    *,
    age_days: float,
    job: JobState = JobState.DONE,
    delivery: DeliveryState | None = DeliveryState.DELIVERED,
    assigned: bool = True,
) -> str:
    """A study with one instance file, one job and (optionally) one result object, as the node leaves it."""
    root = services.config.storage.path
    uid = f"1.2.826.0.1.3680043.8.498.77.{name}"
    when = NOW - timedelta(days=age_days)
    instance_path = f"instances/{uid}/1.2.3/{uid}.1.dcm"
    (root / instance_path).parent.mkdir(parents=True, exist_ok=True)
    (root / instance_path).write_bytes(b"x" * SIZE)
    with services.sessions.begin() as session:
        study = Study(
            study_instance_uid=uid, patient_id="PAT-" + name, first_received_at=when, last_received_at=when
        )
        session.add(study)
        session.flush()
        job_row = Job(study_id=study.id, state=job, created_at=when, finished_at=when)
        session.add(job_row)
        session.flush()
        session.add(
            Instance(
                sop_instance_uid=f"{uid}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                study_id=study.id,
                series_instance_uid="1.2.3",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=instance_path,
                size_bytes=SIZE,
                received_at=when,
                job_id=job_row.id if assigned else None,
            )
        )
        if delivery is not None:
            result_path = f"results/{uid}/job-{job_row.id}/sr-{uid}.9.dcm"
            (root / result_path).parent.mkdir(parents=True, exist_ok=True)
            (root / result_path).write_bytes(b"sr")
            session.add(Result(job_id=job_row.id, model_name="m", model_version="1", findings_json="{}"))
            session.add(
                Outbox(
                    job_id=job_row.id,
                    study_instance_uid=uid,
                    destination="pacs",
                    sop_instance_uid=f"{uid}.9",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    path=result_path,
                    state=delivery,
                )
            )
    return uid


def held(services: Services) -> set[str]:
    with services.sessions() as session:
        return set(session.scalars(select(Study.study_instance_uid)))


def open_retention(tmp_path: Path, **retention: float) -> Services:
    return open_services(make_config(tmp_path, retention=retention), upgrade=True)


def test_delivered_studies_past_the_limit_go_and_nothing_pending_does(tmp_path: Path) -> None:
    """Only old delivered (or committed) studies go; recent, pending, unfinished, unassigned, dead-letter
    ones stay."""
    services = open_retention(tmp_path, delete_after_days=30)
    try:
        old = add_study(services, "1", age_days=40)
        committed = add_study(services, "8", age_days=40, delivery=DeliveryState.COMMITTED)
        recent = add_study(services, "2", age_days=1)
        kept = {
            recent,
            add_study(services, "3", age_days=40, delivery=DeliveryState.PENDING),
            add_study(services, "4", age_days=40, job=JobState.QUEUED, delivery=None),
            add_study(services, "5", age_days=40, assigned=False, delivery=None),
            add_study(services, "6", age_days=40, delivery=DeliveryState.DEAD),
            add_study(services, "7", age_days=40, job=JobState.FAILED, delivery=None),
        }
        chosen = candidates(services, now=NOW, usage=lambda _path: (10, 1000))
        assert sorted(c.study_instance_uid for c in chosen) == sorted([old, committed])
        assert "older than 30 days" in chosen[0].reason
        chosen = [c for c in chosen if c.study_instance_uid == old]  # the committed one is left here
        kept.add(committed)

        audit.configure(services.config)
        try:
            assert purge(services, chosen) == 1
        finally:
            audit.shutdown()
        assert held(services) == kept
        root = services.config.storage.path
        assert not (root / "instances" / old).exists() and not (root / "results" / old).exists()
        assert (root / "instances" / recent).exists() and (root / "results" / recent).exists()
        with services.sessions() as session:
            assert session.scalar(select(func.count(Outbox.id)).where(Outbox.study_instance_uid == old)) == 0
            assert session.scalar(select(func.count(Result.id))) == 4  # the kept studies' results

        (line,) = audit.audit_path(services.config).read_bytes().splitlines()
        message = etree.fromstring(line)
        assert message.find("EventIdentification/EventID").get("csd-code") == "110105"
        assert message.find("EventIdentification").get("EventActionCode") == "D"
        study = message.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']")
        assert study.get("ParticipantObjectID") == old
    finally:
        services.close()


def test_above_the_watermark_the_oldest_delivered_studies_go_first(tmp_path: Path) -> None:
    """95 % used, 80 % allowed: the two oldest delivered studies go, enough to get below; no age limit."""
    services = open_retention(tmp_path, high_watermark_percent=80)
    try:
        oldest = add_study(services, "1", age_days=3)
        second = add_study(services, "2", age_days=2)
        newest = add_study(services, "3", age_days=1)
        add_study(services, "4", age_days=5, delivery=DeliveryState.PENDING)  # oldest, but pending

        chosen = candidates(services, now=NOW, usage=lambda _path: (950, 1000))  # 100 bytes each
        assert [c.study_instance_uid for c in chosen] == [oldest, second]
        assert "above the 80 % watermark" in chosen[0].reason
        assert candidates(services, now=NOW, usage=lambda _path: (700, 1000)) == []
        assert purge(services, chosen) == 2
        assert newest in held(services) and oldest not in held(services)
    finally:
        services.close()


def test_a_study_that_gets_new_work_after_being_chosen_is_kept(tmp_path: Path) -> None:
    """The pending-work check is repeated in the deleting transaction."""
    services = open_retention(tmp_path, delete_after_days=30)
    try:
        uid = add_study(services, "1", age_days=40)
        chosen = candidates(services, now=NOW)
        assert len(chosen) == 1
        with services.sessions.begin() as session:  # an instance arrives meanwhile
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == uid))
            session.add(
                Instance(
                    sop_instance_uid=f"{uid}.2",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    study_id=study_id,
                    series_instance_uid="1.2.3",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"instances/{uid}/1.2.3/{uid}.2.dcm",
                    size_bytes=SIZE,
                )
            )
        assert purge(services, chosen) == 0
        assert uid in held(services)
        assert (services.config.storage.path / "instances" / uid / "1.2.3" / f"{uid}.1.dcm").exists()
    finally:
        services.close()


def test_purge_dry_run_shows_what_would_go_and_deletes_nothing(tmp_path: Path) -> None:
    """``dicomnode purge --dry-run`` lists the study with its reason; the real run deletes it."""
    (tmp_path / "config.toml").write_text(
        'destinations = []\n[storage]\npath = "var"\ndatabase_url = "sqlite:///var/dicomnode.db"\n'
        "[retention]\ndelete_after_days = 30\n",
        encoding="utf-8",
    )
    services = open_retention(tmp_path, delete_after_days=30)
    try:
        uid = add_study(services, "1", age_days=400)  # 400 days before NOW: old on the real clock too
        command = [sys.executable, "-m", "dicomnode", "--config", str(tmp_path / "config.toml"), "purge"]
        dry = subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=60, check=False)
        assert dry.returncode == 0, dry.stderr
        assert f"would delete {uid}" in dry.stdout and "older than 30 days" in dry.stdout
        assert "PAT-1" not in dry.stdout
        assert uid in held(services)
        real = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert real.returncode == 0, real.stderr
        assert "deleted 1 studies" in real.stdout
        assert uid not in held(services)
    finally:
        services.close()
