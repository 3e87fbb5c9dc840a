"""Ingest benchmark: C-STORE throughput of dicomnode against dcmtk storescp and Orthanc.

Generates two workloads in a temporary folder (500 CT-like 512x512 16-bit instances, 50 DX-like
2048x2048 16-bit radiographs, explicit VR little endian), then sends each with dcmtk ``storescu``
over one association and over four parallel associations (the files dealt into four groups, four
``storescu`` processes at once) to each receiver:

* ``storescp``  dcmtk's reference SCP writing files (``-od``); ``--fork`` for parallel associations,
  since a single-process storescp serves one association at a time. It does not fsync.
* ``dicomnode`` ``dicomnode serve`` (fsync of file and folder, SQLite row committed before success).
* ``orthanc``   ``/usr/sbin/Orthanc`` (fsync of file, SQLite index committed before success).

* ``dicomnode-busy`` the same node with its worker busy: the default chest model installed, a queue
  of chest radiographs (``--busy-studies``, 1024x1024 PA views) sent first, and the clock started
  only once the worker has finished a job (torch loaded, the model running); the queue must still
  hold jobs when the send ends, else the cell is flagged. Targets: >= 0.8x idle dicomnode, >= 1.2x
  Orthanc.

Every measurement gets a fresh receiver with empty storage, started and idle before the clock starts.
Wall time runs from starting the storescu processes until all have exited; then every instance is
checked to have arrived (files for storescp, ``dicomnode studies --json``, Orthanc ``/statistics``).
Compare ratios within one run, never absolute numbers across machines.

    python benchmarks/ingest.py [--quick] [--receivers storescp,dicomnode,dicomnode-busy,orthanc]
                                [--json OUT] [--repeat N] [--busy-studies N]
                                [--dicomnode-set node.max_pdu_size=0 ...]

``--receivers dicomnode,dicomnode-polled --workloads CT --associations 1`` measures the HTTP
process's cost: the same node while a client polls ``/api/status`` and ``/metrics`` at 10 Hz.

``PYTHONPATH=/some/copy`` runs a modified copy of the dicomnode package (it is started with
``python -m dicomnode``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workloads import Workload, generate_dx, generate_workloads

HOST = "127.0.0.1"
CALLING_AE = "BENCHSCU"
ORTHANC_BINARY = "/usr/sbin/Orthanc"
ALL_RECEIVERS = ("storescp", "dicomnode", "dicomnode-busy", "orthanc")
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"  # the default model, for dicomnode-busy
TARGET_VS_ORTHANC = 1.2  # dicomnode >= 1.2x Orthanc on every workload (with a busy worker too)
TARGET_BUSY_VS_IDLE = 0.8  # dicomnode with its worker busy >= 0.8x dicomnode with an idle one
TARGET_VS_STORESCP_CT_SINGLE = 0.5  # dicomnode >= 0.5x storescp on CT over one association
TARGET_POLLED_VS_QUIET = 0.95  # /api/status and /metrics polled at 10 Hz cost ingest at most 5 %
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Measurement:
    """One send of one workload to one receiver."""

    receiver: str
    workload: str
    associations: int
    instances: int
    bytes: int
    seconds: float
    received: int

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds


# --- process helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Any, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` at the deadline or when ``process`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {process.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def echo_ok(ae_title: str, port: int) -> bool:
    result = subprocess.run(
        ["echoscu", "-aet", CALLING_AE, "-aec", ae_title, "-to", "5", HOST, str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def _group_cpu_ticks(pgid: int) -> int:
    """User+system clock ticks of every live process in process group ``pgid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:  # fields[0] is the state; pgrp is field 5 of stat
            total += int(fields[11]) + int(fields[12])
    return total


def wait_idle(pgid: int, timeout: float = 60.0, window: float = 0.5, max_share: float = 0.05) -> None:
    """Wait until the receiver's processes use under ``max_share`` of a core (imports, migrations done)."""
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout
    before = _group_cpu_ticks(pgid)
    while time.monotonic() < deadline:
        time.sleep(window)
        after = _group_cpu_ticks(pgid)
        if (after - before) / hz / window < max_share:
            return
        before = after
    print(f"  warning: receiver still busy after {timeout:.0f} s; measuring anyway", file=sys.stderr)


class Receiver:
    """A C-STORE SCP under test, started in its own process group with empty storage."""

    name = "receiver"
    ae_title = "RECEIVER"

    def __init__(self, workdir: Path, parallel: bool) -> None:
        self.workdir = workdir
        self.parallel = parallel
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return DCMTK_ENV

    def ready(self) -> bool:
        return echo_ok(self.ae_title, self.port)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        wait_until(self.ready, 120.0, f"{self.name} start", self.process)
        wait_idle(self.process.pid)

    def received(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        """SIGTERM the receiver's process group, SIGKILL it after 30 s."""
        process = self.process
        if process is None:
            return
        self.process = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(process.pid, signal.SIGKILL)


class StoreSCP(Receiver):
    name = "storescp"
    ae_title = "STORESCP"

    def command(self) -> list[str]:
        self.port = free_port()
        self.output = self.workdir / "received"
        self.output.mkdir(parents=True, exist_ok=True)
        fork = ["--fork"] if self.parallel else []
        return [
            "storescp",
            *fork,
            "-aet",
            self.ae_title,
            "-pdu",
            "131072",
            "-od",
            str(self.output),
            str(self.port),
        ]

    def received(self) -> int:
        return sum(1 for p in self.output.iterdir() if p.is_file())


class StoreSCPSingle(StoreSCP):
    """storescp without ``--fork`` even for parallel associations: shows that it serialises them."""

    name = "storescp-single"

    def command(self) -> list[str]:
        self.parallel = False
        return super().command()


class DicomNode(Receiver):
    name = "dicomnode"
    ae_title = "DICOMNODE"
    overrides: Sequence[str] = ()

    def _config(self) -> str:
        storage = self.workdir / "storage"
        sections: dict[str, dict[str, str]] = {
            "node": {
                "ae_title": f'"{self.ae_title}"',
                "host": f'"{HOST}"',
                "port": "0",
                "min_free_disk_mb": "0",
            },
            "storage": {"path": f'"{storage}"', "database_url": f'"sqlite:///{storage}/db.sqlite"'},
            "studies": {"stable_after_seconds": "3600"},
            "worker": {"poll_interval_seconds": "60"},
            "logging": {"level": '"INFO"'},
            "http": {"port": "0"},  # the HTTP process runs (as in production) on a free port
        }
        for override in self.overrides:
            key, _, value = override.partition("=")
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
        lines = ["destinations = []", ""]
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {v}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)

    def command(self) -> list[str]:
        self.config = self.workdir / "dicomnode.toml"
        self.config.write_text(self._config())
        self.port_file = self.workdir / "port"
        return [
            sys.executable,
            "-m",
            "dicomnode",
            "--config",
            str(self.config),
            "serve",
            "--port-file",
            str(self.port_file),
        ]

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        if not self.port_file.exists():
            return False
        text = self.port_file.read_text().strip()
        if not text:
            return False
        self.port = int(text)
        return echo_ok(self.ae_title, self.port)

    def received(self) -> int:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "dicomnode",
                "--config",
                str(self.config),
                "--log-level",
                "WARNING",
                "studies",
                "--json",
            ],
            capture_output=True,
            check=True,
        ).stdout
        return sum(len(study["instances"]) for study in json.loads(out))


class DicomNodeBusy(DicomNode):
    """dicomnode whose worker runs the chest model on a queue of studies throughout the send."""

    name = "dicomnode-busy"
    queue: Workload | None = None  # the chest studies sent (untimed) before the measured send
    models_dir = MODELS_DIR

    def _config(self) -> str:
        busy = [f'models.path="{self.models_dir}"', "studies.stable_after_seconds=0.5"]
        busy.append("worker.poll_interval_seconds=0.5")
        self.overrides = [*busy, *self.overrides]
        return super()._config()

    def _jobs(self) -> dict[str, int]:
        """Jobs by state, read from the node's SQLite file (cheaper than ``dicomnode studies``)."""
        path = self.workdir / "storage" / "db.sqlite"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute("SELECT lower(state), count(*) FROM jobs GROUP BY 1").fetchall()
        return {str(state): int(count) for state, count in rows}

    def load(self, logdir: Path) -> None:
        """Send the chest queue and wait until the worker has finished a job (model loaded)."""
        assert self.queue is not None
        send(self, self.queue.split(2), logdir)

        def one_done() -> bool:
            try:
                return self._jobs().get("done", 0) > 0
            except sqlite3.Error:
                return False

        wait_until(one_done, 300.0, "dicomnode-busy: first job done", self.process)

    def still_busy(self) -> int:
        """Jobs queued or running now (after the measured send)."""
        jobs = self._jobs()
        return jobs.get("queued", 0) + jobs.get("running", 0)

    def received(self) -> int:
        assert self.queue is not None
        return super().received() - self.queue.count


class Orthanc(Receiver):
    name = "orthanc"
    ae_title = "ORTHANC"

    def command(self) -> list[str]:
        self.port = free_port()
        self.http_port = free_port()
        config = {
            "Name": "benchmark",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return [ORTHANC_BINARY, str(path)]

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=5) as response:
            return json.load(response)

    def ready(self) -> bool:
        try:
            self._get("/system")
        except OSError:
            return False
        return echo_ok(self.ae_title, self.port)

    def received(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DicomNodePolled(DicomNode):
    """dicomnode while a client polls ``/api/status`` and ``/metrics`` 10 times a second each.

    The polling starts once the node is idle (before the clock) and stops with it; the HTTP process
    must not slow ingest (target: within 5 % of ``dicomnode`` on CT x1).
    """

    name = "dicomnode-polled"
    poll_hz = 10.0

    def start(self) -> None:
        super().start()
        state = json.loads((self.workdir / "storage" / "http.json").read_text())
        self.http_port = int(state["port"])
        self.http_pid = int(state["pid"])
        self.http_cpu_at_start = _cpu_seconds(self.http_pid)
        self.polling_since = time.monotonic()
        self.polls = 0
        self.poll_errors = 0
        self.latencies: list[float] = []
        self._stop_polling = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        """One keep-alive connection, as Prometheus and browsers use; reconnect after an error."""
        period = 1.0 / self.poll_hz
        next_at = time.monotonic()
        connection = self._connect()
        while not self._stop_polling.is_set():
            for path in ("/api/status", "/metrics"):
                started = time.perf_counter()
                try:
                    connection.request("GET", path)
                    connection.getresponse().read()
                    self.latencies.append(time.perf_counter() - started)
                    self.polls += 1
                except (OSError, http.client.HTTPException):
                    self.poll_errors += 1
                    connection.close()
                    connection = self._connect()
            next_at += period
            self._stop_polling.wait(max(0.0, next_at - time.monotonic()))
        connection.close()

    def _connect(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(HOST, self.http_port, timeout=5)
        connection.connect()
        assert connection.sock is not None
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stalls
        return connection

    def stop(self) -> None:
        if hasattr(self, "_stop_polling"):
            self._stop_polling.set()
            self._poller.join(10)
            used = _cpu_seconds(self.http_pid) - self.http_cpu_at_start
            window = time.monotonic() - self.polling_since
            print(
                f"    HTTP process: {used:.2f} CPU-s in {window:.1f} s of polling "
                f"({100 * used / window:.1f} % of one core)",
                flush=True,
            )
            if self.latencies:
                ordered = sorted(self.latencies)
                p95 = ordered[int(0.95 * (len(ordered) - 1))]
                print(
                    f"    polled {self.polls} times ({self.poll_errors} errors), "
                    f"p95 {p95 * 1000:.1f} ms per request",
                    flush=True,
                )
        super().stop()


RECEIVER_CLASSES: dict[str, type[Receiver]] = {
    "storescp": StoreSCP,
    "storescp-single": StoreSCPSingle,
    "dicomnode": DicomNode,
    "dicomnode-busy": DicomNodeBusy,
    "dicomnode-polled": DicomNodePolled,
    "orthanc": Orthanc,
}


# --- sending -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def running(receiver: Receiver) -> Iterator[Receiver]:
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.stop()


def send(receiver: Receiver, groups: list[list[Path]], logdir: Path) -> float:
    """Send each group over its own association, all at once; seconds until every storescu exited."""
    processes: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        started = time.perf_counter()
        for index, files in enumerate(groups):
            log = (logdir / f"storescu-{receiver.name}-{index}.log").open("wb")
            logs.append(log)
            argv = ["storescu", "-aet", CALLING_AE, "-aec", receiver.ae_title, HOST, str(receiver.port)]
            processes.append(
                subprocess.Popen(
                    [*argv, *map(str, files)], stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV
                )
            )
        codes = [p.wait() for p in processes]
        elapsed = time.perf_counter() - started
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if any(codes):
        raise RuntimeError(f"storescu to {receiver.name} exited with {codes}; see {logdir}")
    return elapsed


def measure(
    name: str, workload: Workload, associations: int, root: Path, overrides: Sequence[str]
) -> Measurement:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{workload.name}-{associations}-", dir=root))
    receiver = RECEIVER_CLASSES[name](workdir, parallel=associations > 1)
    if isinstance(receiver, DicomNode):
        receiver.overrides = overrides
    try:
        with running(receiver):
            if isinstance(receiver, DicomNodeBusy):
                receiver.load(workdir)
            seconds = send(receiver, workload.split(associations), workdir)
            if isinstance(receiver, DicomNodeBusy) and receiver.still_busy() == 0:
                print(f"  warning: {name}'s worker ran out of jobs during the send", file=sys.stderr)
            received = receiver.received()
    finally:
        shutil.rmtree(workdir / "storage", ignore_errors=True)
        shutil.rmtree(workdir / "received", ignore_errors=True)
        shutil.rmtree(workdir / "index", ignore_errors=True)
    if received != workload.count:
        raise RuntimeError(f"{name} holds {received} of {workload.count} {workload.name} instances")
    return Measurement(
        name, workload.name, associations, workload.count, workload.total_bytes, seconds, received
    )


# --- reporting ---------------------------------------------------------------------------------------


def _ratio(m: Measurement, rows: list[Measurement], reference: str) -> float | None:
    for r in rows:
        if (r.receiver, r.workload, r.associations) == (reference, m.workload, m.associations):
            return m.instances_per_second / r.instances_per_second
    return None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(rows: list[Measurement]) -> None:
    header = (
        f"{'receiver':<16}{'workload':<9}{'assoc':>5}{'inst/s':>10}{'MB/s':>9}{'seconds':>9}"
        f"{'vs storescp':>13}{'vs orthanc':>12}{'vs idle':>9}"
    )
    print(header)
    print("-" * len(header))
    for m in sorted(rows, key=lambda r: (r.workload, r.associations, r.receiver)):
        print(
            f"{m.receiver:<16}{m.workload:<9}{m.associations:>5}{m.instances_per_second:>10.1f}"
            f"{m.mb_per_second:>9.1f}{m.seconds:>9.2f}{_fmt(_ratio(m, rows, 'storescp')):>13}"
            f"{_fmt(_ratio(m, rows, 'orthanc')):>12}"
            f"{_fmt(_ratio(m, rows, 'dicomnode') if m.receiver == 'dicomnode-busy' else None):>9}"
        )


def check_targets(rows: list[Measurement]) -> list[dict[str, Any]]:
    """The performance targets, each with its measured ratio and whether it is met."""
    targets = []
    for m in rows:
        if m.receiver == "dicomnode-busy":
            for reference, floor in (("dicomnode", TARGET_BUSY_VS_IDLE), ("orthanc", TARGET_VS_ORTHANC)):
                ratio = _ratio(m, rows, reference)
                if ratio is not None:
                    targets.append(
                        {
                            "target": f"busy worker >= {floor}x {reference}, {m.workload} x{m.associations}",
                            "ratio": ratio,
                            "met": ratio >= floor,
                        }
                    )
        polled = _ratio(m, rows, "dicomnode") if m.receiver == "dicomnode-polled" else None
        if polled is not None:
            targets.append(
                {
                    "target": f"polled >= {TARGET_POLLED_VS_QUIET}x quiet, {m.workload} x{m.associations}",
                    "ratio": polled,
                    "met": polled >= TARGET_POLLED_VS_QUIET,
                }
            )
        if m.receiver != "dicomnode":
            continue
        vs_orthanc = _ratio(m, rows, "orthanc")
        if vs_orthanc is not None:
            targets.append(
                {
                    "target": f"dicomnode >= {TARGET_VS_ORTHANC}x orthanc, {m.workload} x{m.associations}",
                    "ratio": vs_orthanc,
                    "met": vs_orthanc >= TARGET_VS_ORTHANC,
                }
            )
        vs_storescp = _ratio(m, rows, "storescp")
        if m.workload == "CT" and m.associations == 1 and vs_storescp is not None:
            targets.append(
                {
                    "target": f"dicomnode >= {TARGET_VS_STORESCP_CT_SINGLE}x storescp, CT x1",
                    "ratio": vs_storescp,
                    "met": vs_storescp >= TARGET_VS_STORESCP_CT_SINGLE,
                }
            )
    print()
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'}  {t['target']:<45} measured {t['ratio']:.2f}x")
    return targets


def flush_floor(workload: Workload, directory: Path, count: int = 100) -> float:
    """Seconds per instance that durability alone costs on this disk, serially: write a new file of
    the workload's mean size, fdatasync it, fsync its folder. No network, no parsing, no index.

    Any receiver that answers Success only for data on disk pays at least this per instance on one
    association; storescp does not pay it at all.
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(workload.total_bytes // workload.count)
    folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    started = time.perf_counter()
    try:
        for index in range(count):
            fd = os.open(directory / f"{index}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view[: 256 * 1024]) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.fsync(folder)
    finally:
        os.close(folder)
        shutil.rmtree(directory, ignore_errors=True)
    return (time.perf_counter() - started) / count


def median_measurement(samples: list[Measurement]) -> Measurement:
    seconds = statistics.median(s.seconds for s in samples)
    first = samples[0]
    return Measurement(
        first.receiver,
        first.workload,
        first.associations,
        first.instances,
        first.bytes,
        seconds,
        first.received,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 CT and 10 DX instances")
    parser.add_argument(
        "--receivers",
        default=",".join(ALL_RECEIVERS),
        help=f"comma-separated, from {', '.join(RECEIVER_CLASSES)} (default: %(default)s)",
    )
    parser.add_argument("--workloads", default="CT,DX", help="comma-separated: CT, DX")
    parser.add_argument("--associations", default="1,4", help="comma-separated association counts")
    parser.add_argument("--repeat", type=int, default=1, help="sends per cell; the median is reported")
    parser.add_argument(
        "--dicomnode-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=TOML",
        help="extra dicomnode configuration, e.g. storage.sqlite_synchronous='\"NORMAL\"'",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the temporary folder (default: system temp)")
    parser.add_argument("--json", type=Path, help="write the measurements and targets here")
    parser.add_argument(
        "--busy-studies",
        type=int,
        help="chest studies queued for dicomnode-busy's worker before the send (default 120, --quick 60)",
    )
    parser.add_argument("--models", type=Path, default=MODELS_DIR, help="models folder for dicomnode-busy")
    args = parser.parse_args(argv)

    receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    unknown = [r for r in receivers if r not in RECEIVER_CLASSES]
    if unknown:
        parser.error(f"unknown receivers: {', '.join(unknown)}")
    if "orthanc" in receivers and not Path(ORTHANC_BINARY).exists():
        print(f"{ORTHANC_BINARY} not found: skipping orthanc", file=sys.stderr)
        receivers.remove("orthanc")
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"dcmtk's {tool} is required")
    associations = [int(a) for a in args.associations.split(",")]
    wanted = {w.strip().upper() for w in args.workloads.split(",")}
    ct_count, dx_count = (100, 10) if args.quick else (500, 50)
    if "dicomnode-busy" in receivers and not (args.models / "pneumonia-xception" / "model.toml").exists():
        parser.error(
            f"dicomnode-busy needs the default model in {args.models} (dicomnode models install-default)"
        )
    DicomNodeBusy.models_dir = args.models.resolve()

    rows: list[Measurement] = []
    floors: dict[str, float] = {}
    root = Path(tempfile.mkdtemp(prefix="dicomnode-ingest-", dir=args.workdir))
    try:
        workloads = [
            w
            for w in generate_workloads(root / "workloads", ct_count=ct_count, dx_count=dx_count)
            if w.name in wanted
        ]
        if "dicomnode-busy" in receivers:
            studies = args.busy_studies or (60 if args.quick else 120)
            DicomNodeBusy.queue = generate_dx(root / "queue", studies, size=1024, per_study=1, seed=2)
        for workload in workloads:
            for count in associations:
                for name in receivers:
                    samples = [
                        measure(name, workload, count, root, args.dicomnode_set) for _ in range(args.repeat)
                    ]
                    m = median_measurement(samples)
                    rows.append(m)
                    print(
                        f"  {name:<16}{workload.name} x{count}: {m.seconds:6.2f} s  "
                        f"{m.instances_per_second:7.1f} inst/s  {m.mb_per_second:6.1f} MB/s  "
                        f"({m.received}/{m.instances} verified)",
                        flush=True,
                    )
        floors = {w.name: flush_floor(w, root / "floor") for w in workloads}  # same disk, same run
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"ingest throughput ({os.cpu_count()} CPUs; compare ratios, not absolute numbers)")
    print_table(rows)
    print()
    print("durability floor on this disk (write + fdatasync + folder fsync, serially, nothing else):")
    for workload in workloads:
        ceiling = 1.0 / floors[workload.name]
        storescp = next(
            (r for r in rows if (r.receiver, r.workload, r.associations) == ("storescp", workload.name, 1)),
            None,
        )
        print(
            f"  {workload.name}: {floors[workload.name] * 1000:.2f} ms/instance (alone: {ceiling:.0f} inst/s)"
        )
        if storescp is not None:
            # storescp's time per instance (sender + receiver, no flush) plus the flush, serially:
            # what a receiver costing no more CPU than storescp would reach if it also flushed.
            bound = 1.0 / (1.0 / storescp.instances_per_second + floors[workload.name])
            print(
                f"     storescp's work + this flush, one association: at most {bound:.0f} inst/s "
                f"= {bound / storescp.instances_per_second:.2f}x storescp"
            )
    targets = check_targets(rows)
    if args.json:
        payload = {
            "cpus": os.cpu_count(),
            "durability_floor_seconds": floors,
            "overrides": args.dicomnode_set,
            "measurements": [
                {
                    **asdict(m),
                    "instances_per_second": m.instances_per_second,
                    "mb_per_second": m.mb_per_second,
                }
                for m in rows
            ],
            "targets": targets,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
