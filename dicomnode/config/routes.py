"""``[[routes]]``: which images a model runs on, its completeness requirements and shadow models."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal, cast

from dicomnode._toml import Table
from dicomnode.config._checks import _str
from dicomnode.config.model import ROUTE_LIST_KEYS, ROUTE_REGEX_KEYS, RouteConfig, SeriesRequirement
from dicomnode.errors import ConfigurationError


def _route_match(item: Mapping[str, Any], where: str) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The list and regex match keys of a route (or of its ``required_series``)."""
    match: dict[str, tuple[str, ...]] = {}
    for key in ROUTE_LIST_KEYS:
        if key in item:
            values = item[key] if isinstance(item[key], list) else [item[key]]
            if not all(isinstance(v, str) for v in values):
                raise ConfigurationError(f"{where}.{key}", "must be a string or a list of strings")
            match[key] = tuple(v.strip() for v in values)
    regex: dict[str, str] = {}
    for key in ROUTE_REGEX_KEYS:
        if key in item:
            try:
                re.compile(item[key])
            except (re.error, TypeError) as exc:
                raise ConfigurationError(
                    f"{where}.{key}", f"is not a valid regular expression: {exc}"
                ) from exc
            regex[key] = item[key]
    return match, regex


def _shadow_models(item: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """A route's ``shadow`` list: models (``NAME`` or ``NAME@VERSION``) other than its own, once each."""
    raw = item.get("shadow", [])
    if not isinstance(raw, list):
        raise ConfigurationError(
            f"{where}.shadow", 'must be a list of models, e.g. ["pneumonia-xception@0.4"]'
        )
    models: list[str] = []
    for index, name in enumerate(raw):
        key = f"{where}.shadow[{index}]"
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(key, f"must be a model name (NAME or NAME@VERSION); got {name!r}")
        name = name.strip()
        if name == str(item.get("model", "")).strip():
            raise ConfigurationError(key, f"{name!r} is the route's own model; a shadow must be another one")
        if name in models:
            raise ConfigurationError(key, f"{name!r} is listed twice")
        models.append(name)
    return tuple(models)


def _routes(value: Any) -> tuple[RouteConfig, ...]:
    if not isinstance(value, list):
        raise ConfigurationError("routes", "must be an array of tables ([[routes]])")
    routes = []
    allowed = {
        "name", "model", *ROUTE_LIST_KEYS, *ROUTE_REGEX_KEYS,
        "required_series", "expected_instances", "max_wait_seconds", "shadow", "intended_use",
    }  # fmt: skip
    for i, item in enumerate(value):
        where = f"routes[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigurationError(where, "must be a table")
        for key in item:
            if key not in allowed:
                raise ConfigurationError(f"{where}.{key}", f"unknown key; expected one of {sorted(allowed)}")
        for key in ("name", "model"):
            if key not in item:
                raise ConfigurationError(f"{where}.{key}", "is required")
        match, regex = _route_match(item, where)
        required = None
        if "required_series" in item:
            table = Table.of(item["required_series"], f"{where}.required_series")
            table.check_keys({*ROUTE_LIST_KEYS, *ROUTE_REGEX_KEYS} - {"calling_ae_title"})
            if not table.data:
                raise ConfigurationError(
                    table.prefix, 'must name at least one key (e.g. view_position = ["PA"])'
                )
            required = SeriesRequirement(*_route_match(table.data, table.prefix))
        expected: int | Literal["header"] | None = None
        if "expected_instances" in item:
            raw = item["expected_instances"]
            if raw == "header":
                expected = "header"
            elif isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
                expected = raw
            else:
                raise ConfigurationError(
                    f"{where}.expected_instances", f'must be a positive integer or "header"; got {raw!r}'
                )
        top = Table(item, where)
        routes.append(
            RouteConfig(
                name=_str(item, f"{where}.name"),
                model=_str(item, f"{where}.model"),
                match=match,
                regex=regex,
                required_series=required,
                expected_instances=expected,
                max_wait_seconds=top.number("max_wait_seconds", low=0.0, high=86400.0)
                if "max_wait_seconds" in item
                else None,
                shadow=_shadow_models(item, where),
                intended_use=cast(
                    Literal["enforce", "ignore"], top.choice("intended_use", ("enforce", "ignore"), "enforce")
                ),
            )
        )
    names = [r.name for r in routes]
    if len(set(names)) != len(names):
        raise ConfigurationError("routes", "route names must be unique")
    return tuple(routes)
