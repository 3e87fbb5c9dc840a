"""`dicomnode serve` as a real process: SIGKILL mid-transfer loses nothing acknowledged; SIGTERM is graceful.

The node runs as ``python -m dicomnode serve`` in its own session. Nothing here sleeps blindly: every
wait polls a condition (a counter, a file, /proc) under a deadline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from e2e_helpers import serve_argv, storescu, wait_for
from factories import ct_like, write
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from test_cli import write_config

from dicomnode.cli import main

REPOSITORY = Path(__file__).resolve().parent.parent
TRANSFER_SIZE = 400
KILL_AFTER_ACKNOWLEDGED = 150
SEND_BEFORE_WORKER_READY = 100

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


# --- /proc: the process tree, so that no child can outlive the test unnoticed ------------------------


@dataclass(frozen=True)
class Proc:
    """A process identified by pid and start time (pids are reused)."""

    pid: int
    start_time: str
    cmdline: str

    def alive(self) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.start_time and stat[1] not in ("Z", "X")


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) from /proc/PID/stat, or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), rest[0], rest[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[Proc]:
    """Every living process below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] not in ("Z", "X"):
                children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is not None:
            found.append(Proc(pid, stat[2], _cmdline(pid)))
        todo.extend(children.get(pid, []))
    return found


def processes_naming(text: str) -> list[Proc]:
    """Living processes whose command line contains ``text`` (e.g. the configuration path)."""
    result = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()) and text in _cmdline(int(entry.name)):
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] not in ("Z", "X"):
                result.append(Proc(int(entry.name), stat[2], _cmdline(int(entry.name))))
    return result


def has_open(pid: int, path: Path) -> bool:
    """True when process ``pid`` has ``path`` open."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


# --- the node as a real process ----------------------------------------------------------------------


@dataclass
class Node:
    """One `dicomnode serve` process tree on a configuration in tmp_path."""

    config_path: Path
    log_path: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen: list[Proc] = field(default_factory=list)

    @property
    def storage(self) -> Path:
        return self.config_path.parent / "var"

    @property
    def database(self) -> Path:
        return self.storage / "dicomnode.db"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.started[-1]

    def start(self) -> int:
        """Start serve; return its port once it listens."""
        port_file = self.config_path.parent / "port"
        port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                serve_argv(self.config_path, port_file),
                cwd=REPOSITORY,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(process)

        def port() -> int | None:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}:\n{self.log_tail()}")
            text = port_file.read_text() if port_file.exists() else ""
            return int(text) if text.endswith("\n") else None

        return int(wait_for(port, "serve to listen", 60, interval=0.01))

    def wait_worker_ready(self) -> Proc:
        """The worker child, once it is running its loop (it has opened the database)."""

        def ready() -> Proc | None:
            for proc in descendants(self.process.pid):
                if proc.cmdline.rstrip().endswith(" worker") and has_open(proc.pid, self.database):
                    return proc
            return None

        worker: Proc = wait_for(ready, "the worker to start", 60, interval=0.05)
        return worker

    def remember_tree(self) -> list[Proc]:
        tree = descendants(self.process.pid)
        self.seen.extend(tree)
        return tree

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def cleanup(self) -> None:
        """Kill whatever this test started and is still running (process groups, then stragglers)."""
        for process in self.started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        for proc in [*self.seen, *processes_naming(str(self.config_path))]:
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    config_path = write_config(
        tmp_path,
        studies={"stable_after_seconds": 3600},  # no job runs: only the receive path is exercised
        worker={"poll_interval_seconds": 0.1},
    )
    running = Node(config_path.resolve(), tmp_path / "serve.log")
    yield running
    running.cleanup()


def scu() -> AE:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.network_timeout = 120  # the transfer may pause while the node's worker starts
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae


def associate(port: int) -> Association:
    return scu().associate("127.0.0.1", port, ae_title="DICOMNODE")


def send_all(assoc: Association, datasets: Iterable[Any], acknowledged: list[str]) -> None:
    """Send until the association breaks, appending each SOP Instance UID answered 0x0000."""
    for ds in datasets:
        if not assoc.is_established:
            return
        try:
            status = assoc.send_c_store(ds)
        except Exception:  # the peer vanished mid-request
            return
        if "Status" in status and int(status.Status) == 0:
            acknowledged.append(str(ds.SOPInstanceUID))


def unblock_after_abort(assoc: Association) -> None:
    """Wake a C-STORE waiting for an answer from a peer that is gone.

    pynetdicom waits the whole DIMSE timeout for a response even after the connection dropped; once
    the association is aborted no answer can come, so an empty message ends the wait at once.
    """
    wait_for(lambda: not assoc.is_established, "the association to notice the dead peer", 30, interval=0.01)
    assoc.dimse.msg_queue.put((None, None))


def studies_json(config_path: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    capsys.readouterr()
    assert main(["--config", str(config_path), "studies", "--json"]) == 0
    result: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return result


def assert_stored(config_path: Path, uids: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every UID is listed by `dicomnode studies --json` with a readable file holding that instance."""
    listed = {
        i["sop_instance_uid"]: i for study in studies_json(config_path, capsys) for i in study["instances"]
    }
    missing = [uid for uid in uids if uid not in listed]
    assert not missing, f"{len(missing)} acknowledged instances lost, e.g. {missing[:3]}"
    for uid in uids:
        path = Path(listed[uid]["path"])
        assert path.is_file(), uid
        assert pydicom.dcmread(path).SOPInstanceUID == uid


def integrity_check(database: Path) -> str:
    connection = sqlite3.connect(database)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


def test_sigkill_mid_transfer_loses_nothing_acknowledged(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL of serve during a 400-instance transfer: children die, every 0x0000 survives the restart."""
    study, series = generate_uid(), generate_uid()
    sent: list[Any] = []
    worker_ready = threading.Event()

    def datasets() -> Iterator[Any]:  # made while the node fsyncs the previous one
        for index in range(TRANSFER_SIZE):
            if index == SEND_BEFORE_WORKER_READY:  # the kill must come after the worker's start-up
                worker_ready.wait(120)
            sent.append(ct_like(study, series, index, size=128))
            yield sent[-1]

    port = node.start()
    acknowledged: list[str] = []
    assoc = associate(port)
    assert assoc.is_established
    sender = threading.Thread(target=send_all, args=(assoc, datasets(), acknowledged), daemon=True)
    sender.start()
    try:
        # the worker must be past its start-up: see test_sigkill_while_the_worker_starts for why
        node.wait_worker_ready()
    finally:
        worker_ready.set()
    wait_for(lambda: len(acknowledged) >= KILL_AFTER_ACKNOWLEDGED, "150 acknowledged instances", 120, 0.001)
    tree = node.remember_tree()
    node.process.kill()  # SIGKILL the serve process only: its children must follow by themselves
    at_kill = len(acknowledged)
    assert node.process.wait(10) == -signal.SIGKILL
    unblock_after_abort(assoc)
    sender.join(30)
    assert not sender.is_alive()
    assert KILL_AFTER_ACKNOWLEDGED <= len(acknowledged) < TRANSFER_SIZE, "the kill did not land mid-transfer"
    assert len(acknowledged) - at_kill <= 1  # at most the answer already on the wire
    assert any(p.cmdline.rstrip().endswith(" worker") for p in tree)
    wait_for(lambda: not [p for p in tree if p.alive()], "serve's children to exit after SIGKILL", 30, 0.05)
    assert not processes_naming(str(node.config_path))

    port = node.start()  # the same storage and database
    assert not list(node.storage.rglob("*.tmp")), "interrupted writes left temporary files"
    assert_stored(node.config_path, acknowledged, capsys)
    on_disk = {str(p) for p in (node.storage / "instances").rglob("*.dcm")}
    listed_paths = {i["path"] for study in studies_json(node.config_path, capsys) for i in study["instances"]}
    # the instance in flight (written, killed before its row) was indexed at start, not left behind
    assert listed_paths == on_disk
    # the modality sends again what it is unsure of: acknowledged ones are not stored twice
    again = sent[len(acknowledged) - 5 : len(acknowledged) + 5]
    restart = associate(port)
    assert restart.is_established
    resent: list[str] = []
    send_all(restart, again, resent)
    restart.release()
    assert len(resent) == len(again)
    [listed] = studies_json(node.config_path, capsys)
    uids = [i["sop_instance_uid"] for i in listed["instances"]]
    assert len(uids) == len(set(uids))
    assert set(acknowledged) | set(resent) <= set(uids)
    node.remember_tree()
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(60) == 0, node.log_tail()
    assert integrity_check(node.database) == "ok"


def test_restart_indexes_a_file_that_never_got_its_row(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole instance file written without its row (a kill between rename and commit) is indexed
    when serve starts, a cut-short one is removed, both said in the log; the resend is a duplicate."""
    from dicomnode.receive.header import PREAMBLE, file_meta_information

    study, series = generate_uid(), generate_uid()
    datasets = [ct_like(study, series, i, size=32) for i in range(3)]
    port = node.start()
    acknowledged: list[str] = []
    assoc = associate(port)
    send_all(assoc, datasets[:1], acknowledged)
    assoc.release()
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(60) == 0, node.log_tail()
    folder = node.storage / "instances" / study / series
    for ds, cut in ((datasets[1], 0), (datasets[2], 50)):
        body = io.BytesIO()
        ds.save_as(body, implicit_vr=False, little_endian=True, enforce_file_format=False)
        meta = file_meta_information(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "MODALITY")
        data = PREAMBLE + meta + body.getvalue()
        (folder / f"{ds.SOPInstanceUID}.dcm").write_bytes(data[: len(data) - cut])
    port = node.start()
    assert "indexed 1 whole ones, removed 1" in node.log_tail()
    assert_stored(node.config_path, [*acknowledged, str(datasets[1].SOPInstanceUID)], capsys)
    assert not (folder / f"{datasets[2].SOPInstanceUID}.dcm").exists()
    resent: list[str] = []
    assoc = associate(port)
    send_all(assoc, datasets[1:], resent)  # the modality never got an answer for these: it resends
    assoc.release()
    assert len(resent) == 2
    [listed] = studies_json(node.config_path, capsys)
    assert sorted(i["sop_instance_uid"] for i in listed["instances"]) == sorted(
        str(d.SOPInstanceUID) for d in datasets
    )
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(60) == 0, node.log_tail()


def test_sigterm_lets_the_open_association_finish(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM: new associations are refused, the open one keeps storing, then serve exits 0."""
    study, series = generate_uid(), generate_uid()
    datasets = [ct_like(study, series, i, size=128) for i in range(20)]
    port = node.start()
    node.remember_tree()
    assoc = associate(port)
    assert assoc.is_established
    acknowledged: list[str] = []
    send_all(assoc, datasets[:10], acknowledged)
    assert len(acknowledged) == 10
    node.remember_tree()
    node.process.send_signal(signal.SIGTERM)

    def refused() -> bool:
        probe = associate(port)
        if probe.is_established:  # the signal is not handled yet
            probe.release()
            return False
        return True

    wait_for(refused, "serve to stop accepting associations", 30, 0.05)
    assert node.process.poll() is None, "serve exited with an association still open"
    send_all(assoc, datasets[10:], acknowledged)
    assert len(acknowledged) == 20
    assoc.release()
    assert assoc.is_released
    assert node.process.wait(60) == 0, node.log_tail()
    assert not [p for p in node.seen if p.alive()]
    assert_stored(node.config_path, acknowledged, capsys)
    assert integrity_check(node.database) == "ok"


def test_sigkill_while_the_worker_starts(node: Node) -> None:
    """A serve killed right after it starts its worker leaves no orphaned worker behind."""
    node.start()

    def worker() -> Proc | None:
        return next(
            (p for p in descendants(node.process.pid) if p.cmdline.rstrip().endswith(" worker")), None
        )

    child: Proc = wait_for(worker, "the worker process to be started", 30, interval=0.01)
    node.seen.append(child)
    node.process.kill()
    node.process.wait(10)

    def settled() -> bool:
        # gone (fixed), or orphaned and already in its loop with the database open (it will never stop)
        return not child.alive() or has_open(child.pid, node.database)

    wait_for(settled, "the orphaned worker to exit or settle", 60, 0.05)
    assert not child.alive(), "worker outlived its SIGKILLed serve"


def test_several_listener_processes_share_the_port(tmp_path: Path) -> None:
    """With node.listener_processes = 2, parallel associations are served by two processes on one port,
    every acknowledged instance is stored once, and SIGTERM stops them all with exit 0."""
    config_path = write_config(
        tmp_path, node={"listener_processes": 2}, studies={"stable_after_seconds": 3600}
    )
    node = Node(config_path.resolve(), tmp_path / "serve.log")
    try:
        port = node.start()

        def listening_pids() -> set[str] | None:
            lines = node.log_path.read_text(errors="replace").splitlines()
            pids = {line.split("[")[1].split("]")[0] for line in lines if "listening as DICOMNODE" in line}
            return pids if len(pids) == 2 else None

        wait_for(listening_pids, "two listener processes", 60, interval=0.01)
        study = generate_uid()
        # dcmtk storescu as the modalities: pynetdicom's requestor has a race (its reactor can take a
        # C-STORE response meant for send_c_store) that a fast acceptor under load makes visible.
        batches = [
            [
                write(ct_like(study, generate_uid(), i, size=32), tmp_path / "out" / f"{b}-{i}.dcm")
                for i in range(10)
            ]
            for b in range(8)
        ]
        results: list[int] = []
        errors: list[BaseException] = []

        def run(batch: list[Path]) -> None:
            try:  # three associations in a row per thread: 24 in all, at most 8 at once
                for part in (batch[:3], batch[3:6], batch[6:]):
                    storescu(part, port, "DICOMNODE")
                    results.append(len(part))
            except BaseException as exc:  # reported below with the node's log
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(b,)) for b in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, f"{errors!r}\n{node.log_tail()}"
        assert sum(results) == 80
        log = node.log_path.read_text(errors="replace").splitlines()
        serving = {line.split("[")[1].split("]")[0] for line in log if "association accepted" in line}
        assert len(serving) == 2  # the kernel spread the 24 associations over both processes
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(60) == 0
        with sqlite3.connect(node.database) as db:
            assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 80
    finally:
        node.cleanup()
