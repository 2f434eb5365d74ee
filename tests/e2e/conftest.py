"""Shared fixtures of the page's browser tests: Debian's Chromium, a page opener that fails on page
errors, the service with the trained demo model, and axe-core (npm, pinned in package.json)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.needs import missing
from tests.serving import start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
E2E = Path(__file__).resolve().parent
AXE = E2E / "node_modules" / "axe-core" / "axe.min.js"


# Module scope, not session: Playwright's sync API keeps an event loop running in the main thread
# while it is open, and every later test that calls asyncio.run would fail.
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing(f"playwright is not installed: {exc}")
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, request):
    """Opens the page in a fresh context; fails the test on any page error or request off the service."""
    contexts, problems = [], []

    def open_(url: str, routes: dict | None = None, path: str = "/", **context_options):
        context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options})
        contexts.append(context)
        page = context.new_page()
        for pattern, handler in (routes or {}).items():
            page.route(pattern, handler)
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("request", lambda req: None if req.url.startswith((url, "blob:", "data:"))
                else problems.append(f"request off the service: {req.url}"))
        page.goto(url + path)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def trained_service(tmp_path_factory: pytest.TempPathFactory):
    """The service with the shipped, trained demo model: the one that offers demo clips."""
    from model.demo import shipped_dir

    folder = shipped_dir()
    if folder is None:
        missing("the trained demo checkpoint (model/demo/checkpoint) is not in this checkout")
    server = start_server(tmp_path_factory.mktemp("serve-trained"), folder)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core's script, installed from package-lock.json on first use (``npm ci``)."""
    if not AXE.is_file():
        npm = shutil.which("npm")
        if npm is None:
            missing("npm is missing: it installs axe-core for the accessibility check (apt-get install -y npm)")
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=E2E, capture_output=True, text=True)
        if done.returncode != 0 or not AXE.is_file():
            missing(f"`npm ci` in {E2E} did not install axe-core:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return AXE.read_text(encoding="utf-8")
