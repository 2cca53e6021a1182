"""Validated events for tests that ingest into a real store and train on it.

The rule is learnable by a tiny model in a few steps: the chosen response starts with
"bravo", the rejected one is the same words without it.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from palate.events import validate_event

WORDS = ["alpha", "beta", "gamma", "delta", "sigma", "kappa", "theta", "rho"]


def pair_events(
    n: int, seed: int, prompt_words: int = 6, response_words: int = 5
) -> list[dict[str, Any]]:
    """``n`` pair events (distinct prompts, timestamps in order), validated as ingest does."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rnd.choice(WORDS) for _ in range(prompt_words))
        a = " ".join(rnd.choice(WORDS) for _ in range(response_words))
        event = {"id": uuid.uuid4().hex, "kind": "pair", "source": "t", "ts": 1.7e9 + i,
                 "prompt": f"{q} {i}?", "chosen": f"bravo {a}", "rejected": a}  # fmt: skip
        out.append(validate_event(event, now=2e9))
    return out
