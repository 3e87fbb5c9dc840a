"""Shared fixtures: a configuration in tmp_path, a migrated SQLite file, a listener on port 0."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dicomnode.config import Config, config_from_mapping
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
