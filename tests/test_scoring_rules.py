"""Issue 20 item 8 at the wire level, through a real daemon's socket: `rerank` with one
candidate claims no runner-up, and `score`/`rerank`/`compare` refuse an empty or blank prompt
by exactly the rule `ingest` applies to feedback (docs/protocol.md, docs/reranking.md).

The deployed model is a tiny random reward model on a tiny GGUF base (tests/tiny_gguf.py):
what it prefers does not matter here, only that a real scorer answers.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import _STARTED, DaemonProc, daemon_env
from palate.errors import PalateError

#: Blank by str.strip() (events._check_text): ASCII and Unicode whitespace.
BLANK = ["", " ", "\n\t  \r\n", "\u3000\u2003", "\x1c\x1d"]
#: Not blank by that rule, though they look empty: must be scored, as ingest stores them.
NOT_BLANK = ["\u200b", "."]


def _tiny_reward_model(root: Path) -> tuple[Path, bytes]:
    from palate.model import artifacts
    from palate.model.base_model import load_base_model
    from palate.model.reward_model import LoraConfig, RewardModel
    from palate.model.scoring import Calibration
    from tiny_gguf import tiny_args, tiny_model, write_gguf

    args = tiny_args()
    gguf = write_gguf(root / "tiny.gguf", tiny_model(args), args)
    base = load_base_model(str(gguf))
    lora = LoraConfig(layers=1)
    rm = RewardModel(base.model, lora, seed=0)
    blob = artifacts.to_bytes(
        artifacts.artifact_from_model(rm, artifacts.build_config(base, lora, 64, Calibration()))
    )
    return gguf, blob


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """A real daemon with a deployed (tiny, random) reward model, seeded into its store
    before it starts (as tests/test_generation_daemon.py does)."""
    from palate.paths import resolve
    from palate.store.database import Store
    from palate.store.keys import KeyManager

    root = tmp_path_factory.mktemp("rm")
    gguf, blob = _tiny_reward_model(root)
    home = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    try:
        (home / "config.toml").write_text(f'base_model = "{gguf}"\n')
        paths = resolve(home)
        paths.ensure()
        store = Store(paths.db_file, KeyManager(paths, "file").create())
        v = store.add_model(base_model=str(gguf), artifact=blob, meta={"decision": "deploy"})
        store.deploy_model(v, how="manual", reason="test")
        store.close()
        daemon = DaemonProc(home, daemon_env(home)).start()
        _STARTED.remove(daemon)  # shared by the module's tests; stopped below
        yield daemon
        if daemon.alive():
            daemon.terminate()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_rerank_with_one_candidate_claims_no_runner_up(d: DaemonProc) -> None:
    with d.client(timeout=120) as c:
        one = c.call("rerank", {"prompt": "a question", "candidates": ["the only answer"]})
        assert one["p_top_over_next"] is None
        assert one["confident"] is False
        assert one["order"] == [0] and len(one["ranked"]) == 1
        assert one["p_best"] == [pytest.approx(1.0)] and math.isfinite(one["scores"][0])
        # the same with a lower bound: still no runner-up
        lb = c.call("rerank", {"prompt": "a question", "candidates": ["x"], "lower_bound": 1.0})
        assert lb["p_top_over_next"] is None and lb["confident"] is False
        # two candidates, even when only the best is shown, do have a runner-up
        two = c.call("rerank", {"prompt": "a question", "candidates": ["one", "two"], "top_k": 1})
        assert isinstance(two["p_top_over_next"], float) and 0.5 <= two["p_top_over_next"] <= 1
        assert isinstance(two["confident"], bool) and len(two["ranked"]) == 1


def _call(c: object, method: str, prompt: str) -> object:
    params = {
        "score": {"prompt": prompt, "responses": ["a response"]},
        "rerank": {"prompt": prompt, "candidates": ["one", "two"]},
        "compare": {"prompt": prompt, "a": "one", "b": "two"},
    }[method]
    return c.call(method, params)  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["score", "rerank", "compare"])
def test_an_empty_or_blank_prompt_is_refused_as_ingest_refuses_it(
    d: DaemonProc, method: str
) -> None:
    with d.client(timeout=120) as c:
        for prompt in BLANK:
            with pytest.raises(PalateError) as ei:
                _call(c, method, prompt)
            assert ei.value.code == "invalid_request", (method, repr(prompt))
            assert ei.value.message.startswith("prompt must not be empty or blank")
            assert ei.value.details.get("param") == "prompt"
            # ingest refuses the same prompt as feedback, with the same words
            with pytest.raises(PalateError) as ev:
                c.ingest(
                    {
                        "kind": "pair",
                        "source": "t",
                        "prompt": prompt,
                        "chosen": "a",
                        "rejected": "b",
                    }
                )
            assert ev.value.code == "invalid_event"
            assert {"field": "prompt", "reason": "must not be empty or blank"} in ev.value.details[
                "errors"
            ]
        for prompt in NOT_BLANK:  # what ingest stores is scored: the rules match exactly
            assert isinstance(_call(c, method, prompt), dict), (method, repr(prompt))
            c.ingest(
                {"kind": "pair", "source": "t", "prompt": prompt, "chosen": "a", "rejected": "b"}
            )
        # the daemon is unharmed
        assert c.call("score", {"prompt": "p", "responses": ["r"]})["version"] >= 1


def test_the_blank_prompt_is_refused_before_any_model(home: Path) -> None:
    """Without a deployed model the answer is still the prompt's mistake, not `no_model`: the
    check runs first, so the user fixes the request before anything else."""
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        for method in ("score", "rerank", "compare"):
            with pytest.raises(PalateError) as ei:
                _call(c, method, " ")
            assert ei.value.code == "invalid_request", method
            with pytest.raises(PalateError) as ei:
                _call(c, method, "a real prompt")
            assert ei.value.code == "no_model", method
    d.terminate()
