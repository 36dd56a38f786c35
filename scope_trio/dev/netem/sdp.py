"""Rewriting ICE candidates so that a peer learns only the emulator's addresses.

Pure functions over SDP text. :func:`relayable` lists the UDP/IPv4 endpoints an SDP (or one
trickled candidate) names; the relay binds one mirror socket per endpoint; :func:`rewrite`
then replaces every such candidate with a ``host`` candidate on its mirror and removes every
other candidate (IPv6, TCP, mDNS ``.local`` names, and any endpoint the mapping lacks), so no
direct path survives. The media sections' default address (``m=`` port, ``c=`` line) follows
the first rewritten candidate, so nothing in the text still names the peer itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import NamedTuple


class Addr(NamedTuple):
    host: str
    port: int


def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def candidate_endpoint(candidate: str) -> Addr | None:
    """The UDP/IPv4 endpoint of one candidate (``candidate:...`` or ``a=candidate:...``),
    or None if it is not one the relay can carry."""
    body = candidate.strip()
    if body.startswith("a="):
        body = body[2:]
    if not body.startswith("candidate:"):
        return None
    parts = body[len("candidate:") :].split()
    if len(parts) < 8 or parts[2].lower() != "udp" or not _is_ipv4(parts[4]):
        return None
    try:
        port = int(parts[5])
    except ValueError:
        return None
    return Addr(parts[4], port) if 0 < port < 65536 else None


def rewrite_candidate(candidate: str, mapping: Mapping[Addr, Addr]) -> str | None:
    """The candidate as a ``host`` candidate on its mirror, or None to remove it."""
    endpoint = candidate_endpoint(candidate)
    mirror = mapping.get(endpoint) if endpoint is not None else None
    if mirror is None:
        return None
    prefix = "a=" if candidate.strip().startswith("a=") else ""
    body = candidate.strip()[len(prefix) + len("candidate:") :]
    parts = body.split()
    extensions = parts[8:]
    kept: list[str] = []
    for key, value in zip(extensions[::2], extensions[1::2], strict=False):
        if key not in ("raddr", "rport"):
            kept += [key, value]
    fields = [*parts[:4], mirror.host, str(mirror.port), "typ", "host", *kept]
    return f"{prefix}candidate:" + " ".join(fields)


def _split(sdp: str) -> tuple[list[str], str]:
    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(newline)
    return lines, newline


def relayable(sdp: str) -> list[Addr]:
    """Every UDP/IPv4 endpoint the SDP's candidates name, once each, in order."""
    seen: dict[Addr, None] = {}
    for line in _split(sdp)[0]:
        endpoint = candidate_endpoint(line) if line.startswith("a=candidate:") else None
        if endpoint is not None:
            seen.setdefault(endpoint, None)
    return list(seen)


def rewrite(sdp: str, mapping: Mapping[Addr, Addr]) -> str:
    """The SDP with every candidate on its mirror, or removed (see the module docstring)."""
    lines, newline = _split(sdp)
    out: list[str] = []
    section: list[str] = []
    default: Addr | None = None
    had_candidates = False

    def flush() -> None:
        nonlocal default, had_candidates
        if section and section[0].startswith("m=") and had_candidates:
            target = default or Addr("0.0.0.0", 9)  # "no address yet" in SDP
            for index, line in enumerate(section):
                if line.startswith("m="):
                    parts = line.split(" ")
                    if len(parts) > 1:
                        parts[1] = str(target.port)
                    section[index] = " ".join(parts)
                elif line.startswith(("c=IN IP4 ", "c=IN IP6 ")):
                    section[index] = f"c=IN IP4 {target.host}"
        out.extend(section)
        section.clear()
        default, had_candidates = None, False

    for line in lines:
        if line.startswith("m="):
            flush()
        if line.startswith("a=candidate:"):
            had_candidates = True
            rewritten = rewrite_candidate(line, mapping)
            if rewritten is None:
                continue
            if default is None and rewritten.split()[1] == "1":
                default = candidate_endpoint(rewritten)
            section.append(rewritten)
            continue
        section.append(line)
    flush()
    return newline.join(out)
