"""The DICOM JSON model (PS3.18 F.2) written as the Native DICOM Model (PS3.19 A.1), and the Accept
header's choice between the two.

A STOW-RS origin server answers in either (PS3.18 10.5.3); clients that ask for
``application/dicom+xml`` get XML, everyone else the JSON the server builds first. Only what a
STOW-RS response holds needs writing: sequences of items, UIDs and numbers.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from email.message import Message
from typing import Any

from pydicom.datadict import keyword_for_tag

DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_MODEL_NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_JSON_TYPES = ("application/dicom+json", "application/json")


def native_dicom_model(dataset: Mapping[str, Any]) -> bytes:
    """``dataset`` (DICOM JSON: tag -> {"vr", "Value"}) as a Native DICOM Model document."""
    root = ET.Element("NativeDicomModel", {"xmlns": NATIVE_DICOM_MODEL_NAMESPACE})
    _attributes(root, dataset)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def _attributes(parent: ET.Element, dataset: Mapping[str, Any]) -> None:
    for tag in sorted(dataset):
        element = dataset[tag]
        vr = str(element["vr"])
        attributes = {"tag": tag.upper(), "vr": vr}
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            attributes["keyword"] = keyword
        attribute = ET.SubElement(parent, "DicomAttribute", attributes)
        for number, value in enumerate(element.get("Value", []), start=1):
            if vr == "SQ":
                _attributes(ET.SubElement(attribute, "Item", {"number": str(number)}), value)
            else:
                ET.SubElement(attribute, "Value", {"number": str(number)}).text = str(value)


def prefers_xml(accept: str | None) -> bool:
    """Whether an Accept header ranks ``application/dicom+xml`` above the JSON answer.

    JSON is the default: no header, ``*/*``, ``application/*`` and equal weights all get JSON.
    """
    if not accept:
        return False
    xml_weight = json_weight = 0.0
    for entry in accept.split(","):
        media_range = Message()  # parsed as stow.py parses Content-Type: quoting, case, spaces
        media_range["content-type"] = entry.strip()
        media = media_range.get_content_type()
        q = media_range.get_param("q")
        try:
            weight = 1.0 if q is None else float(str(q))
        except ValueError:
            weight = 0.0
        if media == DICOM_XML:
            xml_weight = max(xml_weight, weight)
        elif media in _JSON_TYPES or media in ("*/*", "application/*"):
            json_weight = max(json_weight, weight)
    return xml_weight > json_weight


__all__ = ["DICOM_XML", "NATIVE_DICOM_MODEL_NAMESPACE", "native_dicom_model", "prefers_xml"]
