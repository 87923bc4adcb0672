"""Browser tests of the console: headless Chromium (Debian's ``chromium``) driven by Playwright.

They reuse the service tests' real parts (uvicorn + a Celery worker on PostgreSQL and Redis, the
small CIFAR-10 cut). Playwright's own browser downloads are not used: ``CHROMIUM`` names the
system browser, which ``.ci/run`` installs with apt when it is missing. Without it (or without
the ``playwright`` package) the browser tests skip and say why; the console's security tests in
``test_security.py`` need neither.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..service.conftest import LiveService, cifar10, client, redis_url, settings, small_npz  # noqa: F401
from ..service.isolated import isolated_live

CHROMIUM = os.environ.get("CLIPGUARD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("CLIPGUARD_UI_SCREENSHOTS")
"""A folder to save the main pages' screenshots into (docs/img for docs/console.md); unset: none are taken."""


@pytest.fixture(scope="module")
def live(tmp_path_factory, redis_url) -> Iterator[LiveService]:  # noqa: F811 (the imported fixture)
    """The real service, with a job store and queue of its own (the service tests' ``live`` lasts the session)."""
    home = tmp_path_factory.mktemp("ui-home")
    with isolated_live("ui", 9, lambda db, broker: LiveService(home, db, broker)) as service:
        yield service


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does) or set CLIPGUARD_CHROMIUM")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Trouble:
    """What a page complained about: uncaught script errors and Content-Security-Policy violations."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def console(self, message: object) -> None:
        text = message.text  # type: ignore[attr-defined]
        if "Content Security Policy" in text or "Refused to" in text:
            self.errors.append(f"console: {text}")

    def page_error(self, error: object) -> None:
        self.errors.append(f"uncaught: {error}")


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A fresh browser context (no cookies) and page; the test fails if the page broke its CSP or threw."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    # Assertions wait on the server (quarantine, jobs), which a busy two-core machine slows many-fold.
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    page = context.new_page()
    trouble = Trouble()
    page.on("console", trouble.console)
    page.on("pageerror", trouble.page_error)
    page.trouble = trouble
    try:
        yield page
    finally:
        context.close()
    assert not trouble.errors, trouble.errors


def sign_in(page: object, url: str, key: str) -> None:
    page.goto(f"{url}/ui/login")
    page.fill("#key", key)
    page.click("button[type=submit]")
