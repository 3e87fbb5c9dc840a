"""DICOMweb destinations: STOW-RS delivery to a real Orthanc with its DICOMweb plugin, and to a small
local STOW-RS endpoint (``http.server``) that answers chosen per-object failures.

The sender, outbox, retries and dead letters are the same as for C-STORE (``tests/test_sender.py``);
these tests check what is particular to DICOMweb: the multipart request, the response's Referenced
and Failed SOP Sequences, HTTP statuses, credentials, the server being down. The answers' meaning
and the configuration keys are tested without a network in ``tests/test_stow_policy.py``.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import logging
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import served_chest_study, study_entry, wait_for
from peers import free_port, start_orthanc
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from sqlalchemy.orm import Session, sessionmaker
from test_e2e import models_dir  # noqa: F401 - the session's installed default model
from test_sender import add_result, later, make_sender, outbox
from test_stow_policy import stow_json, stow_xml
from test_tls import pki  # noqa: F401 - the module's test CA, server and client certificates

from dicomnode.config import DestinationConfig, DestinationTLSConfig
from dicomnode.db import DeliveryState, utcnow
from dicomnode.queue.outbox import OutboxQueue

SR = "test-SR.dcm"  # a Basic Text SR from pydicom's test files
KEY_IMAGE = "SC_rgb.dcm"  # an RGB Secondary Capture, as dicomnode's key images are


def dicomweb(url: str, name: str = "web", **kwargs: Any) -> DestinationConfig:
    return DestinationConfig(
        name=name, ae_title="", host="127.0.0.1", port=0, type="dicomweb", url=url, **kwargs
    )


# --- Orthanc with its DICOMweb plugin --------------------------------------------------------------


def test_sr_and_key_image_are_delivered_to_orthanc_by_stow_rs(
    sessions: sessionmaker[Session],
    storage: Path,
    peers: list[Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    orthanc = start_orthanc(tmp_path, dicomweb=True)
    peers.append(orthanc)
    rows = [
        add_result(sessions, storage, SR, dest="web"),
        add_result(sessions, storage, KEY_IMAGE, dest="web"),
    ]
    sender = make_sender(sessions, storage, dicomweb(orthanc.dicomweb_url))
    with caplog.at_level(logging.INFO, logger="dicomnode.deliver"):
        assert sender.run_once() == 2
    uids = {outbox(sessions, row).sop_instance_uid for row in rows}
    for row in rows:
        record = outbox(sessions, row)
        assert (record.state, record.last_error, record.attempts) == (DeliveryState.DELIVERED, None, 1)
    assert uids <= orthanc.sop_instance_uids()
    assert all(uid in caplog.text for uid in uids) and "web" in caplog.text
    assert "Lestrade" not in caplog.text and "Test^S" not in caplog.text  # no patient names in the log


def test_basic_auth_is_accepted_and_a_wrong_password_is_dead_with_a_401_message(
    sessions: sessionmaker[Session], storage: Path, peers: list[Any], tmp_path: Path
) -> None:
    orthanc = start_orthanc(tmp_path, dicomweb=True, users={"node": "right-password"})
    peers.append(orthanc)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("right-password\n")
    bad.write_text("wrong-password\n")
    ok = add_result(sessions, storage, SR, dest="ok")
    refused = add_result(sessions, storage, SR, dest="refused")
    sender = make_sender(
        sessions,
        storage,
        dicomweb(orthanc.dicomweb_url, name="ok", username="node", password_file=good),
        dicomweb(orthanc.dicomweb_url, name="refused", username="node", password_file=bad),
    )
    assert sender.run_once() == 2
    assert outbox(sessions, ok).state is DeliveryState.DELIVERED
    dead = outbox(sessions, refused)
    assert dead.state is DeliveryState.DEAD
    assert dead.last_error is not None
    assert "HTTP 401" in dead.last_error and "password_file" in dead.last_error
    assert orthanc.sop_instance_uids() == {outbox(sessions, ok).sop_instance_uid}


def test_orthanc_down_is_retried_and_delivered_once_it_is_back(
    sessions: sessionmaker[Session], storage: Path, peers: list[Any], tmp_path: Path
) -> None:
    orthanc = start_orthanc(tmp_path, dicomweb=True)
    peers.append(orthanc)
    orthanc.stop()
    row = add_result(sessions, storage, KEY_IMAGE, dest="web")
    sender = make_sender(sessions, storage, dicomweb(orthanc.dicomweb_url))
    before = utcnow()
    assert sender.run_once() == 1
    pending = outbox(sessions, row)
    assert pending.state is DeliveryState.PENDING and pending.attempts == 1
    assert pending.last_error is not None and "could not reach" in pending.last_error
    assert pending.next_attempt_at > before
    assert sender.run_once() == 0  # not due yet

    orthanc.start()
    assert sender.run_once(now=later(301)) == 1  # past the longest backoff (retry_max_seconds 300)
    assert outbox(sessions, row).state is DeliveryState.DELIVERED
    assert outbox(sessions, row).sop_instance_uid in orthanc.sop_instance_uids()


def test_orthanc_refusing_one_object_of_a_batch_is_dead_and_the_rest_delivered(
    sessions: sessionmaker[Session], storage: Path, peers: list[Any], tmp_path: Path
) -> None:
    """A result file whose data set Orthanc cannot parse: HTTP 400 listing only the good object."""
    orthanc = start_orthanc(tmp_path, dicomweb=True)
    peers.append(orthanc)
    good = add_result(sessions, storage, SR, dest="web")
    broken = add_result(sessions, storage, SR, dest="web")
    path = storage / outbox(sessions, broken).path
    meta = read_file_meta_info(path)
    head = BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    path.write_bytes(head.getvalue() + b"\x08\x00\x16\x00UI\xff\xff" + b"garbage" * 10)
    sender = make_sender(sessions, storage, dicomweb(orthanc.dicomweb_url))
    assert sender.run_once() == 2
    assert outbox(sessions, good).state is DeliveryState.DELIVERED
    dead = outbox(sessions, broken)
    assert dead.state is DeliveryState.DEAD and "HTTP 400" in (dead.last_error or "")
    assert orthanc.sop_instance_uids() == {outbox(sessions, good).sop_instance_uid}


# --- a local STOW-RS endpoint that refuses chosen objects ------------------------------------------


@dataclass
class StowPeer:
    """``POST /dicom-web/studies`` on loopback: parses the multipart body, answers what it is told."""

    server: ThreadingHTTPServer
    answer: Any = None  # (status, content type, body) from the UIDs received
    requests: list[dict[str, Any]] = field(default_factory=list)
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stow_peer() -> Iterator[StowPeer]:
    with running_stow_peer() as peer:
        yield peer


@contextlib.contextmanager
def running_stow_peer(tls: ssl.SSLContext | None = None) -> Iterator[StowPeer]:
    """A :class:`StowPeer` on a free loopback port, over HTTPS with ``tls``."""
    peer: StowPeer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            content_type = self.headers["Content-Type"]
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + body
            )
            parts = [p for p in message.iter_parts()]
            uids = [str(dcmread(BytesIO(p.get_payload(decode=True))).SOPInstanceUID) for p in parts]
            peer.requests.append(
                {
                    "path": self.path,
                    "content_type": content_type,
                    "part_types": [p.get_content_type() for p in parts],
                    "uids": uids,
                    "authorization": self.headers.get("Authorization"),
                    "client_certificate": _peer_subject(self.connection),
                }
            )
            status, media, payload = peer.answer(uids)
            self.send_response(status)
            self.send_header("Content-Type", media)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    peer = StowPeer(server, scheme="https" if tls else "http")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        peer.stop()
        thread.join(10)


def _peer_subject(connection: Any) -> str | None:
    """The common name of the client's certificate on a TLS connection (None: none, or plain TCP)."""
    if not isinstance(connection, ssl.SSLSocket):
        return None
    certificate = connection.getpeercert()
    names = [
        value for rdn in (certificate or {}).get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    return names[0] if names else None


def test_peer_refusing_one_object_is_tracked_per_object(
    sessions: sessionmaker[Session], storage: Path, stow_peer: StowPeer, tmp_path: Path
) -> None:
    """202 with one object stored, one refused (0xC000: dead), one out of resources (0xA700: retried)."""
    rows = [add_result(sessions, storage, name, dest="web") for name in (SR, KEY_IMAGE, SR)]
    kept, refused, busy = (outbox(sessions, r).sop_instance_uid for r in rows)
    stow_peer.answer = lambda uids: (
        202,
        "application/dicom+json",
        json.dumps(stow_json([kept], {refused: 0xC000, busy: 0xA700})).encode(),
    )
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    sender = make_sender(sessions, storage, dicomweb(stow_peer.url, token_file=token))
    assert sender.run_once() == 3
    (request,) = stow_peer.requests
    assert request["path"] == "/dicom-web/studies"
    assert request["content_type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert request["part_types"] == ["application/dicom"] * 3
    assert request["uids"] == [kept, refused, busy]
    assert request["authorization"] == "Bearer s3cret-token"
    assert outbox(sessions, rows[0]).state is DeliveryState.DELIVERED
    dead = outbox(sessions, rows[1])
    assert dead.state is DeliveryState.DEAD and dead.last_status == 0xC000
    assert "0xC000" in (dead.last_error or "")
    pending = outbox(sessions, rows[2])
    assert pending.state is DeliveryState.PENDING and pending.last_status == 0xA700

    OutboxQueue(sessions, ["web"]).retry(job_id=dead.job_id)  # dicomnode retry, after the peer is fixed
    stow_peer.answer = lambda uids: (
        200, "application/dicom+xml", stow_xml(list(uids), {})
    )  # fmt: skip
    assert sender.run_once(now=later(301)) == 2
    assert {outbox(sessions, r).state for r in rows} == {DeliveryState.DELIVERED}
    assert sorted(stow_peer.requests[1]["uids"]) == sorted([refused, busy])


def test_409_and_server_errors(sessions: sessionmaker[Session], storage: Path, stow_peer: StowPeer) -> None:
    """409 naming the object's failure reason is dead with it; 503 and an unreadable 409 are as documented."""
    sender = make_sender(sessions, storage, dicomweb(stow_peer.url))
    row = add_result(sessions, storage, SR, dest="web")
    stow_peer.answer = lambda uids: (
        409,
        "application/dicom+json",
        json.dumps(stow_json([], {uids[0]: 0xA900})).encode(),
    )
    sender.run_once()
    dead = outbox(sessions, row)
    assert dead.state is DeliveryState.DEAD and dead.last_status == 0xA900

    row = add_result(sessions, storage, SR, dest="web")
    stow_peer.answer = lambda uids: (503, "text/plain", b"maintenance")
    sender.run_once()
    pending = outbox(sessions, row)
    assert pending.state is DeliveryState.PENDING and "HTTP 503" in (pending.last_error or "")

    row = add_result(sessions, storage, SR, dest="web")
    stow_peer.answer = lambda uids: (409, "text/plain", b"duplicate study")
    sender.run_once()
    dead = outbox(sessions, row)
    assert dead.state is DeliveryState.DEAD and "HTTP 409" in (dead.last_error or "")
    assert "duplicate study" in (dead.last_error or "")  # the peer's text is stored as its comment


def test_unlisted_object_after_202_is_retried(
    sessions: sessionmaker[Session], storage: Path, stow_peer: StowPeer
) -> None:
    sender = make_sender(sessions, storage, dicomweb(stow_peer.url))
    rows = [add_result(sessions, storage, SR, dest="web") for _ in range(2)]
    stow_peer.answer = lambda uids: (
        202,
        "application/dicom+json",
        json.dumps(stow_json([uids[0]], {})).encode(),
    )
    sender.run_once()
    assert [outbox(sessions, r).state for r in rows] == [DeliveryState.DELIVERED, DeliveryState.PENDING]


def test_https_verifies_the_server_against_the_ca_and_presents_our_certificate(
    sessions: sessionmaker[Session],
    storage: Path,
    pki: Path,  # noqa: F811 - the fixture imported from test_tls
) -> None:
    """[destinations.tls]: the CA bundle verifies the server; the client certificate is presented.
    Without it the system's CAs do not know the test CA: the handshake fails and the row is retried."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    server.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    server.verify_mode = ssl.CERT_REQUIRED
    with running_stow_peer(server) as peer:
        peer.answer = lambda uids: (200, "application/dicom+json", json.dumps(stow_json(uids, {})).encode())
        tls = DestinationTLSConfig(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        secure = add_result(sessions, storage, SR, dest="secure")
        unverified = add_result(sessions, storage, SR, dest="unverified")
        sender = make_sender(
            sessions,
            storage,
            dicomweb(peer.url, name="secure", tls=tls),
            dicomweb(peer.url, name="unverified"),
        )
        assert sender.run_once() == 2
    assert outbox(sessions, secure).state is DeliveryState.DELIVERED
    assert [r["client_certificate"] for r in peer.requests] == ["client"]
    pending = outbox(sessions, unverified)
    assert pending.state is DeliveryState.PENDING and "CERTIFICATE_VERIFY_FAILED" in (
        pending.last_error or ""
    )


def test_timeout_is_retried(sessions: sessionmaker[Session], storage: Path, tmp_path: Path) -> None:
    """A peer that accepts the connection and never answers: retried after delivery.timeout_seconds."""
    import socket

    from dicomnode.config import DeliveryConfig

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        policy = DeliveryConfig(5, 300, 72, 0.05, timeout_seconds=0.5)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        sender = make_sender(sessions, storage, dicomweb(url), policy=policy)
        row = add_result(sessions, storage, SR, dest="web")
        sender.run_once()
    pending = outbox(sessions, row)
    assert pending.state is DeliveryState.PENDING and "within 0.5 s" in (pending.last_error or "")


def test_connection_refused_is_retried(sessions: sessionmaker[Session], storage: Path) -> None:
    sender = make_sender(sessions, storage, dicomweb(f"http://127.0.0.1:{free_port()}/dicom-web"))
    row = add_result(sessions, storage, SR, dest="web")
    sender.run_once()
    assert outbox(sessions, row).state is DeliveryState.PENDING


# --- end to end: dicomnode serve -> STOW-RS -> Orthanc ----------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_serve_delivers_sr_and_key_image_by_stow_rs(
    tmp_path: Path,
    peers: list[Any],
    models_dir: Path,  # noqa: F811 - the fixture imported from test_e2e
) -> None:
    """A radiograph in by C-STORE; its SR and key image out by STOW-RS; every delivery row delivered."""
    orthanc = start_orthanc(tmp_path / "pacs", dicomweb=True)
    peers.append(orthanc)
    settings = {"destination_ae": "", "destination_port": 0, "destination_url": orthanc.dicomweb_url}
    with served_chest_study(tmp_path, peers, models_dir, orthanc, **settings) as (node, source):

        def delivered() -> list[dict[str, Any]] | None:
            study = study_entry(node, source.study_instance_uid)
            rows = study["deliveries"] if study else []
            return rows if rows and all(r["state"] == "delivered" for r in rows) else None

        rows = wait_for(delivered, "every delivery row delivered", 30.0, 0.5)
        assert {r["destination"] for r in rows} == {"pacs"}
