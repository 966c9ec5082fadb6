"""The slim tensor a layer caches (X, or ``[K | Z | s]`` in K mode) and the keys and values rebuilt from it.

What a K-mode layer writes for new tokens, the keys its values are mixed from (un-rotated, times the key scale), and
full K/V for both modes where the model's own attention runs over a cache (chunked prefill, some cross-attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .adapters import LowRank, apply_low_rank
from .rope import unrotate_keys

if TYPE_CHECKING:
    from .attention_state import SlimAttentionState
    from .projections import KeyNorm, Projections
    from .rope import Unrotation


def k_cache_states(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    key: torch.Tensor,
    key_norm: KeyNorm | None = None,
    pre_norm_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """What a K-mode layer caches for new tokens: ``C = [K | Z]``, ``(batch, new, e + r)``, with ``Z = X @ U_r``;
    with a key norm ``C = [K | Z | s]``, ``(batch, new, e + r + 1)``, ``s`` each token's key scale.

    ``hidden_states: (batch, new, d)`` is the attention input X, ``key: (batch, heads, new, head_dim)`` the model's
    own keys (bias and norm included), so the cached keys are bit-identical to the ones the unmodified model attends
    over. ``pre_norm_key: (batch, new, e)``: the keys before ``key_norm`` (the layer's
    :class:`~hf_slim.projections.KeyNorm`), which ``s`` is computed from; ``s`` is stored in the cache dtype (the
    calibration measures that rounding).
    """
    batch, _, new, _ = key.shape
    parts = [key.transpose(1, 2).reshape(batch, new, -1)]  # (b, n, e)
    if module.hf_slim.residual_rank:
        residual = torch.matmul(hidden_states, module.hf_slim_z_proj.to(hidden_states.dtype))  # (b, n, r)
        parts.append(residual.to(key.dtype))
    if module.hf_slim.key_scale:
        if key_norm is None or pre_norm_key is None:
            raise ValueError(f"{module.hf_slim.name}: a key-scaled K layer needs its key norm and pre-norm keys")
        parts.append(key_norm.scale(pre_norm_key).to(key.dtype))  # (b, n, 1)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (b, n, e [+ r] [+ 1])


def scale_keys(keys: torch.Tensor, key_width: int, *, owned: bool = False) -> torch.Tensor:
    """``[K | Z | s] -> [s * K | Z]`` in float32, ``(batch, seq, e + r + 1) -> (batch, seq, e + r)``: a key-scaled
    layer's (un-rotated) keys back at the scale ``W_KV`` maps to values (its ``diag(1/w)`` folded in); the residual
    Z, a plain projection of X, is not scaled. ``owned``: ``keys`` is a float32 buffer of the caller's (the
    un-rotated keys of this step), scaled in place and returned as a view; otherwise a new tensor."""
    if not owned:
        keys = keys.float().clone()
    keys[..., :key_width].mul_(keys[..., -1:])  # (b, n, e) * (b, n, 1)
    return keys[..., :-1]  # (b, n, e + r)


def keys_for_values(
    state: SlimAttentionState, states: torch.Tensor, unrotation: Unrotation | None
) -> torch.Tensor | None:
    """A RoPE or key-scaled K layer's ``[K | Z]`` at the scale ``W_KV`` maps, float32 ``(batch, seq, e + r)``: its
    cached ``states: (batch, seq, width)`` un-rotated with ``unrotation`` (this step's, from the cache) and times each
    token's key scale. None for other layers, whose cache holds those keys already."""
    keys = None
    if state.rotary is not None:
        keys = unrotate_keys(states, unrotation, state.num_heads, state.head_dim, state.rotary)  # (b, n, w) fp32
    if state.key_scale:
        key_width = state.num_heads * state.head_dim
        keys = scale_keys(states if keys is None else keys, key_width, owned=keys is not None)
    return keys


def split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)``, the layout attention interfaces take."""
    return states.view(*states.shape[:-1], -1, head_dim).transpose(1, 2)


def rebuild_kv(
    module: torch.nn.Module, states: torch.Tensor, projections: Projections, plain_keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute full keys and values ``(batch, heads, seq, head_dim)`` from a layer's slim tensor.

    Used for chunked prefill (many new queries on top of a cache), where the ordinary attention kernel is faster
    than the absorbed path. ``projections``: the layer's live projections, as the caller already checked them
    (:meth:`~hf_slim.attention_state.SlimAttentionState.live_projections`). ``plain_keys``: a RoPE or key-scaled
    layer's ``[K | Z]`` at the scale ``W_KV`` maps (un-rotated, times each token's key scale), float32, which the
    values are computed from (its cache holds the keys the scores use; :func:`keys_for_values`).
    """
    state: SlimAttentionState = module.hf_slim
    if state.mode == "k":
        keys = states[..., : state.num_heads * state.head_dim]  # (b, n, e): K without the residual Z
        if plain_keys is None:
            values = linear(states, module.hf_slim_w_kv, module.hf_slim_v_offset.to(states.dtype))  # [K | Z] W_KV
        else:  # RoPE / key scale: float32 keys, as the decode path mixes them: no extra rounding before W_KV
            values = linear(plain_keys, module.hf_slim_w_kv, module.hf_slim_v_offset.float()).to(states.dtype)
    else:
        keys = linear(states, projections.w_k, projections.b_k, projections.k_low_rank)
        values = linear(states, projections.w_v, projections.b_v, projections.v_low_rank)
    return split_heads(keys, state.head_dim), split_heads(values, state.head_dim)


def linear(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low_rank: tuple[LowRank, ...] = ()
) -> torch.Tensor:
    """``states @ weight (+ bias) (+ LoRA updates)`` in the states' dtype: ``(b, n, d) -> (b, n, e)``."""
    out = torch.matmul(states, weight.to(states.dtype))
    if bias is not None:
        out = out + bias
    delta = apply_low_rank(states, low_rank)
    return out if delta is None else out + delta.to(out.dtype)
