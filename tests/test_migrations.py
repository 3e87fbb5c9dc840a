"""Alembic migrations on every backend (a real SQLite file, a real PostgreSQL server): up, down, up
again, and the models match the schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from test_cli import write_config

from dicomnode import migrate
from dicomnode.cli import main
from dicomnode.db import Base, make_engine

TABLES = {"studies", "instances", "jobs", "results", "outbox", "commitments"}


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_upgrade_downgrade_upgrade_then_check(database_url: str) -> None:
    """The migrations build the whole schema, remove it cleanly, build it again, and match db.py."""
    engine = make_engine(database_url)
    try:
        assert tables(engine) == set()
        migrate.upgrade(engine)
        assert tables(engine) == TABLES | {"alembic_version"}
        assert set(Base.metadata.tables) == TABLES
        migrate.check(engine)
        migrate.downgrade(engine)
        assert tables(engine) == {"alembic_version"}
        migrate.upgrade(engine)
        assert tables(engine) == TABLES | {"alembic_version"}
        migrate.check(engine)
        migrate.upgrade(engine)  # already at head: nothing to do
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("instances")}
        assert "ix_instances_pending" in indexes
    finally:
        engine.dispose()


def test_check_fails_on_an_unmigrated_database(database_url: str) -> None:
    """alembic check refuses a database that is not at the newest revision."""
    engine = make_engine(database_url)
    try:
        with pytest.raises(Exception, match=r"(?i)not up to date|head"):
            migrate.check(engine)
    finally:
        engine.dispose()


def test_db_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dicomnode db upgrade`, `db check` and `db downgrade` work on the configured database."""
    path = write_config(tmp_path)
    assert main(["--config", str(path), "db", "upgrade"]) == 0
    assert "upgrade: done" in capsys.readouterr().out
    db_file = tmp_path / "var" / "dicomnode.db"
    assert db_file.is_file()
    assert main(["--config", str(path), "db", "check"]) == 0
    assert main(["--config", str(path), "db", "downgrade"]) == 0
    engine = make_engine(f"sqlite:///{db_file}")
    try:
        assert tables(engine) == {"alembic_version"}
    finally:
        engine.dispose()
    assert main(["--config", str(path), "db", "upgrade", "head"]) == 0
