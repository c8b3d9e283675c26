"""gram.py: dot products whose bits do not depend on how a tensor is cut along dim 0."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge.gram import Gram, gram_of, row_sums


def test_row_sums_do_not_depend_on_the_rows_beside_them():
    # 40000 columns: above torch's grain size, where a single output would be split
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 40000, generator=g)
    whole = row_sums(p)
    parts = torch.cat([row_sums(p[a : a + k]) for a, k in [(0, 1), (1, 2), (3, 3)]])
    assert torch.equal(whole, parts)
    assert torch.equal(row_sums(p[2:3]), whole[2:3])


@pytest.mark.parametrize("mode", ["flat", "last", "first"])
@pytest.mark.parametrize("step", [1, 2, 5])
def test_gram_over_row_chunks_equals_the_whole_tensor(mode, step):
    g = torch.Generator().manual_seed(1)
    vs = [torch.randn(11, 3, 7, generator=g) for _ in range(3)]
    chunked = Gram(mode, 3)
    for a in range(0, 11, step):
        chunked.add([v[a : a + step] for v in vs])
    whole = gram_of(mode, vs)
    assert torch.equal(chunked.result(), whole)
    # the values: float64 dot products of the vectors (the reference sums in float64)
    ref = {
        "flat": lambda a, b: (a.double() * b.double()).sum(),
        "last": lambda a, b: (a.double() * b.double()).sum(-1).reshape(-1),
        "first": lambda a, b: (a.double() * b.double()).sum(0),
    }[mode]
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(whole[i, j], ref(vs[i], vs[j]), rtol=1e-6, atol=1e-6)


def test_diag_only_sums_the_squares():
    v = [torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])]
    g = gram_of("flat", v, diag=True)
    assert g[0, 0] == 25 and g[1, 1] == 1 and math.isnan(float(g[0, 1]))
