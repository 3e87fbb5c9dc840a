"""Latency benchmark: from a study becoming stable to its SR acknowledged by the PACS.

The whole node runs as in production: ``dicomnode serve`` (listener, one worker, sender as separate
processes), Orthanc as the PACS, dcmtk ``storescu`` as the modality. Single-image chest studies (the
16 radiographs of pneumonia_model_package wrapped into DX instances, cycled with fresh UIDs over
four transfer syntaxes) are sent **one at a time**: each study is sent once the previous one's SR has
been acknowledged, so the number is the latency of an idle node, not of a queue.

Per study, read from the node's SQLite database:

* stable      = last ``instances.received_at`` + ``studies.stable_after_seconds``
* job created = ``jobs.created_at`` (the worker noticed the study is stable)
* job done    = ``jobs.finished_at`` (findings, SR, key image, KOS written and queued)
* SR acked    = ``outbox.delivered_at`` of the SR row (Orthanc answered the C-STORE)

and the latency is *SR acked − stable*. Target: median and p95 ≤ 1.5 s on 2 CPU cores.

With ``--required-series`` the chest route states ``required_series = { view_position = ["AP",
"PA"] }`` (study completeness, docs/configuration.md) and the quiet period stays at its default of
10 s: a single radiograph meets the requirement, so its study starts at once, and the latency is
*SR acked − C-STORE received* (``instances.received_at``). Target: median over 20 studies ≤ 1.0 s.

With ``--destination dicomweb`` Orthanc receives the results by STOW-RS (its DICOMweb plugin,
Debian ``orthanc-dicomweb``) instead of C-STORE: *SR acked* is then the HTTP answer listing the SR as
stored. ``--destination both`` runs the two one after the other on fresh nodes and prints them side
by side.

    python benchmarks/latency.py [--studies 50] [--stable-after 0.5] [--models-dir DIR] [--keep DIR]
    python benchmarks/latency.py --required-series --studies 20 [--models-dir DIR]
    python benchmarks/latency.py --destination both --studies 20 [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus import pneumonia_images_dir
from e2e_helpers import (
    COMPREHENSIVE_3D_SR,
    STORESCU_FLAGS,
    NodeProcess,
    parse_time,
    storescu,
    wait_for,
    wrap_radiograph,
    write_node_config,
)
from peers import start_orthanc
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

TARGET_SECONDS = 1.5
REQUIRED_SERIES_TARGET_SECONDS = 1.0  # median, C-STORE received -> SR acknowledged
REQUIRED_SERIES_ROUTE = 'required_series = { view_position = ["AP", "PA"] }'
SYNTAXES = (JPEGBaseline8Bit, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless)


@dataclass(frozen=True)
class Timing:
    """Seconds since the study became stable, for one study."""

    study_instance_uid: str
    transfer_syntax_uid: str
    job_created: float
    job_finished: float
    sr_acknowledged: float


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in 0..100."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def sr_delivered_at(database: Path, study_instance_uid: str) -> str | None:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as connection:
        row = connection.execute(
            "SELECT delivered_at FROM outbox WHERE study_instance_uid = ? AND sop_class_uid = ? "
            "AND state = 'delivered'",
            (study_instance_uid, COMPREHENSIVE_3D_SR),
        ).fetchone()
    return str(row[0]) if row and row[0] else None


def timing(database: Path, study_instance_uid: str, transfer_syntax_uid: str, stable_after: float) -> Timing:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as connection:
        (received,) = connection.execute(
            "SELECT MAX(i.received_at) FROM instances i JOIN studies s ON i.study_id = s.id "
            "WHERE s.study_instance_uid = ?",
            (study_instance_uid,),
        ).fetchone()
        created, finished = connection.execute(
            "SELECT j.created_at, j.finished_at FROM jobs j JOIN studies s ON j.study_id = s.id "
            "WHERE s.study_instance_uid = ? ORDER BY j.id DESC LIMIT 1",
            (study_instance_uid,),
        ).fetchone()
    delivered = sr_delivered_at(database, study_instance_uid)
    assert delivered is not None
    stable = parse_time(str(received)) + stable_after
    return Timing(
        study_instance_uid,
        transfer_syntax_uid,
        parse_time(str(created)) - stable,
        parse_time(str(finished)) - stable,
        parse_time(delivered) - stable,
    )


def run(
    studies: int,
    stable_after: float,
    models_dir: Path | None,
    workdir: Path,
    *,
    required_series: bool = False,
    destination: str = "dimse",
) -> list[Timing]:
    if models_dir is None:
        from dicomnode.lifecycle.install import install_default_model

        models_dir = workdir / "models"
        if not models_dir.exists():
            install_default_model(models_dir, pip_install=False)
    dicomweb = destination == "dicomweb"
    workdir = workdir / destination
    orthanc = start_orthanc(workdir / "pacs", dicomweb=dicomweb)
    node_dir = workdir / "node"
    node_dir.mkdir(parents=True, exist_ok=True)
    config = write_node_config(
        node_dir / "config.toml",
        models_dir=models_dir,
        destination_ae=orthanc.aet,
        destination_port=orthanc.dicom_port,
        stable_after_seconds=stable_after,
        destination_url=orthanc.dicomweb_url if dicomweb else "",
    )
    if required_series:  # the default route gains the requirement a single AP/PA radiograph meets
        text = config.read_text(encoding="utf-8")
        marker = 'view_position = ["PA", "AP"]\n'
        assert marker in text
        config.write_text(text.replace(marker, marker + REQUIRED_SERIES_ROUTE + "\n", 1), encoding="utf-8")
    node = NodeProcess(config)
    jpegs = sorted(pneumonia_images_dir().glob("*.jpeg"))
    sources = [
        wrap_radiograph(
            jpegs[i % len(jpegs)], workdir / "modality" / f"{i:03d}.dcm", SYNTAXES[i % len(SYNTAXES)]
        )
        for i in range(studies + 1)
    ]
    timings: list[Timing] = []
    try:
        node.start()
        database = node.database_path()
        for index, source in enumerate(sources):
            storescu(
                [source.path], node.port, node.ae_title, flags=STORESCU_FLAGS[source.transfer_syntax_uid]
            )
            wait_for(
                lambda s=source: sr_delivered_at(database, s.study_instance_uid),  # type: ignore[misc]
                f"SR of study {index} acknowledged by Orthanc",
                120.0,
                0.05,
            )
            if index == 0:
                continue  # warm-up: the worker loads the model on its first job
            timings.append(
                timing(
                    database,
                    source.study_instance_uid,
                    source.transfer_syntax_uid,
                    0.0 if required_series else stable_after,
                )
            )
    except BaseException:
        print(node.log_tail(), file=sys.stderr)
        raise
    finally:
        code = node.stop()
        orthanc.stop()
        if code not in (0, None):
            print(f"warning: dicomnode serve exited with {code}", file=sys.stderr)
    return timings


def report(timings: list[Timing], destination: str, *, required_series: bool) -> tuple[float, float]:
    """Print one destination's stage table and per-syntax medians; return (median, p95) of SR acked."""
    latencies = [t.sr_acknowledged for t in timings]
    origin = "received" if required_series else "stable"
    how = "STOW-RS" if destination == "dicomweb" else "C-STORE"
    print(f"\n{f'stage (s after {origin}), {how}':<34}{'median':>8}{'p95':>8}{'max':>8}")
    for name, values in (
        ("job created (worker noticed)", [t.job_created for t in timings]),
        ("job finished (results queued)", [t.job_finished for t in timings]),
        ("SR acknowledged by Orthanc", latencies),
        ("  delivery (acked - finished)", [t.sr_acknowledged - t.job_finished for t in timings]),
    ):
        print(f"{name:<34}{statistics.median(values):>8.3f}{percentile(values, 95):>8.3f}{max(values):>8.3f}")
    by_syntax: dict[str, list[float]] = {}
    for t in timings:
        by_syntax.setdefault(t.transfer_syntax_uid, []).append(t.sr_acknowledged)
    for syntax, values in sorted(by_syntax.items()):
        print(f"  {syntax:<30} n={len(values):<3} median {statistics.median(values):.3f} s")
    return statistics.median(latencies), percentile(latencies, 95)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument(
        "--stable-after", type=float, help="studies.stable_after_seconds (0.5; 10 with --required-series)"
    )
    parser.add_argument(
        "--required-series", action="store_true", help="the route's required_series starts each study at once"
    )
    parser.add_argument(
        "--destination",
        choices=("dimse", "dicomweb", "both"),
        default="dimse",
        help="how Orthanc receives the results: C-STORE (dimse), STOW-RS (dicomweb), or both in turn",
    )
    parser.add_argument("--models-dir", type=Path, help="an installed models folder (default: install one)")
    parser.add_argument(
        "--keep", type=Path, help="work in this folder and keep it (default: a temporary one)"
    )
    args = parser.parse_args()
    if args.stable_after is None:
        args.stable_after = 10.0 if args.required_series else 0.5
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="dicomnode-latency-"))
    workdir.mkdir(parents=True, exist_ok=True)
    destinations = ("dimse", "dicomweb") if args.destination == "both" else (args.destination,)
    started = time.monotonic()
    results: dict[str, list[Timing]] = {}
    try:
        for destination in destinations:
            results[destination] = run(
                args.studies,
                args.stable_after,
                args.models_dir,
                workdir,
                required_series=args.required_series,
                destination=destination,
            )
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{args.studies} single-image chest studies, sent one at a time, stable_after = {args.stable_after} s"
        + (f", {REQUIRED_SERIES_ROUTE}" if args.required_series else "")
    )
    summary = {d: report(t, d, required_series=args.required_series) for d, t in results.items()}
    wall = time.monotonic() - started
    print()
    for destination, (median, p95) in summary.items():
        how = "STOW-RS" if destination == "dicomweb" else "C-STORE"
        if args.required_series:
            verdict = "meets" if median <= REQUIRED_SERIES_TARGET_SECONDS else "misses"
            print(
                f"C-STORE received -> SR acknowledged ({how}): median {median:.3f} s, p95 {p95:.3f} s; "
                f"target median <= {REQUIRED_SERIES_TARGET_SECONDS} s: {verdict}"
            )
        else:
            verdict = "meets" if p95 <= TARGET_SECONDS else "misses"
            print(
                f"stable -> SR acknowledged ({how}): median {median:.3f} s, p95 {p95:.3f} s; "
                f"target <= {TARGET_SECONDS} s on 2 CPU cores: {verdict}"
            )
    print(f"wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
