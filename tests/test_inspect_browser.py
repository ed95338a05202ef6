"""The ``chunkkv inspect`` report in a real headless browser: the layer slider changes what is highlighted.

Needs Chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``) and
``selenium``. Skipped when they are absent, unless ``CHUNKKV_REQUIRE_BROWSER=1`` (CI), which turns
the skip into a failure. Writes a screenshot to ``artifacts/inspect.png``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from chunkkv.cli import main

from test_cli import QUESTION_TEXT, save_tiny_model, write_context

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
REQUIRED = os.environ.get("CHUNKKV_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
]


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"CHUNKKV_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(f"{reason} (install chromium, chromium-driver and selenium, or set CHUNKKV_REQUIRE_BROWSER=1 to require it)")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _unavailable(f"no Chromium ({binary or 'missing'}) or chromedriver ({driver_path or 'missing'}) on PATH")
    profile = tempfile.mkdtemp(prefix="chunkkv-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _kept_ids(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#tokens .t.kept')).map(e => e.id)"
    )


def _expected_ids(data: dict, method: int, li: int) -> list[str]:
    flat = data["methods"][method]["kept"][li]
    return [f"t{i}" for a, b in zip(flat[::2], flat[1::2]) for i in range(a, b)]


def test_slider_changes_the_highlighted_tokens(browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    model = save_tiny_model(tmp_path / "model")
    context = write_context(tmp_path / "doc.txt", repeats=1)
    report = tmp_path / "report.html"
    code = main(["inspect", "--model", str(model), "--device", "cpu", "--context-file", str(context),
                 "--question", QUESTION_TEXT, "--methods", "chunkkv,snapkv", "--keep-fraction", "0.1",
                 "--out", str(report), "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err

    browser.get(report.as_uri())
    data = browser.execute_script("return window.CHUNKKV")
    assert data is not None, "the report's script did not run"
    slider = browser.find_element(By.ID, "layer")
    start = int(slider.get_attribute("value"))
    assert start == len(data["layers"]) // 2
    before = _kept_ids(browser)
    assert before == _expected_ids(data, 0, start)
    assert len(before) == data["methods"][0]["counts"][start] > 0

    # a layer whose ChunkKV kept set differs from the starting one (reuse_depth=1: layers choose alone)
    target = next(li for li in range(len(data["layers"])) if _expected_ids(data, 0, li) != before)
    key = Keys.ARROW_RIGHT if target > start else Keys.ARROW_LEFT
    for _ in range(abs(target - start)):
        slider.send_keys(key)
    assert int(slider.get_attribute("value")) == target
    after = _kept_ids(browser)
    assert after != before
    assert after == _expected_ids(data, 0, target)
    assert browser.find_element(By.ID, "layer-label").text.startswith(f"layer {data['layers'][target]} ")
    assert browser.find_element(By.ID, "tokens").get_attribute("data-layer") == str(data["layers"][target])

    # the method selector: SnapKV's kept set on this layer is the union over its KV heads
    Select(browser.find_element(By.ID, "method")).select_by_index(1)
    snap = _kept_ids(browser)
    assert snap == _expected_ids(data, 1, target) and len(snap) == data["methods"][1]["counts"][target]
    assert browser.find_element(By.ID, "tokens").get_attribute("data-method") == "snapkv"
    some = browser.execute_script("return document.querySelectorAll('#tokens .t.kept.some').length")
    assert some > 0  # SnapKV's heads disagree somewhere

    # compare mode: tokens kept by both methods, by one only
    Select(browser.find_element(By.ID, "compare")).select_by_index(1)  # (none) is index 0 -> chunkkv
    counts = browser.execute_script(
        "return ['both','a-only','b-only'].map(c => document.querySelectorAll('#tokens .t.' + c).length)"
    )
    assert sum(counts[:2]) == len(snap) and counts[0] + counts[2] == len(after)

    Select(browser.find_element(By.ID, "compare")).select_by_index(0)
    Select(browser.find_element(By.ID, "method")).select_by_index(0)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "inspect.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
