"""The trio ⇄ asyncio bridge aiortc runs on: the loop, :func:`aio`, and the executor.

Every aiortc object is created, and every aiortc coroutine awaited, inside an open
``trio_asyncio.open_loop()``; coroutines are awaited only through :func:`aio` (a bare
``await`` of an aiortc coroutine from trio breaks in ``setLocalDescription``). Each loop that
peer connections live in is fixed once (:func:`ensure_loop`): an executor that abandons
cancelled jobs, an exception handler that logs, and a record of the UDP sockets aioice binds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio_asyncio  # type: ignore[import-untyped]  # no py.typed; contained in rtc/

from scope_trio.rtc import _aiortc_internals as internals

__all__ = ["aio", "current_loop", "ensure_loop", "open_loop"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def aio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await the asyncio coroutine function ``fn(*args)`` from trio, inside the open loop.

    The coroutine is created and run inside the asyncio context (``aio_as_trio(fn)(*args)``),
    which is what aiortc needs. Cancelling the trio caller cancels the asyncio task.
    """
    result: T = await trio_asyncio.aio_as_trio(fn)(*args)
    return result


@contextlib.asynccontextmanager
async def open_loop() -> AsyncIterator[object]:
    """``trio_asyncio.open_loop()``: the asyncio loop that aiortc objects live in.

    Nesting is allowed (measured: a loop opened inside another in the same trio run works,
    and peers in the two loops connect to each other): a component that owns aiortc objects
    may open its own loop without knowing whether its caller already has one. The loop is
    fixed at once (:func:`ensure_loop`); before it opens, the installed aiortc/aioice are
    checked (``AiortcInternalsChanged``, raised as is).
    """
    internals.verify_once()
    async with trio_asyncio.open_loop() as loop:
        ensure_loop()
        yield loop


def current_loop() -> asyncio.AbstractEventLoop:
    """The open trio-asyncio loop; ``RuntimeError`` outside one."""
    loop: asyncio.AbstractEventLoop | None = trio_asyncio.current_loop.get()
    if loop is None:
        raise RuntimeError("aiortc needs an open trio-asyncio loop (rtc.open_loop())")
    return loop


class _AbandoningExecutor(trio_asyncio.TrioExecutor):  # type: ignore[misc]  # untyped base
    """trio-asyncio's thread executor, but a cancelled job is abandoned, not awaited.

    With trio-asyncio's own executor a cancel that arrives while the thread runs is LOST:
    the asyncio future's cancel is forwarded to a trio task that cannot be cancelled
    (``to_thread.run_sync``), which then completes normally, so the awaiting asyncio task
    gets the result instead of ``CancelledError``. aiortc encodes every video frame in
    ``run_in_executor``: a sender stopped mid-encode kept running, and
    ``RTCPeerConnection.close()`` waited for it forever (measured: most closes issued
    right after connecting while frames flowed). Abandoning the thread delivers the
    cancel at once; the thread finishes on its own and its result is dropped.
    """

    async def submit(self, func: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(
            func, *args, limiter=self._limiter, abandon_on_cancel=True
        )


_fixed_loops: weakref.WeakSet[Any] = weakref.WeakSet()


def ensure_loop() -> asyncio.AbstractEventLoop:
    """Fix the current trio-asyncio loop once and return it: the
    :class:`_AbandoningExecutor`, an exception handler that logs instead of crashing, and
    the record of every socket aioice binds (see the internals' ``record_bound_sockets``).

    Called for every peer connection, so loops opened without :func:`open_loop` (e.g. a
    test fixture's) are fixed too. ``RuntimeError`` outside an open loop;
    ``AiortcInternalsChanged`` if the installed aiortc/aioice fail the internals' check
    (run once per process), so no peer connection runs without the fixes it relies on.
    """
    loop = current_loop()
    if loop not in _fixed_loops:
        internals.verify_once()
        loop.set_default_executor(_AbandoningExecutor())
        loop.set_exception_handler(_log_background_error)
        internals.record_bound_sockets(loop)
        _fixed_loops.add(loop)
    return loop


def _log_background_error(loop: object, context: dict[str, Any]) -> None:
    """Log an error from an aiortc task nobody awaits, instead of ending the whole run.

    aiortc leaves some tasks unawaited; trio-asyncio's default handler would raise their
    errors into the loop's nursery and take the server down. The one seen in practice,
    ``InvalidStateError('RTCIceTransport is closed')`` from a close while connecting, no
    longer happens (the connect task is cancelled before every close); this stays as the
    safety net, loudly.
    """
    exception = context.get("exception")
    logger.warning(
        "aiortc background error (ignored): %s",
        context.get("message", "unhandled error"),
        exc_info=exception if isinstance(exception, BaseException) else None,
    )
