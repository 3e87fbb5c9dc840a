"""Real DICOM peers for tests: dcmtk ``storescp`` and Orthanc, on free loopback ports.

Each helper starts the process, waits (with a deadline) until it listens, and stops it again;
``stop()`` is safe to call twice, so fixtures call it in their teardown.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    """A TCP port nothing listens on right now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    """True when a socket is in LISTEN state on ``port`` (read from /proc, no connection made)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
                return True
    return False


def _wait_until(
    condition: Any, what: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with {process.returncode}: {tail}")
        time.sleep(0.02)
    tail = log.read_text(errors="replace")[-2000:]
    raise TimeoutError(f"{what} did not come up within {timeout} s: {tail}")


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class StorescpPeer:
    """dcmtk storescp writing received objects into ``output_dir``."""

    port: int
    output_dir: Path
    flags: tuple[str, ...]
    aet: str = "STORESCP"
    log_path: Path = field(default=Path("storescp.log"))
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart on the same port) and wait until it listens."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["storescp", "-aet", self.aet, "-od", str(self.output_dir), *self.flags, str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_until(lambda: _listening(self.port), "storescp", self.process, self.log_path)

    def stop(self) -> None:
        _terminate(self.process)
        self.process = None

    def received(self) -> list[Path]:
        """Files storescp has written so far."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())


def start_storescp(tmp_path: Path, *flags: str, port: int | None = None) -> StorescpPeer:
    """Start storescp on a free port with extra ``flags`` (e.g. ``--refuse``, ``+xa``)."""
    if shutil.which("storescp") is None:
        import pytest

        pytest.skip("dcmtk storescp is not installed")
    port = port or free_port()
    root = tmp_path / f"storescp-{port}"
    root.mkdir(parents=True, exist_ok=True)
    peer = StorescpPeer(
        port=port, output_dir=root / "received", flags=tuple(flags), log_path=root / "storescp.log"
    )
    peer.start()
    return peer


@dataclass
class OrthancPeer:
    """An Orthanc PACS with its own configuration, storage and index under a temporary folder."""

    dicom_port: int
    http_port: int
    config_path: Path
    log_path: Path
    aet: str = "ORTHANC"
    process: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=dict)  # RegisteredUsers, when authentication is on

    @property
    def dicomweb_url(self) -> str:
        """The STOW-RS base of the DICOMweb plugin (when started with ``dicomweb=True``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> None:
        """Start (or restart on the same ports) and wait until the REST API answers."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [ORTHANC_BINARY, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        _wait_until(self._answers, "Orthanc", self.process, self.log_path, timeout=30.0)
        _wait_until(lambda: _listening(self.dicom_port), "Orthanc DICOM", self.process, self.log_path)

    def stop(self) -> None:
        _terminate(self.process)
        self.process = None

    def rest(self, path: str, method: str = "GET", body: bytes | str | None = None) -> Any:
        """Call the REST API and return the decoded JSON answer."""
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            pair = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {pair}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every instance Orthanc holds."""
        instances = self.rest("/instances?expand")
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}

    def _answers(self) -> bool:
        try:
            self.rest("/system")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
        return True


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).exists()


def start_orthanc(
    tmp_path: Path, *, dicomweb: bool = False, users: dict[str, str] | None = None
) -> OrthancPeer:
    """Start Orthanc on free DICOM and HTTP ports with storage in ``tmp_path``; skip if not installed.

    ``dicomweb`` loads the DICOMweb plugin (Debian ``orthanc-dicomweb``) at ``/dicom-web``;
    ``users`` turns HTTP basic authentication on with these user names and passwords.
    """
    if not orthanc_available():
        import pytest

        pytest.skip("Orthanc is not installed")
    if dicomweb and not Path(ORTHANC_DICOMWEB_PLUGIN).exists():
        import pytest

        pytest.skip("Orthanc's DICOMweb plugin (orthanc-dicomweb) is not installed")
    root = tmp_path / "orthanc"
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = {
        "Name": "dicomnode-test",
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": users or {},
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "Plugins": [ORTHANC_DICOMWEB_PLUGIN] if dicomweb else [],
        "DicomModalities": {},
    }
    if dicomweb:
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    peer = OrthancPeer(
        dicom_port=dicom_port,
        http_port=http_port,
        config_path=config_path,
        log_path=root / "orthanc.log",
        users=dict(users or {}),
    )
    peer.start()
    return peer
