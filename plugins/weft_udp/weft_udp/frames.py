"""Frames: how visitors' datagrams cross the WireGuard link between the server and the tunnel.

Sans-IO: bytes in, bytes out; no sockets, no clock.

Why frames. Inside WireGuard the path MTU is 1,420 bytes, so a 1,400-byte datagram sent as it is
becomes two IP fragments: two WireGuard packets, the second carrying 8 bytes. WireGuard's cost is
per packet far more than per byte (bare WireGuard between two namespaces here carries 221-225
Mbit/s of 1,400-byte datagrams and 332-356 Mbit/s of 1,364-byte ones, which fit a packet), and
a WireGuard endpoint behind Weft (its 1,452-byte datagrams) or any large datagram pays it on every
packet. So between the server's session socket and the tunnel's forwarder each session's datagrams
travel in frames that fill the path's packets:

    frame = flags (1 byte) | session (4 bytes) | seq (4 bytes, big-endian) | piece*
    piece = length (2 bytes, big-endian) | that many bytes

`session` is a random number the server gives each visitor's session, carried both ways: the
tunnel knows a session by the server's port, which the server's kernel hands to the next new
visitor once a session ends, so a frame with another number on a known port is a new visitor (the
tunnel starts a new session for it), and a reply with another number is not for this session (the
server drops it). `seq` counts a session's frames in one direction. A piece is a whole datagram,
except that the first piece of a frame may be the end of the datagram the previous frame's last
piece began (flag CONTINUED), and the last piece may go on in the next frame (flag CONTINUES). A
datagram that fits an empty frame (the frame size less 11 bytes of headers) is never cut: it goes
whole, in a new frame if this one has no room, so it is in one packet, as without frames (the same
exposure to loss). Larger ones, which WireGuard would fragment anyway, fill the frame they start
in and go on in the next (at most one packet more than their fragments). A frame holds at most
`MAX_PIECES` pieces.

The receiver (`Reassembly`, one per session and direction) joins a datagram's pieces only across
frames with consecutive numbers; a gap (a frame lost or overtaken) drops the datagram it cut, never
joins pieces of two datagrams. Joined datagrams are bounded (`MAX_DATAGRAM` each, and a `Budget`
over all sessions), since the peer on the other end decides what arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

HEADER = 9  # flags, session and seq
PIECE = 2  # a piece's length
VERSION = 0xA0  # the flags byte's high nibble: what a frame starts with (a plain datagram rarely)
VERSION_MASK = 0xF0
CONTINUED = 0x01  # the first piece ends the previous frame's last datagram
CONTINUES = 0x02  # the last piece goes on in the next frame
MAX_DATAGRAM = 65535  # no joined datagram grows past this (UDP's own maximum is 65,507 bytes)
SEQ_MASK = 0xFFFFFFFF
MIN_FRAME = HEADER + PIECE + 1
# Pieces in one frame at most: without a cap, one frame of 693 empty pieces would have the
# server send 693 datagrams to a visitor for one packet from the tunnel.
MAX_PIECES = 64


def pack(
    datagrams: Sequence[bytes | bytearray | memoryview], frame_size: int, seq: int,
    session: int = 0,
) -> tuple[bytearray, list[int], int]:
    """Lay `datagrams` (one session's, in order) out as frames of at most `frame_size` bytes.

    Returns the frames back to back, their sizes in order (all `frame_size` when the datagrams
    fill them, so runs of them suit one GSO send), and the next `seq`. Never splits a datagram
    that fits an empty frame.
    """
    if frame_size < MIN_FRAME:
        raise ValueError(f"a frame of {frame_size} bytes holds nothing")
    room_whole = frame_size - HEADER - PIECE  # the largest datagram a frame holds whole
    tag = (session & 0xFFFFFFFF).to_bytes(4, "big")
    out = bytearray()
    sizes: list[int] = []
    start = -1  # where the open frame begins in `out` (-1: none open)
    pieces = 0  # in the open frame
    for data in datagrams:
        n = len(data)
        if start >= 0:
            room = frame_size - (len(out) - start) - PIECE
            if pieces >= MAX_PIECES or (n > room and (n <= room_whole or room < 1)):
                sizes.append(len(out) - start)  # no room for it whole: close the frame
                start = -1
        if start < 0:
            start = len(out)
            out += bytes((VERSION,)) + tag + (seq & SEQ_MASK).to_bytes(4, "big")
            seq += 1
            pieces = 0
        # Write the datagram, going on in new frames while it does not fit the open one.
        done = 0
        while True:
            room = frame_size - (len(out) - start) - PIECE
            take = min(n - done, room)
            out += take.to_bytes(2, "big")
            out += data[done : done + take]
            done += take
            pieces += 1
            if done == n:
                break
            out[start] |= CONTINUES
            sizes.append(len(out) - start)
            start = len(out)
            out += bytes((VERSION | CONTINUED,)) + tag + (seq & SEQ_MASK).to_bytes(4, "big")
            seq += 1
            pieces = 0
        if frame_size - (len(out) - start) < PIECE:  # full: not even an empty datagram fits
            sizes.append(len(out) - start)
            start = -1
    if start >= 0:
        sizes.append(len(out) - start)
    return out, sizes, seq & SEQ_MASK


def session_of(frame: memoryview | bytes) -> int | None:
    """The session number a frame carries, or None if it is no frame."""
    if len(frame) < HEADER or frame[0] & VERSION_MASK != VERSION:
        return None
    return int.from_bytes(frame[1:5], "big")


class Budget:
    """Bytes that datagrams being joined may hold at once, over every session of a process.

    When a datagram needs room, the oldest one being joined elsewhere is dropped for it: an
    honest peer sends a datagram's frames back to back, so its datagrams are joined within
    microseconds, and a peer that starts datagrams and never ends them (to hold memory, or to
    starve other tunnels of it) only ever loses its own stale ones.
    """

    __slots__ = ("holders", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.holders: OrderedDict[Reassembly, None] = OrderedDict()  # oldest datagram first

    def make_room(self, more: int, asking: Reassembly) -> bool:
        """Drop the oldest datagrams being joined until `more` bytes fit; False (nothing
        dropped) when the oldest is `asking`'s own: a datagram begun before all the others
        cannot grow by pushing them out."""
        holders = self.holders
        while self.used + more > self.limit:
            oldest = next(iter(holders), None)
            if oldest is None or oldest is asking:  # the stalest is the one asking: it loses
                return False
            oldest.drop_for_room()
        return True


class Reassembly:
    """One session's frames in one direction, back into datagrams."""

    __slots__ = ("_budget", "_expect", "_owed", "_partial", "_skipping")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._expect = -1  # the seq of the next frame if none is lost (-1: none seen yet)
        self._partial: bytearray | None = None  # a datagram being joined
        self._skipping = False  # discarding the rest of a datagram already counted as lost
        self._owed = 0  # datagrams dropped for room elsewhere, counted at the next feed

    def feed(self, frame: memoryview, out: list[memoryview | bytes]) -> int:
        """Append the datagrams that `frame` completes to `out` (whole pieces as views into
        `frame`); return how many datagrams were found lost or malformed."""
        n = len(frame)
        if n < HEADER or frame[0] & VERSION_MASK != VERSION:
            return 1
        flags = frame[0]
        seq = int.from_bytes(frame[5:9], "big")
        lost, self._owed = self._owed, 0
        if seq != self._expect:
            if self._partial is not None:
                self._drop_partial()
                lost += 1
                self._skipping = True  # a piece continuing it here belongs to it
            elif not flags & CONTINUED:
                self._skipping = False
        elif not flags & CONTINUED and self._partial is not None:  # (a peer breaking the format)
            self._drop_partial()
            lost += 1
        self._expect = (seq + 1) & SEQ_MASK
        pos = HEADER
        first = True
        pieces = 0
        while pos < n:
            pieces += 1
            if pos + PIECE > n or pieces > MAX_PIECES:
                return lost + self._malformed()
            size = frame[pos] << 8 | frame[pos + 1]
            pos += PIECE
            end = pos + size
            if end > n:
                return lost + self._malformed()
            piece = frame[pos:end]
            pos = end
            goes_on = end == n and bool(flags & CONTINUES)
            if first and flags & CONTINUED:
                lost += self._continue(piece, goes_on, out)
            elif goes_on:
                if self._partial is not None:  # (only from a peer that breaks the format)
                    self._drop_partial()
                    lost += 1
                self._skipping = False
                lost += self._start(piece)
            else:
                out.append(piece)
            first = False
        if first and flags & CONTINUED:  # a frame with no piece cannot continue anything
            return lost + self._malformed()
        return lost

    def close(self) -> None:
        """Give back what a datagram being joined held (its session is gone)."""
        if self._partial is not None:
            self._drop_partial()

    def _continue(self, piece: memoryview, goes_on: bool, out: list[memoryview | bytes]) -> int:
        partial = self._partial
        lost = 0
        if partial is None:
            if not self._skipping:  # its beginning never came
                lost = 1
                self._skipping = True
        elif not self._grow(len(piece)):
            self._drop_partial()
            lost = 1
            self._skipping = True
        else:
            partial += piece
        if not goes_on:
            self._skipping = False
            if self._partial is not None:
                out.append(bytes(self._partial))
                self._drop_partial()
        return lost

    def drop_for_room(self) -> None:
        """The budget needs this datagram's room: drop it (the rest of it is skipped)."""
        self._drop_partial()
        self._skipping = True
        self._owed += 1

    def _start(self, piece: memoryview) -> int:
        if not self._grow(len(piece)):
            self._skipping = True
            return 1
        self._partial = bytearray(piece)
        self._budget.holders[self] = None
        return 0

    def _grow(self, more: int) -> bool:
        held = len(self._partial) if self._partial is not None else 0
        budget = self._budget
        if held + more > MAX_DATAGRAM:
            return False
        if budget.used + more > budget.limit and not budget.make_room(more, self):
            return False
        budget.used += more
        return True

    def _drop_partial(self) -> None:
        if self._partial is not None:
            self._budget.used -= len(self._partial)
            self._budget.holders.pop(self, None)
            self._partial = None

    def _malformed(self) -> int:
        self._drop_partial()
        self._skipping = False
        self._expect = -1
        return 1
