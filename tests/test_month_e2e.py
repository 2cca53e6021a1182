"""One user's month, end to end: the loop closes for the feedback real users produce.

A real ``palate daemon`` in the default layout (no PALATE_HOME; the socket in
``$XDG_RUNTIME_DIR/palate/`` as systemd --user sets it; HOME and the XDG dirs in a temp dir).
Continue, Tabby and voice write feedback in their own file formats, which the daemon's adapter
children read; the browser extension's events arrive as native-messaging frames through the
launcher ``palate browser install`` wrote, started with a browser's bare environment. All of
it is ratings: nobody here sends pairs. The scheduler's clock is injected
(``PALATE_CLOCK_FILE``), so each simulated night the real due-check starts the run. The base
model is the tiny random llama (tests/tiny_gguf.py) so a night takes seconds.

Every night must train and be judged by the gate (enough held-out data, a real decision); a
later night must deploy a retrain over an earlier deployed version; rerank must answer from
the newest deployed version. The driver is bench/month.py (which runs the same month on the
embedded model and prints the figures).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO
from tiny_gguf import tiny_args, tiny_model, write_gguf

sys.path.insert(0, str(REPO / "bench"))
import month

pytestmark = pytest.mark.slow

NIGHTS = 5


# A night takes ~20 s here; a stuck night fails on its own timeout with the daemon's log
# (bench/month.py Month.wait) before pytest's whole-test limit cuts it off without one.
@pytest.mark.timeout(NIGHTS * 150 + 150)
def test_a_month_of_real_format_feedback_trains_judges_and_redeploys() -> None:
    root = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
    args = tiny_args()
    gguf = write_gguf(root / "tiny.gguf", tiny_model(args), args)
    m = month.Month(
        root / "m",
        base_model=str(gguf),
        train=month.QUICK_TRAIN,
        gate=month.QUICK_GATE,
        per_day=170,
        seed=3,
        log=lambda _: None,
    )
    nights: list[month.Night] = []
    try:
        m.start()
        assert str(m.socket).startswith(str(root / "m" / "run" / "palate"))
        for n in range(NIGHTS):
            nights.append(m.night(n, run_timeout=150))
        with m.client() as c:
            st = c.status()
            by_source = st["events"]["by_source"]
            models = c.call("models")["models"]
            deployed = [x["version"] for x in models if x["state"] == "deployed"]
            r = c.rerank(*month.RERANK)
        adapters = {a["name"]: a for a in st["adapters"]}
    finally:
        rc = m.stop()
        log = m.daemon_log()
        shutil.rmtree(root, ignore_errors=True)

    summary = "\n".join(str(n) for n in nights) + "\n" + log
    assert set(by_source) == {"continue", "tabby", "voice", "browser"}, by_source
    assert all(a["connected"] for a in adapters.values()), adapters
    # Every night trained, and the gate judged: enough held-out data, a decision on it.
    for n in nights:
        assert n.outcome == "done" and n.version is not None, summary
        assert n.heldout_ratings >= month.QUICK_GATE["min_heldout_ratings"], summary
        assert n.judged and n.decision in ("deploy", "reject"), summary
    first = next(i for i, n in enumerate(nights) if n.deployed)
    assert any(n.deployed for n in nights[first + 1 :]), f"no retrain deployed\n{summary}"
    newest = max(n.version for n in nights if n.deployed and n.version is not None)
    assert deployed == [newest]
    assert r["version"] == newest and sorted(r["order"]) == list(range(len(month.RERANK[1])))
    assert month.liked_margin(r) > 0, r  # the newest model prefers the user's style
    assert rc == 0
