"""A process holding the data key leaves no core dump and admits no debugger (issue 14 item
10): ``keys.protect_process``, called by the daemon and by every training run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DaemonProc

CHECK = """
import ctypes, resource
from palate.store.keys import protect_process
done = protect_process()
libc = ctypes.CDLL(None, use_errno=True)
print(libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)[0], len(done))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux")
def test_protect_process_disables_core_dumps_and_ptrace() -> None:
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    dumpable, core, done = map(int, r.stdout.split())
    assert dumpable == 0, "PR_GET_DUMPABLE must be 0: no ptrace attach, no /proc/<pid>/mem"
    assert core == 0 and done == 2


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc")
def test_the_daemon_protects_itself(palate_daemon: DaemonProc) -> None:
    pid = palate_daemon.proc.pid  # type: ignore[union-attr]
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    log = (palate_daemon.paths.log_dir / "daemon.log").read_text()
    assert "key memory protection: no core dumps, not dumpable" in log
