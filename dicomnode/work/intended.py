"""Intended use from the header: is an image inside the population its model card was made for?

A model card's ``[applies_to]`` states the intended population: ``views`` (ViewPosition values) and
``patient_age_years = [min, max]``. Before inference the worker checks each routed image's header
against it; an image outside gets no finding and a recorded reason, through the same refusal as the
out-of-distribution gate (``refused: outside-intended-use (patient age 34 y outside 1-6 y)``), unless
its route says ``intended_use = "ignore"`` (then it is analysed and the override is recorded).

The patient's age, in fractional years, comes from (the first that gives one):

1. Patient's Age (0010,1010), an Age String ``nnnD``/``nnnW``/``nnnM``/``nnnY``: days, weeks,
   months (1/12 of 365.25 days) or years, divided by 365.25 days (``018M`` -> 1.5, ``003W`` -> 0.058);
2. Patient's Birth Date against Study Date, then Series, Acquisition and Content Date: completed
   years plus the elapsed share of the current year.

An image whose age (or view) cannot be read is not refused on it: the check says so in its notes,
which the job's routing records. Modality and body part are the route's business (and a mislabelled
image is the gate's); this module reads the header only, never pixels, and imports no torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from dicomnode.findings import REFUSED_OUTSIDE_INTENDED_USE
from dicomnode.models.card import AppliesTo

if TYPE_CHECKING:
    from dicomnode.work.inference import ImageInput, ModelRegistry

logger = logging.getLogger(__name__)

_AGE_PATTERN = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12.0, "Y": 365.25}
# the dates an age is taken on, in order of preference
AGE_DATE_KEYWORDS = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def parse_patient_age(value: str | None) -> float | None:
    """Years from a DICOM Age String (``'004Y'``, ``'018M'``, ``'010W'``, ``'003D'``); None if invalid."""
    if not value:
        return None
    match = _AGE_PATTERN.match(str(value))
    if match is None:
        return None
    return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2).upper()] / 365.25


def age_from_dates(birth_date: str | None, on_date: str | None) -> float | None:
    """Age in years on a date from DICOM dates (``YYYYMMDD``): completed years plus the elapsed share of
    the current year, so a child is exactly 1.0 on its first birthday. None if a date is absent, invalid
    or the birth date is later.
    """
    born, on = _parse_da(birth_date), _parse_da(on_date)
    if born is None or on is None or on < born:
        return None
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    last = _birthday(born, born.year + years)
    following = _birthday(born, born.year + years + 1)
    return years + (on - last).days / (following - last).days


def header_age(header: Dataset) -> float | None:
    """The patient's age at the examination in years (see the module text), None when unknown."""
    age = parse_patient_age(_text(header, "PatientAge"))
    if age is not None:
        return age
    birth = _text(header, "PatientBirthDate")
    for keyword in AGE_DATE_KEYWORDS:
        years = age_from_dates(birth, _text(header, keyword))
        if years is not None:
            return years
    return None


def _birthday(born: date, year: int) -> date:
    """The birthday in ``year``; 29 February becomes 28 February in common years."""
    try:
        return born.replace(year=year)
    except ValueError:
        return born.replace(year=year, day=28)


def _parse_da(value: str | None) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _text(header: Dataset, keyword: str) -> str | None:
    try:
        value = header.get(keyword)
    except Exception:  # a malformed element counts as absent
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def format_years(years: float) -> str:
    """``34 y``, ``1.5 y``, ``0.06 y``: short, ASCII (it goes into LO elements of the SR)."""
    if years >= 10:
        return f"{years:.0f} y"
    if years >= 1:
        return f"{years:.1f}".removesuffix(".0") + " y"
    return f"{years:.2f} y"


def age_band(band: tuple[float, float]) -> str:
    """``1-6 y``."""
    low, high = (format_years(v).removesuffix(" y") for v in band)
    return f"{low}-{high} y"


@dataclass(frozen=True)
class IntendedUse:
    """One image's check against its model's intended population."""

    outside: tuple[str, ...]  # why the header puts it outside, e.g. "patient age 34 y outside 1-6 y"
    notes: tuple[str, ...]  # what could not be checked, e.g. "patient age unknown: not checked"
    overridden: bool = False  # its route says intended_use = "ignore": analysed anyway

    @property
    def refused(self) -> bool:
        """Outside the intended population and not overridden: no inference, no finding."""
        return bool(self.outside) and not self.overridden

    @property
    def reason(self) -> str:
        """The recorded reason, e.g. ``refused: outside-intended-use (view LL not in AP/PA)``."""
        return f"{REFUSED_OUTSIDE_INTENDED_USE} ({'; '.join(self.outside)})"

    @property
    def log_reason(self) -> str:
        """The reason without the patient's age (log lines carry UIDs, never patient data)."""
        parts = [re.sub(r"patient age \S+ y", "patient age", item) for item in self.outside]
        return f"{REFUSED_OUTSIDE_INTENDED_USE} ({'; '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """What the job's routing records (``dicomnode studies --json``)."""
        return {
            "outside": list(self.outside),
            "notes": list(self.notes),
            "overridden": self.overridden,
            "refused": self.refused,
        }


def check_intended_use(applies_to: AppliesTo, header: Dataset, *, overridden: bool = False) -> IntendedUse:
    """Compare one header with the card's ``views`` and ``patient_age_years``."""
    outside: list[str] = []
    notes: list[str] = []
    if applies_to.patient_age_years is not None:
        band = applies_to.patient_age_years
        age = header_age(header)
        if age is None:
            notes.append("patient age unknown (no Patient's Age, or birth date and study date): not checked")
        elif not band[0] <= age <= band[1]:
            outside.append(f"patient age {format_years(age)} outside {age_band(band)}")
    if applies_to.views:
        view = (_text(header, "ViewPosition") or "").upper()
        if not view:
            notes.append("View Position absent: view not checked")
        elif view not in applies_to.views:
            outside.append(f"view {view[:16]} not in {'/'.join(applies_to.views)}")
    return IntendedUse(tuple(outside), tuple(notes), overridden)


def check_image_intended_use(image: ImageInput, registry: ModelRegistry) -> None:
    """Check a routed image against its model card's intended population (once, before the model):
    outside it and not overridden by its route, it gets no inference and no finding."""
    if image.intended_use_policy is None or image.intended is not None or image.decision.model is None:
        return
    card = registry.package(image.decision.model).card
    image.intended = check_intended_use(
        card.applies_to, image.header, overridden=image.intended_use_policy == "ignore"
    )
    uid = image.header.get("SOPInstanceUID", "?")
    if image.intended.refused:
        logger.info("image %s: %s", uid, image.intended.log_reason)
    elif image.intended.outside:
        logger.warning(
            'image %s: analysed by route %r\'s intended_use = "ignore" although %s',
            uid,
            image.decision.route,
            image.intended.log_reason.removeprefix("refused: "),
        )
