"""Wiring shared by the CLI commands: engine, migrations, store and queue built from one Config."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import migrate
from dicomnode.config import Config
from dicomnode.db import make_engine, make_sessionmaker, sqlite_synchronous_for
from dicomnode.queue.jobs import JobQueue
from dicomnode.receive.spool import InstanceStore


@dataclass
class Services:
    """The long-lived objects one process needs, built once from the configuration."""

    config: Config
    engine: Engine
    sessions: sessionmaker[Session]
    queue: JobQueue

    def store(self) -> InstanceStore:
        return InstanceStore(
            self.config.storage.path,
            min_free_bytes=self.config.node.min_free_disk_mb * 1024 * 1024,
            flush_mode=self.config.storage.flush,
        )

    def close(self) -> None:
        self.engine.dispose()


def database_engine(config: Config) -> Engine:
    """The engine for the configured database, with the SQLite flush level the spool's mode needs."""
    return make_engine(
        config.storage.database_url,
        synchronous=sqlite_synchronous_for(
            config.storage.path,
            config.storage.database_url,
            config.storage.sqlite_synchronous,
            config.storage.flush,
        ),
    )


def open_services(config: Config, *, upgrade: bool = False) -> Services:
    """Open the database (optionally migrating it to the newest schema) and the job queue."""
    config.storage.path.mkdir(parents=True, exist_ok=True)
    engine = database_engine(config)
    if upgrade:
        migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    return Services(config=config, engine=engine, sessions=sessions, queue=JobQueue(sessions))
