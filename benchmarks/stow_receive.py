"""STOW-RS receive next to C-STORE: the same workload into a fresh ``dicomnode serve`` each time.

Cells, interleaved per round: ``c-store`` (dcmtk ``storescu``, one association, ``TCP_NODELAY=1``) and
``stow-rs`` (one ``POST /dicom-web/studies`` with every instance as a part, the body written to a
file before the clock starts; curl). The clock stops when the sender has its answer, which for both comes only
after every instance is durable and indexed. Compare the ratio within a run, not absolute numbers.

    python benchmarks/stow_receive.py                 # CT 200 x 512x512 and DX 20 x 2048x2048, 3 rounds
    python benchmarks/stow_receive.py --ct 100 --dx 0 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _workloads import Workload, generate_ct, generate_dx
from ingest import DicomNode, running, send, wait_until

BOUNDARY = "stow-benchmark-boundary"


def multipart(files: tuple[Path, ...]) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + path.read_bytes() + b"\r\n" for path in files) + f"--{BOUNDARY}--\r\n".encode()


def http_base(node: DicomNode) -> str:
    """The HTTP process's address once it answers /healthz."""
    state = node.workdir / "storage" / "http.json"
    wait_until(state.exists, 60.0, "http.json")
    base = f"http://127.0.0.1:{json.loads(state.read_text())['port']}"

    def answers() -> bool:
        try:
            return httpx.get(base + "/healthz", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, 60.0, "/healthz")
    return base


def stow(node: DicomNode, body: Path, count: int) -> float:
    """One STOW-RS request with curl (httpx itself sends only about 50 MB/s: it would be the bottleneck)."""
    url = http_base(node) + "/dicom-web/studies"
    answer = node.workdir / "stow-response.json"
    argv = [
        "curl", "-sS", "-o", str(answer), "-w", "%{http_code}", "-H", "Expect:",
        "-H", f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        "--data-binary", f"@{body}", url,
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.stdout != "200":
        raise RuntimeError(f"STOW-RS answered {result.stdout}: {result.stderr[-500:]}")
    stored = len(json.loads(answer.read_text()).get("00081199", {}).get("Value", []))
    if stored != count:
        raise RuntimeError(f"STOW-RS listed {stored} of {count} as stored")
    return elapsed


def cell(kind: str, workload: Workload, body: Path, root: Path) -> float:
    workdir = Path(tempfile.mkdtemp(prefix=f"{kind}-{workload.name}-", dir=root))
    node = DicomNode(workdir, parallel=False)
    try:
        with running(node):
            seconds = (
                send(node, [list(workload.files)], workdir)
                if kind == "c-store"
                else stow(node, body, workload.count)
            )
            if node.received() != workload.count:
                raise RuntimeError(f"{kind}: the node holds {node.received()} of {workload.count}")
    finally:
        shutil.rmtree(workdir / "storage", ignore_errors=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=200, help="CT instances (512x512, 0.53 MB each)")
    parser.add_argument("--dx", type=int, default=20, help="DX instances (2048x2048, 8.4 MB each)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="stow-bench-"))
    try:
        workloads = []
        if args.ct:
            workloads.append(generate_ct(root / "ct", args.ct))
        if args.dx:
            workloads.append(generate_dx(root / "dx", args.dx))
        for workload in workloads:
            body = root / f"{workload.name}.multipart"
            body.write_bytes(multipart(workload.files))
            seconds: dict[str, list[float]] = {"c-store": [], "stow-rs": []}
            for _ in range(args.rounds):
                for kind in seconds:
                    seconds[kind].append(cell(kind, workload, body, root))
            medians = {kind: statistics.median(values) for kind, values in seconds.items()}
            for kind, median in medians.items():
                print(
                    f"{workload.name} {workload.count} x {workload.total_bytes / workload.count / 1e6:.2f} MB"
                    f"  {kind:8s} median {median:6.2f} s  {workload.count / median:7.1f} instances/s"
                    f"  {workload.total_bytes / median / 1e6:6.1f} MB/s  (runs: "
                    + ", ".join(f"{v:.2f}" for v in seconds[kind])
                    + ")"
                )
            ratio = medians["c-store"] / medians["stow-rs"]
            print(f"{workload.name}: STOW-RS / C-STORE throughput {ratio:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
