"""The supervisor's guarantees in the interleavings a cold review and a race harness found.

One regression test per finding (each failed on the supervisor as it was before the fix),
under the mock clock, with exact virtual times.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from test_supervisor import supervised
from trio.testing import MockClock

import scope_trio.core.supervisor as supervisor_module
from scope_trio.core.events import (
    AttemptEnded,
    AttemptStarted,
    GaveUp,
    GiveUpReason,
    Lost,
    Recovered,
    StartFailed,
    SupervisorEvent,
)
from scope_trio.core.session import Loss, LossKind
from scope_trio.core.supervisor import (
    Phase,
    ReconnectPolicy,
    SessionSupervisor,
    StartFailedError,
    SupervisorStatus,
    budget_spent_message,
    lost_message,
)
from scope_trio.dev.fakes import OK, FakeCloud, FakeState, Plan

FINAL = budget_spent_message(3)


async def until(supervisor: SessionSupervisor, phase: Phase) -> SupervisorStatus:
    with trio.fail_after(600):
        return await supervisor.wait_until(lambda s: s.phase is phase)


async def reconnected(supervisor: SessionSupervisor, sessions: int) -> None:
    with trio.fail_after(600):
        await supervisor.wait_until(lambda s: s.webrtc_connected and s.sessions_started == sessions)


# ------------------------------------------------ 1. a loss is never hidden


async def test_loss_in_the_same_step_as_connect_is_visible_before_the_close(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(close_delay=2)
    cloud.script(Plan(lose_at_once="peer connection closed"))
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        assert cloud.now() == 0
        assert cloud.sessions[0].state is FakeState.CLOSING
        status = supervisor.status
        assert status.phase is Phase.BACKOFF, "no 'connected' while the session closes"
        assert status.sessions_lost == 1
        assert status.webrtc_error == lost_message("peer connection closed")


# ------------------------------- 2. a watcher always ends on the latest status


async def test_a_slow_watcher_misses_the_oldest_changes_never_the_newest(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        async with supervisor.watch(buffer=1) as changes:
            await supervisor.start({})
            cloud.script(Plan(fail="refused"), Plan(fail="refused"), Plan(fail="refused"))
            cloud.lose()
            await until(supervisor, Phase.FAILED)
            seen = []
            while True:
                try:
                    seen.append(changes.receive_nowait())
                except trio.WouldBlock:
                    break
        assert seen, "the watcher has the latest status"
        assert seen[-1] == supervisor.status
        assert seen[-1].phase is Phase.FAILED


async def test_watch_refuses_a_buffer_that_cannot_hold_the_latest(
    autojump_clock: MockClock,
) -> None:
    async with supervised(FakeCloud()) as supervisor:
        with pytest.raises(ValueError, match="buffer"):
            async with supervisor.watch(buffer=0):
                pass  # pragma: no cover


# --------------------------------------- 3. stop: closed, or abandoned by name


async def test_stop_returns_after_the_close_when_it_is_within_the_bound(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(close_delay=1)
    async with supervised(cloud, ReconnectPolicy(close_timeout=1)) as supervisor:
        await supervisor.start({})
        await supervisor.stop()
        assert cloud.now() == 1
        assert cloud.live == 0
        assert supervisor.status.sessions_abandoned == 0


async def test_stop_abandons_a_session_that_will_not_close_and_it_is_reaped_later(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    cloud = FakeCloud(close_delay=5)
    policy = ReconnectPolicy(close_timeout=1)
    async with supervised(cloud, policy) as supervisor:
        events: list[Any] = []
        supervisor.subscribe(events.append)
        await supervisor.start({"a": 1})
        with caplog.at_level(logging.INFO, logger="scope_trio.core.supervisor"):
            await supervisor.stop()
            assert cloud.now() == 2, "bounded: twice the close_timeout"
            status = supervisor.status
            assert status.phase is Phase.IDLE
            assert status.sessions_abandoned == 1, "the outcome is visible in the status"
            assert supervisor.last_parameters == {}
            assert cloud.live == 1, "still closing in the background"
            assert [type(e).__name__ for e in events].count("Abandoned") == 1
            assert "abandon" in caplog.text
            with trio.fail_after(10):
                await cloud.wait_for(lambda c: c.live == 0)
            assert cloud.now() == 5
            await trio.testing.wait_all_tasks_blocked()
            assert "reaped" in caplog.text
        # The supervisor is usable at once: the abandoned run holds nothing.
        cloud.close_delay = 0
        await supervisor.start({"b": 2})
        assert supervisor.status.webrtc_connected


# ---------------------------- 4. decisions never read the published snapshot


@dataclass(frozen=True)
class _Redacted(SupervisorStatus):
    """What a client-facing change might do: show every status with ``attempt`` 0."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "attempt", 0)


async def test_changing_what_clients_see_does_not_change_behaviour(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "SupervisorStatus", _Redacted)
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        cloud.script(*[Plan(fail="refused")] * 10)
        cloud.lose()
        status = await until(supervisor, Phase.FAILED)
        assert status.attempt == 0, "the redaction is in effect"
        assert status.webrtc_error == FINAL, "the budget is the supervisor's own count"
        assert len(cloud.sessions) == 4


# --------------------------------- 5. a bug in a session never ends the server


class _BrokenPolicy(ReconnectPolicy):
    def delay(self, attempt: int, rng: Any = None) -> float:
        raise ZeroDivisionError("bug in the backoff")


INJECTIONS: dict[str, tuple[Plan | str, int]] = {
    # (what goes wrong, sessions connected once it has recovered)
    "factory on a reconnect": ("factory", 2),
    "session, before it connects": (Plan(raise_at="connect", error=RuntimeError("bug")), 2),
    "session, right after it connects": (
        Plan(raise_at="connected", error=RuntimeError("bug")),
        3,
    ),
    "session, while it closes after a loss": (
        Plan(lose_at_once="peer connection closed", raise_at="close", error=RuntimeError("bug")),
        3,
    ),
    "session, in send_parameters": (Plan(raise_at="send", error=RuntimeError("bug")), 2),
    "supervisor, in its backoff": ("policy", 0),
}


@pytest.mark.parametrize("point", INJECTIONS)
async def test_an_unexpected_error_at_any_point_of_a_run_is_contained(
    autojump_clock: MockClock, point: str
) -> None:
    injection, recovered = INJECTIONS[point]
    cloud = FakeCloud()
    policy = _BrokenPolicy() if injection == "policy" else ReconnectPolicy()
    served = trio.Event()
    async with trio.open_nursery() as server:

        async def keep_serving() -> None:
            await trio.sleep(1000)
            served.set()

        server.start_soon(keep_serving)
        supervisor = SessionSupervisor(server, cloud, policy)
        await supervisor.start({"a": 1})
        if isinstance(injection, Plan):
            cloud.script(injection)
        elif injection == "factory":
            cloud.factory_error = RuntimeError("bug in the factory")
        cloud.lose()
        with trio.fail_after(100):
            await supervisor.wait_until(
                lambda s: (
                    s.phase is Phase.FAILED
                    or (s.webrtc_connected and s.sessions_started == recovered)
                )
            )
        if point == "session, in send_parameters":
            supervisor.update_parameters({"b": 2})  # the broken session is dropped, not us
            with trio.fail_after(100):
                await supervisor.wait_until(
                    lambda s: s.webrtc_connected and s.sessions_started == 3
                )
            assert cloud.connected is not None
            assert cloud.connected.received == {"a": 1, "b": 2}
        status = supervisor.status
        if injection == "policy":
            assert status.phase is Phase.FAILED
            assert status.webrtc_error == "internal error: bug in the backoff"
            assert cloud.live == 0
        else:
            assert status.phase is Phase.CONNECTED, status
            assert (status.last_loss_reason or "").startswith(
                ("peer connection closed", "media session crashed")
            )
        # Everything is closed or connected, and the server is still serving.
        assert cloud.live == (1 if status.webrtc_connected else 0)
        await supervisor.start({"a": 2})
        assert supervisor.status.webrtc_connected
        await supervisor.stop()
        assert cloud.live == 0
        assert not served.is_set()
        server.cancel_scope.cancel()


async def test_a_factory_bug_on_the_first_start_fails_the_start(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    cloud.factory_error = RuntimeError("bug in the factory")
    async with supervised(cloud) as supervisor:
        with pytest.raises(StartFailedError, match="bug in the factory"):
            await supervisor.start({})
        assert supervisor.status.phase is Phase.FAILED


def test_keyboard_interrupt_in_a_session_still_propagates() -> None:
    async def main() -> None:
        cloud = FakeCloud()
        cloud.script(OK, Plan(raise_at="connected", error=KeyboardInterrupt()))
        async with trio.open_nursery() as nursery:
            supervisor = SessionSupervisor(nursery, cloud, ReconnectPolicy(base_delay=0.01))
            await supervisor.start({})
            cloud.lose()
            await trio.sleep(10)

    with pytest.raises(BaseException) as caught:  # noqa: PT011 - checked below
        trio.run(main, clock=MockClock(autojump_threshold=0))
    assert _leaves(caught.value) == [KeyboardInterrupt]


def _leaves(exc: BaseException) -> list[type[BaseException]]:
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return [type(exc)]
    return [leaf for child in inner for leaf in _leaves(child)]


async def test_a_subscriber_that_raises_is_logged_and_changes_nothing(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: SupervisorEvent) -> None:
        raise RuntimeError("bug in a subscriber")

    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        supervisor.subscribe(broken)
        seen: list[SupervisorEvent] = []
        unsubscribe = supervisor.subscribe(seen.append)
        await supervisor.start({})
        cloud.lose()
        await reconnected(supervisor, 2)
        unsubscribe()
        cloud.lose()
        await reconnected(supervisor, 3)
    assert "bug in a subscriber" in caplog.text
    assert [type(event) for event in seen] == [Lost, AttemptStarted, AttemptEnded, Recovered]


# ------------------------------------------------------------ typed events


async def test_events_tell_the_outage_with_types_and_exact_times(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    events: list[SupervisorEvent] = []
    async with supervised(cloud) as supervisor:
        supervisor.subscribe(events.append)
        cloud.script(Plan(fail="refused"))
        with pytest.raises(StartFailedError):
            await supervisor.start({})
        await supervisor.start({})
        await trio.sleep(3)
        cloud.script(Plan(fail="refused"), OK)
        cloud.lose(Loss(LossKind.PATH_SILENCE, "no packets from the cloud for 1 s"))
        await reconnected(supervisor, 2)
        cloud.script(*[Plan(fail="refused")] * 3)
        cloud.lose(Loss(LossKind.NO_VIDEO, "no video from the cloud for 2 s"))
        await until(supervisor, Phase.FAILED)
    silence = Loss(LossKind.PATH_SILENCE, "no packets from the cloud for 1 s")
    no_video = Loss(LossKind.NO_VIDEO, "no video from the cloud for 2 s")
    assert events == [
        StartFailed(0.0, "refused"),
        Lost(3.0, silence, connected_at=0.0),
        AttemptStarted(4.0, 1, 3),
        AttemptEnded(4.0, 1, "failed"),
        AttemptStarted(6.0, 2, 3),
        AttemptEnded(6.0, 2, "succeeded"),
        Recovered(6.0, outage=3.0),
        Lost(6.0, no_video, connected_at=6.0),
        AttemptStarted(10.0, 3, 3),  # the budget did not refill: up for less than 10 s
        AttemptEnded(10.0, 3, "failed"),
        GaveUp(10.0, GiveUpReason.BUDGET_SPENT, FINAL),
    ]


# ------------------------------------- 6. after stop, nothing is left set


async def test_an_update_racing_stop_does_not_survive_it(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(close_delay=1)
    async with supervised(cloud) as supervisor:
        await supervisor.start({"a": 1})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.stop)
            await trio.testing.wait_all_tasks_blocked()
            assert cloud.sessions[0].state is FakeState.CLOSING
            supervisor.update_parameters({"b": 2, "reset_cache": True})
        assert supervisor.last_parameters == {}
        assert supervisor.status.phase is Phase.IDLE
        await supervisor.start({})
        assert cloud.sessions[-1].initial == {}, "no one-shot from before the stop"


# ------------------------- 7. the offer carries the parameters of its moment


async def test_an_update_before_the_offer_is_built_goes_in_the_offer(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    cloud.script(Plan(offer_delay=1, connect_delay=1, lose_at_once="peer connection closed"))
    async with supervised(cloud) as supervisor:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.start, {"a": 1})
            await trio.sleep(0.5)
            supervisor.update_parameters({"b": 2, "reset_cache": 7})
        assert cloud.sessions[0].initial == {"a": 1, "b": 2, "reset_cache": 7}
        await until(supervisor, Phase.CONNECTED)
        assert cloud.sessions[1].initial == {"a": 1, "b": 2}, "the one-shot went out once"
