"""Patient and study context copied from the source instances into what dicomnode writes.

highdicom accepts only some Specific Character Sets (it refuses ISO 2022 sets such as
``['', 'ISO 2022 IR 87']``), so the objects are built in UTF-8 and afterwards given the source's
own Specific Character Set and its patient/study elements. pydicom encodes every text element on
writing with the dataset's character set, so what we generate ourselves must be representable in
that set: :func:`encodable` checks and falls back.
"""

from __future__ import annotations

import copy
import logging

import highdicom as hd
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.errors import InvalidDatasetError
from dicomnode.findings import StudyFindings
from dicomnode.report.uids import device_observer_uid

logger = logging.getLogger(__name__)

# Patient, General Study and Patient Study module attributes copied verbatim when the source has them.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)

# Character sets highdicom's constructors accept; objects are built in this one, then switched.
BUILD_CHARACTER_SET = "ISO_IR 192"


_REMOVED_FROM_HEADER = (set(PATIENT_STUDY_KEYWORDS) - {"StudyInstanceUID"}) | {"SpecificCharacterSet"}
_EMPTY_IN_HEADER = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


# What a reference to an object dicomnode wrote needs none of: its content and evidence.
REFERENCE_OMITS = frozenset(
    {
        "ContentSequence",
        "CurrentRequestedProcedureEvidenceSequence",
        "PertinentOtherEvidenceSequence",
        "PredecessorDocumentsSequence",
        "ContentTemplateSequence",
        "SourceImageSequence",
        "ContributingEquipmentSequence",
    }
)


def neutral_header(source: Dataset, omit: frozenset[str] = frozenset()) -> Dataset:
    """A pixel-free copy of ``source`` for highdicom: no patient data, build character set.

    highdicom never sees names or IDs (its warnings would otherwise quote them) nor a character set
    it refuses; :func:`apply_source_context` puts the real values back afterwards. Elements named in
    ``omit`` are left out (e.g. :data:`REFERENCE_OMITS` for an object that is only referenced).
    """
    header = Dataset()
    for element in source:
        if element.tag.group == 0x7FE0 or element.keyword in _REMOVED_FROM_HEADER or element.keyword in omit:
            continue
        # sequences are copied deeply; other elements hold immutable values, so a shallow copy is
        # enough and saves most of the report's time on large headers
        header.add(copy.deepcopy(element) if element.VR == "SQ" else copy.copy(element))
    header.SpecificCharacterSet = BUILD_CHARACTER_SET
    for keyword in _EMPTY_IN_HEADER:
        setattr(header, keyword, "")
    return header


def source_character_set(source: Dataset) -> str | list[str]:
    """The source's Specific Character Set, or ``"ISO_IR 6"`` (default repertoire) when absent."""
    value = source.get("SpecificCharacterSet")
    if value is None or value == "":
        return "ISO_IR 6"
    return list(value) if not isinstance(value, str) else value


def encodable(text: str, character_set: str | list[str], fallback: str = "?") -> str:
    """``text`` if pydicom can write it in ``character_set`` unchanged, else a safe substitute.

    Common typographic characters (em dash, en dash) become ASCII hyphens; anything else that
    does not survive a write/read round trip is replaced by ``fallback`` character by character.
    """
    if _round_trips(text, character_set):
        return text
    text = text.replace("—", "-").replace("–", "-")
    return "".join(c if _round_trips(c, character_set) else fallback for c in text)


_DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})


def _round_trips(text: str, character_set: str | list[str]) -> bool:
    """Whether every character of ``text`` is encodable by one of the character set's encodings.

    pydicom's writer splits a string over the encodings of a multi-valued (ISO 2022) set, so
    per-character encodability is what it needs; checked here without calling ``encode_string``,
    which logs a warning (and substitutes) instead of failing.
    """
    terms = [character_set] if isinstance(character_set, str) else list(character_set)
    encodings = convert_encodings(terms)
    if terms[0].strip() in _DEFAULT_REPERTOIRE:
        encodings[0] = "ascii"  # pydicom uses Latin-1 here; the DICOM default repertoire is ASCII
    return all(any(_encodes(char, encoding) for encoding in encodings) for char in set(text))


def _encodes(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def check_same_study(sources: list[Dataset]) -> str:
    """The common Study Instance UID of ``sources``; raises if they span studies or are empty."""
    if not sources:
        raise InvalidDatasetError("no source instances given")
    study_uids = {str(ds.StudyInstanceUID) for ds in sources if "StudyInstanceUID" in ds}
    if len(study_uids) != 1 or any("StudyInstanceUID" not in ds for ds in sources):
        raise InvalidDatasetError(f"source instances belong to studies {sorted(study_uids)}, expected one")
    return study_uids.pop()


def apply_source_context(target: Dataset, source: Dataset) -> None:
    """Give ``target`` the source's Specific Character Set and patient/study elements verbatim.

    Elements highdicom wrote as empty Type 2 placeholders stay when the source lacks them. Every
    text element of ``target`` (including nested sequences) is then checked to be writable in the
    source's character set; those that are not are replaced via :func:`encodable` (never patient
    data, which came from the source and is writable by construction).
    """
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
    character_set = source_character_set(source)
    if "SpecificCharacterSet" in source and source.SpecificCharacterSet:
        target.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)
    elif "SpecificCharacterSet" in target:
        del target.SpecificCharacterSet
    copied = {keyword for keyword in PATIENT_STUDY_KEYWORDS if keyword in source}
    _fix_text(target, character_set, copied)


_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})


def _fix_text(dataset: Dataset, character_set: str | list[str], skip: set[str]) -> None:
    for element in dataset:
        if element.keyword in skip:
            continue
        if element.VR == "SQ":
            for item in element.value:
                _fix_text(item, character_set, set())
        elif element.VR in _TEXT_VRS and element.value:
            if isinstance(element.value, str):
                fixed = encodable(element.value, character_set)
                if fixed != element.value:
                    logger.debug("replaced characters not writable in %s in %s", character_set, element.tag)
                    element.value = fixed
            elif not isinstance(element.value, bytes):
                element.value = [encodable(str(v), character_set) for v in element.value]


def series_description(findings: StudyFindings, kind: str = "") -> str:
    """``"AI <model> <version> — not verified"`` (optionally with a kind), within VR LO's 64."""
    suffix = " — not verified"
    head = f"AI {findings.model.name} {findings.model.version}" + (f" {kind}" if kind else "")
    return head[: 64 - len(suffix)] + suffix


def device_observer_context(findings: StudyFindings) -> hd.sr.ObserverContext:
    """TID 1004 Device observer for the model: stable Device Observer UID, name, manufacturer, model."""
    model = findings.model
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(model),
        name=model.name,
        manufacturer_name=model.manufacturer,
        model_name=f"{model.name} {model.version}",
    )
    return hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
