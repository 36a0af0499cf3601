"""Browser-test fixtures: the web app served in-process on the real embedded model, and headless Chromium.

Debian's Chromium (`make browser`) driven by Playwright (whose own browser download cannot work
offline). One browser per session; a fresh browser context, and so a fresh localStorage (a new
chat), per page.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ADMIN_PASSWORD = "correct horse battery staple"
THROTTLE_FREE = 3  # wrong admin passwords a client may type before it must wait
MAX_NEW_TOKENS = 48  # short answers keep the tests quick on two CPU cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    store: object
    chat: object
    admin: object
    app: object


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def chat_options() -> dict:
    """Extra ChatService arguments for `served`; a test changes them with
    @pytest.mark.parametrize("chat_options", [{...}])."""
    return {}


@pytest.fixture
def served(store, engine, chat_options):
    """The app (chat + admin pages) on 127.0.0.1 at a free port, on this test's store."""
    from bot.admin import Admin
    from bot.chat import ChatService
    from ui.app import build_app, launch
    from ui.sessions import AdminSessions, Backoff

    engine.follow.source = store.adapters.active
    engine.refresh_adapter()
    chat = ChatService(store, engine, max_new_tokens=MAX_NEW_TOKENS, **chat_options)
    admin = Admin(store, engine=engine)  # activation swaps this engine at once
    # Wrong passwords beyond THROTTLE_FREE lock this client out for ten minutes: long enough that a
    # test sees the wait however slowly it runs.
    sessions = AdminSessions(ADMIN_PASSWORD, per_client=Backoff(free=THROTTLE_FREE, first_wait_s=600, max_wait_s=600))
    app = build_app(chat, admin, sessions=sessions)
    port = free_port()
    server = launch(app, "127.0.0.1", port, block=False)
    yield Served(f"http://127.0.0.1:{port}/", store, chat, admin, app)
    server.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so a fixture can tell that its test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def open_page(request, browser, served, artifacts):
    """open_page() -> a new tab (own context: own localStorage) on the app, loaded.

    When the test fails, each tab's screenshot and HTML land in test-artifacts/failed-<test>-<n>.*"""
    contexts = []

    def open_page():
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="en-US")
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)  # two shared CPU cores: model answers take seconds
        page.goto(served.url)
        page.locator("#chat-status").get_by_text(served.chat.profile().name).wait_for()
        return page

    yield open_page
    failed = getattr(request.node, "report_call", None) is not None and request.node.report_call.failed
    for n, context in enumerate(contexts):
        if failed:
            for page in context.pages:
                stem = artifacts / f"failed-{request.node.name}-{n}"
                page.screenshot(path=stem.with_suffix(".png"), full_page=True)
                stem.with_suffix(".html").write_text(page.content(), encoding="utf-8")
        context.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
