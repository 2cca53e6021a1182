"""``forget`` with another process reading the database (issue 14 items 4 and 11).

A training run is a second connection to the database; while it (or anything else) holds a
read snapshot, the WAL checkpoint that folds the scrubbed pages back into the database file
cannot finish, and forget used to ignore that and answer success with the text still in the
file. Now forget waits for the reader (here it lets go after 7 s, past SQLite's own 5 s busy
wait), checks the checkpoint, and only then answers; the pages are scanned decrypted.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import sqlcipher3.dbapi2 as sqlite

from conftest import DaemonProc
from palate.store.keys import KeyManager
from security.pages import decrypted_db, decrypted_wal


def test_forget_waits_for_a_reader_and_leaves_no_text(palate_daemon: DaemonProc) -> None:
    d = palate_daemon
    canary = "FORGETME" + secrets.token_hex(12)
    with d.client() as c:
        c.ingest_batch(
            [
                {"kind": "pair", "source": "f", "prompt": f"{canary} {i}", "chosen": "a"}
                | {"rejected": "b"}
                for i in range(300)
            ]
        )
        c.ingest({"kind": "pair", "source": "keep", "prompt": "x", "chosen": "a", "rejected": "b"})
    key = bytes(KeyManager(d.paths, "file").unwrap())
    db = d.paths.db_file

    def on_disk() -> bytes:
        return decrypted_db(db, key) + decrypted_wal(Path(f"{db}-wal"), key)

    reader = sqlite.connect(str(db), isolation_level=None, check_same_thread=False)
    reader.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 301
    assert canary.encode() in on_disk()
    release = threading.Timer(7.0, lambda: reader.execute("COMMIT"))
    release.start()
    t0 = time.monotonic()
    try:
        with d.client(timeout=120) as c:
            assert c.forget(source="f") == 300
            took = time.monotonic() - t0
            assert canary.encode() not in on_disk(), f"answered after {took:.1f} s, text on disk"
            assert c.status()["events"]["total"] == 1
    finally:
        release.join()
        reader.close()
    assert took >= 6.5, "forget answered before the reader let go"
    print(f"\nforget with a reader holding a snapshot for 7 s: answered after {took:.1f} s")
