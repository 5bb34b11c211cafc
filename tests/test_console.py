"""The web console in a real headless Chromium (Debian's, driven by Playwright) against the real
app: embedded mode, tiny model, a real training job.

Screenshots of every page go to `<pytest tmp>/.../console-screenshots/` (the path is printed);
`STEER_UPDATE_DOCS_SCREENSHOT=1` also copies the job page to `docs/console.png` (the README's)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from core.service.context import build_context
from tests.conftest import _unavailable
from tests.support.api import ADMIN_KEY, SAMPLES, make_settings, tiny_base_model
from tests.support.inference import ServerThread, create_user, publish_random_prefix

CHROMIUM = Path(os.environ.get("STEER_TEST_CHROMIUM", "/usr/bin/chromium"))
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"
WAIT_MS = 60_000  # generous: CI machines are shared; nothing here asserts a duration


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        _unavailable(f"no Chromium at {CHROMIUM} (scripts/test.sh installs Debian's `chromium`)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def server(tmp_path):
    ctx = build_context(make_settings(tmp_path), base_model=tiny_base_model())
    try:
        with ServerThread(create_app(context=ctx)) as running:
            running.ctx = ctx
            yield running
    finally:
        ctx.close()


def _origin(server) -> str:
    return server.base_url.removesuffix("/v1")


def _log_in(page, server, key: str) -> None:
    page.goto(_origin(server) + "/console/")
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_selector("[data-testid=who]", state="visible")


def _loss_points(page) -> int:
    """Points of the training-loss line in the Chart.js chart itself (not a text in the page)."""
    return page.evaluate(
        "() => { const c = Chart.getChart(document.getElementById('loss-chart'));"
        " return c ? c.data.datasets[0].data.length : 0; }"
    )


def test_console_logs_in_shows_a_live_loss_curve_rolls_back_and_scopes_a_user_key(server, browser, tmp_path):
    shots = tmp_path / "console-screenshots"
    shots.mkdir()
    print(f"console screenshots: {shots}")
    ctx, base = server.ctx, tiny_base_model()
    alice = create_user(ctx, "alice")
    bob = create_user(ctx, "bob")
    assert publish_random_prefix(ctx, base, alice, seed=1) == 1
    assert publish_random_prefix(ctx, base, alice, seed=2) == 2
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=server.base_url, headers=admin, timeout=60) as api:
        # Three samples: no validation split, so no early stop; the job runs until it is cancelled.
        api.post(f"/users/{alice.user_id}/samples", json={"samples": SAMPLES[:3]}).raise_for_status()
        job = api.post(
            "/fine_tuning/jobs",
            json={
                "user": alice.user_id,
                "hyperparameters": {"max_steps": 400, "batch_size": 1, "preservation_weight": 0},
            },
        )
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    # Shown by pytest when the test fails: what the page logged and which calls did not succeed.
    page.on("console", lambda m: print("browser console:", m.type, m.text))
    page.on("response", lambda r: r.status >= 400 and print("browser got:", r.status, r.request.method, r.url))
    try:
        _drive_console(browser, page, server, shots, alice, bob, job_id)
    except Exception:
        page.screenshot(path=shots / "failure.png", full_page=True)  # what the browser showed
        raise
    if os.environ.get("STEER_UPDATE_DOCS_SCREENSHOT"):
        shutil.copyfile(shots / "2-job-running.png", DOCS_SCREENSHOT)


def _drive_console(browser, page, server, shots: Path, alice, bob, job_id: str) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    # Log in with the admin key: every user is listed, with samples and active version.
    _log_in(page, server, ADMIN_KEY)
    assert page.inner_text("[data-testid=who]") == "admin"
    page.wait_for_selector("[data-testid=user-row] >> text=bob")
    alice_row = page.locator("[data-testid=user-row]", has_text="alice")
    page.wait_for_function("() => !document.querySelector('[data-testid=users-view]').innerText.includes('…')")
    assert "v2" in alice_row.inner_text() and "3" in alice_row.inner_text()
    page.fill("[data-testid=user-search]", "bo")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=user-row]').length === 1")
    page.screenshot(path=shots / "1-users.png", full_page=True)

    # The job's page: the loss curve gains points while the job runs; then cancel it.
    page.goto(f"{_origin(server)}/console/#/jobs/{job_id}")
    page.wait_for_function(
        "() => { const c = Chart.getChart(document.getElementById('loss-chart'));"
        " return c && c.data.datasets[0].data.length >= 2; }"
    )
    assert page.inner_text("[data-testid=job-status]") == "running"
    first = _loss_points(page)
    page.wait_for_function(
        "n => Chart.getChart(document.getElementById('loss-chart')).data.datasets[0].data.length > n", arg=first
    )
    assert _loss_points(page) > first
    page.wait_for_function(
        "() => Chart.getChart(document.getElementById('loss-chart')).data.datasets[0].data.length >= 5"
    )
    page.screenshot(path=shots / "2-job-running.png", full_page=True)
    page.click("[data-testid=cancel-job]")
    page.wait_for_function("() => document.querySelector('[data-testid=job-status]').innerText === 'cancelled'")
    assert "Cancellation requested" in page.inner_text("[data-testid=job-view]")

    # The user's page: versions, roll back to v1, and the "try it" comparison.
    page.goto(f"{_origin(server)}/console/#/users/{alice.user_id}")
    page.wait_for_selector("tr[data-version='2'][data-status='active']")
    with page.expect_response(lambda r: r.url.endswith("/prefixes/1/activate")) as activated:
        page.click("[data-testid=activate-v1]")
    assert activated.value.status == 200, activated.value.text()
    page.wait_for_selector("tr[data-version='1'][data-status='active']")
    page.wait_for_function("() => document.querySelector('[data-testid=active-model]').innerText.endsWith(':v1')")
    with httpx.Client(base_url=server.base_url, headers=admin, timeout=60) as api:
        versions = api.get(f"/users/{alice.user_id}/prefixes").json()["data"]
    assert {v["version"]: v["status"] for v in versions}[1] == "active"
    page.click("[data-testid=try-run]")
    page.wait_for_function("() => document.querySelector('[data-testid=try-user]').innerText.length > 0")
    assert not page.inner_text("[data-testid=try-user]").startswith("(")
    assert not page.inner_text("[data-testid=try-base]").startswith("(")
    page.screenshot(path=shots / "3-user-rolled-back.png", full_page=True)

    # The system page reads readiness and the Prometheus metrics.
    page.goto(f"{_origin(server)}/console/#/system")
    page.wait_for_function("() => document.querySelector('[data-testid=ready]').innerText === 'ready'")
    page.screenshot(path=shots / "4-system.png", full_page=True)

    # A user key sees only its own user: no bob, no System page.
    own = browser.new_page(viewport={"width": 1280, "height": 900})
    own.set_default_timeout(WAIT_MS)
    _log_in(own, server, alice.key)
    assert own.inner_text("[data-testid=who]") == f"user {alice.user_id}"
    own.wait_for_selector("[data-testid=user-view] >> text=alice")
    own.screenshot(path=shots / "5-user-key.png", full_page=True)
    own.goto(f"{_origin(server)}/console/#/users")
    own.wait_for_selector("[data-testid=user-row]")
    rows = own.locator("[data-testid=user-row]")
    assert rows.count() == 1 and "alice" in rows.first.inner_text()
    assert not own.is_visible("a[href='#/system']")
    own.goto(f"{_origin(server)}/console/#/users/{bob.user_id}")
    own.wait_for_selector(".error.banner:visible")
    assert "bob" not in own.inner_text("body")
    own.screenshot(path=shots / "6-user-key-other-user.png", full_page=True)
