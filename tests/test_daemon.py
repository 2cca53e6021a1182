"""The real daemon over its real socket: handshake, every method, lifecycle."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PALATE, DaemonProc, daemon_env
from palate import API_LEVEL, __version__
from palate.errors import PalateError
from palate.wire.client import AsyncClient, Client


def pair(i: int, **kw: object) -> dict[str, object]:
    ev: dict[str, object] = {
        "kind": "pair",
        "source": "test",
        "prompt": f"p{i}",
        "chosen": f"good {i}",
        "rejected": f"bad {i}",
    }
    ev.update(kw)
    return ev


def test_hello(palate_daemon: DaemonProc) -> None:
    with palate_daemon.client() as c:
        h = c.hello()
    assert h["name"] == "palate" and h["version"] == __version__
    assert h["api_level"] == API_LEVEL
    assert {"hello", "ingest", "ingest_batch", "status", "forget", "export", "cursors"} <= set(
        h["methods"]
    )
    assert h["limits"]["max_frame_bytes"] > 0


def test_ingest_each_kind_and_idempotent_resend(palate_daemon: DaemonProc) -> None:
    events = [
        pair(1, id="k-pair"),
        {
            "id": "k-rating",
            "kind": "rating",
            "source": "test",
            "prompt": "p",
            "response": "r",
            "label": 1,
        },
        {
            "id": "k-score",
            "kind": "rating",
            "source": "test",
            "prompt": "p",
            "response": "r2",
            "score": 0.8,
        },
        {
            "id": "k-edit",
            "kind": "edit",
            "source": "test",
            "prompt": "p",
            "original": "a",
            "edited": "b",
        },
        {
            "id": "k-rank",
            "kind": "ranking",
            "source": "test",
            "prompt": "p",
            "responses": ["x", "y", "z"],
        },
    ]
    with palate_daemon.client() as c:
        first = [c.ingest(e) for e in events]
        assert [r["duplicate"] for r in first] == [False] * 5
        again = [c.ingest(e) for e in events]
        assert [r["duplicate"] for r in again] == [True] * 5
        assert [r["seq"] for r in again] == [r["seq"] for r in first]
        st = c.status()
    assert st["events"]["total"] == 5
    assert st["events"]["by_kind"] == {"pair": 1, "rating": 2, "edit": 1, "ranking": 1}


def test_invalid_event_names_the_field_and_daemon_stays_up(palate_daemon: DaemonProc) -> None:
    with palate_daemon.client() as c:
        with pytest.raises(PalateError) as ei:
            c.ingest(pair(1, chosen="same", rejected="same"))
        assert ei.value.code == "invalid_event"
        assert ei.value.details["errors"][0]["field"] == "rejected"
        with pytest.raises(PalateError) as ei:
            c.call("ingest", {"event": pair(1), "extra": 1})
        assert ei.value.code == "invalid_request"
        with pytest.raises(PalateError) as ei:
            c.call("ingest", {})
        assert ei.value.code == "invalid_request"
        with pytest.raises(PalateError) as ei:
            c.call("rerank_everything", {})
        assert ei.value.code == "unknown_method"
        assert c.hello()["name"] == "palate"


def test_batch_is_atomic_and_commits_cursor(palate_daemon: DaemonProc) -> None:
    with palate_daemon.client() as c:
        with pytest.raises(PalateError) as ei:
            c.ingest_batch(
                [pair(1), pair(2, prompt=""), pair(3, chosen=7)],
                cursor={"adapter": "a", "key": "f", "value": 1},
            )
        errs = ei.value.details["errors"]
        assert {e["field"] for e in errs} == {"events[1].prompt", "events[2].chosen"}
        assert c.status()["events"]["total"] == 0
        assert c.cursors("a") == {}, "a rejected batch must not move the cursor"
        res = c.ingest_batch(
            [pair(i) for i in range(10)],
            cursor={"adapter": "a", "key": "f", "value": {"offset": 123}},
        )
        assert res["accepted"] == 10 and res["duplicates"] == 0
        assert c.cursors("a") == {"f": {"offset": 123}}
        res = c.ingest_batch([pair(i) for i in range(5, 15)])
        assert res["accepted"] == 5 and res["duplicates"] == 5
        with pytest.raises(PalateError) as ei:
            c.ingest_batch([pair(i) for i in range(2001)])
        assert ei.value.code == "too_large"
        with pytest.raises(PalateError) as ei:
            c.call("ingest_batch", {"events": []})
        assert ei.value.code == "invalid_request"


def test_concurrent_clients(palate_daemon: DaemonProc) -> None:
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            with palate_daemon.client() as c:
                for i in range(50):
                    c.ingest(pair(w * 1000 + i, source=f"w{w}"))
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with palate_daemon.client() as c:
        st = c.status()
    assert st["events"]["total"] == 400
    assert st["events"]["by_source"] == {f"w{w}": 50 for w in range(8)}


def test_async_client_pipelines(palate_daemon: DaemonProc) -> None:
    async def run() -> list[dict[str, object]]:
        c = await AsyncClient(socket_path=palate_daemon.paths.socket).connect()
        try:
            return list(await asyncio.gather(*(c.ingest(pair(i)) for i in range(60))))
        finally:
            await c.close()

    results = asyncio.run(run())
    assert len({r["seq"] for r in results}) == 60


def test_export_forget_round_trip(palate_daemon: DaemonProc, tmp_path: Path) -> None:
    out = tmp_path / "export.jsonl"
    with palate_daemon.client() as c:
        c.ingest_batch([pair(i, source="a" if i % 2 else "b") for i in range(20)])
        assert c.export(out) == 20
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert {r["prompt"] for r in rows} == {f"p{i}" for i in range(20)}
        with pytest.raises(PalateError) as ei:
            c.export(out)
        assert ei.value.code == "conflict"
        assert c.forget(source="a") == 10
        with pytest.raises(PalateError):
            c.call("forget", {})
        assert c.status()["events"]["by_source"] == {"b": 10}
        assert c.forget(all=True) == 10
        assert c.status()["events"]["total"] == 0
        # Re-importing the export restores it exactly (ids are kept).
        res = c.ingest_batch(rows)
        assert res["accepted"] == 20
        assert c.status()["events"]["total"] == 20


def test_sigterm_exits_zero_quickly_and_data_survives(home: Path) -> None:
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        c.ingest_batch([pair(i) for i in range(100)])
    t0 = time.monotonic()
    assert d.terminate() == 0
    assert time.monotonic() - t0 < 10
    assert not d.paths.socket.exists()
    d2 = DaemonProc(home, daemon_env(home)).start()
    with d2.client() as c:
        assert c.status()["events"]["total"] == 100
    assert d2.terminate() == 0


def test_second_daemon_is_refused_and_stale_socket_replaced(home: Path) -> None:
    d = DaemonProc(home, daemon_env(home)).start()
    second = subprocess.run(
        [*PALATE, "daemon"], env=daemon_env(home), capture_output=True, text=True, timeout=30
    )
    assert second.returncode != 0
    assert "already runs" in second.stderr
    with d.client() as c:  # the first one is unharmed
        c.hello()
    d.kill9()
    assert d.paths.socket.exists(), "kill -9 leaves a stale socket behind"
    d2 = DaemonProc(home, daemon_env(home)).start()
    with d2.client() as c:
        assert c.hello()["pid"] == d2.proc.pid  # type: ignore[union-attr]
    d2.terminate()


def test_permissions_are_private(palate_daemon: DaemonProc) -> None:
    p = palate_daemon.paths
    for d in (p.home, p.data_dir, p.run_dir, p.log_dir):
        assert d.stat().st_mode & 0o777 == 0o700, d
    for f in (p.db_file, p.key_file, p.socket, p.lock_file):
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_daemon_with_real_keychain(home: Path, secret_service: dict[str, str]) -> None:
    env = daemon_env(home, PALATE_KEY_BACKEND="keyring")
    for k in ("DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "HOME"):
        env[k] = secret_service[k]
    d = DaemonProc(home, env).start()
    with d.client() as c:
        c.ingest(pair(1))
        st = c.status()
    assert st["key_backend"] == "keyring" and st["key"]["warning"] is None
    assert not list(d.paths.data_dir.glob("*.kek"))
    assert d.terminate() == 0
    d = DaemonProc(home, env).start()
    with d.client() as c:
        assert c.status()["events"]["total"] == 1
    d.terminate()
    # Without the keychain the daemon refuses to start and creates no new key.
    key_before = d.paths.key_file.read_bytes()
    env_nokr = dict(env)
    env_nokr["DBUS_SESSION_BUS_ADDRESS"] = "unix:path=/nonexistent"
    r = subprocess.run(
        [*PALATE, "daemon"], env=env_nokr, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 5, r.stderr
    assert "keychain" in r.stderr
    assert d.paths.key_file.read_bytes() == key_before


def test_missing_key_file_with_existing_db_refuses(home: Path) -> None:
    d = DaemonProc(home, daemon_env(home)).start()
    with d.client() as c:
        c.ingest(pair(1))
    d.terminate()
    d.paths.key_file.unlink()
    r = subprocess.run(
        [*PALATE, "daemon"], env=daemon_env(home), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 5
    assert "No new key was created" in r.stderr
    assert not d.paths.key_file.exists()


def test_client_reports_daemon_not_running(home: Path) -> None:
    with pytest.raises(PalateError) as ei:
        Client(home)
    assert ei.value.code == "unavailable" and "palate daemon" in ei.value.message


def test_sigint_also_stops_cleanly(home: Path) -> None:
    d = DaemonProc(home, daemon_env(home)).start()
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGINT)
    assert d.proc.wait(15) == 0
