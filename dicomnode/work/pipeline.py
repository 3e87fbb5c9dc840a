"""The inference worker: claim -> route -> decode -> model -> findings -> report -> outbox -> done.

It drains the queue: stable studies become jobs, up to ``max_batch_size`` queued jobs are claimed
at once so their images share model batches, and each job ends in one transaction that stores its
findings, queues its result objects for every destination and marks it done. A watchdog fails the
jobs in flight and ends the process when a model or decoder hangs past ``job_timeout_seconds``; the
supervisor (``dicomnode serve``) starts a new worker. A lease heartbeat keeps long jobs ours; a
worker that dies without a word has its jobs requeued when the lease runs out.

:meth:`Worker.run` is a pipeline over chunks of jobs (half a claimed batch each): a decoder thread
routes and decodes chunk N+1 (in the decode pool's processes) while this thread runs the model and
the heat maps on chunk N (one frozen graph, GIL released, one core left free) while a reporter
thread finishes chunk N-1: its SR, key images and KOS are built in a report process, written,
flushed to disk once per chunk, and only then each job's transaction commits.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from dicomnode import metrics
from dicomnode.config import Config
from dicomnode.db import Job, Outbox, Result
from dicomnode.errors import ConfigurationError, ModelUnavailableError
from dicomnode.findings import StudyFindings
from dicomnode.imaging.preprocess import decode_display_image
from dicomnode.node.process import instance_name
from dicomnode.node.services import Services, open_services
from dicomnode.queue.jobs import ClaimedJob
from dicomnode.report.bundle import EncodedObject, KeyImageInput, build_result_objects
from dicomnode.report.sr import DocumentReference
from dicomnode.sandbox import DecodePool, read_display_image
from dicomnode.work.inference import (
    ImageInput,
    ModelRegistry,
    compute_heatmaps,
    decode_inputs,
    key_image_indices,
    predict,
    route_files,
    study_findings,
)

logger = logging.getLogger(__name__)

EXIT_WATCHDOG = 70
# Processes building result objects (SR, key images, KOS) beside the model. One: on 2 cores a second
# one kept the cores busier (1.75 instead of 1.5 cores) but every object cost a third more CPU time,
# and the studies/s did not rise (7.6-7.9 against 7.9-8.7 with pipeline.py, measured before the
# model's graph was optimised).
REPORT_PROCESSES = 1
# Decode processes: two, so that a JPEG 2000 image (about 0.3 s to decode a 2048x2048 frame at full
# resolution, which a "nearest" model input needs) decodes beside the next one.
DECODE_PROCESSES = 2
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


@dataclass
class _Written:
    """One job's results written (not yet flushed): routing for the job row, objects per model."""

    routing: list[dict[str, Any]]
    outputs: list[tuple[StudyFindings, list[dict[str, str]]]]


class Watchdog:
    """Fails the jobs in flight and exits the process when a batch runs past its deadline.

    Several batches may be in flight at once (one in the model, one being reported); each has its
    own deadline, and the leases of all their jobs are renewed.
    """

    def __init__(self, services: Services, lease_seconds: float) -> None:
        self.services = services
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._batches: dict[int, tuple[list[ClaimedJob], float, float]] = {}  # jobs, deadline, timeout
        self._next_token = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def watch(self, jobs: list[ClaimedJob], timeout: float) -> int:
        """Start the deadline of a batch; returns the token for :meth:`rearm` and :meth:`clear`."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._batches[token] = (list(jobs), time.monotonic() + timeout, timeout)
        return token

    def rearm(self, token: int, timeout: float) -> None:
        """Give a batch a fresh deadline (when it enters its next stage)."""
        with self._lock:
            if token in self._batches:
                jobs = self._batches[token][0]
                self._batches[token] = (jobs, time.monotonic() + timeout, timeout)

    def clear(self, token: int | None = None) -> None:
        """Stop watching one batch (or all)."""
        with self._lock:
            if token is None:
                self._batches.clear()
            else:
                self._batches.pop(token, None)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        beat = max(0.2, min(self.lease_seconds / 3, 10.0))
        last_beat = time.monotonic()
        while not self._stop.wait(0.2):
            with self._lock:
                batches = list(self._batches.values())
            if not batches:
                continue
            now = time.monotonic()
            expired = [(jobs, timeout) for jobs, deadline, timeout in batches if now > deadline]
            if expired:
                timeout = expired[0][1]
                reason = f"timed out after {timeout:.0f} s (model or decoder hang); worker restarted"
                late = {job.id for jobs, _ in expired for job in jobs}
                for jobs, _, _ in batches:
                    for job in jobs:
                        if job.id in late:
                            self.services.queue.force_fail(job.id, reason)
                            logger.error("job %d %s", job.id, reason)
                        else:  # an innocent batch in flight beside it: back to the queue (or failed)
                            self.services.queue.force_fail(
                                job.id,
                                "worker restarted while the job was in flight (another batch timed out)",
                            )
                os._exit(EXIT_WATCHDOG)
            if now - last_beat >= beat:
                last_beat = now
                for jobs, _, _ in batches:
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
            config.models.path,
            device=config.worker.device,
            max_batch_size=config.worker.max_batch_size,
            cpu_threads=model_cpu_threads(),
        )
        self.owner = instance_name(config)  # the lease owner: stable per supervised child
        self.store = services.store()
        self.watchdog = Watchdog(services, config.worker.lease_seconds)
        self._decoders: ThreadPoolExecutor | None = None  # one thread per decode process
        if pool is not None and pool.workers > 1:
            self._decoders = ThreadPoolExecutor(pool.workers, thread_name_prefix="decode")
        # With a decode pool (a real worker), results are built in a process of their own as well.
        self.report_pool: DecodePool | None = None
        self._builders: ThreadPoolExecutor | None = None  # one thread per report process
        if pool is not None:
            self.report_pool = DecodePool(workers=REPORT_PROCESSES, preload="report")
            if REPORT_PROCESSES > 1:
                self._builders = ThreadPoolExecutor(REPORT_PROCESSES, thread_name_prefix="builder")

    def close(self) -> None:
        self.watchdog.close()
        self.store.close()
        if self._builders is not None:
            self._builders.shutdown(wait=True)
        if self._decoders is not None:
            self._decoders.shutdown(wait=True)
        if self.report_pool is not None:
            self.report_pool.close()

    # --- the loop ----------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Assemble stable studies, then claim and process one batch of jobs; return how many ran."""
        jobs = self._claim()
        if jobs:
            self.process(jobs)
        return len(jobs)

    def _claim(self) -> list[ClaimedJob]:
        """Assemble stable studies, then claim up to ``max_batch_size`` queued jobs."""
        queue = self.services.queue
        queue.requeue_expired()
        studies = self.config.studies
        queue.assemble_stable_studies(
            studies.stable_after_seconds,
            self.config.worker.max_attempts,
            stat_calling_ae_titles=studies.stat_calling_ae_titles,
        )
        return queue.claim_many(
            self.owner,
            self.config.worker.lease_seconds,
            self.config.worker.max_batch_size,
            priority_aging_seconds=studies.priority_aging_seconds,
        )

    def run(self, stop: Any, *, burst: bool = False) -> None:
        """Loop until ``stop`` is set; with ``burst``, return once nothing is queued or due.

        Pipelined in three stages, one chunk of jobs each: a decoder thread routes and decodes
        (waiting on the decode pool's process), this thread runs the model and the heat maps, a
        reporter thread builds, writes and commits the results. At most one chunk waits for the
        reporter. A claimed batch is run as two chunks (:func:`pipeline_chunks`) so that the stages
        overlap within a batch too. The reporter's chunk is always finished before this returns.
        """
        reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reporter")
        decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        pending: Future[None] | None = None
        try:
            while not stop.is_set():
                try:
                    jobs = self._claim()
                    if not jobs and pending is not None:
                        # results of the last batch first: a failed job may be due again at once
                        finished, pending = pending, None
                        finished.result()
                        continue
                    chunks = pipeline_chunks(jobs)
                    tokens = [self.watchdog.watch(c, self.config.worker.job_timeout_seconds) for c in chunks]
                    submitted = 0
                    try:
                        prepared = decoder.submit(self._prepare_all, chunks[0]) if chunks else None
                        for index in range(len(chunks)):
                            assert prepared is not None
                            works = prepared.result()
                            if index + 1 < len(chunks):  # decode the next chunk while the model runs
                                prepared = decoder.submit(self._prepare_all, chunks[index + 1])
                            self._predict([w for w in works if w.error is None])
                            if pending is not None:
                                finished, pending = pending, None
                                finished.result()
                            pending = reporter.submit(self._report_batch, works, tokens[index])
                            submitted = index + 1
                    except BaseException:
                        for token in tokens[submitted:]:  # chunks never handed to the reporter
                            self.watchdog.clear(token)
                        raise
                    ran = len(jobs)
                except Exception:  # the database may be briefly unavailable; never let the loop die
                    logger.exception("worker pass failed; retrying")
                    ran = 0
                    if burst:
                        raise
                if ran == 0:
                    if burst:
                        return
                    stop.wait(self.config.worker.poll_interval_seconds)
        finally:
            try:
                if pending is not None:
                    pending.result()
            finally:
                reporter.shutdown(wait=True)
                decoder.shutdown(wait=True)

    # --- one batch of jobs -------------------------------------------------------------------------

    def process(self, jobs: list[ClaimedJob]) -> None:
        """Run a batch of jobs from start to end; each ends done or failed on its own."""
        token = self.watchdog.watch(jobs, self.config.worker.job_timeout_seconds)
        try:
            works = self._infer(jobs)
        except BaseException:
            self.watchdog.clear(token)
            raise
        self._report_batch(works, token)

    def _infer(self, jobs: list[ClaimedJob]) -> list[JobWork]:
        """Route, decode and run the models (and heat maps) over a batch of jobs."""
        works = self._prepare_all(jobs)
        self._predict([w for w in works if w.error is None])
        return works

    def _prepare_all(self, jobs: list[ClaimedJob]) -> list[JobWork]:
        """Route and decode each job's images (decoding runs in the decode pool's process)."""
        works = [JobWork(job) for job in jobs]
        if self._decoders is not None and len(works) > 1:  # one job per decode process at a time
            list(self._decoders.map(self._prepare, works))
        else:
            for work in works:
                self._prepare(work)
        return works

    def _report_batch(self, works: list[JobWork], token: int) -> None:
        """Build and write every job's results, flush them to disk once, then commit job by job."""
        self.watchdog.rearm(token, self.config.worker.job_timeout_seconds)
        try:
            if self._builders is not None and len(works) > 1:  # one job per report process at a time
                results = list(self._builders.map(self._build, works))
            else:
                results = [self._build(work) for work in works]
            written = [
                (work, result) for work, result in zip(works, results, strict=True) if result is not None
            ]
            if any(result.outputs for _, result in written):
                try:
                    self.store.flush()  # results and heat maps on disk before the rows that point at them
                except Exception as exc:
                    for work, _ in written:
                        self._fail_building(work, exc)
                    return
            for work, result in written:
                self._commit(work, result)
        finally:
            self.watchdog.clear(token)

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
        decode_inputs(
            work.images,
            self.registry,
            self.pool,
            self.config.worker.decode_timeout_seconds,
            display_max_size=DISPLAY_MAX_SIZE,
        )
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
            predict(images, self.registry, keep_features=True)
            model_seconds = time.perf_counter() - started
            for name in sorted({i.decision.model for i in images if i.decision.model is not None}):
                metrics.model_inference(name, self.registry.package(name).card.version, model_seconds)
            compute_heatmaps(images, self.registry)
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
                predict(work.images, self.registry, keep_features=True)
                compute_heatmaps(work.images, self.registry)
            except Exception as exc:
                work.error = f"model failed: {type(exc).__name__}: {exc}"

    def _build(self, work: JobWork) -> _Written | None:
        """Fail a job that failed earlier; else build and write its results (not yet durable)."""
        job = work.job
        if work.error is not None:
            delay = min(300.0, 5.0 * 2 ** max(0, job.attempts - 1))
            self.services.queue.fail(job, work.error, retry_delay_seconds=delay, permanent=work.permanent)
            return None
        try:
            started = time.perf_counter()
            result = self._write_results(work)
            work.timings["report"] = time.perf_counter() - started
        except Exception as exc:
            self._fail_building(work, exc)
            return None
        return result

    def _fail_building(self, work: JobWork, exc: Exception) -> None:
        # the message may quote a dataset value (a name that does not fit its VR): keep it out of logs
        self.services.queue.fail(
            work.job,
            f"building results failed: {type(exc).__name__}: {exc}",
            retry_delay_seconds=30.0,
            log_reason=f"building results failed: {type(exc).__name__} (details: dicomnode studies)",
        )

    def _commit(self, work: JobWork, result: _Written) -> None:
        """One transaction: results rows, outbox rows for every destination, the job done."""
        job = work.job
        try:
            started = time.perf_counter()
            with self.services.queue.transaction() as session:
                for findings, objects in result.outputs:
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
                    record.routing_json = json.dumps(result.routing)
                self.services.queue.complete(
                    job, "reported" if result.outputs else "no-model", session=session
                )
            work.timings["report"] = work.timings.get("report", 0.0) + time.perf_counter() - started
        except Exception as exc:
            self._fail_building(work, exc)
            return
        for findings, _objects in result.outputs:
            metrics.job_finished(findings.model.name, findings.model.version, sum(work.timings.values()))
        self._log_job(work, result.outputs)

    # --- results -----------------------------------------------------------------------------------

    def _write_results(self, work: JobWork) -> _Written:
        """Write findings' heat maps, SR, key images and KOS (durable after the next flush)."""
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
        return _Written(routing, outputs)

    def _build_objects(
        self,
        findings: StudyFindings,
        images: list[ImageInput],
        task: str,
        study_id: int,
        results_dir: Path,
    ) -> list[dict[str, str]]:
        sources = [image.header for image in images]
        key_images = []
        for index in key_image_indices(images, series_model=task == "series-classification"):
            image, image_findings = images[index], findings.images[index]
            display = image.display if image.display is not None else self._display_image(image.path)
            positive = [f for f in image_findings.findings if f.present]
            heat = image.heatmaps.get(positive[0].label) if positive else None
            key_images.append(KeyImageInput(index, display, heat))
        predecessor = self._predecessor(findings, study_id)
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
            objects.append(
                {
                    "kind": obj.kind,
                    "sop_instance_uid": obj.sop_instance_uid,
                    "sop_class_uid": obj.sop_class_uid,
                    "series_instance_uid": obj.series_instance_uid,
                    "path": str(path.relative_to(root)),
                }
            )
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
        timings = " ".join(f"{k}={v:.3f}s" for k, v in work.timings.items())
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


def pipeline_chunks(jobs: list[ClaimedJob]) -> list[list[ClaimedJob]]:
    """A claimed batch as the pipeline runs it: two halves from 4 jobs on, else one chunk.

    With halves the reporter has work after half a batch's model pass, and the last reports wait
    for half a batch instead of a whole one (1.2-1.3x the studies/s of a 64-study burst on 2 cores);
    the model's batches stay large enough for the CPU (on a GPU, reporting dominates anyway).
    """
    if len(jobs) < 4:
        return [list(jobs)] if jobs else []
    middle = (len(jobs) + 1) // 2
    return [list(jobs[:middle]), list(jobs[middle:])]


def model_cpu_threads() -> int:
    """Torch threads for a model on the CPU: one core fewer than this process may use.

    The reporter thread (building the previous batch's results) and the decode process run beside
    the model; a model with as many threads as cores then loses far more to oversubscription (its
    threads wait for each other at every operator) than the one core gives (measured on 2 cores:
    5.3-6.2 against 3.9-4.2 studies/s).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def run_worker(config: Config, *, burst: bool = False) -> int:
    """The worker process: drain the queue until stopped (or until empty, with ``burst``)."""
    from dicomnode.node.process import StopSignal, die_with_parent

    die_with_parent()
    services = open_services(config, upgrade=False)
    pool = DecodePool(workers=DECODE_PROCESSES)
    worker = Worker(config, services, pool=pool)
    try:
        worker.run(StopSignal(), burst=burst)
        return 0
    finally:
        worker.close()
        pool.close()
        services.close()
