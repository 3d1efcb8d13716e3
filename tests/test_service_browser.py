"""The web page in a real headless browser (Debian's chromium, driven by playwright).

`make test` installs chromium; playwright only drives it (no browser is ever downloaded).
Where chromium is absent and cannot be installed, the test is skipped with that reason
(CI sets DPRDM_REQUIRE_BROWSER=1, which turns the skip into a failure).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest

from _service_support import ID_PREFIX, SETTINGS, Service, ThreadedServer
from dprdm.privacy import SqliteLedger
from dprdm.service.app import create_app
from dprdm.style_estimate import estimate_style

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("DPRDM_REQUIRE_BROWSER"):  # set by .ci/run: CI must run this test
        raise RuntimeError("chromium is missing: `make test` installs it (apt-get)")
    pytest.skip("chromium is not installed and `make test` could not install it (apt-get needs "
                "root and a Debian mirror); the web page is not tested", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=["--no-sandbox", "--disable-gpu"])


def test_generate_in_the_page_shows_images_and_the_updated_budget(tmp_path):
    service = Service(tmp_path, default_steps=2)
    with ThreadedServer(create_app(service.config, engine=service.engine)) as server, \
            sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            outside = []  # every request must go to this server
            page.on("request", lambda r: None if r.url.startswith(server.url)
                    else outside.append(r.url))
            console = []
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.goto(server.url + "/")
            assert page.is_visible("#key-section") and page.is_visible("#key-form #key")
            assert page.evaluate("document.querySelector('#key').form.id") == "key-form"
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
            assert console == []  # no CSP violation, no missing favicon, no script error
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


def test_a_spent_budget_disables_generate_and_says_why_in_words(tmp_path):
    """Keyless local mode: no key field; the mechanism is rounded (and the style estimate
    named); the gauges explain
    composition; once the budget is spent Generate is off unless "public only" is ticked."""
    settings = replace(SETTINGS, sigma=8.0 / 3.0)  # shown as 2.67
    service = Service(tmp_path, keyless_local=True, allow_public_only=True, settings=settings)
    rag = service.app.state.engine.rag  # an operator's style estimate, paid like any release
    rag.style_estimate = estimate_style(rag, ["operator prompt 1", "operator prompt 2"])
    ledger = SqliteLedger(service.index)
    left = ledger.remaining_queries(settings.params)
    if left > 1:  # leave exactly one private query to the page
        ledger.charge(settings.params, left - 1, caller="test")
    with ThreadedServer(service.app) as server, sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#budget[data-queries-remaining]")
            assert not page.is_visible("#key-section")
            assert "sigma=2.67," in page.text_content("#mechanism")
            assert "shrunk towards the operator's style estimate (2 releases" in \
                page.text_content("#mechanism")
            assert "grows more slowly than the number of queries" in \
                page.get_attribute("#epsilon-row", "title")
            assert "first query costs more than 1/T" in page.get_attribute("#queries-row",
                                                                          "title")
            assert page.is_enabled("#generate") and not page.is_visible("#budget-spent")
            page.fill("#prompt", "red apple")
            page.fill("#n", "1")
            page.click("#generate")
            page.wait_for_selector('#budget[data-queries-remaining="0"]', timeout=60_000)
            page.wait_for_selector("#generate:disabled")
            notice = page.text_content("#budget-spent")
            assert page.is_visible("#budget-spent") and "used up" in notice
            assert "public only" in notice and "public_only" not in notice
            page.check("#public-only")
            assert page.is_enabled("#generate")
            page.click("#generate")
            page.wait_for_selector("#status:has-text('public only (no budget spent)')",
                                   timeout=60_000)
            page.uncheck("#public-only")
            assert page.is_disabled("#generate")
        finally:
            browser.close()
    assert SqliteLedger(service.index).summary().queries == ledger.summary().queries
