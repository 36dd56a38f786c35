"""The reconnect supervisor: keeps one cloud media session alive, and tells the truth about it.

Supervision tree (who owns what)::

    caller's nursery                      (the server's, or a test's)
    └── SessionSupervisor._supervise      one "run" per start(): its own cancel scope
        └── per-attempt nursery           exactly one session at a time
            └── MediaSession.run          connect → started() → run until lost

Guarantees, each pinned by a test:

* ``start`` returns once a session is connected, or raises :class:`StartFailedError`
  (and ``webrtc_error`` says why). A later ``start``, ``stop`` or link loss supersedes an
  earlier one at once: the superseded call raises :class:`StartAbortedError`.
* A lost session is reported the instant it is seen, then rebuilt with backoff from a
  :class:`ReconnectPolicy`. Attempts are counted per outage; the budget refills only after
  a session stayed up for ``stable_period``; restarts are also capped per time window.
* A session is completely closed before the next one starts; there is never more than one.
* ``stop`` cancels everything, returns only once the session is closed, clears every field,
  and re-raises its caller's own cancellation after finishing.
* The supervisor keeps its own deep copy of the parameters. Updates made while no session
  is connected are applied to the next one; one-shot keys are delivered once, never replayed.
* The status is one immutable :class:`SupervisorStatus`, replaced whole on every change.

Every piece of state is owned here and changed only by this module. Tasks of a superseded run
may still be winding down; they hold a stale ``_Run`` and every write they attempt is dropped.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio

from scope_trio.core.session import (
    JsonTooDeepError,
    MediaSession,
    Parameters,
    SessionClosedError,
    SessionFactory,
    nested_deeper_than,
)

logger = logging.getLogger(__name__)

DEFAULT_ONE_SHOT_KEYS: frozenset[str] = frozenset(
    {"reset_cache", "transition", "first_frame_image"}
)

LOST_PREFIX = "Remote inference connection lost"


def lost_message(reason: str) -> str:
    """``webrtc_error`` while recovering from a loss (CONTRACT: CloudStatus)."""
    return f"{LOST_PREFIX}: {reason}"


def budget_spent_message(attempts: int) -> str:
    """``webrtc_error`` once the attempt budget is spent (CONTRACT: CloudStatus, verbatim)."""
    return (
        f"{LOST_PREFIX}. Reconnection failed after {attempts} attempts. "
        "Please toggle cloud mode off and on to reconnect."
    )


def intensity_message(restarts: int, window: float) -> str:
    """``webrtc_error`` once too many restarts happened within the intensity window."""
    return (
        f"{LOST_PREFIX}. Reconnection stopped after {restarts} restarts within "
        f"{window:g} s. Please toggle cloud mode off and on to reconnect."
    )


def start_failed_message(reason: str) -> str:
    """``webrtc_error`` when the very first connect fails (Scope left it empty)."""
    return f"Remote inference connection failed: {reason}"


class SupervisorError(Exception):
    """Base class of the errors the supervisor raises to its callers."""


class StartFailedError(SupervisorError):
    """The first connect of a ``start`` failed; ``webrtc_error`` carries the same reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StartAbortedError(SupervisorError):
    """A later ``start``, ``stop`` or link loss superseded this ``start`` before it connected."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a lost session is rebuilt. Defaults are Scope's: 1 s, 2 s, 4 s; 3 attempts.

    The delay before attempt ``n`` (1-based) is ``min(max_delay, base_delay * 2 ** (n - 1))``,
    optionally spread by ``jitter`` (a fraction: 0.1 means ±10 %).
    """

    max_attempts: int = 3
    base_delay: float = 1.0
    max_delay: float = 30.0
    jitter: float = 0.0
    attempt_timeout: float = 10.0
    """Deadline over one whole connect (signaling, ICE, DTLS, first readiness)."""
    stable_period: float = 10.0
    """A reconnected session must stay up this long before the attempt budget refills."""
    max_restarts: int = 6
    restart_window: float = 60.0
    """Restart intensity (as in Erlang/OTP): at most ``max_restarts`` attempts in this window."""
    close_timeout: float = 5.0
    """How long a superseded run may take to close its session before we stop waiting."""

    def __post_init__(self) -> None:
        positive = {
            "base_delay": self.base_delay,
            "max_delay": self.max_delay,
            "attempt_timeout": self.attempt_timeout,
            "restart_window": self.restart_window,
            "close_timeout": self.close_timeout,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ReconnectPolicy.{name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.stable_period) and self.stable_period >= 0):
            raise ValueError(
                f"ReconnectPolicy.stable_period must be >= 0, got {self.stable_period!r}"
            )
        if self.max_attempts < 0:
            raise ValueError(
                f"ReconnectPolicy.max_attempts must be >= 0, got {self.max_attempts!r}"
            )
        if self.max_restarts < 1:
            raise ValueError(
                f"ReconnectPolicy.max_restarts must be >= 1, got {self.max_restarts!r}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"ReconnectPolicy.jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (1-based)."""
        delay = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        if self.jitter and rng is not None:
            delay *= 1 + rng.uniform(-self.jitter, self.jitter)
        return delay


class Phase(enum.Enum):
    """Where the supervisor is. Every public flag is derived from this, never stored."""

    IDLE = "idle"
    CONNECTING = "connecting"
    """A ``start`` (or ``resume``) is making its first connect."""
    CONNECTED = "connected"
    BACKOFF = "backoff"
    """A session was lost; waiting before the next attempt."""
    RECONNECTING = "reconnecting"
    """A reconnect attempt is under way."""
    FAILED = "failed"
    """The first connect failed, or the reconnect budget is spent. Only ``start`` leaves it."""
    LINK_DOWN = "link_down"
    """The signaling link is gone; the parameters are kept for :meth:`SessionSupervisor.resume`."""


@dataclass(frozen=True)
class SupervisorStatus:
    """One immutable snapshot of the supervisor. Replaced whole, so reads are never torn."""

    phase: Phase = Phase.IDLE
    webrtc_error: str | None = None
    attempt: int = 0
    """Reconnect attempts used from the current budget."""
    max_attempts: int = 3
    last_loss_reason: str | None = None
    sessions_started: int = 0
    """Sessions that connected, over the supervisor's life (first starts and reconnects)."""
    sessions_lost: int = 0
    version: int = 0
    """Increases with every change: a watcher can tell it missed nothing."""
    changed_at: float = 0.0
    """``trio.current_time()`` of this change, so a watcher measures durations exactly."""

    @property
    def webrtc_connected(self) -> bool:
        return self.phase is Phase.CONNECTED

    @property
    def webrtc_reconnecting(self) -> bool:
        return self.phase in (Phase.BACKOFF, Phase.RECONNECTING)

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "webrtc_connected": self.webrtc_connected,
            "webrtc_reconnecting": self.webrtc_reconnecting,
            "webrtc_error": self.webrtc_error,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "last_loss_reason": self.last_loss_reason,
            "sessions_started": self.sessions_started,
            "sessions_lost": self.sessions_lost,
        }


@dataclass(eq=False)
class _Run:
    """One start's lifetime: a cancel scope around its supervise task and a done signal."""

    ticket: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class _AttemptFailedError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StartSupersededError(Exception):
    """Raised out of ``nursery.start`` when the run was cancelled before it connected."""


class _Connected:
    """Wraps the session's ``task_status`` so the supervisor knows whether it connected."""

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self._inner = inner
        self.value = False

    def started(self, value: None = None) -> None:
        self.value = True
        self._inner.started(value)


def _copy_parameters(params: Mapping[str, Any], what: str) -> Parameters:
    """A private deep copy of ``params``, proven JSON-serialisable (the cloud gets JSON)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{what} must be a JSON object, got {type(params).__name__}")
    bad = [key for key in params if not isinstance(key, str)]
    if bad:
        raise TypeError(f"{what} keys must be strings, got {bad[0]!r}")
    if nested_deeper_than(params):
        raise TypeError(f"{what} must be plain JSON: {JsonTooDeepError()}")
    try:
        copied: Parameters = json.loads(json.dumps(dict(params), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:  # a cycle recurses
        raise TypeError(f"{what} must be plain JSON: {exc}") from None
    return copied


class SessionSupervisor:
    """Owns at most one cloud media session and keeps it alive.

    Construct it with a nursery that outlives it (the server's); the supervisor runs its
    sessions there, each inside a cancel scope it controls. It is not thread-safe: call it
    from trio tasks of one run.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        session_factory: SessionFactory,
        policy: ReconnectPolicy | None = None,
        *,
        one_shot_keys: Iterable[str] = DEFAULT_ONE_SHOT_KEYS,
        rng: random.Random | None = None,
    ) -> None:
        self._nursery = nursery
        self._factory = session_factory
        self.policy = policy or ReconnectPolicy()
        self.one_shot_keys = frozenset(one_shot_keys)
        self._rng = rng or random.Random()
        self._lock = trio.Lock()  # serialises the retire-then-launch half of start/stop
        self._ticket = 0  # bumped by every start/stop/link loss; older runs are stale
        self._run: _Run | None = None
        self._session: MediaSession | None = None  # the connected session, if any
        self._params: Parameters = {}  # replayable parameters (no one-shot keys)
        self._pending_one_shots: Parameters = {}  # one-shot keys not yet delivered
        self._params_version = 0  # bumped on every accepted update
        self._restarts: deque[float] = deque()  # start times of recent reconnect attempts
        self._connected_at = 0.0
        self._state = SupervisorStatus(max_attempts=self.policy.max_attempts)
        self._watchers: set[trio.MemorySendChannel[SupervisorStatus]] = set()

    # ------------------------------------------------------------------ status

    @property
    def status(self) -> SupervisorStatus:
        return self._state

    @property
    def session(self) -> MediaSession | None:
        """The connected session, or None (e.g. for a debug action on the live session)."""
        return self._session

    @property
    def last_parameters(self) -> Parameters:
        """A deep copy of what a rebuilt session would start with (one-shots excluded)."""
        return copy.deepcopy(self._params)

    @asynccontextmanager
    async def watch(
        self, buffer: int = 256
    ) -> AsyncIterator[trio.MemoryReceiveChannel[SupervisorStatus]]:
        """Every status change, in order, starting with the current one.

        A watcher that falls ``buffer`` changes behind misses the oldest ones; ``version``
        shows the gap.
        """
        send, receive = trio.open_memory_channel[SupervisorStatus](buffer)
        send.send_nowait(self._state)
        self._watchers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            self._watchers.discard(send)
            send.close()

    async def wait_until(self, predicate: Callable[[SupervisorStatus], bool]) -> SupervisorStatus:
        """Wait for the first status, the current one included, that satisfies ``predicate``.

        Callers put a deadline around it.
        """
        async with self.watch() as changes:
            async for status in changes:
                if predicate(status):
                    return status
        raise AssertionError(
            "unreachable: the watch channel never closes first"
        )  # pragma: no cover

    def _set(self, run: _Run | None, **changes: Any) -> bool:
        """Apply ``changes`` if ``run`` is still current (None: the caller owns the ticket)."""
        if run is not None and run.ticket != self._ticket:
            return False
        self._state = replace(
            self._state,
            version=self._state.version + 1,
            changed_at=trio.current_time(),
            **changes,
        )
        for watcher in list(self._watchers):
            try:
                watcher.send_nowait(self._state)
            except trio.WouldBlock:
                logger.warning(
                    "status watcher fell behind; dropping change %d", self._state.version
                )
            except trio.BrokenResourceError:
                self._watchers.discard(watcher)
        return True

    # ------------------------------------------------------------ public calls

    async def start(self, params: Mapping[str, Any]) -> None:
        """Replace any current session with a new one started with ``params``.

        Returns once the new session is connected. Raises :class:`StartFailedError` if it
        could not connect, :class:`StartAbortedError` if a later call superseded it.
        """
        initial = _copy_parameters(params, "initial parameters")
        ticket = self._supersede(Phase.CONNECTING)
        self._params = {k: v for k, v in initial.items() if k not in self.one_shot_keys}
        self._pending_one_shots = {k: v for k, v in initial.items() if k in self.one_shot_keys}
        self._params_version += 1
        self._restarts.clear()
        await self._launch(ticket)

    async def resume(self) -> None:
        """After :meth:`link_lost`, start a session again with the kept parameters.

        This is the outage's first reconnect attempt, and the status says so from the
        start (``webrtc_reconnecting``, ``webrtc_error`` still naming the loss); if it does
        not connect, the rest of the reconnect budget applies as after a media loss.
        Returns once a session is connected; raises :class:`StartFailedError` if the budget
        ran out first. Does nothing unless the supervisor is in :attr:`Phase.LINK_DOWN`.
        """
        if self._state.phase is not Phase.LINK_DOWN:
            return
        error = self._state.webrtc_error
        first = min(1, self.policy.max_attempts)
        ticket = self._supersede(Phase.RECONNECTING, webrtc_error=error, attempt=first)
        self._restarts.clear()
        await self._launch(ticket, abandoned=Phase.LINK_DOWN, error=error, resumed=True)

    async def stop(self) -> None:
        """Cancel everything and forget the parameters. Returns once the session is closed.

        Idempotent and safe to call concurrently with anything. If the caller is cancelled
        while stopping, the stop still completes (shielded, bounded by ``close_timeout``),
        then the caller's cancellation is raised.
        """
        self._supersede(Phase.IDLE)
        self._params = {}
        self._pending_one_shots = {}
        self._params_version += 1
        self._restarts.clear()
        await self._retire_shielded()
        await trio.lowlevel.checkpoint_if_cancelled()

    async def link_lost(self, reason: str) -> None:
        """The signaling link is gone: stop reconnecting now, keep the parameters.

        A session (or a reconnect) in flight is cancelled at once, not after its next sleep,
        and ``webrtc_error`` says why. Without a session in flight this only records nothing.
        """
        active = (Phase.CONNECTING, Phase.CONNECTED, Phase.BACKOFF, Phase.RECONNECTING)
        if self._state.phase not in active:
            return
        reason = f"cloud connection closed ({reason})"
        self._supersede(Phase.LINK_DOWN, webrtc_error=lost_message(reason), last_loss_reason=reason)
        await self._retire_shielded()
        await trio.lowlevel.checkpoint_if_cancelled()

    def update_parameters(self, update: Mapping[str, Any]) -> None:
        """Merge ``update`` into the kept parameters and deliver it to the live session.

        Without a connected session the update is kept: replayable keys go into the next
        session's initial parameters, one-shot keys are delivered to it exactly once.
        Raises ``TypeError`` for anything but a JSON object with string keys.
        """
        update = _copy_parameters(update, "parameter update")
        if not update:
            return
        self._params.update({k: v for k, v in update.items() if k not in self.one_shot_keys})
        self._params_version += 1
        one_shots = {k: v for k, v in update.items() if k in self.one_shot_keys}
        if self._session is not None:
            try:
                self._session.send_parameters(update)
            except SessionClosedError:
                logger.info("session closed under a parameter update; keeping it for the next one")
            else:
                return
        self._pending_one_shots.update(one_shots)

    # ------------------------------------------------------------- internals

    def _supersede(self, phase: Phase, **changes: Any) -> int:
        """Make every earlier call and run stale, at once, and record the new phase."""
        self._ticket += 1
        if self._run is not None:
            self._run.scope.cancel()
        self._session = None
        self._set(None, **{"phase": phase, "webrtc_error": None, "attempt": 0, **changes})
        return self._ticket

    async def _retire(self) -> None:
        """Wait (bounded) until the current run, already cancelled, has closed its session."""
        run = self._run
        if run is None:
            return
        run.scope.cancel()
        # Sessions close within close_timeout (their own shielded deadline); allow twice that.
        with trio.move_on_after(2 * self.policy.close_timeout) as waited:
            await run.done.wait()
        if waited.cancelled_caught:
            logger.error(
                "session did not close within %.1f s; abandoning it", 2 * self.policy.close_timeout
            )
        if self._run is run:
            self._run = None

    async def _retire_shielded(self) -> None:
        # Shielded: a stop must finish even when its caller is cancelled. The deadline covers
        # _retire's own bound plus getting the lock from a start whose connect is already
        # cancelled and closing (itself bounded the same way).
        with trio.move_on_after(4 * self.policy.close_timeout, shield=True):
            async with self._lock:
                await self._retire()

    async def _launch(
        self,
        ticket: int,
        *,
        abandoned: Phase = Phase.IDLE,
        error: str | None = None,
        resumed: bool = False,
    ) -> None:
        """Retire the current run and start a new one for ``ticket``; see :meth:`start`.

        If the launch ends without a connected session and nothing superseded it (its caller
        was cancelled), the phase becomes ``abandoned``.
        """
        try:
            async with self._lock:
                if ticket != self._ticket:
                    raise StartAbortedError("superseded by a later start, stop or link loss")
                await self._retire()
                if ticket != self._ticket:
                    raise StartAbortedError("superseded by a later start, stop or link loss")
                run = _Run(ticket)
                self._run = run
                try:
                    await self._nursery.start(partial(self._supervise, run, resumed=resumed))
                except _StartSupersededError:
                    raise StartAbortedError(
                        "superseded by a later start, stop or link loss"
                    ) from None
                if ticket != self._ticket:
                    # Superseded between the connect and our return: not ours to report.
                    raise StartAbortedError("superseded by a later start, stop or link loss")
        except BaseException:
            # A start that did not end connected must not leave "connecting" (or a
            # "connected" whose session its cancelled caller took down, or a resume's
            # "reconnecting") behind. A failed start already says FAILED.
            unfinished = (Phase.CONNECTING, Phase.CONNECTED, Phase.RECONNECTING, Phase.BACKOFF)
            if ticket == self._ticket and self._state.phase in unfinished:
                if self._run is not None:
                    self._run.scope.cancel()
                self._session = None
                self._set(None, phase=abandoned, webrtc_error=error)
            raise

    async def _supervise(
        self, run: _Run, *, resumed: bool = False, task_status: trio.TaskStatus[None]
    ) -> None:
        """One start's life: first connect, then serve / lose / back off / retry, until done.

        A resumed run's first connect is already a reconnect: when it fails, the reconnect
        budget applies instead of failing the start, and ``started`` waits for a connect.
        """
        connected = False

        def report_connected() -> None:
            nonlocal connected
            if not connected:
                connected = True
                task_status.started()

        try:
            with run.scope:
                reason: str | None
                try:
                    reason = await self._session_lifetime(run, on_connected=report_connected)
                except _AttemptFailedError as exc:
                    if run.ticket != self._ticket:
                        raise _StartSupersededError from None  # not ours to report any more
                    if not resumed:
                        self._set(
                            run, phase=Phase.FAILED, webrtc_error=start_failed_message(exc.reason)
                        )
                        raise StartFailedError(exc.reason) from None
                    logger.warning("resuming the media session failed: %s", exc.reason)
                    reason = self._state.last_loss_reason or exc.reason
                    self._set(run, phase=Phase.BACKOFF, webrtc_error=lost_message(reason))
                while reason is not None:
                    reason = await self._recover(run, reason, on_connected=report_connected)
            if not connected:
                if run.ticket == self._ticket and self._state.phase is Phase.FAILED:
                    # A resume whose reconnects all failed: the budget is spent.
                    raise StartFailedError(self._state.webrtc_error or "reconnect failed")
                # Cancelled (by a later start, stop or link loss) before the first connect.
                raise _StartSupersededError
        finally:
            run.done.set()

    async def _recover(
        self, run: _Run, reason: str, *, on_connected: Callable[[], None] | None = None
    ) -> str | None:
        """Rebuild a lost session. Returns the next loss reason, or None when giving up."""
        policy = self.policy
        while True:
            attempt = self._state.attempt + 1
            if attempt > policy.max_attempts:
                self._give_up(run, budget_spent_message(policy.max_attempts))
                return None
            now = trio.current_time()
            while self._restarts and now - self._restarts[0] > policy.restart_window:
                self._restarts.popleft()
            if len(self._restarts) >= policy.max_restarts:
                self._give_up(run, intensity_message(policy.max_restarts, policy.restart_window))
                return None
            await trio.sleep(policy.delay(attempt, self._rng))
            if run.ticket != self._ticket:
                return None  # superseded while asleep; the cancel arrives at our next await
            self._restarts.append(trio.current_time())
            self._set(run, phase=Phase.RECONNECTING, attempt=attempt)
            logger.info("reconnect attempt %d/%d", attempt, policy.max_attempts)
            try:
                return await self._session_lifetime(run, on_connected=on_connected)
            except _AttemptFailedError as exc:
                logger.warning(
                    "reconnect attempt %d/%d failed: %s", attempt, policy.max_attempts, exc.reason
                )
                self._set(run, phase=Phase.BACKOFF, webrtc_error=lost_message(reason))

    def _give_up(self, run: _Run, message: str) -> None:
        logger.error("%s", message)
        self._set(run, phase=Phase.FAILED, webrtc_error=message)

    async def _session_lifetime(self, run: _Run, *, on_connected: Callable[[], None] | None) -> str:
        """Connect one fresh session, serve it, and return why it was lost.

        Raises :class:`_AttemptFailedError` if it did not connect within ``attempt_timeout``.
        The session's nursery closes before this returns or raises, so the session is
        completely gone before anything else starts.
        """
        session = self._factory()
        snapshot_version = self._params_version
        one_shots = dict(self._pending_one_shots)
        initial = {**copy.deepcopy(self._params), **copy.deepcopy(one_shots)}
        lost: list[str] = []
        failure: str | None = None
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(self.policy.attempt_timeout) as deadline:
                try:
                    await nursery.start(self._serve, run, session, initial, lost)
                except Exception as exc:  # the session's own connect error is its reason
                    failure = _describe(exc)
            if deadline.cancelled_caught:
                failure = f"connect timed out after {self.policy.attempt_timeout:g} s"
            if failure is None:
                self._on_connected(run, session, one_shots, snapshot_version)
                if lost:  # lost before we got here: report it now, it was dropped before
                    self._on_lost(run, lost[0])
                if on_connected is not None:
                    on_connected()
        if failure is not None:
            raise _AttemptFailedError(failure)
        return lost[0]

    async def _serve(
        self,
        run: _Run,
        session: MediaSession,
        initial: Parameters,
        lost: list[str],
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        connected = _Connected(task_status)
        try:
            reason = await session.run(
                initial, lambda reason: self._on_lost(run, reason), task_status=connected
            )
        except Exception as exc:
            if not connected.value:
                raise
            logger.exception("media session crashed")
            reason = f"media session crashed: {_describe(exc)}"
        if not connected.value:
            raise RuntimeError("media session ended without connecting")
        reason = reason or "session ended"
        lost.append(reason)
        self._on_lost(run, reason)

    def _on_connected(
        self, run: _Run, session: MediaSession, one_shots: Parameters, snapshot_version: int
    ) -> None:
        if run.ticket != self._ticket:
            return
        # The one-shot keys went out in this session's initial parameters: never again.
        for key, value in one_shots.items():
            if self._pending_one_shots.get(key, _MISSING) is value:
                del self._pending_one_shots[key]
        self._session = session
        now = trio.current_time()
        self._connected_at = now
        state = self._state
        self._set(
            run,
            phase=Phase.CONNECTED,
            webrtc_error=None,
            sessions_started=state.sessions_started + 1,
        )
        if self._params_version != snapshot_version or self._pending_one_shots:
            # Updates arrived while this session was connecting: deliver them now.
            catch_up = {**copy.deepcopy(self._params), **self._pending_one_shots}
            self._pending_one_shots = {}
            try:
                session.send_parameters(catch_up)
            except Exception:  # closed under us, or worse: keep one-shots, never crash
                logger.warning("could not deliver the catch-up parameters", exc_info=True)
                self._pending_one_shots = {
                    k: v for k, v in catch_up.items() if k in self.one_shot_keys
                }

    def _on_lost(self, run: _Run, reason: str) -> None:
        """Called from the session's task the moment it ends: report the loss at once."""
        if run.ticket != self._ticket or self._state.phase is not Phase.CONNECTED:
            return
        self._session = None
        stable = trio.current_time() - self._connected_at >= self.policy.stable_period
        logger.warning("media session lost: %s", reason)
        self._set(
            run,
            phase=Phase.BACKOFF,
            webrtc_error=lost_message(reason),
            last_loss_reason=reason,
            sessions_lost=self._state.sessions_lost + 1,
            attempt=0 if stable else self._state.attempt,
        )


_MISSING = object()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
