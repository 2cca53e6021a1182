"""The web UI's access rules against the real server (docs/ui.md, "Security"): no token, a
foreign Host, a cross-site or token-less POST are all refused, before any page or action runs."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DaemonProc, daemon_env, module_daemon
from palate.ui.app import create_app
from palate.ui.security import Secrets
from ui_harness import UiProc


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    with module_daemon("pus-") as d:
        with d.client() as c:
            c.ingest(
                {
                    "id": "sec-1",
                    "kind": "pair",
                    "source": "secret-source",
                    "prompt": "my private prompt",
                    "chosen": "a",
                    "rejected": "b",
                }
            )
        yield d


@pytest.fixture(scope="module")
def ui(daemon: DaemonProc) -> Iterator[UiProc]:
    u = UiProc(daemon)
    yield u
    assert u.stop() == 0


PAGES = ["/", "/data", "/data/event?id=sec-1", "/review", "/models", "/pause", "/static/palate.js"]


def test_binds_loopback_only_on_a_random_port(ui: UiProc) -> None:
    assert ui.url.startswith("http://127.0.0.1:") and ui.port > 1024
    # Nothing listens on the same port on any other local address.
    for family, addr in ((socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            with pytest.raises(OSError):
                s.connect((addr, ui.port))
        finally:
            s.close()


def test_token_swaps_for_a_cookie_and_leaves_the_url(ui: UiProc) -> None:
    r = ui.request("GET", f"/data?token={ui.token}&kind=pair", cookie=False)
    assert r.status == 303
    assert r.headers["location"] == "/data?kind=pair"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"palate_ui_{ui.port}={ui.token}")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie


@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_the_token(ui: UiProc, path: str) -> None:
    assert ui.request("GET", path).status == 200
    r = ui.request("GET", path, cookie=False)
    assert r.status == 403 and "my private prompt" not in r.body and "secret-source" not in r.body
    bad = ui.request("GET", path, cookie=False, headers={"Cookie": f"palate_ui_{ui.port}=nope"})
    assert bad.status == 403
    wrong = ui.request("GET", "/?token=" + "x" * 43, cookie=False)
    assert wrong.status == 403 and "set-cookie" not in wrong.headers


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "localhost.evil.example:{port}",
        "127.0.0.1.nip.io:{port}",
        "127.0.0.1:1{port}",
        "[::1]:{port}",
        "0.0.0.0:{port}",
        "",
    ],
)
def test_foreign_host_is_refused_even_with_the_cookie(ui: UiProc, host: str) -> None:
    """DNS rebinding: a page of evil.example re-pointed at 127.0.0.1 sends its own Host."""
    for path in ("/", "/data", f"/?token={ui.token}"):
        r = ui.request("GET", path, host=host.format(port=ui.port))
        assert r.status == 403, (host, path)
        assert "my private prompt" not in r.body and "set-cookie" not in r.headers


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "localhost"])
def test_own_hosts_are_served(ui: UiProc, host: str) -> None:
    assert ui.request("GET", "/data", host=host.format(port=ui.port)).status == 200


def _paused(daemon: DaemonProc) -> bool:
    with daemon.client() as c:
        return c.call("pause_state")["paused"] is not None


def test_cross_site_post_is_refused(ui: UiProc, daemon: DaemonProc) -> None:
    csrf = ui.csrf()
    form = {"csrf": csrf, "for_s": "3600"}
    refused = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://localhost:{ui.port}"},  # another origin than the Host it was sent to
        {"Origin": f"https://127.0.0.1:{ui.port}"},
        {"Origin": ui.base, "Sec-Fetch-Site": "cross-site"},
        {"Origin": ui.base, "Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        {"Referer": f"{ui.base}/pause", "Sec-Fetch-Site": "cross-site"},
        {"Referer": "http://evil.example/page"},
        {},  # neither Origin nor Referer
    ]
    for headers in refused:
        r = ui.request("POST", "/pause/start", form=form, headers=headers)
        assert r.status == 403, headers
        assert not _paused(daemon), headers
    # Without the cookie, even a same-origin POST with the CSRF token is refused.
    r = ui.request("POST", "/pause/start", form=form, headers={"Origin": ui.base}, cookie=False)
    assert r.status == 403 and not _paused(daemon)
    # The token never authorises an action by itself.
    r = ui.request("POST", f"/pause/start?token={ui.token}", form=form, headers={"Origin": ui.base})
    assert r.status == 403 and not _paused(daemon)
    # Same origin, by Referer when there is no Origin, with the token: allowed.
    r = ui.request("POST", "/pause/start", form=form, headers={"Referer": f"{ui.base}/pause"})
    assert r.status == 303 and _paused(daemon)
    ui.post("/pause/resume", {"csrf": csrf})
    # A form post from our page under a strict referrer policy: Origin "null", same-origin.
    headers = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    r = ui.request("POST", "/pause/start", form=form, headers=headers)
    assert r.status == 303 and _paused(daemon)
    r = ui.post("/pause/resume", {"csrf": csrf})
    assert r.status == 303 and not _paused(daemon)


def _post_routes() -> list[str]:
    app = create_app(socket_path=Path("/nonexistent"), secrets=Secrets(1))
    out = []
    for route in app.routes:
        methods = getattr(route, "methods", None) or set()
        if "POST" in methods:
            out.append(route.path.replace("{version:int}", "1"))  # type: ignore[attr-defined]
    return sorted(out)


def test_every_post_route_needs_the_csrf_token(ui: UiProc, daemon: DaemonProc) -> None:
    routes = _post_routes()
    assert {"/data/forget", "/review/answer", "/pause/start", "/models/rollback"} <= set(routes)
    csrf = ui.csrf()
    form = {"id": "sec-1", "confirm": "yes", "answer": "a", "for_s": "3600", "override": "yes"}
    for path in routes:
        for bad in ({}, {"csrf": "x" * len(csrf)}, {"csrf": ""}):
            r = ui.post(path, {**form, **bad})
            assert r.status == 403 and "CSRF" in r.body, (path, bad, r.status)
        # A wrong header does not rescue a right field, nor the other way round.
        r = ui.post(path, {**form, "csrf": "wrong"}, headers={"X-CSRF-Token": "wrong"})
        assert r.status == 403
    with daemon.client() as c:
        assert c.call("event_get", {"id": "sec-1"})["event"]["id"] == "sec-1"
        assert c.call("pause_state")["paused"] is None


def test_security_headers_on_every_answer(ui: UiProc) -> None:
    for path in PAGES:
        h = ui.request("GET", path).headers
        assert "script-src 'self'" in h["content-security-policy"], path
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert "unsafe-inline" not in h["content-security-policy"]
        assert h["cache-control"] == "no-store"
        assert h["referrer-policy"] == "same-origin"
        assert h["x-content-type-options"] == "nosniff"
        assert "server" not in h
    refused = ui.request("GET", "/", cookie=False).headers
    assert refused["cache-control"] == "no-store"


def test_captured_text_is_shown_never_run(ui: UiProc, daemon: DaemonProc) -> None:
    payload = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    with daemon.client() as c:
        c.ingest(
            {
                "id": "xss-1",
                "kind": "rating",
                "source": "xss",
                "prompt": payload,
                "response": payload,
                "label": 1,
            }
        )
    for path in ("/data", "/data/event?id=xss-1", "/data?q=alert"):
        body = ui.request("GET", path).body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body, path
        assert "<script>alert" not in body and "<img src=x" not in body


def test_large_bodies_are_refused(ui: UiProc) -> None:
    csrf = ui.csrf()
    ids = [("id", "x" * 1000) for _ in range(1100)] + [("csrf", csrf)]
    r = ui.post("/data/forget", ids)
    assert r.status == 413


def test_daemon_gone_is_a_page_not_a_crash(home: Path) -> None:
    """The UI outlives its daemon: pages say it is not running, and it comes back."""
    d = DaemonProc(home, daemon_env(home)).start()
    u = UiProc(d)
    try:
        assert u.request("GET", "/").status == 200
        d.terminate()
        r = u.request("GET", "/data")
        assert r.status == 503 and "not reachable" in r.body
        d.start()
        assert u.request("GET", "/data").status == 200
    finally:
        assert u.stop() == 0
