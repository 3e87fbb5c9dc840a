"""``/metrics``: the counters every process wrote (multiprocess mode) plus gauges read from the database."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Config
from dicomnode.http import queries
from dicomnode.metrics import MULTIPROC_ENV


class DatabaseCollector:
    """Gauges computed at scrape time: jobs by state, deliveries, oldest queued job, spool free space."""

    def __init__(self, config: Config, sessions: sessionmaker[Session]) -> None:
        self.config = config
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauges = queries.job_gauges(self.sessions)
        jobs = GaugeMetricFamily("dicomnode_jobs", "Inference jobs by state", labels=["state"])
        for state, count in gauges["jobs"].items():
            jobs.add_metric([state], count)
        yield jobs
        deliveries = GaugeMetricFamily(
            "dicomnode_deliveries",
            "Result objects by destination and delivery state",
            labels=["destination", "state"],
        )
        for destination, state, count in gauges["deliveries"]:
            deliveries.add_metric([destination, state], count)
        yield deliveries
        yield GaugeMetricFamily(
            "dicomnode_oldest_queued_job_age_seconds",
            "Age of the oldest job waiting for a worker (0 when none waits)",
            value=gauges["oldest_queued_job_age_seconds"],
        )
        root = self.config.storage.path
        free = shutil.disk_usage(root if root.exists() else os.getcwd()).free
        yield GaugeMetricFamily(
            "dicomnode_spool_free_bytes", "Free bytes on the spool's file system", value=free
        )


def _registry(config: Config | None = None, sessions: sessionmaker[Session] | None = None) -> Any:
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:  # one process (tests, a bare ``dicomnode http``): this process's own counters
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    if config is not None and sessions is not None:
        registry.register(DatabaseCollector(config, sessions))
    return registry


class _Forward:
    """Hands on another registry's metrics (the default one) without registering twice."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()


def render_metrics(config: Config, sessions: sessionmaker[Session]) -> tuple[bytes, str]:
    """The Prometheus text exposition of everything."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(_registry(config, sessions)), CONTENT_TYPE_LATEST


def sample_totals(sample_name: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Sum of one counter's samples by ``labels`` (for the dashboard's association table)."""
    totals: dict[tuple[str, ...], float] = {}
    for family in _registry().collect():
        for sample in family.samples:
            if sample.name == sample_name:
                key = tuple(str(sample.labels.get(label, "")) for label in labels)
                totals[key] = totals.get(key, 0.0) + float(sample.value)
    return totals
