"""Composites: VisionEncoderDecoderModel and SpeechEncoderDecoderModel with every supported decoder kind (TrOCR, the
mBART/BART ``*ForCausalLM`` decoders Donut/Nougat use, GPT-2 with cross-attention), Florence-2 and MusicGen: slim vs
unpatched logits over prefill and 24 decode steps, greedy / beams / seeded sampling tokens, one encoder copy per input
under beams, static cache, refusal of unsupported decoders, undo."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import (
    LOGITS_RTOL,
    assert_bf16_greedy_identical,
    assert_close_relative,
    assert_same_tokens,
    assert_unchanged,
    cache_of,
    snapshot,
    with_cache,
)
from tiny_encdec import VOCAB, tiny_config
from tiny_models import randomize_biases, sharpen_greedy
from transformers import (
    BartForCausalLM,
    DynamicCache,
    EncodecConfig,
    EncoderDecoderCache,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2VisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    MBartForCausalLM,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    SpeechEncoderDecoderConfig,
    SpeechEncoderDecoderModel,
    T5Config,
    TrOCRConfig,
    TrOCRForCausalLM,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    Wav2Vec2Config,
)
from transformers.modeling_outputs import BaseModelOutput

from hf_slim import SlimCache, SlimFallbackWarning, UnsupportedModelError, is_slim, slim_record, slimify, unslimify

GENERATE = dict(
    max_new_tokens=24, min_new_tokens=24, no_repeat_ngram_size=2, return_dict_in_generate=True, output_scores=True
)
ENCODER_WIDTH = 32  # the decoders are 64 wide: cross-attention maps the narrower encoder output (or VED projects it)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decoder(kind: str):
    """A 2-layer decoder with cross-attention, d=64, 4 heads, 96 tokens: (model class, config)."""
    if kind == "trocr":
        config = TrOCRConfig(
            vocab_size=VOCAB, d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
            max_position_embeddings=128, cross_attention_hidden_size=ENCODER_WIDTH, init_std=0.1, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, layernorm_embedding=True, dropout=0.0,
            attention_dropout=0.0, use_learned_position_embeddings=True,
        )  # fmt: skip
        return TrOCRForCausalLM, config
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )  # fmt: skip
        return GPT2LMHeadModel, config
    # unscaled token embeddings: scaled by sqrt(64) they drown the cross-attention signal of a random encoder
    return {"mbart": MBartForCausalLM, "bart": BartForCausalLM}[kind], tiny_config(kind, scale_embedding=False)


def tiny_composite(encoder: str, decoder: str, attn: str = "eager", seed: int = 0):
    """A ViT (16x16 images) or wav2vec2 encoder, 32 wide, with a tiny ``decoder``; random biases and norms."""
    if encoder == "vision":
        encoder_config = ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=ENCODER_WIDTH, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=64,
        )  # fmt: skip
        composite_config, composite = VisionEncoderDecoderConfig, VisionEncoderDecoderModel
    else:
        encoder_config = Wav2Vec2Config(
            hidden_size=ENCODER_WIDTH, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
        )  # fmt: skip
        composite_config, composite = SpeechEncoderDecoderConfig, SpeechEncoderDecoderModel
    decoder_class, decoder_config = _decoder(decoder)
    decoder_config.is_decoder, decoder_config.add_cross_attention = True, True
    decoder_config.is_encoder_decoder = False
    config = composite_config.from_encoder_decoder_configs(encoder_config, decoder_config)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 1, 2
    torch.manual_seed(seed)
    model = composite(config=config)
    model.config._attn_implementation = attn
    model.config.decoder._attn_implementation = attn
    model.config.encoder._attn_implementation = attn
    model.generation_config.decoder_start_token_id, model.generation_config.pad_token_id = 2, 1
    if hasattr(model, "enc_to_dec_proj"):  # the 32 -> 64 projection VED adds: initialised small, it hides the images
        with torch.no_grad():
            model.enc_to_dec_proj.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return randomize_biases(model).eval()


def encoder_inputs(encoder: str, batch: int = 3) -> dict:
    """3 random images, or 3 waveforms of 1600 samples with rows 1 and 2 padded (encoder padding)."""
    generator = torch.Generator().manual_seed(5)
    if encoder == "vision":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    values = torch.randn(batch, 1600, generator=generator)
    mask = torch.ones(batch, 1600, dtype=torch.long)
    mask[1, 1200:] = 0
    mask[2, 800:] = 0
    return {"input_values": values * mask, "attention_mask": mask}


CASES = [("vision", "trocr"), ("vision", "mbart"), ("vision", "gpt2"), ("speech", "bart"), ("speech", "gpt2")]


def pair(encoder: str, decoder: str, **kwargs):
    vanilla = tiny_composite(encoder, decoder, **kwargs)
    return vanilla, slimify(copy.deepcopy(vanilla))


@pytest.mark.parametrize(("encoder", "decoder"), CASES)
def test_sites_are_the_decoders(encoder, decoder):
    _, slim = pair(encoder, decoder)
    modes = slim_record(slim).layer_modes
    assert sorted(modes.values()) == ["encoder", "encoder", "input", "input"], modes
    for name, module in slim.encoder.named_modules():
        assert "hf_slim" not in vars(module), f"encoder {name} was patched"


@pytest.mark.parametrize(("encoder", "decoder"), CASES)
def test_prefill_and_24_decode_steps_match_logits(encoder, decoder):
    vanilla, slim = pair(encoder, decoder)
    inputs = encoder_inputs(encoder)
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(6))
    caches = {"vanilla": EncoderDecoderCache(DynamicCache(), DynamicCache()), "slim": None}
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        encoder_outputs = vanilla.encoder(**inputs)
        mask = inputs.get("attention_mask")
        for step in range(25):
            outs = {}
            for name, model in (("vanilla", vanilla), ("slim", slim)):
                outs[name] = model(
                    encoder_outputs=encoder_outputs,
                    attention_mask=mask,
                    decoder_input_ids=ids,
                    **with_cache(caches[name]),
                    use_cache=True,
                )
                caches[name] = cache_of(outs[name])
            rtol = LOGITS_RTOL[torch.float32]
            assert_close_relative(outs["slim"].logits, outs["vanilla"].logits, rtol, f"step {step}")
            ids = torch.randint(3, VOCAB, (3, 1), generator=generator)
    assert isinstance(caches["slim"].self_attention_cache, SlimCache)
    assert caches["slim"].cross_attention_cache.get_seq_length() == 0


@pytest.mark.parametrize(("encoder", "decoder"), CASES)
def test_greedy_beams_and_sampling_identical_with_one_encoder_copy(encoder, decoder):
    vanilla, slim = pair(encoder, decoder)
    inputs = encoder_inputs(encoder)
    rows = []
    cross = slim.decoder.get_decoder() if decoder != "gpt2" else slim.decoder.transformer
    layer = cross.layers[0] if decoder != "gpt2" else cross.h[0]
    module = layer.encoder_attn if decoder != "gpt2" else layer.crossattention
    key = "encoder_hidden_states" if decoder == "gpt2" else "key_value_states"
    handle = module.register_forward_pre_hook(lambda m, a, k: rows.append(k[key].shape[0]), with_kwargs=True)
    try:
        cases = (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2))
        for kwargs in cases:
            torch.manual_seed(0)
            expected = vanilla.generate(**inputs, **GENERATE, **kwargs)
            torch.manual_seed(0)
            actual = slim.generate(**inputs, **GENERATE, **kwargs)
            assert_same_tokens(actual.sequences, expected.sequences, f"{encoder}+{decoder} {kwargs}")
            assert len(set(map(tuple, expected.sequences.tolist()))) > 1, "every row generated the same tokens"
    finally:
        handle.remove()
    assert set(rows) == {3}, f"slim cross-attention saw encoder outputs with rows {set(rows)}, want one per input"


@pytest.mark.parametrize(("encoder", "decoder"), CASES)
def test_bf16_greedy_identical(encoder, decoder):
    """bf16 greedy tokens (3 inputs, padded audio, 24 new tokens) identical to the unpatched bf16 model's, on the tiny
    composite trained on its own greedy path until it is peaked (random, its top-1 margins are 0-1.6 bf16 steps:
    ties; see ``test_bart.test_bf16_greedy_identical_and_as_accurate``)."""
    reference = tiny_composite(encoder, decoder)
    inputs = encoder_inputs(encoder)
    path, _ = sharpen_greedy(reference, inputs, GENERATE)
    vanilla = copy.deepcopy(reference).to(torch.bfloat16)
    slim = slimify(copy.deepcopy(vanilla))
    inputs = {name: x.to(torch.bfloat16) if x.is_floating_point() else x for name, x in inputs.items()}
    assert_bf16_greedy_identical(vanilla, slim, inputs, path, GENERATE, f"{encoder}+{decoder}")


@pytest.mark.parametrize(("encoder", "decoder"), [("vision", "trocr"), ("vision", "mbart")])
def test_static_cache_generate_identical(encoder, decoder):
    vanilla, slim = pair(encoder, decoder)
    inputs = encoder_inputs(encoder)
    common = dict(max_new_tokens=12, min_new_tokens=12, cache_implementation="static")
    assert_same_tokens(slim.generate(**inputs, **common), vanilla.generate(**inputs, **common), "static")


@pytest.mark.parametrize(("encoder", "decoder"), [("vision", "trocr"), ("speech", "bart")])
def test_k_mode_with_the_default_calibration_batch(encoder, decoder):
    """No calibration_inputs: a random image or the bundled speech sample and random decoder ids calibrate every
    self-attention layer; whatever each layer gets, generation matches the unpatched model."""
    vanilla = tiny_composite(encoder, decoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlimFallbackWarning)
        slim = slimify(copy.deepcopy(vanilla), "k")
    record = slim_record(slim)
    self_sites = [name for name, mode in record.layer_modes.items() if mode != "encoder"]
    assert len(self_sites) == 2 and set(record.calibration) == set(self_sites)
    assert all(0 <= numbers["k_error"] < 1 for numbers in record.calibration.values()), record.calibration
    inputs = encoder_inputs(encoder)
    expected = vanilla.generate(**inputs, **GENERATE, num_beams=2)
    assert_same_tokens(slim.generate(**inputs, **GENERATE, num_beams=2).sequences, expected.sequences, "k mode")


def test_trocr_alone_as_a_causal_lm():
    """TrOCRForCausalLM without an encoder (its cross-attention unused): logits over 21 steps, greedy and beams."""
    decoder_class, config = _decoder("trocr")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    vanilla = randomize_biases(decoder_class(config)).eval()
    slim = slimify(copy.deepcopy(vanilla))
    ids = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        caches = {"vanilla": DynamicCache(), "slim": None}
        step_ids, step_mask = ids, mask
        generator = torch.Generator().manual_seed(3)
        for step in range(21):
            outs = {}
            for name, model in (("vanilla", vanilla), ("slim", slim)):
                outs[name] = model(input_ids=step_ids, attention_mask=step_mask, **with_cache(caches[name]))
                caches[name] = cache_of(outs[name])
            assert_close_relative(outs["slim"].logits, outs["vanilla"].logits, LOGITS_RTOL[torch.float32], f"{step}")
            step_ids = torch.randint(3, VOCAB, (3, 1), generator=generator)
            step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
    assert isinstance(caches["slim"], SlimCache)
    for kwargs in (dict(), dict(num_beams=3, num_return_sequences=2)):
        expected = vanilla.generate(input_ids=ids, attention_mask=mask, **GENERATE, **kwargs)
        actual = slim.generate(input_ids=ids, attention_mask=mask, **GENERATE, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"trocr causal lm {kwargs}")


def test_unsupported_decoder_is_refused_with_its_reason_and_untouched():
    model = tiny_composite("vision", "trocr")
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1)
    model.config.decoder = llama
    before = snapshot(model)
    with pytest.raises(
        UnsupportedModelError, match="'vision-encoder-decoder' with a 'llama' decoder: its patch has no cross-attention"
    ):
        slimify(model)
    assert_unchanged(model, before)


def test_unslimify_restores_exactly():
    vanilla = tiny_composite("vision", "mbart")
    model = copy.deepcopy(vanilla)
    before = snapshot(model)
    slimify(model)
    model.generate(**encoder_inputs("vision"), max_new_tokens=4, num_beams=2)
    unslimify(model)
    assert not is_slim(model)
    assert_unchanged(model, before)
    expected = vanilla.generate(**encoder_inputs("vision"), **GENERATE).sequences
    assert_same_tokens(model.generate(**encoder_inputs("vision"), **GENERATE).sequences, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Florence-2: DaViT image features scattered into a BART encoder-decoder's input; the BART decoder is patched


def tiny_florence2(attn: str = "sdpa", seed: int = 0):
    """Two DaViT stages (16, 32 wide) on 32x32 images (17 image tokens of width 64) and a 2+2-layer BART."""
    vision = Florence2VisionConfig(
        depths=(1, 1), embed_dim=(16, 32), num_heads=(2, 4), num_groups=(2, 4), patch_size=(7, 3), patch_stride=(4, 2),
        patch_padding=(3, 1), patch_prenorm=(False, True), window_size=2, projection_dim=64,
        max_position_embeddings=16, max_temporal_embeddings=4,
    )  # fmt: skip
    config = Florence2Config(vision_config=vision, text_config=tiny_config("bart", scale_embedding=False))
    config.image_token_id = VOCAB - 1
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    torch.manual_seed(seed)
    return randomize_biases(Florence2ForConditionalGeneration(config)).eval()


def florence2_inputs(batch: int = 3) -> dict:
    """Images and a prompt of 17 image tokens then 6 text tokens (row 1's text left-padded by 2)."""
    generator = torch.Generator().manual_seed(5)
    text = torch.randint(3, VOCAB - 1, (batch, 6), generator=generator)
    ids = torch.cat([torch.full((batch, 17), VOCAB - 1), text], dim=1)
    mask = torch.ones_like(ids)
    mask[1, 17:19] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator),
    }


def test_florence2_k_mode_with_the_default_calibration_batch():
    """No calibration_inputs: random token ids of the language model's vocabulary (Florence2Config keeps it in
    text_config), text only; generation matches the unpatched model whatever each layer gets."""
    vanilla = tiny_florence2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlimFallbackWarning)
        slim = slimify(copy.deepcopy(vanilla), "k")
    assert set(slim_record(slim).layer_modes.values()) <= {"k", "input", "encoder"}
    common = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = vanilla.generate(**florence2_inputs(), **common)
    assert_same_tokens(slim.generate(**florence2_inputs(), **common), expected, "florence2 k mode")


def test_florence2_static_cache_generate_identical():
    """``cache_implementation="static"``, greedy and 2 beams: the unpatched model's tokens."""
    vanilla = tiny_florence2()
    slim = slimify(copy.deepcopy(vanilla))
    common = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, cache_implementation="static")
    for kwargs in (dict(), dict(num_beams=2)):
        expected = vanilla.generate(**florence2_inputs(), **common, **kwargs)
        assert_same_tokens(slim.generate(**florence2_inputs(), **common, **kwargs), expected, f"static {kwargs}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_florence2_logits_and_generation_identical_with_one_encoder_copy(attn):
    vanilla = tiny_florence2(attn)
    slim = slimify(copy.deepcopy(vanilla))
    assert sorted(slim_record(slim).layer_modes.values()) == ["encoder", "encoder", "input", "input"]
    inputs = florence2_inputs()
    with torch.no_grad():  # prefill + 24 decode steps, teacher-forced
        ids = torch.randint(3, VOCAB, (3, 25), generator=torch.Generator().manual_seed(6))
        caches = {"vanilla": EncoderDecoderCache(DynamicCache(), DynamicCache()), "slim": None}
        encoder_outputs = None
        for step in range(25):
            outs = {}
            for name, model in (("vanilla", vanilla), ("slim", slim)):
                source = {"encoder_outputs": encoder_outputs} if encoder_outputs else dict(inputs)
                source["attention_mask"] = inputs["attention_mask"]
                outs[name] = model(
                    **source,
                    decoder_input_ids=ids[:, step : step + 1],
                    **with_cache(caches[name]),
                    use_cache=True,
                )
                caches[name] = cache_of(outs[name])
            encoder_outputs = BaseModelOutput(last_hidden_state=outs["vanilla"].encoder_last_hidden_state)
            assert_close_relative(outs["slim"].logits, outs["vanilla"].logits, LOGITS_RTOL[torch.float32], f"{step}")
    rows = []
    cross = slim.model.language_model.decoder.layers[0].encoder_attn
    handle = cross.register_forward_pre_hook(
        lambda m, a, k: rows.append(k["key_value_states"].shape[0]), with_kwargs=True
    )
    try:
        for kwargs in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True)):
            torch.manual_seed(0)
            expected = vanilla.generate(**inputs, **GENERATE, **kwargs)
            torch.manual_seed(0)
            actual = slim.generate(**inputs, **GENERATE, **kwargs)
            assert_same_tokens(actual.sequences, expected.sequences, f"florence2 {kwargs}")
            assert len(set(map(tuple, expected.sequences.tolist()))) > 1, "every row generated the same tokens"
    finally:
        handle.remove()
    assert set(rows) == {3}, f"slim cross-attention saw encoder outputs with rows {set(rows)}, want one per input"


# ----------------------------------------------------------------------------------------------------------------------
# MusicGen: T5 text encoder, EnCodec audio codec, a decoder over 2 codebooks whose attention is BART's


def tiny_musicgen(attn: str = "sdpa", seed: int = 0):
    """1-layer T5 text encoder (32 wide), a 2-quantizer EnCodec at 8 kHz, a 2-layer decoder (64 wide, 2 codebooks).

    ``initializer_factor`` 0.2: larger weights make this decoder ill-conditioned at some steps (measured at 1.0: the
    unpatched fp32 model itself is 2-5e-5 away from float64 there, above the 1e-5 bar; at 0.2: 8e-7).
    """
    text = T5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1, num_decoder_layers=1)
    audio = EncodecConfig(
        hidden_size=16, num_filters=4, upsampling_ratios=(2, 2), codebook_size=64, num_lstm_layers=1,
        target_bandwidths=[24.0], sampling_rate=8000, compress=2, kernel_size=3, last_kernel_size=3,
        residual_kernel_size=3,
    )  # fmt: skip
    decoder = MusicgenDecoderConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, num_codebooks=2,
        max_position_embeddings=128, pad_token_id=64, bos_token_id=64, audio_channels=1, initializer_factor=0.2,
    )  # fmt: skip
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(config)
    for sub in (model.config, model.config.decoder, model.decoder.config):
        sub._attn_implementation = attn
    return randomize_biases(model).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_musicgen_logits_of_every_step_and_audio_identical(attn):
    """Greedy, classifier-free guidance (decoder batch doubled over zeroed text states) and seeded sampling from a
    padded text batch: decoder logits within 1e-5 at each of 25 steps (prefill and 24 decode steps), identical
    audio. (MusicGen's generate supports neither beam search nor num_return_sequences.)"""
    vanilla = tiny_musicgen(attn)
    slim = slimify(copy.deepcopy(vanilla))
    assert slim_record(slim).layer_modes == {
        f"MusicgenAttention[{kind} {i}]": mode
        for i in range(2)
        for kind, mode in (("self", "input"), ("cross", "encoder"))
    }
    ids = torch.randint(2, 90, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    logits = {}
    hooks = [
        model.decoder.register_forward_hook(
            lambda module, args, output, name=name: logits.setdefault(name, []).append(output.logits)
        )
        for name, model in (("vanilla", vanilla), ("slim", slim))
    ]
    try:
        for kwargs in (dict(do_sample=False), dict(do_sample=False, guidance_scale=3.0), dict(do_sample=True)):
            logits.clear()
            outputs = []
            for model in (vanilla, slim):
                torch.manual_seed(0)
                outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, **kwargs))
            assert len(logits["slim"]) == len(logits["vanilla"]) == 25
            for step, (a, e) in enumerate(zip(logits["slim"], logits["vanilla"], strict=True)):
                assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"{kwargs} step {step}")
            assert torch.equal(outputs[1], outputs[0]), f"{kwargs}: audio differs"
    finally:
        for hook in hooks:
            hook.remove()
    with pytest.raises(ValueError, match="MusicGen has no default K-mode calibration batch"):
        slimify(copy.deepcopy(vanilla), "k")
    assert len({tuple(row.tolist()) for row in logits["vanilla"][-1].argmax(-1)}) > 1, "rows generated the same codes"


def test_florence2_bf16_greedy_identical():
    """bf16 greedy tokens of the slim Florence-2 equal the unpatched bf16 model's, strictly, on the tiny model trained
    on its own greedy path until it is peaked (see ``test_bart.test_bf16_greedy_identical_and_as_accurate``)."""
    reference = tiny_florence2()
    inputs = florence2_inputs()
    path, _ = sharpen_greedy(reference, inputs, GENERATE)
    vanilla = copy.deepcopy(reference).to(torch.bfloat16)
    slim = slimify(copy.deepcopy(vanilla))
    inputs = {name: x.to(torch.bfloat16) if x.is_floating_point() else x for name, x in inputs.items()}
    assert_bf16_greedy_identical(vanilla, slim, inputs, path, GENERATE, "florence2")
