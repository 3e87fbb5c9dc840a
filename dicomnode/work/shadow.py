"""Shadow models: run a route's ``shadow`` models on the images its reporting model saw, store
their findings for comparison (``dicomnode compare``), and never send anything.

Ordering (docs/models.md): a chunk's reporting results are handed to the reporter thread first,
which builds, flushes and commits them (the job done, its outbox rows queued) while this module runs
the shadow models on the same decoded images. The shadow rows are stored only after that commit, and
only for jobs it marked done, each in a transaction of its own. The reporting model's delivery thus
never waits for a shadow; the next chunk's reporting model does wait for this chunk's shadows (they
share the cores).

A shadow that fails never fails the job: a missing package, a crash or a run past
``job_timeout_seconds`` is recorded as the ``error`` of its result row. A hang cannot be interrupted
in Python, so after recording it the worker process exits (as the watchdog does for a reporting
model) and the supervisor starts a new one; its jobs are done already, so the hang is not repeated.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace

from dicomnode import metrics
from dicomnode.config import Config
from dicomnode.findings import ModelIdentity, StudyFindings
from dicomnode.imaging.spec import PreprocessSpec
from dicomnode.queue.results import ResultStore
from dicomnode.sandbox import DecodePool
from dicomnode.work.inference import ImageInput, ModelRegistry, decode_one, predict, study_findings
from dicomnode.work.results import JobWork
from dicomnode.work.routing import RouteDecision
from dicomnode.work.watchdog import EXIT_WATCHDOG

logger = logging.getLogger(__name__)


@dataclass
class ShadowRun:
    """One shadow model on one job: copies of the job's images, routed to the shadow."""

    work: JobWork
    name: str  # as the route names it: NAME, a folder, or NAME@VERSION
    images: list[ImageInput] = field(default_factory=list)
    reporting: list[str] = field(default_factory=list)  # each image's reporting model, as routed
    error: str | None = None  # stored in its result row
    logged_error: str | None = (
        None  # what the log says of it: never an exception's text (it may quote header values)
    )
    store: bool = True  # False for a shadow that is the reporting model itself under another name
    identity: ModelIdentity | None = None  # from the package's card, once it loaded

    def fail(self, error: str, *, logged: str | None = None) -> None:
        """Record why the run failed; ``logged`` (default: ``error``) is what the log line shows."""
        self.error = error
        self.logged_error = logged or error

    def model_identity(self) -> ModelIdentity:
        """The card's identity; for a package that never loaded, what the route's name says."""
        if self.identity is not None:
            return self.identity
        base, _, version = self.name.partition("@")
        return ModelIdentity(name=base, version=version, display_name=base)


def shadow_runs(works: Sequence[JobWork]) -> list[ShadowRun]:
    """The shadow runs a chunk asks for: per job, one per shadow model its images' routes name."""
    runs: list[ShadowRun] = []
    for work in works:
        if work.error is not None:
            continue
        by_name: dict[str, list[ImageInput]] = defaultdict(list)
        for image in work.images:
            if image.decision.model is None or image.error is not None:
                continue
            for name in image.decision.shadow:
                by_name[name].append(image)
        for name, images in sorted(by_name.items()):
            copies = [_routed_to(image, name) for image in images]
            reporting = [str(image.decision.model) for image in images]
            runs.append(ShadowRun(work, name, copies, reporting))
    return runs


def _routed_to(image: ImageInput, name: str) -> ImageInput:
    """A copy of ``image`` routed to the shadow model ``name`` (sharing the decoded array)."""
    decision = RouteDecision(image.decision.route, name, f"shadow of route {image.decision.route!r}")
    return replace(
        image, decision=decision, probabilities=None, findings=[], heatmaps={}, features=None, ood=None
    )


class ShadowRunner:
    """Runs and stores the shadow models of a worker's chunks (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        registry: ModelRegistry,
        results: ResultStore,
        *,
        pool: DecodePool | None = None,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.config = config
        self.registry = registry
        self.results = results
        self.pool = pool
        self.exit_process = exit_process  # tests replace it; a hung model thread cannot be stopped
        self._thread: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Let the model thread end (without waiting: after a hang it never would)."""
        if self._thread is not None:
            self._thread.shutdown(wait=False)

    def run(self, works: Sequence[JobWork], reported: Callable[[], None]) -> None:
        """Run the chunk's shadow models; call ``reported`` (it waits for the reporting model's
        commit), then store each shadow's row for the jobs that are done. Never raises for a shadow."""
        runs = shadow_runs(works)
        if not runs:
            reported()
            return
        timeout = self.config.worker.job_timeout_seconds
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        future = self._thread.submit(self._predict, runs)
        try:
            future.result(timeout=timeout)
            hung = False
        except FutureTimeout:
            hung = True
            self._thread = None  # stuck in the model: a later run (if the exit is stubbed) gets another
            for run in runs:
                if run.error is None:
                    run.fail(f"shadow model timed out after {timeout:.0f} s; worker restarted")
        except Exception as exc:  # _predict isolates errors per run; this is a bug, not a shadow's fault
            for run in runs:
                if run.error is None:
                    run.fail(
                        f"shadow pass failed: {type(exc).__name__}: {exc}",
                        logged=f"shadow pass failed: {type(exc).__name__}",
                    )
            hung = False
        reported()
        for run in runs:
            if run.work.reported and run.store:
                self._store(run)
        if hung:
            logger.error("a shadow model hung past %.0f s; the worker exits and is restarted", timeout)
            self.exit_process(EXIT_WATCHDOG)

    def _predict(self, runs: list[ShadowRun]) -> None:
        """Load, decode where the shadow's preprocessing differs, and run each shadow model."""
        by_model: dict[str, list[ShadowRun]] = defaultdict(list)
        for run in runs:
            by_model[run.name].append(run)
        for name, group in by_model.items():
            try:
                card = self.registry.package(name).card
            except Exception as exc:  # missing or invalid package: ModelUnavailableError, ConfigurationError
                for run in group:
                    run.fail(str(exc))  # the package's own message (names the model, not the data)
                continue
            for run in group:
                run.identity = card.identity
                if any(self.registry.package(r).card.identity == card.identity for r in run.reporting):
                    logger.warning("shadow %s is the reporting model itself; not run", name)
                    run.fail("the reporting model itself")
                    run.store = False
                    continue
                self._decode(run, card.preprocessing)
            images = [image for run in group if run.error is None for image in run.images]
            started = time.perf_counter()
            try:
                predict(images, self.registry)
                metrics.model_inference(card.name, card.version, time.perf_counter() - started)
            except Exception as exc:  # isolate: job by job, so one bad input costs only its run
                logger.warning("shadow model %s failed on %d jobs (%s)", name, len(group), type(exc).__name__)
                for run in group:
                    if run.error is not None:
                        continue
                    try:
                        predict(run.images, self.registry)
                    except Exception as inner:
                        run.fail(
                            f"shadow model failed: {type(inner).__name__}: {inner}",
                            logged=f"shadow model failed: {type(inner).__name__}",
                        )

    def _decode(self, run: ShadowRun, spec: PreprocessSpec) -> None:
        """Share the reporting model's decode when the preprocessing is the same, else decode again."""
        for image, reporting in zip(run.images, run.reporting, strict=True):
            if spec == self.registry.package(reporting).card.preprocessing:
                continue
            image.array, image.display = None, None
            decode_one(
                image,
                self.registry,
                self.pool,
                self.config.worker.decode_timeout_seconds,
                display_max_size=None,
            )
        if all(image.array is None for image in run.images):
            run.fail("no image could be decoded for the shadow model")

    def _store(self, run: ShadowRun) -> None:
        """One row: the findings on the images the shadow read, or its error; one log line."""
        job = run.work.job
        identity = run.model_identity()
        images = [image for image in run.images if image.probabilities is not None]
        if run.error is None and not images:
            run.fail("the shadow model produced no probabilities")
        findings = (
            study_findings(job.study_instance_uid, identity, images, {}, job.id)
            if run.error is None
            else StudyFindings(job.study_instance_uid, identity, (), (), job.id)
        )
        try:
            self.results.add_shadow(job.id, findings, run.error)
        except Exception as exc:  # the job is done and delivered; a lost comparison row is only logged
            logger.warning(
                "job %d: shadow %s %s not stored (%s)",
                job.id,
                identity.name,
                identity.version,
                type(exc).__name__,
            )
            return
        metrics.shadow_run(identity.name, identity.version, "error" if run.error else "ok")
        if run.error:
            logger.warning(
                "job %d study %s: shadow %s failed: %s",
                job.id,
                job.study_instance_uid,
                run.name,
                run.logged_error or run.error,
            )
            return
        decided = ", ".join(
            f"{f.label}={f.probability:.2f}{'+' if f.present else '-'}" for f in findings.study_findings
        )
        logger.info(
            "job %d study %s: shadow %s %s on %d images: %s (stored, not sent)",
            job.id,
            job.study_instance_uid,
            identity.name,
            identity.version,
            len(images),
            decided,
        )
