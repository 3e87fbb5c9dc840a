"""The PS3.15 A.5 audit trail: a refused calling AE, a received study and a delivered SR each leave
one message (parsed with lxml, required elements checked); ``dicomnode audit`` prints them; the
messages reach a syslog collector over TLS (RFC 5425 framing)."""

from __future__ import annotations

import json
import random
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import NodeProcess, storescu, wait_for
from lxml import etree
from peers import start_storescp
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode import audit
from dicomnode.config import DeliveryConfig, DestinationConfig
from dicomnode.db import DeliveryState, Job, Outbox, Study, utcnow
from dicomnode.deliver.sender import Sender
from dicomnode.node.services import Services

pytestmark = pytest.mark.timeout(180)

REQUIRED = ("EventIdentification/EventID", "ActiveParticipant/RoleIDCode", "AuditSourceIdentification")


def messages(path: Path) -> list[Any]:
    """Every line of the audit file parsed by lxml, each checked for the elements A.5 requires."""
    parsed = []
    for line in path.read_bytes().splitlines():
        root = etree.fromstring(line)
        assert root.tag == "AuditMessage"
        for required in REQUIRED:
            assert root.find(required) is not None, f"{required} missing in {line!r}"
        event = root.find("EventIdentification")
        assert event.get("EventActionCode") in ("C", "R", "U", "D", "E")
        assert event.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
        assert event.get("EventDateTime")
        for participant in root.findall("ActiveParticipant"):
            assert participant.get("UserID") and participant.get("UserIsRequestor") in ("true", "false")
        for code in root.iter("EventID", "EventTypeCode", "RoleIDCode", "ParticipantObjectIDTypeCode"):
            assert code.get("csd-code") and code.get("codeSystemName") and code.get("originalText")
        parsed.append(root)
    return parsed


def of_event(parsed: list[Any], code: str) -> list[Any]:
    return [m for m in parsed if m.find("EventIdentification/EventID").get("csd-code") == code]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """``serve --roles listener`` that accepts only the calling AE MODALITY."""
    config = tmp_path / "config.toml"
    config.write_text(
        'destinations = []\n[node]\nport = 0\nhost = "127.0.0.1"\nmin_free_disk_mb = 0\n'
        'allowed_calling_ae_titles = ["MODALITY", "DICOMNODE"]\n'
        '[storage]\npath = "var"\ndatabase_url = "sqlite:///var/dicomnode.db"\n[http]\nenabled = false\n',
        encoding="utf-8",
    )
    process = NodeProcess(config, "--roles", "listener")
    process.start()
    yield process
    process.stop()


def test_a_refused_ae_and_a_received_study_each_leave_one_message(node: NodeProcess) -> None:
    """Security Alert for INTRUDER, Instances Transferred (C) for the study, start and stop."""
    if shutil.which("echoscu") is None:
        pytest.skip("dcmtk echoscu is not installed")
    refused = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", node.ae_title, "127.0.0.1", str(node.port)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode != 0
    source = Path(str(get_testdata_file("CT_small.dcm")))
    storescu([source], node.port, node.ae_title, calling_ae="MODALITY")
    study_uid = str(dcmread(source, stop_before_pixels=True).StudyInstanceUID)
    path = node.workdir / "var" / "audit" / "audit.xml.log"
    wait_for(lambda: path.exists() and len(of_event(messages(path), "110104")) == 1, "transfer audit", 30.0)
    assert node.stop() == 0

    parsed = messages(path)
    (alert,) = of_event(parsed, "110113")
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert "not allowed" in alert.find("EventIdentification/EventOutcomeDescription").text
    peers = [p.get("UserID") for p in alert.findall("ActiveParticipant")]
    assert peers == ["INTRUDER", node.ae_title]

    (received,) = of_event(parsed, "110104")
    assert received.find("EventIdentification").get("EventActionCode") == "C"
    source_role = received.find("ActiveParticipant[@UserIsRequestor='true']")
    assert source_role.get("UserID") == "MODALITY"
    assert source_role.find("RoleIDCode").get("csd-code") == "110153"
    study = received.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']")
    assert study.get("ParticipantObjectID") == study_uid
    assert study.find("SOPClass").get("NumberOfInstances") == "1"
    assert received.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']") is not None

    activity = of_event(parsed, "110100")
    kinds = [m.find("EventIdentification/EventTypeCode").get("originalText") for m in activity]
    assert kinds == ["Application Start", "Application Stop"]

    printed = node.cli("audit", "--json")
    assert printed.returncode == 0, printed.stderr
    entries = json.loads(printed.stdout)
    assert [e["event"] for e in entries].count("DICOM Instances Transferred") == 1
    patient_id = str(dcmread(source, stop_before_pixels=True).PatientID)
    assert patient_id not in printed.stdout  # the CLI prints UIDs only
    assert node.cli("audit", "--since", "1h").returncode == 0
    assert json.loads(node.cli("audit", "--json", "--since", "2999-01-01").stdout) == []


def test_a_delivered_sr_leaves_one_message(services: Services, tmp_path: Path) -> None:
    """The sender's successful C-STORE of an SR: Instances Transferred (R), the PACS as destination."""
    peer = start_storescp(tmp_path)
    config = services.config
    try:
        dataset = dcmread(get_testdata_file("test-SR.dcm", read=False))  # type: ignore[arg-type]
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        study_uid = str(dataset.StudyInstanceUID)
        results = config.storage.path / "results"
        results.mkdir(parents=True, exist_ok=True)
        dataset.save_as(results / "sr.dcm")
        with services.sessions.begin() as session:  # the worker's commit, as test_sender builds it
            study = Study(study_instance_uid=study_uid)
            session.add(study)
            session.flush()
            job = Job(study_id=study.id)
            session.add(job)
            session.flush()
            session.add(
                Outbox(
                    job_id=job.id,
                    study_instance_uid=study_uid,
                    destination="pacs",
                    sop_instance_uid=dataset.SOPInstanceUID,
                    sop_class_uid=dataset.SOPClassUID,
                    path="results/sr.dcm",
                    state=DeliveryState.PENDING,
                    created_at=utcnow(),
                    next_attempt_at=utcnow(),
                )
            )
        destination = DestinationConfig(name="pacs", ae_title=peer.aet, host="127.0.0.1", port=peer.port)
        policy = DeliveryConfig(5, 300, 72, 0.05, 5)
        sender = Sender(
            policy,
            [destination],
            services.sessions,
            config.storage.path,
            ae_title="DICOMNODE",
            rng=random.Random(1),
        )
        audit.configure(config)
        try:
            assert sender.run_once() == 1
        finally:
            audit.shutdown()
        with services.sessions() as session:
            assert session.scalar(select(Outbox.state)) == DeliveryState.DELIVERED
    finally:
        peer.stop()
    (sent,) = of_event(messages(audit.audit_path(config)), "110104")
    assert sent.find("EventIdentification").get("EventActionCode") == "R"
    assert sent.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    destination_role = sent.find("ActiveParticipant[@UserIsRequestor='false']")
    assert destination_role.get("UserID") == peer.aet
    assert destination_role.find("RoleIDCode").get("csd-code") == "110152"
    study = sent.find("ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']")
    assert study.get("ParticipantObjectID") == study_uid
    assert study.find("SOPClass").get("UID") == str(dataset.SOPClassUID)


def test_messages_reach_a_syslog_collector_over_tls(tmp_path: Path) -> None:
    """RFC 5425: TLS, each RFC 5424 message prefixed by its length; the XML arrives intact."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    command = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    command += " -addext subjectAltName=IP:127.0.0.1 -keyout key.pem -out cert.pem"
    subprocess.run(command.split(), cwd=tmp_path, check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = socket.create_server(("127.0.0.1", 0))
    received = bytearray()
    done = threading.Event()

    def collect() -> None:
        connection, _ = server.accept()
        with context.wrap_socket(connection, server_side=True) as tls:
            while chunk := tls.recv(65536):
                received.extend(chunk)
        done.set()

    threading.Thread(target=collect, daemon=True).start()
    from dicomnode.audit.syslog import SyslogSender

    sender = SyslogSender("127.0.0.1", server.getsockname()[1], ca_certificates=tmp_path / "cert.pem")
    sender.send(b"<AuditMessage><EventIdentification/></AuditMessage>")
    sender.close()
    assert done.wait(30)
    length, _, rest = bytes(received).partition(b" ")
    assert int(length) == len(rest)
    assert rest.startswith(b"<85>1 ") and b" dicomnode " in rest and b"IHE+RFC-3881" in rest
    assert rest.endswith(b"\xef\xbb\xbf<AuditMessage><EventIdentification/></AuditMessage>")
    server.close()
