"""``dicomnode db copy``: an existing SQLite node moved to a real PostgreSQL server keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest
from postgres import PostgresServer
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from test_cli import write_config
from test_queue import STABLE, later, record

from dicomnode.cli import main
from dicomnode.db import Base, Instance, Job, Study, make_engine, make_sessionmaker
from dicomnode.errors import ConfigurationError
from dicomnode.node.dbcopy import copy_database
from dicomnode.node.services import Services
from dicomnode.queue.jobs import JobQueue


def _counts(engine: object) -> dict[str, int]:
    with make_sessionmaker(engine).begin() as session:  # type: ignore[arg-type]
        return {
            t.name: session.scalar(select(func.count()).select_from(t)) or 0
            for t in Base.metadata.sorted_tables
        }


def test_copy_sqlite_to_postgresql_keeps_rows_ids_and_the_queue(
    services: Services, postgres_server: PostgresServer
) -> None:
    """Rows and ids arrive unchanged; afterwards the PostgreSQL queue assembles and claims new jobs."""
    queue = services.queue
    studies = [generate_uid() for _ in range(3)]
    for study in studies:
        queue.record_instance(record(study))
        queue.record_instance(record(study))
    first_jobs = queue.assemble_stable_studies(STABLE, 3, now=later())
    claimed = queue.claim("old-worker", 60, now=later())
    assert claimed is not None
    queue.complete(claimed, "reported")

    target = make_engine(postgres_server.new_database())
    try:
        report = copy_database(services.engine, target)
        assert report.rows == _counts(services.engine)
        assert report.rows["instances"] == 6 and report.rows["jobs"] == 3
        assert _counts(target) == _counts(services.engine)
        moved = JobQueue(make_sessionmaker(target))
        with make_sessionmaker(target)() as session:
            assert sorted(session.scalars(select(Job.id))) == sorted(first_jobs)
            assert {s.study_instance_uid for s in session.scalars(select(Study))} == set(studies)
        moved.record_instance(record(studies[0]))  # a late instance: a new job, a new id
        [new_job] = moved.assemble_stable_studies(STABLE, 3, now=later())
        assert new_job > max(first_jobs)
        with make_sessionmaker(target)() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 7
        with pytest.raises(ConfigurationError, match="not empty"):
            copy_database(services.engine, target)
    finally:
        target.dispose()


def test_db_copy_command(
    services: Services, postgres_server: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dicomnode db copy --to URL` copies the configured database and says what to do next."""
    services.queue.record_instance(record(generate_uid()))
    config_file = write_config(tmp_path)  # the same database as the services fixture's
    url = postgres_server.new_database()
    assert main(["--config", str(config_file), "db", "copy", "--to", url]) == 0
    out = capsys.readouterr().out
    assert "1 instances" in out and "storage.database_url" in out
    target = make_engine(url)
    try:
        assert _counts(target)["instances"] == 1
    finally:
        target.dispose()
