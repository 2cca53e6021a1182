"""The wire format: msgpack-RPC over a Unix stream socket.

Messages follow the msgpack-RPC spec (as Neovim uses it):

* request ``[0, msgid, method, params]`` (params: a map, or an empty array),
* response ``[1, msgid, error, result]`` (error ``None`` or ``{code, message, details}``),
* notification ``[2, method, params]``.

This module knows nothing about storage or models. It owns the limits, the
decoder configuration that enforces them, and turning raw objects into
validated :class:`Request` values. docs/protocol.md is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from palate.errors import PalateError, brief

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2

#: The largest single message a peer may send. The decoder refuses to buffer more.
MAX_FRAME_BYTES = 4 * 1024 * 1024
#: Strings, byte strings, arrays and maps are capped inside the decoder, so a
#: hostile length prefix cannot make us allocate before validation runs.
MAX_STR_BYTES = 1024 * 1024
MAX_ARRAY_LEN = 10_000
MAX_MAP_LEN = 256
#: Elements of all the containers of one message together (a map entry counts twice, each
#: container once more for itself). The per-container caps above do not bound a message:
#: 4 MiB of tiny nested containers (one byte each on the wire, ~80 bytes each decoded) made
#: ~255 MiB. With this cap one message decodes to at most ~25 MiB of objects, plus its
#: strings. A full ``ingest_batch`` (2000 events) needs under 100,000.
MAX_DECODED_ELEMENTS = 262_144
#: Requests one connection may have outstanding before it is answered ``busy``.
MAX_IN_FLIGHT = 64
#: Concurrent connections; one more is answered ``busy`` and closed.
MAX_CONNECTIONS = 128
#: A connection that sends nothing for this long is closed (slowloris guard).
IDLE_TIMEOUT_S = 300.0
#: A connection that reads none of its answers for this long (its socket buffer full, our
#: write blocked) is closed and its queued answers dropped: a client that never reads must
#: not hold memory and a connection slot for ever.
SEND_TIMEOUT_S = 60.0
MAX_METHOD_LEN = 64
MAX_MSGID = 2**32 - 1

LIMITS: dict[str, int | float] = {
    "max_frame_bytes": MAX_FRAME_BYTES,
    "max_str_bytes": MAX_STR_BYTES,
    "max_array_len": MAX_ARRAY_LEN,
    "max_map_len": MAX_MAP_LEN,
    "max_decoded_elements": MAX_DECODED_ELEMENTS,
    "max_in_flight": MAX_IN_FLIGHT,
    "max_connections": MAX_CONNECTIONS,
    "idle_timeout_s": IDLE_TIMEOUT_S,
    "send_timeout_s": SEND_TIMEOUT_S,
}


class DecodeBudget:
    """The decoded-size bound of one message (:data:`MAX_DECODED_ELEMENTS`).

    msgpack calls the hooks as each array or map is completed; past the budget they raise
    ``ValueError`` ("exceeds max ..."), which comes out of ``unpack()`` (``too_large``), so
    the rest of the message is never built. :meth:`reset` before each message.
    """

    __slots__ = ("left", "limit")

    def __init__(self, limit: int = MAX_DECODED_ELEMENTS) -> None:
        self.limit = limit
        self.left = limit

    def reset(self) -> None:
        self.left = self.limit

    def _spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError(
                f"message exceeds max decoded elements ({self.limit} container elements)"
            )

    def list_hook(self, obj: list[Any]) -> list[Any]:
        self._spend(len(obj) + 1)
        return obj

    def object_hook(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        self._spend(2 * len(obj) + 1)
        return obj


def make_unpacker(budget: DecodeBudget | None = None) -> msgpack.Unpacker:
    """A streaming decoder configured with every limit.

    ``unicode_errors='surrogateescape'`` lets a string with invalid UTF-8 through
    the decoder as lone surrogates, so event validation can name the exact field
    that is not UTF-8 instead of dropping the whole connection. With ``budget`` the
    decoded size of a message is bounded too (reset it before each message).
    """
    hooks: dict[str, Any] = {}
    if budget is not None:
        hooks = {"list_hook": budget.list_hook, "object_hook": budget.object_hook}
    return msgpack.Unpacker(
        **hooks,
        raw=False,
        strict_map_key=True,
        unicode_errors="surrogateescape",
        max_buffer_size=MAX_FRAME_BYTES,
        max_str_len=MAX_STR_BYTES,
        max_bin_len=MAX_STR_BYTES,
        max_array_len=MAX_ARRAY_LEN,
        max_map_len=MAX_MAP_LEN,
        max_ext_len=0,
    )


def pack(obj: Any) -> bytes:
    """Encode one message. Bytes stay bin, str stays str (use_bin_type)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


@dataclass(frozen=True)
class Request:
    """A parsed message from a client: a request (msgid set) or a notification."""

    msgid: int | None
    method: str
    params: dict[str, Any]


def parse_message(obj: Any) -> Request:
    """Validate the envelope of one decoded object.

    Raises :class:`PalateError` (``invalid_request``). When the envelope carried
    a usable msgid, it is in ``details['msgid']`` so the caller can answer it.
    """
    if not isinstance(obj, (list, tuple)) or not obj:
        raise PalateError("invalid_request", "a message must be a non-empty msgpack array")
    kind = obj[0]
    if kind == REQUEST:
        if len(obj) != 4:
            raise PalateError("invalid_request", "a request is [0, msgid, method, params]")
        _, msgid, method, params = obj
        if not isinstance(msgid, int) or isinstance(msgid, bool) or not 0 <= msgid <= MAX_MSGID:
            raise PalateError("invalid_request", "msgid must be an integer in 0..2**32-1")
    elif kind == NOTIFICATION:
        if len(obj) != 3:
            raise PalateError("invalid_request", "a notification is [2, method, params]")
        _, method, params = obj
        msgid = None
    else:
        raise PalateError(
            "invalid_request",
            f"message type {brief(kind)} is not a request (0) or notification (2)",
        )
    details = {} if msgid is None else {"msgid": msgid}
    if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_LEN:
        raise PalateError("invalid_request", "method must be a non-empty string", details)
    if isinstance(params, (list, tuple)):
        # msgpack-RPC clients in other languages often send positional params.
        # Only the empty list (no params) and a single map are accepted.
        if len(params) == 0:
            params = {}
        elif len(params) == 1 and isinstance(params[0], dict):
            params = params[0]
        else:
            raise PalateError("invalid_request", "params must be a map (or [] / [map])", details)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise PalateError("invalid_request", "params must be a map", details)
    return Request(msgid=msgid, method=method, params=params)


def response(msgid: int, error: PalateError | None, result: Any = None) -> bytes:
    return pack([RESPONSE, msgid, None if error is None else error.to_wire(), result])


def notification(method: str, params: Any) -> bytes:
    return pack([NOTIFICATION, method, params])


def connection_error(error: PalateError) -> bytes:
    """A connection-level error (no msgid to answer): sent just before closing."""
    return notification("error", error.to_wire())
