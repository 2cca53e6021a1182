"""The native messaging host as the browser runs it: a subprocess on real pipes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapter_harness import adapter_env, write_config
from conftest import DaemonProc
from palate.adapters.native_host import (
    DEFAULT_CHROME_ID,
    HOST_NAME,
    MAX_TO_BROWSER,
    encode_frame,
    install,
    manifest_dir,
    uninstall,
)

ORIGIN = f"chrome-extension://{DEFAULT_CHROME_ID}/"


def frame(obj: Any) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("=I", len(body)) + body


def parse_frames(data: bytes) -> list[dict[str, Any]]:
    """Every byte of stdout must belong to a frame: nothing else may be written there."""
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("=I", data, pos)
        assert n <= MAX_TO_BROWSER
        out.append(json.loads(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert pos == len(data)
    return out


def talk(home: Path, messages: list[bytes], *args: str) -> list[dict[str, Any]]:
    r = subprocess.run(
        [sys.executable, "-m", "palate.adapters.native_host", *args],
        input=b"".join(messages), capture_output=True, env=adapter_env(home), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return parse_frames(r.stdout)


@pytest.fixture
def installed(palate_daemon: DaemonProc, tmp_path: Path) -> DaemonProc:
    install(["chrome", "firefox"], home=palate_daemon.home, user_home=tmp_path / "user")
    return palate_daemon


def test_relays_requests_in_protocol(installed: DaemonProc) -> None:
    ev = {
        "kind": "rating",
        "prompt": "Say hi",
        "response": "Hello!",
        "label": 1,
        "context": {"app": "chat.example"},
    }
    replies = talk(
        installed.home,
        [
            frame({"id": 1, "method": "hello", "params": {}}),
            frame({"id": 2, "method": "ingest", "params": {"event": ev}}),
            frame({"id": 3, "method": "ingest", "params": {"event": ev}}),
            frame(b"{not json"),
            frame({"id": 5, "method": "forget", "params": {"all": True}}),
            frame({"id": 6, "method": "ingest", "params": {"event": {"kind": "rating"}}}),
            frame(
                {
                    "id": 7,
                    "method": "ingest_batch",
                    "params": {"events": [ev, dict(ev, response="Hi there")]},
                }
            ),
        ],
        ORIGIN,
    )
    assert [r["id"] for r in replies] == [1, 2, 3, None, 5, 6, 7]
    assert (
        replies[0]["result"]["name"] == "palate"
        and replies[0]["result"]["host"]["max_message_bytes"] == MAX_TO_BROWSER
    )
    assert replies[1]["result"]["duplicate"] is False and replies[2]["result"]["duplicate"] is True
    assert replies[3]["error"]["code"] == "invalid_request"
    assert replies[4]["error"]["code"] == "unknown_method"  # forget is not relayed
    assert replies[5]["error"]["code"] == "invalid_event"
    assert replies[6]["result"]["accepted"] == 1 and replies[6]["result"]["duplicates"] == 1
    with installed.client() as c:
        assert c.status()["events"]["by_source"] == {"browser": 2}


def test_oversize_frame_is_answered_and_the_stream_stays_in_sync(installed: DaemonProc) -> None:
    big = b'{"id": 9, "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    replies = talk(installed.home, [frame(big), frame({"id": 10, "method": "hello"})], ORIGIN)
    assert replies[0] == {"id": None, "error": replies[0]["error"]}
    assert replies[0]["error"]["code"] == "too_large"
    assert replies[1]["id"] == 10 and "result" in replies[1]


def test_answers_over_one_megabyte_become_errors() -> None:
    data = encode_frame({"id": 4, "result": {"blob": "y" * MAX_TO_BROWSER}})
    (n,) = struct.unpack_from("=I", data)
    assert n == len(data) - 4 <= MAX_TO_BROWSER
    assert json.loads(data[4:]) == {"id": 4, "error": json.loads(data[4:])["error"]}
    assert json.loads(data[4:])["error"]["code"] == "too_large"


def test_unknown_caller_is_refused(installed: DaemonProc) -> None:
    other = "chrome-extension://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa/"
    replies = talk(installed.home, [frame({"id": 1, "method": "hello"})], other)
    assert replies[0]["error"]["code"] == "unauthorized"
    firefox = talk(
        installed.home,
        [frame({"id": 2, "method": "hello"})],
        "/path/manifest.json",
        "palate@palate.local",
    )
    assert "result" in firefox[0]
    assert (
        talk(installed.home, [frame({"id": 3, "method": "hello"})])[0]["error"]["code"]
        == "unauthorized"
    )


def test_daemon_not_running_is_an_in_protocol_error(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    install(["chrome"], home=home, user_home=tmp_path / "user")
    replies = talk(
        home, [frame({"id": 1, "method": "hello"}), frame({"id": 2, "method": "hello"})], ORIGIN
    )
    assert [r["error"]["code"] for r in replies] == ["unavailable", "unavailable"]


def test_redaction_before_relaying(installed: DaemonProc, tmp_path: Path) -> None:
    write_config(installed.home, {"browser": {"redact_deny": ["*.bank.example"]}}, deny=[])
    secret = {
        "kind": "rating",
        "prompt": "my key is sk-abcdefghijklmnopqrstuvwxyz",
        "response": "ok",
        "label": 1,
    }
    replies = talk(
        installed.home,
        [
            frame({"id": 1, "method": "ingest", "params": {"event": secret}}),
            frame(
                {
                    "id": 2,
                    "method": "ingest",
                    "params": {
                        "event": dict(secret, response="no"),
                        "site": "https://my.bank.example/x",
                    },
                }
            ),
        ],
        ORIGIN,
    )
    assert "result" in replies[0]
    assert replies[1]["result"] == {"dropped": True, "reason": "deny_list"}
    with installed.client() as c:
        c.export(tmp_path / "out.jsonl")
    (stored,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert "sk-abc" not in stored["prompt"] and "[REDACTED:api_key]" in stored["prompt"]


def test_install_and_uninstall_manifests(tmp_path: Path) -> None:
    home, user = tmp_path / "home", tmp_path / "user"
    res = install(
        ["chrome", "brave", "firefox"], home=home, user_home=user, extension_ids=["a" * 32]
    )
    chrome = json.loads(
        (manifest_dir("chrome", home=user, env={}) / f"{HOST_NAME}.json").read_text()
    )
    assert chrome["allowed_origins"] == [f"chrome-extension://{'a' * 32}/"]
    assert chrome["type"] == "stdio" and Path(chrome["path"]).is_absolute()
    assert Path(chrome["path"]).stat().st_mode & 0o100
    assert "allowed_origins" not in json.loads(Path(res["manifests"][2]).read_text())
    fx = json.loads((user / ".mozilla/native-messaging-hosts" / f"{HOST_NAME}.json").read_text())
    assert fx["allowed_extensions"] == ["palate@palate.local"] and fx["name"] == HOST_NAME
    assert (
        user / ".config/BraveSoftware/Brave-Browser/NativeMessagingHosts" / f"{HOST_NAME}.json"
    ).exists()
    removed = uninstall(
        ["chrome", "chromium", "brave", "edge", "firefox"], home=home, user_home=user
    )
    assert len(removed) == 5  # three manifests, the launcher, the allow list
    assert not any(Path(p).exists() for p in res["manifests"])


def test_manifest_locations() -> None:
    u = Path("/Users/u")
    assert (
        manifest_dir("chrome", platform="darwin", home=u)
        == u / "Library/Application Support/Google/Chrome/NativeMessagingHosts"
    )
    assert (
        manifest_dir("edge", platform="darwin", home=u)
        == u / "Library/Application Support/Microsoft Edge/NativeMessagingHosts"
    )
    assert (
        manifest_dir("firefox", platform="darwin", home=u)
        == u / "Library/Application Support/Mozilla/NativeMessagingHosts"
    )
    h = Path("/home/u")
    assert (
        manifest_dir("chromium", platform="linux", home=h, env={})
        == h / ".config/chromium/NativeMessagingHosts"
    )
    assert manifest_dir("edge", platform="linux", home=h, env={"XDG_CONFIG_HOME": "/x"}) == Path(
        "/x/microsoft-edge/NativeMessagingHosts"
    )
