"""The dashboard's web app (Starlette): one page, its live updates and its controls.

- GET /         the page, rendered on the server (Jinja2, autoescaped) from Board.state()
- GET /events   server-sent events: `sections` (each table, rendered the same way) whenever something
                changes (a NOTIFY on gpuq_jobs, gpuq_progress or gpuq_done) or every refresh interval, and
                `history` (the charts' series) every HISTORY_SECONDS; one reader serves every open page,
                and none runs while no page is open
- POST /api/ACTION  {"target": …, "reason": …}: cancel, retry, drain, destroy, pause, resume (operators)

Every request is checked by `Guard`: the Host header (against DNS rebinding), the login, and on POSTs the
CSRF token, the Origin and a JSON body (a cross-site form can send none of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gpuq.client import DONE_CHANNEL, JOBS_CHANNEL, PROGRESS_CHANNEL, Listener
from gpuq.dashboard.auth import (
    LOCAL_OPERATOR,
    Account,
    User,
    basic_credentials,
    check_password,
    hash_password,
)
from gpuq.dashboard.board import Board, ControlError

log = logging.getLogger("gpuq.dashboard")

HERE = Path(__file__).resolve().parent
SECTIONS = ("money", "queues", "instances", "running", "finished", "failures", "decisions", "actions")
HISTORY_SECONDS = 30.0
MIN_GAP_SECONDS = 1.0  # at most one refresh a second, however many jobs report progress
KEEPALIVE_SECONDS = 15.0
FAILED_LOGIN_DELAY_SECONDS = 0.5  # each wrong guess costs the guesser this too

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# No inline script or style, nothing from elsewhere, never inside a frame (clickjacking).
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # not no-referrer: under it a browser following the Fetch standard sends `Origin: null` on the page's
    # own POSTs, which the Origin check refuses; same-origin tells other sites nothing
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


@dataclass
class Access:
    """Who may use the page: `accounts` (None: no login; only ever on loopback, see server.py) and the Host
    names it may be reached by (None: any, which only a login makes safe)."""

    accounts: dict[str, Account] | None
    allowed_hosts: frozenset[str] | None
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _verified: dict[bytes, User] = field(default_factory=dict)
    _decoy: str = field(default_factory=lambda: hash_password(secrets.token_urlsafe(16)))

    def host_allowed(self, host: str | None) -> bool:
        if self.allowed_hosts is None:
            return True
        name = (host or "").lower()
        # the name without its port: [::1]:8090 -> [::1], localhost:8090 -> localhost
        name = name.split("]", 1)[0] + "]" if name.startswith("[") else name.rsplit(":", 1)[0]
        return name in self.allowed_hosts

    async def authenticate(self, header: str | None) -> User | None:
        if self.accounts is None:
            return LOCAL_OPERATOR
        if not header:
            return None
        key = hmac.new(self.secret, header.encode(), hashlib.sha256).digest()
        user = self._verified.get(key)
        if user is not None:
            return user
        creds = basic_credentials(header)
        if creds is None:
            return None
        account = self.accounts.get(creds[0])
        # scrypt takes tens of milliseconds: off the event loop, and for an unknown name too, so that the
        # time taken does not tell which names exist
        hashed = account.hashed if account is not None else self._decoy
        if not await asyncio.to_thread(check_password, creds[1], hashed) or account is None:
            await asyncio.sleep(FAILED_LOGIN_DELAY_SECONDS)
            return None
        if len(self._verified) >= 256:
            self._verified.clear()
        self._verified[key] = account.user
        return account.user

    def csrf_token(self, user: User) -> str:
        return hmac.new(self.secret, b"csrf:" + user.name.encode(), hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: the Host check and the login for every request, security headers on every
    response. The authenticated user goes into scope["state"]["user"]."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        request = Request(scope)
        if not self.access.host_allowed(request.headers.get("host")):
            await PlainTextResponse("unknown Host", 421)(scope, receive, secured)
            return
        user = await self.access.authenticate(request.headers.get("authorization"))
        if user is None:
            log.info("refused a login from %s", request.client.host if request.client else "?")
            await PlainTextResponse(
                "login required", 401, headers={"WWW-Authenticate": 'Basic realm="gpuq", charset="UTF-8"'}
            )(scope, receive, secured)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, secured)


# --- rendering ------------------------------------------------------------------------------------


def make_templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(usd=usd, duration=duration, mib=mib)
    env.globals.update(ago=ago, since=since)
    return env


def usd(value: object, digits: int | None = None) -> str:
    """$1,234.50; small amounts with more digits ($0.0042), so a cheap fleet does not read $0.00."""
    if value is None:
        return "-"
    amount = float(value)  # type: ignore[arg-type]
    if digits is None:
        digits = 2 if abs(amount) >= 0.1 or amount == 0 else 4
    return f"${amount:,.{digits}f}"


def duration(value: object) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)  # type: ignore[arg-type]
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def since(t: datetime | None, now: datetime) -> str:
    return "-" if t is None else duration(now - t)


def ago(t: datetime | None, now: datetime) -> str:
    return "never" if t is None else f"{duration(now - t)} ago"


def mib(value: object) -> str:
    if value is None:
        return "?"
    mb = float(value)  # type: ignore[arg-type]
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def render_sections(env: Environment, state: dict[str, Any], user: User) -> dict[str, str]:
    return {name: env.get_template(f"sections/{name}.html").render(s=state, user=user) for name in SECTIONS}


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def sse(event: str, data: object) -> str:
    """One server-sent event; the JSON has no newline, so it is one data line."""
    return f"event: {event}\ndata: {json.dumps(data, default=_json_default, separators=(',', ':'))}\n\n"


# --- live updates ---------------------------------------------------------------------------------


class Hub:
    """Reads the board for every open page at once: when woken (a NOTIFY, a control) but at most every
    MIN_GAP_SECONDS, and at least every `refresh` seconds; nothing while no page is open."""

    def __init__(self, board: Board, templates: Environment, refresh: float) -> None:
        self.board = board
        self.templates = templates
        self.refresh = refresh
        self.pages: dict[asyncio.Queue[tuple[str, Any]], User] = {}
        self._wake = asyncio.Event()
        self._history_at = -math.inf
        self._rendered_state: dict[str, Any] | None = None
        self._rendered: dict[str, dict[str, str]] = {}  # role -> sections of _rendered_state

    def rendered(self, state: dict[str, Any], user: User) -> dict[str, str]:
        """The sections for this state as `user`'s role sees them (controls or not), rendered once per role
        for all open pages. Run in a thread; a lost race renders twice, harmlessly."""
        if self._rendered_state is not state:
            self._rendered_state, self._rendered = state, {}
        cache = self._rendered
        if user.role not in cache:
            cache[user.role] = render_sections(self.templates, state, user)
        return cache[user.role]

    def wake(self) -> None:
        self._wake.set()

    def subscribe(self, user: User) -> asyncio.Queue[tuple[str, Any]]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=8)
        self.pages[queue] = user
        self._history_at = -math.inf  # a new page wants its charts now
        self.wake()
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, Any]]) -> None:
        self.pages.pop(queue, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.pages:
                await self._wake.wait()
            self._wake.clear()
            started = loop.time()
            try:
                self._publish("state", await asyncio.to_thread(self.board.state))
                if started - self._history_at >= HISTORY_SECONDS:
                    self._publish("history", await asyncio.to_thread(self.board.history))
                    self._history_at = started
            except Exception as e:  # the database went away: say so, try again next interval
                log.warning("dashboard refresh failed: %s", e)
                self._publish("trouble", "the database did not answer; retrying")
            await asyncio.sleep(MIN_GAP_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, self.refresh - MIN_GAP_SECONDS))

    def _publish(self, kind: str, value: Any) -> None:
        for queue in list(self.pages):
            if queue.full():  # a slow page skips to the latest
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait((kind, value))


def listen(url: str, settings: Any, wake: Callable[[], None], stop: threading.Event) -> None:
    """A thread: LISTEN for job changes and wake the hub (through a transaction pooler this only sleeps,
    and the refresh interval does the work)."""
    listener = Listener(url, settings, [JOBS_CHANNEL, PROGRESS_CHANNEL, DONE_CHANNEL])
    try:
        while not stop.is_set():
            if listener.wait(1.0):
                wake()
    except Exception as e:
        log.warning("dashboard: stopped listening for job changes (%s); refreshing on the interval", e)
    finally:
        listener.close()


# --- the app --------------------------------------------------------------------------------------


def create_app(board: Board, access: Access, *, refresh: float = 2.0) -> ASGIApp:
    templates = make_templates()
    hub = Hub(board, templates, refresh)

    async def page(request: Request) -> Response:
        user: User = request.scope["state"]["user"]
        state = await asyncio.to_thread(board.state)
        html = templates.get_template("index.html").render(
            s=state,
            user=user,
            csrf=access.csrf_token(user),
            sections=render_sections(templates, state, user),
        )
        return HTMLResponse(html)

    async def events(request: Request) -> Response:
        user: User = request.scope["state"]["user"]
        queue = hub.subscribe(user)

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        kind, value = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if kind == "state":
                        sections = await asyncio.to_thread(hub.rendered, value, user)
                        yield sse("sections", {"sections": sections, "at": value["now"]})
                    else:
                        yield sse(kind, value)
            finally:
                hub.unsubscribe(queue)

        headers = {"X-Accel-Buffering": "no"}  # a proxy must pass each event on at once
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def act(request: Request) -> Response:
        user: User = request.scope["state"]["user"]
        action = request.path_params["action"]
        refused = _refuse_post(request, access, user)
        if refused is not None:
            log.warning("refused %s by %s: %s", action, user.name, refused.body.decode())
            return refused
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, 400)
        if not isinstance(body, dict):
            return JSONResponse({"error": 'the body must be a JSON object: {"target": …, "reason": …}'}, 400)
        target, reason = body.get("target"), body.get("reason")
        try:
            outcome = await asyncio.to_thread(board.act, user.name, action, target, reason)
        except ControlError as e:
            log.warning("%s %s by %s refused: %s", action, target, user.name, e)
            return JSONResponse({"error": str(e)}, e.status)
        log.info("%s %s by %s: %s", action, target, user.name, outcome)
        board.forget_day_reads()  # a retry or cancel changes them: the page should show it
        hub.wake()
        return JSONResponse({"ok": True, "action": action, "target": target, "outcome": outcome})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: we are stopping
                loop.call_soon_threadsafe(hub.wake)

        listener = threading.Thread(
            target=listen,
            args=(board.url, board.settings, wake, stop),
            name="gpuq-dashboard-listen",
            daemon=True,
        )
        listener.start()
        task = asyncio.create_task(hub.run())
        try:
            yield
        finally:
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(listener.join, 3.0)  # its connection closed before the database may go
            board.close()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/events", events),
            Route("/api/{action}", act, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.hub = hub
    return Guard(app, access)


def _refuse_post(request: Request, access: Access, user: User) -> JSONResponse | None:
    """Why a control request must not run (None: it may). Viewers never act; a request must carry the
    page's CSRF token, come from the page's own origin when the browser says where from, and be JSON."""
    if not user.may_act:
        return JSONResponse({"error": f"{user.name} may look but not act (role {user.role})"}, 403)
    token = request.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(token.encode(), access.csrf_token(user).encode()):
        return JSONResponse({"error": "missing or wrong CSRF token: reload the page"}, 403)
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
        return JSONResponse({"error": "cross-origin request refused"}, 403)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return JSONResponse({"error": "send the control as application/json"}, 415)
    return None
