"""Write the seed corpora: fuzz/corpus/decoder/ and fuzz/corpus/params/.

Seeds are small files: a valid request for every method (every parameter set, and each
parameter alone), pipelined and positional forms, notifications, and the framing edge cases
(deep nesting, invalid UTF-8, ext types, oversize length prefixes, bad msgids, truncation).
Methods and parameter names come from the daemon (fuzz/contract.py), so rerunning this after
adding a method seeds it. Reproducers of fixed bugs live in the same folders under
``regress-*`` names (listed in ``regressions()`` below).

    .venv/bin/python fuzz/make_corpus.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import contract
import msgpack

from palate.runtime.api import Api

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

#: Paths in seeds are absolute: the harnesses re-root them into their sandbox.
VALID: dict[str, Any] = {k: contract.valid_value(k, "") for k in set(contract.PARAM_TYPES.values())}


def pack(obj: Any) -> bytes:
    """Like the wire: str as str, bytes as bin; lone surrogates go out as the raw bytes."""
    data: bytes = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape").pack(obj)
    return data


def param_sets(method: str, allowed: list[str]) -> list[dict[str, Any]]:
    full = {n: VALID[contract.PARAM_TYPES[n]] for n in allowed}
    sets = [full, {}] + [{n: full[n]} for n in allowed]
    if method in contract.HEAVY:  # never a valid train request, even as a seed
        sets = [{**s, "wait": "no"} for s in sets]
    return sets


def write(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def decoder_seeds(allowed: dict[str, list[str]]) -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    msgid = 1
    for method, names in sorted(allowed.items()):
        for i, params in enumerate(param_sets(method, names)):
            seeds[f"{method}-{i}"] = pack([0, msgid, method, params])
            msgid += 1
    seeds |= {
        "pipelined": b"".join(pack([0, i, "hello", {}]) for i in range(8)),
        "positional-map": pack([0, 1, "hello", [{"client": "x"}]]),
        "positional-empty": pack([0, 1, "status", []]),
        "positional-bad": pack([0, 1, "status", [1, 2]]),
        "params-nil": pack([0, 1, "status", None]),
        "params-int": pack([0, 1, "status", 5]),
        "notification": pack([2, "hello", {}]) + pack([0, 1, "hello", {}]),
        "notification-short": pack([2, "x"]),
        "response-type": pack([1, 1, None, None]),
        "type-bool": pack([False, 1, "hello", {}]),
        "type-float": pack([0.0, 1, "hello", {}]),
        "empty-array": pack([]),
        "not-array": pack({"a": 1}),
        "msgid-negative": pack([0, -1, "hello", {}]),
        "msgid-2pow32": pack([0, 2**32, "hello", {}]),
        "msgid-bool": pack([0, True, "hello", {}]),
        "msgid-float": pack([0, 1.0, "hello", {}]),
        "method-empty": pack([0, 1, "", {}]),
        "method-long": pack([0, 1, "m" * 65, {}]),
        "method-int": pack([0, 1, 7, {}]),
        "method-unknown": pack([0, 1, "no_such_method", {}]),
        "method-bad-utf8": pack([0, 1, contract.BAD_UTF8, {}]),
        "param-bad-utf8": pack([0, 1, "hello", {"client": contract.BAD_UTF8}]),
        "forget-bad-utf8": pack([0, 1, "forget", {"ids": [contract.BAD_UTF8]}]),
        "map-int-key": b"\x94\x00\x01\xa5hello\x81\x01\x01",
        "ext-type": b"\x94\x00\x01\xa5hello\xd4\x01\x00",
        "str-len-huge": b"\x94\x00\x01\xa5hello\xdb\xff\xff\xff\xff",
        "bin-len-huge": b"\x94\x00\x01\xa5hello\xc6\x00\x20\x00\x00",
        "array-len-huge": b"\x94\x00\x01\xa5hello\xdd\x00\x01\x00\x00",
        "map-len-huge": b"\x94\x00\x01\xa5hello\xdf\x00\x00\x02\x00",
        "nested-100": b"\x91" * 100 + b"\x00",
        "nested-1100": b"\x91" * 1100 + b"\x00",
        "never-valid-byte": b"\xc1",
        "truncated": pack([0, 1, "ingest", {"event": contract.valid_events()[0]}])[:-5],
        "invalid-utf8-in-event": pack(
            [0, 1, "ingest", {"event": {**contract.valid_events()[0], "prompt": "\udcff"}}]
        ),
        "batch-invalid-events": pack([0, 1, "ingest_batch", {"events": contract.bad_events()[:8]}]),
    }
    return seeds


def params_seeds(allowed: dict[str, list[str]], methods: list[str]) -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for method, names in sorted(allowed.items()):
        for i, params in enumerate(param_sets(method, names)):
            seeds[f"{method}-{i}"] = b"\x00" + pack([method, params])
        idx = methods.index(method)
        # mode 1: every parameter present, each edge index in turn (a spread of picks)
        for pick in (64, 100, 150, 199, 200, 255):
            seeds[f"{method}-typed-{pick}"] = bytes([1, idx]) + bytes([pick] * len(names))
        seeds[f"{method}-extra"] = bytes([2, idx]) + bytes([0] * len(names)) + b"\x00" + pack(1)
    seeds["positional"] = b"\x00" + pack(["hello", [{"client": "x"}]])
    seeds["params-nil"] = b"\x00" + pack(["status", None])
    seeds["unknown-method"] = b"\x00" + pack(["nope", {}])
    return seeds


def deep(levels: int) -> Any:
    """``[[[...[0]...]]]``, ``levels`` lists deep."""
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def regressions() -> dict[str, tuple[str, Any]]:
    """Reproducers of bugs these harnesses found (kept as ``regress-*`` in both corpora)."""
    pair = contract.valid_events()[0]
    bad = contract.BAD_UTF8
    return {
        # A lone surrogate reached SQLite inside a transaction: UnicodeEncodeError, no
        # rollback, and every later write failed ("cannot start a transaction within a
        # transaction") until the daemon restarted.
        "forget-ids-bad-utf8": ("forget", {"ids": [bad]}),
        "forget-source-bad-utf8": ("forget", {"source": bad}),
        "cursor-adapter-bad-utf8": (
            "ingest_batch",
            {"events": [pair], "cursor": {"adapter": bad, "key": "k", "value": 1}},
        ),
        "cursor-value-bad-utf8": (
            "ingest_batch",
            {"events": [pair], "cursor": {"adapter": "a", "key": "k", "value": bad}},
        ),
        "cursors-adapter-bad-utf8": ("cursors", {"adapter": bad}),
        "deploy-reason-bad-utf8": ("deploy", {"version": 1, "reason": bad}),
        # An error message echoing a non-UTF-8 name could not be encoded: no answer at all.
        "unknown-param-bad-utf8": ("status", {bad: 1}),
        "event-field-bad-utf8": ("ingest", {"event": {**pair, bad: 1}}),
        # An event's kind / v / label was put in the error message with repr(): a value
        # nested ~1000 deep raised RecursionError -> internal.
        "event-kind-deep-list": ("ingest", {"event": {**pair, "kind": deep(990)}}),
        "event-v-deep-list": ("ingest", {"event": {**pair, "v": deep(990)}}),
        "event-label-deep-list": (
            "ingest",
            {
                "event": {
                    "kind": "rating",
                    "source": "s",
                    "prompt": "p",
                    "response": "r",
                    "label": deep(990),
                }
            },
        ),
        # Versions past SQLite's int64: OverflowError -> internal.
        "models-version-2pow63": ("models", {"version": 2**63}),
        "deploy-version-2pow64": ("deploy", {"version": 2**64 - 1}),
        # export: ~user of no user (RuntimeError), NUL (ValueError), a name over NAME_MAX
        # (OSError from the existence check), non-UTF-8 path echoed in the result.
        "export-tilde-no-user": ("export", {"path": f"~{contract.NO_SUCH_USER}/x"}),
        "export-nul": ("export", {"path": "/a\x00b"}),
        "export-name-too-long": ("export", {"path": "/" + "n" * 300}),
        "export-path-bad-utf8": ("export", {"path": f"/{bad}.jsonl"}),
    }


def raw_regressions() -> dict[str, bytes]:
    """Byte streams that once broke the decoder (decoder corpus only)."""
    return {
        # Unfinished messages were decoded as they arrived, so their partial objects lived
        # as long as the connection: 1000 nested array16 headers (3 KB) preallocated 81 MB.
        "nested-array16-headers-unfinished": b"\xdc\x27\x10" * 1000,
        # The envelope's error message was built with repr() of the message type: a list
        # 1000 levels deep raised RecursionError out of the connection (found by `make fuzz`).
        "deep-list-message-type": b"\x91" * 1000 + b"\x00",
    }


def main() -> None:
    api = Api(None, None, Path("/nonexistent"))  # type: ignore[arg-type]
    allowed = contract.probe_allowed_sync(api)
    methods = contract.method_table()
    for harness, seeds in (
        ("decoder", decoder_seeds(allowed)),
        ("params", params_seeds(allowed, methods)),
    ):
        folder = CORPUS / harness
        if folder.is_dir():
            for old in folder.iterdir():
                old.unlink()
        for name, data in seeds.items():
            write(folder, f"seed-{name}", data)
        if harness == "decoder":
            for name, data in raw_regressions().items():
                write(folder, f"regress-{name}", data)
        for name, (method, params) in regressions().items():
            if harness == "decoder":
                after = pack([0, 8, "ingest", {"event": VALID["event"]}])  # store still works
                data = pack([0, 7, method, params]) + after
            else:
                data = b"\x00" + pack([method, params])
            write(folder, f"regress-{name}", data)
        total = sum(len(d) for d in seeds.values())
        digest = hashlib.sha256(b"".join(sorted(seeds.values()))).hexdigest()[:12]
        print(f"{harness}: {len(seeds)} seeds, {total} bytes, {digest}")


if __name__ == "__main__":
    main()
