"""The console page in a real browser (Debian's Chromium and chromedriver, driven by Selenium), and vLLM's own
metrics per engine worker, on one real server with two engine workers (vLLM CPU engine, demo model).

The page is loaded while the engines start; the tests wait for ready, ask a question and compare the answer
with /predict's, run a 500-question batch and watch its bar advance and finish, and edit the system prompt
with the admin token.  Every step fails on any error in the browser's console and saves a screenshot under
the test's tmp dir.  Without Chromium, chromedriver or Selenium the browser tests skip, saying which is missing
(`.ci/run` installs Chromium and chromedriver as it installs direnv).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN, HUB_SECRET, SHARED_DATA, Gate, Service, http_json
from tests.test_service import questions

TOKEN = ADMIN
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _found(paths: tuple[str, ...], name: str) -> str | None:
    return next((p for p in paths if Path(p).is_file()), None) or shutil.which(name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium with its console log captured, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError as exc:
        pytest.skip(f"selenium is not installed ({exc}): pip install -r requirements/test.txt")
    chromium, driver_path = _found(CHROMIUM, "chromium"), _found(DRIVER, "chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("Chromium or chromedriver is missing: apt-get install chromium chromium-driver (.ci/run does)")
    profile = tempfile.mkdtemp(prefix="qa-console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """The console in the browser: element lookups, waits, screenshots, and the console-error check."""

    def __init__(self, driver: Any, svc: Service, shots: Path):
        self.driver, self.svc, self.shots = driver, svc, shots
        self.shots.mkdir(parents=True, exist_ok=True)

    def text(self, css: str) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def set(self, css: str, value: str) -> None:
        from selenium.webdriver.common.by import By

        element = self.driver.find_element(By.CSS_SELECTOR, css)
        self.driver.execute_script("arguments[0].value = arguments[1];"
                                   "arguments[0].dispatchEvent(new Event('input'));", element, value)

    def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def wait(self, check: Any, timeout: float, what: str) -> Any:
        """Poll ``check`` until it returns something true; an element the page redrew meanwhile is a "not yet"."""
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (value := check()):
                    return value
            except StaleElementReferenceException:
                pass
            time.sleep(0.05)
        self.shot(f"timeout-{re.sub(r'[^a-z0-9]+', '-', what.lower())}")
        raise AssertionError(f"{what}: not within {timeout} s\n{self.svc.server.log()[-2000:]}")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def no_console_errors(self) -> None:
        errors = [e for e in self.driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, f"errors in the page's console: {errors}"


@pytest.fixture
def page(browser: Any, two_workers: Service, tmp_path: Path) -> Iterator[Page]:
    p = Page(browser, two_workers, tmp_path / "screenshots")
    if not browser.current_url.startswith(two_workers.url + "/console"):
        browser.get(two_workers.url + "/console")
    yield p
    p.no_console_errors()


def test_page_shows_warming_then_ready(page: Page) -> None:
    """Loaded while the engines start: warming, then ready with both workers up; settings with their sources,
    secrets masked; GET / still answers the harness's JSON."""
    state = page.wait(lambda: page.text("#status") in ("warming", "ready") and page.text("#status"), 30, "a status")
    page.shot("1-" + state)
    page.wait(lambda: page.text("#status") == "ready", 300, "ready")
    page.shot("2-ready")
    rows = page.wait(lambda: [r.text for r in page.all("#workers tr")] if len(page.all("#workers tr")) == 2 else None,
                     10, "two worker rows")
    assert all(" up " in f" {row} " for row in rows), rows
    assert http_json("GET", page.svc.url + "/") == (200, {"status": "batch"})
    settings = {r.find_elements("css selector", "td")[0].text: [c.text for c in r.find_elements("css selector", "td")]
                for r in page.all("#settings tr")}
    assert settings["ADMIN_TOKEN"][1] == '"***"', settings["ADMIN_TOKEN"]
    assert settings["MODELSCOPE_API_TOKEN"][1] == '"***"'
    assert (settings["TOP_P"][2], settings["DTYPE"][2]) == ("default (defaults.env)", "preset (demo.env)")
    source = page.driver.page_source
    assert TOKEN not in source and HUB_SECRET not in source
    # The warmup ran as a tracked call: it is among the finished ones.
    if SHARED_DATA.is_file():
        page.wait(lambda: any(e.get_attribute("data-kind") == "warmup" for e in page.all("#finished .req")), 5,
                  "the warmup among the finished calls")


def test_page_asks_one_question(page: Page) -> None:
    """The answer shown is /predict's for the same question and overrides, with its route, tokens and time."""
    question = questions(1)[0]
    expected = http_json("POST", page.svc.url + "/predict", {"prompt": question, "max_new_tokens": 24})
    assert expected[0] == 200, expected
    page.set("#questions", question)
    page.set("#max_new_tokens", "24")
    page.set("#repeat", "")
    page.click("#ask")
    page.wait(lambda: "1 answered" in page.text("#ask-status"), 60, "the answer")
    page.shot("3-answer")
    cells = [c.text for c in page.all("#answers tr")[0].find_elements("css selector", "td")]
    assert cells[1] == question and cells[2] == expected[1]["response"].strip(), cells
    assert re.fullmatch(r"(short|code|long|hard) \(≤24\)", cells[3]), cells
    assert 0 < int(cells[4]) <= 24 and cells[5].endswith(" s"), cells


def test_page_runs_a_500_question_batch_and_its_bar_advances(page: Page, gate: Gate) -> None:
    """A pasted list of 500 questions: its bar shows it part-done (per worker too), then it is done.

    One question carries the hold gate's mark: the worker whose share has it holds that share until the test
    releases it, so the bar stands part-done (the other share answered) for as long as the test looks.
    """
    qs = questions(500)
    qs[0] = gate.MARK + qs[0]
    page.set("#questions", "\n".join(qs))
    page.set("#max_new_tokens", "")
    page.set("#repeat", "")
    page.click("#ask")
    gate.wait_held(1)

    def bar() -> list[Any] | None:
        bars = page.driver.execute_script(
            "return [...document.querySelectorAll('#progress .req[data-kind=console]')]"
            ".map(r => [r.querySelector('progress').value, r.querySelector('progress').max, r.textContent])")
        return bars[0] if bars and 0 < bars[0][0] < 500 else None

    value, top, text = page.wait(bar, 240, "the bar part-done while one share is held")
    page.shot("4-batch-running")
    assert top == 500 and "engine worker 1 of 2" in text and "engine worker 2 of 2" in text, (value, top, text)
    # While it is held, the log's progress lines name each worker's share (the first comes after 3 s).
    page.wait(lambda: re.search(r"console \d+: \d+/500 questions .*engine worker 1 of 2: \d+/\d+",
                                page.svc.server.log()), 30, "a progress line in the log")
    assert "500 answered" not in page.text("#ask-status")
    gate.release()
    page.wait(lambda: "500 answered" in page.text("#ask-status"), 240, "the batch answered")
    page.shot("5-batch-done")
    # Read in one script: the page redraws its lists while it polls, so an element found in one WebDriver call
    # can be gone in the next (a CI run failed on a stale element here).
    done = page.wait(lambda: page.driver.execute_script(
        "return [...document.querySelectorAll('#finished .req')]"
        ".filter(r => r.dataset.kind === 'console' && r.innerText.includes('500/500'))"
        ".map(r => [r.dataset.state, r.querySelector('progress').value, r.querySelector('progress').max])"),
        5, "the batch among the finished calls")
    assert done[0] == ["done", 500, 500], done
    assert len(page.all("#answers tr")) == 50 and "first 50 shown, 450 more" in page.text("#ask-status")


def test_page_edits_the_system_prompt_with_the_admin_token(page: Page) -> None:
    new = "你是一个简洁的助手。"
    page.set("#system-prompt", new)
    page.set("#admin-token", TOKEN)
    page.click("#save-prompt")
    page.wait(lambda: page.text("#prompt-status") == "saved", 30, "saved")
    page.shot("6-prompt-saved")
    assert http_json("GET", page.svc.url + "/system_prompt") == (200, {"system_prompt": new})


def test_vllm_metrics_per_engine_worker(two_workers: Service) -> None:
    """vLLM's own metrics (ENGINE_STATS=1) beside the service's, one series per engine worker."""
    two_workers.wait_ready(300)
    assert http_json("POST", two_workers.url + "/predict", {"prompt": questions(40)})[0] == 200
    text = http_json("GET", two_workers.url + "/metrics")[1]
    for worker in ("1", "2"):
        for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"):
            assert re.search(rf'^{name}\{{[^}}]*worker="{worker}"[^}}]*\}} ', text, re.MULTILINE), (name, worker)
        for name in ("vllm:generation_tokens_total", "vllm:prompt_tokens_total"):
            match = re.search(rf'^{name}\{{[^}}]*worker="{worker}"[^}}]*\}} ([0-9.e+]+)$', text, re.MULTILINE)
            assert match and float(match.group(1)) > 0, (name, worker)
        for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count"):
            assert re.search(rf'^{name}\{{[^}}]*worker="{worker}"', text, re.MULTILINE), (name, worker)
    assert "qa_progress_questions_done_total" in text and "qa_in_flight_questions" in text
    assert json.loads(json.dumps(http_json("GET", two_workers.url + "/progress")[1]))["in_flight"] == []
