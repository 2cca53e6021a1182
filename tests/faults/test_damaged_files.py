"""A damaged or tampered database file, or a tampered wrapped key, at daemon start.

The home is left by a daemon killed with -9 right after an ingest, so a WAL with committed
frames sits beside the database (the hardest case for "nothing is written": a writable
connection would fold it into the file when it closes). Then one thing is damaged: bytes
flipped in a page in the middle of the file, the file cut in half or at a page boundary,
its first 16 bytes replaced by a plain SQLite header, or the wrapped data key in key.json.

``palate daemon`` must refuse (exit 5, one clear line), bind no socket, and leave the
database, its WAL and the key files byte-for-byte as they were. Undoing the damage shows
nothing else was lost.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import DaemonProc, daemon_env

from .helpers import NO_SCHEDULE, fingerprint, rating, run_daemon_once

PAGE = 4096
EVENTS = 2000


@pytest.fixture(scope="module")
def crashed_home() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    try:
        (base / "config.toml").write_text(NO_SCHEDULE)
        d = DaemonProc(base, daemon_env(base)).start()
        with d.client() as c:
            for b in range(0, EVENTS, 500):
                c.ingest_batch([rating(f"e{i}", size=300) for i in range(b, b + 500)])
        assert d.terminate() == 0  # the bulk checkpointed into palate.db
        d = DaemonProc(base, daemon_env(base)).start()
        with d.client() as c:
            c.ingest_batch([rating(f"w{i}") for i in range(50)])
        d.kill9()  # ... and the last batch only in the WAL
        assert (base / "data" / "palate.db-wal").stat().st_size > 0
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def flip_middle(db: Path) -> None:
    data = bytearray(db.read_bytes())
    at = (len(data) // PAGE // 2) * PAGE + 1000
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    db.write_bytes(bytes(data))


def truncate_half(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2 + 100])


def truncate_at_page(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: (db.stat().st_size // PAGE // 2) * PAGE])


def plain_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    data[:16] = b"SQLite format 3\0"  # where SQLCipher keeps its salt
    db.write_bytes(bytes(data))


def tamper_key(key_file: Path) -> None:
    doc = json.loads(key_file.read_text())
    ct = bytearray(base64.b64decode(doc["wrapped"]["ct"]))
    ct[5] ^= 0x01
    doc["wrapped"]["ct"] = base64.b64encode(bytes(ct)).decode()
    key_file.write_text(json.dumps(doc, indent=1))


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "flip-middle": ("palate.db", flip_middle, "damaged"),
    "truncate-half": ("palate.db", truncate_half, "damaged"),
    "truncate-at-page": ("palate.db", truncate_at_page, "damaged"),
    "plain-header": ("palate.db", plain_header, "damaged"),
    "tampered-key": ("key.json", tamper_key, "tampered"),
}


def watched(data: Path) -> dict[str, str]:
    # -shm is SQLite's rebuildable index of the WAL (no page content): a reader may
    # rebuild it. Everything else must stay exactly as it was.
    return {k: v for k, v in fingerprint(data).items() if not k.endswith("-shm")}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_refused_and_nothing_is_written(
    damage: str, crashed_home: Path, home: Path
) -> None:
    shutil.copytree(crashed_home, home, dirs_exist_ok=True, ignore=shutil.ignore_patterns("run"))
    env = daemon_env(home)
    data = home / "data"
    name, apply, says = DAMAGE[damage]
    original = (data / name).read_bytes()
    apply(data / name)
    before = watched(data)

    r = run_daemon_once(env)
    assert r.returncode == 5, (r.returncode, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("palate: error:") and says in line, line
    assert "Traceback" not in r.stderr
    assert watched(data) == before, "the damaged home was written to"
    assert not list((home / "run").glob("*.sock"))

    print(f"{damage}: {line}")
    if damage == "flip-middle":  # (the files are unchanged, so one restart shows it for all)
        (data / name).write_bytes(original)  # undo the damage: all there, WAL included
        d = DaemonProc(home, env).start()
        with d.client() as c:
            assert c.status()["events"]["total"] == EVENTS + 50
        assert d.terminate() == 0
