"""The web page of ``llmquant ui`` in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium): the model list renders with fit's verdicts, a ladder
report renders as a table and a chart, a chat message streams an answer, a wrong API key shows an
error. A screenshot is saved as a test artifact (``$LLMQUANT_TEST_ARTIFACTS``, default
``test-artifacts/``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_for_url

pytestmark = pytest.mark.slow
KEY = "web-test-key"
ARTIFACTS = Path(os.environ.get("LLMQUANT_TEST_ARTIFACTS", "test-artifacts"))

# a ladder report as llmquant ladder writes it (measure/report.py write_all -> ladder.json), trimmed
REPORT = {"model": "smollm2.gguf", "model_name": "SmolLM2 135M", "recommendation": "Q5_0", "rungs": [
    {"name": "Q8_0", "file_bytes": 144_000_000, "bits_per_weight": 8.5, "eval": {"ppl": 17.92, "kld_mean": 0.0031, "top1": 96.1}, "speed": {"tg_tps": 48.0}},
    {"name": "Q5_0", "file_bytes": 99_000_000, "bits_per_weight": 5.5, "eval": {"ppl": 18.10, "kld_mean": 0.012, "top1": 93.0}, "speed": {"tg_tps": 55.0}},
    {"name": "Q4_0", "file_bytes": 86_000_000, "bits_per_weight": 4.5, "eval": {"ppl": 18.90, "kld_mean": 0.041, "top1": 88.2}, "speed": {"tg_tps": 60.0}}]}


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    reports = tmp_path_factory.mktemp("reports")
    (reports / "run1").mkdir()
    (reports / "run1" / "ladder.json").write_text(json.dumps(REPORT))
    env = {**os.environ, "LLMQUANT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("LLMQUANT_API_KEY", None)
    log = (home / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", "ui", "--port", "0", "--api-key", KEY, "--ctx", "1024",
                             "--reports", str(reports)], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    yield wait_for_url(proc, log, timeout=60, what="ui", suffix="/")
    proc.terminate()
    proc.wait(timeout=15)
    log.seek(0)
    text = log.read()
    log.close()
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


def wait(fn, timeout=120.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting")


def test_page_models_reports_chat_and_key(ui_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    b = browser
    b.get(ui_server + "/")
    status = b.find_element(By.ID, "status")
    # no key yet: the data routes answer 401 and the page says so
    wait(lambda: "error" in status.get_attribute("class"))
    assert "API key" in status.text
    key = b.find_element(By.ID, "key")
    key.send_keys("wrong-key", Keys.TAB)
    wait(lambda: "401" in status.text)
    assert "error" in status.get_attribute("class")
    key.clear()
    key.send_keys(KEY, Keys.TAB)
    wait(lambda: status.text == "ready")
    # the store's models with fit's verdict on this machine
    rows = b.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    assert [r.get_attribute("data-name") for r in rows] == ["smollm2:135m-instruct-q4_1"]
    cells = rows[0].find_elements(By.TAG_NAME, "td")
    assert cells[2].text == "Q4_1" and cells[4].text.startswith("fits, ~") and cells[4].text.endswith("tok/s")
    # the ladder report: a table row per rung and a chart point per rung, hover names it
    assert len(b.find_elements(By.CSS_SELECTOR, "#reports tbody tr")) == 3
    points = b.find_elements(By.CSS_SELECTOR, "#reports svg circle")
    assert len(points) == 3
    points[0].click()
    assert b.find_element(By.ID, "tip").text.startswith("Q8_0")
    # a chat message streams: the answer grows piece by piece
    limit = b.find_element(By.ID, "max-tokens")
    limit.clear()
    limit.send_keys("24")
    b.find_element(By.ID, "prompt").send_keys("Name three fruits.", Keys.ENTER)
    answer = wait(lambda: b.find_elements(By.CSS_SELECTOR, "#log .msg.assistant"))[0]
    lengths = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and status.text != "ready":
        lengths.add(len(answer.text))
        time.sleep(0.02)
    assert status.text == "ready" and answer.text.strip()
    assert len(lengths - {0}) >= 2, lengths  # seen part-way, not only at the end
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web-ui.png"
    assert b.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    # a key that stops working shows an error on the next message
    key.clear()
    key.send_keys("wrong-again", Keys.TAB)
    b.find_element(By.ID, "prompt").send_keys("Hello?", Keys.ENTER)
    wait(lambda: b.find_elements(By.CSS_SELECTOR, "#log .msg.error"))
    assert "API key" in b.find_element(By.CSS_SELECTOR, "#log .msg.error").text
