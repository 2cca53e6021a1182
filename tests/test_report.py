"""The HTML report: parses, embeds its images, and carries no feedback text unless asked."""

from __future__ import annotations

import base64
import os
import stat
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from palate.evaluation.gate import GatePolicy, decide
from palate.evaluation.heldout import PairRecord, RatingRecord, evaluate, load_probes
from palate.evaluation.report import render_report, slice_figure, write_report

SECRET = "the secret prompt about their tax return"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs).get("src") or "")
        elif tag not in ("meta", "br", "img", "link"):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _sample() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    pairs, dep = [], []
    for i in range(240):
        lc, lr = int(rng.integers(20, 900)), int(rng.integers(20, 900))
        q = float(rng.normal(1.0, 1.0))
        src, dom = ("editor", "voice")[i % 2], ("code", "prose", "")[i % 3]
        pairs.append(PairRecord(q, 0.0, lc, lr, src, dom, f"e{i}"))
        dep.append(PairRecord(q - 0.2, 0.0, lc, lr, src, dom, f"e{i}"))
    probes = [p.record(1.0, 0.0) for p in load_probes()]
    ratings = [RatingRecord(float(rng.normal(lab, 1.0)), float(lab), 50) for lab in (0, 1) * 30]
    dep_m = evaluate(dep, ratings, probes=probes)
    m = evaluate(pairs, ratings, temperature=0.8, probes=probes, deployed_pairs=dep)
    return {"metrics": m, "deployed": dep_m, "decision": decide(m, dep_m, GatePolicy())}


CURVES = [{"step": s, "train_loss": 0.7 - s / 1000} for s in range(10, 200, 10)] + [
    {"step": s, "val_loss": 0.72 - s / 1500} for s in range(50, 200, 50)
]
HISTORY: list[dict[str, Any]] = [
    {
        "version": "v2",
        "created": "2026-05-02",
        "state": "candidate",
        "accuracy": 0.81,
        "decision": "deploy",
    },
    {
        "version": "v1",
        "created": "2026-05-01",
        "state": "deployed",
        "metrics": {"accuracy": 0.7},
        "decision": {"action": "deploy"},
    },
]


def _parse(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    p.close()
    return p


def test_report_parses_and_embeds_every_plot() -> None:
    s = _sample()
    html = render_report(
        s["metrics"], s["decision"], HISTORY, deployed_metrics=s["deployed"], train_curves=CURVES
    )
    p = _parse(html)
    assert not p.open  # every element closed
    # loss curves, slices, reliability diagram, score-vs-length scatter
    assert len(p.imgs) == 4
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    text = " ".join(p.text)
    assert s["decision"].action.upper() in text.upper()
    for reason in s["decision"].reasons:
        assert reason in text
    assert "always-longer baseline" in text and "Version history" in text
    assert "http://" not in html and "https://" not in html  # nothing fetched from outside


def test_no_example_text_unless_asked() -> None:
    s = _sample()
    examples = [
        {
            "prompt": SECRET + " <script>alert(1)</script>",
            "chosen": "a",
            "rejected": "b",
            "score_chosen": 1.0,
            "score_rejected": 0.0,
        }
    ]
    plain = render_report(s["metrics"], s["decision"], [])
    assert SECRET not in plain and "Examples" not in plain
    shown = render_report(s["metrics"], s["decision"].to_json(), [], examples=examples)
    assert SECRET in shown
    assert "<script>" not in shown and "&lt;script&gt;" in shown  # escaped, never executed
    assert not _parse(shown).open


def test_report_renders_without_deployed_model_curves_or_data() -> None:
    m = evaluate([])
    html = render_report(m, decide(m, None, GatePolicy()), [])
    p = _parse(html)
    assert "No training curves recorded" in html and "Not enough data yet" in html
    assert all(src.startswith("data:image/png;base64,") for src in p.imgs)


def test_write_report_is_atomic_and_private(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    os.chmod(target, 0o644)
    out = write_report(target, "<html>new</html>")
    assert out == target and target.read_text() == "<html>new</html>"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [f.name for f in tmp_path.iterdir()] == ["report.html"]  # no temp file left


def test_history_shows_created_as_a_local_date() -> None:
    """The registry stores Unix seconds; the report shows the date a person reads."""
    s = _sample()
    created = 1_795_688_410.2268233
    history: list[dict[str, Any]] = [
        {"version": 1, "created": created, "state": "rejected", "decision": "reject"}
    ]
    html = render_report(s["metrics"], s["decision"], history)
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) in html
    assert "1795688410" not in html


def test_probe_set_has_its_own_axis_without_length_baselines() -> None:
    s = _sample()
    fig = slice_figure(s["metrics"], s["deployed"])
    main, probe = fig.axes
    assert "probe set" not in " ".join(t.get_text() for t in main.get_yticklabels())
    assert [t.get_text() for t in probe.get_yticklabels()] == [
        f"probe set  (n={s['metrics']['probes']['n']})"
    ]

    # the main axis carries chance and both length baselines; the probe axis chance only
    def vlines(ax: Any) -> list[float]:  # axvline: y from 0 to 1 in axes coordinates
        return [float(ln.get_xdata()[0]) for ln in ax.lines if list(ln.get_ydata()) == [0, 1]]

    b = s["metrics"]["baselines"]
    assert sorted(vlines(main)) == sorted(
        [0.5, b["always_longer"]["accuracy"], b["always_shorter"]["accuracy"]]
    )
    assert vlines(probe) == [0.5]
    assert probe.get_xlim()[0] == 0.0


def test_report_shows_where_the_ensemble_is_unsure() -> None:
    from palate.evaluation.selective import ensemble_metrics

    s = _sample()
    rng = np.random.default_rng(3)
    probes = load_probes()
    held_c = rng.normal(1.0, 1.0, size=(120, 5))
    # members agree on the probes of one category and split on another's
    probe_c = np.ones((len(probes), 5))
    split = np.array([p.category == "sycophancy" for p in probes])
    probe_c[split] = [[2.0, -2.0, 2.0, -2.0, 1.0]]
    metrics = {
        **s["metrics"],
        "ensemble": ensemble_metrics(
            [(held_c, np.zeros((120, 5)))],
            [(probe_c, np.zeros((len(probes), 5)))],
            [p.category for p in probes],
            0.8,
        ),
    }
    html = render_report(metrics, s["decision"], HISTORY)
    p = _parse(html)
    assert not p.open
    assert len(p.imgs) == 4  # slices, reliability, scatter and the coverage-accuracy curve
    text = " ".join(p.text)
    assert "Where the ensemble is unsure" in text
    # the category the members split on is listed first
    rows = html.split("<h2>Where the ensemble is unsure</h2>", 1)[1]
    assert rows.index(">sycophancy<") < rows.index(">arithmetic<")
    assert "Where the ensemble is unsure" not in render_report(s["metrics"], s["decision"], [])
