"""The review queue: which questions it asks first, what an answer becomes, what it forgets.

The ordering statistics are checked on constructed member scores, the queue on a real
SQLCipher file, and the socket methods on a real daemon. The end-to-end version with a
trained ensemble (rerank ``remember: true`` on a real model) is in test_lifecycle.py.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest

from conftest import DaemonProc
from palate.errors import PalateError
from palate.model.ensemble import member_stats, pair_information, pick_question
from palate.store.database import REVIEW_TTL_S, Store

T = 1.0


# -- what a label is worth ----------------------------------------------------------------------


def test_uncertainty_is_zero_when_members_are_identical() -> None:
    scores = np.array([0.3, -1.2, 2.5])
    same = np.repeat(scores[:, None], 5, axis=1)
    mean, spread = member_stats(same)
    assert np.allclose(mean, scores) and np.all(spread == 0.0)
    # A constant offset per member (Bradley-Terry's free shift) is not disagreement either.
    offsets = np.array([0.0, 1.0, -2.0, 0.5, 3.0])
    mean, spread = member_stats(same + offsets, offsets)
    assert np.allclose(spread, 0.0)
    # ... but members that order the candidates differently are.
    mixed = same.copy()
    mixed[0, :2] += 3.0
    assert member_stats(mixed)[1][0] > 1.0 and member_stats(mixed)[1][1] == 0.0


def test_information_is_high_for_disagreement_not_for_shared_doubt() -> None:
    # Every member is sure, but they split 3-2: a label settles who is right.
    split = pair_information(np.array([4.0, 4.0, 4.0, -4.0, -4.0]), np.zeros(5), T)
    # Every member is unsure in the same way: a label would teach little about the members.
    doubt = pair_information(np.full(5, 0.05), np.zeros(5), T)
    agree = pair_information(np.full(5, 4.0), np.zeros(5), T)
    assert split[0] > 0.3 and doubt[0] < 1e-6 and agree[0] < 1e-6
    assert split[2] == pytest.approx(0.6) and agree[2] == 1.0 and doubt[2] == 1.0


def test_pick_question_takes_the_pair_members_disagree_on() -> None:
    # Candidates 0 and 1 are a sure call for every member; 1 vs 2 splits the members.
    members = np.array(
        [
            [5.0, 5.0, 5.0, 5.0],
            [0.0, 0.0, 0.0, 0.0],
            [2.0, -2.0, 2.0, -2.0],
        ]
    )
    q = pick_question(members, T)
    assert q is not None and {q.a, q.b} == {1, 2}
    assert "split 2-2" in q.why()
    assert pick_question(members[:1], T) is None
    # One member (no ensemble): the closest call is asked, with a reason that says so.
    single = pick_question(np.array([[3.0], [0.2], [0.0]]), T)
    assert single is not None and {single.a, single.b} == {1, 2} and single.info == 0.0
    assert "closest call" in single.why() and "members" not in single.why()


# -- the queue on a real store -----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "p.db", secrets.token_bytes(32))


def item(i: int, info: float | None, p: float = 0.5, source: str = "rerank") -> dict[str, object]:
    return {
        "id": f"q-{i}",
        "source": source,
        "prompt": f"prompt {i}",
        "a": f"first {i}",
        "b": f"second {i}",
        "why": f"because {i}",
        "info": info,
        "p": p,
        "version": 1,
    }


def pair_event(it: dict[str, object]) -> dict[str, object]:
    from palate.events import validate_event

    return validate_event(
        {
            "kind": "pair",
            "source": "review",
            "prompt": it["prompt"],
            "chosen": it["a"],
            "rejected": it["b"],
        }
    )


def test_queue_prefers_disagreement_and_never_repeats_an_answer(store: Store) -> None:
    for i, (info, p) in enumerate([(0.01, 0.5), (0.40, 0.5), (None, 0.5), (0.15, 0.7)]):
        assert store.add_review_item(item(i, info, p))
    # Same information: the closer call first.
    store.add_review_item(item(4, 0.15, p=0.52))
    order = [it["id"] for it in store.list_review(10)]
    assert order == ["q-1", "q-4", "q-3", "q-0", "q-2"]
    first = store.list_review(1)[0]
    assert {"id", "prompt", "a", "b", "why", "source", "expires", "info"} <= first.keys()
    assert first["prompt"] == "prompt 1" and first["why"] == "because 1"

    answered, result = store.answer_review("q-1", "a", pair_event)
    assert result is not None and not result.duplicate and answered["a"] == "first 1"
    stored = [e for e in store.iter_events() if e["source"] == "review"]
    assert len(stored) == 1 and stored[0]["chosen"] == "first 1"
    assert stored[0]["rejected"] == "second 1" and stored[0]["kind"] == "pair"
    # Gone from the list; offered again, it stays closed; answered twice is a conflict.
    assert "q-1" not in [it["id"] for it in store.list_review(10)]
    assert not store.add_review_item(item(1, 0.9))
    with pytest.raises(PalateError) as ei:
        store.answer_review("q-1", "b", pair_event)
    assert ei.value.code == "conflict"
    # The texts left the queue row when the answer became an event.
    assert store._conn.execute("SELECT body FROM review_items WHERE id='q-1'").fetchone() == (
        None,
    )
    # A skip closes without an event.
    _, none = store.answer_review("q-4", "skip", lambda it: None)
    assert none is None and store.review_counts()["open"] == 3
    with pytest.raises(PalateError) as ei:
        store.answer_review("q-missing", "a", pair_event)
    assert ei.value.code == "not_found"


def test_items_expire_and_an_open_item_takes_the_newer_score(store: Store) -> None:
    t0 = 1_800_000_000.0
    store.add_review_item(item(1, 0.1), now=t0)
    store.add_review_item(item(2, 0.2), now=t0)
    assert store.add_review_item(item(1, 0.5), now=t0 + 10)  # re-offered: newer score
    assert [it["id"] for it in store.list_review(5, now=t0 + 20)] == ["q-1", "q-2"]
    later = t0 + REVIEW_TTL_S + 5
    assert [it["id"] for it in store.list_review(5, now=later)] == ["q-1"]
    with pytest.raises(PalateError) as ei:
        store.answer_review("q-2", "a", pair_event, now=later)
    assert ei.value.code == "not_found"


def test_forget_takes_review_items_with_it(store: Store) -> None:
    store.add_review_item(item(1, 0.1, source="rerank"))
    store.add_review_item(item(2, 0.2, source="editor"))
    store.add_review_item(item(3, 0.3, source="editor"))
    _, res = store.answer_review("q-3", "b", pair_event)
    assert res is not None
    assert store.forget_review(source="editor") == 2
    assert [it["id"] for it in store.list_review(5)] == ["q-1"]
    store.add_review_item(item(4, 0.1))
    _, res = store.answer_review("q-4", "a", pair_event)
    assert res is not None
    assert store.forget_review(ids=[res.id]) == 1
    assert store.forget_review(everything=True) == 1
    assert store._conn.execute("SELECT count(*) FROM review_items").fetchone() == (0,)


# -- over the socket ------------------------------------------------------------------------------


def test_review_methods_over_the_socket(palate_daemon: DaemonProc) -> None:
    with palate_daemon.client() as c:
        assert c.review_list() == {"items": [], "open": 0}
        # No model yet: an adapter's candidates are still queued, unscored.
        added = c.call(
            "review_add",
            {"prompt": "Summarise the memo", "candidates": ["Short.", "A long one."]},
        )
        assert added["queued"] and added["id"].startswith("q-")
        again = c.call(
            "review_add",
            {"prompt": "Summarise the memo", "candidates": ["A long one.", "Short."]},
        )
        assert again["id"] == added["id"]  # the same question, in either order
        listed = c.review_list(limit=5)
        assert listed["open"] == 1
        (it,) = listed["items"]
        assert {"id", "prompt", "a", "b", "why", "source"} <= it.keys()
        assert it["source"] == "adapter" and it["info"] is None

        res = c.review_answer(it["id"], "b")
        assert res["answer"] == "b" and res["open"] == 0 and res["event"]["seq"] >= 1
        status = c.status()
        assert status["events"]["by_source"] == {"review": 1}
        assert status["review"] == {"open": 0, "b": 1}
        with pytest.raises(PalateError) as ei:
            c.review_answer(it["id"], "a")
        assert ei.value.code == "conflict"
        gone = c.call(
            "review_add", {"prompt": "Summarise the memo", "candidates": ["Short.", "A long one."]}
        )
        assert not gone["queued"] and gone["id"] is None

        for params in (
            {"id": it["id"], "answer": "maybe"},
            {"id": it["id"]},
            {"id": 3, "answer": "a"},
        ):
            with pytest.raises(PalateError) as ei:
                c.call("review_answer", params)
            assert ei.value.code == "invalid_request"
        for params in ({"limit": 0}, {"limit": 101}, {"bogus": 1}):
            with pytest.raises(PalateError) as ei:
                c.call("review_list", params)
            assert ei.value.code == "invalid_request"
        with pytest.raises(PalateError) as ei:
            c.call("review_add", {"prompt": "p", "candidates": ["only one"]})
        assert ei.value.code == "invalid_request"
        with pytest.raises(PalateError) as ei:
            c.review_answer("q-nothing", "a")
        assert ei.value.code == "not_found"
        assert {"review_list", "review_answer", "review_add"} <= set(c.hello()["methods"])


def test_cli_review(palate_daemon: DaemonProc) -> None:
    import json

    with palate_daemon.client() as c:
        c.call("review_add", {"prompt": "Name a colour", "candidates": ["Blue", "Seven"]})
    r = palate_daemon.cli("status")
    assert "review   1 open question(s)" in r.stdout, r.stdout
    r = palate_daemon.cli("review", "list", "--json")
    assert r.returncode == 0, r.stderr
    (it,) = json.loads(r.stdout)["items"]
    r = palate_daemon.cli("review", "list")
    assert it["id"] in r.stdout and "Name a colour" in r.stdout
    r = palate_daemon.cli("review", "answer", it["id"], "a", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["event"]["id"] and out["open"] == 0
    r = palate_daemon.cli("review", "answer", it["id"], "a")
    assert r.returncode == 4 and "already answered" in r.stderr
    r = palate_daemon.cli("review", "answer", it["id"], "never")
    assert r.returncode == 2


def test_rescoring_reorders_open_items_and_leaves_answered_ones(store: Store) -> None:
    store.add_review_item(item(1, None))
    store.add_review_item(item(2, 0.3))
    store.add_review_item(item(3, 0.2))
    store.answer_review("q-3", "skip", lambda it: None)
    n = store.rescore_review(
        [
            ("q-1", 0.9, 0.4, 2, "the members split", {"votes_a": 0.4, "members": 5}),
            ("q-3", 0.9, 0.4, 2, "late", {}),
            ("q-gone", 0.9, 0.4, 2, "gone", {}),
        ]
    )
    assert n == 1
    first, second = store.list_review(5)
    assert first["id"] == "q-1" and first["version"] == 2 and first["why"] == "the members split"
    assert first["votes_a"] == 0.4 and first["prompt"] == "prompt 1"
    assert second["id"] == "q-2" and store.review_counts()["open"] == 2
