"""What the web UI stands on, without a browser: the socket methods it added (browsing,
stats, the collection pause; docs/protocol.md), its coverage notes and its host rules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProc, daemon_env, module_daemon
from palate.errors import PalateError
from palate.ui import coverage
from palate.ui.security import Secrets

DAY = 86_400.0


def ev(i: int, **kw: Any) -> dict[str, Any]:
    out = {
        "id": f"ui-{i}",
        "kind": "pair",
        "source": "alpha",
        "prompt": f"prompt {i}",
        "chosen": f"good {i}",
        "rejected": f"bad {i}",
    }
    out.update(kw)
    return out


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProc]:
    now = time.time()
    events = [ev(i, ts=now - i * 3600) for i in range(30)]
    events += [
        {
            "id": "ui-rating",
            "kind": "rating",
            "source": "beta",
            "prompt": "Needle in a HAYSTACK",
            "response": "x" * 500,
            "label": 1,
            "ts": now - 3 * DAY,
            "context": {"task": "chat", "language": "en"},
        },
        {
            "id": "ui-ranking",
            "kind": "ranking",
            "source": "beta",
            "prompt": "rank these",
            "responses": ["one", "two", "three"],
            "ts": now - 10 * DAY,
            "context": {"task": "code", "app": "vim"},
        },
    ]
    with module_daemon("pui-") as d:
        with d.client() as c:
            c.ingest_batch(events)
        yield d


def call(d: DaemonProc, method: str, params: dict[str, Any] | None = None) -> Any:
    with d.client() as c:
        return c.call(method, params or {})


def test_hello_lists_the_new_methods(daemon: DaemonProc) -> None:
    methods = set(call(daemon, "hello")["methods"])
    assert {"events_list", "event_get", "events_stats", "pause", "resume", "pause_state"} <= methods


def test_events_list_pages_newest_first(daemon: DaemonProc) -> None:
    first = call(daemon, "events_list", {"limit": 10})
    assert first["total"] == 32 and len(first["events"]) == 10
    seqs = [e["seq"] for e in first["events"]]
    assert seqs == sorted(seqs, reverse=True)
    seen = list(first["events"])
    page = first
    while page["next"] is not None:
        page = call(daemon, "events_list", {"limit": 10, "before": page["next"]})
        seen.extend(page["events"])
    assert len(seen) == 32 and len({e["id"] for e in seen}) == 32
    assert {"received", "seq", "ts", "truncated"} <= set(seen[0])


def test_events_list_filters_and_search(daemon: DaemonProc) -> None:
    def ids(**params: Any) -> set[str]:
        return {e["id"] for e in call(daemon, "events_list", {"limit": 200, **params})["events"]}

    assert ids(source="beta") == {"ui-rating", "ui-ranking"}
    assert ids(kind="ranking") == {"ui-ranking"}
    assert ids(source="alpha", kind="rating") == set()
    now = time.time()
    assert ids(since=now - 5 * DAY, source="beta") == {"ui-rating"}
    assert ids(until=now - 5 * DAY) == {"ui-ranking"}
    # Case-insensitive, over texts, ids, sources and context values.
    assert ids(q="haystack") == {"ui-rating"}
    assert ids(q="TWO") == {"ui-ranking"}
    assert ids(q="vim") == {"ui-ranking"}
    assert ids(q="ui-7") == {"ui-7"}
    assert ids(q="good 1", source="alpha") == {"ui-1", *{f"ui-{i}" for i in range(10, 20)}}
    res = call(daemon, "events_list", {"q": "nothing like this"})
    assert res["events"] == [] and res["total"] is None and res["scanned"] == 32


def test_events_list_previews_and_whole_events(daemon: DaemonProc) -> None:
    short = call(daemon, "events_list", {"q": "haystack", "preview": 20})["events"][0]
    assert short["response"] == "x" * 20 and short["truncated"] is True
    default = call(daemon, "events_list", {"q": "haystack"})["events"][0]
    assert len(default["response"]) == 200 and default["truncated"] is True
    whole = call(daemon, "events_list", {"q": "haystack", "full": True})["events"][0]
    assert whole["response"] == "x" * 500 and "truncated" not in whole
    one = call(daemon, "event_get", {"id": "ui-rating"})["event"]
    assert one["response"] == "x" * 500 and one["context"] == {"task": "chat", "language": "en"}


@pytest.mark.parametrize(
    ("method", "params", "code"),
    [
        ("events_list", {"limit": 0}, "invalid_request"),
        ("events_list", {"limit": 201}, "invalid_request"),
        ("events_list", {"before": 2**64 - 1}, "invalid_request"),
        ("events_list", {"before": -1}, "invalid_request"),
        ("events_list", {"since": float("nan")}, "invalid_request"),
        ("events_list", {"until": float("inf")}, "invalid_request"),
        ("events_list", {"q": "x" * 1001}, "too_large"),
        ("events_list", {"kind": True}, "invalid_request"),
        ("events_list", {"preview": 0}, "invalid_request"),
        ("events_list", {"extra": 1}, "invalid_request"),
        ("event_get", {}, "invalid_request"),
        ("event_get", {"id": "no-such-event"}, "not_found"),
        ("events_stats", {"days": 0}, "invalid_request"),
        ("events_stats", {"days": 367}, "invalid_request"),
        ("events_stats", {"tz_offset_s": 15 * 3600}, "invalid_request"),
        ("pause", {"for_s": 0}, "invalid_request"),
        ("pause", {"for_s": -5}, "invalid_request"),
        ("pause", {"for_s": float("nan")}, "invalid_request"),
        ("pause", {"for_s": 31 * DAY}, "invalid_request"),
        ("pause", {"for_s": "3600"}, "invalid_request"),
        ("resume", {"x": 1}, "invalid_request"),
        ("pause_state", {"x": 1}, "invalid_request"),
    ],
)
def test_bad_params_are_refused(
    daemon: DaemonProc, method: str, params: dict[str, Any], code: str
) -> None:
    with pytest.raises(PalateError) as ei:
        call(daemon, method, params)
    assert ei.value.code == code
    assert call(daemon, "pause_state")["paused"] is None


def test_events_stats(daemon: DaemonProc) -> None:
    s = call(daemon, "events_stats", {"days": 14, "tz_offset_s": 0})
    assert s["total"] == 32 and s["by_source"] == {"alpha": 30, "beta": 2}
    assert len(s["days"]) == 14 and s["days"][-1]["day"] == time.strftime("%Y-%m-%d", time.gmtime())
    assert sum(sum(d["by_source"].values()) for d in s["days"]) == 32
    assert sum(s["by_hour"]) == 32 and len(s["by_hour"]) == 24
    assert s["by_context"]["task"] == {"chat": 1, "code": 1}
    assert s["by_context"]["app"] == {"vim": 1}
    assert s["context_sampled"] == 32 and s["first_ts"] < s["last_ts"]
    # Days follow the caller's time zone.
    east = call(daemon, "events_stats", {"days": 3, "tz_offset_s": 14 * 3600})
    assert east["days"][-1]["day"] == time.strftime(
        "%Y-%m-%d", time.gmtime(time.time() + 14 * 3600)
    )


def test_pause_resume_and_windows(home: Path) -> None:
    d = DaemonProc(home, daemon_env(home)).start()
    assert call(d, "status")["paused"] is None
    p = call(d, "pause", {"for_s": 3600})["paused"]
    assert p["until"] - p["since"] == pytest.approx(3600, abs=1) and 3590 < p["remaining_s"] <= 3600
    assert call(d, "status")["paused"]["until"] == p["until"]
    # Pausing again keeps when the pause began; without for_s it lasts until resumed.
    again = call(d, "pause")["paused"]
    assert again["since"] == p["since"] and again["until"] is None
    # A restart keeps the pause (it is stored, encrypted, with the data).
    d.terminate()
    d.start()
    kept = call(d, "pause_state")
    assert kept["paused"]["since"] == p["since"] and kept["paused"]["until"] is None
    out = call(d, "resume")
    assert out == {"paused": None, "was_paused": True}
    state = call(d, "pause_state")
    assert state["paused"] is None and len(state["windows"]) == 1
    start, end = state["windows"][0]
    assert start == p["since"] and end >= start
    assert call(d, "resume")["was_paused"] is False
    # A timed pause ends by itself.
    call(d, "pause", {"for_s": 0.2})
    time.sleep(0.3)
    assert call(d, "status")["paused"] is None
    assert len(call(d, "pause_state")["windows"]) == 2
    # Deliberate feedback is still taken while paused.
    call(d, "pause")
    with d.client() as c:
        assert c.ingest(ev(99))["duplicate"] is False
    d.terminate()


def test_coverage_notes() -> None:
    assert "No feedback yet" in coverage.notes({"total": 0})[0]
    narrow = {
        "total": 500,
        "by_source": {"vim": 500},
        "by_kind": {"pair": 450, "rating": 50},
        "by_context": {"task": {}, "language": {"python": 400}},
        "context_sampled": 500,
        "by_hour": [0] * 9 + [300, 200] + [0] * 13,
        "days": [{"by_source": {}} for _ in range(28)] + [{"by_source": {"vim": 500}}] * 2,
    }
    text = " ".join(coverage.notes(narrow))
    assert "one source: vim" in text
    assert "90% comes from one kind of feedback (pair)" in text
    assert "which task" in text
    assert "same one: python" in text
    assert "within 2 hour(s)" in text
    assert "only 2 of the last 30 days" in text
    broad = {
        "total": 5000,
        "by_source": {"vim": 2000, "browser": 2000, "voice": 1000},
        "by_kind": {"pair": 3000, "rating": 2000},
        "by_context": {"task": {"a": 2000, "b": 2000}, "language": {"x": 3000, "y": 1000}},
        "context_sampled": 5000,
        "by_hour": [200] * 24,
        "days": [{"by_source": {"vim": 1}}] * 30,
    }
    assert coverage.notes(broad) == []
    assert "Only 50 events" in coverage.notes({**broad, "total": 50, "context_sampled": 50})[0]


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:8123", True),
        ("localhost:8123", True),
        ("127.0.0.1", True),
        ("localhost", True),
        ("127.0.0.1:8124", False),
        ("LOCALHOST:8123", False),
        ("evil.example:8123", False),
        ("localhost.:8123", False),
        ("[::1]:8123", False),
        ("127.0.0.1:8123:8123", False),
        ("", False),
        (None, False),
    ],
)
def test_host_rule(host: str | None, ok: bool) -> None:
    assert Secrets(8123).host_allowed(host) is ok


def test_origin_rule() -> None:
    s = Secrets(8123)
    assert s.origin_allowed("http://127.0.0.1:8123", "127.0.0.1:8123")
    assert not s.origin_allowed("http://localhost:8123", "127.0.0.1:8123")
    assert not s.origin_allowed("https://127.0.0.1:8123", "127.0.0.1:8123")
    assert not s.origin_allowed("http://127.0.0.1:8123.evil.example", "127.0.0.1:8123")
    assert Secrets(1).token != Secrets(1).token and len(Secrets(1).csrf) >= 40
