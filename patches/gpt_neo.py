"""GPT-Neo: learned absolute positions, separate bias-free ``q_proj``/``k_proj``/``v_proj``, unscaled scores, and
alternating global / local (windowed) layers.

Why the input cache applies: positions are added to the embeddings, and the local layers' window is a mask, not a
change of keys. GPT-Neo does not scale its scores (scale 1.0) and computes them in float32.

The window: each :class:`GPTNeoSelfAttention` owns a boolean ``bias`` buffer ``(1, 1, max_positions, max_positions)``,
causal for global layers and causal within the last ``window_size`` tokens for local ones, and slices it by key length
(rows ``key_length - query_length .. key_length``). Prefill and chunked prefill run the module's own ``_attn`` (which
applies it); the absorbed decode adds the same rows as an additive bias (:func:`_window_bias`), so a slim cache keeps
every token of a local layer, as transformers' own dynamic cache does for GPT-Neo.

Static caches are refused: the unpatched model slices its window by the static cache's ``max_cache_len`` and
transformers marks GPT-Neo as not compilable (no hybrid cache), so there is no correct behaviour to match.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoModel, GPTNeoSelfAttention

from hf_slim._compat import forward_contracts
from hf_slim.absorbed import additive_bias
from hf_slim.attention import Projections, is_static_slim_cache, slim_self_attention, split_heads
from hf_slim.sites import AttentionSite, token_calibration_inputs

#: why generate(cache_implementation="static") is refused (read by hf_slim.api)
STATIC_CACHE_REFUSAL = (
    "hf_slim does not support a static cache for GPT-Neo: transformers' own GPT-Neo slices its local window by the "
    "static cache length (it has no hybrid cache), so there is no correct output to match; use the default dynamic "
    "cache"
)


def _projections(module: GPTNeoSelfAttention):
    return Projections.of(module.k_proj, module.v_proj)


def _window_bias(module: GPTNeoSelfAttention, num_queries: int, key_length: int) -> torch.Tensor:
    """The module's causal/window mask rows for the last ``num_queries`` of ``key_length`` keys, as an additive
    float32 bias ``(1, 1, num_queries, key_length)`` (0 visible, dtype minimum hidden), as ``_attn`` slices it."""
    return additive_bias(module.bias[:, :, key_length - num_queries : key_length, :key_length])


def _own_attention(module: GPTNeoSelfAttention, query, key, value, mask):
    """``GPTNeoSelfAttention._attn`` (window mask included) in the attention-interface layout ``(b, t, h, dk)``."""
    out, weights = module._attn(query, key, value, mask)  # (b, h, t, dk)
    return out.transpose(1, 2), weights


# Adapted from transformers 5.23.0, models/gpt_neo/modeling_gpt_neo.py, GPTNeoSelfAttention.forward: the
# projections and the output projection are the model's own; the cache handling and the attention call change.
def slim_gpt_neo_attention_forward(
    self: GPTNeoSelfAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer_past=None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if is_static_slim_cache(layer_past, self.layer_id):
        raise NotImplementedError(STATIC_CACHE_REFUSAL)
    query, key, value = (
        split_heads(projection(hidden_states), self.head_dim) for projection in (self.q_proj, self.k_proj, self.v_proj)
    )  # (b, h, t, dk)
    attn_output, attn_weights = slim_self_attention(
        self,
        hidden_states,
        query,
        key,
        value,
        layer_past,
        attention_mask,
        1.0,
        functools.partial(_own_attention, self),
        want_weights=True,
        position_bias=functools.partial(_window_bias, self, query.shape[2]),
    )
    attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (b, t, e)
    attn_output = self.resid_dropout(self.out_proj(attn_output))
    return attn_output, attn_weights


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The self-attention of every block (global and local alike: the window is the module's own mask)."""
    return [
        AttentionSite(
            module=module,
            kind="self",
            layer_idx=module.layer_id,
            num_heads=module.num_heads,
            head_dim=module.head_dim,
            projections=_projections,
            forward=slim_gpt_neo_attention_forward,
        )
        for module in model.modules()
        if type(module) is GPTNeoSelfAttention
    ]


def cache_owners(model: nn.Module) -> list[nn.Module]:
    """GPTNeoModel.forward creates the cache when none is given."""
    return [module for module in model.modules() if isinstance(module, GPTNeoModel)]


#: token ids for the K-mode calibration when the user gives none
default_calibration_inputs = token_calibration_inputs


#: What the adapted forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = forward_contracts(
    slim_gpt_neo_attention_forward, attention=(GPTNeoSelfAttention,), cache_owners=(GPTNeoModel,)
)
