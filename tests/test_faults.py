"""The fault matrix: every dev cloud fault against the real stack, status checked at every step.

The stack is what ``scope-trio serve`` runs (CloudManager, the real Relay, the HTTP API on
Hypercorn), with an aiortc "browser" streaming through it and the dev cloud inverting the
video (:mod:`fault_rig`). For every case the test records every CloudStatus (the SSE stream
off the wire, ``CloudManager.status()`` after every change, and the supervisor's lossless
phase stream) and asserts:

* every snapshot is truthful (:func:`fault_rig.status_problems`), and none taken while the
  recovery is under way would mislead a UI (:func:`fault_rig.recovery_problems`);
* the phases came in the expected order (a regex over the collapsed phase names);
* the final state is right, and the SSE stream ends on that same state;
* nothing leaks: our live peer connections are back where they started, the dev cloud has
  exactly the sessions it should;
* no parameter update is lost: updates the browser sends on its data channel during the
  outage reach the dev cloud's new session (``/control/state``), or are kept for the next;
* the browser's peer connection survives the cloud's troubles: the same pc, still
  ``connected``, never renegotiated, and processed frames resume on it.

Policies are small on purpose (:data:`fault_rig.FAST_RECONNECT` and friends: backoff 0.1 s
doubling, attempt deadline 2 s, re-link pause 0.1 s, connect retries after 0.1/0.2 s, ready
deadline 2 s, stall watchdog 1 s): Scope's defaults would only add waiting. A case that
depends on one more (the attempt or ready deadline) shrinks it in its row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from devcloud_client import eventually
from fault_rig import (
    FAST_RECONNECT,
    Browser,
    Stack,
    browser,
    collapse,
    devcloud_process,
    link_state,
    open_stack,
    reconnect_stages,
    recovery_problems,
    status_problems,
)

from scope_trio.core.supervisor import budget_spent_message

pytestmark = pytest.mark.system  # run on the pin-matrix ends only: see noxfile.py

INITIAL = {"prompts": [{"text": "a fox", "weight": 1.0}], "noise_scale": 0.3}
DURING_OUTAGE = [{"noise_scale": 0.5}, {"noise_scale": 0.77, "reset_cache": True}]
AFTER_OUTAGE = {**INITIAL, "noise_scale": 0.77, "reset_cache": True}
BUDGET_SPENT = "^" + re.escape(budget_spent_message(3)) + "$"
ABSENCE_WINDOW = 1.0
"""How long a final case is watched for a re-link that must not come: 10x the 0.1 s re-link
pause, 3x the connect retries' pauses."""

RECOVERED, MEDIA_FAILED, LINK_FINAL = "recovered", "media failed", "link final"
RELINKED_MEDIA = r"(backoff (reconnecting (backoff )?)?)?link_down reconnecting connected"
"""A re-link: the media loss may be seen a moment before the link's, then the kept session
comes back. The resume says ``reconnecting`` with the loss as ``webrtc_error``; it used to
say ``connecting`` with no error, which a UI reads as "no stream, and no problem" in the
middle of a recovery (``recovery_problems`` catches that; see ``SessionSupervisor.resume``)."""


@dataclass(frozen=True)
class Case:
    """One row: what to inject, what the phases must look like, how it ends."""

    faults: tuple[dict[str, Any], ...]
    media: str
    """Regex the supervisor's phases from the fault on must match (collapsed, spaced)."""
    link: str = "up"
    """Regex the link's states (up/connecting/down) from the fault on must match."""
    ends: str = RECOVERED
    error: str | None = None
    """Regex the final ``error`` matches (None: no error)."""
    close: tuple[int, str] | None = None
    """The final ``(last_close_code, last_close_reason)``, for rows that end the link."""
    policy: dict[str, Any] = field(default_factory=dict)
    """ReconnectPolicy fields this row changes."""
    link_options: dict[str, Any] = field(default_factory=dict)
    then: Callable[[Stack, Marks], Awaitable[None]] | None = None
    """A check of what only this row shows."""


def fault(action: str, **fields: Any) -> dict[str, Any]:
    return {"action": action, **fields}


def offers_and_refusals_left(refused: int) -> Callable[[Stack, Marks], Awaitable[None]]:
    """The budget is 3 attempts exactly: the first offer, then 3 more; the rest unused."""

    async def check(s: Stack, marks: Marks) -> None:
        state = await s.cloud_state()
        assert state["offers"] == 1 + 3
        assert state["faults"]["refuse_offers"] == max(0, refused - 3)

    return check


async def attempt_deadline_then_next_attempt(s: Stack, marks: Marks) -> None:
    """The stalled attempt ran to its 1 s deadline (not the 5 s request deadline), then the
    next attempt followed after its backoff."""
    changes = [(p.phase.value, p.attempt) for p in s.phases[marks.phases :]]
    assert changes[:4] == [("backoff", 0), ("reconnecting", 1), ("backoff", 1), ("reconnecting", 2)]
    times = s.phase_times[marks.phases :]
    assert 1.0 - 0.02 <= times[2] - times[1] < 5.0, "ended by the attempt deadline"
    # attempt 1 started at once (the default policy), attempt 2 after base_delay (0.1 s)
    assert times[3] - times[2] >= 0.1 - 0.02, "attempt 2 waited its backoff"
    assert (await s.cloud_state())["offers"] == 3, "first, stalled, reconnected"


def ready_withheld(attempts: int) -> Callable[[Stack, Marks], Awaitable[None]]:
    """Each of ``attempts`` re-link attempts waited for ``ready``, and the stages said so."""

    async def check(s: Stack, marks: Marks) -> None:
        stages = reconnect_stages(s.snapshots[marks.snapshots :])
        assert stages[:3] == [
            "Reconnecting to cloud...",
            "Connecting to cloud...",
            "Starting cloud server... (0s)",
        ], stages
        for n in range(2, 4):
            assert (f"Retrying connection (attempt {n}/3)..." in stages) == (n <= attempts + 1)
        state = await s.cloud_state()
        assert state["faults"]["withhold_ready"] == (99 - 3 if attempts == 3 else 0)

    return check


CASES = {
    "close_pc": Case((fault("close_pc"),), "backoff reconnecting connected"),
    "blackhole-existing": Case(
        (fault("blackhole", seconds=30, scope="existing"),), "backoff reconnecting connected"
    ),
    "stall_media": Case(
        (fault("stall_media", seconds=2.0),),
        "backoff reconnecting connected( backoff reconnecting connected)?",
    ),
    "drop_ws": Case(
        (fault("drop_ws"),), RELINKED_MEDIA, "up connecting up", close=(1006, "abnormal closure")
    ),
    "close_ws-1000": Case(
        (fault("close_ws", code=1000, reason="bye"),),
        RELINKED_MEDIA,
        "up connecting up",
        close=(1000, "bye"),
    ),
    "close_ws-1011": Case(
        (fault("close_ws", code=1011, reason="runner restarted"),),
        RELINKED_MEDIA,
        "up connecting up",
        close=(1011, "runner restarted"),
    ),
    "drop_ws-then-refuse-2-recovers": Case(  # the resume after a re-link is attempt 1
        (fault("refuse_offers", count=2), fault("drop_ws")),
        r"(backoff (reconnecting )?)?link_down reconnecting (backoff reconnecting ){2}connected",
        "up connecting up",
        then=offers_and_refusals_left(2),
    ),
    "drop_ws-then-refuse-3-gives-up": Case(
        (fault("refuse_offers", count=3), fault("drop_ws")),
        r"(backoff (reconnecting )?)?link_down (reconnecting backoff ){3}failed",
        "up connecting up",
        MEDIA_FAILED,
        BUDGET_SPENT,
        then=offers_and_refusals_left(3),
    ),
    "close_ws-4003-is-final": Case(
        (fault("close_ws", code=4003, reason="access denied"),),
        "(backoff )?link_down",
        "up down",
        LINK_FINAL,
        "^Cloud connection closed: access denied$",
        close=(4003, "access denied"),
    ),
    "max-duration-then-close-is-final": Case(
        (
            fault(
                "send_error",
                code="MAX_DURATION_EXCEEDED",
                error="Maximum session duration exceeded",
                close=1000,
            ),
        ),
        "(backoff )?link_down",
        "up down",
        LINK_FINAL,
        r"^Cloud connection closed: Maximum session duration exceeded \(MAX_DURATION_EXCEEDED\)$",
        close=(1000, "Maximum session duration exceeded (MAX_DURATION_EXCEEDED)"),
    ),
    "refuse-2-recovers": Case(
        (fault("refuse_offers", count=2), fault("close_pc")),
        "backoff (reconnecting backoff ){2}reconnecting connected",
        then=offers_and_refusals_left(2),
    ),
    "refuse-3-gives-up": Case(
        (fault("refuse_offers", count=3), fault("close_pc")),
        "backoff (reconnecting backoff ){3}failed",
        ends=MEDIA_FAILED,
        error=BUDGET_SPENT,
        then=offers_and_refusals_left(3),
    ),
    "refuse-5-gives-up": Case(
        (fault("refuse_offers", count=5), fault("close_pc")),
        "backoff (reconnecting backoff ){3}failed",
        ends=MEDIA_FAILED,
        error=BUDGET_SPENT,
        then=offers_and_refusals_left(5),
    ),
    "stall_offers-attempt-deadline": Case(
        (fault("stall_offers", count=1), fault("close_pc")),
        "backoff reconnecting backoff reconnecting connected",
        policy={"attempt_timeout": 1.0},
        then=attempt_deadline_then_next_attempt,
    ),
    "ice-never-connects": Case(  # blackhole everything, new sessions too
        (fault("blackhole", seconds=60, scope="all"),),
        "backoff (reconnecting backoff ){3}failed",
        ends=MEDIA_FAILED,
        error=BUDGET_SPENT,
        policy={"attempt_timeout": 1.0},
    ),
    "clear-lifts-every-fault": Case(
        (
            fault("refuse_offers", count=5),
            fault("stall_offers", count=5),
            fault("stall_media", seconds=60),
            fault("withhold_ready", count=5),
            fault("clear"),
            fault("close_pc"),
        ),
        "backoff reconnecting connected",
    ),
    "ready-deadline-then-ready": Case(
        (fault("withhold_ready", count=1), fault("drop_ws")),
        RELINKED_MEDIA,
        "up connecting up",
        link_options={"ready_timeout": 0.5},
        then=ready_withheld(1),
    ),
    "ready-never-sent": Case(
        (fault("withhold_ready", count=99), fault("drop_ws")),
        "(backoff )?link_down",
        "up connecting down",
        LINK_FINAL,
        "^Cloud connection lost and could not be re-established: "
        "the cloud did not send 'ready' within 0.5 s$",
        close=(1006, "abnormal closure"),
        link_options={"ready_timeout": 0.5},
        then=ready_withheld(3),
    ),
}


# --------------------------------------------------------------------------------------------
# The checks every case shares


@dataclass
class Marks:
    """Where the records stood when the fault was injected."""

    snapshots: int
    sse: int
    phases: int
    connection_id: str | None
    sessions_started: int
    peer_connections: int
    """Ours (the browser's, the relay's two) while streaming."""
    frames_from_cloud: int


async def streaming(s: Stack, b: Browser) -> Marks:
    """Wait until processed frames reach the browser; mark where everything stands."""
    await b.inverted_frame()

    async def one_cloud_session() -> bool:
        state = await s.cloud_state()
        return state["peer_connections"] == 1 and state["ws_connections"] == 1

    await eventually(one_cloud_session)
    status = s.manager.status()
    assert status["webrtc_connected"]
    return Marks(
        snapshots=len(s.snapshots),
        sse=len(s.sse.events),
        phases=len(s.phases),
        connection_id=status["connection_id"],
        sessions_started=s.manager.supervisor.status.sessions_started,
        peer_connections=await s.our_peer_connections(),
        frames_from_cloud=s.relay.sessions()[b.session_id]["frames_from_cloud"],
    )


def ended(kind: str, marks: Marks, s: Stack) -> Callable[[dict[str, Any]], bool]:
    """The predicate of a case's end state."""
    supervisor = s.manager.supervisor
    if kind == RECOVERED:
        return lambda st: (
            st["connected"]
            and st["webrtc_connected"]
            and supervisor.status.sessions_started > marks.sessions_started
        )
    if kind == MEDIA_FAILED:
        return lambda st: st["connected"] and supervisor.status.phase.value == "failed"
    return lambda st: not st["connected"] and not st["connecting"]


KEY_FIELDS = (
    "connected",
    "connecting",
    "error",
    "connect_stage",
    "webrtc_connected",
    "webrtc_error",
    "webrtc_reconnecting",
    "connection_id",
    "last_close_code",
    "last_close_reason",
)


def check_history(s: Stack, marks: Marks, case: Case) -> None:
    """Every snapshot truthful; no misleading one mid-recovery; phases in order."""
    link_errors = [case.error] if case.error else []
    for source, records in (("snapshot", s.snapshots), ("SSE event", s.sse.events)):
        for i, snapshot in enumerate(records):
            problems = status_problems(snapshot, link_errors=link_errors)
            assert not problems, f"{source} {i}: {problems}: {snapshot}"
    for source, records in (
        ("snapshot", s.snapshots[marks.snapshots :]),
        ("SSE event", s.sse.events[marks.sse :]),
    ):
        recovering = False
        for snapshot in records:
            if not recovering and not snapshot["webrtc_connected"]:
                recovering = True  # the loss is seen from here on
            if recovering and (case.ends == RECOVERED and snapshot["webrtc_connected"]):
                break
            if recovering and not _settled_final(snapshot, case):
                problems = recovery_problems(snapshot)
                assert not problems, f"{source} mid-recovery: {problems}: {snapshot}"
        assert recovering, f"no {source} showed the loss"
    phases = collapse(p.phase.value for p in s.phases[marks.phases :])
    assert re.fullmatch(case.media, phases), f"media phases: {phases!r}"
    links = collapse(["up", *(link_state(x) for x in s.snapshots[marks.snapshots :])])
    assert re.fullmatch(case.link, links), f"link states: {links!r}"


def _settled_final(snapshot: dict[str, Any], case: Case) -> bool:
    """Whether ``snapshot`` already is the case's final failure (not a recovery any more)."""
    if case.ends == MEDIA_FAILED:
        return snapshot["webrtc_error"] == budget_spent_message(3)
    if case.ends == LINK_FINAL:
        return not snapshot["connected"] and not snapshot["connecting"]
    return False


async def check_sse_ends_on(s: Stack, final: dict[str, Any]) -> None:
    """The SSE stream reaches the same final state the manager reports."""
    want = {k: final[k] for k in KEY_FIELDS}
    await s.sse.until(lambda e: {k: e[k] for k in KEY_FIELDS} == want)


async def check_browser_survived(s: Stack, b: Browser, marks: Marks, *, resumed: bool) -> None:
    """Same browser pc, still connected, never renegotiated; cloud frames flow on it again
    (``resumed``) or it is held on the last frame (otherwise)."""
    assert b.pc.connectionState == "connected"
    assert b.states_after_connect == [], "the browser pc never left 'connected'"
    with pytest.raises(trio.WouldBlock):
        b.events.tracks.receive_nowait()  # one track, never renegotiated
    assert list(s.relay.sessions()) == [b.session_id]
    if resumed:

        async def cloud_frames_again() -> bool:
            await trio.lowlevel.checkpoint()
            count: int = s.relay.sessions()[b.session_id]["frames_from_cloud"]
            return count > marks.frames_from_cloud

        await eventually(cloud_frames_again)
    before = len(b.seen)
    await b.inverted_frame()  # processed, or the last processed frame held
    assert len(b.seen) > before


async def run_case(case: Case, s: Stack, b: Browser) -> Marks:
    marks = await streaming(s, b)
    for body in case.faults:
        await s.fault(**body)
    await s.until(lambda st: not st["webrtc_connected"])
    for update in DURING_OUTAGE:
        b.send(update)
    final = await s.until(ended(case.ends, marks, s))
    await check_sse_ends_on(s, final)
    if case.ends == LINK_FINAL:
        await trio.sleep(ABSENCE_WINDOW)  # the window under test: no re-link comes
        assert s.manager.status()["connecting"] is False
        assert (await s.cloud_state())["ws_connections"] == 0, "no re-link"
    check_history(s, marks, case)
    final = s.manager.status()
    if case.error is None:
        assert final["error"] is None
    else:
        assert re.search(case.error, final["error"] or ""), final["error"]
    if case.close is not None:
        assert (final["last_close_code"], final["last_close_reason"]) == case.close
    relinked = case.link.endswith("connecting up")
    assert (final["connection_id"] != marks.connection_id) == (relinked or not final["connected"])

    if case.ends == RECOVERED:

        async def latest_parameters_arrived() -> bool:
            sessions = (await s.cloud_state())["sessions"]
            return len(sessions) == 1 and sessions[0]["parameters"] == AFTER_OUTAGE

        await eventually(latest_parameters_arrived)
    else:
        assert s.manager.supervisor.last_parameters == {
            k: v for k, v in AFTER_OUTAGE.items() if k != "reset_cache"
        }, "kept for the next session"
    await check_browser_survived(s, b, marks, resumed=case.ends == RECOVERED)

    # Nothing leaks: ours back to where they were (less the cloud session when it is gone),
    # the dev cloud with one session (none when media or link is gone for good).
    cloud_sessions = 1 if case.ends == RECOVERED else 0
    ours = marks.peer_connections - (0 if case.ends == RECOVERED else 1)

    async def settled() -> bool:
        state = await s.cloud_state()
        live = state["peer_connections"]
        if case.ends == MEDIA_FAILED and case.faults[0].get("scope") == "all":
            # ICE never connected: the dev cloud's answering side of each attempt waits for
            # ICE to give up (it never hears our close through the blackhole) or for the
            # WebSocket to close; checked after the disconnect below.
            live = cloud_sessions
        return live == cloud_sessions and await s.our_peer_connections() == ours

    await eventually(settled)
    assert s.owner_alive
    return marks


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_fault(case: Case) -> None:
    policy = dataclasses.replace(FAST_RECONNECT, **case.policy)
    async with open_stack(policy=policy, link_options=case.link_options) as s:
        await s.connect()
        async with browser(s.api, INITIAL) as b:
            marks = await run_case(case, s, b)
            if case.then is not None:
                await case.then(s, marks)
            if case.ends != RECOVERED:
                # "Please toggle cloud mode off and on": that works, and closes everything.
                await s.api.post("/api/v1/cloud/disconnect")

                async def cloud_closed_everything() -> bool:
                    state = await s.cloud_state()
                    return (state["ws_connections"], state["peer_connections"]) == (0, 0)

                await eventually(cloud_closed_everything)
                await s.fault("clear")
                await s.connect()


# --------------------------------------------------------------------------------------------
# Cases that are not one fault on a streaming session


async def test_ready_never_sent_on_the_first_connect_is_a_clear_error() -> None:
    """No ``ready`` at all: each of the 3 connect attempts waits out the ready deadline
    (0.5 s here; Scope's 180 s), the stages say so, and the error is final and clear."""
    async with open_stack(link_options={"ready_timeout": 0.5}) as s:
        await s.fault("withhold_ready", count=99)
        response = await s.api.post("/api/v1/cloud/connect")
        assert response.json()["connecting"] is True
        status = await s.until(lambda st: not st["connecting"])
        assert status["connected"] is False
        assert status["error"] == "the cloud did not send 'ready' within 0.5 s"
        await check_sse_ends_on(s, status)
        stages = reconnect_stages(s.snapshots)
        assert stages[0] == "Connecting to cloud..."
        assert "Starting cloud server... (0s)" in stages
        assert "Retrying connection (attempt 2/3)..." in stages
        assert "Retrying connection (attempt 3/3)..." in stages
        for snapshot in [*s.snapshots, *s.sse.events]:
            assert not status_problems(snapshot, link_errors=["did not send 'ready'"])
        state = await s.cloud_state()
        assert state["ws_connections"] == 0, "every attempt's WebSocket was closed"
        assert state["faults"]["withhold_ready"] == 96


async def test_ready_deadline_retries_the_connect_and_then_connects() -> None:
    async with open_stack(link_options={"ready_timeout": 0.5}) as s:
        await s.fault("withhold_ready", count=1)
        started = trio.current_time()
        status = await s.connect()
        assert trio.current_time() - started >= 0.5, "the first attempt waited for ready"
        assert status["error"] is None
        stages = reconnect_stages(s.snapshots)
        assert "Retrying connection (attempt 2/3)..." in stages
        assert "Retrying connection (attempt 3/3)..." not in stages
        for snapshot in [*s.snapshots, *s.sse.events]:
            assert not status_problems(snapshot)


async def test_devcloud_process_killed_and_restarted(tmp_path: Path) -> None:
    """SIGKILL the dev cloud process mid-stream, start it again on the same port: the link
    is re-established (LinkPolicy; the link's connect retries are stretched to 0.5/1/2 s
    and 5 attempts here so they outlast a process start, about 1-2 s on this machine) and
    media resumes on the same browser pc, with the update sent during the outage."""
    case = Case((), RELINKED_MEDIA, "up connecting up")
    async with devcloud_process(tmp_path / "devcloud.log") as cloud:
        link_options = {"connect_attempts": 5, "connect_backoff": (0.5, 1.0, 2.0)}
        async with open_stack(devcloud=cloud.url, link_options=link_options) as s:
            await s.connect()
            async with browser(s.api, INITIAL) as b:
                marks = await streaming(s, b)
                await cloud.kill()
                await s.until(lambda st: not st["connected"])
                for update in DURING_OUTAGE:
                    b.send(update)
                await cloud.start()
                final = await s.until(ended(RECOVERED, marks, s))
                await check_sse_ends_on(s, final)
                check_history(s, marks, case)
                assert final["connection_id"] != marks.connection_id
                assert final["error"] is None
                assert final["last_close_code"] == 1006

                async def latest_parameters_arrived() -> bool:
                    sessions = (await s.cloud_state())["sessions"]
                    return len(sessions) == 1 and sessions[0]["parameters"] == AFTER_OUTAGE

                await eventually(latest_parameters_arrived)
                await check_browser_survived(s, b, marks, resumed=True)

                async def ours_back() -> bool:
                    return await s.our_peer_connections() == marks.peer_connections

                await eventually(ours_back)
        assert cloud.starts == 2
