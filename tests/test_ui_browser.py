"""The web UI in a real headless browser (Debian's chromium driven by Playwright), against a
real daemon: every page loads without a script or policy error, a review question is answered
with its key, an event is deleted and is gone from the store, data is exported, collection is
paused and resumed from the banner, a version is deployed and rolled back with confirmation.

``PALATE_UI_SCREENSHOTS=DIR`` also trains a tiny real model (so its report is a real one) and
saves a screenshot of each page into DIR (docs/ui/*.png are made this way).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import _STARTED, DaemonProc, daemon_env, missing
from palate.errors import PalateError
from palate.store.database import Store
from palate.store.keys import KeyManager
from ui_harness import UiProc, chromium_path

pytestmark = pytest.mark.slow

SHOTS = os.environ.get("PALATE_UI_SCREENSHOTS")
DAY = 86_400.0
SOURCES = ["continue", "continue", "continue", "browser", "browser", "voice", "tabby"]
TASKS = ["code", "code", "chat", "writing", "review"]
PROMPTS = [
    ("Rename this variable to something clearer", "user_count", "uc"),
    ("Summarise the thread for me", "Three points: ship Friday, fix the flaky test, ...", "OK."),
    ("Write a commit message", "Store: roll back on any exception", "fix stuff"),
    ("How do I sort a dict by value?", "sorted(d.items(), key=lambda kv: kv[1])", "You can't."),
    ("Reply to the landlord", "Thanks, Tuesday at 10 works for me.", "whatever"),
]


def _events(n: int, now: float) -> list[dict[str, Any]]:
    rnd = random.Random(7)
    out = []
    for i in range(n):
        prompt, good, bad = PROMPTS[i % len(PROMPTS)]
        ts = now - rnd.random() ** 1.5 * 24 * DAY
        ts -= (ts % DAY) - (rnd.gauss(15, 3.5) % 24) * 3600  # mostly working hours
        ev: dict[str, Any] = {
            "id": f"b-{i}",
            "kind": "pair",
            "source": rnd.choice(SOURCES),
            "prompt": f"{prompt} (#{i})",
            "chosen": good,
            "rejected": bad,
            "ts": ts if ts < now else ts - DAY,
            "context": {"task": rnd.choice(TASKS), "language": rnd.choice(["python", "en"])},
        }
        if i % 9 == 0:
            ev = {
                "id": f"b-{i}",
                "kind": "rating",
                "source": ev["source"],
                "prompt": ev["prompt"],
                "response": good,
                "label": 1 if i % 2 else -1,
                "ts": ev["ts"],
            }
        elif i % 13 == 0:
            ev.update(kind="edit", original=bad, edited=good)
            del ev["chosen"], ev["rejected"]
        out.append(ev)
    out.sort(key=lambda e: e["ts"])
    return out


def _seed_models(d: DaemonProc) -> None:
    s = Store(d.paths.db_file, KeyManager(d.paths).unwrap())
    try:
        v = s.add_model(
            base_model="builtin:smollm2-135m",
            artifact=b"a",
            meta={
                "metrics": {"accuracy": 0.62},
                "decision": "deploy",
                "reasons": ["held-out accuracy 62.0% beats the baselines by 7 points"],
            },
        )
        if s.deployed_version() is None:
            s.deploy_model(v, how="gate", reason="passed the gate")
        s.add_model(
            base_model="builtin:smollm2-135m",
            artifact=b"b",
            meta={
                "metrics": {"accuracy": 0.91},
                "decision": "hold",
                "reasons": ["suspicious jump of +29 points: held for a look"],
            },
            state="held",
        )
    finally:
        s.close()


def _train_tiny(home: Path) -> None:
    """One real training run on a tiny random model, so the report is a real one."""
    from test_lifecycle import marker_pairs
    from tiny_gguf import tiny_args, tiny_model, write_gguf

    args = tiny_args()
    gguf = write_gguf(home / "tiny.gguf", tiny_model(args), args)
    (home / "config.toml").write_text(
        f'base_model = "{gguf}"\n[train]\nepochs = 4\nmax_tokens = 64\nlora_layers = 2\n'
        "lora_rank = 8\nstreams = 1\nlr = 0.003\n[gate]\nprobe_floor = 0.0\n"
        "probe_max_drop = 1.0\nsuspicious_accuracy = 1.01\nmax_jump = 1.0\n"
    )
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client(timeout=None) as c:
        c.ingest_batch(marker_pairs(420, "tiny"))
        c.train(wait=True)
        c.forget(source="test")
    d.terminate()


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[DaemonProc, UiProc]]:
    if chromium_path() is None:
        missing("chromium is not installed (apt-get install chromium)")
    home = Path(tempfile.mkdtemp(prefix="pub-", dir="/tmp"))
    d = DaemonProc(home, daemon_env(home))
    try:
        if SHOTS:
            _train_tiny(home)
        d.start()
        with d.client() as c:
            now = time.time()
            c.ingest(
                {
                    "id": "b-xss",
                    "kind": "rating",
                    "source": "browser",
                    "prompt": "<script>window.pwned = 1</script>",
                    "response": '<img src=x onerror="window.pwned = 2">',
                    "label": -1,
                    "ts": now - 20 * DAY,
                }
            )
            c.ingest_batch(_events(180, now))
            try:
                c.call(
                    "review_add",
                    {
                        "prompt": "Explain what a mutex is, briefly",
                        "candidates": [
                            "A lock: one thread at a time may hold it.",
                            "Mutual exclusion primitive guarding critical sections.",
                        ],
                        "source": "continue",
                    },
                )
            except PalateError as e:
                assert e.code == "unknown_method"
        d.terminate()
        _seed_models(d)  # after review_add: it would score with the seeded (fake) weights
        d.start()
        while d in _STARTED:  # module-scoped: not reaped after each test
            _STARTED.remove(d)
        ui = UiProc(d)
        try:
            yield d, ui
        finally:
            assert ui.stop() == 0
    finally:
        if d.alive():
            d.terminate()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(stack: tuple[DaemonProc, UiProc]) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
    from playwright.sync_api import expect

    # The machine may be busy (2 cores, a daemon, a browser): wait longer than the 5 s default
    # for a page to settle before calling it a failure.
    expect.set_options(timeout=20_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, stack: tuple[DaemonProc, UiProc]) -> Iterator[Any]:
    """A signed-in page (the printed URL opened once); fails on any console error."""
    _, ui = stack
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(ui.url)
    assert pg.url == f"{ui.base}/", "the token leaves the address bar"
    yield pg
    context.close()
    assert errors == [], "no script error, no Content-Security-Policy violation"


def _shot(page: Any, name: str, full: bool = False) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=full)


def test_each_page_loads(page: Any, stack: tuple[DaemonProc, UiProc]) -> None:
    from playwright.sync_api import expect

    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator("svg.chart").first).to_be_visible()
    expect(page.locator("text=events stored")).to_be_visible()
    _shot(page, "overview", full=True)
    for label, heading in (
        ("Data", "Your data"),
        ("Review", "Review"),
        ("Models", "Models"),
        ("Pause", "Pause collection"),
        ("Overview", "Overview"),
    ):
        page.click(f"header nav >> text={label}")
        expect(page.locator("h1")).to_have_text(heading)
        expect(page.locator('nav a[aria-current="page"]')).to_have_text(label)
    # Captured text is displayed as text and never runs.
    page.goto(f"{stack[1].base}/data?q=pwned")
    expect(page.locator("td.content").first).to_contain_text("<script>window.pwned = 1</script>")
    assert page.evaluate("window.pwned") is None


def test_filter_view_and_delete_an_event(page: Any, stack: tuple[DaemonProc, UiProc]) -> None:
    from playwright.sync_api import expect

    d, _ = stack
    page.click("header nav >> text=Data")
    expect(page.locator("h1")).to_have_text("Your data")
    _shot(page, "data")
    page.select_option("select[name=source]", "voice")
    page.fill("input[name=q]", "landlord")
    page.click("form.filters button[type=submit]")
    expect(page.locator("table.events tbody tr").first).to_contain_text("voice")
    rows = page.locator("table.events tbody tr")
    assert rows.count() >= 1
    for i in range(rows.count()):
        expect(rows.nth(i)).to_contain_text("landlord")
    victim = rows.first.locator('input[name="id"]').get_attribute("value")
    # View it whole.
    rows.first.locator("td.when a").click()
    expect(page.locator("h1")).to_contain_text("from voice")
    expect(page.locator("code").first).to_have_text(victim)
    _shot(page, "event")
    page.go_back()
    # Select it and delete it, through the confirmation page.
    button = page.locator("button[data-needs-selection]")
    expect(button).to_be_disabled()
    page.check(f'input[name="id"][value="{victim}"]')
    expect(page.locator("[data-selection-count]")).to_have_text("1 selected")
    button.click()
    expect(page.locator("h1")).to_have_text("Delete 1 event for good?")
    _shot(page, "forget")
    with d.client() as c:
        assert c.call("event_get", {"id": victim})["event"]["id"] == victim, "not before confirm"
    page.click("text=Delete 1 for good")
    expect(page.locator(".flash")).to_have_text("Deleted 1 event(s) for good.")
    with d.client() as c, pytest.raises(PalateError) as ei:
        c.call("event_get", {"id": victim})
    assert ei.value.code == "not_found"
    expect(page.locator(f'input[name="id"][value="{victim}"]')).to_have_count(0)


def test_select_all_on_a_page(page: Any, stack: tuple[DaemonProc, UiProc]) -> None:
    from playwright.sync_api import expect

    page.click("header nav >> text=Data")
    page.check("[data-select-all]")
    n = page.locator('table.events input[name="id"]').count()
    expect(page.locator("[data-selection-count]")).to_have_text(f"{n} selected")
    page.uncheck("[data-select-all]")
    expect(page.locator("button[data-needs-selection]")).to_be_disabled()


def test_export_downloads_the_matches(page: Any, stack: tuple[DaemonProc, UiProc]) -> None:
    d, ui = stack
    page.goto(f"{ui.base}/data?source=tabby")
    with page.expect_download() as info:
        page.click("form.export button")
    lines = Path(info.value.path()).read_text(encoding="utf-8").splitlines()
    with d.client() as c:
        assert len(lines) == c.status()["events"]["by_source"]["tabby"] > 0
    rows = [json.loads(x) for x in lines]
    assert {r["source"] for r in rows} == {"tabby"}
    assert not {"seq", "received", "v", "truncated"} & set(rows[0])


def test_answer_a_review_question_with_a_key(page: Any, stack: tuple[DaemonProc, UiProc]) -> None:
    from playwright.sync_api import expect

    d, _ = stack
    with d.client() as c:
        assert "review_list" in c.hello()["methods"]
        before = c.call("review_list", {})["items"]
    assert before, "the fixture queued one question"
    page.click("header nav >> text=Review")
    expect(page.locator("article.review")).to_contain_text(before[0]["prompt"])
    _shot(page, "review")
    page.keyboard.press("1")
    expect(page.locator(".flash")).to_have_text("Answer saved.")
    with d.client() as c:
        after = c.call("review_list", {})["items"]
        assert before[0]["id"] not in {i["id"] for i in after}
        answered = c.call("events_list", {"source": "review", "full": True})["events"]
    assert answered and answered[0]["chosen"] == before[0]["a"]


def test_pause_shows_everywhere_and_resumes(page: Any, stack: tuple[DaemonProc, UiProc]) -> None:
    from playwright.sync_api import expect

    d, _ = stack
    page.click("header nav >> text=Pause")
    expect(page.locator("#banner form.paused")).to_have_count(0)
    page.click("text=Pause for 1 hour")
    expect(page.locator(".flash")).to_have_text("Collection paused.")
    with d.client() as c:
        assert c.call("pause_state")["paused"]["until"] is not None
    _shot(page, "pause")
    for label in ("Data", "Models", "Overview"):
        page.click(f"header nav >> text={label}")
        expect(page.locator("#banner")).to_contain_text("Collection is paused")
    page.click("#banner >> text=Resume now")
    expect(page.locator(".flash")).to_have_text("Collection resumed.")
    expect(page.locator("h1")).to_have_text("Overview")
    with d.client() as c:
        assert c.call("pause_state")["paused"] is None


def test_deploy_and_roll_back_with_confirmation(
    page: Any, stack: tuple[DaemonProc, UiProc]
) -> None:
    from playwright.sync_api import expect

    d, ui = stack
    with d.client() as c:
        listing = c.call("models")
    deployed = listing["deployed"]
    held = next(m["version"] for m in listing["models"] if m["state"] == "held")
    page.click("header nav >> text=Models")
    expect(page.locator("table.models")).to_contain_text("suspicious jump")
    _shot(page, "models")
    page.click(f"table.models >> text=v{held}")
    expect(page.locator(".verdict")).to_contain_text("hold")
    frame = page.frame_locator("iframe.report")
    expect(frame.locator("body")).not_to_be_empty()
    page.click(f"text=Deploy version {held}…")
    expect(page.locator("h1")).to_have_text(f"Deploy version {held}?")
    expect(page.locator(".verdict")).to_contain_text("did not approve")
    _shot(page, "deploy")
    page.click(f"button:has-text('Deploy version {held}')")  # the override box is required
    with d.client() as c:
        assert c.call("models")["deployed"] == deployed
    page.check("input[name=override]")
    page.click(f"button:has-text('Deploy version {held}')")
    expect(page.locator(".flash")).to_have_text(f"Deployed version {held}.")
    with d.client() as c:
        assert c.call("models")["deployed"] == held
    page.click(f"text=Roll back to version {deployed}…")
    expect(page.locator("h1")).to_have_text("Roll back?")
    page.click(f"button:has-text('Roll back to version {deployed}')")
    expect(page.locator(".flash")).to_have_text(f"Rolled back to version {deployed}.")
    with d.client() as c:
        assert c.call("models")["deployed"] == deployed
    if SHOTS:  # the oldest version is the one a real (tiny) training run made
        page.goto(f"{ui.base}/models/{min(m['version'] for m in listing['models'])}")
        expect(page.frame_locator("iframe.report").locator("h1")).to_contain_text("version")
        _shot(page, "model", full=True)
    # The report is served with its own, sandboxing policy.
    r = ui.request("GET", f"/models/{held}/report")
    assert r.status == 200 and "sandbox" in r.headers["content-security-policy"]
