"""The embedded SmolLM2-135M-Instruct end to end: the sampler against mlx-lm on the real
model, and ``palate generate`` through a real daemon that serves a reward model on it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import PALATE, DaemonProc, daemon_env, missing

pytestmark = pytest.mark.slow

PROMPT = "Human: Give me one tip for sleeping better.\n\nAssistant:"


@pytest.fixture(scope="module")
def embedded():  # type: ignore[no-untyped-def]
    from palate.model.base_model import ModelLoadError, load_base_model

    try:
        return load_base_model()
    except ModelLoadError as e:
        missing(f"the embedded model is not installed: {e.message}")


def test_sampler_matches_mlx_lm_on_the_embedded_model(embedded) -> None:  # type: ignore[no-untyped-def]
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from palate.generation.sampling import SampleConfig, eos_ids, prompt_ids, sample

    ids = prompt_ids(embedded.tokenizer, PROMPT)
    stop = eos_ids(embedded.tokenizer)
    want = []
    for tok, _ in generate_step(mx.array(ids), embedded.model, max_tokens=12):
        if tok in stop:
            break
        want.append(int(tok))
    s = sample(
        embedded.model, embedded.tokenizer, ids, 2, SampleConfig(max_tokens=12, temperature=0)
    )
    assert s.tokens == [want, want]
    assert s.texts[0].strip(), "the instruct model answers in words"


def test_generate_through_the_daemon_on_the_embedded_model(embedded, home: Path) -> None:  # type: ignore[no-untyped-def]
    from palate.model import artifacts
    from palate.model.reward_model import LoraConfig, RewardModel
    from palate.model.scoring import Calibration
    from palate.paths import resolve
    from palate.store.database import Store
    from palate.store.keys import KeyManager

    lora = LoraConfig(layers=2)
    rm = RewardModel(embedded.model, lora, seed=0)
    blob = artifacts.to_bytes(
        artifacts.artifact_from_model(
            rm, artifacts.build_config(embedded, lora, 256, Calibration())
        )
    )
    paths = resolve(home)
    paths.ensure()
    store = Store(paths.db_file, KeyManager(paths, "file").create())
    v = store.add_model(base_model=embedded.model_id, artifact=blob, meta={"decision": "deploy"})
    store.deploy_model(v, how="manual", reason="test")
    store.close()
    d = DaemonProc(home, daemon_env(home)).start()
    try:
        # The first request loads the model; a loaded CI machine needs more than cli()'s 120 s.
        r = subprocess.run(
            [*PALATE, "generate", PROMPT, "-n", "4", "--max-tokens", "24", "--seed", "3", "--json"],
            env=d.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["version"] == v and len(out["candidates"]) == 4
        assert out["policy"]["base_model"] == "builtin:smollm2-135m"
        assert out["best"] == out["candidates"][out["best_index"]]
        assert all(c.strip() for c in out["candidates"])
        assert out["usage"]["generated_tokens"] > 4 and out["usage"]["prompt_tokens"] > 10
    finally:
        d.terminate()
