"""STOW-RS origin server (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]``.

Each ``application/dicom`` part of a ``multipart/related`` request takes exactly the C-STORE path
(``receive.ingest``): the same header checks, the same durable write and flush, the same duplicate
policy, the same row in the queue and so the same job. An instance is listed in the response's
Referenced SOP Sequence only after its file is durable and its row committed; every refusal goes
into the Failed SOP Sequence with the C-STORE status as its Failure Reason.

The whole body is read first (capped by ``http.stow_max_request_mb``; parts spooled within the
limits of ``http.multipart``), so a request refused as too large or malformed stores nothing.
This module is the request and its answer; one part's way through the rule set is ``http.stow_part``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dicomnode import audit, metrics
from dicomnode.config import Config
from dicomnode.errors import InvalidDatasetError
from dicomnode.http.dicom_xml import DICOM_XML, native_dicom_model, prefers_xml
from dicomnode.http.multipart import MultipartError, MultipartReader, Part
from dicomnode.http.stow_part import Outcome, flush_parts, ingest_part
from dicomnode.queue.jobs import JobQueue
from dicomnode.receive.ingest import StoreRefused
from dicomnode.receive.scp import storage_sop_classes
from dicomnode.receive.spool import InstanceStore, validate_uid
from dicomnode.status import OUT_OF_RESOURCES_RANGE, Status, status_label

logger = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
SOURCE_LABEL = "STOW-RS"  # the calling_ae_title label of the reception metric, the audit's user id
MAX_CONCURRENT_REQUESTS = 4  # more at once are answered 503 (bounds the memory parts may hold)
FLUSH_EVERY_SECONDS = 1.0  # the longest a written part of a request waits for its flush
DISK_CHECK_BYTES = 8 * 1024 * 1024  # free space is read again after this many bytes spooled to disk

# attribute tags of the STOW-RS response (PS3.18 Table 10.5.3-1)
_FAILURE_REASON = "00081197"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS_UID = "00081150"
_REFERENCED_SOP_INSTANCE_UID = "00081155"


class StowRequestError(Exception):
    """The request as a whole is refused with ``status_code`` (nothing was stored)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass
class _Peer:
    """The HTTP client as the audit module's ``association`` (one per request)."""

    address: str
    calling_ae_title: str = SOURCE_LABEL
    outcomes: list[Outcome] = field(default_factory=list)
    read_seconds: float = 0.0  # receiving and spooling the body


class StowService:
    """The spool and the queue of the HTTP process, opened at the first STOW-RS request."""

    def __init__(self, config: Config, sessions: sessionmaker[Session]) -> None:
        self.config = config
        self.queue = JobQueue(sessions)
        self.max_request_bytes = config.http.stow_max_request_mb * 1024 * 1024
        self.sop_classes = frozenset(storage_sop_classes())
        self._store: InstanceStore | None = None
        self._lock = threading.Lock()
        self._active = 0  # requests being handled

    def store(self) -> InstanceStore:
        with self._lock:
            if self._store is None:
                storage = self.config.storage
                self._store = InstanceStore(
                    storage.path,
                    min_free_bytes=self.config.node.min_free_disk_mb * 1024 * 1024,
                    flush_mode=storage.flush,
                )
            return self._store

    async def handle(self, request: Request) -> Response:
        """One STOW-RS request: read it whole, store each part, answer what became of each."""
        if self._active >= MAX_CONCURRENT_REQUESTS:  # each may hold 64 MiB of parts in memory
            logger.warning("STOW-RS request refused, HTTP 503: %d requests already in progress", self._active)
            return JSONResponse(
                {"error": f"{self._active} STOW-RS requests in progress; try again"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        self._active += 1  # the event loop is one thread: no lock needed
        try:
            return await self._handle(request)
        finally:
            self._active -= 1

    async def _handle(self, request: Request) -> Response:
        study = request.path_params.get("study_instance_uid")
        started = time.monotonic()
        try:
            if study is not None:
                try:
                    study = validate_uid(study, "StudyInstanceUID")
                except InvalidDatasetError as exc:
                    raise StowRequestError(400, f"the study in the path: {exc}") from exc
            reader = await self._read(request)
        except StowRequestError as refusal:
            logger.warning("STOW-RS request refused, HTTP %d: %s", refusal.status_code, refusal.message)
            return JSONResponse({"error": refusal.message}, status_code=refusal.status_code)
        except ClientDisconnect:
            logger.warning("STOW-RS request abandoned: the client went away before the end of the body")
            return Response(status_code=400)  # nobody reads it; nothing was stored
        peer = _Peer(request.client.host if request.client else "")
        peer.read_seconds = time.monotonic() - started
        try:
            await anyio.to_thread.run_sync(self._ingest_all, reader.parts, study, peer)
        finally:
            reader.close()
        return self._response(peer, started, reader, xml=prefers_xml(request.headers.get("accept")))

    async def _read(self, request: Request) -> MultipartReader:
        """Check the media type and read the whole body into spooled parts within the caps."""
        message = Message()
        message["content-type"] = request.headers.get("content-type", "")
        if message.get_content_type() != "multipart/related":
            raise StowRequestError(415, 'the body must be multipart/related; type="application/dicom"')
        kind = str(message.get_param("type") or "application/dicom").lower()
        if kind != "application/dicom":
            raise StowRequestError(415, f"only type=application/dicom parts are accepted, not {kind[:64]!r}")
        boundary = message.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise StowRequestError(400, "the multipart/related content type has no boundary")
        announced = request.headers.get("content-length", "")
        if announced.isdigit() and int(announced) > self.max_request_bytes:  # refused, never used to size
            raise StowRequestError(413, self._too_large())
        store = self.store()
        try:
            reader = MultipartReader(boundary, store.root)
        except MultipartError as exc:
            raise StowRequestError(400, str(exc)) from exc
        total, checked_disk = 0, 0
        idle = self.config.node.network_timeout_seconds
        chunks = request.stream().__aiter__()
        try:
            while True:
                try:
                    with anyio.fail_after(idle):  # a client trickling bytes holds no spool forever
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise StowRequestError(
                        408, f"no part of the body for {idle:g} s (node.network_timeout_seconds)"
                    ) from exc
                total += len(chunk)
                if total > self.max_request_bytes:
                    raise StowRequestError(413, self._too_large())
                reader.feed(chunk)
                if reader.disk_bytes - checked_disk >= DISK_CHECK_BYTES:
                    checked_disk = reader.disk_bytes
                    self._check_disk(store)
            reader.finish()
        except MultipartError as exc:
            reader.close()
            raise StowRequestError(400, f"malformed multipart body: {exc}") from exc
        except OSError as exc:  # spooling a part: disk full, quota, no file descriptor left
            reader.close()
            logger.error(
                "STOW-RS: cannot spool the request body (%s, errno %s)", type(exc).__name__, exc.errno
            )
            raise StowRequestError(503, "cannot spool the request body now; retry later") from exc
        except BaseException:
            reader.close()
            raise
        if not reader.parts:
            reader.close()
            raise StowRequestError(400, "the multipart body has no parts")
        return reader

    def _too_large(self) -> str:
        return f"the request exceeds http.stow_max_request_mb ({self.config.http.stow_max_request_mb} MB)"

    def _check_disk(self, store: InstanceStore) -> None:
        if store.min_free_bytes > 0 and store.free_bytes(store.root) < store.min_free_bytes:
            raise StowRequestError(503, "the spool is below its free-space floor (node.min_free_disk_mb)")

    def _ingest_all(self, parts: list[Part], study: str | None, peer: _Peer) -> None:
        """Store every part in order (in a worker thread: writes, flushes and commits block).

        The flush that makes files, folder entries and rows durable is shared by the parts of a
        request (at most :data:`FLUSH_EVERY_SECONDS` apart), as concurrent associations share one;
        an instance counts as stored only once a flush after its commit succeeded.
        """
        store = self.store()
        unflushed: list[Outcome] = []
        last_flush = time.monotonic()
        for part in parts:
            outcome = ingest_part(store, self.queue, self.sop_classes, part, study)
            peer.outcomes.append(outcome)
            if outcome.refused is None:
                unflushed.append(outcome)
            if unflushed and time.monotonic() - last_flush >= FLUSH_EVERY_SECONDS:
                flush_parts(store, unflushed)
                last_flush = time.monotonic()
        flush_parts(store, unflushed)
        for outcome in peer.outcomes:
            refused = outcome.refused
            if refused is None:
                metrics.instance_received(SOURCE_LABEL, Status.SUCCESS.name)
                if outcome.record is not None and outcome.recorded:
                    audit.instance_stored(peer, outcome.record)
                continue
            log = logger.error if refused.status in OUT_OF_RESOURCES_RANGE else logger.warning
            log(
                "STOW-RS %s refused, %s: %s%s",
                refused.sop_instance_uid or outcome.sop_instance_uid or "<no SOP Instance UID>",
                status_label(refused.status),
                refused.message,
                f" ({refused.detail})" if refused.detail else "",
            )
            metrics.instance_received(SOURCE_LABEL, refused.status.name)

    def _response(self, peer: _Peer, started: float, reader: MultipartReader, *, xml: bool) -> Response:
        """The STOW-RS response: DICOM JSON, or the Native DICOM Model when the client prefers XML."""
        stored = [o for o in peer.outcomes if o.refused is None]
        failed = [o for o in peer.outcomes if o.refused is not None]
        body: dict[str, Any] = {}
        if failed:
            body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(o, o.refused) for o in failed]}
        if stored:
            body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(o, None) for o in stored]}
        if not failed:
            status_code = 200
        elif stored:
            status_code = 202
        elif all(o.refused is not None and o.refused.status in OUT_OF_RESOURCES_RANGE for o in failed):
            status_code = 503  # nothing stored for want of disk or database: worth trying again later
        else:
            status_code = 409
        recorded = sum(1 for o in stored if o.recorded)
        logger.info(
            "STOW-RS from %s: HTTP %d, %d stored, %d duplicates, %d failed, %.1f MB in %.2f s"
            " (%.2f s reading)",
            peer.address or "?",
            status_code,
            recorded,
            len(stored) - recorded,
            len(failed),
            sum(part.size for part in reader.parts) / 1e6,
            time.monotonic() - started,
            peer.read_seconds,
        )
        audit.association_ended(peer, "released")  # one Instances Transferred per study stored
        headers = {"Retry-After": "60"} if status_code == 503 else None
        if xml:
            return Response(
                native_dicom_model(body), status_code=status_code, media_type=DICOM_XML, headers=headers
            )
        return Response(json.dumps(body), status_code=status_code, media_type=DICOM_JSON, headers=headers)


def _item(outcome: Outcome, refused: StoreRefused | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if outcome.sop_class_uid:
        item[_REFERENCED_SOP_CLASS_UID] = {"vr": "UI", "Value": [outcome.sop_class_uid]}
    if outcome.sop_instance_uid:
        item[_REFERENCED_SOP_INSTANCE_UID] = {"vr": "UI", "Value": [outcome.sop_instance_uid]}
    if refused is not None:
        item[_FAILURE_REASON] = {"vr": "US", "Value": [int(refused.status)]}
    return item


def stow_routes(config: Config, sessions: sessionmaker[Session]) -> list[Route]:
    """The STOW-RS routes for the application (the token check is the app's middleware)."""
    service = StowService(config, sessions)
    return [
        Route("/dicom-web/studies", service.handle, methods=["POST"]),
        Route("/dicom-web/studies/{study_instance_uid}", service.handle, methods=["POST"]),
    ]
