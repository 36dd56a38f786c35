"""A browser relay that does nothing: for tests whose subject is not the relay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import trio


class NoRelay:
    """Implements ``BrowserRelay``: no sessions, refuses offers, knows no session ids."""

    async def offer(
        self,
        sdp: str,
        sdp_type: str,
        initial_parameters: Mapping[str, Any] | None = None,
        *,
        user_id: str | None = None,
    ) -> dict[str, str]:
        raise NotImplementedError

    async def add_candidates(
        self, session_id: str, candidates: Sequence[Mapping[str, Any]]
    ) -> None:
        raise KeyError(session_id)

    async def close(self, session_id: str) -> None:
        raise KeyError(session_id)

    async def close_all(self) -> None:
        await trio.lowlevel.checkpoint()

    def sessions(self) -> dict[str, dict[str, Any]]:
        return {}
