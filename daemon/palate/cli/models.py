"""``palate models``, ``report``, ``deploy``, ``rollback`` and ``rerank``: the registry's versions
and the deployed model they serve.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from palate.cli.common import check_prompt, emit, handles_errors, json_option
from palate.errors import PalateError
from palate.wire.client import Client

# --- models -----------------------------------------------------------------------------


def _model_row(m: dict[str, Any]) -> dict[str, Any]:
    """The stable JSON shape of one version (docs/cli.md): meta's gate keys lifted up."""
    meta = m.get("meta", {})
    return {
        "version": m["version"],
        "state": m["state"],
        "created": m["created"],
        "base_model": m["base_model"],
        "metrics": meta.get("metrics", {}),
        "decision": meta.get("decision"),
        "reasons": meta.get("reasons", []),
        "size_bytes": m.get("size_bytes"),
    }


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


# --- "no deployed model": what exists and what to do ----------------------------------------

#: What a first run costs, from docs/benchmarks.md (1,626 HH pairs, SmolLM2-135M, 2 cores).
TRAIN_TIME_HINT = "about 35 min for 1,600 pairs on a 2-core laptop CPU"

_GATE_VERB = {"reject": "rejected", "hold": "held"}


def next_steps(version: int) -> list[str]:
    """What the user can do about a version the gate did not deploy (the gate never changes
    its mind by itself: more evidence, or an explicit override)."""
    return [
        "what you can do:",
        "  - give more, or different, feedback (`palate feedback`), then train again with "
        "`palate train --wait`; pairs where the better answer is not simply the shorter or "
        "the longer one teach the most",
        f"  - deploy version {version} anyway (recorded as an override): "
        f"`palate deploy {version} --override`",
        f"  - see why: `palate models show {version}`, or `palate report {version} --out DIR`",
    ]


def model_summary(listing: Mapping[str, Any]) -> str:
    """One line: the deployed version, or what exists instead (``status`` and errors)."""
    versions = listing.get("models") or []
    deployed = listing.get("deployed")
    if deployed is not None:
        row = next((m for m in versions if m["version"] == deployed), None)
        acc = ((row or {}).get("meta") or {}).get("metrics", {}).get("accuracy")
        acc_s = f", held-out accuracy {acc:.1%}" if isinstance(acc, (int, float)) else ""
        return f"version {deployed} deployed{acc_s}"
    if not versions:
        return "none yet: no model has been trained"
    newest = versions[0]
    meta = newest.get("meta") or {}
    decision = meta.get("decision")
    what = (
        f"{_GATE_VERB[decision]} by the gate"
        if decision in _GATE_VERB
        else f"{newest['state']} (gate: {decision or 'not evaluated'})"
    )
    return f"none deployed: version {newest['version']} ({_when(newest['created'])}) was {what}"


def no_model_explanation(listing: Mapping[str, Any]) -> str:
    """The message for every place that needs a deployed model and finds none: what exists
    (version N, rejected, why) and what the user can do."""
    versions = listing.get("models") or []
    if not versions:
        return (
            "no model is deployed yet: no model has been trained.\n"
            "Send feedback (`palate feedback`), then train one with `palate train --wait` "
            f"({TRAIN_TIME_HINT}); the evaluation gate decides whether it is deployed."
        )
    newest = versions[0]
    v = int(newest["version"])
    lines = [f"no model is deployed: {model_summary(listing).split(': ', 1)[1]}"]
    lines += [f"  - {r}" for r in (newest.get("meta") or {}).get("reasons", [])]
    if len(versions) > 1:
        lines.append(f"({len(versions)} versions exist, none deployed; `palate models` lists them)")
    lines += next_steps(v)
    return "\n".join(lines)


def explain_no_model(c: Client, err: PalateError) -> PalateError:
    """``err`` itself, or for ``no_model`` the same error with :func:`no_model_explanation`."""
    if err.code != "no_model":
        return err
    try:
        listing = c.call("models")
    except PalateError:
        return err
    return PalateError("no_model", no_model_explanation(listing), err.details)


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
@handles_errors
def models(ctx: click.Context, as_json: bool) -> None:
    """List model versions: state, accuracy, gate decision. `palate models show V` for one."""
    if ctx.invoked_subcommand is not None:
        return
    with Client() as c:
        data = c.call("models")
    rows = [_model_row(m) for m in data["models"]]

    def human(rows: list[dict[str, Any]]) -> None:
        if not rows:
            click.echo("no models yet: train one with `palate train`")
            return
        click.echo(f"{'version':>7}  {'state':<9}  {'created':<16}  {'accuracy':>8}  decision")
        for r in rows:
            acc = r["metrics"].get("accuracy")
            acc_s = f"{acc:.1%}" if isinstance(acc, (int, float)) else "-"
            click.echo(
                f"{r['version']:>7}  {r['state']:<9}  {_when(r['created']):<16}  "
                f"{acc_s:>8}  {r['decision'] or '-'}"
            )

    emit(rows, as_json, human)


@models.command("show")
@click.argument("version", type=int)
@json_option
@handles_errors
def models_show(version: int, as_json: bool) -> None:
    """Show one version: metrics, gate decision with every reason, training summary."""
    with Client() as c:
        info = c.call("models", {"version": version})["model"]
    row = {**_model_row(info), "meta": info["meta"]}

    def human(r: dict[str, Any]) -> None:
        click.echo(f"version   {r['version']} ({r['state']}), created {_when(r['created'])}")
        click.echo(f"base      {r['base_model']}")
        for k, v in sorted(r["metrics"].items()):
            if isinstance(v, (int, float, str)):
                click.echo(f"  {k:<24} {v:.4g}" if isinstance(v, float) else f"  {k:<24} {v}")
        click.echo(f"decision  {r['decision'] or '-'}")
        for reason in r["reasons"]:
            click.echo(f"  - {reason}")

    emit(row, as_json, human)


@click.command()
@click.argument("version", type=int, required=False)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write report-vN.html into (created; the file is 0600).",
)
@json_option
@handles_errors
def report(version: int | None, out_dir: Path, as_json: bool) -> None:
    """Write a self-contained HTML report of model VERSION (default: the newest).

    Plots (loss curves, accuracy by slice with CIs next to the baselines and the deployed
    model, reliability diagram, score vs length) and the gate's decision with every reason.
    It holds numbers only: no text of your feedback.
    """
    from palate.evaluation.report import render_version_report, write_report

    with Client() as c:
        listing = c.call("models")
        if not listing["models"]:
            raise PalateError("not_found", "no models yet: train one with `palate train`")
        v = version if version is not None else listing["models"][0]["version"]
        info = c.call("models", {"version": v})["model"]
    meta = info["meta"]
    if "metrics" not in meta:
        raise PalateError("not_found", f"version {v} has no evaluation to report")
    html = render_version_report(v, info, listing)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = write_report(out_dir / f"report-v{v}.html", html)

    def human(d: dict[str, Any]) -> None:
        click.echo(f"wrote {d['path']}")
        if meta.get("decision") in _GATE_VERB and info["state"] != "deployed":
            # The report is where a rejected first model is read: say what comes next.
            click.echo(f"version {v} was {_GATE_VERB[meta['decision']]} by the gate.")
            for line in next_steps(v):
                click.echo(line)

    emit({"path": str(path), "version": v}, as_json, human)


@click.command()
@click.argument("version", type=int)
@click.option(
    "--override",
    is_flag=True,
    help="Deploy even though the gate held or rejected it (recorded as an override).",
)
@click.option("--reason", help="Why, for the history.")
@json_option
@handles_errors
def deploy(version: int, override: bool, reason: str | None, as_json: bool) -> None:
    """Deploy model VERSION now (the daemon's scorer switches to it at once)."""
    params: dict[str, Any] = {"version": version, "override": override}
    if reason:
        params["reason"] = reason
    with Client() as c:
        res = c.call("deploy", params)
    emit(
        res,
        as_json,
        lambda d: click.echo(
            f"deployed version {d['deployed']} (previously {d['previous'] or 'none'})"
        ),
    )


@click.command()
@click.option("--reason", help="Why, for the history.")
@json_option
@handles_errors
def rollback(reason: str | None, as_json: bool) -> None:
    """Go back to the version that was deployed before the current one."""
    with Client() as c:
        res = c.call("rollback", {"reason": reason} if reason else {})
    emit(
        res,
        as_json,
        lambda d: click.echo(f"rolled back to version {d['deployed']} (was {d['previous']})"),
    )


# --- scoring ------------------------------------------------------------------------------


def read_candidates(path: Path) -> list[str]:
    """Candidates from a file: JSONL (a JSON string, or an object with ``text``,
    ``response`` or ``candidate``, per line) or, for any other suffix, one per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PalateError("not_found", f"cannot read {path}: {e}") from e
    out: list[str] = []
    structured = path.suffix in (".jsonl", ".json")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not structured:
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PalateError("invalid_request", f"{path}:{n}: not valid JSON ({e.msg})") from e
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("text", "response", "candidate") if k in obj), None)
        if not isinstance(obj, str):
            raise PalateError(
                "invalid_request",
                f"{path}:{n}: expected a JSON string or an "
                'object with "text", "response" or "candidate"',
            )
        out.append(obj)
    if not out:
        raise PalateError("invalid_request", f"{path} holds no candidates")
    return out


@click.command()
@click.argument("prompt")
@click.option(
    "--candidates",
    "cand_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File of candidates: JSONL (strings or {text: ...}) or plain lines.",
)
@click.option("--top-k", type=click.IntRange(min=1), help="Show only the best K (at least 1).")
@click.option(
    "--lower-bound",
    "lower_bound",
    type=click.FloatRange(0, 100),
    help="Rank by score - LAMBDA x uncertainty (the ensemble's members' spread) instead of score.",
)
@click.option(
    "--remember",
    is_flag=True,
    help="Queue the pair the model is least sure about for `palate review` (stored encrypted).",
)
@json_option
@handles_errors
def rerank(
    prompt: str,
    cand_file: Path,
    top_k: int | None,
    lower_bound: float | None,
    remember: bool,
    as_json: bool,
) -> None:
    """Order candidate responses to PROMPT by what you prefer (the deployed model decides)."""
    check_prompt(prompt, "PROMPT")
    try:
        cands = read_candidates(cand_file)
    except PalateError as e:  # a file the user named that cannot be used: a usage mistake
        raise click.BadParameter(e.message, param_hint="'--candidates'") from e
    with Client() as c:
        try:
            opts: dict[str, Any] = {"remember": True} if remember else {}
            if lower_bound is not None:
                opts["lower_bound"] = lower_bound
            res = c.rerank(prompt, cands, top_k=top_k, **opts)
        except PalateError as e:
            raise explain_no_model(c, e) from e

    def human(d: dict[str, Any]) -> None:
        if len(cands) == 1:
            click.echo(f"model version {d['version']}; one candidate, nothing to compare it with")
        else:
            click.echo(
                f"model version {d['version']}; "
                f"{'confident' if d['confident'] else 'NOT confident'} "
                f"(p(best > runner-up) = {d['p_top_over_next']:.2f})"
            )
        for rank, r in enumerate(d["ranked"], 1):
            text = cands[r["index"]].replace("\n", " ")
            unc = r.get("uncertainty")
            spread = f"±{unc:.3f}" if unc else ""
            click.echo(
                f"{rank:>3}. [{r['index']}] p_best={r['p_best']:.2f} "
                f"score={r['score']:+.3f}{spread}  {text[:80]}"
            )
        if d.get("review_id"):
            click.echo(f"queued for review as {d['review_id']} (`palate review list`)")

    emit(res, as_json, human)
