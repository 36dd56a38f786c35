"""The receive buffer of every video receiver we own: frames out as soon as they are whole.

aiortc's own jitter buffer releases a frame only when the first packet of the *next* frame
arrives (it waits for a change of RTP timestamp and ignores the marker bit), so every aiortc
hop adds a frame interval; it NACKs a hole only when a new gap appears, and it releases at
most one frame per arriving packet, so a backlog built during a loss never drains.
:class:`FrameBuffer` replaces it (installed by :func:`scope_trio.rtc._aiortc_internals.
install_frame_buffer` on each receiver of the peer connections :mod:`scope_trio.rtc`
builds). It is plain Python without aiortc or I/O, so it is tested packet by packet.

Guarantees:

* **Release on completion.** A frame is released as soon as every packet from its first to
  its last is present: the last is the one with the RTP marker bit (or the packet before
  one with a new timestamp, for a sender that does not mark), the first follows the
  previous frame's last (or carries the codec's start-of-frame flag, VP8's S bit with
  partition 0). Frames leave in sequence order, every ready frame at once (no backlog).
* **Decodable output only.** After a frame is lost (given up) nothing is released until a
  complete keyframe, so the decoder never gets a frame whose reference is missing.
* **Holes are re-NACKed on a timer** (aiortc's NACK generator asks once, when the gap
  appears), at most every ``nack_interval`` and, once retransmissions have been seen, only
  after 1.2x the slowest recent one's round trip (so an answer still on its way is not asked
  for again).
* **Bounded wait.** A hole older than the give-up bound (``give_up`` until a round trip is
  known; then 2.5x the slowest recent retransmission's + 0.1 s, within 0.2-1.2 s: a lost
  retransmission gets a second chance) drops the incomplete frame(s), requests a keyframe
  (PLI, repeated every ``pli_interval`` while none comes) and skips to the newest complete
  keyframe; a complete keyframe behind a hole is skipped to at once. A gap of more than
  ``OUTAGE`` (0.25 s) of media time is an outage: its packets are stale, so they are not
  NACKed and the keyframe is asked for at once. Nothing waits longer than the bound for a
  missing packet, and a released backlog leaves at once, so latency stays bounded after
  any loss. The frames a filled hole held are decoded (they are references) and forwarded
  as long as they are at most one typical retransmission late (``typical_fill``, read by
  :func:`scope_trio.rtc.tracks.lateness_bound`); older ones, those a skip to a keyframe
  left behind, are not shown.
* Sequence numbers wrap (16 bits, unwrapped to a running index); timestamps are compared only
  for equality, so their wrap needs nothing. Duplicates and packets of frames already
  released or dropped are ignored. At most ``max_packets`` are held (the oldest frames go).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "KEYFRAME_TESTS",
    "Actions",
    "EncodedFrame",
    "FrameBuffer",
    "h264_is_keyframe",
    "h264_starts_nal",
    "vp8_is_keyframe",
    "vp8_starts_frame",
]

NACK_INTERVAL = 0.04
"""Least seconds between two NACKs of the same hole (the first goes when the gap appears);
once holes have been filled, a hole is asked again only after 1.2x the slowest recent fill
(a round trip, so a retransmission still on its way is not asked for again)."""
GIVE_UP = 0.5
"""Seconds a hole may stay unfilled before its frame is dropped and a keyframe requested,
until the round trip is known; then 2.5x the slowest recent fill + 0.1 s, within
[GIVE_UP_MIN, GIVE_UP_MAX]: a lost retransmission gets a second chance on any path."""
GIVE_UP_MIN, GIVE_UP_MAX = 0.2, 1.2
FILLS_REMEMBERED = 16
OUTAGE = 0.25
"""A gap whose media time exceeds this (seconds) is an outage, not a loss: its packets are
stale, so the buffer skips them and asks for a keyframe at once instead of NACKing them."""
CLOCK_RATE = 90_000
PLI_INTERVAL = 0.3
"""Seconds between keyframe requests while waiting for one."""
MAX_PACKETS = 1024
RESET_JUMP = 3000
"""A sequence number this far ahead of the newest is a restarted stream: start over."""


def vp8_starts_frame(payload: bytes) -> bool:
    """The RTP payload (with its VP8 descriptor) begins a frame: S=1 and partition index 0."""
    return bool(payload) and payload[0] & 0x10 != 0 and payload[0] & 0x07 == 0


def vp8_is_keyframe(data: bytes) -> bool:
    """A depayloaded VP8 frame is a keyframe (P bit of the frame tag is 0)."""
    return bool(data) and data[0] & 0x01 == 0


def h264_starts_nal(payload: bytes) -> bool:
    """The H.264 RTP payload begins a NAL unit (single NAL, STAP-A, or FU-A with S set).
    An access unit can hold several NAL units, so this marks a possible frame start only;
    it is used where the previous packet is unknown."""
    if not payload:
        return False
    nal_type = payload[0] & 0x1F
    if nal_type == 28:  # FU-A
        return len(payload) > 1 and payload[1] & 0x80 != 0
    return nal_type != 29  # FU-B never starts; every other type is a whole NAL


def h264_is_keyframe(data: bytes) -> bool:
    """An Annex B H.264 access unit holds an IDR slice (or starts with SPS)."""
    index = data.find(b"\x00\x00\x01")
    while index != -1 and index + 3 < len(data):
        nal_type = data[index + 3] & 0x1F
        if nal_type in (5, 7):
            return True
        index = data.find(b"\x00\x00\x01", index + 3)
    return False


KEYFRAME_TESTS = {"vp8": vp8_is_keyframe, "h264": h264_is_keyframe}
"""Codec name (lower case) → whether a depayloaded frame is a keyframe."""


@dataclass
class EncodedFrame:
    """A whole frame for the decoder (aiortc's decoders read ``data`` and ``timestamp``)."""

    data: bytes
    timestamp: int
    keyframe: bool


@dataclass
class Actions:
    """What the receiver must send now: NACKs for these sequence numbers, a PLI."""

    nack: list[int] = field(default_factory=list)
    pli: bool = False


@dataclass
class _Packet:
    timestamp: int
    marker: bool
    start: bool
    data: bytes


@dataclass
class _Hole:
    noticed: float
    nacked: float


class FrameBuffer:
    """Reassembles frames from RTP packets; see the module docstring for the guarantees.

    :meth:`add` a packet, then take the :meth:`ready` frames; call :meth:`actions` whenever
    a packet arrived and at :meth:`next_deadline` for the NACKs and PLIs due. ``codec``
    (``vp8`` or ``h264``) says how to recognise a keyframe.
    """

    def __init__(
        self,
        codec: str = "vp8",
        *,
        nack_interval: float = NACK_INTERVAL,
        give_up: float = GIVE_UP,
        pli_interval: float = PLI_INTERVAL,
        max_packets: int = MAX_PACKETS,
        adaptive: bool = True,
    ) -> None:
        self.codec = codec.lower()
        self._is_keyframe = KEYFRAME_TESTS.get(self.codec, vp8_is_keyframe)
        self.nack_interval = nack_interval
        self.give_up = give_up
        self.adaptive = adaptive
        """False: ``give_up`` stays fixed (tests); True: it follows the round trip."""
        self.pli_interval = pli_interval
        self.max_packets = max_packets
        self._fills: deque[float] = deque(maxlen=FILLS_REMEMBERED)
        """Seconds from a hole's appearance to its fill by a retransmission (a round trip,
        or more when a NACK or its answer was lost), for the last few such holes."""
        self._typical_fill: float | None = None
        """Median of ``_fills``, kept as fills come (read for every forwarded frame)."""
        self._highest_timestamp = 0
        self._packets: dict[int, _Packet] = {}
        self._holes: dict[int, _Hole] = {}
        self._highest: int | None = None
        self._next: int | None = None
        """Index after the last packet released or dropped (None before the first)."""
        self._edge: tuple[int, _Packet] | None = None
        """The last packet released or dropped, to tell whether the next one starts a frame."""
        self._need_keyframe = True
        self._pli_due = False
        self._last_pli: float | None = None
        self._ready: list[EncodedFrame] = []
        self.frames_released = 0
        self.frames_dropped = 0
        self.keyframe_requests = 0
        self.nacks_sent = 0

    # ------------------------------------------------------------------ input

    def add(
        self,
        sequence_number: int,
        timestamp: int,
        marker: bool,
        data: bytes,
        now: float,
        *,
        start: bool = False,
        retransmission: bool = False,
    ) -> None:
        """One depayloaded packet; ``start``: the codec says it begins a frame;
        ``retransmission``: it came as RTX, an answer to a NACK (its fill time is a round
        trip, which sets the NACK interval and the give-up bound)."""
        index = self._unwrap(sequence_number)
        if index is None or index in self._packets:
            return  # stale, or a duplicate
        if self._next is not None and index < self._next:
            return  # too late: its frame was released or dropped
        assert self._highest is not None
        if index == self._highest:
            self._highest_timestamp = timestamp  # the first packet (or of a restart)
        if index > self._highest + 1 and self._outage(timestamp):
            self._drop_before(index)  # what the outage lost is stale: skip it all
            self._lost()
            self._highest = index - 1
        self._packets[index] = _Packet(timestamp, marker, start, data)
        hole = self._holes.pop(index, None)
        if hole is not None and retransmission:
            self._fills.append(now - hole.noticed)
            self._typical_fill = statistics.median(self._fills)
        if index > self._highest:
            for missing in range(self._highest + 1, index):
                self._holes[missing] = _Hole(now, now)  # aiortc NACKs a new gap at once
            self._highest = index
            self._highest_timestamp = timestamp
        self._release(now)
        if len(self._packets) > self.max_packets:
            self._drop_before(sorted(self._packets)[len(self._packets) - self.max_packets])
            self._lost()

    def _outage(self, timestamp: int) -> bool:
        jump = (timestamp - self._highest_timestamp + 0x80000000) % 0x100000000 - 0x80000000
        return jump > OUTAGE * CLOCK_RATE

    @property
    def typical_fill(self) -> float | None:
        """Median seconds from a hole's appearance to its fill, over the recent fills (about
        a round trip of this hop); None before the first retransmission."""
        return self._typical_fill

    @property
    def current_nack_interval(self) -> float:
        """Seconds between two NACKs of one hole now (see :data:`NACK_INTERVAL`)."""
        if not self._fills:
            return self.nack_interval
        return max(self.nack_interval, min(0.4, 1.2 * max(self._fills)))

    @property
    def current_give_up(self) -> float:
        """Seconds a hole may wait now (see :data:`GIVE_UP`)."""
        if not self._fills or not self.adaptive:
            return self.give_up
        return max(GIVE_UP_MIN, min(GIVE_UP_MAX, 2.5 * max(self._fills) + 0.1))

    def _unwrap(self, sequence_number: int) -> int | None:
        if self._highest is None:
            self._highest = sequence_number
            return sequence_number
        delta = (sequence_number - self._highest + 0x8000) % 0x10000 - 0x8000
        if delta < -RESET_JUMP:
            return None  # far behind: a stale packet
        if delta > RESET_JUMP:  # a restarted stream: start over, from a keyframe
            self._drop_before(self._highest + 1)
            self._lost()
            self._next = None
            self._highest = sequence_number
            return sequence_number
        return self._highest + delta

    # ------------------------------------------------------------------ output

    def ready(self) -> list[EncodedFrame]:
        """Frames ready for the decoder, oldest first (taken: the next call starts over)."""
        frames, self._ready = self._ready, []
        return frames

    def actions(self, now: float) -> Actions:
        """The NACKs and the keyframe request due at ``now``; also gives up holes older than
        ``give_up`` (their frames are dropped, so :meth:`ready` may have frames after it)."""
        self._release(now)
        out = Actions()
        interval = self.current_nack_interval
        for index, hole in self._holes.items():
            if now - hole.nacked >= interval:
                hole.nacked = now
                out.nack.append(index & 0xFFFF)
        self.nacks_sent += len(out.nack)
        last_pli = self._last_pli
        if (
            self._need_keyframe
            and self._pli_due
            and (last_pli is None or now - last_pli >= self.pli_interval)
        ):
            self._last_pli = now
            self.keyframe_requests += 1
            out.pli = True
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`actions` next has something to do (None: nothing pending)."""
        interval, give_up = self.current_nack_interval, self.current_give_up
        times = [h.nacked + interval for h in self._holes.values()]
        times += [h.noticed + give_up for h in self._holes.values()]
        if self._need_keyframe and self._pli_due:
            last = self._last_pli
            times.append(0.0 if last is None else last + self.pli_interval)
        return min(times) if times else None

    @property
    def holes(self) -> list[int]:
        """Sequence numbers (16-bit) still missing and still asked for."""
        return [index & 0xFFFF for index in sorted(self._holes)]

    @property
    def waiting_for_keyframe(self) -> bool:
        return self._need_keyframe

    # ------------------------------------------------------------------ assembly

    def _frame_at(self, first: int) -> tuple[int, bool]:
        """The frame starting at ``first`` (present): (index of its last packet, complete)."""
        head = self._packets[first]
        index = first
        while True:
            packet = self._packets.get(index)
            if packet is None:
                return index - 1, False
            if packet.timestamp != head.timestamp:
                return index - 1, True  # a sender that does not mark: the next frame began
            if packet.marker:
                return index, True
            index += 1

    def _starts(self, index: int) -> bool:
        """The packet at ``index`` (present) is known to begin a frame."""
        packet = self._packets[index]
        if packet.start:
            return True
        before = self._packets.get(index - 1)
        if before is None and self._edge is not None and self._edge[0] == index - 1:
            before = self._edge[1]
        return before is not None and (before.marker or before.timestamp != packet.timestamp)

    def _complete_at(self, index: int) -> int | None:
        """The last index of a complete frame starting at ``index``, else None."""
        if index not in self._packets or not self._starts(index):
            return None
        last, complete = self._frame_at(index)
        return last if complete else None

    def _data(self, first: int, last: int) -> bytes:
        return b"".join(self._packets[i].data for i in range(first, last + 1))

    def _emit(self, first: int, last: int) -> None:
        data = self._data(first, last)
        self._ready.append(EncodedFrame(data, self._packets[first].timestamp, True))
        self._ready[-1].keyframe = self._is_keyframe(data)
        self.frames_released += 1
        self._drop_before(last + 1, count=False)

    def _drop_before(self, index: int, *, count: bool = True) -> None:
        """Forget every packet and hole before ``index``."""
        gone = sorted(i for i in self._packets if i < index)
        if gone:
            self._edge = (gone[-1], self._packets[gone[-1]])
        if count:
            self.frames_dropped += len({self._packets[i].timestamp for i in gone})
        for i in gone:
            del self._packets[i]
        for i in [i for i in self._holes if i < index]:
            del self._holes[i]
        if self._next is None or index > self._next:
            self._next = index

    def _lost(self) -> None:
        self._need_keyframe = True
        self._pli_due = True

    def _newest_keyframe(self) -> tuple[int, int] | None:
        """(first, last) of the newest complete keyframe in the buffer."""
        for index in sorted(self._packets, reverse=True):
            last = self._complete_at(index)
            if last is not None and self._is_keyframe(self._data(index, last)):
                return index, last
        return None

    def _release(self, now: float) -> None:
        while True:
            if not self._need_keyframe and self._next is not None:
                last = self._complete_at(self._next)
                if last is not None:
                    self._emit(self._next, last)
                    continue
            key = self._newest_keyframe() if self._packets else None
            if key is not None and (self._need_keyframe or key[0] != self._next):
                self._drop_before(key[0])  # skip to the newest decodable frame
                self._need_keyframe = self._pli_due = False
                self._emit(*key)
                continue
            if self._need_keyframe and self._drop_front():
                continue
            give_up = self.current_give_up
            expired = [i for i, h in self._holes.items() if now - h.noticed >= give_up]
            if expired:
                self._drop_before(max(expired) + 1)  # drop the incomplete frame(s)
                self._lost()
                continue
            return

    def _drop_front(self) -> bool:
        """While waiting for a keyframe: drop the oldest packets if they can never be
        decoded (a complete non-key frame, or the rest of a frame whose start is gone)."""
        if not self._packets:
            return False
        index = min(self._packets)
        if any(i < index for i in self._holes):
            return False
        if not self._starts(index):
            if self._edge is None or self._edge[0] != index - 1:
                return False  # its start may still come (reordering at the very start)
            self._drop_before(index + 1)
            return True
        last, complete = self._frame_at(index)
        if not complete:
            return False
        self._drop_before(last + 1)
        self._pli_due = True
        return True
