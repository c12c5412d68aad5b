"""Headless Chromium for the browser tests (the ZenML dashboard, the MLflow UI), through selenium.

Needs the Debian packages `chromium` and `chromium-driver` and the `selenium` package (CI installs them: see
.ci/run and the Makefile). Without them a browser test is skipped, unless LLMTUNE_REQUIRE_TOOLS is set (CI),
where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PAGE_TIMEOUT = 90  # seconds: both UIs are single-page apps that load data after the page; CI has 2 cores


def require_browser() -> None:
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if not missing:
        return
    message = f"missing {', '.join(missing)}: apt-get install chromium chromium-driver; pip install selenium"
    if os.environ.get("LLMTUNE_REQUIRE_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def chromium(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium window of `width` x `height` pixels."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver: Any, texts: list[str], within: Any = None) -> str:
    """Wait until every text is on the page (or in `within`); return the text seen."""
    from selenium.webdriver.common.by import By

    deadline, seen = time.monotonic() + PAGE_TIMEOUT, ""
    while time.monotonic() < deadline:
        seen = (within or driver.find_element(By.TAG_NAME, "body")).text
        if all(text in seen for text in texts):
            return seen
        time.sleep(1)
    missing = [text for text in texts if text not in seen]
    raise AssertionError(f"not shown after {PAGE_TIMEOUT}s: {missing}\n--- page text ---\n{seen[:3000]}")


def wait_for_elements(within: Any, css: str, what: str, timeout: float = PAGE_TIMEOUT) -> list[Any]:
    """The elements matching `css` inside `within` (the driver or an element), once there is at least one."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while not (found := within.find_elements(By.CSS_SELECTOR, css)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not found:
        raise AssertionError(f"no {what} after {timeout:.0f}s:\n{within.find_element(By.XPATH, '.').text[:2000]}")
    return list(found)


def click_text(driver: Any, text: str, within: Any = None) -> None:
    from selenium.webdriver.common.by import By

    (within or driver).find_element(By.XPATH, f".//*[normalize-space(text())='{text}']").click()
