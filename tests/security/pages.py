"""Decrypt every page of a SQLCipher 4 database file and of its WAL, with the raw key.

The store opens SQLCipher with a raw 256-bit key (``PRAGMA key = "x'<hex>'"``), so the page
key *is* that key (no KDF). SQLCipher 4 defaults: 4096-byte pages, each ending in a reserve
of 16 bytes of IV and 64 bytes of HMAC-SHA512; page 1 starts with the 16-byte salt (stored in
the clear) instead of the "SQLite format 3" header; AES-256-CBC without padding. This reads
pages as they lie on disk, freed and stale ones included, which ``SELECT`` never shows: the
only way to prove that deleted text is really gone from the file and the WAL.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PAGE = 4096
RESERVE = 80  # 16 IV + 64 HMAC
SALT = 16
WAL_HEADER = 32
FRAME_HEADER = 24


def _decrypt_page(key: bytes, page: bytes, first: bool) -> bytes:
    start = SALT if first else 0
    body = page[start : PAGE - RESERVE]
    iv = page[PAGE - RESERVE : PAGE - RESERVE + 16]
    d = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return d.update(body) + d.finalize()


def decrypted_db(path: Path, key: bytes) -> bytes:
    """The plaintext of every page of the database file, in file order."""
    data = path.read_bytes() if path.exists() else b""
    out = []
    for i in range(0, len(data) - PAGE + 1, PAGE):
        out.append(_decrypt_page(key, data[i : i + PAGE], first=(i == 0)))
    return b"".join(out)


def decrypted_wal(path: Path, key: bytes) -> bytes:
    """The plaintext of every frame in a WAL file (valid, stale or not yet checkpointed)."""
    data = path.read_bytes() if path.exists() else b""
    out = []
    pos = WAL_HEADER
    while pos + FRAME_HEADER + PAGE <= len(data):
        pgno = int.from_bytes(data[pos : pos + 4], "big")
        page = data[pos + FRAME_HEADER : pos + FRAME_HEADER + PAGE]
        out.append(_decrypt_page(key, page, first=(pgno == 1)))
        pos += FRAME_HEADER + PAGE
    return b"".join(out)
