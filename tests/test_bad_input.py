"""Hostile and broken input: each gets the documented error or a closed connection,
and the daemon keeps serving everyone else."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DaemonProc, module_daemon
from palate.errors import ERROR_CODES, PalateError
from palate.events import validate_event
from palate.wire import protocol


def raw_conn(d: DaemonProc) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(d.paths.socket))
    return s


def read_all(s: socket.socket, until_closed: bool = True) -> list[Any]:
    """Read messages until the daemon closes the connection (or a timeout)."""
    u = msgpack.Unpacker(raw=False)
    out: list[Any] = []
    while True:
        try:
            data = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        u.feed(data)
        out.extend(u)
        if not until_closed and out:
            break
    return out


def assert_still_serving(d: DaemonProc) -> None:
    # `busy` is a legitimate answer right after many connections closed (they are
    # reaped asynchronously); anything else, or a dead daemon, is a failure.
    deadline = time.monotonic() + 5
    while True:
        try:
            with d.client(timeout=10) as c:
                assert c.hello()["name"] == "palate"
            break
        except PalateError as e:
            if e.code != "busy" or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert d.alive()


def closing_error(msgs: list[Any]) -> dict[str, Any]:
    assert msgs, "expected an error notification before the close"
    last = msgs[-1]
    assert last[0] == protocol.NOTIFICATION and last[1] == "error"
    assert set(last[2]) == {"code", "message", "details"}
    assert last[2]["code"] in ERROR_CODES
    return dict(last[2])


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_close_only_that_connection(palate_daemon: DaemonProc, seed: int) -> None:
    import random

    rnd = random.Random(seed)
    other = palate_daemon.client()
    s = raw_conn(palate_daemon)
    s.sendall(bytes([0xC1]) + rnd.randbytes(4096))  # 0xc1 is never valid msgpack
    err = closing_error(read_all(s))
    assert err["code"] == "invalid_request"
    s.close()
    assert other.hello()["name"] == "palate"
    other.close()
    assert_still_serving(palate_daemon)


def test_truncated_message_then_hangup(palate_daemon: DaemonProc) -> None:
    msg = protocol.pack([0, 1, "ingest", {"event": {"kind": "pair", "prompt": "x" * 1000}}])
    s = raw_conn(palate_daemon)
    s.sendall(msg[: len(msg) // 2])
    s.close()
    assert_still_serving(palate_daemon)


def test_string_over_the_string_limit_is_too_large(palate_daemon: DaemonProc) -> None:
    s = raw_conn(palate_daemon)
    # [0, 1, "hello", <str of 2 MiB>]: inside the frame limit, over the string limit.
    n = 2 * 1024 * 1024
    s.sendall(b"\x94\x00\x01\xa5hello\xdb" + n.to_bytes(4, "big") + b"x" * n)
    assert closing_error(read_all(s))["code"] == "too_large"
    assert_still_serving(palate_daemon)


def test_oversized_frame_is_too_large(palate_daemon: DaemonProc) -> None:
    s = raw_conn(palate_daemon)
    # A bin of 8 MiB: the decoder refuses to buffer past the 4 MiB frame limit.
    payload = b"\x94\x00\x01\xa5hello\xc6" + (8 * 1024 * 1024).to_bytes(4, "big")
    s.sendall(payload)
    try:
        chunk = b"\x00" * 65536
        for _ in range(130):
            s.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert closing_error(read_all(s))["code"] == "too_large"
    assert_still_serving(palate_daemon)


def test_deep_nesting(palate_daemon: DaemonProc) -> None:
    s = raw_conn(palate_daemon)
    s.sendall(b"\x91" * 5000 + b"\x00")
    assert closing_error(read_all(s))["code"] == "invalid_request"
    assert_still_serving(palate_daemon)


def test_non_request_messages(palate_daemon: DaemonProc) -> None:
    s = raw_conn(palate_daemon)
    s.sendall(protocol.pack({"not": "an array"}))
    assert closing_error(read_all(s))["code"] == "invalid_request"
    assert_still_serving(palate_daemon)


def test_wrong_types_get_error_responses_on_a_live_connection(palate_daemon: DaemonProc) -> None:
    s = raw_conn(palate_daemon)
    bad = [
        [0, 1, "ingest", {"event": "a string"}],
        [0, 2, "ingest_batch", {"events": {"not": "a list"}}],
        [0, 3, "forget", {"all": "yes"}],
        [0, 4, "export", {"path": 42}],
        [0, 5, 12345, {}],
        [0, 6, "no_such_method", {}],
        [0, 7, "hello", [1, 2, 3]],
        [0, 8, "hello", {}],
    ]
    s.sendall(b"".join(protocol.pack(m) for m in bad))
    u = msgpack.Unpacker(raw=False)
    got: dict[int, Any] = {}
    while len(got) < len(bad):
        u.feed(s.recv(65536))
        for m in u:
            assert m[0] == protocol.RESPONSE
            got[m[1]] = m
    codes = {k: (v[2]["code"] if v[2] else None) for k, v in got.items()}
    assert codes == {
        1: "invalid_request",
        2: "invalid_request",
        3: "invalid_request",
        4: "invalid_request",
        5: "invalid_request",
        6: "unknown_method",
        7: "invalid_request",
        8: None,
    }
    s.close()


def test_in_flight_limit_answers_busy(palate_daemon: DaemonProc) -> None:
    s = raw_conn(palate_daemon)
    n = protocol.MAX_IN_FLIGHT * 3
    s.sendall(b"".join(protocol.pack([0, i, "status", {}]) for i in range(n)))
    u = msgpack.Unpacker(raw=False)
    got: dict[int, Any] = {}
    while len(got) < n:
        u.feed(s.recv(65536))
        for m in u:
            got[m[1]] = m
    busy = [m for m in got.values() if m[2] and m[2]["code"] == "busy"]
    ok = [m for m in got.values() if m[2] is None]
    assert busy, "requests beyond the in-flight limit must be answered busy"
    assert len(ok) >= protocol.MAX_IN_FLIGHT
    s.close()
    assert_still_serving(palate_daemon)


def test_a_client_keeping_the_window_full_is_never_busy(palate_daemon: DaemonProc) -> None:
    # A client honouring max_in_flight sends its next request the moment an answer
    # arrives. The daemon must have freed that answer's slot before writing it: counting
    # tasks until their done callbacks ran answered such a client busy (the JS client's
    # pipelining test failed that way on a loaded 2-core machine).
    s = raw_conn(palate_daemon)
    total = 1500
    s.sendall(b"".join(protocol.pack([0, i, "hello", {}]) for i in range(protocol.MAX_IN_FLIGHT)))
    sent = protocol.MAX_IN_FLIGHT
    u = msgpack.Unpacker(raw=False)
    answers: list[Any] = []
    while len(answers) < total:
        u.feed(s.recv(65536))
        more = []
        for m in u:
            answers.append(m)
            if sent < total:
                more.append(protocol.pack([0, sent, "hello", {}]))
                sent += 1
        if more:
            s.sendall(b"".join(more))
    busy = [m for m in answers if m[2] is not None]
    assert busy == [], f"{len(busy)} of {total} answered with an error: {busy[:1]}"
    assert sorted(m[1] for m in answers) == list(range(total))
    s.close()


def test_invalid_utf8_in_event_names_the_field(palate_daemon: DaemonProc) -> None:
    s = raw_conn(palate_daemon)
    ev = protocol.pack(
        {"kind": "pair", "source": "t", "prompt": "p", "chosen": "ok", "rejected": "x"}
    )
    ev = ev.replace(b"\xa1x", b"\xa1\xff")  # rejected: one invalid byte
    s.sendall(b"\x94\x00\x09\xa6ingest\x81\xa5event" + ev)
    (m,) = read_all(s, until_closed=False)
    assert m[2]["code"] == "invalid_event"
    assert m[2]["details"]["errors"] == [{"field": "rejected", "reason": "is not valid UTF-8"}]
    s.close()


def test_idle_connections_do_not_block_others(palate_daemon: DaemonProc) -> None:
    idle = [raw_conn(palate_daemon) for _ in range(20)]
    t0 = time.monotonic()
    assert_still_serving(palate_daemon)
    assert time.monotonic() - t0 < 5
    for s in idle:
        s.close()


# --- property-based: the parser and validator only ever raise PalateError -------------

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_parse_message_total(obj: Any) -> None:
    try:
        protocol.parse_message(obj)
    except PalateError as e:
        assert e.code == "invalid_request"


event_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["pair", "rating", "edit", "ranking", "x"])},
    optional={
        k: json_like
        for k in (
            "prompt",
            "chosen",
            "rejected",
            "response",
            "label",
            "score",
            "original",
            "edited",
            "responses",
            "source",
            "ts",
            "id",
            "context",
            "weight",
            "margin",
        )
    },
)


@settings(max_examples=400, deadline=None)
@given(event_like)
def test_validate_event_total(obj: dict[str, Any]) -> None:
    try:
        out = validate_event(obj)
    except PalateError as e:
        assert e.code == "invalid_event"
        assert all(set(x) == {"field", "reason"} for x in e.details["errors"])
    else:
        assert out["id"] and out["kind"] in ("pair", "rating", "edit", "ranking")


@pytest.fixture(scope="module")
def fuzzed_daemon() -> Iterator[DaemonProc]:
    """One daemon for the fuzz test and for the check after it (the check must look at the
    daemon that was fuzzed, not at a fresh one)."""
    with module_daemon("fz-") as d:
        yield d


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(min_size=1, max_size=512))
def test_decoder_fuzz_against_live_daemon(fuzzed_daemon: DaemonProc, data: bytes) -> None:
    s = raw_conn(fuzzed_daemon)
    s.settimeout(0.2)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        for m in read_all(s):
            assert isinstance(m, list) and m[0] in (protocol.RESPONSE, protocol.NOTIFICATION)
    except OSError:
        pass
    finally:
        s.close()
    assert fuzzed_daemon.alive()


def test_daemon_alive_after_fuzz(fuzzed_daemon: DaemonProc) -> None:
    """The fuzzed daemon itself: same process, still serving, nothing crashed in its log."""
    assert fuzzed_daemon.alive()
    assert_still_serving(fuzzed_daemon)
    assert os.path.exists(fuzzed_daemon.paths.socket)
    with fuzzed_daemon.client() as c:
        assert c.hello()["pid"] == fuzzed_daemon.proc.pid  # type: ignore[union-attr]
    log = (fuzzed_daemon.paths.log_dir / "daemon.log").read_text()
    assert "Traceback" not in log and "internal error" not in log


def test_connection_limit_answers_busy(palate_daemon: DaemonProc) -> None:
    conns = []
    refused: PalateError | None = None
    try:
        for _ in range(protocol.MAX_CONNECTIONS + 5):
            c = palate_daemon.client(timeout=10)
            try:
                c.hello()
            except PalateError as e:
                refused = e
                c.close()
                break
            conns.append(c)
        assert refused is not None and refused.code == "busy"
        # A connection closed just before may not be reaped yet: allow one of slack.
        assert protocol.MAX_CONNECTIONS - 1 <= len(conns) <= protocol.MAX_CONNECTIONS
    finally:
        for c in conns:
            c.close()
    assert_still_serving(palate_daemon)


def test_message_of_many_small_strings_is_bounded(palate_daemon: DaemonProc) -> None:
    # Each string is under the string limit, but the message as a whole is 6 MiB: the
    # frame limit must count the whole message, not just the undecoded tail.
    s = raw_conn(palate_daemon)
    big = protocol.pack([0, 1, "hello", {"client": ["x" * 500_000] * 12}])
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        s.sendall(big)
    assert closing_error(read_all(s))["code"] == "too_large"
    assert_still_serving(palate_daemon)


# --- regressions found by fuzzing (fuzz/corpus/*/regress-*) ------------------------------

BAD = "a\udcffb"  # arrives as the invalid UTF-8 bytes 61 ff 62


def deep(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def test_deeply_nested_message_type_gets_an_error(palate_daemon: DaemonProc) -> None:
    """The envelope error once rendered the message type with repr(): a list 1000 deep
    raised RecursionError, and the connection was dropped without the error notification."""
    s = raw_conn(palate_daemon)
    s.sendall(b"\x91" * 1000 + b"\x00")
    err = closing_error(read_all(s))
    assert err["code"] == "invalid_request" and "message type list" in err["message"]
    assert_still_serving(palate_daemon)


def raw_call(s: socket.socket, msgid: int, method: str, params: Any) -> list[Any]:
    """One request with strings packed as raw bytes (so lone surrogates go out invalid)."""
    s.sendall(
        msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape").pack(
            [0, msgid, method, params]
        )
    )
    u = msgpack.Unpacker(raw=False)
    while True:
        data = s.recv(65536)  # the socket timeout (10 s) turns a missing answer into a failure
        assert data, f"{method}: connection closed without an answer"
        u.feed(data)
        for m in u:
            assert m[0] == protocol.RESPONSE, m
            if m[1] == msgid:
                return list(m)


def test_fuzz_regressions_bad_input_is_refused_and_the_store_keeps_committing(
    palate_daemon: DaemonProc,
) -> None:
    """Invalid UTF-8 or out-of-range values once reached SQLite inside a transaction (left
    open: every later write failed until a restart), or made the answer unencodable (no answer
    at all), or escaped as `internal`. Each must get its documented code, and the store must
    still commit after each."""
    pair = {"kind": "pair", "source": "t", "prompt": "p", "chosen": "a", "rejected": "b"}
    exports = palate_daemon.home / "exports"
    exports.mkdir(mode=0o700)
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("forget", {"ids": [BAD]}, "invalid_request"),
        ("forget", {"source": BAD}, "invalid_request"),
        ("cursors", {"adapter": BAD}, "invalid_request"),
        (
            "ingest_batch",
            {"events": [pair], "cursor": {"adapter": BAD, "key": "k", "value": 1}},
            "invalid_request",
        ),
        (
            "ingest_batch",
            {"events": [pair], "cursor": {"adapter": "a", "key": BAD, "value": 1}},
            "invalid_request",
        ),
        (
            "ingest_batch",
            {"events": [pair], "cursor": {"adapter": "a", "key": "k", "value": BAD}},
            "invalid_request",
        ),
        ("rollback", {"reason": BAD}, "invalid_request"),
        ("deploy", {"version": 1, "reason": BAD}, "invalid_request"),
        ("train", {"reason": BAD}, "invalid_request"),  # once started a run, broke `status`
        ("status", {BAD: 1}, "invalid_request"),
        ("ingest", {"event": {**pair, BAD: 1}}, "invalid_event"),
        ("ingest", {"event": {**pair, "kind": deep(990)}}, "invalid_event"),
        ("ingest", {"event": {**pair, "v": deep(990)}}, "invalid_event"),
        ("models", {"version": 2**63}, "not_found"),
        ("deploy", {"version": 2**64 - 1}, "not_found"),
        ("export", {"path": "~palate-no-such-user/x.jsonl"}, "not_found"),
        ("export", {"path": f"{exports}/a\x00b"}, "invalid_request"),
        ("export", {"path": "/", "overwrite": True}, "invalid_request"),
        ("export", {"path": f"{exports}/{'n' * 300}"}, "invalid_request"),
        ("export", {"path": f"{exports}/{BAD}.jsonl"}, "invalid_request"),
    ]
    s = raw_conn(palate_daemon)
    for i, (method, params, code) in enumerate(cases):
        _, _, err, _ = raw_call(s, 2 * i + 1, method, params)
        assert err is not None and err["code"] == code, (method, params, err)
        assert BAD not in err["message"]
        _, _, err, _ = raw_call(s, 2 * i + 2, "ingest", {"event": {**pair, "prompt": f"after {i}"}})
        assert err is None, f"after {method} {params!r:.80}: the store stopped committing: {err}"
    s.close()
    assert list(exports.iterdir()) == []
    with palate_daemon.client() as c:
        assert c.status()["events"]["total"] == len(cases)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_unfinished_messages_cost_only_their_bytes(palate_daemon: DaemonProc) -> None:
    """A message that never completes must not hold decoded objects: msgpack preallocates
    every declared array, so 1000 nested array16 headers (3 KB) once held 81 MB of the
    daemon's memory per connection, for as long as the connection stayed open."""
    pid = palate_daemon.proc.pid  # type: ignore[union-attr]
    before = _rss_mib(pid)
    conns = [raw_conn(palate_daemon) for _ in range(16)]
    for s in conns:
        s.sendall(b"\xdc\x27\x10" * 1000)
    time.sleep(1.0)
    assert_still_serving(palate_daemon)  # the bytes were read and handled by now
    grown = _rss_mib(pid) - before
    for s in conns:
        s.close()
    assert grown < 64, f"16 x 3 KB of unfinished messages grew the daemon by {grown:.0f} MiB"
