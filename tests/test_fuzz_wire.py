"""Property-based fuzzing of every wire method against a live daemon (hypothesis).

The methods are the daemon's own method table, checked against docs/protocol.md; each
method's parameter names are asked of the daemon. Params are drawn both well-typed-but-wrong
(edge values of the right type, values of the wrong type: fuzz/contract.py) and arbitrary
(any msgpack value the wire can carry, invalid UTF-8 included), in every envelope form
(map, [map], [], nil, junk). For every call: an answer within ``CALL_TIMEOUT_S``; a success,
or an error whose code docs/protocol.md names for that method (never ``internal``); and
afterwards the store still commits. The daemon is alive and serving at the end.

``train`` only ever gets invalid params (valid ones start a training run); scoring methods
run without a model deployed (``no_model``). ``export`` paths point into a sandbox.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, DaemonProc, module_daemon
from palate.errors import ERROR_CODES, PalateError
from palate.wire import protocol

sys.path.insert(0, str(REPO / "fuzz"))
import contract
import inproc

CALL_TIMEOUT_S = 15.0
METHODS = contract.method_table()
PACKER_ARGS = {"use_bin_type": True, "unicode_errors": "surrogateescape"}


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.Packer(**PACKER_ARGS).pack(obj)  # type: ignore[arg-type]
    return data


class Wire:
    """One raw connection to the daemon, reopened if the daemon closes it."""

    def __init__(self, d: DaemonProc) -> None:
        self.d = d
        self.sock: socket.socket | None = None
        self.ids = itertools.count(1)
        self.calls = 0
        self.slowest = 0.0
        self.codes: dict[str, int] = {}

    def _conn(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(self.d.paths.socket))
            self.unpacker = msgpack.Unpacker(raw=False)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def call(self, method: str, params: Any) -> list[Any]:
        """Send one request; return its response ``[1, msgid, error, result]``."""
        msgid = next(self.ids) & 0xFFFFFFFF
        s = self._conn()
        t0 = time.monotonic()
        s.sendall(pack([0, msgid, method, params]))
        deadline = t0 + CALL_TIMEOUT_S
        while True:
            for m in self.unpacker:
                if m[0] == protocol.NOTIFICATION and m[1] == "error":
                    self.close()
                    raise AssertionError(f"{method}: the daemon closed the connection: {m[2]}")
                if m[0] == protocol.RESPONSE and m[1] == msgid:
                    took = time.monotonic() - t0
                    self.slowest = max(self.slowest, took)
                    self.calls += 1
                    code = m[2]["code"] if m[2] else "ok"
                    self.codes[f"{method}:{code}"] = self.codes.get(f"{method}:{code}", 0) + 1
                    return list(m)
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise AssertionError(f"{method}: no answer within {CALL_TIMEOUT_S} s (a hang)")
            s.settimeout(left)
            try:
                data = s.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                self.close()
                raise AssertionError(f"{method}: connection closed without an answer")
            self.unpacker.feed(data)


@pytest.fixture(scope="module")
def wire_daemon() -> Iterator[DaemonProc]:
    """One daemon for every example of this module (started once: examples are cheap)."""
    with module_daemon("pw-") as d:
        (d.home / "exports").mkdir(mode=0o700)
        yield d


@pytest.fixture(scope="module")
def wire(wire_daemon: DaemonProc) -> Iterator[Wire]:
    w = Wire(wire_daemon)
    yield w
    w.close()
    print(f"\nwire fuzz: {w.calls} calls, slowest answer {w.slowest * 1000:.0f} ms, {w.codes}")


@pytest.fixture(scope="module")
def allowed(wire_daemon: DaemonProc) -> dict[str, list[str]]:
    """Each method's parameter names, asked of the live daemon."""
    out = {}
    with wire_daemon.client() as c:
        for m in c.hello()["methods"]:
            with pytest.raises(PalateError) as ei:
                c.call(m, {contract.PROBE_PARAM: 1})
            assert ei.value.code == "invalid_request", (m, ei.value)
            out[m] = list(ei.value.details["allowed"])
    return out


def test_method_table_matches_docs(wire_daemon: DaemonProc, allowed: dict[str, list]) -> None:
    with wire_daemon.client() as c:
        live = c.hello()["methods"]
    assert live == METHODS, "the daemon's hello must list its method table"
    assert sorted(contract.documented_methods()) == METHODS, (
        "docs/protocol.md section 5 must have a ### heading for every method and no other"
    )
    assert contract.documented_error_codes() == set(ERROR_CODES)
    assert contract.check_param_types(allowed) == []
    for m in METHODS:
        assert contract.allowed_codes(m), m


# --- strategies -----------------------------------------------------------------------

# Any value msgpack can carry, including strings that arrive as invalid UTF-8.
wire_text = st.text(
    alphabet=st.characters(codec="utf-8") | st.sampled_from(["\udc80", "\udcff", "\x00"]),
    max_size=24,
)
wire_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | wire_text
    | st.binary(max_size=24),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(wire_text, children, max_size=6)
    ),
    max_leaves=24,
)


def params_strategy(method: str, names: list[str], sandbox: str) -> st.SearchStrategy[Any]:
    typed = {
        n: st.one_of(
            # weighted: mostly the right type at its edges, sometimes the wrong type
            *[st.sampled_from(contract.edge_values(contract.PARAM_TYPES[n], sandbox))] * 4,
            st.sampled_from(contract.wrong_type_values()),
            wire_value,
        )
        for n in names
    }
    well_typed_but_wrong = st.fixed_dictionaries({}, optional=typed)
    arbitrary = st.dictionaries(
        st.sampled_from(names) | wire_text if names else wire_text, wire_value, max_size=6
    )
    with_extra = st.builds(lambda p, k, v: {**p, k: v}, well_typed_but_wrong, wire_text, wire_value)
    valid = {n: contract.valid_value(contract.PARAM_TYPES[n], sandbox) for n in names}
    # A valid request with one parameter changed (or dropped): reaches the deep checks.
    one_change = (
        st.sampled_from(names).flatmap(
            lambda k: (
                typed[k].map(lambda v: {**valid, k: v})
                | st.just({n: v for n, v in valid.items() if n != k})
            )
        )
        if names
        else st.just({})
    )
    as_map = st.one_of(one_change, one_change, well_typed_but_wrong, arbitrary, with_extra)
    envelope = st.one_of(
        *[as_map] * 6,
        as_map.map(lambda p: [p]),
        st.just([]),
        st.none(),
        wire_value,
    )
    return envelope


def make_invalid(method: str, params: Any, names: list[str]) -> Any:
    """For heavy methods: params that are certainly refused before any work starts."""
    if method not in contract.HEAVY:
        return params
    if isinstance(params, list) and len(params) == 1 and isinstance(params[0], dict):
        params = params[0]
    if not isinstance(params, dict) or params in ({}, []):
        return {"fuzz_unknown": 1}
    for k, v in params.items():
        if k not in names or (v is not None and not _well_typed(contract.PARAM_TYPES[k], v)):
            return params
    return {**params, "fuzz_unknown": 1}


def _well_typed(kind: str, v: Any) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str) and not isinstance(v, bool)
    return True


HEALTH_EVENT = {"kind": "pair", "source": "health", "prompt": "p", "chosen": "a", "rejected": "b"}


@settings(
    max_examples=int(os.environ.get("PALATE_WIRE_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_every_method_every_bad_param(
    data: st.DataObject, wire: Wire, allowed: dict[str, list[str]], wire_daemon: DaemonProc
) -> None:
    sandbox = str(wire_daemon.home / "exports")
    method = data.draw(st.sampled_from(METHODS), label="method")
    params = data.draw(params_strategy(method, allowed[method], sandbox), label="params")
    params = contract.sandbox_params(method, params, sandbox)
    if isinstance(params, list) and len(params) == 1:
        params = [contract.sandbox_params(method, params[0], sandbox)]
    params = make_invalid(method, params, allowed[method])
    _, _, err, result = wire.call(method, params)
    if err is not None:
        inproc.check_error(err)  # documented code, right shape, never internal
        assert err["code"] in contract.allowed_codes(method), (method, err)
        assert result is None
    # The store must still commit after whatever this call did (a bind error inside a
    # transaction once left every later write failing).
    _, _, err, _ = wire.call("ingest", {"event": HEALTH_EVENT})
    assert err is None, f"after {method}: the store no longer commits: {err}"


def test_daemon_alive_and_serving_after_wire_fuzz(wire_daemon: DaemonProc) -> None:
    assert wire_daemon.alive()
    with wire_daemon.client(timeout=10) as c:
        assert c.status()["daemon"]["pid"] == wire_daemon.proc.pid  # type: ignore[union-attr]
        r = c.ingest({**HEALTH_EVENT, "prompt": "after the fuzz"})
        assert r["seq"] > 0 and not r["duplicate"]
    text = wire_daemon.log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    logs = wire_daemon.paths.log_dir / "daemon.log"
    with contextlib.suppress(FileNotFoundError):
        assert "Traceback" not in logs.read_text(errors="replace")


# --- in-process: mutated frames through the real server code path ----------------------


@pytest.fixture(scope="module")
def env() -> Iterator[inproc.Env]:
    e = inproc.make_env()
    yield e
    # make_env registers an exit-time report for libFuzzer runs (which end without teardown);
    # here pytest tears down, so report inside the captured teardown, not after the summary.
    atexit.unregister(e.report)
    e.report()
    e.close()


def _frames() -> list[bytes]:
    pair = contract.valid_events()[0]
    return [
        pack([0, 1, "hello", {"client": "x"}]),
        pack([0, 2, "ingest", {"event": pair}]),
        pack(
            [
                0,
                3,
                "ingest_batch",
                {"events": [pair], "cursor": {"adapter": "a", "key": "k", "value": 1}},
            ]
        ),
        pack([0, 4, "forget", {"ids": ["x"]}]),
        pack([0, 5, "cursors", {"adapter": "a"}]),
        pack([2, "hello", {}]),
    ]


@st.composite
def mutated_stream(draw: st.DrawFn) -> list[bytes]:
    frames = draw(st.lists(st.sampled_from(_frames()), min_size=1, max_size=4))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
    step = draw(st.integers(1, 64))
    return [bytes(data[i : i + step]) for i in range(0, len(data), step)] or [b""]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=mutated_stream())
def test_mutated_frames_in_process(env: inproc.Env, chunks: list[bytes]) -> None:
    """The server's own Connection over mutated valid frames, arriving in pieces: only
    documented codes (never internal), one closing error at most, store not left in a
    transaction, bounded heap."""
    env.tick()
    with inproc.MemoryBound() as mem:
        inproc.serve_bytes(env, chunks)
        mem.check(sum(map(len, chunks)), env)
    assert not env.in_transaction()


def test_nothing_prints_after_pytests_summary() -> None:
    """The in-process env's figures belong in its (captured) teardown: printed at interpreter
    exit they landed after pytest's summary line, where they read as a stray failure."""
    import subprocess

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{__file__}::test_mutated_frames_in_process",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PALATE_LEAD_RUN": "1"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "passed" in r.stdout
    assert "palate-fuzz" not in r.stdout + r.stderr
