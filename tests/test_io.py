"""Checkpoint reader and writer: lazy reads, sharding, atomic output, refusals and corruption."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.io import MARKER, open_checkpoint, resolve_model_path
from evomerge.merge.writer import CheckpointWriter, check_out_dir, parse_size


def test_reader_matches_safetensors(tiny_model, read_tensors):
    path = tiny_model(arch="qwen2", seed=3, dtype=torch.bfloat16)
    expected = read_tensors(path)
    with open_checkpoint(str(path)) as r:
        assert sorted(r.keys()) == sorted(expected)
        assert r.config["model_type"] == "qwen2"
        for name, t in expected.items():
            assert r.shape(name) == tuple(t.shape)
            assert r.dtype(name) == torch.bfloat16
            assert torch.equal(r.get_tensor(name), t)
            buf = torch.empty(t.shape, dtype=torch.float32)
            r.read_into(name, buf)  # converts into a reused fp32 buffer
            assert torch.equal(buf, t.float())


def test_reader_sharded(tiny_model, read_tensors):
    path = tiny_model(seed=1, shards=3)
    assert (path / "model.safetensors.index.json").exists()
    expected = read_tensors(path)
    with open_checkpoint(path) as r:
        assert sorted(r.keys()) == sorted(expected)
        assert all(torch.equal(r.get_tensor(n), t) for n, t in expected.items())


def test_truncated_file_names_file_and_tensor(tiny_model):
    path = tiny_model()
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # the last tensor loses its tail
    with pytest.raises(MergeError, match=r"model\.safetensors: tensor '.+' is corrupt or trunc"):
        open_checkpoint(path)
    f.write_bytes(b"\x05\x00")  # not even a header length
    with pytest.raises(MergeError, match="not a valid safetensors file"):
        open_checkpoint(path)


def test_nan_in_source_is_reported(tiny_model):
    path = tiny_model()
    sd = load_file(str(path / "model.safetensors"))
    sd["model.norm.weight"][3] = float("nan")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(sd, str(path / "model.safetensors"))
    with open_checkpoint(path) as r:
        with pytest.raises(MergeError, match=r"model\.safetensors: tensor 'model\.norm\.weight'"):
            r.get_tensor("model.norm.weight")
        buf = torch.empty(r.shape("model.layers.0.mlp.up_proj.weight"))
        with pytest.raises(MergeError, match="contains NaN or inf"):
            r.read_into("model.layers.0.mlp.up_proj.weight", buf)
        r.get_tensor("model.layers.0.mlp.down_proj.weight")  # the others still read


def test_row_chunks_are_checked_once_and_every_row_is_checked(tiny_model, monkeypatch):
    """Multi-pass merges read each row chunk several times: rows 0.. checked once are not
    checked again, but a chunk read out of order (or a row not yet checked) always is."""
    path = tiny_model()
    name = "model.layers.0.mlp.up_proj.weight"
    sd = load_file(str(path / "model.safetensors"))
    sd[name][13, 1] = float("nan")
    save_file(sd, str(path / "model.safetensors"))
    with open_checkpoint(path) as r:
        checks: list[int] = []
        real = r._check_finite
        monkeypatch.setattr(r, "_check_finite", lambda n, t: (checks.append(len(t)), real(n, t)))
        buf = torch.empty(4, *r.shape(name)[1:])
        for r0 in (0, 4, 0, 4):  # a second pass over rows 0..8: checked already
            r.read_rows_into(name, r0, buf)
        assert checks == [4, 4]
        with pytest.raises(MergeError, match="contains NaN or inf"):
            r.read_rows_into(name, 12, buf[:2])  # out of order: checked all the same
        r.read_rows_into(name, 8, buf)
        assert checks == [4, 4, 2, 4]
        for _ in range(2):  # a chunk that failed is checked again on every read
            with pytest.raises(MergeError, match="contains NaN or inf"):
                r.read_rows_into(name, 12, buf[:2])


def test_row_chunks_read_from_threads_at_once(tiny_model, read_tensors):
    """A disk merge's workers read row chunks without a lock (positional reads, a staging
    buffer per thread): chunks of every tensor read by four threads at once, cast from
    bf16 on the way, equal the tensors safetensors loads."""
    from concurrent.futures import ThreadPoolExecutor

    path = tiny_model(seed=5, dtype=torch.bfloat16, shards=2)
    expected = {n: t for n, t in read_tensors(path).items() if t.dim() == 2}
    with open_checkpoint(path) as r:

        def chunks(name: str) -> list[torch.Tensor]:
            rows = r.shape(name)[0]
            out = []
            for _ in range(20):  # enough reads to interleave with the other threads'
                for r0 in range(0, rows, 3):
                    buf = torch.empty(min(3, rows - r0), *r.shape(name)[1:])
                    out.append(r.read_rows_into(name, r0, buf).clone())
            return out

        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(expected, pool.map(chunks, expected), strict=True))
    for name, t in expected.items():
        per_pass = len(got[name]) // 20
        for k in range(20):
            assert torch.equal(torch.cat(got[name][k * per_pass : (k + 1) * per_pass]), t.float())


def test_large_finite_values_are_not_reported(tiny_model):
    """Finite weights whose sum overflows float32 are still finite (no false NaN/inf error)."""
    path = tiny_model()
    sd = load_file(str(path / "model.safetensors"))
    big = torch.finfo(torch.float32).max
    sd["model.layers.0.mlp.up_proj.weight"] = torch.full_like(
        sd["model.layers.0.mlp.up_proj.weight"], big
    )
    save_file(sd, str(path / "model.safetensors"))
    with open_checkpoint(path) as r:
        buf = torch.empty(r.shape("model.layers.0.mlp.up_proj.weight"))
        r.read_into("model.layers.0.mlp.up_proj.weight", buf)
        assert torch.all(buf == big)


def test_pickle_refused_unless_allowed(tmp_path):
    d = tmp_path / "binmodel"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="--allow-pickle"):
        open_checkpoint(d)
    with open_checkpoint(d, allow_pickle=True) as r:
        assert r.keys() == ["w"]
        assert torch.equal(r.get_tensor("w"), torch.arange(6.0).reshape(2, 3))


def test_missing_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"'nobody/nothing-here' is not in the cache at .*hub"):
        resolve_model_path("nobody/nothing-here")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model_path(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"config\.json"):
        open_checkpoint(tmp_path)


def test_stage_names_resolve_first(tiny_model, tmp_path):
    path = tiny_model()
    assert resolve_model_path("first", {"first": path}) == path


def test_hub_cache_lookup_honours_revision(tiny_model, tmp_path, monkeypatch):
    """A model in the local HF cache layout (snapshots/<commit>, refs/<branch>) is found."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    snap.parent.mkdir(parents=True)
    tiny_model("src").rename(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("org/tiny") == snap
    assert resolve_model_path("org/tiny@" + commit) == snap
    with pytest.raises(ConfigError, match="org/tiny@v2"):
        resolve_model_path("org/tiny@v2")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(10, 4 * (i + 1), generator=g) for i in range(5)}


@pytest.mark.parametrize("planned", [True, False])
def test_writer_shards_and_index(tmp_path, planned):
    ts = _tensors()  # 40 * 4 * (i + 1) bytes each in bf16 = 80, 160, ... 400 bytes
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=500, dtype=torch.bfloat16) as w:
        if planned:
            w.plan([(n, t.shape) for n, t in ts.items()])
        for n, t in ts.items():
            w.add(n, t)
            t.zero_()  # the writer must not keep a reference to a caller's (reused) buffer
        w.finish({"model_type": "llama", "eos_token_id": 2}, files={"recipe.yaml": "x: 1\n"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    # greedy packing in order: [t0 t1 t2] 480 B, [t3] 320 B, [t4] 400 B
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert index["weight_map"]["t2"] == shards[0] and index["weight_map"]["t4"] == shards[2]
    assert index["metadata"]["total_size"] == sum(80 * (i + 1) for i in range(5))
    got = {}
    for s in shards:
        got.update(load_file(str(out / s)))
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        ref = torch.randn(10, 4 * (i + 1), generator=g).to(torch.bfloat16)
        assert torch.equal(got[f"t{i}"], ref)
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 2}
    assert (out / "recipe.yaml").read_text() == "x: 1\n" and (out / MARKER).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_writer_single_file_and_overwrite(tmp_path):
    out = tmp_path / "out"
    for value in (1.0, 2.0):  # the second run replaces an earlier evomerge output
        with CheckpointWriter(out, max_shard_bytes=10**9, dtype=torch.float32) as w:
            w.add("a", torch.full((3,), value))
            w.finish({})
        assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [
            "model.safetensors"
        ]
        assert torch.equal(load_file(str(out / "model.safetensors"))["a"], torch.full((3,), value))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_writer_refuses_foreign_folder_and_cleans_up(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier evomerge output"):
        CheckpointWriter(foreign, max_shard_bytes=100, dtype=torch.float32)
    with pytest.raises(ConfigError, match="is a file"):
        check_out_dir(foreign / "notes.txt")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, max_shard_bytes=100, dtype=torch.float32) as w:
            w.plan([("a", (3,))])
            w.add("a", torch.ones(3))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing half-written


def test_writer_header_is_aligned(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=10**6, dtype=torch.float16) as w:
        w.plan([("odd.name/../x", (3,))])  # a tensor name is never used as a path
        w.add("odd.name/../x", torch.tensor([1.0, 2.0, 3.0]))
        w.finish({})
    raw = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and len(raw) == 8 + n + 6
    assert torch.equal(load_file(str(out / "model.safetensors"))["odd.name/../x"],
                       torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16))  # fmt: skip


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000
    with pytest.raises(ConfigError, match="like 5GB"):
        parse_size("lots")
