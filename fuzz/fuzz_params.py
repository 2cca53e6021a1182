"""Coverage-guided fuzzing of every wire method's parameter validation (atheris / libFuzzer).

The methods are the daemon's own method table and their parameter names are asked of the
daemon (fuzz/contract.py), so a new method or parameter is fuzzed without editing this file.
Input layout (the seed corpus in fuzz/corpus/params/ is written this way):

* byte 0, mode 0: the rest is msgpack ``[method, params]``, decoded with the daemon's own
  decoder configuration (so only values the wire can carry; invalid UTF-8 arrives as lone
  surrogates, as it does from a socket);
* mode 1: byte 1 picks the method; then one byte per parameter (sorted by name) picks absent,
  an edge value of the right type, or a value of the wrong type (contract.edge_values);
* mode 2: like mode 1, then the rest is msgpack for one more parameter (known or not).

Each call goes straight to ``Api.dispatch`` over a real SQLCipher store (fuzz/inproc.py),
and its answer is encoded as the server would. Checked per input: no exception but a
PalateError; its code is one docs/protocol.md documents for that method (``unavailable`` too
for the methods this in-process daemon runs without a trainer/scorer), never ``internal``;
the result can be sent (msgpack-encodable); the store is not left inside a transaction;
time and heap bounded as in fuzz_decoder.py. ``train`` is never given valid parameters.

Run: ``.venv/bin/python fuzz/fuzz_params.py fuzz/corpus/params -max_total_time=60``.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import atheris

with atheris.instrument_imports(include=["palate", "inproc", "contract"]):
    import contract
    import inproc

    from palate.errors import PalateError
    from palate.wire import protocol

ENV: inproc.Env | None = None
METHODS: list[str] = []
ALLOWED: dict[str, list[str]] = {}
CODES: dict[str, set[str]] = {}


def _setup() -> inproc.Env:
    global ENV
    env = inproc.make_env()
    METHODS.extend(contract.method_table())
    ALLOWED.update(env.run(contract.probe_allowed(env.api)))
    for m in METHODS:
        CODES[m] = contract.allowed_codes(m) | ({"unavailable"} if m in inproc.DETACHED else set())
    ENV = env
    return env


def _decode(data: bytes) -> Any:
    u = protocol.make_unpacker()
    u.feed(data)
    try:
        return next(u)
    except Exception:  # not a complete or valid msgpack value: the wire would refuse it
        return None


def build(data: bytes, sandbox: str) -> tuple[str, Any]:
    """Turn the input bytes into (method, params)."""
    if not data:
        return "hello", {}
    mode = data[0] % 3
    if mode == 0:
        obj = _decode(data[1:])
        if isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str):
            return obj[0], obj[1]
        return METHODS[zlib.crc32(data) % len(METHODS)], obj
    method = METHODS[data[1] % len(METHODS)] if len(data) > 1 else METHODS[0]
    params: dict[str, Any] = {}
    pos = 2
    for name in sorted(ALLOWED[method]):
        pick = data[pos] if pos < len(data) else 0
        pos += 1
        if pick < 64:
            continue  # absent
        edges = contract.edge_values(contract.PARAM_TYPES[name], sandbox)
        wrong = contract.wrong_type_values()
        params[name] = edges[pick % len(edges)] if pick < 200 else wrong[pick % len(wrong)]
    if mode == 2 and pos < len(data):
        names = [*sorted(ALLOWED[method]), "unknown", ""]
        params[names[data[pos] % len(names)]] = _decode(data[pos + 1 :])
    return method, params


def _invalid_for_heavy(method: str, params: Any) -> Any:
    """``train`` with valid params would start a run: make sure they are not valid."""
    if method not in contract.HEAVY:
        return params
    if isinstance(params, dict) and params:
        for name, value in params.items():
            if name not in ALLOWED[method]:
                return params
            kind = contract.PARAM_TYPES[name]
            if value is not None and not _typed(kind, value):
                return params
    return {**(params if isinstance(params, dict) else {}), "fuzz_unknown": 1}


def _typed(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return True


def test_one_input(data: bytes) -> None:
    env = ENV or _setup()
    env.tick()
    method, params = build(data, str(env.sandbox))
    params = contract.sandbox_params(method, params, str(env.sandbox))
    params = _invalid_for_heavy(method, params)
    if not isinstance(params, dict):
        # The envelope parser turns [] / [map] / nil into a map and refuses the rest: what
        # reaches dispatch is always a map. Check the parser on it, then go on with a map.
        try:
            params = protocol.parse_message([0, 1, method, params]).params
        except PalateError as e:
            if e.code != "invalid_request":
                raise inproc.Violation(f"envelope error {e.code}") from e
            return
    with inproc.MemoryBound() as mem:
        try:
            result = env.run(env.api.dispatch(method, params))
            error = None
        except PalateError as e:
            result, error = None, e
        try:
            wire = protocol.response(1, error, result)
        except Exception as e:
            raise inproc.Violation(f"{method}: the answer cannot be encoded ({e!r})") from e
        mem.check(len(data), env)
    if error is not None:
        allowed = CODES.get(method, {"unknown_method"})
        if error.code not in allowed:
            raise inproc.Violation(
                f"{method}: code {error.code!r} ({error.message[:200]!r}) is not one the "
                f"docs name for it {sorted(allowed)}"
            )
    inproc.check_output(wire)
    if env.in_transaction():
        raise inproc.Violation(f"{method}: the store was left inside a transaction")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
