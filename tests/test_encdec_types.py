"""Encoder-decoder model types served through the patch contract (issue 29), one row of :data:`TYPES` each:
Speech2Text (BART's attention over a convolutional speech encoder), NLLB-MoE (M2M100's attention beside a mixture
of experts), Pop2Piano (T5's attention over spectrogram embeddings), LED (a BART-style decoder attention the model
computes itself, after a Longformer encoder), FSMT (the same in fairseq's time-first layout).

Slim vs unpatched on random tiny configs with random biases and norms: logits over a decoder prefill and 16 decode
steps (padded sources, a left-padded decoder prompt), greedy / beams / seeded sampling on padded batches, one encoder
copy per input under beams, the static cache (or its refusal), K and auto modes, undo.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens, assert_unchanged, cache_of, snapshot
from helpers import assert_encoder_decoder_generate_identical as assert_generate_identical
from tiny_encdec import source_batch, tiny_config
from tiny_models import randomize_biases
from transformers import DynamicCache, EncoderDecoderCache, StaticCache

from hf_slim import SlimCache, is_slim, slim_record, slimify, unslimify
from hf_slim._compat import with_cache
from hf_slim.cache import StaticSlimLayer

#: mel filter banks per frame of the tiny Speech2Text (its encoder subsamples frames by 4)
MEL_BINS = 16


#: what the tiny configs share with the tiny BART family's (:func:`tiny_encdec.tiny_config`), named alike in each
SHARED_SETTINGS = (
    "vocab_size d_model encoder_layers decoder_layers encoder_attention_heads decoder_attention_heads encoder_ffn_dim "
    "decoder_ffn_dim pad_token_id bos_token_id eos_token_id decoder_start_token_id init_std dropout attention_dropout"
).split()


def tiny_settings(**extra) -> dict:
    """The tiny BART's sizes and special tokens (2+2 layers, d=64, 4 heads of 16, 96 tokens, no dropout) and
    ``extra``: config arguments of a BART-style family."""
    bart = tiny_config("bart")
    return {name: getattr(bart, name) for name in SHARED_SETTINGS} | extra


def tiny_speech_to_text(attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2+2-layer Speech2Text (d=64, 4 heads, 16 mel bins, two stride-2 convolutions); eager only: transformers
    gives Speech2Text no SDPA path."""
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    settings = tiny_settings(max_source_positions=64, max_target_positions=128, **overrides)
    config = Speech2TextConfig(**settings, input_feat_per_channel=MEL_BINS, conv_channels=32)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return randomize_biases(Speech2TextForConditionalGeneration(config)).eval()


def padding_mask(rows: int, length: int, padding_side: str) -> torch.Tensor:
    """``(rows, length)`` ones, rows 1 and 2 padded on ``padding_side`` by a third and by 60% of ``length``."""
    mask = torch.ones(rows, length, dtype=torch.long)
    for row, pad in ((1, length // 3), (2, 3 * length // 5)):
        if row < rows:
            if padding_side == "right":
                mask[row, length - pad :] = 0
            else:
                mask[row, :pad] = 0
    return mask


def speech_batch(rows: int = 3, padding_side: str = "right", frames: int = 40, seed: int = 5) -> dict:
    """Normalised random filter banks ``(rows, frames, MEL_BINS)``, rows 1 and 2 padded (zeros, as the feature
    extractor pads)."""
    features = torch.randn(rows, frames, MEL_BINS, generator=torch.Generator().manual_seed(seed))
    mask = padding_mask(rows, frames, padding_side)
    return {"input_features": features * mask[..., None], "attention_mask": mask}


#: Pop2Piano's composers: generate() prepends the chosen one's embedding to the features
COMPOSERS = {"composer1": 2000, "composer2": 2001, "composer3": 2002}


def tiny_pop2piano(attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny T5-shaped Pop2Piano (:func:`test_t5.tiny_t5`: d_model 32 narrower than heads * d_kv = 64, few relative
    buckets, random norms and bias tables), with three composers."""
    from test_t5 import tiny_t5

    model = tiny_t5("pop2piano", attn, seed=seed, **overrides)
    model.generation_config.composer_to_feature_token = dict(COMPOSERS)
    model.generation_config._from_model_config = False  # else from_pretrained rebuilds it without the composers
    return model


def spectrogram_batch(rows: int = 3, padding_side: str = "right", frames: int = 12, seed: int = 5) -> dict:
    """Pop2Piano's ``input_features``: random spectrogram embeddings ``(rows, frames, d_model = 32)``, rows 1 and 2
    padded (zeros)."""
    features = torch.randn(rows, frames, 32, generator=torch.Generator().manual_seed(seed))
    mask = padding_mask(rows, frames, padding_side)
    return {"input_features": features * mask[..., None], "attention_mask": mask}


def tiny_led(attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2+2-layer LED (the tiny BART's sizes) whose Longformer encoder attends in windows of 4 tokens; eager only:
    transformers gives LED no SDPA path."""
    from transformers import LEDConfig, LEDForConditionalGeneration

    positions = dict(max_encoder_position_embeddings=128, max_decoder_position_embeddings=128)
    config = LEDConfig(**tiny_settings(**positions, attention_window=4, **overrides))
    config._attn_implementation = attn
    torch.manual_seed(seed + 1)  # seed 0's greedy path ends at once (EOS first), which would compare no decoding
    return randomize_biases(LEDForConditionalGeneration(config)).eval()


def tiny_fsmt(attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2+2-layer FSMT (the tiny BART's sizes, 96 source and 96 target tokens), greedy by default (FSMTConfig's
    default is 5 beams); eager only: transformers gives FSMT no SDPA path."""
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    settings = tiny_settings(max_position_embeddings=128, **overrides)
    vocab = settings.pop("vocab_size")
    config = FSMTConfig(langs=["en", "de"], src_vocab_size=vocab, tgt_vocab_size=vocab, num_beams=1, **settings)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return randomize_biases(FSMTForConditionalGeneration(config)).eval()


def tiny_nllb_moe(attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2+2-layer NLLB-MoE (the tiny BART's sizes) whose second encoder and decoder layers route each token to 2 of
    4 experts; eager only: transformers gives NLLB-MoE no SDPA path."""
    from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration

    experts = dict(num_experts=4, expert_capacity=8, encoder_sparse_step=2, decoder_sparse_step=2)
    config = NllbMoeConfig(**tiny_settings(max_position_embeddings=128, **experts, **overrides))
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return randomize_biases(NllbMoeForConditionalGeneration(config)).eval()


def token_batch(rows: int = 3, padding_side: str = "right") -> dict:
    """Source token ids of the tiny BART family (:func:`tiny_encdec.source_batch`), rows 1 and 2 padded."""
    return source_batch(rows, padding_side=padding_side)


@dataclass(frozen=True)
class EncoderDecoderType:
    """How the tests build and feed one model type.

    Attributes
    ----------
    build:
        ``(attn, seed, **config overrides) -> model``: a tiny random model (random biases and norms).
    batch:
        ``(rows, padding_side) -> encoder inputs`` with an ``attention_mask`` that pads rows 1 and 2.
    attns:
        the attention implementations transformers gives the type.
    static:
        the model serves ``cache_implementation="static"`` (else the patch declares ``static_cache_refusal``).
    generate_kwargs:
        what generate() needs besides the inputs.
    square_keys:
        config overrides that make W_K square (``heads * head_dim == d_model``), for the K-mode tests.
    """

    build: Callable[..., torch.nn.Module]
    batch: Callable[[int, str], dict]
    attns: tuple[str, ...] = ("sdpa", "eager")
    static: bool = True
    generate_kwargs: dict = field(default_factory=dict)
    square_keys: dict = field(default_factory=dict)


TYPES = {
    "speech_to_text": EncoderDecoderType(tiny_speech_to_text, speech_batch, attns=("eager",)),
    "pop2piano": EncoderDecoderType(tiny_pop2piano, spectrogram_batch, square_keys=dict(d_kv=8)),
    "led": EncoderDecoderType(tiny_led, token_batch, attns=("eager",), static=False),
    "fsmt": EncoderDecoderType(tiny_fsmt, token_batch, attns=("eager",), static=False),
    # the tiny NLLB-MoE's greedy path ends at once (EOS first) unless told otherwise: check_release's rows decode
    "nllb-moe": EncoderDecoderType(tiny_nllb_moe, token_batch, ("eager",), generate_kwargs=dict(min_new_tokens=12)),
}
ATTN_CASES = [(t, a) for t, case in TYPES.items() for a in case.attns]
#: min_new_tokens and no_repeat_ngram_size keep random tiny models on long varied paths.
GENERATE = dict(max_new_tokens=16, min_new_tokens=16, no_repeat_ngram_size=2, return_dict_in_generate=True)


def build(model_type: str, attn: str | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    case = TYPES[model_type]
    return case.build(attn or case.attns[0], seed, **overrides)


def pair(model_type: str, attn: str | None = None, mode: str = "input", calibration: dict | None = None):
    """(unpatched, slim) copies of the same random model."""
    vanilla = build(model_type, attn)
    return vanilla, slimify(copy.deepcopy(vanilla), mode, calibration_inputs=calibration)


def generate(model_type: str, model: torch.nn.Module, inputs: dict, **kwargs):
    """generate() with its own copy of the generation config (Pop2Piano's generate() writes its arguments into the
    config it is given, the model's own by default)."""
    config = copy.deepcopy(model.generation_config)
    config.update(**{**TYPES[model_type].generate_kwargs, **GENERATE, **kwargs})
    return model.generate(**inputs, generation_config=config)


def well_conditioned_keys(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every decoder key projection orthogonal times 0.5, so that the K cache is exact in float32 on these weights
    and the K-mode tests test the K path (random tiny W_K are often ill-conditioned)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site_module in {id(m): m for m in model.get_decoder().modules()}.values():
            for name in ("k_proj", "k"):
                linear = getattr(site_module, name, None)
                if isinstance(linear, torch.nn.Linear) and linear.weight.shape[0] == linear.weight.shape[1]:
                    gaussian = torch.randn(linear.weight.shape, generator=generator, dtype=torch.float64)
                    linear.weight.copy_(torch.linalg.qr(gaussian)[0] * 0.5)
    return model


@pytest.mark.parametrize("model_type", TYPES)
def test_sites_are_decoder_self_and_cross_attention_only(model_type):
    model = slimify(build(model_type))
    modes = slim_record(model).layer_modes
    assert sorted(set(modes.values())) == ["encoder", "input"]
    assert [name.split("[")[1] for name in modes] == ["self 0]", "cross 0]", "self 1]", "cross 1]"]
    for name, module in model.get_encoder().named_modules():
        assert "hf_slim" not in vars(module) and "forward" not in vars(module), f"encoder {name} was patched"


@pytest.mark.parametrize(("model_type", "attn"), ATTN_CASES)
def test_prefill_and_16_decode_steps_match_logits(model_type, attn):
    """3 padded sources, a left-padded decoder prompt of 6 tokens, then 16 single-token steps."""
    vanilla, slim = pair(model_type, attn)
    source = TYPES[model_type].batch(3, "right")
    vocab = vanilla.config.vocab_size
    ids = torch.randint(3, vocab, (3, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in decoder row 1
    caches = {"vanilla": EncoderDecoderCache(DynamicCache(), DynamicCache()), "slim": None}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for step in range(17):
            outs = {}
            for name, model in (("vanilla", vanilla), ("slim", slim)):
                outs[name] = model(
                    **source, decoder_input_ids=ids, decoder_attention_mask=mask, **with_cache(caches[name])
                )
                caches[name] = cache_of(outs[name])
            assert_close_relative(outs["slim"].logits, outs["vanilla"].logits, LOGITS_RTOL[torch.float32], f"{step}")
            ids = torch.randint(3, vocab, (3, 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    assert isinstance(caches["slim"].self_attention_cache, SlimCache)
    # 6 + 16 (FSMT up to 5.23 feeds only the last token of a cached step: 1 + 16)
    assert caches["slim"].get_seq_length() == caches["vanilla"].get_seq_length() in (6 + 16, 1 + 16)
    assert caches["slim"].cross_attention_cache.get_seq_length() == 0, "cross-attention must not be cached"


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("model_type", TYPES)
def test_greedy_beams_and_sampling_identical(model_type, padding_side):
    """Padded source batches: greedy, 3 beams returning 2 sequences each, and seeded sampling."""
    vanilla, slim = pair(model_type)
    source = TYPES[model_type].batch(3, padding_side)
    run = functools.partial(generate, model_type, inputs=source, output_scores=True)
    assert_generate_identical(lambda model, **kwargs: run(model=model, **kwargs), vanilla, slim, model_type)


def first_cross_attention(model: torch.nn.Module) -> torch.nn.Module:
    """The first decoder layer's cross-attention module (``encoder_attn``, T5's ``EncDecAttention``, NLLB-MoE's
    ``cross_attention``)."""
    names = ("encoder_attn", "EncDecAttention", "cross_attention")
    return next(module for name, module in model.get_decoder().named_modules() if name.endswith(names))


def encoder_rows(kwargs: dict) -> int:
    """The rows of the encoder output a cross-attention call receives (FSMT's ``key`` is time-first)."""
    return kwargs["key_value_states"].shape[0] if "key_value_states" in kwargs else kwargs["key"].shape[1]


@pytest.mark.parametrize("model_type", TYPES)
def test_beams_read_one_encoder_copy_per_input(model_type):
    """Under 4 beams the slim cross-attention reads one encoder row per input (the unpatched one, one per beam)."""
    vanilla, slim = pair(model_type)
    source = TYPES[model_type].batch(2, "right")
    rows = {"vanilla": set(), "slim": set()}
    for name, model in (("vanilla", vanilla), ("slim", slim)):
        handle = first_cross_attention(model).register_forward_pre_hook(
            lambda module, args, kwargs, seen=rows[name]: seen.add(encoder_rows(kwargs)),
            with_kwargs=True,
        )
        try:
            generate(model_type, model, source, num_beams=4)
        finally:
            handle.remove()
    assert rows == {"vanilla": {8}, "slim": {2}}


@pytest.mark.parametrize("model_type", TYPES)
def test_static_cache_generate_identical_or_refused(model_type):
    vanilla, slim = pair(model_type)
    source = TYPES[model_type].batch(3, "right")
    if not TYPES[model_type].static:
        refusal = slim_record(slim).static_cache_refusal
        assert refusal
        with pytest.raises(NotImplementedError, match="cache_implementation='static'"):
            generate(model_type, slim, source, cache_implementation="static")
        return
    for kwargs in (dict(), dict(num_beams=2)):
        expected = generate(model_type, vanilla, source, cache_implementation="static", **kwargs)
        actual = generate(model_type, slim, source, cache_implementation="static", **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"static {kwargs}")
        assert isinstance(cache_of(expected).self_attention_cache, StaticCache)
        assert all(isinstance(layer, StaticSlimLayer) for layer in cache_of(actual).self_attention_cache.layers)


@pytest.mark.parametrize("mode", ["k", "auto"])
@pytest.mark.parametrize("model_type", TYPES)
def test_k_and_auto_modes_match(model_type, mode):
    """Well-conditioned key projections: the K cache is exact, so K mode keeps K on every self-attention layer
    (auto: the mode its calibration picks per layer); beams and greedy identical to the unpatched model."""
    vanilla = well_conditioned_keys(build(model_type, **TYPES[model_type].square_keys))
    decoder_ids = torch.randint(3, vanilla.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    calibration = {**TYPES[model_type].batch(2, "right"), "decoder_input_ids": decoder_ids}
    slim = slimify(copy.deepcopy(vanilla), mode, calibration_inputs=calibration)
    modes = set(slim_record(slim).layer_modes.values())
    assert modes == {"k", "encoder"} if mode == "k" else modes <= {"k", "input", "encoder"}
    source = TYPES[model_type].batch(3, "right")
    for kwargs in (dict(), dict(num_beams=2)):
        expected = generate(model_type, vanilla, source, **kwargs)
        actual = generate(model_type, slim, source, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"{mode} mode {kwargs}")


@pytest.mark.parametrize("model_type", TYPES)
def test_default_calibration_inputs_fit_the_model(model_type):
    """K mode without calibration inputs runs the family's default calibration batch through the model."""
    slim = slimify(well_conditioned_keys(build(model_type, **TYPES[model_type].square_keys)), "k")
    assert "k" in set(slim_record(slim).layer_modes.values())


@pytest.mark.parametrize("model_type", TYPES)
def test_unslimify_restores_exactly(model_type):
    vanilla = build(model_type)
    source = TYPES[model_type].batch(2, "right")
    expected = generate(model_type, vanilla, source).sequences  # first: NLLB-MoE's routers keep their input dtype
    model = copy.deepcopy(vanilla)
    before = snapshot(model)
    slimify(model)
    generate(model_type, model, source, num_beams=2)
    unslimify(model)
    assert not is_slim(model)
    assert_unchanged(model, before)
    assert_same_tokens(generate(model_type, model, source).sequences, expected, "after unslimify")
