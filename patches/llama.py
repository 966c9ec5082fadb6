"""Llama and the MHA families that share its attention: RoPE, separate ``q_proj``/``k_proj``/``v_proj``.

Covers ``llama`` (Llama-2, CodeLlama, Vicuna, SmolLM2-1.7B; every rope scaling type, optional ``attention_bias``),
``qwen2`` with MHA configs (Qwen1.5: q/k/v biases; sliding-window layers are refused), ``olmo`` (its ``clip_qkv``
clamps the keys, so ``V = f(K)`` is not exact: refused per layer, the layer keeps the model's own K and V) and
``olmo2``: it RMS-normalises the full-width queries and keys per token before RoPE (``q_norm``, ``k_norm``); this
patch only says where the key norm is (:class:`~hf_slim.attention.KeyNorm`), and the K cache keeps each token's key
scale beside the normalised keys, which makes ``V`` linear in them again (:mod:`hf_slim.kmode`: ``e + r + 1``
numbers per token).

RoPE layers keep the K cache with keys cached as the model rotated them (:mod:`hf_slim.rope`).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.olmo.modeling_olmo import OlmoAttention, OlmoModel
from transformers.models.olmo.modeling_olmo import apply_rotary_pos_emb as olmo_apply_rotary_pos_emb
from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention, Olmo2Model
from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb as olmo2_apply_rotary_pos_emb
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2Model

from hf_slim._compat import forward_contracts
from hf_slim.attention import Projections, rope_self_attention
from hf_slim.rope import RotaryLayout
from hf_slim.sites import AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs

#: The attention classes this patch adapts, and the base models whose forward creates the cache.
ATTENTION_CLASSES = (LlamaAttention, Qwen2Attention, OlmoAttention, Olmo2Attention)
BASE_MODEL_CLASSES = (LlamaModel, Qwen2Model, OlmoModel, Olmo2Model)


def _projections(module: torch.nn.Module) -> Projections:
    return Projections.of(module.k_proj, module.v_proj, key_norm=getattr(module, "k_norm", None))  # k_norm: OLMo-2


# Adapted from transformers 5.23.0, models/llama/modeling_llama.py, LlamaAttention.forward (and
# models/qwen2/modeling_qwen2.py, Qwen2Attention.forward: the same with ``sliding_window``;
# models/olmo/modeling_olmo.py, OlmoAttention.forward: the same with OLMo's own rotation, and its clamping layers are
# never patched; models/olmo2/modeling_olmo2.py, Olmo2Attention.forward: ``q_norm``/``k_norm`` on the full-width
# projections before the head split, its own rotation): the cache update and attention call go through the slim
# cache, projections, norms, RoPE and the output projection are the model's own.
def slim_llama_attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query, key = self.q_proj(hidden_states), self.k_proj(hidden_states)  # (b, t, e) each
    pre_norm_key = None
    if hasattr(self, "k_norm"):  # OLMo-2; the K cache keeps each token's key scale, computed from the pre-norm keys
        query, pre_norm_key, key = self.q_norm(query), key, self.k_norm(key)
    query = query.view(hidden_shape).transpose(1, 2)  # (b, h, t, dk)
    key = key.view(hidden_shape).transpose(1, 2)  # (b, h, t, dk)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, h, t, dk)
    cos, sin = position_embeddings  # (b|1, t, dk) each
    query, key = _APPLY_ROTARY.get(type(self), apply_rotary_pos_emb)(query, key, cos, sin)
    out, weights = rope_self_attention(
        self,
        hidden_states,
        query,
        key,
        value,
        (cos, sin),
        attention_mask,
        past_key_values,
        kwargs,
        eager=eager_attention_forward,
        dropout=0.0 if not self.training else self.attention_dropout,
        pre_norm_key=pre_norm_key,
        **_sliding_window(self),
    )
    return self.o_proj(out), weights


#: OLMo's rotary module hands over float32 cos/sin in every dtype and its ``apply_rotary_pos_emb`` casts the rotated
#: query/key back to their dtype; Llama's (whose cos/sin come in the model dtype) does not cast, so with OLMo's
#: float32 cos/sin it would give float32 keys beside bf16/fp16 values. Each family rotates with its own function.
_APPLY_ROTARY = {OlmoAttention: olmo_apply_rotary_pos_emb, Olmo2Attention: olmo2_apply_rotary_pos_emb}


def _sliding_window(module: torch.nn.Module) -> dict:
    """Qwen2 passes its layer's ``sliding_window`` to the attention interface (None on full-attention layers)."""
    return {"sliding_window": module.sliding_window} if hasattr(module, "sliding_window") else {}


def _k_mode_refusal(module: torch.nn.Module) -> str | None:
    """Why ``V = f(K)`` is not exact in this layer, or None."""
    clip = getattr(module.config, "clip_qkv", None)
    if clip is not None:
        return f"clip_qkv={clip} clamps keys and values, so V is not a linear function of the cached keys"
    if getattr(module, "sliding_window", None) is not None:
        return f"sliding-window layer (window {module.sliding_window}): the slim cache keeps full-attention layers only"
    return None


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """The self-attention module of every decoder layer."""
    return rope_attention_sites(
        model,
        ATTENTION_CLASSES,
        _projections,
        slim_llama_attention_forward,
        RotaryLayout("half"),
        k_mode_refusal=_k_mode_refusal,
    )


def cache_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The base model's forward creates the cache when none is given."""
    return instances_of(model, BASE_MODEL_CLASSES)


default_calibration_inputs = token_calibration_inputs


#: What the adapted forward relies on in transformers (checked by slimify before it patches; see hf_slim._compat).
CONTRACTS = forward_contracts(
    slim_llama_attention_forward,
    attention=ATTENTION_CLASSES,
    cache_owners=BASE_MODEL_CLASSES,
    alternatives=("q_norm", "k_norm"),  # OLMo-2's only
)
