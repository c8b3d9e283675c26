"""The disk path's streaming selection (radix.py) and draws: same answers, fewer passes.

magnitude_cuts collects a small target bucket's entries in its second pass and skips the
third; a large bucket (exact zeros) still takes three, unless the whole stream is one value
(a tensor a model left as the base: one pass for all-zero streams). draws(out=...) fills a chunk's
buffer a piece at a time with the same bytes as a fresh draw.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import radix as rx
from evomerge.merge import sparsify as sp


def _stream(mags: list[torch.Tensor], step: int, passes: list[int]):
    """chunks() over flat |delta| tensors in pieces of `step`, counting the passes made."""

    def chunks():
        passes[0] += 1
        n = mags[0].numel()
        for a in range(0, n, step):
            yield tuple(m[a : a + step] for m in mags)

    return chunks


def _reference(mag: torch.Tensor, p: int) -> tuple[float, int]:
    order = sp.magnitude_order(mag)
    first = int(order[p])
    return float(mag[first]), first


def _deltas(n: int, seed: int) -> torch.Tensor:
    """|x - base| of bf16-rounded rows: many exact ties, many exponent buckets."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()
    x = (base + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16).float()
    return (x - base).abs()


@pytest.mark.parametrize("collect", [True, False])
def test_cuts_over_chunks_match_the_sorted_order(monkeypatch, collect):
    # collect buckets of up to 5000 entries (not the 12000+ zeros), or none
    monkeypatch.setattr(rx, "_COLLECT", 5000 if collect else 0)
    monkeypatch.setattr(rx, "BLOCK", 1000)  # blocks inside chunks, not aligned with them
    mags = [_deltas(30_011, 0), _deltas(30_011, 1)]
    mags[1][:12_000] = 0.0  # a dense bucket of exact zeros in the second stream
    asked = [(0, 0), (0, 15_005), (0, 29_000), (1, 11_999), (1, 12_000), (1, 20_500), (1, 30_011)]
    passes = [0]
    got = rx.magnitude_cuts(_stream(mags, 7_777, passes), asked)
    for (s, p), cut in zip(asked, got, strict=True):
        assert cut == (_reference(mags[s], p) if p < 30_011 else (float("inf"), 30_011)), (s, p)
    assert passes[0] == 3  # the zeros' bucket (and, without collecting, all) needs pass 3


def test_small_buckets_need_two_passes():
    mag = _deltas(50_000, 2)
    passes = [0]
    got = rx.magnitude_cuts(_stream([mag], 6_000, passes), [(0, 25_000), (0, 40_000)])
    assert got == [_reference(mag, 25_000), _reference(mag, 40_000)]
    assert passes[0] == 2


@pytest.mark.parametrize("collect", [True, False])
def test_a_stream_of_zeros_takes_one_pass(monkeypatch, collect):
    monkeypatch.setattr(rx, "_COLLECT", 5000 if collect else 0)
    monkeypatch.setattr(rx, "BLOCK", 1000)
    zeros = torch.zeros(30_011)
    asked = [(0, 0), (0, 15_005), (0, 30_010)]
    passes = [0]
    got = rx.magnitude_cuts(_stream([zeros], 7_777, passes), asked)
    assert (
        got == [_reference(zeros, p) for _, p in asked] == [(0.0, 0), (0.0, 15_005), (0.0, 30_010)]
    )
    assert passes[0] == 1
    # beside a stream with data, the zeros' cuts come without passes of their own
    mag = _deltas(30_011, 3)
    passes = [0]
    got = rx.magnitude_cuts(_stream([zeros, mag], 7_777, passes), [(0, 20_000), (1, 20_000)])
    assert got == [_reference(zeros, 20_000), _reference(mag, 20_000)]
    assert passes[0] == 2 if collect else 3


@pytest.mark.parametrize("value", [1e-41, 0.5])  # a denormal (lowest bucket), a normal
def test_a_stream_of_one_value_skips_pass_three(monkeypatch, value):
    monkeypatch.setattr(rx, "_COLLECT", 0)
    monkeypatch.setattr(rx, "BLOCK", 1000)
    same = torch.full((30_011,), value)
    passes = [0]
    got = rx.magnitude_cuts(_stream([same], 7_777, passes), [(0, 12_345)])
    assert got == [_reference(same, 12_345)] == [(float(same[0]), 12_345)]
    assert passes[0] == 2
    same[29_000] = 0.0  # one entry differs: its position has to be found (pass 3)
    passes = [0]
    got = rx.magnitude_cuts(_stream([same], 7_777, passes), [(0, 12_345)])
    assert got == [_reference(same, 12_345)]
    assert passes[0] == 3


@pytest.mark.parametrize(("numel", "start", "stop"), [(1000, 0, 1000), (1000, 3, 517),
                                                      (1001, 999, 1001), (77, 13, 14)])  # fmt: skip
def test_draws_into_a_buffer_are_the_same_bytes(monkeypatch, numel, start, stop):
    monkeypatch.setattr(sp, "_DRAW_PIECE", 5)  # many pieces, first and last partial
    ref = sp.draws(7, "t", 2, numel, "cpu", start, stop)
    out = torch.full((2, stop - start), 3, dtype=torch.uint8)
    assert sp.draws(7, "t", 2, numel, "cpu", start, stop, out=out) is out
    assert torch.equal(out, ref)
