"""The reconnect supervisor: keeps one cloud media session alive, and tells the truth about it.

Its place in the supervision tree is drawn in ``docs/architecture.md``: the nursery it is
given (``CloudManager.open``'s) holds one run per ``start()``, each in its own cancel scope,
and each run one per-attempt nursery with exactly one session at a time (one ``_Attempt``).

Guarantees, each pinned by a test (tests/test_supervisor*.py) and checked in every random
interleaving by benchmarks/race.py:

* ``start`` returns once a session is connected, or raises :class:`StartFailedError`
  (and ``webrtc_error`` says why). A later ``start``, ``stop`` or link loss supersedes an
  earlier one at once: the superseded call raises :class:`StartAbortedError`.
* A loss is reported the instant the session reports it, even in the same step as its
  connect, before any close begins; then the session is rebuilt with backoff from a
  :class:`ReconnectPolicy` (by default the outage's first attempt at once: the loss was
  already detected, a further wait only lengthens the freeze; backoff from the second). Attempts are counted per outage; the budget refills only after
  a session stayed up for ``stable_period``; restarts are also capped per time window.
* A session is completely closed before the next one starts; there is never more than one.
* ``stop`` cancels everything, clears every field (whatever arrives while it runs), and
  returns once the session is closed, or, if it does not close within twice
  ``close_timeout``, once it is *abandoned*: a named outcome, logged, counted in
  ``sessions_abandoned`` and published as an :class:`~scope_trio.core.events.Abandoned`
  event, while the abandoned run goes on closing in the supervisor's nursery and is reaped
  (logged) within :data:`REAP_FACTOR` ``close_timeout`` more. ``stop`` re-raises its
  caller's own cancellation after finishing.
* The supervisor keeps the parameters it is handed (``core/params.py``: a checked
  :class:`~scope_trio.core.params.Parameters` is taken over, anything else copied). A session takes its initial
  parameters when it builds its offer; later updates are sent after it connects; one-shot
  keys are delivered once, never replayed.
* Decisions read only private control state; the status is one immutable
  :class:`SupervisorStatus` derived from it and replaced whole on every change, so what
  clients see can never change what the supervisor does. ``watch`` always ends on the
  latest status; subscribers get typed events (:mod:`scope_trio.core.events`).
* An unexpected exception in a session is a loss (or a failed attempt); one in the
  supervisor's own run is a final ``webrtc_error`` "internal error: ..." with everything
  closed. Neither reaches the nursery the runs live in. Cancellation and
  ``KeyboardInterrupt`` propagate.

Every piece of state is owned here and changed only by this module. Tasks of a superseded run
may still be winding down; they hold a stale ``_Run`` and every write they attempt is dropped.
What clients see (:class:`Phase`, :class:`SupervisorStatus`, the ``webrtc_error`` texts) lives
in :mod:`scope_trio.core.status`, the policy (:class:`ReconnectPolicy`) in
:mod:`scope_trio.core.retry`; both are re-exported here. This module stays over 500 lines
because what is left is one concern, the state machine, whose guarantees interlock (the
attempt object, tickets, retire/abandon, recovery) and are easier to check side by side.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from scope_trio.core.events import (
    Abandoned,
    AttemptEnded,
    AttemptStarted,
    GaveUp,
    GiveUpReason,
    Lost,
    Outcome,
    Recovered,
    StartFailed,
    Subscriber,
    SupervisorEvent,
)
from scope_trio.core.params import ParameterError, owned
from scope_trio.core.retry import ReconnectPolicy
from scope_trio.core.session import (
    Loss,
    LossKind,
    MediaSession,
    SessionClosedError,
    SessionFactory,
)
from scope_trio.core.status import (
    LOST_PREFIX,
    Phase,
    SupervisorStatus,
    budget_spent_message,
    intensity_message,
    lost_message,
    start_failed_message,
)

__all__ = [
    "DEFAULT_ONE_SHOT_KEYS",
    "LOST_PREFIX",
    "REAP_FACTOR",
    "ParameterError",
    "PendingStart",
    "Phase",
    "ReconnectPolicy",
    "SessionSupervisor",
    "StartAbortedError",
    "StartFailedError",
    "SupervisorError",
    "SupervisorStatus",
    "budget_spent_message",
    "intensity_message",
    "internal_error_message",
    "lost_message",
    "start_failed_message",
]

logger = logging.getLogger(__name__)

DEFAULT_ONE_SHOT_KEYS: frozenset[str] = frozenset(
    {"reset_cache", "transition", "first_frame_image"}
)

REAP_FACTOR = 10
"""An abandoned run is watched this many ``close_timeout`` more; a leak is logged after."""


def internal_error_message(exc: BaseException) -> str:
    """Final ``webrtc_error`` when the supervisor's own run raised (a bug, contained)."""
    return f"internal error: {_describe(exc)}"


class SupervisorError(Exception):
    """Base class of the errors the supervisor raises to its callers."""


class StartFailedError(SupervisorError):
    """The first connect of a ``start`` failed; ``webrtc_error`` carries the same reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StartAbortedError(SupervisorError):
    """A later ``start``, ``stop`` or link loss superseded this ``start`` before it connected."""


@dataclass
class _Control:
    """The supervisor's private control state: every decision reads this, never the snapshot."""

    phase: Phase = Phase.IDLE
    webrtc_error: str | None = None
    attempt: int = 0
    last_loss: Loss | None = None
    sessions_started: int = 0
    sessions_lost: int = 0
    sessions_abandoned: int = 0


@dataclass(eq=False)
class _Run:
    """One start's lifetime: a cancel scope around its supervise task and a done signal."""

    ticket: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    connected: bool = False
    """A session of this run connected at least once (its start has been answered)."""
    abandoned: bool = False


class _AttemptFailedError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StartSupersededError(Exception):
    """Raised out of ``nursery.start`` when the run was cancelled before it connected."""


class _Attempt:
    """One connect attempt and the one session it makes: the single place that knows what
    the session took, whether it connected, and how it was lost.

    It is the session's :class:`~scope_trio.core.session.SessionAttempt` and wraps its
    ``task_status``: ``started()`` records the connect synchronously, so a loss the session
    reports in the same step is already a loss of a connected session.
    """

    def __init__(self, supervisor: SessionSupervisor, run: _Run, session: MediaSession) -> None:
        self._supervisor = supervisor
        self.run = run
        self.session = session
        self.scope = trio.CancelScope()
        self.taken_version: int | None = None
        self.taken_one_shots: dict[str, Any] = {}
        self.connected = False
        self.connected_at = 0.0
        self.loss: Loss | None = None
        self._task_status: trio.TaskStatus[None] | None = None

    def parameters(self) -> dict[str, Any]:
        supervisor = self._supervisor
        self.taken_version = supervisor._params_version
        self.taken_one_shots = dict(supervisor._pending_one_shots)
        # Shallow: the supervisor replaces values, never mutates them, and sessions only read.
        return {**supervisor._params, **self.taken_one_shots}

    def started(self, value: None = None) -> None:
        assert self._task_status is not None
        if self.connected:
            raise RuntimeError("the media session reported started() twice")
        self.connected = True
        self.connected_at = trio.current_time()
        self._supervisor._on_connected(self)
        self._task_status.started(value)

    def lost(self, loss: Loss) -> None:
        if self.loss is not None:
            return
        self.loss = loss
        if self.connected:
            self._supervisor._on_lost(self)

    def crash(self, exc: Exception) -> None:
        """The session raised where it must not: a loss, and the session is ended."""
        self.lost(Loss(LossKind.SESSION_CRASHED, f"media session crashed: {_describe(exc)}"))
        self.scope.cancel()


class PendingStart:
    """A start whose parameters the supervisor has adopted (:meth:`SessionSupervisor.begin`)."""

    def __init__(self, supervisor: SessionSupervisor, ticket: int) -> None:
        self._supervisor = supervisor
        self._ticket = ticket

    async def connected(self) -> None:
        """Returns once the session is connected; raises as :meth:`SessionSupervisor.start`."""
        await self._supervisor._launch(self._ticket)


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
        self._session: _Attempt | None = None  # the connected session's attempt, if any
        self._params: dict[str, Any] = {}  # replayable parameters (no one-shot keys)
        self._pending_one_shots: dict[str, Any] = {}  # one-shot keys not yet delivered
        self._params_version = 0  # bumped on every accepted update
        self._restarts = self.policy.intensity.tracker()
        self._outage_since: float | None = None
        self._control = _Control()
        self._version = 0
        self._state = self._snapshot()
        self._watchers: dict[
            trio.MemorySendChannel[SupervisorStatus], trio.MemoryReceiveChannel[SupervisorStatus]
        ] = {}
        self._subscribers: list[Subscriber] = []

    # ------------------------------------------------------------------ status

    @property
    def status(self) -> SupervisorStatus:
        return self._state

    @property
    def session(self) -> MediaSession | None:
        """The connected session, or None (e.g. for a debug action on the live session)."""
        return self._session.session if self._session is not None else None

    @property
    def last_parameters(self) -> dict[str, Any]:
        """A deep copy of what a rebuilt session would start with (one-shots excluded)."""
        return copy.deepcopy(self._params)

    @asynccontextmanager
    async def watch(
        self, buffer: int = 256
    ) -> AsyncIterator[trio.MemoryReceiveChannel[SupervisorStatus]]:
        """Status changes, in order, starting with the current one.

        Latest-value semantics: a watcher that falls ``buffer`` changes behind misses the
        oldest ones, never the newest, so the last status it receives is always the current
        one (``version`` shows what it skipped). For every event, :meth:`subscribe`.
        """
        if buffer < 1:
            raise ValueError(f"watch buffer must be at least 1, got {buffer!r}")
        send, receive = trio.open_memory_channel[SupervisorStatus](buffer)
        send.send_nowait(self._state)
        self._watchers[send] = receive
        try:
            async with receive:
                yield receive
        finally:
            self._watchers.pop(send, None)
            send.close()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every :mod:`~scope_trio.core.events` event; returns the
        function that unsubscribes it."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

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

    def _snapshot(self) -> SupervisorStatus:
        c = self._control
        return SupervisorStatus(
            phase=c.phase,
            webrtc_error=c.webrtc_error,
            attempt=c.attempt,
            max_attempts=self.policy.max_attempts,
            last_loss_reason=c.last_loss.detail if c.last_loss is not None else None,
            sessions_started=c.sessions_started,
            sessions_lost=c.sessions_lost,
            sessions_abandoned=c.sessions_abandoned,
            version=self._version,
            changed_at=trio.current_time() if self._version else 0.0,
        )

    def _set(self, run: _Run | None, **changes: Any) -> bool:
        """Apply ``changes`` if ``run`` is still current (None: the caller owns the ticket)."""
        if run is not None and run.ticket != self._ticket:
            return False
        control = self._control
        was, was_attempt = control.phase, control.attempt
        for name, value in changes.items():
            setattr(control, name, value)
        now, attempt = control.phase, control.attempt
        at = trio.current_time()
        another = was is now is Phase.RECONNECTING and attempt != was_attempt
        if was is Phase.RECONNECTING and (now is not Phase.RECONNECTING or another):
            outcome: Outcome = "aborted"
            if now is Phase.CONNECTED:
                outcome = "succeeded"
            elif now is Phase.BACKOFF:
                outcome = "failed"
            self._emit(AttemptEnded(at, was_attempt, outcome))
        if now is Phase.RECONNECTING and (was is not Phase.RECONNECTING or another):
            self._emit(AttemptStarted(at, attempt, self.policy.max_attempts))
        if now in (Phase.IDLE, Phase.FAILED):
            self._outage_since = None
        self._version += 1
        self._publish(self._snapshot())
        return True

    def _publish(self, status: SupervisorStatus) -> None:
        self._state = status
        for send, receive in list(self._watchers.items()):
            try:
                try:
                    send.send_nowait(status)
                except trio.WouldBlock:
                    receive.receive_nowait()  # drop the oldest: the newest must get through
                    send.send_nowait(status)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                self._watchers.pop(send, None)

    def _emit(self, event: SupervisorEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a subscriber's bug must never disturb the supervisor
                logger.exception("supervisor event subscriber failed on %r", event)

    # ------------------------------------------------------------ public calls

    async def start(self, params: Mapping[str, Any]) -> None:
        """Replace any current session with a new one started with ``params``.

        Returns once the new session is connected. Raises :class:`StartFailedError` if it
        could not connect, :class:`StartAbortedError` if a later call superseded it.
        """
        await self.begin(params).connected()

    def begin(self, params: Mapping[str, Any]) -> PendingStart:
        """The synchronous half of :meth:`start`: supersede whatever runs and adopt ``params``
        now, so every :meth:`update_parameters` from here on merges into them (and reaches
        the session's offer, or its catch-up right after it connects). Await
        :meth:`PendingStart.connected` for the other half. Raises :class:`ParameterError`.
        """
        initial = owned(params, "initial parameters")
        ticket = self._supersede(Phase.CONNECTING)
        self._params = {k: v for k, v in initial.items() if k not in self.one_shot_keys}
        self._pending_one_shots = {k: v for k, v in initial.items() if k in self.one_shot_keys}
        self._params_version += 1
        self._restarts.clear()
        return PendingStart(self, ticket)

    async def resume(self) -> None:
        """After :meth:`link_lost`, start a session again with the kept parameters.

        This is the outage's first reconnect attempt, and the status says so from the
        start (``webrtc_reconnecting``, ``webrtc_error`` still naming the loss); if it does
        not connect, the rest of the reconnect budget applies as after a media loss.
        Returns once a session is connected; raises :class:`StartFailedError` if the budget
        ran out first. Does nothing unless the supervisor is in :attr:`Phase.LINK_DOWN`.
        """
        if self._control.phase is not Phase.LINK_DOWN:
            return
        error = self._control.webrtc_error
        first = min(1, self.policy.max_attempts)
        ticket = self._supersede(Phase.RECONNECTING, webrtc_error=error, attempt=first)
        self._restarts.clear()
        await self._launch(ticket, abandoned=Phase.LINK_DOWN, error=error, resumed=True)

    async def stop(self) -> None:
        """Cancel everything and forget the parameters; see the module docstring.

        Returns once the session is closed, or abandoned (a named outcome: logged, counted in
        ``sessions_abandoned``, an :class:`~scope_trio.core.events.Abandoned` event) if it
        does not close within twice ``close_timeout``. Every field is clear on return, even
        if updates arrived meanwhile. Idempotent and safe to call concurrently with anything.
        If the caller is cancelled while stopping, the stop still completes (shielded,
        bounded), then the caller's cancellation is raised.
        """
        ticket = self._supersede(Phase.IDLE)
        self._forget()
        await self._retire_shielded()
        if ticket == self._ticket:
            self._forget()  # whatever arrived while the session closed
        await trio.lowlevel.checkpoint_if_cancelled()

    async def link_lost(self, reason: str) -> None:
        """The signaling link is gone: stop reconnecting now, keep the parameters.

        A session (or a reconnect) in flight is cancelled at once, not after its next sleep,
        and ``webrtc_error`` says why. Without a session in flight this only records nothing.
        """
        active = (Phase.CONNECTING, Phase.CONNECTED, Phase.BACKOFF, Phase.RECONNECTING)
        control = self._control
        if control.phase not in active:
            return
        loss = Loss(LossKind.LINK_LOST, f"cloud connection closed ({reason})")
        connected = self._session
        self._supersede(Phase.LINK_DOWN, webrtc_error=lost_message(loss.detail), last_loss=loss)
        if connected is not None:
            now = trio.current_time()
            self._outage_since = now
            self._emit(Lost(now, loss, connected.connected_at))
        await self._retire_shielded()
        await trio.lowlevel.checkpoint_if_cancelled()

    def update_parameters(self, update: Mapping[str, Any]) -> None:
        """Merge ``update`` into the kept parameters and deliver it to the live session.

        Without a connected session the update is kept: replayable keys go into the next
        session's initial parameters, one-shot keys are delivered to it exactly once.
        Raises :class:`ParameterError` for anything but a JSON object with string keys.
        """
        update = owned(update, "parameter update")
        if not update:
            return
        self._params.update({k: v for k, v in update.items() if k not in self.one_shot_keys})
        self._params_version += 1
        one_shots = {k: v for k, v in update.items() if k in self.one_shot_keys}
        attempt = self._session
        if attempt is not None:
            try:
                attempt.session.send_parameters(update)
            except SessionClosedError:
                logger.info("session closed under a parameter update; keeping it for the next one")
            except Exception as exc:  # the session's bug: it is lost, we carry on
                logger.exception("media session failed a parameter update")
                attempt.crash(exc)
            else:
                return
        self._pending_one_shots.update(one_shots)

    # ------------------------------------------------------------- internals

    def _forget(self) -> None:
        self._params = {}
        self._pending_one_shots = {}
        self._params_version += 1
        self._restarts.clear()

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
        bound = 2 * self.policy.close_timeout
        with trio.move_on_after(bound):
            await run.done.wait()
        if not run.done.is_set():
            self._abandon(run, bound)
        if self._run is run:
            self._run = None

    async def _retire_shielded(self) -> None:
        # Shielded: a stop must finish even when its caller is cancelled. The deadline covers
        # _retire's own bound plus getting the lock from a start whose connect is already
        # cancelled and closing (itself bounded the same way).
        bound = 4 * self.policy.close_timeout
        with trio.move_on_after(bound, shield=True):
            async with self._lock:
                await self._retire()
        run = self._run
        if run is not None and run.scope.cancel_called and not run.done.is_set():
            self._abandon(run, bound)

    def _abandon(self, run: _Run, waited: float) -> None:
        """Stop waiting for ``run``: say so everywhere, and reap it in the background."""
        if run.abandoned:
            return
        run.abandoned = True
        logger.error(
            "media session did not close within %g s; abandoned, still closing in the background",
            waited,
        )
        self._set(None, sessions_abandoned=self._control.sessions_abandoned + 1)
        self._emit(Abandoned(trio.current_time(), waited))
        self._nursery.start_soon(self._reap, run)

    async def _reap(self, run: _Run) -> None:
        """Watch an abandoned run (it closes in this same nursery) until it is gone."""
        began = trio.current_time()
        bound = REAP_FACTOR * self.policy.close_timeout
        with trio.move_on_after(bound):
            await run.done.wait()
        if run.done.is_set():
            logger.info(
                "abandoned media session reaped after %g s more", trio.current_time() - began
            )
        else:
            logger.error("abandoned media session still open %g s later; it leaks", bound)

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
            if ticket == self._ticket and self._control.phase in unfinished:
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
        An unexpected exception here is contained: a final "internal error" for this run.
        """

        def report_connected() -> None:
            if not run.connected:
                run.connected = True
                task_status.started()

        try:
            with run.scope:
                try:
                    await self._serve_run(run, resumed, report_connected)
                except (StartFailedError, _StartSupersededError):
                    raise
                except Exception as exc:  # a bug: contain it, everything below is closed
                    logger.exception("supervisor run failed")
                    message = internal_error_message(exc)
                    if run.connected or resumed:
                        self._give_up(run, GiveUpReason.INTERNAL_ERROR, message)
                    elif self._set(run, phase=Phase.FAILED, webrtc_error=message):
                        self._emit(StartFailed(trio.current_time(), message))
                    if not run.connected and run.ticket == self._ticket:
                        raise StartFailedError(message) from None
            if not run.connected:
                if run.ticket == self._ticket and self._control.phase is Phase.FAILED:
                    # A resume whose reconnects all failed: the budget is spent.
                    raise StartFailedError(self._control.webrtc_error or "reconnect failed")
                # Cancelled (by a later start, stop or link loss) before the first connect.
                raise _StartSupersededError
        finally:
            run.done.set()

    async def _serve_run(
        self, run: _Run, resumed: bool, report_connected: Callable[[], None]
    ) -> None:
        loss: Loss | None
        try:
            loss = await self._session_lifetime(run, report_connected)
        except _AttemptFailedError as exc:
            if run.ticket != self._ticket:
                raise _StartSupersededError from None  # not ours to report any more
            if not resumed:
                message = start_failed_message(exc.reason)
                if self._set(run, phase=Phase.FAILED, webrtc_error=message):
                    self._emit(StartFailed(trio.current_time(), exc.reason))
                raise StartFailedError(exc.reason) from None
            logger.warning("resuming the media session failed: %s", exc.reason)
            loss = self._control.last_loss or Loss(LossKind.OTHER, exc.reason)
            self._set(run, phase=Phase.BACKOFF, webrtc_error=lost_message(loss.detail))
        while loss is not None:
            loss = await self._recover(run, loss, report_connected)

    async def _recover(
        self, run: _Run, loss: Loss, report_connected: Callable[[], None]
    ) -> Loss | None:
        """Rebuild a lost session. Returns the next loss, or None when giving up."""
        policy = self.policy
        while True:
            attempt = self._control.attempt + 1
            if attempt > policy.max_attempts:
                self._give_up(
                    run, GiveUpReason.BUDGET_SPENT, budget_spent_message(policy.max_attempts)
                )
                return None
            if self._restarts.exhausted(trio.current_time()):
                message = intensity_message(policy.max_restarts, policy.restart_window)
                self._give_up(run, GiveUpReason.RESTART_INTENSITY, message)
                return None
            await trio.sleep(policy.delay(attempt, self._rng))
            if run.ticket != self._ticket:
                return None  # superseded while asleep; the cancel arrives at our next await
            self._restarts.record(trio.current_time())
            self._set(run, phase=Phase.RECONNECTING, attempt=attempt)
            logger.info("reconnect attempt %d/%d", attempt, policy.max_attempts)
            try:
                return await self._session_lifetime(run, report_connected)
            except _AttemptFailedError as exc:
                logger.warning(
                    "reconnect attempt %d/%d failed: %s", attempt, policy.max_attempts, exc.reason
                )
                self._set(run, phase=Phase.BACKOFF, webrtc_error=lost_message(loss.detail))

    def _give_up(self, run: _Run, reason: GiveUpReason, message: str) -> None:
        logger.error("%s", message)
        if self._set(run, phase=Phase.FAILED, webrtc_error=message):
            self._emit(GaveUp(trio.current_time(), reason, message))

    async def _session_lifetime(self, run: _Run, report_connected: Callable[[], None]) -> Loss:
        """Connect one fresh session, serve it, and return how it was lost.

        Raises :class:`_AttemptFailedError` if it did not connect within ``attempt_timeout``.
        The session's nursery closes before this returns or raises, so the session is
        completely gone before anything else starts.
        """
        try:
            session = self._factory()
        except Exception as exc:  # the session's own bug: this attempt failed
            logger.exception("could not make a media session")
            raise _AttemptFailedError(_describe(exc)) from None
        attempt = _Attempt(self, run, session)
        failure: str | None = None
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(self.policy.attempt_timeout) as deadline:
                try:
                    await nursery.start(self._serve, attempt)
                except Exception as exc:  # the session's own connect error is its reason
                    failure = _describe(exc)
            if deadline.cancelled_caught:
                failure = f"connect timed out after {self.policy.attempt_timeout:g} s"
            if failure is None and run.ticket == self._ticket:
                report_connected()
        if failure is not None:
            raise _AttemptFailedError(failure)
        assert attempt.loss is not None  # _serve records one before it returns
        return attempt.loss

    async def _serve(self, attempt: _Attempt, *, task_status: trio.TaskStatus[None]) -> None:
        attempt._task_status = task_status
        with attempt.scope:
            try:
                loss = await attempt.session.run(attempt, task_status=attempt)
            except Exception as exc:
                if not attempt.connected:
                    raise
                logger.exception("media session crashed")
                attempt.crash(exc)
                return
            if not attempt.connected:
                raise RuntimeError("media session ended without connecting")
            attempt.lost(loss or Loss(LossKind.OTHER, "session ended"))

    def _on_connected(self, attempt: _Attempt) -> None:
        """Called from the session's task in the step it connects (``started()``)."""
        if attempt.run.ticket != self._ticket:
            return
        # What the session took in its offer went out: one-shots there are never resent.
        for key, value in attempt.taken_one_shots.items():
            if self._pending_one_shots.get(key, _MISSING) is value:
                del self._pending_one_shots[key]
        self._session = attempt
        control = self._control
        self._set(
            attempt.run,
            phase=Phase.CONNECTED,
            webrtc_error=None,
            sessions_started=control.sessions_started + 1,
        )
        if self._outage_since is not None:
            now = trio.current_time()
            self._emit(Recovered(now, now - self._outage_since))
            self._outage_since = None
        if attempt.taken_version != self._params_version or self._pending_one_shots:
            # Updates arrived after the session built its offer: deliver them now.
            catch_up = {**copy.deepcopy(self._params), **self._pending_one_shots}
            self._pending_one_shots = {}
            try:
                attempt.session.send_parameters(catch_up)
            except Exception:  # closed under us, or worse: keep one-shots, never crash
                logger.warning("could not deliver the catch-up parameters", exc_info=True)
                self._pending_one_shots = {
                    k: v for k, v in catch_up.items() if k in self.one_shot_keys
                }

    def _on_lost(self, attempt: _Attempt) -> None:
        """Called from the session's task the moment it reports a loss: report it at once."""
        loss = attempt.loss
        if attempt.run.ticket != self._ticket or self._session is not attempt or loss is None:
            return
        self._session = None
        now = trio.current_time()
        stable = now - attempt.connected_at >= self.policy.stable_period
        logger.warning("media session lost: %s", loss.detail)
        control = self._control
        self._set(
            attempt.run,
            phase=Phase.BACKOFF,
            webrtc_error=lost_message(loss.detail),
            last_loss=loss,
            sessions_lost=control.sessions_lost + 1,
            attempt=0 if stable else control.attempt,
        )
        self._outage_since = now
        self._emit(Lost(now, loss, attempt.connected_at))


_MISSING = object()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
