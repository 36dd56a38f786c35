"""Prometheus metrics of one server, for ``GET /metrics`` (text exposition format 0.0.4).

Each server owns its :class:`prometheus_client.CollectorRegistry` (never the process-global
default one), so many servers can run in one process, as the tests do.

Where every number comes from (one place owns each piece of state, and a metric is
derived from that owner, never a second copy kept in sync by hand):

* **State, read at scrape time** by collectors: the supervisor's
  :class:`~scope_trio.core.supervisor.SupervisorStatus` (phase, sessions started and lost), the
  manager's link state (connected, connecting, links established, re-established, lost),
  the current link's :class:`~scope_trio.cloud.link.LinkStats` (requests by type),
  :class:`~scope_trio.cloud.media.MediaStats` (offers, frames to and from the cloud) and the
  relay's counters (browser sessions, frames relayed). A scrape shows exactly what the
  status API would show at that instant.
* **Events, subscribed**: reconnect attempts and their outcomes, give-ups, losses by kind,
  and the detection and recovery durations exist in no state. :class:`MediaMetrics`
  subscribes to the supervisor's typed events (:mod:`scope_trio.core.events`), delivered
  synchronously at the instant the supervisor decides them, each with its trio time, so
  nothing is missed, nothing is re-derived from text, and durations are exact. A loss's
  label is its :class:`~scope_trio.core.session.LossKind`; a give-up's is the supervisor's
  own :class:`~scope_trio.core.events.GiveUpReason`.
* **Why the link counts its own events** instead of being watched: the manager's change
  notification coalesces (``wait_change`` answers with the newest version), so a drop and
  re-link between two reads would be invisible. The manager owns the link, so it counts
  links established, re-established and lost in its :class:`~scope_trio.cloud.LinkState`
  snapshot, where the collector reads them.
* **Detection** is measured from the last frame the cloud delivered (recorded by the
  manager's frame callback, ``CloudManager.last_frame_at``) — or the session's connect, if
  it delivered none — to the status change that reported the loss. The observer reads the
  frame time when it handles the loss; the next session cannot deliver a frame before its
  backoff (>= ``base_delay``) has passed, so the read is of the lost session's last frame.

Events counted by :class:`MediaMetrics`:

==============================  ==============================================================
``AttemptStarted``              a reconnect attempt (a resume after a re-link is one too)
``AttemptEnded``                its outcome: ``succeeded``, ``failed``, or ``aborted`` (a stop,
                                a new start, the link lost)
``GaveUp``                      ``budget_spent``, ``restart_intensity`` or ``internal_error``
``StartFailed``                 the first connect of a start failed
``Lost``                        a loss, by kind (``link_lost`` when the link went down under a
                                connected session); its detection duration
``Recovered``                   recovery duration (loss reported → next session connected);
                                an outage that ends in IDLE or FAILED has none
==============================  ==============================================================

Sessions a stop abandoned (``sessions_abandoned``) are state, read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

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
from scope_trio.core.session import LossKind
from scope_trio.core.supervisor import Phase, SessionSupervisor

if TYPE_CHECKING:
    from scope_trio.cloud.manager import CloudManager
    from scope_trio.relay.relay import Relay

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "LOSS_REASONS",
    "MediaMetrics",
    "ServerMetrics",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""What ``GET /metrics`` answers with (the classic Prometheus text format)."""

DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75,
    1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
)  # fmt: skip
"""Seconds: a closed peer connection is seen in ms, a silent path in ~1.05 s, a recovery
takes the backoff (1, 2, 4 s) plus a reconnect; up to a link's heartbeat (15 s) and beyond."""

LOSS_REASONS = tuple(kind.value for kind in LossKind)
"""Every value the ``reason`` label of ``scope_trio_media_losses_total`` can take."""

ATTEMPT_OUTCOMES = ("succeeded", "failed", "aborted")
GIVE_UP_REASONS = tuple(reason.value for reason in GiveUpReason)
FRAME_DIRECTIONS = ("browser_to_cloud", "cloud_to_browser")
CATCH_UP_TIMEOUT = 1.0
"""Bound on a scrape waiting for the observer to count the latest changes."""


class MediaMetrics:
    """The supervisor's metrics: its state at scrape time, and the events of its status stream.

    Register it with a registry, run :meth:`run` in a nursery for as long as the registry is
    scraped, and ``await`` :meth:`caught_up` before each scrape (``ServerMetrics`` does).
    ``last_frame_at`` tells the trio time of the last frame from the cloud (None: never).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        supervisor: SessionSupervisor,
        *,
        last_frame_at: Callable[[], float | None] = lambda: None,
    ) -> None:
        self._supervisor = supervisor
        self._last_frame_at = last_frame_at
        self.attempts = Counter(
            "scope_trio_media_reconnect_attempts",
            "Reconnect attempts started after a cloud media session was lost",
            registry=registry,
        )
        self.outcomes = Counter(
            "scope_trio_media_reconnect_attempt_outcomes",
            "Reconnect attempts that ended, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.give_ups = Counter(
            "scope_trio_media_reconnect_give_ups",
            "Outages given up (final webrtc_error), by reason",
            ["reason"],
            registry=registry,
        )
        self.start_failures = Counter(
            "scope_trio_media_start_failures",
            "First connects of a start that failed (no reconnect follows)",
            registry=registry,
        )
        self.losses = Counter(
            "scope_trio_media_losses",
            "Connected cloud media sessions lost, by classified reason",
            ["reason"],
            registry=registry,
        )
        self.detection = Histogram(
            "scope_trio_media_loss_detection_seconds",
            "From the last frame received from the cloud to the loss being reported",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.recovery = Histogram(
            "scope_trio_media_recovery_seconds",
            "From a loss being reported to the next cloud media session connected",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        for values, metric in (
            (ATTEMPT_OUTCOMES, self.outcomes),
            (GIVE_UP_REASONS, self.give_ups),
            (LOSS_REASONS, self.losses),
        ):
            for value in values:
                metric.labels(value)  # every series exists from the start, at 0
        registry.register(_SupervisorCollector(supervisor))
        self._running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Count the supervisor's events until cancelled; started once subscribed."""
        unsubscribe = self._supervisor.subscribe(self._observe_safely)
        self._running = True
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._running = False
            unsubscribe()

    async def caught_up(self) -> None:
        """Events are counted as they happen, so a scrape never waits: one checkpoint."""
        await trio.lowlevel.checkpoint()

    def _observe_safely(self, event: SupervisorEvent) -> None:
        try:
            self.observe(event)
        except Exception:  # a metrics bug must never take the server down
            logger.exception("metrics: counting %r failed", event)

    def observe(self, event: SupervisorEvent) -> None:
        """Count one supervisor event (called synchronously, in order)."""
        if isinstance(event, AttemptStarted):
            self.attempts.inc()
        elif isinstance(event, AttemptEnded):
            self.outcomes.labels(event.outcome).inc()  # attempts = outcomes + the one under way
        elif isinstance(event, GaveUp):
            self.give_ups.labels(event.reason.value).inc()
        elif isinstance(event, StartFailed):
            self.start_failures.inc()
        elif isinstance(event, Lost):
            self.losses.labels(event.loss.kind.value).inc()
            last_frame = self._last_frame_at()
            since = (
                event.connected_at if last_frame is None else max(last_frame, event.connected_at)
            )
            self.detection.observe(max(0.0, event.at - since))
        elif isinstance(event, Recovered):
            self.recovery.observe(event.outage)


class _SupervisorCollector:
    """The supervisor's state, read at scrape time from its one status snapshot."""

    def __init__(self, supervisor: SessionSupervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        status = self._supervisor.status
        yield _gauge(
            "scope_trio_media_connected",
            "1 while a cloud media session is connected (webrtc_connected)",
            status.webrtc_connected,
        )
        yield _gauge(
            "scope_trio_media_reconnecting",
            "1 while a reconnect is in progress (webrtc_reconnecting)",
            status.webrtc_reconnecting,
        )
        phase = GaugeMetricFamily(
            "scope_trio_media_phase",
            "The supervisor's phase: 1 for the current one",
            labels=["phase"],
        )
        for each in Phase:
            phase.add_metric([each.value], 1.0 if each is status.phase else 0.0)
        yield phase
        yield _gauge(
            "scope_trio_media_reconnect_budget_used",
            "Reconnect attempts used from the current budget (it refills after a stable session)",
            status.attempt,
        )
        yield _counter(
            "scope_trio_media_sessions_started",
            "Cloud media sessions that connected (first connects and reconnects)",
            status.sessions_started,
        )
        yield _counter(
            "scope_trio_media_sessions_lost",
            "Connected cloud media sessions lost, seen by the session itself (losses other "
            "than link_lost)",
            status.sessions_lost,
        )
        yield _counter(
            "scope_trio_media_sessions_abandoned",
            "Cloud media sessions a stop stopped waiting for (each still reaped in the "
            "background; see SessionSupervisor.stop)",
            status.sessions_abandoned,
        )


class _CloudCollector:
    """The manager's link and media counters and the relay's, read at scrape time."""

    def __init__(self, manager: CloudManager, relay: Relay | None) -> None:
        self._manager = manager
        self._relay = relay

    def collect(self) -> Iterator[Metric]:
        yield from self._link()
        stats = self._manager.media_stats
        yield _counter(
            "scope_trio_media_offers_sent", "Offers sent to the cloud", stats.offers_sent
        )
        yield _counter(
            "scope_trio_media_offers_answered",
            "Offers the cloud answered usably",
            stats.offers_successful,
        )
        yield _counter(
            "scope_trio_cloud_frames_received",
            "Video frames received from the cloud",
            stats.frames_received_from_cloud,
        )
        yield _counter(
            "scope_trio_cloud_frames_sent",
            "Video frames sent to the cloud (counted as each cloud media session closes)",
            stats.frames_sent_to_cloud,
        )
        if self._relay is not None:
            yield from self._browser(self._relay.counters())

    def _link(self) -> Iterator[Metric]:
        manager = self._manager
        state = manager.link_state
        yield _gauge("scope_trio_cloud_link_connected", "1 while the link is up", state.connected)
        yield _gauge(
            "scope_trio_cloud_link_connecting",
            "1 while a link is being established (first connect or re-link)",
            state.connecting,
        )
        yield _counter(
            "scope_trio_cloud_links_established",
            "Signaling links that came up (first connects and re-links)",
            state.links_established,
        )
        yield _counter(
            "scope_trio_cloud_link_reestablishments",
            "Links re-established after one dropped by itself",
            state.links_reestablished,
        )
        yield _counter(
            "scope_trio_cloud_link_losses",
            "Links that ended without being asked to",
            state.links_lost,
        )
        link = manager.link
        up = link is not None and state.connected
        info = GaugeMetricFamily(
            "scope_trio_cloud_link_info",
            "1 for the link that is up, labelled with its connection_id",
            labels=["connection_id"],
        )
        if up and link is not None:
            info.add_metric([link.connection_id or ""], 1.0)
        yield info
        yield _gauge(
            "scope_trio_cloud_link_uptime_seconds",
            "Seconds since the current link came up (0 while down)",
            link.uptime if up and link is not None else 0.0,
        )
        sent = CounterMetricFamily(
            "scope_trio_cloud_link_requests",
            "Requests sent on the current link, by type (restarts at 0 with each new link)",
            labels=["type"],
        )
        failed = CounterMetricFamily(
            "scope_trio_cloud_link_request_failures",
            "Requests on the current link that failed (error, timeout, link closed), by type",
            labels=["type"],
        )
        if up and link is not None:
            for kind in sorted(link.stats.sent):
                sent.add_metric([kind], link.stats.sent[kind])
                failed.add_metric([kind], link.stats.failed[kind])
        yield sent
        yield failed

    def _browser(self, counters: dict[str, int]) -> Iterator[Metric]:
        yield _gauge(
            "scope_trio_browser_sessions_open",
            "Browser sessions open now (not yet closed)",
            counters.get("open", 0),
        )
        yield _counter(
            "scope_trio_browser_sessions",
            "Browser sessions answered, over the server's life",
            counters.get("sessions", 0),
        )
        relayed = CounterMetricFamily(
            "scope_trio_frames_relayed",
            "Video frames relayed: from the browser towards the cloud, from the cloud into "
            "the browser track",
            labels=["direction"],
        )
        relayed.add_metric(["browser_to_cloud"], counters.get("frames_from_browser", 0))
        relayed.add_metric(["cloud_to_browser"], counters.get("frames_from_cloud", 0))
        yield relayed
        filler = CounterMetricFamily(
            "scope_trio_browser_filler_frames",
            "Frames sent to the browser in place of cloud frames: the last good one (held) "
            "or black before the first",
            labels=["kind"],
        )
        filler.add_metric(["held"], counters.get("held_frames", 0))
        filler.add_metric(["black"], counters.get("black_frames", 0))
        yield filler


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))


class ServerMetrics:
    """Everything ``GET /metrics`` shows for one server: its own registry, the supervisor's
    :class:`MediaMetrics`, and the manager's and relay's state.

    Run :meth:`run` in the server's nursery; :meth:`render` is the scrape.
    """

    def __init__(self, manager: CloudManager, relay: Relay | None = None) -> None:
        self.registry = CollectorRegistry()
        self.media = MediaMetrics(
            self.registry, manager.supervisor, last_frame_at=lambda: manager.last_frame_at
        )
        self.registry.register(_CloudCollector(manager, relay))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Observe the supervisor until cancelled (see :meth:`MediaMetrics.run`)."""
        await self.media.run(task_status=task_status)

    async def render(self) -> bytes:
        """The text exposition of every metric, with every change so far counted."""
        await self.media.caught_up()
        return generate_latest(self.registry)
