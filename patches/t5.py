"""T5 family: T5 v1.0 / v1.1 / Flan-T5 (``t5``), mT5 (``mt5``), UMT5 (``umt5``) and Pop2Piano (``pop2piano``: a T5
over spectrogram embeddings, ``Pop2PianoAttention`` a copy of ``T5Attention``, routed from 5.15 on).

One attention class serves three roles in T5: encoder self-attention (no cache: left untouched), decoder causal
self-attention (slim input cache: the layer input X, ``d_model`` wide, instead of K and V, ``num_heads * d_kv`` wide
each), and decoder cross-attention (reads the encoder output E at every step: no cache at all).

Why T5 gains most: T5-3B and T5-11B project to ``e = num_heads * d_kv`` wider than ``d_model`` (T5-11B: d_model 1024,
e = 128 * 128 = 16384), so X is ``2 * e / d_model = 32`` times smaller than K+V. The same fact rules out the K cache
there (``W_K`` is 1024 x 16384, not invertible): ``slimify(model, mode="k")`` keeps the input cache on every such layer
with a :class:`~hf_slim.SlimFallbackWarning` (the K cache would also be 16x larger than X); configs with
``e == d_model`` (t5-small/base/large) can use it.

No forward is copied: from 5.15 on, T5Attention (and MT5Attention, UMT5Attention, Pop2PianoAttention) calls
``cache.update`` and the attention function ``ALL_ATTENTION_FUNCTIONS`` holds, with the position bias as its
``position_bias`` keyword, so the model's own forward is served through the extension points (:mod:`hf_slim.interface`,
:data:`ROUTE`).

Positions: T5 adds a learned relative position bias to unscaled scores (scale 1.0, no q/k/v biases). The model's own
forward computes it at every step with its ``compute_bias`` (never cached), sized by the keys the cache update returns:
the slim step reports the key length the unmodified model would see (``past + new``, a static cache's every slot;
:attr:`hf_slim.step.SlimStep.shape`), so decode steps get exactly the ``(1, h, new, seq)`` rows of the original,
including the decoder's causal (unidirectional) buckets. T5 / mT5 compute it in layer 0 and share it with later layers
through the block outputs; UMT5 gives every layer its own bias table. The attention function receives it as a keyword
(``ScoreBias.keyword``): the prefill hands it on to the model's function, the slim decode adds it. Cross-attention has
no relative bias: the model adds a zero bias, kept the same way.

UMT5's cross-attention sizes the encoder's keys by the decoder's batch (``view(batch_size, ...)``): with beams over one
encoder copy per input, its forward is handed the encoder output repeated per decoder row
(``AttentionRoute.expand_encoder``) for the keys it computes itself; the slim paths read the one copy.
"""

from __future__ import annotations

import torch
from transformers.models.mt5.modeling_mt5 import MT5Attention, MT5Stack
from transformers.models.pop2piano.modeling_pop2piano import Pop2PianoAttention, Pop2PianoStack
from transformers.models.t5.modeling_t5 import T5Attention, T5Stack
from transformers.models.umt5.modeling_umt5 import UMT5Attention, UMT5Stack

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Projections,
    ScoreBias,
    instances_of,
    one_encoder_output_per_input,
    route_contracts,
)

#: Stacks whose decoder owns the cache, and attention classes with T5's forward signature
#: ``(hidden_states, mask, key_value_states, position_bias, cache)`` vs UMT5's
#: ``(hidden_states, encoder_hidden_states, cache, attention_mask)``.
T5_STYLE_STACKS = (T5Stack, MT5Stack, Pop2PianoStack)
STACKS = (*T5_STYLE_STACKS, UMT5Stack)
T5_STYLE_ATTENTION = (T5Attention, MT5Attention, Pop2PianoAttention)

#: The model's own forwards serve every class (no copy): the relative position bias reaches the attention function as
#: ``position_bias``; the encoder output arrives as ``key_value_states`` (T5, mT5) or ``encoder_hidden_states`` (UMT5).
POSITION_BIAS = ScoreBias.keyword("position_bias")
ROUTE = AttentionRoute(encoder_parameter="key_value_states", score_bias=POSITION_BIAS)
UMT5_ROUTE = AttentionRoute(encoder_parameter="encoder_hidden_states", score_bias=POSITION_BIAS, expand_encoder=True)

#: Module attributes the patch reads on every attention class of the family.
_ATTRIBUTES = ("k", "v", "n_heads", "key_value_proj_dim", "layer_idx", "config")


def _projections(module: torch.nn.Module) -> Projections:
    """``K = X @ k.weight.T``: views of the live ``nn.Linear`` weights, ``(d_model, num_heads * d_kv)``, no biases."""
    return Projections.of(module.k, module.v)


def _decoder_stacks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [module for module in instances_of(model, STACKS) if module.is_decoder]


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Decoder self-attention and cross-attention of every decoder block (the encoder keeps no cache: untouched)."""
    sites = []
    for stack in _decoder_stacks(model):
        for block in stack.block:
            self_attention = block.layer[0].SelfAttention
            route = ROUTE if type(self_attention) in T5_STYLE_ATTENTION else UMT5_ROUTE
            modules = [("self", self_attention)]
            if len(block.layer) == 3:  # self-attention, cross-attention, feed-forward
                modules.append(("cross", block.layer[1].EncDecAttention))
            for kind, module in modules:
                site = AttentionSite.of(
                    module, kind, _projections, route, num_heads=module.n_heads, head_dim=module.key_value_proj_dim
                )
                sites.append(site)
    return sites


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=_decoder_stacks,  # the decoder stack creates EncoderDecoderCache(DynamicCache, DynamicCache)
    contracts=(
        *route_contracts(ROUTE, attention=T5_STYLE_ATTENTION, cache_owners=T5_STYLE_STACKS, attributes=_ATTRIBUTES),
        *route_contracts(UMT5_ROUTE, attention=(UMT5Attention,), cache_owners=(UMT5Stack,), attributes=_ATTRIBUTES),
    ),
    extra_patches=one_encoder_output_per_input,
)
