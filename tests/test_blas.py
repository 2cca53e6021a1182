"""The Linux BLAS fix: OpenBLAS must be loaded before mlx.core, and the report must say so.

Each case runs in a fresh interpreter, because whether the fix can apply depends on what the
process has imported and mapped before (this pytest process has long imported MLX).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from palate.model.blas import BlasOutcome, bundled_reference_blas, ensure_fast_blas, find_openblas

OPENBLAS = find_openblas()
needs_fix = pytest.mark.skipif(
    not sys.platform.startswith("linux") or bundled_reference_blas() is None or OPENBLAS is None,
    reason="needs Linux, the mlx-cpu wheel (reference BLAS) and a system OpenBLAS",
)

PROBE = """
import json, sys
{before}
from palate.model.blas import ensure_fast_blas, blas_report
status = ensure_fast_blas()
again = ensure_fast_blas()
report = blas_report(size=128, budget_s=0.02)
maps = open("/proc/self/maps").read()
print(json.dumps({{
    "outcome": status.outcome.value,
    "library": status.library,
    "detail": status.detail,
    "same_object": again is status,
    "report": report.as_dict(),
    "openblas_mapped": "libopenblas" in maps,
}}))
"""


def probe(before: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run PROBE in a fresh interpreter; ``before`` runs first (e.g. an early mlx import)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PALATE_OPENBLAS")}
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@needs_fix
def test_applied_before_mlx_import() -> None:
    out = probe()
    assert out["outcome"] == BlasOutcome.APPLIED.value
    assert out["library"] == OPENBLAS
    assert out["openblas_mapped"]
    assert out["same_object"]  # idempotent: later calls return the first result
    assert out["report"]["blas"] == "openblas"
    assert out["report"]["status"]["outcome"] == "applied"
    assert out["report"]["gflops"] > 0


@needs_fix
def test_too_late_after_mlx_import_is_reported() -> None:
    out = probe(before="import mlx.core")
    assert out["outcome"] == BlasOutcome.TOO_LATE.value
    assert "imported before" in out["detail"]
    assert not out["openblas_mapped"]
    assert out["report"]["blas"] == "reference"


@needs_fix
def test_ld_preload_is_recognised() -> None:
    assert OPENBLAS is not None
    out = probe(env={"LD_PRELOAD": OPENBLAS})
    assert out["outcome"] == BlasOutcome.ALREADY_LOADED.value
    assert out["report"]["blas"] == "openblas"


@needs_fix
def test_disabled_by_environment() -> None:
    out = probe(env={"PALATE_OPENBLAS": "0"})
    assert out["outcome"] == BlasOutcome.DISABLED.value
    assert not out["openblas_mapped"]
    assert out["report"]["blas"] == "reference"


@needs_fix
def test_unloadable_override_fails_softly() -> None:
    out = probe(env={"PALATE_OPENBLAS": "/nonexistent/libopenblas.so.0"})
    assert out["outcome"] == BlasOutcome.FAILED.value
    assert out["library"] == "/nonexistent/libopenblas.so.0"
    assert out["report"]["blas"] == "reference"  # MLX still works, just slowly


@needs_fix
def test_model_modules_apply_the_fix_on_import() -> None:
    """Importing the package's MLX modules first must not pre-empt the fix."""
    for module in ("palate.model.base_model", "palate.model.gguf_loader"):
        out = probe(before=f"import {module}")
        assert out["outcome"] == BlasOutcome.APPLIED.value, module
        assert out["openblas_mapped"], module


def test_status_in_this_process_is_stable_and_serialisable() -> None:
    status = ensure_fast_blas()
    assert ensure_fast_blas() is status
    assert isinstance(status.outcome, BlasOutcome)
    assert status.detail


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="macOS/other: nothing to fix")
def test_not_needed_off_linux() -> None:
    assert ensure_fast_blas().outcome is BlasOutcome.NOT_NEEDED
