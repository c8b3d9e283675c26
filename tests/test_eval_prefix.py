"""Prefix reuse (hf.prefix.PrefixStore): the trie, the rebuilt caches, and HFBackend passes
that run only the part of a row no earlier row of the evaluation covered."""

from __future__ import annotations

import pytest
import torch
from test_eval_support import build_tiny_model

from evomerge.eval.hf.backend import HFBackend
from evomerge.eval.hf.prefill import prefill
from evomerge.eval.hf.prefix import PrefixStore
from evomerge.eval.protocol import GenerationSpec


def _kv(length: int, start: float, layers: int = 2):
    """Per layer (keys, values) of one row  # (length, heads=1, dim=2): entry i = start + i
    (+ 1000 per layer; values negated)."""
    x = (start + torch.arange(length, dtype=torch.float32))[:, None, None].expand(length, 1, 2)
    return tuple((x.clone() + 1000 * layer, -x.clone()) for layer in range(layers))


def test_trie_finds_the_longest_stored_beginning_within_the_limit():
    store = PrefixStore(1 << 20)
    store.add([[1, 2, 3, 4]], _kv(4, 0.0))
    store.add([[1, 2, 5]], _kv(3, 100.0))
    assert store.match([1, 2, 3, 9], limit=10) == (0, 3)
    assert store.match([1, 2, 3, 4, 5], limit=3) == (0, 3)  # at most limit tokens
    assert store.match([1, 2, 5, 7], limit=10) == (1, 3)
    assert store.match([1, 2], limit=10) == (0, 2)  # the first row through a node owns it
    assert store.match([9, 1], limit=10) == (-1, 0)
    assert store.match([1], limit=0) == (-1, 0)


def test_budget_stops_taking_rows():
    row_bytes = 2 * 2 * (3 * 2 * 4)  # layers x (keys, values) x 3 positions x 2 floats x 4 B
    store = PrefixStore(row_bytes)
    store.add([[1, 2, 3]], _kv(3, 0.0))
    store.add([[7, 8, 9]], _kv(3, 0.0))  # over budget: not stored
    assert store.nbytes == row_bytes
    assert store.match([7, 8], limit=5) == (-1, 0)


def test_cache_for_left_pads_each_rows_beginning():
    store = PrefixStore(1 << 20)
    two = tuple((torch.cat([k0, k1]), torch.cat([v0, v1]))
                for (k0, v0), (k1, v1) in zip(_kv(4, 0.0), _kv(2, 100.0), strict=True))  # fmt: skip
    store.add([[1, 2, 3, 4], [5, 6]], two)  # two rows of one pass
    assert store.match([5, 6, 7], limit=5) == (1, 2)
    cache, mask = store.cache_for([(0, 3), (-1, 0), (1, 1)], "cpu")
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]
    keys = cache.layers[1].keys  # (rows, heads, width, dim)
    assert keys.shape == (3, 1, 3, 2)
    assert keys[0, 0, :, 0].tolist() == [1000.0, 1001.0, 1002.0]
    assert keys[1].abs().sum() == 0  # a row with nothing reused holds padding only
    assert keys[2, 0, :, 0].tolist() == [0.0, 0.0, 1100.0]
    assert cache.layers[0].values[2, 0, 2, 1] == -100.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=1)


class Counting(HFBackend):
    """Counts the input tokens each forward pass feeds (padding included)."""

    def forward(self, ids, mask, pos, cache, logits_to_keep):
        self.fed.append(tuple(ids.shape))
        return super().forward(ids, mask, pos, cache, logits_to_keep)


@pytest.fixture
def backend(model_dir):
    be = Counting(model_dir, device="cpu", batch_size=8)
    be.fed = []
    return be


def _seqs(be, texts):
    return [be._encode(t) for t in texts]


def test_reused_rows_give_the_logits_of_a_full_pass(backend):
    first = _seqs(backend, ["add 12+30=", "rev abcdef=", "q1: pick?"])
    later = _seqs(backend, ["add 12+30=4", "rev abcxyz=", "cap Velmora=", "q1: pick? dog"])
    keep = 2
    plain = prefill(backend, later, keep)[0].logits
    with backend.reusing_prefixes():
        prefill(backend, first, 1)
        backend.fed.clear()
        out, mask, last = prefill(backend, later, keep)
    # each row runs what no stored row covers, keep tokens at least (BOS + one id per char):
    # "add 12+30=" stored: 2 own; "<bos>rev abc" shared: 12 - 8 = 4; only BOS: 13 - 1 = 12;
    # "q1: pick?" stored: 14 - 10 = 4
    assert [len(s) for s in later] == [12, 12, 13, 14]
    assert backend.fed == [(4, 12)]
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)
    assert mask.sum(1).tolist() == [len(s) for s in later]
    assert last.tolist() == [len(s) - 1 for s in later]  # positions count from each row's start


REQS = [("add 3+4=", "7"), ("add 3+4=", "8"), ("rev abc=", "cba"), ("q1: pick?", " dog")]
GEN = [("add 3+4=", GenerationSpec(until=("\n",), max_gen_toks=5)),
       ("rev abc=", GenerationSpec(until=("\n",), max_gen_toks=5))]  # fmt: skip


def test_generation_after_scoring_reuses_the_contexts_and_gives_the_same_results(backend):
    plain_ll, plain_gen = backend.loglikelihood(REQS), backend.generate(GEN)
    backend.fed.clear()
    backend._drafts.clear()
    with backend.reusing_prefixes():
        ll = backend.loglikelihood(REQS)
        scored = list(backend.fed)
        gen = backend.generate(GEN)
    assert gen == plain_gen
    for (a, ga), (b, gb) in zip(ll, plain_ll, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    prompt_pass = backend.fed[len(scored)]
    assert prompt_pass == (2, 1)  # the prompts were scored as contexts: only the last token
    assert backend.prefix_store is None  # the block ended: nothing kept


def test_loading_weights_drops_the_stored_rows(backend):
    with backend.reusing_prefixes():
        backend.loglikelihood(REQS)
        assert backend.prefix_store.nbytes > 0
        norm = backend.live_tensors()["model.norm.weight"]
        backend.load_weights([("model.norm.weight", norm * 2)])
        assert backend.prefix_store.nbytes == 0


def test_switched_off_or_on_a_cache_it_cannot_store(model_dir):
    off = HFBackend(model_dir, device="cpu", batch_size=8, prefix_reuse=False)
    with off.reusing_prefixes():
        assert off.prefix_store is None
    store = PrefixStore(1 << 20)

    class Sliding:  # a layer type other than a plain DynamicLayer
        pass

    cache = type("C", (), {"layers": [Sliding()]})()
    store.add_batch([[1, 2]], cache, torch.ones((1, 2)))
    assert not store.enabled and store.nbytes == 0
