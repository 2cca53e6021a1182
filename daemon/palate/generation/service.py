"""Generation inside the daemon: what runs on its one MLX thread for ``generate`` and
``policy_register``.

The daemon's runtime hands these functions the loaded reward model (its base is shared: the
policy samples from the very arrays the scorer uses) and callables for the store; this module
keeps one policy adapter, one extra base and one reward-model directory loaded between
requests. It imports MLX only inside its functions, so the daemon can import it at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from palate.errors import PalateError
from palate.events import PairExample

__all__ = ["GenerationService", "PolicyRef", "ScorerRef", "evaluate_adapter"]


@dataclass(frozen=True)
class ScorerRef:
    """The reward model a request is judged by: ``scorer`` (palate.model.scoring.Scorer),
    its registry ``version`` (None for a directory) and its ``base``."""

    scorer: Any
    version: int | None
    base: Any


#: Which policy: "base", a registry version (int), or an adapter directory (Path).
PolicyRef = str | int | Path
#: version -> (registry info, artifact bytes), read from the store.
FetchPolicy = Callable[[int], tuple[dict[str, Any], bytes]]


def _dir_key(path: Path) -> tuple[str, int]:
    weights = path / "model.safetensors"
    try:
        return str(path.resolve()), weights.stat().st_mtime_ns
    except OSError as e:
        raise PalateError("not_found", f"{path}: no model.safetensors ({e.strerror})") from e


class GenerationService:
    """Loaded policies and bases for the MLX thread. Not thread-safe (one thread uses it)."""

    def __init__(self) -> None:
        self._policy: tuple[Any, Any] | None = None  # (key, Policy)
        self._base: tuple[str, Any] | None = None  # (spec, BaseModel) not shared with a scorer
        self._reward: tuple[Any, ScorerRef] | None = None  # (key, reward model from a dir)

    # -- what to load ------------------------------------------------------------------
    def base(self, spec: str | None, shared: Any) -> Any:
        """The base for ``spec``: the scorer's own when it is that model (or no spec)."""
        if spec is None or (shared is not None and spec == shared.model_id):
            if shared is None:
                raise PalateError("no_model", "no base model is loaded to sample from")
            return shared
        if self._base is None or self._base[0] != spec:
            from palate.model.base_model import load_base_model

            self._base = None  # let the old one go before loading the next
            self._base = (spec, load_base_model(spec))
        return self._base[1]

    def reward_dir(self, path: Path, shared: Any) -> ScorerRef:
        """A reward model from a directory (``--reward-model``), kept while unchanged."""
        key = _dir_key(path)
        if self._reward is None or self._reward[0] != key:
            from palate.model.artifacts import load_dir, load_model

            art = load_dir(path)
            same = shared is not None and art.config["base_model"]["content_hash"] == getattr(
                shared, "content_hash", None
            )
            loaded = load_model(art, shared if same else None)
            self._reward = (key, ScorerRef(loaded.scorer(), None, loaded.base))
        return self._reward[1]

    def policy(
        self, ref: PolicyRef, model: str | None, shared: Any, fetch: FetchPolicy | None
    ) -> Any:
        """The policy ``ref`` names, on base ``model`` (default: the adapter's own base, which
        is the scorer's when they are the same model)."""
        from palate.generation.policy import POLICY_FORMAT, base_policy, load_policy
        from palate.model.artifacts import from_bytes, load_dir

        if ref == "base":
            return base_policy(self.base(model, shared))
        key = (("v", ref) if isinstance(ref, int) else _dir_key(Path(ref)), model)
        if self._policy is None or self._policy[0] != key:
            self._policy = None
            if isinstance(ref, int):
                if fetch is None:
                    raise PalateError("unavailable", "this daemon has no policy registry")
                art = from_bytes(fetch(ref)[1], POLICY_FORMAT)
                name, version = f"version {ref}", ref
            else:
                art = load_dir(Path(ref), POLICY_FORMAT)
                name, version = str(ref), None
            base = self.base(model or art.config["base_model"]["id"], shared)
            self._policy = (key, load_policy(art, base, name=name, version=version))
        return self._policy[1]

    # -- the two jobs --------------------------------------------------------------------
    def generate(
        self,
        judge: ScorerRef,
        request: Any,  # palate.generation.engine.GenerateRequest
        policy: PolicyRef,
        *,
        model: str | None = None,
        fetch: FetchPolicy | None = None,
        between_steps: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        from palate.generation.engine import generate

        pol = self.policy(policy, model, judge.base, fetch)
        out = generate(pol, judge.scorer.score, request, between_steps=between_steps)
        out["version"] = judge.version
        return out

    def evaluate(
        self,
        judge: ScorerRef,
        path: Path,
        pairs: Sequence[PairExample],
        *,
        win_prompts: int = 16,
        between_steps: Callable[[], None] | None = None,
    ) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
        """Evaluate an adapter directory on held-out ``pairs``, judged by ``judge``: the
        artifact's bytes, its config and the eval report (docs/generation.md)."""
        from palate.generation.policy import POLICY_FORMAT
        from palate.model.artifacts import load_dir, to_bytes

        art = load_dir(path, POLICY_FORMAT)
        base = self.base(art.config["base_model"]["id"], judge.base)
        report = evaluate_adapter(
            art,
            base,
            judge.scorer,
            pairs,
            name=str(path),
            win_prompts=win_prompts,
            between_steps=between_steps,
        )
        return to_bytes(art), art.config, report


def evaluate_adapter(
    art: Any,  # palate.model.artifacts.ModelArtifact of format palate-policy/1
    base: Any,
    scorer: Any,  # palate.model.scoring.Scorer, or None: no win rate
    pairs: Sequence[PairExample],
    *,
    name: str,
    win_prompts: int = 16,
    between_steps: Callable[[], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """The eval report of a policy adapter artifact on ``base``: implicit accuracy on the
    held-out ``pairs``, win rate over base samples judged by ``scorer``, KL to the base, with
    the adapter's own beta and token cap. What ``policy_register`` and the nightly policy run
    (runtime/training_child.py) both store and gate."""
    from palate.generation.evaluate import evaluate_policy
    from palate.generation.policy import load_policy

    pol = load_policy(art, base, name=name)
    tc = art.config.get("train_config", {})
    return evaluate_policy(
        pol,
        pairs,
        judge=None if scorer is None else lambda prompt, texts: scorer.score(prompt, texts).raw,
        beta=float(tc.get("beta", 0.1)),
        max_tokens=int(tc.get("max_tokens", 384)),
        win_prompts=win_prompts,
        progress=progress,
        between_steps=between_steps,
    )
