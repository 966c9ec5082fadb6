"""Which residual rank a layer gets: the rank grid, the value errors measured in the model's dtype on real activations
(the RoPE round trip and the key scale included), and the acceptance rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..projections import Projections
from ..rope import RotaryLayout, Unrotation, rotate, unrotate_keys
from . import factorisation
from .factorisation import KModeWeights, SingularKeyProjection, key_factorization

#: A layer keeps the K cache when rebuilding V from cached keys is at most this many times less accurate than the
#: unmodified model computing V in the same dtype (both measured against float64). 4x is two bits of the mantissa:
#: the size of the differences between GEMM kernels, far from the 100x-10000x seen on real Whisper layers.
K_MODE_ERROR_FACTOR = 4.0


#: ... or when its relative error is below this absolute floor. It matters in fp32, where 4x the unmodified model's
#: own V error (1.4e-7 to 2.8e-7) is about fp32 rounding, and it must keep the fp32 promise of the equivalence tests:
#: logits within 1e-5 (relative) of the unmodified model. V errors do not reach the logits 1:1. Measured with
#: ``scripts/kmode_floor.py`` (every layer forced onto K at one rank; worst logit difference over a decode / the
#: calibration's k_error): 0.8-1.4x on tiny GPT-2, 1.4-3.2x on tiny Llama, 2.8-4.2x on tiny Qwen2 (2 layers, W_K of
#: cond 1e2 to 1e5), 1.2-2.2x on real Whisper tiny.en (4 layers); on top of that the slim path costs 0.8-1.2e-6 with
#: exact values on the tiny models and 3-4e-6 on tiny.en (its exact input cache: 4.0e-6). The former floor, 1e-5 (the
#: tolerance itself), let a plain K layer at 3.4e-6 drift 1.1e-5 (tiny Llama) and took tiny.en's fp32 layers at r =
#: 32/16/16/16, 9.2e-6 from the unmodified logits. The floor is the tolerance over the worst amplification with a 2x
#: safety factor, 1e-5 / (4.2 * 2) = 1.2e-6, rounded down: a layer at the floor moves logits by ~4.2e-6 at most, which
#: leaves room for the baseline. Cost: random W_K (cond ~1e2) take r = 16 instead of 0 in fp32, and tiny.en's fp32
#: layers r = 176/64/80/48 (1.61x, 3.0e-6 from the unmodified logits). fp16/bf16 layers (unmodified error 3e-4 to
#: 2e-3) are decided by the 4x rule alone. Only 2- and 4-layer models were measured: errors of many layers add up.
K_MODE_ABSOLUTE_FLOOR = 1e-6


class ValueErrorProbe:
    """Relative errors of V in ``dtype`` on real activations, against float64: rebuilt from the K+R cache (any
    :class:`KModeWeights`) and computed as the unmodified model does. The reference and the cached keys are computed
    once, so trying many residual ranks costs two small GEMMs each.

    Parameters
    ----------
    inputs:
        ``(tokens, d_model)`` real activations entering the attention layer, in the model dtype.
    projections:
        the layer's projections.
    dtype:
        the dtype the model runs in.
    round_trip:
        for a RoPE layer (:class:`RotaryRoundTrip`), the rotate-in-dtype / un-rotate round trip its cached keys go
        through before the values are rebuilt (one more rounding than the plain K cache).

    With a per-token key norm (``projections.key_norm``) the keys are normalised as the model does (in float32, cast
    to ``dtype``), each token's scale ``s`` is rounded to ``dtype`` as the cache stores it, and the values are rebuilt
    from ``s * K_n`` after the round trip, with ``W_KV``'s ``diag(1/w)`` in ``dtype``: the same pipeline as decode.
    """

    def __init__(
        self, inputs: torch.Tensor, projections: Projections, dtype: torch.dtype, round_trip: Callable | None = None
    ) -> None:
        x64 = inputs.detach().to(torch.float64)
        w_k64, w_v64 = projections.w_k.detach().double(), projections.w_v.detach().double()
        b_k64 = None if projections.b_k is None else projections.b_k.detach().double()
        b_v64 = None if projections.b_v is None else projections.b_v.detach().double()
        v_ref = x64 @ w_v64 + (0 if b_v64 is None else b_v64)  # (n, e)
        self.dtype = dtype
        self.x = inputs.detach().to(dtype)  # (n, d)
        self.v_ref = v_ref
        self.norm = v_ref.norm().clamp_min(1e-300)
        self.keys = self._in_dtype(w_k64, b_k64)  # what the K cache stores, rounded to dtype: (n, e)
        scale = None
        if projections.key_norm is not None:  # cached: the normalised keys and each token's scale, both in dtype
            raw = self.keys.to(dtype)  # (n, e)
            scale = projections.key_norm.scale(raw).to(dtype).double()  # (n, 1)
            self.keys = projections.key_norm.normalise(raw).double()  # (n, e)
        if round_trip is not None:  # RoPE: cached rotated in dtype, un-rotated in float32 for the values
            self.keys = round_trip(self.keys.to(dtype)).double()
        if scale is not None:
            self.keys = (self.keys.float() * scale.float()).double()  # s * K_n, in float32 as decode mixes it
        self.vanilla_error = self._error(self._in_dtype(w_v64, b_v64))

    def _in_dtype(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ weight (+ bias)`` as the model computes it: operands in dtype, result rounded to dtype (float64)."""
        out = (self.x.float() @ weight.to(self.dtype).float()).to(self.dtype).double()
        return out if bias is None else (out + bias.to(self.dtype).double()).to(self.dtype).double()

    def _error(self, values: torch.Tensor) -> float:
        return float((values.double() - self.v_ref).norm() / self.norm)

    def k_mode_error(self, weights: KModeWeights) -> float:
        """Relative error of ``V = [K | Z] W_KV + v_offset`` with K, Z, W_KV and the offset in the model dtype."""
        w_kv = weights.w_kv.to(device=self.x.device, dtype=self.dtype).float()  # (e + r, e)
        offset = weights.v_offset.to(device=self.x.device, dtype=self.dtype).float()  # (e,)
        rebuilt = self.keys.float() @ w_kv[: self.keys.shape[1]] + offset  # (n, e)
        if weights.residual_rank:
            z_proj = weights.z_proj.to(device=self.x.device, dtype=self.dtype).float()  # (d, r)
            z = (self.x.float() @ z_proj).to(self.dtype).float()  # what the cache stores beside K: (n, r)
            rebuilt = rebuilt + z @ w_kv[self.keys.shape[1] :]
        return self._error(rebuilt)


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
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=keys.device)
        inv_freq = 1.0 / (10000.0 ** (steps / self.head_dim))  # (dk/2,)
        angles = torch.arange(tokens, dtype=torch.float64, device=keys.device)[:, None] * inv_freq  # (n, dk/2)
        if self.layout.style == "half":
            angles = torch.cat((angles, angles), dim=-1)  # (n, dk)
        else:
            angles = angles.repeat_interleave(2, dim=-1)  # (n, dk)
        cos, sin = angles.cos().to(keys.dtype), angles.sin().to(keys.dtype)  # (n, dk), as the model hands them over
        heads = keys.view(tokens, self.num_heads, self.head_dim)  # (n, h, dk)
        rotated = heads * cos[:, None] + rotate(heads, self.layout.style) * sin[:, None]  # in dtype, as the model
        unrotation = Unrotation.of(torch.cat((cos, sin), dim=-1)[None])  # of the (1, n, 2dk) table
        return unrotate_keys(rotated.reshape(1, tokens, -1), unrotation, self.num_heads, self.head_dim, self.layout)[0]


def k_mode_is_exact(k_error: float, vanilla_error: float) -> bool:
    """The acceptance rule: at most :data:`K_MODE_ERROR_FACTOR` x the unmodified model's own error, or
    below :data:`K_MODE_ABSOLUTE_FLOOR`."""
    return k_error <= max(K_MODE_ERROR_FACTOR * vanilla_error, K_MODE_ABSOLUTE_FLOOR)


def cache_ratio(inner: int, residual_rank: int, key_scale: bool = False) -> float:
    """How many times smaller a K+R layer's cache is than the model's own K and V: ``2 e / (e + r)``, or
    ``2 e / (e + r + 1)`` for a layer that keeps each token's key scale."""
    return 2 * inner / (inner + residual_rank + int(key_scale))


@dataclass(frozen=True)
class KModeChoice:
    """The outcome of calibrating one layer: its weights (None: it keeps the input cache), the numbers, and the
    largest rank that was allowed (:func:`max_residual_rank`)."""

    weights: KModeWeights | None
    numbers: dict
    max_rank: int


def choose_residual_rank(
    projections: Projections,
    inputs: torch.Tensor,
    dtype: torch.dtype,
    round_trip: RotaryRoundTrip | None = None,
    on_rank: Callable[[int], None] | None = None,
) -> KModeChoice:
    """The smallest residual rank on :func:`residual_rank_grid` whose rebuilt values pass :func:`k_mode_is_exact`.

    ``W_K`` is factorised once (:func:`key_factorization`) and every rank's weights come from that factorisation; each
    is measured in ``dtype`` by one :class:`ValueErrorProbe`. ``on_rank(r)`` is called before rank ``r`` is tried (a
    progress bar's postfix).

    RoPE layers pass ``round_trip`` (their keys are cached rotated, see :class:`RotaryRoundTrip`): the errors then
    include that round trip; the residual ``Z = X U_r`` is not rotated. Layers with a per-token key norm are measured
    with its scale and ``diag(1/w)`` (:class:`ValueErrorProbe`); their ``numbers`` say ``key_scale: True``.

    Returns
    -------
    a :class:`KModeChoice` whose ``numbers`` (plain data, for the record, the warning, the export and ``hf-slim
    verify``) are ``residual_rank``, ``k_error``, ``vanilla_error``, ``cond_w_k``, ``kept_cond``, ``cache_ratio``
    and ``dtype``; on refusal they describe the largest rank tried and ``weights`` is None.

    Raises
    ------
    SingularKeyProjection
        when W_K is not square, or singular to float64 precision in more than ``max_residual_rank`` directions.
    """
    factorization = key_factorization(projections)
    probe = ValueErrorProbe(inputs, projections, dtype, round_trip)
    d_model, inner = projections.w_k.shape
    numbers: dict = {}
    max_rank = factorisation.max_residual_rank(d_model)
    for rank in factorisation.residual_rank_grid(d_model):
        if on_rank is not None:
            on_rank(rank)
        try:
            weights = factorization.weights(rank, device=projections.w_k.device)
        except SingularKeyProjection:
            continue
        k_error = probe.k_mode_error(weights)
        numbers = {
            "residual_rank": rank,
            "k_error": k_error,
            "vanilla_error": probe.vanilla_error,
            "cond_w_k": factorization.cond,
            "kept_cond": weights.kept_cond,
            "cache_ratio": cache_ratio(inner, rank, projections.key_norm is not None),
            "dtype": str(dtype),
        }
        if projections.key_norm is not None:
            numbers["key_scale"] = True  # one more cached column per token: the key scale
        if k_mode_is_exact(k_error, probe.vanilla_error):
            return KModeChoice(weights, numbers, max_rank)
    if not numbers:
        raise SingularKeyProjection(
            f"W_K is singular (cond {factorization.cond:.3g}) in more than {max_rank} directions, the most a K+R "
            "cache may keep beside K",
            numbers={"cond_w_k": factorization.cond, "dtype": str(dtype)},
        )
    return KModeChoice(None, numbers, max_rank)
