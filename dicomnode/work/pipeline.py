"""The inference worker: claim -> route -> decode -> model -> findings -> report -> outbox -> done.

It drains the queue: stable studies become jobs, up to ``max_batch_size`` queued jobs are claimed
at once so their images share model batches, and each job ends in one transaction that stores its
findings, queues its result objects for every destination and marks it done
(:mod:`dicomnode.work.results`). A watchdog (:mod:`dicomnode.work.watchdog`) fails the jobs in
flight and ends the process when the model hangs past ``job_timeout_seconds``, and renews leases.

:meth:`Worker.run` is a pipeline over chunks of jobs (half a claimed batch each): a decoder thread
routes chunk N+1 and decodes its images one by one, side by side in the decode pool's processes,
while this thread runs the model and the heat maps on chunk N (one core left free) and a reporter
thread finishes chunk N-1. An image that hangs its decoder costs only itself: the other images go
on in the other decode process, a job still waiting for such an image leaves its chunk and follows
once the decode pool has killed the hang, and studies keep being assembled meanwhile. The stages
themselves (route, decode, model) are :mod:`dicomnode.work.stages`; this module wires them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from dicomnode.config import Config
from dicomnode.fsio import durable_write
from dicomnode.node.process import instance_name
from dicomnode.node.services import Services, open_services
from dicomnode.queue.jobs import ClaimedJob
from dicomnode.sandbox import CpuPriority, DecodePool, apply_cpu_priority
from dicomnode.work.completeness import CompletenessTracker
from dicomnode.work.inference import ModelRegistry, model_cpu_threads
from dicomnode.work.results import JobWork, ResultWriter
from dicomnode.work.shadow import ShadowRunner
from dicomnode.work.stages import STALL_SECONDS, Prepared, conclude_decode, predict_chunk, prepare_chunk
from dicomnode.work.watchdog import Backoff, Watchdog

logger = logging.getLogger(__name__)

# Processes building result objects (SR, key images, KOS) beside the model. One: on 2 cores a second
# one kept the cores busier (1.75 instead of 1.5 cores) but every object cost a third more CPU time,
# and the studies/s did not rise (7.6-7.9 against 7.9-8.7 with pipeline.py, measured before the
# model's graph was optimised).
REPORT_PROCESSES = 1
# Decode processes: two, so that a JPEG 2000 image (about 0.3 s to decode a 2048x2048 frame at full
# resolution, which a "nearest" model input needs) decodes beside the next one, and so that an image
# hanging one decoder until its deadline leaves the other decoding.
DECODE_PROCESSES = 2


class StopEvent(Protocol):
    """What :meth:`Worker.run` needs of its stop signal (``threading.Event``, ``StopSignal``)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


class Worker:
    """Drains the job queue of one database with the models of one models folder."""

    def __init__(
        self,
        config: Config,
        services: Services,
        *,
        pool: DecodePool | None = None,
        registry: ModelRegistry | None = None,
        cpu_priority: CpuPriority | None = None,
    ) -> None:
        """``pool`` decodes (without one, in this process: for trusted files only);
        ``cpu_priority`` is applied to the report process this worker starts."""
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
        # Each result file fsynced as it is written, by this worker: left dirty until the chunk's
        # syncfs, the listener's syncfs (one per acknowledgement) would write them out for us and
        # make reception wait. The chunk's flush still covers the new folders.
        self.store.file_writer = durable_write
        self.watchdog = Watchdog(services, config.worker.lease_seconds)
        self.backoff = Backoff()
        # one thread per decode process, each decoding one image at a time
        self._images: ThreadPoolExecutor | None = None
        if pool is not None:
            self._images = ThreadPoolExecutor(pool.workers, thread_name_prefix="decode")
        # With a decode pool (a real worker), results are built in a process of their own as well.
        self.report_pool: DecodePool | None = None
        self._builders: ThreadPoolExecutor | None = None  # one thread per report process
        if pool is not None:
            self.report_pool = DecodePool(
                workers=REPORT_PROCESSES, preload="report", cpu_priority=cpu_priority
            )
            if REPORT_PROCESSES > 1:
                self._builders = ThreadPoolExecutor(REPORT_PROCESSES, thread_name_prefix="builder")
        builders = self._builders
        self.writer = ResultWriter(
            config,
            services,
            self.registry,
            self.store,
            pool=pool,
            report_pool=self.report_pool,
            mapper=(lambda f, works: list(builders.map(f, works))) if builders is not None else None,
        )
        self._pending: Future[None] | None = None  # the chunk the reporter is finishing
        self._late: list[tuple[JobWork, int]] = []  # jobs left behind by their chunk, watchdog tokens
        self.completeness = CompletenessTracker(config, services.queue)
        # shadow models (a route's ``shadow`` list): stored for comparison, never sent
        self.shadows = ShadowRunner(config, self.registry, self.writer.results, pool=pool)
        self._has_shadows = any(route.shadow for route in config.routes)

    def close(self) -> None:
        """Stop the watchdog and the threads and processes this worker started."""
        self.watchdog.close()
        self.shadows.close()
        self.store.close()
        for executor in (self._builders, self._images):
            if executor is not None:
                executor.shutdown(wait=True)
        if self.report_pool is not None:
            self.report_pool.close()

    # --- the loop ----------------------------------------------------------------------------------

    def run(self, stop: StopEvent, *, burst: bool = False) -> None:
        """Loop until ``stop`` is set; with ``burst``, return once nothing is queued, due or decoding.

        A pass that fails (the database on a full disk, say) is retried with exponential back-off
        (:class:`Backoff`); in ``burst`` mode the error is raised instead. The reporter's chunk is
        always finished before this returns.
        """
        reporter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reporter")
        decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoder")
        try:
            while not stop.is_set():
                try:
                    ran = self._pass(decoder, reporter)
                    self.backoff.succeeded()
                except Exception as exc:
                    if burst:
                        raise
                    stop.wait(self.backoff.failed(exc))
                    continue
                if ran == 0:
                    if burst and not self._late and self._pending is None:
                        return
                    stop.wait(self.config.worker.poll_interval_seconds)
        finally:
            try:
                self._finish_pending()
            finally:
                self._hand_back_late()
                reporter.shutdown(wait=True)
                decoder.shutdown(wait=True)

    def _pass(self, decoder: ThreadPoolExecutor, reporter: ThreadPoolExecutor) -> int:
        """Claim a batch (plus jobs whose late decodes ended) and run it through; return its size."""
        late = self._take_late()
        jobs = self._claim()
        if not jobs and not late:
            if self._pending is not None:  # results of the last batch first: a failed job may be due
                self._finish_pending()
                return 1
            return 0
        timeout = self.config.worker.job_timeout_seconds
        stages: list[tuple[int, list[ClaimedJob] | Prepared]] = []
        if late:
            stages.append((self.watchdog.watch([w.job for w in late], timeout), (late, [])))
        stages += [(self.watchdog.watch(chunk, timeout), chunk) for chunk in pipeline_chunks(jobs)]
        submitted = 0
        try:
            prepared = self._start(decoder, stages[0][1])
            for index, (token, _) in enumerate(stages):
                works, still_decoding = self._await(prepared)
                if index + 1 < len(stages):  # decode the next chunk while the model runs
                    prepared = self._start(decoder, stages[index + 1][1])
                self._leave_behind(token, still_decoding)
                predict_chunk([w for w in works if w.error is None], self.registry)
                self._finish_pending()
                self._pending = reporter.submit(self._report, works, token)
                submitted = index + 1
                if self._has_shadows:  # while the reporter commits; stored once it has
                    self.shadows.run(works, self._finish_pending)
                    for later, _ in stages[index + 1 :]:  # the shadows' time is not theirs
                        self.watchdog.rearm(later, timeout)
        except BaseException:
            for token, _ in stages[submitted:]:  # chunks never handed to the reporter
                self.watchdog.clear(token)
            raise
        return len(jobs) + len(late)

    def _start(self, decoder: ThreadPoolExecutor, stage: list[ClaimedJob] | Prepared) -> Future[Prepared]:
        if isinstance(stage, tuple):  # jobs already decoded
            done: Future[Prepared] = Future()
            done.set_result(stage)
            return done
        return decoder.submit(
            prepare_chunk, stage, self.config, self.services.queue, self.registry, self.pool, self._images
        )

    def _await(self, prepared: Future[Prepared]) -> Prepared:
        """Wait for a chunk's decodes, assembling newly stable studies meanwhile."""
        interval = max(0.5, self.config.worker.poll_interval_seconds)
        while True:
            try:
                return prepared.result(timeout=interval)
            except TimeoutError:
                self._assemble()

    def _finish_pending(self) -> None:
        finished, self._pending = self._pending, None
        if finished is not None:
            finished.result()

    def _assemble(self) -> None:
        """Turn stable studies into jobs and requeue jobs whose lease ran out."""
        queue = self.services.queue
        queue.requeue_expired()
        studies = self.config.studies
        if self.completeness.active:  # routes state requirements: readiness decides every study
            ready = [study_id for study_id, _ in self.completeness.ready_studies()]
            if ready:
                queue.assemble_stable_studies(
                    None,
                    self.config.worker.max_attempts,
                    stat_calling_ae_titles=studies.stat_calling_ae_titles,
                    ready_study_ids=ready,
                )
            return
        queue.assemble_stable_studies(
            studies.stable_after_seconds,
            self.config.worker.max_attempts,
            stat_calling_ae_titles=studies.stat_calling_ae_titles,
        )

    def _claim(self) -> list[ClaimedJob]:
        """Assemble stable studies, then claim up to ``max_batch_size`` queued jobs."""
        self._assemble()
        worker = self.config.worker
        return self.services.queue.claim_many(
            self.owner,
            worker.lease_seconds,
            worker.max_batch_size,
            priority_aging_seconds=self.config.studies.priority_aging_seconds,
        )

    # --- jobs left behind by a hanging decode -------------------------------------------------------

    def _leave_behind(self, token: int, works: list[JobWork]) -> None:
        """Watch jobs still decoding on their own deadline; they follow once their decodes end."""
        worker = self.config.worker
        for work in works:
            waiting = sum(not f.done() for f in work.decoding)
            bound = worker.job_timeout_seconds + worker.decode_timeout_seconds * waiting
            self._late.append((work, self.watchdog.split(token, [work.job], bound)))
            if not waiting:  # its last decode ended just after the stall check: it follows at once
                continue
            logger.warning(
                "job %d study %s: %d images still decoding after %.0f s without progress; "
                "the rest of its batch goes on",
                work.job.id,
                work.job.study_instance_uid,
                waiting,
                STALL_SECONDS,
            )

    def _take_late(self) -> list[JobWork]:
        """The jobs left behind whose decodes have all ended (decoded, failed or killed)."""
        ready = [(work, token) for work, token in self._late if work.decoded()]
        self._late = [(work, token) for work, token in self._late if not work.decoded()]
        for work, token in ready:
            self.watchdog.clear(token)
            conclude_decode(work)
        return [work for work, _ in ready]

    def _hand_back_late(self) -> None:
        """On stop: jobs still decoding go back to the queue (their attempt counts)."""
        late, self._late = self._late, []
        for work, token in late:
            self.watchdog.clear(token)
            try:
                self.services.queue.fail(work.job, "worker stopped while an image was decoding")
            except Exception as exc:  # the lease runs out and the job is requeued anyway
                logger.warning("job %d not handed back (%s)", work.job.id, type(exc).__name__)

    def _report(self, works: Sequence[JobWork], token: int) -> None:
        """The reporter's stage: results built, flushed and committed under a fresh deadline."""
        self.watchdog.rearm(token, self.config.worker.job_timeout_seconds)
        try:
            self.writer.report(works)
        finally:
            self.watchdog.clear(token)


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


def run_worker(config: Config, *, burst: bool = False) -> int:
    """The worker process: drain the queue until stopped (or until empty, with ``burst``).

    Its CPU priority is lowered first (``[worker] nice``, ``cpu_policy``), before any thread or
    child process starts, so that every one of them inherits it and reception keeps the CPU.
    """
    from dicomnode.node.process import StopSignal, die_with_parent

    priority = CpuPriority(config.worker.nice, config.worker.cpu_policy)
    applied = apply_cpu_priority(priority)
    logger.info("worker CPU priority: nice %d, policy %s", applied.nice, applied.policy)
    die_with_parent()
    services = open_services(config, upgrade=False)
    pool = DecodePool(workers=DECODE_PROCESSES, cpu_priority=priority)
    worker = Worker(config, services, pool=pool, cpu_priority=priority)
    try:
        worker.run(StopSignal(), burst=burst)
        return 0
    finally:
        worker.close()
        pool.close()
        services.close()
