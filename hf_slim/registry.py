"""Which architectures hf_slim can patch, and why the others cannot be.

Dispatch is one dict lookup on ``config.model_type``. Adding an architecture is one entry here plus one module in
``patches/`` that declares its :class:`~hf_slim.toolkit.ArchitecturePatch` as ``PATCH``. Architectures we know and
refuse are listed with the reason, so the error a user sees explains itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedConfig

if TYPE_CHECKING:
    from .toolkit import ArchitecturePatch


class UnsupportedModelError(ValueError):
    """The model cannot be slimified (architecture, attention layout or requested mode)."""


@dataclass(frozen=True)
class Architecture:
    """Facts about one supported family.

    Attributes
    ----------
    patch_module:
        import path of the module in ``patches/`` that knows where its attention layers and weights are.
    positions:
        how positions enter attention: ``"absolute"`` (added to embeddings), ``"relative_bias"`` (T5),
        ``"alibi"`` (a per-head linear score bias, BLOOM/MPT/Falcon-RW), ``"rope"`` (rotates q and k: rules out the
        input cache), ``"decoder"`` (composites: those of the decoder named by ``config.decoder``, resolved by
        :func:`architecture_for`).
    """

    patch_module: str
    positions: str

    def load(self) -> ArchitecturePatch:
        """The family's patch: the ``PATCH`` its module declares (the one name the registry reads)."""
        return importlib.import_module(self.patch_module).PATCH


SUPPORTED: dict[str, Architecture] = {
    "gpt2": Architecture("hf_slim.patches.gpt2", positions="absolute"),
    "whisper": Architecture("hf_slim.patches.whisper", positions="absolute"),
    "t5": Architecture("hf_slim.patches.t5", positions="relative_bias"),
    "mt5": Architecture("hf_slim.patches.t5", positions="relative_bias"),
    "umt5": Architecture("hf_slim.patches.t5", positions="relative_bias"),
    # Pop2Piano: a T5 over spectrogram embeddings (Pop2PianoAttention is a copy of T5's)
    "pop2piano": Architecture("hf_slim.patches.t5", positions="relative_bias"),
    # BART family: one patch module for the copies of BartAttention (learned or sinusoidal absolute positions)
    **{
        model_type: Architecture("hf_slim.patches.bart", positions="absolute")
        for model_type in (
            "bart",
            "mbart",
            "marian",
            "m2m_100",
            "pegasus",
            "pegasus_x",
            "bigbird_pegasus",
            "blenderbot",
            "blenderbot-small",
            "plbart",
            "nllb-moe",  # NLLB-MoE: M2M100's attention; the mixture of experts is in the feed-forward only
        )
    },
    "trocr": Architecture("hf_slim.patches.trocr", positions="absolute"),
    # LED: a Longformer encoder (no cache) and a BART-style decoder whose attention the model computes itself
    "led": Architecture("hf_slim.patches.led", positions="absolute"),
    # FSMT (fairseq WMT19): BART's attention in fairseq's time-first layout, computed by the model itself
    "fsmt": Architecture("hf_slim.patches.fsmt", positions="absolute"),
    # Moonshine: an audio encoder and a RoPE decoder (K cache) with cross-attention over the encoder output
    "moonshine": Architecture("hf_slim.patches.moonshine", positions="rope"),
    # Florence-2: a DaViT image encoder feeding a BART encoder-decoder (the language model), patched as BART
    "florence2": Architecture("hf_slim.patches.bart", positions="absolute"),
    # MusicGen: its decoder's attention is a copy of BART's (sinusoidal positions, one embedding per codebook)
    "musicgen_decoder": Architecture("hf_slim.patches.bart", positions="absolute"),
    # Speech2Text: a convolutional speech encoder and a BART decoder (Speech2TextAttention is a copy of BART's)
    "speech_to_text": Architecture("hf_slim.patches.bart", positions="absolute"),
    "musicgen": Architecture("hf_slim.patches.encoder_decoder", positions="decoder"),
    # composites: whatever encoder, with a supported decoder (config.decoder.model_type)
    "vision-encoder-decoder": Architecture("hf_slim.patches.encoder_decoder", positions="decoder"),
    "speech-encoder-decoder": Architecture("hf_slim.patches.encoder_decoder", positions="decoder"),
    # decoder-only MHA families without RoPE (issue 11 part B)
    "opt": Architecture("hf_slim.patches.opt", positions="absolute"),
    "xglm": Architecture("hf_slim.patches.opt", positions="absolute"),
    "biogpt": Architecture("hf_slim.patches.opt", positions="absolute"),
    "gpt_neo": Architecture("hf_slim.patches.gpt_neo", positions="absolute"),
    "bloom": Architecture("hf_slim.patches.bloom", positions="alibi"),
    "mpt": Architecture("hf_slim.patches.mpt", positions="alibi"),
    "falcon": Architecture("hf_slim.patches.falcon", positions="alibi"),
    "llama": Architecture("hf_slim.patches.llama", positions="rope"),
    "qwen2": Architecture("hf_slim.patches.llama", positions="rope"),
    "olmo": Architecture("hf_slim.patches.llama", positions="rope"),
    "olmo2": Architecture("hf_slim.patches.llama", positions="rope"),
    "phi3": Architecture("hf_slim.patches.phi3", positions="rope"),
    "phi": Architecture("hf_slim.patches.phi", positions="rope"),
    "stablelm": Architecture("hf_slim.patches.phi", positions="rope"),
    "gpt_neox": Architecture("hf_slim.patches.gpt_neox", positions="rope"),
    "persimmon": Architecture("hf_slim.patches.gpt_neox", positions="rope"),  # GPT-NeoX's attention layout
    "gpt_bigcode": Architecture("hf_slim.patches.gpt_bigcode", positions="absolute"),
    "ctrl": Architecture("hf_slim.patches.ctrl", positions="absolute"),
    "gptj": Architecture("hf_slim.patches.gptj", positions="rope"),
    "codegen": Architecture("hf_slim.patches.codegen", positions="rope"),
}

#: Known architectures that are refused, with the reason quoted in the error (a reason that depends on the
#: configuration of a supported type goes in :data:`CONFIG_REFUSALS`).
UNSUPPORTED: dict[str, str] = {
    "mistral": "no patch for this RoPE model type yet (Mistral checkpoints use grouped-query attention, which slim "
    "attention cannot serve; an MHA config would need a mistral patch with its sliding window)",
    "gemma": "multi-query attention in most checkpoints, and RoPE: slim attention needs MHA without RoPE here",
    "bert": "encoder-only model: it keeps no KV cache, so there is nothing to slim",
    "roberta": "encoder-only model: it keeps no KV cache, so there is nothing to slim",
}


#: Encoder-only families whose configs can also build a causal decoder (``is_decoder=True``), refused differently.
ENCODER_ONLY = ("bert", "roberta")
#: Configurations of supported model types that are refused, with the reason: ``model_type -> [(test, reason)]``.
CONFIG_REFUSALS: dict[str, list[tuple[Callable[[PreTrainedConfig], bool], str]]] = {
    "gpt_bigcode": [
        (
            lambda c: c.multi_query,
            "multi-query attention (one shared K/V head): its cache is already smaller than a slim cache "
            "(multi_query=False, multi-head attention, is supported)",
        ),
        (
            lambda c: c.add_cross_attention,
            "add_cross_attention=True (GPTBigCode as the decoder of an encoder-decoder) is not implemented: only the "
            "decoder-only GPTBigCode is supported",
        ),
    ],
    "falcon": [
        (
            lambda c: c.new_decoder_architecture,
            "new_decoder_architecture=True (Falcon-40B/180B layout) groups key/value heads (num_kv_heads) and uses "
            "RoPE unless alibi=True: slim attention needs MHA without RoPE, and this fused layout is not patched",
        ),
        (
            lambda c: c.multi_query,
            "multi_query=True (Falcon-7B layout) keeps one shared K/V head: its cache is already smaller than a slim "
            "cache; only multi_query=False with alibi=True (Falcon-RW) is MHA without RoPE",
        ),
        (
            lambda c: not c.alibi,
            "alibi=False means RoPE, which rotates keys between projection and dot product, so the input cache cannot "
            "apply (the RoPE K cache is not implemented yet); only alibi=True Falcon configs are supported",
        ),
        (
            lambda c: c.num_kv_heads != c.num_attention_heads,
            "num_kv_heads differs from num_attention_heads (grouped-query attention): slim attention needs MHA",
        ),
    ],
    "mpt": [
        (
            lambda c: bool(c.attn_config.clip_qkv),
            "attn_config.clip_qkv clamps the fused Q/K/V projection; the clamp is not linear, so neither the input "
            "cache (keys recomputed from X) nor the K cache (V = K W_KV) reproduces it exactly. Use a config with "
            "clip_qkv=None",
        ),
    ],
    "persimmon": [
        (
            lambda c: c.qk_layernorm,
            "qk_layernorm=True applies a LayerNorm to each head's projected keys before RoPE: it removes each head's "
            "key mean (and adds a bias), so the values are not a function of the cached keys and the K cache cannot "
            "be exact (the key-norm support covers an RMSNorm over the full key width, OLMo-2's k_norm); use a "
            "config with qk_layernorm=False or the model unpatched",
        ),
    ],
    "moonshine": [
        (
            lambda c: c.pad_head_dim_to_multiple_of is not None,
            "pad_head_dim_to_multiple_of pads the keys and values the cache returns before the attention call, which "
            "the slim cache's step cannot take; use a config with pad_head_dim_to_multiple_of=None",
        ),
    ],
    "xglm": [
        (
            lambda c: c.add_cross_attention,
            "add_cross_attention=True (XGLM as the decoder of an encoder-decoder) is not implemented: only the "
            "decoder-only XGLM is supported",
        ),
    ],
}


def config_refusal(config: PreTrainedConfig) -> str | None:
    """The reason this configuration of a supported type is refused, or None."""
    for refused, reason in CONFIG_REFUSALS.get(getattr(config, "model_type", None), []):
        if refused(config):
            return reason
    return None


def cross_attention_decoders() -> list[str]:
    """Supported model types whose decoder a composite may pair with an encoder (their patch serves cross-attention)."""
    return sorted(
        model_type
        for model_type, architecture in SUPPORTED.items()
        if architecture.positions != "decoder" and architecture.load().composite_decoder
    )


def supported_model_types() -> list[str]:
    """Model types slimify accepts."""
    return sorted(SUPPORTED)


def _gqa_ratio(config: PreTrainedConfig) -> tuple[int | None, int | None]:
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    return heads, kv_heads


def architecture_for(config: PreTrainedConfig, mode: str) -> Architecture:
    """Pick the patcher for a config, or raise :class:`UnsupportedModelError` with the reason and the alternatives.

    Checks, in order: the refused configurations of a supported type (:data:`CONFIG_REFUSALS`, with the family's own
    reason), MHA (grouped/multi-query attention keeps fewer K/V heads than query heads, so there is no square W_K and
    the cache is already shared), known refusals, supported types, and the mode/position pairing.
    """
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(supported_model_types())
    if model_type in SUPPORTED and SUPPORTED[model_type].positions == "decoder":
        decoder = getattr(config, "decoder", None)
        if decoder is None:
            raise UnsupportedModelError(f"{model_type!r} config has no decoder config")
        try:
            inner = architecture_for(decoder, mode)
            if not inner.load().composite_decoder:
                raise UnsupportedModelError(
                    f"its patch has no cross-attention (a {inner.positions} decoder-only family); composites take "
                    "decoders with cross-attention: " + ", ".join(cross_attention_decoders())
                )
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{model_type!r} with a {decoder.model_type!r} decoder: {error}") from error
        return Architecture(SUPPORTED[model_type].patch_module, positions=inner.positions)
    reason = config_refusal(config)  # a family's own reason first: it says more than the generic GQA one
    if reason is not None:
        raise UnsupportedModelError(f"hf_slim cannot patch this {model_type!r} configuration: {reason}.")
    heads, kv_heads = _gqa_ratio(config)
    if heads is not None and kv_heads is not None and kv_heads < heads:
        raise UnsupportedModelError(
            f"{model_type!r} uses grouped/multi-query attention ({kv_heads} key/value heads for {heads} query heads). "
            "Slim attention needs multi-head attention (num_key_value_heads == num_attention_heads). "
            f"Supported model types: {supported}."
        )
    if model_type in ENCODER_ONLY and getattr(config, "is_decoder", False):
        raise UnsupportedModelError(
            f"hf_slim cannot patch {model_type!r} configured as a decoder (is_decoder=True): its decoder mode is not "
            f"implemented yet. Supported model types: {supported}."
        )
    if model_type in UNSUPPORTED:
        reason = UNSUPPORTED[model_type]
        if mode == "input" and "RoPE" in reason:
            raise UnsupportedModelError(
                f"mode='input' cannot be used with {model_type!r}: RoPE sits between the key projection and the dot "
                "product, so queries cannot be absorbed into the input space. Use mode='k' on a supported model. "
                f"Supported model types: {supported}."
            )
        raise UnsupportedModelError(
            f"hf_slim cannot patch {model_type!r}: {reason}. Supported model types: {supported}."
        )
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"hf_slim has no patch for model type {model_type!r}. Supported model types: {supported}."
        )
    architecture = SUPPORTED[model_type]
    if mode == "input" and architecture.positions == "rope":
        raise UnsupportedModelError(
            f"mode='input' cannot be used with {model_type!r} (RoPE); use mode='k' or mode='auto'."
        )
    return architecture
