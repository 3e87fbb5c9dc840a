"""Deterministic UIDs for what dicomnode writes.

A result object's UIDs derive from what produced it (study, input instances, model, object kind), so
rebuilding after a crash yields the same UIDs and the PACS sees a retransmission, not a duplicate;
new inputs or a new model version yield new UIDs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from dicomnode.findings import ModelIdentity, StudyFindings

# Fixed namespace for every dicomnode UID; changing it changes every derived UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicomnode:uid")
_SEPARATOR = "\x1f"  # ASCII unit separator: cannot occur in a UID, so ("a", "b.c") != ("a.b", "c")


def derive_uid(*parts: str) -> str:
    """A ``2.25.<decimal>`` UID from the UUID version 5 of ``parts`` (at most 44 characters).

    Unlike ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``, which ignores the entropy
    sources and returns a random UID, the same parts always give the same UID.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    return f"2.25.{uuid.uuid5(_NAMESPACE, _SEPARATOR.join(parts)).int}"


def device_observer_uid(model: ModelIdentity) -> str:
    """The model's Device Observer UID: its own if set, else derived from name and version."""
    return model.device_observer_uid or derive_uid("device-observer", model.name, model.version)


def job_key(findings: StudyFindings, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The parts that identify one job's output: study, sorted input instances, model, extras."""
    sop_uids = sorted({image.sop_instance_uid for image in findings.images})
    return (
        findings.study_instance_uid,
        *sop_uids,
        findings.model.name,
        findings.model.version,
        *extra,
    )
