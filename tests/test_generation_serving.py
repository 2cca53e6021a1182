"""The MLX thread runs generation between scoring batches and serves scores while it runs.

A fake scorer (no model) makes the timing deterministic: the "generation" spins until a score
request submitted after it started has been answered, which can only happen if the thread
serves queued scores between the generation's steps (``MlxContext.between_steps``).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from palate.errors import PalateError
from palate.runtime.serving import LoadedScorer, ScoringService


@dataclass
class _Res:
    raw: list[float]
    z: list[float]
    truncated: list[bool]


class _FakeScorer:
    def __init__(self) -> None:
        self.threads: set[str] = set()

    def score_many(self, requests: Any) -> list[_Res]:
        self.threads.add(threading.current_thread().name)
        return [
            _Res([float(len(r)) for r in rs], [0.0] * len(rs), [False] * len(rs))
            for _, rs in requests
        ]


def _service(scorer: _FakeScorer | None) -> ScoringService:
    def load(version: int | None) -> LoadedScorer | None:
        return None if scorer is None else LoadedScorer(1, scorer, 1.0, 0.0, 1.0)

    svc = ScoringService(load, idle_unload_s=60)
    svc.start()
    return svc


def test_scores_are_served_while_a_call_runs() -> None:
    scorer = _FakeScorer()
    svc = _service(scorer)
    started, scored = threading.Event(), threading.Event()
    steps = []

    def long_call(ctx: Any) -> str:
        assert ctx.scorer().version == 1
        started.set()
        while not scored.is_set():
            assert len(steps) < 100_000, "the score never got through"
            steps.append(threading.current_thread().name)
            ctx.between_steps()
        return "generated"

    async def main() -> tuple[str, Any]:
        call = asyncio.ensure_future(svc.run(long_call, 30))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        _, res = await svc.score("p", ["a", "bbb"], 10)
        scored.set()
        return await call, res

    try:
        out, res = asyncio.run(main())
    finally:
        svc.stop()
    assert out == "generated" and res.raw == [1.0, 3.0]
    assert scorer.threads == {"palate-mlx"} and set(steps) == {"palate-mlx"}


def test_call_errors_and_no_model() -> None:
    svc = _service(None)

    def boom(ctx: Any) -> None:
        raise RuntimeError("kaput")

    async def main() -> tuple[PalateError, PalateError]:
        with pytest.raises(PalateError) as e1:
            await svc.run(boom, 5)
        with pytest.raises(PalateError) as e2:
            await svc.run(lambda ctx: ctx.scorer(), 5)
        return e1.value, e2.value

    try:
        e1, e2 = asyncio.run(main())
    finally:
        svc.stop()
    assert e1.code == "model_error" and "kaput" in e1.message
    assert e2.code == "no_model"


def test_a_call_queued_behind_scores_runs_after_them() -> None:
    scorer = _FakeScorer()
    svc = _service(scorer)
    order: list[str] = []

    async def main() -> None:
        scores = [svc.score("p", ["x"], 10) for _ in range(3)]
        call = svc.run(lambda ctx: order.append("call"), 10)
        results = await asyncio.gather(*scores, call)
        order.extend("score" for _ in results[:3])

    try:
        asyncio.run(main())
    finally:
        svc.stop()
    assert order[0] == "call" and len(order) == 4


def test_a_call_whose_caller_is_gone_stops_at_its_next_step() -> None:
    """A generation past its deadline is stopped between steps, freeing the thread."""
    scorer = _FakeScorer()
    svc = _service(scorer)
    steps = []

    def endless(ctx: Any) -> None:
        while True:
            steps.append(1)
            ctx.between_steps()

    async def main() -> Any:
        with pytest.raises(PalateError) as e:
            await svc.run(endless, 0.2)
        assert e.value.code == "busy"
        return await svc.score("p", ["ok"], 10)

    try:
        _, res = asyncio.run(main())
    finally:
        svc.stop()
    assert res.raw == [2.0] and steps
