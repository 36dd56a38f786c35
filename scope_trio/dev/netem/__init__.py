"""A network emulator for the media path between the server and the cloud (development tool).

The kernel of the development machines has no ``netem`` and tests run without network
namespaces, so the emulator is a userspace UDP relay: :func:`open_netem` runs it,
:func:`serve_signaling_proxy` puts it into the path of a real ``scope-trio serve`` and a real
cloud by rewriting the candidates of their offer and answer, :mod:`.impair` decides the fate
of each datagram (delay, jitter with reordering, random and Gilbert-Elliott loss, blackouts).
``python -m scope_trio.dev.netem`` runs it standalone.
"""

from __future__ import annotations

from .impair import DIRECTIONS, Counters, Direction, GilbertElliott, Impairment, Link
from .proxy import serve_signaling_proxy
from .relay import Endpoint, Netem, Session, open_netem
from .sdp import Addr, candidate_endpoint, relayable, rewrite, rewrite_candidate

__all__ = [
    "DIRECTIONS",
    "Addr",
    "Counters",
    "Direction",
    "Endpoint",
    "GilbertElliott",
    "Impairment",
    "Link",
    "Netem",
    "Session",
    "candidate_endpoint",
    "open_netem",
    "relayable",
    "rewrite",
    "rewrite_candidate",
    "serve_signaling_proxy",
]
