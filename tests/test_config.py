"""Configuration: embedded defaults, validation messages that name the key, path resolution."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from dicomnode.config import CONFIG_ENV, DEFAULTS, config_from_mapping, load_config
from dicomnode.errors import ConfigurationError

REPOSITORY_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def _validate(data: dict[str, Any], tmp_path: Path) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        config_from_mapping(data, base_dir=tmp_path)
    return caught.value


def test_embedded_defaults_equal_the_repository_config_file() -> None:
    """config.toml and the embedded DEFAULTS describe the same configuration."""
    from_file = load_config(REPOSITORY_CONFIG)
    embedded = config_from_mapping({}, base_dir=REPOSITORY_CONFIG.parent, source=from_file.source)
    assert from_file == embedded
    # every value written in the file is the embedded value, key by key
    written = tomllib.loads(REPOSITORY_CONFIG.read_text(encoding="utf-8"))
    for section, value in written.items():
        assert section in DEFAULTS, section
        if isinstance(value, dict):
            for key, item in value.items():
                assert DEFAULTS[section][key] == item, f"{section}.{key}"
        else:
            assert DEFAULTS[section] == value, section


def test_defaults_are_sane() -> None:
    """The defaults listen on 11112 as DICOMNODE and route chest radiographs to the pneumonia model."""
    config = config_from_mapping({}, base_dir=Path("/srv/node"))
    assert (config.node.ae_title, config.node.port) == ("DICOMNODE", 11112)
    assert [r.model for r in config.routes] == ["pneumonia-xception"]
    assert (
        config.storage.sqlite_synchronous == "AUTO"
    )  # NORMAL when the database shares the spool's filesystem (syncfs covers it), else FULL
    assert config.delivery.retry_max_seconds >= config.delivery.retry_initial_seconds


@pytest.mark.parametrize(
    "data,key",
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": -1}}, "node.port"),
        ({"node": {"port": "11112"}}, "node.port"),
        ({"node": {"port": True}}, "node.port"),
        ({"node": {"ae_title": "BAD\\AE"}}, "node.ae_title"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"node": {"ae_title": "   "}}, "node.ae_title"),
        ({"node": {"allowed_calling_ae_titles": ["OK", "NO\\PE"]}}, "node.allowed_calling_ae_titles[1]"),
        ({"nodes": {"port": 1}}, "nodes"),
        ({"node": {"prot": 1}}, "node.prot"),
        ({"worker": {"device": "tpu"}}, "worker.device"),
        ({"storage": {"sqlite_synchronous": "OFF"}}, "storage.sqlite_synchronous"),
        ({"logging": {"level": "LOUD"}}, "logging.level"),
        (
            {"routes": [{"name": "r", "model": "m", "series_description": "(unclosed"}]},
            "routes[0].series_description",
        ),
        ({"routes": [{"name": "r", "model": "m", "modalty": "CR"}]}, "routes[0].modalty"),
        ({"routes": [{"name": "r", "model": "m", "modality": ["CR", 1]}]}, "routes[0].modality"),
        ({"routes": [{"name": "r"}]}, "routes[0].model"),
        ({"routes": [{"name": "r", "model": "m"}, {"name": "r", "model": "n"}]}, "routes"),
        ({"routes": {"name": "r"}}, "routes"),
        ({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h"}]}, "destinations[0].port"),
        (
            {"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 0}]},
            "destinations[0].port",
        ),
        (
            {"destinations": [{"name": "p", "ae_title": "A\\B", "host": "h", "port": 104}]},
            "destinations[0].ae_title",
        ),
        (
            {
                "destinations": [
                    {"name": "pacs", "ae_title": "A", "host": "h", "port": 104},
                    {"name": "pacs", "ae_title": "B", "host": "h", "port": 105},
                ]
            },
            "destinations",
        ),
        ({"delivery": {"retry_initial_seconds": 60, "retry_max_seconds": 10}}, "delivery.retry_max_seconds"),
    ],
)
def test_every_validation_error_names_its_key(data: dict[str, Any], key: str, tmp_path: Path) -> None:
    """An invalid value is refused with a message that starts with the offending key."""
    error = _validate(data, tmp_path)
    assert error.key == key
    assert str(error).startswith(f"{key}: ")


def test_ae_title_of_sixteen_characters_is_accepted(tmp_path: Path) -> None:
    """16 characters is the AE title limit, not beyond it."""
    config = config_from_mapping({"node": {"ae_title": "A" * 16}}, base_dir=tmp_path)
    assert config.node.ae_title == "A" * 16


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storage.path, models.path and a relative sqlite URL are relative to the file, not the cwd."""
    folder = tmp_path / "etc" / "node"
    folder.mkdir(parents=True)
    path = folder / "node.toml"
    path.write_text(
        '[storage]\npath = "spool"\ndatabase_url = "sqlite:///db/node.db"\n[models]\npath = "../models"\n',
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.source == path.resolve()
    assert config.storage.path == folder / "spool"
    assert config.storage.instances_path == folder / "spool" / "instances"
    assert config.models.path == tmp_path / "etc" / "models"
    assert config.storage.database_url == f"sqlite:///{folder / 'db' / 'node.db'}"


def test_absolute_paths_and_urls_are_kept(tmp_path: Path) -> None:
    """An absolute sqlite URL (four slashes), memory and PostgreSQL URLs are left alone."""
    absolute = config_from_mapping(
        {"storage": {"path": "/srv/spool", "database_url": "sqlite:////srv/db/node.db"}}, base_dir=tmp_path
    )
    assert absolute.storage.path == Path("/srv/spool")
    assert absolute.storage.database_url == "sqlite:////srv/db/node.db"
    memory = config_from_mapping({"storage": {"database_url": "sqlite:///:memory:"}}, base_dir=tmp_path)
    assert memory.storage.database_url == "sqlite:///:memory:"
    url = "postgresql+psycopg://node@db/node"
    assert (
        config_from_mapping({"storage": {"database_url": url}}, base_dir=tmp_path).storage.database_url == url
    )


def test_environment_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$DICOMNODE_CONFIG is read when no path is given; pointing it at nothing is an error."""
    path = tmp_path / "from-env.toml"
    path.write_text('[node]\nae_title = "FROMENV"\nport = 4006\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    config = load_config()
    assert (config.node.ae_title, config.node.port, config.source) == ("FROMENV", 4006, path.resolve())
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError) as caught:
        load_config()
    assert caught.value.key == "config"
    assert "missing.toml" in str(caught.value)


def test_no_file_at_the_default_location_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $DICOMNODE_CONFIG and ./config.toml the embedded defaults apply, relative to the cwd."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    config = load_config()
    assert config.source is None
    assert config.storage.path == tmp_path / "var"
    (tmp_path / "config.toml").write_text('[node]\nae_title = "LOCAL"\n', encoding="utf-8")
    assert load_config().node.ae_title == "LOCAL"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    """Naming a file that does not exist never falls back to the defaults."""
    with pytest.raises(ConfigurationError) as caught:
        load_config(tmp_path / "nope.toml")
    assert caught.value.key == "config"


def test_invalid_toml_is_a_configuration_error(tmp_path: Path) -> None:
    """A syntax error is reported as a configuration error, not a traceback."""
    path = tmp_path / "broken.toml"
    path.write_text("[node\nport = 1\n", encoding="utf-8")
    with pytest.raises(ConfigurationError) as caught:
        load_config(path)
    assert caught.value.key == "config"


def test_routes_are_parsed_into_match_and_regex(tmp_path: Path) -> None:
    """A scalar match value becomes a one-element tuple; regex keys are kept apart."""
    config = config_from_mapping(
        {
            "routes": [
                {"name": "a", "model": "m", "modality": "CR", "series_description": "chest|thorax"},
                {"name": "b", "model": "n", "image_type": ["ORIGINAL", "PRIMARY"]},
            ]
        },
        base_dir=tmp_path,
    )
    first, second = config.routes
    assert first.match == {"modality": ("CR",)}
    assert first.regex == {"series_description": "chest|thorax"}
    assert second.match == {"image_type": ("ORIGINAL", "PRIMARY")}
    assert config_from_mapping({"routes": []}, base_dir=tmp_path).routes == ()


def test_auto_synchronous_is_full_unless_syncfs_covers_the_database(tmp_path: Path) -> None:
    """AUTO relaxes SQLite's own flush only where the listener's syncfs makes the WAL durable."""
    from dicomnode.db import sqlite_synchronous_for

    same = f"sqlite:///{tmp_path}/var/db.sqlite"
    assert sqlite_synchronous_for(tmp_path / "var", same, "AUTO") == "NORMAL"
    assert sqlite_synchronous_for(tmp_path / "var", "postgresql://node@db/node", "AUTO") == "FULL"
    assert sqlite_synchronous_for(tmp_path / "var", same, "FULL") == "FULL"
    shm = Path("/dev/shm")
    if shm.is_dir() and shm.stat().st_dev != tmp_path.stat().st_dev:
        assert sqlite_synchronous_for(tmp_path / "var", f"sqlite:///{shm}/x/db.sqlite", "AUTO") == "FULL"
