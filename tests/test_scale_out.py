"""Beyond one machine: a receiver process and two GPU-worker processes around one PostgreSQL server.

As on three hosts: ``serve --roles listener,sender`` owns the spool, two ``serve --roles worker``
processes with their own ``node.instance_name`` share the database and the spool folder, a real
Orthanc is the PACS and dcmtk's storescu the modality. One worker host is killed with SIGKILL in the
middle of its batch; the other, started then, finds the queue it left: the rest of the jobs, and
the killed host's when their lease runs out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import (
    NodeProcess,
    orthanc_series,
    send_by_syntax,
    wait_for,
    write_node_config,
)
from peers import OrthancPeer, start_orthanc
from postgres import PostgresServer
from sqlalchemy import select
from test_e2e import make_radiographs, models_dir  # noqa: F401 - the session's installed default model

from dicomnode.db import Job, JobState, make_engine, make_sessionmaker

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE_SECONDS = 6.0
TIMEOUT = 300.0  # 16 studies on CPU workers sharing 2 cores with Orthanc, PostgreSQL and the listener


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancPeer]:
    peer = start_orthanc(tmp_path / "pacs")
    yield peer
    peer.stop()


def _config(
    folder: Path, name: str, instance_name: str, url: str, orthanc: OrthancPeer, models: Path
) -> Path:
    path = write_node_config(
        folder / name, models_dir=models, destination_ae=orthanc.aet, destination_port=orthanc.dicom_port
    )
    text = path.read_text(encoding="utf-8")
    text = text.replace('database_url = "sqlite:///var/dicomnode.db"', f'database_url = "{url}"')
    text = text.replace("[node]\n", f'[node]\ninstance_name = "{instance_name}"\n', 1)
    text = text.replace("[worker]\n", f"[worker]\nlease_seconds = {LEASE_SECONDS}\nmax_batch_size = 4\n", 1)
    path.write_text(text, encoding="utf-8")
    return path


class WorkerHost:
    """``serve --roles worker`` in its own process group, so SIGKILL takes the whole host down."""

    def __init__(self, config: Path) -> None:
        self.log_path = config.with_suffix(".log")
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "--config", str(config), "serve", "--roles", "worker"],
            cwd=config.parent,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def jobs_done(self) -> int:
        return len(re.findall(rb"job \d+ study \S+ done", self.log_path.read_bytes()))

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.log.close()


def test_two_worker_hosts_share_one_queue_and_survive_a_kill(
    tmp_path: Path,
    postgres_server: PostgresServer,
    orthanc: OrthancPeer,
    models_dir: Path,  # noqa: F811 - the fixture imported from test_e2e
) -> None:
    url = postgres_server.new_database()
    receiver = NodeProcess(
        _config(tmp_path, "receiver.toml", "receiver", url, orthanc, models_dir), "--roles", "listener,sender"
    )
    receiver.start()  # listener + sender; migrates the database
    # gpu-2 starts once gpu-1 is killed: started together, gpu-2 sometimes took every job left
    # before gpu-1 was seen running one after another (a timeout in CI), and the kill then had
    # nothing of gpu-1's to orphan. It finds the queue gpu-1 left, leases and all.
    workers = [WorkerHost(_config(tmp_path, "gpu-1.toml", "gpu-1", url, orthanc, models_dir))]
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        sources = make_radiographs(tmp_path / "modality")
        send_by_syntax(sources, receiver.port, receiver.ae_title)

        def running_on_gpu_1() -> bool:  # as an operator sees it: `dicomnode status` names the lease owners
            owners = receiver.cli_json("status", "--json")["running_on"]
            return workers[0].jobs_done() >= 1 and any(o.startswith("gpu-1/worker-") for o in owners)

        wait_for(running_on_gpu_1, "gpu-1 done with one job and running another", TIMEOUT, 0.1)
        workers[0].kill()  # mid-batch: its running jobs are orphaned until their lease runs out
        done_on_gpu_1 = workers[0].jobs_done()
        workers.append(WorkerHost(_config(tmp_path, "gpu-2.toml", "gpu-2", url, orthanc, models_dir)))

        def all_done() -> bool:
            with sessions() as session:
                states = session.scalars(select(Job.state)).all()
            return len(states) >= len(sources) and all(s == JobState.DONE for s in states)

        wait_for(all_done, "every job done", TIMEOUT, 0.5)

        def one_sr_each() -> bool:
            for source in sources:
                series = orthanc_series(orthanc, source.study_instance_uid)
                srs = [s for s in series if s.get("MainDicomTags", {}).get("Modality") == "SR"]
                if len(srs) != 1 or len(srs[0].get("Instances", [])) != 1:
                    return False
            return True

        wait_for(one_sr_each, "exactly one SR per study in Orthanc", TIMEOUT, 0.5)
        assert done_on_gpu_1 >= 1
        assert workers[1].jobs_done() >= 1
        with sessions() as session:
            jobs = session.scalars(select(Job)).all()
        assert len(jobs) == len({j.study_id for j in jobs}) == len(sources)
        assert any(j.attempts >= 2 for j in jobs), "a job of the killed host ran again"
        studies = receiver.cli_json("studies", "--json")
        assert {job["priority"] for study in studies for job in study["jobs"]} == {"routine"}
    finally:
        for worker in workers:
            worker.stop()
        assert receiver.stop() == 0, receiver.log_tail()
        engine.dispose()
