"""Offline DICOM test material: pydicom's own test files and pydicom-data's files.

Never use ``pydicom.data.get_testdata_file`` for pydicom-data files: it falls back to downloading.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pydicom


def test_files_dir() -> Path:
    """pydicom's bundled test files."""
    return Path(pydicom.__file__).parent / "data" / "test_files"


def charset_files_dir() -> Path:
    """pydicom's bundled character-set test files."""
    return Path(pydicom.__file__).parent / "data" / "charset_files"


def pydicom_data_dir() -> Path:
    """pydicom-data's files (the ``data_store`` package), installed with the test extra."""
    spec = importlib.util.find_spec("data_store")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pydicom-data is not installed (pip install pydicom-data)")
    return Path(spec.origin).parent / "data"


def find(name: str) -> Path:
    """The path of a named test file from any of the offline folders."""
    for folder in (test_files_dir(), pydicom_data_dir(), charset_files_dir()):
        candidate = folder / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(name)


def all_dicom_files() -> list[Path]:
    """Every .dcm file of the offline corpus, sorted by name for stable test ids."""
    files: list[Path] = []
    for folder in (test_files_dir(), pydicom_data_dir(), charset_files_dir()):
        files.extend(p for p in folder.glob("*.dcm") if p.is_file())
    return sorted(files, key=lambda p: (p.name, str(p)))


def pneumonia_images_dir() -> Path:
    """The 16 paediatric chest radiographs shipped with pneumonia_model_package (JPEG)."""
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pneumonia_model_package is not installed")
    return Path(spec.origin).parent / "datasets" / "pneumonia-data" / "val"
