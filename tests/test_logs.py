"""Structured logs: the JSON and text formats, the ids that follow trio tasks, the api key
never written, and the ids on the lines of a real link and a real media session loss."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from browser_peer import http_browser
from devcloud_client import running_devcloud
from fake_cloud_ws import FakeCloudConnection, serve_fake_cloud
from test_metrics import cloud_frames_flow, cloud_session, wait_status

from scope_trio import rtc
from scope_trio.cloud.link import LinkConfig, connect_cloud_link
from scope_trio.cloud.manager import CloudSettings
from scope_trio.dev.devcloud import ws_url
from scope_trio.ops import logs
from scope_trio.server import ServerConfig, serve

# A quote and a backslash: JSON escapes them, so redacting after encoding would miss them.
KEY = 'sk-test-Sec"ret\\Key-4711'

Lines = Callable[[], list[dict[str, Any]]]


@contextmanager
def captured(*, json_lines: bool = True) -> Iterator[io.StringIO]:
    """The root logger writes through :func:`logs.configure` (as the CLI sets it up) into a
    buffer for the block; the previous level and handlers are restored after."""
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = logs.configure(logging.INFO, json_lines=json_lines, secrets=[KEY], stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    """One JSON object per line, every line."""
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def record(
    message: str, *args: object, exc: BaseException | None = None, **extra: Any
) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    result = logging.LogRecord(
        "scope_trio.test", logging.ERROR, __file__, 1, message, args, exc_info
    )
    result.__dict__.update(extra)
    return result


def raised(text: str) -> BaseException:
    try:
        raise RuntimeError(text)
    except RuntimeError as exc:
        return exc


# ------------------------------------------------------------------ formats


def test_a_json_line_has_the_documented_fields() -> None:
    formatter = logs.JsonFormatter()
    line = formatter.format(
        record("session %s lost: %s", "s-1", "peer connection closed", exc=raised("boom"))
    )
    assert "\n" not in line, "one line per record, tracebacks included"
    entry = json.loads(line)
    assert set(entry) == {
        "time",
        "level",
        "logger",
        "message",
        "connection_id",
        "session_id",
        "exception",
    }
    when = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
    assert entry["time"].endswith("Z")
    assert when.utcoffset() == timedelta(0)
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "scope_trio.test"
    assert entry["message"] == "session s-1 lost: peer connection closed"
    assert (entry["connection_id"], entry["session_id"]) == ("", "")
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert entry["exception"].endswith("RuntimeError: boom")

    extra = json.loads(
        formatter.format(record("x", connection_id="c-1", session_id="s-1", attempt=2, pc=object()))
    )
    assert (extra["connection_id"], extra["session_id"]) == ("c-1", "s-1")
    assert extra["attempt"] == 2
    assert extra["pc"].startswith("<object object at")
    assert "exception" not in extra


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "text"])
def test_the_key_is_redacted_from_message_exception_and_extra_fields(json_lines: bool) -> None:
    with captured(json_lines=json_lines) as stream:
        log = logging.getLogger("scope_trio.test")
        log.warning(f"the key in the message: {KEY}")
        log.warning("the key in an argument: %s", KEY)
        log.warning("the key in a repr: %r", {"authorization": f"Key {KEY}"})
        log.error("the key in an exception", exc_info=raised(f"denied for {KEY}"))
        log.warning("the key in extra fields", extra={"header": f"Key {KEY}", "nested": [KEY]})
        log.warning("the key as an id", extra={"connection_id": KEY})
    output = stream.getvalue()
    assert KEY not in output
    assert KEY.replace('"', '\\"').replace("\\", "\\\\") not in output
    assert "sk-test" not in output, "not even part of it"
    assert output.count("***") == (7 if json_lines else 5), "text shows no other extras"
    if json_lines:
        entries = parsed(stream)
        assert len(entries) == 6
        assert entries[3]["exception"].endswith("RuntimeError: denied for ***")
        assert entries[4]["header"] == "Key ***"
        assert entries[4]["nested"] == ["***"]
        assert entries[5]["connection_id"] == "***"


@pytest.mark.parametrize("json_lines", [True, False], ids=["json", "text"])
def test_a_key_added_at_run_time_is_redacted_and_the_registry_is_bounded(
    json_lines: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key posted to /api/v1/cloud/connect is unknown when logging is configured: the
    app adds it with logs.add_secret, and every formatter redacts it from then on. The
    registry keeps the latest MAX_ADDED_SECRETS keys, so posting keys cannot grow it."""
    monkeypatch.setattr(logs, "_added", {})
    monkeypatch.setattr(logs, "_added_forms", ())
    posted = "sk-posted-at-run-time-0815"
    with captured(json_lines=json_lines) as stream:
        log = logging.getLogger("scope_trio.test")
        log.warning("before: %s", posted)
        logs.add_secret(posted)
        logs.add_secret(posted + "-longer")  # contains the first: replaced whole
        log.warning("after: %s and %s-longer", posted, posted)
    before, after = stream.getvalue().splitlines()
    assert posted in before, "redaction starts when the key is known, not before"
    assert "sk-posted" not in after
    assert after.count("***") == 2
    for n in range(logs.MAX_ADDED_SECRETS + 5):
        logs.add_secret(f"sk-many-{n:04d}")
    assert len(logs._added) == logs.MAX_ADDED_SECRETS
    assert "sk-many-0004" not in logs._added
    assert f"sk-many-{logs.MAX_ADDED_SECRETS + 4:04d}" in logs._added


def test_a_text_line_shows_the_ids_it_knows() -> None:
    formatter = logs.TextFormatter()
    both = formatter.format(record("lost", connection_id="c-1", session_id="s-1"))
    assert both.endswith("scope_trio.test ERROR lost [connection_id=c-1 session_id=s-1]")
    assert formatter.format(record("plain")).endswith("scope_trio.test ERROR plain")
    traced = formatter.format(record("failed", exc=raised("boom"), session_id="s-2"))
    first, _, rest = traced.partition("\n")
    assert first.endswith("failed [session_id=s-2]"), "the ids stay on the message line"
    assert rest.startswith("Traceback")


# ------------------------------------------------------------------ ids follow trio tasks


async def test_ids_reach_the_task_that_binds_them_and_the_tasks_it_starts_after() -> None:
    log = logging.getLogger("scope_trio.test")
    with captured() as stream:
        async with trio.open_nursery() as nursery:

            async def link_task() -> None:
                log.info("before ready")
                logs.bind_connection("c-1")
                log.info("after ready")
                nursery.start_soon(child)
                await trio.lowlevel.checkpoint()

            async def child() -> None:
                log.info("child of the link task")
                with logs.bound(session_id="s-1"):
                    log.info("inside bound")
                log.info("after bound")
                log.info("explicit", extra=logs.ids(session_id="s-9", connection_id="c-9"))

            nursery.start_soon(link_task)
        log.info("the parent")
    seen = {e["message"]: (e["connection_id"], e["session_id"]) for e in parsed(stream)}
    assert seen == {
        "before ready": ("", ""),
        "after ready": ("c-1", ""),
        "child of the link task": ("c-1", ""),
        "inside bound": ("c-1", "s-1"),
        "after bound": ("c-1", ""),
        "explicit": ("c-9", "s-9"),
        "the parent": ("", ""),
    }


# ------------------------------------------------------------------ a real link


async def test_a_real_link_logs_its_connection_id_and_never_the_key() -> None:
    """A cloud that repeats the key back (in its logs, in garbage, in an error, in its close
    reason): every line the link logs carries the connection id and none the key."""

    async def indiscreet(conn: FakeCloudConnection) -> None:
        await conn.accept()
        assert conn.headers["authorization"] == f"Key {KEY}", "the key is sent, only there"
        await conn.send_ready("conn-json-1")
        await conn.send({"type": "logs", "lines": [f"t - scope.server - WARNING - key {KEY}"]})
        await conn.send_raw(f"not JSON; your key was Key {KEY}")
        await conn.send({"type": "error", "error": f"bad key {KEY}", "code": "NOPE"})
        await conn.close(1011, f"bye {KEY}")

    with captured() as stream:
        async with serve_fake_cloud(indiscreet) as cloud:
            config = LinkConfig(ws_url=cloud.url, api_key=KEY, ping_interval=None)
            with trio.fail_after(10):
                async with connect_cloud_link(config) as link:
                    await link.wait_closed()
        logging.getLogger("scope_trio.test").info("the owner, afterwards")
    output = stream.getvalue()
    assert KEY not in output
    entries = parsed(stream)
    link_lines = [e for e in entries if e["logger"] in ("scope_trio.cloud.link", "scope.cloud")]
    messages = [e["message"] for e in link_lines]
    assert any(m.startswith("cloud link up") for m in messages), messages
    assert "t - scope.server - WARNING - key ***" in messages, "the cloud's own line"
    assert any(m.startswith("ignoring non-JSON message") and "***" in m for m in messages)
    assert any(m.startswith("cloud reported an error: bad key ***") for m in messages)
    assert any(m.startswith("cloud link closed (code 1011): ") for m in messages), messages
    assert {e["connection_id"] for e in link_lines} == {"conn-json-1"}
    assert entries[-1]["message"] == "the owner, afterwards"
    assert entries[-1]["connection_id"] == "", "the binding stays in the link's own task"


# ------------------------------------------------------------------ a real media session loss


def one(entries: list[dict[str, Any]], logger: str, pattern: str) -> list[dict[str, Any]]:
    found = [e for e in entries if e["logger"] == logger and re.match(pattern, e["message"])]
    assert found, f"no {logger} line matching {pattern!r}"
    return found


@asynccontextmanager
async def real_server(cloud_url: str) -> AsyncIterator[httpx.AsyncClient]:
    config = ServerConfig(
        port=0, debug_endpoints=True, cloud=CloudSettings(ws_url=ws_url(cloud_url), api_key=KEY)
    )
    stop = trio.Event()
    async with rtc.open_loop(), trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve, config, shutdown_trigger=stop.wait))
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            yield http
        stop.set()


async def test_a_real_media_session_loss_logs_the_session_and_connection_ids() -> None:
    with captured() as stream:
        async with (
            running_devcloud(pipeline="passthrough", api_key=KEY) as cloud_url,
            real_server(cloud_url) as http,
        ):
            await http.post("/api/v1/cloud/connect")
            connected = await wait_status(http, lambda s: s["connected"])
            connection_id = connected["connection_id"]
            async with http_browser(http) as browser:
                streaming = await wait_status(http, cloud_frames_flow)
                lost = await http.post("/api/v1/cloud/debug/disconnect-webrtc")
                assert lost.status_code == 200, lost.text
                await wait_status(
                    http,
                    lambda s: (
                        cloud_session(s)["sessions_started"] == 2
                        and cloud_frames_flow(s, after=streaming)
                    ),
                )
                closed = await http.delete(f"/api/v1/webrtc/offer/{browser.session_id}")
                assert closed.status_code == 204
    output = stream.getvalue()
    assert KEY not in output
    entries = parsed(stream)

    for logger in ("scope_trio.cloud.manager", "scope_trio.cloud.link"):
        for entry in one(entries, logger, r"cloud link up"):
            assert entry["connection_id"] == connection_id

    # The cloud's session ids, each on the lines about it (logged in its own tasks).
    connects = one(entries, "scope_trio.cloud.media", r"cloud media session (\w+) connected")
    ids = [re.findall(r"session (\w+)", e["message"])[0] for e in connects]
    assert len(set(ids)) == 2, "two cloud sessions: the lost one and its replacement"
    for entry, session_id in zip(connects, ids, strict=True):
        assert (entry["connection_id"], entry["session_id"]) == (connection_id, session_id)
    (loss,) = one(entries, "scope_trio.cloud.media", r"cloud media session (\w+) lost")
    assert loss["session_id"] == ids[0]
    assert loss["connection_id"] == connection_id
    (reported,) = one(entries, "scope_trio.core.supervisor", r"media session lost: ")
    assert (reported["connection_id"], reported["session_id"]) == (connection_id, ids[0])
    # The supervisor's own lines are about the link's outage, not one session.
    (attempt,) = one(entries, "scope_trio.core.supervisor", r"reconnect attempt 1/3")
    assert (attempt["connection_id"], attempt["session_id"]) == (connection_id, "")

    # The relay's lines carry the browser session id, from its tasks or explicitly.
    for pattern in (r"browser session \S+ answered", r"browser session \S+ closed"):
        (entry,) = one(entries, "scope_trio.relay.relay", pattern)
        assert entry["session_id"] == browser.session_id
    for entry in one(entries, "scope_trio.relay.relay", r"cloud media session for browser session"):
        assert entry["session_id"] == browser.session_id
