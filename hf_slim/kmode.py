"""K-cache mode: ``V = K W_KV`` with ``W_KV = W_K^-1 W_V``, and the per-layer check that decides whether it is exact.

The algebra is exact; the arithmetic is not. Keys are rounded to the model dtype when they are cached, and
``W_KV`` amplifies that rounding by up to ``cond(W_K)``. On real Whisper weights ``cond(W_K)`` reaches 1e6 and the
K cache turns fp16/bf16 transcripts into garbage (see shared/SLIM_ATTENTION.md). So a layer gets the K cache only if
a calibration on activations in the model's dtype shows that the values it rebuilds are as accurate as the values
the unmodified model computes; otherwise it keeps the input cache.

Biases: with ``K = X W_K + b_K`` cached as is (bias included, exactly the keys the unmodified model uses),
``V = (K - b_K) W_KV + b_V = K W_KV + v_offset`` where ``v_offset = b_V - b_K W_KV``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import Projections
from .patching import resident_weights
from .rope import RotaryLayout, rotate, unrotate_keys
from .sites import AttentionSite

#: A layer keeps the K cache when rebuilding V from cached keys is at most this many times less accurate than the
#: unmodified model computing V in the same dtype (both measured against float64). 4x is two bits of the mantissa:
#: the size of the differences between GEMM kernels, far from the 100x-10000x seen on real Whisper layers.
K_MODE_ERROR_FACTOR = 4.0

#: ... or when its relative error is below this absolute floor: 1e-5 is the fp32 tolerance the equivalence tests hold
#: logits to, so an fp32 layer whose V is off by 1e-6 (a few ulps times a moderate cond(W_K)) is exact for every
#: purpose we test, while real Whisper layers (1e-2 in fp32, 1 to 240 in fp16/bf16) stay far above it.
K_MODE_ABSOLUTE_FLOOR = 1e-5


class SingularKeyProjection(ValueError):
    """W_K cannot be inverted (not square, or numerically singular), so the K cache cannot rebuild V."""


@dataclass(frozen=True)
class KModeWeights:
    """Precomputed K-mode weights of one layer, float64.

    Shapes: ``w_kv: (e, e)``, ``v_offset: (e,)``; ``cond`` is the 2-norm condition number of W_K.
    """

    w_kv: torch.Tensor
    v_offset: torch.Tensor
    cond: float


def solve_k_mode(projections: Projections) -> KModeWeights:
    """Compute ``W_KV = W_K^-1 W_V`` with a float64 solve (never an explicit inverse) and the value offset.

    Raises
    ------
    SingularKeyProjection
        when W_K is not square or is singular to float64 precision.
    """
    w_k = projections.w_k.detach().to(torch.float64)
    w_v = projections.w_v.detach().to(torch.float64)
    if w_k.is_meta or w_v.is_meta:
        raise ValueError("K mode needs the real weights, got meta tensors (load the weights before slimify)")
    if w_k.shape[0] != w_k.shape[1]:
        raise SingularKeyProjection(
            f"K mode needs a square W_K, got {tuple(w_k.shape)} (d_model != heads*head_dim); use mode='input'"
        )
    cond = float(torch.linalg.cond(w_k))
    if not cond < 1e12:
        raise SingularKeyProjection(f"W_K is singular (condition number {cond:.3g}); use mode='input'")
    w_kv = torch.linalg.solve(w_k, w_v)  # (e, e)
    return KModeWeights(w_kv=w_kv, v_offset=value_offset(w_kv, projections.b_k, projections.b_v), cond=cond)


def value_offset(w_kv: torch.Tensor, b_k: torch.Tensor | None, b_v: torch.Tensor | None) -> torch.Tensor:
    """``b_V - b_K W_KV`` in float64, ``(e,)``: what ``V = K W_KV + offset`` adds when K was cached with its bias."""
    offset = torch.zeros(w_kv.shape[1], dtype=torch.float64, device=w_kv.device)
    if b_v is not None:
        offset = offset + b_v.detach().to(device=w_kv.device, dtype=torch.float64)
    if b_k is not None:
        offset = offset - b_k.detach().to(device=w_kv.device, dtype=torch.float64) @ w_kv
    return offset


def solve_layer_k_mode(site: AttentionSite) -> KModeWeights:
    """:func:`solve_k_mode` on a site's real weights (accelerate-offloaded ones are loaded for the solve)."""
    with resident_weights(site.module):
        return solve_k_mode(site.projections(site.module))


def value_errors(
    inputs: torch.Tensor,
    projections: Projections,
    weights: KModeWeights,
    dtype: torch.dtype,
    rotary: RotaryRoundTrip | None = None,
) -> tuple[float, float]:
    """Relative errors of V in ``dtype``: rebuilt from cached keys vs computed as the unmodified model does.

    Parameters
    ----------
    inputs:
        ``(tokens, d_model)`` real activations entering the attention layer.
    projections:
        the layer's projections.
    weights:
        the layer's :class:`KModeWeights`.
    dtype:
        the dtype the model runs in.
    rotary:
        for a RoPE layer, which caches keys rotated in ``dtype`` and un-rotates them for the values: the round trip
        the rebuilt values go through (one more rounding than the plain K cache).

    Returns
    -------
    ``(k_mode_error, vanilla_error)``, each ``||V - V_ref|| / ||V_ref||`` against float64.
    """
    x64 = inputs.detach().to(torch.float64)
    w_k64, w_v64 = projections.w_k.detach().double(), projections.w_v.detach().double()
    b_k64 = 0 if projections.b_k is None else projections.b_k.detach().double()
    b_v64 = 0 if projections.b_v is None else projections.b_v.detach().double()
    v_ref = x64 @ w_v64 + b_v64

    x = inputs.detach().to(dtype)

    def in_dtype(w: torch.Tensor, b) -> torch.Tensor:
        out = (x.float() @ w.to(dtype).float()).to(dtype).double()
        return out if isinstance(b, int) else (out + b.to(dtype).double()).to(dtype).double()

    v_vanilla = in_dtype(w_v64, b_v64)
    keys = in_dtype(w_k64, b_k64)  # what the K cache stores, rounded to dtype
    if rotary is not None:
        keys = rotary(keys.to(dtype)).double()  # rotated in dtype (as cached), un-rotated in float32
    v_rebuilt = keys.float() @ weights.w_kv.to(dtype).float() + weights.v_offset.to(dtype).float()
    norm = v_ref.norm().clamp_min(1e-300)
    return float((v_rebuilt.double() - v_ref).norm() / norm), float((v_vanilla - v_ref).norm() / norm)


@dataclass(frozen=True)
class RotaryRoundTrip:
    """Rotate keys in their dtype and un-rotate them in float32, as a RoPE K-cache layer does, for the calibration.

    The angles are a standard RoPE table (base 10000, position = token index within ``seq_len`` rows): the rounding
    of a rotation depends on the angles only through ``cos``/``sin`` magnitudes, which any spread of angles covers.
    The whole head is rotated: for partial rotary (Phi, GPT-NeoX, GPT-J) a slight over-estimate, on the safe side.
    """

    num_heads: int
    head_dim: int
    layout: RotaryLayout

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys: (tokens, e)`` in the model dtype -> the un-rotated keys the values are rebuilt from, float32."""
        tokens = keys.shape[0]
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles = torch.arange(tokens, dtype=torch.float64)[:, None] * inv_freq  # (n, dk/2)
        if self.layout.style == "half":
            angles = torch.cat((angles, angles), dim=-1)  # (n, dk)
        else:
            angles = angles.repeat_interleave(2, dim=-1)  # (n, dk)
        cos, sin = angles.cos().to(keys.dtype), angles.sin().to(keys.dtype)  # (n, dk), as the model hands them over
        heads = keys.view(tokens, self.num_heads, self.head_dim)  # (n, h, dk)
        rotated = heads * cos[:, None] + rotate(heads, self.layout.style) * sin[:, None]  # in dtype, as the model
        table = torch.cat((cos, sin), dim=-1)[None]  # (1, n, 2dk)
        return unrotate_keys(rotated.reshape(1, tokens, -1), table, self.num_heads, self.head_dim, self.layout)[0]


def k_mode_is_exact(k_error: float, vanilla_error: float) -> bool:
    """The acceptance rule: at most :data:`K_MODE_ERROR_FACTOR` x the unmodified model's own error, or
    below :data:`K_MODE_ABSOLUTE_FLOOR`."""
    return k_error <= max(K_MODE_ERROR_FACTOR * vanilla_error, K_MODE_ABSOLUTE_FLOOR)
