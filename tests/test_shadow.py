"""Model versioning: two versions of a model installed side by side, a route naming one by version."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.errors import ModelUnavailableError
from dicomnode.work.inference import ModelRegistry

REPO_CARD = Path(__file__).resolve().parents[1] / "models" / "pneumonia-xception" / "model.toml"


def install_version(models: Path, folder: str, version: str) -> None:
    """A copy of the default model's card with another version (weights: a placeholder file)."""
    target = models / folder
    target.mkdir(parents=True)
    text = REPO_CARD.read_text(encoding="utf-8").replace('version = "0.3.0"', f'version = "{version}"', 1)
    (target / "model.toml").write_text(text, encoding="utf-8")
    (target / "weights.pt").write_bytes(b"placeholder")


@pytest.mark.skipif(not REPO_CARD.is_file(), reason="the default model's card is not installed")
def test_two_versions_side_by_side_are_named_by_version(tmp_path: Path) -> None:
    """`NAME@VERSION` picks the package by its card, whatever its folder; the folder name still works;
    an unknown version names the version it looked for."""
    models = tmp_path / "models"
    install_version(models, "pneumonia-xception", "0.3.0")
    install_version(models, "pneumonia-xception-next", "0.4.0")
    registry = ModelRegistry(models)
    assert registry.package("pneumonia-xception@0.4.0").card.version == "0.4.0"
    assert registry.package("pneumonia-xception@0.3.0").path.name == "pneumonia-xception"
    assert registry.package("pneumonia-xception").card.version == "0.3.0"
    with pytest.raises(ModelUnavailableError, match=r"version '9\.9'"):
        registry.package("pneumonia-xception@9.9")
