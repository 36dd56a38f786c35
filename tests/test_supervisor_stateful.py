"""Random interleavings of everything that can happen to the supervisor (Hypothesis stateful).

Each example runs one trio run, under a MockClock, in a worker thread; every rule is one
operation sent into it with ``trio.from_thread``. Time moves only when a rule says so
(``advance``), so Hypothesis controls the interleaving and can shrink a failure to a short,
replayable story. Operations that wait (start, resume) run in the background; the rule
then lets every task settle before the invariants are checked.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from scope_trio.core.supervisor import (
    DEFAULT_ONE_SHOT_KEYS,
    LOST_PREFIX,
    Phase,
    SessionSupervisor,
    SupervisorError,
    SupervisorStatus,
)
from scope_trio.dev.fakes import OK, FakeCloud, FakeSession, Plan

T = TypeVar("T")

REPLAYABLE_KEYS = ("prompts", "noise_scale", "input_mode")
ONE_SHOT_KEYS = tuple(sorted(DEFAULT_ONE_SHOT_KEYS))

plans = st.sampled_from(
    [
        OK,
        Plan(connect_delay=0.5),
        Plan(fail="offer refused"),
        Plan(hang=True),
        Plan(fail="ice"),
        Plan(lose_at_once="peer connection closed"),
        Plan(offer_delay=0.5, connect_delay=0.5),
    ]
)


class TrioWorker:
    """One trio run in a thread, with a mock clock that jumps only when asked to."""

    def __init__(self, close_delay: float) -> None:
        self.clock = trio.testing.MockClock(autojump_threshold=math.inf)
        self.close_delay = close_delay
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("trio worker did not start")

    def _run(self) -> None:
        trio.run(self._main, clock=self.clock)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.finish = trio.Event()
        async with trio.open_nursery() as background:
            self.background = background
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.cloud = FakeCloud(close_delay=self.close_delay)
                self.cloud.on_closing = self._closing
                self.hidden_losses: list[int] = []
                self.supervisor = SessionSupervisor(nursery, self.cloud)
                async with self.supervisor.watch(2) as self.watcher:
                    self.watched = self.supervisor.status
                    self._ready.set()
                    await self.finish.wait()
                self.clock.autojump_threshold = 0
                await self.supervisor.stop()
            background.cancel_scope.cancel()

    def _closing(self, session: FakeSession) -> None:
        """The instant a session begins to close, the status must not say connected."""
        if session.connected_once and self.supervisor.status.phase is Phase.CONNECTED:
            self.hidden_losses.append(session.index)

    def latest_watched(self) -> SupervisorStatus:
        """Drain the watcher (it reads only here, so it falls behind on purpose)."""
        while True:
            try:
                self.watched = self.watcher.receive_nowait()
            except trio.WouldBlock:
                return self.watched

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` inside the trio run, then let every task settle."""

        async def settled() -> T:
            result = await fn()
            await trio.testing.wait_all_tasks_blocked()
            return result

        return trio.from_thread.run(settled, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.finish.set, trio_token=self.token)
        self._thread.join(30)
        assert not self._thread.is_alive(), "trio worker did not finish"


class SupervisorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.worker: TrioWorker | None = None
        self.expected: dict[str, Any] = {}  # the replayable parameters a client has set
        self.latest_one_shots: dict[str, int] = {}  # newest one-shot value per key, undelivered
        self.counter = 0

    @initialize(close_delay=st.sampled_from([0.0, 0.3]))
    def begin(self, close_delay: float) -> None:
        self.worker = TrioWorker(close_delay)

    @property
    def w(self) -> TrioWorker:
        assert self.worker is not None
        return self.worker

    def _unique(self) -> int:
        self.counter += 1
        return self.counter

    def _in_background(self, fn: Callable[[], Awaitable[None]]) -> None:
        async def launch() -> None:
            async def run() -> None:
                with contextlib.suppress(SupervisorError):  # failed/superseded: part of the game
                    await fn()

            self.w.background.start_soon(run)

        self.w.call(launch)

    @rule(
        params=st.dictionaries(st.sampled_from(REPLAYABLE_KEYS), st.integers(0, 9), max_size=3),
        one_shot=st.none() | st.sampled_from(ONE_SHOT_KEYS),
    )
    def start(self, params: dict[str, Any], one_shot: str | None) -> None:
        full = dict(params)
        self.expected = dict(params)
        self.latest_one_shots = {}
        if one_shot is not None:
            full[one_shot] = self.latest_one_shots[one_shot] = self._unique()
        self._in_background(lambda: self.w.supervisor.start(full))

    @rule()
    def resume(self) -> None:
        self._in_background(self.w.supervisor.resume)

    @rule()
    def stop(self) -> None:
        self.expected = {}
        self.latest_one_shots = {}

        async def stop() -> None:
            self.w.clock.autojump_threshold = 0
            try:
                await self.w.supervisor.stop()
            finally:
                self.w.clock.autojump_threshold = math.inf
            status = self.w.supervisor.status
            assert status.phase is Phase.IDLE
            assert status.webrtc_error is None
            assert status.attempt == 0
            assert self.w.supervisor.last_parameters == {}
            assert self.w.cloud.live == 0
            assert not self.w.nursery.child_tasks, "stop left a task running"

        self.w.call(stop)

    @rule(keys=st.lists(st.sampled_from(REPLAYABLE_KEYS + ONE_SHOT_KEYS), min_size=1, max_size=2))
    def stop_raced_by_updates(self, keys: list[str]) -> None:
        """Updates arrive while the stop's session closes: none survives the stop."""
        self.expected = {}
        self.latest_one_shots = {}

        async def stop() -> None:
            done = trio.Event()

            async def stopper() -> None:
                await self.w.supervisor.stop()
                done.set()

            self.w.background.start_soon(stopper)
            await trio.testing.wait_all_tasks_blocked()
            after = done.is_set()  # nothing to close: these updates come after the stop
            for key in keys:
                value = self._unique()
                if after:
                    if key in DEFAULT_ONE_SHOT_KEYS:
                        self.latest_one_shots[key] = value
                    else:
                        self.expected[key] = value
                self.w.supervisor.update_parameters({key: value})
            self.w.clock.autojump_threshold = 0
            try:
                await done.wait()
            finally:
                self.w.clock.autojump_threshold = math.inf
            assert self.w.supervisor.last_parameters == self.expected
            assert self.w.supervisor.status.phase is Phase.IDLE
            assert self.w.cloud.live == 0

        self.w.call(stop)

    @rule(reason=st.sampled_from(["peer connection closed", "ICE consent lost"]))
    def lose(self, reason: str) -> None:
        async def lose() -> None:
            session = self.w.cloud.connected
            if session is not None:
                session.lose(reason)

        self.w.call(lose)

    @rule()
    def link_lost(self) -> None:
        async def link_lost() -> None:
            self.w.clock.autojump_threshold = 0
            try:
                await self.w.supervisor.link_lost("code 1006")
            finally:
                self.w.clock.autojump_threshold = math.inf

        self.w.call(link_lost)

    @rule(key=st.sampled_from(REPLAYABLE_KEYS + ONE_SHOT_KEYS))
    def update(self, key: str) -> None:
        value = self._unique()
        if key in DEFAULT_ONE_SHOT_KEYS:
            self.latest_one_shots[key] = value
        else:
            self.expected[key] = value

        async def update() -> None:
            self.w.supervisor.update_parameters({key: value})

        self.w.call(update)

    @rule(plan=plans)
    def script(self, plan: Plan) -> None:
        async def script() -> None:
            self.w.cloud.script(plan)

        self.w.call(script)

    @rule(seconds=st.sampled_from([0.01, 0.5, 1.0, 2.0, 4.0, 11.0]))
    def advance(self, seconds: float) -> None:
        async def advance() -> None:
            self.w.clock.autojump_threshold = 0
            try:
                await trio.sleep(seconds)
            finally:
                self.w.clock.autojump_threshold = math.inf

        self.w.call(advance)

    # ---------------------------------------------------------------- checks

    @invariant()
    def consistent(self) -> None:
        if self.worker is None:
            return

        async def check() -> None:
            supervisor, cloud = self.w.supervisor, self.w.cloud
            status = supervisor.status
            assert not self.w.hidden_losses, "a session began to close while 'connected'"
            assert self.w.latest_watched() == status, "a watcher ended on a stale status"
            assert cloud.max_live <= 1, "two live sessions"
            assert 0 <= status.attempt <= supervisor.policy.max_attempts
            assert (status.phase is Phase.CONNECTED) == (cloud.connected is not None)
            assert supervisor.last_parameters == self.expected, "a parameter update was lost"
            if status.webrtc_reconnecting:
                assert status.webrtc_error is not None
                assert status.webrtc_error.startswith(LOST_PREFIX)
            if status.phase in (Phase.FAILED, Phase.LINK_DOWN):
                assert status.webrtc_error
            if status.phase is Phase.IDLE:
                assert status.webrtc_error is None

            delivered: list[tuple[str, Any]] = []
            for session in cloud.sessions:
                if not session.connected_once:
                    continue  # a session that never connected never acted on anything
                for message in [session.initial or {}, *session.updates]:
                    delivered += [(k, v) for k, v in message.items() if k in DEFAULT_ONE_SHOT_KEYS]
            assert len(delivered) == len(set(delivered)), "a one-shot key was replayed"

            live = cloud.connected
            if live is not None:
                received = live.received
                for key, value in self.expected.items():
                    assert received.get(key) == value, f"update of {key} never reached the session"
                for item in self.latest_one_shots.items():
                    assert item in delivered, f"one-shot {item} never delivered"

        self.w.call(check)

    def teardown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            assert self.worker.cloud.live == 0


SupervisorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_supervisor_random_interleavings = SupervisorMachine.TestCase
