"""Subgroups a model is checked on: patient sex, age band, view position and manufacturer.

Each case falls into exactly one group per attribute; a missing or unusable value is ``"unknown"``, so
group sizes always add up to the number of cases.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dicomnode.lifecycle.datasets import parse_patient_age

UNKNOWN = "unknown"
# lower edges of the default age bands, in years; a band holds ages in [edge, next edge)
DEFAULT_AGE_EDGES: tuple[float, ...] = (0.0, 1.0, 5.0, 18.0, 40.0, 65.0)


@dataclass(frozen=True)
class SubgroupAttributes:
    """The per-case values subgroups are formed from (no patient identifiers)."""

    patient_sex: str | None = None
    patient_age_years: float | None = None
    view_position: str | None = None
    manufacturer: str | None = None


def age_in_years(value: str | float | None) -> float | None:
    """Years from a number or a DICOM Age String (``'018M'``); None if absent or invalid."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value >= 0 else None
    return parse_patient_age(value)


def age_band_names(edges: Sequence[float] = DEFAULT_AGE_EDGES) -> tuple[str, ...]:
    """``('0-1', '1-5', ..., '65+')`` for the given lower edges."""
    names = [f"{_fmt(lo)}-{_fmt(hi)}" for lo, hi in itertools.pairwise(edges)]
    names.append(f"{_fmt(edges[-1])}+")
    return tuple(names)


def _fmt(value: float) -> str:
    return f"{value:g}"


def age_band(years: float | None, edges: Sequence[float] = DEFAULT_AGE_EDGES) -> str:
    """The band holding ``years`` (lower edge inclusive: 1 year exactly is in '1-5'), or 'unknown'."""
    if years is None or years < edges[0]:
        return UNKNOWN
    names = age_band_names(edges)
    for name, hi in zip(names, [*edges[1:], math.inf], strict=True):
        if years < hi:
            return name
    return names[-1]


def sex_group(value: str | None) -> str:
    """'M', 'F', 'O' (DICOM Patient's Sex) or 'unknown'."""
    text = (value or "").strip().upper()
    return text if text in {"M", "F", "O"} else UNKNOWN


def text_group(value: str | None) -> str:
    """A free-text attribute (view position, manufacturer) stripped, or 'unknown' when empty."""
    text = (value or "").strip()
    return text or UNKNOWN


@dataclass(frozen=True)
class SubgroupSpec:
    """How one attribute becomes group names, and the order groups are shown in."""

    name: str
    group_of: Callable[[SubgroupAttributes], str]
    order: tuple[str, ...] = ()  # groups listed first, in this order; the rest alphabetically

    def sort_key(self, group: str) -> tuple[int, int, str]:
        """Known order first, then alphabetical, 'unknown' last."""
        if group in self.order:
            return (0, self.order.index(group), group)
        return (2 if group == UNKNOWN else 1, 0, group)


def default_subgroups(age_edges: Sequence[float] = DEFAULT_AGE_EDGES) -> tuple[SubgroupSpec, ...]:
    """Sex, age band, view position and manufacturer."""
    edges = tuple(age_edges)
    return (
        SubgroupSpec("sex", lambda a: sex_group(a.patient_sex), ("F", "M", "O")),
        SubgroupSpec("age_band", lambda a: age_band(a.patient_age_years, edges), age_band_names(edges)),
        SubgroupSpec("view_position", lambda a: text_group(a.view_position)),
        SubgroupSpec("manufacturer", lambda a: text_group(a.manufacturer)),
    )
