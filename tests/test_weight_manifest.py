"""The weight-transfer manifest and bucketing, and the receiver's shard slicing, in process: the
shards a TP rank keeps from full tensors sent in small buckets equal the checkpoint loader's."""

from __future__ import annotations

import pytest
import torch
from _model_scenario import save_hf_checkpoint
from test_checkpoint import _tp_state

from megatron_coord.models.checkpoint import load_model
from megatron_coord.weights.manifest import ALIGN, Manifest, TensorInfo, dtype_name, plan_buckets
from megatron_coord.weights.receiver import ShardWriter
from megatron_coord.weights.sender import _pack


def _infos(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors.items()]


def test_buckets_hold_whole_rows_within_the_bound():
    tensors = {
        "a": torch.zeros(10, 7),  # 28-byte rows
        "b": torch.zeros(33, dtype=torch.bfloat16),  # 1-D: 2-byte rows
        "empty": torch.zeros(0, 4),
        "c": torch.zeros(3, 2, 5, dtype=torch.float16),
        "scalar": torch.tensor(1.0),
    }
    infos = _infos(tensors)
    manifest = plan_buckets(infos, 64)
    assert Manifest.decode(manifest.encode()) == manifest
    covered: dict[int, list[tuple[int, int]]] = {}
    for index, bucket in enumerate(manifest.buckets):
        assert 0 < manifest.bucket_size(index) <= 64
        for piece in bucket:
            assert piece.offset % ALIGN == 0
            covered.setdefault(piece.tensor, []).append((piece.start, piece.end))
    for index, info in enumerate(infos):
        ranges = covered.get(index, [])
        assert [r for pair in ranges for r in pair] == sorted(r for pair in ranges for r in pair)
        rows = sum(end - start for start, end in ranges)
        assert rows == (info.rows if info.nbytes else 0)
    assert manifest.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert manifest.max_bucket_bytes <= 64
    with pytest.raises(ValueError, match="smaller than one row of tensor 'a' \\(28 bytes\\)"):
        plan_buckets(infos, 20)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoints(request, tmp_path_factory):
    """(old checkpoint, new checkpoint, the new one's full HF tensors as a trainer has them)."""
    tie = request.param
    old = str(tmp_path_factory.mktemp("old"))
    new = str(tmp_path_factory.mktemp("new"))
    save_hf_checkpoint(old, seed=4, tie=tie)
    hf = save_hf_checkpoint(new, seed=5, tie=tie)
    return old, new, {k: v.detach().clone() for k, v in hf.state_dict().items()}


def _send_in_process(writer: ShardWriter, tensors: dict[str, torch.Tensor], bucket_bytes: int):
    """What a transfer does, without the group: pack each bucket, hand it to the writer."""
    items = list(tensors.items())
    manifest = plan_buckets(_infos(tensors), bucket_bytes)
    assert writer.check(manifest) == []
    buffer = torch.empty(manifest.max_bucket_bytes, dtype=torch.uint8)
    for index, bucket in enumerate(manifest.buckets):
        view = buffer[: manifest.bucket_size(index)]
        view.fill_(0xFF)  # stale bytes from the last bucket must never leak
        _pack(view, bucket, items, manifest)
        writer.write_bucket(view, bucket, manifest)
    return manifest


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_tp2_shards_from_buckets_equal_the_loaders(checkpoints, tp_rank):
    old, new, tensors = checkpoints
    served = load_model(old, _tp_state(2, tp_rank))
    fresh = dict(load_model(new, _tp_state(2, tp_rank)).named_parameters())
    manifest = _send_in_process(ShardWriter(served), tensors, bucket_bytes=3000)
    assert len(manifest.buckets) > 20  # tensors span buckets, buckets hold several tensors
    for name, param in served.named_parameters():
        assert torch.equal(param, fresh[name]), name


def test_other_dtypes_are_converted_on_copy(checkpoints):
    old, new, tensors = checkpoints
    served = load_model(old, _tp_state(1, 0))
    _send_in_process(ShardWriter(served), {k: v.bfloat16() for k, v in tensors.items()}, 4096)
    expected = {k: v.bfloat16().float() for k, v in tensors.items()}
    layer = served.layers[0]
    assert torch.equal(layer.mlp.down_proj, expected["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(served.embed_tokens, expected["model.embed_tokens.weight"])


def test_the_check_names_each_bad_tensor(checkpoints):
    old, _, tensors = checkpoints
    writer = ShardWriter(load_model(old, _tp_state(2, 0)))
    bad = dict(tensors)
    bad["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    del bad["model.norm.weight"]
    bad["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(97, 64)
    bad["model.layers.1.input_layernorm.weight"] = torch.zeros(64, dtype=torch.int64)
    problems = writer.check(plan_buckets(_infos(bad), 1 << 20))
    assert problems == [
        "unknown tensor(s), not in the served model: 'model.layers.9.mlp.up_proj.weight'",
        "missing tensor(s): 'model.norm.weight'",
        "tensor 'model.layers.0.mlp.gate_proj.weight' has shape (97, 64), the served model "
        "needs (96, 64)",
        "tensor 'model.layers.1.input_layernorm.weight' has dtype int64, not a floating-point one",
    ]
