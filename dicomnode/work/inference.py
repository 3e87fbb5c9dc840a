"""Routing + preprocessing + model, shared by the worker and ``dicomnode infer``.

Torch is imported only when a model is actually loaded (through ``dicomnode.models.runner``), so the
listener and the reporting code never pull it in. Which models a process has loaded, and loading
them, is :mod:`dicomnode.work.registry`.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.config import Config
from dicomnode.errors import DecodeTimeoutError, InvalidDatasetError
from dicomnode.findings import (
    ImageFindings,
    LabelFinding,
    ModelIdentity,
    StudyFindings,
    findings_for,
    study_level,
)
from dicomnode.imaging.frames import read_header
from dicomnode.sandbox import DecodePool
from dicomnode.work.intended import IntendedUse, check_image_intended_use

# the model registry, importable from here as before the split
from dicomnode.work.registry import ModelRegistry as ModelRegistry
from dicomnode.work.registry import model_cpu_threads as model_cpu_threads
from dicomnode.work.routing import RouteDecision, route_image

if TYPE_CHECKING:
    from dicomnode.models.ood import Gate, OodDecision
    from dicomnode.models.runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class ImageInput:
    """One source image on its way through a model."""

    key: Any  # the caller's handle (job id, file index)
    path: Path
    header: Dataset
    decision: RouteDecision
    array: np.ndarray | None = None  # (frames, C, H, W) once decoded
    error: str | None = None
    probabilities: np.ndarray | None = None
    findings: list[LabelFinding] = field(default_factory=list)
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # label -> Grad-CAM map in [0, 1]
    # the Grad-CAM target activations kept from the model's forward pass (a torch tensor), if any
    features: Any = None
    display: np.ndarray | None = None  # the display image, when decoded together with the model input
    ood: OodDecision | None = None  # the out-of-distribution gate's verdict, when the model has a gate
    # the route's intended_use ("enforce" or "ignore"); None: not checked (evaluate and explain make
    # their own inputs: they measure or show the model, they deliver nothing)
    intended_use_policy: str | None = None
    intended: IntendedUse | None = None  # the header against the card's intended population

    @property
    def refusal(self) -> str | None:
        """Why the image gets no finding: outside the intended use (checked first, before the model
        runs: no probabilities) or refused by the OOD gate (after it); None when analysed."""
        if self.intended is not None and self.intended.refused:
            return self.intended.reason
        if self.ood is not None and self.ood.refused:
            return self.ood.reason
        return None

    @property
    def refused(self) -> bool:
        """Whether the image gets no finding (:attr:`refusal` says why)."""
        return self.refusal is not None


def route_files(config: Config, items: Sequence[tuple[Any, Path, str | None]]) -> list[ImageInput]:
    """Read each file's header and pick its model. ``items`` are (key, path, calling AE title)."""
    routed = []
    for key, path, calling_ae in items:
        try:
            header = read_header(path)
        except Exception as exc:  # RecursionError too: the header of an untrusted file
            decision = RouteDecision(None, None, header_unreadable(exc))
            routed.append(ImageInput(key, path, Dataset(), decision, error=decision.reason))
            continue
        decision = route_image(config.routes, header, calling_ae)
        routed.append(ImageInput(key, path, header, decision, intended_use_policy=decision.intended_use))
    return routed


HEADER_UNREADABLE = "header unreadable"


def header_unreadable(exc: BaseException) -> str:
    """Why a header could not be read, by exception type only (its text may quote the file)."""
    cause = exc.__cause__ if isinstance(exc, InvalidDatasetError) and exc.__cause__ else exc
    return f"{HEADER_UNREADABLE}: {type(cause).__name__}"


def decode_inputs(
    images: Sequence[ImageInput],
    registry: ModelRegistry,
    pool: DecodePool | None,
    timeout_s: float,
    *,
    display_max_size: int | None = None,
) -> None:
    """Decode each routed image for its model (under the pool's time limit); errors stay per image.

    With ``display_max_size``, images of image-classification models (each of which gets a key
    image) also get their display image (``image.display``) from the same decode.
    """
    for image in images:
        decode_one(image, registry, pool, timeout_s, display_max_size=display_max_size)


def decode_one(
    image: ImageInput,
    registry: ModelRegistry,
    pool: DecodePool | None,
    timeout_s: float,
    *,
    display_max_size: int | None = None,
) -> None:
    """Decode one routed image (see :func:`decode_inputs`); an error stays with the image."""
    from dicomnode.imaging.preprocess import decode_model_input, decode_model_input_and_display

    if image.decision.model is not None and not image.error:
        card = registry.package(image.decision.model).card
        spec = card.preprocessing
        with_display = display_max_size is not None and card.task == "image-classification"
        try:
            if with_display and pool is not None:
                image.array, image.display = pool.read_model_input_and_display(
                    image.path, spec, max_size=display_max_size, timeout_s=timeout_s
                )
            elif with_display:
                image.array, image.display = decode_model_input_and_display(
                    image.path, spec, display_max_size
                )
            elif pool is not None:
                image.array = pool.read_model_input(image.path, spec, timeout_s=timeout_s)
            else:
                image.array = decode_model_input(image.path, spec)
        except (DecodeTimeoutError, InvalidDatasetError) as exc:
            image.error = str(exc)


def predict(
    images: Sequence[ImageInput], registry: ModelRegistry, *, keep_features: bool = False
) -> dict[str, float]:
    """Run every model once over all its decoded images (batched across studies); return seconds per model.

    Image models see the first selected frame of each image; series models see each series as one
    volume, slices sorted by position. With ``keep_features`` each image keeps its Grad-CAM target
    activations (``image.features``) where the runner can provide them, so that
    :func:`compute_heatmaps` need not run the network again.
    """
    timings: dict[str, float] = {}
    by_model: dict[str, list[ImageInput]] = defaultdict(list)
    for image in images:
        if image.array is not None and image.decision.model is not None:
            check_image_intended_use(image, registry)
            if not image.refused:
                by_model[image.decision.model].append(image)
    for name, group in by_model.items():
        runner = registry.runner(name)
        started = time.perf_counter()
        if runner.card.task == "series-classification":
            for series in _series_volumes(group):
                volume = np.concatenate([image.array for image in series if image.array is not None])
                probabilities = runner.predict_volume(volume)
                for image in series:
                    image.probabilities = probabilities
        else:
            gate = registry.gate(name)
            batch = np.stack([image.array[0] for image in group if image.array is not None])
            if keep_features or gate is not None:
                probabilities, features = runner.predict_with_features(batch)
            else:
                probabilities, features = runner.predict(batch), None
            for position, (image, row) in enumerate(zip(group, probabilities, strict=True)):
                image.probabilities = row
                image.features = features[position] if features is not None else None
            if gate is not None:
                _apply_gate(gate, runner, batch, features, group)

        for image in group:
            if image.probabilities is not None and not image.refused:
                image.findings = findings_for(image.probabilities, runner.card)
        timings[name] = time.perf_counter() - started
    return timings


def _apply_gate(
    gate: Gate, runner: ModelRunner, batch: np.ndarray, features: list[Any] | None, group: list[ImageInput]
) -> None:
    """Score each image with the model's gate; a refused image keeps no finding and no activations."""
    from dicomnode.models.ood import activations, decide

    if features is None and gate.spec.kind == "feature-distance":
        features = activations(runner, batch)  # the prediction ran where it keeps none (autocast)
    for image, decision in zip(group, decide(gate, batch, features), strict=True):
        image.ood = decision
        if decision.refused:
            image.features = None
            logger.info("image %s: %s", image.header.get("SOPInstanceUID", "?"), decision.reason)


def key_image_indices(images: Sequence[ImageInput], *, series_model: bool) -> list[int]:
    """Which images get a key image: every image for an image model; for a series model one per
    series, its middle slice by position (the whole series shares one result)."""
    if not series_model:
        return list(range(len(images)))
    series: dict[tuple[Any, str], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        series[(image.key, str(image.header.get("SeriesInstanceUID", "")))].append(index)
    middles = []
    for members in series.values():
        ordered = sorted(members, key=lambda i: _slice_position(images[i]))
        middles.append(ordered[len(ordered) // 2])
    return sorted(middles)


def _series_volumes(images: list[ImageInput]) -> list[list[ImageInput]]:
    """Group by (key, series) and sort slices along the slice normal (InstanceNumber as fallback)."""
    groups: dict[tuple[Any, str], list[ImageInput]] = defaultdict(list)
    for image in images:
        groups[(image.key, str(image.header.get("SeriesInstanceUID", "")))].append(image)
    return [sorted(group, key=_slice_position) for group in groups.values()]


def _slice_position(image: ImageInput) -> tuple[float, float]:
    header = image.header
    number = float(header.get("InstanceNumber", 0) or 0)
    try:
        position = np.array([float(v) for v in header.ImagePositionPatient])
        orientation = np.array([float(v) for v in header.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        return float(position @ normal), number
    except (AttributeError, ValueError, TypeError):
        return number, number


def heatmap_shape(image: ImageInput, max_side: int) -> tuple[int, int]:
    """The source's aspect ratio at most ``max_side`` pixels on the longer side."""
    assert image.array is not None
    rows = int(image.header.get("Rows", 0) or image.array.shape[-2])
    columns = int(image.header.get("Columns", 0) or image.array.shape[-1])
    scale = min(1.0, max_side / max(rows, columns))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def compute_heatmaps(
    images: Sequence[ImageInput], registry: ModelRegistry, max_side: int = 512, labels: str = "positive"
) -> None:
    """Grad-CAM maps into ``image.heatmaps`` for each positive finding (or every label with
    ``labels="all"``), batched per model across all the images given."""
    from dicomnode.models.gradcam import grad_cam_batch, grad_cam_from_features

    wanted: dict[str, list[tuple[ImageInput, int, str]]] = defaultdict(list)
    for image in images:
        if image.array is None or image.decision.model is None:
            continue
        for index, finding in enumerate(image.findings):
            if finding.present or labels == "all":
                wanted[image.decision.model].append((image, index, finding.label))
    for name, pairs in wanted.items():
        runner = registry.runner(name)
        if runner.card.task != "image-classification" or runner.card.architecture == "torchscript":
            continue  # no class-activation map for volume or opaque (TorchScript) models
        kept = [pair for pair in pairs if pair[0].features is not None]
        rest = [pair for pair in pairs if pair[0].features is None]
        if kept:  # activations from the prediction pass: backward through the head only
            maps = grad_cam_from_features(
                runner,
                [image.features for image, _, _ in kept],
                [index for _, index, _ in kept],
                [heatmap_shape(image, max_side) for image, _, _ in kept],
            )
            for (image, _, label), array in zip(kept, maps, strict=True):
                image.heatmaps[label] = array
        if rest:
            maps = grad_cam_batch(
                runner,
                np.stack([image.array[0] for image, _, _ in rest if image.array is not None]),
                [index for _, index, _ in rest],
                [heatmap_shape(image, max_side) for image, _, _ in rest],
            )
            for (image, _, label), array in zip(rest, maps, strict=True):
                image.heatmaps[label] = array


def study_findings(
    study_instance_uid: str,
    model: ModelIdentity,
    images: Sequence[ImageInput],
    heatmaps: dict[int, dict[str, str]],
    job_id: int | None = None,
) -> StudyFindings:
    """Assemble per-image and study-level findings of one model for one study."""
    per_image = []
    for index, image in enumerate(images):
        header = image.header
        frames = 1 if image.array is None else image.array.shape[0]
        per_image.append(
            ImageFindings(
                sop_instance_uid=str(header.SOPInstanceUID),
                sop_class_uid=str(header.SOPClassUID),
                series_instance_uid=str(header.SeriesInstanceUID),
                path=str(image.path),
                findings=tuple(image.findings),
                frame_number=1 if frames > 1 or "NumberOfFrames" in header else None,
                heatmaps=heatmaps.get(index, {}),
                refusal=image.refusal,
            )
        )
    return StudyFindings(
        study_instance_uid=study_instance_uid,
        model=model,
        images=tuple(per_image),
        study_findings=study_level(per_image),
        job_id=job_id,
    )
