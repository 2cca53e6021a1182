"""The held-out split: which feedback is never trained on, so the gate can judge a model on it.

Membership is a pure function of a *split key* (the conversation id, else the prompt) and a
salt: ``sha256(salt + key)`` mapped to [0, 1) and compared with the held-out fraction. So

- it is stable across nights and processes (no RNG, no ordering, no stored state);
- it does not move as data grows: adding feedback never changes where an old item lives, so a
  held-out example stays held out forever and nothing a model trained on is ever used to judge it;
- every item sharing a key lands on the same side (all pairs of one ranking, every turn of one
  conversation), so near-duplicates cannot leak across the split.

The salt makes this split independent of other hash splits of the same data (training's own
validation split in ``training._split`` uses a different salt, and so does any file that was
itself produced by a hash split). Changing the salt or the fraction re-deals the split, which
silently puts previously trained examples into the held-out set: don't, or re-train everything.

Pure: no I/O, no MLX.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "DEFAULT_FRACTION",
    "HELDOUT_SALT",
    "MIN_HELDOUT_PAIRS",
    "HeldoutStatus",
    "Split",
    "heldout_status",
    "is_heldout",
    "split_items",
    "split_key",
    "split_value",
]

#: Share of keys held out. 15% keeps most of a small personal data set for training while a
#: few hundred pairs of feedback already give a held-out set big enough to judge.
DEFAULT_FRACTION = 0.15
#: Versioned so a deliberate re-deal is visible in recorded metrics.
HELDOUT_SALT = "palate-heldout:v1:"
#: Below this many held-out pairs the gate refuses to judge. With 50 pairs the 95% Wilson
#: interval of a 70% accuracy is about +-12 points: wide, but enough to tell a model from
#: chance and from the length baselines. Fewer and any verdict is mostly noise.
MIN_HELDOUT_PAIRS = 50

T = TypeVar("T")


def _normalise(text: str) -> str:
    # Trivially different prompts ("Fix this" / "fix  this\n") must share a side.
    return " ".join(text.split()).casefold()


def split_key(prompt: str | Sequence[Mapping[str, str]], conversation_id: str | None = None) -> str:
    """The key an item is split by.

    The conversation id when there is one (every turn of a conversation on one side);
    otherwise, for a message list, its first user message (later turns of the same
    conversation repeat it); otherwise the prompt text. Whitespace-collapsed and case-folded.
    """
    if conversation_id:
        return "conv:" + conversation_id
    if isinstance(prompt, str):
        return "prompt:" + _normalise(prompt)
    for message in prompt:
        if message.get("role") == "user":
            return "prompt:" + _normalise(message.get("content", ""))
    return "prompt:" + _normalise("\n".join(m.get("content", "") for m in prompt))


def split_value(key: str, salt: str = HELDOUT_SALT) -> float:
    """A number in [0, 1) from ``sha256(salt + key)``: uniform, stable, independent per salt."""
    digest = hashlib.sha256((salt + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fraction(fraction: float) -> None:
    if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction!r}")


def is_heldout(key: str, fraction: float = DEFAULT_FRACTION, salt: str = HELDOUT_SALT) -> bool:
    """True if the item with this split key is held out (never trained on)."""
    _check_fraction(fraction)
    return split_value(key, salt) < fraction


@dataclass(frozen=True)
class Split(Generic[T]):
    """Items on each side, each in its input order."""

    train: list[T] = field(default_factory=list)
    heldout: list[T] = field(default_factory=list)


def split_items(
    items: Iterable[T],
    key: Callable[[T], str],
    fraction: float = DEFAULT_FRACTION,
    salt: str = HELDOUT_SALT,
) -> Split[T]:
    """Deal ``items`` into train and held-out by ``is_heldout(key(item))``.

    Unlike training's internal validation split this never "rescues" an empty side: a
    held-out example must stay held out even when that leaves training short.
    """
    _check_fraction(fraction)
    out: Split[T] = Split()
    for item in items:
        (out.heldout if split_value(key(item), salt) < fraction else out.train).append(item)
    return out


@dataclass(frozen=True)
class HeldoutStatus:
    """Whether the held-out set is big enough to judge, with a sentence saying so."""

    enough: bool
    n: int
    minimum: int
    message: str


def heldout_status(
    n_heldout: int, minimum: int = MIN_HELDOUT_PAIRS, fraction: float = DEFAULT_FRACTION
) -> HeldoutStatus:
    """``enough`` iff ``n_heldout >= minimum``; the message is what the user is told
    (including roughly how much more feedback it takes at ``fraction``)."""
    if n_heldout >= minimum:
        msg = f"{n_heldout} held-out pairs (at least {minimum} needed to judge)."
        return HeldoutStatus(True, n_heldout, minimum, msg)
    missing = minimum - n_heldout
    more = (
        f", i.e. roughly {math.ceil(missing / fraction)} more pairs of feedback" if fraction else ""
    )
    msg = (
        f"Not enough data yet: {n_heldout} held-out pairs, the gate needs at least {minimum} "
        f"to judge a model ({missing} more held-out pairs{more} at a {fraction:.0%} split)."
    )
    return HeldoutStatus(False, n_heldout, minimum, msg)
