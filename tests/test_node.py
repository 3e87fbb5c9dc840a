"""The supervisor: what ``dicomnode serve`` hands to the processes it starts."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from e2e_helpers import wait_for, write_node_config

CLI = (sys.executable, "-m", "dicomnode")


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _argv(pid: int) -> list[str]:
    try:
        return [
            part for part in (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0") if part
        ]
    except OSError:
        return []


def test_log_level_override_reaches_every_child(tmp_path: Path) -> None:
    """``serve --log-level DEBUG`` starts its worker and sender with the same override."""
    config_path = write_node_config(
        tmp_path / "node.toml", models_dir=tmp_path / "models", destination_ae="PACS", destination_port=9
    )
    port_file = tmp_path / "node.port"
    log = (tmp_path / "node.log").open("wb")
    process = subprocess.Popen(
        [*CLI, "--config", str(config_path), "--log-level", "DEBUG", "serve", "--port-file", str(port_file)],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: port_file.exists() or None, "serve's port file", 60)

        def worker_and_sender() -> list[list[str]] | None:
            argvs = [_argv(pid) for pid in _children(process.pid)]
            commands = {argv[-1] for argv in argvs if argv}
            return argvs if {"worker", "sender"} <= commands else None

        argvs = wait_for(worker_and_sender, "worker and sender processes", 60)
        for argv in argvs:
            if argv and argv[-1] in ("worker", "sender"):
                assert argv[argv.index("--log-level") + 1] == "DEBUG", argv
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
    assert process.returncode == 0, (tmp_path / "node.log").read_text(errors="replace")[-3000:]


def test_unknown_role_is_refused_naming_the_valid_ones(tmp_path: Path) -> None:
    """``serve --roles`` names the roles it knows when given one it does not."""
    config_path = write_node_config(
        tmp_path / "node.toml", models_dir=tmp_path / "models", destination_ae="PACS", destination_port=9
    )
    result = subprocess.run(
        [*CLI, "--config", str(config_path), "serve", "--roles", "listener,gpu"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (
        "--roles" in result.stderr and "gpu" in result.stderr and "listener, worker, sender" in result.stderr
    )
