"""Pack + unpack of one step's TP-broadcast buffer: C++ extension vs numpy vs pure Python.

    python benchmarks/pack_unpack.py [--repeat 5]

Prints JSON (microseconds per pack and per unpack, best of --repeat runs) and writes it to
benchmarks/results/pack_unpack.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import RESULTS, write_results  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from test_pack import reference_pack, reference_unpack  # noqa: E402  (pure-Python reference)

from megatron_coord import _C  # noqa: E402


def numpy_pack(signals, ids, tokens, params) -> np.ndarray:
    parts = [np.array([len(signals), *signals, len(ids)], dtype=np.int64)]
    for rid, toks, pars in zip(ids, tokens, params, strict=True):
        parts.append(np.array([rid, len(toks), len(pars)], dtype=np.int64))
        parts.append(np.asarray(toks, dtype=np.int64))
        parts.append(np.asarray(pars, dtype=np.float64).view(np.int64))
    return np.concatenate(parts)


def numpy_unpack(words: np.ndarray):
    n_sig = int(words[0])
    signals = words[1 : 1 + n_sig].tolist()
    pos = 1 + n_sig
    n = int(words[pos])
    pos += 1
    ids, tokens, params = [], [], []
    for _ in range(n):
        rid, n_tok, n_par = words[pos : pos + 3].tolist()
        pos += 3
        ids.append(rid)
        tokens.append(words[pos : pos + n_tok].tolist())
        pos += n_tok
        params.append(words[pos : pos + n_par].view(np.float64).tolist())
        pos += n_par
    if pos != len(words):
        raise ValueError("trailing words")
    return signals, ids, tokens, params


def numpy_to_tensor(*batch) -> torch.Tensor:
    return torch.from_numpy(numpy_pack(*batch))


def numpy_from_tensor(buffer: torch.Tensor):
    return numpy_unpack(buffer.numpy())


def python_to_tensor(*batch) -> torch.Tensor:
    return torch.tensor(reference_pack(*batch), dtype=torch.int64)


def python_from_tensor(buffer: torch.Tensor):
    return reference_unpack(buffer.tolist())


def make_batch(n_requests: int, n_tokens: int):
    rng = random.Random(0)
    ids = list(range(n_requests))
    tokens = [[rng.randrange(50257) for _ in range(n_tokens)] for _ in ids]
    params = [[rng.random() for _ in range(11)] for _ in ids]
    return [], ids, tokens, params


def best_us(fn, repeat: int) -> float:
    """Best mean time per call over ``repeat`` runs of enough calls to last ~50 ms."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start > 0.05:
            break
        calls *= 2
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = {"decode_step_empty": (0, 0), "8x128": (8, 128), "64x1024": (64, 1024)}
    results = {}
    for name, (n, t) in cases.items():
        batch = make_batch(n, t)
        # Every variant produces and consumes the int64 tensor that torch.distributed moves.
        ext_buf = _C.pack_step(*batch)
        np_buf = numpy_to_tensor(*batch)
        py_buf = python_to_tensor(*batch)
        assert ext_buf.tolist() == np_buf.tolist() == py_buf.tolist()
        assert (
            numpy_from_tensor(np_buf)
            == python_from_tensor(py_buf)
            == tuple(_C.unpack_step(ext_buf))
        )
        results[name] = {
            "words": len(py_buf),
            "extension": {
                "pack_us": best_us(lambda b=batch: _C.pack_step(*b), args.repeat),
                "unpack_us": best_us(lambda b=ext_buf: _C.unpack_step(b), args.repeat),
            },
            "numpy": {
                "pack_us": best_us(lambda b=batch: numpy_to_tensor(*b), args.repeat),
                "unpack_us": best_us(lambda b=np_buf: numpy_from_tensor(b), args.repeat),
            },
            "python": {
                "pack_us": best_us(lambda b=batch: python_to_tensor(*b), args.repeat),
                "unpack_us": best_us(lambda b=py_buf: python_from_tensor(b), args.repeat),
            },
        }
    out = {"benchmark": "pack_unpack", "unit": "microseconds per call", "cases": results}
    write_results(os.path.join(RESULTS, "pack_unpack.json"), out)


if __name__ == "__main__":
    main()
