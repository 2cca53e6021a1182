"""The pages and actions of ``palate ui``: a Starlette app over the daemon's socket.

Pages render on the server (Jinja2, autoescaped: captured text is shown, never run) and
work without JavaScript; the vendored htmx (``static/htmx.min.js``) only makes navigation
and forms swap in place, and ``static/palate.js`` adds the review keys and select-all.
Every action is a POST through :func:`palate.ui.security.state_changing` and answers with
a redirect (post/redirect/get), so reloading a page never repeats an action.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from palate.errors import PalateError
from palate.ui import charts, coverage
from palate.ui.link import DaemonLink
from palate.ui.security import REPORT_CSP, Guard, Secrets, security_headers, state_changing

HERE = Path(__file__).parent
PAGE_SIZE = 50
#: The review page asks for this many waiting questions (it shows the first).
REVIEW_BATCH = 20
PAUSE_CHOICES = {"3600": 3600.0, "28800": 28800.0}
#: Messages after an action, by code (never text taken from the URL).
DONE = {
    "deleted": "Deleted {n} event(s) for good.",
    "answered": "Answer saved.",
    "paused": "Collection paused.",
    "resumed": "Collection resumed.",
    "deployed": "Deployed version {n}.",
    "rolledback": "Rolled back to version {n}.",
}
HTTP_STATUS = {
    "unavailable": 503,
    "not_found": 404,
    "invalid_request": 400,
    "too_large": 400,
    "conflict": 409,
    "busy": 503,
    "unknown_method": 501,
}

env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.ChainableUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(ts: Any, fmt: str = "%Y-%m-%d %H:%M") -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return time.strftime(fmt, time.localtime(ts))


def _pct(x: Any) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "-"


def _ago(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    s = time.time() - ts
    if s < 0:
        return "in " + _span(-s)
    return _span(s) + " ago"


def _span(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


env.filters.update(when=_when, pct=_pct, ago=_ago, span=_span)
env.globals.update(share_bar=charts.share_bar)


def _tz_offset() -> int:
    return int(time.localtime().tm_gmtoff)


def _local_day(value: str | None, *, end: bool = False) -> float | None:
    """``YYYY-MM-DD`` (local) to Unix seconds: its start, or with ``end`` the next day's."""
    if not value:
        return None
    try:
        day = datetime.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise PalateError("invalid_request", f"not a date (YYYY-MM-DD): {value[:40]!r}") from None
    ts = time.mktime(day.timetuple())
    return ts + 86_400 if end else ts


class Pages:
    """Rendering with what every page shows: navigation, pause state, messages."""

    def __init__(self, link: DaemonLink, secrets: Secrets) -> None:
        self.link = link
        self.secrets = secrets

    async def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        paused = context.pop("paused", ...)
        if paused is ...:
            try:
                paused = (await self.link.call("pause_state")).get("paused")
            except PalateError:
                paused = None
        done = request.query_params.get("done")
        n = request.query_params.get("n", "")
        message = DONE[done].format(n=n if n.isdigit() else "") if done in DONE else None
        html = env.get_template(name).render(
            request=request,
            path=request.url.path,
            csrf=self.secrets.csrf,
            paused=paused,
            message=message,
            **context,
        )
        return HTMLResponse(html, status_code=status_code)

    async def error(self, request: Request, e: PalateError) -> HTMLResponse:
        return await self.render(
            request,
            "error.html",
            status_code=HTTP_STATUS.get(e.code, 500),
            error=e,
            paused=None if e.code == "unavailable" else ...,
        )


def create_app(socket_path: Path, secrets: Secrets) -> Starlette:
    link = DaemonLink(socket_path)
    pages = Pages(link, secrets)

    def handles(fn: Any) -> Any:
        async def wrapper(request: Request) -> Response:
            try:
                response: Response = await fn(request)
                return response
            except PalateError as e:
                return await pages.error(request, e)

        wrapper.__name__ = fn.__name__
        wrapper.__doc__ = fn.__doc__
        return wrapper

    def back(path: str, **query: Any) -> RedirectResponse:
        q = {k: v for k, v in query.items() if v is not None}
        return RedirectResponse(path + (f"?{urlencode(q)}" if q else ""), status_code=303)

    # -- overview ---------------------------------------------------------------------------
    @handles
    async def overview(request: Request) -> Response:
        status = await link.call("status")
        stats = await link.call("events_stats", {"days": 30, "tz_offset_s": _tz_offset()})
        deployed = (await link.call("models"))["deployed"]
        sources = [name for name, _, _ in coverage.shares(stats["by_source"])]
        palette = charts.colours(sources)
        return await pages.render(
            request,
            "overview.html",
            status=status,
            stats=stats,
            palette=palette,
            day_chart=charts.per_day(stats["days"], palette),
            hour_chart=charts.per_hour(stats["by_hour"]),
            notes=coverage.notes(stats),
            shares=coverage.shares,
            paused=status.get("paused"),
            deployed=deployed,
        )

    # -- data -------------------------------------------------------------------------------
    def filters(params: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("source", "kind", "q"):
            value = str(params.get(key) or "").strip()
            if value:
                out[key] = value
        since = _local_day(str(params.get("from") or "") or None)
        until = _local_day(str(params.get("to") or "") or None, end=True)
        if since is not None:
            out["since"] = since
        if until is not None:
            out["until"] = until
        return out

    @handles
    async def data(request: Request) -> Response:
        qp = request.query_params
        params = filters(qp)
        before = qp.get("before", "")
        page = await link.call(
            "events_list",
            {**params, "limit": PAGE_SIZE, **({"before": int(before)} if before.isdigit() else {})},
        )
        counts = (await link.call("status"))["events"]
        form = {k: qp.get(k, "") for k in ("source", "kind", "q", "from", "to")}
        older = None
        if page["next"] is not None:
            older = "/data?" + urlencode({**{k: v for k, v in form.items() if v},
                                          "before": page["next"]})  # fmt: skip
        return await pages.render(
            request,
            "data.html",
            page=page,
            form=form,
            sources=sorted(counts["by_source"]),
            kinds=sorted(counts["by_kind"]),
            total_stored=counts["total"],
            older=older,
            first_page=not before,
        )

    @handles
    async def event(request: Request) -> Response:
        event_id = request.query_params.get("id", "")
        ev = (await link.call("event_get", {"id": event_id}))["event"]
        return await pages.render(request, "event.html", ev=ev)

    @handles
    @state_changing
    async def forget(request: Request) -> Response:
        form = request.state.form
        ids = [i for i in form.getlist("id") if isinstance(i, str) and i]
        if not ids:
            return back("/data")
        if form.get("confirm") != "yes":
            return await pages.render(request, "forget.html", ids=ids)
        n = await link.call("forget", {"ids": ids})
        return back("/data", done="deleted", n=n["deleted"])

    @handles
    @state_changing
    async def export(request: Request) -> Response:
        params = filters(request.state.form)
        first = await link.call("events_list", {**params, "full": True, "limit": 200})

        async def lines() -> AsyncIterator[bytes]:
            page = first
            while True:
                for ev in page["events"]:
                    out = {k: v for k, v in ev.items() if k not in ("seq", "v", "received")}
                    yield (json.dumps(out, ensure_ascii=False) + "\n").encode("utf-8")
                if page["next"] is None:
                    return
                page = await link.call(
                    "events_list", {**params, "full": True, "limit": 200, "before": page["next"]}
                )

        name = f"palate-export-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        return StreamingResponse(
            lines(),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    # -- review -----------------------------------------------------------------------------
    @handles
    async def review(request: Request) -> Response:
        try:
            queue = await link.call("review_list", {"limit": REVIEW_BATCH})
        except PalateError as e:
            if e.code != "unknown_method":
                raise
            return await pages.render(request, "review.html", items=None, item=None, waiting=0)
        items = queue["items"]
        return await pages.render(
            request,
            "review.html",
            items=items,
            item=items[0] if items else None,
            waiting=queue.get("open", len(items)),
        )

    @handles
    @state_changing
    async def review_answer(request: Request) -> Response:
        form = request.state.form
        answer = form.get("answer")
        if answer not in ("a", "b", "tie", "skip"):
            raise PalateError("invalid_request", "answer must be a, b, tie or skip")
        item_id = form.get("id")
        if not isinstance(item_id, str) or not item_id:
            raise PalateError("invalid_request", "which question? (no id)")
        await link.call("review_answer", {"id": item_id, "answer": answer})
        return back("/review", done="answered")

    # -- models -----------------------------------------------------------------------------
    @handles
    async def models(request: Request) -> Response:
        listing = await link.call("models")
        return await pages.render(request, "models.html", listing=listing)

    async def one_model(version: int) -> dict[str, Any]:
        model: dict[str, Any] = (await link.call("models", {"version": version}))["model"]
        return model

    @handles
    async def model(request: Request) -> Response:
        version = request.path_params["version"]
        info = await one_model(version)
        listing = await link.call("models")
        return await pages.render(
            request,
            "model.html",
            m=info,
            meta=info["meta"],
            deployed=listing["deployed"],
            rollback_target=listing["rollback_target"],
        )

    @handles
    async def report(request: Request) -> Response:
        version = request.path_params["version"]
        info = await one_model(version)
        listing = await link.call("models")
        html = await run_in_threadpool(_report_html, version, info, listing)
        return HTMLResponse(html, headers=security_headers(REPORT_CSP))

    @handles
    async def deploy_confirm(request: Request) -> Response:
        version = request.path_params["version"]
        info = await one_model(version)
        listing = await link.call("models")
        return await pages.render(
            request, "confirm_deploy.html", m=info, deployed=listing["deployed"]
        )

    @handles
    @state_changing
    async def deploy(request: Request) -> Response:
        version = request.path_params["version"]
        params: dict[str, Any] = {"version": version, "reason": "deployed in palate ui"}
        if request.state.form.get("override") == "yes":
            params["override"] = True
        res = await link.call("deploy", params)
        return back(f"/models/{version}", done="deployed", n=res["deployed"])

    @handles
    async def rollback_confirm(request: Request) -> Response:
        listing = await link.call("models")
        return await pages.render(request, "confirm_rollback.html", listing=listing)

    @handles
    @state_changing
    async def rollback(request: Request) -> Response:
        res = await link.call("rollback", {"reason": "rollback in palate ui"})
        return back("/models", done="rolledback", n=res["deployed"])

    # -- pause ------------------------------------------------------------------------------
    @handles
    async def pause_page(request: Request) -> Response:
        state = await link.call("pause_state")
        status = await link.call("status")
        return await pages.render(
            request,
            "pause.html",
            paused=state["paused"],
            windows=state.get("windows") or [],
            adapters=status.get("adapters") or [],
        )

    @handles
    @state_changing
    async def pause(request: Request) -> Response:
        choice = str(request.state.form.get("for_s") or "")
        params = {"for_s": PAUSE_CHOICES[choice]} if choice in PAUSE_CHOICES else {}
        await link.call("pause", params)
        return back(_next(request.state.form.get("next")), done="paused")

    @handles
    @state_changing
    async def resume(request: Request) -> Response:
        await link.call("resume")
        return back(_next(request.state.form.get("next")), done="resumed")

    @handles
    async def banner(request: Request) -> Response:
        """The pause banner alone (htmx refreshes it on every page)."""
        state = await link.call("pause_state")
        html = env.get_template("_banner.html").render(
            paused=state["paused"], csrf=secrets.csrf, path=request.query_params.get("path", "/")
        )
        return HTMLResponse(html)

    routes = [
        Route("/", overview),
        Route("/data", data),
        Route("/data/event", event),
        Route("/data/forget", forget, methods=["POST"]),
        Route("/data/export", export, methods=["POST"]),
        Route("/review", review),
        Route("/review/answer", review_answer, methods=["POST"]),
        Route("/models", models),
        Route("/models/rollback", rollback_confirm, methods=["GET"]),
        Route("/models/rollback", rollback, methods=["POST"]),
        Route("/models/{version:int}", model),
        Route("/models/{version:int}/report", report),
        Route("/models/{version:int}/deploy", deploy_confirm, methods=["GET"]),
        Route("/models/{version:int}/deploy", deploy, methods=["POST"]),
        Route("/pause", pause_page),
        Route("/pause/start", pause, methods=["POST"]),
        Route("/pause/resume", resume, methods=["POST"]),
        Route("/fragment/banner", banner),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await link.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.secrets = secrets
    app.state.link = link
    app.add_middleware(Guard, secrets_=secrets)
    return app


def _next(value: Any) -> str:
    """Where to go after pause/resume: a path of this UI only (never another site)."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//"):
        return value.split("?", 1)[0]
    return "/pause"


def _report_html(version: int, info: Mapping[str, Any], listing: Mapping[str, Any]) -> str:
    """The registry's HTML report of one version (as `palate report` writes it)."""
    from palate.evaluation.report import render_version_report

    meta = info["meta"]
    if "metrics" not in meta:
        return f"<p>Version {version} has no evaluation to report.</p>"
    try:
        return render_version_report(version, info, listing)
    except (KeyError, TypeError, ValueError) as e:
        return f"<p>The report of version {version} could not be drawn ({type(e).__name__}).</p>"
