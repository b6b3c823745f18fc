"""The C++ pack_step/unpack_step against a pure-Python reference, on random and edge batches."""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import sys

import pytest
import torch

from megatron_coord import _C
from megatron_coord.engine.tp_broadcast import NewRequest, StepInputs, decode_params, pack, unpack
from megatron_coord.sampling_params import SamplingParams


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _double(word: int) -> float:
    return struct.unpack("<d", struct.pack("<q", word))[0]


def reference_pack(signals, request_ids, tokens, params) -> list[int]:
    """Pure-Python layout: [n_sig, sig..., n_req, (id, n_tok, n_par, tok..., par...)...]."""
    words = [len(signals), *signals, len(request_ids)]
    for rid, toks, pars in zip(request_ids, tokens, params, strict=True):
        words += [rid, len(toks), len(pars), *toks, *(_bits(p) for p in pars)]
    return words


def reference_unpack(words: list[int]):
    pos = 0

    def take(count: int) -> list[int]:
        nonlocal pos
        if count < 0 or pos + count > len(words):
            raise ValueError("truncated buffer")
        out = words[pos : pos + count]
        pos += count
        return out

    signals = take(take(1)[0])
    n = take(1)[0]
    if n < 0:
        raise ValueError("bad request count")
    ids, tokens, params = [], [], []
    for _ in range(n):
        rid, n_tok, n_par = take(3)
        ids.append(rid)
        tokens.append(take(n_tok))
        params.append([_double(w) for w in take(n_par)])
    if pos != len(words):
        raise ValueError("trailing words")
    return signals, ids, tokens, params


def random_batch(rng: random.Random):
    n = rng.choice([0, 0, 1, 2, 5, 17])
    signals = [rng.randrange(-(2**63), 2**63) for _ in range(rng.choice([0, 1, 3]))]
    ids = [rng.randrange(-(2**63), 2**63) for _ in range(n)]
    tokens = [[rng.randrange(0, 2**40) for _ in range(rng.choice([0, 1, 7, 300]))] for _ in ids]
    specials = [math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308]
    params = [
        [
            rng.choice([rng.uniform(-1e9, 1e9), rng.choice(specials)])
            for _ in range(rng.choice([0, 11]))
        ]
        for _ in ids
    ]
    return signals, ids, tokens, params


@pytest.mark.parametrize("seed", range(200))
def test_extension_matches_reference_on_random_batches(seed):
    rng = random.Random(seed)
    batch = random_batch(rng)
    packed = _C.pack_step(*batch)
    assert packed.dtype == torch.int64 and packed.dim() == 1
    assert packed.tolist() == reference_pack(*batch)
    assert list(_C.unpack_step(packed)) == list(batch)
    assert reference_unpack(packed.tolist()) == batch


def test_empty_batch_and_nan_params():
    assert _C.pack_step([], [], [], []).tolist() == [0, 0]
    assert _C.unpack_step(torch.tensor([0, 0])) == ([], [], [], [])
    packed = _C.pack_step([], [9], [[1]], [[math.nan]])
    assert packed.tolist() == reference_pack([], [9], [[1]], [[math.nan]])
    assert math.isnan(_C.unpack_step(packed)[3][0][0])


@pytest.mark.parametrize(
    "words",
    [[], [1], [5, 1, 2], [0, 1, 7, 3, 0, 1], [0, 1, 7, -1, 0], [0, 0, 99], [0, -2], [-1, 0]],
)
def test_corrupt_buffers_raise_in_both(words):
    with pytest.raises(ValueError):
        reference_unpack(words)
    with pytest.raises(ValueError):
        _C.unpack_step(torch.tensor(words, dtype=torch.int64))


def test_unpack_rejects_wrong_dtype():
    with pytest.raises(RuntimeError):
        _C.unpack_step(torch.zeros(2, dtype=torch.int32))


def test_step_inputs_round_trip_sampling_params():
    params = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        num_tokens_to_generate=12,
        termination_id=None,
        num_tokens_total=99,
        return_log_probs=True,
        streaming_interval=3,
    )
    seed = 2**64 - 5
    inputs = StepInputs([5, 104, 77], [NewRequest(77, [1, 2, 3], params, seed)])
    out = unpack(pack(inputs))
    assert out.signals == [5, 104, 77]
    (req,) = out.requests
    assert (req.request_id, req.prompt_tokens, req.seed) == (77, [1, 2, 3], seed)
    for name in (
        "temperature",
        "top_k",
        "top_p",
        "num_tokens_to_generate",
        "termination_id",
        "num_tokens_total",
        "return_log_probs",
        "streaming_interval",
    ):
        assert getattr(req.params, name) == getattr(params, name), name


def test_decode_params_rejects_wrong_length():
    with pytest.raises(ValueError):
        decode_params([1.0, 2.0])


def test_pack_accepts_tuples_and_rejects_wrong_types():
    assert _C.pack_step((), (4,), ((1, 2),), ((0.5,),)).tolist() == reference_pack(
        [], [4], [[1, 2]], [[0.5]]
    )
    for bad in (
        ([], [1], [[1.5]], [[]]),  # a float token id
        ([], [1], [5], [[]]),  # tokens entry is not a sequence
        ([], [1], [[1]], [["x"]]),  # a non-numeric parameter
        ("ab", [], [], []),  # signals of strings
    ):
        with pytest.raises(TypeError):
            _C.pack_step(*bad)
    with pytest.raises(OverflowError):
        _C.pack_step([2**63], [], [], [])
    with pytest.raises(RuntimeError, match="same length"):
        _C.pack_step([], [1, 2], [[1]], [[]])


def test_extension_imports_in_a_fresh_interpreter_without_torch_first():
    """``import megatron_coord._C`` finds libtorch through its rpath and imports torch itself."""
    code = (
        "import sys; import megatron_coord._C as C; assert 'torch' in sys.modules; "
        "print(C.unpack_step(C.pack_step([5], [7], [[1, 2]], [[0.5]])))"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "([5], [7], [[1, 2]], [[0.5]])"
