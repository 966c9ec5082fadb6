"""The key and value projections of one attention layer, read from the live module at every use.

Why a module of its own: the slim decode, the K-mode solve and calibration, the sites and the stamps all need the
same view of a layer's ``W_K`` / ``W_V`` (with biases, LoRA updates, a per-token key norm, quantized weights read
through their own dequantization), so it sits below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import LowRank, projection_weights, read_projection


@dataclass(frozen=True)
class KeyNorm:
    """An RMSNorm over the full key width, applied per token between the key projection and RoPE (OLMo-2's
    ``k_norm``): ``K = w * k / s`` with ``k = X W_K + b_K`` and the token's key scale ``s = sqrt(mean(k^2) + eps)``,
    computed in float32 and cast to the model dtype.

    Why the K cache can still serve such a layer: ``k = s * K / w``, so with each token's ``s`` kept beside its keys
    (one number) and ``diag(1/w)`` folded into ``W_KV``, ``V = (s * K) W_KV' + offset`` is linear again
    (:mod:`hf_slim.kmode`). Shapes: ``weight: (e,)``.
    """

    weight: torch.Tensor
    eps: float

    @classmethod
    def of(cls, norm: torch.nn.Module) -> KeyNorm:
        """Read the live weight and epsilon of a transformers RMSNorm module (``variance_epsilon`` or ``eps``)."""
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise ValueError(f"{type(norm).__name__} has no variance_epsilon/eps: not an RMSNorm hf_slim can invert")
        return cls(norm.weight, float(eps))

    def scale(self, raw_keys: torch.Tensor) -> torch.Tensor:
        """Each token's ``s = sqrt(mean(k^2) + eps)``, float32: ``(..., e) -> (..., 1)``, from the keys before the
        norm, as the norm computes its ``rsqrt`` (float32 mean of squares)."""
        return torch.sqrt(raw_keys.float().pow(2).mean(-1, keepdim=True) + self.eps)

    def normalise(self, raw_keys: torch.Tensor) -> torch.Tensor:
        """The norm's output as transformers' RMSNorm computes it (float32, ``* weight``, cast to the keys' dtype):
        for the calibration, which simulates the pipeline (the forward calls the model's own module)."""
        normalised = raw_keys.float() * torch.rsqrt(raw_keys.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.detach().to(raw_keys.device) * normalised).to(raw_keys.dtype)


@dataclass
class Projections:
    """The key and value projections of one attention layer, as ``K = X @ w_k + b_k (+ LoRA)`` and likewise V.

    Tensors are read from the live module parameters at every call (views where the layout allows; fused projections
    whose rows interleave heads are gathered, see :func:`interleaved_qkv_projections`), so device moves, dtype casts,
    weight edits, PEFT adapters and accelerate offload hooks are followed. Shapes: ``w_k, w_v: (d_in, heads *
    head_dim)``, columns head-major; ``k_low_rank`` / ``v_low_rank``: the active LoRA updates
    (:class:`~hf_slim.adapters.LowRank`), empty without adapters; ``key_norm``: the per-token norm the model applies
    to the projected keys (:class:`KeyNorm`, OLMo-2), or None.
    """

    w_k: torch.Tensor
    w_v: torch.Tensor
    b_k: torch.Tensor | None = None
    b_v: torch.Tensor | None = None
    k_low_rank: tuple[LowRank, ...] = ()
    v_low_rank: tuple[LowRank, ...] = ()
    #: the parameters these were read from (K-mode stamps watch them); empty: the four tensors above
    sources: tuple[torch.Tensor, ...] = ()
    key_norm: KeyNorm | None = None
    #: the kind of a quantized key or value layer (``w_k``/``w_v`` are then dense copies, dequantized at this read,
    #: see :func:`~hf_slim.adapters.read_projection`), or None for plain layers
    quantized: str | None = None

    @classmethod
    def of(
        cls,
        k_layer: torch.nn.Module,
        v_layer: torch.nn.Module,
        k_columns: slice | torch.Tensor = slice(None),
        v_columns: slice | torch.Tensor = slice(None),
        *,
        key_norm: torch.nn.Module | None = None,
    ) -> Projections:
        """Read the live projections from the model's key and value layers (the same fused layer with two column
        ranges, or index tensors, for a fused ``qkv``), including active PEFT LoRA adapters on them; ``key_norm``:
        the RMSNorm module the model applies to the full-width projected keys (:class:`KeyNorm`), if any."""
        k_read = read_projection(k_layer, where="the key projection")
        v_read = k_read if v_layer is k_layer else read_projection(v_layer, where="the value projection")  # fused: once
        w_k, b_k, k_low_rank, k_sources = projection_weights(k_layer, k_columns, read=k_read)
        w_v, b_v, v_low_rank, v_sources = projection_weights(v_layer, v_columns, read=v_read)
        sources = k_sources + tuple(t for t in v_sources if all(t is not s for s in k_sources))
        norm = None if key_norm is None else KeyNorm.of(key_norm)
        if norm is not None:
            sources = (*sources, norm.weight)
        quantized = next((read.kind for read in (k_read, v_read) if read.kind not in ("linear", "conv1d")), None)
        return cls(w_k, w_v, b_k, b_v, k_low_rank, v_low_rank, sources, norm, quantized)


def interleaved_qkv_projections(fused: torch.nn.Linear, num_heads: int, head_dim: int) -> Projections:
    """Key/value projections of a fused ``query_key_value`` linear whose output is laid out per head as
    ``(heads, 3, head_dim)`` (BLOOM, Falcon-RW): head ``i``'s query, key and value rows are adjacent.

    Why a gather: the absorbed path and the K-mode solve take ``w_k``/``w_v`` with head-major columns
    ``(d_in, heads * head_dim)``; the key rows of head ``i`` sit at ``3 * i * head_dim + head_dim`` in the fused weight,
    so they are copied out (``2 * d_in * heads * head_dim`` numbers per call, what one decode step of the layer reads
    anyway). The module's weight itself is never changed.
    """
    rows = torch.arange(3 * num_heads * head_dim, device=fused.weight.device).view(num_heads, 3, head_dim)
    return Projections.of(fused, fused, rows[:, 1].reshape(-1), rows[:, 2].reshape(-1))  # (d, e) each, head-major


def split_interleaved_qkv(
    fused: torch.Tensor, num_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value heads ``(batch, heads, new, head_dim)`` each of a fused ``(heads, 3, head_dim)`` output
    ``fused: (batch, new, heads * 3 * head_dim)`` (BLOOM, Falcon-RW), as views, the way those models split it.

    Why here and not the model's helper: BLOOM's ``_reshape`` and Falcon's ``_split_heads`` (gone in 5.25) are private
    names a release may drop; this layout is what :func:`interleaved_qkv_projections` reads the weights by.
    """
    heads = fused.unflatten(-1, (num_heads, 3, head_dim))  # (b, t, h, 3, dk)
    return tuple(heads[..., part, :].transpose(1, 2) for part in range(3))  # (b, h, t, dk) each
