"""The first hour of a new user: each common mistake gets one line saying what to do and a non-zero exit.

The commands run as real processes (``python -m dicomnode``) so that the exit code and the words the
user reads are what is tested, not a function's return value.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_config
from pydicom.data import get_testdata_file
from test_cli import write_config

from dicomnode.cli.node import _warn_open_to_everyone
from dicomnode.lifecycle.demo import write_demo_dataset

REPOSITORY = Path(__file__).resolve().parent.parent
MODELS = REPOSITORY / "models"
DEFAULT_MODEL = MODELS / "pneumonia-xception"
CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


def dicomnode(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, with this checkout on the import path."""
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPOSITORY,
        env=env,
        check=False,
    )


@pytest.fixture
def not_dicom(tmp_path: Path) -> list[str]:
    """A Python file, a JPEG and a path that does not exist."""
    script = tmp_path / "script.py"
    script.write_text("print('hello')\n", encoding="utf-8")
    jpeg = tmp_path / "photo.jpg"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(jpeg)
    return [str(script), str(jpeg), str(tmp_path / "missing.dcm")]


def test_infer_and_rules_test_refuse_files_that_are_not_dicom(tmp_path: Path, not_dicom: list[str]) -> None:
    """Not-DICOM and missing files are errors (exit 1), worded alike by `infer` and `rules test`."""
    config = write_config(tmp_path, models={"path": str(MODELS)})
    messages = {}
    for command in (["infer"], ["rules", "test"]):
        run = dicomnode("--config", str(config), *command, *not_dicom)
        assert run.returncode == 1, run.stderr
        assert "no route matched" not in run.stdout + run.stderr
        lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert len(lines) == 3, run.stderr
        assert "script.py: not a DICOM file" in lines[0] and "give a DICOM file" in lines[0]
        assert "photo.jpg: not a DICOM file" in lines[1]
        assert "missing.dcm: no such file" in lines[2]
        messages[command[0]] = lines
        as_json = dicomnode("--config", str(config), *command, "--json", *not_dicom, str(CT_SMALL))
        assert as_json.returncode == 1, as_json.stderr
        items = json.loads(as_json.stdout)
        assert [bool(item["error"]) for item in items] == [True, True, True, False]
        assert "not a DICOM file" in items[0]["error"] and "no such file" in items[2]["error"]
    assert messages["infer"] == messages["rules"]  # one shared helper, one wording


def test_serve_on_a_port_in_use_says_so_and_warns_about_open_defaults(tmp_path: Path) -> None:
    """EADDRINUSE becomes one line naming the port and node.port; open defaults get one WARNING."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = write_config(tmp_path, node={"port": port, "host": "0.0.0.0", "min_free_disk_mb": 0})
        run = dicomnode("--config", str(config), "serve")
    assert run.returncode == 1, run.stderr
    assert f"port {port} is in use (node.port in {config})" in run.stderr
    assert "stop the other program or choose another port" in run.stderr
    assert "Traceback" not in run.stderr
    warnings = [line for line in run.stderr.splitlines() if "WARNING" in line and "allowed_calling" in line]
    assert len(warnings) == 1, run.stderr


def test_open_defaults_warning_only_when_reachable_by_anyone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No warning on loopback or with an allow list; one naming the key otherwise."""
    caplog.set_level(logging.WARNING, logger="dicomnode")
    _warn_open_to_everyone(make_config(tmp_path, node={"host": "127.0.0.1"}))
    _warn_open_to_everyone(
        make_config(tmp_path, node={"host": "0.0.0.0", "allowed_calling_ae_titles": ["CT1"]})
    )
    assert caplog.records == []
    _warn_open_to_everyone(make_config(tmp_path, node={"host": "0.0.0.0"}))
    assert len(caplog.records) == 1
    assert "node.allowed_calling_ae_titles is empty" in caplog.records[0].getMessage()


@pytest.mark.parametrize("command", ["status", "studies"])
def test_status_before_the_first_serve_says_how_to_create_the_database(tmp_path: Path, command: str) -> None:
    """No database yet: say where and which command creates it, instead of "no such table"."""
    config = write_config(tmp_path)
    run = dicomnode("--config", str(config), command)
    assert run.returncode == 1
    assert "no database yet at" in run.stderr and str(tmp_path / "var" / "dicomnode.db") in run.stderr
    assert "dicomnode serve" in run.stderr and "dicomnode db upgrade" in run.stderr
    assert "Traceback" not in run.stderr
    empty = tmp_path / "var" / "dicomnode.db"  # an empty file (a database without tables) alike
    empty.parent.mkdir(parents=True)
    empty.touch()
    run = dicomnode("--config", str(config), command)
    assert run.returncode == 1 and "no database yet" in run.stderr and "db upgrade" in run.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 16 demonstration radiographs and their labels.csv."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


def test_dataset_csv_mistakes_name_the_file_row_and_column(tmp_path: Path, demo: Path) -> None:
    """Missing file, missing column and a typo cell each get one line; evaluate stops before the model."""
    config = write_config(tmp_path, models={"path": str(MODELS)})
    missing = dicomnode("--config", str(config), "dataset", "check", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1 and "nope.csv: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr

    header, *rows = demo.read_text(encoding="utf-8").splitlines()
    columns = header.split(",")
    label = next(c for c in columns if c not in ("path", "sop_instance_uid", "split"))
    index = columns.index(label)
    no_path = tmp_path / "no-path.csv"
    no_path.write_text("file," + label + "\na.dcm,1\n", encoding="utf-8")
    run = dicomnode("--config", str(config), "dataset", "check", str(no_path))
    assert run.returncode == 1 and "no-path.csv" in run.stderr and "'path'" in run.stderr

    cells = rows[4].split(",")
    cells[index] = "O"  # the letter, for the digit zero
    typo = demo.parent / "typo.csv"
    typo.write_text("\n".join([header, *rows[:4], ",".join(cells), *rows[5:]]) + "\n", encoding="utf-8")
    for command in (["dataset", "check"], ["evaluate", "pneumonia-xception"]):
        run = dicomnode("--config", str(config), *command, str(typo))
        assert run.returncode == 1, run.stderr
        assert f"typo.csv row 6, column {label!r}: 'O' is not 0, 1 or empty" in run.stderr
        assert "configuration error" not in run.stderr and "Traceback" not in run.stderr


def test_threshold_refuses_a_sensitivity_given_as_a_percent(tmp_path: Path) -> None:
    """--sensitivity 95 is refused with the range and the fraction meant, before anything loads."""
    run = dicomnode("threshold", "pneumonia-xception", "labels.csv", "--sensitivity", "95")
    assert run.returncode == 2
    assert "must be between 0 and 1, not 95 (for 95 % write 0.95)" in run.stderr
    run = dicomnode("threshold", "pneumonia-xception", "labels.csv", "--sensitivity", "1.5x")
    assert run.returncode == 2 and "is not a number" in run.stderr


def test_missing_model_hint_names_the_model_asked_for(tmp_path: Path) -> None:
    """install-default is offered for the default model only; another name points to `models list`."""
    config = write_config(tmp_path, models={"path": str(tmp_path / "models")})
    other = dicomnode("--config", str(config), "models", "show", "chest-densenet")
    assert other.returncode == 1
    assert "'chest-densenet'" in other.stderr and "dicomnode models list" in other.stderr
    assert "install-default" not in other.stderr
    default = dicomnode("--config", str(config), "models", "show", "pneumonia-xception")
    assert default.returncode == 1 and "dicomnode models install-default" in default.stderr


@pytest.mark.skipif(not (DEFAULT_MODEL / "model.toml").exists(), reason="the default model is not installed")
def test_cuda_without_a_gpu_blames_the_setting_not_the_weights() -> None:
    """worker.device = "cuda" on a machine without one names worker.device and what to set instead."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    from dicomnode.errors import ConfigurationError
    from dicomnode.models import load_model_package
    from dicomnode.models.runner import ModelRunner

    with pytest.raises(ConfigurationError, match=r"worker\.device") as raised:
        ModelRunner(load_model_package(DEFAULT_MODEL), device="cuda")
    message = str(raised.value)
    assert "no CUDA GPU" in message and '"cpu"' in message and "weights" not in message


def _fake_debian(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of setup.sh beside fake dpkg/apt-get/sudo that log their calls: nothing real is installed."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(REPOSITORY / "scripts" / "setup.sh", copy / "scripts" / "setup.sh")
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "apt.log"
    scripts = {
        "dpkg": "exit 1",  # every package is missing
        "sudo": 'exec "$@"',
        "apt-get": f'echo "$*" >> {log}\n'
        'case "$*" in *install*) echo "E: Unable to locate package orthanc" >&2; exit 100;; esac',
    }
    for name, body in scripts.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
        (fake / name).chmod(0o755)
    return copy / "scripts" / "setup.sh", {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}


def test_setup_installs_test_packages_only_with_the_flag_and_stops_with_a_reason(tmp_path: Path) -> None:
    """setup.sh prints its step and what it installs; apt-get failing stops it with a message, exit 1;
    Orthanc, dicom3tools and PixelMed are asked for only with --test."""
    setup, env = _fake_debian(tmp_path)
    run = subprocess.run(
        ["bash", str(setup)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert run.returncode == 1
    assert "== [1/4] installing system packages: dcmtk python3-venv" in run.stdout
    assert "setup.sh: could not install dcmtk python3-venv with apt-get" in run.stderr
    assert "Unable to locate package" in run.stderr  # apt's own reason stays visible
    installs = [line for line in (tmp_path / "apt.log").read_text().splitlines() if "install" in line]
    assert installs and all("orthanc" not in line and "pixelmed" not in line for line in installs)
    assert not (setup.parent.parent / ".venv").exists()  # stopped at the failing step

    (tmp_path / "apt.log").unlink()
    run = subprocess.run(
        ["bash", str(setup), "--test"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert run.returncode == 1
    installs = [line for line in (tmp_path / "apt.log").read_text().splitlines() if "install" in line]
    assert any("orthanc" in line and "dicom3tools" in line and "pixelmed-apps" in line for line in installs)
    bad = subprocess.run(
        ["bash", str(setup), "--tests"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2 and "unknown option --tests" in bad.stderr


UNIT = REPOSITORY / "packaging" / "dicomnode.service"


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_serve_unprivileged_restarts_and_stops_gracefully() -> None:
    """The unit runs `dicomnode serve` as user dicomnode with its state folder, restarts, stops on SIGTERM."""
    settings = _unit_settings()
    assert settings["User"] == ["dicomnode"] and settings["Group"] == ["dicomnode"]
    assert settings["ExecStart"][0].endswith("/dicomnode serve")
    assert settings["StateDirectory"] == ["dicomnode"]  # /var/lib/dicomnode, owned by User=
    assert "DICOMNODE_CONFIG=/etc/dicomnode/config.toml" in settings["Environment"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["KillSignal"] == ["SIGTERM"] and settings["KillMode"] == ["mixed"]
    assert int(settings["TimeoutStopSec"][0]) > 30  # longer than serve's association grace period
    from dicomnode.config import load_config

    config = load_config(str(REPOSITORY / "packaging" / "config.toml"))
    assert str(config.storage.path) == "/var/lib/dicomnode"  # the StateDirectory


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this checkout's dicomnode)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    executable = Path(sys.executable).parent / "dicomnode"
    if not executable.exists():
        pytest.skip(f"{executable} is missing: the project is not installed in this environment")
    unit = tmp_path / "dicomnode.service"
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/opt/dicomnode/.venv/bin/dicomnode", str(executable)),
        encoding="utf-8",
    )
    run = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    ours = [line for line in (run.stdout + run.stderr).splitlines() if "dicomnode.service" in line]
    assert run.returncode == 0 and ours == [], run.stdout + run.stderr
