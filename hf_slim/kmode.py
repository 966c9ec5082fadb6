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
from .sites import AttentionSite

#: A layer keeps the K cache when rebuilding V from cached keys is at most this many times less accurate than the
#: unmodified model computing V in the same dtype (both measured against float64). 4x is two bits of the mantissa:
#: the size of the differences between GEMM kernels, far from the 100x-10000x seen on real Whisper layers.
K_MODE_ERROR_FACTOR = 4.0

#: ... or when its relative error is below this absolute floor: 1e-5 is the fp32 tolerance the equivalence tests hold
#: logits to, so an fp32 layer whose V is off by 1e-6 (a few ulps times a moderate cond(W_K)) is exact for every
#: purpose we test, while real Whisper layers (1e-2 in fp32, 1 to 240 in fp16/bf16) stay far above it.
K_MODE_ABSOLUTE_FLOOR = 1e-5


class StaleKModeWeights(RuntimeError):
    """The weights or the dtype of a K-mode layer changed after slimify, so its ``W_KV`` no longer rebuilds V."""


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
    if projections.k_low_rank or projections.v_low_rank:
        raise SingularKeyProjection(
            "LoRA adapters on the key/value projections change W_K and W_V whenever they are switched, so no fixed "
            "W_KV serves them; merge them first (peft: model.merge_and_unload()) to use the K cache. The input cache "
            "serves active adapters exactly"
        )
    w_k = projections.w_k.detach().to(torch.float64)
    w_v = projections.w_v.detach().to(torch.float64)
    if w_k.is_meta or w_v.is_meta:
        raise ValueError("K mode needs the real weights, got meta tensors (load the weights before slimify)")
    if not (bool(torch.isfinite(w_k).all()) and bool(torch.isfinite(w_v).all())):
        raise ValueError(
            "the key/value weights contain NaN or inf, so the model itself computes NaN; check how the weights were "
            "loaded or trained before slimify"
        )
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
    inputs: torch.Tensor, projections: Projections, weights: KModeWeights, dtype: torch.dtype
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
    v_rebuilt = keys.float() @ weights.w_kv.to(dtype).float() + weights.v_offset.to(dtype).float()
    norm = v_ref.norm().clamp_min(1e-300)
    return float((v_rebuilt.double() - v_ref).norm() / norm), float((v_vanilla - v_ref).norm() / norm)


def k_mode_is_exact(k_error: float, vanilla_error: float) -> bool:
    """The acceptance rule: at most :data:`K_MODE_ERROR_FACTOR` x the unmodified model's own error, or
    below :data:`K_MODE_ABSOLUTE_FLOOR`."""
    return k_error <= max(K_MODE_ERROR_FACTOR * vanilla_error, K_MODE_ABSOLUTE_FLOOR)


def _sketch(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 fingerprint of a weight, ``tensor @ probe`` (one number per row), on the CPU.

    Used only when a version counter moved (a rare event), to tell a real edit from a device move or a reload of the
    same values; the probe is fixed, so identical values give identical sketches.
    """
    if tensor is None:
        return None
    values = tensor.detach().to(torch.float64)
    columns = values.shape[-1]
    probe = torch.cos(torch.arange(columns, dtype=torch.float64, device=values.device) * 0.7853981 + 0.1)  # (cols,)
    return (values @ probe).cpu()


def _versions(projections: Projections) -> tuple[tuple[int, int], ...]:
    """``(version counter, data pointer)`` of each projection tensor: in-place edits bump the first, ``.data = ...``
    assignments and device moves change the second."""
    parts = projections.sources or (projections.w_k, projections.w_v, projections.b_k, projections.b_v)
    return tuple((-1, 0) if t is None else (t._version, t.data_ptr()) for t in parts)


@dataclass
class KSourceStamp:
    """Which weights and dtype a layer's K-mode ``W_KV`` was derived from, checked at every K-mode step.

    Why: ``W_KV = W_K^-1 W_V`` is a copy derived from the weights. ``load_state_dict``, an optimizer step or any
    in-place edit changes W_K/W_V but not W_KV (decode would silently use the old weights), and a dtype cast breaks
    the calibration's promise (the K cache is exact only in the dtype it was calibrated in). The per-step check is
    O(1): tensor version counters, data pointers and the dtype. When one of them moved, a float64 sketch of the
    weights (computed once then) tells a real change from a device move or a reload of identical values. Edits
    through ``param.data`` in place bypass version counters (PyTorch does not count them) and are not detected.
    """

    dtype: torch.dtype
    versions: tuple[tuple[int, int], ...]
    sketches: tuple[torch.Tensor | None, ...]

    @classmethod
    def of(cls, projections: Projections) -> KSourceStamp:
        parts = (projections.w_k, projections.w_v, projections.b_k, projections.b_v)
        return cls(projections.w_k.dtype, _versions(projections), tuple(_sketch(t) for t in parts))

    def check(self, projections: Projections, where: str) -> None:
        """Raise :class:`StaleKModeWeights` unless ``projections`` are the weights (values and dtype) stamped."""
        if projections.w_k.dtype != self.dtype:
            raise StaleKModeWeights(
                f"{where} uses the K cache, set up for {self.dtype}, but the model now runs in {projections.w_k.dtype}:"
                " the K cache is only known to be exact in the dtype it was calibrated in. Call "
                "hf_slim.unslimify(model) and hf_slim.slimify(model, mode='k') after the cast to calibrate again, or "
                "use mode='input' (exact in every dtype)"
            )
        if projections.k_low_rank or projections.v_low_rank:
            raise StaleKModeWeights(
                f"{where} uses the K cache but its key/value projections now carry LoRA adapters, which change W_K and "
                "W_V; merge them (peft: model.merge_and_unload()) and slimify again, or use mode='input' (which serves "
                "active adapters exactly)"
            )
        versions = _versions(projections)
        if versions == self.versions:
            return
        parts = (projections.w_k, projections.w_v, projections.b_k, projections.b_v)
        for old, tensor in zip(self.sketches, parts, strict=True):
            new = _sketch(tensor)
            if (old is None) != (new is None) or (
                old is not None and float((new - old).abs().max()) > 1e-12 * float(old.abs().max().clamp_min(1e-300))
            ):
                raise StaleKModeWeights(
                    f"{where}: the key/value weights changed after slimify (load_state_dict, an optimizer step or an "
                    "in-place edit), so its K-mode W_KV = W_K^-1 W_V is stale and decode would use the old weights. "
                    "Call hf_slim.unslimify(model) and hf_slim.slimify(model, mode='k') again after changing weights, "
                    "or use mode='input', which always reads the live weights"
                )
        self.versions = versions  # same values (a device move or a reload): remember the new counters
