"""Moonshine through the K cache: decoder self-attention with interleaved partial RoPE (keys cached rotated),
cross-attention over the encoder output (no cross cache), slim vs unpatched on tiny random models."""

from __future__ import annotations

import copy

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
from tiny_encdec import audio_batch, tiny_moonshine
from transformers import DynamicCache, EncoderDecoderCache

from hf_slim import SlimCache, UnsupportedModelError, cache_nbytes, slim_record, slimify

GENERATION = {
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
    "static": dict(do_sample=False, cache_implementation="static"),
}


def pair(attn: str = "sdpa"):
    """(unpatched, slim) copies of the same random Moonshine; both decoder self-attentions on the K cache."""
    vanilla = tiny_moonshine(attn=attn)
    slim = slimify(copy.deepcopy(vanilla))
    modes = slim_record(slim).layer_modes
    assert sorted(modes.values()) == ["encoder", "encoder", "k", "k"], modes
    return vanilla, slim


def _generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(
            **audio_batch(), max_new_tokens=24, min_new_tokens=24, return_dict_in_generate=True, **kwargs
        )


@pytest.mark.parametrize("how", list(GENERATION))
def test_generation_identical(how):
    """Greedy, beams (one encoder output per input), seeded sampling and a static cache: the unpatched tokens, on a
    padded audio batch; the slim cache is the smaller one."""
    vanilla, slim = pair()
    torch.manual_seed(123)
    expected = _generate(vanilla, **GENERATION[how])
    torch.manual_seed(123)
    actual = _generate(slim, **GENERATION[how])
    assert_same_tokens(actual.sequences, expected.sequences, how)
    slim_cache = cache_of(actual).self_attention_cache
    assert isinstance(slim_cache, SlimCache)
    if how != "static":  # a static cache is sized by max_cache_len, not the tokens
        assert cache_nbytes(cache_of(actual)) < cache_nbytes(cache_of(expected))
    assert slim_cache.rotary.table is None, "fell back to storing the cos/sin table"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_and_decode_steps_match_logits(attn):
    """Prefill, then 30 random single tokens: fp32 logits at every step within the RoPE tolerance."""
    vanilla, slim = pair(attn)
    inputs = audio_batch()
    with torch.no_grad():
        encoder = vanilla.get_encoder()(**inputs)
        ids = torch.randint(3, 120, (2, 5), generator=torch.Generator().manual_seed(4))
        caches = {"vanilla": EncoderDecoderCache(DynamicCache(), DynamicCache()), "slim": SlimCache()}
        generator = torch.Generator().manual_seed(1)
        for step in range(31):
            common = dict(encoder_outputs=encoder, attention_mask=inputs["attention_mask"], decoder_input_ids=ids)
            expected = vanilla(**common, **with_cache(caches["vanilla"])).logits
            actual = slim(**common, **with_cache(caches["slim"])).logits
            assert_close_relative(actual, expected, LOGITS_RTOL[torch.float32], f"step {step}")
            ids = torch.randint(3, 120, (2, 1), generator=generator)


def test_mode_input_refused_and_auto_picks_k():
    model = tiny_moonshine()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="mode='input' cannot be used"):
        slimify(model, "input")
    assert_unchanged(model, before)
    assert sorted(set(slim_record(slimify(model, "auto")).layer_modes.values())) == ["encoder", "k"]


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(pad_head_dim_to_multiple_of=32), "pad_head_dim_to_multiple_of pads"),
        (dict(encoder_num_key_value_heads=2, decoder_num_key_value_heads=2), "grouped/multi-query attention"),
    ],
    ids=["pad_head_dim", "gqa"],
)
def test_refused_configs_leave_the_model_untouched(overrides, reason):
    model = tiny_moonshine(**overrides)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=reason):
        slimify(model)
    assert_unchanged(model, before)
