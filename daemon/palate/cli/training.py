"""``palate train --data``, ``palate eval`` and ``palate score``: the offline model commands.

Plain :class:`click.Command` objects; cli.py registers them into the ``palate`` group. They
only parse arguments, call the library and turn its errors into one line and an exit code:
0 ok, 1 model/runtime error, 2 bad usage or bad input file (click's convention).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from palate.model.batching import Example, PairExample, RatingExample
from palate.model.training import TrainConfig

__all__ = ["eval_command", "read_jsonl", "score_command", "train_command"]

_HELP = TrainConfig.help_text()


class DataError(click.ClickException):
    """Bad input data: exit code 2, one line naming the file and line."""

    exit_code = 2


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    yield n, line
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def read_jsonl(path: str | Path) -> list[Example]:
    """Read ``{prompt, chosen, rejected[, margin]}`` pairs and/or ``{prompt, response,
    label}`` ratings (label: 1/0, true/false, or +1/-1). Errors name the line."""
    p = Path(path)
    out: list[Example] = []
    for n, line in _iter_lines(p):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: invalid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), (str, list)):
            raise DataError(f"{p}:{n}: expected an object with a 'prompt'")
        try:
            if "chosen" in obj or "rejected" in obj:
                chosen, rejected = obj["chosen"], obj["rejected"]
                if not isinstance(chosen, str) or not isinstance(rejected, str):
                    raise TypeError("'chosen' and 'rejected' must be strings")
                out.append(
                    PairExample(
                        obj["prompt"],
                        chosen,
                        rejected,
                        float(obj.get("margin", 0.0)),
                        float(obj.get("weight", 1.0)),
                    )
                )
            elif "response" in obj:
                label = obj["label"]
                if isinstance(label, bool):
                    y = 1.0 if label else 0.0
                else:
                    y = float(label)
                    y = 0.0 if y == -1 else y
                if not 0.0 <= y <= 1.0:
                    raise ValueError(f"label {label!r} is not 1/0, true/false or +1/-1")
                if not isinstance(obj["response"], str):
                    raise TypeError("'response' must be a string")
                out.append(
                    RatingExample(obj["prompt"], obj["response"], y, float(obj.get("weight", 1.0)))
                )
            else:
                raise KeyError("need 'chosen'+'rejected' (a pair) or 'response'+'label' (a rating)")
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{p}:{n}: {exc}") from exc
    if not out:
        raise DataError(f"{p}: no examples")
    return out


def _fail(exc: Exception) -> click.ClickException:
    msg = getattr(exc, "message", None) or str(exc)
    return click.ClickException(
        f"{type(exc).__name__}: {msg}" if not getattr(exc, "message", None) else msg
    )


def _load(model_dir: str) -> Any:
    from palate.model.artifacts import load_dir, load_model

    try:
        return load_model(load_dir(model_dir))
    except Exception as exc:
        raise _fail(exc) from exc


@click.command("train")
@click.option(
    "--data",
    "data",
    type=click.Path(dir_okay=False),
    help="Offline: JSONL of pairs {prompt, chosen, rejected} and/or ratings "
    "{prompt, response, label}. Without it, the daemon trains on your stored feedback.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="With --data: directory to write the self-describing model into (created).",
)
@click.option(
    "--now",
    is_flag=True,
    help="Store mode: train now, ignoring the schedule's conditions (the gate still "
    "decides). This is what `palate train` without --data always does.",
)
@click.option(
    "--wait", is_flag=True, help="Store mode: show progress and wait for the gate's decision."
)
@click.option(
    "--base-model", default=TrainConfig.base_model, show_default=True, help=_HELP["base_model"]
)
@click.option(
    "--lora-rank",
    type=int,
    default=TrainConfig.lora_rank,
    show_default=True,
    help=_HELP["lora_rank"],
)
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank).")
@click.option(
    "--layers",
    type=int,
    default=TrainConfig.lora_layers,
    show_default=True,
    help=_HELP["lora_layers"],
)
@click.option(
    "--depth", type=int, default=TrainConfig.depth, show_default=True, help=_HELP["depth"]
)
@click.option(
    "--epochs", type=int, default=TrainConfig.epochs, show_default=True, help=_HELP["epochs"]
)
@click.option(
    "--max-tokens",
    type=int,
    default=TrainConfig.max_tokens,
    show_default=True,
    help=_HELP["max_tokens"],
)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help=_HELP["lr"])
@click.option(
    "--batch-tokens",
    type=int,
    default=TrainConfig.batch_tokens,
    show_default=True,
    help=_HELP["batch_tokens"],
)
@click.option(
    "--grad-accum",
    type=int,
    default=TrainConfig.grad_accum,
    show_default=True,
    help=_HELP["grad_accum"],
)
@click.option(
    "--val-fraction",
    type=float,
    default=TrainConfig.val_fraction,
    show_default=True,
    help=_HELP["val_fraction"],
)
@click.option(
    "--eval-every",
    type=int,
    default=TrainConfig.eval_every,
    show_default=True,
    help=_HELP["eval_every"],
)
@click.option(
    "--patience", type=int, default=TrainConfig.patience, show_default=True, help=_HELP["patience"]
)
@click.option(
    "--min-steps",
    type=int,
    default=TrainConfig.min_steps,
    show_default=True,
    help=_HELP["min_steps"],
)
@click.option(
    "--no-prefix-cache", is_flag=True, help="Run the full model every step (slower; for checks)."
)
@click.option(
    "--streams", type=int, default=TrainConfig.streams, show_default=True, help=_HELP["streams"]
)
@click.option(
    "--no-cpu-forward",
    is_flag=True,
    help="Keep the cache pass and validation in MLX instead of the faster numpy forward.",
)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True, help=_HELP["seed"])
@click.option(
    "--members",
    type=click.IntRange(1, 32),
    default=TrainConfig.members,
    show_default=True,
    help=_HELP["members"],
)
@click.option("--json", "as_json", is_flag=True, help="Print the training report as JSON.")
def train_command(
    data: str | None,
    output: str | None,
    now: bool,
    wait: bool,
    base_model: str,
    lora_rank: int,
    lora_alpha: float | None,
    layers: int,
    depth: int,
    epochs: int,
    max_tokens: int,
    lr: float,
    batch_tokens: int,
    grad_accum: int,
    val_fraction: float,
    eval_every: int,
    patience: int,
    min_steps: int,
    no_prefix_cache: bool,
    streams: int,
    no_cpu_forward: bool,
    seed: int,
    members: int,
    as_json: bool,
) -> None:
    """Train a reward model: from your stored feedback (via the daemon), or offline from a file.

    Without --data the running daemon trains on the encrypted store in a low-priority child
    process, evaluates the result on held-out feedback and the gate decides whether it is
    deployed (`palate models` shows the outcome). The model knobs then come from
    config.toml's [train] table.

    With --data and --output it trains from a JSONL file and writes a model directory:
    model.safetensors (LoRA + head) and config.json (base model id and hash, tokenizer hash,
    LoRA config, score normalisation, calibration, data summary). The output directory is the
    user's explicit choice; data from the encrypted store never goes there.
    """
    if data is None:
        if output is not None:
            raise click.UsageError(
                "--output needs --data (store-trained models live in the "
                "encrypted store; see `palate models`)"
            )
        _train_in_daemon(wait, as_json)
        return
    if output is None:
        raise click.UsageError("--data needs --output DIR to write the model to")
    examples = read_jsonl(data)
    out_dir = Path(output)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: exists and is not empty; choose a new --output directory")
    config = TrainConfig(
        base_model=base_model,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha if lora_alpha is not None else 2.0 * lora_rank,
        lora_layers=layers,
        depth=depth,
        epochs=epochs,
        max_tokens=max_tokens,
        lr=lr,
        batch_tokens=batch_tokens,
        grad_accum=grad_accum,
        val_fraction=val_fraction,
        eval_every=eval_every,
        patience=patience,
        min_steps=min_steps,
        prefix_cache=not no_prefix_cache,
        streams=streams,
        cpu_forward=not no_cpu_forward,
        seed=seed,
        members=members,
    )
    from palate.model.artifacts import artifact_from_model, build_config, save_dir
    from palate.model.base_model import load_base_model
    from palate.model.training import train_reward_model

    try:
        base = load_base_model(config.base_model)
        if as_json or not sys.stderr.isatty():
            result = train_reward_model(examples, config, base=base)
        else:
            result = _train_with_bar(examples, config, base)
        cfg = build_config(
            base,
            result.model.lora,  # the depth resolved on this base
            config.max_tokens,
            result.calibration,
            result.data_summary,
            result.metrics,
            config.to_json(),
        )
        save_dir(artifact_from_model(result.model, cfg), out_dir)
    except click.ClickException:
        raise
    except Exception as exc:
        raise _fail(exc) from exc
    report = {
        "output": str(out_dir),
        "metrics": result.metrics,
        "data": result.data_summary,
        "calibration": cfg["calibration"],
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    m, d = result.metrics, result.data_summary
    t = d["truncation"]
    click.echo(
        f"trained on {d['train']} examples ({d['pairs']} pairs, {d['ratings']} ratings), "
        f"validated on {d['validation']}"
    )
    click.echo(
        f"validation loss {m['val_loss']}, accuracy {m['calibration_acc']:.3f} "
        f"(best step {m['best_step']} of {m['steps']}"
        f"{', stopped early' if m['stopped_early'] else ''})"
    )
    click.echo(
        f"truncated: {t['prompt_truncated']} prompts, {t['response_truncated']} responses "
        f"({t['tokens_cut']} tokens)"
    )
    click.echo(f"time {m['timings_s']['total']:.0f}s; model written to {out_dir}")


def _train_in_daemon(wait: bool, as_json: bool) -> None:
    """Ask the daemon for a run now; with ``wait``, draw its progress and print the decision."""
    from palate.cli.common import EXIT_CODES
    from palate.errors import PalateError
    from palate.wire.client import Client

    try:
        if not wait:
            with Client() as c:
                job = c.train(wait=False, reason="palate train")["job"]
            if as_json:
                click.echo(json.dumps(job, indent=2))
            else:
                click.echo(
                    f"training run {job['id']} started (pid {job['pid'] or '?'}); "
                    "follow it with `palate status`, or use --wait"
                )
            return
        job = _wait_with_bar(as_json)
    except PalateError as e:
        click.echo(f"palate: error: {e.message}", err=True)
        sys.exit(EXIT_CODES.get(e.code, 1))
    if as_json:
        click.echo(json.dumps(job, indent=2, default=str))
    if job["outcome"] != "done":
        if not as_json:
            click.echo(f"training run {job['id']} {job['outcome']}: {job.get('error')}", err=True)
        sys.exit(EXIT_CODES["model_error"])
    if not as_json:
        r = job["result"]
        acc = r.get("accuracy")
        click.echo(
            f"version {r['version']}: {r['decision']}"
            f"{' and deployed' if r['deployed'] else ''}"
            f"{f' (held-out accuracy {acc:.1%})' if isinstance(acc, float) else ''}"
        )
        for reason in r["reasons"]:
            click.echo(f"  - {reason}")
        if r.get("policy"):
            from palate.cli.service import policy_outcome

            click.echo(policy_outcome(r["policy"]))
        if not r["deployed"] and r.get("decision") in ("reject", "hold"):
            from palate.cli.models import next_steps

            _say_what_serves()
            for line in next_steps(int(r["version"])):
                click.echo(line)


def _say_what_serves() -> None:
    """After a run the gate did not deploy: which model (if any) keeps serving."""
    from palate.errors import PalateError
    from palate.wire.client import Client

    try:
        with Client() as c:
            deployed = c.call("models").get("deployed")
    except PalateError:
        return
    click.echo(
        f"version {deployed} keeps serving."
        if deployed is not None
        else "no model is deployed, so `palate rerank` and `palate score` cannot answer yet."
    )


def _wait_with_bar(quiet: bool) -> dict[str, Any]:
    from palate.wire.client import Client

    if quiet or not sys.stderr.isatty():
        with Client(timeout=None) as c:
            return dict(c.train(wait=True, reason="palate train --wait")["job"])
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None, info="")

        def on_notify(method: str, p: Any) -> None:
            if method != "progress" or not isinstance(p, dict):
                return
            info = " ".join(
                f"{k}={p[k]:.3g}"
                for k in ("loss", "acc", "tokens_per_s")
                if isinstance(p.get(k), (int, float))
            )
            info = " ".join(x for x in (info, overall_eta(p)) if x)
            bar.update(
                task,
                description=phase_label(p),
                total=p.get("total") or None,
                completed=p.get("step") or 0,
                info=info,
            )

        with Client(timeout=None, on_notify=on_notify) as c:
            return dict(c.train(wait=True, reason="palate train --wait")["job"])


def phase_label(p: dict[str, Any]) -> str:
    """``phase 3/5 cache`` from a progress line (just the phase from an older daemon)."""
    name = str(p.get("phase_name") or p.get("phase") or "")
    if p.get("phase_index") and p.get("phases"):
        return f"phase {p['phase_index']}/{p['phases']} {name}"
    return name


def overall_eta(p: dict[str, Any]) -> str:
    """``whole run: ~33 min left`` (the bar's own ETA covers the current phase only)."""
    eta = p.get("overall_eta_s")
    if not isinstance(eta, (int, float)):
        return ""
    return f"whole run: ~{_minutes(eta)} left"


def _minutes(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{max(1, round(s / 60))} min"


def _train_with_bar(examples: list[Example], config: TrainConfig, base: Any) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from palate.model.training import ProgressEvent, train_reward_model

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def on(e: ProgressEvent) -> None:
            phase = "train" if e.phase == "validate" else e.phase
            if phase in ("encode", "done"):
                return
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=e.total, info="")
            info = []
            if e.loss is not None:
                info.append(f"{'val ' if e.phase == 'validate' else ''}loss {e.loss:.3f}")
            if e.acc is not None:
                info.append(f"acc {e.acc:.3f}")
            if e.tokens_per_s:
                info.append(f"{e.tokens_per_s:.0f} tok/s")
            bar.update(tasks[phase], completed=e.step, info="  ".join(info))

        return train_reward_model(examples, config, progress=on, base=base)


@click.command("eval")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="A model directory written by `palate train --output`.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    required=True,
    help="JSONL of pairs {prompt, chosen, rejected}.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--batch-tokens", type=int, default=4096, show_default=True, help="Padded tokens per batch."
)
def eval_command(model_dir: str, data: str, as_json: bool, batch_tokens: int) -> None:
    """Pairwise accuracy of a model on a JSONL of pairs, with a 95% CI and length baselines.

    JSON keys: accuracy, n, correct, ties (counted wrong), ci_low, ci_high,
    baseline_shorter, baseline_longer, mean_margin; the length effect: length_corr (margin vs
    chosen-minus-rejected length), length_controlled_accuracy, accuracy_chosen_longer,
    n_chosen_longer, accuracy_chosen_shorter, n_chosen_shorter; and from the ensemble:
    members, ece, coverage_accuracy ([coverage, accuracy] on the most confident pairs),
    selective_accuracy_50, mean_spread.
    """
    from palate.evaluation.heldout import length_effect
    from palate.evaluation.metrics import pairwise_report
    from palate.evaluation.selective import selective_report
    from palate.model.scoring import mean_rewards

    pairs = [e for e in read_jsonl(data) if isinstance(e, PairExample)]
    if not pairs:
        raise DataError(f"{data}: no pairs to evaluate (ratings are not scored by eval)")
    loaded = _load(model_dir)
    try:
        am, bm = loaded.scorer(token_budget=batch_tokens, n_streams=2).score_pairs_members(
            [(p.prompt, p.chosen, p.rejected) for p in pairs]
        )
    except Exception as exc:
        raise _fail(exc) from exc
    a, b = mean_rewards(am).tolist(), mean_rewards(bm).tolist()
    rep = pairwise_report(a, b, [len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs])
    sel = selective_report(am, bm, loaded.calibration.temperature)
    le = length_effect(a, b, [len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs])
    if as_json:
        keys = ("members", "ece", "coverage_accuracy", "selective_accuracy_50", "mean_spread")
        click.echo(json.dumps({**rep.to_json(), **le, **{k: sel[k] for k in keys}}, indent=2))
        return
    click.echo(
        f"accuracy {rep.accuracy:.3f}  95% CI [{rep.ci_low:.3f}, {rep.ci_high:.3f}]  "
        f"n={rep.n}  ties={rep.ties}"
    )
    click.echo(
        f"baselines: always-shorter {rep.baseline_shorter:.3f}, "
        f"always-longer {rep.baseline_longer:.3f}"
    )
    click.echo(_length_line(le))
    half = sel["selective_accuracy_50"]
    click.echo(
        f"ensemble of {sel['members']}: ECE {sel['ece']:.3f}, accuracy on the 50% most "
        f"confident pairs {half:.3f}"
    )


def _length_line(le: dict[str, Any]) -> str:
    """The length effect in one line; "n/a" where a figure is undefined (no pairs of a kind)."""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return (
        f"length: chosen longer {f(le['accuracy_chosen_longer'])} "
        f"(n={le['n_chosen_longer']}), chosen shorter {f(le['accuracy_chosen_shorter'])} "
        f"(n={le['n_chosen_shorter']}), length-controlled "
        f"{f(le['length_controlled_accuracy'])}, margin/length corr {f(le['length_corr'])}"
    )


@click.command("score")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    help="A model directory written by `palate train --output`. Without it, the running "
    "daemon scores with the deployed model.",
)
@click.argument("prompt")
@click.argument("responses", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print scores as JSON.")
def score_command(
    model_dir: str | None, prompt: str, responses: tuple[str, ...], as_json: bool
) -> None:
    """Score RESPONSES to PROMPT: raw reward, z-score, and p(best beats each other)."""
    from palate.cli.common import check_prompt

    check_prompt(prompt, "PROMPT")
    if model_dir is None:
        _score_in_daemon(prompt, list(responses), as_json)
        return
    loaded = _load(model_dir)
    try:
        scorer = loaded.scorer()
        res = scorer.score(prompt, list(responses))
    except Exception as exc:
        raise _fail(exc) from exc
    best = max(range(len(responses)), key=lambda i: res.raw[i])
    rows = [
        {
            "index": i,
            "raw": res.raw[i],
            "z": res.z[i],
            "truncated": res.truncated[i],
            "p_best_beats": None if i == best else scorer.prob(res.raw[best], res.raw[i]),
        }
        for i in range(len(responses))
    ]
    if as_json:
        click.echo(json.dumps({"best": best, "scores": rows}, indent=2))
        return
    for r in rows:
        mark = "*" if r["index"] == best else " "
        extra = f"  p(best>this)={r['p_best_beats']:.3f}" if r["p_best_beats"] is not None else ""
        click.echo(
            f"{mark} [{r['index']}] z={r['z']:+.3f} raw={r['raw']:+.4f}{extra}"
            f"{'  (truncated)' if r['truncated'] else ''}  {_echo(responses[r['index']])}"
        )


def _echo(text: str, width: int = 60) -> str:
    """The response a score belongs to, on one line, shortened to ``width`` characters."""
    one = " ".join(text.split())
    return repr(one if len(one) <= width else one[: width - 3] + "...")


def _score_in_daemon(prompt: str, responses: list[str], as_json: bool) -> None:
    from palate.cli.common import EXIT_CODES
    from palate.cli.models import explain_no_model
    from palate.errors import PalateError
    from palate.wire.client import Client

    try:
        with Client() as c:
            try:
                res = c.score(prompt, responses)
            except PalateError as e:
                raise explain_no_model(c, e) from e
    except PalateError as e:
        click.echo(f"palate: error: {e.message}", err=True)
        sys.exit(EXIT_CODES.get(e.code, 1))
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    best = max(range(len(responses)), key=lambda i: res["scores"][i])
    click.echo(f"model version {res['version']}")
    for i, (raw, z) in enumerate(zip(res["scores"], res["z"], strict=True)):
        mark = "*" if i == best else " "
        click.echo(
            f"{mark} [{i}] z={z:+.3f} raw={raw:+.4f}"
            f"{'  (truncated)' if res['truncated'][i] else ''}  {_echo(responses[i])}"
        )
