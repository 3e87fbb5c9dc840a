"""The small typed readers every section uses.

They read through dicomnode._toml.Table, the one TOML reader; ``key`` is the full dotted key
("node.port"), which every error names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomnode._toml import Table
from dicomnode.config.model import DEFAULTS
from dicomnode.errors import ConfigurationError

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars


def _bool(section: Mapping[str, Any], key: str) -> bool:
    table, name = _at(section, key)
    return table.boolean(name)


def _text(section: Mapping[str, Any], key: str) -> str:
    """A string that may be empty."""
    table, name = _at(section, key)
    return table.string(name)


def _optional_path(section: Mapping[str, Any], key: str, base_dir: Path) -> Path | None:
    """A path, or None for an empty string."""
    if not _text(section, key):
        return None
    return _path(section, key, base_dir)


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``[name]`` table with the embedded defaults filled in; unknown keys are refused."""
    return dict(Table.of(data.get(name), name, defaults=DEFAULTS[name]).data)


def _at(section: Mapping[str, Any], key: str) -> tuple[Table, str]:
    prefix, _, name = key.rpartition(".")
    return Table(section, prefix), name


def _str(section: Mapping[str, Any], key: str) -> str:
    table, name = _at(section, key)
    return table.string(name, nonempty=True)


def _choice(section: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    table, name = _at(section, key)
    return table.choice(name, choices)


def _int(section: Mapping[str, Any], key: str, low: int, high: int) -> int:
    table, name = _at(section, key)
    return table.integer(name, low=low, high=high)


def _float(section: Mapping[str, Any], key: str, low: float, high: float) -> float:
    table, name = _at(section, key)
    return table.number(name, low=low, high=high)


def _list(section: Mapping[str, Any], key: str) -> list[Any]:
    table, name = _at(section, key)
    return table.array(name)


def _path(section: Mapping[str, Any], key: str, base_dir: Path) -> Path:
    table, name = _at(section, key)
    return table.path(name, base_dir, resolve=True)


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ConfigurationError(
            key, f"must be a DICOM AE title (1-16 characters, no backslash); got {value!r}"
        )
    return value.strip()
