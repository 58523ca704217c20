"""A real browser on the admin: Playwright driving Debian's chromium against a live server.

The browser is the system's (``apt-get install chromium``; ``CHROMIUM`` names another path),
never one ``playwright install`` downloads. Without it, or without the ``playwright`` package,
the tests skip, and fail under ``REQUIRE_SERVICES=1`` like every service test. Each test saves
its screenshots under ``var/screenshots/`` so a change to the admin can be looked at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services import ROOT, unavailable

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "var" / "screenshots"
PASSWORD = "operator-password-1"


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (requirements/dev.txt)")
    if not Path(CHROMIUM).is_file():
        unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are
    # still synchronous, between its steps.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def operator(db: Any) -> Any:
    from tests.factories import UserFactory

    user = UserFactory(username="operator", is_staff=True, is_superuser=True)
    user.set_password(PASSWORD)
    user.save()
    return user


class Admin:
    """A logged-in browser page on the live server's admin, taking screenshots by name."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base

    def open(self, path: str) -> Any:
        response = self.page.goto(f"{self.base}{path}")
        assert response is not None
        assert response.status == 200, (path, response.status)
        return self.page

    def shoot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000, path  # a rendered page, not a blank one
        return path

    def run_action(self, action: str, pks: list[int]) -> Any:
        for pk in pks:
            self.page.check(f'input[name="_selected_action"][value="{pk}"]')
        self.page.select_option('select[name="action"]', action)
        self.page.click('button[name="index"]')
        self.page.wait_for_load_state()
        return self.page


@pytest.fixture
def admin_page(browser: Any, live_server: Any, operator: Any) -> Iterator[Admin]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", operator.username)
    page.fill("#id_password", PASSWORD)
    page.click('input[type="submit"]')
    page.wait_for_url(f"{live_server.url}/admin/")
    try:
        yield Admin(page, live_server.url)
    finally:
        context.close()
