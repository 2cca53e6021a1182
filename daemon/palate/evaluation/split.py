"""The held-out split: which feedback is never trained on, so the gate can judge a model on it.

Membership is a pure function of a *split key* and a salt: ``sha256(salt + key)`` mapped to
[0, 1) and compared with the held-out fraction. The key (:func:`split_key`) is what makes two
items near-duplicates of each other:

- an adapter-supplied conversation id (``context.conversation``), so every turn of one voice
  call or chat session is on one side;
- a transcript (chat turns, or an HH-style ``Human: ... Assistant: ...`` string) is keyed on
  its *first user turn*, which every later turn of the same conversation repeats;
- an editor context (``prefix<|cursor|>suffix``) is keyed on its file (the conversation id the
  editor adapters derive from the path) and its *region*: the code after the cursor's line.
  Completions requested keystroke by keystroke at one place share that code, while the prefix
  grows with every key, so keying on the whole prompt would put one burst of typing on both
  sides;
- anything else on its prompt text.

So

- it is stable across nights and processes (no RNG, no ordering, no stored state);
- it does not move as data grows: adding feedback never changes where an old item lives, so a
  held-out example stays held out forever and nothing a model trained on is ever used to judge it;
- every item sharing a key lands on the same side (all pairs of one ranking, every turn of one
  conversation), so near-duplicates cannot leak across the split.

The salt makes this split independent of other hash splits of the same data: training's own
validation split (``model/training.py``) is this same function with another salt, so it keeps
near-duplicates together by the same rules; both salts also keep them independent of any hash
split the data went through before it reached Palate.
Changing the salt or the fraction re-deals the split, which silently puts previously trained
examples into the held-out set: don't, or re-train everything.

Pure: no I/O, no MLX.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from palate.events import CODE_CURSOR

__all__ = [
    "DEFAULT_FRACTION",
    "HELDOUT_SALT",
    "MIN_HELDOUT_PAIRS",
    "HeldoutStatus",
    "Split",
    "example_key",
    "heldout_status",
    "is_heldout",
    "split_items",
    "split_key",
    "split_value",
]

#: Share of keys held out. 15% keeps most of a small personal data set for training while a
#: few hundred pairs of feedback already give a held-out set big enough to judge.
DEFAULT_FRACTION = 0.15
#: Versioned so a deliberate re-deal is visible. v2: keys near-duplicates together (first user
#: turn, editor region, conversation id) where v1 keyed every prompt on its whole text.
HELDOUT_SALT = "palate-heldout:v2:"
#: Below this many held-out pairs the gate refuses to judge. With 50 pairs the 95% Wilson
#: interval of a 70% accuracy is about +-12 points: wide, but enough to tell a model from
#: chance and from the length baselines. Fewer and any verdict is mostly noise.
MIN_HELDOUT_PAIRS = 50

T = TypeVar("T")


def _normalise(text: str) -> str:
    # Trivially different prompts ("Fix this" / "fix  this\n") must share a side.
    return " ".join(text.split()).casefold()


#: An HH-style transcript: "Human: ..." / "Assistant: ..." turns separated by blank lines.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
#: Lines after the cursor's own line that name an editor region.
REGION_LINES = 2


def split_key(prompt: str | Sequence[Mapping[str, str]], conversation_id: str | None = None) -> str:
    """The key an item is split by (module docstring): near-duplicates share one.

    ``conversation_id`` is the adapter's ``context.conversation``. Keys are whitespace-collapsed
    and case-folded, so "Fix this" and "fix  this\n" share a side.
    """
    if isinstance(prompt, str) and CODE_CURSOR in prompt:
        return f"code:{conversation_id or ''}:{_region(prompt)}"
    if conversation_id:
        return "conv:" + conversation_id
    if isinstance(prompt, str):
        first = _first_hh_turn(prompt)
        return "prompt:" + _normalise(first if first is not None else prompt)
    for message in prompt:
        if message.get("role") == "user":
            return "prompt:" + _normalise(message.get("content", ""))
    return "prompt:" + _normalise("\n".join(m.get("content", "") for m in prompt))


def example_key(example: Any) -> str:
    """:func:`split_key` of a training example (``prompt`` and its ``conversation``)."""
    return split_key(example.prompt, getattr(example, "conversation", "") or None)


def _first_hh_turn(text: str) -> str | None:
    """The first Human turn of an HH-style transcript, or None if ``text`` is not one."""
    stripped = text.lstrip()
    if not stripped.startswith(("Human:", "Assistant:")):
        return None
    parts = _HH_TURN.split(stripped)
    for speaker, body in zip(parts[1::2], parts[2::2], strict=False):
        if speaker == "Human" and body.strip():
            return body
    return None


def _region(prompt: str) -> str:
    """Where in a file an editor context is: the code after the cursor's line.

    The text right of the cursor on its own line (often just the closing brackets the editor
    added) is skipped; the next :data:`REGION_LINES` non-blank lines stay the same while the
    user types above them. At the end of a file there are none: the region is ``eof``.
    """
    after = prompt.split(CODE_CURSOR, 1)[1]
    lines = [ln for ln in after.split("\n")[1:] if ln.strip()][:REGION_LINES]
    return _normalise("\n".join(lines)) if lines else "eof"


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
