"""Truncation to the token budget: what the reward model still reads of a long example.

Editor prompts are up to 6,000 characters before the cursor and 2,000 after; the default
budget is 384 tokens. Cutting such a prompt from the left used to keep only text after the
cursor (the marker and the prefix gone) and the chat header too; a cut response lost its
end-of-turn token, where the head reads the score.
"""

from __future__ import annotations

import pytest

from palate.adapters.code_context import CURSOR, code_prompt
from palate.model.reward_model import (
    PromptIds,
    cut_prompt,
    encode_prompt_responses,
    truncate_group,
)
from palate.model.training import TrainConfig
from tiny_lm import tiny_tokenizer


def _ids(n: int, head: int = 0, tail: int = 0, cursor: int = -1, clen: int = 0) -> PromptIds:
    out = PromptIds(range(n))
    out.head, out.tail, out.cursor, out.cursor_len = head, tail, cursor, clen
    return out


def test_header_and_tail_stay_and_the_end_of_the_body_is_kept() -> None:
    p = _ids(100, head=5, tail=3)
    kept = cut_prompt(p, 20)
    assert kept == [0, 1, 2, 3, 4, *range(85, 97), 97, 98, 99]
    assert cut_prompt(list(range(100)), 20) == list(range(80, 100))  # plain ids: from the left
    assert cut_prompt(_ids(100, head=15, tail=10), 20) == list(range(80, 100))  # no room


def test_code_keeps_the_prefix_end_and_some_suffix_around_the_cursor() -> None:
    # head 0-4, prefix 5-64, cursor marker 65-67, suffix 68-96, tail 97-99
    p = _ids(100, head=5, tail=3, cursor=65, clen=3)
    kept = cut_prompt(p, 40)
    room = 40 - 5 - 3 - 3  # 29 for code: a quarter (7) after the cursor, the rest before
    assert kept[:5] == [0, 1, 2, 3, 4] and kept[-3:] == [97, 98, 99]
    assert kept[5:-3] == [*range(65 - (room - 7), 65), 65, 66, 67, *range(68, 68 + 7)]
    # A short prefix leaves its room to the code after the cursor.
    short = _ids(100, head=5, tail=3, cursor=10, clen=3)
    assert cut_prompt(short, 40)[5:-3] == [*range(5, 10), 10, 11, 12, *range(13, 13 + 24)]


def test_a_cut_response_keeps_its_end_of_turn_token() -> None:
    p, (r,), t = truncate_group(list(range(100)), [list(range(200))], 64)
    assert r == [*range(47), 199] and p == list(range(84, 100))
    assert t.response_tokens_cut == 152 and t.prompt_tokens_cut == 84


def test_tiny_template_marks_header_cursor_and_tail() -> None:
    tok = tiny_tokenizer()
    prompt = "w1 w2 w3 " + CURSOR + " w4 w5"
    p, (r,) = encode_prompt_responses(tok, prompt, ["w6"])
    names = tok.convert_ids_to_tokens(list(p))
    assert names[: p.head] == ["<|im_start|>", "user"]
    assert names[len(p) - p.tail :] == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert (p.cursor, p.cursor_len) == (p.head + 3, 1)  # the word-level vocabulary's [UNK]
    assert tok.convert_ids_to_tokens(r[-1]) == "<|im_end|>"


def _python_file(lines: int, tag: str) -> str:
    return "".join(
        f"def {tag}_{i}(values, scale={i}):\n    return [v * scale + {i} for v in values]\n\n"
        for i in range(lines)
    )


@pytest.mark.slow
def test_real_tokenizer_keeps_the_code_at_the_cursor_and_the_chat_markup() -> None:
    import mlx.core as mx

    from palate.model.base_model import locate_builtin
    from palate.model.gguf_loader import _plain
    from palate.model.gguf_tokenizer import tokenizer_from_gguf_metadata

    _, meta = mx.load(str(locate_builtin("smollm2-135m")), return_metadata=True)
    tok = tokenizer_from_gguf_metadata({k: _plain(v) for k, v in meta.items()})
    budget = TrainConfig.max_tokens
    # A real editor context: 6,000 characters before the cursor, 2,000 after.
    prefix = _python_file(200, "above") + "def nearest_the_cursor(xs):\n    total = "
    suffix = "\n    return total\n\n" + _python_file(200, "below")
    prompt = code_prompt(prefix, suffix)
    assert len(prompt) > 7_900
    completion = "sum(x * x for x in xs)"
    p, (r,) = encode_prompt_responses(tok, prompt, [completion])
    assert len(p) > 3 * budget  # this prompt must be cut

    kept, (kr,), t = truncate_group(p, [r], budget)
    assert len(kept) + len(kr) <= budget and t.prompt_tokens_cut == len(p) - len(kept)
    text = tok.decode(kept)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert CURSOR in text
    assert "def nearest_the_cursor(xs):\n    total = " + CURSOR + "\n    return total" in text
    before, after = text.split(CURSOR)
    assert len(tok.encode(before)) > 2 * len(tok.encode(after))  # mostly the prefix's end

    # What a cut from the left kept: the end of the suffix, no cursor, no chat header.
    naive = tok.decode(list(p)[len(p) - (budget - len(r)) :])
    assert CURSOR not in naive and "<|im_start|>user" not in naive

    # A response longer than the budget still ends on the end-of-turn token.
    _, (long_r,) = encode_prompt_responses(tok, prompt, [_python_file(60, "answer")])
    _, (cut_r,), t2 = truncate_group(p, [long_r], budget)
    assert t2.response_tokens_cut > 0
    assert (
        tok.convert_ids_to_tokens(cut_r[-1])
        == "<|im_end|>"
        == tok.convert_ids_to_tokens(long_r[-1])
    )

    # A long transcript keeps its header, its latest turns and the generation prompt.
    turns = "".join(f"Human: question {i} " + "word " * 60 + f"\n\nAssistant: answer {i}\n\n"
                    for i in range(30))  # fmt: skip
    hh, _ = encode_prompt_responses(tok, turns + "Human: the last question?", ["ok"])
    hh_text = tok.decode(cut_prompt(hh, budget - 4))
    assert hh_text.startswith("<|im_start|>system\n")
    assert "the last question?<|im_end|>\n<|im_start|>assistant\n" in hh_text
    assert "question 0 " not in hh_text
