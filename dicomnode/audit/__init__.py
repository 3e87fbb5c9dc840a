"""The audit trail: PS3.15 A.5 messages appended to a file, optionally sent to a syslog collector.

The file (``[audit] path``, default ``<storage.path>/audit/audit.xml.log``) holds one message per
line and is only ever appended to (``O_APPEND``, one ``write`` per message, fsynced), by every
process of the node. It carries Study Instance UIDs and the Patient ID the standard requires, so it
is created ``0600`` like the spool; ``dicomnode audit`` prints UIDs only. Audit failures are logged
and never fail a C-STORE or a delivery.

Each process that raises events calls :func:`configure` once (``serve`` for the listener and
retention, the sender); the hooks below are no-ops in a process that has not.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dicomnode.audit import messages as m
from dicomnode.audit.syslog import SyslogSender
from dicomnode.config import Config

logger = logging.getLogger(__name__)

AUDIT_FILE = Path("audit") / "audit.xml.log"


def audit_path(config: Config) -> Path:
    return config.audit.path or config.storage.path / AUDIT_FILE


class AuditTrail:
    """Appends messages to the file (and hands them to syslog when configured)."""

    def __init__(self, path: Path, source_id: str, ae_title: str, syslog: SyslogSender | None = None) -> None:
        self.path = path
        self.source_id = source_id
        self.ae_title = ae_title
        self.host = socket.gethostname()
        self.syslog = syslog
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, message: ET.Element) -> None:
        line = m.serialise(message) + b"\n"
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            logger.error("audit message not written to %s: %s", self.path, exc.strerror or exc)
        if self.syslog is not None:
            self.syslog.send(line.rstrip(b"\n"))

    def node(self, *, requestor: bool, role: m.Code) -> m.Participant:
        return m.Participant(self.ae_title, requestor, role, self.host, str(os.getpid()))

    def close(self) -> None:
        if self.syslog is not None:
            self.syslog.close()


_trail: AuditTrail | None = None


def configure(config: Config) -> AuditTrail | None:
    """Start auditing in this process (a no-op when ``[audit] enabled = false``)."""
    global _trail
    if not config.audit.enabled:
        return None
    syslog = None
    if config.audit.syslog_host:
        syslog = SyslogSender(
            config.audit.syslog_host,
            config.audit.syslog_port,
            ca_certificates=config.audit.syslog_ca_certificates,
            app_name="dicomnode",
        )
    source = f"{config.node.ae_title}@{config.node.instance_name or socket.gethostname()}"
    _trail = AuditTrail(audit_path(config), source, config.node.ae_title, syslog)
    return _trail


def shutdown() -> None:
    global _trail
    if _trail is not None:
        _trail.close()
    _trail = None


def _emit(build: Any, *args: Any, **kwargs: Any) -> None:
    """Build and write one message; never raise into the caller."""
    trail = _trail
    if trail is None:
        return
    try:
        trail.emit(build(trail, *args, **kwargs))
    except Exception:
        logger.exception("audit message not recorded")


# --- events ------------------------------------------------------------------------------------


def _application(trail: AuditTrail, started: bool) -> ET.Element:
    return m.audit_message(
        m.APPLICATION_ACTIVITY,
        "E",
        m.SUCCESS,
        [trail.node(requestor=True, role=m.ROLE_APPLICATION)],
        trail.source_id,
        event_type=m.APPLICATION_START if started else m.APPLICATION_STOP,
    )


def application_started() -> None:
    _emit(_application, True)


def application_stopped() -> None:
    _emit(_application, False)


def _rejected(trail: AuditTrail, association: Any, why: str) -> ET.Element:
    peer = m.Participant(str(association.calling_ae_title), True, m.ROLE_SOURCE, str(association.address))
    message = m.audit_message(
        m.SECURITY_ALERT,
        "E",
        m.MINOR_FAILURE,
        [peer, trail.node(requestor=False, role=m.ROLE_DESTINATION)],
        trail.source_id,
        event_type=m.NODE_AUTHENTICATION,
        outcome_description=f"association refused: {why} (called AE {association.called_ae_title!r})",
    )
    return message


def association_rejected(association: Any, why: str) -> None:
    """A refused association: a Security Alert naming the peer's AE title and address."""
    _emit(_rejected, association, why)


@dataclass
class _Received:
    patient_id: str | None
    sop_classes: Counter[str] = field(default_factory=Counter)


_open: dict[int, dict[str, _Received]] = {}  # id(association) -> study uid -> what came
_open_lock = threading.Lock()


def instance_stored(association: Any, record: Any) -> None:
    """Remember a stored instance for the association's Instances Transferred messages."""
    if _trail is None:
        return
    with _open_lock:
        studies = _open.setdefault(id(association), {})
        received = studies.setdefault(record.study_instance_uid, _Received(record.patient_id))
        received.sop_classes[record.sop_class_uid] += 1


def _transferred_in(
    trail: AuditTrail, association: Any, how: str, uid: str, received: _Received
) -> ET.Element:
    peer = m.Participant(str(association.calling_ae_title), True, m.ROLE_SOURCE, str(association.address))
    message = m.audit_message(
        m.INSTANCES_TRANSFERRED,
        "C",
        m.SUCCESS if how == "released" else m.MINOR_FAILURE,
        [peer, trail.node(requestor=False, role=m.ROLE_DESTINATION)],
        trail.source_id,
        outcome_description="" if how == "released" else f"association {how}",
    )
    m.add_study(message, uid, received.sop_classes)
    m.add_patient(message, received.patient_id)
    return message


def association_ended(association: Any, how: str) -> None:
    """One DICOM Instances Transferred (in) per study the association brought."""
    with _open_lock:
        studies = _open.pop(id(association), {})
    for uid, received in studies.items():
        _emit(_transferred_in, association, how, uid, received)


def _transferred_out(
    trail: AuditTrail,
    destination: Any,
    study_instance_uid: str,
    sop_class_uid: str,
    delivered: bool,
    reason: str,
) -> ET.Element:
    user_id = destination.ae_title or destination.url  # a DICOMweb destination has a URL, no AE title
    peer = m.Participant(str(user_id), False, m.ROLE_DESTINATION, str(destination.host))
    message = m.audit_message(
        m.INSTANCES_TRANSFERRED,
        "R",
        m.SUCCESS if delivered else m.SERIOUS_FAILURE,
        [trail.node(requestor=True, role=m.ROLE_SOURCE), peer],
        trail.source_id,
        outcome_description="" if delivered else reason,
    )
    m.add_study(message, study_instance_uid, {sop_class_uid: 1})
    m.add_patient(message, None)  # the outbox holds no Patient ID; the study UID identifies it
    return message


def object_delivered(
    destination: Any, study_instance_uid: str, sop_class_uid: str, *, delivered: bool, reason: str = ""
) -> None:
    """A result object sent to ``destination`` (delivered), or given up on (a dead letter)."""
    _emit(_transferred_out, destination, study_instance_uid, sop_class_uid, delivered, reason)


def _deleted(
    trail: AuditTrail, study_instance_uid: str, patient_id: str | None, instances: int, why: str
) -> ET.Element:
    message = m.audit_message(
        m.STUDY_DELETED,
        "D",
        m.SUCCESS,
        [trail.node(requestor=True, role=m.ROLE_APPLICATION)],
        trail.source_id,
        outcome_description=f"retention: {why}; {instances} instances",
    )
    m.add_study(message, study_instance_uid, {})
    m.add_patient(message, patient_id)
    return message


def study_deleted(study_instance_uid: str, patient_id: str | None, instances: int, why: str) -> None:
    _emit(_deleted, study_instance_uid, patient_id, instances, why)


# --- reading -----------------------------------------------------------------------------------


def read_messages(path: Path, since: datetime | None = None) -> Iterator[ET.Element]:
    """The messages in the file, oldest first (optionally from ``since`` on); bad lines skipped."""
    if not path.exists():
        return
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                message = ET.fromstring(line)
            except ET.ParseError:
                logger.warning("audit file %s line %d is not a message; skipped", path, number)
                continue
            if since is not None:
                event = message.find("EventIdentification")
                stamp = event.get("EventDateTime", "") if event is not None else ""
                try:
                    if datetime.fromisoformat(stamp.replace("Z", "+00:00")) < since:
                        continue
                except ValueError:
                    continue
            yield message
