"""T5 family: slim vs unpatched on random configs (T5 v1.0 / v1.1, mT5, UMT5), generation modes, padding, pipelines,
cache bytes at the T5-11B attention shape, K mode refusal, half precision, undo."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers
from helpers import (
    LOGITS_RTOL,
    assert_as_accurate_as_unpatched,
    assert_bf16_greedy_identical,
    assert_close_relative,
    assert_same_tokens,
    assert_unchanged,
    cache_of,
    encoder_decoder_step_logits,
    snapshot,
    with_cache,
)
from packaging.version import Version
from tiny_models import randomize_biases, sharpen_greedy, tiny_t5_tokenizer
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    MT5Config,
    MT5ForConditionalGeneration,
    Pipeline,
    Pop2PianoConfig,
    Pop2PianoForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    T5Model,
    UMT5Config,
    UMT5ForConditionalGeneration,
    pipeline,
)

from hf_slim import (
    SlimCache,
    SlimFallbackWarning,
    cache_nbytes,
    cache_report,
    is_slim,
    slim_record,
    slimify,
    unslimify,
)
from hf_slim.cache_layers import StaticSlimLayer

#: model_type -> (config class, model class, feed-forward settings). v1.0: ReLU, tied embeddings with the decoder
#: output scaled by d_model**-0.5; v1.1 / Flan-T5 / mT5: gated GELU, untied; UMT5: gated GELU, per-layer position bias.
VARIANTS = {
    "t5-v1.0": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="relu", tie_word_embeddings=True)),
    "t5-v1.1": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5": (MT5Config, MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "umt5": (UMT5Config, UMT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu")),
}
#: T5 copies of other model types, built like the variants (tests/test_encdec_types.py feeds them): Pop2Piano ties its
#: head to the embeddings and scales the decoder output, like T5 v1.0.
T5_COPIES = {
    "pop2piano": (Pop2PianoConfig, Pop2PianoForConditionalGeneration, dict(composer_vocab_size=3)),
}
PROMPTS = [
    "summarize: the quick brown fox jumps over the lazy dog",
    "translate English to German: memory",
    "slim attention keeps one tensor per token instead of keys and values",
]
#: no_repeat_ngram_size keeps random tiny models from repeating one token, so token tests compare long varied paths.
GENERATE = dict(
    max_new_tokens=24, no_repeat_ngram_size=2, return_dict_in_generate=True, output_scores=True, output_logits=True
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared, busy CPU the OpenMP workers spin-wait:
    measured 6 s of CPU for one tiny generate() with 2 threads vs 0.07 s with 1. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_t5(
    variant: str = "t5-v1.1", attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
):
    """A 2+2-layer model with ``e = heads * d_kv = 64`` wider than ``d_model = 32`` (like T5-3B/11B).

    Few buckets and a short max distance put decode steps past ``max_distance`` (the logarithmic and the last bucket);
    the relative bias tables get a large random scale so positions visibly steer the outputs, and norms get random
    gains (``randomize_biases``: T5 has no linear biases).
    """
    config_class, model_class, settings = (VARIANTS | T5_COPIES)[variant]
    tokenizer = tiny_t5_tokenizer()
    arguments = dict(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0, initializer_factor=2.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )  # fmt: skip
    arguments.update(settings)
    arguments.update(overrides)
    torch.manual_seed(seed)
    config = config_class(**arguments)
    config._attn_implementation = attn
    model = randomize_biases(model_class(config))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "relative_attention_bias" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 3.0)
        if settings.get("tie_word_embeddings") is False:
            # transformers 5.23 T5/mT5 configs force tie_word_embeddings=True (False only turns off the output
            # scaling); v1.1 checkpoints have their own head, so give the model one
            head = torch.randn(model.lm_head.weight.shape, generator=generator) * arguments["initializer_factor"]
            model.lm_head.weight = torch.nn.Parameter(head)
    return model.eval().to(dtype)


def pair(variant: str = "t5-v1.1", attn: str = "sdpa", mode: str = "input", **overrides):
    """(unpatched, slim) copies of the same random model."""
    vanilla = tiny_t5(variant, attn, **overrides)
    return vanilla, slimify(copy.deepcopy(vanilla), mode)


def encoder_batch(padding_side: str = "right") -> dict:
    return tiny_t5_tokenizer()(PROMPTS, return_tensors="pt", padding=True, padding_side=padding_side)


def _generate(model, padding_side: str = "right", **kwargs):
    with torch.no_grad():
        return model.generate(**encoder_batch(padding_side), **GENERATE, **kwargs)


def test_sites_are_decoder_self_and_cross_attention_only():
    model = slimify(tiny_t5("t5-v1.1"))
    assert slim_record(model).layer_modes == {
        "T5Attention[self 0]": "input",
        "T5Attention[cross 0]": "encoder",
        "T5Attention[self 1]": "input",
        "T5Attention[cross 1]": "encoder",
    }
    for name, module in model.encoder.named_modules():
        assert "hf_slim" not in vars(module) and "forward" not in vars(module), f"encoder {name} was patched"


@pytest.mark.oldest_transformers
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_20_decode_steps_match_logits(variant, attn, padding_side):
    """Padded encoder batch, a 3-token decoder prefill with a hole in one row's decoder mask, then 20 single steps:
    decode positions reach the logarithmic buckets and pass ``relative_attention_max_distance``."""
    vanilla, slim = pair(variant, attn)
    batch = encoder_batch(padding_side)
    generator = torch.Generator().manual_seed(1)
    vocab = vanilla.config.vocab_size
    ids = torch.cat([torch.zeros(3, 1, dtype=torch.long), torch.randint(3, vocab, (3, 2), generator=generator)], 1)
    decoder_mask = torch.ones_like(ids)
    decoder_mask[1, 1] = 0
    eager = attn == "eager"
    caches = {"vanilla": None, "slim": None}
    with torch.no_grad():
        encoder_outputs = vanilla.get_encoder()(**batch)
        for step in range(21):
            outputs = {}
            for name, model in (("vanilla", vanilla), ("slim", slim)):
                outputs[name] = model(
                    encoder_outputs=encoder_outputs,
                    attention_mask=batch["attention_mask"],
                    decoder_input_ids=ids,
                    decoder_attention_mask=decoder_mask,
                    **with_cache(caches[name]),
                    use_cache=True,
                    output_attentions=eager,
                )
                caches[name] = cache_of(outputs[name])
            where = f"{variant} {attn} step {step}"
            assert_close_relative(outputs["slim"].logits, outputs["vanilla"].logits, LOGITS_RTOL[torch.float32], where)
            if eager:
                for kind in ("decoder_attentions", "cross_attentions"):
                    for a, e in zip(getattr(outputs["slim"], kind), getattr(outputs["vanilla"], kind), strict=True):
                        assert_close_relative(a, e, 1e-5, f"{where} {kind}")
            ids = torch.randint(3, vocab, (3, 1), generator=generator)
            decoder_mask = torch.cat([decoder_mask, torch.ones_like(ids)], dim=1)
    assert isinstance(caches["slim"], EncoderDecoderCache)
    assert isinstance(caches["slim"].self_attention_cache, SlimCache)
    assert caches["slim"].get_seq_length() == caches["vanilla"].get_seq_length() == 23
    cross = caches["slim"].cross_attention_cache
    assert cross.get_seq_length() == 0 and cache_nbytes(cross) == 0, "slim model must keep no cross-attention cache"


@pytest.mark.parametrize("variant", ["t5-v1.0", "umt5"])
def test_chunked_decode_matches_full_forward(variant):
    """Chunks of at most head_dim queries take the absorbed path (bias rows for several queries), larger chunks
    rebuild K/V from the cached X; both must equal one uncached forward over the whole decoder sequence."""
    if variant == "umt5" and Version(transformers.__version__) < Version("5.18"):
        pytest.skip(
            "transformers <= 5.17 builds UMT5's decoder self-attention with is_causal=False, so the unpatched model's "
            "uncached forward over a whole unpadded sequence attends to future tokens: the reference is wrong there"
        )
    vanilla, slim = pair(variant)
    batch = encoder_batch()
    ids = torch.randint(3, vanilla.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 0
    with torch.no_grad():
        encoder_outputs = vanilla.get_encoder()(**batch)
        common = dict(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"])
        full = vanilla(decoder_input_ids=ids, use_cache=False, **common).logits
        uncached = slim(decoder_input_ids=ids, use_cache=False, **common)
        assert cache_of(uncached) is None
        assert_close_relative(uncached.logits, full, LOGITS_RTOL[torch.float32], "slim forward without cache")
        cache, pieces, start = None, [], 0
        for size in (5, 4, 1, 16 + 3, 40 - 5 - 4 - 1 - 19):
            out = slim(decoder_input_ids=ids[:, start : start + size], **with_cache(cache), use_cache=True, **common)
            cache, start = cache_of(out), start + size
            pieces.append(out.logits)
    assert_close_relative(torch.cat(pieces, dim=1), full, LOGITS_RTOL[torch.float32], "chunked decode")


@pytest.mark.oldest_transformers
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_identical(variant, padding_side):
    vanilla, slim = pair(variant)
    expected, actual = _generate(vanilla, padding_side), _generate(slim, padding_side)
    assert_same_tokens(actual.sequences, expected.sequences, f"{variant} greedy")
    assert isinstance(cache_of(actual).self_attention_cache, SlimCache)


@pytest.mark.oldest_transformers
@pytest.mark.parametrize("variant", ["t5-v1.0", "t5-v1.1", "umt5"])
def test_beam_search_identical(variant):
    vanilla, slim = pair(variant)
    expected = _generate(vanilla, num_beams=3, num_return_sequences=2)
    actual = _generate(slim, num_beams=3, num_return_sequences=2)
    assert_same_tokens(actual.sequences, expected.sequences, f"{variant} beam search")
    # length-normalised log-probabilities near zero: an absolute tolerance (logits themselves are held to 1e-5 relative)
    difference = float((actual.sequences_scores - expected.sequences_scores).abs().max())
    assert difference <= 1e-5, f"beam scores differ by {difference:.3e}"


@pytest.mark.parametrize("variant", ["t5-v1.0", "umt5"])
def test_beam_search_without_cache_identical(variant):
    """use_cache=False with beams over one encoder copy per input: the model's own cross-attention runs over keys of
    that copy (T5: the position bias joins the folded mask) or of the copies UMT5's forward sizes by the decoder batch
    (the mask repeated alike)."""
    vanilla, slim = pair(variant)
    expected = _generate(vanilla, num_beams=3, use_cache=False)
    actual = _generate(slim, num_beams=3, use_cache=False)
    assert_same_tokens(actual.sequences, expected.sequences, f"{variant} beams without a cache")
    assert_close_relative(actual.sequences_scores, expected.sequences_scores, 1e-5, "beam scores")


def test_beam_search_keeps_one_encoder_output_per_input():
    """Cross-attention sees the unexpanded encoder output (and its mask) whatever the number of beams."""
    vanilla, slim = pair("t5-v1.0")
    seen = {}
    for name, model in (("vanilla", vanilla), ("slim", slim)):
        shapes = seen.setdefault(name, set())
        cross = model.decoder.block[0].layer[1].EncDecAttention
        handle = cross.register_forward_pre_hook(
            lambda module, args, kwargs, shapes=shapes: shapes.add(kwargs["key_value_states"].shape[0]),
            with_kwargs=True,
        )
        try:
            _generate(model, "left", num_beams=4)
        finally:
            handle.remove()
    inputs = encoder_batch()["input_ids"].shape[0]
    assert seen == {"vanilla": {4 * inputs}, "slim": {inputs}}


@pytest.mark.oldest_transformers
@pytest.mark.parametrize("variant", ["t5-v1.0", "mt5"])
def test_seeded_sampling_identical(variant):
    vanilla, slim = pair(variant)
    torch.manual_seed(123)
    expected = _generate(vanilla, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    actual = _generate(slim, do_sample=True, top_k=20, temperature=0.9)
    assert_same_tokens(actual.sequences, expected.sequences, f"{variant} sampling")


class Text2TextPipeline(Pipeline):
    """What transformers' text2text-generation, summarization and translation pipelines did (removed in v5):
    prefix the text with the task, tokenize, ``generate``, decode without special tokens."""

    _pipeline_calls_generate = True

    def _sanitize_parameters(self, prefix: str | None = None, **generate_kwargs):
        return ({} if prefix is None else {"prefix": prefix}), generate_kwargs, {}

    def preprocess(self, text: str, prefix: str = "") -> dict:
        return self.tokenizer(prefix + text, return_tensors="pt")

    def _forward(self, model_inputs: dict, **generate_kwargs) -> dict:
        return {"output_ids": self.model.generate(**model_inputs, **generate_kwargs)}

    def postprocess(self, model_outputs: dict) -> list[dict]:
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"], skip_special_tokens=True)
        return [{"generated_text": text} for text in texts]


@pytest.mark.parametrize("task", ["text2text-generation", "summarization", "translation_en_to_de"])
def test_seq2seq_pipelines_identical(task):
    """transformers 5 has no text2text-generation, summarization or translation pipeline (``pipeline(task)`` raises
    KeyError: "Unknown task" in older releases, "has been removed" in newer ones); the same steps run through the
    Pipeline machinery (batching, padding collation) must give the same text for slim and unpatched."""
    with pytest.raises(KeyError, match="has been removed|Unknown task"):
        pipeline(task)
    prefix = {"summarization": "summarize: ", "translation_en_to_de": "translate English to German: "}.get(task, "")
    texts = [prompt.split(": ", 1)[-1] for prompt in PROMPTS]
    vanilla, slim = pair("t5-v1.0")
    outputs = {}
    for name, model in (("vanilla", vanilla), ("slim", slim)):
        runner = Text2TextPipeline(model=model, tokenizer=tiny_t5_tokenizer(), device="cpu")
        outputs[name] = runner(texts, prefix=prefix, batch_size=3, max_new_tokens=16, no_repeat_ngram_size=2)
    assert outputs["slim"] == outputs["vanilla"]
    assert any(item[0]["generated_text"].strip() for item in outputs["vanilla"]), "pipeline produced only empty text"


def t5_11b_config(**overrides) -> T5Config:
    """T5-11B (google-t5/t5-11b): d_model 1024, 128 heads x d_kv 128 = 16384, d_ff 65536, 24+24 layers, ReLU."""
    settings = dict(
        vocab_size=32128,
        d_model=1024,
        d_kv=128,
        num_heads=128,
        d_ff=65536,
        num_layers=24,
        num_decoder_layers=24,
        feed_forward_proj="relu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        dropout_rate=0.0,
    )
    settings.update(overrides)
    return T5Config(**settings)


def test_t5_11b_attention_shape_measured_cache_is_32x_smaller():
    """One encoder and one decoder layer at the real T5-11B attention shape (16384-wide q/k/v/o, ~0.8 GB fp32):
    the caches generate() returns, with the encoder output counted on both sides, and cache_report agree."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(0)
    config = t5_11b_config(vocab_size=len(tokenizer), d_ff=64, num_layers=1, num_decoder_layers=1)
    model = randomize_biases(T5ForConditionalGeneration(config)).eval()
    batch = encoder_batch()
    short = {**GENERATE, "max_new_tokens": 12}
    with torch.no_grad():
        encoder_bytes = model.get_encoder()(**batch).last_hidden_state.nbytes
        expected = model.generate(**batch, **short)
        slimify(model)
        actual = model.generate(**batch, **short)
    assert_same_tokens(actual.sequences, expected.sequences, "T5-11B shape greedy")
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"T5-11B shape logits step {step}")
    vanilla_bytes, slim_bytes = cache_nbytes(cache_of(expected)), cache_nbytes(cache_of(actual))
    ratio = (vanilla_bytes + encoder_bytes) / (slim_bytes + encoder_bytes)
    assert ratio >= 32, f"vanilla {vanilla_bytes} B + encoder {encoder_bytes} B vs slim {slim_bytes} B: {ratio:.2f}x"
    self_cache = cache_of(expected).self_attention_cache
    assert cache_nbytes(self_cache) == 32 * slim_bytes, "self-attention X must be 2*16384/1024 = 32x smaller than K+V"
    report = cache_report(
        model,
        batch_size=len(PROMPTS),
        seq_len=cache_of(actual).get_seq_length(),
        encoder_len=batch["input_ids"].shape[1],
        verbose=False,
    )
    assert (report.vanilla_bytes, report.slim_bytes, report.encoder_bytes) == (vanilla_bytes, slim_bytes, encoder_bytes)
    assert report.ratio_with_encoder == pytest.approx(ratio)


def test_t5_11b_full_config_report_on_meta_device():
    """The real 24-layer config is never allocated: cache_report reads shapes only (the model sits on meta)."""
    with torch.device("meta"):
        model = T5ForConditionalGeneration(t5_11b_config())
    report = cache_report(model, batch_size=1, seq_len=512, encoder_len=512, dtype=torch.bfloat16, verbose=False)
    self_layers = [layer for layer in report.layers if layer.mode == "input"]
    cross_layers = [layer for layer in report.layers if layer.mode == "encoder"]
    assert len(self_layers) == len(cross_layers) == 24
    assert all(layer.vanilla == 32 * layer.slim == 2 * 512 * 16384 * 2 for layer in self_layers)
    assert all(layer.slim == 0 for layer in cross_layers)
    assert report.encoder_bytes == 512 * 1024 * 2
    assert report.ratio == 64 and report.ratio_with_encoder >= 32, str(report)
    slimify(model)  # input mode touches no weight, so it works on meta too and the report follows the record
    assert cache_report(model, batch_size=1, seq_len=512, encoder_len=512, verbose=False).ratio == 64


#: greedy settings of the half-precision test: min_new_tokens keeps eos off the path, no_repeat_ngram_size varies it,
#: and the pad token (the decoder start) is suppressed: T5 has no absolute positions, so after the start token the
#: decoder cannot tell ``[pad]`` from ``[pad, pad]``, and a path beginning with pad could not be sharpened
HALF_GENERATE = dict(max_new_tokens=24, min_new_tokens=24, no_repeat_ngram_size=2, suppress_tokens=[0], do_sample=False)
#: mT5 is left out: it runs T5's attention code on the same tiny weights as t5-v1.1 (measured: the same smallest margin,
#: 32.9 bf16 steps, and slim-vs-unpatched difference, 1.57), so it would add 1.5 s and no check
HALF_CASES = [(v, torch.bfloat16) for v in ("t5-v1.0", "t5-v1.1", "umt5")]
HALF_CASES += [(v, torch.float16) for v in ("t5-v1.0", "t5-v1.1")]


@functools.cache
def _sharpened(variant: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The float32 tiny model of ``variant`` trained on its own greedy path (:func:`tiny_models.sharpen_greedy`), and
    that path: shared by the bf16 and fp16 cases (copy before use). ``initializer_factor=1``: with ``tiny_t5``'s 2 the
    logits are twice as large, and v1.1 takes the full 200 steps (4-5 s) to reach 27 of the 32 bf16 steps."""
    reference = tiny_t5(variant, initializer_factor=1.0)
    path, _ = sharpen_greedy(reference, encoder_batch(), HALF_GENERATE)
    return reference, path


@pytest.mark.parametrize(("variant", "dtype"), HALF_CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_half_precision_greedy_identical_and_as_accurate(variant, dtype):
    """Greedy tokens equal the unpatched model's in the same dtype, and teacher-forced decode logits are as close to
    the float32 model as the unpatched model's are.

    The two models round at different places (K = X W_K in bf16 vs scores from X in float32), so their logits differ
    by about one bf16 step. The random tiny models' closest greedy decisions are 0-0.9 bf16 steps apart,
    where strict identity would be luck; so the model is first trained on its own float32 greedy path until every
    token leads by 32 bf16 steps (:func:`tiny_models.sharpen_greedy`), and
    :func:`helpers.assert_bf16_greedy_identical` checks the margins (>= 16 bf16 steps, 128 fp16 steps), the tokens
    and the logit difference (see ``test_bart.test_bf16_greedy_identical_and_as_accurate``).
    """
    reference, path = _sharpened(variant)
    vanilla = copy.deepcopy(reference).to(dtype)
    slim = slimify(copy.deepcopy(vanilla))
    assert_bf16_greedy_identical(vanilla, slim, encoder_batch(), path, HALF_GENERATE, f"{variant} {dtype}")

    batch = encoder_batch()
    ids = torch.randint(3, reference.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = 0
    models = {"reference": reference, "vanilla": vanilla, "slim": slim}
    logits = {name: encoder_decoder_step_logits(model, batch, ids) for name, model in models.items()}
    assert_as_accurate_as_unpatched(logits, str(dtype))


def test_k_mode_falls_back_to_input_cache_when_projection_is_wider_than_d_model():
    """e = 64 > d_model = 32: W_K is not square, so no layer can rebuild V from K (and K would be 2x larger than X).
    slimify(mode="k") keeps the exact input cache on every layer and says why, per layer."""
    vanilla = tiny_t5("t5-v1.1")
    with pytest.warns(SlimFallbackWarning, match=r"square W_K, got \(32, 64\)"):
        slim = slimify(copy.deepcopy(vanilla), "k")
    assert set(slim_record(slim).layer_modes.values()) == {"input", "encoder"}
    expected, actual = _generate(vanilla), _generate(slim)
    assert_same_tokens(actual.sequences, expected.sequences, "k mode fallback greedy")


def test_k_mode_on_square_projection_matches():
    """d_model == heads * d_kv (t5-small/base/large): the K cache applies, with T5's position bias on decode."""
    vanilla = tiny_t5("t5-v1.0", d_kv=8)
    slim = slimify(copy.deepcopy(vanilla), "k")
    modes = slim_record(slim).layer_modes
    assert [modes[f"T5Attention[self {i}]"] for i in range(2)] == ["k", "k"], slim_record(slim).calibration
    expected, actual = _generate(vanilla), _generate(slim)
    assert_same_tokens(actual.sequences, expected.sequences, "k mode greedy")
    for step, (a, e) in enumerate(zip(actual.logits, expected.logits, strict=True)):
        assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"k mode logits step {step}")


def test_base_model_forward_creates_slim_cache():
    vanilla = T5Model(tiny_t5("t5-v1.0").config).eval()
    slim = slimify(copy.deepcopy(vanilla))
    batch = encoder_batch()
    ids = torch.randint(3, vanilla.config.vocab_size, (3, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_v = vanilla(**batch, decoder_input_ids=ids, use_cache=True)
        out_s = slim(**batch, decoder_input_ids=ids, use_cache=True)
        assert isinstance(cache_of(out_s).self_attention_cache, SlimCache)
        step = dict(**batch, decoder_input_ids=ids[:, :1])
        next_v = vanilla(**step, **with_cache(cache_of(out_v))).last_hidden_state
        next_s = slim(**step, **with_cache(cache_of(out_s))).last_hidden_state
    assert_close_relative(next_s, next_v, LOGITS_RTOL[torch.float32], "hidden states")


def test_unslimify_restores_exactly():
    vanilla = tiny_t5("t5-v1.1")
    model = copy.deepcopy(vanilla)
    before = snapshot(model)
    slimify(model)
    assert is_slim(model)
    _generate(model)
    unslimify(model)
    assert not is_slim(model)
    assert_unchanged(model, before)
    expected, actual = _generate(vanilla), _generate(model)
    assert_same_tokens(actual.sequences, expected.sequences)
    assert type(cache_of(actual).self_attention_cache) is DynamicCache


# --- static (preallocated) cache: greedy, beams, a compiled decode step ---


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_cache_generate_identical(variant):
    """``cache_implementation="static"``: the relative position bias spans every slot of the static cache, as in
    the unmodified model, and the prefill's attention reads the written slots only. Greedy and 3 beams over a
    right-padded batch: the tokens (and greedy scores) of the unpatched model with its own static cache."""
    vanilla, slim = pair(variant)
    for kwargs in (dict(), dict(num_beams=3)):
        expected = _generate(vanilla, cache_implementation="static", **kwargs)
        actual = _generate(slim, cache_implementation="static", **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"{variant} static {kwargs}")
        if not kwargs:
            logits = (torch.stack(out.logits) for out in (actual, expected))  # raw (scores hold no-repeat -inf)
            assert_close_relative(*logits, LOGITS_RTOL[torch.float32], f"{variant} static greedy logits")
        assert isinstance(cache_of(expected).self_attention_cache, transformers.StaticCache)
        assert all(isinstance(layer, StaticSlimLayer) for layer in cache_of(actual).self_attention_cache.layers)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["t5-v1.1", "umt5"])  # T5 / mT5 share one forward; UMT5 has its own
def test_static_decode_step_compiles_fullgraph(variant):
    """A decode step over a static slim cache traces as one graph; compiled = eager = the unpatched model's step."""
    if variant == "umt5" and Version(transformers.__version__) < Version("5.18"):
        pytest.skip(
            "transformers <= 5.17 builds UMT5's decoder self-attention with is_causal=False: the unpatched model's "
            "dynamic-cache prefill (the reference) attends to future tokens, a static one (no mask skip) does not"
        )
    vanilla, slim = pair(variant)
    batch = encoder_batch()
    encoder_outputs = slim.get_encoder()(**batch)
    ids = torch.randint(3, vanilla.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(2))
    caches = [slim_record(slim).new_cache(max_cache_len=16) for _ in range(2)]
    reference = EncoderDecoderCache(DynamicCache(), DynamicCache())
    common = dict(encoder_outputs=encoder_outputs, attention_mask=batch.attention_mask, use_cache=True)
    for cache, model in ((caches[0], slim), (caches[1], slim), (reference, vanilla)):
        model(**common, decoder_input_ids=ids[:, :5], **with_cache(cache))  # prefill, eager
    torch._dynamo.reset()  # fresh caches: every model's forward shares one transformers wrapper frame
    compiled = torch.compile(slim.forward, fullgraph=True, dynamic=False)
    step = dict(**common, decoder_input_ids=ids[:, 5:])
    eager = slim(**step, **with_cache(caches[0])).logits
    traced = compiled(**step, **with_cache(caches[1])).logits
    expected = vanilla(**step, **with_cache(reference)).logits
    assert_close_relative(traced, eager, 1e-5, f"{variant} compiled vs eager decode step")
    assert_close_relative(eager, expected, LOGITS_RTOL[torch.float32], f"{variant} static slim vs unpatched step")
