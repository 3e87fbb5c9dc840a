"""Routing: which model runs on which image, decided from the DICOM header and the calling AE.

Rules come from ``[[routes]]`` in the configuration; the first matching rule wins. An image no rule
matches gets no model, and the reason (the first key each rule failed on) is recorded and shown by
``dicomnode rules test``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicomnode.config import RouteConfig, SeriesRequirement

# route key -> DICOM keyword it reads
ROUTE_ATTRIBUTES = {
    "modality": "Modality",
    "sop_class_uid": "SOPClassUID",
    "body_part_examined": "BodyPartExamined",
    "view_position": "ViewPosition",
    "image_type": "ImageType",
    "series_description": "SeriesDescription",
}


@dataclass(frozen=True)
class RouteDecision:
    """The outcome of routing one image."""

    route: str | None
    model: str | None
    reason: str
    shadow: tuple[str, ...] = ()  # the route's shadow models: run for comparison, never reported
    intended_use: str | None = None  # the route's "enforce" or "ignore" of the card's population

    def to_dict(self) -> dict[str, str | list[str] | None]:
        shown: dict[str, str | list[str] | None] = {
            "route": self.route,
            "model": self.model,
            "reason": self.reason,
        }
        if self.shadow:
            shown["shadow"] = list(self.shadow)
        return shown


def _values(header: Dataset, keyword: str) -> list[str]:
    try:
        value = header.get(keyword)
    except Exception:  # a malformed element counts as absent
        return []
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _check(
    route: RouteConfig | SeriesRequirement, header: Dataset, calling_ae_title: str | None
) -> str | None:
    """None when ``route`` (or a route's ``required_series``) matches, else why not."""
    for key, accepted in route.match.items():
        if key == "calling_ae_title":
            present = [calling_ae_title.strip()] if calling_ae_title else []
        else:
            present = _values(header, ROUTE_ATTRIBUTES[key])
        if key == "image_type":
            # every listed value must appear in ImageType (e.g. ["ORIGINAL", "PRIMARY"])
            missing = [v for v in accepted if v.upper() not in {p.upper() for p in present}]
            if missing:
                return f"ImageType lacks {'/'.join(missing)}"
            continue
        if not present:
            if "" in accepted:
                continue
            return f"{ROUTE_ATTRIBUTES.get(key, 'calling AE title')} is absent"
        wanted = {v.upper() for v in accepted}
        if not any(p.upper() in wanted for p in present):
            shown = "/".join(present) if key != "calling_ae_title" else present[0]
            return f"{ROUTE_ATTRIBUTES.get(key, 'calling AE title')} {shown} not in {sorted(accepted)}"
    for key, pattern in route.regex.items():
        text = " ".join(_values(header, ROUTE_ATTRIBUTES[key]))
        if not re.search(pattern, text, flags=re.IGNORECASE):
            return f"{ROUTE_ATTRIBUTES[key]} does not match /{pattern}/"
    return None


def requirement_miss(requirement: SeriesRequirement, header: Dataset) -> str | None:
    """None when the image meets a route's ``required_series``, else why not."""
    return _check(requirement, header, None)


def route_image(
    routes: Sequence[RouteConfig], header: Dataset, calling_ae_title: str | None = None
) -> RouteDecision:
    """Pick the first route that matches ``header``; explain the miss otherwise."""
    misses = []
    for route in routes:
        why_not = _check(route, header, calling_ae_title)
        if why_not is None:
            return RouteDecision(
                route=route.name,
                model=route.model,
                reason=f"matched route {route.name!r}",
                shadow=route.shadow,
                intended_use=route.intended_use,
            )
        misses.append(f"{route.name}: {why_not}")
    if not routes:
        return RouteDecision(route=None, model=None, reason="no routes are configured")
    return RouteDecision(route=None, model=None, reason="no route matched (" + "; ".join(misses) + ")")
