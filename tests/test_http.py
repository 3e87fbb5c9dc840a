"""The HTTP server as an operator runs it: ``dicomnode serve`` with the ``http`` role on port 0, real
HTTP requests (httpx), real C-STOREs (dcmtk storescu), /metrics parsed with prometheus-client's parser."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import NodeProcess, storescu, wait_for
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

pytestmark = pytest.mark.timeout(300)

TOKEN = "test-token-0123456789abcdef"
CT_FILE = "CT_small.dcm"


def write_config(folder: Path, *, http: dict[str, Any]) -> Path:
    """A node under ``folder`` with the given ``[http]`` section, no destinations and no models."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "destinations = []",
        "[node]",
        "port = 0",
        'host = "127.0.0.1"',
        "min_free_disk_mb = 0",
        "[storage]",
        'path = "var"',
        'database_url = "sqlite:///var/dicomnode.db"',
        "[studies]",
        "stable_after_seconds = 0.5",
        "[models]",
        f"path = {json.dumps(str(folder / 'models'))}",
        "[http]",
        *(f"{key} = {json.dumps(value)}" for key, value in http.items()),
    ]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class HttpNode(NodeProcess):
    """``serve --roles listener,http`` plus the dashboard's address from http.json."""

    def __init__(self, config_path: Path) -> None:
        super().__init__(config_path, "--roles", "listener,http")
        self.base_url = ""

    def start(self, timeout: float = 60.0) -> None:
        super().start(timeout)
        state_file = self.workdir / "var" / "http.json"

        def http_port() -> int | None:
            if not state_file.exists():
                return None
            return int(json.loads(state_file.read_text())["port"])

        port = wait_for(http_port, "http.json", timeout, 0.1)
        self.base_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: self.get("/healthz").status_code == 200, "/healthz 200", timeout, 0.2)

    def get(self, path: str, token: str | None = TOKEN, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            return httpx.get(self.base_url + path, headers=headers, timeout=10.0, **kwargs)
        except httpx.TransportError:
            return httpx.Response(599)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpNode]:
    folder = tmp_path_factory.mktemp("http-node")
    (folder / "token").write_text(TOKEN + "\n", encoding="utf-8")
    process = HttpNode(write_config(folder, http={"port": 0, "token_file": str(folder / "token")}))
    process.start()
    yield process
    process.stop()


def metric_value(text: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples named ``sample_name`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_healthz_needs_no_token_and_reports_each_part(node: HttpNode) -> None:
    """/healthz answers 200 with the listener and the database checked, without a token."""
    response = node.get("/healthz", token=None)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["listener"]["ok"] and body["database"]["ok"]


@pytest.mark.parametrize("path", ["/api/status", "/api/studies", "/api/models", "/metrics", "/"])
def test_every_other_path_needs_the_token(node: HttpNode, path: str) -> None:
    """401 without the token (or with a wrong one), 200 with it."""
    assert node.get(path, token=None).status_code == 401
    assert node.get(path, token="wrong-token-0123456789").status_code == 401
    assert node.get(path).status_code == 200


def test_pages_carry_security_headers_and_refresh_themselves(node: HttpNode) -> None:
    """The dashboard is HTML with a CSP (no inline script), nosniff, no framing, and a meta refresh."""
    response = node.get("/")
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert 'http-equiv="refresh"' in response.text
    assert "<script>" not in response.text  # scripts only from /static


def test_api_status_is_status_json(node: HttpNode) -> None:
    """GET /api/status has the same content as ``dicomnode status --json``."""
    from_cli = node.cli_json("status", "--json")
    from_http = node.get("/api/status").json()
    from_cli.pop("disk")  # free bytes move between the two reads
    from_http.pop("disk")
    assert from_http == from_cli
    assert node.get("/api/status").headers["content-type"] == "application/json"


def test_a_push_shows_in_studies_and_moves_the_counters(node: HttpNode) -> None:
    """After a C-STORE the study is in /api/studies (as in ``studies --json``) and the counters moved."""
    before = node.get("/metrics").text
    source = Path(str(get_testdata_file(CT_FILE)))
    storescu([source], node.port, node.ae_title, calling_ae="HTTPTEST")

    def listed() -> list[dict[str, Any]] | None:
        studies = node.get("/api/studies").json()["studies"]
        return studies or None

    studies = wait_for(listed, "the study in /api/studies", 30.0)
    from_cli = node.cli_json("studies", "--json")
    assert studies == from_cli
    uid = studies[0]["study_instance_uid"]

    detail = node.get(f"/api/studies/{uid}").json()
    assert detail["study_instance_uid"] == uid
    assert len(detail["instances"]) == 1 and "results" in detail
    assert node.get("/api/studies/1.2.3.4.5.6.7").status_code == 404
    assert node.get("/api/studies", params={"state": "delivered"}).json()["total"] == 0
    page = node.get("/api/studies", params={"state": studies[0]["state"], "limit": 1}).json()
    assert page["total"] == 1 and page["studies"][0]["study_instance_uid"] == uid

    received = {"calling_ae_title": "HTTPTEST", "status": "SUCCESS"}
    assert metric_value(before, "dicomnode_instances_received_total", **received) == 0.0
    after = wait_for(  # /metrics is computed at most once a second
        lambda: (
            (text := node.get("/metrics").text)
            and metric_value(text, "dicomnode_instances_received_total", **received) == 1.0
            and text
        ),
        "dicomnode_instances_received_total after the push",
        10.0,
    )
    released = {"calling_ae_title": "HTTPTEST", "outcome": "released"}
    wait_for(
        lambda: metric_value(node.get("/metrics").text, "dicomnode_associations_total", **released) == 1.0,
        "dicomnode_associations_total after the release",
        10.0,
    )
    assert metric_value(after, "dicomnode_spool_free_bytes") > 0
    families = {f.name for f in text_string_to_metric_families(after)}
    assert {"dicomnode_jobs", "dicomnode_deliveries", "dicomnode_oldest_queued_job_age_seconds"} <= families
    page_html = node.get(f"/studies/{uid}").text
    assert uid in page_html


def test_retry_needs_the_token_in_a_header(node: HttpNode) -> None:
    """POST /api/retry: 401 without a bearer token (Basic does not count), 404 when nothing failed."""
    url = node.base_url + "/api/retry/1.2.3.4"
    assert httpx.post(url, timeout=10.0).status_code == 401
    assert httpx.post(url, auth=("any", TOKEN), timeout=10.0).status_code == 401
    response = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10.0)
    assert response.status_code == 404 and response.json()["jobs"] == 0


def test_a_browser_can_send_the_token_as_basic_auth_for_pages(node: HttpNode) -> None:
    """Pages accept the token as the Basic password, so a browser can open them; 401 asks for it."""
    response = httpx.get(node.base_url + "/", timeout=10.0)
    assert response.status_code == 401 and "Basic" in response.headers["www-authenticate"]
    assert httpx.get(node.base_url + "/", auth=("operator", TOKEN), timeout=10.0).status_code == 200


def test_model_cards_are_listed(node: HttpNode) -> None:
    """/api/models lists the installed cards (none here) and /models renders."""
    assert node.get("/api/models").json() == []
    assert "no models installed" in node.get("/models").text


def test_a_host_other_than_loopback_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    """http.host = 0.0.0.0 with no token file: the node does not start and names http.token_file."""
    config_path = write_config(tmp_path, http={"host": "0.0.0.0", "port": 0})
    for command in ("http", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "dicomnode", "--config", str(config_path), command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        assert "http.token_file" in result.stderr


def test_healthz_is_503_when_the_listener_is_gone(tmp_path: Path) -> None:
    """``dicomnode http`` alone, no listener running: /healthz says 503 and names the listener."""
    config_path = write_config(tmp_path, http={"port": 0})
    port_file = tmp_path / "http.port"
    subprocess.run(
        [sys.executable, "-m", "dicomnode", "--config", str(config_path), "db", "upgrade"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomnode",
            "--config",
            str(config_path),
            "http",
            "--port-file",
            str(port_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = wait_for(
            lambda: port_file.exists() and port_file.read_text().strip(), "http port file", 60.0, 0.1
        )
        response = httpx.get(f"http://127.0.0.1:{int(str(text))}/healthz", timeout=10.0)
        assert response.status_code == 503
        body = response.json()
        assert not body["listener"]["ok"] and body["database"]["ok"]
    finally:
        process.terminate()
        process.wait(30)
