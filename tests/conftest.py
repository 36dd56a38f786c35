"""Shared fixtures.

``aio_loop`` opens the trio-asyncio loop once for a test: every aiortc object must be
created, and every aiortc coroutine awaited, inside it (see docs/stack-notes.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio_asyncio


@pytest.fixture
async def aio_loop() -> AsyncIterator[object]:
    async with trio_asyncio.open_loop() as loop:
        yield loop
