"""No plaintext of user data anywhere under the Palate home, in any common encoding."""

from __future__ import annotations

import base64
import codecs
import secrets
from pathlib import Path

import pytest

from conftest import DaemonProc, daemon_env
from palate.errors import PalateError


def encodings(canary: str) -> dict[str, bytes]:
    raw = canary.encode("utf-8")
    return {
        "utf-8": raw,
        "utf-16-le": canary.encode("utf-16-le"),
        "utf-16-be": canary.encode("utf-16-be"),
        "utf-32-le": canary.encode("utf-32-le"),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "base64": base64.b64encode(raw)[:-4],  # unaligned tails differ; the body must not appear
        "rot13": codecs.encode(canary, "rot13").encode(),
        "json-escaped": canary.encode("unicode_escape"),
    }


def scan(root: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            hits += [f"{p} ({name})" for name, n in needles.items() if n in data]
    return hits


def test_canary_never_on_disk(home: Path) -> None:
    canary = "CANARY" + secrets.token_hex(12)
    d = DaemonProc(home, daemon_env(home, PALATE_KEY_BACKEND="file")).start()
    with d.client() as c:
        c.ingest(
            {
                "kind": "pair",
                "source": "canary",
                "prompt": f"tell me {canary}",
                "chosen": f"{canary} good",
                "rejected": "bad",
            }
        )
        c.ingest_batch(
            [
                {
                    "kind": "rating",
                    "source": "canary",
                    "prompt": canary,
                    "response": f"r{i} {canary}",
                    "label": 1,
                }
                for i in range(50)
            ],
            cursor={"adapter": "canary", "key": "k", "value": {"n": 1}},
        )
        c.ingest(
            {
                "kind": "edit",
                "source": "canary",
                "prompt": "p",
                "original": canary,
                "edited": canary + "!",
            }
        )
        # A rejected event that contains the canary must not leak it into logs either.
        with pytest.raises(PalateError):
            c.ingest(
                {
                    "kind": "pair",
                    "source": "canary",
                    "prompt": canary,
                    "chosen": canary,
                    "rejected": canary,
                }
            )
        needles = encodings(canary)
        # While running: the WAL and shm files exist and must be clean too.
        assert scan(home, needles) == []
    assert d.terminate() == 0
    assert scan(home, needles) == []
    # And the data is really there (so the scan was not vacuous).
    d = DaemonProc(home, daemon_env(home)).start()
    out = home / "export.jsonl"
    with d.client() as c:
        assert c.status()["events"]["total"] == 52
        c.export(out)
    d.terminate()
    assert canary.encode() in out.read_bytes()


def test_forget_really_removes(home: Path) -> None:
    """Not a SELECT (which never shows freed pages): every page of the database file and of
    its WAL, decrypted with the real key, while the daemon still runs and after it stopped."""
    from palate.store.keys import KeyManager
    from security.pages import decrypted_db, decrypted_wal

    canary = "FORGETME" + secrets.token_hex(12)
    d = DaemonProc(home, daemon_env(home)).start()

    def on_disk() -> bytes:
        dek = KeyManager(d.paths).unwrap()
        db = d.paths.db_file
        return decrypted_db(db, bytes(dek)) + decrypted_wal(Path(f"{db}-wal"), bytes(dek))

    with d.client() as c:
        c.ingest_batch(
            [
                {
                    "kind": "pair",
                    "source": "f",
                    "prompt": f"{canary} {i}",
                    "chosen": "a",
                    "rejected": "b",
                }
                for i in range(200)
            ]
        )
        c.ingest(
            {"kind": "pair", "source": "keep", "prompt": "stay", "chosen": "a", "rejected": "b"}
        )
        assert canary.encode() in on_disk(), "the page scan would be vacuous"
        assert c.forget(source="f") == 200
        assert c.status()["events"]["total"] == 1
        assert canary.encode() not in on_disk(), "forget answered with the text still on disk"
    d.terminate()
    assert canary.encode() not in on_disk()
