"""``palate generate PROMPT -n N``: N candidates from the local policy, the reward model's pick.

By default the running daemon does it (the deployed reward model and policy, on its one MLX
thread). ``--local`` runs everything in this process instead; the reward model then has to be a
directory (``--reward-model DIR``): the deployed one lives in the encrypted store, which only
the daemon opens. docs/generation.md describes the strategies and every number in the answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from palate.cli.common import EXIT_CODES, emit, json_option
from palate.errors import PalateError

__all__ = ["generate"]

STRATEGY_CHOICES = {"best": "best", "soft": "soft", "lower-bound": "lower_bound"}


def _policy_ref(value: str | None) -> str | int | None:
    """``base``, a registry version, or an adapter directory (made absolute)."""
    if value is None or value == "base":
        return value
    if value.isdigit():
        return int(value)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise click.BadParameter(f"{value}: not 'base', a version number or a directory")
    return str(path.resolve())


@click.command("generate")
@click.argument("prompt")
@click.option(
    "-n",
    "n",
    type=click.IntRange(1, 32),
    default=4,
    show_default=True,
    help="Candidates to sample (one shared prompt prefill).",
)
@click.option(
    "--strategy",
    type=click.Choice(list(STRATEGY_CHOICES)),
    default="best",
    show_default=True,
    help="best: highest score; soft: draw in proportion to exp(z/lambda); "
    "lower-bound: highest score - kappa * ensemble spread.",
)
@click.option("--lambda", "lam", type=float, help="Soft best-of-N temperature (z units; 0.5).")
@click.option("--kappa", type=float, help="Lower-bound weight of the spread (1.0).")
@click.option(
    "--max-tokens",
    type=click.IntRange(1, 1024),
    default=128,
    show_default=True,
    help="New tokens per candidate.",
)
@click.option("--temperature", type=click.FloatRange(0, 5), help="Sampling temperature (0.8).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus mass (0.95).")
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    help="Fix the samples (and the soft draw) for reproducible answers.",
)
@click.option(
    "--policy",
    help="base, a policy version (`palate policy list`) or an adapter "
    "directory. Default: the deployed policy, else the base.",
)
@click.option(
    "--model",
    "model",
    help="Sample from this base instead (builtin:..., a .gguf, an mlx-lm directory or hub id).",
)
@click.option(
    "--reward-model",
    type=click.Path(file_okay=False, exists=True),
    help="Judge with this reward-model directory instead of the deployed model.",
)
@click.option(
    "--local", is_flag=True, help="Run in this process (needs --reward-model), not in the daemon."
)
@click.option("--all", "show_all", is_flag=True, help="Print every candidate with its score.")
@json_option
def generate(
    prompt: str,
    n: int,
    strategy: str,
    lam: float | None,
    kappa: float | None,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    policy: str | None,
    model: str | None,
    reward_model: str | None,
    local: bool,
    show_all: bool,
    as_json: bool,
) -> None:
    """Sample N answers to PROMPT and print the one the reward model prefers.

    \b
    JSON: {best, best_index, candidates, scores, z, truncated, finish, strategy,
           policy, usage, version[, uncertainty][, probabilities | lower_bounds][, note]}
    """
    params: dict[str, Any] = {
        "prompt": prompt,
        "n": n,
        "strategy": STRATEGY_CHOICES[strategy],
        "max_tokens": max_tokens,
    }
    for key, value in (
        ("lambda", lam),
        ("kappa", kappa),
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
        ("model", model),
    ):
        if value is not None:
            params[key] = value
    ref = _policy_ref(policy)
    if ref is not None:
        params["policy"] = ref
    if reward_model is not None:
        params["reward_model"] = str(Path(reward_model).resolve())
    try:
        if local:
            if reward_model is None:
                raise click.UsageError(
                    "--local needs --reward-model DIR (the deployed model "
                    "is in the encrypted store, which only the daemon opens)"
                )
            out = _run_local(params)
        else:
            from palate.wire.client import Client

            with Client(timeout=None) as c:
                out = c.call("generate", params)
    except PalateError as e:
        if as_json:
            click.echo(json.dumps({"error": e.to_wire()}))
        click.echo(f"palate: error: {e.message}", err=True)
        sys.exit(EXIT_CODES.get(e.code, 1))
    emit(out, as_json, lambda d: _human(d, show_all))


def _human(d: dict[str, Any], show_all: bool) -> None:
    if show_all:
        for i, (text, score) in enumerate(zip(d["candidates"], d["scores"], strict=True)):
            mark = "*" if i == d["best_index"] else " "
            head = text.strip().replace("\n", " ")
            click.echo(f"{mark} [{i}] {score:+.3f}  {head[:100]}{'...' if len(head) > 100 else ''}")
        click.echo("")
    click.echo(d["best"])
    u = d["usage"]
    who = "a reward-model directory" if d.get("version") is None else f"version {d['version']}"
    click.echo(
        f"\n({len(d['candidates'])} candidates from {d['policy']['name']}, {d['strategy']} by "
        f"{who}; {u['generated_tokens']} tokens at {u['tokens_per_s']:.1f} tok/s)",
        err=True,
    )


def _run_local(params: dict[str, Any]) -> dict[str, Any]:
    """The daemon's job, in this process: same service, same answer."""
    from palate.generation.engine import GenerateRequest
    from palate.generation.sampling import SampleConfig
    from palate.generation.service import GenerationService
    from palate.generation.strategies import DEFAULT_KAPPA, DEFAULT_LAMBDA

    d = SampleConfig()
    req = GenerateRequest(
        params["prompt"],
        params["n"],
        params["strategy"],
        params.get("lambda", DEFAULT_LAMBDA),
        params.get("kappa", DEFAULT_KAPPA),
        SampleConfig(
            params["max_tokens"],
            params.get("temperature", d.temperature),
            params.get("top_p", d.top_p),
            params.get("seed"),
        ),
    )
    service = GenerationService()
    judge = service.reward_dir(Path(params["reward_model"]), None)
    policy = params.get("policy", "base")
    if isinstance(policy, int):
        raise click.UsageError("--local cannot read registered policy versions; give a directory")
    return service.generate(
        judge, req, policy if policy == "base" else Path(policy), model=params.get("model")
    )
