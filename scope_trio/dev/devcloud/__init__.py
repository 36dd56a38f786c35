"""``scope-trio devcloud``: a local stand-in for the cloud GPU runner.

It speaks the cloud signaling protocol on ``/ws`` (one JSON WebSocket), answers offers with a
real aiortc peer connection that sends video back through a pipeline (``passthrough`` or
``invert`` on the received frames, ``pattern`` drawn from the prompt with no input), answers
the HTTP-style ``api`` requests Scope's frontend makes through the local server (pipeline
schemas, load and status, hardware, models, lists, recordings), honours ``paused`` and
``recording``, and offers a control API for fault injection (``POST /control/faults``,
``GET /control/state``) on the same port. ``docs/devcloud.md`` describes every shape.
Tests, benchmarks and the server's embedded default all use it in-process through
:func:`serve_devcloud`.

The package, by concern:

* :mod:`.config`: :class:`DevCloudConfig`, :func:`ws_url`, close codes and limits.
* :mod:`.protocol`: :class:`DevCloud`, the signaling WebSocket server and devcloud state.
* :mod:`.api`: the route table of the ``api`` requests.
* :mod:`.media`: one peer connection per answered offer; the only module touching aiortc.
* :mod:`.pipelines`: what each pipeline does to a frame, and each pipeline's schema.
* :mod:`.recording`: MP4 recording of what a session sends (PyAV, in a worker thread).
* :mod:`.faults`: the fault handlers, hostile mode and garbage, the TCP cut.
* :mod:`.app`: the Quart-Trio app, :func:`serve_devcloud` and the ``devcloud`` command.

Deviations from the real runner, on purpose: messages before ``set_user_id`` are answered
unless ``require_user_id`` is set; ICE servers are always an empty list (loopback); the media
pipelines are trivial and run on the event loop thread (only the recording encoder has a
worker thread); nothing can be installed or downloaded.
"""

from __future__ import annotations

from scope_trio.dev.devcloud.app import create_app, main, serve_devcloud
from scope_trio.dev.devcloud.config import DevCloudConfig, ws_url
from scope_trio.dev.devcloud.faults import (
    GARBAGE_KINDS,
    HOSTILE_KINDS,
    MALFORMABLE_REPLIES,
    garbage_frame,
)
from scope_trio.dev.devcloud.pipelines import PIPELINES, invert_frame
from scope_trio.dev.devcloud.protocol import DevCloud

__all__ = [
    "GARBAGE_KINDS",
    "HOSTILE_KINDS",
    "MALFORMABLE_REPLIES",
    "PIPELINES",
    "DevCloud",
    "DevCloudConfig",
    "create_app",
    "garbage_frame",
    "invert_frame",
    "main",
    "serve_devcloud",
    "ws_url",
]
