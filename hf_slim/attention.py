"""Shared slim attention steps used by every architecture patch.

A patch (``patches/<arch>.py``) computes the model's own query/key/value projections, then calls one of:

* :func:`slim_self_attention` for causal self-attention with a slim cache: prefill (empty cache) runs the model's
  ordinary attention on the fresh K/V and stores only the slim tensor; decode (few queries over a cache) runs the
  absorbed path over the slim tensor; chunked prefill (many queries on top of a cache) rebuilds K/V from the slim
  tensor and runs the ordinary attention again.
* :func:`encoder_cross_attention` for cross-attention over the encoder output E, which every decoder layer shares and
  which generate() already holds, so no cross-attention cache exists at all.

The per-layer facts (mode, projection weights, head layout) live in :class:`SlimAttentionState`, attached to the
patched module as ``module.hf_slim``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .absorbed import absorb_query, absorbed_attention, additive_bias, project_heads
from .adapters import LowRank, apply_low_rank, holds_adapter_layers
from .cache import slim_cache_for
from .cache_layers import SlimLayout
from .dispatch import use_fused_kernel
from .kmode import KSourceStamp, solve_k_mode
from .projections import KeyNorm, Projections
from .rope import RotaryLayout, RotarySource, unrotate_keys

if TYPE_CHECKING:
    from .sites import AttentionRoute

# run_attention(query, key, value, mask) -> (output (b, t, h, dk), weights or None): the model's own attention call.
RunAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple]


@dataclass
class SlimAttentionState:
    """What a patched attention module needs to know about itself.

    Attributes
    ----------
    mode:
        ``"input"`` (cache X), ``"k"`` (cache K), or ``"encoder"`` (cross-attention over the encoder output).
    layer_idx:
        index of this layer's slot in the slim cache.
    num_heads, head_dim:
        head layout of the projections.
    projections:
        returns the module's live :class:`Projections`.
    calibration:
        per-layer numbers measured when the mode was chosen (K mode relative errors), for reports and export.
    name:
        the site's name, for error messages.
    layout:
        what this layer writes into a slim cache (:class:`~hf_slim.cache_layers.SlimLayout`: its model and mode), so a
        cache filled by another model or mode is refused.
    k_source:
        for K-mode layers, the :class:`~hf_slim.kmode.KSourceStamp` of the weights ``W_KV`` was derived from,
        checked at every step.
    residual_rank:
        K mode only: ``r``, the input directions cached beside the keys (:mod:`hf_slim.kmode`). The cached tensor
        is ``C = [K | Z]``, ``(batch, seq, e + r)``: scores read the first ``e`` columns (head ``i`` its slice of
        K), the weighted sum reads all ``e + r``, then each head applies its slice of the stacked projection
        ``module.hf_slim_w_kv: (e + r, e)``. ``0`` is the plain K cache.
    rotary:
        the RoPE layout of a K-mode layer whose keys are cached rotated (:mod:`hf_slim.rope`), else None.
    rotary_source:
        how such a layer's cos/sin are recomputed from positions (the model's rotary module or GPT-J's sinusoid
        buffer), or None: its cache then keeps the cos/sin table.
    route:
        how a routed layer's own forward is served (:class:`~hf_slim.interface.AttentionRoute`), or None for a
        layer with a replacement forward.
    key_scale:
        K mode only: the model normalises its keys per token (:class:`KeyNorm`), so the cache keeps one more column
        after ``[K | Z]``, each token's key scale ``s``: ``C = [K | Z | s]``, ``(batch, seq, e + r + 1)``. The
        values are rebuilt from ``[s * K | Z]`` (:func:`scale_keys`; the keys un-rotated first for RoPE), with
        ``diag(1/w)`` folded into ``W_KV``; Z is not scaled.
    """

    mode: str
    layer_idx: int
    num_heads: int
    head_dim: int
    projections: Callable[[], Projections]
    calibration: dict = field(default_factory=dict)
    name: str = ""
    layout: SlimLayout | None = None
    k_source: KSourceStamp | None = None
    residual_rank: int = 0
    rotary: RotaryLayout | None = None
    rotary_source: RotarySource | None = None
    key_scale: bool = False
    route: AttentionRoute | None = None
    _projection_cache: tuple | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Copies and pickles start without the cached read (it holds views of this instance's weights)."""
        return {**self.__dict__, "_projection_cache": None}

    def live_projections(self, module: torch.nn.Module) -> Projections:
        """The layer's projections now; for a K-mode layer, after the O(1) check that ``W_KV`` still fits them
        (:meth:`KSourceStamp.check`).

        Inside a ``torch.compile`` trace the O(1) check is left out (version counters and data pointers cannot be
        traced); the full check (:meth:`verify_derived`) runs eagerly before every ``generate()`` and at the first
        forward on every new slim cache, outside any compiled region.
        """
        projections = self.current_projections(module)
        if self.k_source is not None and not torch.compiler.is_compiling():
            rederive = functools.partial(self._rederive, module, projections)
            self.k_source.check(projections, self.derived_buffers(module), self.name, rederive)
        return projections

    def current_projections(self, module: torch.nn.Module) -> Projections:
        """:attr:`projections`, read again only when the layer's state may have changed since the last read.

        Why: reading them (PEFT detection, dequantization rules, weight views) costs more host time than the rest of
        a decode step's bookkeeping, at every step of every layer. The last read is reused while the layer holds
        the same submodules (a PEFT wrapper or a quantized layer swapped in replaces one) and its weights the same
        storage (``.data = ...``, a cast or a device move changes it; in-place edits reach the views the read holds,
        and the K-mode stamp's version counters see them). Layers with PEFT adapter layers (enabled or not) or
        quantized projections are read at every step: their state lives in flags and codes these keys do not cover.
        """
        cached = self._projection_cache
        if cached is not None and not torch.compiler.is_compiling():
            key, projections = cached
            if key == _layer_state_key(module, projections):
                return projections
        projections = self.projections()
        plain = projections.quantized is None and not holds_adapter_layers(module)
        self._projection_cache = (_layer_state_key(module, projections), projections) if plain else None
        return projections

    def derived_buffers(self, module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        """A K-mode layer's buffers derived from its weights: ``W_KV (e + r, e)``, the value offset ``(e,)`` and, for
        ``r > 0``, ``z_proj (d, r)`` (see :mod:`hf_slim.kmode`)."""
        names = ("hf_slim_w_kv", "hf_slim_v_offset") + (("hf_slim_z_proj",) if self.residual_rank else ())
        return tuple(module._buffers[name] for name in names)

    @torch.compiler.disable
    def verify_derived(self, module: torch.nn.Module) -> None:
        """The full check of a K-mode layer (:meth:`KSourceStamp.verify`: one read of W_K, W_V and the derived
        buffers), eager even when called from compiled code; a no-op for other layers."""
        if self.k_source is None:
            return
        projections = self.projections()
        rederive = functools.partial(self._rederive, module, projections)
        self.k_source.verify(projections, self.derived_buffers(module), self.name, rederive)

    @torch.no_grad()
    def _rederive(self, module: torch.nn.Module, projections: Projections) -> None:
        """Solve the derived buffers again from the live (already checked) weights, in place, at this layer's
        residual rank (the float64 SVD of W_K: as long as slimify's solve of one layer)."""

        weights = solve_k_mode(projections, self.residual_rank)
        values = (weights.w_kv, weights.v_offset) + ((weights.z_proj,) if self.residual_rank else ())
        for buffer, value in zip(self.derived_buffers(module), values, strict=True):
            buffer.copy_(value.to(device=buffer.device, dtype=buffer.dtype))


def _layer_state_key(module: torch.nn.Module, projections: Projections) -> tuple:
    """What a cached read of a layer's projections depends on: the identity of the module's submodules (all levels)
    and the storage of the tensors the read came from (:meth:`SlimAttentionState.current_projections`)."""
    sources = projections.sources or (projections.w_k, projections.w_v, projections.b_k, projections.b_v)
    return (
        tuple(id(sub) for sub in module.modules()),
        tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in sources if t is not None),
    )


def use_absorbed(num_queries: int, head_dim: int) -> bool:
    """Whether the absorbed path is cheaper than rebuilding K/V for ``num_queries`` new tokens.

    Absorbed costs ``2*h*t*n*d`` per layer, rebuilding K and V costs ``2*n*d*e`` plus the attention: the absorbed
    path wins while ``t < 2 * head_dim``; we switch at ``head_dim`` to stay clear of the crossover.
    """
    return num_queries <= head_dim


def _bias_for_decode(mask: torch.Tensor | None, num_queries: int, seq_len: int, device) -> torch.Tensor | None:
    """Additive float32 bias ``(b|1, h|1, t, n)`` for the absorbed path from whatever mask the model prepared.

    ``None`` from transformers means "no padding, causal": with one query nothing is masked; with several queries on
    top of a cache the causal pattern is bottom-right aligned (query ``i`` sees keys ``<= past + i``).
    """
    if mask is not None:
        if mask.dim() == 2:  # (b, n) padding mask of 1/0 (flash-attention style)
            mask = mask[:, None, None, :].bool()
        return additive_bias(mask[..., :seq_len])
    if num_queries == 1:
        return None
    past = seq_len - num_queries
    key_pos = torch.arange(seq_len, device=device)
    query_pos = torch.arange(num_queries, device=device)[:, None] + past
    return additive_bias((key_pos[None, :] <= query_pos)[None, None])  # (1, 1, t, n)


def fused_kernel_enabled(cache: torch.Tensor) -> bool:
    """Whether decode over ``cache`` runs the Triton kernel: the measured rule of :mod:`hf_slim.dispatch`."""
    return use_fused_kernel(cache)


def attend(
    query: torch.Tensor,
    cache: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None,
    head_slice: bool = False,
    return_weights: bool = False,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`~hf_slim.absorbed.absorbed_attention`, through the fused kernel where it applies (no weights asked)."""
    if not return_weights and fused_kernel_enabled(cache):
        from .kernels import slim_decode_attention

        mixed = slim_decode_attention(query, cache, scale=scale, bias=bias, head_slice=head_slice, values=values)
        return mixed, None
    return absorbed_attention(
        query, cache, scale=scale, bias=bias, head_slice=head_slice, return_weights=return_weights, values=values
    )


def _decode_input_mode(state, projections, query, states, bias, scale, want_weights):
    query_abs = absorb_query(query, projections.w_k, projections.k_low_rank)  # (b, h, t, d)
    mixed, weights = attend(query_abs, states, scale=scale, bias=bias, return_weights=want_weights)
    return project_heads(mixed, projections.w_v, projections.b_v, projections.v_low_rank), weights  # (b, h, t, dk)


def _decode_k_mode(module, query, states, bias, scale, want_weights, values=None):
    mixed, weights = attend(
        query, states, scale=scale, bias=bias, head_slice=True, return_weights=want_weights, values=values
    )  # (b, h, t, e)
    return project_heads(mixed, module.hf_slim_w_kv, module.hf_slim_v_offset), weights  # (b, h, t, dk)


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
    over. ``pre_norm_key: (batch, new, e)``: the keys before ``key_norm`` (the layer's :class:`KeyNorm`), which ``s``
    is computed from; ``s`` is stored in the cache dtype (the calibration measures that rounding).
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


def split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)``, the layout attention interfaces take."""
    return states.view(*states.shape[:-1], -1, head_dim).transpose(1, 2)


def rebuild_kv(
    module: torch.nn.Module, states: torch.Tensor, projections: Projections, plain_keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute full keys and values ``(batch, heads, seq, head_dim)`` from a layer's slim tensor.

    Used for chunked prefill (many new queries on top of a cache), where the ordinary attention kernel is faster
    than the absorbed path. ``projections``: the layer's live projections, as the caller already checked them
    (:meth:`SlimAttentionState.live_projections`). ``plain_keys``: a RoPE or key-scaled layer's ``[K | Z]`` at the
    scale ``W_KV`` maps (un-rotated, times each token's key scale), float32, which the values are computed from (its
    cache holds the keys the scores use).
    """
    state: SlimAttentionState = module.hf_slim
    if state.mode == "k":
        keys = states[..., : state.num_heads * state.head_dim]  # (b, n, e): K without the residual Z
        if plain_keys is None:
            values = _linear(states, module.hf_slim_w_kv, module.hf_slim_v_offset.to(states.dtype))  # [K | Z] W_KV
        else:  # RoPE / key scale: float32 keys, as the decode path mixes them: no extra rounding before W_KV
            values = _linear(plain_keys, module.hf_slim_w_kv, module.hf_slim_v_offset.float()).to(states.dtype)
    else:
        keys = _linear(states, projections.w_k, projections.b_k, projections.k_low_rank)
        values = _linear(states, projections.w_v, projections.b_v, projections.v_low_rank)
    return split_heads(keys, state.head_dim), split_heads(values, state.head_dim)


def _linear(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low_rank: tuple[LowRank, ...] = ()
) -> torch.Tensor:
    """``states @ weight (+ bias) (+ LoRA updates)`` in the states' dtype: ``(b, n, d) -> (b, n, e)``."""
    out = torch.matmul(states, weight.to(states.dtype))
    if bias is not None:
        out = out + bias
    delta = apply_low_rank(states, low_rank)
    return out if delta is None else out + delta.to(out.dtype)


def slim_self_attention(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache,
    attention_mask: torch.Tensor | None,
    scale: float,
    run_attention: RunAttention,
    *,
    want_weights: bool = False,
    position_bias: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    position_ids: torch.Tensor | None = None,
    pre_norm_key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One self-attention step with a slim cache.

    Parameters
    ----------
    module:
        the patched attention module (carries ``module.hf_slim``).
    hidden_states:
        ``(batch, new, d_model)``, the attention input X (after the layer norm).
    query, key, value:
        ``(batch, heads, new, head_dim)``, the model's own projections of the new tokens.
    cache:
        the cache handed to the layer (a :class:`~hf_slim.cache.SlimCache`, possibly inside an
        ``EncoderDecoderCache``), or None.
    attention_mask:
        the mask the model prepared for its attention implementation.
    scale:
        score scale the model uses.
    run_attention:
        the model's own attention call, used for prefill.
    want_weights:
        return attention probabilities from the absorbed path (eager ``output_attentions``).
    position_bias:
        additive score bias ``(1|b, 1|h, new|1, seq)`` (T5 relative positions, ALiBi, windowed masks), applied on
        both paths by the caller's ``run_attention`` and here on the absorbed path; or a function
        ``position_bias(seq, query_slots)`` returning that bias, for biases the model slices by key length or by the
        queries' cache slots: ``seq`` is the number of cache slots a step attends over (``max_cache_len`` for a
        static cache), ``query_slots: (new,)`` the slots the new tokens were written to (``seq - new ..`` for a
        dynamic cache, the written length less ``new`` for a static one). Where ``run_attention`` runs over a static
        cache (prefill, chunks) it gets the written slots only, K/V and mask as long as a dynamic cache's.
    rotary:
        ``(cos, sin)``, each ``(batch|1, new, rotary_dim)``, that rotated ``query`` and ``key`` (RoPE layers, whose
        ``key`` is the rotated one: :mod:`hf_slim.rope`).
    position_ids:
        ``(batch|1, new)``, the positions ``rotary`` was computed for (RoPE layers): the cache keeps them and
        recomputes cos/sin from them (:class:`~hf_slim.rotary_positions.RotaryPositions`).
    pre_norm_key:
        ``(batch, new, e)``, the keys before the model's per-token key norm (layers with a :class:`KeyNorm`, whose
        ``key`` is the normalised one), for the key scale the K cache keeps.

    Returns
    -------
    output:
        ``(batch, new, heads, head_dim)`` in the query dtype, as transformers' attention interfaces return it.
    weights:
        ``(batch, heads, new, seq)`` or None.
    """
    state: SlimAttentionState = module.hf_slim
    cache = slim_cache_for(cache, state.layer_idx, where=type(module).__name__)
    if cache is None:
        return run_attention(query, key, value, attention_mask)
    projections = state.live_projections(module)  # K mode: W_KV still fits the weights and dtype (raises otherwise)
    batch, _, num_queries, _ = query.shape
    if state.mode == "input":
        new_states = hidden_states  # (b, t, d)
    else:
        new_states = k_cache_states(module, hidden_states, key, projections.key_norm, pre_norm_key)  # (b, t, w)
    layer = cache.layers[state.layer_idx] if state.layer_idx < len(cache.layers) else None
    static = layer is not None and layer.is_compileable
    # A static layer decides by query count alone (its length is a tensor: no data-dependent branch under compile);
    # its unwritten slots are masked below.
    past = None if static else cache.get_seq_length(state.layer_idx)
    absorbed = use_absorbed(num_queries, state.head_dim) and (static or past > 0)
    if static and not absorbed:
        past = int(layer.get_seq_length())  # a static cache's prefill runs eagerly
    states = cache.update_slim(new_states, state.layer_idx, state.layout)  # (b, n, w)
    plain_keys = None
    if state.rotary is not None:
        unrotation = cache.update_rotary(rotary, state.layer_idx, position_ids, state.rotary_source)
    if static and not absorbed:
        # The model's own attention gets the written slots only, as from a dynamic cache: models that slice a mask or
        # a bias by key length (GPT-Neo's window rows, ALiBi) then see the same lengths; later slots are unwritten.
        written = past + num_queries
        states = states[:, :written]  # (b, past + t, w)
        attention_mask = None if attention_mask is None else attention_mask[..., :written]
    if past == 0:
        return run_attention(query, key, value, attention_mask)
    if state.rotary is not None:
        plain_keys = unrotate_keys(states, unrotation, state.num_heads, state.head_dim, state.rotary)  # (b, n, w) fp32
    if state.key_scale:
        key_width = state.num_heads * state.head_dim
        plain_keys = scale_keys(states if plain_keys is None else plain_keys, key_width, owned=plain_keys is not None)
    if not absorbed:
        full_key, full_value = rebuild_kv(module, states, projections, plain_keys)
        return run_attention(query, full_key, full_value, attention_mask)

    if static:
        bias = layer.causal_bias(num_queries)
        if attention_mask is not None:
            bias = bias + additive_bias(attention_mask[..., : states.shape[1]])
    else:
        bias = _bias_for_decode(attention_mask, num_queries, states.shape[1], states.device)
    if callable(position_bias):
        position_bias = position_bias(states.shape[1], cache.layers[state.layer_idx].query_slots(num_queries))
    if position_bias is not None:
        bias = position_bias.float() if bias is None else bias + position_bias.float()
    if state.mode == "k":
        out, weights = _decode_k_mode(module, query, states, bias, scale, want_weights, plain_keys)
    else:
        out, weights = _decode_input_mode(state, projections, query, states, bias, scale, want_weights)
    return out.to(query.dtype).transpose(1, 2), weights


def encoder_cross_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    encoder_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    run_attention: RunAttention,
    *,
    want_weights: bool = False,
    position_bias: torch.Tensor | None = None,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention computed from the encoder output E at every step: no cross-attention cache.

    Beam search and ``num_return_sequences`` give ``batch = inputs * group`` query rows; when the encoder output is
    kept once per input (``encoder_states.shape[0] == inputs``), the group's queries are folded into the query axis
    so that one copy of E serves every beam (EL-attention). Beams never move between inputs, so E needs no reorder.

    Parameters
    ----------
    query:
        ``(batch, heads, new, head_dim)``.
    encoder_states:
        ``(inputs, frames, d_model)`` with ``batch % inputs == 0``.
    attention_mask:
        encoder padding mask as prepared by the model (bool or additive), broadcastable to
        ``(batch, 1, new, frames)``, or None.
    fresh:
        the keys and values of E the model's own forward computed this step, ``(inputs, heads, frames, head_dim)``
        each, if it did (its first step): a prefill over one copy of E per decoder row then runs the model's own
        attention on them, bit for bit.

    Returns
    -------
    ``(batch, new, heads, head_dim)`` in the query dtype, and the weights ``(batch, heads, new, frames)`` or None.
    """
    state: SlimAttentionState = module.hf_slim
    projections = state.current_projections(module)
    batch, heads, num_queries, head_dim = query.shape
    inputs = encoder_states.shape[0]
    if batch % inputs:
        raise ValueError(f"{batch} decoder rows cannot share {inputs} encoder outputs")
    group = batch // inputs
    if group == 1 and not use_absorbed(num_queries, head_dim):
        if fresh is not None:
            return run_attention(query, *fresh, attention_mask)
        keys = _linear(encoder_states, projections.w_k, projections.b_k, projections.k_low_rank)  # (inputs, frames, e)
        values = _linear(encoder_states, projections.w_v, projections.b_v, projections.v_low_rank)
        return run_attention(query, split_heads(keys, head_dim), split_heads(values, head_dim), attention_mask)

    bias = None if attention_mask is None else additive_bias(attention_mask)  # (b|1, 1|h, t|1, frames)
    if position_bias is not None:
        bias = position_bias.float() if bias is None else bias + position_bias.float()
    # fold the group into the query axis: (inputs*group, h, t, .) -> (inputs, h, group*t, .)
    grouped_query = query.view(inputs, group, heads, num_queries, head_dim).transpose(1, 2)
    grouped_query = grouped_query.reshape(inputs, heads, group * num_queries, head_dim)
    if bias is not None:
        bias = _fold_bias(bias, inputs, group, heads, num_queries)
    query_abs = absorb_query(grouped_query, projections.w_k, projections.k_low_rank)  # (inputs, h, g*t, d)
    mixed, weights = attend(
        query_abs, encoder_states, scale=scale, bias=bias, return_weights=want_weights
    )  # (inputs, h, g*t, d)
    out = project_heads(mixed, projections.w_v, projections.b_v, projections.v_low_rank)  # (inputs, h, g*t, dk)
    out = out.view(inputs, heads, group, num_queries, head_dim).transpose(1, 2)  # (inputs, g, h, t, dk)
    out = out.reshape(batch, heads, num_queries, head_dim).to(query.dtype).transpose(1, 2)  # (b, t, h, dk)
    if weights is not None:
        weights = weights.view(inputs, heads, group, num_queries, -1).transpose(1, 2)
        weights = weights.reshape(batch, heads, num_queries, -1)
    return out, weights


def grouped_cross_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    run_attention: RunAttention,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own attention over explicit keys/values of one encoder copy per input, for ``inputs * group``
    decoder rows (beams kept on one encoder output, without a cache): each input's group is folded into the query
    axis, as :func:`encoder_cross_attention` does.

    ``query: (inputs * group, heads, new, head_dim)``, ``key``/``value``: ``(inputs, heads, frames, head_dim)``;
    returns ``(inputs * group, new, heads, head_dim)`` and the weights ``(inputs * group, heads, new, frames)`` or
    None.
    """
    batch, heads, num_queries, head_dim = query.shape
    inputs = key.shape[0]
    if batch % inputs:
        raise ValueError(f"{batch} decoder rows cannot share {inputs} encoder outputs")
    group = batch // inputs
    grouped = query.view(inputs, group, heads, num_queries, head_dim).transpose(1, 2)
    grouped = grouped.reshape(inputs, heads, group * num_queries, head_dim)  # (inputs, h, g*t, dk)
    mask = None if attention_mask is None else _fold_bias(attention_mask, inputs, group, heads, num_queries)
    out, weights = run_attention(grouped, key, value, mask)  # (inputs, g*t, h, dk)
    out = out.reshape(inputs, group, num_queries, heads, head_dim).reshape(batch, num_queries, heads, head_dim)
    if weights is not None:
        weights = weights.view(inputs, heads, group, num_queries, -1).transpose(1, 2)
        weights = weights.reshape(batch, heads, num_queries, -1)
    return out, weights


#: the module attributes :func:`decoder_attention` reads (for the forward contracts of the patches that call it)
DECODER_ATTENTION_READS = ("k_proj", "v_proj", "head_dim")


def decoder_attention(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    key_value_states: torch.Tensor | None,
    cache,
    attention_mask: torch.Tensor | None,
    scale: float,
    run_attention: RunAttention,
    *,
    want_weights: bool,
    dropout: float,
    contiguous_heads: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The body the encoder-decoder attention classes share (BART and its copies, Whisper, TrOCR): decoder
    self-attention over a slim cache, or cross-attention over the encoder output with no cache.

    Why one place: these classes differ only in how they scale the query, which attention call they make and their
    output projection, so their adapted forwards compute those and hand the rest here. The module's own ``k_proj`` /
    ``v_proj`` project the new tokens (self) or, when attention dropout is on (training), the encoder output, whose
    probabilities over explicit K/V the dropout needs.

    Parameters
    ----------
    hidden_states:
        ``(batch, new, d_model)``, the attention input.
    query:
        ``(batch, heads, new, head_dim)``, projected and scaled as the model does.
    key_value_states:
        the encoder output ``(inputs, frames, d_enc)`` for cross-attention (``batch % inputs == 0``), or None.
    contiguous_heads:
        make the split key/value heads contiguous, as the model's own forward does (Whisper): the attention kernels
        round differently on strided inputs, and the prefill must be the model's bit for bit.

    Returns
    -------
    ``(batch, new, heads, head_dim)`` and the weights ``(batch, heads, new, keys)`` or None.
    """

    def heads(states: torch.Tensor) -> torch.Tensor:
        split = split_heads(states, module.head_dim)  # (b, h, n, dk)
        return split.contiguous() if contiguous_heads else split

    if key_value_states is None:
        key, value = heads(module.k_proj(hidden_states)), heads(module.v_proj(hidden_states))  # (b, h, t, dk)
        return slim_self_attention(
            module,
            hidden_states,
            query,
            key,
            value,
            cache,
            attention_mask,
            scale,
            run_attention,
            want_weights=want_weights,
        )
    if dropout > 0.0:
        key, value = heads(module.k_proj(key_value_states)), heads(module.v_proj(key_value_states))  # (b, h, f, dk)
        return run_attention(query, key, value, attention_mask)
    return encoder_cross_attention(
        module, query, key_value_states, attention_mask, scale, run_attention, want_weights=want_weights
    )


def _fold_bias(bias: torch.Tensor, inputs: int, group: int, heads: int, num_queries: int) -> torch.Tensor:
    """Reshape a bias with one row per decoder row (``inputs*group``), per input (``inputs``, when the model built
    the encoder mask from the unexpanded encoder output) or shared (1) to ``(inputs, h|1, group*t, n)``."""
    frames = bias.shape[-1]
    if bias.shape[0] == inputs and group > 1:
        bias = bias.expand(inputs, bias.shape[1], num_queries, frames)[:, None]  # (inputs, 1, h|1, t, n)
        bias = bias.expand(inputs, group, *bias.shape[2:])
    else:
        bias = bias.expand(inputs * group, bias.shape[1], num_queries, frames)
        bias = bias.reshape(inputs, group, bias.shape[1], num_queries, frames)
    return bias.transpose(1, 2).reshape(inputs, -1, group * num_queries, frames)
