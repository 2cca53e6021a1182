"""The encrypted store: one SQLCipher database for everything the user owns.

Events, adapter cursors, the audit log (and, in later migrations, models and
reports) live in one database encrypted page by page with the data key. The
database runs in WAL mode with ``synchronous=FULL``: a commit that returned is
on disk, which is what lets the daemon acknowledge an event only after it.
``temp_store=MEMORY`` keeps sort spills and temp tables out of plaintext temp
files; ``secure_delete`` zeroes deleted content before ``forget`` vacuums.

This class is synchronous and not thread-safe: exactly one thread (the daemon's
:class:`palate.store.writer.StoreWriter`) uses a given instance.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import sqlcipher3.dbapi2 as sqlite

from palate.errors import PalateError
from palate.events import CONTENT_FIELDS, CONTEXT_KEYS

log = logging.getLogger(__name__)

SQLITE_BUSY = 5
SQLITE_LOCKED = 6
SQLITE_FULL = 13
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26

#: Numbered, append-only migrations. Never edit one that has shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "events, cursors, audit, meta",
        """
        CREATE TABLE events (
            seq      INTEGER PRIMARY KEY AUTOINCREMENT,
            id       TEXT NOT NULL UNIQUE,
            kind     TEXT NOT NULL,
            source   TEXT NOT NULL,
            ts       REAL NOT NULL,
            received REAL NOT NULL,
            body     BLOB NOT NULL
        );
        CREATE INDEX events_source ON events(source, kind);
        CREATE INDEX events_ts ON events(ts);
        CREATE TABLE cursors (
            adapter TEXT NOT NULL,
            key     TEXT NOT NULL,
            value   BLOB NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (adapter, key)
        );
        CREATE TABLE audit (
            seq     INTEGER PRIMARY KEY AUTOINCREMENT,
            ts      REAL NOT NULL,
            action  TEXT NOT NULL,
            details TEXT NOT NULL
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """,
    ),
]
MIGRATIONS.append(
    (
        2,
        "models: trained reward models with their artifacts and reports",
        """
        CREATE TABLE models (
            version   INTEGER PRIMARY KEY AUTOINCREMENT,
            created   REAL NOT NULL,
            state     TEXT NOT NULL,
            base_model TEXT NOT NULL,
            meta      TEXT NOT NULL,
            artifact  BLOB NOT NULL
        );
        CREATE INDEX models_state ON models(state);
        CREATE UNIQUE INDEX models_one_deployed ON models(state) WHERE state = 'deployed';
        CREATE TABLE deployments (
            seq      INTEGER PRIMARY KEY AUTOINCREMENT,
            ts       REAL NOT NULL,
            version  INTEGER NOT NULL REFERENCES models(version),
            previous INTEGER,
            how      TEXT NOT NULL,
            reason   TEXT NOT NULL
        );
        """,
    )
)
MIGRATIONS.append(
    (
        3,
        "review_items: unlabelled questions for the user, ordered by what a label is worth",
        """
        CREATE TABLE review_items (
            id       TEXT PRIMARY KEY,
            created  REAL NOT NULL,
            expires  REAL NOT NULL,
            source   TEXT NOT NULL,
            state    TEXT NOT NULL,
            info     REAL,
            p        REAL,
            version  INTEGER,
            body     BLOB,
            answered REAL,
            answer   TEXT,
            event_id TEXT
        );
        CREATE INDEX review_items_open ON review_items(state, info);
        """,
    )
)
MIGRATIONS.append(
    (
        4,
        "federation: the per-user privacy ledger of federated rounds and the shared adapter",
        """
        CREATE TABLE federation_rounds (
            seq              INTEGER PRIMARY KEY AUTOINCREMENT,
            ts               REAL NOT NULL,
            federation       TEXT NOT NULL,
            round            INTEGER NOT NULL,
            noise_multiplier REAL NOT NULL,
            clipping_norm    REAL NOT NULL,
            delta            REAL NOT NULL,
            epsilon          REAL NOT NULL
        );
        CREATE INDEX federation_rounds_federation ON federation_rounds(federation, round);
        CREATE TABLE federation_adapters (
            federation TEXT PRIMARY KEY,
            updated    REAL NOT NULL,
            meta       TEXT NOT NULL,
            arrays     BLOB NOT NULL
        );
        """,
    )
)
MIGRATIONS.append(
    (
        5,
        "frozen_cache: the frozen base blocks' activations per example, kept across nights",
        """
        CREATE TABLE frozen_cache (
            key    TEXT PRIMARY KEY,
            base   TEXT NOT NULL,
            used   REAL NOT NULL,
            bytes  INTEGER NOT NULL,
            arrays BLOB NOT NULL
        );
        CREATE INDEX frozen_cache_used ON frozen_cache(used);
        """,
    )
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
#: Meta key counting forgets that emptied the frozen-prefix cache (Store.frozen_cache_epoch).
FROZEN_EPOCH_KEY = "frozen_cache.epoch"
#: Meta keys forget maintains: the scheduler's new-events watermark (runtime.scheduler's
#: K_TRAINED_SEQ; reset to queue a retrain) and a counter of forgets that deleted something.
RETRAIN_WATERMARK_KEY = "schedule.trained_seq"
FORGET_COUNT_KEY = "forget.count"
#: How long forget waits for other readers to let go of old page images (see Store.purge).
FORGET_PURGE_WAIT_S = 30.0
#: Lifecycle states of a model version (the registry, a later part, moves them).
MODEL_STATES = ("candidate", "deployed", "rejected", "held", "retired")
#: meta kind of a policy adapter's row, and the meta key naming the one that serves.
POLICY_KIND = "policy"
POLICY_DEPLOYED = "policy.deployed"
#: How long a review question stays open, and how many open ones are kept (the least
#: informative go first). Answered rows keep no text, only that they were answered.
REVIEW_TTL_S = 14 * 86_400.0
REVIEW_MAX_OPEN = 500
#: Most valuable label first: expected information (NULL: never scored, last), then the
#: closest call, then the newest.
_REVIEW_ORDER = "info IS NULL, info DESC, abs(coalesce(p, 0.5) - 0.5), created DESC"


def _review_item(
    item_id: str,
    created: float,
    expires: float,
    source: str,
    info: float | None,
    p: float | None,
    version: int | None,
    body: bytes | None,
) -> dict[str, Any]:
    content: dict[str, Any] = msgpack.unpackb(body, raw=False) if body else {}
    return {
        "id": item_id,
        "prompt": content.get("prompt"),
        "a": content.get("a"),
        "b": content.get("b"),
        "why": content.get("why", ""),
        "source": source,
        "created": created,
        "expires": expires,
        "info": info,
        "p_a_over_b": p,
        "version": version,
        **(content.get("extra") or {}),
    }

#: Browsing (``list_events``): rows one call decrypts at most while searching, and the text
#: characters a page of whole events stops at (well inside the 4 MiB a client reads at once).
SCAN_ROWS = 20_000
PAGE_TEXT_CHARS = 1_000_000
#: ``event_stats`` counts context values over at most this many of the newest events.
STATS_SAMPLE = 50_000


def _event_filters(
    source: str | None, kind: str | None, since: float | None, until: float | None
) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for sql, value in (
        ("source = ?", source),
        ("kind = ?", kind),
        ("ts >= ?", since),
        ("ts < ?", until),
    ):
        if value is not None:
            where.append(sql)
            args.append(value)
    return where, args


def _texts(ev: Mapping[str, Any]) -> Iterator[str]:
    for field in CONTENT_FIELDS:
        value = ev.get(field)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (v for v in value if isinstance(v, str))


def _haystack(ev: Mapping[str, Any]) -> str:
    """Everything a search matches, case-folded: texts, id, source, context values."""
    ctx = ev.get("context") or {}
    parts = [*_texts(ev), str(ev.get("id", "")), str(ev.get("source", ""))]
    parts.extend(str(v) for v in ctx.values())
    return "\n".join(parts).casefold()


def _previewed(ev: dict[str, Any], chars: int) -> dict[str, Any]:
    """The event with each text cut to ``chars`` characters; ``truncated`` says if any was."""
    cut = False

    def short(t: str) -> str:
        nonlocal cut
        if len(t) > chars:
            cut = True
            return t[:chars]
        return t

    for field in CONTENT_FIELDS:
        value = ev.get(field)
        if isinstance(value, str):
            ev[field] = short(value)
        elif isinstance(value, list):
            ev[field] = [short(v) if isinstance(v, str) else v for v in value]
    ev["truncated"] = cut
    return ev


@dataclass
class IngestResult:
    id: str
    seq: int
    duplicate: bool

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "duplicate": self.duplicate}


@dataclass
class IngestGroup:
    """Events that commit (or fail) together, plus an optional adapter cursor."""

    events: Sequence[Mapping[str, Any]]
    cursor: Mapping[str, Any] | None = None


#: An I/O error while this little room is left (free space, or below the file-size limit)
#: is the disk being full: see :func:`out_of_room`.
FULL_MARGIN_BYTES = 1 << 20


def out_of_room(path: Path) -> str | None:
    """Why there is no room left for the database at ``path``, or None.

    SQLite reports a failed write as SQLITE_FULL only when the OS said ENOSPC on a WAL or
    database write; a failed extension of the ``-shm`` file on a full disk, or EFBIG (a
    file-size limit, RLIMIT_FSIZE or the filesystem's own) come back as a generic
    SQLITE_IOERR ("disk I/O error"). This tells those apart from a real I/O error.
    """
    try:
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < FULL_MARGIN_BYTES:
            return f"less than {FULL_MARGIN_BYTES >> 20} MiB free on the disk of {path.parent}"
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                if os.stat(f"{path}{suffix}").st_size + FULL_MARGIN_BYTES > soft:
                    return f"{path.name}{suffix} reached the file-size limit of {soft} bytes"
    return None


def storage_error(e: BaseException, action: str, path: Path | None = None) -> PalateError:
    """Translate a SQLite failure into the documented error codes. With ``path`` (the
    database), an I/O error on a disk without room left is reported as ``storage_full``."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == SQLITE_FULL or (isinstance(e, OSError) and e.errno == 28):
        return PalateError(
            "storage_full", f"the disk is full; {action} was not done. Free some space and retry."
        )
    why = out_of_room(path) if primary == SQLITE_IOERR and path is not None else None
    if why is not None:
        return PalateError(
            "storage_full",
            f"out of disk space ({why}); {action} was not done. Free some space and retry.",
            {"cause": str(e)},
        )
    if primary in (SQLITE_BUSY, SQLITE_LOCKED):
        # Another connection (a training run registering its model) held the write lock
        # past busy_timeout: nothing was written, and a retry will do it.
        return PalateError(
            "busy",
            f"the database is busy (another process is writing); {action} was not done. "
            "Retry shortly.",
            {"retryable": True},
        )
    if primary in (SQLITE_NOTADB, SQLITE_CORRUPT):
        return PalateError(
            "key_error",
            "the database does not open with this key, or it is damaged; nothing was "
            "overwritten. Check `palate doctor`, or restore with your recovery key.",
        )
    return PalateError("storage_error", f"{action} failed in the encrypted store: {e}")


class Store:
    """The SQLCipher database of one Palate home."""

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[sqlite.Connection]:
        """One write transaction: committed if the block finishes, rolled back on any
        exception; SQLite errors become the documented codes (``storage_full``...)."""
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            yield c
            c.execute("COMMIT")
        except BaseException as e:
            if c.in_transaction:
                c.execute("ROLLBACK")
            if isinstance(e, sqlite.Error):
                raise storage_error(e, action, self.path) from e
            raise

    def __init__(self, path: Path, key: bytes | bytearray) -> None:
        self.path = path
        self._conn = self._open(path, key)
        self._cur = self._conn.cursor()
        self._packer = msgpack.Packer(use_bin_type=True)

    @staticmethod
    def _open(path: Path, key: bytes | bytearray) -> sqlite.Connection:
        existed = path.exists()
        old_umask = os.umask(0o077)
        try:
            conn = sqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        finally:
            os.umask(old_umask)
        try:
            conn.execute("PRAGMA cipher_log_level = NONE")
            conn.execute(f"PRAGMA key = \"x'{bytes(key).hex()}'\"")
            # The first read decrypts page 1: a wrong key or a damaged file fails here,
            # before anything could be written over it.
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite.DatabaseError as e:
            conn.close()
            if existed:
                raise storage_error(e, "opening the database", path) from e
            raise
        try:
            for pragma in (
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = FULL",
                "PRAGMA temp_store = MEMORY",
                "PRAGMA secure_delete = ON",
                "PRAGMA foreign_keys = ON",
                "PRAGMA busy_timeout = 5000",
            ):
                conn.execute(pragma).fetchall()
            if sys.platform == "darwin":
                # fsync on macOS does not flush the drive cache; F_FULLFSYNC does.
                conn.execute("PRAGMA fullfsync = ON")
                conn.execute("PRAGMA checkpoint_fullfsync = ON")
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                if p.exists():
                    os.chmod(p, 0o600)
            Store._migrate(conn)
        except sqlite.Error as e:  # e.g. a full disk while creating or migrating
            conn.close()
            raise storage_error(e, "opening the database", path) from e
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _migrate(conn: sqlite.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL NOT NULL)"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        newer = [v for v in done if v > SCHEMA_VERSION]
        if newer:
            raise PalateError(
                "storage_error",
                f"the database has schema version {max(newer)}, newer than this Palate "
                f"({SCHEMA_VERSION}); upgrade Palate. Nothing was changed.",
            )
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in filter(str.strip, sql.split(";")):
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time())
                )
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (SQLITE_FULL does): a second ROLLBACK
                # would fail and hide the real error.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            log.info("store migrated to schema %d (%s)", version, name)

    # -- writes ----------------------------------------------------------------
    def ingest(self, groups: Sequence[IngestGroup]) -> list[list[IngestResult] | PalateError]:
        """Commit several groups in ONE durable transaction (group commit).

        Each group is isolated by a savepoint, so one failing group does not undo
        the others; but every group shares the single fsync of the commit, which is
        what makes many small acknowledged writes cheap. If the commit itself fails
        nothing is acknowledged and every group gets the error.
        """
        out: list[list[IngestResult] | PalateError] = []
        now = time.time()
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
        except sqlite.Error as e:
            err = storage_error(e, "ingest", self.path)
            return [err for _ in groups]
        try:
            for group in groups:
                if len(group.events) == 1 and group.cursor is None:
                    # One statement is atomic on its own: no savepoint needed.
                    try:
                        out.append(self._insert_group(group, now))
                    except sqlite.Error as e:
                        out.append(storage_error(e, "ingest", self.path))
                    continue
                c.execute("SAVEPOINT g")
                try:
                    out.append(self._insert_group(group, now))
                    c.execute("RELEASE g")
                except sqlite.Error as e:
                    c.execute("ROLLBACK TO g")
                    c.execute("RELEASE g")
                    out.append(storage_error(e, "ingest", self.path))
            c.execute("COMMIT")
        except sqlite.Error as e:
            err = storage_error(e, "ingest", self.path)
            with contextlib.suppress(sqlite.Error):
                c.execute("ROLLBACK")
            return [err for _ in groups]
        except BaseException:
            # Anything else (a bug, a bad value) must not leave the transaction open: every
            # later write on this connection would fail until a restart.
            with contextlib.suppress(sqlite.Error):
                if c.in_transaction:
                    c.execute("ROLLBACK")
            raise
        return out

    def _insert_group(self, group: IngestGroup, now: float) -> list[IngestResult]:
        c = self._cur
        pack = self._packer.pack
        results: list[IngestResult] = []
        for ev in group.events:
            row = c.execute(
                "INSERT INTO events (id, kind, source, ts, received, body) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING RETURNING seq",
                (
                    ev["id"],
                    ev["kind"],
                    ev["source"],
                    ev["ts"],
                    now,
                    pack(ev),
                ),
            ).fetchone()
            if row is not None:
                results.append(IngestResult(ev["id"], row[0], False))
            else:
                seq = c.execute("SELECT seq FROM events WHERE id = ?", (ev["id"],)).fetchone()[0]
                results.append(IngestResult(ev["id"], seq, True))
        if group.cursor is not None:
            cur = group.cursor
            c.execute(
                "INSERT INTO cursors (adapter, key, value, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(adapter, key) DO UPDATE SET value = excluded.value, "
                "updated = excluded.updated",
                (cur["adapter"], cur["key"], msgpack.packb(cur["value"], use_bin_type=True), now),
            )
        return results

    def audit(self, action: str, details: Mapping[str, Any]) -> None:
        """Record an administrative action. Details must never hold user content."""
        self._conn.execute(
            "INSERT INTO audit (ts, action, details) VALUES (?, ?, ?)",
            (time.time(), action, json.dumps(dict(details), sort_keys=True)),
        )

    def forget(
        self,
        *,
        ids: Sequence[str] | None = None,
        source: str | None = None,
        since: float | None = None,
        until: float | None = None,
        everything: bool = False,
        purge_wait_s: float | None = None,
    ) -> int:
        """Delete matching events for real: secure_delete, VACUUM, WAL truncate, checked.

        In the same transaction as the delete, every model whose training data may hold a
        deleted event is flagged (``meta.forgotten``); if the deployed one is, the newest
        earlier deployed version that is not flagged is deployed instead, and a retrain
        without the deleted events is queued (the scheduler's watermark is reset, so every
        remaining event counts as new). Then :meth:`purge` rewrites the file and empties the
        WAL, waiting up to ``purge_wait_s`` for other readers; if they do not let go it
        raises ``busy``: the events are deleted, but their text may still be on disk until
        the same forget is run again.

        Adapter cursors are kept on purpose: dropping them would make an adapter
        re-import the very feedback the user just asked to forget.
        """
        where: list[str] = []
        args: list[Any] = []
        if not everything:
            if ids is not None:
                where.append(f"id IN ({','.join('?' * len(ids))})")
                args.extend(ids)
            if source is not None:
                where.append("source = ?")
                args.append(source)
            if since is not None:
                where.append("ts >= ?")
                args.append(since)
            if until is not None:
                where.append("ts < ?")
                args.append(until)
            if not where:
                raise PalateError(
                    "invalid_request", "forget needs ids, source, since/until, or all"
                )
        cond = " WHERE " + " AND ".join(where) if where else ""
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            first_seq, first_received = c.execute(
                f"SELECT min(seq), min(received) FROM events{cond}", args
            ).fetchone()
            n = c.execute("DELETE FROM events" + cond, args).rowcount
            flagged: list[int] = []
            redeployed = None
            if n:
                flagged, redeployed = self._after_forget(n, first_seq, first_received)
            self.audit(
                "forget",
                {
                    "deleted": n,
                    "all": everything,
                    "by_ids": ids is not None and len(ids),
                    "source": source,
                    "since": since,
                    "until": until,
                    "models_flagged": flagged,
                    "redeployed": redeployed,
                },
            )
            c.execute("COMMIT")
        except BaseException as e:
            if c.in_transaction:
                c.execute("ROLLBACK")
            if isinstance(e, sqlite.Error):
                raise storage_error(e, "forget", self.path) from e
            raise
        try:
            self.purge(FORGET_PURGE_WAIT_S if purge_wait_s is None else purge_wait_s)
        except PalateError as e:
            e.details["deleted"] = n
            raise
        return n

    def _after_forget(
        self, n: int, first_seq: int, first_received: float
    ) -> tuple[list[int], int | None]:
        """Inside forget's transaction: flag the models the deleted events may have trained,
        swap out a flagged deployed model, queue a retrain. Returns (flagged, redeployed)."""
        c = self._conn
        now = time.time()
        flagged = []
        for version, created, meta_text in c.execute(
            "SELECT version, created, meta FROM models"
        ).fetchall():
            meta = json.loads(meta_text)
            seq = (meta.get("training") or {}).get("data_seq")
            # A run records the newest event it read; older models only have their
            # registration time, which is conservative (it may flag one that did not see it).
            hit = seq >= first_seq if isinstance(seq, int) else created >= first_received
            if not hit:
                continue
            mark = dict(meta.get("forgotten") or {})
            mark["events"] = int(mark.get("events", 0)) + n
            mark["ts"] = now
            meta["forgotten"] = mark
            c.execute(
                "UPDATE models SET meta = ? WHERE version = ?",
                (json.dumps(meta, sort_keys=True), version),
            )
            flagged.append(int(version))
        redeployed = None
        deployed = self.deployed_version()
        if deployed in flagged:
            row = c.execute(
                "SELECT m.version FROM models m WHERE m.version < ? AND m.version IN "
                "(SELECT version FROM deployments) AND json_extract(m.meta, '$.forgotten') "
                "IS NULL ORDER BY m.version DESC LIMIT 1",
                (deployed,),
            ).fetchone()
            if row is not None:
                redeployed = int(row[0])
                c.execute("UPDATE models SET state = 'retired' WHERE state = 'deployed'")
                c.execute("UPDATE models SET state = 'deployed' WHERE version = ?", (redeployed,))
                c.execute(
                    "INSERT INTO deployments (ts, version, previous, how, reason) "
                    "VALUES (?, ?, ?, 'forget', ?)",
                    (
                        now,
                        redeployed,
                        deployed,
                        f"version {deployed} was trained on forgotten events",
                    ),
                )
        if flagged:
            # The scheduler trains when enough events are new since its watermark: from 0,
            # every remaining event is new, so the next nightly run retrains without these.
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?, '0') ON CONFLICT(key) DO UPDATE "
                "SET value = '0'",
                (RETRAIN_WATERMARK_KEY,),
            )
        # The frozen-prefix cache holds activations of the forgotten text too: empty it.
        self._forget_frozen(c)
        # A training run that read events before this forget must not register its model.
        c.execute(
            "INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT(key) DO UPDATE "
            "SET value = CAST(value AS INTEGER) + 1",
            (FORGET_COUNT_KEY,),
        )
        return flagged, redeployed

    def forget_count(self) -> int:
        """How many forgets deleted something, ever: a training run compares it at the start
        and when it registers (see :meth:`add_model`)."""
        return int(self.get_meta(FORGET_COUNT_KEY, 0))

    def purge(self, wait_s: float = 30.0) -> None:
        """Rewrite the database without freed pages (VACUUM) and empty the WAL; raise
        ``busy`` unless both happened.

        VACUUM builds its copy in a temporary database (encrypted with the same key by
        SQLCipher, in the private TMPDIR), not in memory: ``temp_store`` is FILE for it, so
        memory does not grow with the database. The WAL checkpoint must then report that
        every frame was copied back and the WAL truncated; another connection reading an
        older snapshot (a training run, a read-only probe) keeps page images of the deleted
        rows alive, so it is retried until ``wait_s`` has passed.
        """
        c = self._conn
        try:
            c.execute("PRAGMA temp_store = FILE")
            try:
                c.execute("VACUUM")
            finally:
                c.execute("PRAGMA temp_store = MEMORY")
            deadline = time.monotonic() + wait_s
            while True:
                busy, frames, done = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if busy == 0 and frames == done:
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except sqlite.Error as e:
            err = storage_error(e, "purging deleted events from the database file", self.path)
            if err.code != "busy":
                raise err from e
        raise PalateError(
            "busy",
            "the events were deleted, but another process kept reading the database for "
            f"{wait_s:g} s, so their text may still be in the database file or its WAL. "
            "Run the same forget again (it finishes the purge), after any training run ends.",
            {"purged": False},
        )

    def checkpoint(self) -> None:
        """Fold the WAL into the database file (on shutdown, and after forget)."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite.Error as e:
            log.warning("checkpoint failed: %s", e)

    # -- reads -----------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        by_kind = dict(self._conn.execute("SELECT kind, count(*) FROM events GROUP BY kind"))
        by_source = dict(self._conn.execute("SELECT source, count(*) FROM events GROUP BY source"))
        return {"total": sum(by_kind.values()), "by_kind": by_kind, "by_source": by_source}

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def iter_events(self, batch: int = 500) -> Iterator[dict[str, Any]]:
        """Every stored event in arrival order, as its canonical map."""
        last = 0
        while True:
            rows = self._conn.execute(
                "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            for seq, body in rows:
                ev: dict[str, Any] = msgpack.unpackb(body, raw=False)
                ev["seq"] = seq
                yield ev
            last = rows[-1][0]

    # -- browsing (read-only: `events_list`, `event_get`, `events_stats`; the web UI) --------
    def list_events(
        self,
        *,
        source: str | None = None,
        kind: str | None = None,
        since: float | None = None,
        until: float | None = None,
        q: str | None = None,
        before: int | None = None,
        limit: int = 50,
        preview: int | None = 200,
    ) -> dict[str, Any]:
        """One page of stored events, newest first, matching every filter given.

        ``q`` is a case-insensitive substring of any text field, the id, the source or a
        context value; it is matched in Python after decrypting each row, so one call
        examines at most :data:`SCAN_ROWS` rows and says where to go on (``next``).
        ``preview`` cuts each text to that many characters (``None``: whole events, the
        page then also stops at :data:`PAGE_TEXT_CHARS` characters of text).
        """
        where, args = _event_filters(source, kind, since, until)
        total = None
        if q is None:
            sql = "SELECT count(*) FROM events" + (" WHERE " + " AND ".join(where) if where else "")
            total = int(self._conn.execute(sql, args).fetchone()[0])
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        sql = "SELECT seq, received, body FROM events" + (
            " WHERE " + " AND ".join(where) if where else ""
        )
        needle = q.casefold() if q else None
        out: list[dict[str, Any]] = []
        scanned = chars = 0
        last_seq: int | None = None
        more = False
        cur = self._conn.execute(sql + " ORDER BY seq DESC", args)
        while True:
            rows = cur.fetchmany(256)
            if not rows:
                break
            for seq, received, body in rows:
                if len(out) >= limit or scanned >= SCAN_ROWS or (out and chars > PAGE_TEXT_CHARS):
                    more = True
                    break
                scanned += 1
                last_seq = seq
                ev: dict[str, Any] = msgpack.unpackb(body, raw=False)
                if needle is not None and needle not in _haystack(ev):
                    continue
                ev["seq"], ev["received"] = seq, received
                if preview is not None:
                    ev = _previewed(ev, preview)
                chars += sum(len(t) for t in _texts(ev))
                out.append(ev)
            if more:
                break
        cur.close()
        return {
            "events": out,
            "next": last_seq if more else None,
            "total": total,
            "scanned": scanned,
        }

    def get_event(self, event_id: str) -> dict[str, Any]:
        """One stored event by id, whole (``not_found`` when there is none)."""
        row = self._conn.execute(
            "SELECT seq, received, body FROM events WHERE id = ?", (event_id,)
        ).fetchone()
        if row is None:
            raise PalateError("not_found", f"no event with id {event_id[:128]!r}")
        ev: dict[str, Any] = msgpack.unpackb(row[2], raw=False)
        ev["seq"], ev["received"] = row[0], row[1]
        return ev

    def event_stats(
        self, *, days: int = 30, tz_offset_s: int = 0, now: float | None = None
    ) -> dict[str, Any]:
        """What the data covers: events per day by source over the last ``days`` days,
        counts by source and kind, by hour of day, and by context value (``task``,
        ``language``, ``domain``, ``app``) over the newest :data:`STATS_SAMPLE` events.
        Days and hours are local to ``tz_offset_s`` (seconds east of UTC)."""
        now = time.time() if now is None else now
        c = self._conn
        start = (int(now + tz_offset_s) // 86_400 - (days - 1)) * 86_400 - tz_offset_s
        per_day: dict[str, dict[str, int]] = {}
        for day, source, n in c.execute(
            "SELECT date(ts + ?, 'unixepoch') AS d, source, count(*) FROM events "
            "WHERE ts >= ? GROUP BY d, source ORDER BY d",
            (tz_offset_s, start),
        ):
            per_day.setdefault(day, {})[source] = n
        by_hour = [0] * 24
        for hour, n in c.execute(
            "SELECT CAST(strftime('%H', ts + ?, 'unixepoch') AS INTEGER), count(*) FROM events "
            "GROUP BY 1",
            (tz_offset_s,),
        ):
            if hour is not None and 0 <= hour < 24:
                by_hour[hour] = n
        first, last = c.execute("SELECT min(ts), max(ts) FROM events").fetchone()
        context: dict[str, dict[str, int]] = {k: {} for k in sorted(CONTEXT_KEYS)}
        sampled = 0
        for (body,) in c.execute(
            "SELECT body FROM events ORDER BY seq DESC LIMIT ?", (STATS_SAMPLE,)
        ):
            sampled += 1
            ctx = msgpack.unpackb(body, raw=False).get("context") or {}
            for key, counts in context.items():
                value = ctx.get(key)
                if isinstance(value, str):
                    counts[value] = counts.get(value, 0) + 1
        day_names = [
            time.strftime("%Y-%m-%d", time.gmtime(start + i * 86_400 + tz_offset_s))
            for i in range(days)
        ]
        return {
            **self.counts(),
            "days": [{"day": d, "by_source": per_day.get(d, {})} for d in day_names],
            "by_hour": by_hour,
            "by_context": context,
            "context_sampled": sampled,
            "first_ts": first,
            "last_ts": last,
        }

    def get_cursors(self, adapter: str) -> dict[str, Any]:
        rows = self._conn.execute(
            "SELECT key, value FROM cursors WHERE adapter = ?", (adapter,)
        ).fetchall()
        return {k: msgpack.unpackb(v, raw=False) for k, v in rows}

    # -- small persistent state (scheduler bookkeeping and the like) -----------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        """Durably set one JSON value (its own transaction)."""
        with self._write("saving state") as c:
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                "SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def max_seq(self) -> int:
        """The newest event's sequence number (0 when empty): a cheap 'new data' watermark."""
        return int(self._conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    # -- models ----------------------------------------------------------------
    def add_model(
        self,
        *,
        base_model: str,
        meta: Mapping[str, Any],
        artifact: bytes,
        state: str = "candidate",
        forget_count: int | None = None,
    ) -> int:
        """Store a trained model (its weights are user-derived data, so they live here,
        encrypted, and never as files in the data dir). Returns the new version.

        ``forget_count``: :meth:`forget_count` when the run read its events. If a forget has
        deleted events since, the model may have learned from them: ``conflict``, nothing
        stored (forget has queued a retrain)."""
        if state not in MODEL_STATES:
            raise ValueError(f"unknown model state {state!r}")
        if state == "deployed":
            raise ValueError("use deploy_model(): exactly one version may be deployed")
        with self._write("saving the model") as c:
            if forget_count is not None and self.forget_count() != forget_count:
                raise PalateError(
                    "conflict",
                    "events were forgotten while this run trained on them; its model was not "
                    "registered (a retrain without them is queued)",
                )
            version = c.execute(
                "INSERT INTO models (created, state, base_model, meta, artifact) "
                "VALUES (?, ?, ?, ?, ?) RETURNING version",
                (time.time(), state, base_model, json.dumps(dict(meta), sort_keys=True), artifact),
            ).fetchone()[0]
            self.audit("model_added", {"version": version, "state": state})
        return int(version)

    def list_models(self) -> list[dict[str, Any]]:
        """Every version, newest first, without the artifact bytes."""
        rows = self._conn.execute(
            "SELECT version, created, state, base_model, meta, length(artifact) FROM models "
            "ORDER BY version DESC"
        ).fetchall()
        return [
            {
                "version": v,
                "created": c,
                "state": s,
                "base_model": b,
                "meta": json.loads(m),
                "size_bytes": n,
            }
            for v, c, s, b, m, n in rows
        ]

    def get_model(self, version: int | None = None) -> tuple[dict[str, Any], bytes]:
        """A version's metadata and artifact; ``None`` means the deployed one, else the newest."""
        if version is None:
            row = self._conn.execute(
                "SELECT version, created, state, base_model, meta, artifact FROM models "
                "ORDER BY state = 'deployed' DESC, version DESC LIMIT 1"
            ).fetchone()
        else:
            row = self._conn.execute(
                "SELECT version, created, state, base_model, meta, artifact FROM models "
                "WHERE version = ?",
                (version,),
            ).fetchone()
        if row is None:
            what = "no model has been trained yet" if version is None else f"no model {version}"
            raise PalateError("not_found", f"{what}; train one with `palate train`")
        v, c, s, b, m, art = row
        return {
            "version": v,
            "created": c,
            "state": s,
            "base_model": b,
            "meta": json.loads(m),
        }, bytes(art)

    def update_model(
        self, version: int, *, state: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Change a version's state and/or merge keys into its metadata (gate results)."""
        if state is not None and state not in MODEL_STATES:
            raise ValueError(f"unknown model state {state!r}")
        if state == "deployed":
            raise ValueError("use deploy_model(): exactly one version may be deployed")
        info, _ = self.get_model(version)
        merged = {**info["meta"], **dict(meta or {})}
        with self._write("updating the model") as c:
            c.execute(
                "UPDATE models SET state = coalesce(?, state), meta = ? WHERE version = ?",
                (state, json.dumps(merged, sort_keys=True), version),
            )
            self.audit("model_updated", {"version": version, "state": state})

    def deployed_version(self) -> int | None:
        row = self._conn.execute("SELECT version FROM models WHERE state = 'deployed'").fetchone()
        return None if row is None else int(row[0])

    # Policy adapters (docs/generation.md) are rows of this table with meta kind "policy";
    # one is never the deployed reward model: the one serving generation is named in meta.
    def deployed_policy(self) -> int | None:
        value = self.get_meta(POLICY_DEPLOYED)
        return None if value is None else int(value)

    def deploy_policy(self, version: int, *, how: str, reason: str) -> int | None:
        """Make ``version`` (a policy adapter) the one generation samples from; returns the
        previous one."""
        with self._write("deploying the policy") as c:
            row = c.execute("SELECT meta FROM models WHERE version = ?", (version,)).fetchone()
            if row is None or json.loads(row[0]).get("kind") != POLICY_KIND:
                raise PalateError("not_found", f"no policy adapter version {version}")
            previous = self.get_meta(POLICY_DEPLOYED)
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                "SET value = excluded.value",
                (POLICY_DEPLOYED, json.dumps(version)),
            )
            self.audit(
                "deploy_policy",
                {"version": version, "previous": previous, "how": how, "reason": reason},
            )
        return None if previous is None else int(previous)

    def deploy_model(self, version: int, *, how: str, reason: str) -> int | None:
        """Make ``version`` the one deployed model, atomically; return the previous one.

        The old deployed version becomes ``retired`` in the same transaction, so a crash
        can never leave zero or two deployed versions. ``how`` records why (``gate``,
        ``override``, ``rollback``) for the history the user sees.
        """
        with self._write("deploying the model") as c:
            row = c.execute("SELECT meta FROM models WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise PalateError("not_found", f"no model version {version}")
            if json.loads(row[0]).get("kind") == POLICY_KIND:
                raise PalateError(
                    "conflict", f"version {version} is a policy adapter, not a reward model"
                )
            prev_row = c.execute("SELECT version FROM models WHERE state = 'deployed'").fetchone()
            previous = None if prev_row is None else int(prev_row[0])
            if previous == version:
                return previous
            c.execute("UPDATE models SET state = 'retired' WHERE state = 'deployed'")
            c.execute("UPDATE models SET state = 'deployed' WHERE version = ?", (version,))
            c.execute(
                "INSERT INTO deployments (ts, version, previous, how, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                (time.time(), version, previous, how, reason),
            )
            self.audit("deploy", {"version": version, "previous": previous, "how": how})
        return previous

    def rollback_target(self) -> int | None:
        """The version that was deployed before the current one (and still has weights)."""
        row = self._conn.execute(
            "SELECT d.previous FROM deployments d JOIN models m ON m.version = d.previous "
            "WHERE d.version = (SELECT version FROM models WHERE state = 'deployed') "
            "ORDER BY d.seq DESC LIMIT 1"
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def deployments(self) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT ts, version, previous, how, reason FROM deployments ORDER BY seq DESC"
        ).fetchall()
        return [
            {"ts": t, "version": v, "previous": p, "how": h, "reason": r} for t, v, p, h, r in rows
        ]

    def prune_models(self, keep: int) -> list[int]:
        """Delete old versions beyond the newest ``keep``, never the deployed version or
        the one a rollback would return to. Returns the versions deleted."""
        protected = {self.deployed_version(), self.rollback_target(), self.deployed_policy()}
        versions = [
            int(r[0])
            for r in self._conn.execute("SELECT version FROM models ORDER BY version DESC")
        ]
        doomed = [v for v in versions[keep:] if v not in protected]
        if not doomed:
            return []
        with self._write("pruning models") as c:
            marks = ",".join("?" * len(doomed))
            c.execute(f"DELETE FROM deployments WHERE version IN ({marks})", doomed)
            c.execute(f"UPDATE deployments SET previous = NULL WHERE previous IN ({marks})", doomed)
            c.execute(f"DELETE FROM models WHERE version IN ({marks})", doomed)
            self.audit("prune", {"deleted": doomed})
        return doomed

    # -- review queue (migration 3; docs/protocol.md `review_list`) ----------------------
    def add_review_item(self, item: Mapping[str, Any], *, now: float | None = None) -> bool:
        """Queue one question ``{id, source, prompt, a, b, why, info, p, version}``.

        An item asked before and answered (or skipped) is never queued again: its row stays,
        without the texts, as the memory of that. An open item offered again takes the newer
        score (``info``, ``p``, ``version``) and a fresh expiry. Expired open items are
        dropped, and past :data:`REVIEW_MAX_OPEN` the least informative open ones go.
        Returns whether the question is open now.
        """
        now = time.time() if now is None else now
        body = self._packer.pack(
            {k: item[k] for k in ("prompt", "a", "b", "why", "extra") if k in item}
        )
        with self._write("queueing a review item") as c:
            c.execute("DELETE FROM review_items WHERE state = 'open' AND expires <= ?", (now,))
            row = c.execute(
                "INSERT INTO review_items (id, created, expires, source, state, info, p, "
                "version, body) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET info = excluded.info, p = excluded.p, "
                "version = excluded.version, body = excluded.body, expires = excluded.expires "
                "WHERE state = 'open' RETURNING state",
                (
                    item["id"],
                    now,
                    now + REVIEW_TTL_S,
                    item["source"],
                    item.get("info"),
                    item.get("p"),
                    item.get("version"),
                    body,
                ),
            ).fetchone()
            c.execute(
                "DELETE FROM review_items WHERE id IN (SELECT id FROM review_items "
                "WHERE state = 'open' ORDER BY " + _REVIEW_ORDER + " LIMIT -1 OFFSET ?)",
                (REVIEW_MAX_OPEN,),
            )
            kept = c.execute(
                "SELECT 1 FROM review_items WHERE id = ? AND state = 'open'", (item["id"],)
            ).fetchone()
        return row is not None and kept is not None

    def list_review(self, limit: int = 20, *, now: float | None = None) -> list[dict[str, Any]]:
        """Open, unexpired questions, the most valuable label first (``info`` desc, then the
        closest call, then the newest)."""
        now = time.time() if now is None else now
        rows = self._conn.execute(
            "SELECT id, created, expires, source, info, p, version, body FROM review_items "
            "WHERE state = 'open' AND expires > ? ORDER BY " + _REVIEW_ORDER + " LIMIT ?",
            (now, limit),
        ).fetchall()
        return [_review_item(*r) for r in rows]

    def rescore_review(
        self, updates: Sequence[tuple[str, float, float, int, str, Mapping[str, Any]]]
    ) -> int:
        """New scores ``(id, info, p, version, why, extra)`` for open items (after a deploy);
        items answered or gone meanwhile are left alone. Returns how many changed."""
        n = 0
        with self._write("re-scoring review items") as c:
            for item_id, info, p, version, why, extra in updates:
                row = c.execute(
                    "SELECT body FROM review_items WHERE id = ? AND state = 'open'", (item_id,)
                ).fetchone()
                if row is None or row[0] is None:
                    continue
                content = msgpack.unpackb(row[0], raw=False)
                content.update(why=why, extra=dict(extra))
                n += c.execute(
                    "UPDATE review_items SET info = ?, p = ?, version = ?, body = ? "
                    "WHERE id = ? AND state = 'open'",
                    (info, p, version, self._packer.pack(content), item_id),
                ).rowcount
        return n

    def review_counts(self, *, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        c = self._conn
        opened = c.execute(
            "SELECT count(*) FROM review_items WHERE state = 'open' AND expires > ?", (now,)
        ).fetchone()[0]
        done = dict(
            c.execute(
                "SELECT answer, count(*) FROM review_items WHERE state = 'answered' "
                "GROUP BY answer"
            ).fetchall()
        )
        return {"open": int(opened), **{k: int(v) for k, v in done.items()}}

    def answer_review(
        self,
        item_id: str,
        answer: str,
        to_event: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        now: float | None = None,
    ) -> tuple[dict[str, Any], IngestResult | None]:
        """Close an open question with ``answer`` and, in the same transaction, store the
        event ``to_event(item)`` makes of it (None: nothing to learn, e.g. a tie or a skip).
        The texts leave the queue row; only the fact that it was answered stays."""
        now = time.time() if now is None else now
        with self._write("answering a review item") as c:
            row = c.execute(
                "SELECT id, created, expires, source, info, p, version, body, state "
                "FROM review_items WHERE id = ?",
                (item_id,),
            ).fetchone()
            if row is None or (row[8] == "open" and row[2] <= now):
                raise PalateError(
                    "not_found",
                    f"no open review item {item_id[:64]!r} (it may have expired or been "
                    "forgotten); `palate review list` shows the open ones",
                    {"id": item_id[:128]},
                )
            if row[8] != "open":
                raise PalateError(
                    "conflict",
                    f"review item {item_id[:64]!r} was already answered",
                    {"id": item_id[:128], "state": row[8]},
                )
            item = _review_item(*row[:8])
            event = to_event(item)
            result = None
            if event is not None:
                (result,) = self._insert_group(IngestGroup([event]), now)
            c.execute(
                "UPDATE review_items SET state = 'answered', answer = ?, answered = ?, "
                "body = NULL, event_id = ? WHERE id = ?",
                (answer, now, None if result is None else result.id, item_id),
            )
        return item, result

    def forget_review(
        self,
        *,
        ids: Sequence[str] | None = None,
        source: str | None = None,
        since: float | None = None,
        until: float | None = None,
        everything: bool = False,
    ) -> int:
        """Delete review items with the selectors of :meth:`forget` (same AND semantics):
        ``ids`` are event ids (an answered item goes with the event it became), ``source``
        the item's own source (and, for ``review``, every answered item), ``since``/``until``
        its creation time. Call it before :meth:`forget`, whose VACUUM then wipes the pages."""
        where: list[str] = []
        args: list[Any] = []
        if not everything:
            if ids is not None:
                where.append(f"event_id IN ({','.join('?' * len(ids))})")
                args.extend(ids)
            if source is not None:
                where.append("(source = ? OR (? = 'review' AND state = 'answered'))")
                args.extend([source, source])
            if since is not None:
                where.append("created >= ?")
                args.append(since)
            if until is not None:
                where.append("created < ?")
                args.append(until)
            if not where:
                raise PalateError("invalid_request", "forget needs a selector")
        sql = "DELETE FROM review_items" + (" WHERE " + " AND ".join(where) if where else "")
        with self._write("forgetting review items") as c:
            n = int(c.execute(sql, args).rowcount)
            self.audit("forget_review", {"deleted": n, "all": everything, "source": source})
        return n

    # -- federation (migration 4; docs/federated.md) ---------------------------------------
    def record_federated_round(
        self,
        *,
        federation: str,
        round: int,
        noise_multiplier: float,
        clipping_norm: float,
        delta: float,
        epsilon: float,
    ) -> int:
        """Add one round this user took part in to the privacy ledger (before its update is
        sent: a crash between the two over-counts, never under-counts). ``epsilon`` is the
        total spent with this round included. Returns the ledger entry's number."""
        with self._write("recording a federated round") as c:
            row = c.execute(
                "INSERT INTO federation_rounds (ts, federation, round, noise_multiplier, "
                "clipping_norm, delta, epsilon) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (
                    time.time(),
                    federation,
                    int(round),
                    float(noise_multiplier),
                    float(clipping_norm),
                    float(delta),
                    float(epsilon),
                ),
            ).fetchone()
        return int(row[0])

    def federated_rounds(self, federation: str | None = None) -> list[dict[str, Any]]:
        """The privacy ledger, oldest first (all federations unless one is named)."""
        sql = (
            "SELECT seq, ts, federation, round, noise_multiplier, clipping_norm, delta, epsilon "
            "FROM federation_rounds"
        )
        args: tuple[Any, ...] = ()
        if federation is not None:
            sql += " WHERE federation = ?"
            args = (federation,)
        cols = ("seq", "ts", "federation", "round", "noise_multiplier", "clipping_norm")
        return [
            dict(zip((*cols, "delta", "epsilon"), r, strict=True))
            for r in self._conn.execute(sql + " ORDER BY seq", args)
        ]

    def set_federated_adapter(
        self, federation: str, meta: Mapping[str, Any], arrays: bytes
    ) -> None:
        """Keep the latest shared (global) LoRA/head weights of a federation: the starting
        point the nightly run may use. Weights derived from others' data live encrypted
        here like the user's own models."""
        with self._write("saving the federated adapter") as c:
            c.execute(
                "INSERT INTO federation_adapters (federation, updated, meta, arrays) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(federation) DO UPDATE SET "
                "updated = excluded.updated, meta = excluded.meta, arrays = excluded.arrays",
                (federation, time.time(), json.dumps(dict(meta), sort_keys=True), arrays),
            )

    def federated_adapter(
        self, federation: str | None = None
    ) -> tuple[dict[str, Any], bytes] | None:
        """The newest shared adapter (of ``federation``, else of any): (meta, arrays)."""
        sql = "SELECT federation, updated, meta, arrays FROM federation_adapters"
        args: tuple[Any, ...] = ()
        if federation is not None:
            sql += " WHERE federation = ?"
            args = (federation,)
        row = self._conn.execute(sql + " ORDER BY updated DESC LIMIT 1", args).fetchone()
        if row is None:
            return None
        meta = {**json.loads(row[2]), "federation": row[0], "updated": row[1]}
        return meta, bytes(row[3])

    # -- the frozen-prefix cache (issue 15; runtime/training_child.py) ----------------------
    # Activations of the frozen base blocks for each training example, so a night after a
    # few new events runs only those through the frozen blocks. Derived from the user's text,
    # so it lives in this encrypted database, is bounded in size, and is emptied by every
    # forget (a forget cannot tell which rows came from the forgotten events). ``base`` is
    # the base model's content hash: rows of another base are never read and are dropped.

    def frozen_cache_get(self, base: str, key: str) -> bytes | None:
        """One example's packed activations under ``base``, or None."""
        row = self._conn.execute(
            "SELECT arrays FROM frozen_cache WHERE key = ? AND base = ?", (key, base)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def frozen_cache_put(
        self,
        base: str,
        entries: Mapping[str, bytes],
        used: Sequence[str],
        max_bytes: int,
    ) -> dict[str, int]:
        """Keep ``entries`` (key -> packed activations) for ``base``, mark ``used`` keys as
        read tonight, drop every row of another base, then the least recently used rows
        until the cache holds at most ``max_bytes`` (0: drop all). One transaction. Returns
        ``{rows, bytes, added, evicted}``."""
        now = time.time()
        with self._write("keeping the frozen-prefix cache") as c:
            evicted = c.execute("DELETE FROM frozen_cache WHERE base != ?", (base,)).rowcount
            for i in range(0, len(used), 500):
                chunk = list(used[i : i + 500])
                c.execute(
                    f"UPDATE frozen_cache SET used = ? WHERE key IN ({','.join('?' * len(chunk))})",
                    (now, *chunk),
                )
            c.executemany(
                "INSERT INTO frozen_cache (key, base, used, bytes, arrays) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET used = excluded.used",
                [(k, base, now, len(v), v) for k, v in entries.items()],
            )
            total = int(c.execute("SELECT COALESCE(SUM(bytes), 0) FROM frozen_cache").fetchone()[0])
            if total > max_bytes:
                rows = c.execute(
                    "SELECT key, bytes FROM frozen_cache ORDER BY used, key"
                ).fetchall()
                drop = []
                for key, size in rows:
                    if total <= max_bytes:
                        break
                    drop.append(key)
                    total -= int(size)
                c.executemany("DELETE FROM frozen_cache WHERE key = ?", [(k,) for k in drop])
                evicted += len(drop)
            n = int(c.execute("SELECT COUNT(*) FROM frozen_cache").fetchone()[0])
        return {"rows": n, "bytes": total, "added": len(entries), "evicted": evicted}

    def frozen_cache_epoch(self) -> int:
        """How many forgets emptied the cache, ever: a run reads it before it reads the
        events and keeps nothing if it changed by the end (its activations may hold
        forgotten text)."""
        return int(self.get_meta(FROZEN_EPOCH_KEY, 0))

    def _forget_frozen(self, c: sqlite.Connection) -> None:
        """Inside a forget's transaction: empty the frozen-prefix cache (a row cannot be
        traced back to its events cheaply) and count it (:meth:`frozen_cache_epoch`)."""
        c.execute("DELETE FROM frozen_cache")
        c.execute(
            "INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT(key) DO UPDATE "
            "SET value = CAST(value AS INTEGER) + 1",
            (FROZEN_EPOCH_KEY,),
        )

    def frozen_cache_stats(self) -> dict[str, int]:
        """``{rows, bytes}`` of the frozen-prefix cache."""
        n, size = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM frozen_cache"
        ).fetchone()
        return {"rows": int(n), "bytes": int(size)}

    def integrity_check(self) -> str:
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])

    def schema_version(self) -> int:
        return int(self._conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])

    def close(self) -> None:
        self.checkpoint()
        self._conn.close()


def export_jsonl(events: Iterator[Mapping[str, Any]], path: Path, *, overwrite: bool) -> int:
    """Write events as JSONL to a path the user chose, atomically, mode 0600.

    The user asked for plaintext here, at this path, so this is the one place
    Palate writes their data unencrypted. A partial export never appears under
    the final name.

    The directory may be one other users can write to (``/tmp``, a shared folder), so the
    data goes through a private temp file: ``mkstemp`` in the target directory (a random
    name, ``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600), never a name someone could create first to
    read along or to point a symlink at. It is then renamed into place, which replaces a
    symlink at the final name instead of writing through it; without ``overwrite`` the name
    is claimed with ``link(2)``, which fails if anything, a symlink included, is there.
    """
    path = path.expanduser()
    if not path.is_absolute():
        raise PalateError("invalid_request", f"export path must be absolute, got {str(path)!r}")
    if not path.parent.is_dir():
        raise PalateError("not_found", f"directory {path.parent} does not exist")
    if os.path.lexists(path) and not overwrite:
        raise PalateError("conflict", f"{path} already exists; pass overwrite to replace it")
    # OSError (a name too long...) propagates as is: the caller maps it.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name[:180]}.", suffix=".partial", dir=path.parent
    )
    tmp = Path(tmp_name)
    n = 0
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ev in events:
                out = {k: v for k, v in ev.items() if k not in ("seq", "v")}
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _claim(tmp, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.EEXIST:
            raise PalateError(
                "conflict", f"{path} already exists; pass overwrite to replace it"
            ) from e
        if e.errno == errno.ENAMETOOLONG:
            raise PalateError(
                "invalid_request", f"export path {str(path)[:200]} is too long"
            ) from e
        if e.errno == errno.ENOSPC:
            raise PalateError("storage_full", f"the disk is full; export to {path} failed") from e
        raise PalateError("storage_error", f"export to {path} failed: {e.strerror}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _claim(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless something (a symlink included) has it."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links on this file system: check, then rename (a small race, no worse).
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from e
        os.replace(tmp, path)
        return
    tmp.unlink()


def _table_counts(conn: sqlite.Connection, schema: str = "main") -> dict[str, int]:
    names = [
        r[0] for r in conn.execute(f"SELECT name FROM {schema}.sqlite_master WHERE type = 'table'")
    ]
    return {
        n: int(conn.execute(f'SELECT count(*) FROM {schema}."{n}"').fetchone()[0]) for n in names
    }


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reencrypt(path: Path, old: bytes, new: bytes) -> None:
    """Re-encrypt the database at ``path`` from key ``old`` to key ``new``, crash-safe.

    SQLCipher's ``sqlcipher_export()`` copies every table into a new file encrypted with
    ``new`` (``<db>.rekey``, 0600). That copy is fsynced and verified (it opens with ``new``,
    ``quick_check`` passes, every table has the same number of rows), and only then renamed
    over the database. At every moment the file named ``palate.db`` is a complete database
    under exactly one of the two keys, which is what lets ``KeyManager.settle`` finish or
    undo an interrupted rekey. Needs the database to itself (the daemon stopped).
    """
    tmp = path.with_name(path.name + ".rekey")

    def clean_tmp() -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)

    clean_tmp()
    conn = sqlite.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA cipher_log_level = NONE")
        conn.execute(f"PRAGMA key = \"x'{bytes(old).hex()}'\"")
        conn.execute("PRAGMA busy_timeout = 5000")
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy or frames != done:
            raise PalateError(
                "busy", "another process is using the database; stop the daemon and retry"
            )
        before = _table_counts(conn)
        old_umask = os.umask(0o077)
        try:
            conn.execute("ATTACH DATABASE ? AS rekeyed KEY ?", (str(tmp), f"x'{bytes(new).hex()}'"))
        finally:
            os.umask(old_umask)
        conn.execute("SELECT sqlcipher_export('rekeyed')").fetchall()
        conn.execute("DETACH DATABASE rekeyed")
    except sqlite.Error as e:
        conn.close()
        clean_tmp()
        raise storage_error(e, "re-encrypting the database", path) from e
    except BaseException:
        conn.close()
        clean_tmp()
        raise
    conn.close()
    try:
        os.chmod(tmp, 0o600)
        _fsync_path(tmp)
        check_key(tmp, new, thorough=True)
        probe = sqlite.connect(f"file:{quote(str(tmp))}?mode=ro", uri=True)
        try:
            probe.execute("PRAGMA cipher_log_level = NONE")
            probe.execute(f"PRAGMA key = \"x'{bytes(new).hex()}'\"")
            after = _table_counts(probe)
        finally:
            probe.close()
        if after != before:
            raise PalateError(
                "storage_error",
                "the re-encrypted copy does not hold the same rows; the database was left "
                "as it was",
                {"before": before, "after": after},
            )
        wal = Path(f"{path}-wal")
        if wal.exists() and wal.stat().st_size:
            raise PalateError(
                "busy", "another process is using the database; stop the daemon and retry"
            )
        for suffix in ("-wal", "-shm"):  # the old database's; they must not meet the new one
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        clean_tmp()
        raise


def check_key(path: Path, key: bytes | bytearray, *, thorough: bool = False) -> None:
    """Raise ``key_error`` unless ``key`` opens the database at ``path`` (read-only probe).

    With ``thorough`` (the daemon, before it opens the store for writing) every page in use
    is read too (``quick_check``: each page's HMAC and the b-tree structure), so damage past
    page 1 is reported as ``storage_error`` before anything is written over it. Read-only
    on purpose: a writable connection would fold a leftover WAL into the file on close.
    """
    conn = sqlite.connect(f"file:{quote(str(path))}?mode=ro", uri=True, check_same_thread=False)
    try:
        conn.execute("PRAGMA cipher_log_level = NONE")
        conn.execute(f"PRAGMA key = \"x'{bytes(key).hex()}'\"")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")] if thorough else []
    except sqlite.DatabaseError as e:
        raise storage_error(
            e, "opening the database" if thorough else "checking the key", path
        ) from e
    finally:
        conn.close()
    if problems and problems != ["ok"]:
        lines = [ln for ln in problems[0].splitlines() if not ln.startswith("***")]
        first = (lines or [problems[0]])[0]
        raise PalateError(
            "storage_error",
            f"the database {path} is damaged ({first[:200]}); nothing was written to it. "
            "Restore it from a backup, or move it aside to start an empty one (the key stays).",
            {"problems": [p[:500] for p in problems]},
        )
