"""A real PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` into a temporary folder.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/N/bin``). The server
runs as an unprivileged user when the tests run as root (PostgreSQL refuses to run as root),
listens on 127.0.0.1 on a free port and a private socket folder, and is stopped at the end of the
session. Each test gets its own database.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

SERVER_USER = "postgres"  # created by Debian's postgresql-common; the server's owner when we are root
START_TIMEOUT_SECONDS = 60.0


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None when there is none."""
    root = Path("/usr/lib/postgresql")  # Debian keeps the server binaries here, off PATH
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists() and (p / "pg_isready").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    found = shutil.which("initdb")
    return Path(found).parent if found and (Path(found).parent / "pg_isready").exists() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One throw-away PostgreSQL cluster; :meth:`new_database` hands out empty databases."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_file = self.root / "server.log"
        self.port = _free_port()
        self.user = SERVER_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._counter = itertools.count(1)

    def _run(self, argv: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self.user, "--", *command]
        # cwd: the server's own folder, which its user can enter (pg_ctl fails in a folder it cannot)
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=True, cwd=self.root
        )

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(["initdb", "-D", str(self.data_dir), "-U", self.user, "-A", "trust", "-E", "UTF8"])
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} "
            "-c fsync=on -c max_connections=200"
        )
        self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options, "start"])
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def new_database(self) -> str:
        """Create an empty database and return its SQLAlchemy URL (psycopg 3 driver)."""
        name = f"test_{next(self._counter)}"
        self._run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name])
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "stop"], timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
