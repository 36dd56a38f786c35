"""The cloud connection: one signaling link, one media supervisor, one truthful status.

Imports flow one way: the HTTP layer → :class:`CloudManager` → :class:`SessionSupervisor` →
:class:`CloudMediaSession` → :mod:`scope_trio.rtc`; the manager also owns the signaling link
(:func:`scope_trio.cloud.link.connect_cloud_link`). Nothing here imports the HTTP layer.

Its place in the supervision tree (``docs/architecture.md``): :meth:`CloudManager.open`
owns the nursery of the link keeper, the status forwarder and the supervisor's runs.

Beyond Scope: when an established link drops without us asking, it is re-established
(``LinkPolicy``), the last pipeline load is replayed and the media session resumes with its
last parameters; meanwhile ``connecting`` is true. An intentional disconnect never
reconnects, and neither does a close the cloud meant as final (``ACCESS_DENIED``,
``MAX_DURATION_EXCEEDED``, close code 4003).

One concern, a little over 500 lines: the link keeper, re-links, pipeline-load replay and
the CloudStatus they derive share one state and one lock. The pieces that stand alone live
beside it (``settings``, ``status``, ``media_handle``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import trio
from av import VideoFrame

from scope_trio.cloud.link import (
    CloudConnectError,
    CloudLink,
    CloudLinkError,
    LinkConfig,
    connect_cloud_link,
)
from scope_trio.cloud.media import CloudMediaSession, MediaConfig, MediaStats, VideoInput
from scope_trio.cloud.media_handle import MediaHandle
from scope_trio.cloud.settings import CloudSettings, LinkPolicy
from scope_trio.cloud.status import CloudStats, CloudStatus
from scope_trio.core.retry import RestartTracker
from scope_trio.core.service import open_service
from scope_trio.core.session import Loss, MediaSession, SessionAttempt, SessionClosedError
from scope_trio.core.supervisor import (
    ReconnectPolicy,
    SessionSupervisor,
    SupervisorError,
)
from scope_trio.ops import logs

__all__ = [
    "ApiReply",
    "CloudManager",
    "CloudSettings",
    "LinkPolicy",
    "LinkState",
    "MediaHandle",
    "NotConnectedError",
]

logger = logging.getLogger(__name__)

PIPELINE_LOAD_PATH = "/api/v1/pipeline/load"
FINAL_ERROR_CODES = frozenset({"ACCESS_DENIED", "MAX_DURATION_EXCEEDED"})
CLOSE_ACCESS_DENIED = 4003
STAGE_RECONNECTING = "Reconnecting to cloud..."


class NotConnectedError(Exception):
    """The operation needs an established cloud link."""


@dataclass(frozen=True)
class LinkState:
    """The link half of the status: an immutable snapshot, replaced whole on every change."""

    connected: bool = False
    connecting: bool = False
    error: str | None = None
    connect_stage: str | None = None
    app_id: str | None = None
    connection_id: str | None = None
    last_close_code: int | None = None
    last_close_reason: str | None = None
    links_established: int = 0
    """Links that came up, over the manager's life (first connects and re-links)."""
    links_reestablished: int = 0
    """Of those, links re-established after one dropped by itself."""
    links_lost: int = 0
    """Links that ended without being asked to (each followed by a re-link or an error)."""


class _NoLinkSession:
    """What the supervisor gets when it asks for a session while the link is down."""

    async def run(
        self,
        attempt: SessionAttempt,
        *,
        task_status: trio.TaskStatus[None],
    ) -> Loss:
        await trio.lowlevel.checkpoint()
        raise NotConnectedError("the cloud link is down")

    def send_parameters(self, update: Mapping[str, Any]) -> None:
        raise SessionClosedError("the cloud link is down")


class CloudManager:
    """Owns the cloud link and the media supervisor, and derives CloudStatus from both.

    Open it with ``async with CloudManager.open(settings) as manager``: :meth:`open` owns the
    nursery every task of the manager runs in (the link keeper, the media supervisor's runs,
    the status forwarder) and, on leaving the block, disconnects (shielded, bounded) and
    cancels whatever is left. Call from trio tasks of that run only.
    """

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: CloudSettings | None = None,
        *,
        policy: ReconnectPolicy | None = None,
        link_policy: LinkPolicy | None = None,
        media_config: MediaConfig | None = None,
        link_options: Mapping[str, Any] | None = None,
        close_timeout: float = 15.0,
    ) -> AsyncIterator[CloudManager]:
        """The manager for the block; when the block ends it has disconnected (shielded,
        bounded) and every task it started has ended."""

        def build(nursery: trio.Nursery) -> CloudManager:
            return cls(
                nursery,
                settings,
                policy=policy,
                link_policy=link_policy,
                media_config=media_config,
                link_options=link_options,
            )

        async with open_service(
            build,
            CloudManager.disconnect,
            close_timeout=close_timeout,
            what="the cloud connection",
            start=lambda manager: manager._forward_media_changes,  # before anything changes
        ) as manager:
            yield manager

    def __init__(
        self,
        nursery: trio.Nursery,
        settings: CloudSettings | None = None,
        *,
        policy: ReconnectPolicy | None = None,
        link_policy: LinkPolicy | None = None,
        media_config: MediaConfig | None = None,
        link_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._nursery = nursery
        self.settings = settings or CloudSettings()
        self.link_policy = link_policy or LinkPolicy()
        self._media_config = media_config or MediaConfig()
        self._link_options = dict(link_options or {})
        self.supervisor = SessionSupervisor(nursery, self._new_session, policy)
        self.media_stats = MediaStats()
        self._offers_base = (0, 0)
        """The offer counters at the last successful connect (the status counts from it)."""
        self._link: CloudLink | None = None
        self._link_scope: trio.CancelScope | None = None
        self._link_done: trio.Event | None = None
        self._user_id: str | None = None
        self._last_load: dict[str, Any] | None = None
        self._idle_input = VideoInput()  # what a session feeds the cloud with no owner
        self._media: MediaHandle | None = None
        """The owner of the cloud media session (the relay's current browser session)."""
        self.last_frame_at: float | None = None
        """``trio.current_time()`` of the last frame any cloud media session delivered."""
        self._state = LinkState()
        self._version = 0
        self._changed = trio.Event()
        self._lock = trio.Lock()  # serialises connect/disconnect

    # ------------------------------------------------------------------ status

    @property
    def version(self) -> int:
        """Increases with every change of :meth:`status`."""
        return self._version

    async def wait_change(self, seen: int) -> int:
        """Return once :attr:`version` is past ``seen``; returns the new version."""
        while self._version == seen:
            await self._changed.wait()
        return self._version

    async def wait_until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait for the first CloudStatus, the current one included, satisfying ``predicate``.

        Change-driven (no polling); callers put a deadline around it.
        """
        while True:
            seen = self._version
            status = self.status()
            if predicate(status):
                return status
            await self.wait_change(seen)

    @property
    def link(self) -> CloudLink | None:
        return self._link

    @property
    def link_state(self) -> LinkState:
        """The link half of the status, one immutable snapshot (for metrics)."""
        return self._state

    def status(self) -> dict[str, Any]:
        """CloudStatus as a JSON object (see :class:`~scope_trio.cloud.status.CloudStatus`)."""
        return self.cloud_status().as_dict()

    def cloud_status(self) -> CloudStatus:
        """CloudStatus, from the two snapshots that own the state."""
        link, media = self._state, self.supervisor.status
        return CloudStatus(
            connected=link.connected,
            connecting=link.connecting,
            error=link.error or media.webrtc_error,
            connect_stage=link.connect_stage,
            webrtc_connected=media.webrtc_connected,
            webrtc_error=media.webrtc_error,
            webrtc_reconnecting=media.webrtc_reconnecting,
            app_id=link.app_id if link.connected else None,
            connection_id=link.connection_id if link.connected else None,
            credentials_configured=self.settings.credentials_configured,
            last_close_code=link.last_close_code,
            last_close_reason=link.last_close_reason,
            stats=self._stats() if link.connected else None,
            webrtc_reconnect_attempt=media.attempt,
            webrtc_reconnect_max_attempts=media.max_attempts,
        )

    def _stats(self) -> CloudStats | None:
        cloud = self._link
        if cloud is None:
            return None
        sent, ok = cloud.stats.sent, cloud.stats.successful
        return CloudStats(
            uptime_seconds=round(cloud.uptime, 3),
            webrtc_offers_sent=self.media_stats.offers_sent - self._offers_base[0],
            webrtc_offers_successful=self.media_stats.offers_successful - self._offers_base[1],
            webrtc_ice_candidates_sent=sent["icecandidate"],
            api_requests_sent=sent["api"],
            api_requests_successful=ok["api"],
            frames_sent_to_cloud=self.media_stats.frames_sent_to_cloud,
            frames_received_from_cloud=self.media_stats.frames_received_from_cloud,
        )

    def _set(self, **changes: Any) -> None:
        self._state = replace(self._state, **changes)
        self._touch()

    def _touch(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _forward_media_changes(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self.supervisor.watch() as changes:
            task_status.started()
            async for _ in changes:
                self._touch()

    # ------------------------------------------------------------------ link

    async def connect(
        self, *, app_id: str | None = None, api_key: str | None = None, user_id: str | None = None
    ) -> dict[str, Any]:
        """Start connecting in the background and return the status at once (connecting).

        Raises ``ValueError`` when neither an app id nor a signaling URL is configured.
        A link that is up or connecting is replaced.
        """
        config = LinkConfig(
            app_id=app_id or self.settings.app_id,
            api_key=api_key or self.settings.api_key,
            ws_url=self.settings.ws_url,
            user_id=user_id,
            **self._link_options,
        )
        async with self._lock:
            await self._teardown()
            self._user_id = user_id
            scope, done = trio.CancelScope(), trio.Event()
            self._link_scope, self._link_done = scope, done
            self._set(
                connected=False,
                connecting=True,
                error=None,
                connect_stage="Connecting to cloud...",
                app_id=config.app_id,
            )
            self._nursery.start_soon(self._maintain_link, config, scope, done)
        return self.status()

    async def disconnect(self) -> dict[str, Any]:
        """Tear everything down and return the status; returns only when all is closed."""
        async with self._lock:
            await self._teardown()
        return self.status()

    async def _teardown(self) -> None:
        await self.supervisor.stop()
        scope, done = self._link_scope, self._link_done
        if scope is not None and done is not None:
            scope.cancel()
            with trio.move_on_after(10, shield=True):
                await done.wait()
        self._link_scope = self._link_done = None
        self._link = None
        self._last_load = None
        self._set(
            connected=False,
            connecting=False,
            error=None,
            connect_stage=None,
            app_id=None,
            connection_id=None,
        )

    async def _maintain_link(
        self, config: LinkConfig, scope: trio.CancelScope, done: trio.Event
    ) -> None:
        relinks = self.link_policy.intensity.tracker()
        established = False
        try:
            with scope:
                while True:
                    try:
                        link = await self._hold_link(config, scope, relink=established)
                    except CloudConnectError as exc:
                        self._link_failed(scope, exc, established)
                        return
                    established = True
                    if not await self._link_ended(scope, link, relinks):
                        return
                    logs.bind_connection(None)  # the next link gets its own id
                    await trio.sleep(self.link_policy.backoff.delay(1))
        finally:
            if self._link_scope is scope:
                self._link = None
            done.set()

    async def _hold_link(
        self, config: LinkConfig, scope: trio.CancelScope, *, relink: bool
    ) -> CloudLink:
        """Establish the link and keep it until it ends by itself; return it (closed)."""
        async with connect_cloud_link(
            config, on_stage=functools.partial(self._stage, scope)
        ) as link:
            if self._link_scope is not scope:  # pragma: no cover - replaced meanwhile
                return link
            self._link = link
            # Scope's signalling counters count from each successful connect (the link's own
            # counters are per link already); the frame counters never reset.
            self._offers_base = (self.media_stats.offers_sent, self.media_stats.offers_successful)
            state = self._state
            self._set(
                connected=True,
                connecting=False,
                error=None,
                connect_stage=None,
                connection_id=link.connection_id,
                links_established=state.links_established + 1,
                links_reestablished=state.links_reestablished + int(relink),
            )
            logs.bind_connection(link.connection_id)  # this task and the ones it starts now
            logger.info("cloud link up (connection_id=%s)", link.connection_id)
            async with trio.open_nursery() as tasks:
                if relink:
                    tasks.start_soon(self._resume_after_relink, link)
                await link.wait_closed()
                tasks.cancel_scope.cancel()
        return link

    def _link_failed(self, scope: trio.CancelScope, exc: CloudConnectError, relink: bool) -> None:
        if self._link_scope is not scope:
            return
        message = str(exc)
        if relink:
            message = f"Cloud connection lost and could not be re-established: {exc}"
        logger.error("%s", message)
        self._link = None
        self._set(connected=False, connecting=False, connect_stage=None, error=message)

    async def _link_ended(
        self, scope: trio.CancelScope, link: CloudLink, relinks: RestartTracker
    ) -> bool:
        """Record an unasked-for end of the link; return whether to re-establish it.

        The decision is made first and shown in one status change, so no reader ever sees
        "not connected, not connecting, no error" in between.
        """
        if self._link_scope is not scope:
            return False
        code, reason = link.close_code, link.close_reason or "closed"
        logger.warning("cloud link ended: code %s, %s", code, reason)
        now = trio.current_time()
        error: str | None = None
        if link.error_code in FINAL_ERROR_CODES or code == CLOSE_ACCESS_DENIED:
            error = f"Cloud connection closed: {reason}"
        elif relinks.exhausted(now):
            error = (
                f"Cloud connection lost ({reason}); gave up after "
                f"{self.link_policy.max_relinks} reconnects within {self.link_policy.window:g} s"
            )
        else:
            relinks.record(now)
        self._link = None
        self._set(
            connected=False,
            connecting=error is None,
            connect_stage=STAGE_RECONNECTING if error is None else None,
            error=error,
            connection_id=None,
            last_close_code=code,
            last_close_reason=reason,
            links_lost=self._state.links_lost + 1,
        )
        await self.supervisor.link_lost(f"code {code}: {reason}")
        return error is None

    async def _resume_after_relink(self, link: CloudLink) -> None:
        """Replay the last pipeline load, then bring the media session back."""
        if self._last_load is not None:
            try:
                await link.request(
                    "api", {"method": "POST", "path": PIPELINE_LOAD_PATH, "body": self._last_load}
                )
            except CloudLinkError as exc:
                logger.warning("replaying the pipeline load failed: %s", exc)
        with contextlib.suppress(SupervisorError):
            await self.supervisor.resume()

    def _stage(self, scope: trio.CancelScope, stage: str) -> None:
        if self._link_scope is scope and not self._state.connected:
            self._set(connect_stage=stage)

    # ----------------------------------------------------------------- media

    def _new_session(self) -> MediaSession:
        link = self._link
        if link is None:
            return _NoLinkSession()
        return CloudMediaSession(
            link,
            video_input=self._media.video_input if self._media else self._idle_input,
            on_frame=self._deliver,
            config=self._media_config,
            stats=self.media_stats,
            user_id=self._user_id,
        )

    def _deliver(self, frame: VideoFrame) -> None:
        self.last_frame_at = trio.current_time()
        if self._media is not None and self._media.on_frame is not None:
            self._media.on_frame(frame)

    def begin_media(
        self,
        params: Mapping[str, Any],
        *,
        video_input: VideoInput | None = None,
        on_frame: Callable[[VideoFrame], object] | None = None,
    ) -> MediaHandle:
        """Take over the cloud media session for a new owner, synchronously; see
        :class:`MediaHandle`. ``params`` are adopted at once (a :class:`Parameters` checked
        at the edge is kept as it is). Raises :class:`NotConnectedError` without a link and
        :class:`~scope_trio.core.params.ParameterError` for bad parameters."""
        if self._link is None:
            raise NotConnectedError("not connected to the cloud")
        pending = self.supervisor.begin(params)
        handle = MediaHandle(self, pending, video_input or VideoInput(), on_frame)
        self._media = handle
        return handle

    async def start_media(
        self,
        params: Mapping[str, Any],
        *,
        video_input: VideoInput | None = None,
        on_frame: Callable[[VideoFrame], object] | None = None,
    ) -> MediaHandle:
        """:meth:`begin_media`, then wait until the session is connected."""
        handle = self.begin_media(params, video_input=video_input, on_frame=on_frame)
        await handle.connected()
        return handle

    async def stop_media(self) -> None:
        """Stop the cloud media session, whoever owns it."""
        self._media = None
        await self.supervisor.stop()

    async def simulate_media_loss(self) -> None:
        """Debug: force-close the cloud peer connection; recovery takes the real-loss path.

        Returns once the loss is seen (bounded by 2 s), so a status read right after it
        already says "reconnecting" rather than a stale "connected". Raises
        :class:`NotConnectedError` when no cloud media session is connected.
        """
        session = self.supervisor.session
        if (
            not isinstance(session, CloudMediaSession)
            or not self.supervisor.status.webrtc_connected
        ):
            raise NotConnectedError("WebRTC not connected")
        session.simulate_loss()
        with trio.move_on_after(2.0):
            await self.supervisor.wait_until(lambda status: not status.webrtc_connected)

    def update_parameters(self, update: Mapping[str, Any]) -> None:
        self.supervisor.update_parameters(update)

    async def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- the link's deadline per request
    ) -> ApiReply:
        """Send one ``api`` request to the cloud; returns its status and the whole reply.

        ``status`` is the reply's HTTP status (200 when it has none; None when it is not a
        valid one). What the reply becomes for an HTTP client is the HTTP layer's business.
        Raises :class:`NotConnectedError` without a link and :class:`CloudLinkError` when
        the request itself fails (link lost, no reply within ``timeout``).
        """
        link = self._link
        if link is None:
            raise NotConnectedError("not connected to the cloud")
        fields: dict[str, Any] = {"method": method, "path": path}
        if body is not None:
            fields["body"] = body
        reply = await link.request("api", fields, timeout=timeout)
        raw = reply.get("status", 200)
        valid = not isinstance(raw, bool) and isinstance(raw, int) and 100 <= raw <= 599
        status = raw if valid else None
        if method.upper() == "POST" and path == PIPELINE_LOAD_PATH and status and status < 400:
            self._last_load = body if isinstance(body, dict) else None
        return ApiReply(status, reply)


class ApiReply(NamedTuple):
    """The cloud's answer to one ``api`` request."""

    status: int | None
    """The HTTP status it carries (200 when absent), None when it carries no valid one."""
    reply: dict[str, Any]
    """The whole ``api_response`` message (``data``, ``error``, binary fields, ...)."""
