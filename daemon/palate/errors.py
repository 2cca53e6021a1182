"""One error type for the whole library, with stable wire codes.

Every failure a client can see is a :class:`PalateError` carrying a code from
:data:`ERROR_CODES`. The codes are part of the wire contract (docs/protocol.md):
they are never renamed, and a retired code is never reused for something else.
The CLI maps them to exit codes; the socket server sends them as
``{code, message, details}``.
"""

from __future__ import annotations

from typing import Any

#: Stable error codes and what each means. Adding a code is additive; removing or
#: repurposing one is a breaking change of the api level.
ERROR_CODES: dict[str, str] = {
    "invalid_request": "The message is not a well-formed request (framing, types, params).",
    "invalid_event": "An event failed validation; details name each field and reason.",
    "too_large": "A frame, string, array or batch exceeds a documented limit.",
    "unknown_method": "The method name is not part of this api level.",
    "busy": "Too many requests in flight or queued; retry with backoff.",
    "unauthorized": "The peer is not the user who owns the daemon.",
    "not_found": "The named object (model, cursor, file) does not exist.",
    "conflict": "The request conflicts with existing state (e.g. a file that exists).",
    "storage_full": "The disk is full; nothing was written. Free space and retry.",
    "storage_error": "The encrypted store failed; nothing was acknowledged.",
    "key_error": "The data key could not be obtained or does not open the store.",
    "unavailable": "The daemon is shutting down or not running.",
    "model_error": "A model could not be loaded, trained or used.",
    "no_model": "No model is deployed yet; train one first (`palate train --wait`).",
    "internal": "A bug in Palate; the daemon kept running. Please report it.",
}


class PalateError(Exception):
    """An error with a stable code, a human message and structured details.

    The message says what happened and what to do next; details carry the data a
    program needs (field names, limits, offending indices).
    """

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_wire(self) -> dict[str, Any]:
        """The error as it travels on the socket: ``{code, message, details}``.

        Messages and details may echo pieces of the client's input, and input that was not
        valid UTF-8 arrives as lone surrogates (the decoder's surrogateescape), which msgpack
        cannot encode: those are sent as ``\\udcXX`` escapes instead.
        """
        return {
            "code": self.code,
            "message": _printable(self.message),
            "details": _printable(self.details),
        }

    @classmethod
    def from_wire(cls, obj: Any) -> PalateError:
        """Rebuild an error received from the daemon, tolerating unknown codes."""
        if not isinstance(obj, dict):
            return cls("internal", f"malformed error from daemon: {obj!r}")
        code = obj.get("code")
        message = str(obj.get("message", ""))
        raw = obj.get("details")
        details: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if code not in ERROR_CODES:
            # A newer daemon may send a code this client does not know yet.
            details = {**details, "code": code}
            code = "internal"
        return cls(str(code), message, details)

    def __repr__(self) -> str:
        return f"PalateError({self.code!r}, {self.message!r})"


def _printable(obj: Any) -> Any:
    """``obj`` with every str made UTF-8 encodable (lone surrogates backslash-escaped)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return obj.encode("utf-8", "backslashreplace").decode("utf-8")
        return obj
    if isinstance(obj, dict):
        return {_printable(k): _printable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_printable(v) for v in obj]
    return obj


def brief(value: Any, limit: int = 60) -> str:
    """A client's value, short and safe to put in an error message: the repr of a scalar
    (strings and bytes cut to ``limit``), the type name of a container. (A container's repr
    can be megabytes long, and past ~1000 nested levels it raises RecursionError.)"""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)[:limit]
    if isinstance(value, (str, bytes)):
        return repr(value[:limit])
    return type(value).__name__
