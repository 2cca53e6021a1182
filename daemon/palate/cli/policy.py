"""``palate policy``: train, evaluate, register and deploy DPO policy adapters.

``train`` and ``eval`` run in this process on files the user names (like ``palate train
--data``). ``register`` hands an adapter directory to the daemon, which judges it on held-out
pairs with the deployed reward model, asks the policy gate and stores it beside the reward
models (encrypted); ``list`` and ``deploy`` read and move that registry. docs/generation.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from palate.cli.common import EXIT_CODES, emit, handles_errors, json_option
from palate.errors import PalateError

__all__ = ["policy"]


@click.group()
def policy() -> None:
    """DPO policy adapters: train, evaluate, register (through the gate), list, deploy."""


def _knobs() -> Any:
    from palate.generation.dpo import PolicyTrainConfig

    return PolicyTrainConfig


def _pairs(data: str) -> list[Any]:
    from palate.cli.training import DataError, read_jsonl
    from palate.events import PairExample

    pairs = [e for e in read_jsonl(data) if isinstance(e, PairExample)]
    if not pairs:
        raise DataError(f"{data}: no pairs {{prompt, chosen, rejected}} to evaluate on")
    return pairs


@policy.command("train")
@click.option(
    "--data",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="JSONL of pairs {prompt, chosen, rejected} and/or ratings "
    "{prompt, response, label} (thumbs: KTO).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    required=True,
    help="Directory to write the adapter into (created; must be new or empty).",
)
@click.option(
    "--base-model",
    default="builtin:smollm2-135m",
    show_default=True,
    help="The policy's base model (builtin:, .gguf, mlx-lm dir, hub id).",
)
@click.option(
    "--loss",
    type=click.Choice(["sigmoid", "ipo"]),
    default="sigmoid",
    show_default=True,
    help="Pair loss: sigmoid (DPO) or ipo.",
)
@click.option(
    "--beta", type=float, default=0.1, show_default=True, help="Pull toward the base (DPO's beta)."
)
@click.option("--lr", type=float, help="Peak learning rate (default 1e-4; see --help docs).")
@click.option("--epochs", type=click.IntRange(1, 100), help="Passes over the data (2).")
@click.option("--batch-size", type=click.IntRange(1, 256), help="Pairs per step (4).")
@click.option("--lora-rank", type=click.IntRange(1, 256), help="LoRA rank (8).")
@click.option("--layers", type=click.IntRange(1, 512), help="Top blocks with LoRA (4).")
@click.option("--max-tokens", type=click.IntRange(16, 32768), help="Prompt+response cap (384).")
@click.option("--label-smoothing", type=click.FloatRange(0, 0.5), help="Robust DPO (0).")
@click.option("--seed", type=int, help="Init and order seed (0).")
@json_option
def train_command(
    data: str,
    output: str,
    base_model: str,
    loss: str,
    beta: float,
    lr: float | None,
    epochs: int | None,
    batch_size: int | None,
    lora_rank: int | None,
    layers: int | None,
    max_tokens: int | None,
    label_smoothing: float | None,
    seed: int | None,
    as_json: bool,
) -> None:
    """Train a LoRA policy adapter with DPO/IPO on pairs and KTO on ratings.

    \b
    JSON: {output, metrics: {steps, final_loss, final_train_acc, timings_s, ...},
           data: {pairs, ratings, truncated_sequences, kto_weights}}
    """
    from palate.cli.training import DataError, _fail, read_jsonl

    out_dir = Path(output)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: exists and is not empty; choose a new --output directory")
    examples = read_jsonl(data)
    knobs: dict[str, Any] = {"base_model": base_model, "loss": loss, "beta": beta}
    for key, value in (
        ("lr", lr),
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("lora_rank", lora_rank),
        ("lora_layers", layers),
        ("max_tokens", max_tokens),
        ("label_smoothing", label_smoothing),
        ("seed", seed),
    ):
        if value is not None:
            knobs[key] = value
    if lora_rank is not None:
        knobs["lora_alpha"] = 2.0 * lora_rank
    try:
        config = _knobs()(**knobs)
        from palate.generation.dpo import train_policy
        from palate.model.artifacts import save_dir
        from palate.model.base_model import load_base_model

        base = load_base_model(config.base_model)
        result = train_policy(examples, config, base=base, progress=_progress(as_json))
        save_dir(result.artifact(base, config), out_dir)
    except click.ClickException:
        raise
    except Exception as exc:
        raise _fail(exc) from exc
    report = {"output": str(out_dir), "metrics": result.metrics, "data": result.data_summary}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    m, d = result.metrics, result.data_summary
    click.echo(
        f"trained on {d['pairs']} pairs and {d['ratings']} ratings in {m['steps']} steps "
        f"({m['timings_s']['total']:.0f}s)"
    )
    click.echo(
        f"final loss {m['final_loss']}, training implicit accuracy "
        f"{m['final_train_acc']:.3f}; adapter written to {out_dir}"
    )


def _progress(quiet: bool) -> Any:
    if quiet or not sys.stderr.isatty():
        return None

    def show(e: Any) -> None:
        extra = f" loss {e.loss:.3f} acc {e.acc:.2f}" if e.loss is not None else ""
        click.echo(f"\r{e.phase} {e.step}/{e.total}{extra}   ", nl=e.step == e.total, err=True)

    return show


def _judge(reward_model: str | None) -> tuple[Any, str]:
    """A reward model for the win rate: a directory in process, else the daemon's deployed
    model over the socket, else none (the report then says so)."""
    if reward_model is not None:
        from palate.model.artifacts import load_dir, load_model

        scorer = load_model(load_dir(reward_model)).scorer()
        return (lambda prompt, texts: scorer.score(prompt, texts).raw), reward_model
    from palate.wire.client import Client

    try:
        client = Client(timeout=None)
        version = client.call("models", {}).get("deployed")
    except PalateError:
        return None, "none (no --reward-model and no running daemon)"
    if version is None:
        client.close()
        return None, "none (the daemon has no deployed reward model)"
    return (lambda prompt, texts: client.score(prompt, texts)["scores"]), f"version {version}"


@policy.command("eval")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False, exists=True),
    required=True,
    help="An adapter directory written by `palate policy train`.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="JSONL of held-out pairs {prompt, chosen, rejected}.",
)
@click.option(
    "--reward-model",
    type=click.Path(file_okay=False, exists=True),
    help="Judge the win rate with this reward-model directory (default: the "
    "daemon's deployed model, when it runs).",
)
@click.option(
    "--win-prompts",
    type=click.IntRange(0, 256),
    default=16,
    show_default=True,
    help="Held-out prompts sampled (2 samples each) for the win rate and KL.",
)
@json_option
def eval_command(
    model_dir: str, data: str, reward_model: str | None, win_prompts: int, as_json: bool
) -> None:
    """Implicit-reward accuracy on held-out pairs, win rate over the base, KL to the base.

    \b
    JSON: {accuracy, n, correct, ties, ci_low, ci_high, base_accuracy, mean_margin,
           likelihood_accuracy, base_likelihood_accuracy, beta, kl, kl_per_token, kl_n,
           win_rate, win_n, win_ci_low, win_ci_high, judge, gate}
    """
    from palate.cli.training import _fail

    pairs = _pairs(data)
    try:
        from palate.generation.evaluate import evaluate_policy
        from palate.generation.gate import decide_policy
        from palate.generation.policy import POLICY_FORMAT, load_policy
        from palate.model.artifacts import load_dir
        from palate.model.base_model import load_base_model

        art = load_dir(model_dir, POLICY_FORMAT)
        base = load_base_model(art.config["base_model"]["id"])
        pol = load_policy(art, base, name=model_dir)
        judge, judged_by = _judge(reward_model)
        tc = art.config.get("train_config", {})
        rep = evaluate_policy(
            pol,
            pairs,
            judge=judge,
            beta=float(tc.get("beta", 0.1)),
            max_tokens=int(tc.get("max_tokens", 384)),
            win_prompts=win_prompts,
        )
    except PalateError as e:
        click.echo(f"palate: error: {e.message}", err=True)
        sys.exit(EXIT_CODES.get(e.code, 1))
    except Exception as exc:
        raise _fail(exc) from exc
    rep["judge"] = judged_by
    rep["gate"] = decide_policy(rep).to_json()

    def human(r: dict[str, Any]) -> None:
        click.echo(
            f"implicit-reward accuracy {r['accuracy']:.3f}  95% CI [{r['ci_low']:.3f}, "
            f"{r['ci_high']:.3f}]  n={r['n']}  (base {r['base_accuracy']:.2f}); "
            f"mean margin {r['mean_margin']:+.3f}"
        )
        click.echo(
            f"likelihood preference: policy {r['likelihood_accuracy']:.3f}, "
            f"base {r['base_likelihood_accuracy']:.3f}"
        )
        if r["win_rate"] is None:
            click.echo(f"win rate: not measured (judge: {r['judge']})")
        else:
            click.echo(
                f"win rate over base samples {r['win_rate']:.3f}  95% CI "
                f"[{r['win_ci_low']:.3f}, {r['win_ci_high']:.3f}]  n={r['win_n']}  "
                f"(judge: {r['judge']})"
            )
        click.echo(
            f"KL to base {r['kl']:.3f} nats per response ({r['kl_per_token']:.4f} per token)"
        )
        g = r["gate"]
        click.echo(f"gate: {g['action']}: " + "; ".join(g["reasons"]))

    emit(rep, as_json, human)


@policy.command("register")
@click.argument("adapter", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--data",
    type=click.Path(dir_okay=False, exists=True),
    help="Held-out pairs to judge it on (default: the store's held-out pairs).",
)
@click.option("--no-deploy", is_flag=True, help="Register only, even if the gate passes.")
@json_option
@handles_errors
def register_command(adapter: str, data: str | None, no_deploy: bool, as_json: bool) -> None:
    """Judge ADAPTER in the daemon (deployed reward model), gate it and store it.

    \b
    JSON: {version, decision, reasons, checks, metrics, deployed, previous}
    """
    from palate.wire.client import Client

    params: dict[str, Any] = {"path": str(Path(adapter).resolve()), "deploy": not no_deploy}
    if data is not None:
        params["pairs"] = [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in _pairs(data)
        ]
    with Client(timeout=None) as c:
        out = c.call("policy_register", params)

    def human(d: dict[str, Any]) -> None:
        m = d["metrics"]
        click.echo(
            f"policy version {d['version']}: {d['decision']}"
            f"{' and deployed' if d['deployed'] else ''}"
        )
        click.echo(
            f"  implicit accuracy {m['accuracy']:.3f} (n={m['n']}), win rate "
            f"{m['win_rate'] if m['win_rate'] is None else round(m['win_rate'], 3)}, "
            f"KL {m['kl_per_token']:.4f}/token"
        )
        for reason in d["reasons"]:
            click.echo(f"  - {reason}")

    emit(out, as_json, human)


@policy.command("list")
@json_option
@handles_errors
def list_command(as_json: bool) -> None:
    """Registered policy adapters, newest first; * marks the one generation uses."""
    from palate.wire.client import Client

    with Client() as c:
        data = c.call("models", {})
    rows = [m for m in data["models"] if m["meta"].get("kind") == "policy"]
    out = {"policies": rows, "deployed": data.get("policy_deployed")}

    def human(d: dict[str, Any]) -> None:
        if not d["policies"]:
            click.echo(
                "no policy adapters yet: `palate policy train`, then `palate policy register DIR`"
            )
            return
        for m in d["policies"]:
            mark = "*" if m["version"] == d["deployed"] else " "
            met = m["meta"].get("metrics", {})
            win = met.get("win_rate")
            click.echo(
                f"{mark} {m['version']:>4}  {m['state']:<9} {m['meta'].get('decision')}"
                f"  acc {met.get('accuracy', 0):.3f}  win "
                f"{'-' if win is None else f'{win:.3f}'}"
            )

    emit(out, as_json, human)


@policy.command("deploy")
@click.argument("version", type=int)
@click.option("--override", is_flag=True, help="Deploy although the gate did not approve it.")
@click.option("--reason", help="Why, for the history.")
@json_option
@handles_errors
def deploy_command(version: int, override: bool, reason: str | None, as_json: bool) -> None:
    """Make policy VERSION the one `generate` samples from."""
    from palate.wire.client import Client

    params: dict[str, Any] = {"version": version, "override": override}
    if reason:
        params["reason"] = reason
    with Client() as c:
        info = c.call("models", {"version": version})["model"]
        if info["meta"].get("kind") != "policy":
            raise PalateError(
                "invalid_request",
                f"version {version} is a reward model, not a policy adapter; "
                f"deploy it with `palate deploy {version}`",
            )
        out = c.call("deploy", params)
    emit(out, as_json, lambda d: click.echo(f"policy version {d['deployed']} deployed"))
