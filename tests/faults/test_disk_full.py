"""A full disk under the daemon: ``storage_full``, the daemon stays up, nothing is damaged, and
ingest resumes once there is room again.

Two ways to run out of room, because SQLite reports them differently:

* ``tmpfs``: the data directory on a 6 MiB tmpfs (needs root, as in CI; skipped where
  mounting is not permitted). The OS says ENOSPC: SQLITE_FULL on the WAL append. A filler
  file on the same tmpfs is deleted to give the room back. Also: a daemon started on the
  full disk refuses with ``storage_full`` and leaves every file as it was.
* ``rlimit``: RLIMIT_FSIZE on the daemon process (always runs). The OS says EFBIG, which
  SQLite reports as a generic disk I/O error; the room comes back by raising the limit of
  the running daemon (prlimit).

Each checks that a client gets ``storage_full`` (never a crash or a vague error), that
``status`` still answers, that every acknowledged event is stored under its seq with
``integrity_check`` ok, and that the store accepts events again afterwards.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import DaemonProc, daemon_env
from palate.errors import PalateError

from .helpers import (
    NO_SCHEDULE,
    assert_acked_present,
    fingerprint,
    rating,
    read_store,
    run_daemon_once,
)

FILE_LIMIT = 1_500_000  # bytes, RLIMIT_FSIZE of the daemon in the rlimit variant


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(mode=0o700)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "palate-test", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        # Not a CI defect: the rlimit variant covers the same code path and always runs.
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); rlimit variant covers it")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_until_full(d: DaemonProc, acked: dict[str, int], tag: str) -> PalateError:
    """Ingest ~40 KB batches until the daemon answers with an error; return that error."""
    with d.client() as c:
        for i in range(2000):
            batch = [rating(f"{tag}{i}-{k}", size=4000) for k in range(10)]
            try:
                res = c.ingest_batch(batch)
            except PalateError as e:
                return e
            acked.update((r["id"], r["seq"]) for r in res["results"])
    raise AssertionError("80 MB went in without the disk ever filling up")


def assert_full_and_serving(d: DaemonProc, err: PalateError, acked: dict[str, int]) -> None:
    assert err.code == "storage_full", f"{err.code}: {err.message}"
    assert "Free some space" in err.message, err.message
    assert d.alive(), "the daemon died when the disk filled up"
    with d.client() as c:
        for k in range(3):  # still full: the same clear answer each time, no crash
            with pytest.raises(PalateError) as again:
                c.ingest_batch([rating(f"again{k}-{i}", size=4000) for i in range(10)])
            assert again.value.code == "storage_full", again.value.message
        st = c.status()
        assert st["events"]["total"] == len(acked), "status must keep answering"
    assert d.alive()


def resume_and_check(d: DaemonProc, acked: dict[str, int]) -> None:
    with d.client() as c:
        res = c.ingest_batch([rating(f"after-{i}", size=4000) for i in range(10)])
        assert res["accepted"] == 10
        acked.update((r["id"], r["seq"]) for r in res["results"])
        assert c.status()["events"]["total"] == len(acked)
    assert d.terminate() == 0
    assert_acked_present(read_store(d.paths), acked, "after the disk was full")


def test_disk_full_on_a_small_tmpfs(home: Path) -> None:
    (home / "config.toml").write_text(NO_SCHEDULE)
    env = daemon_env(home)
    with small_tmpfs(home / "data", "6m") as data:
        d = DaemonProc(home, env)
        try:
            filler = data / "filler"
            filler.write_bytes(b"\0" * 3_500_000)
            d.start()
            acked: dict[str, int] = {}
            err = fill_until_full(d, acked, "t")
            assert len(acked) > 100
            assert_full_and_serving(d, err, acked)
            filler.unlink()  # room again, without restarting anything
            resume_and_check(d, acked)  # stops it: the WAL is folded in, -wal/-shm removed
            assert not (data / "palate.db-shm").exists()

            # A start on a disk that is already full: a clear refusal, nothing touched.
            with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
            with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 512)
            before = fingerprint(data)
            r = run_daemon_once(env)
            assert r.returncode == 5, r.stderr
            assert "palate: error:" in r.stderr and "Free some space" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr, r.stderr
            after = fingerprint(data)
            assert {k: after.get(k) for k in before} == before, "a file changed"
            filler.unlink()
            d = DaemonProc(home, env).start()
            with d.client() as c:
                assert c.status()["events"]["total"] == len(acked)
            assert d.terminate() == 0
            assert_acked_present(read_store(d.paths), acked, "after a start on a full disk")
            print(
                f"tmpfs: {len(acked)} events acked; full: {err.message}; "
                f"start when full: {r.stderr}"
            )
        finally:
            if d.alive():
                d.kill9()


def test_new_home_on_a_full_disk_is_a_clear_error(home: Path) -> None:
    """The very first start on a full disk (no room for the key), then on one with room for
    the key but not the new database: each a clear ``storage_full``, no traceback, and the
    start after that, with room, just works."""
    env = daemon_env(home)
    with small_tmpfs(home / "data", "1m") as data:
        filler = data / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        r = run_daemon_once(env)
        assert r.returncode == 5, r.stderr
        assert "Free some space" in r.stderr and "Traceback" not in r.stderr, r.stderr
        left = sorted(p.name for p in data.iterdir() if p.name != "daemon.lock")  # empty lock
        assert left == ["filler"], "a half key was left"

        os.truncate(filler, filler.stat().st_size - 40 * 1024)  # room for the key only
        r = run_daemon_once(env)
        assert r.returncode == 5, r.stderr
        assert "Free some space" in r.stderr and "Traceback" not in r.stderr, r.stderr

        filler.unlink()
        d = DaemonProc(home, env).start()
        with d.client() as c:
            c.ingest(rating("first"))
            assert c.status()["events"]["total"] == 1
        assert d.terminate() == 0
        assert read_store(d.paths).integrity == "ok"
        print(f"new home on a full disk: {r.stderr}")


def _limit_file_size() -> None:
    """In the daemon child before exec: a file-size limit it may raise later (soft only)."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, hard))


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="prlimit is Linux-only")
def test_file_size_limit_reached(home: Path) -> None:
    (home / "config.toml").write_text(NO_SCHEDULE)
    preexec: Callable[[], None] = _limit_file_size
    d = DaemonProc(home, daemon_env(home), preexec_fn=preexec).start()
    acked: dict[str, int] = {}
    err = fill_until_full(d, acked, "l")
    assert len(acked) > 100
    assert_full_and_serving(d, err, acked)
    assert d.proc is not None
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # room again
    resume_and_check(d, acked)
    print(f"RLIMIT_FSIZE {FILE_LIMIT}: {len(acked)} events acked; full: {err.message}")
