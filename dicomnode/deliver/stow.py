"""The STOW-RS user agent: POST a batch of result files to a DICOMweb destination, read the answer.

:func:`store_all` is the DICOMweb twin of :func:`dicomnode.deliver.scu.store_all`: it takes one
destination's prepared rows, sends them in **one** ``POST {url}/studies`` request (PS3.18 10.5) as
``multipart/related; type="application/dicom"`` (each part a Part 10 file exactly as stored, the
boundary random per request) and yields every object's :class:`Outcome` exactly once. The response
(``application/dicom+json``, or ``application/dicom+xml`` when the server sends that) lists the
stored objects in the Referenced SOP Sequence (0008,1199) and the failed ones, each with its Failure
Reason (0008,1197), in the Failed SOP Sequence (0008,1198); an object the answer does not name gets
the outcome of the HTTP status (:func:`dicomnode.deliver.status.classify_http`).

It never writes the database and never logs patient data: the sender records and logs UIDs.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from dicomnode.config import DestinationConfig
from dicomnode.deliver.scu import Prepared
from dicomnode.deliver.status import (
    Outcome,
    Verdict,
    classify_failure_reason,
    classify_http,
    status_name,
)
from dicomnode.net.identity import IMPLEMENTATION_VERSION_NAME
from dicomnode.net.tls import client_ssl_context

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

_CHUNK = 256 * 1024  # bytes read from a result file at a time while the request streams
_DETAIL_LIMIT = 500  # characters of an unparsed answer kept as the row's peer comment


@dataclass
class StowResponse:
    """What a STOW-RS answer says per object: stored (with a warning reason or None), failed (reason)."""

    stored: dict[str, int | None] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)


class UnreadableResponseError(ValueError):
    """The answer's body is neither DICOM JSON nor DICOM XML we can read."""


def store_all(
    destination: DestinationConfig, prepared: Sequence[Prepared], timeout: float
) -> Iterator[tuple[Prepared, Outcome]]:
    """POST every prepared object to ``{url}/studies`` in one request; yield each object's outcome.

    Connection trouble and timeouts are retried; the HTTP status and the response's per-object
    sequences decide the rest (see ``docs/delivery.md``).
    """
    if not prepared:
        return
    try:
        headers = {"User-Agent": f"dicomnode ({IMPLEMENTATION_VERSION_NAME})"}
        headers.update(_authorization(destination))
    except OSError as exc:
        key = "token_file" if destination.token_file else "password_file"
        whole = Outcome(Verdict.DEAD, f"cannot read the destination's {key}: {type(exc).__name__}")
        yield from ((item, whole) for item in prepared)
        return
    boundary = _boundary()
    headers["Content-Type"] = f'multipart/related; type="application/dicom"; boundary={boundary}'
    headers["Accept"] = "application/dicom+json, application/dicom+xml;q=0.9, application/json;q=0.8"
    headers["Content-Length"] = str(_body_length(prepared, boundary))
    try:
        with (
            httpx.Client(verify=_verify(destination), timeout=httpx.Timeout(timeout)) as client,
            client.stream(
                "POST", f"{destination.url}/studies", content=_body(prepared, boundary), headers=headers
            ) as response,
        ):
            content = _read_capped(response, deadline=time.monotonic() + _answer_seconds(timeout))
    except _AnswerTooLargeError:
        whole = Outcome(Verdict.RETRY, f"{destination.url} answered more than {MAX_ANSWER_BYTES} bytes")
        yield from ((item, whole) for item in prepared)
        return
    except httpx.TimeoutException as exc:
        whole = Outcome(
            Verdict.RETRY, f"no answer from {destination.url} within {timeout:g} s ({type(exc).__name__})"
        )
        yield from ((item, whole) for item in prepared)
        return
    except (httpx.TransportError, OSError) as exc:
        whole = Outcome(Verdict.RETRY, f"could not reach {destination.url}: {_brief(exc)}")
        yield from ((item, whole) for item in prepared)
        return
    yield from outcomes(
        prepared,
        response.status_code,
        response.reason_phrase,
        response.headers,
        content,
        _credentials_key(destination),
    )


MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a STOW-RS response lists the objects of one batch: far less


class _AnswerTooLargeError(Exception):
    pass


def _answer_seconds(timeout: float) -> float:
    """The whole answer's deadline: the per-read timeout bounds each read, this a trickling peer."""
    return max(4 * timeout, 60.0)


def _read_capped(response: httpx.Response, *, deadline: float) -> bytes:
    """The response body, at most MAX_ANSWER_BYTES and read before ``deadline`` (else an error)."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise _AnswerTooLargeError
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the answer did not end before its deadline")
    return bytes(body)


def outcomes(
    prepared: Sequence[Prepared],
    code: int,
    phrase: str,
    headers: httpx.Headers | dict[str, str],
    body: bytes,
    credentials: str,
) -> Iterator[tuple[Prepared, Outcome]]:
    """Every object's outcome from one STOW-RS answer (its HTTP status, headers and body)."""
    whole = classify_http(code, phrase, credentials)
    parsed: StowResponse | None = None
    detail: str | None = None
    if body.strip() and code not in (401, 403):
        try:
            parsed = parse_response(body, str(headers.get("content-type", "")))
        except UnreadableResponseError:
            detail = body[:_DETAIL_LIMIT].decode("utf-8", errors="replace")
    for item in prepared:
        uid = item.row.sop_instance_uid
        if parsed is not None and uid in parsed.failed:
            yield item, classify_failure_reason(parsed.failed[uid])
        elif parsed is not None and uid in parsed.stored:
            warning = parsed.stored[uid]
            if warning is None:
                yield item, Outcome(Verdict.DELIVERED, f"stored (HTTP {code})", 0x0000)
            else:
                yield item, Outcome(Verdict.DELIVERED, f"stored with warning {status_name(warning)}", warning)
        elif code == 200 or whole.verdict is not Verdict.DELIVERED:
            # 200: every object stored (PS3.18 10.5.3); an error status holds for the unnamed objects
            status = 0x0000 if whole.verdict is Verdict.DELIVERED else None
            yield item, Outcome(whole.verdict, whole.reason, status, detail)
        else:  # 202 or another 2xx that does not name this object: ask again later
            yield (
                item,
                Outcome(Verdict.RETRY, f"HTTP {code}: the answer does not list the object", None, detail),
            )


def parse_response(body: bytes, content_type: str) -> StowResponse:
    """Read the Referenced and Failed SOP Sequences of a DICOM JSON or DICOM XML STOW-RS answer."""
    media = content_type.split(";", 1)[0].strip().lower()
    text = body.lstrip()
    if media.endswith("xml") or text.startswith(b"<"):
        return _parse_xml(text)
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise UnreadableResponseError(f"not DICOM JSON: {exc}") from exc
    if isinstance(document, list) and len(document) == 1:
        document = document[0]
    if not isinstance(document, dict):
        raise UnreadableResponseError("DICOM JSON answer is not one data set")
    result = StowResponse()
    for item in _json_items(document, REFERENCED_SOP_SEQUENCE):
        uid = _json_value(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            warning = _json_value(item, WARNING_REASON)
            result.stored[uid] = int(warning) if isinstance(warning, int) else None
    for item in _json_items(document, FAILED_SOP_SEQUENCE):
        uid = _json_value(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            reason = _json_value(item, FAILURE_REASON)
            result.failed[uid] = int(reason) if isinstance(reason, int) else 0x0110
    return result


def _json_items(document: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = document.get(tag)
    values = element.get("Value", []) if isinstance(element, dict) else []
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _json_value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _parse_xml(body: bytes) -> StowResponse:
    """The Native DICOM Model (PS3.19 A.1), in its namespace or none; documents with a DTD are
    refused (entity expansion)."""
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise UnreadableResponseError("DICOM XML answer declares a DTD")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise UnreadableResponseError(f"not DICOM XML: {exc}") from exc
    for element in root.iter():  # with or without PS3.19's namespace: servers write both
        element.tag = element.tag.rpartition("}")[2]
    result = StowResponse()
    for attribute in root:
        tag = attribute.get("tag", "").upper()
        if tag not in (REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE):
            continue
        for item in attribute.findall("Item"):
            values = {
                a.get("tag", "").upper(): (a.findtext("Value") or "").strip()
                for a in item.findall("DicomAttribute")
            }
            uid = values.get(REFERENCED_SOP_INSTANCE_UID)
            if not uid:
                continue
            if tag == REFERENCED_SOP_SEQUENCE:
                warning = values.get(WARNING_REASON, "")
                result.stored[uid] = int(warning) if warning.isdigit() else None
            else:
                reason = values.get(FAILURE_REASON, "")
                result.failed[uid] = int(reason) if reason.isdigit() else 0x0110
    return result


# --- the request ----------------------------------------------------------------------------------


def _boundary() -> str:
    """A random boundary; 128 bits make a collision with file content practically impossible."""
    return f"dicomnode-{secrets.token_hex(16)}"


def _part_head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")


def _tail(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def _body_length(prepared: Sequence[Prepared], boundary: str) -> int:
    head = len(_part_head(boundary)) + 2  # and the CRLF after each part's content
    return sum(head + item.file_path.stat().st_size for item in prepared) + len(_tail(boundary))


def _body(prepared: Sequence[Prepared], boundary: str) -> Iterator[bytes]:
    """The multipart/related body, streamed from the files (never a whole batch in memory)."""
    for item in prepared:
        yield _part_head(boundary)
        with item.file_path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk
        yield b"\r\n"
    yield _tail(boundary)


def _authorization(destination: DestinationConfig) -> dict[str, str]:
    """The Authorization header from the token or password file, read at each request (rotation)."""
    if destination.token_file is not None:
        token = destination.token_file.read_text(encoding="utf-8").strip()
        return {"Authorization": f"Bearer {token}"}
    if destination.password_file is not None:
        password = destination.password_file.read_text(encoding="utf-8").strip()
        pair = f"{destination.username}:{password}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}"}
    return {}


def _credentials_key(destination: DestinationConfig) -> str:
    """Which keys of the destination an operator checks after a 401/403."""
    if destination.token_file is not None:
        return f"the token in token_file of destination {destination.name!r}"
    if destination.password_file is not None:
        return f"username and password_file of destination {destination.name!r}"
    return (
        f"destination {destination.name!r}: it has no credentials; set token_file or username + password_file"
    )


def _verify(destination: DestinationConfig) -> Any:
    """TLS verification as for DIMSE destinations: the configured CA bundle or the system's."""
    if not destination.url.startswith("https://"):
        return True
    tls = destination.tls
    if tls is None:
        return client_ssl_context(None)
    return client_ssl_context(tls.ca_certificates, tls.certificate, tls.private_key)


def _brief(exc: BaseException) -> str:
    """The exception's type and message, one line (connection errors carry no patient data)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
