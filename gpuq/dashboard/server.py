"""Starting the dashboard: in the foreground (`gpuq dashboard`) or on a thread beside the manager's loop
(`gpuq manager run` with GPUQ_DASHBOARD_PORT set) and the demo.

Off the loopback interface it refuses to start without a users file (GPUQ_DASHBOARD_USERS): whoever could
reach the page could cancel jobs and end machines.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from gpuq.dashboard.app import Access, ASGIApp, create_app
from gpuq.dashboard.auth import UsersError, load_users
from gpuq.dashboard.board import Board, Budget, Caps
from gpuq.settings import Settings, env_float, env_int

log = logging.getLogger("gpuq.dashboard")

DEFAULT_PORT = 8090
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


@dataclass(frozen=True)
class DashboardSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    users_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # empty: loopback names on loopback, any name elsewhere
    refresh_seconds: float = 2.0
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_env(cls, *, host: str | None = None, port: int | None = None) -> DashboardSettings:
        users = os.environ.get("GPUQ_DASHBOARD_USERS") or None
        cert, key = os.environ.get("GPUQ_DASHBOARD_TLS_CERT"), os.environ.get("GPUQ_DASHBOARD_TLS_KEY")
        if bool(cert) != bool(key):
            raise SystemExit(
                "gpuq dashboard: set GPUQ_DASHBOARD_TLS_CERT and GPUQ_DASHBOARD_TLS_KEY together"
            )
        refresh = env_float("GPUQ_DASHBOARD_REFRESH_SECONDS", 2.0)
        if not 0.5 <= refresh <= 600:
            raise SystemExit("gpuq dashboard: GPUQ_DASHBOARD_REFRESH_SECONDS must be between 0.5 and 600")
        port = env_int("GPUQ_DASHBOARD_PORT", DEFAULT_PORT) if port is None else port
        if not 0 <= port <= 65535:
            raise SystemExit(f"gpuq dashboard: no such port {port}")
        hosts = os.environ.get("GPUQ_DASHBOARD_ALLOWED_HOSTS") or ""
        return cls(
            host=host or os.environ.get("GPUQ_DASHBOARD_HOST") or "127.0.0.1",
            port=port,
            users_file=Path(users) if users else None,
            allowed_hosts=tuple(h.strip().lower() for h in hosts.split(",") if h.strip()),
            refresh_seconds=refresh,
            tls_cert=Path(cert) if cert else None,
            tls_key=Path(key) if key else None,
        )

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def url(self, port: int | None = None) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else socket.gethostname()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{'https' if self.tls_cert else 'http'}://{host}:{self.port if port is None else port}/"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_app(url: str, settings: Settings, budget: Budget, ds: DashboardSettings) -> ASGIApp:
    """The app for these settings; SystemExit (naming the fault) when it must not be served so."""
    try:
        accounts = load_users(ds.users_file) if ds.users_file else None
    except UsersError as e:
        raise SystemExit(f"gpuq dashboard: {e}") from None
    if accounts is None and not ds.loopback:
        raise SystemExit(
            f"gpuq dashboard: refusing to serve on {ds.host} without logins: anyone who reaches it could "
            "cancel jobs and end machines. Set GPUQ_DASHBOARD_USERS (make its lines with "
            "`python -m gpuq.dashboard.auth NAME viewer|operator`), or serve on 127.0.0.1"
        )
    if not ds.loopback and ds.tls_cert is None:
        log.warning(
            "gpuq dashboard: serving on %s without TLS: logins cross the network readable; set "
            "GPUQ_DASHBOARD_TLS_CERT/KEY or put it behind a TLS proxy",
            ds.host,
        )
    if ds.allowed_hosts:
        allowed: frozenset[str] | None = frozenset(ds.allowed_hosts)
    elif ds.loopback:
        allowed = LOOPBACK_NAMES | {ds.host.lower()}
    else:
        allowed = None  # any Host: a login is required, so a rebound name gets nothing
    board = Board(url, settings, budget)
    return create_app(board, Access(accounts, allowed), refresh=ds.refresh_seconds)


def _config(app: ASGIApp, ds: DashboardSettings, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=ds.host.strip("[]"),
        port=port,
        log_config=None,  # keep gpuq's logging as it is
        access_log=False,
        timeout_graceful_shutdown=1,  # open event streams never end by themselves
        ssl_certfile=str(ds.tls_cert) if ds.tls_cert else None,
        ssl_keyfile=str(ds.tls_key) if ds.tls_key else None,
    )


def serve(url: str, settings: Settings, budget: Budget, ds: DashboardSettings) -> int:
    """`gpuq dashboard`: serve until interrupted."""
    app = build_app(url, settings, budget, ds)
    print(f"gpuq dashboard: {ds.url()}", flush=True)
    server = uvicorn.Server(_config(app, ds, ds.port))
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: with the default action the process
    # would die there, before exit handlers run, and leave the embedded Postgres running
    signal.signal(signal.SIGTERM, _exit)
    server.run()
    return 0 if server.started else 1


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


class Background:
    """The dashboard on a thread of this process (beside the manager's loop, or the demo)."""

    def __init__(self, app: ASGIApp, ds: DashboardSettings, port: int) -> None:
        self.ds = ds
        self.server = uvicorn.Server(_config(app, ds, port))
        self.thread = threading.Thread(target=self._run, name="gpuq-dashboard", daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot listen (it logged why)
            self.server.run()

    def start(self, timeout: float = 15.0) -> Background:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the dashboard could not listen on {self.ds.host}:{self.server.config.port}")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return self.ds.url(self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_background(
    url: str, settings: Settings, budget: Budget, ds: DashboardSettings, *, any_port: bool = False
) -> Background:
    """Serve on ds.port; with any_port, on a free port when that one is taken (the demo)."""
    app = build_app(url, settings, budget, ds)
    try:
        return Background(app, ds, ds.port).start()
    except OSError:
        if not any_port:
            raise
    return Background(app, ds, 0).start()


def start_beside_manager(url: str, settings: Settings, policy: Caps) -> Background | None:
    """`gpuq manager run`: the dashboard too, when GPUQ_DASHBOARD_PORT is set."""
    if not os.environ.get("GPUQ_DASHBOARD_PORT"):
        return None
    try:
        dashboard = start_background(url, settings, Budget.of(policy), DashboardSettings.from_env())
    except OSError as e:  # the loop matters more than the page: say so and go on without it
        log.error("no dashboard: %s", e)
        return None
    log.info("dashboard: %s", dashboard.url)
    return dashboard
