"""Attention over a slim cache: the reference (pure PyTorch) path.

Every slim layout stores one tensor per token, ``cache: (batch, seq, width)``, and every head attends over all of
it. What differs is the query each head scores with:

* input cache / encoder cache (absorbed trick, ``head_slice=False``): the query is already absorbed into the input
  space, ``q_abs_i = q_i W_K,i^T`` of width ``d_model``, and scores are ``q_abs_i X^T``;
* K cache (``head_slice=True``): the query keeps its ``head_dim`` width and head ``i`` scores against its own slice
  ``K[..., i*d_k:(i+1)*d_k]`` of the cached keys. A K+R cache (:mod:`hf_slim.kmode`) has ``r`` more columns after
  the ``heads * head_dim`` key columns; scores never read them.

In both layouts the weighted sum ``softmax(scores) @ cache`` uses the whole cache width; the per-head value projection
(``W_V,i`` or ``W_KV,i``) is applied afterwards by the caller, on ``(batch, heads, queries, width)`` rows, which is
what makes the cache read once per step instead of twice (K and V).

The fused GPU kernel in :mod:`hf_slim.kernels` computes the same function; this file is its specification and the
CPU path.
"""

from __future__ import annotations

import functools

import torch

from .adapters import LowRank
from .dispatch import padded_head_scores


def additive_bias(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Turn a transformers attention mask into an additive score bias.

    Why: transformers hands attention layers either a boolean mask (True = attend, SDPA style) or an additive float
    mask (0 / large negative, eager style); the absorbed path adds one bias to the scores.

    Parameters
    ----------
    mask:
        ``None``, a bool mask or a float additive mask broadcastable to ``(batch, heads, queries, keys)``.
    dtype:
        dtype of the returned bias (scores are computed in float32).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return mask.to(dtype)


def absorbed_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    head_slice: bool = False,
    return_weights: bool = False,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention of ``heads`` queries over one shared cache tensor, accumulated in float32.

    Why: slim caches hold one tensor per token that all heads read; this is the decode step of every slim layout
    (see the module docstring), written once for all architectures.

    Parameters
    ----------
    query:
        ``(batch, heads, queries, width)`` when ``head_slice`` is False; ``(batch, heads, queries, head_dim)`` with
        ``heads * head_dim <= width`` when ``head_slice`` is True (the columns after ``heads * head_dim`` are the
        K+R residual: weighted, never scored).
    cache:
        ``(batch, seq, width)``, the slim tensor (layer input X, encoder output E, keys K, or K+R ``[K | Z]``).
    scale:
        multiplies the raw scores (``head_dim ** -0.5`` for most models, 1.0 for T5).
    bias:
        additive float bias broadcastable to ``(batch, heads, queries, seq)`` (masks, T5 position bias, ALiBi).
    head_slice:
        score head ``i`` against its own ``head_dim`` slice of the first ``heads * head_dim`` cache columns (K and
        K+R cache layouts).
    return_weights:
        also return the softmax probabilities (for ``output_attentions``).
    values:
        ``(batch, seq, value_width)``: what the weighted sum reads instead of ``cache`` (a RoPE K cache scores with
        the rotated keys it holds and mixes the un-rotated ones, :mod:`hf_slim.rope`).

    Returns
    -------
    mixed:
        ``(batch, heads, queries, value_width)`` float32, ``softmax(scores) @ values`` per head (``values`` defaults
        to ``cache``).
    weights:
        ``(batch, heads, queries, seq)`` float32 probabilities, or None.
    """
    batch, heads, queries, _ = query.shape
    width = cache.shape[-1]
    cache32 = None
    if head_slice:
        head_dim = query.shape[-1]
        if heads * head_dim > width:
            raise ValueError(f"head_slice needs heads*head_dim <= cache width, got {heads}*{head_dim} > {width}")
        if padded_head_scores(cache):
            scores = _block_diagonal_scores(query, cache)  # (b, h, t, n)
        else:
            cache32 = cache.float() if values is None else None  # (b, n, w), also what the weighted sum reads
            keys = (cache32 if cache32 is not None else cache[..., : heads * head_dim].float())[..., : heads * head_dim]
            keys = keys.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (b, h, n, dk)
            scores = torch.matmul(query.float(), keys.transpose(-1, -2))  # (b, h, t, n)
    else:
        if query.shape[-1] != width:
            raise ValueError(f"query width {query.shape[-1]} does not match cache width {width}")
        cache32 = cache.float()  # (b, n, w)
        flat_query = query.float().reshape(batch, heads * queries, width)  # (b, h*t, w)
        scores = torch.bmm(flat_query, cache32.transpose(1, 2)).view(batch, heads, queries, -1)  # (b, h, t, n)
    # scale * scores + bias, one pass (bias: float32 already, as additive_bias makes it)
    scores = scores.mul_(scale) if bias is None else torch.add(bias.float(), scores, alpha=scale)
    weights = torch.softmax(scores, dim=-1)  # (b, h, t, n)
    if values is not None:
        values32 = values.float()  # (b, n, v)
    else:
        values32 = cache32 if cache32 is not None else cache.float()  # (b, n, w)
    mixed = torch.bmm(weights.view(batch, heads * queries, -1), values32)  # (b, h*t, v)
    mixed = mixed.view(batch, heads, queries, -1)
    return mixed, (weights if return_weights else None)


@functools.cache
def _bmm_takes_out_dtype() -> bool:
    """Whether this torch's CUDA ``bmm`` multiplies half-precision operands into a float32 result (``out_dtype``)."""
    try:
        operand = torch.ones((1, 1, 1), dtype=torch.float16, device="cuda")
        return torch.bmm(operand, operand, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _block_diagonal_scores(query: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """K-cache scores read in place: ``query: (batch, heads, queries, head_dim)`` against each head's slice of
    ``cache: (batch, seq, width)`` -> ``(batch, heads, queries, seq)`` float32.

    Head ``i``'s query is laid out at its own columns ``[i*dk, (i+1)*dk)`` of a zero row as wide as the keys, so one
    batched matmul over the cache's key columns (a strided view, no copy) gives every head's scores; the zeros add
    exact zeros. Half-precision caches multiply in their own dtype with float32 accumulation and output (the
    products of two half-precision numbers are exact in float32, as in the float32 reference); the query is in the
    cache dtype already (the model's own), else it is computed in float32. See :mod:`hf_slim.dispatch` for why.
    """
    batch, heads, queries, head_dim = query.shape
    key_width = heads * head_dim
    half = cache.dtype in (torch.float16, torch.bfloat16) and query.dtype == cache.dtype
    dtype = cache.dtype if half else torch.float32
    padded = torch.zeros((batch, queries, heads, heads, head_dim), dtype=dtype, device=cache.device)  # (b, t, h, h, dk)
    padded.diagonal(dim1=2, dim2=3).copy_(query.permute(0, 2, 3, 1))  # head i's query at its own slice: (b, t, dk, h)
    padded = padded.transpose(1, 2).reshape(batch, heads * queries, key_width)  # (b, h*t, e), rows in (h, t) order
    keys_t = cache[..., :key_width].transpose(1, 2)  # (b, e, n), a view
    if half and _bmm_takes_out_dtype():
        scores = torch.bmm(padded, keys_t, out_dtype=torch.float32)  # (b, h*t, n)
    else:
        scores = torch.bmm(padded.float(), keys_t.float())
    return scores.view(batch, heads, queries, -1)


def absorb_query(query: torch.Tensor, w_k: torch.Tensor, low_rank: tuple[LowRank, ...] = ()) -> torch.Tensor:
    """Move per-head queries into the cache's input space: ``q_abs_i = q_i W_K,i^T``.

    Parameters
    ----------
    query:
        ``(batch, heads, queries, head_dim)``.
    w_k:
        ``(d_in, heads * head_dim)``, the key projection as ``K = X @ w_k``.
    low_rank:
        LoRA updates of the key projection, ``K += s (X down) up``; each absorbs at rank-r cost as
        ``q_i (W_K,i + s down up_i)^T = q_i W_K,i^T + s (q_i up_i^T) down^T``.

    Returns
    -------
    ``(batch, heads, queries, d_in)`` float32.
    """
    batch, heads, queries, head_dim = query.shape
    w_k_heads = w_k.float().view(w_k.shape[0], heads, head_dim).permute(1, 2, 0)  # (h, dk, d)
    # one bmm over heads: matmul would broadcast the weight over the batch and copy it once per row
    flat = query.float().transpose(0, 1).reshape(heads, batch * queries, head_dim)  # (h, b*t, dk)
    absorbed = torch.bmm(flat, w_k_heads)  # (h, b*t, d)
    for term in low_rank:
        up_heads = term.up.float().view(-1, heads, head_dim).permute(1, 2, 0)  # (h, dk, r)
        absorbed = absorbed + torch.matmul(torch.bmm(flat, up_heads), term.down.float().T) * term.scale  # (h, b*t, d)
    return absorbed.view(heads, batch, queries, -1).transpose(0, 1)  # (b, h, t, d)


def project_heads(
    mixed: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor | None = None, low_rank: tuple[LowRank, ...] = ()
) -> torch.Tensor:
    """Apply each head's own value projection to its mixed cache rows: ``head_i = mixed_i W_V,i (+ b_V,i)``.

    A value bias passes through unchanged because each softmax row sums to one.

    Parameters
    ----------
    mixed:
        ``(batch, heads, queries, width)`` from :func:`absorbed_attention`.
    w_v:
        ``(width, heads * head_dim)``: ``W_V`` for the input/encoder cache, ``W_KV`` for the K cache.
    b_v:
        ``(heads * head_dim,)`` or None.
    low_rank:
        LoRA updates of the value projection, ``V += s (X down) up``: head ``i`` adds ``s (mixed_i down) up_i``.

    Returns
    -------
    ``(batch, heads, queries, head_dim)`` float32.
    """
    batch, heads, queries, _ = mixed.shape
    width, inner = w_v.shape
    w_v_heads = w_v.float().view(width, heads, inner // heads).transpose(0, 1)  # (h, w, dk)
    flat = mixed.transpose(0, 1).reshape(heads, batch * queries, width)  # (h, b*t, w), see absorb_query
    if b_v is None:
        out = torch.bmm(flat, w_v_heads)  # (h, b*t, dk)
    else:  # the bias added in the same pass
        out = torch.baddbmm(b_v.float().view(heads, 1, inner // heads), flat, w_v_heads)  # (h, b*t, dk)
    for term in low_rank:
        up_heads = term.up.float().view(-1, heads, inner // heads).transpose(0, 1)  # (h, r, dk)
        out = out + torch.bmm(torch.matmul(flat, term.down.float()), up_heads) * term.scale  # (h, b*t, dk)
    return out.view(heads, batch, queries, -1).transpose(0, 1)  # (b, h, t, dk)
