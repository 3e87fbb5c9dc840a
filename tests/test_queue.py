"""Study assembly and the job queue: a contract every backend keeps (a real, migrated SQLite file and
a real PostgreSQL server; times passed in, no sleeping)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from dicomnode.config import Config
from dicomnode.db import Instance, Job, JobPriority, JobState, make_engine, make_sessionmaker, utcnow
from dicomnode.node.services import Services, open_services
from dicomnode.queue.jobs import ClaimedJob, InstanceRecord, JobQueue, LeaseLostError
from dicomnode.receive.recovery import drop_unflushed_instances

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def services(backend_services: Services) -> Iterator[Services]:
    """This module's tests are the queue's contract: run each on every database backend."""
    yield backend_services


STABLE = 10.0


def record(study: str, sop: str | None = None, series: str = "1.2.3") -> InstanceRecord:
    sop = sop or generate_uid()
    return InstanceRecord(
        sop_instance_uid=sop,
        sop_class_uid=CT,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"instances/{study}/{series}/{sop}.dcm",
        size_bytes=100,
        patient_id="TEST-0001",
        modality="CT",
        calling_ae_title="MODALITY",
    )


def later(seconds: float = STABLE + 1) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def job_row(services: Services, job_id: int) -> Job:
    with services.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def queued_job(services: Services, max_attempts: int = 3) -> tuple[int, datetime]:
    """One study recorded and assembled; returns the job id and the time it was assembled at."""
    queue = services.queue
    queue.record_instance(record(generate_uid()))
    at = later()
    [job_id] = queue.assemble_stable_studies(STABLE, max_attempts, now=at)
    return job_id, at


def test_record_instance_is_idempotent(services: Services) -> None:
    """The same SOP Instance UID recorded twice gives one row; a concurrent duplicate is a resend."""
    queue = services.queue
    study = generate_uid()
    first = record(study)
    assert queue.record_instance(first) is True
    assert queue.record_instance(first) is False
    with services.sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [first.sop_instance_uid]


def test_study_becomes_a_job_only_after_quiet_period(services: Services) -> None:
    """No job while instances are fresher than stable_after_seconds; one job for the study after."""
    queue = services.queue
    study = generate_uid()
    for _ in range(3):
        queue.record_instance(record(study))
    queue.record_instance(record(study, series="1.2.4"))
    assert queue.assemble_stable_studies(STABLE, 3, now=utcnow()) == []
    assert queue.assemble_stable_studies(STABLE, 3, now=later(STABLE - 2)) == []
    at = later()
    [job_id] = queue.assemble_stable_studies(STABLE, 3, now=at)
    assert queue.assemble_stable_studies(STABLE, 3, now=at) == []  # nothing left unassigned
    job = job_row(services, job_id)
    assert (job.state, job.attempts, job.max_attempts) == (JobState.QUEUED, 0, 3)
    instances = queue.instances_for(job_id)
    assert len(instances) == 4
    assert [i.series_instance_uid for i in instances] == ["1.2.3"] * 3 + ["1.2.4"]  # grouped by series
    assert all(i.calling_ae_title == "MODALITY" for i in instances)


def test_each_study_gets_its_own_job(services: Services) -> None:
    """Two quiet studies make two jobs; a study still receiving waits."""
    queue = services.queue
    quiet_a, quiet_b = generate_uid(), generate_uid()
    queue.record_instance(record(quiet_a))
    queue.record_instance(record(quiet_b))
    jobs = queue.assemble_stable_studies(STABLE, 3, now=later())
    assert len(jobs) == 2
    assert {queue.instances_for(j)[0].path.split("/")[1] for j in jobs} == {quiet_a, quiet_b}
    assert queue.instances_for(999_999) == []


def test_late_instances_start_a_new_job_for_the_whole_study(services: Services) -> None:
    """Instances after a job was made start a second job that covers the whole study so far."""
    queue = services.queue
    study = generate_uid()
    early = [record(study) for _ in range(2)]
    for item in early:
        queue.record_instance(item)
    [first] = queue.assemble_stable_studies(STABLE, 3, now=later())
    late = record(study, series="1.2.9")
    queue.record_instance(late)
    assert queue.assemble_stable_studies(STABLE, 3, now=utcnow()) == []  # the late one is still fresh
    [second] = queue.assemble_stable_studies(STABLE, 3, now=later())
    assert second > first
    assert {i.sop_instance_uid for i in queue.instances_for(first)} == {r.sop_instance_uid for r in early}
    assert {i.sop_instance_uid for i in queue.instances_for(second)} == {
        *(r.sop_instance_uid for r in early),
        late.sop_instance_uid,
    }


def test_claim_leases_one_job_to_one_owner(services: Services) -> None:
    """A claim marks the job running under its owner; a second claim finds nothing."""
    queue = services.queue
    job_id, at = queued_job(services)
    assert queue.claim("w1", 30, now=at - timedelta(seconds=1)) is None  # not due yet
    claimed = queue.claim("w1", 30, now=at)
    assert claimed is not None
    assert (claimed.id, claimed.owner, claimed.attempts, claimed.max_attempts) == (job_id, "w1", 1, 3)
    assert queue.claim("w2", 30, now=at) is None
    job = job_row(services, job_id)
    assert (job.state, job.lease_owner) == (JobState.RUNNING, "w1")
    assert job.lease_expires_at == at + timedelta(seconds=30)
    assert queue.heartbeat(claimed, 30)


def test_claim_many_leases_the_oldest_jobs_in_one_go(services: Services) -> None:
    """A batch claim takes up to its limit, oldest first, each job with its own study."""
    queue = services.queue
    studies = [generate_uid() for _ in range(5)]
    for study in studies:
        queue.record_instance(record(study))
    job_ids = queue.assemble_stable_studies(STABLE, 3, now=later())
    assert len(job_ids) == 5
    first = queue.claim_many("w1", 30, 3, now=later())
    assert [j.id for j in first] == sorted(job_ids)[:3]
    assert {j.study_instance_uid for j in first} <= set(studies)
    assert all((j.owner, j.attempts) == ("w1", 1) for j in first)
    rest = queue.claim_many("w2", 30, 3, now=later())
    assert [j.id for j in rest] == sorted(job_ids)[3:]
    assert queue.claim_many("w3", 30, 3, now=later()) == []


def race(url: str, work: Sequence[Callable[[JobQueue], None]]) -> None:
    """Run each of ``work`` at once in its own thread, each on its own engine (as on its own host);
    re-raise the first failure here."""
    engines = [make_engine(url) for _ in work]
    start = threading.Barrier(len(work))
    errors: list[BaseException] = []

    def run(task: Callable[[JobQueue], None], own_queue: JobQueue) -> None:
        try:
            start.wait(timeout=10)
            task(own_queue)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(task, JobQueue(make_sessionmaker(engine))))
        for task, engine in zip(work, engines, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for engine in engines:
        engine.dispose()
    if errors:
        raise errors[0]


def test_concurrent_claims_never_share_a_job(services: Services) -> None:
    """Two workers with their own engines claim from one queue: every job goes to exactly one of them."""
    queue = services.queue
    for _ in range(30):
        queue.record_instance(record(generate_uid()))
    at = later()
    jobs = queue.assemble_stable_studies(STABLE, 3, now=at)
    assert len(jobs) == 30
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    def drainer(owner: str) -> Callable[[JobQueue], None]:
        def drain(own_queue: JobQueue) -> None:
            while (job := own_queue.claim(owner, 60, now=at)) is not None:
                claimed[owner].append(job.id)

        return drain

    race(services.config.storage.database_url, [drainer("a"), drainer("b")])
    assert not set(claimed["a"]) & set(claimed["b"])
    assert sorted(claimed["a"] + claimed["b"]) == sorted(jobs)
    with services.sessions() as session:
        rows = session.scalars(select(Job)).all()
        assert all(r.state == JobState.RUNNING and r.attempts == 1 for r in rows)
        assert {r.id for r in rows if r.lease_owner == "a"} == set(claimed["a"])


def test_concurrent_assembly_makes_one_job_per_study(services: Services) -> None:
    """Four assemblers with their own engines (as on four hosts) race: each study gets one job."""
    queue = services.queue
    studies = [generate_uid() for _ in range(20)]
    for study in studies:
        for _ in range(3):
            queue.record_instance(record(study))
    at = later()
    created: list[int] = []

    def assemble(own_queue: JobQueue) -> None:
        created.extend(own_queue.assemble_stable_studies(STABLE, 3, now=at))

    race(services.config.storage.database_url, [assemble] * 4)
    assert len(created) == len(set(created)) == len(studies)
    with services.sessions() as session:
        jobs = session.scalars(select(Job)).all()
        assert len(jobs) == len(studies)
        assert len({j.study_id for j in jobs}) == len(studies)
        assert session.scalar(select(func.count()).where(Instance.job_id.is_(None))) == 0


def test_stat_jobs_are_claimed_first_and_age_lifts_routine_ones(services: Services) -> None:
    """Jobs from a STAT calling AE jump the queue; a routine job waiting past the aging limit does not
    starve behind a steady STAT stream."""
    queue = services.queue

    def study_from(ae_title: str) -> str:
        study = generate_uid()
        queue.record_instance(replace(record(study), calling_ae_title=ae_title))
        return study

    at = later()
    routine = study_from("MODALITY")
    [routine_job] = queue.assemble_stable_studies(STABLE, 3, now=at, stat_calling_ae_titles=["ER-CT"])
    stat = study_from("ER-CT")
    [stat_job] = queue.assemble_stable_studies(STABLE, 3, now=later(), stat_calling_ae_titles=["ER-CT"])
    assert job_row(services, stat_job).priority == JobPriority.STAT
    assert job_row(services, routine_job).priority == JobPriority.ROUTINE
    first = queue.claim_many("w", 60, 1, now=later(), priority_aging_seconds=600)
    assert [(j.id, j.study_instance_uid) for j in first] == [(stat_job, stat)]
    # a new STAT job arrives, but the routine one has now waited longer than the aging limit
    study_from("ER-CT")
    [newer_stat] = queue.assemble_stable_studies(STABLE, 3, now=later(), stat_calling_ae_titles=["ER-CT"])
    aged = queue.claim_many("w", 60, 1, now=at + timedelta(seconds=601), priority_aging_seconds=600)
    assert [(j.id, j.study_instance_uid) for j in aged] == [(routine_job, routine)]
    assert [j.id for j in queue.claim_many("w", 60, 5, now=later())] == [newer_stat]


def test_a_worker_that_lost_its_lease_cannot_complete_the_job(services: Services) -> None:
    """Once an expired lease sent the job to another worker, the first worker's completion (and the
    results committed with it) roll back: a job is completed by one worker only."""
    queue = services.queue
    _job_id, at = queued_job(services)
    first = queue.claim("host-a/worker-1", 30, now=at)
    assert first is not None
    queue.requeue_expired(now=at + timedelta(seconds=31))
    second = queue.claim("host-b/worker-1", 30, now=at + timedelta(seconds=32))
    assert second is not None and second.id == first.id
    with pytest.raises(LeaseLostError), queue.transaction() as session:
        queue.complete(first, "reported", session=session)
    queue.complete(second, "reported")
    job = job_row(services, first.id)
    assert job.state == JobState.DONE and job.attempts == 2


def test_expired_lease_requeues_then_fails_when_out_of_attempts(services: Services) -> None:
    """A worker that dies: its job is queued again, and failed for good after max_attempts."""
    queue = services.queue
    job_id, at = queued_job(services, max_attempts=2)
    first = queue.claim("dead-1", 30, now=at)
    assert first is not None
    assert queue.requeue_expired(now=at + timedelta(seconds=29)) == 0
    assert queue.requeue_expired(now=at + timedelta(seconds=31)) == 1
    job = job_row(services, job_id)
    assert (job.state, job.lease_owner, job.attempts) == (JobState.QUEUED, None, 1)
    assert "dead-1" in (job.error or "")
    # the dead worker's late calls change nothing: its completion is refused (and rolls back)
    assert queue.heartbeat(first, 30) is False
    with pytest.raises(LeaseLostError):
        queue.complete(first, "reported")
    assert job_row(services, job_id).state == JobState.QUEUED
    second_at = at + timedelta(seconds=40)
    second = queue.claim("dead-2", 30, now=second_at)
    assert second is not None and second.attempts == 2
    assert queue.requeue_expired(now=second_at + timedelta(seconds=31)) == 1
    job = job_row(services, job_id)
    assert job.state == JobState.FAILED
    assert job.finished_at is not None
    assert queue.claim("w", 30, now=second_at + timedelta(hours=1)) is None


def test_fail_with_delay_requeues_later_and_eventually_fails(services: Services) -> None:
    """fail() puts the job back with not_before in the future until the attempts run out."""
    queue = services.queue
    job_id, _ = queued_job(services, max_attempts=3)
    states = []
    for attempt in range(1, 4):
        claimed = queue.claim("w", 30, now=later(3600 * attempt))
        assert claimed is not None and claimed.attempts == attempt
        before = utcnow()
        states.append(queue.fail(claimed, f"boom {attempt}", retry_delay_seconds=120))
        job = job_row(services, job_id)
        assert job.error == f"boom {attempt}"
        assert job.lease_owner is None
        if attempt < 3:
            assert job.not_before >= before + timedelta(seconds=120)
            assert queue.claim("w", 30, now=utcnow()) is None  # not due yet
    assert states == [JobState.QUEUED, JobState.QUEUED, JobState.FAILED]
    assert job_row(services, job_id).finished_at is not None


def test_permanent_failure_skips_retries(services: Services) -> None:
    """fail(permanent=True) ends the job on its first attempt."""
    queue = services.queue
    _job_id, at = queued_job(services, max_attempts=3)
    claimed = queue.claim("w", 30, now=at)
    assert claimed is not None
    assert queue.fail(claimed, "no model", permanent=True) == JobState.FAILED


def test_complete_marks_done_and_clears_the_lease(services: Services) -> None:
    """complete() records the outcome and frees the job."""
    queue = services.queue
    job_id, at = queued_job(services)
    claimed = queue.claim("w", 30, now=at)
    assert claimed is not None
    queue.complete(claimed, "no-model")
    job = job_row(services, job_id)
    assert (job.state, job.outcome, job.lease_owner, job.error) == (JobState.DONE, "no-model", None, None)
    assert job.finished_at is not None
    assert queue.requeue_expired(now=later(3600)) == 0


def test_complete_inside_a_callers_transaction(services: Services) -> None:
    """complete(session=...) commits together with the caller's other writes."""
    queue = services.queue
    job_id, at = queued_job(services)
    claimed = queue.claim("w", 30, now=at)
    assert claimed is not None
    with queue.transaction() as session:
        queue.complete(claimed, "reported", session=session)
        row = session.get(Job, job_id)
        assert row is not None
        row.routing_json = "[]"
    job = job_row(services, job_id)
    assert (job.state, job.routing_json) == (JobState.DONE, "[]")


def test_requeue_runs_failed_and_done_jobs_again(services: Services) -> None:
    """requeue() resets attempts of failed or done jobs and leaves queued or running ones alone."""
    queue = services.queue
    failed_id, at = queued_job(services, max_attempts=1)
    claimed = queue.claim("w", 30, now=at)
    assert claimed is not None and claimed.id == failed_id
    assert queue.fail(claimed, "boom") == JobState.FAILED
    running_id, at2 = queued_job(services)
    running = queue.claim("w", 30, now=at2)
    assert running is not None and running.id == running_id
    assert queue.requeue([failed_id, running_id]) == 1
    job = job_row(services, failed_id)
    assert (job.state, job.attempts, job.error, job.finished_at) == (JobState.QUEUED, 0, None, None)
    again = queue.claim("w2", 30, now=utcnow())
    assert isinstance(again, ClaimedJob) and again.id == failed_id and again.attempts == 1
    assert job_row(services, running_id).state == JobState.RUNNING


def test_force_fail_requeues_a_running_job(services: Services) -> None:
    """The watchdog's force_fail puts a running job back (or fails it when out of attempts)."""
    queue = services.queue
    job_id, at = queued_job(services, max_attempts=2)
    assert queue.claim("w", 30, now=at) is not None
    queue.force_fail(job_id, "timed out")
    job = job_row(services, job_id)
    assert (job.state, job.error, job.lease_owner) == (JobState.QUEUED, "timed out", None)
    assert queue.claim("w", 30, now=later(60)) is not None
    queue.force_fail(job_id, "timed out again")
    assert job_row(services, job_id).state == JobState.FAILED
    queue.force_fail(job_id, "ignored")  # not running: nothing happens
    assert job_row(services, job_id).error == "timed out again"


def test_rows_whose_file_never_reached_disk_are_forgotten_at_start(services: Services) -> None:
    """After a power loss, rows of missing or short files (never acknowledged) go; complete ones stay."""
    root = services.config.storage.path
    study = generate_uid()
    kept, short, missing = (record(study) for _ in range(3))
    for item, size in ((kept, 100), (short, 40)):  # record() says 100 bytes
        path = root / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    for item in (kept, short, missing):
        assert services.queue.record_instance(item)
    assert drop_unflushed_instances(services.queue, root) == 2
    with services.sessions() as session:
        left = session.scalars(select(Instance.sop_instance_uid)).all()
    assert left == [kept.sop_instance_uid]
    assert (root / kept.path).exists() and not (root / short.path).exists()  # a resend writes it afresh


def test_sqlite_indexes_through_its_driver_exactly_what_the_core_statements_write(config: Config) -> None:
    """The embedded default records instances with SQL on SQLite's own cursor (a third of the cost);
    its rows must be those of the Core statements every other backend runs, value for value, with
    timestamps in SQLAlchemy's format, so every reader sees one kind of row."""
    sqlite_services = open_services(config, upgrade=True)
    try:
        queue = sqlite_services.queue
        assert queue._sqlite_engine is not None  # the fast path is the one SQLite takes
        fast, core = generate_uid(), generate_uid()
        first = replace(
            record(fast), patient_id="P1", study_date="20260101", modality="CT", calling_ae_title="CT1"
        )
        second = replace(
            record(core), patient_id="P1", study_date="20260101", modality="CT", calling_ae_title="CT1"
        )
        assert queue.record_instance(first) is True
        assert queue._insert_instance_core(second) is True
        assert queue.record_instance(first) is False  # a resend, through the fast path
        with sqlite_services.engine.connect() as connection:
            studies = connection.exec_driver_sql(
                "SELECT study_instance_uid, patient_id, study_date, first_received_at, last_received_at"
                " FROM studies ORDER BY id"
            ).all()
            instances = connection.exec_driver_sql(
                "SELECT sop_class_uid, series_instance_uid, transfer_syntax_uid, modality, size_bytes,"
                " calling_ae_title, typeof(received_at), length(received_at), typeof(study_id)"
                " FROM instances ORDER BY id"
            ).all()
        assert [row[0] for row in studies] == [fast, core]
        assert [row[1:3] for row in studies] == [("P1", "20260101")] * 2
        shapes = {(type(value), len(value)) for row in studies for value in row[3:]}
        assert shapes == {(str, len("2026-12-02 17:32:32.768493"))}
        assert instances[0] == instances[1]
        with sqlite_services.sessions() as session:
            received = session.scalars(select(Instance.received_at)).all()
        assert all(value.tzinfo is not None for value in received)
        assert abs(received[1] - received[0]) < timedelta(minutes=1)
    finally:
        sqlite_services.close()
