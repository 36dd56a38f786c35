"""Race benchmark: thousands of random schedules against the real supervisor, in virtual time.

Each schedule is one ``trio.run`` under a :class:`trio.testing.MockClock` whose time moves
only when the schedule says so. ``random.Random(seed)`` draws the supervisor's reconnect
policy, the fake cloud's close delay and 30-60 operations: start (sometimes with a one-shot
key), stop, session loss, link loss, resume, parameter updates (replayable or one-shot), the
outcome of the next connect (ok, slow, slower than the deadline, fail, hang, lost in the
step it connects, an offer built late), a caller giving up on its start, virtual time
passing, and bursts of several operations back to back (before the tasks they wake have run).
A stop is sometimes raced by parameter updates while its session closes, or called by a
caller that is already cancelled. They run against the real
:class:`~scope_trio.core.supervisor.SessionSupervisor` with the fake cloud of
:mod:`scope_trio.dev.fakes`. After every operation all tasks settle and the invariants of
``tests/test_supervisor_stateful.py`` are checked, plus what every call promises on return
(a start returns only after a session connected; a superseded start raises
StartAbortedError; stop and link loss leave no live session; after stop nothing is set,
whatever raced it, and a cancelled caller's stop raises its cancellation). Two more are
checked at every instant: a watcher with a tiny buffer always ends on the latest status,
and no session begins to close while the status still says connected (a loss is visible
before the close). tests/bench/test_race_mutants.py proves that each invariant catches the
bug it is there for.

Reproducible: trio shuffles each batch of runnable tasks, and that shuffle is seeded per
schedule too, so ``--seed N --schedules 1 --trace`` replays schedule N exactly and prints
its story. Reported: invariant violations (must be 0), stop latency in virtual time by the
phase stop was called in, and schedules per second.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import trio
import trio.testing
from _common import (
    Checks,
    Report,
    command_line,
    conclude,
    config_key,
    make_parser,
    make_report,
)

from scope_trio.core.session import Loss, LossKind
from scope_trio.core.supervisor import (
    DEFAULT_ONE_SHOT_KEYS,
    LOST_PREFIX,
    Phase,
    ReconnectPolicy,
    SessionSupervisor,
    StartAbortedError,
    StartFailedError,
    SupervisorStatus,
)
from scope_trio.dev.fakes import OK, FakeCloud, FakeSession, Plan

BENCHMARK = "race"
SCHEDULE_FORMAT = 3
"""Bump whenever the schedule generator changes: older baselines stop being comparable."""

FULL_SCHEDULES = 10_000
QUICK_SCHEDULES = 1_000
MIN_OPS, MAX_OPS = 30, 60
CALL_LIMIT = 120.0
"""Virtual seconds a stop or link loss may take before it is reported as hung."""
THROUGHPUT_FLOOR = 0.3
"""--check fails below this fraction of the baseline's schedules/s (CI machines vary)."""

REPLAYABLE_KEYS = ("prompts", "noise_scale", "input_mode")
ONE_SHOT_KEYS = tuple(sorted(DEFAULT_ONE_SHOT_KEYS))
UPDATE_KEYS = REPLAYABLE_KEYS + ONE_SHOT_KEYS
LOSS_REASONS = (
    Loss(LossKind.PEER_CONNECTION_CLOSED, "peer connection closed"),
    Loss(LossKind.PATH_SILENCE, "no packets from the cloud for 1 s"),
    Loss(LossKind.NO_VIDEO, "no video from the cloud for 2 s"),
)
WATCH_BUFFER = 2
"""The harness's own watcher reads only at checks, so it falls behind on purpose."""
STOP_VARIANTS = ("plain", "raced by updates", "cancelled caller")
STOP_WEIGHTS = (6, 2, 2)
ADVANCES = (0.01, 0.5, 1.0, 2.0, 4.0, 11.0, 30.0, 61.0)
PLANS: tuple[tuple[str, Plan], ...] = (
    ("ok", OK),
    ("slow", Plan(connect_delay=0.5)),
    ("slower than any deadline", Plan(connect_delay=12.0)),
    ("fail", Plan(fail="offer refused")),
    ("fail late", Plan(connect_delay=1.0, fail="ICE failed")),
    ("hang", Plan(hang=True)),
    ("lost as it connects", Plan(lose_at_once=LOSS_REASONS[0])),
    ("offer built late", Plan(offer_delay=0.5, connect_delay=0.5)),
)
POLICIES: tuple[tuple[str, ReconnectPolicy], ...] = (
    ("scope", ReconnectPolicy(immediate_first_attempt=False)),
    ("default", ReconnectPolicy()),
    (
        "tight",
        ReconnectPolicy(
            max_attempts=2,
            base_delay=0.5,
            attempt_timeout=2.0,
            stable_period=1.0,
            max_restarts=3,
            restart_window=10.0,
            close_timeout=1.0,
        ),
    ),
    (
        "jitter",
        ReconnectPolicy(max_attempts=4, jitter=0.25, attempt_timeout=5.0, stable_period=5.0),
    ),
    ("no retries", ReconnectPolicy(max_attempts=0)),
)
CLOSE_DELAYS = (0.0, 0.3, 0.9)
"""How long a fake session takes to close; below every policy's close_timeout (the contract)."""
BURST_OPS = ("start", "resume", "update", "lose", "script", "cancel_call")
"""Operations that may run back to back, before the tasks they woke have run."""
OP_WEIGHTS = {
    "start": 10,
    "stop": 6,
    "lose": 10,
    "link_lost": 4,
    "resume": 5,
    "update": 14,
    "script": 12,
    "advance": 20,
    "cancel_call": 2,
    "burst": 6,
}
OP_NAMES = tuple(OP_WEIGHTS)
OP_CUM_WEIGHTS = tuple(accumulate(OP_WEIGHTS.values()))
PHASES = tuple(phase.value for phase in Phase)


# ---------------------------------------------------------------- one schedule


@dataclass(eq=False)
class _Call:
    """A start or resume running in the background, as an HTTP handler would run it."""

    kind: str
    sessions_before: int
    """``sessions_started`` when the call began: it must grow before a start returns."""
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    superseded: bool = False
    """A later start, stop or link loss came first: the call must raise StartAbortedError."""


@dataclass
class ScheduleResult:
    seed: int
    policy: str
    op_counts: Counter[str]
    bursts: int
    violations: list[str]
    stop_latencies: list[tuple[str, float]]
    """(phase stop was called in, virtual seconds until it returned)"""
    link_lost_latencies: list[float]
    outcomes: Counter[str]
    history: list[tuple[str, int, int, int]]
    """(phase, status version, live sessions, sessions made) after every operation"""
    sessions: int
    virtual_time: float


class Schedule:
    """One seeded schedule of operations against a fresh supervisor and fake cloud."""

    def __init__(self, seed: int, *, trace: Callable[[str], None] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.policy_name, self.policy = self.rng.choice(POLICIES)
        self.close_delay = self.rng.choice(CLOSE_DELAYS)
        self.n_ops = self.rng.randint(MIN_OPS, MAX_OPS)
        self.trace = trace
        self.clock = trio.testing.MockClock(autojump_threshold=math.inf)

        self.op_index = -1
        self.op_name = "setup"
        self.op_counts: Counter[str] = Counter()
        self.bursts = 0
        self.violations: dict[str, str] = {}  # first message of each kind of violation
        self.stop_latencies: list[tuple[str, float]] = []
        self.link_lost_latencies: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.pending: list[_Call] = []
        self.history: list[tuple[str, int, int, int]] = []

        # The model: what a client has asked for (as in tests/test_supervisor_stateful.py).
        self.expected: dict[str, Any] = {}  # the replayable parameters
        self.latest_one_shots: dict[str, int] = {}  # newest one-shot value per key
        self.counter = 0

        self.ops: dict[str, Callable[[], Awaitable[str]]]
        self.cloud: FakeCloud
        self.supervisor: SessionSupervisor
        self.watcher: trio.MemoryReceiveChannel[SupervisorStatus]
        self.watched: SupervisorStatus
        self.nursery: trio.Nursery
        self.calls: trio.Nursery

    # ------------------------------------------------------------------ running

    def run(self) -> ScheduleResult:
        try:
            trio.run(self._main, clock=self.clock)
        except Exception as exc:  # a crash is a finding like any other: report, go on
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._violation("crash", f"the trio run raised {detail}")
            if self.trace is not None:
                self.trace("".join(traceback.format_exception(exc)))
        return ScheduleResult(
            seed=self.seed,
            policy=self.policy_name,
            op_counts=self.op_counts,
            bursts=self.bursts,
            violations=list(self.violations.values()),
            stop_latencies=self.stop_latencies,
            link_lost_latencies=self.link_lost_latencies,
            outcomes=self.outcomes,
            history=self.history,
            sessions=len(self.cloud.sessions) if hasattr(self, "cloud") else 0,
            virtual_time=self.clock.current_time(),
        )

    async def _main(self) -> None:
        self.ops = {
            "start": self._start,
            "stop": self._stop,
            "lose": self._lose,
            "link_lost": self._link_lost,
            "resume": self._resume,
            "update": self._update,
            "script": self._script,
            "advance": self._advance,
            "cancel_call": self._cancel_call,
            "burst": self._burst,
        }
        async with trio.open_nursery() as calls:
            self.calls = calls
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.cloud = FakeCloud(close_delay=self.close_delay)
                self.cloud.on_closing = self._closing
                self.supervisor = SessionSupervisor(
                    nursery, self.cloud, self.policy, rng=random.Random(self.seed)
                )
                try:
                    async with self.supervisor.watch(WATCH_BUFFER) as self.watcher:
                        self.watched = self.supervisor.status
                        await self._play()
                        self._check_watcher()
                finally:
                    # Whatever happened (an error of our own included) the run must end:
                    # time has to move for sessions closing under a shield, nothing may wait.
                    self.clock.autojump_threshold = 0
                    nursery.cancel_scope.cancel()
                    calls.cancel_scope.cancel()

    async def _play(self) -> None:
        self._say(
            f"seed {self.seed}: policy {self.policy_name}, close delay "
            f"{self.close_delay:g} s, {self.n_ops} operations"
        )
        for index in range(self.n_ops):
            name = self.rng.choices(OP_NAMES, cum_weights=OP_CUM_WEIGHTS)[0]
            self.op_index, self.op_name = index, name
            if name != "burst":  # a burst counts the operations it runs
                self.op_counts[name] += 1
            what = await self.ops[name]()
            await trio.testing.wait_all_tasks_blocked()
            self._say(what)
            self._check()
            self._record()
        self.op_index, self.op_name = self.n_ops, "final stop"
        self._say(await self._stop())

    def _say(self, what: str) -> None:
        if self.trace is None:
            return
        status = self.supervisor.status
        self.trace(
            f"[{self.op_index:2}] t={trio.current_time():7.2f}  {what:<58} -> "
            f"{status.phase.value} attempt={status.attempt} live={self.cloud.live} "
            f"sessions={len(self.cloud.sessions)} pending={len(self.pending)}"
        )

    def _violation(self, kind: str, message: str) -> None:
        if kind in self.violations:
            return
        with contextlib.suppress(RuntimeError):  # outside trio.run: no clock to read
            message = f"t={trio.current_time():g}s {message}"
        self.violations[kind] = f"op {self.op_index} ({self.op_name}): {message}"
        if self.trace is not None:
            self.trace(f"     VIOLATION {self.violations[kind]}")

    def _record(self) -> None:
        """Fold what the supervisor did into the history (same seed, same code: same history)."""
        status = self.supervisor.status
        self.history.append(
            (status.phase.value, status.version, self.cloud.live, len(self.cloud.sessions))
        )

    def _unique(self) -> int:
        self.counter += 1
        return self.counter

    @contextlib.contextmanager
    def _time_moves(self) -> Iterator[None]:
        """Let virtual time jump whenever every task is blocked (as the stateful test does)."""
        self.clock.autojump_threshold = 0
        try:
            yield
        finally:
            self.clock.autojump_threshold = math.inf

    def _supersede_pending(self) -> None:
        for call in self.pending:
            call.superseded = True

    # ---------------------------------------------------------------- operations

    async def _start(self) -> str:
        params = {k: self.rng.randrange(10) for k in REPLAYABLE_KEYS if self.rng.random() < 0.5}
        full: dict[str, Any] = dict(params)
        self.expected = dict(params)
        self.latest_one_shots = {}
        if self.rng.random() < 0.3:
            key = self.rng.choice(ONE_SHOT_KEYS)
            full[key] = self.latest_one_shots[key] = self._unique()
        self._supersede_pending()
        await self._launch("start", lambda: self.supervisor.start(full))
        return f"start {full}"

    async def _resume(self) -> str:
        if self.supervisor.status.phase is not Phase.LINK_DOWN:
            before = self.supervisor.status
            await self.supervisor.resume()
            if self.supervisor.status is not before:
                self._violation("resume", "resume outside link_down changed the status")
            return "resume (nothing to resume)"
        self._supersede_pending()
        await self._launch("resume", self.supervisor.resume)
        return "resume"

    async def _launch(self, kind: str, fn: Callable[[], Awaitable[None]]) -> None:
        """Call ``fn`` in a task of its own; returns once the call has begun (its synchronous
        part, where start and resume supersede what came before, has run)."""
        call = _Call(kind, sessions_before=self.supervisor.status.sessions_started)
        self.pending.append(call)
        await self.calls.start(self._run_call, call, fn)

    async def _run_call(
        self,
        call: _Call,
        fn: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        outcome = "cancelled"
        with call.scope:
            try:
                task_status.started()  # the parent resumes only at fn's first checkpoint
                await fn()
            except StartAbortedError:
                outcome = "aborted"
            except StartFailedError:
                outcome = "failed"
                if not call.superseded and self.supervisor.status.phase is not Phase.FAILED:
                    self._violation(
                        "failed-start-phase",
                        f"{call.kind} raised StartFailedError but the phase is "
                        f"{self.supervisor.status.phase.value}",
                    )
            except Exception as exc:
                outcome = "crashed"
                self._violation("call-crash", f"{call.kind} raised {exc!r}")
            else:
                outcome = "connected"
                # Only "a session connected": inside a burst it may already be lost again.
                if self.supervisor.status.sessions_started <= call.sessions_before:
                    self._violation(
                        "start-returned-unconnected",
                        f"{call.kind} returned but no session connected during the call "
                        f"(phase {self.supervisor.status.phase.value})",
                    )
        if call.superseded and outcome not in ("aborted", "cancelled"):
            self._violation(
                "superseded-call",
                f"a superseded {call.kind} ended {outcome}, not with StartAbortedError",
            )
        self.outcomes[outcome] += 1
        self.pending.remove(call)

    async def _burst(self) -> str:
        """Two to four operations back to back: the tasks they wake run only afterwards."""
        self.bursts += 1
        parts = []
        for _ in range(self.rng.randint(2, 4)):
            name = self.rng.choice(BURST_OPS)
            self.op_counts[name] += 1
            parts.append(await self.ops[name]())
        return "burst: " + "; ".join(parts)

    async def _cancel_call(self) -> str:
        """The caller of a pending start or resume gives up (an HTTP client disconnects)."""
        if not self.pending:
            return "cancel a call (none pending)"
        index = self.rng.randrange(len(self.pending))
        call = self.pending[index]
        call.scope.cancel()
        return f"cancel pending call {index} ({call.kind})"

    async def _stop(self) -> str:
        phase = self.supervisor.status.phase.value
        variant = self.rng.choices(STOP_VARIANTS, weights=STOP_WEIGHTS)[0]
        self._supersede_pending()
        self.expected = {}
        self.latest_one_shots = {}
        began = trio.current_time()
        hung = False
        if variant == "raced by updates":
            hung, raced = await self._stop_raced()
            variant += f" ({raced})"
        else:
            with trio.CancelScope() as caller:
                if variant == "cancelled caller":
                    caller.cancel()
                with self._time_moves(), trio.move_on_after(CALL_LIMIT) as limit:
                    await self.supervisor.stop()
                hung = limit.cancelled_caught
            if variant == "cancelled caller" and not caller.cancelled_caught:
                self._violation("stop-swallowed-cancel", "stop swallowed its caller's cancellation")
        latency = trio.current_time() - began
        if hung:
            self._violation(
                "stop-hung", f"stop (called in {phase}) still waiting after {latency:g} s"
            )
            return f"stop in {phase}: HUNG"
        self.stop_latencies.append((phase, latency))
        status = self.supervisor.status
        if status.phase is not Phase.IDLE or status.webrtc_error is not None or status.attempt:
            self._violation(
                "stop-status",
                f"stop (called in {phase}) left phase={status.phase.value} "
                f"error={status.webrtc_error!r} attempt={status.attempt}",
            )
        if self.supervisor.last_parameters != self.expected:
            self._violation(
                "stop-params",
                f"stop ({variant}) kept parameters {self.supervisor.last_parameters}",
            )
        if self.cloud.live:
            self._violation("stop-live", f"stop (called in {phase}) returned with a live session")
        if self.nursery.child_tasks:
            self._violation("stop-task", f"stop (called in {phase}) left a supervisor task")
        await trio.testing.wait_all_tasks_blocked()
        if self.pending:
            kinds = ", ".join(call.kind for call in self.pending)
            self._violation("stop-pending", f"calls still waiting after stop returned: {kinds}")
        return f"stop in {phase} ({variant}): returned after {latency:g} s"

    async def _stop_raced(self) -> tuple[bool, str]:
        """Stop in a task of its own; updates arrive while its session closes (they must not
        survive it). Returns (hung, what raced)."""
        done = trio.Event()

        async def stopper() -> None:
            await self.supervisor.stop()
            done.set()

        self.calls.start_soon(stopper)
        await trio.testing.wait_all_tasks_blocked()  # time stands still: the stop is waiting
        after = done.is_set()  # nothing to close: the updates come after the stop
        updates = []
        for _ in range(self.rng.randint(1, 2)):
            key = self.rng.choice(UPDATE_KEYS)
            value = self._unique()
            if after:
                if key in DEFAULT_ONE_SHOT_KEYS:
                    self.latest_one_shots[key] = value
                else:
                    self.expected[key] = value
            self.supervisor.update_parameters({key: value})
            updates.append(f"{key}={value}")
        with self._time_moves(), trio.move_on_after(CALL_LIMIT) as limit:
            await done.wait()
        return limit.cancelled_caught, ("after: " if after else "during: ") + ", ".join(updates)

    async def _link_lost(self) -> str:
        phase = self.supervisor.status.phase
        active = phase in (Phase.CONNECTING, Phase.CONNECTED, Phase.BACKOFF, Phase.RECONNECTING)
        if active:
            self._supersede_pending()
        began = trio.current_time()
        with self._time_moves(), trio.move_on_after(CALL_LIMIT) as limit:
            await self.supervisor.link_lost("code 1006")
        latency = trio.current_time() - began
        if limit.cancelled_caught:
            self._violation("link-lost-hung", f"link_lost still waiting after {latency:g} s")
            return f"link lost in {phase.value}: HUNG"
        if active:
            self.link_lost_latencies.append(latency)
            after = self.supervisor.status.phase
            if after is not Phase.LINK_DOWN:
                self._violation("link-lost-phase", f"link_lost in {phase.value} left {after.value}")
            if self.cloud.live:
                self._violation("link-lost-live", "link_lost returned with a live session")
        return f"link lost in {phase.value}: returned after {latency:g} s"

    async def _lose(self) -> str:
        session = self.cloud.connected
        if session is None:
            return "lose (nothing connected)"
        reason = self.rng.choice(LOSS_REASONS)
        session.lose(reason)
        return f"lose session {session.index}: {reason}"

    async def _update(self) -> str:
        update: dict[str, int] = {}
        for key in self.rng.sample(UPDATE_KEYS, self.rng.choice((1, 1, 2))):
            update[key] = value = self._unique()
            if key in DEFAULT_ONE_SHOT_KEYS:
                self.latest_one_shots[key] = value
            else:
                self.expected[key] = value
        self.supervisor.update_parameters(update)
        return f"update {update}"

    async def _script(self) -> str:
        name, plan = self.rng.choice(PLANS)
        self.cloud.script(plan)
        return f"next connect: {name}"

    async def _advance(self) -> str:
        seconds = self.rng.choice(ADVANCES)
        with self._time_moves():
            await trio.sleep(seconds)
        return f"advance {seconds:g} s"

    # ------------------------------------------------------------------- checks

    def _check(self) -> None:
        """The invariants of tests/test_supervisor_stateful.py, plus CONNECTING's owner."""
        self._check_status()
        self._check_parameters()
        self._check_watcher()

    def _check_watcher(self) -> None:
        """A watcher that fell behind may skip changes, never end on a stale one."""
        while True:
            try:
                self.watched = self.watcher.receive_nowait()
            except trio.WouldBlock:
                break
        status = self.supervisor.status
        if self.watched.version != status.version:
            self._violation(
                "watcher-stale",
                f"a watcher's latest status is version {self.watched.version} "
                f"({self.watched.phase.value}), the status is {status.version} "
                f"({status.phase.value})",
            )

    def _closing(self, session: FakeSession) -> None:
        """Called by the fake the instant a session begins to close, in its own task."""
        if session.connected_once and self.supervisor.status.phase is Phase.CONNECTED:
            self._violation(
                "loss-hidden",
                f"session {session.index} began to close while the status said connected",
            )

    def _check_status(self) -> None:
        supervisor, cloud = self.supervisor, self.cloud
        status = supervisor.status
        if cloud.max_live > 1:
            self._violation("two-live", f"{cloud.max_live} sessions were live at once")
        if not 0 <= status.attempt <= supervisor.policy.max_attempts:
            self._violation(
                "attempt-budget",
                f"attempt {status.attempt} outside 0..{supervisor.policy.max_attempts}",
            )
        live = cloud.connected
        if (status.phase is Phase.CONNECTED) != (live is not None):
            self._violation(
                "connected-truth",
                f"phase {status.phase.value} but {'a' if live else 'no'} fake session connected",
            )
        if status.webrtc_reconnecting and not (status.webrtc_error or "").startswith(LOST_PREFIX):
            self._violation(
                "reconnecting-error", f"reconnecting with webrtc_error {status.webrtc_error!r}"
            )
        if status.phase in (Phase.FAILED, Phase.LINK_DOWN) and not status.webrtc_error:
            self._violation("silent-failure", f"{status.phase.value} without a webrtc_error")
        if status.phase is Phase.IDLE and status.webrtc_error is not None:
            self._violation("idle-error", f"idle with webrtc_error {status.webrtc_error!r}")
        if status.phase is Phase.CONNECTING and all(call.superseded for call in self.pending):
            self._violation("orphan-connecting", "connecting, but no start or resume is waiting")

    def _check_parameters(self) -> None:
        supervisor, cloud = self.supervisor, self.cloud
        params = supervisor.last_parameters
        if params != self.expected:
            self._violation(
                "parameters", f"last_parameters {params} but the client set {self.expected}"
            )

        delivered: list[tuple[str, Any]] = []
        for session in cloud.sessions:
            if not session.connected_once:
                continue  # a session that never connected never acted on anything
            for message in (session.initial or {}, *session.updates):
                delivered += [(k, v) for k, v in message.items() if k in DEFAULT_ONE_SHOT_KEYS]
        if len(delivered) != len(set(delivered)):
            replayed = sorted({item for item in delivered if delivered.count(item) > 1})
            self._violation("one-shot-replayed", f"one-shot values delivered twice: {replayed}")
        live = cloud.connected
        if live is not None:
            received = live.received
            for key, value in self.expected.items():
                if received.get(key) != value:
                    self._violation(
                        "update-lost",
                        f"{key}={value} never reached live session {live.index} "
                        f"(it has {received.get(key)!r})",
                    )
            for item in self.latest_one_shots.items():
                if item not in delivered:
                    self._violation("one-shot-lost", f"one-shot {item} never delivered")


# ---------------------------------------------------------------- many schedules


@contextlib.contextmanager
def supervisor_logs(trace: Callable[[str], None] | None) -> Iterator[None]:
    """Silence scope_trio's logging (thousands of expected losses), or fold it into --trace."""
    logger = logging.getLogger("scope_trio")
    saved = logger.level, logger.propagate
    handler: logging.Handler | None = None
    if trace is None:
        logger.setLevel(logging.CRITICAL + 1)
    else:
        handler = _TraceHandler(trace)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        logger.level, logger.propagate = saved
        if handler is not None:
            logger.removeHandler(handler)


class _TraceHandler(logging.Handler):
    def __init__(self, trace: Callable[[str], None]) -> None:
        super().__init__()
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        self.trace(f"     log {record.levelname.lower()}: {record.getMessage()}")


@contextlib.contextmanager
def seeded_trio_scheduler() -> Iterator[Callable[[int], None]]:
    """Make trio's task scheduling a function of a seed, as pytest-trio does under Hypothesis.

    Trio shuffles every batch of runnable tasks with a module-level ``random.Random``; with
    ``_ALLOW_DETERMINISTIC_SCHEDULING`` the shuffle depends only on that generator's state.
    Both are private, so this degrades to unseeded scheduling (with a warning) if they move.
    Yields the function that reseeds the scheduler; restores trio's state on exit.
    """
    from trio._core import _run as trio_run

    generator = getattr(trio_run, "_r", None)
    if not isinstance(generator, random.Random) or not hasattr(
        trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING"
    ):
        print("warning: cannot seed trio's scheduler; seeds may not replay", file=sys.stderr)
        yield lambda seed: None
        return
    saved_flag = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    saved_state = generator.getstate()
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]  # Final upstream
    try:
        yield generator.seed
    finally:
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag  # type: ignore[misc]
        generator.setstate(saved_state)


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, p50, p99 and max (nearest rank, so every figure is a value that occurred)."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 9)

    return {"count": len(ordered), "p50": rank(0.50), "p99": rank(0.99), "max": rank(1.0)}


def run_schedules(
    base_seed: int,
    schedules: int,
    *,
    trace: Callable[[str], None] | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run schedules ``base_seed .. base_seed + schedules - 1``; the results section."""
    ops: Counter[str] = Counter()
    bursts = 0
    outcomes: Counter[str] = Counter()
    policies: Counter[str] = Counter()
    stops: list[tuple[str, float]] = []
    link_losses: list[float] = []
    violating: list[int] = []
    violations = sessions = 0
    virtual = 0.0
    fingerprint = hashlib.sha256()
    began = time.perf_counter()
    with supervisor_logs(trace), seeded_trio_scheduler() as seed_scheduler:
        for seed in range(base_seed, base_seed + schedules):
            seed_scheduler(seed)
            result = Schedule(seed, trace=trace).run()
            ops.update(result.op_counts)
            bursts += result.bursts
            outcomes.update(result.outcomes)
            policies[result.policy] += 1
            stops += result.stop_latencies
            link_losses += result.link_lost_latencies
            sessions += result.sessions
            virtual += result.virtual_time
            fingerprint.update(
                repr((seed, result.virtual_time, result.stop_latencies, result.history)).encode()
            )
            if result.violations:
                violating.append(seed)
                violations += len(result.violations)
                for message in result.violations:
                    report(f"VIOLATION seed={seed}: {message}")
    wall = time.perf_counter() - began
    total_ops = sum(ops.values())
    return {
        "schedule_format": SCHEDULE_FORMAT,
        "base_seed": base_seed,
        "schedules": schedules,
        "ops": total_ops,
        "ops_by_kind": dict(sorted(ops.items())),
        "bursts": bursts,
        "violations": violations,
        "violating_schedules": len(violating),
        "violating_seeds": violating[:20],
        "wall_seconds": round(wall, 3),
        "schedules_per_second": round(schedules / wall, 1),
        "ops_per_second": round(total_ops / wall, 1),
        "virtual_seconds": round(virtual, 3),
        "sessions_opened": sessions,
        "call_outcomes": dict(sorted(outcomes.items())),
        "policies": dict(sorted(policies.items())),
        "stop_latency_virtual_s": {
            "all": percentiles([latency for _, latency in stops]),
            "by_phase": {
                phase: percentiles([latency for p, latency in stops if p == phase])
                for phase in PHASES
            },
        },
        "link_lost_latency_virtual_s": percentiles(link_losses),
        "fingerprint": fingerprint.hexdigest()[:16],
    }


# ---------------------------------------------------------------- reporting


def _seconds(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def summary(results: dict[str, Any]) -> str:
    last = results["base_seed"] + results["schedules"] - 1
    lines = [
        f"race: {results['schedules']:,} schedules (seeds {results['base_seed']}..{last}), "
        f"{results['ops']:,} operations, {results['sessions_opened']:,} fake sessions, "
        f"{results['virtual_seconds']:,.0f} s of virtual time",
        f"violations: {results['violations']} (in {results['violating_schedules']} schedules)",
        f"wall: {results['wall_seconds']:.1f} s, {results['schedules_per_second']:,.0f} "
        f"schedules/s, {results['ops_per_second']:,.0f} operations/s",
        f"calls: {results['call_outcomes']}",
        "",
        f"{'stop latency (virtual s)':<26}{'count':>7}{'p50':>9}{'p99':>9}{'max':>9}",
    ]
    latency = results["stop_latency_virtual_s"]
    for name, stats in [("all", latency["all"]), *latency["by_phase"].items()]:
        lines.append(
            f"  {name:<24}{stats['count']:>7}{_seconds(stats['p50']):>9}"
            f"{_seconds(stats['p99']):>9}{_seconds(stats['max']):>9}"
        )
    link = results["link_lost_latency_virtual_s"]
    lines.append(
        f"  {'(link_lost, active)':<24}{link['count']:>7}{_seconds(link['p50']):>9}"
        f"{_seconds(link['p99']):>9}{_seconds(link['max']):>9}"
    )
    return "\n".join(lines)


def check(report: Report, baselines: dict[str, Report]) -> Checks:
    """Compare a run with the baseline recorded for the same configuration (or any, for speed).

    Virtual time is a pure function of the seeds and the code, so for the same seeds the
    stop latencies must match the baseline exactly: higher fails, lower or a different
    fingerprint means the supervisor's behaviour changed and the baseline wants refreshing.
    """
    results = report["results"]
    checks = Checks()
    checks.add("violations", str(results["violations"]), "-", "0", results["violations"] == 0)

    same = baselines.get(config_key(report["config"]))
    speed_base = same or max(
        baselines.values(), key=lambda r: r["results"]["schedules"], default=None
    )
    rate = results["schedules_per_second"]
    if speed_base is None:
        checks.add("schedules/s", f"{rate:g}", "none", "-", None)
    else:
        base_rate = speed_base["results"]["schedules_per_second"]
        floor = THROUGHPUT_FLOOR * base_rate
        checks.add("schedules/s", f"{rate:g}", f"{base_rate:g}", f">= {floor:.1f}", rate >= floor)

    comparable = same is not None and same["results"]["schedule_format"] == SCHEDULE_FORMAT
    if not comparable:
        checks.add(
            "stop p99 (virtual s)",
            _seconds(results["stop_latency_virtual_s"]["all"]["p99"]),
            "none",
            "same seeds only",
            None,
        )
        return checks
    assert same is not None
    ours, theirs = results["stop_latency_virtual_s"], same["results"]["stop_latency_virtual_s"]
    for name in ("all", *PHASES):
        now = ours["all"] if name == "all" else ours["by_phase"][name]
        then = theirs["all"] if name == "all" else theirs["by_phase"].get(name, {})
        p99, base_p99 = now["p99"], then.get("p99")
        if p99 is None and base_p99 is None:
            continue
        if p99 is None or base_p99 is None:
            ok: bool | None = None
        elif p99 > base_p99 + 1e-9:
            ok = False
        else:
            ok = True if p99 >= base_p99 - 1e-9 else None
        checks.add(
            f"stop p99 {name} (virtual s)",
            _seconds(p99),
            _seconds(base_p99),
            f"<= {_seconds(base_p99)}",
            ok,
        )
    same_behaviour = results["fingerprint"] == same["results"]["fingerprint"]
    checks.add(
        "virtual-time fingerprint",
        results["fingerprint"],
        same["results"]["fingerprint"],
        "informational",
        True if same_behaviour else None,
    )
    if not same_behaviour:
        print(
            "note: the schedules ran differently from the baseline's (the supervisor, the fake "
            "or trio changed); if intended, refresh it with --update-baseline",
        )
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser(BENCHMARK, __doc__ or "")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    parser.add_argument(
        "--schedules",
        type=int,
        help=f"how many schedules (default: {FULL_SCHEDULES:,}; --quick: {QUICK_SCHEDULES:,})",
    )
    parser.add_argument(
        "--trace", action="store_true", help="print every operation (use with --schedules 1)"
    )
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    schedules = args.schedules or (QUICK_SCHEDULES if args.quick else FULL_SCHEDULES)
    if schedules < 1:
        parser.error("--schedules must be at least 1")

    results = run_schedules(args.seed, schedules, trace=print if args.trace else None)
    config = {"seed": args.seed, "schedules": schedules}
    report = make_report(BENCHMARK, command_line("race.py", argv), config, results)
    violations = results["violations"]
    failure = f"{violations} invariant violations" if violations else None
    return conclude(args, report, summary(results), check, failure=failure)


if __name__ == "__main__":
    sys.exit(main())
