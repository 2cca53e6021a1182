"""Sampling, strategies and the generate pipeline on a tiny random llama (tests/tiny_lm.py).

The parity tests hold the batched one-prefill sampler to independent paths: mlx-lm's own
``generate_step`` (greedy tokens), and teacher-forced log-probs of the sampled sequences
(which only agree if the replicated KV cache and the dropping of finished rows are right).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from palate.generation import sampling
from palate.generation.engine import GenerateRequest, generate, uncertainty_of
from palate.generation.policy import Rows, base_policy, response_logprobs
from palate.generation.sampling import SampleConfig, eos_ids, prompt_ids, sample
from palate.generation.strategies import choose
from tiny_lm import tiny_base


@pytest.fixture(scope="module")
def base():  # type: ignore[no-untyped-def]
    return tiny_base(seed=3)


def _greedy_reference(model, ids: list[int], n_tokens: int, stop: set[int]) -> list[int]:  # type: ignore[no-untyped-def]
    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=n_tokens):
        if tok in stop:
            break
        out.append(int(tok))
    return out


def test_greedy_matches_mlx_lm_for_every_row(base) -> None:  # type: ignore[no-untyped-def]
    ids = prompt_ids(base.tokenizer, "w1 w2 w3 w4 w5")
    stop = eos_ids(base.tokenizer)
    want = _greedy_reference(base.model, ids, 20, stop)
    s = sample(base.model, base.tokenizer, ids, 3, SampleConfig(max_tokens=20, temperature=0))
    assert s.tokens == [want] * 3
    assert s.prompt_tokens == len(ids)


def test_sampled_logprobs_equal_teacher_forcing(base) -> None:  # type: ignore[no-untyped-def]
    """Rows finish at different steps (and are dropped from the batch); every row's summed
    log-prob must still equal a fresh teacher-forced pass over its whole sequence."""
    tok = base.tokenizer
    ids = prompt_ids(tok, "w7 w8 zz w9")
    s = sample(
        base.model, tok, ids, 6, SampleConfig(max_tokens=30, temperature=1.5, top_p=1.0, seed=11)
    )
    assert len(s.texts) == 6 and set(s.finish) <= {"stop", "length"}
    eos = int(tok.eos_token_id)
    ends = [[eos] if f == "stop" else [] for f in s.finish]
    seqs = [ids + t + e for t, e in zip(s.tokens, ends, strict=True)]
    assert len({len(q) for q in seqs}) > 1, "the seed should give rows of different lengths"
    width = max(map(len, seqs))
    arr = np.zeros((len(seqs), width), np.int32)
    for i, q in enumerate(seqs):
        arr[i, : len(q)] = q
    rows = Rows(arr, np.full(len(seqs), len(ids), np.int32), np.array([len(q) for q in seqs]))
    forced = np.array(response_logprobs(base.model, rows)[0])
    assert np.allclose(forced, s.logprob, atol=1e-3)
    for t, f in zip(s.tokens, s.finish, strict=True):
        assert eos not in t
        assert f == "stop" or len(t) == 30


def test_seed_reproduces_and_fallback_path_agrees(base, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = SampleConfig(max_tokens=12, temperature=0.9, seed=5)
    a = sample(base.model, base.tokenizer, "w3 w4", 4, cfg)
    b = sample(base.model, base.tokenizer, "w3 w4", 4, cfg)
    assert a.tokens == b.tokens
    greedy = SampleConfig(max_tokens=12, temperature=0)
    batched = sample(base.model, base.tokenizer, "w3 w4", 2, greedy)
    # A model whose cache cannot be batched this way goes through generate_step per sample.
    monkeypatch.setattr(sampling, "KVCache", type("Other", (), {}))
    each = sample(base.model, base.tokenizer, "w3 w4", 2, greedy)
    assert each.tokens == batched.tokens
    assert np.allclose(each.logprob, batched.logprob, atol=1e-3)


def test_long_prompts_are_cut_from_the_left(base) -> None:  # type: ignore[no-untyped-def]
    ids = prompt_ids(base.tokenizer, " ".join(f"w{i % 40}" for i in range(60)))
    cfg = SampleConfig(max_tokens=3, temperature=0, max_prompt_tokens=16)
    s = sample(base.model, base.tokenizer, ids, 2, cfg)
    assert s.prompt_tokens == 16 and s.prompt_tokens_cut == len(ids) - 16
    assert s.tokens == sample(base.model, base.tokenizer, ids[-16:], 2, cfg).tokens


def test_sample_rejects_nonsense(base) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        sample(base.model, base.tokenizer, "x", 0)
    with pytest.raises(ValueError):
        sample(base.model, base.tokenizer, "x", 1, SampleConfig(max_tokens=0))


# ---------------------------------------------------------------------------- strategies


def test_best_soft_and_lower_bound() -> None:
    raw, z = [0.1, 2.0, 1.9, -1.0], [0.0, 1.5, 1.4, -2.0]
    assert choose(raw, z, "best").index == 1
    assert choose([1.0, 1.0], [0.0, 0.0], "best").index == 0  # ties: earliest
    soft = choose(raw, z, "soft", lam=0.5, seed=1)
    p = soft.weights
    assert p is not None and math.isclose(sum(p), 1.0)
    assert p[1] / p[2] == pytest.approx(math.exp((1.5 - 1.4) / 0.5))
    assert choose(raw, z, "soft", lam=1e-4, seed=9).index == 1  # lambda -> 0 is best-of-N
    draws = [choose(raw, z, "soft", lam=0.5, seed=s).index for s in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert np.allclose(freq, p, atol=0.03)
    # The lower bound prefers the candidate the members agree on.
    lb = choose(raw, z, "lower_bound", kappa=1.0, uncertainty=[0.0, 0.5, 0.01, 0.0])
    assert lb.index == 2 and lb.weights == pytest.approx([0.1, 1.5, 1.89, -1.0])
    plain = choose(raw, z, "lower_bound", uncertainty=None)
    assert plain.index == 1 and plain.fallback
    with pytest.raises(ValueError):
        choose(raw, z, "worst")
    with pytest.raises(ValueError):
        choose(raw, z, "soft", lam=0)


class _Res:
    def __init__(self, raw: list[float], members: list[list[float]] | None = None) -> None:
        self.raw = raw
        self.z = [x * 2 for x in raw]
        self.truncated = [False] * len(raw)
        if members is not None:
            self.members = members
            self.uncertainty = [float(np.std(m)) for m in members]


def test_generate_pipeline_shape_and_uncertainty(base) -> None:  # type: ignore[no-untyped-def]
    pol = base_policy(base)

    def by_length(prompt: str, texts: list[str]) -> _Res:
        return _Res([float(len(t)) for t in texts])

    req = GenerateRequest("w1 w2", 4, "best", sampling=SampleConfig(max_tokens=10, seed=2))
    out = generate(pol, by_length, req)
    assert out["best"] == max(out["candidates"], key=len)
    assert "uncertainty" not in out and out["policy"]["name"] == "base"
    assert out["usage"]["generated_tokens"] > 0 and out["usage"]["tokens_per_s"] > 0

    def ensemble(prompt: str, texts: list[str]) -> _Res:
        return _Res([1.0] * len(texts), [[1.0, 1.0 + i] for i in range(len(texts))])

    out = generate(
        pol,
        ensemble,
        GenerateRequest("w1", 3, "lower_bound", sampling=SampleConfig(max_tokens=4, seed=1)),
    )
    assert out["uncertainty"] == pytest.approx([0.0, 0.5, 1.0])
    assert out["best_index"] == 0 and "lower_bounds" in out
    one_member = _Res([1.0, 2.0], [[1.0], [2.0]])
    assert uncertainty_of(one_member) is None
