"""DICOM TLS on the listener (PS3.15 BCP 195): real certificates made with openssl, real associations."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningListener, make_config
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.errors import ConfigurationError
from dicomnode.node.services import open_services

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    folder = tmp_path_factory.mktemp("pki")
    _run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=dicomnode test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=folder,
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        (folder / f"{name}.ext").write_text(extension + "\n", encoding="utf-8")
        _run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=folder,
        )
    return folder


def server_tls(pki: Path) -> dict[str, Any]:
    """[node] settings for a TLS listener that requires client certificates from the test CA."""
    return {
        "tls": {
            "certificate": str(pki / "server.crt"),
            "private_key": str(pki / "server.key"),
            "ca_certificates": str(pki / "ca.crt"),
        }
    }


def _client_context(pki: Path, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if with_certificate:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return context


def _echo(port: int, tls: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="DICOMNODE", tls_args=(tls, "127.0.0.1") if tls is not None else None
    )
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


@pytest.fixture
def tls_listener(pki: Path, tmp_path: Path) -> Iterator[RunningListener]:
    """A listener in this process with [node.tls] and client certificates required."""
    services = open_services(make_config(tmp_path, node=server_tls(pki)), upgrade=True)
    running = RunningListener(services)
    yield running
    running.stop()
    services.close()


def test_tls_listener_requires_a_certificate_signed_by_the_ca(
    pki: Path, tls_listener: RunningListener
) -> None:
    """With [node.tls] and a CA: a client with a CA-signed certificate gets C-ECHO; one without a
    certificate, or one speaking plain TCP, gets no association."""
    port = tls_listener.port
    assert _echo(port, _client_context(pki, with_certificate=True))
    assert not _echo(port, _client_context(pki, with_certificate=False))
    assert not _echo(port, None)
    assert _echo(port, _client_context(pki, with_certificate=True))  # still serving


def test_tls_configuration_errors_name_the_key(tmp_path: Path) -> None:
    """A missing key file or an unknown key in [node.tls] is reported with the key's name."""
    with pytest.raises(ConfigurationError) as excinfo:
        make_config(tmp_path, node={"tls": {"certificate": str(tmp_path / "nope.crt")}})
    assert excinfo.value.key == "node.tls.certificate"
    (tmp_path / "a.crt").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigurationError) as excinfo:
        make_config(tmp_path, node={"tls": {"certificate": str(tmp_path / "a.crt")}})
    assert excinfo.value.key == "node.tls.private_key"
    with pytest.raises(ConfigurationError) as excinfo:
        make_config(tmp_path, node={"tls": {"cipher": "x"}})
    assert excinfo.value.key == "node.tls.cipher"


def test_dcmtk_storescu_stores_over_tls(pki: Path, tls_listener: RunningListener) -> None:
    """dcmtk's storescu with +tls (a real modality tool) stores an instance over the TLS listener."""
    from corpus import find

    result = subprocess.run(
        [
            "storescu",
            "+tls",
            str(pki / "client.key"),
            str(pki / "client.crt"),
            "+cf",
            str(pki / "ca.crt"),
            "-aet",
            "MODALITY",
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(tls_listener.port),
            str(find("CT_small.dcm")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with tls_listener.services.sessions() as session:
        from dicomnode.db import Instance

        assert session.query(Instance).count() == 1


def test_results_reach_a_tls_destination(pki: Path, tmp_path: Path) -> None:
    """The sender speaks TLS to a destination with [destinations.tls]: it verifies the peer against the
    CA and presents the client certificate the peer requires; the result is stored there."""
    from test_sender import add_result, make_sender, outbox

    from dicomnode.config import DestinationConfig, DestinationTLSConfig
    from dicomnode.db import DeliveryState

    peer_config = make_config(
        tmp_path / "peer",
        node={"ae_title": "PACS", **server_tls(pki)},
    )
    peer_services = open_services(peer_config, upgrade=True)
    peer = RunningListener(peer_services)
    node_config = make_config(tmp_path / "node")
    node_services = open_services(node_config, upgrade=True)
    (node_config.storage.path / "results").mkdir(parents=True, exist_ok=True)
    try:
        tls = DestinationTLSConfig(pki / "ca.crt", pki / "client.crt", pki / "client.key")
        secure = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=peer.port, tls=tls)
        row = add_result(node_services.sessions, node_config.storage.path, "CT_small.dcm")
        assert make_sender(node_services.sessions, node_config.storage.path, secure).run_once() == 1
        assert outbox(node_services.sessions, row).state == DeliveryState.DELIVERED
        from dicomnode.db import Instance

        with peer_services.sessions() as session:
            assert session.query(Instance).count() == 1
        # without our certificate the peer refuses us: retried, not delivered
        anonymous = DestinationConfig(
            name="pacs",
            ae_title="PACS",
            host="127.0.0.1",
            port=peer.port,
            tls=DestinationTLSConfig(pki / "ca.crt", None, None),
        )
        second = add_result(node_services.sessions, node_config.storage.path, "CT_small.dcm")
        make_sender(node_services.sessions, node_config.storage.path, anonymous).run_once()
        assert outbox(node_services.sessions, second).state == DeliveryState.PENDING
    finally:
        peer.stop()
        peer_services.close()
        node_services.close()
