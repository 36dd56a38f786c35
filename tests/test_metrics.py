"""``GET /metrics``: exact counts and durations under a mock clock with the fake cloud, and a
real server scraped over HTTP after a real loss, recovery and link re-establishment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from browser_peer import http_browser
from devcloud_client import fault, running_devcloud
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from scope_trio import rtc
from scope_trio.cloud.manager import CloudManager, CloudSettings
from scope_trio.core.session import Loss, LossKind
from scope_trio.core.supervisor import Phase, ReconnectPolicy, SessionSupervisor, StartFailedError
from scope_trio.dev.devcloud import ws_url
from scope_trio.dev.fakes import FakeCloud, Plan
from scope_trio.http.app import create_app, openapi_document
from scope_trio.ops.metrics import LOSS_REASONS, MediaMetrics
from scope_trio.relay.relay import Relay
from scope_trio.server import ServerConfig, serve

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def losses(samples: Samples) -> dict[str, float]:
    return {
        reason: value(samples, "scope_trio_media_losses_total", reason=reason)
        for reason in LOSS_REASONS
    }


def outcomes(samples: Samples) -> dict[str, float]:
    name = "scope_trio_media_reconnect_attempt_outcomes_total"
    return {o: value(samples, name, outcome=o) for o in ("succeeded", "failed", "aborted")}


def give_ups(samples: Samples) -> dict[str, float]:
    name = "scope_trio_media_reconnect_give_ups_total"
    return {r: value(samples, name, reason=r) for r in ("budget_spent", "restart_intensity")}


def histogram(samples: Samples, name: str) -> tuple[float, float]:
    """(count, sum), after checking that the +Inf bucket agrees with the count."""
    count = value(samples, f"{name}_count")
    assert value(samples, f"{name}_bucket", le="+Inf") == count
    return count, value(samples, f"{name}_sum")


def test_loss_labels_are_the_loss_kinds() -> None:
    assert LOSS_REASONS == (
        "peer_connection_closed",
        "peer_connection_failed",
        "path_silence",
        "no_video",
        "track_ended",
        "uplink_dead",
        "link_lost",
        "session_crashed",
        "other",
    )
    assert {kind.value for kind in LossKind} == set(LOSS_REASONS)


KINDS = {
    "peer connection closed": LossKind.PEER_CONNECTION_CLOSED,
    "peer connection failed": LossKind.PEER_CONNECTION_FAILED,
    "no video from the cloud within 10 s": LossKind.NO_VIDEO,
    "no video from the cloud for 2 s": LossKind.NO_VIDEO,
    "cloud video track ended": LossKind.TRACK_ENDED,
    "ICE consent lost": LossKind.PATH_SILENCE,
    "media session crashed: boom": LossKind.SESSION_CRASHED,
}
"""The kinds the media session gives these texts (the fake is told the kind, as media is)."""


def typed(reason: str) -> Loss:
    return Loss(KINDS.get(reason, LossKind.OTHER), reason)


# ------------------------------------------------------------------ the fake cloud, mock clock


@asynccontextmanager
async def observed(
    cloud: FakeCloud, policy: ReconnectPolicy | None = None
) -> AsyncIterator[tuple[SessionSupervisor, MediaMetrics, CollectorRegistry, list[float | None]]]:
    """A supervisor over ``cloud`` with its metrics observed; the list holds the trio time of
    the last frame "received" (the test sets it)."""
    last_frame: list[float | None] = [None]
    registry = CollectorRegistry()
    async with trio.open_nursery() as nursery:
        # Scope's timing (1 s before the first attempt): the exact schedules below use it.
        policy = policy or ReconnectPolicy(immediate_first_attempt=False)
        supervisor = SessionSupervisor(nursery, cloud, policy)
        metrics = MediaMetrics(registry, supervisor, last_frame_at=lambda: last_frame[0])
        await nursery.start(metrics.run)
        try:
            yield supervisor, metrics, registry, last_frame
        finally:
            await supervisor.stop()
            nursery.cancel_scope.cancel()


async def scrape(metrics: MediaMetrics, registry: CollectorRegistry) -> Samples:
    await metrics.caught_up()
    return parse(generate_latest(registry).decode())


async def at(cloud: FakeCloud, seconds: float) -> None:
    await trio.sleep_until(cloud.epoch + seconds)


async def lose(supervisor: SessionSupervisor, cloud: FakeCloud, reason: str) -> None:
    """End the connected fake session and wait until the supervisor has reported it."""
    cloud.lose(typed(reason))
    with trio.fail_after(60):
        await supervisor.wait_until(lambda s: not s.webrtc_connected)


async def test_loss_reconnect_and_give_up_are_counted_with_exact_durations(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud(default=Plan(connect_delay=0.5))
    async with observed(cloud) as (supervisor, metrics, registry, last_frame):
        await supervisor.start({})
        assert cloud.now() == 0.5
        await at(cloud, 1.0)
        last_frame[0] = trio.current_time()  # the last frame before the loss
        await at(cloud, 1.75)
        cloud.script(Plan(connect_delay=0.25, fail="refused"), Plan(connect_delay=0.5))
        await lose(supervisor, cloud, "peer connection closed")
        # attempt 1 at 2.75 fails at 3.0; attempt 2 at 5.0 connects at 5.5
        with trio.fail_after(60):
            await supervisor.wait_until(lambda s: s.webrtc_connected)
        assert cloud.now() == 5.5
        samples = await scrape(metrics, registry)
        assert value(samples, "scope_trio_media_reconnect_attempts_total") == 2
        assert histogram(samples, "scope_trio_media_loss_detection_seconds") == (1, 0.75)
        assert histogram(samples, "scope_trio_media_recovery_seconds") == (1, 3.75)
        assert value(samples, "scope_trio_media_loss_detection_seconds_bucket", le="0.5") == 0
        assert value(samples, "scope_trio_media_loss_detection_seconds_bucket", le="0.75") == 1
        assert value(samples, "scope_trio_media_recovery_seconds_bucket", le="3.0") == 0
        assert value(samples, "scope_trio_media_recovery_seconds_bucket", le="4.0") == 1

        # A session that never delivers a frame: detection runs from its connect.
        await at(cloud, 8.5)
        cloud.script(Plan(connect_delay=0.5, fail="refused"))
        await lose(supervisor, cloud, "no video from the cloud within 10 s")
        # attempt 3 at 12.5 fails at 13.0; the budget (3) is spent
        with trio.fail_after(60):
            status = await supervisor.wait_until(lambda s: s.phase is Phase.FAILED)
        assert cloud.now() == 13.0
        assert status.attempt == 3
        samples = await scrape(metrics, registry)

    assert value(samples, "scope_trio_media_reconnect_attempts_total") == 3
    assert outcomes(samples) == {"succeeded": 1, "failed": 2, "aborted": 0}
    assert give_ups(samples) == {"budget_spent": 1, "restart_intensity": 0}
    assert losses(samples) == {
        reason: 1 if reason in ("peer_connection_closed", "no_video") else 0
        for reason in LOSS_REASONS
    }
    assert histogram(samples, "scope_trio_media_loss_detection_seconds") == (2, 0.75 + 3.0)
    assert histogram(samples, "scope_trio_media_recovery_seconds") == (1, 3.75), "gave up: none"
    assert value(samples, "scope_trio_media_start_failures_total") == 0
    # Read from the supervisor's own status at scrape time:
    assert value(samples, "scope_trio_media_sessions_started_total") == 2
    assert value(samples, "scope_trio_media_sessions_lost_total") == 2
    assert value(samples, "scope_trio_media_connected") == 0
    assert value(samples, "scope_trio_media_phase", phase="failed") == 1
    assert value(samples, "scope_trio_media_phase", phase="connected") == 0


async def test_an_aborted_attempt_and_restart_intensity_are_counted(
    autojump_clock: MockClock,
) -> None:
    cloud = FakeCloud()
    policy = ReconnectPolicy(max_restarts=2, restart_window=60.0, immediate_first_attempt=False)
    async with observed(cloud, policy) as (supervisor, metrics, registry, _):
        cloud.script(Plan(fail="refused"))
        with pytest.raises(StartFailedError):
            await supervisor.start({})
        await supervisor.start({})  # connected at 0
        await at(cloud, 1.0)
        cloud.script(Plan(hang=True))
        await lose(supervisor, cloud, "ICE consent lost")  # attempt 1 at 2.0 hangs
        await at(cloud, 2.5)
        assert supervisor.status.phase is Phase.RECONNECTING
        await supervisor.stop()  # the attempt is aborted; the outage ends unrecovered
        await supervisor.start({})  # connected at 2.5
        await at(cloud, 3.0)
        cloud.script(
            Plan(lose_at_once=typed("cloud video track ended")),
            Plan(lose_at_once=typed("media session crashed: boom")),
        )
        await lose(supervisor, cloud, "peer connection failed")
        # Attempt 1 at 4.0 connects and is lost at once, attempt 2 at 6.0 too; a third
        # attempt would be the third restart within 60 s: given up at 6.0.
        with trio.fail_after(60):
            status = await supervisor.wait_until(lambda s: s.phase is Phase.FAILED)
        assert cloud.now() == 6.0
        assert status.attempt == 2
        samples = await scrape(metrics, registry)

    assert value(samples, "scope_trio_media_start_failures_total") == 1
    lost_once = ("path_silence", "peer_connection_failed", "track_ended", "session_crashed")
    assert losses(samples) == {r: 1 if r in lost_once else 0 for r in LOSS_REASONS}
    assert value(samples, "scope_trio_media_reconnect_attempts_total") == 3
    assert outcomes(samples) == {"succeeded": 2, "failed": 0, "aborted": 1}
    assert give_ups(samples) == {"budget_spent": 0, "restart_intensity": 1}
    # No frames at all: detection runs from each session's connect (1.0, 0.5, 0, 0).
    assert histogram(samples, "scope_trio_media_loss_detection_seconds") == (4, 1.5)
    # Recovered by attempt 1 (4.0 - 3.0) and attempt 2 (6.0 - 4.0); the stopped outage not.
    assert histogram(samples, "scope_trio_media_recovery_seconds") == (2, 3.0)
    assert value(samples, "scope_trio_media_sessions_lost_total") == 4
    assert value(samples, "scope_trio_media_sessions_started_total") == 4


async def test_an_abandoned_session_and_an_internal_error_are_counted(
    autojump_clock: MockClock,
) -> None:
    class BrokenBackoff(ReconnectPolicy):
        def delay(self, attempt: int, rng: Any = None) -> float:
            raise ZeroDivisionError("bug in the backoff")

    cloud = FakeCloud(close_delay=5)
    async with observed(cloud, BrokenBackoff(close_timeout=1)) as (
        supervisor,
        metrics,
        registry,
        _,
    ):
        await supervisor.start({})
        await supervisor.stop()  # the session takes 5 s to close: abandoned after 2 s
        samples = await scrape(metrics, registry)
        assert value(samples, "scope_trio_media_sessions_abandoned_total") == 1
        with trio.fail_after(10):
            await cloud.wait_for(lambda c: c.live == 0)
        cloud.close_delay = 0
        await supervisor.start({})
        await lose(supervisor, cloud, "peer connection closed")
        with trio.fail_after(60):
            status = await supervisor.wait_until(lambda s: s.phase is Phase.FAILED)
        assert status.webrtc_error == "internal error: bug in the backoff"
        samples = await scrape(metrics, registry)
    assert value(samples, "scope_trio_media_reconnect_give_ups_total", reason="internal_error") == 1
    assert value(samples, "scope_trio_media_sessions_abandoned_total") == 1


async def test_a_link_loss_is_a_loss_and_its_resume_a_recovery(autojump_clock: MockClock) -> None:
    cloud = FakeCloud()
    async with observed(cloud) as (supervisor, metrics, registry, last_frame):
        await supervisor.start({})  # connected at 0
        await at(cloud, 0.25)
        last_frame[0] = trio.current_time()
        await at(cloud, 1.0)
        await supervisor.link_lost("code 1006: connection lost")  # loss: link_lost
        await at(cloud, 2.0)
        cloud.script(Plan(connect_delay=0.5))
        await supervisor.resume()  # connected at 2.5: 1.5 s after the loss
        await at(cloud, 3.0)
        await lose(supervisor, cloud, "peer connection closed")  # lost first ...
        await at(cloud, 3.5)
        await supervisor.link_lost("code 1006: connection lost")  # ... so no second loss
        await at(cloud, 4.0)
        await supervisor.resume()  # connected at 4.0: 1.0 s after the loss
        samples = await scrape(metrics, registry)

    lost_once = ("link_lost", "peer_connection_closed")
    assert losses(samples) == {r: 1 if r in lost_once else 0 for r in LOSS_REASONS}
    # Detection: 1.0 - 0.25 (the last frame); 3.0 - 2.5 (no frame in that session).
    assert histogram(samples, "scope_trio_media_loss_detection_seconds") == (2, 1.25)
    assert histogram(samples, "scope_trio_media_recovery_seconds") == (2, 2.5)
    # A resume is the outage's first reconnect attempt (see SessionSupervisor.resume).
    assert value(samples, "scope_trio_media_reconnect_attempts_total") == 2
    assert outcomes(samples) == {"succeeded": 2, "failed": 0, "aborted": 0}
    assert value(samples, "scope_trio_media_sessions_lost_total") == 1, "not the link's"
    assert value(samples, "scope_trio_media_sessions_started_total") == 3


# ------------------------------------------------------------------ the real server


async def wait_status(
    http: httpx.AsyncClient, check: Any, path: str = "/api/v1/cloud/stats"
) -> dict[str, Any]:
    """Poll the server's status (it lives in the server; HTTP is how a client sees it)."""
    with trio.fail_after(30):
        while True:
            status: dict[str, Any] = (await http.get(path)).json()
            if check(status):
                return status
            await trio.sleep(0.05)


def cloud_frames_flow(status: dict[str, Any], after: dict[str, Any] | None = None) -> bool:
    """Connected, and frames from the cloud arrive (more than at ``after``)."""
    seen = after["stats"]["frames_received_from_cloud"] if after is not None else 0
    stats = status["stats"]
    return bool(status["webrtc_connected"] and stats and stats["frames_received_from_cloud"] > seen)


def cloud_session(status: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = status["webrtc_stats"]["cloud_session"]
    return result


async def test_a_real_server_scraped_after_a_real_loss_recovery_and_relink() -> None:
    async with running_devcloud(pipeline="passthrough") as cloud_url:
        config = ServerConfig(
            port=0, debug_endpoints=True, cloud=CloudSettings(ws_url=ws_url(cloud_url))
        )
        stop = trio.Event()
        async with rtc.open_loop(), trio.open_nursery() as nursery:
            url = await nursery.start(partial(serve, config, shutdown_trigger=stop.wait))
            async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                scraped = await http.get("/metrics")
                assert scraped.status_code == 200
                assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
                before = parse(scraped.text)
                assert value(before, "scope_trio_cloud_link_connected") == 0
                assert value(before, "scope_trio_browser_sessions_open") == 0

                await http.post("/api/v1/cloud/connect")
                first = await wait_status(http, lambda s: s["connected"])
                async with http_browser(http) as browser:
                    with trio.fail_after(20):
                        await browser.next_frame()
                    streaming = await wait_status(http, cloud_frames_flow)
                    lost = await http.post("/api/v1/cloud/debug/disconnect-webrtc")
                    assert lost.status_code == 200, lost.text
                    recovered_status = await wait_status(
                        http,
                        lambda s: (
                            cloud_session(s)["sessions_started"] == 2
                            and cloud_frames_flow(s, after=streaming)
                        ),
                    )
                    # The track or the connection state may tell first; the status says which.
                    text = cloud_session(recovered_status)["last_loss_reason"]
                    reason = {
                        "peer connection closed": "peer_connection_closed",
                        "cloud video track ended": "track_ended",
                    }[text]
                    assert reason in ("peer_connection_closed", "track_ended")
                    with trio.fail_after(20):
                        await browser.next_frame()  # the same browser track, frames again
                    samples = parse((await http.get("/metrics")).text)

                    assert losses(samples) == {r: 1 if r == reason else 0 for r in LOSS_REASONS}
                    assert value(samples, "scope_trio_media_reconnect_attempts_total") == 1
                    assert (
                        value(
                            samples,
                            "scope_trio_media_reconnect_attempt_outcomes_total",
                            outcome="succeeded",
                        )
                        == 1
                    )
                    count, detected = histogram(samples, "scope_trio_media_loss_detection_seconds")
                    # Frames were flowing: a gap of 2 s would have been a stall loss instead.
                    assert count == 1
                    assert 0 <= detected < 2.0
                    count, recovered = histogram(samples, "scope_trio_media_recovery_seconds")
                    # The first attempt starts at once (the default policy); at most the 10 s
                    # attempt deadline.
                    assert count == 1
                    assert 0 < recovered <= 10.5
                    assert value(samples, "scope_trio_media_sessions_started_total") == 2
                    assert value(samples, "scope_trio_media_sessions_lost_total") == 1
                    assert value(samples, "scope_trio_media_connected") == 1
                    assert value(samples, "scope_trio_media_phase", phase="connected") == 1
                    assert value(samples, "scope_trio_media_offers_sent_total") == 2
                    assert value(samples, "scope_trio_media_offers_answered_total") == 2
                    assert value(samples, "scope_trio_cloud_link_connected") == 1
                    assert value(samples, "scope_trio_cloud_links_established_total") == 1
                    assert value(samples, "scope_trio_cloud_link_reestablishments_total") == 0
                    assert (
                        value(
                            samples,
                            "scope_trio_cloud_link_info",
                            connection_id=first["connection_id"],
                        )
                        == 1
                    )
                    assert value(samples, "scope_trio_cloud_link_requests_total", type="offer") == 2
                    assert (
                        value(samples, "scope_trio_cloud_link_request_failures_total", type="offer")
                        == 0
                    )
                    assert value(samples, "scope_trio_browser_sessions_open") == 1
                    assert value(samples, "scope_trio_browser_sessions_total") == 1
                    to_cloud = value(
                        samples, "scope_trio_frames_relayed_total", direction="browser_to_cloud"
                    )
                    to_browser = value(
                        samples, "scope_trio_frames_relayed_total", direction="cloud_to_browser"
                    )
                    received = value(samples, "scope_trio_cloud_frames_received_total")
                    assert to_cloud > 0
                    assert 0 < to_browser <= received

                    # The signaling link drops; the manager re-establishes it and the media
                    # session resumes on the new link.
                    await fault(cloud_url, "drop_ws")
                    relinked = await wait_status(
                        http,
                        lambda s: (
                            s["connected"]
                            and s["connection_id"] != first["connection_id"]
                            and s["webrtc_connected"]
                        ),
                    )
                    samples = parse((await http.get("/metrics")).text)
                    assert value(samples, "scope_trio_cloud_link_losses_total") == 1
                    assert value(samples, "scope_trio_cloud_link_reestablishments_total") == 1
                    assert value(samples, "scope_trio_cloud_links_established_total") == 2
                    assert (
                        value(
                            samples,
                            "scope_trio_cloud_link_info",
                            connection_id=relinked["connection_id"],
                        )
                        == 1
                    )
                    assert (
                        "scope_trio_cloud_link_info",
                        frozenset({("connection_id", first["connection_id"])}),
                    ) not in samples
                    # Seen by the media session or by the link first: one loss either way.
                    assert sum(losses(samples).values()) == 2
                    assert histogram(samples, "scope_trio_media_recovery_seconds")[0] == 2

                response = await http.delete(f"/api/v1/webrtc/offer/{browser.session_id}")
                assert response.status_code in (204, 404)  # closed already when it left
                await wait_status(http, lambda s: not s["webrtc_stats"]["sessions"])
                samples = parse((await http.get("/metrics")).text)
                assert value(samples, "scope_trio_browser_sessions_open") == 0
                assert value(samples, "scope_trio_browser_sessions_total") == 1, "kept on close"
                assert (
                    value(samples, "scope_trio_frames_relayed_total", direction="browser_to_cloud")
                    >= to_cloud
                )
            stop.set()


async def test_metrics_is_documented_and_404_without_metrics() -> None:
    """``create_app`` without metrics (embedders, other tests) answers 404 like a disabled
    route, and the route is in the OpenAPI document either way."""
    responses = openapi_document()["paths"]["/metrics"]["get"]["responses"]
    assert "text/plain" in responses["200"]["content"]
    assert "404" in responses
    async with CloudManager.open(CloudSettings()) as manager, Relay.open(manager) as relay:
        app = create_app(manager, relay, debug_endpoints=False)
        response = await app.test_client().get("/metrics")
        assert response.status_code == 404
        assert await response.get_json() == {"detail": "Not found"}
