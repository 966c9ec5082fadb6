"""Static (preallocated) slim cache: same outputs as the dynamic one and as vanilla, and it compiles."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens, cache_of, with_cache
from tiny_models import tiny_gpt2, tiny_tokenizer
from transformers import StaticCache

from hf_slim import SlimCache, cache_nbytes, slimify
from hf_slim.cache import StaticSlimLayer

PROMPTS = ["the quick brown fox", "memory", "slim attention keeps one tensor"]


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3)], ids=["greedy", "beams"])
def test_generate_with_static_cache_matches_vanilla(kwargs):
    vanilla = tiny_gpt2()
    slim = slimify(copy.deepcopy(vanilla))
    batch = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    common = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    expected = vanilla.generate(**batch, **common, **kwargs)
    actual = slim.generate(**batch, **common, **kwargs)
    assert_same_tokens(actual.sequences, expected.sequences, "static cache generate")
    assert isinstance(cache_of(expected), StaticCache)
    assert all(isinstance(layer, StaticSlimLayer) for layer in cache_of(actual).layers)
    assert cache_nbytes(cache_of(expected)) == 2 * cache_nbytes(cache_of(actual))


def _decode(model, cache, steps: int = 6) -> list[torch.Tensor]:
    """Prefill 5 tokens then ``steps`` single-token steps with an explicit full-length mask, returning logits."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (2, 5 + steps), generator=generator)
    logits = [model(input_ids=ids[:, :5], **with_cache(cache)).logits]
    for position in range(5, 5 + steps):
        logits.append(
            model(
                input_ids=ids[:, position : position + 1],
                **with_cache(cache),
                position_ids=torch.tensor([[position]]).expand(2, 1),
                attention_mask=torch.ones(2, position + 1),
            ).logits
        )
    return logits


@torch.no_grad()
def test_static_and_dynamic_slim_caches_agree_step_by_step():
    vanilla = tiny_gpt2()
    slim = slimify(copy.deepcopy(vanilla))
    from transformers import DynamicCache

    expected = _decode(vanilla, DynamicCache())
    actual = _decode(slim, SlimCache(2, max_cache_len=16))
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"step {step}")


@torch.no_grad()
def test_decode_step_compiles_fullgraph():
    """The decode step with a static slim cache traces as one graph (what CUDA graphs need); compiled = eager."""
    slim = slimify(tiny_gpt2())
    ids = torch.randint(0, slim.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6))
    caches = [SlimCache(2, max_cache_len=16) for _ in range(2)]
    for cache in caches:
        slim(input_ids=ids[:, :5], **with_cache(cache))
    compiled = torch.compile(slim.forward, fullgraph=True, dynamic=False)
    step = dict(input_ids=ids[:, 5:], position_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 16))
    eager = slim(**step, **with_cache(caches[0])).logits
    traced = compiled(**step, **with_cache(caches[1])).logits
    assert_close_relative(traced, eager, 1e-5, "compiled vs eager decode step")
