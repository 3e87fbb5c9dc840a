"""Prometheus metrics shared by the listener, workers and sender (prometheus-client multiprocess mode).

``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at ``<storage.path>/metrics`` before any child starts,
so every process writes its counters and histograms to files there and the HTTP process adds them up
for ``/metrics``. prometheus_client picks its storage when it is first imported, so this module
imports it only on first use (after :func:`enable_multiprocess`). Labels hold AE titles, model names,
destinations and status names only, never patient data. Gauges that describe the database (jobs by
state, deliveries, oldest queued job) are computed by the HTTP process at scrape time instead.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_FOLDER = "metrics"
# job and model latencies: from a 50 ms model pass to a 10 minute job timeout
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def metrics_dir(storage_path: Path) -> Path:
    """Where the processes of one node write their metric files."""
    return storage_path / METRICS_FOLDER


def enable_multiprocess(directory: Path, *, clean: bool) -> None:
    """Count into ``directory`` in this process and the children it starts; ``clean`` empties it first.

    Only the supervisor cleans (at start, before any child exists): counters restart with the node.
    """
    if "prometheus_client" in sys.modules and os.environ.get(MULTIPROC_ENV) != str(directory):
        logger.warning("prometheus_client was imported before the metrics folder was set; not counting")
        return
    if clean and directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)


def process_exited(pid: int) -> None:
    """Drop a dead child's live gauges (counters and histograms keep counting its share)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


@functools.cache
def _metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Histogram

    return {
        "instances": Counter(
            "dicomnode_instances_received",
            "C-STORE requests answered, by calling AE title and DIMSE status",
            ["calling_ae_title", "status"],
        ),
        "associations": Counter(
            "dicomnode_associations",
            "Associations by calling AE title and how they ended (released, aborted, rejected)",
            ["calling_ae_title", "outcome"],
        ),
        "job_duration": Histogram(
            "dicomnode_job_duration_seconds",
            "Worker time per job (route, decode, model, heat map, report), by model",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
        ),
        "inference": Histogram(
            "dicomnode_model_inference_seconds",
            "Model forward passes (one batch), by model",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
        ),
        "shadow_runs": Counter(
            "dicomnode_shadow_runs",
            "Shadow model runs on a job (findings stored, nothing sent), by model and outcome (ok, error)",
            ["model", "version", "outcome"],
        ),
        "delivery_attempts": Counter(
            "dicomnode_delivery_attempts",
            "C-STORE attempts to a destination, by outcome (a DIMSE status name, or no-status-<verdict>)",
            ["destination", "outcome"],
        ),
        "commitments": Counter(
            "dicomnode_storage_commitments",
            "Storage Commitment transactions by result (committed, failed, refused, timed-out, ...)",
            ["destination", "result"],
        ),
    }


def _safely(name: str, labels: tuple[str, ...], value: float | None = None) -> None:
    """Count without ever failing the caller: metrics must not cost a C-STORE or a job."""
    try:
        metric = _metrics()[name].labels(*labels)
        if value is None:
            metric.inc()
        else:
            metric.observe(value)
    except Exception:  # a full disk under the metrics folder, say
        logger.debug("metric %s not recorded", name, exc_info=True)


def instance_received(calling_ae_title: str, status: str) -> None:
    """One C-STORE answered with ``status`` (a :class:`~dicomnode.status.Status` name)."""
    _safely("instances", (calling_ae_title, status))


def association_ended(calling_ae_title: str, outcome: str) -> None:
    """One association released, aborted or rejected."""
    _safely("associations", (calling_ae_title, outcome))


def job_finished(model: str, version: str, seconds: float) -> None:
    """A job's results committed after ``seconds`` of work on it."""
    _safely("job_duration", (model, version), seconds)


def model_inference(model: str, version: str, seconds: float) -> None:
    """One model pass over a batch took ``seconds``."""
    _safely("inference", (model, version), seconds)


def shadow_run(model: str, version: str, outcome: str) -> None:
    """One shadow model's run on one job ended (``ok`` or ``error``)."""
    _safely("shadow_runs", (model, version, outcome))


def delivery_attempt(destination: str, status: int | None, verdict: str) -> None:
    """One C-STORE attempt to ``destination``: labelled by the DIMSE status name, else the verdict."""
    from dicomnode.status import Status

    try:
        outcome = f"no-status-{verdict}" if status is None else Status(status).name
    except ValueError:  # a status the standard does not name
        outcome = f"0x{status:04X}"
    _safely("delivery_attempts", (destination, outcome))


def commitment_result(destination: str, result: str) -> None:
    """One Storage Commitment transaction to ``destination`` ended with ``result``."""
    _safely("commitments", (destination, result))
