"""``open_service``: a component that owns the nursery its tasks run in.

The pattern trio's ``serve_listeners`` and Hypercorn's ``worker_serve`` follow: the function
that opens the nursery owns the tasks. The component is built with that nursery, used for
the block, then closed (shielded, under its own deadline, so a cancelled owner still closes
it) and whatever is left in the nursery is cancelled; when the block ends, so has every task
the component started. :meth:`CloudManager.open <scope_trio.cloud.manager.CloudManager.open>`
and :meth:`Relay.open <scope_trio.relay.relay.Relay.open>` are built on it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

__all__ = ["open_service"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@asynccontextmanager
async def open_service(
    build: Callable[[trio.Nursery], T],
    close: Callable[[T], Awaitable[object]],
    *,
    close_timeout: float,
    what: str,
    start: Callable[[T], Callable[..., Awaitable[object]]] | None = None,
) -> AsyncIterator[T]:
    """``build(nursery)`` for the block, then ``await close(it)`` within ``close_timeout``.

    ``start(it)``, if given, names a task started with ``nursery.start`` before the block
    runs (for a task that must be running before anything else happens). ``what`` names the
    component in the warning logged when closing overruns its bound.
    """
    async with trio.open_nursery() as nursery:
        service = build(nursery)
        if start is not None:
            await nursery.start(start(service))
        try:
            yield service
        finally:
            with trio.move_on_after(close_timeout, shield=True) as bounded:
                await close(service)
            if bounded.cancelled_caught:
                logger.warning("closing %s overran %g s; cancelling it", what, close_timeout)
            nursery.cancel_scope.cancel()
