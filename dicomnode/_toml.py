"""The one validated-TOML reader: typed look-ups whose errors name the full key.

``config.toml``, model cards (``model.toml``) and ``train.toml`` are all read through
:class:`Table`, so ``node.port: must be an integer between 0 and 65535; got 'x'`` reads the same
whichever file it came from, and an operator can fix the file without reading code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from dicomnode.errors import ConfigurationError

_REQUIRED: Any = object()  # the default of a key that must be present


class Table:
    """One TOML table and its dotted position (``prefix``) in the file."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix

    @classmethod
    def of(cls, value: Any, key: str, *, defaults: Mapping[str, Any] | None = None) -> Table:
        """``value`` as a table named ``key``; with ``defaults``, unknown keys are refused and
        missing ones take the default."""
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigurationError(key, "must be a table")
        if defaults is None:
            return cls(value, key)
        table = cls(value, key)
        table.check_keys(defaults)
        return cls({**defaults, **value}, key)

    def key(self, name: str) -> str:
        """The full dotted key of ``name`` in this table."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigurationError:
        return ConfigurationError(self.key(name), message)

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def check_keys(self, allowed: Mapping[str, Any] | set[str] | Sequence[str]) -> None:
        """Refuse any key not in ``allowed`` (a typo must not be ignored silently)."""
        for name in self.data:
            if name not in allowed:
                raise self.error(name, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def get(self, name: str, default: Any = _REQUIRED) -> Any:
        """The raw value; a missing key without a default is an error."""
        value = self.data.get(name, default)
        if value is _REQUIRED or value is None:
            raise self.error(name, "is required")
        return value

    def string(self, name: str, default: Any = _REQUIRED, *, nonempty: bool = False) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, not {type(value).__name__}")
        if nonempty and not value.strip():
            raise self.error(name, "must not be empty")
        return value

    def choice(self, name: str, choices: Sequence[str], default: Any = _REQUIRED) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def integer(
        self, name: str, default: Any = _REQUIRED, *, low: int | None = None, high: int | None = None
    ) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not _within(value, low, high):
            raise self.error(name, f"must be an integer{_range(low, high)}; got {value!r}")
        return value

    def number(
        self,
        name: str,
        default: Any = _REQUIRED,
        *,
        low: float | None = None,
        high: float | None = None,
    ) -> float:
        value = self.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not _within(value, low, high)
        ):
            raise self.error(name, f"must be a finite number{_range(low, high)}; got {value!r}")
        return float(value)

    def boolean(self, name: str, default: Any = _REQUIRED) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false; got {value!r}")
        return value

    def array(self, name: str, default: Any = _REQUIRED) -> list[Any]:
        value = self.get(name, default)
        if not isinstance(value, list):
            raise self.error(name, "must be a list")
        return value

    def strings(self, name: str, default: Any = ()) -> tuple[str, ...]:
        value = self.get(name, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "must be a list of strings")
        return tuple(value)

    def numbers(self, name: str, lengths: Sequence[int]) -> tuple[float, ...] | None:
        """An optional list of numbers whose length is one of ``lengths``."""
        value = self.data.get(name)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or len(value) not in lengths
        ):
            counts = " or ".join(str(n) for n in lengths)
            raise self.error(name, f"must be a list of {counts} numbers")
        return tuple(float(v) for v in value)

    def table(self, name: str, *, required: bool = False) -> Table:
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return Table({}, self.key(name))
        if not isinstance(value, Mapping):
            raise self.error(name, "must be a table")
        return Table(cast(Mapping[str, Any], value), self.key(name))

    def path(self, name: str, base_dir: Path, default: Any = _REQUIRED, *, resolve: bool = False) -> Path:
        """A path; relative ones start at ``base_dir`` (the folder of the file that names them)."""
        path = Path(self.string(name, default, nonempty=True)).expanduser()
        if path.is_absolute():
            return path
        return (base_dir / path).resolve() if resolve else base_dir / path


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" between {low} and {high}"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def toml_value(value: Any, key: str = "value") -> str:
    """One TOML value (string, bool, number, or a list of them); ``key`` names it in errors."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: TOML cannot hold {value}")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    raise ValueError(f"{key}: cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text of nested dicts/lists of scalars (arrays of tables for lists of dicts).

    Enough for model cards; no third-party writer needed.
    """
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            tables.append((full, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((full, value))
        elif value is not None:
            lines.append(f"{key} = {toml_value(value, full)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for full, table in tables:
        out += f"\n[{full}]\n" + to_toml(table, full)
    for full, items in arrays:
        for item in items:
            out += f"\n[[{full}]]\n" + to_toml(item, full)
    return out
