"""Which architectures hf_slim can patch, and why the others cannot be.

Dispatch is one dict lookup on ``config.model_type``. Adding an architecture is one entry here plus one module in
``patches/`` exposing :class:`ArchitecturePatch`'s functions. Architectures we know and refuse are listed with the
reason, so the error a user sees explains itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from transformers import PreTrainedConfig


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
        ``"rope"`` (rotates q and k: rules out the input cache).
    """

    patch_module: str
    positions: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.patch_module)


SUPPORTED: dict[str, Architecture] = {
    "gpt2": Architecture("hf_slim.patches.gpt2", positions="absolute"),
    "whisper": Architecture("hf_slim.patches.whisper", positions="absolute"),
    "t5": Architecture("hf_slim.patches.t5", positions="relative_bias"),
    "mt5": Architecture("hf_slim.patches.t5", positions="relative_bias"),
    "umt5": Architecture("hf_slim.patches.t5", positions="relative_bias"),
    "llama": Architecture("hf_slim.patches.llama", positions="rope"),
    "qwen2": Architecture("hf_slim.patches.llama", positions="rope"),
    "olmo": Architecture("hf_slim.patches.llama", positions="rope"),
    "olmo2": Architecture("hf_slim.patches.llama", positions="rope"),
    "phi3": Architecture("hf_slim.patches.phi3", positions="rope"),
    "phi": Architecture("hf_slim.patches.phi", positions="rope"),
    "stablelm": Architecture("hf_slim.patches.phi", positions="rope"),
    "gpt_neox": Architecture("hf_slim.patches.gpt_neox", positions="rope"),
    "gptj": Architecture("hf_slim.patches.gptj", positions="rope"),
}

#: Known architectures that are refused, with the reason quoted in the error.
UNSUPPORTED: dict[str, str] = {
    "mistral": "no patch for this RoPE model type yet (Mistral checkpoints use grouped-query attention, which slim "
    "attention cannot serve; an MHA config would need a mistral patch with its sliding window)",
    "gemma": "multi-query attention in most checkpoints, and RoPE: slim attention needs MHA without RoPE here",
    "falcon": "multi-query / grouped-query attention: slim attention needs MHA",
    "gpt_bigcode": "multi-query attention (one shared K/V head): its cache is already smaller than a slim cache",
    "bert": "encoder-only model: it keeps no KV cache, so there is nothing to slim",
    "roberta": "encoder-only model: it keeps no KV cache, so there is nothing to slim",
    "bart": "not implemented yet (learned positions and MHA would allow the input and encoder caches)",
}


def supported_model_types() -> list[str]:
    """Model types slimify accepts."""
    return sorted(SUPPORTED)


def _gqa_ratio(config: PreTrainedConfig) -> tuple[int | None, int | None]:
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    return heads, kv_heads


def architecture_for(config: PreTrainedConfig, mode: str) -> Architecture:
    """Pick the patcher for a config, or raise :class:`UnsupportedModelError` with the reason and the alternatives.

    Checks, in order: MHA (grouped/multi-query attention keeps fewer K/V heads than query heads, so there is no
    square W_K and the cache is already shared), known refusals, supported types, and the mode/position pairing.
    """
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(supported_model_types())
    heads, kv_heads = _gqa_ratio(config)
    if heads is not None and kv_heads is not None and kv_heads < heads:
        raise UnsupportedModelError(
            f"{model_type!r} uses grouped/multi-query attention ({kv_heads} key/value heads for {heads} query heads). "
            "Slim attention needs multi-head attention (num_key_value_heads == num_attention_heads). "
            f"Supported model types: {supported}."
        )
    if model_type in UNSUPPORTED:
        if mode == "input" and "RoPE" in UNSUPPORTED[model_type]:
            raise UnsupportedModelError(
                f"mode='input' cannot be used with {model_type!r}: RoPE sits between the key projection and the dot "
                "product, so queries cannot be absorbed into the input space. Use mode='k' on a supported model. "
                f"Supported model types: {supported}."
            )
        raise UnsupportedModelError(
            f"hf_slim cannot patch {model_type!r}: {UNSUPPORTED[model_type]}. Supported model types: {supported}."
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
