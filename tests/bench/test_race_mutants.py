"""Mutation self-test of the race benchmark: a checker that was never seen to fail proves little.

Each mutant is the real supervisor with one guarantee deliberately broken (by monkeypatching
in this test, never by flags in production code). benchmarks/race.py must catch every one,
with the invariant that exists for it, within its quick run (``QUICK_SCHEDULES`` seeds from
0); the search stops at the first schedule that shows it, so the whole file takes seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

import scope_trio.core.supervisor as sv
from scope_trio.core.events import GiveUpReason
from scope_trio.core.session import Loss
from scope_trio.core.supervisor import Phase, SessionSupervisor, SupervisorStatus

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

Patch = Callable[[pytest.MonkeyPatch], None]


# ------------------------------------------------------------------ the mutants


def stop_does_nothing(mp: pytest.MonkeyPatch) -> None:
    async def stop(self: SessionSupervisor) -> None:
        await trio.lowlevel.checkpoint()

    mp.setattr(SessionSupervisor, "stop", stop)


def stop_swallows_the_callers_cancel(mp: pytest.MonkeyPatch) -> None:
    async def stop(self: SessionSupervisor) -> None:
        ticket = self._supersede(Phase.IDLE)
        self._forget()
        await self._retire_shielded()
        if ticket == self._ticket:
            self._forget()
        # broken: no checkpoint_if_cancelled, the caller's cancel is lost

    mp.setattr(SessionSupervisor, "stop", stop)


def new_run_without_superseding_the_old(mp: pytest.MonkeyPatch) -> None:
    def supersede(self: SessionSupervisor, phase: Phase, **changes: Any) -> int:
        self._ticket += 1  # broken: the old run is neither cancelled nor retired
        self._session = None
        self._set(None, **{"phase": phase, "webrtc_error": None, "attempt": 0, **changes})
        return self._ticket

    async def retire(self: SessionSupervisor) -> None:
        self._run = None
        await trio.lowlevel.checkpoint()

    mp.setattr(SessionSupervisor, "_supersede", supersede)
    mp.setattr(SessionSupervisor, "_retire", retire)


def updates_dropped_while_reconnecting(mp: pytest.MonkeyPatch) -> None:
    original = SessionSupervisor.update_parameters

    def update_parameters(self: SessionSupervisor, update: Mapping[str, Any]) -> None:
        if self._session is not None:  # broken: without a session the update is dropped
            original(self, update)

    mp.setattr(SessionSupervisor, "update_parameters", update_parameters)


def failed_attempt_never_closed(mp: pytest.MonkeyPatch) -> None:
    async def session_lifetime(
        self: SessionSupervisor, run: Any, report_connected: Callable[[], None]
    ) -> Loss:
        attempt = sv._Attempt(self, run, self._factory())
        settled, ended = trio.Event(), trio.Event()
        failure: list[str] = []

        class Started:
            def started(self, value: None = None) -> None:
                settled.set()

        async def detached() -> None:
            try:
                await self._serve(attempt, task_status=Started())  # type: ignore[arg-type]
            except Exception as exc:
                failure.append(str(exc))
            finally:
                settled.set()
                ended.set()

        # broken: the session runs in the server's nursery, and a failed attempt (its
        # deadline passed) is forgotten instead of cancelled and waited for.
        self._nursery.start_soon(detached)
        with trio.move_on_after(self.policy.attempt_timeout):
            await settled.wait()
        if not attempt.connected:
            raise sv._AttemptFailedError(failure[0] if failure else "timed out")
        if run.ticket == self._ticket:
            report_connected()
        await ended.wait()
        assert attempt.loss is not None
        return attempt.loss

    mp.setattr(SessionSupervisor, "_session_lifetime", session_lifetime)


def stale_restart_after_a_newer_start(mp: pytest.MonkeyPatch) -> None:
    async def recover(
        self: SessionSupervisor, run: Any, loss: Loss, report_connected: Callable[[], None]
    ) -> Loss | None:
        policy = self.policy
        while True:
            attempt = self._control.attempt + 1
            if attempt > policy.max_attempts:
                message = sv.budget_spent_message(policy.max_attempts)
                self._give_up(run, GiveUpReason.BUDGET_SPENT, message)
                return None
            with trio.CancelScope(shield=True):  # broken: the backoff outlives a newer start
                await trio.sleep(policy.delay(attempt, self._rng))
            self._set(None, phase=Phase.RECONNECTING, attempt=attempt)  # broken: no ticket
            try:
                return await self._session_lifetime(run, report_connected)
            except sv._AttemptFailedError:
                self._set(run, phase=Phase.BACKOFF, webrtc_error=sv.lost_message(loss.detail))

    mp.setattr(SessionSupervisor, "_recover", recover)


def status_hides_the_error(mp: pytest.MonkeyPatch) -> None:
    def give_up(self: SessionSupervisor, run: Any, reason: GiveUpReason, message: str) -> None:
        self._set(run, phase=Phase.FAILED, webrtc_error=None)  # broken: no final error

    mp.setattr(SessionSupervisor, "_give_up", give_up)


def one_shots_replayed(mp: pytest.MonkeyPatch) -> None:
    original = SessionSupervisor._on_connected

    def on_connected(self: SessionSupervisor, attempt: Any) -> None:
        attempt.taken_one_shots = {}  # broken: what the offer carried is sent again
        original(self, attempt)

    mp.setattr(SessionSupervisor, "_on_connected", on_connected)


def loss_hidden_until_closed(mp: pytest.MonkeyPatch) -> None:
    """The bug of issue 11 finding 1: a loss in the connect's step waits for the close."""

    def lost(self: Any, loss: Loss) -> None:
        if self.loss is not None:
            return
        self.loss = loss
        if self.connected and trio.current_time() > self.connected_at:
            self._supervisor._on_lost(self)

    original = SessionSupervisor._serve

    async def serve(self: SessionSupervisor, attempt: Any, *, task_status: Any) -> None:
        await original(self, attempt, task_status=task_status)
        if attempt.connected:
            self._on_lost(attempt)  # only now, after the session has closed

    mp.setattr(sv._Attempt, "lost", lost)
    mp.setattr(SessionSupervisor, "_serve", serve)


def newest_change_dropped(mp: pytest.MonkeyPatch) -> None:
    """The bug of issue 11 finding 2: a full watcher loses the newest status."""

    def publish(self: SessionSupervisor, status: SupervisorStatus) -> None:
        self._state = status
        for send in list(self._watchers):
            try:
                send.send_nowait(status)
            except trio.WouldBlock:
                pass  # broken: the newest change is dropped
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.pop(send, None)

    mp.setattr(SessionSupervisor, "_publish", publish)


def retire_without_waiting(mp: pytest.MonkeyPatch) -> None:
    async def retire(self: SessionSupervisor) -> None:
        if self._run is not None:  # broken: cancel, but start the next before it closed
            self._run.scope.cancel()
            self._run = None
        await trio.lowlevel.checkpoint()

    mp.setattr(SessionSupervisor, "_retire", retire)


MUTANTS: dict[str, tuple[Patch, set[str]]] = {
    # name: (how it is broken, the invariants that exist to catch it)
    "stop does nothing": (stop_does_nothing, {"stop-status", "stop-live", "stop-params"}),
    "caller's cancel swallowed": (stop_swallows_the_callers_cancel, {"stop-swallowed-cancel"}),
    "new run per start, old not superseded": (
        new_run_without_superseding_the_old,
        {"two-live"},
    ),
    "updates dropped while reconnecting": (
        updates_dropped_while_reconnecting,
        {"parameters", "update-lost"},
    ),
    "failed attempt's session never closed": (
        failed_attempt_never_closed,
        {"two-live", "stop-live", "stop-task", "link-lost-live"},
    ),
    "stale automatic restart after a newer start": (
        stale_restart_after_a_newer_start,
        {"reconnecting-error", "orphan-connecting", "connected-truth", "stop-status", "two-live"},
    ),
    "status hides the error": (status_hides_the_error, {"silent-failure"}),
    "one-shots replayed": (one_shots_replayed, {"one-shot-replayed"}),
    "loss hidden until the close": (loss_hidden_until_closed, {"loss-hidden"}),
    "newest change dropped": (newest_change_dropped, {"watcher-stale"}),
    "next session before the old closed": (retire_without_waiting, {"two-live"}),
}


# ------------------------------------------------------------------ the search


@pytest.fixture(scope="module")
def race() -> ModuleType:
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("race")
    finally:
        sys.path.remove(str(BENCHMARKS))


def first_catch(race: ModuleType, wanted: set[str]) -> tuple[int, dict[str, str]] | None:
    """The first seed of the quick run whose schedule shows one of ``wanted``."""
    with race.supervisor_logs(None), race.seeded_trio_scheduler() as seed_scheduler:
        for seed in range(race.QUICK_SCHEDULES):
            seed_scheduler(seed)
            schedule = race.Schedule(seed)
            schedule.run()
            if wanted & schedule.violations.keys():
                return seed, dict(schedule.violations)
    return None


@pytest.mark.parametrize("name", MUTANTS)
def test_the_race_benchmark_catches_the_mutant(
    race: ModuleType, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    patch, wanted = MUTANTS[name]
    patch(monkeypatch)
    caught = first_catch(race, wanted)
    assert caught is not None, f"{name}: no schedule of the quick run showed {sorted(wanted)}"


def test_the_real_supervisor_passes_the_seeds_that_catch_the_mutants(race: ModuleType) -> None:
    """Without a mutant the same schedules are clean (the catches are the mutants' doing)."""
    with race.supervisor_logs(None), race.seeded_trio_scheduler() as seed_scheduler:
        for seed in range(30):
            seed_scheduler(seed)
            schedule = race.Schedule(seed)
            schedule.run()
            assert not schedule.violations, (seed, schedule.violations)
