"""The worker pipeline's stages on one chunk of jobs: route, decode, model and heat maps.

:mod:`dicomnode.work.pipeline` runs them: :func:`prepare_chunk` on its decoder thread,
:func:`predict_chunk` on the main thread; the reporter's stage is :mod:`dicomnode.work.results`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from dicomnode import metrics
from dicomnode.config import Config
from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.queue.jobs import ClaimedJob, JobQueue
from dicomnode.sandbox import DecodePool
from dicomnode.work.inference import (
    HEADER_UNREADABLE,
    ModelRegistry,
    compute_heatmaps,
    decode_inputs,
    decode_one,
    predict,
    route_files,
)
from dicomnode.work.results import DISPLAY_MAX_SIZE, JobWork

logger = logging.getLogger("dicomnode.work.pipeline")  # the worker's lines keep one logger name

# A chunk whose decodes made no progress this long leaves the jobs still decoding behind (a normal
# image decodes in well under a second; a hanging one holds its process until decode_timeout).
STALL_SECONDS = 3.0

Prepared = tuple[list[JobWork], list[JobWork]]  # (decoded, still decoding)


def prepare_chunk(
    jobs: list[ClaimedJob],
    config: Config,
    queue: JobQueue,
    registry: ModelRegistry,
    pool: DecodePool | None,
    images: ThreadPoolExecutor | None,
) -> Prepared:
    """Route each job and decode its images; returns (decoded, still decoding) jobs.

    With a decode pool every image is its own task for the pool's processes, so a slow or
    hanging image holds one process while the others go on; a job with images still decoding
    when decodes have made no progress for :data:`STALL_SECONDS` is returned apart. ``images`` has
    one thread per decode process; without it (and ``pool``) the images decode here, in turn.
    """
    works = [JobWork(job) for job in jobs]
    for work in works:
        route_job(work, config, queue, registry)
    worker = config.worker
    for work in works:
        if work.error is not None:
            continue
        work.timings["decode"] = time.perf_counter()  # the start, until the decodes end
        if images is None:
            decode_inputs(
                work.images,
                registry,
                None,
                worker.decode_timeout_seconds,
                display_max_size=DISPLAY_MAX_SIZE,
            )
            continue
        work.decoding = [
            images.submit(
                decode_one,
                image,
                registry,
                pool,
                worker.decode_timeout_seconds,
                display_max_size=DISPLAY_MAX_SIZE,
            )
            for image in work.images
        ]
    running = {future for work in works for future in work.decoding}
    while running:
        done, running = wait(running, timeout=STALL_SECONDS, return_when=FIRST_COMPLETED)
        if not done:
            break
    decoded = [work for work in works if work.decoded()]
    for work in decoded:
        conclude_decode(work)
    return decoded, [work for work in works if not work.decoded()]


def route_job(work: JobWork, config: Config, queue: JobQueue, registry: ModelRegistry) -> None:
    """Read the job's headers and pick each image's model; fail the job if nothing can run."""
    started = time.perf_counter()
    root = config.storage.path
    instances = queue.instances_for(work.job.id)
    work.images = route_files(config, [(work.job.id, root / i.path, i.calling_ae_title) for i in instances])
    try:
        for image in work.images:
            if image.decision.model is not None:
                registry.package(image.decision.model)
    except (ModelUnavailableError, ConfigurationError) as exc:  # missing or invalid package
        work.error, work.permanent = str(exc), True
        return
    unreadable = sorted({i.error for i in work.images if i.error and i.error.startswith(HEADER_UNREADABLE)})
    if unreadable and all(i.decision.model is None for i in work.images):
        count = sum(1 for i in work.images if (i.error or "").startswith(HEADER_UNREADABLE))
        work.error = f"{'; '.join(unreadable)} ({count} of {len(work.images)} images; no model could run)"
        work.permanent = True
    work.timings["route"] = time.perf_counter() - started


def conclude_decode(work: JobWork) -> None:
    """Once a job's decodes ended: its decode time, and failure when no image decoded."""
    if "decode" in work.timings:
        work.timings["decode"] = time.perf_counter() - work.timings["decode"]
    routed = [i for i in work.images if i.decision.model is not None]
    if work.error is None and routed and all(i.array is None for i in routed):
        work.error = "no image could be decoded: " + "; ".join(sorted({i.error or "?" for i in routed}))
        work.permanent = True


def predict_chunk(works: list[JobWork], registry: ModelRegistry) -> None:
    """Run the models (and heat maps) over all jobs' images at once; on failure, job by job."""
    images = [image for work in works for image in work.images]
    try:
        started = time.perf_counter()
        predict(images, registry, keep_features=True)
        model_seconds = time.perf_counter() - started
        for name in sorted({i.decision.model for i in images if i.decision.model is not None}):
            metrics.model_inference(name, registry.package(name).card.version, model_seconds)
        compute_heatmaps(images, registry)
        for image in images:
            image.features = None  # the heat maps are made; free the activations
        for work in works:
            work.batch_size = len(works)
            work.timings["model"] = model_seconds
            work.timings["heatmap"] = time.perf_counter() - started - model_seconds
        return
    except Exception as exc:  # isolate: run job by job so one bad input fails only its job
        logger.warning(
            "model pass over %d jobs failed (%s); retrying job by job", len(works), type(exc).__name__
        )
        if len(works) == 1:
            works[0].error = f"model failed: {type(exc).__name__}: {exc}"
            return
    for work in works:
        try:
            predict(work.images, registry, keep_features=True)
            compute_heatmaps(work.images, registry)
        except Exception as exc:
            work.error = f"model failed: {type(exc).__name__}: {exc}"
