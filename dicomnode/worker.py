"""The inference worker: claim -> route -> decode -> model -> findings -> report -> outbox -> done.

It drains the queue: stable studies become jobs, up to ``max_batch_size`` queued jobs are claimed
at once so their images share model batches, and each job ends in one transaction that stores its
findings, queues its result objects for every destination and marks it done. A watchdog fails the
jobs in flight and ends the process when a model or decoder hangs past ``job_timeout_seconds``; the
supervisor (``dicomnode serve``) starts a new worker. A lease heartbeat keeps long jobs ours; a
worker that dies without a word has its jobs requeued when the lease runs out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomnode.config import Config
from dicomnode.db import Job, Outbox, Result
from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.findings import StudyFindings
from dicomnode.imaging import DecodePool, decode_display_image, read_display_image
from dicomnode.inference import (
    ImageInput,
    ModelRegistry,
    compute_heatmaps,
    decode_inputs,
    key_image_indices,
    predict,
    route_files,
    study_findings,
)
from dicomnode.queue import ClaimedJob
from dicomnode.report import (
    DEFAULT_KEY_IMAGE_SERIES_NUMBER,
    DocumentReference,
    build_key_image,
    build_key_object_selection,
    build_sr,
)
from dicomnode.services import Services, open_services

logger = logging.getLogger(__name__)

EXIT_WATCHDOG = 70


@dataclass
class JobWork:
    """One claimed job's state while it moves through the pipeline."""

    job: ClaimedJob
    images: list[ImageInput] = field(default_factory=list)
    error: str | None = None
    permanent: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1  # jobs whose images shared the model and heat-map passes


class Watchdog:
    """Fails the jobs in flight and exits the process when they run past their deadline."""

    def __init__(self, services: Services, lease_seconds: float) -> None:
        self.services = services
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._jobs: list[ClaimedJob] = []
        self._deadline = 0.0
        self._timeout = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def watch(self, jobs: list[ClaimedJob], timeout: float) -> None:
        with self._lock:
            self._jobs = list(jobs)
            self._timeout = timeout
            self._deadline = time.monotonic() + timeout

    def clear(self) -> None:
        with self._lock:
            self._jobs = []

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        beat = max(0.2, min(self.lease_seconds / 3, 10.0))
        last_beat = time.monotonic()
        while not self._stop.wait(0.2):
            with self._lock:
                jobs, deadline, timeout = list(self._jobs), self._deadline, self._timeout
            if not jobs:
                continue
            if time.monotonic() > deadline:
                reason = f"timed out after {timeout:.0f} s (model or decoder hang); worker restarted"
                for job in jobs:
                    self.services.queue.force_fail(job.id, reason)
                    logger.error("job %d %s", job.id, reason)
                os._exit(EXIT_WATCHDOG)
            if time.monotonic() - last_beat >= beat:
                last_beat = time.monotonic()
                for job in jobs:
                    self.services.queue.heartbeat(job, self.lease_seconds)


class Worker:
    """Drains the job queue of one database with the models of one models folder."""

    def __init__(
        self,
        config: Config,
        services: Services,
        *,
        pool: DecodePool | None = None,
        registry: ModelRegistry | None = None,
    ) -> None:
        self.config = config
        self.services = services
        self.pool = pool
        self.registry = registry or ModelRegistry(
            config.models.path, device=config.worker.device, max_batch_size=config.worker.max_batch_size
        )
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.store = services.store()
        self.watchdog = Watchdog(services, config.worker.lease_seconds)

    def close(self) -> None:
        self.watchdog.close()
        self.store.close()

    # --- the loop ----------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Assemble stable studies, then claim and process one batch of jobs; return how many ran."""
        queue = self.services.queue
        queue.requeue_expired()
        queue.assemble_stable_studies(
            self.config.studies.stable_after_seconds, self.config.worker.max_attempts
        )
        jobs: list[ClaimedJob] = []
        while len(jobs) < self.config.worker.max_batch_size:
            job = queue.claim(self.owner, self.config.worker.lease_seconds)
            if job is None:
                break
            jobs.append(job)
        if jobs:
            self.process(jobs)
        return len(jobs)

    def run(self, stop: Any, *, burst: bool = False) -> None:
        """Loop until ``stop`` is set; with ``burst``, return once nothing is queued or due."""
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the database may be briefly unavailable; never let the loop die
                logger.exception("worker pass failed; retrying")
                ran = 0
                if burst:
                    raise
            if ran == 0:
                if burst:
                    return
                stop.wait(self.config.worker.poll_interval_seconds)

    # --- one batch of jobs -------------------------------------------------------------------------

    def process(self, jobs: list[ClaimedJob]) -> None:
        """Run a batch of jobs; each ends done or failed on its own."""
        self.watchdog.watch(jobs, self.config.worker.job_timeout_seconds)
        try:
            works = [JobWork(job) for job in jobs]
            for work in works:
                self._prepare(work)
            self._predict([w for w in works if w.error is None])
            for work in works:
                self._finish(work)
        finally:
            self.watchdog.clear()

    def _prepare(self, work: JobWork) -> None:
        started = time.perf_counter()
        root = self.config.storage.path
        instances = self.services.queue.instances_for(work.job.id)
        work.images = route_files(
            self.config, [(work.job.id, root / i.path, i.calling_ae_title) for i in instances]
        )
        try:
            for image in work.images:
                if image.decision.model is not None:
                    self.registry.package(image.decision.model)
        except (ModelUnavailableError, ConfigurationError) as exc:  # missing or invalid package
            work.error, work.permanent = str(exc), True
            return
        work.timings["route"] = time.perf_counter() - started
        started = time.perf_counter()
        decode_inputs(work.images, self.registry, self.pool, self.config.worker.decode_timeout_seconds)
        work.timings["decode"] = time.perf_counter() - started
        routed = [i for i in work.images if i.decision.model is not None]
        if routed and all(i.array is None for i in routed):
            work.error = "no image could be decoded: " + "; ".join(sorted({i.error or "?" for i in routed}))
            work.permanent = True

    def _predict(self, works: list[JobWork]) -> None:
        """Run the models (and heat maps) over all jobs' images at once; on failure, job by job."""
        images = [image for work in works for image in work.images]
        try:
            started = time.perf_counter()
            predict(images, self.registry)
            model_seconds = time.perf_counter() - started
            compute_heatmaps(images, self.registry)
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
                predict(work.images, self.registry)
                compute_heatmaps(work.images, self.registry)
            except Exception as exc:
                work.error = f"model failed: {type(exc).__name__}: {exc}"

    def _finish(self, work: JobWork) -> None:
        job = work.job
        queue = self.services.queue
        if work.error is not None:
            delay = min(300.0, 5.0 * 2 ** max(0, job.attempts - 1))
            queue.fail(job, work.error, retry_delay_seconds=delay, permanent=work.permanent)
            return
        try:
            started = time.perf_counter()
            outputs = self._report(work)
            work.timings["report"] = time.perf_counter() - started
        except Exception as exc:
            # the message may quote a dataset value (a name that does not fit its VR): keep it out of logs
            queue.fail(
                job,
                f"building results failed: {type(exc).__name__}: {exc}",
                retry_delay_seconds=30.0,
                log_reason=f"building results failed: {type(exc).__name__} (details: dicomnode studies)",
            )
            return
        self._log_job(work, outputs)

    # --- results -----------------------------------------------------------------------------------

    def _report(self, work: JobWork) -> list[tuple[StudyFindings, list[dict[str, str]]]]:
        """Write findings, SR, key images and KOS; queue them for delivery; mark the job done, atomically."""
        job = work.job
        routing = [
            {
                "sop_instance_uid": str(i.header.get("SOPInstanceUID", "")),
                **i.decision.to_dict(),
                "error": i.error,
            }
            for i in work.images
        ]
        by_model: dict[str, list[ImageInput]] = defaultdict(list)
        for image in work.images:
            if image.decision.model is not None and image.probabilities is not None:
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
            objects = self._build_objects(findings, images, card.task, job.study_id, results_dir)
            outputs.append((findings, objects))
        if outputs:
            self.store.flush()  # results and heat maps on disk before the rows that point at them
        with self.services.queue.transaction() as session:
            for findings, objects in outputs:
                session.add(
                    Result(
                        job_id=job.id,
                        model_name=findings.model.name,
                        model_version=findings.model.version,
                        findings_json=findings.to_json(),
                        objects_json=json.dumps(objects),
                    )
                )
                for obj in objects:
                    for destination in self.config.destinations:
                        session.add(
                            Outbox(
                                job_id=job.id,
                                study_instance_uid=job.study_instance_uid,
                                destination=destination.name,
                                sop_instance_uid=obj["sop_instance_uid"],
                                sop_class_uid=obj["sop_class_uid"],
                                path=obj["path"],
                            )
                        )
            record = session.get(Job, job.id)
            if record is not None:
                record.routing_json = json.dumps(routing)
            self.services.queue.complete(job, "reported" if outputs else "no-model", session=session)
        return outputs

    def _build_objects(
        self,
        findings: StudyFindings,
        images: list[ImageInput],
        task: str,
        study_id: int,
        results_dir: Path,
    ) -> list[dict[str, str]]:
        sources = [image.header for image in images]
        sr = build_sr(findings, sources, predecessor=self._predecessor(findings, study_id))
        built: list[Dataset] = [sr]
        shown = key_image_indices(images, series_model=task == "series-classification")
        for number, index in enumerate(shown, start=1):
            image, image_findings = images[index], findings.images[index]
            display = self._display_image(image.path)
            positive = [f for f in image_findings.findings if f.present]
            heat = image.heatmaps.get(positive[0].label) if positive else None
            built.append(
                build_key_image(
                    findings,
                    image_findings,
                    image.header,
                    display,
                    heat,
                    series_number=DEFAULT_KEY_IMAGE_SERIES_NUMBER,
                    instance_number=number,
                )
            )
        built.append(build_key_object_selection(findings, built))
        objects = []
        root = self.config.storage.path
        for ds in built:
            kind = {"1.2.840.10008.5.1.4.1.1.88.34": "sr", "1.2.840.10008.5.1.4.1.1.88.59": "kos"}.get(
                str(ds.SOPClassUID), "key-image"
            )
            path = results_dir / f"{kind}-{ds.SOPInstanceUID}.dcm"
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            self.store.write_file(path, buffer.getvalue())  # durable after the flush before the commit
            objects.append(
                {
                    "kind": kind,
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "path": str(path.relative_to(root)),
                }
            )
        return objects

    def _display_image(self, path: Path) -> np.ndarray:
        """The radiograph as shown, for the key image (under the decode time limit when pooled)."""
        if self.pool is not None:
            return read_display_image(
                path, max_size=1024, timeout_s=self.config.worker.decode_timeout_seconds, pool=self.pool
            )
        return decode_display_image(path, max_size=1024)

    def _predecessor(self, findings: StudyFindings, study_id: int) -> DocumentReference | None:
        """The SR this model made for the study in an earlier job, which a new SR supersedes."""
        with self.services.sessions() as session:
            objects_json = session.scalar(
                select(Result.objects_json)
                .join(Job, Job.id == Result.job_id)
                .where(
                    Job.study_id == study_id,
                    Job.id != findings.job_id,
                    Result.model_name == findings.model.name,
                    Result.objects_json.is_not(None),
                )
                .order_by(Result.id.desc())
                .limit(1)
            )
        for obj in json.loads(objects_json or "[]"):
            if obj.get("kind") == "sr":
                return DocumentReference(
                    findings.study_instance_uid, obj["series_instance_uid"], obj["sop_instance_uid"]
                )
        return None

    def _log_job(self, work: JobWork, outputs: list[tuple[StudyFindings, list[dict[str, str]]]]) -> None:
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
        skipped = [i for i in work.images if i.decision.model is None]
        failed = [i for i in work.images if i.error and i.decision.model is not None]
        timings = " ".join(f"{k}={v:.2f}s" for k, v in work.timings.items())
        if work.batch_size > 1:
            timings += f" (model and heatmap shared by {work.batch_size} jobs)"
        logger.info(
            "job %d study %s done: %s; %d images without a model, %d undecodable; %s",
            work.job.id,
            work.job.study_instance_uid,
            " | ".join(summary) or "no model applies",
            len(skipped),
            len(failed),
            timings,
        )


def run_worker(config: Config, *, burst: bool = False) -> int:
    """The worker process: drain the queue until stopped (or until empty, with ``burst``)."""
    from dicomnode.runtime import StopSignal, die_with_parent

    die_with_parent()
    services = open_services(config, upgrade=False)
    pool = DecodePool(workers=1)
    worker = Worker(config, services, pool=pool)
    try:
        worker.run(StopSignal(), burst=burst)
        return 0
    finally:
        worker.close()
        pool.close()
        services.close()
