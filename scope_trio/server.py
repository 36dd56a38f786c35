"""``open_server``: the whole server assembled in one place; ``serve`` runs it until told to stop.

Every test rig and benchmark builds the server through :func:`open_server` too, so they run
the real wiring and the real shutdown order. The nested ``async with`` blocks below are the
supervision tree drawn in ``docs/architecture.md``: the trio-asyncio loop, the embedded dev
cloud (only when no cloud is configured), ``CloudManager.open``, ``Relay.open``, then the
HTTP services (metrics observer, Hypercorn).

Shutdown (the block ends, or it is cancelled) runs in this order, the whole of it bounded by
``ServerConfig.shutdown_timeout``:

1. event streams end (:meth:`ScopeApp.begin_shutdown`), so no request keeps Hypercorn busy;
2. browser sessions close (``relay.close_all``), then the cloud (``manager.disconnect``),
   while the HTTP server still answers;
3. Hypercorn stops accepting, drains within ``graceful_timeout`` and runs ``after_serving``;
4. the embedded dev cloud stops; every remaining task is cancelled.

``open_server`` sets aioice's ICE consent timing for the WHOLE PROCESS
(:func:`scope_trio.rtc.configure_process`, ``[ice]`` in the configuration: a silent cloud
path closes in ~8 s instead of ~31 s, a backstop to the media session's own ~1 s
path-silence signal) and restores the previous timing when it returns.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings
from scope_trio.config import ServerConfig
from scope_trio.http.app import BrowserRelay, ScopeApp, create_app
from scope_trio.ops.logring import LogRing
from scope_trio.ops.metrics import ServerMetrics
from scope_trio.relay.relay import Relay

__all__ = ["RelayFactory", "RunningServer", "ServerConfig", "is_loopback", "open_server", "serve"]

logger = logging.getLogger(__name__)

RelayFactory = Callable[[CloudManager, ServerConfig], AbstractAsyncContextManager[BrowserRelay]]
"""Opens the browser relay over the manager for the server's lifetime (tests swap it)."""

DEVCLOUD_STOP_TIMEOUT = 5.0
CONFIRM_CLOSED_TIMEOUT = 1.0
"""Bound on the relay's and the manager's own close when their block ends. The ordered
shutdown (:func:`_shutdown`) has already closed both by then, so this is a no-op unless
that shutdown overran its bound; it keeps the whole exit within ``shutdown_timeout`` plus
two of these."""


@dataclass(frozen=True)
class RunningServer:
    """What :func:`open_server` yields: the bound URL and the parts, for tests and tools."""

    url: str
    config: ServerConfig
    manager: CloudManager
    relay: BrowserRelay
    app: ScopeApp
    metrics: ServerMetrics
    cloud_url: str | None
    """The embedded dev cloud's base URL, or None when a cloud is configured."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (only those are safe to bind freely)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _default_relay(
    manager: CloudManager, config: ServerConfig
) -> AbstractAsyncContextManager[BrowserRelay]:
    return Relay.open(manager, fps=config.relay_fps, close_timeout=CONFIRM_CLOSED_TIMEOUT)


@contextlib.asynccontextmanager
async def open_server(
    config: ServerConfig,
    *,
    relay_factory: RelayFactory = _default_relay,
    sse_keepalive: float | None = None,
) -> AsyncIterator[RunningServer]:
    """The whole server, serving for the block (see the module docstring).

    Yields once the HTTP server accepts connections. When the block ends (or is cancelled)
    everything is shut down in order within ``config.shutdown_timeout``, and every task
    it started has ended by the time this returns.
    """
    ice = config.ice
    consent = rtc.ConsentTiming(ice.interval, ice.failures, ice.rto) if ice.tune else None
    previous = rtc.configure_process(consent)
    try:
        async with rtc.open_loop(), trio.open_nursery() as root:
            settings, cloud_url = config.cloud, None
            stop_devcloud = trio.Event()
            if config.embedded_cloud:
                # Imported here: the dev cloud is a development tool, not part of the runtime.
                from scope_trio.dev.devcloud import (  # noqa: PLC0415
                    DevCloudConfig,
                    serve_devcloud,
                    ws_url,
                )

                devcloud = DevCloudConfig(pipeline=config.devcloud_pipeline)
                cloud_url = await root.start(
                    partial(serve_devcloud, devcloud, shutdown_trigger=stop_devcloud.wait)
                )
                settings = CloudSettings(ws_url=ws_url(cloud_url))
                logger.info("no cloud configured: using the embedded dev cloud at %s", cloud_url)
            try:
                async with (
                    CloudManager.open(
                        settings,
                        policy=config.reconnect,
                        link_policy=config.relink,
                        media_config=config.media,
                        link_options=config.link,
                        close_timeout=CONFIRM_CLOSED_TIMEOUT,
                    ) as manager,
                    relay_factory(manager, config) as relay,
                    _serve_http(config, manager, relay, sse_keepalive) as (url, app, metrics),
                ):
                    yield RunningServer(url, config, manager, relay, app, metrics, cloud_url)
            finally:
                stop_devcloud.set()
                root.cancel_scope.deadline = trio.current_time() + DEVCLOUD_STOP_TIMEOUT
    finally:
        if previous is not None:
            rtc.tune_ice_consent(previous.interval, previous.failures, previous.rto)


@contextlib.asynccontextmanager
async def _serve_http(
    config: ServerConfig,
    manager: CloudManager,
    relay: BrowserRelay,
    sse_keepalive: float | None,
) -> AsyncIterator[tuple[str, ScopeApp, ServerMetrics]]:
    """Hypercorn and the metrics observer for the block; on exit, steps 1-3 of the shutdown."""
    log_ring = LogRing(config.log_ring_bytes, secrets=[config.cloud.api_key])
    with _attached(log_ring):
        async with _serve_app(config, manager, relay, sse_keepalive, log_ring) as served:
            yield served


@contextlib.contextmanager
def _attached(handler: logging.Handler) -> Iterator[None]:
    """``handler`` on the root logger for the block (the log ring sees every server line)."""
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


@contextlib.asynccontextmanager
async def _serve_app(
    config: ServerConfig,
    manager: CloudManager,
    relay: BrowserRelay,
    sse_keepalive: float | None,
    log_ring: LogRing,
) -> AsyncIterator[tuple[str, ScopeApp, ServerMetrics]]:
    stop_http = trio.Event()
    http_done = trio.Event()
    async with trio.open_nursery() as services:
        metrics = ServerMetrics(manager, relay if isinstance(relay, Relay) else None)
        await services.start(metrics.run)  # subscribed before anything can change
        app = create_app(
            manager,
            relay,
            debug_endpoints=config.debug_endpoints,
            cors_origins=config.cors_origins,
            max_body_bytes=config.max_body_bytes,
            metrics=metrics,
            frontend_dir=Path(config.frontend) if config.frontend else None,
            log_ring=log_ring,
            **({} if sse_keepalive is None else {"sse_keepalive": sse_keepalive}),
        )
        hyper = HypercornConfig()
        hyper.bind = [_bind(config.host, config.port)]
        hyper.graceful_timeout = config.graceful_timeout
        hyper.accesslog = None
        hyper.errorlog = logging.getLogger("hypercorn.error")

        async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await hypercorn.trio.serve(
                    app, hyper, shutdown_trigger=stop_http.wait, task_status=task_status
                )
            finally:
                http_done.set()

        binds: list[str] = await services.start(run_http)
        try:
            yield binds[0], app, metrics
        finally:
            with trio.move_on_after(config.shutdown_timeout, shield=True) as bounded:
                await _shutdown(app, relay, manager, stop_http, http_done)
            if bounded.cancelled_caught:
                logger.warning("shutdown overran %g s; cutting it short", config.shutdown_timeout)
            services.cancel_scope.cancel()


async def serve(
    config: ServerConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    relay_factory: RelayFactory = _default_relay,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or until cancelled).

    Reports the bound URL (``http://127.0.0.1:8000``) through ``task_status`` once the HTTP
    server accepts connections. Returns only after everything it started is closed.
    """
    async with open_server(config, relay_factory=relay_factory) as server:
        task_status.started(server.url)
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        logger.info("shutting down")


async def _shutdown(
    app: ScopeApp,
    relay: BrowserRelay,
    manager: CloudManager,
    stop_http: trio.Event,
    http_done: trio.Event,
) -> None:
    """Sessions and cloud first, then HTTP; each step runs even if the previous one failed."""
    app.begin_shutdown()
    try:
        await relay.close_all()
    except Exception:
        logger.exception("closing browser sessions failed")
    try:
        await manager.disconnect()
    except Exception:
        logger.exception("disconnecting from the cloud failed")
    stop_http.set()
    await http_done.wait()


def _bind(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
