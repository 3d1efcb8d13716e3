"""The web page in a real headless browser (Debian's chromium, driven by playwright).

`make test` installs chromium; playwright only drives it (no browser is ever downloaded).
Where chromium is absent and cannot be installed, the test is skipped with that reason
(CI sets DPRDM_REQUIRE_BROWSER=1, which turns the skip into a failure).
"""

from __future__ import annotations

import os
import shutil

import pytest

from _service_support import ID_PREFIX, Service, ThreadedServer
from dprdm.privacy import SqliteLedger
from dprdm.service.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("DPRDM_REQUIRE_BROWSER"):  # set by .ci/run: CI must run this test
        raise RuntimeError("chromium is missing: `make test` installs it (apt-get)")
    pytest.skip("chromium is not installed and `make test` could not install it (apt-get needs "
                "root and a Debian mirror); the web page is not tested", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")

def test_generate_in_the_page_shows_images_and_the_updated_budget(tmp_path):
    service = Service(tmp_path, default_steps=2)
    with ThreadedServer(create_app(service.config, engine=service.engine)) as server, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            outside = []  # every request must go to this server
            page.on("request", lambda r: None if r.url.startswith(server.url)
                    else outside.append(r.url))
            page.goto(server.url + "/")
            page.fill("#key", service.token)
            page.click("#save-key")
            page.wait_for_selector('#budget[data-queries-spent="0"]')
            remaining = int(page.get_attribute("#budget", "data-queries-remaining"))
            page.fill("#prompt", "red apple")
            page.fill("#n", "2")
            page.click("#generate")
            page.wait_for_selector("#images img.generated >> nth=1", timeout=60_000)
            page.wait_for_selector('#budget[data-queries-spent="1"]')
            images = page.locator("#images img.generated")
            assert images.count() == 2
            assert images.nth(0).get_attribute("src").startswith("data:image/png;base64,")
            assert page.evaluate("document.querySelector('#images img').naturalWidth") == 32
            assert page.text_content("#queries-text").startswith(
                f"1 spent · {remaining - 1} remaining")
            assert "ε" in page.text_content("#epsilon-text")
            assert float(page.get_attribute("#queries-gauge", "value")) == 1
            assert "private retrieval" in page.text_content("#status")
            page.screenshot(path=str(tmp_path / "page.png"))
            # A wrong key is shown as an error, and charges nothing.
            page.fill("#key", "dprdm_wrong")
            page.click("#save-key")
            page.click("#generate")
            page.wait_for_selector("#status.error")
            assert page.text_content("#status").startswith("401 unauthorized")
            assert ID_PREFIX not in page.content()
            assert outside == []
        finally:
            browser.close()
    assert SqliteLedger(service.index).summary().queries == 1
