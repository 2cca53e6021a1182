"""``palate-native-host``: the browser extension's bridge to the daemon's socket.

A browser cannot open a Unix socket; native messaging lets it spawn this
program and exchange messages over stdin/stdout, each a UTF-8 JSON document
preceded by its length as a 32-bit unsigned integer in native byte order
(Chrome and MDN "Native messaging"). Rules this host keeps:

* **Only frames on stdout.** The real stdout is kept for frames and fd 1 is
  pointed at stderr at start, so a stray print from any library cannot corrupt
  the stream (the classic "message of 1836017711 bytes" failure). Logs go to
  stderr (the browser's log) and ``<home>/logs/native-host.log``.
* **Limits.** Towards the browser a message may not exceed 1 MiB (Chrome's and
  Firefox's limit): a larger answer becomes a ``too_large`` error. From the
  browser we accept up to 4 MiB (the daemon's frame limit); a longer frame is
  read and discarded so the stream stays in sync, and answered ``too_large``.
* **Errors in-protocol.** Bad JSON, unknown methods, oversize frames, a daemon
  that is not running: each is answered ``{"id", "error": {code, message,
  details}}`` with the daemon's error codes; the host keeps serving.
* **Caller check.** Chrome passes the caller's origin
  (``chrome-extension://<id>/``) as an argument, Firefox the manifest path and
  the add-on id. The caller must be in the allow list written by
  ``palate browser install``; anyone else gets ``unauthorized`` answers.
* **Privacy.** Events pass the same redaction hook as every adapter (deny list
  of ``[adapters.browser]`` + ``[adapters]``, secret scrubbing) before they are
  relayed; an optional ``params.site`` (the page URL) is checked against the
  deny list and never forwarded.

Requests mirror the socket methods ``hello``, ``ingest`` and ``ingest_batch``
(docs/plugins.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import struct
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from palate import __version__
from palate.adapters import PauseGuard
from palate.errors import PalateError

HOST_NAME = "com.palate.native_host"
#: The ids the extension in plugins/browser/ is built with (its manifest ``key``
#: and ``browser_specific_settings.gecko.id``); override with --extension-id/--firefox-id.
DEFAULT_CHROME_ID = "gkobkcohibebaggboflafmmjndlfhfgj"
DEFAULT_FIREFOX_ID = "palate@palate.local"
MAX_TO_BROWSER = 1024 * 1024
MAX_FROM_BROWSER = 4 * 1024 * 1024
METHODS = ("hello", "ingest", "ingest_batch")
BROWSERS = ("chrome", "chromium", "brave", "edge", "firefox")
CHROME_FAMILY = BROWSERS[:4]
_LEN = struct.Struct("=I")  # native byte order, as the browsers write it

log = logging.getLogger("palate.adapters.native_host")


class FrameTooLarge(Exception):
    def __init__(self, length: int) -> None:
        super().__init__(f"message of {length} bytes exceeds the {MAX_FROM_BROWSER}-byte limit")
        self.length = length


# --- framing --------------------------------------------------------------------------


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame(stream: BinaryIO, limit: int = MAX_FROM_BROWSER) -> bytes | None:
    """The next message body, or None at end of input. FrameTooLarge keeps the stream in sync."""
    header = _read_exact(stream, _LEN.size)
    if header is None:
        return None
    (length,) = _LEN.unpack(header)
    if length > limit:
        left = length
        while left:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        raise FrameTooLarge(length)
    return _read_exact(stream, length)


def encode_frame(message: Mapping[str, Any], limit: int = MAX_TO_BROWSER) -> bytes:
    """One framed message; an answer over ``limit`` becomes a ``too_large`` error."""
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > limit:
        err = PalateError(
            "too_large",
            f"the answer is {len(body)} bytes; native messaging allows {limit} towards the browser",
            {"limit": limit},
        )
        body = json.dumps({"id": message.get("id"), "error": err.to_wire()}).encode("utf-8")
    return _LEN.pack(len(body)) + body


# --- callers and requests ---------------------------------------------------------------


def caller_allowed(argv: list[str], allowed: Mapping[str, Any]) -> tuple[bool, str]:
    """(allowed?, who) from the browser's launch arguments and the install allow list."""
    origins = {str(o).rstrip("/") + "/" for o in allowed.get("chrome", [])}
    for arg in argv:
        if arg.startswith("chrome-extension://"):
            origin = arg.rstrip("/") + "/"
            return origin in origins, origin
    if len(argv) >= 2:  # Firefox: [manifest path, add-on id]
        return argv[1] in set(allowed.get("firefox", [])), argv[1]
    return False, "unknown caller"


class Host:
    """Answers one decoded request at a time; ``connect`` opens a daemon client."""

    def __init__(self, connect: Callable[[], Any], redactor: Any, authorized: bool = True):
        self._connect = connect
        self._client: Any = None
        self.redactor = redactor
        self.authorized = authorized
        #: Collection pause (docs/ui.md): events are held back while it runs.
        self.pause = PauseGuard(lambda: self._relay("pause_state", {}), time.monotonic)

    def handle(self, raw: bytes) -> dict[str, Any]:
        ident: Any = None
        try:
            try:
                msg = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise PalateError("invalid_request", f"not a UTF-8 JSON message: {e}") from e
            if not isinstance(msg, dict):
                raise PalateError("invalid_request", "a request must be a JSON object")
            ident = msg.get("id")
            if not self.authorized:
                raise PalateError(
                    "unauthorized",
                    "this extension is not allowed to use Palate; run `palate browser install`",
                )
            method, params = msg.get("method"), msg.get("params", {})
            if method not in METHODS:
                raise PalateError(
                    "unknown_method",
                    f"unknown method {str(method)[:64]!r}; the host relays {', '.join(METHODS)}",
                    {"methods": list(METHODS)},
                )
            if not isinstance(params, dict):
                raise PalateError("invalid_request", "params must be a JSON object")
            return {"id": ident, "result": self._call(method, dict(params))}
        except PalateError as e:
            return {"id": ident, "error": e.to_wire()}
        except Exception as e:  # a bug here must not kill the Port
            log.exception("internal error")
            return {"id": ident, "error": PalateError("internal", str(e)[:200]).to_wire()}

    def _call(self, method: str, params: dict[str, Any]) -> Any:
        site = params.pop("site", None)
        dropped = paused = 0
        if method in ("ingest", "ingest_batch"):
            self.pause.refresh()
        if method == "ingest":
            event = self._redact(params.get("event"), site)
            if event is None:
                return {"dropped": True, "reason": "deny_list"}
            if isinstance(event, dict) and self.pause.holds(event):
                return {"dropped": True, "reason": "paused"}
            params["event"] = event
        elif method == "ingest_batch" and isinstance(params.get("events"), list):
            events = [self._redact(e, site) for e in params["events"]]
            kept = [e for e in events if e is not None]
            params["events"] = [
                e for e in kept if not (isinstance(e, dict) and self.pause.holds(e))
            ]
            paused = len(kept) - len(params["events"])
            dropped = len(events) - len(params["events"])
            if not params["events"] and dropped:
                out = {"accepted": 0, "duplicates": 0, "results": [], "dropped": dropped}
                return {**out, "paused": paused} if paused else out
        elif method == "hello":
            params.setdefault("client", "palate-native-host")
        result = self._relay(method, params)
        if method == "hello" and isinstance(result, dict):
            result["host"] = {"version": __version__, "max_message_bytes": MAX_TO_BROWSER}
            with contextlib.suppress(PalateError):
                self.pause.refresh()
                result["collection_paused"] = self.pause.current
        if paused and isinstance(result, dict):
            result["paused"] = paused
        if dropped and isinstance(result, dict):
            result["dropped"] = dropped
        return result

    def _redact(self, event: Any, site: Any) -> Any:
        if not isinstance(event, dict):
            return event  # the daemon names the problem
        event = dict(event)
        event.setdefault("source", "browser")
        app = (
            (event.get("context") or {}).get("app")
            if isinstance(event.get("context"), dict)
            else None
        )
        subjects = [s for s in (site, app) if isinstance(s, str)]
        return self.redactor.apply(event, subjects)

    def _relay(self, method: str, params: dict[str, Any]) -> Any:
        for attempt in (1, 2):
            if self._client is None:
                self._client = self._connect()
            try:
                return self._client.call(method, params)
            except PalateError as e:
                # A daemon restart drops our connection: reconnect once, then report.
                self._client.close()
                self._client = None
                if e.code != "unavailable" or attempt == 2:
                    raise
        raise AssertionError("unreachable")


# --- the program ----------------------------------------------------------------------------


def _setup_logging(home: Path) -> None:
    log.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s native-host[%(process)d]: %(message)s")
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    log.addHandler(err)
    log_dir = home / "logs"
    if log_dir.is_dir():
        old = os.umask(0o077)
        try:
            fh = logging.FileHandler(log_dir / "native-host.log", encoding="utf-8")
        finally:
            os.umask(old)
        fh.setFormatter(fmt)
        log.addHandler(fh)


def load_allowed(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / "browser" / "allowed.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def serve(stdin: BinaryIO, stdout: BinaryIO, host: Host) -> None:
    """Answer frames until the browser closes stdin."""
    while True:
        try:
            raw = read_frame(stdin)
        except FrameTooLarge as e:
            reply: dict[str, Any] = {
                "id": None,
                "error": PalateError("too_large", str(e), {"limit": MAX_FROM_BROWSER}).to_wire(),
            }
        else:
            if raw is None:
                return
            reply = host.handle(raw)
        stdout.write(encode_frame(reply))
        stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``palate-native-host`` (started by the browser)."""
    args = sys.argv[1:] if argv is None else argv
    # Frames only on the real stdout; everything else that writes to fd 1 lands on stderr.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from palate.adapters.redaction import Redactor
    from palate.config import load_config
    from palate.paths import resolve
    from palate.wire.client import Client

    paths = resolve()
    _setup_logging(paths.home)
    ok, who = caller_allowed(args, load_allowed(paths.home))
    if not ok:
        log.warning("refusing caller %s (not in %s)", who, paths.home / "browser" / "allowed.json")
    try:
        deny = load_config(paths).adapters.deny_for("browser")
    except PalateError as e:
        log.error("%s; redaction deny list not loaded", e.message)
        deny = ()
    host = Host(
        lambda: Client(socket_path=paths.socket, timeout=30.0), Redactor(deny), authorized=ok
    )
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, out, host)


# --- installing the host manifests -------------------------------------------------------------


def manifest_dir(
    browser: str,
    *,
    platform: str = sys.platform,
    home: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """The per-user NativeMessagingHosts directory of ``browser`` on macOS or Linux."""
    home = home or Path.home()
    env = os.environ if env is None else env
    if platform == "darwin":
        base = home / "Library" / "Application Support"
        return (
            base
            / {
                "chrome": "Google/Chrome",
                "chromium": "Chromium",
                "brave": "BraveSoftware/Brave-Browser",
                "edge": "Microsoft Edge",
                "firefox": "Mozilla",
            }[browser]
            / "NativeMessagingHosts"
        )
    if browser == "firefox":
        return home / ".mozilla" / "native-messaging-hosts"
    config = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    return (
        config
        / {
            "chrome": "google-chrome",
            "chromium": "chromium",
            "brave": "BraveSoftware/Brave-Browser",
            "edge": "microsoft-edge",
        }[browser]
        / "NativeMessagingHosts"
    )


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install(
    browsers: list[str],
    *,
    home: Path,
    socket: Path | None = None,
    extension_ids: list[str] | None = None,
    firefox_ids: list[str] | None = None,
    user_home: Path | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Write the launcher, the allow list and one host manifest per browser.

    The manifest's ``path`` must be absolute and cannot carry arguments, so it
    points at a small launcher in ``<home>/browser/`` that pins this Python and the
    daemon's paths as :meth:`palate.paths.Paths.child_env` gives them: ``PALATE_HOME``
    *and* ``PALATE_SOCKET`` (``socket``, default: where the daemon listens for this
    home in this environment). Browsers start hosts with their own environment, and a
    pinned home alone would move the socket out of ``$XDG_RUNTIME_DIR``.
    """
    from palate.paths import resolve

    pinned = resolve(home)
    if socket is not None:
        pinned = dataclasses.replace(pinned, socket=socket)
    chrome_ids = list(dict.fromkeys(extension_ids or [DEFAULT_CHROME_ID]))
    fx_ids = list(dict.fromkeys(firefox_ids or [DEFAULT_FIREFOX_ID]))
    for b in browsers:
        if b not in BROWSERS:
            raise PalateError(
                "invalid_request", f"unknown browser {b!r}; use {', '.join(BROWSERS)}"
            )
    bad = [i for i in chrome_ids if not (len(i) == 32 and set(i) <= set("abcdefghijklmnop"))]
    if bad:
        raise PalateError(
            "invalid_request", f"not a Chrome extension id (32 letters a-p): {', '.join(bad)}"
        )
    browser_dir = home / "browser"
    browser_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    launcher = browser_dir / "palate-native-host"
    _write(launcher, launcher_script(pinned.child_env(), python), 0o700)
    allowed = load_allowed(home)
    allowed["chrome"] = sorted(
        set(allowed.get("chrome", [])) | {f"chrome-extension://{i}/" for i in chrome_ids}
    )
    allowed["firefox"] = sorted(set(allowed.get("firefox", [])) | set(fx_ids))
    _write(browser_dir / "allowed.json", json.dumps(allowed, indent=2) + "\n", 0o600)
    written = []
    for b in browsers:
        manifest: dict[str, Any] = {
            "name": HOST_NAME,
            "description": "Palate: private feedback for your personal reward model",
            "path": str(launcher.absolute()),
            "type": "stdio",
        }
        if b == "firefox":
            manifest["allowed_extensions"] = fx_ids
        else:
            manifest["allowed_origins"] = [f"chrome-extension://{i}/" for i in chrome_ids]
        target = manifest_dir(b, home=user_home) / f"{HOST_NAME}.json"
        _write(target, json.dumps(manifest, indent=2) + "\n", 0o644)
        written.append(str(target))
    return {
        "host": HOST_NAME,
        "launcher": str(launcher),
        "socket": str(pinned.socket),
        "manifests": written,
    }


def launcher_script(env: Mapping[str, str], python: str = sys.executable) -> str:
    """The shell launcher a host manifest points at: ``env`` pinned, then this host."""
    names = sorted(env)
    lines = [f"{k}={shlex.quote(env[k])}" for k in names]
    return (
        "#!/bin/sh\n# Written by `palate browser install`; started by the browser.\n"
        + "".join(line + "\n" for line in lines)
        + f"export {' '.join(names)}\n"
        + f'exec {shlex.quote(python)} -m palate.adapters.native_host "$@"\n'
    )


def read_launcher(path: Path) -> dict[str, str]:
    """The variables a launcher pins (``NAME=value`` lines), for ``palate doctor``."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and name.isidentifier() and not line.startswith("#"):
            parts = shlex.split(value)
            out[name] = parts[0] if parts else ""
    return out


def uninstall(browsers: list[str], *, home: Path, user_home: Path | None = None) -> list[str]:
    """Remove the host manifests (and, when every browser goes, the launcher and allow list)."""
    removed = []
    for b in browsers:
        target = manifest_dir(b, home=user_home) / f"{HOST_NAME}.json"
        if target.exists():
            target.unlink()
            removed.append(str(target))
    if set(browsers) == set(BROWSERS):
        for extra in (home / "browser" / "palate-native-host", home / "browser" / "allowed.json"):
            if extra.exists():
                extra.unlink()
                removed.append(str(extra))
    return removed


if __name__ == "__main__":
    main()
