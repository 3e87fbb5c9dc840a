"""A job's results: heat maps and result objects written, flushed, then one commit per job.

Files first, rows after: every heat map and result object is written, the spool is flushed to disk
once for the whole chunk, and only then does each job's transaction add its Result rows, its Outbox
rows (one per object and destination) and mark it done. :func:`commit_results` is that transaction,
kept apart so that it can move onto ``queue/outbox`` and ``queue/results`` in one place.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode import metrics
from dicomnode.config import Config
from dicomnode.findings import StudyFindings, refusal_kind
from dicomnode.imaging.preprocess import decode_display_image
from dicomnode.node.services import Services
from dicomnode.queue.jobs import ClaimedJob
from dicomnode.queue.outbox import OutboxQueue, StoredObject
from dicomnode.queue.results import ResultStore
from dicomnode.receive.spool import InstanceStore
from dicomnode.report.bundle import EncodedObject, KeyImageInput, build_result_objects
from dicomnode.report.sr import DocumentReference
from dicomnode.sandbox import DecodePool, read_display_image
from dicomnode.work.inference import (
    HEADER_UNREADABLE,
    ImageInput,
    ModelRegistry,
    key_image_indices,
    study_findings,
)

logger = logging.getLogger(__name__)

DISPLAY_MAX_SIZE = 1024  # the key image's longest side; display images are decoded at most this big


@dataclass
class JobWork:
    """One claimed job's state while it moves through the pipeline."""

    job: ClaimedJob
    images: list[ImageInput] = field(default_factory=list)
    error: str | None = None
    permanent: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1  # jobs whose images shared the model and heat-map passes
    decoding: list[Future[None]] = field(default_factory=list)  # the images' decodes in flight
    reported: bool = False  # its results committed (the job done): its shadow models may be stored

    def decoded(self) -> bool:
        """Whether every image's decode has ended (decoded, failed or timed out)."""
        return all(future.done() for future in self.decoding)


@dataclass
class Written:
    """One job's results written (not yet flushed): routing for the job row, objects per model."""

    routing: list[dict[str, Any]]
    outputs: list[tuple[StudyFindings, list[StoredObject]]]


def commit_results(
    services: Services, outbox: OutboxQueue, results: ResultStore, job: ClaimedJob, written: Written
) -> None:
    """One transaction: the results rows, an outbox row per object and destination, the job done."""
    with services.queue.transaction() as session:
        for findings, objects in written.outputs:
            results.add(session, job.id, findings, objects)
            outbox.enqueue(session, job, objects)
        services.queue.complete(
            job,
            "reported" if written.outputs else "no-model",
            session=session,
            routing_json=json.dumps(written.routing),
        )


def predecessor_sr(results: ResultStore, findings: StudyFindings, study_id: int) -> DocumentReference | None:
    """The SR this model made for the study in an earlier job, which a new SR supersedes."""
    sr = results.predecessor_sr(study_id, findings.job_id, findings.model.name)
    if sr is None:
        return None
    return DocumentReference(findings.study_instance_uid, sr.series_instance_uid, sr.sop_instance_uid)


class ResultWriter:
    """Builds, writes and commits the results of a chunk of jobs (the pipeline's last stage)."""

    def __init__(
        self,
        config: Config,
        services: Services,
        registry: ModelRegistry,
        store: InstanceStore,
        *,
        pool: DecodePool | None = None,
        report_pool: DecodePool | None = None,
        mapper: Callable[[Callable[[JobWork], Written | None], Sequence[JobWork]], list[Written | None]]
        | None = None,
    ) -> None:
        self.config = config
        self.services = services
        self.outbox = OutboxQueue(services.sessions, [d.name for d in config.destinations])
        self.results = ResultStore(services.sessions)
        self.registry = registry
        self.store = store
        self.pool = pool  # decodes a key image's display image when the decode did not keep one
        self.report_pool = report_pool  # builds SR, key images and KOS beside the model
        self.mapper = mapper  # runs builds side by side (one per report process), else one by one

    def report(self, works: Sequence[JobWork]) -> None:
        """Build and write every job's results, flush them to disk once, then commit job by job."""
        if self.mapper is not None and len(works) > 1:
            results = self.mapper(self.build, works)
        else:
            results = [self.build(work) for work in works]
        written = [(work, result) for work, result in zip(works, results, strict=True) if result is not None]
        if any(result.outputs for _, result in written):
            try:
                self.store.flush()  # results and heat maps on disk before the rows that point at them
            except Exception as exc:
                for work, _ in written:
                    self.fail_building(work, exc)
                return
        for work, result in written:
            self.commit(work, result)

    def build(self, work: JobWork) -> Written | None:
        """Fail a job that failed earlier; else build and write its results (not yet durable)."""
        job = work.job
        if work.error is not None:
            delay = min(300.0, 5.0 * 2 ** max(0, job.attempts - 1))
            self.services.queue.fail(job, work.error, retry_delay_seconds=delay, permanent=work.permanent)
            return None
        try:
            started = time.perf_counter()
            result = self.write(work)
            work.timings["report"] = time.perf_counter() - started
        except Exception as exc:
            self.fail_building(work, exc)
            return None
        return result

    def fail_building(self, work: JobWork, exc: Exception) -> None:
        """Fail the attempt; the message may quote a dataset value, so the log line does not."""
        self.services.queue.fail(
            work.job,
            f"building results failed: {type(exc).__name__}: {exc}",
            retry_delay_seconds=30.0,
            log_reason=f"building results failed: {type(exc).__name__} (details: dicomnode studies)",
        )

    def commit(self, work: JobWork, result: Written) -> None:
        """Commit one job's results (:func:`commit_results`) and log its canonical line."""
        try:
            started = time.perf_counter()
            commit_results(self.services, self.outbox, self.results, work.job, result)
            work.timings["report"] = work.timings.get("report", 0.0) + time.perf_counter() - started
        except Exception as exc:
            self.fail_building(work, exc)
            return
        work.reported = True
        for findings, _objects in result.outputs:
            metrics.job_finished(findings.model.name, findings.model.version, sum(work.timings.values()))
        log_job(work, result.outputs)

    def write(self, work: JobWork) -> Written:
        """Write findings' heat maps, SR, key images and KOS (durable after the next flush)."""
        job = work.job
        routing = [
            {
                "sop_instance_uid": str(i.header.get("SOPInstanceUID", "")),
                **i.decision.to_dict(),
                "error": i.error,
                **({"intended_use": i.intended.to_dict()} if i.intended is not None else {}),
                **({"ood": i.ood.to_dict()} if i.ood is not None else {}),
                **({"decision": refusal_kind(i.refusal)} if i.refusal is not None else {}),
            }
            for i in work.images
        ]
        by_model: dict[str, list[ImageInput]] = defaultdict(list)
        for image in work.images:
            # a refused image has no probabilities when it was refused before the model ran (intended
            # use), but it still gets its SR group and key image saying "not analysed"
            if image.decision.model is not None and (image.probabilities is not None or image.refused):
                by_model[image.decision.model].append(image)
        outputs = []
        results_dir = self.config.storage.results_path / job.study_instance_uid / f"job-{job.id}"
        for model_name, images in sorted(by_model.items()):
            card = self.registry.package(model_name).card
            maps: dict[int, dict[str, str]] = {}
            for index, image in enumerate(images):
                for label, array in image.heatmaps.items():
                    path = results_dir / "heatmaps" / f"{image.header.SOPInstanceUID}-{label}.npy"
                    buffer = BytesIO()
                    np.save(buffer, array)
                    self.store.write_file(path, buffer.getvalue())
                    maps.setdefault(index, {})[label] = str(path.relative_to(self.config.storage.path))
            findings = study_findings(job.study_instance_uid, card.identity, images, maps, job.id)
            objects = self._objects(findings, images, card.task, job.study_id, results_dir)
            outputs.append((findings, objects))
        return Written(routing, outputs)

    def _objects(
        self, findings: StudyFindings, images: list[ImageInput], task: str, study_id: int, results_dir: Path
    ) -> list[StoredObject]:
        """Build SR, key images and KOS (in the report process when there is one) and write them."""
        sources = [image.header for image in images]
        key_images = []
        for index in key_image_indices(images, series_model=task == "series-classification"):
            image, image_findings = images[index], findings.images[index]
            display = image.display if image.display is not None else self._display_image(image.path)
            positive = [f for f in image_findings.findings if f.present]
            heat = image.heatmaps.get(positive[0].label) if positive else None
            key_images.append(KeyImageInput(index, display, heat))
        predecessor = predecessor_sr(self.results, findings, study_id)
        if self.report_pool is not None:  # Python-bound work: beside this process, not in it
            encoded: list[EncodedObject] = self.report_pool.build_report(
                (findings, sources, key_images, predecessor),
                timeout_s=self.config.worker.job_timeout_seconds,
            )
        else:
            encoded = build_result_objects(findings, sources, key_images, predecessor)
        objects = []
        root = self.config.storage.path
        for obj in encoded:
            path = results_dir / f"{obj.kind}-{obj.sop_instance_uid}.dcm"
            self.store.write_file(path, obj.data)  # durable after the flush before the commit
            objects.append(StoredObject.of(obj, str(path.relative_to(root))))
        return objects

    def _display_image(self, path: Path) -> np.ndarray:
        """The radiograph as shown, for the key image (under the decode time limit when pooled)."""
        if self.pool is not None:
            return read_display_image(
                path,
                max_size=DISPLAY_MAX_SIZE,
                timeout_s=self.config.worker.decode_timeout_seconds,
                pool=self.pool,
            )
        return decode_display_image(path, max_size=DISPLAY_MAX_SIZE)


def log_job(work: JobWork, outputs: list[tuple[StudyFindings, list[StoredObject]]]) -> None:
    """One canonical line per job: UIDs, models, decisions, timings; never patient data."""
    summary = []
    for findings, objects in outputs:
        decided = ", ".join(
            f"{f.label}={f.probability:.2f}{'+' if f.present else '-'}" for f in findings.study_findings
        )
        summary.append(
            f"{findings.model.name} {findings.model.version} on {len(findings.images)} images: "
            f"{decided}; {len(objects)} objects queued"
        )
    unreadable = [i for i in work.images if (i.error or "").startswith(HEADER_UNREADABLE)]
    skipped = [i for i in work.images if i.decision.model is None and i not in unreadable]
    failed = [i for i in work.images if i.error and i.decision.model is not None]
    timings = " ".join(f"{k}={v:.3f}s" for k, v in work.timings.items())
    if work.batch_size > 1:
        timings += f" (model and heatmap shared by {work.batch_size} jobs)"
    logger.info(
        "job %d study %s done: %s; %d images without a model, %d undecodable, %d unreadable headers; %s",
        work.job.id,
        work.job.study_instance_uid,
        " | ".join(summary) or "no model applies",
        len(skipped),
        len(failed),
        len(unreadable),
        timings,
    )
