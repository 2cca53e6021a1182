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
