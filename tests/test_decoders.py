"""Decoder-only MHA families (OPT, XGLM, BioGPT, GPT-Neo, BLOOM, MPT, Falcon-RW, GPTBigCode, CTRL): slim vs
unpatched, table-driven.

Every case is a tiny random model (random biases and norms) of one family and attention implementation; each test
compares the slim model with an unpatched copy of the same weights.
"""

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
    cache_of,
    relative_difference,
    with_cache,
)
from tiny_models import DECODER_CONFIGS, sharpen_greedy, tiny_decoder, tiny_tokenizer
from transformers import DynamicCache

from hf_slim import SlimCache, SlimFallbackWarning, cache_nbytes, cache_report, slim_record, slimify, unslimify
from hf_slim.cache_layers import StaticSlimLayer

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
    "gpt_bigcode": ("eager", "sdpa"),
    "ctrl": ("eager", "sdpa"),
}
CASES = [(name, attn) for name in DECODER_CONFIGS for attn in IMPLEMENTATIONS[name]]
NAMES = list(DECODER_CONFIGS)
#: families whose unpatched model has no working static cache in transformers 5.23.0: GPT-Neo's local layers slice their
#: window rows by key length, which a static cache makes max_cache_len; Falcon builds ALiBi from a 2-D mask and
#: generate() hands a static cache a 4-D one (ValueError). transformers' static output cannot be the reference there,
#: so the static tests compare every family with the unpatched model's default (dynamic) cache
VANILLA_STATIC_BROKEN = {"gpt_neo", "falcon"}
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
            out_vanilla = vanilla(input_ids=ids, attention_mask=mask, **with_cache(caches["vanilla"]))
            out_slim = slim(input_ids=ids, attention_mask=mask, **with_cache(caches["slim"]))
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
            out = slim(input_ids=ids[:, start : start + size], attention_mask=mask, **with_cache(cache))
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
            expected = vanilla(input_ids=ids[:, start:stop], **with_cache(caches["vanilla"])).logits
            actual = slim(input_ids=ids[:, start:stop], **with_cache(caches["slim"])).logits
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
    assert isinstance(cache_of(actual), SlimCache)
    if kind == "beams":
        assert_close_relative(actual.sequences_scores, expected.sequences_scores, 1e-5, "beam scores")


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_static_cache_generate_matches_vanilla(name, attn):
    """Greedy and 3 beams on a left-padded batch with a static slim cache: the tokens (and greedy scores) of the
    unpatched model with its default dynamic cache, and of the slim dynamic cache. The reference is the dynamic cache
    because transformers' own static cache is broken for GPT-Neo and Falcon (:data:`VANILLA_STATIC_BROKEN`); where it
    works, its tokens must be the same too. GPT-Neo's window (8) is crossed by every prompt (27 slots with padding)
    and by the 12 new tokens (the last one is not cached), in a cache of 38 slots."""
    vanilla, slim = pair(name, attn=attn)
    common = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    static = dict(cache_implementation="static")
    for kwargs in (dict(), dict(num_beams=3)):
        expected = vanilla.generate(**padded_batch(), **common, **kwargs)
        actual = slim.generate(**padded_batch(), **common, **kwargs, **static)
        assert_same_tokens(actual.sequences, expected.sequences, f"static slim vs dynamic vanilla {kwargs}")
        if not kwargs:
            scores = (torch.stack(out.scores) for out in (actual, expected))
            assert_close_relative(*scores, LOGITS_RTOL[torch.float32], "static slim vs dynamic vanilla scores")
        dynamic = slim.generate(**padded_batch(), **common, **kwargs)
        assert_same_tokens(actual.sequences, dynamic.sequences, f"static vs dynamic slim {kwargs}")
        if DECODER_CONFIGS[name][0] not in VANILLA_STATIC_BROKEN:
            vanilla_static = vanilla.generate(**padded_batch(), **common, **kwargs, **static)
            assert_same_tokens(actual.sequences, vanilla_static.sequences, f"static slim vs static vanilla {kwargs}")
        assert all(isinstance(layer, StaticSlimLayer) for layer in cache_of(actual).layers)


@pytest.mark.parametrize("name", sorted(VANILLA_STATIC_BROKEN))
def test_transformers_static_cache_is_still_not_a_reference(name):
    """Why the static tests compare with the dynamic cache: transformers' static cache gives other tokens (GPT-Neo)
    or fails (Falcon). If this fails, transformers fixed it: compare with it too (drop it from
    :data:`VANILLA_STATIC_BROKEN`)."""
    vanilla = tiny_decoder(name)
    common = dict(max_new_tokens=12, do_sample=False)
    try:
        static = vanilla.generate(**padded_batch(), **common, cache_implementation="static")
    except ValueError:
        return
    assert not torch.equal(static, vanilla.generate(**padded_batch(), **common)), "transformers' static cache works"


#: families that build ALiBi from the 2-D mask: with a static cache it has one column per cache slot (generate() pads
#: it so, through BloomForCausalLM.create_masks_for_generate and the slim Falcon's own); the others take it as long as
#: the tokens so far (OPT derives its positions from it)
SLOT_MASKED = {"bloom", "falcon"}


def _static_mask(name: str, batch: int, written: int, slots: int) -> torch.Tensor:
    """The 2-D mask a forward over a static cache of ``slots`` slots takes when ``written`` are filled: ``(batch,
    slots)`` with zeros past ``written`` for :data:`SLOT_MASKED` families, else ``(batch, written)`` ones."""
    mask = torch.ones(batch, written, dtype=torch.long)
    if DECODER_CONFIGS[name][0] in SLOT_MASKED:
        mask = torch.cat([mask, torch.zeros(batch, slots - written, dtype=torch.long)], dim=1)
    return mask


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_chunked_prefill_into_static_cache_matches(name, attn):
    """Chunks into a static cache: more than head_dim new tokens run the model's own attention over the written slots
    of the rebuilt K/V (GPT-Neo's window rows, ALiBi by key length), small chunks the absorbed path; logits as the
    unpatched model's over the whole sequence."""
    vanilla, slim = pair(name, attn=attn)
    head_dim, slots = 16, 64
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = vanilla(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        cache, pieces, start = SlimCache(slim_record(slim).num_cache_layers, max_cache_len=slots), [], 0
        for size in (10, head_dim + 9, 3, 1, 60 - 10 - head_dim - 9 - 3 - 1):
            mask = _static_mask(name, 2, start + size, slots)
            out = slim(input_ids=ids[:, start : start + size], attention_mask=mask, **with_cache(cache))
            pieces.append(out.logits)
            start += size
    assert_close_relative(torch.cat(pieces, dim=1), full, LOGITS_RTOL[torch.float32], "chunked prefill, static cache")


@pytest.mark.parametrize(("name", "attn"), [("gpt_neo", "eager"), ("falcon", "eager"), ("falcon", "sdpa")])
@torch.no_grad()
def test_static_decode_step_compiles_fullgraph(name, attn):
    """A decode step past GPT-Neo's window (Falcon: ALiBi from the slot mask) traces as one graph; compiled = eager =
    the unpatched model with a dynamic cache."""
    vanilla, slim = pair(name, attn=attn)
    ids = torch.randint(0, slim.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(6))
    expected = vanilla(input_ids=ids).logits[:, 12:]
    caches = [SlimCache(2, max_cache_len=16) for _ in range(2)]
    for cache in caches:
        slim(input_ids=ids[:, :12], attention_mask=_static_mask(name, 1, 12, 16), **with_cache(cache))
    torch._dynamo.reset()  # fresh caches: every model's forward shares one transformers wrapper frame
    compiled = torch.compile(slim.forward, fullgraph=True, dynamic=False)
    step = dict(input_ids=ids[:, 12:], position_ids=torch.tensor([[12]]), attention_mask=_static_mask(name, 1, 13, 16))
    eager = slim(**step, **with_cache(caches[0])).logits
    traced = compiled(**step, **with_cache(caches[1])).logits
    assert_close_relative(eager, expected, LOGITS_RTOL[torch.float32], "eager static slim vs vanilla decode step")
    assert_close_relative(traced, eager, 1e-5, "compiled vs eager decode step")


def test_falcon_static_mask_hook_follows_copies_and_is_undone():
    """The per-instance ``create_masks_for_generate`` of a slim Falcon acts on a deep or pickled copy itself, and
    unslimify removes it (the unpatched model's static cache fails again, as transformers' does)."""
    import io

    vanilla, slim = pair("falcon")
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    buffer.seek(0)
    expected = vanilla.generate(**padded_batch(), max_new_tokens=6, do_sample=False)
    for model in (copy.deepcopy(slim), torch.load(buffer, weights_only=False)):
        assert model.create_masks_for_generate.owner is model
        actual = model.generate(**padded_batch(), max_new_tokens=6, do_sample=False, cache_implementation="static")
        assert_same_tokens(actual, expected, "static cache on a copy")
    unslimify(slim)
    assert "create_masks_for_generate" not in vars(slim)
    with pytest.raises(ValueError):
        slim.generate(**padded_batch(), max_new_tokens=6, do_sample=False, cache_implementation="static")


def test_a_static_cache_refusal_is_a_clear_error():
    """A patch module's ``STATIC_CACHE_REFUSAL`` (none declares one now) makes generate() refuse a static cache."""
    _, slim = pair("opt")
    slim_record(slim).static_cache_refusal = "no static cache for this family"
    with pytest.raises(NotImplementedError, match="cache_implementation='static': no static cache for this family"):
        slim.generate(**padded_batch(), max_new_tokens=4, do_sample=False, cache_implementation="static")


#: greedy settings of the bf16 test: min_new_tokens keeps eos (= pad) off the path, no_repeat_ngram_size keeps it varied
BF16_GENERATE = dict(max_new_tokens=20, min_new_tokens=20, no_repeat_ngram_size=2, do_sample=False)
#: families whose unpatched bf16 logits are off float32 by more than rounding on the sharpened path (BLOOM adds its
#: ALiBi to the scores in bf16: up to 15 bf16 steps off, where the slim model's are within 2), so the slim-vs-unpatched
#: logit bound adds the unpatched model's own error (see :func:`helpers.assert_bf16_greedy_identical`)
BF16_IMPRECISE_VANILLA = {"bloom"}


@pytest.mark.parametrize("name", NAMES)
def test_bf16_greedy_identical_and_as_accurate(name):
    """bf16 greedy tokens (left-padded batch, 20 new tokens) are identical to the unpatched bf16 model's, and decode
    logits along that path are as close to the float32 model as the unpatched bf16 model's are.

    The two bf16 models round at different places (slim scores from the cached X in float32, unpatched from bf16
    K/V), so their logits differ by about one bf16 step. The random tiny models' closest greedy decisions on this
    path are 0-1.6 steps apart (every family), where strict identity would be luck; so the model is first
    trained on its own float32 greedy path until every token leads by 32 steps (:func:`tiny_models.sharpen_greedy`),
    and :func:`helpers.assert_bf16_greedy_identical` checks the margins (>= 16 steps), the tokens and the logit
    difference. Then, teacher-forced along the path (prefill, then one token per step), the slim model's relative
    logit error against float32 is at most twice the unpatched bf16 model's (the absorbed path accumulates in
    float32, so it is usually smaller).
    """
    reference, batch = tiny_decoder(name), padded_batch()
    path, _ = sharpen_greedy(reference, batch, BF16_GENERATE)  # (3, prompt + 20)
    vanilla = copy.deepcopy(reference).to(torch.bfloat16)
    slim = slimify(copy.deepcopy(vanilla), "input")
    imprecise = DECODER_CONFIGS[name][0] in BF16_IMPRECISE_VANILLA
    assert_bf16_greedy_identical(vanilla, slim, batch, path, BF16_GENERATE, name, reference if imprecise else None)

    prompt = batch["input_ids"].shape[1]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(path[:, prompt:])], dim=1)
    errors = {"vanilla": [], "slim": []}
    caches = [DynamicCache(), DynamicCache(), SlimCache()]
    with torch.no_grad():
        for step in range(path.shape[1] - prompt):
            piece = slice(0, prompt) if step == 0 else slice(prompt + step - 1, prompt + step)
            logits = [
                model(input_ids=path[:, piece], attention_mask=mask[:, : piece.stop], **with_cache(cache))
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
        expected, actual = (cache_of(model(**padded_batch(), use_cache=True)) for model in (vanilla, slim))
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
    assert type(cache_of(actual)) is type(cache_of(expected))


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
            model(**batch, **with_cache(cache))
            logits.append(model(**step, **with_cache(cache)).logits)
    return relative_difference(logits[1], logits[0])


@pytest.mark.parametrize("name", ["opt", "xglm", "biogpt", "bloom", "falcon", "gpt_bigcode", "ctrl"])
def test_a_dropped_value_bias_is_caught(name, monkeypatch):
    """The equivalence check can fail: dropping the value bias on the absorbed path moves decode logits far beyond
    the tolerance (the tiny models' biases are random, not zero)."""
    import hf_slim.decode as decode

    assert _first_decode_step_difference(name) <= LOGITS_RTOL[torch.float32]
    project_heads = decode.project_heads
    monkeypatch.setattr(decode, "project_heads", lambda mixed, w_v, b_v=None, low_rank=(): project_heads(mixed, w_v))
    assert _first_decode_step_difference(name) > 1e-3


@pytest.mark.parametrize("name", ["gpt_neo", "bloom", "mpt", "falcon"])
def test_a_dropped_position_term_is_caught(name, monkeypatch):
    """The equivalence check can fail: without its position term on the absorbed path the first decode step is far
    off. Where the layer adds it (GPT-Neo's local window, BLOOM/MPT ALiBi, Falcon eager's second ALiBi copy up to
    5.24: :meth:`ScoreBias.term`), the term is dropped; where the mask carries it (Falcon from 5.25), the decode keeps
    only the mask's visibility pattern."""
    from hf_slim.patches import falcon

    import hf_slim.decode as decode
    from hf_slim.bias import ScoreBias

    assert _first_decode_step_difference(name) <= LOGITS_RTOL[torch.float32]
    if name == "falcon" and falcon.ROUTED:
        bias_for_decode = decode._bias_for_decode

        def visibility_only(*args, **kwargs):
            bias = bias_for_decode(*args, **kwargs)
            return torch.where(bias > torch.finfo(bias.dtype).min / 2, 0.0, torch.finfo(bias.dtype).min)

        monkeypatch.setattr(decode, "_bias_for_decode", visibility_only)
    else:
        monkeypatch.setattr(ScoreBias, "term", lambda self, module, value=None: None)
    assert _first_decode_step_difference(name) > 1e-3


REFUSED_CONFIGS = {
    "mpt clip_qkv": ("mpt", dict(attn_config=dict(clip_qkv=6.0)), "clip_qkv clamps"),
    "falcon multi-query": ("falcon", dict(multi_query=True), "multi_query=True"),
    "falcon RoPE": ("falcon", dict(alibi=False), "alibi=False means RoPE"),
    "falcon new architecture": (
        "falcon", dict(new_decoder_architecture=True, num_kv_heads=2), "new_decoder_architecture=True"
    ),
    "xglm as a cross-attention decoder": ("xglm", dict(add_cross_attention=True), "add_cross_attention"),
    "gpt_bigcode multi-query": ("gpt_bigcode", dict(multi_query=True), "multi-query attention"),
    "gpt_bigcode as a cross-attention decoder": (
        "gpt_bigcode", dict(add_cross_attention=True), "add_cross_attention"
    ),
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
        assert isinstance(cache_of(actual), SlimCache), how


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
