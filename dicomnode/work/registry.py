"""The models a process has loaded: packages, runners and out-of-distribution gates, once each.

Apart from :mod:`dicomnode.work.inference` (images through route, decode and model) because
loading is its own concern: a package is found by folder or ``NAME@VERSION``, a runner (and with
it torch) is created only when a model first runs, and the worker, the shadow models and the
command line share one :class:`ModelRegistry` per process. ``inference`` re-exports it and
:func:`model_cpu_threads`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.errors import ModelUnavailableError
from dicomnode.models import install_hint

if TYPE_CHECKING:
    from dicomnode.models import ModelPackage
    from dicomnode.models.ood import Gate
    from dicomnode.models.runner import ModelRunner


class ModelRegistry:
    """Model packages and runners, each loaded once per process and reused."""

    def __init__(
        self,
        models_dir: Path,
        *,
        device: str = "auto",
        max_batch_size: int = 16,
        cpu_threads: int | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.device = None if device == "auto" else device
        self.max_batch_size = max_batch_size
        self.cpu_threads = cpu_threads  # torch intra-op threads of CPU runners (None: torch's default)
        self._packages: dict[str, ModelPackage] = {}
        self._runners: dict[str, ModelRunner] = {}
        self._gates: dict[str, Gate | None] = {}

    def package(self, name: str) -> ModelPackage:
        """The package a route names: a folder of ``models_dir``, or ``NAME@VERSION`` for the
        package whose card has that name and version (two versions installed side by side, in
        folders of any name). ModelUnavailableError (naming the install command) when missing."""
        if name not in self._packages:
            from dicomnode.models import discover_models, load_model_package

            path = self.models_dir / name
            if (path / "model.toml").exists():
                self._packages[name] = load_model_package(path)
            elif "@" in name:
                base, _, version = name.partition("@")
                found = [
                    p
                    for p in discover_models(self.models_dir)
                    if p.card.name == base and p.card.version == version
                ]
                if not found:
                    raise ModelUnavailableError(
                        f"model {base!r} version {version!r} is not installed in {self.models_dir}"
                    )
                self._packages[name] = found[0]
            else:
                raise ModelUnavailableError(
                    f"model {name!r} is not installed in {self.models_dir}; {install_hint(name)}"
                )
        return self._packages[name]

    def runner(self, name: str) -> ModelRunner:
        if name not in self._runners:
            from dicomnode.models.runner import ModelRunner

            self._runners[name] = ModelRunner(
                self.package(name),
                self.device,
                max_batch_size=self.max_batch_size,
                cpu_threads=self.cpu_threads,
            )
        return self._runners[name]

    def gate(self, name: str) -> Gate | None:
        """The model's out-of-distribution gate (None when its card has no ``[ood]``), loaded once."""
        if name not in self._gates:
            from dicomnode.models.ood import load_gate

            self._gates[name] = load_gate(self.package(name))
        return self._gates[name]


def model_cpu_threads() -> int:
    """Torch threads for a model on the CPU: one core fewer than this process may use.

    The reporter thread (building the previous batch's results), the decode processes and the
    listener run beside the model; a model with as many threads as cores then loses far more to
    oversubscription (its threads wait for each other at every operator) than the one core gives
    (measured on 2 cores: 5.3-6.2 against 3.9-4.2 studies/s), and reception slows down.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)
