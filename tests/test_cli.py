"""The operator's command line: studies, status, echo, retry, help and configuration errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningListener
from factories import ct_like
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomnode.cli import main
from dicomnode.db import JobState
from dicomnode.status import Status

REPOSITORY = Path(__file__).resolve().parent.parent


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def toml_text(data: dict[str, Any]) -> str:
    """A small TOML writer for test configurations (tables, arrays of tables, scalars, lists)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not _is_table(value)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        elif _is_table(value):
            for item in value:
                lines.append(f"[[{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def write_config(tmp_path: Path, name: str = "config.toml", **sections: Any) -> Path:
    """Write the same configuration as ``conftest.make_config(tmp_path)`` (plus overrides) to a file."""
    data: dict[str, Any] = {
        "destinations": [],
        "node": {"port": 0, "host": "127.0.0.1", "min_free_disk_mb": 0},
        "storage": {"path": "var", "database_url": "sqlite:///var/dicomnode.db"},
        "studies": {"stable_after_seconds": 0},
    }
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    path = tmp_path / name
    path.write_text(toml_text(data), encoding="utf-8")
    return path


def send(port: int, ae_title: str, datasets: list[Any]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_studies_and_status_json(
    listener: RunningListener, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`studies --json` lists received studies newest first with their instances; `status --json` counts."""
    path = str(write_config(tmp_path))
    assert run_json(capsys, "--config", path, "studies", "--json") == []
    older, newer = generate_uid(), generate_uid()
    series = generate_uid()
    first = [ct_like(older, series, i) for i in range(2)]
    assert send(listener.port, listener.ae_title, first) == [Status.SUCCESS] * 2
    second = [ct_like(newer, generate_uid(), 0)]
    assert send(listener.port, listener.ae_title, second) == [Status.SUCCESS]

    studies = run_json(capsys, "--config", path, "studies", "--json")
    assert isinstance(studies, list)
    assert [s["study_instance_uid"] for s in studies] == [newer, older]
    for study in studies:
        assert {"study_instance_uid", "patient_id", "state", "instances"} <= set(study)
        assert study["patient_id"] == "TEST-0001"
        assert study["state"] == "receiving"
    instances = studies[1]["instances"]
    assert [i["sop_instance_uid"] for i in instances] == [str(ds.SOPInstanceUID) for ds in first]
    for item in instances:
        assert item["sop_class_uid"] == CTImageStorage
        assert item["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        assert Path(item["path"]).is_absolute()
        assert Path(item["path"]).is_file()
        assert item["path"].startswith(str(tmp_path / "var" / "instances" / older / series))

    queue = listener.services.queue
    assert len(queue.assemble_stable_studies(0, 3)) == 2
    studies = run_json(capsys, "--config", path, "studies", "--json")
    assert [s["state"] for s in studies] == ["queued", "queued"]

    status = run_json(capsys, "--config", path, "status", "--json")
    # no `serve` runs on this storage folder (the listener here is in-process), so the configured address
    assert status["listener"] == {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": 0, "running": False}
    assert (status["studies"], status["instances"]) == (2, 3)
    assert status["jobs"] == {state.value: 0 for state in JobState} | {"queued": 2}
    assert set(status["deliveries"]) == {"pending", "delivered", "dead", "committed", "commit-failed"}
    assert status["disk"]["used_bytes"] > 0
    assert status["destinations"] == []

    capsys.readouterr()
    assert main(["--config", path, "studies"]) == 0
    text = capsys.readouterr().out
    assert newer in text and older in text
    assert main(["--config", path, "status"]) == 0
    assert "studies: 2" in capsys.readouterr().out


def test_echo(listener: RunningListener, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`echo` succeeds against the running listener and fails (exit 1) on a closed port."""
    path = str(write_config(tmp_path))
    assert main(["--config", path, "echo", "127.0.0.1", str(listener.port), listener.ae_title]) == 0
    assert "success" in capsys.readouterr().out
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    code = main(["--config", path, "echo", "127.0.0.1", str(closed_port), "NOBODY", "--timeout", "5"])
    assert code == 1
    assert "failed" in capsys.readouterr().err


@pytest.mark.e2e
def test_echo_names_a_rejection_and_its_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Against dcmtk storescp --refuse (A-ASSOCIATE-RJ, then an immediate close), every try says
    "rejected" with result, source and reason, never "failed"."""
    from peers import start_storescp

    peer = start_storescp(tmp_path, "--refuse")
    try:
        path = str(write_config(tmp_path))
        for _ in range(10):
            assert main(["--config", path, "echo", "127.0.0.1", str(peer.port), peer.aet]) == 1
            err = capsys.readouterr().err
            assert (
                "association rejected (Rejected Permanent, source Service User, reason No reason given)"
                in err
            )
    finally:
        peer.stop()


def test_retry_unknown_target_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`retry` of a job id or study that does not exist requeues nothing and exits non-zero."""
    path = str(write_config(tmp_path))
    assert main(["--config", path, "db", "upgrade"]) == 0
    assert main(["--config", path, "retry", "1.2.3.4.5"]) != 0
    assert main(["--config", path, "retry", "4242"]) != 0
    assert "requeued 0 failed jobs and 0 deliveries" in capsys.readouterr().out


def test_retry_requeues_a_failed_job(services: Any, tmp_path: Path) -> None:
    """`retry STUDY_UID` queues the study's failed job again."""
    from test_queue import record

    path = str(write_config(tmp_path))
    queue = services.queue
    study = generate_uid()
    queue.record_instance(record(study))
    [job_id] = queue.assemble_stable_studies(0, 1)
    claimed = queue.claim("w", 30)
    assert claimed is not None and claimed.id == job_id
    assert queue.fail(claimed, "boom") == JobState.FAILED
    assert main(["--config", path, "retry", study]) == 0
    assert queue.claim("w", 30) is not None


def test_help_runs_as_a_module() -> None:
    """`python -m dicomnode --help` lists the commands."""
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stderr
    for command in ("serve", "studies", "status", "echo", "retry", "db", "rules"):
        assert command in result.stdout


def test_config_error_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad configuration exits 2 and names the key on stderr, in-process and as a real process."""
    path = write_config(tmp_path, node={"port": 70000})
    assert main(["--config", str(path), "status"]) == 2
    assert "node.port" in capsys.readouterr().err
    missing = tmp_path / "missing.toml"
    assert main(["--config", str(missing), "status"]) == 2
    assert "missing.toml" in capsys.readouterr().err
    bad_ae = write_config(tmp_path, name="bad-ae.toml", node={"ae_title": "X" * 17})
    result = subprocess.run(
        [sys.executable, "-m", "dicomnode", "--config", str(bad_ae), "studies", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPOSITORY,
    )
    assert result.returncode == 2
    assert "node.ae_title" in result.stderr
    assert result.stdout == ""
