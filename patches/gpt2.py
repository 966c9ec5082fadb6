"""GPT-2: learned absolute positions, fused ``c_attn`` Conv1D (``y = x @ W + b``, W: (d, 3d)).

Covers GPT2Model, GPT2LMHeadModel and the other GPT-2 heads, eager and SDPA attention,
``scale_attn_by_inverse_layer_idx`` and ``reorder_and_upcast_attn`` (both only change the prefill path, which stays
the model's own), and ``add_cross_attention`` (cross-attention reads the encoder output directly).
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Model, eager_attention_forward

from hf_slim._compat import Contract
from hf_slim.attention import Projections, encoder_cross_attention, slim_self_attention, split_heads
from hf_slim.sites import AttentionSite, token_calibration_inputs

#: What the adapted forward and the cache wrapper rely on in transformers (checked by slimify, see hf_slim._compat).
CONTRACTS = (
    Contract(
        GPT2Attention,
        "forward",
        parameters=(
            "hidden_states",
            "past_key_values",
            "attention_mask",
            "encoder_hidden_states",
            "encoder_attention_mask",
            "output_attentions",
        ),
        attributes=(
            "c_attn",
            "c_proj",
            "split_size",
            "head_dim",
            "num_heads",
            "scaling",
            "layer_idx",
            "is_cross_attention",
            "reorder_and_upcast_attn",
            "_upcast_and_reordered_attn",
            "attn_dropout",
            "resid_dropout",
        ),
    ),
    Contract(GPT2Model, "forward", keywords=("past_key_values", "use_cache")),
)


def _self_projections(module: GPT2Attention) -> Projections:
    e = module.split_size
    return Projections.of(module.c_attn, module.c_attn, slice(e, 2 * e), slice(2 * e, None))  # c_attn: (d, 3e)


def _cross_projections(module: GPT2Attention) -> Projections:
    e = module.split_size
    return Projections.of(module.c_attn, module.c_attn, slice(None, e), slice(e, None))  # c_attn: (d, 2e)


def _attention_runner(module: GPT2Attention, kwargs: dict):
    """The model's own attention call (eager, upcast-and-reorder eager, or SDPA), as GPT2Attention.forward makes it."""
    implementation = module.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)

    def run(query, key, value, mask):
        if implementation == "eager" and module.reorder_and_upcast_attn:
            return module._upcast_and_reordered_attn(query, key, value, mask)
        dropout = module.attn_dropout.p if module.training else 0.0
        return interface(module, query, key, value, mask, dropout=dropout, scaling=module.scaling, **kwargs)

    return run


# Adapted from transformers 5.23.0, models/gpt2/modeling_gpt2.py, GPT2Attention.forward: the cache handling and the
# attention call change, the projections and the output projection are the model's own.
# The original is the same in transformers 5.15 to 5.22; CONTRACTS guards what this relies on.
def slim_gpt2_attention_forward(
    self: GPT2Attention,
    hidden_states: torch.Tensor,
    past_key_values=None,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    output_attentions: bool | None = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    kwargs.pop("use_cache", None)
    kwargs.pop("position_ids", None)
    run_attention = _attention_runner(self, kwargs)
    want_weights = self.config._attn_implementation == "eager"
    if encoder_hidden_states is not None:
        query = split_heads(self.q_attn(hidden_states), self.head_dim)  # (b, h, t, dk)
        attn_output, attn_weights = encoder_cross_attention(
            self,
            query,
            encoder_hidden_states,
            encoder_attention_mask,
            self.scaling,
            run_attention,
            want_weights=want_weights,
        )
    else:
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)  # (b, t, e) each
        query, key, value = (split_heads(x, self.head_dim) for x in (query, key, value))  # (b, h, t, dk)
        attn_output, attn_weights = slim_self_attention(
            self,
            hidden_states,
            query,
            key,
            value,
            past_key_values,
            attention_mask,
            self.scaling,
            run_attention,
            want_weights=want_weights,
        )
    attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()  # (b, t, e)
    attn_output = self.resid_dropout(self.c_proj(attn_output))
    return attn_output, attn_weights


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Self-attention (and cross-attention, if the config adds it) of every GPT-2 block."""
    return [
        AttentionSite.of(module, "cross", _cross_projections, slim_gpt2_attention_forward)
        if module.is_cross_attention
        else AttentionSite.of(module, "self", _self_projections, slim_gpt2_attention_forward)
        for module in model.modules()
        if isinstance(module, GPT2Attention)
    ]


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """GPT2Model.forward creates the cache when none is given."""
    return [module for module in model.modules() if isinstance(module, GPT2Model)]


default_calibration_inputs = token_calibration_inputs
