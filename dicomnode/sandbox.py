"""Untrusted work in spawned child processes under a deadline: pixel decoding and report building.

Pixel data arrives from untrusted peers, and some decoders loop forever or crash on crafted input
(pydicom 3.0.2's ``get_j2k_parameters`` spins on a JPEG 2000 box of length zero). :class:`DecodePool`
keeps spawned workers alive between calls, kills one that overruns its deadline and starts a
replacement, caps each child's address space and, when asked, lowers its CPU priority
(:func:`apply_cpu_priority`) so that it never competes with reception. The operations it runs live in
:mod:`dicomnode.imaging` and :mod:`dicomnode.report.bundle`, imported by the children.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from dicomnode.errors import DecodeTimeoutError, DicomNodeError, InvalidDatasetError
from dicomnode.imaging.preprocess import (
    decode_display_image,
    decode_model_input,
    decode_model_input_and_display,
)
from dicomnode.imaging.spec import PreprocessSpec, validate_spec

logger = logging.getLogger(__name__)

_PRELOADS = frozenset({"report"})  # what a pool may prepare its processes for before their first call


class CpuPriority(NamedTuple):
    """How politely a process uses the CPU: its niceness and its scheduling policy."""

    nice: int = 10  # 0 (normal) to 19 (only when nothing else wants the CPU)
    # "batch": SCHED_BATCH (no wake-up preemption); "idle": SCHED_IDLE (only CPU nobody else
    # wants); "normal": SCHED_OTHER
    policy: str = "batch"


_POLICIES = {
    "batch": getattr(os, "SCHED_BATCH", 0),
    "idle": getattr(os, "SCHED_IDLE", 0),
    "normal": getattr(os, "SCHED_OTHER", 0),
}


def apply_cpu_priority(priority: CpuPriority) -> CpuPriority:
    """Lower this process's CPU priority to ``priority``; return what it has afterwards.

    Niceness only ever rises (an unprivileged process cannot lower it again), so applying twice, or
    in a child that inherited it, changes nothing. Applied to the calling thread, which Linux
    hands on to threads and processes started after it: call it before starting any.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if priority.nice > current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, priority.nice)
        except OSError as exc:
            logger.warning("could not set niceness %d (%s)", priority.nice, exc.strerror)
    policy = _POLICIES[priority.policy]
    if hasattr(os, "sched_setscheduler") and os.sched_getscheduler(0) != policy:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError as exc:
            logger.warning("could not set CPU policy %s (%s)", priority.policy, exc.strerror)
    return current_cpu_priority()


def current_cpu_priority(pid: int = 0) -> CpuPriority:
    """The niceness and scheduling policy of process ``pid`` (0: this one)."""
    nice = os.getpriority(os.PRIO_PROCESS, pid)
    policy = os.sched_getscheduler(pid) if hasattr(os, "sched_getscheduler") else os.SCHED_OTHER
    names = {number: name for name, number in _POLICIES.items()}
    return CpuPriority(nice, names.get(policy, "normal"))


def _worker_main(
    connection: Connection,
    memory_limit_bytes: int | None,
    preload: str | None = None,
    cpu_priority: CpuPriority | None = None,
) -> None:
    """Child process loop: receive (operation, args), answer ("ok", array) or ("error", message)."""
    if cpu_priority is not None:
        apply_cpu_priority(cpu_priority)
    if memory_limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    if preload == "report":
        try:
            from dicomnode.report.bundle import warm_up

            warm_up()
        except Exception:  # a failed warm-up only costs the first call its time
            logger.debug("report warm-up failed", exc_info=True)
    connection.send(("ready", None))
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        operation, args = request
        try:
            if operation == "model_input":
                result: Any = decode_model_input(*args)
            elif operation == "display_image":
                result = decode_display_image(*args)
            elif operation == "model_input_and_display":
                result = decode_model_input_and_display(*args)
            elif operation == "ping":
                result = None
            elif operation == "report":
                from dicomnode.report.bundle import build_result_objects

                result = build_result_objects(*args)
            else:
                raise ValueError(f"unknown operation {operation!r}")
            reply: tuple[str, Any] = ("ok", result)
        except DicomNodeError as exc:
            reply = ("error", str(exc))
        except Exception as exc:
            if operation == "report":  # the worker records it with the job (never in a log line)
                reply = ("error", f"{type(exc).__name__}: {exc}")
            else:
                reply = ("error", f"decoder failed ({type(exc).__name__})")
        try:
            connection.send(reply)
        except (OSError, ValueError):
            return


class _Worker:
    """One child process and the parent's end of its pipe."""

    def __init__(
        self,
        context: Any,
        memory_limit_bytes: int | None,
        preload: str | None = None,
        cpu_priority: CpuPriority | None = None,
    ) -> None:
        self.connection, child_end = multiprocessing.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main,
            args=(child_end, memory_limit_bytes, preload, cpu_priority),
            name="dicomnode-report" if preload == "report" else "dicomnode-decode",
            daemon=True,
        )
        self.process.start()
        child_end.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        if not self.connection.poll(timeout_s):
            raise TimeoutError("decode worker did not start")
        message = self.connection.recv()
        if message != ("ready", None):
            raise RuntimeError("decode worker sent an unexpected greeting")
        self.ready = True

    def stop(self, kill: bool) -> None:
        if not kill:
            try:
                self.connection.send(None)
            except (OSError, ValueError):
                kill = True
        if kill and self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self.connection.close()


class DecodePool:
    """Long-lived child processes that decode DICOM files under a per-image deadline.

    Paths go in, arrays come back. A worker that overruns its deadline is killed and replaced
    (raising :class:`DecodeTimeoutError`); one that dies (a decoder crash) is replaced too
    (raising :class:`InvalidDatasetError`). Children start with 'spawn' so that no torch threads or
    locks are inherited. Thread-safe: each call borrows one idle worker.
    """

    def __init__(
        self,
        workers: int = 1,
        *,
        start_method: str = "spawn",
        startup_timeout_s: float = 60.0,
        memory_limit_bytes: int | None = 4 << 30,
        preload: str | None = None,
        cpu_priority: CpuPriority | None = None,
    ) -> None:
        """``preload="report"`` makes the processes import and warm up the report builders before
        their first call (for a pool that builds reports, see :meth:`build_report`);
        ``cpu_priority`` is applied in each process (replacements too) before anything else."""
        if preload is not None and preload not in _PRELOADS:
            raise ValueError(f"unknown preload {preload!r}")
        self._preload = preload
        self._cpu_priority = cpu_priority
        if workers < 1:
            raise ValueError("DecodePool needs at least one worker")
        self._context = multiprocessing.get_context(start_method)
        self.workers = workers
        self._startup_timeout_s = startup_timeout_s
        self._memory_limit_bytes = memory_limit_bytes
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._add_worker()

    def _add_worker(self) -> _Worker:
        worker = _Worker(self._context, self._memory_limit_bytes, self._preload, self._cpu_priority)
        with self._lock:
            self._all.append(worker)
        self._idle.put(worker)
        return worker

    def pids(self) -> list[int]:
        """The process ids of the pool's children (for checks and diagnostics)."""
        with self._lock:
            return [w.process.pid for w in self._all if w.process.pid is not None]

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        worker.stop(kill=True)
        if not self._closed:
            self._add_worker()

    def _call(self, operation: str, args: tuple[Any, ...], timeout_s: float, name: str) -> Any:
        if self._closed:
            raise RuntimeError("DecodePool is closed")
        worker = self._idle.get()
        try:
            worker.wait_ready(self._startup_timeout_s)
            worker.connection.send((operation, args))
            started = time.monotonic()
            if not worker.connection.poll(timeout_s):
                logger.warning("decoding %s exceeded %.1f s; replacing the decode worker", name, timeout_s)
                self._retire(worker)
                raise DecodeTimeoutError(f"{name}: decoding did not finish within {timeout_s:g} s")
            status, payload = worker.connection.recv()
            logger.debug("decoded %s in %.1f ms", name, (time.monotonic() - started) * 1000)
        except (EOFError, OSError, TimeoutError, RuntimeError) as exc:
            exit_code = worker.process.exitcode
            self._retire(worker)
            raise InvalidDatasetError(
                f"{name}: decode worker failed ({type(exc).__name__}, exit code {exit_code})"
            ) from exc
        except DecodeTimeoutError:
            raise
        except BaseException:
            self._retire(worker)
            raise
        self._idle.put(worker)
        if status != "ok":
            raise InvalidDatasetError(str(payload))
        return payload

    def read_model_input(
        self, path: str | Path, spec: PreprocessSpec, *, timeout_s: float = 30.0
    ) -> np.ndarray:
        """See :func:`read_model_input`."""
        validate_spec(spec)
        return cast(np.ndarray, self._call("model_input", (str(path), spec), timeout_s, Path(path).name))

    def read_model_input_and_display(
        self, path: str | Path, spec: PreprocessSpec, *, max_size: int | None = None, timeout_s: float = 30.0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Both :meth:`read_model_input` and :meth:`read_display_image` from one decode of the file
        (the display image None when only it failed)."""
        validate_spec(spec)
        result = self._call(
            "model_input_and_display", (str(path), spec, max_size), timeout_s, Path(path).name
        )
        return cast(tuple[np.ndarray, "np.ndarray | None"], result)

    def read_display_image(
        self, path: str | Path, *, max_size: int | None = None, timeout_s: float = 30.0
    ) -> np.ndarray:
        """See :func:`read_display_image`."""
        return cast(
            np.ndarray, self._call("display_image", (str(path), max_size), timeout_s, Path(path).name)
        )

    def ping(self, timeout_s: float = 60.0) -> None:
        """Wait until one worker process has started (and finished its preload) and answers."""
        self._call("ping", (), timeout_s, "ping")

    def build_report(self, args: tuple[Any, ...], *, timeout_s: float = 300.0) -> Any:
        """:func:`dicomnode.report.bundle.build_result_objects` (``*args``) in a worker process.

        A pool used for this one is the worker's report process: the objects are built beside the
        model (own interpreter, own lock) and come back encoded. Failures raise
        :class:`InvalidDatasetError` with the error's type and message.
        """
        return self._call("report", args, timeout_s, "report")

    def close(self) -> None:
        """Stop every worker (idle ones politely, busy ones are killed by their caller's retire)."""
        self._closed = True
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.stop(kill=False)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_model_input(
    path: str | Path, spec: PreprocessSpec, *, timeout_s: float = 30.0, pool: DecodePool | None = None
) -> np.ndarray:
    """The model input for ``path``: float32 (frames, channels, rows, cols) following ``spec``.

    Decodes in a child process under ``timeout_s`` (DecodeTimeoutError when exceeded); pass a
    long-lived ``pool`` to avoid starting a process per call. Malformed data raises
    InvalidDatasetError. Use :func:`decode_model_input` to decode in this process instead.
    """
    if pool is not None:
        return pool.read_model_input(path, spec, timeout_s=timeout_s)
    with DecodePool(1) as own_pool:
        return own_pool.read_model_input(path, spec, timeout_s=timeout_s)


def read_display_image(
    path: str | Path, *, max_size: int | None = None, timeout_s: float = 30.0, pool: DecodePool | None = None
) -> np.ndarray:
    """The first frame as a viewer shows it (Modality LUT, VOI, MONOCHROME1 inverted, colour as RGB).

    uint8 (rows, cols) grey or (rows, cols, 3) RGB, shrunk to ``max_size`` on its longer side when
    given (aspect kept). Same time limit and errors as :func:`read_model_input`.
    """
    if pool is not None:
        return pool.read_display_image(path, max_size=max_size, timeout_s=timeout_s)
    with DecodePool(1) as own_pool:
        return own_pool.read_display_image(path, max_size=max_size, timeout_s=timeout_s)
