"""What slimify did to a model, where it keeps it, and how to ask: :class:`SlimRecord`, :func:`is_slim`,
:func:`slim_record`.

Why a module of its own: slimify (``hf_slim.api``), saving (``hf_slim.export``), reports (``hf_slim.memory``) and the
command line all read the record; keeping it below them keeps their imports one-way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import EncoderDecoderCache

from . import __version__
from .cache import SlimCache
from .cache_layers import CacheOwner
from .encoder_cache import EncoderOutputCache
from .patching import InstancePatch

if TYPE_CHECKING:
    from .attention_state import SlimAttentionState

#: What one attention layer of a slim model keeps: its input X, its keys (K+R), the model's own K/V, or nothing
#: (cross-attention reads the encoder output).
LAYER_MODES = ("input", "k", "kv", "encoder")


@dataclass
class SlimRecord:
    """Everything slimify did to one model: the settings, per-layer modes and numbers, and the patches to undo."""

    requested_mode: str
    layer_modes: dict[str, str]
    calibration: dict[str, dict]
    num_cache_layers: int
    is_encoder_decoder: bool
    kv_layers: tuple[int, ...] = ()
    version: str = __version__
    #: residual rank r of every K-mode layer (cache width e + r; 0 is the plain K cache), see hf_slim.kmode
    residual_ranks: dict[str, int] = field(default_factory=dict)
    patches: list = field(default_factory=list, repr=False)
    owner: CacheOwner = field(default_factory=CacheOwner, repr=False)
    #: why this architecture cannot use a static cache (its patch module's ``STATIC_CACHE_REFUSAL``), or None
    static_cache_refusal: str | None = None
    #: some layer keeps weight-derived buffers (K mode), checked before every generate() and on every new cache
    has_derived_state: bool = False

    def k_layers(self) -> list[tuple[torch.nn.Module, SlimAttentionState]]:
        """``(module, state)`` of every K-mode layer (those with weight-derived buffers to check)."""
        return [
            (patch.target, patch.value)
            for patch in self.patches
            if isinstance(patch, InstancePatch) and patch.name == "hf_slim" and patch.value.mode == "k"
        ]

    def new_cache(self, max_cache_len: int | None = None) -> SlimCache | EncoderDecoderCache:
        """A fresh, empty slim cache for this model (encoder-decoder models get no cross-attention cache);
        ``max_cache_len`` makes it static (preallocated); ``kv_layers`` (RoPE layers in mode ``"kv"``) hold K/V.
        Layers adopt each writer's layout."""
        cache = SlimCache(self.num_cache_layers, max_cache_len=max_cache_len, kv_layers=self.kv_layers)
        if self.is_encoder_decoder:
            return EncoderDecoderCache(cache, EncoderOutputCache())
        return cache


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (slimify patches that one), or ``model`` itself."""
    peft = sys.modules.get("peft")  # a PeftModel can only exist if peft was imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def is_slim(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model inside a PEFT wrapper) is currently slimified."""
    return "_hf_slim_record" in vars(unwrapped(model))


def slim_record(model: torch.nn.Module) -> SlimRecord:
    """The :class:`SlimRecord` of a slimified model."""
    if not is_slim(model):
        part = slim_part(model)
        if part is not None:
            raise ValueError(
                f"this module is not slimified itself, but part of it ({part!r}) belongs to a slimify() call on "
                "another model: call hf_slim.unslimify on the model that was passed to slimify"
            )
        raise ValueError("this model is not slimified; call hf_slim.slimify(model) first")
    return vars(unwrapped(model))["_hf_slim_record"]


def slim_part(model: torch.nn.Module) -> str | None:
    """The name of a submodule of ``model`` that a slimify() call patched, or None."""
    for name, module in unwrapped(model).named_modules():
        if "hf_slim" in vars(module) or "_hf_slim_record" in vars(module):
            return name or type(module).__name__
    return None
