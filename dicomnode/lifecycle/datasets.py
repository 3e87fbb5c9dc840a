"""Labelled datasets for evaluation: a folder of DICOM files plus a CSV of 0/1 labels.

The CSV names each image by ``path`` (relative to the CSV's folder) or by ``sop_instance_uid``
(resolved by scanning the DICOM headers under the CSV's folder). Every other column whose values are
all ``0``, ``1`` or empty is a label; an optional ``split`` column is kept as the case's split; other
columns are ignored. Headers are read without pixel data. Patient IDs are kept in memory only to group
images by patient; they never appear in logs, reports or exception messages. What ``dicomnode
dataset check`` reports on a loaded dataset is :mod:`dicomnode.lifecycle.dataset_check`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.errors import DicomNodeError

# the report of `dicomnode dataset check`, importable from here as before the split
from dicomnode.lifecycle.dataset_check import DatasetReport as DatasetReport
from dicomnode.lifecycle.dataset_check import check_dataset as check_dataset

# the age rules are the worker's intended-use check's, so evaluation subgroups and refusals agree
from dicomnode.work.intended import age_from_dates as age_from_dates
from dicomnode.work.intended import header_age as _header_age
from dicomnode.work.intended import parse_patient_age as parse_patient_age

logger = logging.getLogger(__name__)

PATH_COLUMN = "path"
UID_COLUMN = "sop_instance_uid"
SPLIT_COLUMN = "split"
_RESERVED_COLUMNS = frozenset({PATH_COLUMN, UID_COLUMN, SPLIT_COLUMN})
_LABEL_VALUES = frozenset({"0", "1", ""})
# files under the dataset folder that are never DICOM; skipped when resolving SOP Instance UIDs
_NOT_DICOM_SUFFIXES = frozenset({".csv", ".json", ".txt", ".md", ".html", ".png", ".jpg", ".jpeg"})


@dataclass(frozen=True)
class Case:
    """One labelled image: where it is, its labels and the header attributes evaluation groups by."""

    path: Path
    labels: dict[str, int | None]  # label -> 1, 0 or None (empty cell: not annotated)
    sop_instance_uid: str
    patient_id: str | None = field(default=None, repr=False)  # grouping only; never logged
    patient_sex: str | None = None
    patient_age_years: float | None = None
    view_position: str | None = None
    manufacturer: str | None = None
    modality: str | None = None
    split: str | None = None

    @property
    def patient_key(self) -> str:
        """The key that groups images by patient; an image without Patient ID is its own patient."""
        return self.patient_id if self.patient_id else f"no-patient-id:{self.sop_instance_uid}"


@dataclass(frozen=True)
class UnreadableFile:
    """A file named by the CSV (or met while resolving UIDs) that could not be used, and why."""

    path: str
    reason: str


@dataclass
class LabelledDataset:
    """The cases of one CSV, their label names, and the files that could not be read."""

    csv_path: Path
    labels: tuple[str, ...]
    cases: list[Case]
    unreadable: list[UnreadableFile] = field(default_factory=list)

    @property
    def root(self) -> Path:
        """The folder that relative paths in the CSV start from."""
        return self.csv_path.parent

    def __len__(self) -> int:
        return len(self.cases)


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _read_header(path: Path) -> pydicom.Dataset:
    """The header without pixel data; raises with a reason that carries no patient data."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError as exc:
        raise _UnreadableError("file not found") from exc
    except IsADirectoryError as exc:
        raise _UnreadableError("is a directory") from exc
    except InvalidDicomError as exc:
        raise _UnreadableError("not a DICOM file (no DICM prefix)") from exc
    except Exception as exc:  # pydicom raises many kinds; the message may quote header values
        raise _UnreadableError(f"header could not be parsed ({type(exc).__name__})") from exc
    if not _text(ds, "SOPInstanceUID"):
        raise _UnreadableError("no SOP Instance UID")
    return ds


class _UnreadableError(Exception):
    """Internal: a file could not be used; the message is safe to show."""


def _case_from_header(
    path: Path, ds: pydicom.Dataset, labels: dict[str, int | None], split: str | None
) -> Case:
    sex = _text(ds, "PatientSex")
    return Case(
        path=path,
        labels=labels,
        sop_instance_uid=str(ds.SOPInstanceUID).strip(),
        patient_id=_text(ds, "PatientID"),
        patient_sex=sex.upper() if sex else None,
        patient_age_years=_header_age(ds),
        view_position=_text(ds, "ViewPosition"),
        manufacturer=_text(ds, "Manufacturer"),
        modality=_text(ds, "Modality"),
        split=split,
    )


class DatasetCSVError(DicomNodeError, ValueError):
    """The labels CSV is missing or malformed; the message names the file (and row and column)."""


def _label_columns(csv_path: Path, fieldnames: list[str], rows: list[dict[str, str]]) -> tuple[str, ...]:
    """The 0/1 columns. A column that is mostly 0/1 with a few other cells is a label column with a
    typo ("O" for "0"): naming the cell beats silently dropping the whole label."""
    labels = []
    for name in fieldnames:
        if name in _RESERVED_COLUMNS:
            continue
        values = [(row.get(name) or "").strip() for row in rows]
        bad = [(line, v) for line, v in enumerate(values, start=2) if v not in _LABEL_VALUES]
        if not bad:
            labels.append(name)
            continue
        valid = sum(1 for v in values if v in ("0", "1"))
        if valid and len(bad) <= valid:
            line, value = bad[0]
            more = f" (and {len(bad) - 1} more cells)" if len(bad) > 1 else ""
            raise DatasetCSVError(
                f"{csv_path.name} row {line}, column {name!r}: {value!r} is not 0, 1 or empty{more}; "
                "a label column holds only 0, 1 or empty cells: fix the cell"
            )
        logger.info("column %r is not 0/1 and is ignored", name)
    return tuple(labels)


def _scan_uids(root: Path, unreadable: list[UnreadableFile]) -> dict[str, list[Path]]:
    """SOP Instance UID -> files under ``root`` that carry it (several when duplicated)."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() in _NOT_DICOM_SUFFIXES:
            continue
        try:
            ds = _read_header(path)
        except _UnreadableError as exc:
            unreadable.append(UnreadableFile(str(path), str(exc)))
            continue
        found[str(ds.SOPInstanceUID).strip()].append(path)
    return found


def load_labelled_dataset(csv_path: str | Path) -> LabelledDataset:
    """Read the CSV and every image's header; files that cannot be used go to ``unreadable``."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetCSVError(
            f"{csv_path}: no such file; give the labels CSV (a {PATH_COLUMN!r} or {UID_COLUMN!r} column "
            "and one 0/1 column per label; `dicomnode dataset demo DIR` writes an example)"
        )
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fieldnames = [name.strip() for name in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetCSVError(f"{csv_path}: not a readable UTF-8 CSV file ({exc})") from exc
    if PATH_COLUMN in fieldnames:
        key = PATH_COLUMN
    elif UID_COLUMN in fieldnames:
        key = UID_COLUMN
    else:
        raise DatasetCSVError(
            f"{csv_path}: the CSV needs a {PATH_COLUMN!r} or {UID_COLUMN!r} column "
            f"(its columns are {fieldnames}); add one naming each DICOM file"
        )
    labels = _label_columns(csv_path, fieldnames, rows)
    if not labels:
        raise DatasetCSVError(
            f"{csv_path}: no label column (a column whose values are all 0, 1 or empty); "
            f"its columns are {fieldnames}"
        )

    root = csv_path.parent
    unreadable: list[UnreadableFile] = []
    by_uid = _scan_uids(root, unreadable) if key == UID_COLUMN else {}
    cases: list[Case] = []
    for line, row in enumerate(rows, start=2):
        row_labels: dict[str, int | None] = {
            name: (int(row[name].strip()) if row.get(name, "").strip() else None) for name in labels
        }
        split = row.get(SPLIT_COLUMN, "").strip() or None
        ref = row.get(key, "").strip()
        if not ref:
            unreadable.append(UnreadableFile(f"{csv_path.name}:{line}", f"empty {key}"))
            continue
        if key == UID_COLUMN:
            paths = by_uid.get(ref)
            if not paths:
                unreadable.append(UnreadableFile(ref, "no file has this SOP Instance UID"))
                continue
            candidates = paths
        else:
            candidates = [root / ref]
        for path in candidates:
            try:
                ds = _read_header(path)
            except _UnreadableError as exc:
                unreadable.append(UnreadableFile(str(path), str(exc)))
                continue
            cases.append(_case_from_header(path, ds, row_labels, split))
    logger.info("loaded %d cases, %d labels, %d unreadable", len(cases), len(labels), len(unreadable))
    return LabelledDataset(csv_path=csv_path, labels=labels, cases=cases, unreadable=unreadable)


def split_by_patient(
    ds: LabelledDataset, fractions: tuple[float, ...] = (0.7, 0.15, 0.15), seed: int = 0
) -> tuple[LabelledDataset, ...]:
    """Split into one dataset per fraction; all images of a patient land in the same split.

    Greedy stratification: patients are visited in a seeded random order, those carrying the rarest
    positive labels and the most images first; each goes to the split whose targets (cases and
    positives per label, proportional to ``fractions``) are least fulfilled. Deterministic for a
    given dataset and seed. Images without Patient ID count as separate patients.
    """
    if not fractions or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions {fractions} must be non-negative and sum to 1")
    groups: dict[str, list[Case]] = defaultdict(list)
    for case in ds.cases:
        groups[case.patient_key].append(case)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    keys = [keys[i] for i in order]

    n_labels = len(ds.labels)
    positives = np.zeros((len(keys), n_labels))
    sizes = np.zeros(len(keys))
    for i, key in enumerate(keys):
        sizes[i] = len(groups[key])
        for j, label in enumerate(ds.labels):
            positives[i, j] = sum(1 for c in groups[key] if c.labels.get(label) == 1)
    label_totals = positives.sum(axis=0)
    # rarity of a patient = the smallest total among the labels it is positive for (inf if none)
    rarity = [
        min((label_totals[j] for j in range(n_labels) if positives[i, j] > 0), default=math.inf)
        for i in range(len(keys))
    ]
    visit = sorted(range(len(keys)), key=lambda i: (rarity[i], -sizes[i]))  # stable: ties keep seeded order

    frac = np.asarray(fractions, dtype=float)
    target_cases = frac * sizes.sum()
    target_pos = np.outer(frac, label_totals)
    have_cases = np.zeros(len(frac))
    have_pos = np.zeros((len(frac), n_labels))
    assignment: dict[str, int] = {}
    for i in visit:
        need = (target_cases - have_cases) / np.maximum(target_cases, 1.0)
        mask = positives[i] > 0
        if mask.any():
            deficit = (target_pos[:, mask] - have_pos[:, mask]) / np.maximum(target_pos[:, mask], 1.0)
            need = need + deficit.sum(axis=1)
        need = np.where(frac > 0, need, -np.inf)
        chosen = int(np.argmax(need))  # first maximum on ties
        assignment[keys[i]] = chosen
        have_cases[chosen] += sizes[i]
        have_pos[chosen] += positives[i]

    parts: list[list[Case]] = [[] for _ in fractions]
    for case in ds.cases:  # keep the CSV order inside each split
        parts[assignment[case.patient_key]].append(case)
    return tuple(
        LabelledDataset(csv_path=ds.csv_path, labels=ds.labels, cases=part, unreadable=[]) for part in parts
    )
