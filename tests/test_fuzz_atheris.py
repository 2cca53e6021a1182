"""A short coverage-guided fuzzing run of every harness in fuzz/ (atheris / libFuzzer).

Each harness first replays its checked-in corpus (seeds and the ``regress-*`` reproducers of
bugs found so far), then mutates for ``PALATE_FUZZ_SECONDS`` (default 20) seconds. Any
crash, hang (> 20 s for one input), RSS over 2 GiB, or broken invariant (see the harness
docstrings) fails the test and leaves the reproducer in the test's tmp dir. The long run is
``make fuzz``. atheris has wheels for Linux x86_64 only: elsewhere these tests skip, but
under CI (where ``make`` installs it) its absence fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, missing

FUZZ = REPO / "fuzz"
HARNESSES = sorted(p.stem for p in FUZZ.glob("fuzz_*.py"))
SECONDS = int(os.environ.get("PALATE_FUZZ_SECONDS", "20"))
FLAGS = ["-max_len=8192", "-timeout=20", "-rss_limit_mb=2048", "-print_final_stats=1"]


@pytest.fixture(autouse=True)
def _atheris() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        missing("atheris is not installed (pip install -e '.[dev]' on Linux x86_64)")


def run_harness(harness: str, tmp: Path, *args: str, timeout: float) -> str:
    corpus = FUZZ / "corpus" / harness.removeprefix("fuzz_")
    work = tmp / "corpus"
    work.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        str(FUZZ / f"{harness}.py"),
        str(work),
        str(corpus),
        *FLAGS,
        *args,
        f"-artifact_prefix={tmp}/",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        # libFuzzer exits without atexit handlers: remove this run's store.
        for d in Path("/dev/shm").glob(f"palate-fuzz-{proc.pid}-*"):
            shutil.rmtree(d, ignore_errors=True)
    crashes = sorted(
        p.name for p in tmp.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))
    )
    assert proc.returncode == 0 and not crashes, (
        f"{harness} failed (rc {proc.returncode}, reproducers {crashes} in {tmp}):\n"
        + "\n".join(line for line in out.splitlines() if "Instrumenting" not in line)[-6000:]
    )
    return out


def figures(out: str) -> dict[str, int]:
    found = {k: int(v) for k, v in re.findall(r"^stat::(\w+):\s+(\d+)", out, flags=re.M)}
    done = re.findall(r"^#\d+\s+DONE\s+cov: (\d+) ft: (\d+)", out, flags=re.M)
    if done:
        found["cov"], found["ft"] = map(int, done[-1])
    heap = re.findall(r"largest heap growth for one input (\d+) bytes", out)
    if heap:
        found["peak_heap_bytes"] = int(heap[-1])
    return found


@pytest.mark.parametrize("harness", HARNESSES)
def test_short_fuzz_run(harness: str, tmp_path: Path) -> None:
    """Replays the checked-in corpus (seeds and every ``regress-*`` reproducer), then fuzzes."""
    corpus = list((FUZZ / "corpus" / harness.removeprefix("fuzz_")).iterdir())
    assert len(corpus) >= 20, f"the {harness} corpus is nearly empty ({len(corpus)} files)"
    assert any(p.name.startswith("regress-") for p in corpus)
    out = run_harness(harness, tmp_path, f"-max_total_time={SECONDS}", timeout=SECONDS + 120)
    assert "INITED" in out  # the whole corpus ran without a failure
    got = figures(out)
    print(f"{harness}: {got}")
    assert got.get("number_of_executed_units", 0) > 100, got
