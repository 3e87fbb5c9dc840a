"""The upper-layer acceptor (PS3.8) against raw PDUs and pynetdicom requestors on loopback.

The everyday paths (C-ECHO, C-STORE with pynetdicom and storescu, TLS, limits) are covered by
test_listener and test_tls; these tests drive the protocol corners a real peer may hit.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunningListener, make_config
from factories import ct_like
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.db import Instance
from dicomnode.net.dimse import C_ECHO_RQ, C_STORE_RQ, NO_DATA_SET, decode_command, encode_response
from dicomnode.net.transport import AcceptorServer
from dicomnode.node.services import open_services
from dicomnode.receive.scp import StorageSCP, acceptor_settings

CT = "1.2.840.10008.5.1.4.1.1.2"


def associate_rq(
    called: str, contexts: list[str], *, max_pdu: int = 16384, context_name: str | None = None
) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = context_name or "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAWSCU"
    primitive.called_ae_title = called
    requested = []
    for index, abstract_syntax in enumerate(contexts):
        context = build_context(abstract_syntax, [ImplicitVRLittleEndian])
        context.context_id = 2 * index + 1
        requested.append(context)
    primitive.presentation_context_definition_list = requested
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exact(sock, 6)
    pdu_type, length = struct.unpack(">BxL", header)
    return pdu_type, recv_exact(sock, length)


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BxL", 0x04, len(item)) + item


def command_set(**elements: object) -> bytes:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    encoded = encode(ds, True, True)
    assert encoded is not None
    group_length = struct.pack("<HHLL", 0, 0, 4, len(encoded))
    return group_length + encoded


def parse_command(data: bytes) -> Dataset:
    fp = DicomBytesIO(data)
    fp.is_little_endian, fp.is_implicit_VR = True, True
    return read_dataset(fp, True, True)  # type: ignore[arg-type]


@pytest.fixture
def raw(listener: RunningListener) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", listener.port), timeout=10)
    yield sock
    sock.close()


def establish(sock: socket.socket, listener: RunningListener, contexts: list[str], **kwargs: object) -> None:
    sock.sendall(associate_rq(listener.ae_title, contexts, **kwargs))  # type: ignore[arg-type]
    pdu_type, _ = read_pdu(sock)
    assert pdu_type == 0x02  # A-ASSOCIATE-AC


def assert_listener_alive(listener: RunningListener) -> None:
    ae = AE(ae_title="CHECK")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_unrecognised_pdu_type_is_aborted_and_the_listener_survives(
    raw: socket.socket, listener: RunningListener
) -> None:
    raw.sendall(b"\x09\x00\x00\x00\x00\x00")
    pdu_type, body = read_pdu(raw)
    assert pdu_type == 0x07 and body[2:] == b"\x02\x01"  # A-ABORT, service provider, unrecognised PDU
    assert raw.recv(1) == b""
    assert_listener_alive(listener)


def test_oversized_pdu_before_association_is_aborted_without_reading_it(
    raw: socket.socket, listener: RunningListener
) -> None:
    raw.sendall(struct.pack(">BxL", 0x01, 0x7FFFFFFF))  # an A-ASSOCIATE-RQ "of 2 GiB"
    pdu_type, body = read_pdu(raw)
    assert pdu_type == 0x07 and body[2:] == b"\x02\x06"  # invalid PDU parameter value
    assert_listener_alive(listener)


def test_unknown_operation_gets_unrecognized_operation_status(
    raw: socket.socket, listener: RunningListener
) -> None:
    establish(raw, listener, [CT])
    find_rq = command_set(
        AffectedSOPClassUID=CT, CommandField=0x0020, MessageID=7, Priority=0, CommandDataSetType=NO_DATA_SET
    )
    raw.sendall(p_data(1, 0x03, find_rq))
    pdu_type, body = read_pdu(raw)
    assert pdu_type == 0x04
    response = parse_command(body[6:])
    assert response.CommandField == 0x8020
    assert response.MessageIDBeingRespondedTo == 7
    assert response.Status == 0x0211
    raw.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
    assert read_pdu(raw)[0] == 0x06


def test_p_data_on_a_context_never_accepted_is_aborted(raw: socket.socket, listener: RunningListener) -> None:
    establish(raw, listener, [CT])
    echo_rq = command_set(
        AffectedSOPClassUID=Verification, CommandField=C_ECHO_RQ, MessageID=1, CommandDataSetType=NO_DATA_SET
    )
    raw.sendall(p_data(99, 0x03, echo_rq))
    pdu_type, _ = read_pdu(raw)
    assert pdu_type == 0x07
    assert_listener_alive(listener)


def test_store_fragmented_into_tiny_pdus_and_response_fragmented_to_peer_maximum(
    raw: socket.socket, listener: RunningListener
) -> None:
    """Both directions honour small PDUs: a data set in 100-byte fragments, a response to a 24-byte peer."""
    establish(raw, listener, [CT], max_pdu=24)
    ds = ct_like(generate_uid(), generate_uid(), 0)
    data = encode(ds, True, True)
    assert data is not None
    store_rq = command_set(
        AffectedSOPClassUID=CT,
        CommandField=C_STORE_RQ,
        MessageID=3,
        Priority=0,
        CommandDataSetType=0x0000,
        AffectedSOPInstanceUID=ds.SOPInstanceUID,
    )
    for start in range(0, len(store_rq), 50):
        raw.sendall(
            p_data(1, 0x01 | (0x02 if start + 50 >= len(store_rq) else 0), store_rq[start : start + 50])
        )
    for start in range(0, len(data), 100):
        raw.sendall(p_data(1, 0x02 if start + 100 >= len(data) else 0x00, data[start : start + 100]))
    fragments = b""
    while True:
        pdu_type, body = read_pdu(raw)
        assert pdu_type == 0x04 and len(body) <= 24
        fragments += body[6:]
        if body[5] & 0x02:
            break
    response = parse_command(fragments)
    assert response.Status == 0x0000
    assert response.AffectedSOPInstanceUID == ds.SOPInstanceUID
    with listener.services.sessions() as session:
        [row] = session.query(Instance).all()
    assert row.sop_instance_uid == ds.SOPInstanceUID


def test_wrong_application_context_and_called_ae_are_rejected(listener: RunningListener) -> None:
    for request, reason in (
        (associate_rq(listener.ae_title, [CT], context_name="1.2.3.4"), b"\x01\x01\x02"),
        (associate_rq("NOT_US", [CT]), b"\x01\x01\x07"),
    ):
        with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
            sock.sendall(request)
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x03 and body[1:4] == reason  # A-ASSOCIATE-RJ result, source, reason


def test_silent_connection_is_closed_when_artim_expires(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    services = open_services(config, upgrade=True)
    store = services.store()
    settings = acceptor_settings(config.node)
    quick = dataclasses.replace(settings, artim_timeout=0.3)
    server = AcceptorServer(("127.0.0.1", 0), quick, StorageSCP(store, services.queue))
    server.start()
    try:
        with socket.create_connection(server.server_address, timeout=10) as sock:
            started = time.monotonic()
            assert sock.recv(16) == b""  # ARTIM expired: the node closes without an A-ABORT (AA-2)
            assert time.monotonic() - started < 5
        deadline = time.monotonic() + 5
        while server.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.open_connections == 0
    finally:
        server.shutdown(grace_seconds=1)
        store.close()
        services.close()


def test_role_selection_async_window_and_user_identity_are_accepted(listener: RunningListener) -> None:
    """Optional negotiation items a modality may send do not stop the association."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = build_role(CTImageStorage, scu_role=True)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"technologist"
    identity.positive_response_requested = True
    assoc = ae.associate(
        "127.0.0.1", listener.port, ae_title=listener.ae_title, ext_neg=[role, window, identity]
    )
    assert assoc.is_established
    ds = ct_like(generate_uid(), generate_uid(), 0)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def test_command_set_codec_round_trips_with_pydicom() -> None:
    uid = generate_uid()
    request = decode_command(
        command_set(
            AffectedSOPClassUID=CT,
            CommandField=C_STORE_RQ,
            MessageID=42,
            Priority=2,
            CommandDataSetType=0x0000,
            AffectedSOPInstanceUID=uid,
            MoveOriginatorApplicationEntityTitle="MOVER",
            MoveOriginatorMessageID=9,
        )
    )
    assert (request.command_field, request.message_id, request.has_data_set) == (C_STORE_RQ, 42, True)
    assert (request.affected_sop_class_uid, request.affected_sop_instance_uid) == (CT, uid)
    assert (request.move_originator_ae_title, request.move_originator_message_id) == ("MOVER", 9)
    response = parse_command(encode_response(request, 0xA700, error_comment="disk full"))
    assert response.CommandField == 0x8001
    assert response.MessageIDBeingRespondedTo == 42
    assert response.CommandDataSetType == NO_DATA_SET
    assert response.Status == 0xA700
    assert response.ErrorComment == "disk full"
    assert response.AffectedSOPInstanceUID == uid
    assert (
        response.CommandGroupLength == len(encode_response(request, 0xA700, error_comment="disk full")) - 12
    )
