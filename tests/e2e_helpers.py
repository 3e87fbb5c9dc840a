"""Helpers for the end-to-end tests and the latency benchmark: a ``dicomnode serve`` subprocess,
chest radiographs wrapped into DICOM, dcmtk ``storescu`` as the modality, Orthanc look-ups.

Everything here uses real parts: the node runs as its own process with its own configuration file,
the modality is dcmtk, the PACS is Orthanc (``tests/peers.py``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PNEUMONIA_CODE = "233604007"

# storescu proposes only uncompressed syntaxes unless told which compressed one to offer.
STORESCU_FLAGS: dict[str, tuple[str, ...]] = {
    JPEGBaseline8Bit: ("-xy",),
    ExplicitVRLittleEndian: ("-xe",),
    JPEG2000Lossless: ("-xv",),
    RLELossless: ("-xr",),
}

T = TypeVar("T")


def wait_for(condition: Callable[[], T | None], what: str, timeout: float, interval: float = 0.2) -> T:
    """Poll ``condition`` until it returns something truthy; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


# --- test material ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One DICOM file the modality sends, with what the test knows about it."""

    path: Path
    study_instance_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    pneumonia: bool | None  # ground truth from the JPEG file name; None when unlabelled


def japanese_patient_name() -> str:
    """The ISO 2022 IR 87 patient name of pydicom's chrJapMulti.dcm."""
    charset_dir = Path(pydicom.__file__).parent / "data" / "charset_files"
    return str(pydicom.dcmread(charset_dir / "chrJapMulti.dcm", stop_before_pixels=True).PatientName)


# (Specific Character Set, Patient's Name) cycled over the radiographs: ASCII, UTF-8 and ISO 2022.
PATIENT_NAMES: list[tuple[str | list[str], str]] = [
    ("ISO_IR 192", "Müller^Jürgen"),
    ("", "Doe^Jane"),
    ("ISO_IR 192", "Ωμέγα^Αλφα"),
    ("ISO_IR 192", "Иванов^Пётр"),
]


def wrap_radiograph(
    jpeg_path: Path,
    out_path: Path,
    transfer_syntax_uid: str,
    *,
    character_set: str | list[str] = "",
    patient_name: str = "Anonymous^Child",
    patient_id: str = "E2E-0001",
) -> Source:
    """Wrap an 8-bit grayscale chest JPEG into a DX For Presentation instance (one study).

    JPEG baseline keeps the original JPEG bytes encapsulated; the other syntaxes store the decoded
    pixels (uncompressed, or re-encoded losslessly by pydicom).
    """
    jpeg = jpeg_path.read_bytes()
    image = Image.open(BytesIO(jpeg))
    if image.mode != "L":
        raise ValueError(f"{jpeg_path.name}: expected an 8-bit grayscale JPEG, got {image.mode}")
    pixels = np.asarray(image, dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = character_set
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "20200101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "E2E"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "dicomnode-e2e"
    ds.Modality = "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = "U"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "01"  # the source is a JPEG whatever we store it as
    ds.LossyImageCompressionRatio = f"{pixels.size / len(jpeg):.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    if transfer_syntax_uid == JPEGBaseline8Bit:
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.PixelData = pixels.tobytes()
        if transfer_syntax_uid != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax_uid, pixels)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    name = jpeg_path.name
    truth = True if "bacteria" in name or "virus" in name else False if name.startswith("NORMAL") else None
    return Source(out_path, ds.StudyInstanceUID, ds.SOPInstanceUID, transfer_syntax_uid, truth)


def raw_patient_name(path: Path) -> bytes:
    """Patient's Name exactly as encoded in the file (no character set decoding)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName"])
    element = ds.get_item("PatientName")
    assert element is not None, f"{path.name}: no Patient's Name"
    value = element.value
    return value if isinstance(value, bytes) else bytes(value or b"")


def storescu(
    files: Sequence[Path],
    port: int,
    called_ae: str,
    *,
    flags: Sequence[str] = (),
    calling_ae: str = "MODALITY",
    timeout: float = 120.0,
) -> None:
    """Send files with dcmtk storescu over one association; raise with its output if it fails."""
    command = [
        "storescu",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        *flags,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0 or "E:" in result.stderr:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stdout}{result.stderr}")


def send_by_syntax(
    sources: Sequence[Source], port: int, called_ae: str, *, calling_ae: str = "MODALITY"
) -> None:
    """One storescu association per transfer syntax, proposing that syntax."""
    by_syntax: dict[str, list[Path]] = {}
    for source in sources:
        by_syntax.setdefault(source.transfer_syntax_uid, []).append(source.path)
    for syntax, files in by_syntax.items():
        storescu(files, port, called_ae, flags=STORESCU_FLAGS.get(syntax, ()), calling_ae=calling_ae)


# --- the node as a subprocess -------------------------------------------------------------------------


def write_node_config(
    path: Path,
    *,
    models_dir: Path,
    destination_ae: str,
    destination_port: int,
    stable_after_seconds: float = 1.0,
    extra_routes: Sequence[dict[str, Any]] = (),
    destination_url: str = "",
    storage_commitment: bool = False,
) -> Path:
    """A TOML configuration with storage under ``path.parent`` and Orthanc as the only destination.

    With ``destination_url`` the destination is DICOMweb (STOW-RS to that base) instead of C-STORE;
    ``storage_commitment`` asks the (DIMSE) destination for Storage Commitment after delivery.
    """
    lines = [
        "[node]",
        "port = 0",
        'host = "127.0.0.1"',
        "min_free_disk_mb = 0",
        "",
        "[storage]",
        'path = "var"',
        'database_url = "sqlite:///var/dicomnode.db"',
        "",
        "[studies]",
        f"stable_after_seconds = {stable_after_seconds}",
        "",
        "[models]",
        f"path = {json.dumps(str(models_dir))}",
        "",
        "[worker]",
        "poll_interval_seconds = 0.2",
        "",
        "[http]",  # any free port: several nodes run at once in the tests
        "port = 0",
        "",
        "[delivery]",
        "retry_initial_seconds = 0.5",
        "retry_max_seconds = 2",
        "poll_interval_seconds = 0.2",
        "",
    ]
    default_route = {
        "name": "chest-radiograph",
        "model": "pneumonia-xception",
        "modality": ["CR", "DX"],
        "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.1", DX_FOR_PRESENTATION],
        "body_part_examined": ["CHEST", "THORAX"],
        "view_position": ["PA", "AP"],
    }
    for route in [*extra_routes, default_route]:
        lines.append("[[routes]]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in route.items())
        lines.append("")
    peer = (
        ['type = "dicomweb"', f"url = {json.dumps(destination_url)}"]
        if destination_url
        else [f'ae_title = "{destination_ae}"', 'host = "127.0.0.1"', f"port = {destination_port}"]
    )
    if storage_commitment:
        peer.append("storage_commitment = true")
    lines += ["[[destinations]]", 'name = "pacs"', *peer, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def serve_argv(config_path: Path, port_file: Path, *extra: str) -> list[str]:
    """``python -m dicomnode --config CFG serve --port-file PF``: the node as an operator starts it."""
    return [
        sys.executable,
        "-m",
        "dicomnode",
        "--config",
        str(config_path),
        "serve",
        "--port-file",
        str(port_file),
        *extra,
    ]


class NodeProcess:
    """``python -m dicomnode --config CFG serve --port-file PF`` with its log in a file."""

    def __init__(self, config_path: Path, *serve_args: str) -> None:
        self.config_path = config_path
        self.serve_args = serve_args  # e.g. ("--roles", "listener,sender")
        self.workdir = config_path.parent
        self.port_file = self.workdir / "node.port"
        self.log_path = self.workdir / "node.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ae_title = "DICOMNODE"

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a ``dicomnode`` command against this node's configuration."""
        return subprocess.run(
            [sys.executable, "-m", "dicomnode", "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
            check=False,
        )

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args)
        if result.returncode != 0:
            raise RuntimeError(
                f"dicomnode {' '.join(args)} exited {result.returncode}: {result.stderr[-2000:]}"
            )
        return json.loads(result.stdout)

    def start(self, timeout: float = 60.0) -> None:
        """Start serve and wait for its port file and a successful C-ECHO."""
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                serve_argv(self.config_path, self.port_file, *self.serve_args),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def port_written() -> int | None:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"dicomnode serve exited with {self.process.returncode}\n{self.log_tail()}"
                )
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            return int(text) if text.endswith(tuple("0123456789")) else None

        self.port = wait_for(port_written, "dicomnode serve port file", timeout, 0.05)
        wait_for(
            lambda: (
                self.cli("echo", "127.0.0.1", str(self.port), self.ae_title, "--timeout", "5").returncode == 0
            ),
            "C-ECHO to dicomnode",
            timeout,
        )

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; return the exit code (None if it was not running)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        code = self.process.returncode
        self.process = None
        return code

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def database_path(self) -> Path:
        return self.workdir / "var" / "dicomnode.db"


# --- Orthanc look-ups ---------------------------------------------------------------------------------


def wait_for_results(orthanc: Any, study_uids: list[str], timeout: float) -> None:
    """Until Orthanc holds an SR series and a key image (OT) series for every study."""
    missing = set(study_uids)

    def all_there() -> bool:
        for uid in sorted(missing):
            if {"SR", "OT"} <= orthanc_modalities(orthanc, uid):
                missing.discard(uid)
        return not missing

    wait_for(all_there, f"SR and key image in Orthanc for {len(study_uids)} studies", timeout, 0.5)


def study_entry(node: NodeProcess, study_instance_uid: str) -> dict[str, Any] | None:
    for study in node.cli_json("studies", "--json"):
        if study["study_instance_uid"] == study_instance_uid:
            return dict(study)
    return None


def orthanc_series(orthanc: Any, study_instance_uid: str) -> list[dict[str, Any]]:
    """Orthanc's series of a study (expanded), found by Study Instance UID."""
    body = json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True})
    return list(orthanc.rest("/tools/find", "POST", body))


def orthanc_modalities(orthanc: Any, study_instance_uid: str) -> set[str]:
    return {s["MainDicomTags"].get("Modality", "") for s in orthanc_series(orthanc, study_instance_uid)}


def orthanc_download_study(orthanc: Any, study_instance_uid: str, out_dir: Path) -> list[Path]:
    """Every instance Orthanc holds for the study, as files (``/instances/{id}/file``)."""
    import urllib.request

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for series in orthanc_series(orthanc, study_instance_uid):
        for instance_id in series["Instances"]:
            url = f"http://127.0.0.1:{orthanc.http_port}/instances/{instance_id}/file"
            with urllib.request.urlopen(url, timeout=10) as response:
                path = out_dir / f"{instance_id}.dcm"
                path.write_bytes(response.read())
                paths.append(path)
    return paths


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dicom3tools' dciodvfy starts with "Error" for a file."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def parse_time(value: str) -> float:
    """POSIX seconds of an ISO timestamp written by the node (naive means UTC)."""
    from datetime import UTC

    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def reference_probabilities(node: NodeProcess, files: Sequence[Path]) -> dict[Path, float]:
    """Pneumonia probability per file as ``dicomnode infer --json`` reports it (one call for all)."""
    result = node.cli("infer", "--json", *map(str, files), timeout=300.0)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"dicomnode infer exited {result.returncode}: {result.stderr[-2000:]}")
    probabilities = {}
    for item, path in zip(json.loads(result.stdout), files, strict=True):
        assert item["file"] == str(path)
        [finding] = [f for f in item["findings"] if f["label"] == "pneumonia"]
        probabilities[path] = float(finding["probability"])
    return probabilities


BROKEN_CARD = """\
name = "{name}"
version = "0.0.1"
display_name = "A model whose forward always raises (test only)"
task = "image-classification"
architecture = "torchscript"
weights = "model.ts"
output_activation = "sigmoid"

[architecture_parameters]
num_classes = 1
in_channels = 1

[[labels]]
name = "pneumonia"
code = "SCT:233604007"
code_meaning = "Pneumonia"
threshold = 0.5
output_index = 0

[preprocessing]
size = [64, 64]
channels = 1
"""


def write_broken_model(package_dir: Path) -> Path:
    """A TorchScript model package whose forward raises RuntimeError, to test crash isolation."""
    import torch

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.numel() > 0):
                raise RuntimeError("this model always fails")
            return x

    package_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the node still loads it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Broken()).save(str(package_dir / "model.ts"))
    (package_dir / "model.toml").write_text(BROKEN_CARD.format(name=package_dir.name), encoding="utf-8")
    return package_dir


@contextlib.contextmanager
def served_chest_study(
    tmp_path: Path, peers: list[Any], models_dir: Path, orthanc: Any, **settings: Any
) -> Iterator[tuple[NodeProcess, Source]]:
    """`dicomnode serve` on its own configuration (``settings`` as :func:`write_node_config` takes
    them, results to ``orthanc``), one chest radiograph sent in by storescu, and its SR and key image
    awaited in Orthanc; yields the running node and the source. ``before_send`` (a callable taking
    the started node) runs before the radiograph is sent. On failure the node's log is printed;
    otherwise the node must stop cleanly."""
    from corpus import pneumonia_images_dir

    before_send: Callable[[NodeProcess], None] | None = settings.pop("before_send", None)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    config = write_node_config(
        node_dir / "config.toml", models_dir=models_dir, stable_after_seconds=0.5, **settings
    )
    node = NodeProcess(config)
    peers.append(node)
    jpeg = sorted(pneumonia_images_dir().glob("person*.jpeg"))[0]
    source = wrap_radiograph(jpeg, tmp_path / "chest.dcm", ExplicitVRLittleEndian)
    try:
        node.start()
        if before_send is not None:
            before_send(node)
        storescu([source.path], node.port, node.ae_title)
        wait_for_results(orthanc, [source.study_instance_uid], 120.0)
        yield node, source
    except BaseException:
        print(node.log_tail())
        raise
    assert node.stop() == 0
