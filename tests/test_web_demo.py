"""The demo page at / in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium): a prompt typed into the chat streams a reply token by token, and the
cache view fills in as the model reads experts. A screenshot is kept as a test artefact in
$EDGEMOE_TEST_ARTEFACTS (default: edgemoe-artefacts in the temporary directory)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from serving import Served

import edgemoe
from edgemoe.planning.default_model import default_model_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTEFACTS = Path(os.environ.get("EDGEMOE_TEST_ARTEFACTS", Path(tempfile.gettempdir()) / "edgemoe-artefacts"))


@pytest.fixture(scope="module")
def server():
    model = default_model_path(progress=False)
    half = edgemoe.load(model).info()["expert_bytes"] // 2
    s = Served(model, "--memory-budget", str(half), "--preload", "none")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):  # .ci/run installs both; a failure, not a skip, where they are missing
        pytest.fail(
            "the web demo test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def test_chat_streams_and_cache_view_updates(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    browser.get(server.url + "/")
    assert browser.title == "edgemoe"
    wait.until(lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-snapshots") or 0) >= 1)
    rows = browser.find_elements(By.CSS_SELECTOR, "#layers tbody tr")
    assert len(rows) == 6 and len(rows[0].find_elements(By.CSS_SELECTOR, ".cell")) == 16
    # --preload none: nothing is resident before the first prompt
    assert browser.find_elements(By.CSS_SELECTOR, "#layers .cell.resident, #layers .cell.loaded") == []
    assert browser.find_element(By.ID, "bytes-read").text == "0 B"

    # record the reply's text, and the tokens/s shown, each time the page changes them
    browser.execute_script(
        """window.lengths = [];
        new MutationObserver(() => {
          const m = document.querySelector('.msg.assistant');
          if (m) window.lengths.push(m.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        window.rates = [];
        const tps = document.getElementById('tps');
        new MutationObserver(() => window.rates.push(parseFloat(tps.textContent))).observe(
          tps, {subtree: true, childList: true, characterData: true});"""
    )
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("120")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys("What does the kernel do with a file?")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    assert "error" not in reply.get_attribute("class"), reply.text
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "What does the kernel do with a file?"
    lengths = browser.execute_script("return window.lengths")
    # the text grew piece by piece (sampled without a seed, a reply may be short: several
    # changes, not one at the end, is what streaming shows)
    assert len(set(lengths)) > 3 and lengths[-1] > 0, lengths
    assert "tokens in" in reply.find_element(By.CLASS_NAME, "meta").text

    # the cache view catches up: experts resident, hits and misses counted, bytes read
    def cache_filled(d):
        resident = d.find_elements(By.CSS_SELECTOR, "#layers .cell.resident, #layers .cell.loaded")
        return len(resident) >= 12 and d.find_element(By.ID, "bytes-read").text != "0 B"

    wait.until(cache_filled)
    first = browser.find_element(By.CSS_SELECTOR, "#layers tbody tr")
    hits, misses = (int(first.find_element(By.CLASS_NAME, c).text.split()[0]) for c in ("hits", "misses"))
    assert misses > 0 and hits + misses >= 2
    assert browser.find_element(By.ID, "hit-rate").text.endswith("%")
    # tokens/s is over the last 10 s: while the reply streamed it showed a rate (read now, on
    # a slow machine the reply may have ended more than 10 s ago and it shows 0)
    assert max(browser.execute_script("return window.rates"), default=0) > 0
    assert "of a budget of" in browser.find_element(By.ID, "cache-bytes").text

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "web-demo.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
