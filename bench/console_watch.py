"""``python -m bench.console_watch URL``: keep the console page open in headless Chromium until interrupted.

For measuring what an open console costs a benchmark (``docs/performance.md``): the page polls
``/progress`` every second and ``/console/state`` every 3 s and redraws its bars, as in a user's browser, but here on
the same machine as the service.  Needs Selenium (``requirements/test.txt``) and Debian's ``chromium`` and
``chromium-driver``.  Every minute it prints the page's status; at the end, the page's console errors (there should
be none).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.console_watch", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qa-console-watch-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))
    started = time.monotonic()
    try:
        driver.get(args.url.rstrip("/") + "/console")
        deadline = time.monotonic() + 120
        while driver.find_element("id", "status").text != "ready" and time.monotonic() < deadline:
            time.sleep(0.5)
        # bench.console_cost waits for this line: an "open" case never runs without the page.
        print(f"[console_watch] page open, status {driver.find_element('id', 'status').text}", flush=True)
        while not args.seconds or time.monotonic() - started < args.seconds:
            time.sleep(60 if not args.seconds else min(60, args.seconds))
            print(f"[console_watch] open {time.monotonic() - started:.0f} s, status "
                  f"{driver.find_element('id', 'status').text}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        print(f"[console_watch] {len(errors)} console errors {errors[:3]}", flush=True)
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
