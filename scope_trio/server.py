"""``serve``: the whole server in one trio task — HTTP API, cloud manager, relay, dev cloud.

Supervision::

    serve()                                   trio-asyncio loop open for the whole run
    ├── serve_devcloud                        only when no cloud is configured (embedded)
    └── services nursery
        ├── CloudManager tasks (link, supervisor)
        ├── Relay sessions
        ├── ServerMetrics.run                     counts supervisor events for GET /metrics
        └── hypercorn.trio.serve(app)         stops on its own trigger, after the rest

Shutdown (``shutdown_trigger`` returns, or ``serve`` is cancelled) runs in this order, the
whole of it bounded by ``ServerConfig.shutdown_timeout``:

1. event streams end (:meth:`ScopeApp.begin_shutdown`), so no request keeps Hypercorn busy;
2. browser sessions close (``relay.close_all``), then the cloud (``manager.disconnect``);
3. Hypercorn stops accepting, drains within ``graceful_timeout`` and runs ``after_serving``;
4. the embedded dev cloud stops; every remaining task is cancelled.

``serve`` applies :func:`scope_trio.rtc.tune_ice_consent` (ICE consent closes a silent
cloud path in ~4 s instead of ~31 s, as a backstop to the media session's own ~1 s
path-silence signal). That changes aioice module constants for the WHOLE PROCESS; the
previous timing is restored when ``serve`` returns.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings
from scope_trio.dev.devcloud import DevCloudConfig, serve_devcloud, ws_url
from scope_trio.http.app import MIB, BrowserRelay, ScopeApp, create_app
from scope_trio.ops.metrics import ServerMetrics
from scope_trio.relay.relay import Relay

__all__ = ["RelayFactory", "ServerConfig", "is_loopback", "serve"]

logger = logging.getLogger(__name__)

RelayFactory = Callable[[CloudManager, trio.Nursery], BrowserRelay]


@dataclass(frozen=True)
class ServerConfig:
    """How to run :func:`serve`. ``port=0`` binds an ephemeral port (see the started URL)."""

    host: str = "127.0.0.1"
    port: int = 8000
    cloud: CloudSettings = field(default_factory=CloudSettings)
    """Where the cloud is; with nothing configured the embedded dev cloud is used."""
    debug_endpoints: bool = False
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = MIB
    graceful_timeout: float = 3.0
    """Hypercorn's bound on draining open connections at shutdown."""
    shutdown_timeout: float = 15.0
    """Bound on the whole shutdown (sessions, cloud, HTTP, dev cloud)."""
    tune_ice_consent: bool = True
    devcloud_pipeline: str = "invert"
    """The embedded dev cloud's pipeline: "invert" shows a first-time user that frames went
    through it; benchmarks use "passthrough"."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> ServerConfig:
        """CONTRACT section 3 variables; ``overrides`` (flags) that are not None win."""
        values: dict[str, Any] = {
            "host": environ.get("SCOPE_HOST") or cls.host,
            "port": int(environ.get("SCOPE_PORT") or cls.port),
            "cloud": CloudSettings.from_env(environ),
            "debug_endpoints": bool(environ.get("SCOPE_DEBUG_ENDPOINTS")),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def embedded_cloud(self) -> bool:
        """True when no cloud is configured: :func:`serve` starts the dev cloud in-process."""
        return not self.cloud.credentials_configured


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (only those are safe to bind freely)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _default_relay(manager: CloudManager, nursery: trio.Nursery) -> BrowserRelay:
    return Relay(manager, nursery)


async def serve(
    config: ServerConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    relay_factory: RelayFactory = _default_relay,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (or until cancelled); see the module docstring.

    Reports the bound URL (``http://127.0.0.1:8000``) through ``task_status`` once the HTTP
    server accepts connections. Returns only after everything it started is closed.
    """
    previous = rtc.configure_process(rtc.FAST_CONSENT if config.tune_ice_consent else None)
    try:
        async with rtc.open_loop(), trio.open_nursery() as root:
            settings, cloud_url = config.cloud, None
            stop_devcloud = trio.Event()
            if config.embedded_cloud:
                devcloud = DevCloudConfig(pipeline=config.devcloud_pipeline)
                cloud_url = await root.start(
                    partial(serve_devcloud, devcloud, shutdown_trigger=stop_devcloud.wait)
                )
                settings = CloudSettings(ws_url=ws_url(cloud_url))
                logger.info("no cloud configured: using the embedded dev cloud at %s", cloud_url)
            try:
                await _serve_api(config, settings, shutdown_trigger, relay_factory, task_status)
            finally:
                stop_devcloud.set()
                root.cancel_scope.deadline = trio.current_time() + 5.0
    finally:
        if previous is not None:
            rtc.tune_ice_consent(previous.interval, previous.failures, previous.rto)


async def _serve_api(
    config: ServerConfig,
    settings: CloudSettings,
    shutdown_trigger: Callable[[], Awaitable[object]] | None,
    relay_factory: RelayFactory,
    task_status: trio.TaskStatus[str],
) -> None:
    stop_http = trio.Event()
    http_done = trio.Event()
    async with trio.open_nursery() as services:
        manager = CloudManager(services, settings)
        relay = relay_factory(manager, services)
        metrics = ServerMetrics(manager, relay if isinstance(relay, Relay) else None)
        await services.start(metrics.run)  # subscribed before anything can change
        app = create_app(
            manager,
            relay,
            debug_endpoints=config.debug_endpoints,
            cors_origins=config.cors_origins,
            max_body_bytes=config.max_body_bytes,
            metrics=metrics,
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
        task_status.started(binds[0])
        try:
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
            logger.info("shutting down")
        finally:
            with trio.move_on_after(config.shutdown_timeout, shield=True) as bounded:
                await _shutdown(app, relay, manager, stop_http, http_done)
            if bounded.cancelled_caught:
                logger.warning("shutdown overran %g s; cutting it short", config.shutdown_timeout)
            services.cancel_scope.cancel()


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
