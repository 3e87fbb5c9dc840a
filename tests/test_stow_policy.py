"""DICOMweb destinations without a network: what a STOW-RS answer means (HTTP statuses, Failure
Reasons, DICOM JSON and XML response bodies) and the ``type = "dicomweb"`` configuration keys.

Delivery against real servers is in ``tests/test_stow_deliver.py``, which builds its answers with
:func:`stow_json` and :func:`stow_xml` from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dicomnode.config import load_config
from dicomnode.deliver.status import Verdict, classify_failure_reason, classify_http
from dicomnode.deliver.stow import parse_response
from dicomnode.errors import ConfigurationError

# --- the answer's meaning (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "verdict", "words"),
    [
        (200, Verdict.DELIVERED, "stored"),
        (202, Verdict.DELIVERED, "stored"),
        (400, Verdict.DEAD, "rejected the request permanently"),
        (409, Verdict.DEAD, "rejected the request permanently"),
        (401, Verdict.DEAD, "check token_file"),
        (403, Verdict.DEAD, "check token_file"),
        (404, Verdict.DEAD, "check its url"),
        (415, Verdict.DEAD, "permanently"),
        (408, Verdict.RETRY, "failed the request"),
        (429, Verdict.RETRY, "failed the request"),
        (500, Verdict.RETRY, "failed the request"),
        (503, Verdict.RETRY, "failed the request"),
    ],
)
def test_classify_http(code: int, verdict: Verdict, words: str) -> None:
    outcome = classify_http(code, "Phrase", "token_file")
    assert outcome.verdict is verdict
    assert words in outcome.reason and f"HTTP {code}" in outcome.reason


@pytest.mark.parametrize(
    ("reason", "verdict"),
    [(0xC000, Verdict.DEAD), (0xA900, Verdict.DEAD), (0x0122, Verdict.DEAD), (0xA700, Verdict.RETRY),
     (0x0110, Verdict.RETRY), (0x0000, Verdict.RETRY)],
)  # fmt: skip
def test_failure_reasons_follow_the_dimse_policy(reason: int, verdict: Verdict) -> None:
    assert classify_failure_reason(reason).verdict is verdict


def stow_json(
    stored: list[str], failed: dict[str, int], warned: dict[str, int] | None = None
) -> dict[str, Any]:
    """A STOW-RS response data set in DICOM JSON (PS3.18 F.2)."""
    document: dict[str, Any] = {"00081190": {"vr": "UR", "Value": ["http://peer/studies/1"]}}
    if stored:
        items = []
        for uid in stored:
            item: dict[str, Any] = {
                "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.11"]},
                "00081155": {"vr": "UI", "Value": [uid]},
            }
            if warned and uid in warned:
                item["00081196"] = {"vr": "US", "Value": [warned[uid]]}
            items.append(item)
        document["00081199"] = {"vr": "SQ", "Value": items}
    if failed:
        document["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.11"]},
                    "00081155": {"vr": "UI", "Value": [uid]},
                    "00081197": {"vr": "US", "Value": [reason]},
                }
                for uid, reason in failed.items()
            ],
        }
    return document


def stow_xml(stored: list[str], failed: dict[str, int]) -> bytes:
    """The same in the Native DICOM Model (PS3.19 A.1)."""

    def item(number: int, uid: str, reason: int | None) -> str:
        extra = (
            f'<DicomAttribute tag="00081197" vr="US"><Value number="1">{reason}</Value></DicomAttribute>'
            if reason is not None
            else ""
        )
        return (
            f'<Item number="{number}"><DicomAttribute tag="00081155" vr="UI">'
            f'<Value number="1">{uid}</Value></DicomAttribute>{extra}</Item>'
        )

    referenced = "".join(item(i + 1, uid, None) for i, uid in enumerate(stored))
    failures = "".join(item(i + 1, uid, r) for i, (uid, r) in enumerate(failed.items()))
    return (
        '<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel xml:space="preserve">'
        f'<DicomAttribute tag="00081199" vr="SQ">{referenced}</DicomAttribute>'
        f'<DicomAttribute tag="00081198" vr="SQ">{failures}</DicomAttribute></NativeDicomModel>'
    ).encode()


def test_parse_response_reads_json_and_xml() -> None:
    document = stow_json(["1.2.3"], {"1.2.4": 0xC000}, warned={"1.2.3": 0xB000})
    for body, media in (
        (json.dumps(document).encode(), "application/dicom+json"),
        (json.dumps([document]).encode(), "application/json"),
    ):
        parsed = parse_response(body, media)
        assert parsed.stored == {"1.2.3": 0xB000} and parsed.failed == {"1.2.4": 0xC000}
    parsed = parse_response(stow_xml(["1.2.3"], {"1.2.4": 0xA900}), "application/dicom+xml; charset=utf-8")
    assert parsed.stored == {"1.2.3": None} and parsed.failed == {"1.2.4": 0xA900}
    # the same document in PS3.19's namespace, as the standard's schema and some servers write it
    namespaced = stow_xml(["1.2.3"], {"1.2.4": 0xA900}).replace(
        b'<NativeDicomModel xml:space="preserve">',
        b'<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">',
    )
    parsed = parse_response(namespaced, "application/dicom+xml")
    assert parsed.stored == {"1.2.3": None} and parsed.failed == {"1.2.4": 0xA900}


# --- configuration ---------------------------------------------------------------------------------


def config_with(tmp_path: Path, destination: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[storage]\npath = "var"\n\n[[destinations]]\nname = "web"\n{destination}\n', encoding="utf-8"
    )
    return path


def test_dicomweb_destination_configuration(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("secret\n")
    (tmp_path / "ca.pem").write_text("not read at load time\n")
    config = load_config(
        config_with(
            tmp_path,
            'type = "dicomweb"\nurl = "https://pacs.example:8443/dicom-web/"\nusername = "node"\n'
            'password_file = "password"\ntls = { ca_certificates = "ca.pem" }',
        )
    )
    (web,) = config.destinations
    assert (web.type, web.url, web.host, web.port) == (
        "dicomweb",
        "https://pacs.example:8443/dicom-web",
        "pacs.example",
        8443,
    )
    assert (web.username, web.password_file, web.token_file) == ("node", tmp_path / "password", None)
    assert web.tls is not None and web.tls.ca_certificates == tmp_path / "ca.pem"
    dimse = load_config(config_with(tmp_path, 'type = "dimse"\nae_title = "PACS"\nhost = "h"\nport = 104'))
    assert dimse.destinations[0].type == "dimse" and dimse.destinations[0].url == ""


WEB = 'type = "dicomweb"\nurl = "http://pacs/x"\n'


@pytest.mark.parametrize(
    ("destination", "key", "words"),
    [
        ('type = "dicomweb"', "url", "required"),
        ('type = "dicomweb"\nurl = "ftp://pacs/dicom-web"', "url", "http"),
        ('type = "dicomweb"\nurl = "http://u:p@pacs/dicom-web"', "url", "credentials"),
        (WEB + 'ae_title = "PACS"', "ae_title", "dimse"),
        (WEB + "port = 104", "port", "dimse"),
        (WEB + "tls = true", "tls", "https"),
        (WEB + 'username = "a"', "password_file", "together"),
        (WEB + 'token_file = "t"\nusername = "a"\npassword_file = "p"', "token_file", "not both"),
        (WEB + 'token_file = "missing"', "token_file", "exist"),
        ('ae_title = "PACS"\nhost = "h"\nport = 104\nurl = "http://pacs/x"', "url", "dicomweb"),
        ('type = "wado"\nae_title = "PACS"\nhost = "h"\nport = 104', "type", "dicomweb"),
        (WEB + 'hots = "h"', "hots", "unknown key"),
    ],
)  # fmt: skip
def test_dicomweb_configuration_contradictions_name_the_key(
    tmp_path: Path, destination: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_config(config_with(tmp_path, destination))
    assert caught.value.key == f"destinations[0].{key}" and words in str(caught.value)
