"""Counter-based Gumbel noise: one request's random numbers as a pure function of (seed, draw
number, token id), computed for a whole batch in a few tensor ops.

A request's k-th token is ``argmax(filtered logits + G)`` where ``G[v]`` depends only on the
request's seed, on k and on v. Nothing is carried from one draw to the next (no generator
state), so a request draws the same numbers in any batch, on any replica and device, after a
requeue, and whether its candidates are the whole vocabulary or a short list of token ids
(``noise(keys, token_ids)`` gives the same value for the same id either way).

The integer part is exact on every device: values stay below 2**32 and every product below
2**63, so no int64 operation overflows. Per row, a token id v goes through an affine map
``(a * v + b) mod 2**32`` (a odd: a bijection; a and b mixed from the seed and the draw number
with splitmix64 in Python) and then a 32-bit integer finalizer (two multiply-xorshift rounds),
whose top 24 bits give the uniform ``u`` in (0, 1), never 0 or 1. Distinct draws use unrelated
affine maps, so their noise vectors share almost no values.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_MIX = 0x45D9F3B  # below 2**27: a 32-bit value times it stays below 2**59
_UNIT = 2.0**-24
# The noise lies in [-log(-log(2**-24)), -log(-log(1 - 2**-24))] ~ [-2.81, 16.64]: a token whose
# scaled logit is SPAN below its row's best can never win, whatever the noise (1.0 of margin
# for float rounding). Sampling looks at the other tokens alone.
SPAN = -math.log(-math.log1p(-_UNIT)) + math.log(-math.log(_UNIT)) + 1.0


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def row_keys(seed: int, draw: int) -> tuple[int, int]:
    """(a, b) of one request's draw number ``draw``: a odd, both below 2**32."""
    z = _splitmix64((seed & _MASK64) ^ _splitmix64(draw & _MASK64))
    return (z & _MASK32) | 1, z >> 32


def key_tensors(
    seeds: list[int], draws: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' (a, b) as two [S, 1] int64 tensors."""
    keys = [row_keys(s, d) for s, d in zip(seeds, draws, strict=True)]
    both = torch.tensor(keys, dtype=torch.int64).reshape(-1, 2).to(device)
    return both[:, :1], both[:, 1:]


def uniforms(a: torch.Tensor, b: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1) for ``token_ids`` ([V] shared by every row, or [S, K])."""
    x = token_ids * a  # ids < 2**31 and a < 2**32: below 2**63
    x += b
    x &= _MASK32
    for _ in range(2):
        x ^= x >> 16
        x *= _MIX
        x &= _MASK32
    x ^= x >> 16
    x >>= 8
    x |= 1  # odd 24-bit numbers: u = x / 2**24 lies in [2**-24, 1 - 2**-24]
    return x.to(torch.float32).mul_(_UNIT)


def noise(a: torch.Tensor, b: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise ``-log(-log(u))`` for ``token_ids`` (see ``uniforms``)."""
    return uniforms(a, b, token_ids).log_().neg_().log_().neg_()
