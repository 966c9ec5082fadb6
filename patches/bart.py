"""BART family: BART, mBART (mBART-50), Marian (opus-mt), M2M100 (NLLB-200 dense), Pegasus, PEGASUS-X,
BigBird-Pegasus, Blenderbot, Blenderbot-small and PLBart; also Florence-2, whose language model is a BART, the
MusicGen decoder (``MusicgenAttention`` is the same attention with ``bias=False``), Speech2Text (its decoder is a
BART decoder over the output of a convolutional speech encoder: ``Speech2TextAttention`` is MusicGen's copy, routed
from 5.15 on) and NLLB-MoE (M2M100's attention, routed from 5.15 on, in layers whose feed-forward is a mixture of
experts on every ``decoder_sparse_step``-th layer; its cross-attention is called ``cross_attention``).

transformers gives each of these its own attention class, and every one is a copy of ``BartAttention``
(BigBird-Pegasus's decoder uses ``BigBirdPegasusDecoderAttention``, also a copy), so one site list serves every
model type here. No forward is copied: each class's own forward runs, served through the extension points
(:mod:`hf_slim.interface`).

Where things are: each decoder layer has ``self_attn`` (causal self-attention: slim input or K cache) and
``encoder_attn`` (cross-attention over the encoder output E: no cache at all, E is what generate() holds). The
encoder's self-attention keeps no cache and stays untouched (PEGASUS-X's global-local and BigBird-Pegasus's
block-sparse encoder attention included). ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` are ``nn.Linear``
with biases (none in MusicGen: ``Projections`` then carries ``None``); the query is not pre-scaled, the attention
call scales by ``head_dim ** -0.5``.

Positions enter before attention: learned absolute embeddings (BART, mBART, BigBird-Pegasus, Blenderbot,
Blenderbot-small, PLBart) or sinusoidal ones (Marian, M2M100, Pegasus, PEGASUS-X, MusicGen, Speech2Text) added to
the token embeddings, indexed by the cache length the decoder reads from ``cache.get_seq_length()``; a SlimCache
reports the same length, so the decoder computes the same positions. Nothing positional sits between the
projections and the dot product: the input cache and the encoder cache apply exactly.

Model classes: ``*ForConditionalGeneration`` / ``MarianMTModel`` (generate, beams with one encoder copy per input),
``*Model``, and the decoder-only ``*ForCausalLM`` (also the decoder of a VisionEncoderDecoder/SpeechEncoderDecoder
composite, e.g. Donut's and Nougat's mBART decoder).
"""

from __future__ import annotations

import torch
from transformers.models.bart.modeling_bart import BartAttention, BartDecoder
from transformers.models.bigbird_pegasus.modeling_bigbird_pegasus import (
    BigBirdPegasusDecoder,
    BigBirdPegasusDecoderAttention,
)
from transformers.models.blenderbot.modeling_blenderbot import BlenderbotAttention, BlenderbotDecoder
from transformers.models.blenderbot_small.modeling_blenderbot_small import (
    BlenderbotSmallAttention,
    BlenderbotSmallDecoder,
)
from transformers.models.m2m_100.modeling_m2m_100 import M2M100Attention, M2M100Decoder
from transformers.models.marian.modeling_marian import MarianAttention, MarianDecoder
from transformers.models.mbart.modeling_mbart import MBartAttention, MBartDecoder
from transformers.models.musicgen.modeling_musicgen import MusicgenAttention, MusicgenDecoder
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeAttention, NllbMoeDecoder
from transformers.models.pegasus.modeling_pegasus import PegasusAttention, PegasusDecoder
from transformers.models.pegasus_x.modeling_pegasus_x import PegasusXAttention, PegasusXDecoder
from transformers.models.plbart.modeling_plbart import PLBartAttention, PLBartDecoder
from transformers.models.speech_to_text.modeling_speech_to_text import Speech2TextAttention, Speech2TextDecoder

from hf_slim.toolkit import (
    ArchitecturePatch,
    AttentionRoute,
    AttentionSite,
    Projections,
    UnsupportedModelError,
    instances_of,
    one_encoder_output_per_input,
    route_contracts,
)

#: The decoders (they create the cache when none is given) and their attention classes, all copies of BartAttention.
DECODERS = (
    BartDecoder,
    MBartDecoder,
    MarianDecoder,
    M2M100Decoder,
    PegasusDecoder,
    PegasusXDecoder,
    BigBirdPegasusDecoder,
    BlenderbotDecoder,
    BlenderbotSmallDecoder,
    PLBartDecoder,
    MusicgenDecoder,
    Speech2TextDecoder,
    NllbMoeDecoder,
)
ATTENTIONS = (
    BartAttention,
    MBartAttention,
    MarianAttention,
    M2M100Attention,
    PegasusAttention,
    PegasusXAttention,
    BigBirdPegasusDecoderAttention,
    BlenderbotAttention,
    BlenderbotSmallAttention,
    PLBartAttention,
    MusicgenAttention,
    Speech2TextAttention,
    NllbMoeAttention,
)


def _projections(module: BartAttention) -> Projections:
    """``K = X @ W_K + b_K``, ``V = X @ W_V + b_V``; nn.Linear stores ``(out, in)`` so the views are transposed."""
    return Projections.of(module.k_proj, module.v_proj)


#: The model's own attention forward (projections, scaling, output projection) serves every class (no copy); the
#: encoder output arrives as ``key_value_states``.
ROUTE = AttentionRoute(encoder_parameter="key_value_states")


def _decoders(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoders = instances_of(model, DECODERS)
    if not decoders:
        raise UnsupportedModelError(
            f"hf_slim cannot patch {type(model).__name__}: it has no decoder (encoder-only models keep no KV cache, "
            "so there is nothing to slim); slimify the *ForConditionalGeneration, *Model or *ForCausalLM model"
        )
    return decoders


def attention_sites(model: torch.nn.Module) -> list[AttentionSite]:
    """Each decoder layer's self-attention (slim cache) and cross-attention (encoder output, no cache)."""
    sites = []
    for decoder in _decoders(model):
        for layer in decoder.layers:
            cross = "cross_attention" if hasattr(layer, "cross_attention") else "encoder_attn"  # NLLB-MoE's name
            for kind, name in (("self", "self_attn"), ("cross", cross)):
                module = getattr(layer, name)
                if type(module) not in ATTENTIONS:
                    raise UnsupportedModelError(
                        f"{type(layer).__name__}.{name} is a {type(module).__name__}, not the BART attention this "
                        "patch was written for"
                    )
                sites.append(AttentionSite.of(module, kind, _projections, ROUTE))
    return sites


def calibration_inputs(model: torch.nn.Module) -> dict:
    """Token ids for the K-mode calibration when the user gives none (real text calibrates better), and for
    Speech2Text random normalised filter-bank features ``input_features: (2, 256, input_feat_per_channel *
    input_channels)`` (its feature extractor normalises each utterance to zero mean and unit variance; real speech
    calibrates better: pass ``calibration_inputs``)."""
    generator = torch.Generator().manual_seed(0)
    text_config = model.config.get_text_config()  # Florence-2: the BART language model's config holds the vocabulary
    vocab = text_config.vocab_size
    decoder_input_ids = torch.randint(0, vocab, (2, 64), generator=generator, device="cpu").to(model.device)
    if not getattr(text_config, "is_encoder_decoder", getattr(model.config, "is_encoder_decoder", False)):
        return {"input_ids": decoder_input_ids}
    if model.main_input_name == "input_features":  # Speech2Text: the encoder subsamples 256 frames to 64
        width = model.config.input_feat_per_channel * model.config.input_channels
        features = torch.randn(2, 256, width, generator=generator, device="cpu")
        return {"input_features": features.to(model.device, model.dtype), "decoder_input_ids": decoder_input_ids}
    input_ids = torch.randint(0, vocab, (2, 64), generator=generator, device="cpu")
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is not None:  # text only: no image placeholders without pixel_values
        input_ids = input_ids.masked_fill(input_ids == image_token, 0)
    return {"input_ids": input_ids.to(model.device), "decoder_input_ids": decoder_input_ids}


PATCH = ArchitecturePatch(
    attention_sites=attention_sites,
    cache_owners=_decoders,  # the decoder's forward creates EncoderDecoderCache(DynamicCache, DynamicCache)
    contracts=route_contracts(
        ROUTE,
        attention=ATTENTIONS,
        cache_owners=DECODERS,
        attributes=("k_proj", "v_proj", "head_dim", "num_heads", "layer_idx", "config"),
    ),
    calibration_inputs=calibration_inputs,
    extra_patches=one_encoder_output_per_input,
    composite_decoder=True,
)
