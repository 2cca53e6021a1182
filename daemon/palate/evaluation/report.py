"""One self-contained HTML report per model version: the numbers, the plots, the verdict.

Everything is in the one file (CSS inline, plots as base64 PNG data URIs), so it opens from
disk, offline, and can be mailed or archived as is. Plots are drawn with matplotlib's
object-oriented API on an Agg canvas: no pyplot, no global backend switch, nothing that would
touch a display or another thread's figures inside the daemon.

No feedback text appears unless ``examples`` is passed (``palate report --examples``): the
metrics carry only numbers and source/domain names, so a report is safe to share by default.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from palate.evaluation.gate import Decision

__all__ = ["render_report", "write_report"]

_COLOURS = {
    "candidate": "#1f5fa8",
    "deployed": "#9a9a9a",
    "longer": "#d9822b",
    "shorter": "#7a4fb3",
    "train": "#1f5fa8",
    "val": "#d9822b",
}
_ACTION_COLOURS = {"deploy": "#1e7d32", "reject": "#b3261e", "hold": "#a86400"}
_STATUS_MARK = {"pass": "✓ pass", "fail": "✗ fail", "skip": "– skip", "info": "i info"}
_MAX_EXAMPLE_CHARS = 600

_CSS = """
body{font:15px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d1d1f;
 max-width:1040px;margin:24px auto;padding:0 20px;background:#fff}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:30px 0 8px;border-bottom:1px solid #ddd;
 padding-bottom:4px} .sub{color:#666;margin:0 0 16px}
.verdict{border-radius:8px;padding:14px 18px;color:#fff;margin:12px 0}
.verdict .action{font-size:22px;font-weight:700;text-transform:uppercase;letter-spacing:.04em}
.verdict ul{margin:8px 0 0 0;padding-left:20px}
table{border-collapse:collapse;width:100%;margin:6px 0 10px;font-size:14px}
th,td{border-bottom:1px solid #e4e4e4;padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums;
 white-space:nowrap} .fail{color:#b3261e;font-weight:600} .pass{color:#1e7d32}
.skip,.info{color:#777} td.st{white-space:nowrap} tr.failrow td{background:#fdecea}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.note{color:#666;font-size:13px} pre{white-space:pre-wrap;word-break:break-word;margin:0;
 font:13px/1.35 ui-monospace,Menlo,Consolas,monospace}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}
"""


# -- formatting ------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _ci(s: Mapping[str, Any]) -> str:
    if not s.get("n"):
        return "–"
    return f"{_pct(s['ci_low'])} – {_pct(s['ci_high'])}"


def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None else format(float(x), fmt)


def _png(fig: Figure) -> str:
    """The figure as an <img> with a base64 PNG data URI."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _new_fig(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    return fig


# -- plots -----------------------------------------------------------------------------------


def _loss_plot(curves: Sequence[Mapping[str, Any]]) -> str:
    """Training and validation loss against optimiser step (``TrainResult.history``)."""
    fig = _new_fig(8.5, 3.4)
    ax = fig.add_subplot()
    for key, label, colour, marker in (
        ("train_loss", "training loss", _COLOURS["train"], ""),
        ("val_loss", "validation loss", _COLOURS["val"], "o"),
    ):
        pts = [(r["step"], r[key]) for r in curves if r.get(key) is not None and "step" in r]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=marker, ms=4, lw=1.8, color=colour, label=label)
    ax.axhline(0.6931, color="#bbb", ls=":", lw=1, label="chance (ln 2)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("Bradley-Terry loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _png(fig)


def _slice_rows(m: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    rows: list[tuple[str, Mapping[str, Any]]] = [
        (
            "all pairs",
            {
                "n": m["n_pairs"],
                "accuracy": m["accuracy"],
                "ci_low": m["accuracy_ci"][0],
                "ci_high": m["accuracy_ci"][1],
            },
        ),
        ("chosen longer", m["length_controlled"]["chosen_longer"]),
        ("chosen shorter", m["length_controlled"]["chosen_shorter"]),
    ]
    rows += [(f"source: {k}", v) for k, v in sorted(m["by_source"].items())]
    rows += [(f"domain: {k}", v) for k, v in sorted(m["by_domain"].items())]
    if m.get("probes"):
        rows.append(("probe set", m["probes"]))
    return rows


def _slice_lookup(m: Mapping[str, Any] | None, label: str) -> Mapping[str, Any] | None:
    if not m:
        return None
    return dict(_slice_rows(m)).get(label)


def _slice_plot(m: Mapping[str, Any], dep: Mapping[str, Any] | None) -> str:
    return _png(slice_figure(m, dep))


def slice_figure(m: Mapping[str, Any], dep: Mapping[str, Any] | None) -> Figure:
    """Accuracy with 95% CIs per slice, the deployed model beside it, baselines as lines.

    The probe set gets its own axis below: the length baselines are computed on the held-out
    pairs and say nothing about the probes, so drawing them across the probe row misleads.
    """
    rows = [(label, s) for label, s in _slice_rows(m) if s.get("n") and label != PROBE_ROW]
    probe = m.get("probes") or {}
    fig = _new_fig(8.5, 1.2 + 0.42 * len(rows) + (0.9 if probe.get("n") else 0.0))
    if probe.get("n"):
        ax, pax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [max(len(rows), 1) + 1.2, 1.6]})
        _probe_axis(pax, probe, (dep or {}).get("probes"))
    else:
        ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    for series, offset, source in (("candidate", 0.14, m), ("deployed", -0.14, dep)):
        if source is None:
            continue
        for y, (label, _) in zip(ys, rows, strict=True):
            s = _slice_lookup(source, label)
            if not s or not s.get("n") or s.get("accuracy") is None:
                continue
            acc = float(s["accuracy"])
            # max(0, .): Wilson's bound at 0% or 100% can miss the point by a rounding error.
            err = [[max(0.0, acc - float(s["ci_low"]))], [max(0.0, float(s["ci_high"]) - acc)]]
            ax.errorbar(
                acc,
                y + (offset if dep else 0),
                xerr=err,
                fmt="o",
                ms=6,
                capsize=3,
                color=_COLOURS[series],
                label=series if y == ys[0] else None,
            )
    b = m["baselines"]
    if b["always_longer"]["n"]:
        ax.axvline(
            b["always_longer"]["accuracy"],
            color=_COLOURS["longer"],
            ls="--",
            lw=1.3,
            label=f"always-longer {_pct(b['always_longer']['accuracy'])}",
        )
        ax.axvline(
            b["always_shorter"]["accuracy"],
            color=_COLOURS["shorter"],
            ls=":",
            lw=1.5,
            label=f"always-shorter {_pct(b['always_shorter']['accuracy'])}",
        )
    ax.axvline(0.5, color="#bbb", lw=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{label}  (n={s['n']})" for label, s in rows])
    # Start the axis a little left of everything drawn (never past 0): the interesting
    # differences are a few points wide and would be squashed on a full 0-100% axis.
    lows = [float(s["ci_low"]) for _, s in rows] + [0.5]
    lows += [float(b[k]["accuracy"]) for k in ("always_longer", "always_shorter") if b[k]["n"]]
    if dep:
        lows += [
            float(s["ci_low"]) for label, s in _slice_rows(dep) if s.get("n") and label != PROBE_ROW
        ]
    # A little past 100% so a dot at 100% is not cut in half by the frame.
    ax.set_xlim(max(0.0, math.floor(10 * min(lows) - 0.5) / 10), 1.015)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{100 * x:.0f}%")
    ax.set_xlabel("pairwise accuracy (95% CI); ties count as wrong")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    return fig


PROBE_ROW = "probe set"


def _probe_axis(ax: Any, probe: Mapping[str, Any], dep: Mapping[str, Any] | None) -> None:
    """The probe set's accuracy on an axis of its own (0-100%, chance marked, no baselines)."""
    for series, y, s in (("candidate", 0.15, probe), ("deployed", -0.15, dep)):
        if not s or not s.get("n") or s.get("accuracy") is None:
            continue
        acc = float(s["accuracy"])
        err = [[max(0.0, acc - float(s["ci_low"]))], [max(0.0, float(s["ci_high"]) - acc)]]
        ax.errorbar(
            acc, y if dep else 0, xerr=err, fmt="o", ms=6, capsize=3, color=_COLOURS[series]
        )
    ax.axvline(0.5, color="#bbb", lw=1)
    ax.set_xlim(0.0, 1.015)
    ax.set_ylim(-0.6, 0.6)
    ax.set_yticks([0])
    ax.set_yticklabels([f"probe set  (n={probe['n']})"])
    ax.xaxis.set_major_formatter(lambda x, _pos: f"{100 * x:.0f}%")
    ax.set_xlabel(
        "probe accuracy: obvious pairs shipped with Palate (length baselines do not apply)"
    )
    ax.grid(axis="x", alpha=0.3)


def _reliability_plot(cal: Mapping[str, Any]) -> str:
    """Observed frequency of "chosen wins" against predicted p, per bin; bar widths are bins."""
    fig = _new_fig(4.8, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", lw=1, label="perfect calibration")
    bins = [b for b in cal["bins"] if b["n"]]
    if bins:
        ax.bar(
            [(b["lo"] + b["hi"]) / 2 for b in bins],
            [b["frac_chosen"] for b in bins],
            width=[b["hi"] - b["lo"] for b in bins],
            color=_COLOURS["candidate"],
            alpha=0.35,
            edgecolor=_COLOURS["candidate"],
            label="observed",
        )
        ax.plot(
            [b["mean_p"] for b in bins],
            [b["frac_chosen"] for b in bins],
            "o-",
            color=_COLOURS["candidate"],
            ms=4,
            lw=1.2,
            label="mean predicted vs observed",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted p(first preferred) = σ(Δ/T)")
    ax.set_ylabel("observed frequency")
    ax.set_title(
        f"ECE {_f(cal.get('ece'))}   Brier {_f(cal.get('brier'))}   "
        f"T = {_f(cal.get('temperature'), '.3g')}",
        fontsize=10,
    )
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return _png(fig)


def _coverage_plot(ens: Mapping[str, Any]) -> str:
    """Accuracy on the most confident share of held-out pairs (and probes): a curve that
    falls from left to right means the ensemble knows when it is unsure."""
    fig = _new_fig(4.8, 4.6)
    ax = fig.add_subplot()
    for key, label, style in (("heldout", "held-out pairs", "o-"), ("probes", "probes", "s--")):
        curve = (ens.get(key) or {}).get("coverage_accuracy") or []
        if curve:
            ax.plot(
                [100 * c for c, _ in curve],
                [100 * a for _, a in curve],
                style,
                color=_COLOURS["candidate"] if key == "heldout" else _COLOURS["deployed"],
                ms=4,
                lw=1.2,
                label=label,
            )
    ax.axhline(50, color="#bbb", lw=1)
    ax.set_xlim(0, 102)
    ax.set_ylim(0, 102)
    ax.set_xlabel("coverage: most confident share of pairs (%)")
    ax.set_ylabel("accuracy on them (%)")
    held = ens.get("heldout") or {}
    ax.set_title(
        f"{held.get('members', '?')} members; at 50% coverage "
        f"{_pct(held.get('selective_accuracy_50'))}",
        fontsize=10,
    )
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _png(fig)


def _ensemble_section(m: Mapping[str, Any]) -> str:
    """Selective accuracy and where the members disagree (metrics["ensemble"])."""
    ens = m.get("ensemble")
    if not ens:
        return ""
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{c['n']}</td><td>{_pct(c['accuracy'])}</td>"
        f"<td>{_f(c['mean_spread'])}</td><td>{c['unsure']}</td></tr>"
        for name, c in sorted(
            ((ens.get("probes") or {}).get("by_category") or {}).items(),
            key=lambda kv: -kv[1]["mean_spread"],
        )
    )
    table = (
        "<table><tr><th>probe category</th><th>n</th><th>accuracy</th>"
        "<th>member spread of the margin</th><th>unsure (bounds straddle 0)</th></tr>"
        f"{rows}</table>"
        if rows
        else ""
    )
    return (
        "<h2>Where the ensemble is unsure</h2><div class='grid'>"
        + _coverage_plot(ens)
        + f"<div>{table}</div></div><p class='note'>Left: accuracy on the pairs the ensemble "
        "is surest of (confidence: the members' lower bound of the margin). Right: probe "
        "categories by how much the members disagree, most first; 'unsure' counts probes "
        "whose member spread is wider than the mean margin. Unsure questions from real use "
        "go to the review queue (`palate review list`).</p>"
    )


def _scatter_plot(m: Mapping[str, Any]) -> str:
    """Score against response length: a rising cloud is a length-biased model."""
    sc = m.get("length_scatter") or {"length": [], "score": []}
    fig = _new_fig(4.8, 4.6)
    ax = fig.add_subplot()
    xs, ys = sc["length"], sc["score"]
    if xs:
        ax.scatter(xs, ys, s=9, alpha=0.45, color=_COLOURS["candidate"], edgecolors="none")
        if min(xs) > 0 and max(xs) / min(xs) > 30:
            ax.set_xscale("log")
    rho = m["length_bias"]["spearman"]
    ax.set_title(f"Spearman ρ(score, length) = {_f(rho, '+.2f')}", fontsize=10)
    ax.set_xlabel(f"response length ({m.get('length_unit', 'chars')})")
    ax.set_ylabel("reward score")
    ax.grid(alpha=0.3)
    return _png(fig)


# -- sections --------------------------------------------------------------------------------


def _decision_dict(decision: Decision | Mapping[str, Any]) -> Mapping[str, Any]:
    return decision.to_json() if isinstance(decision, Decision) else decision


def _verdict(d: Mapping[str, Any]) -> str:
    action = str(d.get("action", "?"))
    colour = _ACTION_COLOURS.get(action, "#555")
    items = "".join(f"<li>{_e(r)}</li>" for r in d.get("reasons", []))
    return (
        f'<div class="verdict" style="background:{colour}"><div class="action">'
        f"{_e(action)}</div><ul>{items}</ul></div>"
    )


def _checks_table(d: Mapping[str, Any]) -> str:
    rows = []
    order = {"fail": 0, "pass": 1, "skip": 2, "info": 3}
    checks = sorted(d.get("checks", []), key=lambda c: order.get(str(c.get("status")), 4))
    for c in checks:  # failures first: they are why the verdict is what it is
        st = str(c.get("status", ""))
        cls = " class='failrow'" if st == "fail" else ""
        rows.append(
            f'<tr{cls}><td class="st {_e(st)}">{_e(_STATUS_MARK.get(st, st))}</td>'
            f"<td>{_e(c.get('name', ''))}</td><td>{_e(c.get('message', ''))}</td></tr>"
        )
    return "<table><tr><th>check</th><th>rule</th><th>detail</th></tr>" + "".join(rows) + "</table>"


def _headline(m: Mapping[str, Any], dep: Mapping[str, Any] | None) -> str:
    lc, cal, b = m["length_controlled"], m["calibration"], m["baselines"]

    def row(name: str, key: Any, fmt: Any, note: str = "") -> str:
        val = fmt(key(m))
        dval = fmt(key(dep)) if dep else ""
        return (
            f"<tr><td>{_e(name)}</td><td class='num'>{_e(val)}</td>"
            + (f"<td class='num'>{_e(dval)}</td>" if dep else "")
            + f"<td class='note'>{_e(note)}</td></tr>"
        )

    def pr(x: Mapping[str, Any]) -> Any:
        return x["probes"]["accuracy"] if x.get("probes") else None

    head = "<tr><th>metric</th><th>candidate</th>" + ("<th>deployed</th>" if dep else "")
    rows = [
        row(
            "pairwise accuracy",
            lambda x: x["accuracy"],
            _pct,
            f"95% CI {_pct(m['accuracy_ci'][0])} – {_pct(m['accuracy_ci'][1])}, "
            f"{m['n_pairs']} held-out pairs, {m['ties']} ties",
        ),
        row(
            "always-longer baseline",
            lambda x: x["baselines"]["always_longer"]["accuracy"],
            _pct,
            "same pairs; ties count as wrong",
        ),
        row(
            "always-shorter baseline",
            lambda x: x["baselines"]["always_shorter"]["accuracy"],
            _pct,
            f"best baseline: {b['best']}",
        ),
        row(
            "length-controlled accuracy",
            lambda x: x["length_controlled"]["accuracy"],
            _pct,
            f"mean of chosen-longer {_pct(lc['chosen_longer']['accuracy'])} and "
            f"chosen-shorter {_pct(lc['chosen_shorter']['accuracy'])}",
        ),
        row(
            "ECE",
            lambda x: x["calibration"]["ece"],
            _f,
            f"{cal['binning']}, T = {_f(cal['temperature'], '.3g')}",
        ),
        row("Brier", lambda x: x["calibration"]["brier"], _f, "lower is better; 0.25 = coin"),
        row(
            "Spearman(score, length)",
            lambda x: x["length_bias"]["spearman"],
            lambda v: _f(v, "+.2f"),
            "near 0: score does not follow length",
        ),
        row(
            "ratings AUC", lambda x: x["ratings"]["auc"], _f, f"{m['ratings']['n']} rated responses"
        ),
        row("probe-set accuracy", pr, _pct, "obvious pairs shipped with Palate"),
    ]
    return "<table>" + head + "<th></th></tr>" + "".join(rows) + "</table>"


def _comparison(m: Mapping[str, Any]) -> str:
    vs = m.get("vs_deployed")
    if not vs:
        return ""
    rows = []
    for name, s in [("all pairs", vs["overall"]), *sorted(vs["slices"].items())]:
        if not s["n"]:
            continue
        rows.append(
            f"<tr><td>{_e(name)}</td><td class='num'>{s['n']}</td>"
            f"<td class='num'>{_pct(s['candidate_accuracy'])}</td>"
            f"<td class='num'>{_pct(s['deployed_accuracy'])}</td>"
            f"<td class='num'>{100 * s['diff']:+.1f}</td>"
            f"<td class='num'>{100 * s['ci_low']:+.1f} – {100 * s['ci_high']:+.1f}</td>"
            f"<td class='num'>{100 * s['lower_95']:+.1f}</td>"
            f"<td class='num'>{s['wins']} / {s['losses']}</td></tr>"
        )
    return (
        "<h2>Against the deployed model (same pairs)</h2><p class='note'>Paired bootstrap "
        "over pairs; differences in percentage points. The gate uses the one-sided 95% "
        "lower bound.</p><table><tr><th>slice</th><th>n</th><th>candidate</th>"
        "<th>deployed</th><th>Δ</th><th>95% CI</th><th>lower bound</th>"
        "<th>won / lost</th></tr>" + "".join(rows) + "</table>"
    )


def _history(history: Sequence[Mapping[str, Any]]) -> str:
    if not history:
        return ""
    rows = []
    for h in history:
        met = h.get("metrics") or {}
        acc = h.get("accuracy", met.get("accuracy") if isinstance(met, Mapping) else None)
        dec = h.get("decision")
        action = dec.get("action") if isinstance(dec, Mapping) else dec
        rows.append(
            f"<tr><td>{_e(h.get('version', ''))}</td><td>{_e(_date(h.get('created')))}</td>"
            f"<td>{_e(h.get('state', ''))}</td><td class='num'>{_pct(acc)}</td>"
            f"<td>{_e(action or '')}</td></tr>"
        )
    return (
        "<h2>Version history</h2><table><tr><th>version</th><th>created</th><th>state</th>"
        "<th>accuracy</th><th>decision</th></tr>" + "".join(rows) + "</table>"
    )


def _date(ts: Any) -> str:
    """A registry timestamp (Unix seconds) as the local date and time a person reads."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    return "" if ts is None else str(ts)


def _examples(examples: Sequence[Mapping[str, Any]]) -> str:
    def cell(x: Any) -> str:
        s = str(x)
        if len(s) > _MAX_EXAMPLE_CHARS:
            s = s[:_MAX_EXAMPLE_CHARS] + " …"
        return f"<pre>{_e(s)}</pre>"

    rows = []
    for ex in examples:
        sc, sr = ex.get("score_chosen"), ex.get("score_rejected")
        scores = f"{_f(sc, '+.2f')} / {_f(sr, '+.2f')}" if sc is not None else ""
        rows.append(
            f"<tr><td>{cell(ex.get('prompt', ''))}</td><td>{cell(ex.get('chosen', ''))}"
            f"</td><td>{cell(ex.get('rejected', ''))}</td><td class='num'>{scores}</td>"
            "</tr>"
        )
    return (
        "<h2>Examples</h2><p class='note'>Included because --examples was given. This "
        "section contains your feedback text.</p><table><tr><th>prompt</th><th>chosen</th>"
        "<th>rejected</th><th>scores</th></tr>" + "".join(rows) + "</table>"
    )


def render_report(
    metrics: Mapping[str, Any],
    decision: Decision | Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    *,
    deployed_metrics: Mapping[str, Any] | None = None,
    train_curves: Sequence[Mapping[str, Any]] | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
    title: str = "Palate reward model report",
) -> str:
    """The whole report as one HTML string.

    ``metrics``/``deployed_metrics``: ``evaluation.evaluate`` dicts (the deployed one on the
    same pairs). ``decision``: the gate's :class:`Decision` or its ``to_json()``. ``history``:
    registry rows (``version``, ``created``, ``state``, ``accuracy`` or ``metrics.accuracy``,
    ``decision``), newest first. ``train_curves``: ``TrainResult.history`` (``step``,
    ``train_loss``, ``val_loss``). ``examples``: dicts with ``prompt``, ``chosen``,
    ``rejected`` and optional scores; only then does any feedback text appear.
    """
    d = _decision_dict(decision)
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='sub'>{_subtitle(metrics)}</p>",
        "<h2>Gate decision</h2>",
        _verdict(d),
        _checks_table(d),
        "<h2>Headline numbers</h2>",
        _headline(metrics, deployed_metrics),
        "<h2>Accuracy by slice</h2>",
        "<p class='note'>Dots: accuracy with its 95% Wilson interval. Dashed/dotted lines: the "
        "trivial length baselines on all pairs; grey: chance.</p>",
        _slice_plot(metrics, deployed_metrics) if metrics["n_pairs"] else "<p>No pairs.</p>",
        _comparison(metrics),
        "<h2>Calibration and length bias</h2><div class='grid'>",
        _reliability_plot(metrics["calibration"]),
        _scatter_plot(metrics),
        "</div><p class='note'>Left: each bin's observed share of wins against the predicted "
        "probability (each pair counted in both orders); on the diagonal is calibrated. Right: "
        "every held-out response's score against its length (at most 400 shown).</p>",
        _ensemble_section(metrics),
        "<h2>Training curves</h2>",
        _loss_plot(train_curves) if train_curves else "<p>No training curves recorded.</p>",
        _history(history),
        _examples(examples) if examples else "",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _subtitle(m: Mapping[str, Any]) -> str:
    """The subtitle: what the numbers were computed on."""
    return _e(
        f"{m['n_pairs']} held-out pairs, {m['n_ratings']} held-out ratings, "
        f"lengths in {m.get('length_unit', 'chars')}."
    )


def write_report(path: str | os.PathLike[str], html_text: str) -> Path:
    """Write ``html_text`` to ``path`` atomically with mode 0600 (it describes private data).

    A temporary file in the same directory (created 0600 by ``mkstemp``) is fsynced and renamed
    over ``path``, so a reader sees the old report or the new one, never half of one.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html_text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return target


def render_version_report(version: int, info: Mapping[str, Any], listing: Mapping[str, Any]) -> str:
    """The report of one registry version from the daemon's ``models`` answers (``info``: that
    version, ``listing``: every version), as both ``palate report`` and the web UI show it.
    The version must have an evaluation (``meta.metrics``)."""
    meta = info["meta"]
    history = [
        {
            "version": m["version"],
            "created": m["created"],
            "state": m["state"],
            "metrics": m["meta"].get("metrics", {}),
            "decision": m["meta"].get("decision"),
        }
        for m in listing["models"]
    ]
    decision = {
        "action": meta.get("decision"),
        "reasons": meta.get("reasons", []),
        "checks": meta.get("checks", []),
    }
    return render_report(
        meta["metrics"],
        decision,
        history,
        deployed_metrics=meta.get("deployed_metrics"),
        train_curves=meta.get("training", {}).get("history"),
        title=f"Palate model version {version}",
    )
