"""PS3.15 A.5 audit messages (the DICOM schema of RFC 3881 lineage), built with ElementTree.

Each builder returns one ``<AuditMessage>`` element. Coded values use the schema's attributes
(``csd-code``, ``codeSystemName``, ``originalText``). The events this node raises:

- Application Activity (110100), Application Start/Stop: ``serve`` starting and stopping.
- Security Alert (110113), Node Authentication: an association refused (calling AE not allowed,
  wrong called AE, limits).
- DICOM Instances Transferred (110104): a study received from a modality (action C, one message
  per study and association), a result object delivered to a destination (action R).
- DICOM Study Deleted (110105): retention deleting a study's instances.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

# EventOutcomeIndicator
SUCCESS = "0"
MINOR_FAILURE = "4"
SERIOUS_FAILURE = "8"


@dataclass(frozen=True)
class Code:
    code: str
    system: str
    meaning: str


APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
APPLICATION_SERVER = Code("4", "DCM", "Application Server Process")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: an application entity (AE title) at a network address."""

    user_id: str  # the AE title
    requestor: bool
    role: Code
    address: str = ""  # IP address or host name
    alternative_user_id: str = ""  # e.g. the process id


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning}
    )


def _timestamp(when: datetime | None) -> str:
    return (
        (when or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def audit_message(
    event: Code,
    action: str,
    outcome: str,
    participants: Iterable[Participant],
    source_id: str,
    *,
    event_type: Code | None = None,
    outcome_description: str = "",
    when: datetime | None = None,
) -> ET.Element:
    """The common frame: EventIdentification, ActiveParticipants, AuditSourceIdentification."""
    message = ET.Element("AuditMessage")
    event_element = ET.SubElement(
        message,
        "EventIdentification",
        {"EventActionCode": action, "EventDateTime": _timestamp(when), "EventOutcomeIndicator": outcome},
    )
    _coded(event_element, "EventID", event)
    if event_type is not None:
        _coded(event_element, "EventTypeCode", event_type)
    if outcome_description:
        ET.SubElement(event_element, "EventOutcomeDescription").text = outcome_description
    for participant in participants:
        attributes = {"UserID": participant.user_id, "UserIsRequestor": str(participant.requestor).lower()}
        if participant.alternative_user_id:
            attributes["AlternativeUserID"] = participant.alternative_user_id
        if participant.address:
            attributes["NetworkAccessPointID"] = participant.address
            # 1 = machine name, 2 = IP address
            attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(participant.address) else "1"
        element = ET.SubElement(message, "ActiveParticipant", attributes)
        _coded(element, "RoleIDCode", participant.role)
    source = ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": source_id})
    _coded(source, "AuditSourceTypeCode", APPLICATION_SERVER)
    return message


def add_study(message: ET.Element, study_instance_uid: str, sop_classes: Mapping[str, int]) -> None:
    """A ParticipantObject for the study, with the number of instances of each SOP class."""
    study = ET.SubElement(
        message,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": study_instance_uid,
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3",  # report
        },
    )
    _coded(study, "ParticipantObjectIDTypeCode", STUDY_INSTANCE_UID)
    for sop_class, count in sorted(sop_classes.items()):
        ET.SubElement(study, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})


def add_patient(message: ET.Element, patient_id: str | None) -> None:
    """The Patient ParticipantObject the standard requires (its ID only, never the name)."""
    patient = ET.SubElement(
        message,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": patient_id or "",
            "ParticipantObjectTypeCode": "1",  # person
            "ParticipantObjectTypeCodeRole": "1",  # patient
        },
    )
    _coded(patient, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def serialise(message: ET.Element) -> bytes:
    """One line of UTF-8 XML (the audit file holds one message per line)."""
    text: bytes = ET.tostring(message, encoding="utf-8", xml_declaration=False)
    return text.replace(b"\n", b"&#10;")


def _text_of(code: ET.Element | None) -> str:
    return (code.get("originalText") or "") if code is not None else ""


def summary(message: ET.Element) -> dict[str, object]:
    """What ``dicomnode audit`` prints for one message."""
    event = message.find("EventIdentification")
    assert event is not None
    event_id = event.find("EventID")
    event_type = event.find("EventTypeCode")
    description = event.find("EventOutcomeDescription")
    return {
        "time": event.get("EventDateTime"),
        "event": event_id.get("originalText") if event_id is not None else "",
        "type": event_type.get("originalText") if event_type is not None else "",
        "action": event.get("EventActionCode"),
        "outcome": event.get("EventOutcomeIndicator"),
        "description": description.text if description is not None else "",
        "participants": [
            {
                "ae_title": p.get("UserID"),
                "address": p.get("NetworkAccessPointID", ""),
                "requestor": p.get("UserIsRequestor") == "true",
                "role": _text_of(p.find("RoleIDCode")),
            }
            for p in message.findall("ActiveParticipant")
        ],
        "studies": [
            o.get("ParticipantObjectID")
            for o in message.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCode") == "2"
        ],
    }
