"""The patch authors' toolkit: the contract each ``patches/<arch>.py`` fills in once (:class:`ArchitecturePatch`), and
every piece of hf_slim a patch builds it from, under one public name.

A patch module imports from here (and from transformers) only, and ends with ``PATCH = ArchitecturePatch(...)``: the
registry (:mod:`hf_slim.registry`) maps model types to patch modules and reads that one object; nothing else of a
patch module is read by name. docs/design.md walks through a whole patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ._compat import (
    CACHE,
    Contract,
    cache_entry,
    cache_parameter,
    find_cache,
    forward_contracts,
    route_contracts,
    routes_attention,
)
from .absorbed import additive_bias
from .attention import slim_self_attention
from .bias import ScoreBias
from .cache import SlimCache, self_attention_part
from .cross_attention import DECODER_ATTENTION_READS, decoder_attention
from .encoder_cache import EncoderOutputCache
from .generation import expand_inputs_keeping_encoder_output, keep_one_encoder_output_per_input
from .patching import InstancePatch, PatchedMethod
from .projections import Projections, interleaved_qkv_projections, split_interleaved_qkv
from .registry import UnsupportedModelError
from .rope import (
    InterleavedFrequencies,
    RotaryLayout,
    SinusoidPositions,
    interleaved_columns,
    shared_sinusoid_positions,
    sinusoid_columns,
)
from .sites import AttentionRoute, AttentionSite, instances_of, rope_attention_sites, token_calibration_inputs
from .slim_tensor import split_heads

__all__ = [
    "CACHE",
    "DECODER_ATTENTION_READS",
    "ArchitecturePatch",
    "AttentionRoute",
    "AttentionSite",
    "Contract",
    "EncoderOutputCache",
    "InstancePatch",
    "InterleavedFrequencies",
    "PatchedMethod",
    "Projections",
    "RotaryLayout",
    "ScoreBias",
    "SinusoidPositions",
    "SlimCache",
    "UnsupportedModelError",
    "additive_bias",
    "attend_with_layer_bias",
    "cache_entry",
    "cache_parameter",
    "decoder_attention",
    "expand_inputs_keeping_encoder_output",
    "find_cache",
    "forward_contracts",
    "instances_of",
    "interleaved_columns",
    "interleaved_qkv_projections",
    "keep_one_encoder_output_per_input",
    "modules_of_type",
    "no_extra_patches",
    "one_encoder_output_per_input",
    "prescaled_attention_forward",
    "prescaled_attention_patch",
    "rope_attention_sites",
    "rope_family",
    "route_contracts",
    "routed_family",
    "routes_attention",
    "self_attention_part",
    "sinusoid_columns",
    "sinusoid_rope_sites",
    "slim_self_attention",
    "speech_sample",
    "split_heads",
    "split_interleaved_qkv",
    "token_calibration_inputs",
]

Sites = Callable[[torch.nn.Module], list[AttentionSite]]
#: The route of a family whose scores take nothing but the mask (no RoPE, no score bias, no encoder output).
MASK_ONLY = AttentionRoute()
Modules = Callable[[torch.nn.Module], list[torch.nn.Module]]


def no_extra_patches(model: torch.nn.Module) -> list[InstancePatch]:
    """The default of :attr:`ArchitecturePatch.extra_patches`: the sites and cache owners are all a family needs."""
    return []


@dataclass(frozen=True)
class ArchitecturePatch:
    """What one architecture family tells slimify, declared once per ``patches/<arch>.py`` as ``PATCH``.

    Attributes
    ----------
    attention_sites:
        ``model -> [AttentionSite]``: every attention module to serve, with its kind (``"self"`` keeps a slim cache,
        ``"cross"`` reads the encoder output), head layout, projections and how it is served (a routed
        :class:`AttentionRoute` where transformers calls its attention interface, else a replacement forward adapted
        from the model file). Raise :class:`UnsupportedModelError` for a model the family cannot serve.
    cache_owners:
        ``model -> [module]``: the modules whose forward creates the cache when none is given (slimify makes them
        create a slim one); usually :func:`modules_of_type` of the base model classes.
    contracts:
        what the served forwards rely on in transformers (:func:`route_contracts`, :func:`forward_contracts`,
        :class:`Contract`), checked before anything is patched, so a release that changed them is refused cleanly.
    calibration_inputs:
        ``model -> forward kwargs`` of the K-mode calibration when the user passes none (default: random token ids,
        :func:`token_calibration_inputs`; encoder-decoders and speech models need more).
    extra_patches:
        ``model -> [InstancePatch]``: anything else the family needs on the model instance (beam search over one
        encoder output per input, a mask hook), applied and reverted with the rest.
    rotary_dim:
        ``model -> width`` of one cos/sin table entry, where it is not the head width (GPT-J's ``rotary_dim``), for
        the memory report; None otherwise.
    static_cache_refusal:
        why the family cannot serve ``cache_implementation="static"``, or None where it can (then tests/test_static.py
        must name the test that compares it with the unpatched model).
    composite_decoder:
        a composite (``VisionEncoderDecoderModel``, ``SpeechEncoderDecoderModel``, MusicGen) may pair an encoder with
        this family's decoder: its sites serve cross-attention over an encoder output handed to the decoder.
    """

    attention_sites: Sites
    cache_owners: Modules
    contracts: tuple[Contract, ...]
    calibration_inputs: Callable[[torch.nn.Module], dict] = token_calibration_inputs
    extra_patches: Callable[[torch.nn.Module], list[InstancePatch]] = no_extra_patches
    rotary_dim: Callable[[torch.nn.Module], int] | None = None
    static_cache_refusal: str | None = None
    composite_decoder: bool = False


def one_encoder_output_per_input(model: torch.nn.Module) -> list[InstancePatch]:
    """The extra patch of an encoder-decoder family: beam search keeps one encoder output per input (cross-attention
    folds the beams onto it); none for a decoder-only model of the family (``*ForCausalLM``)."""
    if not getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "_expand_inputs_for_generation"):
        return []
    return [keep_one_encoder_output_per_input(model)]


def speech_sample(sampling_rate: int = 16_000) -> np.ndarray:
    """The speech sample hf_slim ships (``hf_slim/data/sample.wav``), mono float32 ``(samples,)`` at
    ``sampling_rate``: the default K-mode calibration input of speech models (Whisper, Moonshine, speech composites),
    whose K cache error depends on real activations (random ones understate it)."""
    from .bundled import sample_audio_path  # on first use: it imports the Whisper classes and the converter
    from .wav import read_wav

    return read_wav(sample_audio_path(), sampling_rate)[0]


def modules_of_type(*classes: type) -> Modules:
    """``model -> its submodules of exactly these types`` (:func:`instances_of`), e.g. the cache owners."""

    def modules(model: torch.nn.Module) -> list[torch.nn.Module]:
        return instances_of(model, classes)

    return modules


def rope_family(
    *,
    attention: tuple[type, ...],
    base_models: tuple[type, ...],
    projections: Callable[[torch.nn.Module], Projections],
    route: AttentionRoute,
    attributes: tuple[str, ...],
    k_mode_refusal: Callable[[torch.nn.Module], str | None] = lambda module: None,
    head_dim: Callable[[torch.nn.Module], int] | None = None,
) -> ArchitecturePatch:
    """The whole patch of a RoPE family whose attention transformers routes through its attention interface.

    Every module of the ``attention`` classes is a self-attention site served by ``route`` (the model's own forward,
    no copy; pairs rotated in halves, Llama's ``rotate_half``), the ``base_models`` create the cache, and the
    contracts are the route's plus the module ``attributes`` the sites read. ``k_mode_refusal(module)`` says why a
    layer must keep its own K and V; ``head_dim(module)`` reads a head width the module does not call ``head_dim``.
    """

    def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
        return rope_attention_sites(
            model, attention, projections, route, RotaryLayout("half"), k_mode_refusal=k_mode_refusal, head_dim=head_dim
        )

    return ArchitecturePatch(
        attention_sites=attention_sites,
        cache_owners=modules_of_type(*base_models),
        contracts=route_contracts(route, attention=attention, cache_owners=base_models, attributes=attributes),
    )


def sinusoid_rope_sites(
    model: torch.nn.Module,
    attention: tuple[type, ...],
    projections: Callable[[torch.nn.Module], Projections],
    route: AttentionRoute,
) -> list[AttentionSite]:
    """The self-attention sites of a routed family rotated GPT-J's way (GPT-J from 5.24, CodeGen): interleaved pairs
    (``rotate_every_two``) on the first ``rotary_dim`` columns of each head, cos/sin recomputed as rows of the model's
    one fixed ``embed_positions`` table (:func:`~hf_slim.rope.shared_sinusoid_positions`)."""
    shared = shared_sinusoid_positions(model, attention)
    return rope_attention_sites(
        model, attention, projections, route, RotaryLayout("interleaved"), rotary_source=lambda module: shared
    )


def routed_family(
    *,
    attention: tuple[type, ...],
    base_models: tuple[type, ...],
    projections: Callable[[torch.nn.Module], Projections],
    attributes: tuple[str, ...],
    route: AttentionRoute = MASK_ONLY,
    parameters: tuple[str, ...] = (),
) -> ArchitecturePatch:
    """The whole patch of a decoder-only family without RoPE whose attention transformers routes through its attention
    interface: every module of the ``attention`` classes is a self-attention site served by ``route`` (the model's own
    forward, no copy; the input cache applies), the ``base_models`` create the cache, and the contracts are the
    route's plus the module ``attributes`` the sites read (``num_heads``, ``head_dim`` and ``layer_idx`` among them).
    ``parameters``: the forward's leading parameters where its cache parameter has no ``Cache`` annotation
    (:func:`route_contracts`).
    """

    def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
        return [AttentionSite.of(module, "self", projections, route) for module in instances_of(model, attention)]

    return ArchitecturePatch(
        attention_sites=attention_sites,
        cache_owners=modules_of_type(*base_models),
        contracts=route_contracts(
            route, attention=attention, cache_owners=base_models, attributes=attributes, parameters=parameters
        ),
    )


def attend_with_layer_bias(
    bias: ScoreBias,
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cache,
    attention_mask: torch.Tensor | None,
    value: object = None,
    *,
    scale: float,
    upcast: bool,
    dropout: float,
    **slim,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`slim_self_attention` for a copied forward whose layer adds a score bias itself (ALiBi up to 5.24, a
    window buffer, or none at all: ``ScoreBias.module(None)``): prefill runs the model's eager attention with that
    bias and the slim decode adds the same bias columns, both at ``scale``. ``value`` is what the forward received
    for the bias (BLOOM's ``alibi``); ``slim`` passes RoPE arguments through."""
    eager = bias.eager(module, value, scale=scale, upcast=upcast, dropout=dropout)
    term = bias.term(module, value)
    return slim_self_attention(
        module, hidden_states, *qkv, cache, attention_mask, scale, eager, want_weights=True, position_bias=term, **slim
    )


def prescaled_attention_forward(eager_attention: Callable, *, return_cache: bool = False) -> Callable:
    """The slim forward of the encoder-decoder attention classes transformers writes out by hand with a pre-scaled
    query and no attention interface (TrOCR's attention, LED's decoder attention), for :class:`AttentionSite`.

    Why one forward: those classes compute the same thing (``q_proj(x) * scaling``, ``torch.bmm``, additive float
    mask, softmax in the input dtype, dropout, ``torch.bmm``, ``out_proj``), which is ``eager_attention`` (BART's
    ``eager_attention_forward``, the same arithmetic) at scaling 1.0; the prefill runs that, the decode the slim paths
    of :func:`decoder_attention`. ``return_cache``: the class also returns the cache it was given (LED).
    """

    # Adapted from transformers 5.23.0, models/trocr/modeling_trocr.py, TrOCRAttention.forward (the same computation
    # as LEDDecoderAttention.forward, models/led/modeling_led.py, 5.15 to 5.25): the cache handling changes; the
    # scaled query, the projections and the output projection are the model's own.
    def slim_prescaled_attention_forward(
        self: torch.nn.Module,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple:
        """Decoder self-attention over a slim cache, or cross-attention over the encoder output with no cache.

        ``hidden_states: (batch, new, d_model)``; ``key_value_states``: the encoder output ``(inputs, frames,
        d_encoder)``, ``batch % inputs == 0``. Returns ``(batch, new, d_model)``, the weights ``(batch, heads, new,
        keys)`` when ``output_attentions`` else None, and with ``return_cache`` the cache.
        """

        def run_attention(query, key, value, mask):  # -> (b, t, h, dk), probabilities (b, h, t, s)
            return eager_attention(self, query, key, value, mask, scaling=1.0, dropout=self.dropout)

        query = split_heads(self.q_proj(hidden_states) * self.scaling, self.head_dim)  # (b, h, t, dk)
        attn_output, attn_weights = decoder_attention(
            self,
            hidden_states,
            query,
            key_value_states,
            cache,
            attention_mask,
            1.0,
            run_attention,
            want_weights=bool(output_attentions),
            dropout=self.dropout if self.training else 0.0,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()  # (b, t, e)
        outputs = (self.out_proj(attn_output), attn_weights if output_attentions else None)
        return (*outputs, cache) if return_cache else outputs

    return slim_prescaled_attention_forward


def prescaled_attention_patch(
    attention: type,
    decoder: type,
    eager_attention: Callable,
    *,
    return_cache: bool = False,
    adapted: Callable[[Callable], Callable] | None = None,
    cache_owner: type | None = None,
    **settings,
) -> ArchitecturePatch:
    """The whole patch of a family whose decoder attention is a hand-written ``attention`` class with a pre-scaled
    query (TrOCR, LED, FSMT): in every ``decoder`` layer, ``self_attn`` (slim cache) and ``encoder_attn`` where the
    layer has one (the encoder output, no cache), served by :func:`prescaled_attention_forward`; projections
    ``k_proj`` / ``v_proj`` (``nn.Linear``).

    ``adapted``: ``forward -> site forward`` for a class whose arguments differ (FSMT's time-first tensors and two
    masks); ``cache_owner``: the class whose forward creates the cache, where it is not the decoder; ``settings``: the
    rest of the :class:`ArchitecturePatch` (extra patches, a static cache refusal, ``composite_decoder``).
    """
    prescaled = prescaled_attention_forward(eager_attention, return_cache=return_cache)
    forward = prescaled if adapted is None else adapted(prescaled)
    decoders = modules_of_type(decoder)

    def projections(module: torch.nn.Module) -> Projections:
        """``K = X @ W_K + b_K``, ``V = X @ W_V + b_V``, ``W: (d_encoder or d_model, d_model)`` (transposed views)."""
        return Projections.of(module.k_proj, module.v_proj)

    def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
        return [
            AttentionSite.of(getattr(layer, name), kind, projections, forward)
            for module in decoders(model)
            for layer in module.layers
            for kind, name in (("self", "self_attn"), ("cross", "encoder_attn"))
            if hasattr(layer, name)
        ]

    owner = decoder if cache_owner is None else cache_owner
    reads = (*DECODER_ATTENTION_READS, *forward_contracts(prescaled, (attention,))[0].attributes)  # adapted: both
    contracts = forward_contracts(forward, (attention,), (owner,), also_reads=reads)
    return ArchitecturePatch(
        attention_sites=attention_sites, cache_owners=modules_of_type(owner), contracts=contracts, **settings
    )
