"""weft_udp.forwarder.gso_runs: which datagrams of one session one GSO send may carry (pure).

And the --udp-coalesce-ms option that goes with batched reads.
"""

from __future__ import annotations

from weft_udp.forwarder import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, gso_runs


def spans(sizes: list[int], max_segment: int = 1472, **kw: int) -> list[list[int]]:
    runs = gso_runs(sizes, max_segment, **kw)
    # the runs cover every datagram once, in order
    assert [i for start, stop in runs for i in range(start, stop)] == list(range(len(sizes)))
    return [sizes[start:stop] for start, stop in runs]


def test_same_size_datagrams_make_one_run() -> None:
    assert spans([1400] * 5) == [[1400] * 5]


def test_one_shorter_datagram_may_end_a_run_and_nothing_follows_it() -> None:
    assert spans([1400, 1400, 900, 1400]) == [[1400, 1400, 900], [1400]]
    assert spans([900, 900, 10, 10, 10]) == [[900, 900, 10], [10, 10]]


def test_a_larger_datagram_starts_a_new_run() -> None:
    assert spans([100, 100, 200, 200, 100]) == [[100, 100], [200, 200, 100]]


def test_empty_datagrams_are_never_part_of_a_run() -> None:
    # a zero-length segment would vanish inside a GSO send: empty datagrams go alone
    assert spans([0, 0, 100, 100, 0, 100]) == [[0], [0], [100, 100], [0], [100]]


def test_datagrams_larger_than_the_path_allows_go_alone() -> None:
    assert spans([1400, 1400, 1400], max_segment=1392) == [[1400], [1400], [1400]]
    assert spans([65507, 65507, 1400, 1400]) == [[65507], [65507], [1400, 1400]]
    assert spans([1400, 1400], max_segment=0) == [[1400], [1400]]


def test_runs_respect_the_kernel_limits() -> None:
    sizes = [100] * (GSO_MAX_SEGMENTS * 2 + 1)
    assert [len(r) for r in spans(sizes)] == [GSO_MAX_SEGMENTS, GSO_MAX_SEGMENTS, 1]
    big = [8000] * 20
    runs = spans(big, max_segment=65000)
    assert all(sum(r) <= GSO_MAX_BYTES for r in runs)
    assert [len(r) for r in runs] == [8, 8, 4]
    assert spans([1400] * 4, max_segments=3, max_bytes=100_000) == [[1400] * 3, [1400]]
    assert spans([1000, 1000, 1000], max_bytes=2500) == [[1000, 1000], [1000]]


def test_nothing_in_nothing_out() -> None:
    assert gso_runs([], 1472) == []


def test_coalesce_option_is_milliseconds_from_0_to_100() -> None:
    import argparse

    import pytest

    from weft_udp import _add_options

    parser = argparse.ArgumentParser()
    _add_options(parser, "tunnel")
    assert parser.parse_args([]).udp_coalesce_ms == 1.0
    assert parser.parse_args(["--udp-coalesce-ms", "0"]).udp_coalesce_ms == 0.0
    assert parser.parse_args(["--udp-coalesce-ms", "2.5"]).udp_coalesce_ms == 2.5
    for bad in ("-1", "101", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--udp-coalesce-ms", bad])
