"""Model packages: a folder holding ``model.toml`` (the model card) and a weights file.

This module reads packages without importing torch; :mod:`dicomnode.models.runner` builds the
network. A package whose weights file is missing refuses to load (:class:`ModelUnavailableError`):
the node never reports findings from randomly initialised weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.models.card import CARD_FILE_NAME, ModelCard

__all__ = [
    "CARD_FILE_NAME",
    "DEFAULT_MODEL_NAME",
    "ModelCard",
    "ModelPackage",
    "discover_models",
    "install_hint",
    "load_model_package",
]

DEFAULT_MODEL_NAME = "pneumonia-xception"


def install_hint(model: str) -> str:
    """What to do about a missing model: install-default only for the default model, else name the others."""
    if model == DEFAULT_MODEL_NAME:
        return "install it with: dicomnode models install-default"
    return (
        "`dicomnode models list` shows the installed ones; copy the package folder (with its model.toml "
        "and weights) into models.path, or give the package folder's path"
    )


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPackage:
    """A model package on disk whose card is valid and whose weights file exists."""

    path: Path  # the package folder
    card: ModelCard

    @property
    def weights_path(self) -> Path:
        """Absolute path of the weights file named by the card."""
        return self.path / self.card.weights


def load_model_package(path: Path | str) -> ModelPackage:
    """Load and validate the package in folder ``path``.

    Raises :class:`ModelUnavailableError` when the folder, its card or its weights are missing, and
    :class:`ConfigurationError` (naming the key) when the card is invalid.
    """
    folder = Path(path)
    card_path = folder / CARD_FILE_NAME
    if not card_path.is_file():
        raise ModelUnavailableError(f"no {CARD_FILE_NAME} in model package {folder}")
    card = ModelCard.from_file(card_path)
    weights = folder / card.weights
    if not weights.is_file() or weights.stat().st_size == 0:
        raise ModelUnavailableError(
            f"model {card.name} {card.version}: weights file {weights} is missing; "
            "refusing to run a network without its trained weights"
        )
    return ModelPackage(path=folder.resolve(), card=card)


def discover_models(models_dir: Path | str, *, strict: bool = False) -> list[ModelPackage]:
    """Every loadable package in the sub-folders of ``models_dir``, sorted by model name.

    Folders that fail to load are logged and skipped, or raise when ``strict`` is true. Two packages
    with the same (name, version) are a configuration error.
    """
    root = Path(models_dir)
    if not root.is_dir():
        if strict:
            raise ModelUnavailableError(f"models directory {root} does not exist")
        return []
    packages: list[ModelPackage] = []
    # hidden folders are staging areas of packages being written (training, install): never served
    candidates = (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in sorted(p for p in candidates if (p / CARD_FILE_NAME).is_file()):
        try:
            packages.append(load_model_package(folder))
        except (ModelUnavailableError, ConfigurationError) as exc:
            if strict:
                raise
            logger.warning("skipping model package %s: %s", folder.name, exc)
    seen: dict[tuple[str, str], Path] = {}
    for package in packages:
        key = (package.card.name, package.card.version)
        if key in seen:
            raise ConfigurationError(
                "name", f"model {key[0]} {key[1]} is in both {seen[key]} and {package.path}"
            )
        seen[key] = package.path
    return sorted(packages, key=lambda p: (p.card.name, p.card.version))
