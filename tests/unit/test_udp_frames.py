"""weft_udp.frames, sans-IO: datagrams packed into frames and joined back, with loss and damage."""

from __future__ import annotations

import random

import pytest

from weft_udp.frames import (
    CONTINUED,
    CONTINUES,
    HEADER,
    MAX_DATAGRAM,
    PIECE,
    Budget,
    Reassembly,
    pack,
)

FRAME = 1392  # WireGuard's MTU (1,420) less the IPv4 and UDP headers


def frames_of(data: bytearray, sizes: list[int]) -> list[memoryview]:
    view = memoryview(bytes(data))
    out, pos = [], 0
    for size in sizes:
        out.append(view[pos : pos + size])
        pos += size
    assert pos == len(data)
    return out


def deliver(frames: list[memoryview], reassembly: Reassembly) -> tuple[list[bytes], int]:
    got: list[memoryview | bytes] = []
    lost = sum(reassembly.feed(frame, got) for frame in frames)
    return [bytes(d) for d in got], lost


def datagram(index: int, size: int) -> bytes:
    """A datagram that says which one it is (so a wrong join cannot pass for a right one)."""
    if size < 4:
        return bytes([index % 251]) * size
    body = index.to_bytes(4, "big")
    return (body * (size // 4 + 1))[:size]


def test_1400_byte_datagrams_fill_every_packet() -> None:
    # Sent as they are, each is two IP fragments: 64 of them, 128 WireGuard packets.
    sent = [datagram(i, 1400) for i in range(64)]
    data, sizes, seq = pack(sent, FRAME, 7)
    assert len(sizes) == 65 and seq == 7 + 65  # one packet each (and one more)
    assert sizes[:-1] == [FRAME] * 64  # full frames: one GSO run
    got, lost = deliver(frames_of(data, sizes), Reassembly(Budget(1 << 20)))
    assert got == sent and lost == 0


def test_small_datagrams_share_a_frame_and_are_never_cut() -> None:
    sent = [datagram(i, 64) for i in range(100)]
    data, sizes, _ = pack(sent, FRAME, 0)
    per_frame = (FRAME - HEADER) // (64 + PIECE)
    assert len(sizes) == -(-100 // per_frame)
    for frame in frames_of(data, sizes):
        assert not frame[0] & (CONTINUED | CONTINUES)
    got, lost = deliver(frames_of(data, sizes), Reassembly(Budget(1 << 20)))
    assert got == sent and lost == 0


def test_a_datagram_that_fits_a_frame_starts_a_new_one_rather_than_be_cut() -> None:
    sent = [datagram(0, 1000), datagram(1, 1000), datagram(2, FRAME - HEADER - PIECE)]
    data, sizes, _ = pack(sent, FRAME, 0)
    assert sizes == [HEADER + PIECE + 1000] * 2 + [FRAME]
    assert deliver(frames_of(data, sizes), Reassembly(Budget(1 << 20))) == (sent, 0)


@pytest.mark.parametrize("size", [0, 1, 8000, 65507])
def test_sizes_up_to_the_udp_maximum_cross_whole(size: int) -> None:
    sent = [datagram(1, size), datagram(2, size)]
    data, sizes, _ = pack(sent, FRAME, 0)
    budget = Budget(1 << 20)
    assert deliver(frames_of(data, sizes), Reassembly(budget)) == (sent, 0)
    assert budget.used == 0


def test_seq_wraps() -> None:
    sent = [datagram(i, 3000) for i in range(4)]
    data, sizes, seq = pack(sent, FRAME, 0xFFFFFFFE)
    assert seq == (0xFFFFFFFE + len(sizes)) & 0xFFFFFFFF
    assert deliver(frames_of(data, sizes), Reassembly(Budget(1 << 20))) == (sent, 0)


def test_a_lost_frame_loses_the_datagrams_it_carried_and_never_joins_two() -> None:
    sent = [datagram(i, 1400) for i in range(10)]
    data, sizes, _ = pack(sent, FRAME, 0)
    frames = frames_of(data, sizes)
    del frames[3]  # carries the end of datagram 2 and the start of datagram 3
    got, lost = deliver(frames, Reassembly(Budget(1 << 20)))
    assert got == sent[:2] + sent[4:]
    assert lost >= 1  # what it saw cut (the network's losses are not all visible, as ever)


def test_random_loss_reordering_and_duplication_deliver_only_true_datagrams() -> None:
    rng = random.Random(1)
    for trial in range(300):
        frame_size = rng.choice([64, 200, 1232, FRAME, 9000])
        sent = [datagram(trial * 1000 + i, rng.choice([0, 1, 50, 1400, 3000, rng.randrange(20000)]))
                for i in range(rng.randrange(1, 40))]
        data, sizes, _ = pack(sent, frame_size, rng.randrange(1 << 32))
        assert all(size <= frame_size for size in sizes)
        frames = frames_of(data, sizes)
        clean = rng.random() < 0.2
        if not clean:
            for _ in range(rng.randrange(1, 4)):
                kind = rng.randrange(3)
                i = rng.randrange(len(frames))
                if kind == 0:
                    del frames[i]
                elif kind == 1:
                    frames.insert(rng.randrange(len(frames) + 1), frames[i])
                else:
                    j = rng.randrange(len(frames))
                    frames[i], frames[j] = frames[j], frames[i]
                if not frames:
                    break
        budget = Budget(1 << 20)
        reassembly = Reassembly(budget)
        got, lost = deliver(frames, reassembly)
        if clean:
            assert got == sent and lost == 0
        else:
            assert set(got) <= set(sent), trial  # nothing made up, nothing joined wrongly
        reassembly.close()
        assert budget.used == 0


def test_damaged_frames_are_counted_and_never_raise() -> None:
    rng = random.Random(2)
    sent = [datagram(i, rng.randrange(3000)) for i in range(30)]
    data, sizes, _ = pack(sent, FRAME, 0)
    frames = frames_of(data, sizes)
    for _ in range(2000):
        frame = bytearray(rng.choice(frames))
        for _ in range(rng.randrange(1, 4)):
            if frame and rng.random() < 0.5:
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            else:
                frame = frame[: rng.randrange(len(frame) + 1)]
        budget = Budget(1 << 20)
        reassembly = Reassembly(budget)
        got: list[memoryview | bytes] = []
        reassembly.feed(memoryview(bytes(frame)), got)
        reassembly.close()
        assert budget.used == 0
    # A plain datagram (what a peer without frames sends) is not taken for one.
    got = []
    assert Reassembly(Budget(100)).feed(memoryview(b"\x00plain datagram"), got) == 1
    assert got == []


def test_joining_is_bounded_per_datagram_and_over_all_sessions() -> None:
    big = pack([datagram(0, 8000)], FRAME, 0)
    budget = Budget(10_000)
    first, second = Reassembly(budget), Reassembly(budget)
    frames = frames_of(*big[:2])
    got: list[memoryview | bytes] = []
    for frame in frames[:-1]:
        first.feed(frame, got)  # holds ~6.9 KB, waiting for the last frame
    assert budget.used > 6000
    # Over the budget, the oldest datagram being joined makes room for the newer one: a peer
    # that starts datagrams and never ends them cannot keep others' out.
    assert sum(second.feed(frame, got) for frame in frames) == 0
    assert [bytes(d) for d in got] == [datagram(0, 8000)]
    assert first.feed(frames[-1], got) == 1  # counted once, its end skipped
    assert len(got) == 1 and budget.used == 0 and not budget.holders
    # A peer's pieces cannot add up past the UDP maximum.
    head = bytes([0xA0 | CONTINUES]) + bytes(4) + (0).to_bytes(4, "big")
    piece = (40_000).to_bytes(2, "big") + bytes(40_000)
    more = bytes([0xA0 | CONTINUED | CONTINUES]) + bytes(4) + (1).to_bytes(4, "big")
    lone = Reassembly(Budget(1 << 20))
    assert lone.feed(memoryview(head + piece), got) == 0
    assert lone.feed(memoryview(more + piece), got) == 1
    assert len(got) == 1 and MAX_DATAGRAM < 80_000


def test_a_frame_too_small_to_hold_anything_is_refused() -> None:
    with pytest.raises(ValueError):
        pack([b"x"], HEADER + PIECE, 0)


def test_a_shared_budget_is_never_exceeded_and_always_adds_up() -> None:
    rng = random.Random(3)
    budget = Budget(20_000)
    sessions = [Reassembly(budget) for _ in range(20)]
    streams = []
    for i in range(20):
        sent = [datagram(i * 100 + j, rng.randrange(9000)) for j in range(20)]
        streams.append(frames_of(*pack(sent, FRAME, 0)[:2]))
    got: list[memoryview | bytes] = []
    while any(streams):
        i = rng.randrange(20)
        if not streams[i]:
            continue
        frame = streams[i].pop(0)
        if rng.random() < 0.1:
            continue  # lost
        sessions[i].feed(frame, got)
        assert budget.used <= budget.limit
        held = sum(len(s._partial) for s in sessions if s._partial is not None)
        assert budget.used == held and len(budget.holders) == sum(
            s._partial is not None for s in sessions)
    for session in sessions:
        session.close()
    assert budget.used == 0 and not budget.holders


def test_a_datagram_begun_before_all_others_cannot_grow_by_pushing_them_out() -> None:
    budget = Budget(6000)
    stale, honest = Reassembly(budget), Reassembly(budget)
    got: list[memoryview | bytes] = []
    head = bytes([0xA0 | CONTINUES]) + bytes(4) + (0).to_bytes(4, "big")
    more = bytes([0xA0 | CONTINUED | CONTINUES]) + bytes(4) + (1).to_bytes(4, "big")
    piece = (2500).to_bytes(2, "big") + bytes(2500)
    assert stale.feed(memoryview(head + piece), got) == 0  # begun first, never ended
    honest_frames = frames_of(*pack([datagram(7, 3000)], 1392, 0)[:2])
    for frame in honest_frames[:-1]:
        honest.feed(frame, got)  # 2,770 bytes held, waiting for its last frame
    # The stale one asks to grow past the budget: it is dropped, not the younger one.
    assert stale.feed(memoryview(more + piece), got) == 1
    assert honest.feed(honest_frames[-1], got) == 0
    assert [bytes(d) for d in got] == [datagram(7, 3000)]
    assert budget.used == 0 and not budget.holders


def test_a_frame_holds_at_most_64_pieces_both_ways() -> None:
    from weft_udp.frames import MAX_PIECES

    data, sizes, _ = pack([b""] * 200, FRAME, 0)
    assert len(sizes) == 4  # 64 + 64 + 64 + 8 pieces, not one frame of 200
    assert deliver(frames_of(data, sizes), Reassembly(Budget(100))) == ([b""] * 200, 0)
    crafted = bytes([0xA0]) + bytes(8) + bytes(2 * 693)  # 693 empty pieces
    got: list[memoryview | bytes] = []
    assert Reassembly(Budget(100)).feed(memoryview(crafted), got) == 1
    assert len(got) == MAX_PIECES


def test_frames_carry_their_session_number() -> None:
    from weft_udp.frames import session_of

    data, sizes, _ = pack([datagram(1, 3000), b"", datagram(2, 10)], FRAME, 5, session=0xDEADBEEF)
    assert [session_of(f) for f in frames_of(data, sizes)] == [0xDEADBEEF] * len(sizes)
    assert session_of(b"\x00plain datagram") is None and session_of(b"\xa0abc") is None
