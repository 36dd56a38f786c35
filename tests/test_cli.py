"""The command line runs as a real process and says plainly what exists."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio
from devcloud_client import running_devcloud

from scope_trio.cli import main
from scope_trio.dev.devcloud import ws_url


def test_unknown_command_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scope_trio", "devcloud", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--api-key" in result.stdout


async def test_serve_log_json_writes_one_json_object_per_line_without_the_key() -> None:
    """``scope-trio serve --log-json`` as a real process against a dev cloud that wants a key:
    every stderr line is a JSON object, the link-up line carries the connection id, and the
    key (given in the environment, sent in the header) is nowhere in the output."""
    key = "sk-cli-Secret-0815"
    async with running_devcloud(api_key=key) as cloud_url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPE_")}
        env.update(PYTHONUNBUFFERED="1", SCOPE_CLOUD_API_KEY=key)
        command = [sys.executable, "-m", "scope_trio", "serve", "--port", "0", "--log-json"]
        command += ["--cloud-ws-url", ws_url(cloud_url)]
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        stdout, stderr, first_line = bytearray(), bytearray(), trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, process.stdout, stdout, first_line)
                nursery.start_soon(_drain, process.stderr, stderr, None)
                with trio.fail_after(30):
                    await first_line.wait()  # the process prints its URL once it serves
                match = re.search(r"serving on (http://[^\s;]+)", stdout.decode())
                assert match, stdout
                async with httpx.AsyncClient(base_url=match.group(1), timeout=10) as http:
                    assert (await http.post("/api/v1/cloud/connect")).status_code == 200
                    status = await _poll_connected(http)
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(20):
                    assert await process.wait() == 0, stderr.decode()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(10, shield=True):
                    await process.wait()
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()
    output = (stdout + stderr).decode()
    assert key not in output
    entries = [json.loads(line) for line in stderr.decode().splitlines()]
    assert entries, "the server logs"
    for entry in entries:
        assert {"time", "level", "logger", "message", "connection_id", "session_id"} <= set(entry)
    (link_up,) = [
        e
        for e in entries
        if e["logger"] == "scope_trio.cloud.manager" and e["message"].startswith("cloud link up")
    ]
    assert link_up["connection_id"] == status["connection_id"]
    assert any(e["message"] == "SIGTERM: shutting down" for e in entries)


async def _poll_connected(http: httpx.AsyncClient) -> dict[str, Any]:
    """The status once connected (it lives in the other process: polled, under a deadline)."""
    with trio.fail_after(30):
        while True:
            status: dict[str, Any] = (await http.get("/api/v1/cloud/status")).json()
            if status["connected"]:
                return status
            await trio.sleep(0.05)


async def _drain(
    stream: trio.abc.ReceiveStream | None, buffer: bytearray, newline: trio.Event | None
) -> None:
    """Read ``stream`` to its end into ``buffer``; set ``newline`` once a line is complete."""
    assert stream is not None
    while chunk := await stream.receive_some():
        buffer.extend(chunk)
        if newline is not None and b"\n" in buffer:
            newline.set()
