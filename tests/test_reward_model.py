"""Reward model: formatting, truncation, grouped forward vs mlx-lm's own blocks."""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from palate.model.batching import collate, encode_examples  # noqa: E402
from palate.model.reward_model import (  # noqa: E402
    LoraConfig,
    RewardModel,
    encode_prompt_responses,
    parse_turns,
    truncate_group,
)
from palate.model.scoring import batch_arrays  # noqa: E402
from tiny_lm import marker_pairs, tiny_base  # noqa: E402


def test_parse_hh_transcript_into_turns() -> None:
    turns = parse_turns("Human: hi there\n\nAssistant: hello\n\nHuman: how are you?")
    assert turns == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you?"},
    ]
    assert parse_turns("just a question") == [{"role": "user", "content": "just a question"}]
    # trailing empty assistant marker dropped; repeated roles merged
    assert parse_turns("Human: a\n\nHuman: b\n\nAssistant:") == [
        {"role": "user", "content": "a\n\nb"}
    ]


def test_encoding_uses_chat_template_and_ends_at_end_of_turn() -> None:
    base = tiny_base()
    tok = base.tokenizer
    p, (r,) = encode_prompt_responses(tok, "Human: w1 w2\n\nAssistant: w3\n\nHuman: w4", ["w5 w6"])
    text = tok.decode(p + r)
    assert text.startswith("<|im_start|> user w1 w2 <|im_end|>")
    assert tok.convert_ids_to_tokens(r[-1]) == "<|im_end|>"
    assert tok.convert_ids_to_tokens(p[-1]) == "assistant"


def test_truncation_cuts_prompt_from_left_and_keeps_response_head_and_end() -> None:
    prompt = list(range(100))
    p, (r1, r2), t = truncate_group(prompt, [list(range(10)), list(range(30))], 64)
    assert p == prompt[-34:] and len(r2) == 30 and len(r1) == 10
    assert t.prompt_tokens_cut == 66 and t.response_tokens_cut == 0
    p, (r,), t = truncate_group(prompt, [list(range(200))], 64)
    assert r == [*range(47), 199] and p == prompt[-16:]  # the end-of-turn token stays
    assert t.response_tokens_cut == 152 and t.truncated


def test_truncation_is_counted_never_dropped() -> None:
    base = tiny_base()
    ex = marker_pairs(20)
    groups, stats = encode_examples(ex, base.tokenizer, max_tokens=24)
    assert len(groups) == 20 and stats.examples == 20
    assert stats.prompt_truncated > 0 and stats.tokens_cut > 0
    assert all(len(g.prompt) + max(len(r) for r in g.responses) <= 24 for g in groups)


def test_grouped_forward_matches_mlx_lm_blocks() -> None:
    base = tiny_base()
    model = RewardModel(base.model, LoraConfig(layers=2), seed=1)
    # make LoRA non-trivial so the parity covers the adapted blocks too
    model.update(
        {
            "layers": [{} for _ in range(2)]
            + [
                {"self_attn": {"q_proj": {"lora_b": mx.random.normal((8, 64)) * 0.1}}}
                for _ in range(2)
            ]
        }
    )
    groups, _ = encode_examples(marker_pairs(6, seed=3), base.tokenizer, 64)
    grouped = np.array(model(*batch_arrays(collate(groups, range(6)))))
    seqs = [np.concatenate([g.prompt, r]) for g in groups for r in g.responses]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    ref = np.array(model.reference_rewards(mx.array(tokens), mx.array([len(s) for s in seqs])))
    np.testing.assert_allclose(grouped, ref, atol=1e-5)


def test_base_model_is_not_modified_and_reusable() -> None:
    base = tiny_base()
    before = type(base.model.model.layers[-1].self_attn.q_proj).__name__
    a = RewardModel(base.model, LoraConfig(layers=2), seed=0)
    b = RewardModel(base.model, LoraConfig(layers=3, rank=4), seed=0)
    assert type(base.model.model.layers[-1].self_attn.q_proj).__name__ == before == "Linear"
    assert set(a.trainable_state()) != set(b.trainable_state())
    names = a.trainable_state().keys()
    assert all("lora_" in n or n.startswith("head.") for n in names)


def test_unsupported_lora_layers_rejected() -> None:
    with pytest.raises(ValueError):
        RewardModel(tiny_base().model, LoraConfig(layers=9))


def test_lora_config_round_trips_every_field_and_reads_older_artifacts() -> None:
    """What an artifact stores is what it loads (keys, dropout and depth included), and an
    artifact written before a field existed loads with the behaviour it was trained with:
    every block (depth 0), no dropout, the default keys (found by mutation testing)."""
    import json

    from palate.model.reward_model import DEFAULT_LORA_KEYS

    cfg = LoraConfig(rank=4, alpha=3.0, layers=2, dropout=0.1, keys=("q_proj",), depth=5)
    stored = json.loads(json.dumps(cfg.to_json()))
    assert stored["keys"] == ["q_proj"] and stored["depth"] == 5
    assert LoraConfig.from_json(stored) == cfg
    older = {"rank": 4, "alpha": 3.0, "layers": 2}
    assert LoraConfig.from_json(older) == LoraConfig(
        rank=4, alpha=3.0, layers=2, dropout=0.0, keys=DEFAULT_LORA_KEYS, depth=0
    )


def test_an_empty_response_is_read_at_one_end_of_turn_position() -> None:
    """Without a chat template an empty response renders to nothing; the head still needs
    one position to read, the end-of-turn token (found by mutation)."""
    from tiny_lm import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = None
    _, responses = encode_prompt_responses(tok, "Human: hello", ["", "a b"])
    assert responses[0] == [tok.eos_token_id] and responses[1] != responses[0]
    with_template = encode_prompt_responses(tiny_tokenizer(), "Human: hello", [""])[1]
    assert with_template == [[tok.eos_token_id]]  # the template's end of turn, stripped
