"""Scoring over the socket: errors and limits that need no trained model."""

from __future__ import annotations

import pytest

from conftest import DaemonProc
from palate.cli.main import EXIT_CODES
from palate.errors import PalateError
from palate.runtime.api import MAX_CANDIDATES


def test_no_model_is_a_clear_error(palate_daemon: DaemonProc, tmp_path: object) -> None:
    with palate_daemon.client() as c:
        with pytest.raises(PalateError) as ei:
            c.rerank("hi", ["a", "b"])
        assert ei.value.code == "no_model" and "palate train" in ei.value.message
        with pytest.raises(PalateError) as ei:
            c.score("hi", ["a"])
        assert ei.value.code == "no_model"
        # The daemon is unharmed and still ingests.
        c.ingest({"kind": "pair", "source": "t", "prompt": "p", "chosen": "a", "rejected": "b"})


def test_score_params_are_validated(palate_daemon: DaemonProc) -> None:
    with palate_daemon.client() as c:
        cases = [
            ("rerank", {"prompt": "p", "candidates": []}, "invalid_request"),
            ("rerank", {"prompt": "p", "candidates": ["x"] * (MAX_CANDIDATES + 1)}, "too_large"),
            ("rerank", {"prompt": "p", "candidates": ["a", 3]}, "invalid_request"),
            ("rerank", {"prompt": "p", "candidates": ["a"], "top_k": 0}, "invalid_request"),
            ("score", {"prompt": "p" * 60_000, "responses": ["a"]}, "too_large"),
            ("compare", {"prompt": "p", "a": "x"}, "invalid_request"),
            ("score", {"prompt": "p", "responses": ["a"], "bogus": 1}, "invalid_request"),
        ]
        for method, params, code in cases:
            with pytest.raises(PalateError) as ei:
                c.call(method, params)
            assert ei.value.code == code, (method, params)


def test_cli_rerank_without_model(palate_daemon: DaemonProc, tmp_path: object) -> None:
    from pathlib import Path

    f = Path(str(tmp_path)) / "c.jsonl"
    f.write_text('"first"\n{"text": "second"}\n')
    r = palate_daemon.cli("rerank", "prompt", "--candidates", str(f))
    assert r.returncode == EXIT_CODES["no_model"]
    assert "palate train" in r.stderr
    bad = Path(str(tmp_path)) / "bad.jsonl"
    bad.write_text('"ok"\n{oops\n')
    r = palate_daemon.cli("rerank", "prompt", "--candidates", str(bad))
    # an unusable candidates file is a usage mistake: exit 2 with click's message (issue 20)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr
