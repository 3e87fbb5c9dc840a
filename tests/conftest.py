"""Shared fixtures: a configuration in tmp_path, a migrated SQLite file, a listener on port 0."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from postgres import PostgresServer, postgres_bin_dir
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import migrate
from dicomnode.config import Config, config_from_mapping
from dicomnode.db import make_engine, make_sessionmaker
from dicomnode.node.services import Services, open_services
from dicomnode.receive.scp import start_listener, stop_listener


def make_config(tmp_path: Path, **sections: Any) -> Config:
    """A configuration whose storage, database and models live under ``tmp_path``."""
    data: dict[str, Any] = {
        "node": {"port": 0, "host": "127.0.0.1", "min_free_disk_mb": 0},
        "storage": {"path": "var", "database_url": "sqlite:///var/dicomnode.db"},
        "studies": {"stable_after_seconds": 0},
        "destinations": [],
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return config_from_mapping(data, base_dir=tmp_path)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def services(config: Config) -> Iterator[Services]:
    svc = open_services(config, upgrade=True)
    yield svc
    svc.close()


class RunningListener:
    """A listener started in this process on a free loopback port."""

    def __init__(self, services: Services, store: Any = None) -> None:
        self.services = services
        self.store = store or services.store()
        self.server, self.scp = start_listener(services.config.node, self.store, services.queue, port=0)
        self.port: int = self.server.server_address[1]
        self.ae_title = services.config.node.ae_title

    def stop(self) -> None:
        stop_listener(self.server, grace_seconds=5)
        self.store.close()


@pytest.fixture
def listener(services: Services) -> Iterator[RunningListener]:
    running = RunningListener(services)
    yield running
    running.stop()


# --- database backends: every contract test runs on SQLite and on a real PostgreSQL server -----------

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session (Debian's postgresql). Missing binaries skip the
    PostgreSQL half of the contract tests, except in CI, where that is a failure."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        message = "PostgreSQL server binaries not found (Debian package postgresql)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the PostgreSQL contract tests")
        pytest.skip(message)
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:  # also when start() fails half-way: no server outlives the session
        server.stop()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'dicomnode.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def backend_config(tmp_path: Path, database_url: str) -> Config:
    return make_config(tmp_path, storage={"path": "var", "database_url": database_url})


@pytest.fixture
def backend_services(backend_config: Config) -> Iterator[Services]:
    """Migrated services on each backend in turn (for queue, outbox and migration contract tests)."""
    svc = open_services(backend_config, upgrade=True)
    yield svc
    svc.close()


# --- the delivery tests' fixtures (sender, STOW-RS, Storage Commitment) ----------------------------


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    """A migrated SQLite database under tmp_path, without the rest of the node's services."""
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite")
    migrate.upgrade(engine)
    return make_sessionmaker(engine)


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """A storage folder with its results/ subfolder, as the worker leaves it."""
    root = tmp_path / "var"
    (root / "results").mkdir(parents=True)
    return root


@pytest.fixture
def peers() -> Iterator[list[Any]]:
    """Collects started peers (PACS, SCPs, nodes) and stops them all in teardown."""
    started: list[Any] = []
    yield started
    for peer in started:
        peer.stop()
