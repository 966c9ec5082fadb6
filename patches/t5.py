"""T5 family: T5 v1.0 / v1.1 / Flan-T5 (``t5``), mT5 (``mt5``) and UMT5 (``umt5``).

One attention class serves three roles in T5: encoder self-attention (no cache: left untouched), decoder causal
self-attention (slim input cache: the layer input X, ``d_model`` wide, instead of K and V, ``num_heads * d_kv`` wide
each), and decoder cross-attention (reads the encoder output E at every step: no cache at all).

Why T5 gains most: T5-3B and T5-11B project to ``e = num_heads * d_kv`` wider than ``d_model`` (T5-11B: d_model 1024,
e = 128 * 128 = 16384), so X is ``2 * e / d_model = 32`` times smaller than K+V. The same fact rules out the K cache
there (``W_K`` is 1024 x 16384, not invertible): ``slimify(model, mode="k")`` keeps the input cache on every such layer
with a :class:`~hf_slim.SlimFallbackWarning` (the K cache would also be 16x larger than X); configs with
``e == d_model`` (t5-small/base/large) can use it.

Positions: T5 adds a learned relative position bias to unscaled scores (scale 1.0, no q/k/v biases). The bias is
recomputed at every step by the module's own ``compute_bias`` (never cached), with the key length the unmodified model
would see (``past + new``) and its ``past_seen_tokens`` offset, so decode steps get exactly the ``(1, h, new, seq)``
rows of the original, including the decoder's causal (unidirectional) buckets. T5 / mT5 compute it in layer 0 and
share it with later layers through the block outputs; UMT5 gives every layer its own bias table. Cross-attention has
no relative bias: the model adds a zero bias, which we keep (it is what the original hands to the next layers).
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mt5.modeling_mt5 import MT5Attention, MT5Stack
from transformers.models.t5.modeling_t5 import T5Attention, T5Stack, eager_attention_forward
from transformers.models.umt5.modeling_umt5 import UMT5Attention, UMT5Stack

from hf_slim._compat import CACHE, Contract
from hf_slim.attention import encoder_cross_attention, slim_self_attention, split_heads
from hf_slim.cache import self_attention_part
from hf_slim.generation import keep_one_encoder_output_per_input
from hf_slim.projections import Projections
from hf_slim.sites import AttentionSite

#: Stacks whose decoder owns the cache, and attention classes with T5's forward signature
#: ``(hidden_states, mask, key_value_states, position_bias, cache)`` vs UMT5's
#: ``(hidden_states, encoder_hidden_states, cache, attention_mask)``.
STACKS = (T5Stack, MT5Stack, UMT5Stack)
T5_STYLE_ATTENTION = (T5Attention, MT5Attention)

#: Module attributes the shared step (:func:`_slim_t5_attention`) reads on every attention class of the family.
_ATTRIBUTES = (
    "q",
    "k",
    "v",
    "o",
    "n_heads",
    "key_value_proj_dim",
    "layer_idx",
    "has_relative_attention_bias",
    "compute_bias",
    "scaling",
    "dropout",
    "config",
)
_COMPUTE_BIAS = ("query_length", "key_length", "device", "past_seen_tokens")

#: What the adapted forwards rely on in transformers (checked by slimify, see hf_slim._compat).
CONTRACTS = (
    *(
        Contract(
            attention,
            "forward",
            parameters=("hidden_states", "mask", "key_value_states", "position_bias", CACHE),
            attributes=_ATTRIBUTES,
        )
        for attention in T5_STYLE_ATTENTION
    ),
    Contract(
        UMT5Attention,
        "forward",
        parameters=("hidden_states", "encoder_hidden_states", CACHE, "attention_mask"),
        attributes=_ATTRIBUTES,
    ),
    *(Contract(cls, "compute_bias", parameters=_COMPUTE_BIAS) for cls in (*T5_STYLE_ATTENTION, UMT5Attention)),
    *(Contract(stack, "forward", keywords=(CACHE, "use_cache")) for stack in STACKS),
)


def _projections(module: torch.nn.Module) -> Projections:
    """``K = X @ k.weight.T``: views of the live ``nn.Linear`` weights, ``(d_model, num_heads * d_kv)``, no biases."""
    return Projections.of(module.k, module.v)


def _position_bias(
    module, num_queries: int, key_length: int, past_seen_tokens: int, like: torch.Tensor
) -> torch.Tensor:
    """The bias the unmodified module computes when it is handed none: ``(1, h, num_queries, key_length)``.

    Layers without a relative-bias table (later T5 layers when called alone, every cross-attention) add zeros in the
    query's dtype, as the original does; ``like`` is the query ``(b, h, t, dk)``.
    """
    if not module.has_relative_attention_bias:
        bias = torch.zeros((1, module.n_heads, num_queries, key_length), device=like.device, dtype=like.dtype)
        if getattr(module, "gradient_checkpointing", False) and module.training:
            bias.requires_grad = True
        return bias
    return module.compute_bias(num_queries, key_length, device=like.device, past_seen_tokens=past_seen_tokens)


def _self_key_length(cache, layer_idx: int, num_queries: int) -> int:
    """How many keys the unmodified self-attention sees after its cache update, the width of its position bias:
    ``past + new`` with a dynamic cache (or none), every slot (``max_cache_len``) with a static one, whose K/V are
    preallocated (the slim static step masks the unwritten slots and reads this full-width bias on its absorbed path).
    """
    if cache is None:
        return num_queries
    cache = self_attention_part(cache)
    layers = getattr(cache, "layers", ())
    if layer_idx < len(layers) and layers[layer_idx].is_compileable:
        return layers[layer_idx].get_max_length()
    return cache.get_seq_length(layer_idx) + num_queries


# Adapted from transformers 5.24.0, models/t5/modeling_t5.py, T5Attention.forward (shared by the T5, mT5 and UMT5
# forwards below): the cache handling and the attention call change; projections, the module's own compute_bias and
# the output projection are the model's own.
def _slim_t5_attention(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    encoder_states: torch.Tensor | None,
    position_bias: torch.Tensor | None,
    cache,
    kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One T5 decoder attention step (self-attention with a slim cache, or cross-attention over E).

    Parameters
    ----------
    hidden_states:
        ``(batch, new, d_model)``, the layer-normed decoder states (the attention input X).
    mask:
        the mask T5Stack prepared (causal for self-attention, encoder padding for cross-attention), or None.
    encoder_states:
        ``(batch | inputs, frames, d_model)`` encoder output E for cross-attention, None for self-attention.
    position_bias:
        ``(1, h, new, seq)`` shared by an earlier layer, or None to compute it as the unmodified module does.

    Returns
    -------
    ``(attn_output (batch, new, d_model), position_bias (1, h, new, seq), attn_weights or None)``.
    """
    batch, num_queries = hidden_states.shape[:2]
    head_dim = module.key_value_proj_dim
    past_seen_tokens = cache.get_seq_length(module.layer_idx) if cache is not None else 0
    # a static cache's length is a tensor that the cache update below advances in place: keep the value before it (as
    # the unmodified forward does)
    past_seen_tokens = past_seen_tokens.clone() if isinstance(past_seen_tokens, torch.Tensor) else past_seen_tokens
    query = split_heads(module.q(hidden_states), head_dim)  # (b, h, t, dk)
    if encoder_states is not None:
        key_length = encoder_states.shape[1]
    else:
        key_length = _self_key_length(cache, module.layer_idx, num_queries)
    if position_bias is None:
        position_bias = _position_bias(module, num_queries, key_length, past_seen_tokens, query)

    interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)
    dropout = module.dropout if module.training else 0.0

    def run_attention(query, key, value, attention_mask):
        # over a static cache the slim step hands the model's attention the written slots only (as many keys as a
        # dynamic cache holds), while the bias spans every slot, like the unmodified model's: keep its first columns
        # (slot j is key position j); a no-op for every other call
        return interface(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=module.scaling,
            position_bias=position_bias[..., : key.shape[-2]],
            **kwargs,
        )

    want_weights = module.config._attn_implementation == "eager"
    if encoder_states is not None:
        attn_output, attn_weights = encoder_cross_attention(
            module,
            query,
            encoder_states,
            mask,
            module.scaling,
            run_attention,
            want_weights=want_weights,
            position_bias=position_bias,
        )
    else:
        key = split_heads(module.k(hidden_states), head_dim)  # (b, h, t, dk)
        value = split_heads(module.v(hidden_states), head_dim)  # (b, h, t, dk)
        attn_output, attn_weights = slim_self_attention(
            module,
            hidden_states,
            query,
            key,
            value,
            cache,
            mask,
            module.scaling,
            run_attention,
            want_weights=want_weights,
            position_bias=position_bias,
        )
    attn_output = attn_output.reshape(batch, num_queries, -1).contiguous()  # (b, t, e)
    return module.o(attn_output), position_bias, attn_weights


# Adapted from transformers 5.23.0, models/t5/modeling_t5.py, T5Attention.forward (MT5Attention in
# models/mt5/modeling_mt5.py is a copy): the cache handling and the attention call change; the projections, the
# position bias (the module's own compute_bias) and the output projection are the model's own.
# The original is the same in transformers 5.15 to 5.22; CONTRACTS guards what this relies on.
def slim_t5_attention_forward(
    self: T5Attention,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None = None,
    key_value_states: torch.Tensor | None = None,
    position_bias: torch.Tensor | None = None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return _slim_t5_attention(self, hidden_states, mask, key_value_states, position_bias, cache, kwargs)


# Adapted from transformers 5.23.0, models/umt5/modeling_umt5.py, UMT5Attention.forward: as for T5, except that every
# layer computes its own relative position bias and the bias is not returned.
# The original is the same in transformers 5.15 to 5.22; CONTRACTS guards what this relies on.
def slim_umt5_attention_forward(
    self: UMT5Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    output, _, weights = _slim_t5_attention(
        self, hidden_states, attention_mask, encoder_hidden_states, None, cache, kwargs
    )
    return output, weights


def _decoder_stacks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, STACKS) and module.is_decoder]


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Decoder self-attention and cross-attention of every decoder block (the encoder keeps no cache: untouched)."""
    sites = []
    for stack in _decoder_stacks(model):
        for block in stack.block:
            self_attention = block.layer[0].SelfAttention
            t5_style = isinstance(self_attention, T5_STYLE_ATTENTION)
            forward = slim_t5_attention_forward if t5_style else slim_umt5_attention_forward
            modules = [("self", self_attention)]
            if len(block.layer) == 3:  # self-attention, cross-attention, feed-forward
                modules.append(("cross", block.layer[1].EncDecAttention))
            for kind, module in modules:
                site = AttentionSite.of(
                    module, kind, _projections, forward, num_heads=module.n_heads, head_dim=module.key_value_proj_dim
                )
                sites.append(site)
    return sites


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder stack's forward creates ``EncoderDecoderCache(DynamicCache, DynamicCache)`` when none is given."""
    return _decoder_stacks(model)


def default_calibration_inputs(model: torch.nn.Module) -> dict:
    """Encoder and decoder token ids for the K-mode calibration when the user gives none (real text is better)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (2, 64), generator=generator, device="cpu")
    decoder_input_ids = torch.randint(0, vocab, (2, 64), generator=generator, device="cpu")
    return {"input_ids": input_ids.to(model.device), "decoder_input_ids": decoder_input_ids.to(model.device)}


def extra_patches(model: torch.nn.Module) -> list:
    """Beam search keeps one encoder output per input (cross-attention folds the beams onto it)."""
    if not getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "_expand_inputs_for_generation"):
        return []
    return [keep_one_encoder_output_per_input(model)]
