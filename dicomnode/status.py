"""Every DIMSE status the node sends or interprets, by its PS3.7 Annex C / PS3.4 name.

One place so that no module writes a bare hex value: pynetdicom's own example app returns ``0x210``
where it meant ``0xC210``, which is the reason to name them. ``Status`` members compare equal to
the integers a peer sends, so a received status can be looked up with ``Status(value)`` or tested
against the ranges below.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3 for C-STORE)."""

    SUCCESS = 0x0000
    # warnings
    WARNING_OPTIONAL_ATTRIBUTES = 0x0001  # Requested optional attributes are not supported
    WARNING_ATTRIBUTE_LIST = 0x0107  # Attribute list error
    WARNING_VALUE_OUT_OF_RANGE = 0x0116  # Attribute value out of range
    WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
    # general failures (PS3.7 C.5)
    NO_SUCH_ATTRIBUTE = 0x0105
    INVALID_ATTRIBUTE_VALUE = 0x0106
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    NO_SUCH_SOP_INSTANCE = 0x0112
    NO_SUCH_EVENT_TYPE = 0x0113
    NO_SUCH_ARGUMENT = 0x0114
    INVALID_ARGUMENT_VALUE = 0x0115
    INVALID_OBJECT_INSTANCE = 0x0117
    NO_SUCH_SOP_CLASS = 0x0118
    CLASS_INSTANCE_CONFLICT = 0x0119
    MISSING_ATTRIBUTE = 0x0120
    MISSING_ATTRIBUTE_VALUE = 0x0121
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NO_SUCH_ACTION = 0x0123
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    UNRECOGNIZED_OPERATION = 0x0211
    MISTYPED_ARGUMENT = 0x0212
    RESOURCE_LIMITATION = 0x0213
    CANCEL = 0xFE00
    # C-STORE failures (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700  # cannot store: disk full, below the free-space floor, database down
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000  # the data set could not be parsed at all
    CANNOT_UNDERSTAND_MISSING_UID = 0xC001  # a required UID is missing or invalid
    CANNOT_UNDERSTAND_UID_MISMATCH = 0xC002  # data set and command disagree on a UID
    CANNOT_UNDERSTAND_INSTANCE_CONFLICT = 0xC003  # SOP Instance UID already held under another study/series
    # STOW-RS Failure Reason (PS3.18 10.5.3): a part whose transfer syntax the node does not accept
    REFERENCED_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


# Ranges of C-STORE statuses whose lower byte is implementation specific (PS3.4 B.2.3).
OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA800)
DATASET_DOES_NOT_MATCH_SOP_CLASS_RANGE = range(0xA900, 0xAA00)
WARNING_RANGE = range(0xB000, 0xC000)
CANNOT_UNDERSTAND_RANGE = range(0xC000, 0xD000)


def status_label(status: int) -> str:
    """``0xA700 (OUT_OF_RESOURCES)`` style text for any status, named or not."""
    try:
        name = Status(status).name
    except ValueError:
        if status in OUT_OF_RESOURCES_RANGE:
            name = "OUT_OF_RESOURCES"
        elif status in DATASET_DOES_NOT_MATCH_SOP_CLASS_RANGE:
            name = "DATASET_DOES_NOT_MATCH_SOP_CLASS"
        elif status in WARNING_RANGE:
            name = "WARNING"
        elif status in CANNOT_UNDERSTAND_RANGE:
            name = "CANNOT_UNDERSTAND"
        else:
            name = "unknown"
    return f"0x{status:04X} ({name})"
