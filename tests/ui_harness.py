"""``palate ui`` as a user starts it: a real child process in front of a real daemon."""

from __future__ import annotations

import http.client
import os
import re
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from conftest import PALATE, DaemonProc

URL_RE = re.compile(r"Palate UI: (http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_\-]+))")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str


class UiProc:
    """``palate ui --no-browser`` for ``daemon``'s home; ``url`` is the one it printed."""

    def __init__(self, daemon: DaemonProc, *args: str) -> None:
        self.daemon = daemon
        self.proc = subprocess.Popen(
            [*PALATE, "ui", "--no-browser", *args],
            env=daemon.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url, self.port, self.token = self._read_url(30.0)
        self.base = f"http://127.0.0.1:{self.port}"
        self.cookie = f"palate_ui_{self.port}={self.token}"

    def _read_url(self, timeout: float) -> tuple[str, int, str]:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if self.proc.poll() is not None:
                    break
                continue
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = URL_RE.search(line)
            if m:
                return m.group(1), int(m.group(2)), m.group(3)
        self.stop()
        raise RuntimeError(f"palate ui printed no URL: {''.join(seen)!r}")

    def request(
        self,
        method: str,
        path: str,
        *,
        host: str | None = None,
        cookie: bool = True,
        headers: dict[str, str] | None = None,
        form: dict[str, Any] | list[tuple[str, str]] | None = None,
    ) -> Reply:
        """One raw HTTP request with full control of Host, Origin and the cookie."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        hdrs = {"Host": host if host is not None else f"127.0.0.1:{self.port}"}
        if cookie:
            hdrs["Cookie"] = self.cookie
        body = None
        if form is not None:
            body = urlencode(form, doseq=True)
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        out = Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
        conn.close()
        return out

    def post(self, path: str, form: dict[str, Any] | list[tuple[str, str]], **kw: Any) -> Reply:
        """A same-origin POST as the UI's own pages send it (Origin + CSRF token)."""
        headers = {"Origin": self.base, "Sec-Fetch-Site": "same-origin", **kw.pop("headers", {})}
        return self.request("POST", path, form=form, headers=headers, **kw)

    def csrf(self) -> str:
        page = self.request("GET", "/pause").body
        m = re.search(r'name="csrf" value="([^"]+)"', page)
        assert m, page[:500]
        return m.group(1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def chromium_path() -> str | None:
    for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.access(p, os.X_OK):
            return p
    return None
