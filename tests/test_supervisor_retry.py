"""The one retry type (scope_trio.core.retry) reproduces every loop's documented delays."""

from __future__ import annotations

import random

import pytest

from scope_trio.cloud.link import LinkConfig
from scope_trio.cloud.manager import LinkPolicy
from scope_trio.core.retry import Backoff, RestartWindow
from scope_trio.core.supervisor import ReconnectPolicy


def test_reconnect_policy_delays_are_the_exponential_backoff() -> None:
    policy = ReconnectPolicy()
    assert policy.backoff == Backoff(base=1.0, cap=30.0, jitter=0.0, attempts=3)
    # the first attempt of an outage at once, the backoff from the second
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 6, 7, 10)] == [0, 1, 2, 4, 8, 16, 30, 30]
    assert policy.intensity == RestartWindow(6, 60.0)


def test_scope_timing_is_one_setting_away() -> None:
    scope = ReconnectPolicy(immediate_first_attempt=False)
    assert [scope.delay(n) for n in (1, 2, 3, 4, 5, 6, 9)] == [1, 2, 4, 8, 16, 30, 30]


def test_jitter_stays_within_its_fraction() -> None:
    backoff = Backoff(base=2.0, jitter=0.25)
    rng = random.Random(1)
    delays = [backoff.delay(1, rng) for _ in range(200)]
    assert all(1.5 <= d <= 2.5 for d in delays)
    assert len(set(delays)) > 100
    assert backoff.delay(1) == 2.0, "no generator, no jitter"


def test_link_connect_attempts_read_their_table() -> None:
    config = LinkConfig(ws_url="ws://x")
    assert config.connect_retry == Backoff.table((1.0, 2.0, 4.0), attempts=2)
    assert [config.backoff_before(n) for n in (1, 2, 3, 4, 5)] == [0.0, 1.0, 2.0, 4.0, 4.0]
    empty = LinkConfig(ws_url="ws://x", connect_backoff=())
    assert [empty.backoff_before(n) for n in (1, 2, 3)] == [0.0, 0.0, 0.0]


def test_link_policy_is_a_constant_pause_and_a_restart_window() -> None:
    policy = LinkPolicy()
    assert [policy.backoff.delay(n) for n in (1, 2, 5)] == [1.0, 1.0, 1.0]
    assert policy.intensity == RestartWindow(3, 60.0)


def test_restart_window_forgets_restarts_older_than_the_window() -> None:
    tracker = RestartWindow(2, 10.0).tracker()
    tracker.record(0.0)
    tracker.record(5.0)
    assert tracker.exhausted(10.0)
    assert not tracker.exhausted(10.5), "the restart at 0 s left the window"


@pytest.mark.parametrize(
    "kwargs", [{"base": -1.0}, {"jitter": 1.0}, {"attempts": -1}, {"steps": (1.0, -2.0)}]
)
def test_backoff_refuses_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**kwargs)  # type: ignore[arg-type]
