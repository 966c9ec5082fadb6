"""Decoder-only MHA families (OPT, XGLM, BioGPT, GPT-Neo, BLOOM, MPT, Falcon-RW): slim vs unpatched, table-driven.

Every case is a tiny random model (random biases and norms) of one family and attention implementation; each test
compares the slim model with an unpatched copy of the same weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens, relative_difference
from tiny_models import DECODER_CONFIGS, tiny_decoder, tiny_tokenizer
from transformers import DynamicCache

from hf_slim import SlimCache, SlimFallbackWarning, cache_nbytes, cache_report, slim_record, slimify, unslimify
from hf_slim.cache import StaticSlimLayer

#: attention implementations each family supports in transformers 5.23.0 (the others refuse sdpa at load time)
IMPLEMENTATIONS = {
    "opt": ("eager", "sdpa"),
    "opt-350m": ("eager", "sdpa"),
    "xglm": ("eager",),
    "biogpt": ("eager", "sdpa"),
    "gpt_neo": ("eager",),
    "bloom": ("eager",),
    "bloom-6-heads": ("eager",),
    "mpt": ("eager",),
    "falcon": ("eager", "sdpa"),
}
CASES = [(name, attn) for name in DECODER_CONFIGS for attn in IMPLEMENTATIONS[name]]
NAMES = list(DECODER_CONFIGS)
#: families whose unpatched model cannot generate with a static cache in transformers 5.23.0 (GPT-Neo's local layers
#: index their window by key length, which a static cache makes max_cache_len; Falcon fails outright), so the slim
#: model refuses one with a clear error instead of inventing a behaviour to compare against
NO_STATIC = {"gpt_neo", "falcon"}
PROMPTS = ["the quick brown fox", "slim attention keeps one tensor per token instead of", "memory"]
DECODE_STEPS = 24


def pair(name: str, mode: str = "input", attn: str = "eager", **kwargs):
    """(unpatched, slim) copies of the same random model. The K mode may keep the input cache on layers whose
    calibration refuses it (a random W_K can be ill-conditioned) but must hold on at least one layer."""
    vanilla = tiny_decoder(name, attn=attn, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlimFallbackWarning)
        slim = slimify(copy.deepcopy(vanilla), mode)
    modes = slim_record(slim).layer_modes.values()
    assert mode in modes and set(modes) <= {mode, "input"}, f"layer modes {slim_record(slim).layer_modes}"
    return vanilla, slim


def padded_batch():
    return tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("mode", ["input", "k"])
@pytest.mark.parametrize(("name", "attn"), CASES)
def test_prefill_and_decode_steps_match_logits(name, attn, mode):
    """Left-padded prefill then 24 single-token steps: logits within 1e-5 relative at every step."""
    vanilla, slim = pair(name, mode, attn)
    batch = padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    caches = {"vanilla": DynamicCache(), "slim": SlimCache()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(DECODE_STEPS + 1):
            out_vanilla = vanilla(input_ids=ids, attention_mask=mask, past_key_values=caches["vanilla"])
            out_slim = slim(input_ids=ids, attention_mask=mask, past_key_values=caches["slim"])
            assert_close_relative(out_slim.logits, out_vanilla.logits, LOGITS_RTOL[torch.float32], f"step {step}")
            ids = torch.randint(0, vanilla.config.vocab_size, (ids.shape[0], 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    assert caches["slim"].get_seq_length() == caches["vanilla"].get_seq_length()
    assert caches["slim"].get_seq_length() == batch["input_ids"].shape[1] + DECODE_STEPS


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_chunked_prefill_matches(name, attn):
    """Chunks larger than head_dim rebuild K/V from the slim tensor; small chunks use the absorbed path."""
    vanilla, slim = pair(name, attn=attn)
    head_dim = 16
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = vanilla(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        cache, pieces, start = SlimCache(), [], 0
        for size in (10, head_dim + 9, 3, 1, 60 - 10 - head_dim - 9 - 3 - 1):
            mask = torch.ones(2, start + size, dtype=torch.long)
            out = slim(input_ids=ids[:, start : start + size], attention_mask=mask, past_key_values=cache)
            pieces.append(out.logits)
            start += size
    assert_close_relative(torch.cat(pieces, dim=1), full, LOGITS_RTOL[torch.float32], "chunked prefill")


@pytest.mark.parametrize("name", NAMES)
def test_without_attention_mask(name):
    """No mask at all (the model builds causal masks and ALiBi from cache lengths): prefill, two single steps, a
    chunk."""
    vanilla, slim = pair(name)
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    caches = {"vanilla": DynamicCache(), "slim": SlimCache()}
    with torch.no_grad():
        for start, stop in ((0, 12), (12, 13), (13, 14), (14, 30)):
            expected = vanilla(input_ids=ids[:, start:stop], past_key_values=caches["vanilla"]).logits
            actual = slim(input_ids=ids[:, start:stop], past_key_values=caches["slim"]).logits
            assert_close_relative(actual, expected, LOGITS_RTOL[torch.float32], f"tokens {start}:{stop}")


GENERATIONS = {
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
}


def _generate(model, **kwargs):
    torch.manual_seed(123)
    with torch.no_grad():
        return model.generate(
            **padded_batch(), max_new_tokens=20, return_dict_in_generate=True, output_scores=True, **kwargs
        )


@pytest.mark.parametrize("kind", list(GENERATIONS))
@pytest.mark.parametrize(("name", "attn"), CASES)
def test_generate_identical_tokens(name, attn, kind):
    """Greedy, beam search with num_return_sequences=2 and seeded sampling on a left-padded batch."""
    vanilla, slim = pair(name, attn=attn)
    expected, actual = _generate(vanilla, **GENERATIONS[kind]), _generate(slim, **GENERATIONS[kind])
    assert_same_tokens(actual.sequences, expected.sequences, kind)
    assert isinstance(actual.past_key_values, SlimCache)
    if kind == "beams":
        assert_close_relative(actual.sequences_scores, expected.sequences_scores, 1e-5, "beam scores")


@pytest.mark.parametrize("name", [name for name in NAMES if DECODER_CONFIGS[name][0] not in NO_STATIC])
def test_static_cache_generate_matches_vanilla(name):
    vanilla, slim = pair(name)
    common = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    for kwargs in (dict(), dict(num_beams=3)):
        expected = vanilla.generate(**padded_batch(), **common, **kwargs)
        actual = slim.generate(**padded_batch(), **common, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"static cache {kwargs}")
        assert all(isinstance(layer, StaticSlimLayer) for layer in actual.past_key_values.layers)


@pytest.mark.parametrize("name", sorted({DECODER_CONFIGS[name][0] for name in NAMES} & NO_STATIC))
def test_static_cache_refused_where_transformers_has_none(name):
    _, slim = pair(name)
    with pytest.raises(NotImplementedError, match="static"):
        slim.generate(**padded_batch(), max_new_tokens=4, do_sample=False, cache_implementation="static")


@pytest.mark.parametrize("name", NAMES)
def test_bf16_greedy_identical(name):
    vanilla = tiny_decoder(name, dtype=torch.bfloat16)
    slim = slimify(copy.deepcopy(vanilla), "input")
    expected, actual = _generate(vanilla, do_sample=False), _generate(slim, do_sample=False)
    assert_same_tokens(actual.sequences, expected.sequences, "bf16 greedy")


@pytest.mark.parametrize("name", NAMES)
def test_bf16_logit_error_is_the_unpatched_models_own(name):
    """bf16 decode along the fp32 greedy path: the slim model's logit error against the fp32 model is at most twice
    the unpatched bf16 model's own (the absorbed path accumulates in fp32, so it is usually smaller)."""
    reference, vanilla = tiny_decoder(name), tiny_decoder(name, dtype=torch.bfloat16)
    slim = slimify(copy.deepcopy(vanilla), "input")
    batch = padded_batch()
    with torch.no_grad():
        sequence = reference.generate(**batch, max_new_tokens=20, do_sample=False)
    prompt = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(sequence[:, prompt:])], dim=1)
    errors = {"vanilla": [], "slim": []}
    caches = [DynamicCache(), DynamicCache(), SlimCache()]
    with torch.no_grad():
        for step in range(sequence.shape[1] - prompt):
            piece = slice(0, prompt) if step == 0 else slice(prompt + step - 1, prompt + step)
            logits = [
                model(input_ids=sequence[:, piece], attention_mask=mask[:, : piece.stop], past_key_values=cache)
                .logits[:, -1]
                .float()
                for model, cache in zip((reference, vanilla, slim), caches, strict=True)
            ]
            errors["vanilla"].append(relative_difference(logits[1], logits[0]))
            errors["slim"].append(relative_difference(logits[2], logits[0]))
    assert max(errors["slim"]) <= 2 * max(errors["vanilla"]), f"bf16 relative errors vs fp32: {errors}"


@pytest.mark.parametrize("name", NAMES)
def test_cache_bytes_half_and_report_agrees(name):
    vanilla, slim = pair(name)
    with torch.no_grad():
        expected, actual = (model(**padded_batch(), use_cache=True).past_key_values for model in (vanilla, slim))
    assert isinstance(actual, SlimCache)
    vanilla_bytes, slim_bytes = cache_nbytes(expected), cache_nbytes(actual)
    assert vanilla_bytes == 2 * slim_bytes, f"vanilla {vanilla_bytes} B, slim {slim_bytes} B"
    tokens = actual.get_seq_length()
    report = cache_report(slim, batch_size=len(PROMPTS), seq_len=tokens, verbose=False)
    assert (report.vanilla_bytes, report.slim_bytes) == (vanilla_bytes, slim_bytes)


@pytest.mark.parametrize("name", NAMES)
def test_unslimify_restores_original_generation(name):
    vanilla, slim = pair(name)
    unslimify(slim)
    expected, actual = _generate(vanilla, do_sample=False), _generate(slim, do_sample=False)
    assert_same_tokens(actual.sequences, expected.sequences)
    assert type(actual.past_key_values) is type(expected.past_key_values)


def _first_decode_step_difference(name: str) -> float:
    """Relative logit difference, slim vs unpatched, at the first absorbed decode step after a left-padded prefill."""
    vanilla, slim = pair(name)
    batch = padded_batch()
    generator = torch.Generator().manual_seed(7)
    next_ids = torch.randint(0, vanilla.config.vocab_size, (len(PROMPTS), 1), generator=generator)
    step = dict(input_ids=next_ids, attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(next_ids)], 1))
    logits = []
    with torch.no_grad():
        for model, cache in ((vanilla, DynamicCache()), (slim, SlimCache())):
            model(**batch, past_key_values=cache)
            logits.append(model(**step, past_key_values=cache).logits)
    return relative_difference(logits[1], logits[0])


@pytest.mark.parametrize("name", ["opt", "xglm", "biogpt", "bloom", "falcon"])
def test_a_dropped_value_bias_is_caught(name, monkeypatch):
    """The equivalence check can fail: dropping the value bias on the absorbed path moves decode logits far beyond
    the tolerance (the tiny models' biases are random, not zero)."""
    import hf_slim.attention as attention

    assert _first_decode_step_difference(name) <= LOGITS_RTOL[torch.float32]
    project_heads = attention.project_heads
    monkeypatch.setattr(attention, "project_heads", lambda mixed, w_v, b_v=None, low_rank=(): project_heads(mixed, w_v))
    assert _first_decode_step_difference(name) > 1e-3


@pytest.mark.parametrize("name", ["gpt_neo", "bloom", "mpt", "falcon"])
def test_a_dropped_position_term_is_caught(name, monkeypatch):
    """The equivalence check can fail: without its position term on the absorbed path (GPT-Neo's local window,
    BLOOM/MPT ALiBi, Falcon eager's second ALiBi copy) the first decode step is far off."""
    import importlib

    patch_module = importlib.import_module(f"hf_slim.patches.{name}")
    original = patch_module.slim_self_attention

    def without_position_bias(*args, position_bias=None, **kwargs):
        assert position_bias is not None, "test setup: this family passes a position term"
        return original(*args, **kwargs)

    assert _first_decode_step_difference(name) <= LOGITS_RTOL[torch.float32]
    monkeypatch.setattr(patch_module, "slim_self_attention", without_position_bias)
    assert _first_decode_step_difference(name) > 1e-3


REFUSED_CONFIGS = {
    "mpt clip_qkv": ("mpt", dict(attn_config=dict(clip_qkv=6.0)), "clip_qkv clamps"),
    "falcon multi-query": ("falcon", dict(multi_query=True), "multi_query=True"),
    "falcon RoPE": ("falcon", dict(alibi=False), "alibi=False means RoPE"),
    "falcon new architecture": (
        "falcon", dict(new_decoder_architecture=True, num_kv_heads=2), "new_decoder_architecture=True"
    ),
    "xglm as a cross-attention decoder": ("xglm", dict(add_cross_attention=True), "add_cross_attention"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_refused_configs_name_the_reason_and_leave_the_model_untouched(case):
    from helpers import assert_unchanged, snapshot

    from hf_slim import UnsupportedModelError

    name, overrides, reason = REFUSED_CONFIGS[case]
    model = tiny_decoder(name, **overrides)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=reason):
        slimify(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_slim_model_survives_deepcopy_and_pickle(name):
    """Everything slimify installs is plain data or a PatchedMethod: a deep copy and a pickled copy are slim models
    that act on their own weights."""
    import io

    vanilla, slim = pair(name)
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    buffer.seek(0)
    copies = {"deepcopy": copy.deepcopy(slim), "pickle": torch.load(buffer, weights_only=False)}
    expected = _generate(vanilla, do_sample=False)
    for how, model in copies.items():
        attention = model.get_submodule(_first_attention(model))
        assert attention.forward.owner is attention, f"{how}: the patched forward acts on the original"
        actual = _generate(model, do_sample=False)
        assert_same_tokens(actual.sequences, expected.sequences, how)
        assert isinstance(actual.past_key_values, SlimCache), how


def _first_attention(model) -> str:
    return next(name for name, module in model.named_modules() if "hf_slim" in vars(module))


@pytest.mark.parametrize("name", ["opt", "gpt_neo", "bloom", "mpt", "falcon"])
def test_text_generation_pipeline_identical(name):
    from transformers import pipeline

    vanilla, slim = pair(name)
    texts = {}
    for label, model in (("vanilla", vanilla), ("slim", slim)):
        generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer(), device="cpu")
        texts[label] = generator(PROMPTS, max_new_tokens=12, do_sample=False, batch_size=3)
    assert texts["slim"] == texts["vanilla"]
