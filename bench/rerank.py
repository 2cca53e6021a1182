"""Best-of-N latency through the daemon vs in-process vs the naive path, in one run.

Embedded model (SmolLM2-135M), a ~200-token prompt and N = 8 candidates of ~64 tokens:

- **socket**: `Client().rerank` against a real daemon (its scoring thread, micro-batching,
  shared prompt);
- **in-process**: the same `Scorer` called directly (no socket, no queue): the anchor for
  the socket overhead (goal <= 5%);
- **naive**: the 8 full prompt+candidate sequences in one right-padded batch, without
  prompt sharing (goal: shared-prompt speedup >= 2.5x);
- **8 clients**: throughput and latency with 8 concurrent socket clients.

The reward model is the embedded base with a freshly initialised LoRA + head, registered
and deployed in a temp PALATE_HOME: speed does not depend on what the weights learned.

    .venv/bin/python bench/rerank.py [--repeats 10] [--seconds 20]
"""

from __future__ import annotations

from palate.model.blas import ensure_fast_blas

ensure_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from palate.errors import PalateError  # noqa: E402
from palate.model import artifacts  # noqa: E402
from palate.model.base_model import load_base_model  # noqa: E402
from palate.model.reward_model import LoraConfig, RewardModel, encode_prompt_responses  # noqa: E402
from palate.model.scoring import Calibration  # noqa: E402
from palate.paths import resolve  # noqa: E402
from palate.store.database import Store  # noqa: E402
from palate.store.keys import KeyManager  # noqa: E402
from palate.wire.client import Client  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh_harmless_dev.jsonl"
MAX_TOKENS = 384


def workload(tokenizer: object) -> tuple[str, list[str]]:
    """The HH prompt closest to 200 tokens, and 8 responses cut to ~64 tokens."""
    rows = [json.loads(line) for line in DATA.open()]
    enc = tokenizer.encode  # type: ignore[attr-defined]
    prompt = min((r["prompt"] for r in rows[:400]), key=lambda p: abs(len(enc(p)) - 200))
    cands = []
    for r in rows[400:]:
        for text in (r["chosen"], r["rejected"]):
            words = text.split()
            while words and len(enc(" ".join(words))) > 64:
                words = words[:-4]
            if len(enc(" ".join(words))) >= 48:
                cands.append(" ".join(words))
        if len(cands) >= 8:
            return prompt, cands[:8]
    raise SystemExit("not enough responses in the data file")


SOCKET_PROBE = """
import json, sys, time
from palate.wire.client import Client
job = json.load(sys.stdin)
with Client(sys.argv[1], timeout=300) as c:
    c.rerank(job["prompt"], job["cands"])  # loads the model in the daemon
    out = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        c.rerank(job["prompt"], job["cands"])
        out.append(time.perf_counter() - t)
print(json.dumps(out))
"""


def timed(fn: object, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def ms(xs: list[float], q: float = 0.5) -> float:
    return 1000 * float(np.quantile(xs, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0, help="8-client phase length")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    env = dict(os.environ, PALATE_HOME=str(home), PALATE_KEY_BACKEND="file")
    os.environ.update(PALATE_HOME=str(home), PALATE_KEY_BACKEND="file")
    daemon = None
    try:
        base = load_base_model("builtin:smollm2-135m")
        prompt, cands = workload(base.tokenizer)
        p_ids, r_ids = encode_prompt_responses(base.tokenizer, prompt, cands)
        print(f"prompt {len(p_ids)} tokens, {len(cands)} candidates of "
              f"{min(map(len, r_ids))}-{max(map(len, r_ids))} tokens")

        # A deployed model: fresh LoRA + head on the embedded base.
        paths = resolve(home)
        paths.ensure()
        rm = RewardModel(base.model, LoraConfig(layers=4), seed=0)
        cfg = artifacts.build_config(base, LoraConfig(layers=4), MAX_TOKENS, Calibration())
        blob = artifacts.to_bytes(artifacts.artifact_from_model(rm, cfg))
        store = Store(paths.db_file, KeyManager(paths, "file").create())
        v = store.add_model(base_model="builtin:smollm2-135m", artifact=blob,
                            meta={"decision": "deploy"})
        store.deploy_model(v, how="manual", reason="benchmark")
        store.close()

        # In-process anchor and the naive path, on the same artifact.
        loaded = artifacts.load_model(artifacts.from_bytes(blob), base)
        scorer = loaded.scorer()
        scorer.score(prompt, cands)  # warm-up
        inproc = timed(lambda: scorer.score(prompt, cands), args.repeats)
        seqs = [np.concatenate([p_ids, r]) for r in r_ids]
        arr = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
        for k, s in enumerate(seqs):
            arr[k, : len(s)] = s
        tokens, lengths = mx.array(arr), mx.array([len(s) for s in seqs])

        def naive() -> None:
            mx.eval(loaded.model.reference_rewards(tokens, lengths))

        naive()
        naive_t = timed(naive, args.repeats)

        daemon = subprocess.Popen([sys.executable, "-m", "palate.cli", "daemon"], env=env,
                                  stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                with Client(home) as c:
                    c.hello()
                break
            except PalateError:
                time.sleep(0.1)
        # Time the socket from a process that never imported MLX: this process's own MLX and
        # OpenBLAS threads must not compete with the daemon for the 2 cores while it works.
        probe = subprocess.run(
            [sys.executable, "-c", SOCKET_PROBE, str(home), str(args.repeats)],
            input=json.dumps({"prompt": prompt, "cands": cands}), capture_output=True,
            text=True, check=True, env=env,
        )
        sock = json.loads(probe.stdout.strip().splitlines()[-1])

        lat: list[float] = []
        done = [0]
        errors: dict[str, int] = {}
        stop = time.monotonic() + args.seconds

        def client() -> None:
            with Client(home, timeout=120) as c:
                while time.monotonic() < stop:
                    t = time.perf_counter()
                    try:
                        c.rerank(prompt, cands, timeout_ms=300_000)
                    except PalateError as e:  # busy past the deadline is a result, not a crash
                        errors[e.code] = errors.get(e.code, 0) + 1
                        continue
                    lat.append(time.perf_counter() - t)
                    done[0] += 1

        threads = [threading.Thread(target=client) for _ in range(8)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0

        print(f"\n{'path':34s} {'p50 ms':>9s} {'p90 ms':>9s}")
        for name, xs in (("in-process Scorer (anchor)", inproc), ("socket rerank", sock),
                         ("naive, no prompt sharing", naive_t)):
            print(f"{name:34s} {ms(xs):9.1f} {ms(xs, 0.9):9.1f}")
        overhead = statistics.median(sock) / statistics.median(inproc) - 1
        speedup = statistics.median(naive_t) / statistics.median(inproc)
        print(f"\nsocket overhead vs in-process: {overhead:+.1%} (goal <= +5%)")
        print(f"shared-prompt speedup vs naive: {speedup:.2f}x (goal >= 2.5x)")
        if lat:
            print(f"8 clients: {done[0] / wall:.2f} reranks/s, p50 {ms(lat):.0f} ms, "
                  f"p99 {ms(lat, 0.99):.0f} ms over {wall:.0f} s; errors {errors or 'none'}")
        else:
            print(f"8 clients: no rerank finished in {wall:.0f} s; errors {errors}")
        print(f"load average {os.getloadavg()}")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
