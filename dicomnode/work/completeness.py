"""Study completeness: when a study's pending instances may become a job.

A timer alone is fragile (a single PA radiograph waits the whole quiet period; a slow modality's
study is cut in two), so a route may state what a complete study holds (``required_series``: an
image matching a rule on ViewPosition, SeriesDescription, ...; ``expected_instances``: a count, or
``"header"`` for Number of Study Related Instances (0020,1208) when the modality sends it) and a
ceiling, ``max_wait_seconds``. The worker asks :func:`study_readiness` for every study with
pending instances; the first condition that holds starts it:

1. every requirement of every route the study's images match is met: **at once**, no quiet period;
2. ``max_wait_seconds`` (the smallest among those routes) since the first pending instance;
3. ``[studies] stable_after_seconds`` without a new instance (as before).

Instances arriving after the job was made start a new job, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydicom.dataset import Dataset

from dicomnode.config import Config, RouteConfig
from dicomnode.imaging.frames import read_header
from dicomnode.queue.jobs import JobQueue, PendingInstance
from dicomnode.work.routing import requirement_miss, route_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """Whether a study may start now, and the condition that decided (shown by ``rules test``)."""

    ready: bool
    condition: str


def _expected(route: RouteConfig, headers: Sequence[Dataset]) -> int | None:
    if route.expected_instances != "header":
        return route.expected_instances
    counts = []
    for header in headers:
        try:
            value = header.get("NumberOfStudyRelatedInstances")
            if value not in (None, ""):
                counts.append(int(value))
        except (TypeError, ValueError):  # a malformed element counts as absent
            continue
    return max(counts) if counts else None


def requirements_met(route: RouteConfig, headers: Sequence[Dataset], instances: int) -> tuple[bool, str]:
    """Whether the study meets ``route``'s requirements, and what was found (no patient data)."""
    found: list[str] = []
    met = True
    if route.required_series is not None:
        misses = [requirement_miss(route.required_series, h) for h in headers]
        if any(miss is None for miss in misses):
            found.append("required_series met")
        else:
            met = False
            found.append(f"required_series not met ({misses[0] if misses else 'no image'})")
    if route.expected_instances is not None:
        expected = _expected(route, headers)
        if expected is None:
            met = False
            found.append("expected_instances unknown (no Number of Study Related Instances)")
        elif instances >= expected:
            found.append(f"expected_instances met ({instances} of {expected})")
        else:
            met = False
            found.append(f"expected_instances not met ({instances} of {expected})")
    return met, "; ".join(found)


def study_readiness(
    routes: Sequence[RouteConfig],
    headers: Sequence[tuple[Dataset, str | None]],
    *,
    instances: int,
    quiet_seconds: float,
    waited_seconds: float,
    stable_after_seconds: float,
) -> Readiness:
    """Decide whether a study may start now (see the module text for the order of conditions).

    ``headers`` are the pending instances' headers with their calling AE titles; ``instances`` is
    how many instances the study holds in all (for ``expected_instances``).
    """
    by_name = {route.name: route for route in routes}
    matched: list[RouteConfig] = []
    for header, calling_ae in headers:
        name = route_image(routes, header, calling_ae).route
        if name is not None and by_name[name] not in matched:
            matched.append(by_name[name])
    images = [header for header, _ in headers]
    with_requirements = [route for route in matched if route.has_requirements]
    explained = []
    if with_requirements:
        results = [(route, *requirements_met(route, images, instances)) for route in with_requirements]
        explained = [f"route {route.name!r}: {text}" for route, _, text in results]
        if all(met for _, met, _ in results):
            return Readiness(True, "requirements met at once: " + "; ".join(explained))
    ceilings = [route.max_wait_seconds for route in matched if route.max_wait_seconds is not None]
    if ceilings and waited_seconds >= min(ceilings):
        return Readiness(True, f"max_wait_seconds {min(ceilings):g} reached ({waited_seconds:.1f} s waited)")
    if quiet_seconds >= stable_after_seconds:
        return Readiness(
            True, f"stable: no new instance for {stable_after_seconds:g} s (stable_after_seconds)"
        )
    waiting = "; ".join(explained) or "no route with requirements"
    return Readiness(False, f"waiting for stable_after_seconds {stable_after_seconds:g}: {waiting}")


class CompletenessTracker:
    """The worker's view of pending studies: reads each pending instance's header once (cached by
    SOP Instance UID) and returns the studies :func:`study_readiness` lets start."""

    def __init__(self, config: Config, queue: JobQueue) -> None:
        self.config = config
        self.queue = queue
        self._headers: dict[str, Dataset] = {}
        self._waiting: dict[int, str] = {}  # study id -> the last condition logged (no repeats)

    @property
    def active(self) -> bool:
        """Whether any route states requirements or a ceiling (else the quiet period alone decides)."""
        return any(r.has_requirements or r.max_wait_seconds is not None for r in self.config.routes)

    def _header(self, instance: PendingInstance) -> Dataset:
        header = self._headers.get(instance.sop_instance_uid)
        if header is None:
            try:
                header = read_header(self.config.storage.path / instance.path)
            except Exception:  # an unreadable header: no route, so the quiet period decides
                header = Dataset()
            self._headers[instance.sop_instance_uid] = header
        return header

    def ready_studies(self, now: datetime | None = None) -> list[tuple[int, Readiness]]:
        """(study id, readiness) of every pending study that may start now."""
        now = now or datetime.now(UTC)
        pending = self.queue.pending_studies()
        keep = {i.sop_instance_uid for study in pending for i in study.instances}
        self._headers = {uid: h for uid, h in self._headers.items() if uid in keep}
        ready = []
        for study in pending:
            readiness = study_readiness(
                self.config.routes,
                [(self._header(i), i.calling_ae_title) for i in study.instances],
                instances=study.total_instances,
                quiet_seconds=(now - study.last_received_at).total_seconds(),
                waited_seconds=(now - study.first_received_at).total_seconds(),
                stable_after_seconds=self.config.studies.stable_after_seconds,
            )
            if readiness.ready:
                ready.append((study.study_id, readiness))
                self._waiting.pop(study.study_id, None)
                logger.info("study %s ready: %s", study.study_instance_uid, readiness.condition)
            elif self._waiting.get(study.study_id) != readiness.condition:
                self._waiting[study.study_id] = readiness.condition
                logger.debug("study %s %s", study.study_instance_uid, readiness.condition)
        return ready


def explain_arrival(config: Config, headers: Sequence[tuple[Dataset, str | None]]) -> Readiness:
    """What :func:`study_readiness` decides the moment these instances (one study) have arrived:
    ``dicomnode rules test`` shows it, so a site sees whether a study starts at once or waits."""
    return study_readiness(
        config.routes,
        headers,
        instances=len(headers),
        quiet_seconds=0.0,
        waited_seconds=0.0,
        stable_after_seconds=config.studies.stable_after_seconds,
    )
