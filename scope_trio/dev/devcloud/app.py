"""Serving a dev cloud: the Quart-Trio app, :func:`serve_devcloud` and ``scope-trio devcloud``.

Ownership: Hypercorn owns one task per WebSocket (see :mod:`.protocol`); stopping the server
(cancelling :func:`serve_devcloud` or firing its shutdown trigger) therefore closes every peer
connection before :func:`serve_devcloud` returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from quart import Response, request, websocket
from quart_trio import QuartTrio

from scope_trio.dev.devcloud.config import CLOSE_GOING_AWAY, DevCloudConfig, ws_url
from scope_trio.dev.devcloud.media import open_media_loop
from scope_trio.dev.devcloud.pipelines import PIPELINES
from scope_trio.dev.devcloud.protocol import DevCloud

__all__ = ["create_app", "main", "serve_devcloud"]

logger = logging.getLogger("scope_trio.dev.devcloud")


def create_app(cloud: DevCloud) -> QuartTrio:
    """The Quart-Trio app serving ``cloud``: ``/ws``, ``/health`` and ``/control/*``."""
    app = QuartTrio("scope_trio.dev.devcloud")

    @app.before_serving
    async def _start() -> None:
        cloud.background = app.nursery

    @app.websocket("/ws")
    async def _ws() -> None:
        proxy: Any = websocket  # a context-local proxy: hand the real object to our tasks
        await cloud.handle_websocket(proxy._get_current_object())

    @app.get("/health")
    async def _health() -> dict[str, Any]:
        return {"status": "healthy", "pipeline": cloud.pipeline}

    @app.get("/control/state")
    async def _state() -> dict[str, Any]:
        return cloud.state()

    @app.post("/control/faults")
    async def _faults() -> Response | dict[str, Any]:
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            return Response(json.dumps({"detail": "expected a JSON object"}), 400)
        try:
            return cloud.apply_fault(body)
        except ValueError as exc:
            return Response(json.dumps({"detail": str(exc)}), 400, content_type="application/json")

    return app


async def serve_devcloud(
    config: DevCloudConfig | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a devcloud until cancelled or ``shutdown_trigger`` returns.

    Reports the bound base URL (``http://127.0.0.1:PORT``) through ``task_status`` once it
    accepts connections; :func:`ws_url` gives the signaling URL. Opens its own trio-asyncio
    loop for its aiortc objects (nesting inside a caller's loop works), so it runs the same
    standalone and inside tests. On ``shutdown_trigger`` every WebSocket is closed with 1001
    first; on cancellation they are cut. Either way, every peer connection is closed
    (shielded, bounded) before this returns.
    """
    config = config or DevCloudConfig()
    cloud = DevCloud(config)
    app = create_app(cloud)
    hyper = HypercornConfig()
    hyper.bind = [f"{config.host}:{config.port}"]
    hyper.graceful_timeout = config.graceful_timeout
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger(
        "hypercorn.error"
    )  # the app's logging config, no extra handler

    async def on_shutdown() -> None:
        assert shutdown_trigger is not None
        await shutdown_trigger()
        await cloud.close_all_websockets(CLOSE_GOING_AWAY, "devcloud shutting down")

    async with open_media_loop(), trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                hypercorn.trio.serve,
                app,
                hyper,
                shutdown_trigger=on_shutdown if shutdown_trigger is not None else None,
            )
        )
        task_status.started(binds[0])


def main(argv: Sequence[str] | None = None) -> int:
    """``scope-trio devcloud --host --port --pipeline --api-key --load-seconds --hostile``:
    serve until a signal.

    Either signal shuts down gracefully: WebSockets get 1001, peer connections are closed.
    """
    parser = argparse.ArgumentParser(
        prog="scope-trio devcloud", description="A local stand-in for the cloud GPU runner."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--pipeline", choices=PIPELINES, default="passthrough")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Key <key>'")
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=1.0,
        help="how long a pipeline load stays 'loading' (default: 1.0)",
    )
    parser.add_argument("--require-user-id", action="store_true")
    parser.add_argument(
        "--hostile", action="store_true", help="surround every message with garbage (tests)"
    )
    args = parser.parse_args(argv)
    config = DevCloudConfig(
        host=args.host,
        port=args.port,
        pipeline=args.pipeline,
        api_key=args.api_key,
        require_user_id=args.require_user_id,
        load_seconds=args.load_seconds,
        hostile=args.hostile,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def stop_requested() -> None:
                async for signum in signals:
                    logger.info("devcloud: %s, shutting down", signal.Signals(signum).name)
                    return

            async with trio.open_nursery() as nursery:
                url = await nursery.start(
                    partial(serve_devcloud, config, shutdown_trigger=stop_requested)
                )
                print(f"devcloud listening on {url} (signaling: {ws_url(url)})", flush=True)

    trio.run(run)
    return 0
