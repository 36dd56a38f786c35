"""A deterministic fake cloud for the supervisor's race tests and benchmarks.

:class:`FakeCloud` hands out :class:`FakeSession` objects (it is a ``SessionFactory``) and
plays a script of connect outcomes: connect after a delay, fail with a reason, or hang
forever. While a session is connected a test can :meth:`FakeCloud.lose` it. Everything it
does is recorded, so a test can assert "never two live sessions", "every session closed",
and "every parameter update arrived". It uses only trio time, so it runs under
``trio.testing.MockClock`` with exact virtual times.

:class:`NoRelay` is a browser relay that does nothing, for tests and benchmarks of the
server whose subject is not the relay (``open_server(..., relay_factory=...)``).
"""

from __future__ import annotations

import copy
import enum
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from scope_trio.core.session import (
    Loss,
    LossKind,
    SessionAttempt,
    SessionClosedError,
)


@dataclass(frozen=True)
class Plan:
    """How one connect attempt goes."""

    connect_delay: float = 0.0
    fail: str | None = None
    """Raise ``ConnectionError(fail)`` after ``connect_delay``."""
    hang: bool = False
    """Never connect (only a deadline or a cancel ends it)."""
    lose_at_once: str | Loss | None = None
    """Connect, then report this loss with no checkpoint in between."""
    offer_delay: float = 0.0
    """Seconds between the session's start and the moment it builds its offer (reads its
    initial parameters); part of the connect, before ``connect_delay``."""
    raise_at: str | None = None
    """Inject ``error`` here: "connect" (before connecting), "connected" (right after
    reporting connected), "close" (while closing after a loss) or "send" (in
    ``send_parameters``). For the tests that prove a session's bug stays contained."""
    error: BaseException | None = None


OK = Plan()
PEER_CLOSED = Loss(LossKind.PEER_CONNECTION_CLOSED, "peer connection closed")


class FakeState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"


class FakeSession:
    """One scripted session. Implements :class:`scope_trio.core.session.MediaSession`."""

    def __init__(self, cloud: FakeCloud, index: int, plan: Plan) -> None:
        self.cloud = cloud
        self.index = index
        self.plan = plan
        self.state = FakeState.CONNECTING
        self.initial: dict[str, Any] | None = None
        self.updates: list[dict[str, Any]] = []
        self.loss: Loss | None = None
        self.connected_once = False
        self._lost = trio.Event()

    @property
    def received(self) -> dict[str, Any]:
        """The initial parameters merged with every update, as the cloud sees them."""
        merged = dict(self.initial or {})
        for update in self.updates:
            merged.update(update)
        return merged

    @property
    def lost_reason(self) -> str | None:
        return self.loss.detail if self.loss is not None else None

    async def run(
        self,
        attempt: SessionAttempt,
        *,
        task_status: trio.TaskStatus[None],
    ) -> Loss:
        self.cloud._opened(self)
        try:
            if self.plan.offer_delay:
                await trio.sleep(self.plan.offer_delay)
            self.initial = copy.deepcopy(attempt.parameters())
            await trio.sleep(self.plan.connect_delay)
            if self.plan.hang:
                await trio.sleep_forever()
            if self.plan.fail is not None:
                raise ConnectionError(self.plan.fail)
            self._inject("connect")
            self.state = FakeState.CONNECTED
            self.connected_once = True
            self.cloud._touch()
            task_status.started()
            if self.cloud.on_connected is not None:
                self.cloud.on_connected(self)
            self._inject("connected")
            if self.plan.lose_at_once is not None:
                self.lose(self.plan.lose_at_once)  # and no checkpoint before on_lost
            else:
                await self._lost.wait()
            assert self.loss is not None
            attempt.lost(self.loss)
            return self.loss
        finally:
            self.state = FakeState.CLOSING
            self.cloud._touch()
            if self.cloud.on_closing is not None:
                self.cloud.on_closing(self)
            with trio.move_on_after(self.cloud.close_delay + 1.0, shield=True):
                await trio.sleep(self.cloud.close_delay)
            self.state = FakeState.CLOSED
            self.cloud._closed(self)
            if self.loss is not None:
                self._inject("close")

    def _inject(self, point: str) -> None:
        if self.plan.raise_at == point and self.plan.error is not None:
            raise self.plan.error

    def send_parameters(self, update: Mapping[str, Any]) -> None:
        self._inject("send")
        if self.state is not FakeState.CONNECTED or self._lost.is_set():
            raise SessionClosedError(f"fake session {self.index} is {self.state.value}")
        self.updates.append(copy.deepcopy(dict(update)))
        self.cloud._touch()

    def lose(self, reason: str | Loss) -> None:
        """End the session with ``reason`` (a plain text is a loss of kind ``OTHER``)."""
        if self.state is FakeState.CONNECTED and not self._lost.is_set():
            self.loss = reason if isinstance(reason, Loss) else Loss(LossKind.OTHER, reason)
            self._lost.set()


class FakeCloud:
    """A session factory with a script of outcomes and a record of what happened."""

    def __init__(self, *, default: Plan = OK, close_delay: float = 0.0) -> None:
        self.default = default
        self.close_delay = close_delay
        self.sessions: list[FakeSession] = []
        self.live = 0
        self.max_live = 0
        self.epoch = trio.current_time()
        self.connect_times: list[float] = []
        """When each session's connect began, in seconds since the cloud was made."""
        self.on_connected: Callable[[FakeSession], object] | None = None
        """Called synchronously right after a session reports it connected (race tests)."""
        self.on_closing: Callable[[FakeSession], object] | None = None
        """Called synchronously the moment a session begins to close (race tests)."""
        self.factory_error: Exception | None = None
        """Raised (once) by the next call of the factory, as a session constructor's bug would."""
        self._script: deque[Plan] = deque()
        self._changed = trio.Event()

    def now(self) -> float:
        """Seconds since this cloud was made (trio's clock; virtual under a MockClock)."""
        return trio.current_time() - self.epoch

    def script(self, *plans: Plan) -> None:
        """Queue outcomes for the next connect attempts (then ``default`` again)."""
        self._script.extend(plans)

    def __call__(self) -> FakeSession:
        if self.factory_error is not None:
            error, self.factory_error = self.factory_error, None
            raise error
        plan = self._script.popleft() if self._script else self.default
        session = FakeSession(self, len(self.sessions), plan)
        self.sessions.append(session)
        return session

    @property
    def connected(self) -> FakeSession | None:
        for session in self.sessions:
            if session.state is FakeState.CONNECTED:
                return session
        return None

    def lose(
        self,
        reason: str | Loss = PEER_CLOSED,
    ) -> FakeSession:
        """End the connected session as a real loss would. Raises if none is connected."""
        session = self.connected
        if session is None:
            raise AssertionError("no fake session is connected")
        session.lose(reason)
        return session

    async def wait_for(self, predicate: Callable[[FakeCloud], bool]) -> None:
        """Wait until ``predicate(self)`` holds. Callers put a deadline around it."""
        while not predicate(self):
            await self._changed.wait()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _opened(self, session: FakeSession) -> None:
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        self.connect_times.append(self.now())
        self._touch()

    def _closed(self, session: FakeSession) -> None:
        self.live -= 1
        self._touch()


class NoRelay:
    """Implements ``BrowserRelay``: no sessions, refuses offers, knows no session ids."""

    async def offer(
        self,
        sdp: str,
        sdp_type: str,
        initial_parameters: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
    ) -> dict[str, str]:
        raise NotImplementedError

    async def add_candidates(
        self, session_id: str, candidates: Sequence[Mapping[str, Any]]
    ) -> None:
        raise KeyError(session_id)

    async def close(self, session_id: str) -> None:
        raise KeyError(session_id)

    async def close_all(self) -> None:
        await trio.lowlevel.checkpoint()

    def sessions(self) -> dict[str, dict[str, Any]]:
        return {}
