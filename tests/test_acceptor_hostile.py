"""The acceptor against hostile and sloppy peers: each test reproduces one fault a hostile-site test found.

Real parts only: a real listener on 127.0.0.1 port 0, raw sockets, dcmtk ``echoscu`` and pynetdicom.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from conftest import RunningListener, make_config
from corpus import find
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from test_upper_layer import CT, associate_rq, command_set, p_data, parse_command, read_pdu

from dicomnode.db import Instance
from dicomnode.net.association import UNLIMITED_PDU_CAP
from dicomnode.net.dimse import C_ECHO_RQ, C_STORE_RQ, NO_DATA_SET
from dicomnode.net.dul import FIRST_CHUNK
from dicomnode.node.services import open_services

RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


@contextmanager
def running(tmp_path: Path, **node: Any) -> Iterator[RunningListener]:
    """A listener with the given [node] keys."""
    services = open_services(make_config(tmp_path, node=node), upgrade=True)
    listener = RunningListener(services)
    try:
        yield listener
    finally:
        listener.stop()
        services.close()


def connect(listener: RunningListener) -> socket.socket:
    return socket.create_connection(("127.0.0.1", listener.port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes ``sock`` (EOF or reset) within ``seconds``; data read is discarded."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def wait_for(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def echoscu(listener: RunningListener, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", listener.ae_title, "127.0.0.1", str(listener.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def rq_with_items(pdu: bytes, edit: Any) -> bytes:
    """An A-ASSOCIATE-RQ whose items (type, value) were passed through ``edit``; lengths recomputed."""
    fixed, offset, items = pdu[6:74], 74, []
    while offset < len(pdu):
        item_type, length = struct.unpack_from(">BxH", pdu, offset)
        items.append((item_type, pdu[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    body = fixed + b"".join(struct.pack(">BxH", t, len(v)) + v for t, v in edit(items))
    return struct.pack(">BxL", 0x01, len(body)) + body


def with_titles(pdu: bytes, called: bytes, calling: bytes) -> bytes:
    return pdu[:10] + called.ljust(16, b" ") + calling.ljust(16, b" ") + pdu[42:]


def echo(sock: socket.socket, context_id: int = 1, message_id: int = 1) -> Any:
    request = command_set(
        AffectedSOPClassUID="1.2.840.10008.1.1",
        CommandField=C_ECHO_RQ,
        MessageID=message_id,
        CommandDataSetType=NO_DATA_SET,
    )
    sock.sendall(p_data(context_id, 0x03, request))
    pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x04
    return parse_command(body[6:])


# -- item 2: idle connections and the association limit --


def test_idle_connections_do_not_take_association_slots(tmp_path: Path) -> None:
    """Three sockets that never send an A-ASSOCIATE-RQ leave both of two association slots free."""
    with running(tmp_path, max_associations=2) as listener:
        idle = [connect(listener) for _ in range(3)]
        try:
            result = echoscu(listener)
            assert result.returncode == 0, result.stderr
        finally:
            for sock in idle:
                sock.close()


def test_connections_over_the_pending_cap_are_closed_at_once_without_a_thread(tmp_path: Path) -> None:
    """Past max_pending_connections a connection is closed at once; threads stay bounded."""
    with running(tmp_path, max_pending_connections=3) as listener:
        before = threading.active_count()
        idle = [connect(listener) for _ in range(3)]
        assert wait_for(lambda: listener.server.open_connections == 3)
        extra = [connect(listener) for _ in range(20)]
        try:
            assert all(closed_within(sock, 5) for sock in extra)
            assert not any(closed_within(sock, 0.05) for sock in idle)
            assert threading.active_count() <= before + 3
            assert listener.server.open_connections == 3
        finally:
            for sock in idle + extra:
                sock.close()
        assert wait_for(lambda: listener.server.open_connections == 0)
        result = echoscu(listener)
        assert result.returncode == 0, result.stderr


# -- item 12: ARTIM bounds the whole association request --


def test_trickling_peer_is_closed_at_artim(tmp_path: Path) -> None:
    """One byte every 0.2 s does not keep the connection beyond a 1 s ARTIM."""
    with running(tmp_path, artim_timeout_seconds=1) as listener:
        request = associate_rq(listener.ae_title, [CT])
        with connect(listener) as sock:
            started = time.monotonic()
            closed = False
            for byte in request:
                try:
                    sock.sendall(bytes((byte,)))
                except OSError:
                    closed = True
                    break
                if closed_within(sock, 0.2):
                    closed = True
                    break
            elapsed = time.monotonic() - started
        assert closed
        assert 0.9 <= elapsed < 3.0


# -- item 11: memory follows the bytes that arrive, not the lengths announced --


def test_announced_pdu_lengths_do_not_allocate_memory(tmp_path: Path) -> None:
    """Eight associations announcing the 64 MiB cap allocate about FIRST_CHUNK each, not 64 MiB."""
    with running(tmp_path, max_pdu_size=0) as listener:
        socks = []
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for _ in range(8):
                sock = connect(listener)
                sock.sendall(associate_rq(listener.ae_title, [CT]))
                assert read_pdu(sock)[0] == 0x02
                sock.sendall(struct.pack(">BxL", 0x04, UNLIMITED_PDU_CAP) + b"\x00" * 10)
                socks.append(sock)
            # the listener has read every header once each first chunk is allocated
            assert wait_for(lambda: tracemalloc.get_traced_memory()[0] - baseline >= 8 * FIRST_CHUNK)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
            for sock in socks:
                sock.close()
        assert peak < 8 * (FIRST_CHUNK + 512 * 1024)  # the old listener took 8 x 64 MiB here


def test_pdu_longer_than_offered_is_aborted(tmp_path: Path) -> None:
    """A P-DATA-TF over our Maximum Length (or over the cap with "unlimited") is A-ABORT reason 6."""
    for max_pdu, announced in ((1048576, 64 * 1024 * 1024), (1048576, 1048577), (0, 0xFFFFFFFF)):
        with running(tmp_path, max_pdu_size=max_pdu) as listener, connect(listener) as sock:
            sock.sendall(associate_rq(listener.ae_title, [CT]))
            assert read_pdu(sock)[0] == 0x02
            sock.sendall(struct.pack(">BxL", 0x04, announced))
            pdu_type, body = read_pdu(sock)
            assert (pdu_type, body[2:]) == (0x07, b"\x02\x06"), (max_pdu, announced)


# -- item 14: failures answered, not tracebacks --


def test_non_ascii_uid_in_a_store_command_gets_a_failure_status(listener: RunningListener) -> None:
    """A byte outside ASCII in Affected SOP Instance UID is answered 0xC001; the association survives."""
    with connect(listener) as sock:
        sock.sendall(associate_rq(listener.ae_title, [CT]))
        assert read_pdu(sock)[0] == 0x02
        store_rq = command_set(
            AffectedSOPClassUID=CT,
            CommandField=C_STORE_RQ,
            MessageID=5,
            Priority=0,
            CommandDataSetType=0x0000,
            AffectedSOPInstanceUID="1.2.3",
        ).replace(b"1.2.3\x00", b"1.\xe9.3\x00")
        sock.sendall(p_data(1, 0x03, store_rq) + p_data(1, 0x02, b"\x08\x00\x16\x00\x00\x00\x00\x00"))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04
        response = parse_command(body[6:])
        assert (response.Status, response.MessageIDBeingRespondedTo) == (0xC001, 5)
        assert "AffectedSOPInstanceUID" not in response
        assert echo(sock, message_id=6).Status == 0x0000
        sock.sendall(RELEASE_RQ)
        assert read_pdu(sock)[0] == 0x06


def test_presentation_context_without_a_transfer_syntax_is_aborted_with_reason_6(
    listener: RunningListener,
) -> None:
    """A presentation context item missing its transfer-syntax (or abstract-syntax) sub-item: A-ABORT 6."""

    def strip(keep: int) -> Any:
        def edit(items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
            edited = []
            for item_type, value in items:
                if item_type == 0x20:
                    sub, offset = [], 4
                    while offset < len(value):
                        sub_type, length = struct.unpack_from(">BxH", value, offset)
                        if sub_type == keep:
                            sub.append(value[offset : offset + 4 + length])
                        offset += 4 + length
                    value = value[:4] + b"".join(sub)
                edited.append((item_type, value))
            return edited

        return edit

    for keep in (0x30, 0x40):
        with connect(listener) as sock:
            sock.sendall(rq_with_items(associate_rq(listener.ae_title, [CT]), strip(keep)))
            pdu_type, body = read_pdu(sock)
            assert (pdu_type, body[2:]) == (0x07, b"\x02\x06")


def test_unknown_command_field_is_aborted(listener: RunningListener) -> None:
    """Command Field 0x1234 has no response command: A-ABORT from the service user, no 0x9234."""
    with connect(listener) as sock:
        sock.sendall(associate_rq(listener.ae_title, [CT]))
        assert read_pdu(sock)[0] == 0x02
        unknown = command_set(
            AffectedSOPClassUID=CT, CommandField=0x1234, MessageID=3, CommandDataSetType=NO_DATA_SET
        )
        sock.sendall(p_data(1, 0x03, unknown))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x07 and body[2] == 0x00  # A-ABORT, source: service user
    result = echoscu(listener)
    assert result.returncode == 0, result.stderr


# -- item 15: tolerant of what real devices send --


def test_unknown_user_information_sub_item_is_ignored(listener: RunningListener) -> None:
    """A user-information sub-item of type 0x5F is skipped, as dcmtk and Orthanc do."""

    def add_sub_item(items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        return [(t, v + b"\x5f\x00\x00\x03abc" if t == 0x50 else v) for t, v in items]

    with connect(listener) as sock:
        sock.sendall(rq_with_items(associate_rq(listener.ae_title, [CT]), add_sub_item))
        assert read_pdu(sock)[0] == 0x02


def test_nul_padded_and_non_ascii_ae_titles(tmp_path: Path) -> None:
    """A NUL-padded called AE matches; a non-ASCII calling AE is accepted, or rejected by an allow-list."""
    with running(tmp_path / "open") as listener, connect(listener) as sock:
        request = with_titles(associate_rq(listener.ae_title, [CT]), b"DICOMNODE\x00\x00", b"CT\xe9SCAN\x00")
        sock.sendall(request)
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x02
        assert body[4:36] == request[10:42]  # the titles are returned as they came
        assert echo(sock).Status == 0x0000
    with running(tmp_path / "closed", allowed_calling_ae_titles=["MODALITY"]) as listener:
        with connect(listener) as sock:
            sock.sendall(with_titles(associate_rq(listener.ae_title, [CT]), b"DICOMNODE", b"\xff\x01\n"))
            pdu_type, body = read_pdu(sock)
            assert (pdu_type, body[1:4]) == (0x03, b"\x01\x01\x03")  # calling AE not recognised
        result = echoscu(listener, calling="MODALITY")
        assert result.returncode == 0, result.stderr


def test_echo_on_a_storage_context_succeeds(listener: RunningListener) -> None:
    """C-ECHO on a CT Image Storage context is answered 0x0000, as dcmtk, Orthanc and pynetdicom do."""
    with connect(listener) as sock:
        sock.sendall(associate_rq(listener.ae_title, [CT]))
        assert read_pdu(sock)[0] == 0x02
        assert echo(sock).Status == 0x0000


def test_command_set_with_an_element_outside_group_0000_is_tolerated(listener: RunningListener) -> None:
    """An element of group 0008 inside a command set is skipped, not an abort."""
    with connect(listener) as sock:
        sock.sendall(associate_rq(listener.ae_title, ["1.2.840.10008.1.1"]))
        assert read_pdu(sock)[0] == 0x02
        request = command_set(
            AffectedSOPClassUID="1.2.840.10008.1.1",
            CommandField=C_ECHO_RQ,
            MessageID=9,
            CommandDataSetType=NO_DATA_SET,
        )
        stray = struct.pack("<HHL", 0x0008, 0x0060, 2) + b"CT"
        request = request[:8] + struct.pack("<L", len(request) - 12 + len(stray)) + request[12:] + stray
        sock.sendall(p_data(1, 0x03, request))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04
        response = parse_command(body[6:])
        assert (response.Status, response.MessageIDBeingRespondedTo) == (0x0000, 9)


# -- item 16: the sender's transfer syntax is kept --


def send_as_file(listener: RunningListener, path: Path, syntaxes: list[str]) -> str:
    """Send ``path`` unparsed over one context proposing ``syntaxes``; the accepted transfer syntax."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ComputedRadiographyImageStorage, syntaxes)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title)
    assert assoc.is_established
    [context] = assoc.accepted_contexts
    accepted = str(context.transfer_syntax[0])
    if accepted == str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID):
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assert assoc.send_c_store(path).Status == 0x0000
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
    assoc.release()
    return accepted


def test_senders_first_proposed_transfer_syntax_is_chosen_and_kept(tmp_path: Path) -> None:
    """One context proposing JPEG 2000 Lossless before uncompressed ones gets JPEG 2000; stored as sent."""
    source = find("RG1_J2KR.dcm")
    proposed = [JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    with running(tmp_path / "sender") as listener:
        assert send_as_file(listener, source, proposed) == JPEG2000Lossless
        with listener.services.sessions() as session:
            [row] = session.query(Instance).all()
        assert row.transfer_syntax_uid == JPEG2000Lossless
        stored = pydicom.dcmread(listener.store.absolute(row.path))
        assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert stored.PixelData == pydicom.dcmread(source).PixelData
    with running(tmp_path / "uncompressed", transfer_syntax_preference="uncompressed") as listener:
        assert send_as_file(listener, source, proposed) == ExplicitVRLittleEndian
