"""Dashboard benchmark: response times of the HTTP process with 10,000 studies in the database.

Fills a fresh SQLite database (migrated to the newest schema) with N studies as the node leaves them
(one instance, one finished job, one result, an SR, a KOS and a key image delivered; every 50th
study still queued, every 100th failed, every 200th a dead letter), starts ``dicomnode http`` on a
free port and times sequential requests to each page. Target: p95 <= 100 ms for the dashboard pages
(``/``, the study page, ``/api/studies``, ``/api/status``).

    python benchmarks/dashboard.py [--studies 10000] [--requests 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert

TARGET_P95_SECONDS = 0.100
PAGES = ("/", "/studies/{uid}", "/api/studies", "/api/status", "/api/studies?state=failed", "/metrics")
DASHBOARD_PAGES = ("/", "/studies/{uid}", "/api/studies", "/api/status")


def fill(config_path: Path, count: int) -> str:
    """Insert ``count`` studies in bulk; return one study's UID for the study page."""
    from dicomnode import migrate
    from dicomnode.config import load_config
    from dicomnode.db import DeliveryState, Instance, Job, JobState, Outbox, Result, Study
    from dicomnode.node.services import database_engine

    config = load_config(config_path)
    config.storage.path.mkdir(parents=True, exist_ok=True)
    engine = database_engine(config)
    migrate.upgrade(engine)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    findings = json.dumps(
        {
            "study_instance_uid": "",
            "model": {"name": "pneumonia-xception", "version": "0.3.0", "display_name": "x"},
            "images": [],
            "study_findings": [],
            "job_id": None,
        }
    )
    studies, instances, jobs, results, outbox = [], [], [], [], []
    for i in range(1, count + 1):
        uid = f"1.2.826.0.1.3680043.8.498.{i}"
        when = start + timedelta(minutes=i)
        state = JobState.QUEUED if i % 50 == 0 else JobState.FAILED if i % 100 == 1 else JobState.DONE
        studies.append(
            {
                "id": i,
                "study_instance_uid": uid,
                "patient_id": f"P{i}",
                "study_date": "20260101",
                "first_received_at": when,
                "last_received_at": when,
            }
        )
        jobs.append(
            {
                "id": i,
                "study_id": i,
                "state": state,
                "attempts": 1,
                "created_at": when,
                "updated_at": when,
                "not_before": when,
                "started_at": when,
                "finished_at": when + timedelta(seconds=2) if state != JobState.QUEUED else None,
                "outcome": "reported" if state == JobState.DONE else None,
                "error": "model failed: RuntimeError" if state == JobState.FAILED else None,
            }
        )
        instances.append(
            {
                "sop_instance_uid": f"{uid}.1",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                "study_id": i,
                "series_instance_uid": f"{uid}.0",
                "modality": "DX",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "path": f"instances/{uid}/x.dcm",
                "size_bytes": 500000,
                "calling_ae_title": "MODALITY",
                "received_at": when,
                "job_id": i,
            }
        )
        if state == JobState.DONE:
            results.append(
                {
                    "job_id": i,
                    "model_name": "pneumonia-xception",
                    "model_version": "0.3.0",
                    "findings_json": findings,
                    "objects_json": "[]",
                    "created_at": when,
                }
            )
            for k, sop_class in enumerate(
                (
                    "1.2.840.10008.5.1.4.1.1.88.34",
                    "1.2.840.10008.5.1.4.1.1.88.59",
                    "1.2.840.10008.5.1.4.1.1.7",
                )
            ):
                dead = i % 200 == 0 and k == 0
                outbox.append(
                    {
                        "job_id": i,
                        "study_instance_uid": uid,
                        "destination": "pacs",
                        "sop_instance_uid": f"{uid}.9.{k}",
                        "sop_class_uid": sop_class,
                        "path": f"results/{uid}/{k}.dcm",
                        "attempts": 1,
                        "state": DeliveryState.DEAD if dead else DeliveryState.DELIVERED,
                        "last_status": 0xA700 if dead else 0,
                        "created_at": when,
                        "next_attempt_at": when,
                        "delivered_at": None if dead else when,
                    }
                )
    with engine.begin() as connection:
        for table, rows in (
            (Study, studies),
            (Job, jobs),
            (Instance, instances),
            (Result, results),
            (Outbox, outbox),
        ):
            for chunk in range(0, len(rows), 5000):
                connection.execute(insert(table), rows[chunk : chunk + 5000])
    engine.dispose()
    return f"1.2.826.0.1.3680043.8.498.{count // 2}"


def timed(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--requests", type=int, default=200, help="per page (after 10 warm-up requests)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="dicomnode-dashboard-"))
    config_path = root / "config.toml"
    config_path.write_text(
        'destinations = []\n[storage]\npath = "var"\ndatabase_url = "sqlite:///var/dicomnode.db"\n'
        "[http]\nport = 0\n",
        encoding="utf-8",
    )
    started = time.perf_counter()
    uid = fill(config_path, args.studies)
    print(f"filled {args.studies} studies in {time.perf_counter() - started:.1f} s")
    port_file = root / "http.port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomnode",
            "--config",
            str(config_path),
            "--log-level",
            "WARNING",
            "http",
            "--port-file",
            str(port_file),
            "--no-listener-check",
        ],
        env=dict(os.environ),
    )
    rows: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("dicomnode http did not start")
            time.sleep(0.1)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        print(f"{'page':<28} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
        for page in PAGES:
            url = base + page.format(uid=uid)
            for _ in range(10):
                timed(url)
            samples = sorted(timed(url) for _ in range(args.requests))
            p95 = samples[int(0.95 * (len(samples) - 1))]
            row = {
                "page": page,
                "median_seconds": statistics.median(samples),
                "p95_seconds": p95,
                "max_seconds": samples[-1],
            }
            rows.append(row)
            print(
                f"{page:<28} {row['median_seconds'] * 1000:10.1f} {p95 * 1000:8.1f} {samples[-1] * 1000:8.1f}"
            )
    finally:
        process.terminate()
        process.wait(30)
    targets = [
        {
            "target": f"p95 <= {TARGET_P95_SECONDS * 1000:.0f} ms: {r['page']}",
            "met": r["p95_seconds"] <= TARGET_P95_SECONDS,
        }
        for r in rows
        if r["page"] in DASHBOARD_PAGES
    ]
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'}  {t['target']}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"studies": args.studies, "cpus": os.cpu_count(), "pages": rows, "targets": targets}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
