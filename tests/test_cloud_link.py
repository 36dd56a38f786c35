"""CloudLink against a real WebSocket server on 127.0.0.1 (tests/fake_cloud_ws.py).

Deadlines are short and real (tenths of a second): a mock clock and real sockets do not mix.
"""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from fake_cloud_ws import (
    FakeCloudConnection,
    serve_fake_cloud,
    standard_reply,
)

from scope_trio.cloud import link as cloud_link
from scope_trio.cloud.link import (
    CloudAccessDeniedError,
    CloudConnectError,
    CloudLink,
    CloudLinkClosedError,
    CloudLinkError,
    CloudReadyTimeoutError,
    CloudRequestError,
    CloudRequestTimeoutError,
    LinkConfig,
    cloud_ws_url,
    connect_cloud_link,
)

SENTINEL_KEY = "sk-SENTINEL-never-show-me-7f3a"


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Surface a leaked socket (ResourceWarning, an error here) in the test that leaked it."""
    yield
    gc.collect()


def config(url: str, **overrides: Any) -> LinkConfig:
    values: dict[str, Any] = {
        "ws_url": url,
        "connect_timeout": 2.0,
        "ready_timeout": 2.0,
        "request_timeout": 2.0,
        "ping_interval": None,
        "close_timeout": 1.0,
        "connect_attempts": 1,
        "connect_backoff": (0.01,),
    }
    values.update(overrides)
    return LinkConfig(**values)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition the server side sets (it has no event to wait on), for at most 2 s."""
    with trio.fail_after(2):
        while not condition():  # noqa: ASYNC110 -- polling another task's plain attribute
            await trio.sleep(0.005)


def no_reply_to(*types: str) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    def respond(message: dict[str, Any]) -> dict[str, Any] | None:
        return None if message.get("type") in types else standard_reply(message)

    return respond


# --------------------------------------------------------------------------- URL and config


def test_url_from_app_id_and_verbatim_override() -> None:
    assert cloud_ws_url("user/app", None) == "wss://fal.run/user/app/ws"
    assert cloud_ws_url("/user/app/", None) == "wss://fal.run/user/app/ws"
    assert cloud_ws_url("user/app/ws", None) == "wss://fal.run/user/app/ws"
    assert cloud_ws_url("user/app/ws/", None) == "wss://fal.run/user/app/ws"
    assert cloud_ws_url("user/app", "ws://localhost:9/x?y=1") == "ws://localhost:9/x?y=1"
    assert cloud_ws_url(None, "ws://localhost:9/x") == "ws://localhost:9/x"
    for app_id in (None, "", "/", " / "):
        with pytest.raises(ValueError, match="SCOPE_CLOUD_APP_ID"):
            cloud_ws_url(app_id, None)
        with pytest.raises(ValueError, match="SCOPE_CLOUD_WS_URL"):
            cloud_ws_url(app_id, "")


def test_config_is_validated_and_hides_the_key() -> None:
    with pytest.raises(ValueError, match="app id"):
        LinkConfig()
    with pytest.raises(ValueError, match="ws://"):
        LinkConfig(ws_url="http://example.com/ws")
    with pytest.raises(ValueError, match="connect_attempts"):
        LinkConfig(app_id="a/b", connect_attempts=0)
    cfg = LinkConfig(app_id="a/b", api_key=SENTINEL_KEY)
    assert SENTINEL_KEY not in repr(cfg)
    assert SENTINEL_KEY not in str(cfg)
    assert cfg.url == "wss://fal.run/a/b/ws"
    assert [cfg.backoff_before(n) for n in (1, 2, 3, 4, 5)] == [0.0, 1.0, 2.0, 4.0, 4.0]


# --------------------------------------------------------------------------- establishing


async def test_connects_with_auth_header_and_closes_cleanly() -> None:
    async with serve_fake_cloud() as cloud:
        async with connect_cloud_link(config(cloud.url, api_key="k-123")) as link:
            assert link.connection_id == "conn-1"
            open_inside = not link.closed
        assert open_inside
        assert link.closed
        assert link.close_code == 1000
        assert cloud.connections[0].headers["authorization"] == "Key k-123"
        assert cloud.connections[0].path == "/ws"
        await wait_until(lambda: cloud.connections[0].client_close is not None)
        close = cloud.connections[0].client_close
        assert close is not None
        assert close.code == 1000

        async with connect_cloud_link(config(cloud.url)):
            pass
        assert "authorization" not in cloud.connections[1].headers


async def test_ready_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cloud_link, "STAGE_TICK_SECONDS", 0.05)

    async def never_ready(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await trio.sleep_forever()

    stages: list[str] = []
    async with serve_fake_cloud(never_ready) as cloud:
        start = trio.current_time()
        with pytest.raises(CloudReadyTimeoutError, match=r"'ready' within 0\.3 s") as info:
            async with connect_cloud_link(
                config(cloud.url, ready_timeout=0.3), on_stage=stages.append
            ):
                pytest.fail("connected without ready")
        elapsed = trio.current_time() - start
    assert 0.3 <= elapsed < 1.0
    assert info.value.retryable
    assert stages[0] == "Connecting to cloud..."
    assert set(stages[1:]) == {"Starting cloud server... (0s)"}
    assert len(stages) >= 5  # refreshed every tick


async def test_starting_stage_counts_seconds() -> None:
    async def slow_start(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await trio.sleep(1.1)
        await healthy_cloud_after_accept(conn)

    stages: list[str] = []
    async with (
        serve_fake_cloud(slow_start) as cloud,
        connect_cloud_link(config(cloud.url), on_stage=stages.append) as link,
    ):
        assert link.connection_id == "conn-1"
    assert stages == [
        "Connecting to cloud...",
        "Starting cloud server... (0s)",
        "Starting cloud server... (1s)",
    ]


async def healthy_cloud_after_accept(conn: FakeCloudConnection) -> None:
    await conn.send_ready()
    await conn.serve(standard_reply)


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        ('{"type": "hello", "x": 1}', r"expected 'ready' from the cloud, got 'hello'"),
        ("not json at all", r"got 'not json at all'"),
        (b"\x00\x01", r"got a binary frame \(2 bytes\)"),
        ('{"type": "error", "error": "boom", "code": "X"}', r"got an error: boom \(X\)"),
    ],
)
async def test_first_message_must_be_ready(first: str | bytes, expected: str) -> None:
    async def rude(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_raw(first)
        await conn.serve(standard_reply)

    async with serve_fake_cloud(rude) as cloud:
        with pytest.raises(CloudConnectError, match=expected):
            async with connect_cloud_link(config(cloud.url)):
                pytest.fail("connected without ready")


async def test_set_user_id() -> None:
    async with (
        serve_fake_cloud() as cloud,
        connect_cloud_link(config(cloud.url, user_id="user-7")) as link,
    ):
        await link.request("ping")
    assert cloud.connections[0].received[0] == {"type": "set_user_id", "user_id": "user-7"}


async def test_access_denied_is_clear_carries_4003_and_is_not_retried() -> None:
    async def deny(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        message = await conn.receive()
        assert message["type"] == "set_user_id"
        await conn.send({"type": "error", "error": "Access denied", "code": "ACCESS_DENIED"})
        await conn.close(4003, "forbidden")

    stages: list[str] = []
    async with serve_fake_cloud(deny) as cloud:
        start = trio.current_time()
        with pytest.raises(CloudAccessDeniedError, match="Access denied") as info:
            async with connect_cloud_link(
                config(cloud.url, user_id="intruder", connect_attempts=3),
                on_stage=stages.append,
            ):
                pytest.fail("connected despite ACCESS_DENIED")
        assert trio.current_time() - start < 0.5
    assert len(cloud.connections) == 1
    assert not info.value.retryable
    assert info.value.close_code == 4003
    # The error message came before the close: its text is the better reason.
    assert info.value.close_reason == "Access denied (ACCESS_DENIED)"
    assert not any(stage.startswith("Retrying") for stage in stages)


async def test_access_denied_instead_of_ready() -> None:
    async def deny(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send({"type": "error", "error": "Bad key", "code": "ACCESS_DENIED"})
        await conn.close(4003, "forbidden")

    async with serve_fake_cloud(deny) as cloud:
        with pytest.raises(CloudAccessDeniedError, match="Bad key") as info:
            async with connect_cloud_link(config(cloud.url, connect_attempts=3)):
                pytest.fail("connected despite ACCESS_DENIED")
    assert len(cloud.connections) == 1
    assert info.value.close_code == 4003


@pytest.mark.parametrize(
    ("status", "error_type", "tries"),
    [(403, CloudAccessDeniedError, 1), (503, CloudConnectError, 2)],
)
async def test_http_rejection(status: int, error_type: type[CloudConnectError], tries: int) -> None:
    async def reject(conn: FakeCloudConnection) -> None:
        await conn.reject(status)

    async with serve_fake_cloud(reject) as cloud:
        with pytest.raises(error_type, match=f"HTTP {status}"):
            async with connect_cloud_link(config(cloud.url, connect_attempts=2)):
                pytest.fail("connected despite rejection")
    assert len(cloud.connections) == tries


async def test_connect_retries_refused_port_with_stages() -> None:
    stages: list[str] = []
    url = f"ws://127.0.0.1:{unused_port()}/ws"
    start = trio.current_time()
    with pytest.raises(CloudConnectError, match=r"could not connect to ws://127\.0\.0\.1") as info:
        async with connect_cloud_link(
            config(url, connect_attempts=3, connect_backoff=(0.05, 0.1)), on_stage=stages.append
        ):
            pytest.fail("connected to a closed port")
    elapsed = trio.current_time() - start
    assert info.value.retryable
    assert 0.15 <= elapsed < 1.0  # both backoff pauses, nothing more
    assert stages == [
        "Connecting to cloud...",
        "Retrying connection (attempt 2/3)...",
        "Retrying connection (attempt 3/3)...",
    ]


async def test_retry_after_close_before_ready_then_success() -> None:
    async def flaky(conn: FakeCloudConnection) -> None:
        await conn.accept()
        if len(cloud.connections) == 1:
            await conn.close(1011, "cold start failed")
        else:
            await healthy_cloud_after_accept(conn)

    stages: list[str] = []
    async with (
        serve_fake_cloud(flaky) as cloud,
        connect_cloud_link(config(cloud.url, connect_attempts=3), on_stage=stages.append) as link,
    ):
        assert await link.request("ping") == {
            "type": "pong",
            "request_id": cloud.connections[1].received[0]["request_id"],
        }
    assert len(cloud.connections) == 2
    assert "Retrying connection (attempt 2/3)..." in stages


async def test_errors_from_the_block_propagate_unwrapped() -> None:
    async with serve_fake_cloud() as cloud:
        with pytest.raises(KeyError) as info:
            async with connect_cloud_link(config(cloud.url)) as link:
                raise KeyError("mine")
        assert type(info.value) is KeyError
        assert link.closed
        await link.wait_closed()


# --------------------------------------------------------------------------- requests


async def test_concurrent_requests_answered_out_of_order() -> None:
    async def reverse_order(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        batch = [await conn.receive() for _ in range(3)]
        for message in reversed(batch):
            await conn.send(
                {"type": "api_response", "request_id": message["request_id"], "n": message["n"]}
            )
        await conn.serve(standard_reply)

    results: dict[int, dict[str, Any]] = {}
    async with (
        serve_fake_cloud(reverse_order) as cloud,
        connect_cloud_link(config(cloud.url)) as link,
    ):

        async def call(n: int) -> None:
            results[n] = await link.request("api", {"n": n, "method": "GET"})

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(call, n)
        assert link.stats.sent["api"] == 3
        assert link.stats.successful["api"] == 3
    assert {n: reply["n"] for n, reply in results.items()} == {0: 0, 1: 1, 2: 2}
    request_ids = {message["request_id"] for message in cloud.connections[0].received}
    assert len(request_ids) == 3


async def test_error_reply_fails_the_request_at_once() -> None:
    def refuse_offers(message: dict[str, Any]) -> dict[str, Any] | None:
        if message["type"] == "offer":
            return {
                "type": "error",
                "request_id": message["request_id"],
                "error": "no capacity",
                "code": "BUSY",
                "detail": "try later",
            }
        return standard_reply(message)

    async def cloud_script(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.serve(refuse_offers)

    async with (
        serve_fake_cloud(cloud_script) as cloud,
        connect_cloud_link(config(cloud.url)) as link,
    ):
        start = trio.current_time()
        with pytest.raises(CloudRequestError, match="'offer': no capacity") as info:
            await link.request("offer", {"sdp": "v=0"}, timeout=5.0)
        assert trio.current_time() - start < 0.5
        assert (info.value.code, info.value.message, info.value.detail) == (
            "BUSY",
            "no capacity",
            "try later",
        )
        assert link.stats.failed["offer"] == 1
        # The link is still fine.
        await link.request("ping")
        assert not link.closed


async def test_request_timeout_names_type_and_seconds() -> None:
    async def cloud_script(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.serve(no_reply_to("slow"))

    async with (
        serve_fake_cloud(cloud_script) as cloud,
        connect_cloud_link(config(cloud.url)) as link,
    ):
        with pytest.raises(CloudRequestTimeoutError, match=r"'slow'.*0\.2 s"):
            await link.request("slow", timeout=0.2)
        await link.request("ping")
        assert link._pending == {}


async def test_fields_cannot_override_type_or_request_id() -> None:
    async with serve_fake_cloud() as cloud, connect_cloud_link(config(cloud.url)) as link:
        with pytest.raises(ValueError, match="request_id"):
            await link.request("api", {"request_id": "x"})


# --------------------------------------------------------------------------- link end


async def test_close_fails_every_pending_request_at_once() -> None:
    async def close_with_pending(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        for _ in range(3):
            await conn.receive()
        await conn.close(4000, "going down")

    errors: list[CloudLinkClosedError] = []
    async with (
        serve_fake_cloud(close_with_pending) as cloud,
        connect_cloud_link(config(cloud.url)) as link,
    ):

        async def call() -> None:
            with pytest.raises(CloudLinkClosedError) as info:
                await link.request("api", timeout=5.0)
            errors.append(info.value)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(call)
        assert trio.current_time() - start < 0.5
        await link.wait_closed()
        assert (link.close_code, link.close_reason) == (4000, "going down")
        with pytest.raises(CloudLinkClosedError, match="going down"):
            await link.request("ping")
    assert [(e.code, e.reason) for e in errors] == [(4000, "going down")] * 3


async def test_error_message_before_close_wins_as_reason() -> None:
    async def expire(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.receive()
        await conn.send(
            {"type": "error", "error": "Session too long", "code": "MAX_DURATION_EXCEEDED"}
        )
        await conn.close(1000, "bye")

    async with serve_fake_cloud(expire) as cloud, connect_cloud_link(config(cloud.url)) as link:
        with pytest.raises(CloudLinkClosedError) as info:
            await link.request("api", timeout=5.0)
    reason = "Session too long (MAX_DURATION_EXCEEDED)"
    assert (info.value.code, info.value.reason) == (1000, reason)
    assert (link.close_code, link.close_reason) == (1000, reason)


async def test_tcp_abort_is_noticed() -> None:
    async def vanish(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.receive()
        await conn.abort()

    async with serve_fake_cloud(vanish) as cloud, connect_cloud_link(config(cloud.url)) as link:
        with pytest.raises(CloudLinkClosedError, match="1006"):
            await link.request("api", timeout=5.0)
        with trio.fail_after(1):
            await link.wait_closed()
    assert link.close_code == 1006


async def test_aclose_is_idempotent_and_fails_pending_requests() -> None:
    async def silent(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.serve(no_reply_to("api"))

    async with serve_fake_cloud(silent) as cloud:
        async with connect_cloud_link(config(cloud.url)) as link:
            failures: list[CloudLinkClosedError] = []

            async def call() -> None:
                with pytest.raises(CloudLinkClosedError) as info:
                    await link.request("api", timeout=5.0)
                failures.append(info.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await wait_until(lambda: bool(link._pending))
                await link.aclose()
                await link.aclose()
            assert link.closed
            assert [(f.code, f.reason) for f in failures] == [(1000, "closed by client")]
            with pytest.raises(CloudLinkClosedError):
                await link.request("ping")
        await link.aclose()
        await wait_until(lambda: cloud.connections[0].client_close is not None)
        close = cloud.connections[0].client_close
        assert close is not None
        assert (close.code, close.reason) == (1000, "closed by client")


async def test_cancelled_owner_still_closes_properly() -> None:
    async with serve_fake_cloud() as cloud:
        start = trio.current_time()
        with trio.CancelScope() as scope:
            async with connect_cloud_link(config(cloud.url)) as link:
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert link.closed
        await link.wait_closed()
        # The close handshake completed although the owner was cancelled.
        assert trio.current_time() - start < 0.5
        await wait_until(lambda: cloud.connections[0].client_close is not None)
        close = cloud.connections[0].client_close
        assert close is not None
        assert (close.code, close.reason) == (1000, "closed by client")


async def test_cancelling_one_request_leaves_the_link_up() -> None:
    async def silent(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.serve(no_reply_to("api"))

    async with serve_fake_cloud(silent) as cloud, connect_cloud_link(config(cloud.url)) as link:
        with trio.move_on_after(0.05) as scope:
            await link.request("api", timeout=5.0)
        assert scope.cancelled_caught
        assert link.stats.failed["api"] == 1
        assert link._pending == {}
        await link.request("ping")
        assert not link.closed


async def test_stuck_send_closes_the_link() -> None:
    """A peer that stops reading fills the TCP buffers: a send that cannot finish in time
    means the path is dead, and the link is closed rather than left half-written."""

    async def stops_reading(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await trio.sleep_forever()

    blob = "x" * (512 * 1024)
    async with (
        serve_fake_cloud(stops_reading) as cloud,
        connect_cloud_link(config(cloud.url)) as link,
    ):
        sends = 0
        while not link.closed and sends < 200:
            with trio.move_on_after(0.01):  # wait only for the send, not for a reply
                await link.request("api", {"body": blob}, timeout=0.2)
            sends += 1
        assert link.close_reason == "sending 'api' did not finish within 0.2 s"
        assert link.close_code == 1006
        with trio.fail_after(1):
            await link.wait_closed()


async def test_failing_stage_callback_is_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    def broken(stage: str) -> None:
        raise RuntimeError(f"ui gone: {stage}")

    async with (
        serve_fake_cloud() as cloud,
        connect_cloud_link(config(cloud.url), on_stage=broken) as link,
    ):
        await link.request("ping")
    assert "on_stage callback failed" in caplog.text


# --------------------------------------------------------------------------- unsolicited


async def test_logs_are_relogged_at_their_level(caplog: pytest.LogCaptureFixture) -> None:
    async def chatty(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.send(
            {
                "type": "logs",
                "lines": [
                    "2025-01-01 10:00:00 - scope.server - WARNING - disk almost full",
                    "2025-01-01 10:00:01 - scope.server - ERROR - pipeline crashed",
                    "2025-01-01 10:00:02 - scope.server - DEBUG - details",
                    "a line without a level",
                ],
            }
        )
        await conn.serve(standard_reply)

    caplog.set_level(logging.DEBUG, logger="scope.cloud")
    async with serve_fake_cloud(chatty) as cloud, connect_cloud_link(config(cloud.url)) as link:
        await link.request("ping")  # the logs message was handled before the pong
    relogged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "scope.cloud"]
    assert relogged == [
        (logging.WARNING, "2025-01-01 10:00:00 - scope.server - WARNING - disk almost full"),
        (logging.ERROR, "2025-01-01 10:00:01 - scope.server - ERROR - pipeline crashed"),
        (logging.DEBUG, "2025-01-01 10:00:02 - scope.server - DEBUG - details"),
        (logging.INFO, "a line without a level"),
    ]


async def test_garbage_is_logged_and_survived(caplog: pytest.LogCaptureFixture) -> None:
    async def garbage(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        for raw in (
            "not json",
            b"\x00\xff binary",
            "[1, 2, 3]",
            '{"type": "mystery"}',
            '{"no_type": true}',
            '{"type": "pong", "request_id": "nobody-asked"}',
            '{"type": "error", "request_id": "nobody-asked", "error": "late"}',
            '{"type": "pong", "request_id": ["unhashable"]}',
            '{"type": "logs", "lines": "not a list"}',
            '{"type": "ready", "connection_id": "again"}',
        ):
            await conn.send_raw(raw)
        await conn.serve(standard_reply)

    caplog.set_level(logging.DEBUG, logger="scope_trio.cloud.link")
    async with (
        serve_fake_cloud(garbage) as cloud,
        connect_cloud_link(config(cloud.url)) as link,
    ):
        await link.request("ping")
        assert not link.closed
        assert link.connection_id == "conn-1"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("non-JSON" in w for w in warnings)
    assert any("binary frame" in w for w in warnings)
    assert any("non-object JSON" in w for w in warnings)
    assert sum("unknown request_id" in w for w in warnings) == 3
    assert any("'logs' message without a list" in w for w in warnings)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("'mystery'" in d for d in debug)


# --------------------------------------------------------------------------- heartbeat


async def test_heartbeat_timeout_closes_the_link() -> None:
    async def deaf_to_pings(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.serve(no_reply_to("ping", "api"))

    async with serve_fake_cloud(deaf_to_pings) as cloud:
        cfg = config(cloud.url, ping_interval=0.1, pong_timeout=0.1)
        async with connect_cloud_link(cfg) as link:
            start = trio.current_time()
            with pytest.raises(CloudLinkClosedError, match="heartbeat timeout") as info:
                await link.request("api", timeout=5.0)
            assert trio.current_time() - start < 0.2 + 0.2  # ping_interval + pong_timeout + slack
            assert info.value.code == 1006
            with trio.fail_after(1):
                await link.wait_closed()
        assert link.close_reason == "heartbeat timeout: no pong within 0.1 s"
        await wait_until(lambda: cloud.connections[0].client_close is not None)
        close = cloud.connections[0].client_close
        assert close is not None
        assert (close.code, close.reason) == (1011, "heartbeat timeout")


async def test_heartbeat_keeps_a_healthy_link() -> None:
    async with serve_fake_cloud() as cloud:
        cfg = config(cloud.url, ping_interval=0.05, pong_timeout=0.2)
        async with connect_cloud_link(cfg) as link:
            await trio.sleep(0.3)
            assert not link.closed
            assert link.stats.successful["ping"] >= 3
            assert link.uptime >= 0.3


# --------------------------------------------------------------------------- secrecy


async def test_api_key_never_in_logs_errors_or_repr(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    def record(error: BaseException) -> None:
        texts.extend([str(error), repr(error), str(error.args)])

    refused = config(f"ws://127.0.0.1:{unused_port()}/ws", api_key=SENTINEL_KEY, connect_attempts=2)
    with pytest.raises(CloudLinkError) as info:
        async with connect_cloud_link(refused):
            pass
    record(info.value)

    async def deny(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.receive()
        await conn.send({"type": "error", "error": "Access denied", "code": "ACCESS_DENIED"})
        await conn.close(4003, "forbidden")

    async with serve_fake_cloud(deny) as cloud:
        with pytest.raises(CloudLinkError) as info:
            async with connect_cloud_link(config(cloud.url, api_key=SENTINEL_KEY, user_id="u")):
                pass
        record(info.value)

    async with serve_fake_cloud(lambda conn: conn.reject(401)) as cloud:
        with pytest.raises(CloudLinkError) as info:
            async with connect_cloud_link(config(cloud.url, api_key=SENTINEL_KEY)):
                pass
        record(info.value)

    async def silent(conn: FakeCloudConnection) -> None:
        await conn.accept()
        await conn.send_ready()
        await conn.serve(no_reply_to("slow"))

    async with serve_fake_cloud(silent) as cloud:
        cfg = config(cloud.url, api_key=SENTINEL_KEY)
        async with connect_cloud_link(cfg) as link:
            texts.extend([repr(link), str(link), repr(link.config), str(link.config)])
            with pytest.raises(CloudLinkError) as info:
                await link.request("slow", timeout=0.001)
            record(info.value)
        assert cloud.connections[0].headers["authorization"] == f"Key {SENTINEL_KEY}"

    assert caplog.records  # the scenarios above did log
    assert SENTINEL_KEY not in caplog.text
    for text in texts:
        assert SENTINEL_KEY not in text


def test_link_is_only_made_by_connect() -> None:
    # CloudLink has no public constructor contract; its repr never needs the key either.
    link = CloudLink(LinkConfig(app_id="a/b", api_key=SENTINEL_KEY), on_stage=None)
    assert SENTINEL_KEY not in repr(link)
    assert "connecting" in repr(link)
