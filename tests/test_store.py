"""The SQLCipher store on real files: encryption, group commit, idempotency, forget."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import sqlcipher3.dbapi2 as sqlite

from palate.errors import PalateError
from palate.events import validate_event
from palate.store.database import SCHEMA_VERSION, IngestGroup, Store, check_key, export_jsonl


def ev(i: int, source: str = "t", ts: float = 1_790_000_000.0) -> dict[str, object]:
    return validate_event(
        {
            "id": f"e{i}",
            "kind": "pair",
            "source": source,
            "ts": ts + i,
            "prompt": f"prompt {i}",
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
        },
        now=2_000_000_000,
    )


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def store(tmp_path: Path, key: bytes) -> Store:
    return Store(tmp_path / "p.db", key)


def test_ingest_is_idempotent_and_returns_first_seq(store: Store) -> None:
    (first,) = store.ingest([IngestGroup([ev(1), ev(2)])])
    assert not isinstance(first, PalateError)
    assert [r.duplicate for r in first] == [False, False]
    (again,) = store.ingest([IngestGroup([ev(2), ev(3)])])
    assert not isinstance(again, PalateError)
    assert again[0].duplicate and again[0].seq == first[1].seq
    assert not again[1].duplicate
    assert store.counts()["total"] == 3


def test_groups_share_a_commit_but_fail_alone(store: Store) -> None:
    bad = dict(ev(9))
    bad["kind"] = None  # violates NOT NULL inside the transaction
    out = store.ingest([IngestGroup([ev(1)]), IngestGroup([ev(2), bad]), IngestGroup([ev(3)])])
    assert not isinstance(out[0], PalateError) and not isinstance(out[2], PalateError)
    assert isinstance(out[1], PalateError) and out[1].code == "storage_error"
    ids = {e["id"] for e in store.iter_events()}
    assert ids == {"e1", "e3"}, "the failed group must leave nothing behind (not even e2)"


def test_cursor_commits_with_its_events(store: Store) -> None:
    store.ingest([IngestGroup([ev(1)], {"adapter": "tail", "key": "/f", "value": {"off": 10}})])
    assert store.get_cursors("tail") == {"/f": {"off": 10}}
    store.ingest([IngestGroup([ev(2)], {"adapter": "tail", "key": "/f", "value": {"off": 20}})])
    assert store.get_cursors("tail") == {"/f": {"off": 20}}
    assert store.get_cursors("other") == {}


def test_database_is_encrypted_and_wrong_key_never_overwrites(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "p.db"
    s = Store(path, key)
    canary = "CANARY-" + secrets.token_hex(8)
    e = validate_event(
        {"kind": "pair", "source": "t", "prompt": canary, "chosen": "a", "rejected": "b"}
    )
    s.ingest([IngestGroup([e])])
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert canary.encode() not in raw
    before = path.read_bytes()
    with pytest.raises(PalateError) as ei:
        Store(path, secrets.token_bytes(32))
    assert ei.value.code == "key_error"
    assert path.read_bytes() == before
    with pytest.raises(PalateError):
        check_key(path, secrets.token_bytes(32))
    check_key(path, key)
    reopened = Store(path, key)
    assert [x["prompt"] for x in reopened.iter_events()] == [canary]
    assert reopened.integrity_check() == "ok"


def test_migrations_are_recorded_and_newer_schema_refused(tmp_path: Path, key: bytes) -> None:
    path = tmp_path / "p.db"
    s = Store(path, key)
    assert s.schema_version() == SCHEMA_VERSION
    s._conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 0)", (SCHEMA_VERSION + 1,))
    s.close()
    with pytest.raises(PalateError, match="newer than this Palate"):
        Store(path, key)


def test_forget_selectors_and_vacuum(tmp_path: Path, key: bytes) -> None:
    s = Store(tmp_path / "p.db", key)
    s.ingest([IngestGroup([ev(i, "a") for i in range(5)] + [ev(i, "b") for i in range(5, 10)])])
    assert s.forget(ids=["e0", "e1", "nope"]) == 2
    assert s.forget(source="b", since=1_790_000_007.0) == 3
    assert s.forget(until=1_790_000_003.0) == 1
    assert s.counts() == {"total": 4, "by_kind": {"pair": 4}, "by_source": {"a": 2, "b": 2}}
    with pytest.raises(PalateError):
        s.forget()
    assert s.forget(everything=True) == 4
    assert s.counts()["total"] == 0
    wal = Path(f"{tmp_path / 'p.db'}-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "forget must truncate the WAL"
    audit = s._conn.execute("SELECT action, details FROM audit").fetchall()
    assert [a for a, _ in audit] == ["forget"] * 4
    assert all("prompt" not in d for _, d in audit)


def test_export_is_atomic_private_and_refuses_overwrite(tmp_path: Path, store: Store) -> None:
    store.ingest([IngestGroup([ev(1), ev(2)])])
    out = tmp_path / "out.jsonl"
    assert export_jsonl(store.iter_events(), out, overwrite=False) == 2
    assert out.stat().st_mode & 0o777 == 0o600
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["e1", "e2"] and rows[0]["chosen"] == "good 1"
    with pytest.raises(PalateError) as ei:
        export_jsonl(store.iter_events(), out, overwrite=False)
    assert ei.value.code == "conflict"
    with pytest.raises(PalateError) as ei:
        export_jsonl(store.iter_events(), Path("relative.jsonl"), overwrite=False)
    assert ei.value.code == "invalid_request"
    assert not list(tmp_path.glob(".*partial"))


def test_raw_sqlite_cannot_read_it(tmp_path: Path, key: bytes) -> None:
    s = Store(tmp_path / "p.db", key)
    s.ingest([IngestGroup([ev(1)])])
    s.close()
    conn = sqlite.connect(str(tmp_path / "p.db"))
    with pytest.raises(sqlite.DatabaseError):
        conn.execute("SELECT * FROM events").fetchall()


def test_models_are_stored_encrypted_and_listed(tmp_path: Path, key: bytes) -> None:
    s = Store(tmp_path / "p.db", key)
    with pytest.raises(PalateError) as ei:
        s.get_model()
    assert ei.value.code == "not_found" and "palate train" in ei.value.message
    blob = b"WEIGHTS-" + secrets.token_bytes(64)
    v1 = s.add_model(base_model="builtin:x", meta={"accuracy": 0.7}, artifact=blob)
    v2 = s.add_model(base_model="builtin:x", meta={"accuracy": 0.8}, artifact=blob + b"2")
    assert v2 > v1
    assert [m["version"] for m in s.list_models()] == [v2, v1]
    meta, art = s.get_model()
    assert meta["version"] == v2 and art == blob + b"2"
    meta, art = s.get_model(v1)
    assert meta["meta"] == {"accuracy": 0.7} and art == blob
    with pytest.raises(ValueError):
        s.add_model(base_model="b", meta={}, artifact=b"", state="bogus")
    s.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"WEIGHTS-" not in raw


def test_registry_deploy_rollback_prune(tmp_path: Path, key: bytes) -> None:
    s = Store(tmp_path / "p.db", key)
    v = [s.add_model(base_model="b", meta={"n": i}, artifact=bytes([i])) for i in range(5)]
    assert s.deployed_version() is None and s.rollback_target() is None
    assert s.deploy_model(v[0], how="gate", reason="first") is None
    assert s.deploy_model(v[1], how="gate", reason="better") == v[0]
    assert s.deploy_model(v[2], how="override", reason="user") == v[1]
    states = {m["version"]: m["state"] for m in s.list_models()}
    assert states == {
        v[0]: "retired",
        v[1]: "retired",
        v[2]: "deployed",
        v[3]: "candidate",
        v[4]: "candidate",
    }
    assert s.rollback_target() == v[1]
    with pytest.raises(sqlite.IntegrityError):  # the schema itself forbids two deployed
        s._conn.execute("UPDATE models SET state = 'deployed' WHERE version = ?", (v[3],))
    s.update_model(v[3], state="rejected", meta={"decision": "reject", "reasons": ["worse"]})
    info, _ = s.get_model(v[3])
    assert info["state"] == "rejected" and info["meta"] == {
        "n": 3,
        "decision": "reject",
        "reasons": ["worse"],
    }
    with pytest.raises(ValueError):
        s.update_model(v[3], state="deployed")
    with pytest.raises(PalateError) as ei:
        s.deploy_model(999, how="gate", reason="x")
    assert ei.value.code == "not_found"
    assert s.get_model()[0]["version"] == v[2], "no version means the deployed one"
    # Pruning keeps the newest N plus the deployed version and its rollback target.
    deleted = s.prune_models(keep=1)
    assert set(deleted) == {v[0], v[3]}
    assert {m["version"] for m in s.list_models()} == {v[1], v[2], v[4]}
    assert s.rollback_target() == v[1]
    assert [d["how"] for d in s.deployments()] == ["override", "gate"]


def test_meta_values_and_watermark(store: Store) -> None:
    assert store.get_meta("last_success") is None
    assert store.get_meta("x", 5) == 5
    store.set_meta("last_success", {"ts": 1.5, "version": 3})
    store.set_meta("last_success", {"ts": 2.5, "version": 4})
    assert store.get_meta("last_success") == {"ts": 2.5, "version": 4}
    assert store.max_seq() == 0
    store.ingest([IngestGroup([ev(1), ev(2)])])
    assert store.max_seq() == 2


def test_a_non_sqlite_error_mid_transaction_does_not_wedge_later_writes(store: Store) -> None:
    bad = dict(ev(9))
    bad["id"] = "e\ud800"  # a lone surrogate: binding it raises UnicodeEncodeError, not sqlite
    with pytest.raises(UnicodeEncodeError):
        store.ingest([IngestGroup([ev(1), bad])])
    with pytest.raises(UnicodeEncodeError):
        store.forget(ids=["x\ud800"])
    (ok,) = store.ingest([IngestGroup([ev(2)])])
    assert not isinstance(ok, PalateError)
    assert {e["id"] for e in store.iter_events()} == {"e2"}


# --- export through a shared directory (issue 14 item 2) ---------------------------------


def test_export_cannot_be_hijacked_through_a_shared_directory(tmp_path: Path, store: Store) -> None:
    """Another user who can write to the target directory (a sticky /tmp, a shared folder)
    used to get the events: the export went through the fixed name ``.<name>.partial``,
    opened without O_EXCL/O_NOFOLLOW, so a symlink planted there redirected the plaintext
    into a file of their choosing, and a file planted there (0666, theirs) kept its mode."""
    import os
    import stat

    store.ingest([IngestGroup([ev(1), ev(2)])])
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = shared / "out.jsonl"
    (shared / ".out.jsonl.partial").symlink_to(victim)
    assert export_jsonl(store.iter_events(), out, overwrite=False) == 2
    assert victim.read_text() == "precious", "the export was written through a planted symlink"
    st = out.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert len(out.read_text().splitlines()) == 2

    # A file planted under the old temp name, readable by everyone: never reused.
    planted = shared / ".out2.jsonl.partial"
    planted.write_text("")
    os.chmod(planted, 0o666)
    out2 = shared / "out2.jsonl"
    export_jsonl(store.iter_events(), out2, overwrite=False)
    assert planted.read_text() == "" and out2.stat().st_ino != planted.stat().st_ino
    assert stat.S_IMODE(out2.stat().st_mode) == 0o600

    # A symlink at the final name: refused without overwrite (even a dangling one),
    # replaced -- never followed -- with it.
    target = tmp_path / "victim2.txt"
    target.write_text("precious too")
    link = shared / "out3.jsonl"
    link.symlink_to(target)
    dangling = shared / "out4.jsonl"
    dangling.symlink_to(tmp_path / "does-not-exist")
    for path in (link, dangling):
        with pytest.raises(PalateError) as ei:
            export_jsonl(store.iter_events(), path, overwrite=False)
        assert ei.value.code == "conflict"
    assert not (tmp_path / "does-not-exist").exists()
    export_jsonl(store.iter_events(), link, overwrite=True)
    assert target.read_text() == "precious too"
    assert stat.S_ISREG(link.lstat().st_mode) and stat.S_IMODE(link.lstat().st_mode) == 0o600
    leftovers = sorted(p.name for p in shared.iterdir() if p.name.startswith("."))
    assert leftovers == [".out.jsonl.partial", ".out2.jsonl.partial"], "only the planted ones"


# --- forget (issue 14 item 4) ------------------------------------------------------------


def _canary_store(path: Path, key: bytes, canary: str, n: int = 300) -> Store:
    s = Store(path, key)
    s.ingest(
        [
            IngestGroup(
                [
                    validate_event(
                        {
                            "kind": "pair",
                            "source": "f",
                            "prompt": f"{canary} {i}",
                            "chosen": "a",
                            "rejected": "b",
                        }
                    )
                    for i in range(n)
                ]
            )
        ]
    )
    s.ingest([IngestGroup([ev(1, "keep")])])
    return s


def _on_disk(path: Path, key: bytes) -> bytes:
    from security.pages import decrypted_db, decrypted_wal

    return decrypted_db(path, key) + decrypted_wal(Path(f"{path}-wal"), key)


def _reader(path: Path, key: bytes) -> sqlite.Connection:
    """Another connection inside a read transaction (as a training run reading events)."""
    r = sqlite.connect(str(path), isolation_level=None, check_same_thread=False)
    r.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    r.execute("BEGIN")
    assert r.execute("SELECT count(*) FROM events").fetchone()[0] > 0
    return r


def test_forget_with_a_concurrent_reader_fails_loudly_then_purges(
    tmp_path: Path, key: bytes
) -> None:
    """The checkpoint's result used to be ignored: with another connection reading, forget
    reported success while the text was still in the database file."""
    canary = "FORGETME" + secrets.token_hex(8)
    path = tmp_path / "p.db"
    s = _canary_store(path, key, canary)
    reader = _reader(path, key)
    try:
        try:
            n = s.forget(source="f", purge_wait_s=0.5)
        except PalateError as e:
            assert e.code == "busy" and e.details == {"purged": False, "deleted": 300}
            assert "forget again" in e.message or "same forget again" in e.message
        else:
            assert n == 300
            assert canary.encode() not in _on_disk(path, key), "success reported, text on disk"
        assert s.counts()["total"] == 1
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert s.forget(source="f") == 0  # the retry finishes the purge
    assert canary.encode() not in _on_disk(path, key)


def test_forget_waits_for_a_reader_that_lets_go(tmp_path: Path, key: bytes) -> None:
    import threading
    import time

    canary = "FORGETME" + secrets.token_hex(8)
    path = tmp_path / "p.db"
    s = _canary_store(path, key, canary)
    assert canary.encode() in _on_disk(path, key), "the scan would be vacuous"
    reader = _reader(path, key)
    # Longer than SQLite's own busy wait (5 s): only a forget that checks and retries the
    # checkpoint gets the text off the disk.
    timer = threading.Timer(6.5, lambda: reader.execute("COMMIT"))
    timer.start()
    t0 = time.monotonic()
    try:
        assert s.forget(source="f") == 300
    finally:
        timer.join()
        reader.close()
    assert time.monotonic() - t0 >= 6.0
    assert canary.encode() not in _on_disk(path, key)


def test_forget_flags_models_trained_on_forgotten_events(tmp_path: Path, key: bytes) -> None:
    s = Store(tmp_path / "p.db", key)
    s.ingest([IngestGroup([ev(i) for i in range(1, 11)])])  # seq 1..10
    before = s.forget_count()
    v1 = s.add_model(base_model="b", meta={"training": {"data_seq": 5}}, artifact=b"1")
    s.deploy_model(v1, how="gate", reason="first")
    v2 = s.add_model(base_model="b", meta={"training": {"data_seq": 10}}, artifact=b"2")
    s.deploy_model(v2, how="gate", reason="second")
    v3 = s.add_model(base_model="b", meta={"training": {"data_seq": 10}}, artifact=b"3")
    s.set_meta("schedule.trained_seq", 10)
    assert s.forget(ids=["e8"]) == 1  # seq 8: v2 and v3 saw it, v1 did not
    flagged = {m["version"]: "forgotten" in m["meta"] for m in s.list_models()}
    assert flagged == {v1: False, v2: True, v3: True}
    assert s.get_model(v2)[0]["meta"]["forgotten"]["events"] == 1
    assert s.deployed_version() == v1, "the last deployed model that predates them serves"
    assert s.deployments()[0]["how"] == "forget"
    assert s.get_meta("schedule.trained_seq") == 0, "a retrain without them is queued"
    assert s.forget_count() == before + 1
    # A run that read its events before the forget cannot register what it learned.
    with pytest.raises(PalateError) as ei:
        s.add_model(base_model="b", meta={}, artifact=b"4", forget_count=before)
    assert ei.value.code == "conflict"
    assert len(s.list_models()) == 3
    s.add_model(base_model="b", meta={}, artifact=b"4", forget_count=s.forget_count())
    # Nothing to forget: nothing flagged, no retrain, the counter stays.
    s.set_meta("schedule.trained_seq", 10)
    assert s.forget(ids=["nope"]) == 0
    assert s.get_meta("schedule.trained_seq") == 10 and s.forget_count() == before + 1


_VACUUM_RSS = r"""
import secrets, sys
from pathlib import Path
from palate.events import validate_event
from palate.store.database import IngestGroup, Store

path, key = Path(sys.argv[1]), bytes.fromhex(sys.argv[2])
s = Store(path, key)
for b in range(20):
    s.ingest([IngestGroup([validate_event({"kind": "pair", "source": f"s{b}",
        "prompt": secrets.token_hex(2000), "chosen": "a", "rejected": "b"})
        for _ in range(400)])])
s.close()
s = Store(path, key)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) // 1024
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
s.forget(source="s0")
print(before, rss("VmHWM:"), path.stat().st_size // 2**20)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads /proc")
def test_forget_vacuum_does_not_hold_the_database_in_memory(tmp_path: Path, key: bytes) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _VACUUM_RSS, str(tmp_path / "p.db"), key.hex()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    before, peak, size = map(int, r.stdout.split())
    assert size >= 30, f"the database is only {size} MiB: the test would not see it"
    print(f"\nforget+VACUUM of a {size} MiB database: RSS {before} -> peak {peak} MiB")
    assert peak - before < size / 3, f"VACUUM grew the process by {peak - before} MiB"
