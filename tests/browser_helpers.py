"""Headless Chromium for the page tests (Debian's ``chromium`` and ``chromedriver``,
driven by Selenium): open a page, read its console, take a screenshot.

Tests that need it take the ``browser`` fixture, which skips with the reason when
Chromium, its driver or Selenium is not installed here (CI installs all three)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: A browser that reaches nothing but the page it is given.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if not Path(CHROMEDRIVER).exists():
        return "chromedriver is not installed (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -c constraints.txt 'fedhive[browser]')"
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Selenium driver) with its own fresh profile, logging the
    page's console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="fedhive-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def console_problems(driver: Any) -> list[str]:
    """The page's console errors and warnings so far (JavaScript errors, failed loads,
    ``console.error``/``console.warn``)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry.get("level") in ("SEVERE", "WARNING")
    ]


def full_page_screenshot(driver: Any, path: Path) -> Path:
    """A screenshot of the whole page (the window grown to its height) at ``path``, and a
    copy in ``$FEDHIVE_SCREENSHOT_DIR`` when that is set (to look at after the tests)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(int(height) + 40, 600), 8000))
    driver.save_screenshot(str(path))
    keep = os.environ.get("FEDHIVE_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(keep) / path.name)
    return path
