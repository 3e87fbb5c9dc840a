"""Scale-out benchmark: jobs/s of 1, 2 and 4 worker processes draining one queue, SQLite vs PostgreSQL.

The workers are the real :class:`dicomnode.queue.jobs.JobQueue` (claim, heartbeat, complete, each
its own transaction as in the worker) around a **stub model of fixed cost**, so what is measured
is the queue, not inference:

* ``--cost 0``: the queue's own cost per job (claim + heartbeat + complete, ms per job, 1 worker);
* ``--cost 0.02`` (default, sleep-based: an I/O-bound model stage): how 2 and 4 workers scale
  against 1 on the same database.

Each run gets a fresh database (a SQLite file under a temporary folder; a database on a
PostgreSQL server this script starts with ``initdb``/``pg_ctl`` from Debian's ``postgresql``)
filled with ``--jobs`` single-instance studies. It also counts the statements and commits each job
cost, which docs/scaling.md multiplies out to a fleet. Targets on 2 cores: the queue adds <= 5 ms per
job, and 2 workers give >= 1.7x one worker with the sleep-based stub.

    python benchmarks/scale.py [--jobs 400] [--cost 0.02] [--workers 1,2,4] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres import PostgresServer, postgres_bin_dir

from dicomnode import migrate
from dicomnode.db import make_engine, make_sessionmaker
from dicomnode.queue.jobs import InstanceRecord, JobQueue

LEASE_SECONDS = 60.0
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Run:
    backend: str
    workers: int
    cost_seconds: float
    jobs: int
    seconds: float
    statements_per_job: float
    commits_per_job: float

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds


def fill(url: str, jobs: int) -> None:
    """A migrated database holding ``jobs`` queued jobs (one single-instance study each)."""
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        queue = JobQueue(make_sessionmaker(engine))
        for index in range(jobs):
            study = f"2.25.{index + 1}"
            queue.record_instance(
                InstanceRecord(
                    sop_instance_uid=f"{study}.1",
                    sop_class_uid=CT,
                    study_instance_uid=study,
                    series_instance_uid=f"{study}.0",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"instances/{study}/{study}.0/{study}.1.dcm",
                    size_bytes=1,
                    patient_id=None,
                    modality="CT",
                    calling_ae_title="BENCH",
                )
            )
        queue.assemble_stable_studies(0.0, 3)
    finally:
        engine.dispose()


def drain(url: str, owner: str, cost: float, batch: int, synchronous: str, start: Any, results: Any) -> None:
    """One worker process, as the real worker uses the queue: claim a batch in one transaction,
    'run the model' on each job, commit each job's completion; until the queue is empty. (Lease
    heartbeats come every lease/3, at most 10 s, per job in flight: none for jobs this short.)"""
    engine = make_engine(url, synchronous=synchronous)
    counts = {"statements": 0, "commits": 0}

    @event.listens_for(engine, "before_cursor_execute")
    def _count(*_args: Any) -> None:
        counts["statements"] += 1

    @event.listens_for(engine, "commit")
    def _commit(*_args: Any) -> None:
        counts["commits"] += 1

    queue = JobQueue(make_sessionmaker(engine))
    start.wait()
    done = 0
    while claimed := queue.claim_many(owner, LEASE_SECONDS, batch):
        for job in claimed:
            if cost:
                time.sleep(cost)
            queue.complete(job, "reported")
            done += 1
    engine.dispose()
    results.put((owner, done, counts["statements"], counts["commits"]))


def measure(
    backend: str, url: str, workers: int, cost: float, jobs: int, batch: int, synchronous: str
) -> Run:
    fill(url, jobs)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(workers + 1)
    results = context.Queue()
    processes = [
        context.Process(target=drain, args=(url, f"bench-{i}", cost, batch, synchronous, start, results))
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    start.wait()  # every worker has its engine: the clock measures draining only
    began = time.perf_counter()
    reports = [results.get(timeout=600) for _ in processes]
    seconds = time.perf_counter() - began
    for process in processes:
        process.join(60)
    total = sum(done for _owner, done, _s, _c in reports)
    if total != jobs:
        raise RuntimeError(f"{backend}: {total} jobs completed of {jobs}")
    statements = sum(s for _o, _d, s, _c in reports)
    commits = sum(c for _o, _d, _s, c in reports)
    return Run(backend, workers, cost, jobs, seconds, statements / jobs, commits / jobs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--cost", type=float, default=0.02, help="seconds the stub model sleeps per job")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--batch", type=int, default=4, help="jobs claimed per transaction")
    parser.add_argument(
        "--sqlite-synchronous",
        default="NORMAL",
        help="NORMAL is what the node runs with when the database shares the spool's filesystem",
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--json", help="write the runs here")
    args = parser.parse_args()
    worker_counts = [int(n) for n in args.workers.split(",")]
    backends = args.backends.split(",")
    server: PostgresServer | None = None
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="dicomnode-scale-") as tmp:
        try:
            if "postgresql" in backends:
                bin_dir = postgres_bin_dir()
                if bin_dir is None:
                    raise SystemExit("PostgreSQL server binaries not found (Debian package postgresql)")
                server = PostgresServer(bin_dir)
                server.start()
            for backend in backends:
                for cost in (0.0, args.cost):
                    for workers in worker_counts if cost else [1]:
                        if backend == "sqlite":
                            url = f"sqlite:///{Path(tmp) / f'{backend}-{workers}-{cost}.db'}"
                        else:
                            assert server is not None
                            url = server.new_database()
                        run = measure(
                            backend, url, workers, cost, args.jobs, args.batch, args.sqlite_synchronous
                        )
                        runs.append(run)
                        print(
                            f"{backend:<10} workers={workers} cost={cost * 1000:4.0f} ms: "
                            f"{run.jobs_per_second:7.1f} jobs/s, "
                            f"{run.seconds / run.jobs * 1000 * workers:6.2f} ms/job/worker, "
                            f"{run.statements_per_job:.1f} statements and "
                            f"{run.commits_per_job:.1f} commits per job",
                            flush=True,
                        )
        finally:
            if server is not None:
                server.stop()
    print()
    for backend in backends:
        overhead = next(r for r in runs if r.backend == backend and r.cost_seconds == 0.0)
        print(
            f"{backend}: queue cost {overhead.seconds / overhead.jobs * 1000:.2f} ms per job (target <= 5 ms)"
        )
        loaded = {r.workers: r for r in runs if r.backend == backend and r.cost_seconds > 0}
        one = loaded.get(1)
        for workers, run in sorted(loaded.items()):
            if one is not None and workers > 1:
                ratio = run.jobs_per_second / one.jobs_per_second
                target = " (target >= 1.7x)" if workers == 2 else ""
                print(f"{backend}: {workers} workers = {ratio:.2f}x one worker{target}")
    if "sqlite" in backends and "postgresql" in backends:
        for workers in worker_counts:
            pair = [r for r in runs if r.workers == workers and r.cost_seconds > 0]
            if len(pair) == 2:
                sqlite_run, pg_run = sorted(pair, key=lambda r: r.backend != "sqlite")
                ratio = pg_run.jobs_per_second / sqlite_run.jobs_per_second
                print(f"{workers} workers: PostgreSQL = {ratio:.2f}x SQLite")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
