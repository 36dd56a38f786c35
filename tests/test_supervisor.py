"""The reconnect supervisor under a mock clock, with the deterministic fake cloud.

Every time asserted here is exact virtual time (``autojump_clock``): a test that says an
attempt starts 2 s after a failure fails if it starts at 2.001 s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from scope_trio.core.params import ParameterError
from scope_trio.core.supervisor import (
    Phase,
    ReconnectPolicy,
    SessionSupervisor,
    StartAbortedError,
    StartFailedError,
    SupervisorStatus,
    budget_spent_message,
    intensity_message,
    lost_message,
)
from scope_trio.dev.fakes import OK, FakeCloud, FakeState, Plan

FINAL = (
    "Remote inference connection lost. Reconnection failed after 3 attempts. "
    "Please toggle cloud mode off and on to reconnect."
)

SCOPE = ReconnectPolicy(immediate_first_attempt=False)
"""Scope's exact timing (1 s, 2 s, 4 s before attempts 1-3): most schedules here are written
in it; the default's immediate first attempt has its own tests."""


@asynccontextmanager
async def supervised(
    cloud: FakeCloud, policy: ReconnectPolicy | None = None
) -> AsyncIterator[SessionSupervisor]:
    async with trio.open_nursery() as nursery:
        supervisor = SessionSupervisor(nursery, cloud, policy or SCOPE)
        try:
            yield supervisor
        finally:
            await supervisor.stop()
    assert cloud.live == 0


async def until(
    supervisor: SessionSupervisor,
    predicate: Callable[[SupervisorStatus], bool],
) -> SupervisorStatus:
    """Wait for a status; the deadline is virtual time, far beyond any schedule here."""
    with trio.fail_after(600):
        return await supervisor.wait_until(predicate)


async def lose(
    supervisor: SessionSupervisor, cloud: FakeCloud, reason: str = "peer connection closed"
) -> None:
    """End the connected fake session and wait until the supervisor has seen it."""
    cloud.lose(reason)
    await until(supervisor, lambda s: not s.webrtc_connected)


def connected(status: SupervisorStatus) -> bool:
    return status.webrtc_connected


def failed(status: SupervisorStatus) -> bool:
    return status.phase is Phase.FAILED


# ------------------------------------------------------------------ 1. start


async def test_start_returns_once_connected(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=0.5))
    async with supervised(cloud) as supervisor:
        await supervisor.start({"prompts": [{"text": "a cat", "weight": 1.0}]})
        assert cloud.now() == 0.5
        assert supervisor.status.webrtc_connected
        assert supervisor.status.webrtc_error is None
        session = cloud.connected
        assert session is not None
        assert session.initial == {"prompts": [{"text": "a cat", "weight": 1.0}]}


async def test_scope_bug_8_failed_first_start_sets_webrtc_error(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(fail="offer refused"))
    async with supervised(cloud) as supervisor:
        with pytest.raises(StartFailedError, match="offer refused"):
            await supervisor.start({})
        status = supervisor.status
        assert status.webrtc_error == "Remote inference connection failed: offer refused"
        assert not status.webrtc_connected
        assert not status.webrtc_reconnecting
        await trio.sleep(100)
        assert len(cloud.sessions) == 1, "a failed first start is not retried"
        assert cloud.live == 0


async def test_first_start_has_the_attempt_deadline(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(hang=True))
    async with supervised(cloud) as supervisor:
        with pytest.raises(StartFailedError, match="timed out after 10 s"):
            await supervisor.start({})
        assert cloud.now() == 10
        assert cloud.sessions[0].state is FakeState.CLOSED


# ------------------------------------------------------------- 2. loss seen


async def test_loss_is_reported_at_once(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        t0 = trio.current_time()
        await lose(supervisor, cloud, "ICE consent lost")
        status = await until(supervisor, lambda s: not s.webrtc_connected)
        assert trio.current_time() == t0
        assert status.webrtc_reconnecting
        assert status.webrtc_error == "Remote inference connection lost: ICE consent lost"
        assert status.last_loss_reason == "ICE consent lost"


# ------------------------------------------------------------- 3. backoff


async def test_attempts_at_exact_backoff_times(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        cloud.script(Plan(fail="refused"), Plan(fail="refused"), OK)
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        assert cloud.connect_times == [0, 1, 3, 7]
        assert supervisor.status.attempt == 3
        assert cloud.max_live == 1


async def test_first_attempt_at_once_then_backoff_by_default(autojump_clock: MockClock) -> None:
    """The default policy: the outage's first attempt starts in the instant of the loss (the
    loss was already detected), the backoff 1 s, 2 s applies from the second."""
    cloud = FakeCloud()
    async with supervised(cloud, ReconnectPolicy()) as supervisor:
        await supervisor.start({})
        cloud.script(Plan(fail="refused"), Plan(fail="refused"), OK)
        await trio.sleep(5)
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        assert cloud.connect_times == [0, 5, 6, 8]
        assert supervisor.status.attempt == 3
        assert cloud.max_live == 1


async def test_immediate_attempt_still_shows_the_loss_first(autojump_clock: MockClock) -> None:
    """Even with no wait, the loss is published (backoff, its reason) before the attempt."""
    cloud = FakeCloud(default=Plan(connect_delay=1))
    seen: list[tuple[Phase, int]] = []
    async with supervised(cloud, ReconnectPolicy()) as supervisor:
        await supervisor.start({})

        async with supervisor.watch() as changes:
            await lose(supervisor, cloud)
            await until(supervisor, connected)
            while True:
                try:
                    status = changes.receive_nowait()
                except trio.WouldBlock:
                    break
                seen.append((status.phase, status.attempt))
    assert seen[-3:] == [(Phase.BACKOFF, 0), (Phase.RECONNECTING, 1), (Phase.CONNECTED, 1)]


async def test_each_attempt_has_its_own_deadline(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        cloud.script(Plan(hang=True), OK)
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        # attempt 1 at 1 s, gives up at 11 s; attempt 2 two seconds later
        assert cloud.connect_times == [0, 1, 13]
        assert cloud.sessions[1].state is FakeState.CLOSED


async def test_scope_bug_3_failed_attempt_is_closed_before_the_next_starts(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(close_delay=0.5)
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        cloud.script(Plan(fail="ice failed"), Plan(fail="ice failed"), OK)
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        assert cloud.max_live == 1
        assert [s.state for s in cloud.sessions[:3]] == [FakeState.CLOSED] * 3
        # each close takes 0.5 s and comes before the next backoff starts
        assert cloud.connect_times == [0, 1.5, 4.0, 8.5]


async def test_jitter_spreads_delays_within_bounds(autojump_clock: MockClock) -> None:
    policy = ReconnectPolicy(jitter=0.5, immediate_first_attempt=False)
    import random

    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in (1, 2, 3) for _ in range(50)]
    assert all(0.5 <= d <= 1.5 for d in delays[:50])
    assert all(2.0 <= d <= 6.0 for d in delays[100:])
    assert len(set(delays)) > 100
    assert [SCOPE.delay(n) for n in (1, 2, 3, 9)] == [1, 2, 4, 30]
    assert [ReconnectPolicy(jitter=0.5).delay(1, rng) for _ in range(5)] == [0.0] * 5


@pytest.mark.parametrize(
    ("field", "value"),
    [("base_delay", 0), ("attempt_timeout", -1), ("max_attempts", -1), ("jitter", 1.0)],
)
def test_policy_rejects_nonsense(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ReconnectPolicy(**{field: value})


# ------------------------------------------------------ 4. and 5. the budget


async def test_budget_spent_ends_in_the_final_error(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        cloud.default = Plan(fail="refused")
        await lose(supervisor, cloud, "peer connection closed")
        status = await until(supervisor, failed)
        assert cloud.now() == 7
        assert status.webrtc_error == FINAL == budget_spent_message(3)
        assert not status.webrtc_reconnecting
        assert not status.webrtc_connected
        await trio.sleep(1000)
        assert len(cloud.sessions) == 4, "no attempt after the budget is spent"


async def test_scope_bug_5_flapping_link_does_not_reconnect_forever(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        for _ in range(10):
            await trio.sleep(1)  # shorter than the 10 s stable period
            if cloud.connected is None:
                break
            await lose(supervisor, cloud, "flap")
            await until(supervisor, lambda s: s.webrtc_connected or failed(s))
        assert supervisor.status.webrtc_error == FINAL
        assert len(cloud.sessions) == 4  # the first session + 3 reconnects, then no more


async def test_budget_refills_after_a_stable_period(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        cloud.script(Plan(fail="x"), OK)
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        assert supervisor.status.attempt == 2
        await trio.sleep(10)  # stable
        cloud.default = Plan(fail="x")
        t_loss = cloud.now()
        await lose(supervisor, cloud)
        await until(supervisor, failed)
        # a full, fresh budget: three attempts at 1, 3 and 7 s after the loss
        assert [t - t_loss for t in cloud.connect_times[-3:]] == [1, 3, 7]


async def test_budget_does_not_refill_before_the_stable_period(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        cloud.script(Plan(fail="x"), OK)
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        await trio.sleep(9.5)
        cloud.default = Plan(fail="x")
        await lose(supervisor, cloud)
        await until(supervisor, failed)
        assert len(cloud.sessions) == 4  # only the one attempt left in the budget


async def test_restart_intensity_caps_restarts_per_window(autojump_clock: MockClock) -> None:
    policy = ReconnectPolicy(stable_period=0, max_restarts=4, restart_window=60)
    cloud = FakeCloud()
    async with supervised(cloud, policy) as supervisor:
        await supervisor.start({})
        for _ in range(10):
            await trio.sleep(2)
            if cloud.connected is None:
                break
            await lose(supervisor, cloud, "flap")
            await until(supervisor, lambda s: s.webrtc_connected or failed(s))
        assert supervisor.status.webrtc_error == intensity_message(4, 60)
        assert len(cloud.sessions) == 5


async def test_restarts_outside_the_window_do_not_count(autojump_clock: MockClock) -> None:
    policy = ReconnectPolicy(stable_period=0, max_restarts=2, restart_window=5)
    cloud = FakeCloud()
    async with supervised(cloud, policy) as supervisor:
        await supervisor.start({})
        for _ in range(6):
            await trio.sleep(6)
            await lose(supervisor, cloud, "slow flap")
            await until(supervisor, connected)
        assert supervisor.status.webrtc_connected
        assert len(cloud.sessions) == 7


# ------------------------------------------------------------ 6. link loss


async def test_link_loss_stops_reconnecting_at_once(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"noise_scale": 0.3})
        await lose(supervisor, cloud)
        await trio.sleep(0.5)  # in the 1 s backoff
        await supervisor.link_lost("code 1006")
        assert cloud.now() == 0.5, "not after the next sleep"
        status = supervisor.status
        assert status.phase is Phase.LINK_DOWN
        assert not status.webrtc_reconnecting
        assert not status.webrtc_connected
        assert status.webrtc_error == lost_message("cloud connection closed (code 1006)")
        await trio.sleep(100)
        assert len(cloud.sessions) == 1
        assert supervisor.last_parameters == {"noise_scale": 0.3}


async def test_link_loss_mid_attempt_closes_the_attempt(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(hang=True))
    cloud.script(OK)
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        await lose(supervisor, cloud)
        await until(supervisor, lambda s: s.phase is Phase.RECONNECTING)
        await supervisor.link_lost("heartbeat timeout")
        assert cloud.live == 0
        assert supervisor.status.phase is Phase.LINK_DOWN


async def test_resume_after_link_loss_uses_the_kept_parameters(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"noise_scale": 0.3, "reset_cache": True})
        await supervisor.link_lost("code 1011")
        supervisor.update_parameters({"noise_scale": 0.9})
        await supervisor.resume()
        session = cloud.connected
        assert session is not None
        assert session.initial == {"noise_scale": 0.9}
        assert supervisor.status.webrtc_connected


async def test_scope_bug_6_media_loss_before_link_loss_ends_with_a_message(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(default=Plan(fail="refused"))
    cloud.script(OK)
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        await lose(supervisor, cloud, "peer connection closed")
        await trio.sleep(1.5)  # attempt 1 already failed
        await supervisor.link_lost("code 1006")
        status = supervisor.status
        assert status.webrtc_error is not None
        assert "cloud connection closed (code 1006)" in status.webrtc_error
        assert not status.webrtc_reconnecting


# ------------------------------------------------------------ 7. parameters


async def test_scope_bug_4_parameters_are_copied_not_aliased(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    params: dict[str, Any] = {"prompts": [{"text": "a", "weight": 1.0}]}
    async with supervised(cloud) as supervisor:
        await supervisor.start(params)
        params["prompts"][0]["text"] = "mutated"
        params["noise_scale"] = 5
        update: dict[str, Any] = {"denoising_step_list": [700, 500]}
        supervisor.update_parameters(update)
        update["denoising_step_list"].append(1)
        assert supervisor.last_parameters == {
            "prompts": [{"text": "a", "weight": 1.0}],
            "denoising_step_list": [700, 500],
        }
        supervisor.last_parameters["prompts"].clear()
        assert supervisor.last_parameters["prompts"]


async def test_scope_bug_4_updates_during_outage_reach_the_next_session_once(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"prompts": ["a"], "noise_scale": 0.1, "reset_cache": True})
        first = cloud.connected
        assert first is not None
        await lose(supervisor, cloud)
        supervisor.update_parameters({"noise_scale": 0.5})
        supervisor.update_parameters({"transition": {"target": ["b"]}})
        await until(supervisor, connected)
        second = cloud.connected
        assert second is not None
        assert second.initial == {
            "prompts": ["a"],
            "noise_scale": 0.5,
            "transition": {"target": ["b"]},
        }
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        third = cloud.connected
        assert third is not None
        assert third.initial == {"prompts": ["a"], "noise_scale": 0.5}, "no one-shot replayed"


async def test_update_during_an_attempt_is_delivered_after_it_connects(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"noise_scale": 0.1})
        cloud.script(Plan(connect_delay=0.5))
        await lose(supervisor, cloud)
        await until(supervisor, lambda s: s.phase is Phase.RECONNECTING)
        supervisor.update_parameters({"noise_scale": 0.7, "reset_cache": True})
        await until(supervisor, connected)
        session = cloud.connected
        assert session is not None
        assert session.initial == {"noise_scale": 0.1}
        assert session.received == {"noise_scale": 0.7, "reset_cache": True}
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        assert cloud.sessions[-1].received == {"noise_scale": 0.7}


async def test_update_while_connected_is_sent_live(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        supervisor.update_parameters({"reset_cache": True, "noise_scale": 1})
        session = cloud.connected
        assert session is not None
        assert session.updates == [{"reset_cache": True, "noise_scale": 1}]
        assert supervisor.last_parameters == {"noise_scale": 1}


async def test_bad_update_is_refused_and_changes_nothing(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"a": 1})
        with pytest.raises(ParameterError, match="JSON object"):
            supervisor.update_parameters(["not", "a", "dict"])  # type: ignore[arg-type]
        with pytest.raises(ParameterError, match="keys must be strings"):
            supervisor.update_parameters({1: "x"})  # type: ignore[dict-item]
        assert supervisor.last_parameters == {"a": 1}
        assert supervisor.status.webrtc_connected


async def test_one_shot_keys_are_configurable(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with trio.open_nursery() as nursery:
        supervisor = SessionSupervisor(nursery, cloud, one_shot_keys={"flash"})
        await supervisor.start({"flash": 1, "reset_cache": True})
        await lose(supervisor, cloud)
        await until(supervisor, connected)
        assert cloud.sessions[-1].initial == {"reset_cache": True}
        await supervisor.stop()


# ------------------------------------------------------------------- 8. stop


def assert_cleared(supervisor: SessionSupervisor, cloud: FakeCloud) -> None:
    status = supervisor.status
    assert status.phase is Phase.IDLE
    assert not status.webrtc_connected
    assert not status.webrtc_reconnecting
    assert status.webrtc_error is None
    assert status.attempt == 0
    assert supervisor.last_parameters == {}
    assert cloud.live == 0


async def stop_in_phase(
    cloud: FakeCloud,
    reach: Callable[[SessionSupervisor], Any],
    policy: ReconnectPolicy | None = None,
) -> float:
    """Start, get to a phase with ``reach``, stop, and return how long stop took."""
    async with trio.open_nursery() as nursery:
        supervisor = SessionSupervisor(nursery, cloud, policy)
        await reach(supervisor)
        t0 = trio.current_time()
        await supervisor.stop()
        took = trio.current_time() - t0
        assert_cleared(supervisor, cloud)
        assert not nursery.child_tasks, "stop leaves no task running"
        await supervisor.stop()  # idempotent
        assert_cleared(supervisor, cloud)
    return took


async def test_stop_while_connected_returns_after_the_close(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(close_delay=0.25)

    async def reach(supervisor: SessionSupervisor) -> None:
        await supervisor.start({"a": 1})

    assert await stop_in_phase(cloud, reach) == 0.25


async def test_stop_while_connecting_aborts_the_start(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=5))
    outcome: list[BaseException] = []

    async def reach(supervisor: SessionSupervisor) -> None:
        async def start() -> None:
            try:
                await supervisor.start({})
            except StartAbortedError as exc:
                outcome.append(exc)

        supervisor._nursery.start_soon(start)
        await until(supervisor, lambda s: s.phase is Phase.CONNECTING)
        await trio.sleep(1)

    assert await stop_in_phase(cloud, reach) == 0
    assert len(outcome) == 1


async def test_stop_in_backoff(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()

    async def reach(supervisor: SessionSupervisor) -> None:
        await supervisor.start({})
        await lose(supervisor, cloud)
        await trio.sleep(0.5)
        assert supervisor.status.phase is Phase.BACKOFF

    assert await stop_in_phase(cloud, reach, SCOPE) == 0
    await trio.sleep(10)
    assert len(cloud.sessions) == 1


async def test_stop_mid_attempt(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=3), close_delay=0.1)
    cloud.script(OK)

    async def reach(supervisor: SessionSupervisor) -> None:
        await supervisor.start({})
        await lose(supervisor, cloud)
        await until(supervisor, lambda s: s.phase is Phase.RECONNECTING)

    assert await stop_in_phase(cloud, reach) == pytest.approx(0.1)


async def test_stop_during_cleanup_of_a_replaced_session(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(close_delay=2)

    async def reach(supervisor: SessionSupervisor) -> None:
        await supervisor.start({})

        async def replace() -> None:
            with pytest.raises(StartAbortedError):
                await supervisor.start({"b": 2})

        supervisor._nursery.start_soon(replace)
        await trio.sleep(0.5)  # the first session is closing
        assert cloud.sessions[0].state is FakeState.CLOSING

    assert await stop_in_phase(cloud, reach) == 1.5
    assert len(cloud.sessions) == 1, "the replacing start never connected"


async def test_stop_in_the_final_error_clears_it(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(fail="x"))
    cloud.script(OK)

    async def reach(supervisor: SessionSupervisor) -> None:
        await supervisor.start({})
        await lose(supervisor, cloud)
        await until(supervisor, failed)

    assert await stop_in_phase(cloud, reach) == 0


async def test_concurrent_stops_all_return_after_the_close(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(close_delay=1)
    returned: list[float] = []
    async with supervised(cloud) as supervisor:
        await supervisor.start({})

        async def stop() -> None:
            await supervisor.stop()
            returned.append(cloud.now())
            assert cloud.live == 0

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(stop)
    assert returned == [1.0] * 5


async def test_scope_bug_7_stop_does_not_swallow_the_callers_cancellation(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(close_delay=1)
    async with supervised(cloud) as supervisor:
        await supervisor.start({"a": 1})
        with trio.move_on_after(0.1) as scope:
            await supervisor.stop()
        assert scope.cancelled_caught, "the caller's cancellation was raised"
        assert cloud.now() == 1, "yet the stop completed (shielded) first"
        assert_cleared(supervisor, cloud)

        await supervisor.start({"a": 1})
        with trio.CancelScope() as scope:
            scope.cancel()
            await supervisor.stop()
        assert scope.cancelled_caught
        assert_cleared(supervisor, cloud)


async def test_cancelled_start_does_not_leave_connecting_behind(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=5))
    async with supervised(cloud) as supervisor:
        with trio.move_on_after(1):
            await supervisor.start({})
        assert supervisor.status.phase is Phase.IDLE
        assert cloud.live == 0


# ------------------------------------------------------------- 9. replace


async def test_start_replaces_the_running_session(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"who": "first"})
        await supervisor.start({"who": "second"})
        assert [s.state for s in cloud.sessions] == [FakeState.CLOSED, FakeState.CONNECTED]
        assert cloud.max_live == 1
        assert supervisor.last_parameters == {"who": "second"}


async def test_concurrent_starts_latest_wins(autojump_clock: MockClock) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=1))
    results: dict[str, str] = {}
    async with supervised(cloud) as supervisor:

        async def start(who: str) -> None:
            try:
                await supervisor.start({"who": who})
                results[who] = "connected"
            except StartAbortedError:
                results[who] = "aborted"

        async with trio.open_nursery() as nursery:
            for who in ("a", "b", "c"):
                nursery.start_soon(start, who)
                await trio.testing.wait_all_tasks_blocked()
        assert results == {"a": "aborted", "b": "aborted", "c": "connected"}
        assert cloud.max_live == 1
        connected_session = cloud.connected
        assert connected_session is not None
        assert connected_session.initial == {"who": "c"}


async def test_scope_bug_2_reconnect_waking_from_backoff_cannot_tear_down_a_new_session(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"who": "old"})
        await lose(supervisor, cloud)
        await trio.sleep(0.9)  # the old run's reconnect is about to wake
        await supervisor.start({"who": "new"})
        await trio.sleep(30)  # long past every backoff of the old run
        session = cloud.connected
        assert session is not None
        assert session.initial == {"who": "new"}
        assert len(cloud.sessions) == 2
        assert supervisor.status.webrtc_connected


async def test_scope_bug_2_failed_start_does_not_orphan_the_previous_session(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"who": "a"})
        cloud.script(Plan(fail="refused"))
        with pytest.raises(StartFailedError):
            await supervisor.start({"who": "b"})
        assert cloud.live == 0, "the replaced session was closed, not orphaned"
        assert supervisor.status.phase is Phase.FAILED
        await supervisor.start({"who": "c"})
        assert supervisor.status.webrtc_connected


# ------------------------------------------------------------- 10. status


async def test_status_is_an_immutable_snapshot(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        before = supervisor.status
        await supervisor.start({})
        after = supervisor.status
        assert before.phase is Phase.IDLE
        assert after.phase is Phase.CONNECTED
        assert after.version > before.version
        with pytest.raises(FrozenInstanceError):
            after.phase = Phase.IDLE  # type: ignore[misc]
        assert after.as_dict()["webrtc_connected"] is True


async def test_scope_bug_7_a_one_second_recovery_is_seen_by_a_watcher(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        async with supervisor.watch() as changes:
            await lose(supervisor, cloud)
            await until(supervisor, connected)
            seen: list[tuple[bool, bool]] = []
            while True:
                try:
                    status = changes.receive_nowait()
                except trio.WouldBlock:
                    break
                seen.append((status.webrtc_connected, status.webrtc_reconnecting))
        assert seen == [(True, False), (False, True), (False, True), (True, False)]


# ------------------------------------------- races found in review (regressions)


async def test_caller_cancelled_as_the_session_connects_leaves_no_phantom(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=0.5))
    async with supervised(cloud) as supervisor:
        with trio.CancelScope() as caller:
            cloud.on_connected = lambda session: caller.cancel()
            await supervisor.start({"a": 1})
        cloud.on_connected = None
        await trio.sleep(30)
        assert cloud.live == 0
        assert supervisor.status.phase is Phase.IDLE, "no 'connected' without a session"


async def test_loss_right_after_connect_is_reported(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    cloud.script(Plan(lose_at_once="peer connection closed"))
    async with supervised(cloud) as supervisor:
        await supervisor.start({})
        await trio.sleep(0.5)  # inside the 1 s backoff
        status = supervisor.status
        assert status.phase is Phase.BACKOFF
        assert status.sessions_lost == 1
        assert status.webrtc_error == lost_message("peer connection closed")
        await until(supervisor, connected)
        assert cloud.connect_times == [0, 1]


async def test_start_superseded_after_connecting_raises_aborted(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=0.5))
    async with supervised(cloud) as supervisor:
        cloud.on_connected = lambda session: supervisor._nursery.start_soon(supervisor.stop)
        with pytest.raises(StartAbortedError):
            await supervisor.start({})
        cloud.on_connected = None
        await until(supervisor, lambda s: s.phase is Phase.IDLE)
        assert cloud.live == 0


async def test_parameters_that_are_not_plain_json_are_refused_up_front(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        with pytest.raises(ParameterError, match="plain JSON"):
            await supervisor.start({"x": {1, 2}})
        await supervisor.start({"a": 1})
        await lose(supervisor, cloud)
        with pytest.raises(ParameterError, match="plain JSON"):
            supervisor.update_parameters({"x": float("nan")})
        await until(supervisor, connected)
        assert supervisor.last_parameters == {"a": 1}
        assert cloud.sessions[-1].received == {"a": 1}


async def test_cancelled_resume_stays_link_down(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with supervised(cloud) as supervisor:
        await supervisor.start({"a": 1})
        await supervisor.link_lost("code 1006")
        error = supervisor.status.webrtc_error
        cloud.script(Plan(connect_delay=5))
        with trio.move_on_after(1):
            await supervisor.resume()
        assert supervisor.status.phase is Phase.LINK_DOWN
        assert supervisor.status.webrtc_error == error
        await supervisor.resume()
        assert supervisor.status.webrtc_connected
        assert cloud.sessions[-1].initial == {"a": 1}


async def test_failed_start_superseded_while_closing_raises_aborted(
    autojump_clock: MockClock,
) -> None:
    """Found by benchmarks/race.py (seed 191): the failure was reported to a stale caller."""
    cloud = FakeCloud(default=Plan(fail="offer refused"), close_delay=0.3)
    outcome: list[BaseException] = []
    async with supervised(cloud) as supervisor:

        async def start() -> None:
            try:
                await supervisor.start({})
            except (StartFailedError, StartAbortedError) as exc:
                outcome.append(exc)

        supervisor._nursery.start_soon(start)
        await trio.testing.wait_all_tasks_blocked()  # the connect failed; its session is closing
        await supervisor.stop()
    assert len(outcome) == 1
    assert isinstance(outcome[0], StartAbortedError)
