"""README's UI recipe in a real browser: ``mlflow ui`` on loopback over a store from a small real ``full`` run and
its ``analyze`` run, opened in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which ``.ci/run``
installs; nothing is downloaded). The test checks what a researcher looks at: the Compare page tells the four
variants apart by their tags and params, the evaluate run's comparison figure loads in the artifact viewer, and the
analyze run's HTML report renders there with every image and no link out of the page.

Screenshots of each view are written to ``outputs/browser/`` of the project (for the note on an issue).
Without Chromium the test is skipped, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

from core.artifacts import TAG_STAGE
from tests.conftest import DATA_CSV, PROJECT_DIR
from tests.test_pipeline import _full

VARIANTS = ("baseline", "caa", "mlp_mc", "mlp_gen")
SHOTS = PROJECT_DIR / "outputs" / "browser"
WAIT = 90  # seconds a view may take to render on a loaded 2-core machine


def _browser_paths() -> tuple[str, str]:
    found = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not all(found):
        message = "Chromium and ChromeDriver are needed: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(found[0]), str(found[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ui(tracking: str, tmp_path: Path) -> Iterator[str]:
    """``mlflow ui`` on loopback over the test's store; its base URL."""
    port = _free_port()
    log = (tmp_path / "ui.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking,
                               "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever the proxy settings
    try:
        deadline = time.time() + WAIT
        while True:
            try:
                if opener.open(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError(f"mlflow ui did not start: {(tmp_path / 'ui.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _driver(chromium: str, chromedriver: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-proxy-server", "--window-size=1600,1400"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def _runs(stage: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(experiment_names=["truthsteer"], output_format="list",
                              filter_string=f"tags.`{TAG_STAGE}` = '{stage}'")


@pytest.mark.slow
@pytest.mark.browser
def test_the_ui_recipe_in_headless_chromium(tracking: str, tmp_path: Path, ui: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = _browser_paths()
    assert DATA_CSV.exists()
    done = _full(tmp_path, tracking)
    assert done.returncode == 0, done.stderr[-4000:]
    analysed = subprocess.run([sys.executable, "-m", "entrypoints.analyze", "--experiment", "truthsteer",
                               "--out-dir", str(tmp_path / "analysis")], cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": tracking})
    assert analysed.returncode == 0, analysed.stderr[-4000:]
    by_variant = {r.data.tags["truthsteer.variant"]: r for r in _runs("evaluate.variant")}
    assert set(by_variant) == set(VARIANTS)
    (evaluation,) = _runs("evaluate")
    (analysis,) = _runs("analyze")
    figures = sorted(p.name for p in (tmp_path / "analysis").glob("*.png"))
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = _driver(chromium, chromedriver)
    wait = WebDriverWait(driver, WAIT)
    try:
        # 1. the runs list filtered to the variant runs (README's recipe, step 2): the four, named apart
        experiment = by_variant["baseline"].info.experiment_id
        query = urllib.parse.quote(f"tags.`{TAG_STAGE}` = 'evaluate.variant'")
        driver.get(f"{ui}/#/experiments/{experiment}/runs?workflowType=machine_learning&searchFilter={query}")
        # the four match, and their evaluate run comes with them, collapsed: its "+" shows them
        wait.until(lambda d: "5 matching runs" in d.find_element(By.TAG_NAME, "body").text)
        expand = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"))
        expand.click()
        model = by_variant["baseline"].data.tags["truthsteer.model"]
        wanted = {f"{v}-{model}" for v in VARIANTS}
        names = "return Array.from(document.querySelectorAll('a')).map(a => a.innerText.trim())"
        wait.until(lambda d: wanted <= set(d.execute_script(names)))
        driver.save_screenshot(str(SHOTS / "runs_filtered.png"))
        # 2. the Compare page of the four variant runs: told apart by tags and params
        ids = [by_variant[v].info.run_id for v in VARIANTS]
        driver.get(f"{ui}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
                   f"&experiments={urllib.parse.quote(json.dumps([experiment]))}")
        wait.until(lambda d: "truthsteer.variant" in d.find_element(By.TAG_NAME, "body").text)
        text = driver.find_element(By.TAG_NAME, "body").text
        driver.save_screenshot(str(SHOTS / "compare.png"))
        assert all(f"{v}-{model}" in text for v in VARIANTS), text[:3000]
        assert f"truthsteer.variant {' '.join(VARIANTS)}" in text
        rows = {line.split(" ")[0]: line.split(" ")[1:] for line in text.splitlines() if line.startswith("variant.")}
        scales = [by_variant[v].data.params["variant.scale"] for v in VARIANTS[1:]]
        assert rows["variant.scale"] == scales and rows["variant.layer"] == [by_variant["caa"].data.params["variant.layer"]] * 3
        assert rows["variant.mlp_expansion"] == [by_variant["mlp_mc"].data.params["variant.mlp_expansion"]] * 2
        # 3. the evaluate run's comparison figure, in the artifact viewer
        driver.get(f"{ui}/#/experiments/{evaluation.info.experiment_id}/runs/{evaluation.info.run_id}"
                   "/artifacts/evaluate/comparison.png")
        image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "img[alt='evaluate/comparison.png']"))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
        driver.save_screenshot(str(SHOTS / "evaluate_comparison.png"))
        # 4. the analyze run's HTML report: every figure shown, no link out of the page
        driver.get(f"{ui}/#/experiments/{analysis.info.experiment_id}/runs/{analysis.info.run_id}"
                   "/artifacts/analysis/report.html")
        frame = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe.mlflow-html-iframe"))
        driver.save_screenshot(str(SHOTS / "analyze_report.png"))
        driver.switch_to.frame(frame)
        wait.until(lambda d: d.execute_script(
            "return document.images.length > 0 && Array.from(document.images).every(i => i.complete)"))
        loaded = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth > 0)")
        links = driver.execute_script("return Array.from(document.querySelectorAll('a[href]'))"
                                      ".map(a => a.getAttribute('href'))")
        assert len(loaded) == len(figures) and all(loaded), (loaded, figures)
        assert all(href.startswith("#") for href in links), links
    finally:
        driver.quit()
