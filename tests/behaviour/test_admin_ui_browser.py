"""The admin UI in a real browser: Debian's chromium driven by Playwright against a gateway served on loopback.

Sign in, create a key and use its secret against the gateway (the sandbox upstream behind it), lower its budget
and see a submission refused, revoke it and see it refused, read the usage page after the submissions. A screenshot
of every page is kept under the test's tmp dir (``artifacts/``), never committed. Skipped only when chromium is not
installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.harness import ADMIN, ADMIN_TOKEN, SANDBOX_API_KEY
from support.loopback import Stack, serve_stack

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SUBMIT = "/v1/video/generations"
BODY = {"model": "kling-v3-std-silent", "prompt": "a fox in the snow", "duration": 5}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with serve_stack(tmp_path / "data") as served:
        yield served


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone-sized screen
            page = context.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()


def submit(stack: Stack, secret: str) -> httpx.Response:
    return httpx.post(stack.url + SUBMIT, json=BODY, headers={"Authorization": f"Bearer {secret}"}, timeout=10)


def wait_until_completed(stack: Stack, secret: str, task_id: str) -> None:
    """Poll as the client does until the sandbox's task is done (the ledger records it on the poll)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        polled = httpx.get(
            f"{stack.url}/v1/videos/{task_id}", headers={"Authorization": f"Bearer {secret}"}, timeout=10
        )
        if polled.json().get("status") == "completed":
            return
        time.sleep(0.2)
    raise AssertionError(f"{task_id} did not complete")


def test_admin_ui_end_to_end(stack: Stack, browser_page: Any, tmp_path: Path) -> None:
    page = browser_page
    shots = tmp_path / "artifacts"
    shots.mkdir()
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(stack.url) else outside.append(r.url))
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)

    page.goto(stack.url + "/gateway/ui/keys")
    assert page.url.endswith("/gateway/ui/signin")
    page.screenshot(path=shots / "signin.png", full_page=True)
    page.get_by_label("Admin token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "That is not the admin token."
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.keyboard.press("Enter")  # the form works from the keyboard
    page.wait_for_url("**/gateway/ui/keys")
    page.keyboard.press("Tab")  # keyboard users reach the skip link first, then the navigation
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Keys"

    # Create a key with a budget through the form; its secret is shown once, with a copy button.
    page.get_by_label("Name").fill("browser-team")
    page.get_by_label("Models (comma-separated globs, empty for all)").fill("kling-v3-std-*")
    page.get_by_label("Requests per minute (empty for the default)").fill("60")
    page.get_by_label("Monthly budget, USD (empty for none)").fill("50")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_label("Secret: shown this once, copy it now").input_value()
    assert re.fullmatch(r"\S{20,}", secret)
    assert page.get_by_role("button", name="Copy").is_visible()  # copy.js ran under the strict CSP
    page.screenshot(path=shots / "key-created.png", full_page=True)

    # The secret works against the gateway.
    accepted = [submit(stack, secret) for _ in range(2)]
    assert [r.status_code for r in accepted] == [200, 200], accepted[0].text

    # The keys page shows the key, its budget and what it spent, never the secret.
    page.get_by_role("link", name="Back to keys").click()
    assert secret not in page.content()
    row = page.get_by_role("row").filter(has_text="browser-team")
    assert "50.00" in row.inner_text()
    page.screenshot(path=shots / "keys.png", full_page=True)

    # Usage after the submissions: the total matches the admin API's report.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Usage").click()
    page.get_by_label("Group by").select_option("model")
    page.get_by_role("button", name="Show").click()
    report = httpx.get(stack.url + "/gateway/usage", params={"by": "model"}, headers=ADMIN, timeout=10).json()
    assert page.locator("#total-tasks").inner_text() == str(report["totals"]["tasks"]) == "2"
    shown_cost = page.locator("#total-cost").inner_text()
    assert shown_cost == f"{float(report['totals']['cost_usd']):.2f}"
    assert page.locator("svg.chart rect.bar").count() == 1
    page.screenshot(path=shots / "usage.png", full_page=True)

    # Tasks: the two submissions, filterable by key; a finished one links to its video.
    first = accepted[0].json()["id"]
    wait_until_completed(stack, secret, first)
    page.get_by_role("link", name="Tasks").click()
    page.get_by_label("Key").select_option("browser-team")
    page.get_by_role("button", name="Filter").click()
    assert page.locator("tbody tr").count() == 2
    link = page.get_by_role("link", name=first)
    video = page.request.get(stack.url + link.get_attribute("href"))
    assert video.status == 200 and video.headers["content-type"].startswith("video/"), video.text()[:200]
    page.screenshot(path=shots / "tasks.png", full_page=True)

    # Accounts: the sandbox's one upstream account, its key never shown.
    page.get_by_role("link", name="Accounts").click()
    assert page.get_by_role("row").filter(has_text="default").count() == 1
    assert SANDBOX_API_KEY not in page.content()
    page.screenshot(path=shots / "accounts.png", full_page=True)

    # Lower the budget below what the key has spent: the next submission is refused.
    page.get_by_role("link", name="Keys").click()
    page.get_by_role("link", name="Edit the limits of browser-team").click()
    assert page.get_by_label("Monthly budget, USD (empty for none)").input_value() == "50"
    page.get_by_label("Monthly budget, USD (empty for none)").fill("0.5")
    page.screenshot(path=shots / "key-limits.png", full_page=True)
    page.get_by_role("button", name="Save limits").click()
    page.wait_for_url("**/gateway/ui/keys?done=*")
    assert page.get_by_role("status").inner_text() == "Saved the limits of browser-team."
    over = submit(stack, secret)
    assert over.status_code == 429 and over.json()["error"]["code"] == "budget_exceeded", over.text

    # Revoke: the secret is refused at once.
    page.get_by_role("link", name="Keys").click()
    page.get_by_role("button", name="Revoke browser-team").click()
    page.wait_for_url("**/gateway/ui/keys?done=*")
    assert page.get_by_role("status").inner_text() == "Revoked browser-team."
    refused = submit(stack, secret)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    page.screenshot(path=shots / "keys-revoked.png", full_page=True)

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/gateway/ui/signin")
    page.goto(stack.url + "/gateway/ui/keys")
    assert page.url.endswith("/gateway/ui/signin")

    assert outside == [], "the pages made requests off the gateway"
    # The one failed load is the wrong sign-in's own 401 page; no CSP violation, no script error, no favicon miss.
    assert console_errors == ["Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    assert sorted(p.name for p in shots.iterdir()) == [
        "accounts.png",
        "key-created.png",
        "key-limits.png",
        "keys-revoked.png",
        "keys.png",
        "signin.png",
        "tasks.png",
        "usage.png",
    ]
