"""One user's month: real-format feedback from every adapter, a real daemon, nightly retrains.

A new user's machine in a temp dir, in the default layout (no ``PALATE_HOME``; the socket in
``$XDG_RUNTIME_DIR/palate/`` as systemd --user sets it). Every simulated day the user's tools
write feedback in their own formats:

* **Continue** (``~/.continue/dev_data/0.2.0/``): ``autocomplete`` outcomes (accepted, or
  shown and not taken), ``chatFeedback`` thumbs on prompts in Continue's own template
  (system prompt included) with a ``sessionId``, and ``nextEditOutcome`` rewrites taken or
  not (stored as pairs, so there is a held-out pair accuracy too);
* **Tabby** (``~/.tabby/events/YYYY-MM-DD.json``): ``completion`` records, then ``view`` and
  ``select`` or ``dismiss``;
* **voice** (generic turn JSONL): calls of user / assistant turns with a thumbs line;
* **browser**: the extension's rating events, sent as native-messaging frames through the
  launcher ``palate browser install`` wrote, started with a browser's bare environment.

The user's taste is one the model can learn: answers they accept tend to be written in one
vocabulary and carry the word ``bravo``, the others in another (10% of verdicts go against
it, as real users are inconsistent); lengths are drawn independently of the verdict, so a
length-only rule sits near chance.

The scheduler's clock is injected (``PALATE_CLOCK_FILE``): after each day's feedback is in,
the clock moves to 03:01 the next morning and the real nightly due-check starts the run;
the run trains, the gate judges against the deployed model, and the result is recorded.

    .venv/bin/python bench/month.py                  # embedded SmolLM2-135M, 5 nights
    .venv/bin/python bench/month.py --nights 7 --per-day 300 --json out.json
    .venv/bin/python bench/month.py --base-model PATH --quick   # what tests/test_month_e2e runs

Prints, per night: events so far, the version trained, held-out ratings AUC (95% CI) against
the length-only rule, held-out pair accuracy where pairs exist, the deployed model's AUC on
the same held-out set, the gate's decision and its first reason, and the run's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PALATE = [sys.executable, "-m", "palate.cli"]
MARKER = "bravo"
DAY_S = 86_400
CHROME_ORIGIN = "chrome-extension://gkobkcohibebaggboflafmmjndlfhfgj/"

#: The user's taste: answers in the first vocabulary, which carry the marker, are the ones they
#: like (same word lengths on both sides, so length says nothing).
LIKED_WORDS = ["alpha", "beta", "gamma", "delta", "omega"]
OTHER_WORDS = ["sigma", "kappa", "theta", "lambda", "rho"]
VERBS = ["load", "parse", "merge", "score", "index", "render", "fetch", "split", "count", "sort"]
NOUNS = ["rows", "users", "tokens", "files", "pairs", "events", "items", "lines", "paths", "keys"]


# --- the machine ------------------------------------------------------------------------------


def default_layout_env(root: Path, **extra: str) -> dict[str, str]:
    """A desktop session's environment rooted at ``root``: no PALATE_HOME, XDG dirs set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("XDG_", "PALATE_")) or k == "PALATE_THIRD_PARTY_ADAPTERS"
    }
    user, run = root / "user", root / "run"
    for d in (user, run):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    env.update(
        HOME=str(user),
        XDG_RUNTIME_DIR=str(run),
        XDG_DATA_HOME=str(user / ".local" / "share"),
        XDG_CONFIG_HOME=str(user / ".config"),
        XDG_STATE_HOME=str(user / ".local" / "state"),
        XDG_CACHE_HOME=str(user / ".cache"),
        PALATE_KEY_BACKEND="file",
        PALATE_THIRD_PARTY_ADAPTERS="0",
        PYTHONUNBUFFERED="1",
        TZ="UTC",
    )
    env.update(extra)
    return env


def resolve_in(env: dict[str, str]) -> Any:
    """``palate.paths.resolve()`` as a process started with ``env`` computes it."""
    code = "import json; from palate.paths import resolve; p = resolve(); " + (
        "print(json.dumps({'home': str(p.home), 'socket': str(p.socket)}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


# --- the user's tools -------------------------------------------------------------------------


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass
class World:
    """One user's editors, voice agent and browser, writing feedback in their own formats."""

    env: dict[str, str]
    seed: int = 0
    noise: float = 0.1
    rnd: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rnd = random.Random(self.seed)
        self.home = Path(self.env["HOME"])
        self.continue_dir = self.home / ".continue" / "dev_data" / "0.2.0"
        self.tabby_dir = self.home / ".tabby" / "events"
        self.voice_dir = self.home / "voice"
        for d in (self.continue_dir, self.tabby_dir, self.voice_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.launcher: Path | None = None

    # -- the taste being learned
    def verdict(self) -> bool:
        return self.rnd.random() < 0.5

    def answer(self, liked: bool, n_min: int = 2, n_max: int = 5) -> tuple[str, bool]:
        """A response and its true verdict: the marker goes with 'liked' 90% of the time."""
        marked = liked if self.rnd.random() >= self.noise else not liked
        vocab = LIKED_WORDS if marked else OTHER_WORDS
        words = [self.rnd.choice(vocab) for _ in range(self.rnd.randint(n_min, n_max))]
        if marked:  # in place of a word: the verdict says nothing about length
            words[self.rnd.randrange(len(words))] = MARKER
        return " ".join(words), liked

    def code_context(self, day: int, k: int) -> tuple[str, str, str]:
        """(prefix, suffix, file): a file of this project and a place in it."""
        verb, noun = self.rnd.choice(VERBS), self.rnd.choice(NOUNS)
        body = "".join(
            f"def {self.rnd.choice(VERBS)}_{self.rnd.choice(NOUNS)}_{i}(xs):\n"
            f"    return [x for x in xs if x]\n\n"
            for i in range(self.rnd.randint(2, 12))
        )
        prefix = f"import os\n\n{body}def {verb}_{noun}(items):\n    result = "
        suffix = f"\n    return result\n\n\ndef after_{day}_{k}_{verb}():\n    pass\n"
        return prefix, suffix, f"/home/user/proj/{noun}_{k % 7}.py"

    # -- one day
    def write_day(self, day: int, start: float, per_day: int) -> int:
        """Write one day's feedback (timestamps within the day from ``start``); returns how
        many events the daemon should store from it."""
        share = {
            "continue_ac": 0.3, "continue_chat": 0.1, "continue_next": 0.08, "tabby": 0.22,
            "voice": 0.12,
        }  # fmt: skip
        counts = {k: max(2, int(per_day * v)) for k, v in share.items()}
        counts["browser"] = max(2, per_day - sum(counts.values()))
        clock = iter(start + 60.0 * i for i in range(10 * per_day))
        self._continue(day, counts["continue_ac"], counts["continue_chat"], clock)
        self._next_edits(day, counts["continue_next"], clock)
        self._tabby(day, counts["tabby"], clock)
        self._voice(day, counts["voice"], clock)
        self._browser(day, counts["browser"])
        return sum(counts.values())

    def _append(self, path: Path, records: list[dict[str, Any]]) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)

    def _continue(self, day: int, n_ac: int, n_chat: int, clock: Iterator[float]) -> None:
        rows = []
        for k in range(n_ac):
            prefix, suffix, path = self.code_context(day, k)
            text, liked = self.answer(self.verdict())
            rows.append(
                {
                    "eventName": "autocomplete", "schema": "0.2.0", "userId": "",
                    "userAgent": "Visual Studio Code/1.101.0 (Continue/1.1.50)",
                    "selectedProfileId": "local", "timestamp": iso(next(clock)),
                    "disable": False, "maxPromptTokens": 1024, "debounceDelay": 350,
                    "maxSuffixPercentage": 0.2, "prefixPercentage": 0.3,
                    "multilineCompletions": "auto", "time": 300 + k,
                    "modelProvider": "ollama", "modelName": "qwen2.5-coder:1.5b",
                    "cacheHit": False, "prefix": prefix, "suffix": suffix,
                    "prompt": f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
                    "completion": text.replace(" ", "_"),
                    "filepath": f"file://{path}", "gitRepo": "https://example.org/u/proj",
                    "completionId": str(uuid.UUID(int=self.rnd.getrandbits(128))),
                    "uniqueId": "u-1", "accepted": liked,
                }
            )  # fmt: skip
        self._append(self.continue_dir / "autocomplete.jsonl", rows)
        chats = []
        system = "<important_rules>\n  Be concise.\n</important_rules>"
        for k in range(n_chat):
            session = str(uuid.UUID(int=self.rnd.getrandbits(128)))
            verb, noun = self.rnd.choice(VERBS), self.rnd.choice(NOUNS)
            q1 = f"day {day} chat {k}: how do I {verb} the {noun}?"
            a1, _ = self.answer(True)
            q2 = f"and what about {self.rnd.choice(NOUNS)} {k}?"
            text, liked = self.answer(self.verdict())
            prompt = f"<system>\n{system}\n\n<user>\n{q1}\n\n<assistant>\n{a1}\n\n<user>\n{q2}\n\n"
            chats.append(
                {
                    "eventName": "chatFeedback", "schema": "0.2.0", "userId": "",
                    "userAgent": "Visual Studio Code/1.101.0 (Continue/1.1.50)",
                    "selectedProfileId": "local", "timestamp": iso(next(clock)),
                    "modelProvider": "ollama", "modelName": "llama3", "modelTitle": "Llama 3",
                    "completionOptions": {}, "prompt": prompt, "completion": text,
                    "feedback": liked, "sessionId": session,
                }
            )  # fmt: skip
        self._append(self.continue_dir / "chatFeedback.jsonl", chats)

    def _next_edits(self, day: int, n: int, clock: Iterator[float]) -> None:
        """Continue's next-edit outcomes: a rewrite of the line at the cursor, taken or not
        (the daemon stores each as a pair: rewrite vs original)."""
        rows = []
        for k in range(n):
            prefix, suffix, path = self.code_context(day, 2000 + k)
            text, liked = self.answer(self.verdict())
            rows.append(
                {
                    "eventName": "nextEditOutcome", "schema": "0.2.0", "userId": "",
                    "userAgent": "Visual Studio Code/1.101.0 (Continue/1.1.50)",
                    "selectedProfileId": "local", "timestamp": int(next(clock) * 1000),
                    "elapsed": 600, "completionOptions": {},
                    "completionId": str(uuid.UUID(int=self.rnd.getrandbits(128))),
                    "uniqueId": "u-1", "fileUri": f"file://{path}",
                    "workspaceDirUri": "file:///home/user/proj", "prompt": "...",
                    "userEdits": "", "userExcerpts": f"{prefix}<|cursor|>{suffix}",
                    "originalEditableRange": "    result = None\n",
                    "completion": f"    result = {text.replace(' ', '_')}\n",
                    "cursorPosition": {"line": prefix.count("\n"), "character": 13},
                    "accepted": liked, "modelProvider": "inception",
                    "modelName": "mercury-coder",
                }
            )  # fmt: skip
        self._append(self.continue_dir / "nextEditOutcome.jsonl", rows)

    def _tabby(self, day: int, n: int, clock: Iterator[float]) -> None:
        rows = []
        for k in range(n):
            prefix, suffix, path = self.code_context(day, 1000 + k)
            text, liked = self.answer(self.verdict())
            cid = f"cmpl-{day:03d}-{k:05d}-{self.rnd.getrandbits(32):08x}"
            ts = int(next(clock) * 1000)
            view = f"view-{cid}"
            verdict = (
                {"select": {"completion_id": cid, "choice_index": 0, "view_id": view,
                            "elapsed": 900}}
                if liked
                else {"dismiss": {"completion_id": cid, "choice_index": 0, "view_id": view,
                                  "elapsed": 1200}}
            )  # fmt: skip
            rows += [
                {"user": None, "ts": ts, "event": {"completion": {
                    "completion_id": cid, "language": "python",
                    "prompt": f"<PRE> {prefix} <SUF>{suffix} <MID>",
                    "segments": {"prefix": prefix, "suffix": suffix, "filepath": path,
                                 "git_url": "https://example.org/u/proj"},
                    "choices": [{"index": 0, "text": text.replace(" ", "_")}],
                    "user_agent": None}}},
                {"user": None, "ts": ts + 120,
                 "event": {"view": {"completion_id": cid, "choice_index": 0, "view_id": view}}},
                {"user": None, "ts": ts + 1500, "event": verdict},
            ]  # fmt: skip
        name = datetime.fromtimestamp(rows[0]["ts"] / 1000, timezone.utc).strftime("%Y-%m-%d")
        self._append(self.tabby_dir / f"{name}.json", rows)

    def _voice(self, day: int, n: int, clock: Iterator[float]) -> None:
        rows = []
        for k in range(0, n, 2):
            session = f"call-{day}-{k}"
            for j in range(min(2, n - k)):
                text, liked = self.answer(self.verdict())
                verb, noun = self.rnd.choice(VERBS), self.rnd.choice(NOUNS)
                q = f"day {day} call {k} question {j}: {verb} my {noun}"
                rows += [
                    {"session": session, "id": f"{session}-q{j}", "ts": next(clock),
                     "role": "user", "text": q, "confidence": 0.93},
                    {"session": session, "id": f"{session}-a{j}", "ts": next(clock),
                     "role": "assistant", "text": text},
                    {"session": session, "role": "user", "feedback": "up" if liked else "down"},
                ]  # fmt: skip
        self._append(self.voice_dir / "calls.jsonl", rows)

    def _browser(self, day: int, n: int) -> None:
        """The extension's events (plugins/browser/src/events.js captureEvent), relayed by
        the launcher the way a browser starts it: its own bare environment."""
        assert self.launcher is not None, "run `palate browser install` first"
        events = []
        for k in range(n):
            text, liked = self.answer(self.verdict())
            events.append(
                {
                    "kind": "rating", "source": "browser",
                    "prompt": f"day {day} page {k}: what is the best {self.rnd.choice(NOUNS)}?",
                    "response": text, "label": 1 if liked else -1,
                    "context": {"app": "chat.example.org"},
                }
            )  # fmt: skip
        frames = b"".join(
            _frame({"id": i, "method": m, "params": p})
            for i, (m, p) in enumerate(
                [("hello", {}), ("ingest_batch", {"events": events})], start=1
            )
        )
        bare = {k: self.env[k] for k in ("PATH", "HOME", "LANG") if k in self.env}
        out = subprocess.run(
            [str(self.launcher), CHROME_ORIGIN], input=frames, capture_output=True,
            env=bare, timeout=120, check=False,
        )  # fmt: skip
        replies = _unframe(out.stdout)
        if len(replies) != 2 or any("error" in r for r in replies):
            raise RuntimeError(f"browser host: {replies} {out.stderr.decode()[-2000:]}")


def _frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("=I", len(body)) + body


def _unframe(data: bytes) -> list[dict[str, Any]]:
    out, pos = [], 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("=I", data, pos)
        out.append(json.loads(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


# --- the daemon and the nights ----------------------------------------------------------------


@dataclass
class Night:
    """What one nightly run did, as the registry recorded it."""

    night: int
    events: int
    job: str | None
    outcome: str | None
    version: int | None
    decision: str | None
    deployed: bool
    reasons: list[str]
    auc: float | None = None
    auc_ci: tuple[float | None, float | None] = (None, None)
    length_auc: float | None = None
    accuracy: float | None = None
    heldout_ratings: int = 0
    heldout_pairs: int = 0
    deployed_auc: float | None = None
    #: The gate's enough_data check passed: it judged the model instead of holding for data.
    judged: bool = False
    seconds: float = 0.0


class Month:
    """A real daemon in the default layout, driven night by night through its own schedule."""

    def __init__(
        self,
        root: Path,
        *,
        base_model: str,
        train: dict[str, Any],
        gate: dict[str, Any],
        per_day: int,
        seed: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = root
        self.clock_file = root / "clock"
        self.env = default_layout_env(
            root, PALATE_CLOCK_FILE=str(self.clock_file), PALATE_SCHEDULE_CHECK_S="1"
        )
        self.per_day = per_day
        self.log = log
        where = resolve_in(self.env)
        self.home, self.socket = Path(where["home"]), Path(where["socket"])
        self.world = World(self.env, seed)
        # Simulated days end well before the real now: event timestamps stay valid.
        self.day0 = (int(time.time()) // DAY_S - 40) * DAY_S
        self.expected = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config(base_model, train, gate)

    def _write_config(self, base_model: str, train: dict[str, Any], gate: dict[str, Any]) -> None:
        def table(name: str, values: dict[str, Any]) -> str:
            return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())

        self.home.mkdir(parents=True, exist_ok=True)
        w = self.world
        text = (
            f"base_model = {json.dumps(base_model)}\n"
            + table("train", train)
            + table("gate", gate)
            + table("schedule", SCHEDULE)
            + table("adapters.continue", {"enabled": True, "poll_interval_s": 0.5})
            + table("adapters.tabby", {"enabled": True, "poll_interval_s": 0.5})
            + table(
                "adapters.voice",
                {"enabled": True, "dirs": [str(w.voice_dir)], "poll_interval_s": 0.5},
            )
        )
        (self.home / "config.toml").write_text(text, encoding="utf-8")

    def set_clock(self, ts: float) -> None:
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(f"{ts:.3f}\n", encoding="ascii")
        tmp.replace(self.clock_file)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PALATE, *args], env=self.env, capture_output=True, text=True, timeout=300
        )

    def client(self, timeout: float | None = 60.0) -> Any:
        from palate.wire.client import Client

        return Client(socket_path=self.socket, timeout=timeout)

    def start(self, timeout: float = 60.0) -> None:
        from palate.errors import PalateError

        self.set_clock(self.day0 + 9 * 3600)  # day 0, 09:00: today's 03:00 run long missed
        logf = open(self.root / "daemon.log", "ab")  # noqa: SIM115 - the daemon's lifetime
        self.proc = subprocess.Popen([*PALATE, "daemon"], env=self.env, stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.daemon_log()}")
            with contextlib.suppress(PalateError), self.client(5) as c:
                c.hello()
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"daemon did not start: {self.daemon_log()}")
        r = self.cli("browser", "install", "--browser", "chrome", "--json")
        if r.returncode != 0:
            raise RuntimeError(f"palate browser install: {r.stderr}")
        self.world.launcher = Path(json.loads(r.stdout)["launcher"])

    def daemon_log(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def wait(self, what: Callable[[], Any], timeout: float, message: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the daemon died while waiting for {message}")
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f} s: {message}\n{self.daemon_log()}")

    def night(self, n: int, run_timeout: float = 900.0) -> Night:
        """Day ``n``'s feedback, then the clock to 03:01 of day ``n + 1``: the nightly run."""
        day_start = self.day0 + n * DAY_S + 10 * 3600
        self.expected += self.world.write_day(n, day_start, self.per_day)
        with self.client() as c:
            self.wait(
                lambda: c.status()["events"]["total"] >= self.expected,
                180,
                f"{self.expected} events ingested by the adapters",
            )
            total = c.status()["events"]["total"]
            before = (c.status()["schedule"] or {}).get("last_result") or {}
        slot = self.day0 + (n + 1) * DAY_S + 3 * 3600
        t0 = time.monotonic()
        self.set_clock(slot + 60)

        def finished() -> dict[str, Any] | None:
            with self.client() as c:
                sched = c.status()["schedule"] or {}
            res = sched.get("last_result") or {}
            attempt = sched.get("last_attempt") or {}
            if res.get("job") and res.get("job") != before.get("job") and attempt.get("slot"):
                return {"result": res, "attempt": attempt}
            return None

        done = self.wait(finished, run_timeout, f"the nightly run of night {n}")
        res, attempt = done["result"], done["attempt"]
        if attempt.get("slot") != slot or attempt.get("job") != res.get("job"):
            raise AssertionError(f"night {n}: the run was not the scheduled one: {done}")
        out = Night(
            night=n,
            events=total,
            job=res.get("job"),
            outcome=res.get("outcome"),
            version=res.get("version"),
            decision=res.get("decision"),
            deployed=bool(res.get("deployed")),
            reasons=[],
            seconds=round(time.monotonic() - t0, 1),
        )
        if out.version is not None:
            with self.client() as c:
                meta = c.call("models", {"version": out.version})["model"]["meta"]
            _fill(out, meta)
        return out


def _fill(night: Night, meta: dict[str, Any]) -> None:
    m = meta.get("metrics") or {}
    r = m.get("ratings") or {}
    night.reasons = list(meta.get("reasons") or [])
    checks = {c.get("name"): c.get("status") for c in meta.get("checks") or []}
    night.judged = checks.get("enough_data") == "pass"
    night.auc = r.get("auc")
    night.auc_ci = (r.get("ci_low"), r.get("ci_high"))
    night.length_auc = r.get("length_auc")
    night.heldout_ratings = int(r.get("n") or m.get("n_ratings") or 0)
    night.heldout_pairs = int(m.get("n_pairs") or 0)
    night.accuracy = m.get("accuracy") if night.heldout_pairs else None
    dep = ((meta.get("deployed_metrics") or {}).get("ratings")) or {}
    night.deployed_auc = dep.get("auc")


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_night(n: Night) -> None:
    ci = f"[{fmt(n.auc_ci[0])}, {fmt(n.auc_ci[1])}]"
    reason = (n.reasons[0][:110] + "...") if n.reasons and len(n.reasons[0]) > 110 else ""
    if n.reasons and not reason:
        reason = n.reasons[0]
    print(
        f"night {n.night}: {n.events:5d} events  v{n.version}"
        f"  held-out ratings {n.heldout_ratings:4d}"
        f"  AUC {fmt(n.auc)} {ci}  length-only {fmt(n.length_auc)}"
        f"  pairs {n.heldout_pairs} acc {fmt(n.accuracy)}  deployed AUC {fmt(n.deployed_auc)}"
        f"  -> {n.decision}{' (deployed)' if n.deployed else ''}  {n.seconds:.0f} s",
        flush=True,
    )
    if reason and n.decision != "deploy":
        print(f"         {reason}", flush=True)


#: The nightly schedule: 03:00, as soon as there is new feedback, on any power, idle or not; a
#: run missed by more than an hour is not caught up (so the first simulated morning is quiet).
SCHEDULE = {
    "time": "03:00", "min_new_events": 1, "require_ac": False, "require_idle_s": 0,
    "grace_h": 1.0,
}  # fmt: skip

#: A request after the month: four answers in the liked style (first), four in the other.
RERANK = (
    "day 99 page 1: what is the best rows?",
    ["alpha bravo gamma", "delta bravo", "omega beta bravo alpha", "bravo gamma delta",
     "sigma kappa theta", "rho lambda", "kappa theta sigma rho", "lambda rho kappa"],
)  # fmt: skip
LIKED_CANDIDATES = 4


def liked_margin(rerank: dict[str, Any]) -> float:
    """Mean raw score of the liked-style candidates minus that of the others."""
    scores = rerank["scores"]
    liked, other = scores[:LIKED_CANDIDATES], scores[LIKED_CANDIDATES:]
    return sum(liked) / len(liked) - sum(other) / len(other)


#: Training and gate settings of the quick run (a tiny base model, tests/test_month_e2e.py).
QUICK_TRAIN = {
    "epochs": 2, "max_tokens": 96, "lora_layers": 2, "lora_rank": 8, "streams": 1,
    "lr": 0.001, "warmup_steps": 2, "eval_every": 1000, "patience": 1000, "members": 1,
    "min_steps": 20,
}  # fmt: skip
#: The tiny model knows no English: the probes' floor and drop do not apply, and it may learn
#: the marker perfectly; a small held-out set is enough to judge (fewer events per night).
QUICK_GATE = {
    "probe_floor": 0.0, "probe_max_drop": 1.0, "suspicious_accuracy": 1.01, "max_jump": 1.0,
    "min_heldout_ratings": 20, "min_rating_class": 6,
}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from palate.errors import PalateError

    root = Path(tempfile.mkdtemp(prefix="palate-month-", dir="/tmp"))
    train = dict(QUICK_TRAIN) if args.quick else {}
    gate = dict(QUICK_GATE) if args.quick else {}
    month = Month(
        root, base_model=args.base_model, train=train, gate=gate, per_day=args.per_day,
        seed=args.seed,
    )  # fmt: skip
    nights: list[Night] = []
    t0 = time.monotonic()
    refused = ""
    try:
        month.start()
        print(f"daemon on {month.socket} (home {month.home}); base model {args.base_model}")
        for n in range(args.nights):
            nights.append(month.night(n))
            print_night(nights[-1])
        with month.client() as c:
            newest = max(
                (m["version"] for m in c.call("models")["models"] if m["state"] == "deployed"),
                default=None,
            )
            try:
                r: dict[str, Any] | None = c.rerank(*RERANK)
            except PalateError as e:  # no night deployed a model: say so, keep the report
                r, refused = None, e.message
        if r is not None:
            print(
                f"rerank: version {r['version']} (deployed {newest}), order {r['order']}, "
                f"liked-style candidates score {liked_margin(r):+.3f} above the others on "
                "average"
            )
        else:
            print(f"rerank: refused ({refused[:200]})")
    finally:
        rc = month.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    report = {
        "base_model": args.base_model,
        "per_day": args.per_day,
        "nights": [asdict(n) for n in nights],
        "rerank": (
            {
                "version": r["version"],
                "order": r["order"],
                "deployed": newest,
                "liked_margin": liked_margin(r),
            }
            if r is not None
            else {"refused": refused, "deployed": newest}
        ),
        "daemon_exit": rc,
        "seconds": round(time.monotonic() - t0, 1),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nights", type=int, default=5)
    ap.add_argument("--per-day", type=int, default=250, help="feedback events per day")
    ap.add_argument("--base-model", default="builtin:smollm2-135m")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the test's settings: small training, gate sized for a tiny model",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temp machine (logs, store)")
    ap.add_argument("--json", default="", help="write the report here")
    args = ap.parse_args(argv)
    report = run(args)
    print(f"total {report['seconds']:.0f} s; daemon exit {report['daemon_exit']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
