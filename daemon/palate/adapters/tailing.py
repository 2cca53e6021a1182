"""File tailing that neither loses nor duplicates across restarts, rotation and truncation.

watchdog events are only *hints* (they are lost across downtime, on inotify
overflow and for rename-based saves; see docs/plugins.md): the truth is a
reconciling scan, run at start, after every hint, on demand (``ctx.wake``,
SIGUSR1) and on a timer. Each file has a cursor

    {dev, ino, head, hlen, size, mtime, off, fid, st}

(device, inode, sha256 of the first ``hlen`` bytes, size and mtime when read,
byte offset consumed, a content-derived file id, and the parser's small state)
committed in the *same* ``ingest_batch`` as the events those bytes produced.

* **Rotation** (``a.log`` renamed to ``a.log.1``): the file is found again by
  (dev, ino, head) under its new name and continues from its offset.
* **Truncation** (size < offset): restart from 0; ids are content-derived, so
  lines read before are deduplicated by the daemon.
* **Inode reuse / rewrite in place**: same (dev, ino) but a different head
  means a different file: read it from 0.
* **Half-written last line**: bytes after the last newline are held back until
  their newline arrives.

Lines that yield no event (or only bad lines) advance the offset in memory but
cannot commit a cursor (``ingest_batch`` needs an event); after a restart they
are read again, which is harmless because parsing is deterministic.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

from palate.adapters import BATCH_EVENTS, AdapterContext, Candidate

Options = Mapping[str, "type | tuple[type, ...]"]

#: Bytes hashed to recognise a file (Filebeat's fingerprint idea; 1 KiB is cheap).
HEAD_BYTES = 1024
#: Bytes read per file per pass, which bounds memory; a longer line is skipped.
MAX_READ = 16 * 1024 * 1024
#: Parser state larger than this (JSON) is a parser bug; the cursor limit is 64 KiB.
MAX_STATE_CHARS = 48_000
#: watchdog event types that say a file changed (a hint to scan). Not ``opened`` or
#: ``closed_no_write``: reading a file, as every scan does, produces those.
CHANGE_EVENTS = frozenset({"created", "modified", "moved", "deleted", "closed"})


class BadRecord(Exception):
    """A record that cannot be used: reported (location and reason) and skipped."""


@dataclass
class Line:
    """One complete line of a tailed file, with what a parser needs to name it."""

    path: Path
    offset: int
    data: bytes
    fid: str
    adapter: str
    _fd: int = -1

    def json(self) -> Any:
        """The line as JSON, or BadRecord saying why not."""
        try:
            return json.loads(self.data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRecord("line is not valid UTF-8") from e
        except json.JSONDecodeError as e:
            raise BadRecord(f"not valid JSON ({e.msg} at column {e.colno})") from e

    def event_id(self, kind: str, sub: int = 0) -> str:
        """A deterministic id from file identity, offset and the line's own bytes.

        The same line at the same place in the same file always gets the same id,
        so replays after a crash or a truncation are deduplicated by the daemon.
        """
        h = hashlib.sha256(
            f"{self.adapter}\0{self.fid}\0{self.offset}\0{sub}\0".encode() + self.data
        ).hexdigest()
        return f"{self.adapter}:{kind}:{h[:32]}"

    def read_at(self, offset: int) -> bytes | None:
        """The line starting at ``offset`` of this file (for joins across lines)."""
        if self._fd < 0:
            return None
        return read_line_at(self._fd, offset)


def read_line_at(fd: int, offset: int, limit: int = MAX_READ) -> bytes | None:
    out = b""
    while len(out) < limit:
        chunk = os.pread(fd, 64 * 1024, offset + len(out))
        if not chunk:
            return None
        nl = chunk.find(b"\n")
        if nl >= 0:
            return out + chunk[:nl]
        out += chunk
    return None


class RecordParser(Protocol):
    """Turns one line into candidate events. Must be deterministic.

    ``state`` is a small JSON-able dict private to this file (kept in the cursor,
    so it survives restarts); keep it bounded (a few KiB). Raise BadRecord for a
    line that cannot be used.
    """

    def parse(self, line: Line, state: dict[str, Any]) -> list[Candidate]: ...


class DocumentParser(Protocol):
    """Turns a whole file (a JSON document written at once) into candidate events."""

    def parse_document(self, path: Path, data: bytes, fid: str) -> list[Candidate]: ...


@dataclass
class FileState:
    dev: int
    ino: int
    head: str = ""
    hlen: int = 0
    size: int = 0
    mtime: int = 0
    off: int = 0
    fid: str = ""
    st: dict[str, Any] = field(default_factory=dict)
    skip_to_newline: bool = False

    def cursor(self, off: int | None = None) -> dict[str, Any]:
        return {
            "dev": self.dev,
            "ino": self.ino,
            "head": self.head,
            "hlen": self.hlen,
            "size": self.size,
            "mtime": self.mtime,
            "off": self.off if off is None else off,
            "fid": self.fid,
            "st": copy.deepcopy(self.st),
        }

    @classmethod
    def from_cursor(cls, c: Mapping[str, Any]) -> FileState:
        return cls(
            dev=int(c["dev"]),
            ino=int(c["ino"]),
            head=str(c.get("head", "")),
            hlen=int(c.get("hlen", 0)),
            size=int(c.get("size", 0)),
            mtime=int(c.get("mtime", 0)),
            off=int(c.get("off", 0)),
            fid=str(c.get("fid", "")),
            st=dict(c.get("st") or {}),
        )


def head_hash(fh: IO[bytes], n: int) -> str:
    fh.seek(0)
    return hashlib.sha256(fh.read(n)).hexdigest()


class Tailer:
    """Reconciles a set of files with their committed cursors and emits new records."""

    def __init__(
        self,
        ctx: AdapterContext,
        roots: list[Path],
        patterns: list[str],
        parser: RecordParser | None = None,
        *,
        documents: list[str] | None = None,
        document_parser: DocumentParser | None = None,
        poll_interval: float = 15.0,
        watch: bool = True,
    ) -> None:
        self.ctx = ctx
        self.roots = roots
        self.patterns = patterns
        self.parser = parser
        self.documents = documents or []
        self.document_parser = document_parser
        self.poll_interval = poll_interval
        self.watch = watch
        self.files: dict[str, FileState] = {}
        self.committed: dict[str, Any] = {}
        self._seen_docs: dict[str, str] = {}
        self._observer: Any = None
        self._watched: set[str] = set()

    # -- discovery -------------------------------------------------------------------

    def candidates(self) -> list[Path]:
        """Files matching the patterns, oldest first (rotated files before their successor)."""
        found: dict[str, Path] = {}
        for root in self.roots:
            for pat in [*self.patterns, *self.documents]:
                for p in root.glob(pat):
                    if p.is_file():
                        found[str(p)] = p

        def key(p: Path) -> tuple[float, str]:
            try:
                return (p.stat().st_mtime, str(p))
            except OSError:
                return (0.0, str(p))

        return sorted(found.values(), key=key)

    def _is_document(self, path: Path) -> bool:
        return any(path.match(pat) for pat in self.documents)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self.committed = self.ctx.cursors()
        try:
            while not self.ctx.stop.is_set():
                self._ensure_watches()
                self.scan()
                self.ctx.wake.wait(self.poll_interval)
                self.ctx.wake.clear()
        finally:
            if self._observer is not None:
                self._observer.stop()
                self._observer.join(5)

    def scan(self) -> None:
        """One reconciliation pass over every matching file."""
        present = set()
        for path in self.candidates():
            if self.ctx.stop.is_set():
                return
            present.add(str(path))
            if self._is_document(path):
                self.process_document(path)
            else:
                self.process_file(path)
        for gone in set(self.files) - present:
            del self.files[gone]
        self.ctx.notify("scan", files=len(present))

    def _ensure_watches(self) -> None:
        if not self.watch:
            return
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency
            self.watch = False
            return
        wake = self.ctx.wake
        patterns = [*self.patterns, *self.documents]

        class Hint(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                # Our own scans open and read the files: watchdog reports those as
                # ``opened`` / ``closed_no_write`` (inotify IN_OPEN, IN_CLOSE_NOWRITE), and
                # waking on them made every scan trigger the next one, a busy loop of
                # thousands of scans a second per adapter. Only a change is a hint.
                if event.event_type not in CHANGE_EVENTS:
                    return
                src = str(event.src_path)
                dest = str(getattr(event, "dest_path", "") or "")
                if any(
                    fnmatch.fnmatch(Path(x).name, Path(p).name)
                    for x in (src, dest)
                    if x
                    for p in patterns
                ):
                    wake.set()

        if self._observer is None:
            self._observer = Observer()
            self._observer.daemon = True
            self._observer.start()
        for root in self.roots:
            if str(root) in self._watched or not root.is_dir():
                continue
            try:
                self._observer.schedule(Hint(), str(root), recursive=True)
                self._watched.add(str(root))
            except OSError as e:  # ENOSPC (inotify watches) etc.: the timer still works
                self.ctx.log.warning("cannot watch %s (%s); relying on periodic scans", root, e)

    # -- line files -----------------------------------------------------------------------

    def _lookup(self, path: str, fh: IO[bytes], st: os.stat_result) -> FileState:
        """This file's state: in memory, committed under this name or another, or new."""
        fs = self.files.get(path)
        if fs is not None and self._same(fs, fh, st):
            return fs
        if fs is not None:
            self.ctx.log.info("%s was replaced (new identity); reading it from the start", path)
        by_name = self.committed.get(path)
        candidates = [by_name] if isinstance(by_name, Mapping) else []
        candidates += [c for k, c in self.committed.items() if k != path and isinstance(c, Mapping)]
        for c in candidates:
            try:
                cand = FileState.from_cursor(c)
            except (KeyError, TypeError, ValueError):
                continue
            if self._same(cand, fh, st) and not self._claimed(cand, path):
                return cand
        return FileState(dev=st.st_dev, ino=st.st_ino)

    def _claimed(self, fs: FileState, path: str) -> bool:
        return any(k != path and v.dev == fs.dev and v.ino == fs.ino for k, v in self.files.items())

    @staticmethod
    def _same(fs: FileState, fh: IO[bytes], st: os.stat_result) -> bool:
        if (st.st_dev, st.st_ino) != (fs.dev, fs.ino):
            return False
        if fs.hlen == 0:
            return True
        return st.st_size >= fs.hlen and head_hash(fh, fs.hlen) == fs.head

    def process_file(self, path: Path, *, from_start: bool = False) -> None:
        """Read and emit whatever complete lines of ``path`` are new."""
        if self.parser is None:
            return
        key = str(path)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below; fd used for pread
        except OSError:
            return
        with fh:
            st = os.fstat(fh.fileno())
            fs = (
                FileState(dev=st.st_dev, ino=st.st_ino) if from_start else self._lookup(key, fh, st)
            )
            if st.st_size < fs.off:
                self.ctx.log.warning(
                    "%s shrank from %d to %d bytes (truncated); reading it again from the start",
                    key,
                    fs.off,
                    st.st_size,
                )
                fs = FileState(dev=st.st_dev, ino=st.st_ino)
            self.files[key] = fs
            if st.st_size == fs.off:
                return
            fh.seek(fs.off)
            buf = fh.read(MAX_READ)
            self._consume(path, fh, fs, buf, st)

    def _consume(
        self, path: Path, fh: IO[bytes], fs: FileState, buf: bytes, st: os.stat_result
    ) -> None:
        assert self.parser is not None
        key, pos, base = str(path), 0, fs.off
        if fs.skip_to_newline:
            nl = buf.find(b"\n")
            if nl < 0:
                fs.off += len(buf)
                return
            pos, fs.skip_to_newline = nl + 1, False
        pending: list[Candidate] = []
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            start, end = base + pos, base + nl + 1
            raw = buf[pos:nl]
            if start == 0 or not fs.fid:
                fs.fid = hashlib.sha256(buf[pos : nl + 1]).hexdigest()[:16]
            pos = nl + 1
            if raw.strip():
                line = Line(path, start, raw.rstrip(b"\r"), fs.fid, self.ctx.name, fh.fileno())
                try:
                    where = f"{key}:{start}"
                    pending.extend(
                        dataclasses.replace(c, where=where) for c in self.parser.parse(line, fs.st)
                    )
                except BadRecord as e:
                    self.ctx.report_bad(f"{key}:{start}", str(e))
            if len(pending) >= BATCH_EVENTS:
                self._commit(key, fh, fs, st, end, pending)
                pending = []
        if pos == 0 and len(buf) >= MAX_READ:
            self.ctx.report_bad(f"{key}:{base}", f"line longer than {MAX_READ} bytes; skipped")
            fs.skip_to_newline = True
            pos = len(buf)
        fs.off = base + pos
        if pending:
            self._commit(key, fh, fs, st, fs.off, pending)
        else:
            fs.size, fs.mtime = st.st_size, st.st_mtime_ns
            fs.hlen = min(st.st_size, HEAD_BYTES)
            fs.head = head_hash(fh, fs.hlen)
        if len(buf) >= MAX_READ:
            self.ctx.wake.set()  # a backlog larger than one pass: come back at once

    def _commit(
        self,
        key: str,
        fh: IO[bytes],
        fs: FileState,
        st: os.stat_result,
        off: int,
        cands: list[Candidate],
    ) -> None:
        fs.size, fs.mtime = st.st_size, st.st_mtime_ns
        fs.hlen = min(st.st_size, HEAD_BYTES)
        fs.head = head_hash(fh, fs.hlen)
        if len(json.dumps(fs.st)) > MAX_STATE_CHARS:
            self.ctx.log.error("parser state for %s exceeds %d chars; reset", key, MAX_STATE_CHARS)
            fs.st = {}
        cursor = fs.cursor(off)
        self.ctx.emit(cands, cursor=(key, cursor))
        self.committed[key] = cursor

    # -- whole documents -----------------------------------------------------------------

    def process_document(self, path: Path) -> None:
        """Parse a JSON document once it is complete; again whenever its content changes."""
        if self.document_parser is None:
            return
        key = str(path)
        try:
            data = path.read_bytes()
        except OSError:
            return
        digest = hashlib.sha256(data).hexdigest()
        if self._seen_docs.get(key) == digest:
            return
        committed = self.committed.get(key)
        if isinstance(committed, Mapping) and committed.get("sha") == digest:
            self._seen_docs[key] = digest
            return
        try:
            cands = self.document_parser.parse_document(path, data, digest[:16])
        except BadRecord as e:
            # A document still being written is not valid JSON yet: wait for a change.
            self.ctx.report_bad(key, str(e))
            self._seen_docs[key] = digest
            return
        self._seen_docs[key] = digest
        if cands:
            st = path.stat()
            cursor = {"dev": st.st_dev, "ino": st.st_ino, "sha": digest, "size": len(data)}
            self.ctx.emit(cands, cursor=(key, cursor))
            self.committed[key] = cursor


class TailingAdapter:
    """Base class for adapters that read files: declare where, and how to parse a line.

    Subclasses set ``name`` and implement :meth:`roots`, :attr:`patterns` and
    :meth:`parser` (and optionally :attr:`documents` + :meth:`document_parser`).
    Common options: ``poll_interval_s`` (reconcile timer) and ``watch`` (use
    watchdog hints).
    """

    name = "tailing"
    api_version = 1
    patterns: ClassVar[tuple[str, ...]] = ()
    documents: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[Options] = {
        "poll_interval_s": (int, float),
        "watch": bool,
    }

    def roots(self, ctx: AdapterContext) -> list[Path]:
        raise NotImplementedError

    def parser(self, ctx: AdapterContext) -> RecordParser | None:
        raise NotImplementedError

    def document_parser(self, ctx: AdapterContext) -> DocumentParser | None:
        return None

    def tailer(self, ctx: AdapterContext) -> Tailer:
        return Tailer(
            ctx,
            self.roots(ctx),
            list(self.patterns),
            self.parser(ctx),
            documents=list(self.documents),
            document_parser=self.document_parser(ctx),
            poll_interval=float(ctx.options.get("poll_interval_s", 15.0)),
            watch=bool(ctx.options.get("watch", True)),
        )

    def run(self, ctx: AdapterContext) -> None:
        self.tailer(ctx).run()

    def dry_run(self, path: Path, ctx: AdapterContext) -> None:
        """Parse one file from its first byte, sending to ``ctx`` (a DryRun sink)."""
        t = self.tailer(ctx)
        if path.suffix == ".json" and t.document_parser is not None:
            t.process_document(path)
        else:
            t.process_file(path, from_start=True)


def expand(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


__all__ = [
    "BadRecord",
    "DocumentParser",
    "FileState",
    "Line",
    "Options",
    "RecordParser",
    "Tailer",
    "TailingAdapter",
    "expand",
]
