"""The dashboard in a real headless browser: Debian's chromium + chromium-driver, driven by selenium.

A chest radiograph goes in with storescu, the node (its own process, the default model, dcmtk
storescp as the PACS) infers and delivers; Chromium opens ``/`` and the study page, the finding
and the key image must render, and a screenshot in tmp_path must not be blank. Skipped only where
chromium is missing, and never in CI (with ``CI`` set a missing browser fails the test).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from corpus import pneumonia_images_dir
from e2e_helpers import NodeProcess, storescu, wait_for, wrap_radiograph
from peers import StorescpPeer, start_storescp
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]

REPOSITORY = Path(__file__).resolve().parent.parent
RESULT_TIMEOUT = 240.0  # model load and one study on a loaded 2-core machine
PATIENT_NAME = "Browser^Test"


def _unavailable(what: str) -> None:
    """Skip with the reason, except in CI, where every part must be installed (fail instead)."""
    message = f"{what} (scripts/setup.sh --test installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {message}")
    pytest.skip(message)


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        _unavailable("chromium and chromium-driver are not installed")
    assert browser is not None and driver is not None
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, as root in a container needs it."""
    browser_path, driver_path = chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorescpPeer]:
    peer = start_storescp(tmp_path_factory.mktemp("pacs"))
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: StorescpPeer) -> Iterator[NodeProcess]:
    """The whole node (listener, worker, sender, http on port 0) with the default model."""
    models = REPOSITORY / "models"
    if not (models / "pneumonia-xception" / "model.toml").exists():
        _unavailable("the default model is not installed (dicomnode models install-default)")
    folder = tmp_path_factory.mktemp("browser-node")
    lines = [
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
        f"path = {json.dumps(str(models))}",
        "[worker]",
        "poll_interval_seconds = 0.2",
        "[delivery]",
        "poll_interval_seconds = 0.2",
        "retry_initial_seconds = 0.5",
        "[http]",
        "port = 0",
        "[[destinations]]",
        'name = "pacs"',
        f'ae_title = "{pacs.aet}"',
        'host = "127.0.0.1"',
        f"port = {pacs.port}",
    ]
    config = folder / "config.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    process = NodeProcess(config)
    process.start()
    yield process
    process.stop()


def base_url(node: NodeProcess) -> str:
    state_file = node.workdir / "var" / "http.json"

    def port() -> int | None:
        return int(json.loads(state_file.read_text())["port"]) if state_file.exists() else None

    return f"http://127.0.0.1:{wait_for(port, 'http.json', 60.0, 0.1)}"


def not_blank(png: bytes) -> float:
    """The standard deviation of the screenshot's grey levels (0 for a blank page)."""
    grey = np.asarray(Image.open(BytesIO(png)).convert("L"), dtype=np.float32)
    return float(grey.std())


def test_dashboard_and_study_page_render_the_finding_and_the_key_image(
    node: NodeProcess, pacs: StorescpPeer, browser: Any, tmp_path: Path
) -> None:
    """Push a chest study, wait for the SR at the PACS, then read / and the study page in Chromium."""
    from selenium.webdriver.common.by import By

    jpeg = pneumonia_images_dir() / "person1946_bacteria_4874.jpeg"
    source = wrap_radiograph(jpeg, tmp_path / "chest.dcm", ExplicitVRLittleEndian, patient_name=PATIENT_NAME)
    storescu([source.path], node.port, node.ae_title, calling_ae="BROWSERMOD")
    url = base_url(node)

    def delivered() -> dict[str, Any] | None:
        detail = httpx.get(f"{url}/api/studies/{source.study_instance_uid}", timeout=10.0)
        body: dict[str, Any] = detail.json() if detail.status_code == 200 else {}
        return body if body.get("state") == "delivered" else None

    try:
        detail = wait_for(delivered, "the study delivered", RESULT_TIMEOUT, 0.5)
    except TimeoutError:
        raise AssertionError(node.log_tail()) from None
    assert len(pacs.received()) >= 2  # the SR and the key image (and the KOS)
    finding = detail["results"][0]["findings"]["study_findings"][0]

    browser.get(url + "/")
    assert browser.find_element(By.ID, "liveness").text == "alive"
    link = browser.find_element(By.LINK_TEXT, source.study_instance_uid)
    assert "Browser" not in browser.page_source  # the patient name never on the dashboard
    dashboard_png = tmp_path / "dashboard.png"
    browser.save_screenshot(str(dashboard_png))
    assert not_blank(dashboard_png.read_bytes()) > 5.0

    link.click()
    wait_for(lambda: "Findings" in browser.page_source, "the study page", 30.0)
    assert PATIENT_NAME in browser.page_source  # only here
    findings = browser.find_element(By.CSS_SELECTOR, "ul.findings li").text
    assert finding["display_name"] in findings
    assert ("present" if finding["present"] else "absent") in findings
    key_image = browser.find_element(By.CSS_SELECTOR, "img.key-image")
    wait_for(
        lambda: browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", key_image
        ),
        "the key image loaded",
        30.0,
    )
    heat_maps = browser.find_elements(By.CSS_SELECTOR, "img.heat-map")
    assert heat_maps, "no heat map on the study page"
    for picture in heat_maps:
        width = browser.execute_script("return arguments[0].naturalWidth", picture)
        assert width and width > 16
    study_png = tmp_path / "study.png"
    browser.save_screenshot(str(study_png))
    assert not_blank(study_png.read_bytes()) > 5.0
    assert not_blank(key_image.screenshot_as_png) > 5.0

    metrics = httpx.get(url + "/metrics", timeout=10.0).text
    assert 'dicomnode_model_inference_seconds_count{model="pneumonia-xception"' in metrics
    assert 'dicomnode_delivery_attempts_total{destination="pacs",outcome="SUCCESS"}' in metrics
