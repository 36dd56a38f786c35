"""``MediaHandle``: one owner's hold on the cloud media session (see :class:`MediaHandle`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from av import VideoFrame

from scope_trio.cloud.media import VideoInput
from scope_trio.core.supervisor import PendingStart
from scope_trio.ops import logs

if TYPE_CHECKING:
    from scope_trio.cloud.manager import CloudManager

__all__ = ["MediaHandle"]


class MediaHandle:
    """One owner's hold on the cloud media session, from :meth:`CloudManager.begin_media`.

    The owner (a browser session of the relay) feeds ``video_input``, gets every processed
    frame through ``on_frame`` across reconnects, and sends parameter updates through the
    handle. A later ``begin_media`` supersedes it: from then on its updates and its
    :meth:`stop` do nothing, so an owner that is going away can never touch its
    successor's session. Updates made before the session connects are kept by the
    supervisor (the only place that buffers them) and go out with its offer or right after.
    """

    def __init__(
        self,
        manager: CloudManager,
        pending: PendingStart,
        video_input: VideoInput,
        on_frame: Callable[[VideoFrame], object] | None,
    ) -> None:
        self._manager = manager
        self._pending = pending
        self.video_input = video_input
        self.on_frame = on_frame

    @property
    def current(self) -> bool:
        """Still the owner: no later ``begin_media`` or ``stop_media`` took over."""
        return self._manager._media is self

    async def connected(self) -> None:
        """Returns once the session is connected; raises the supervisor's errors."""
        link = self._manager.link
        # The run the supervisor starts here logs for this link, and for no one session.
        with logs.bound(connection_id=link.connection_id or "" if link else "", session_id=""):
            await self._pending.connected()

    def update_parameters(self, update: Mapping[str, Any]) -> bool:
        """Merge ``update`` into the session's parameters; False (nothing done) once
        superseded. Raises :class:`~scope_trio.core.params.ParameterError`."""
        if not self.current:
            return False
        self._manager.supervisor.update_parameters(update)
        return True

    async def stop(self) -> None:
        """Stop the session if this handle still owns it (shielded and bounded)."""
        if self.current:
            await self._manager.stop_media()
