"""Make MLX use a fast BLAS on Linux, and report which BLAS is in use.

The ``mlx[cpu]`` wheel for Linux links its own renamed copy of the *reference* (netlib) BLAS.
Its fp32 matmul runs at a few GFLOP/s, 20-40x slower than OpenBLAS on the same machine, and
every linear layer of the reward model is a matmul. ``LD_LIBRARY_PATH`` cannot fix this: the
wheel asks for ``libblas-<hash>.so.3`` by its own name. What works is putting OpenBLAS into
the process's *global* symbol scope before ``libmlx.so`` is loaded: the dynamic linker then
resolves ``cblas_sgemm`` & co. to OpenBLAS (global scope is searched before the library's own
dependencies). ``ctypes.CDLL(path, mode=RTLD_GLOBAL)`` does exactly that, in-process, so no
re-exec with ``LD_PRELOAD`` is needed; measured speed is the same as with ``LD_PRELOAD``.

It only works if it happens before the first ``import mlx.core``. Every module of the package
that imports MLX therefore starts with::

    from palate.model.blas import ensure_fast_blas

    ensure_fast_blas()

    import mlx.core as mx  # noqa: E402

Environment knobs (for benchmarks and odd setups, not for normal use):

- ``PALATE_OPENBLAS=0`` disables the fix (to measure MLX with its bundled BLAS);
- ``PALATE_OPENBLAS=/path/to/libopenblas.so.0`` uses that library instead of searching.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.metadata
import os
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BlasOutcome",
    "BlasReport",
    "BlasStatus",
    "blas_report",
    "ensure_fast_blas",
    "find_openblas",
    "measure_matmul_gflops",
]

ENV_VAR = "PALATE_OPENBLAS"

# Where Debian/Ubuntu (multiarch), Fedora/RHEL and Arch put OpenBLAS. The pthread variant
# comes first: MLX calls BLAS from its own worker thread, and the pthread build scales over
# cores without needing an OpenMP runtime in the process.
_LIB_DIRS = (
    "/usr/lib/{multiarch}/openblas-pthread",
    "/usr/lib/{multiarch}/openblas-openmp",
    "/usr/lib/{multiarch}/openblas-serial",
    "/usr/lib/{multiarch}",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_LIB_NAMES = ("libopenblas.so.0", "libopenblasp.so.0", "libopenblas.so")


class BlasOutcome(str, enum.Enum):
    """What :func:`ensure_fast_blas` did, as a stable string for logs and ``palate doctor``."""

    APPLIED = "applied"  # we loaded OpenBLAS globally before MLX
    ALREADY_LOADED = "already_loaded"  # OpenBLAS was already in the process (e.g. LD_PRELOAD)
    TOO_LATE = "too_late"  # mlx.core was imported first: MLX keeps the reference BLAS
    NOT_FOUND = "openblas_not_found"  # the wheel needs it but the system has no OpenBLAS
    NOT_NEEDED = "not_needed"  # macOS (Accelerate), or an MLX build without reference BLAS
    DISABLED = "disabled"  # PALATE_OPENBLAS=0
    FAILED = "failed"  # OpenBLAS exists but dlopen refused it


@dataclass(frozen=True)
class BlasStatus:
    """The result of :func:`ensure_fast_blas`: outcome, the library involved and why."""

    outcome: BlasOutcome
    library: str | None
    detail: str

    @property
    def fast(self) -> bool:
        """True when MLX's matmuls go (or will go) through an optimized BLAS."""
        return self.outcome in (BlasOutcome.APPLIED, BlasOutcome.ALREADY_LOADED) or (
            self.outcome is BlasOutcome.NOT_NEEDED
        )


@dataclass(frozen=True)
class BlasReport:
    """What ``palate doctor`` shows: the BLAS MLX uses and how fast fp32 matmul runs."""

    status: BlasStatus
    blas: str  # "openblas", "reference", "accelerate", "system" or "unknown"
    gflops: float  # best fp32 matmul rate measured, GFLOP/s
    matmul_size: int
    device: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the enum becomes its string value)."""
        out = asdict(self)
        out["status"]["outcome"] = self.status.outcome.value
        return out


_lock = threading.Lock()
_status: BlasStatus | None = None


def ensure_fast_blas() -> BlasStatus:
    """Load OpenBLAS into the global symbol scope if MLX would otherwise use reference BLAS.

    Idempotent and cheap after the first call (the first result is cached), safe to call from
    every module that imports MLX. Never raises: a missing or broken OpenBLAS only makes MLX
    slower, which is reported through the returned status instead of stopping the daemon.
    """
    global _status
    with _lock:
        if _status is None:
            _status = _decide_and_apply()
        return _status


def _decide_and_apply() -> BlasStatus:
    if not sys.platform.startswith("linux"):
        return BlasStatus(BlasOutcome.NOT_NEEDED, None, f"{sys.platform}: MLX uses the system BLAS")
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() in ("0", "no", "off", "false"):
        return BlasStatus(BlasOutcome.DISABLED, None, f"{ENV_VAR}={setting}")
    loaded = _mapped_openblas()
    if loaded is not None:
        return BlasStatus(
            BlasOutcome.ALREADY_LOADED, loaded, "OpenBLAS already mapped (LD_PRELOAD or earlier)"
        )
    reference = bundled_reference_blas()
    if reference is None:
        return BlasStatus(BlasOutcome.NOT_NEEDED, None, "this MLX build bundles no reference BLAS")
    if "mlx.core" in sys.modules:
        return BlasStatus(
            BlasOutcome.TOO_LATE,
            None,
            "mlx.core was imported before palate.model.blas.ensure_fast_blas(); "
            f"MLX uses the slow bundled {Path(reference).name}",
        )
    path = setting or find_openblas()
    if not path:
        return BlasStatus(
            BlasOutcome.NOT_FOUND,
            None,
            "MLX bundles reference BLAS and no OpenBLAS was found; "
            "install it (Debian/Ubuntu: apt install libopenblas0-pthread) for ~30x faster matmul",
        )
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return BlasStatus(BlasOutcome.FAILED, path, f"could not load OpenBLAS: {exc}")
    return BlasStatus(BlasOutcome.APPLIED, path, "OpenBLAS loaded globally before mlx.core")


def find_openblas() -> str | None:
    """Path of a system OpenBLAS shared library, or None.

    Searches the usual distribution directories (Debian multiarch first) rather than relying
    on ``ctypes.util.find_library``, which runs ``ldconfig``/``gcc`` and can take a second.
    """
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    for template in _LIB_DIRS:
        directory = Path(template.format(multiarch=multiarch))
        for name in _LIB_NAMES:
            candidate = directory / name
            if candidate.is_file():
                return str(candidate)
    return None


def bundled_reference_blas() -> str | None:
    """The reference BLAS library shipped inside the ``mlx-cpu`` wheel, if installed.

    Read from the distribution's file list, so MLX need not (and must not) be imported yet.
    """
    try:
        dist = importlib.metadata.distribution("mlx-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        name = file.name
        if name.startswith("libblas") and ".so" in name:
            return str(dist.locate_file(file))
    return None


def _mapped_openblas() -> str | None:
    """The OpenBLAS file mapped into this process, if any (Linux ``/proc/self/maps``)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and "libopenblas" in Path(parts[5]).name:
            return parts[5]
    return None


def _blas_in_use(status: BlasStatus) -> str:
    if sys.platform == "darwin":
        return "accelerate"
    if _mapped_openblas() is not None:
        return "openblas"
    if bundled_reference_blas() is not None:
        return "reference"
    return "unknown" if status.outcome is not BlasOutcome.NOT_NEEDED else "system"


def measure_matmul_gflops(size: int = 512, budget_s: float = 0.4) -> float:
    """Best fp32 ``size x size`` matmul rate in GFLOP/s within about ``budget_s`` seconds.

    Best-of rather than mean: other processes on a small machine only ever slow a run down,
    so the fastest run is the best estimate of what the BLAS can do.
    """
    ensure_fast_blas()
    import mlx.core as mx

    a = mx.random.normal((size, size), dtype=mx.float32)
    b = mx.random.normal((size, size), dtype=mx.float32)
    mx.eval(a, b, a @ b)  # warm-up: thread pools, first-touch pages
    flops = 2.0 * size**3
    best = 0.0
    start = time.perf_counter()
    runs = 0
    while runs < 2 or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = max(best, flops / max(time.perf_counter() - t0, 1e-9) / 1e9)
        runs += 1
        if runs >= 200:
            break
    return best


def blas_report(size: int = 512, budget_s: float = 0.4) -> BlasReport:
    """The BLAS MLX uses in this process and its measured fp32 matmul speed (~0.5 s)."""
    status = ensure_fast_blas()
    gflops = measure_matmul_gflops(size, budget_s)
    import mlx.core as mx

    return BlasReport(
        status=status,
        blas=_blas_in_use(status),
        gflops=gflops,
        matmul_size=size,
        device=str(mx.default_device()),
    )
