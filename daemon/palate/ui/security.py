"""The UI's access rules, enforced before any page or action runs (docs/ui.md, "Security").

* **Host.** Only ``127.0.0.1`` and ``localhost``, with no port or the bound one. A page on
  another site whose name was re-pointed at 127.0.0.1 (DNS rebinding) sends its own name and
  is refused before anything else happens.
* **Token.** A per-launch secret, in the printed URL (``?token=``) as Jupyter does. The first
  request that carries it gets an ``HttpOnly``, ``SameSite=Strict`` cookie and a redirect to
  the same page without the token (it then stays out of history and ``Referer``). Requests
  with neither the token nor the cookie are refused.
* **State-changing requests** (anything but GET/HEAD) must come from the UI's own origin
  (:func:`same_origin`: ``Sec-Fetch-Site``, ``Origin``, else ``Referer``) *and* carry the
  per-launch CSRF token, as the ``csrf`` form field or the ``X-CSRF-Token`` header
  (:func:`state_changing`).
* Every answer carries a strict Content-Security-Policy (scripts from the UI's own origin
  only, no inline script), ``no-store``, a ``same-origin`` referrer policy and ``nosniff``.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import URL, FormData, Headers, QueryParams
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HOSTS = ("127.0.0.1", "localhost")
SAFE_METHODS = ("GET", "HEAD")
#: Form bodies are small (ids of selected events at most); anything larger is refused.
MAX_BODY_BYTES = 1 << 20
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
#: The embedded model report: its own inline CSS and data: plots, nothing else, sandboxed.
REPORT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; sandbox"
)


@dataclass(frozen=True)
class Secrets:
    """What one launch of ``palate ui`` knows: its port, the access token, the CSRF token."""

    port: int
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def cookie(self) -> str:
        # Cookies are not per port: two UIs on one machine must not overwrite each other's.
        return f"palate_ui_{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?{urlencode({'token': self.token})}"

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        return name in HOSTS and (port == "" or port == str(self.port))

    def origin_allowed(self, origin: str, host: str) -> bool:
        """Same origin: ``http://`` plus exactly the Host this request was sent to."""
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        return parts.scheme == "http" and parts.netloc == host and not parts.path.strip("/")


def _equal(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def refuse(why: str) -> Response:
    return PlainTextResponse(
        f"403 Forbidden: {why}\n",
        status_code=403,
        headers=security_headers(),
    )


def security_headers(csp: str = CSP) -> dict[str, str]:
    headers = {
        "Content-Security-Policy": csp,
        "Cache-Control": "no-store",
        # Same-origin requests keep Origin/Referer (checked on every action); no other site
        # ever learns a URL of this UI.
        "Referrer-Policy": "same-origin",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
    }
    if "frame-ancestors 'none'" in csp:
        headers["X-Frame-Options"] = "DENY"
    return headers


class Guard:
    """ASGI middleware: Host, token/cookie and origin checks on every HTTP request."""

    def __init__(self, app: ASGIApp, secrets_: Secrets) -> None:
        self.app = app
        self.secrets = secrets_

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: the UI has none
            return
        response = self.check(scope)
        if response is not None:
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                # A response that set its own policy (the report) keeps it whole.
                if b"content-security-policy" not in {k.lower() for k, _ in raw}:
                    raw.extend(
                        (k.lower().encode(), v.encode()) for k, v in security_headers().items()
                    )
                message["headers"] = raw
            await send(message)

        await self.app(scope, _limited(receive), send_with_headers)

    def check(self, scope: Scope) -> Response | None:
        """None if the request may go on, else the refusal (or the token's redirect)."""
        s = self.secrets
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not s.host_allowed(host):
            return refuse("this UI answers only to http://127.0.0.1 and http://localhost")
        assert host is not None
        url = URL(scope=scope)
        query_params = QueryParams(scope.get("query_string", b""))
        given = query_params.get("token")
        if given is not None:
            if not _equal(given, s.token):
                return refuse("wrong token; open the URL that `palate ui` printed")
            if scope["method"] not in SAFE_METHODS:
                return refuse("the token belongs in the URL of a page, not of an action")
            # Swap the token for a cookie and drop it from the address bar.
            query = [(k, v) for k, v in query_params.multi_items() if k != "token"]
            target = url.path + (f"?{urlencode(query)}" if query else "")
            response = RedirectResponse(target, status_code=303, headers=security_headers())
            response.set_cookie(
                s.cookie, s.token, httponly=True, samesite="strict", path="/", secure=False
            )
            return response
        if not _equal(Request(scope).cookies.get(s.cookie), s.token):
            return refuse("not signed in; open the URL that `palate ui` printed")
        if scope["method"] not in SAFE_METHODS:
            if not same_origin(headers, host, s):
                return refuse("a state-changing request must come from this UI's own pages")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                return PlainTextResponse("413 request too large\n", status_code=413)
        return None


def same_origin(headers: Headers, host: str, s: Secrets) -> bool:
    """Did this request come from a page of this UI? ``Sec-Fetch-Site`` (a header pages
    cannot forge), when sent, must say ``same-origin``; ``Origin``, when it names one, must be
    ours; and one of the two must vouch for it (``Referer`` stands in for browsers that send
    neither)."""
    site = headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return False
    origin = headers.get("origin")
    if origin is not None and origin != "null":
        return s.origin_allowed(origin, host)
    if site == "same-origin":
        return True  # an opaque Origin ("null") on a same-origin form post
    referer = headers.get("referer")
    return referer is not None and s.origin_allowed(_origin_of(referer), host)


def _origin_of(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    return f"{parts.scheme}://{parts.netloc}"


def _limited(receive: Receive) -> Receive:
    """Stop reading a body (chunked, without Content-Length) past MAX_BODY_BYTES."""
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise ValueError("request body too large")
        return message

    return wrapped


Endpoint = Callable[[Request], Awaitable[Response]]


def state_changing(fn: Endpoint) -> Endpoint:
    """Wrap a POST endpoint: the CSRF token must match (form field or header); the parsed
    form is left on ``request.state.form``. The Guard has already checked the origin."""

    @functools.wraps(fn)
    async def wrapper(request: Request) -> Response:
        secrets_: Secrets = request.app.state.secrets
        form: FormData = await request.form(max_files=0, max_fields=2000)
        given: Any = request.headers.get("x-csrf-token") or form.get("csrf")
        if not isinstance(given, str) or not _equal(given, secrets_.csrf):
            return refuse("missing or wrong CSRF token; reload the page and try again")
        request.state.form = form
        return await fn(request)

    wrapper.state_changing = True  # type: ignore[attr-defined]
    return wrapper
