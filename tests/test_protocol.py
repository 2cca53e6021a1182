"""The envelope parser and the decoder limits, without a socket."""

from __future__ import annotations

import msgpack
import pytest

from palate.errors import PalateError
from palate.wire import protocol


def test_request_and_notification_parse() -> None:
    r = protocol.parse_message([0, 7, "hello", {"client": "x"}])
    assert (r.msgid, r.method, r.params) == (7, "hello", {"client": "x"})
    assert protocol.parse_message([0, 1, "status", []]).params == {}
    assert protocol.parse_message([0, 1, "status", [{"a": 1}]]).params == {"a": 1}
    n = protocol.parse_message([2, "progress", {}])
    assert n.msgid is None and n.method == "progress"


@pytest.mark.parametrize(
    ("obj", "has_msgid"),
    [
        ({"a": 1}, False),
        ([], False),
        ([5, 1, "x", {}], False),
        ([0, 1, "x"], False),
        ([0, -1, "x", {}], False),
        ([0, 2**32, "x", {}], False),
        ([0, True, "x", {}], False),
        ([0, 1, 42, {}], True),
        ([0, 1, "", {}], True),
        ([0, 1, "x" * 100, {}], True),
        ([0, 1, "x", [1, 2]], True),
        ([0, 1, "x", "params"], True),
    ],
)
def test_bad_envelopes(obj: object, has_msgid: bool) -> None:
    with pytest.raises(PalateError) as ei:
        protocol.parse_message(obj)
    assert ei.value.code == "invalid_request"
    assert ("msgid" in ei.value.details) == has_msgid


def test_unpacker_enforces_limits() -> None:
    u = protocol.make_unpacker()
    with pytest.raises(msgpack.BufferFull):
        u.feed(b"\x00" * (protocol.MAX_FRAME_BYTES + 1))
    u = protocol.make_unpacker()
    u.feed(msgpack.packb(list(range(protocol.MAX_ARRAY_LEN + 1))))
    with pytest.raises(ValueError, match="exceeds max"):
        next(u)
    u = protocol.make_unpacker()
    u.feed(msgpack.packb({str(i): i for i in range(protocol.MAX_MAP_LEN + 1)}))
    with pytest.raises(ValueError, match="exceeds max"):
        next(u)


def test_invalid_utf8_survives_decoding_for_field_level_errors() -> None:
    u = protocol.make_unpacker()
    u.feed(b"\xa3a\xffb")  # fixstr of 3 bytes with an invalid byte
    s = next(u)
    with pytest.raises(UnicodeEncodeError):
        s.encode("utf-8")


def test_error_shape_round_trip() -> None:
    raw = msgpack.unpackb(protocol.response(3, PalateError("busy", "later", {"n": 1})))
    assert raw == [1, 3, {"code": "busy", "message": "later", "details": {"n": 1}}, None]
    assert PalateError.from_wire(raw[2]).code == "busy"
    unknown = PalateError.from_wire({"code": "from_the_future", "message": "m"})
    assert unknown.code == "internal" and unknown.details["code"] == "from_the_future"
