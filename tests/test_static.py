"""Static (preallocated) slim cache: same outputs as the dynamic one and as vanilla, and it compiles."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens, cache_of, with_cache
from tiny_models import tiny_gpt2, tiny_tokenizer
from transformers import StaticCache

from hf_slim import SlimCache, cache_nbytes, slimify
from hf_slim.cache_layers import StaticSlimLayer

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
    torch._dynamo.reset()  # fresh caches: every model's forward shares one transformers wrapper frame
    compiled = torch.compile(slim.forward, fullgraph=True, dynamic=False)
    step = dict(input_ids=ids[:, 5:], position_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 16))
    eager = slim(**step, **with_cache(caches[0])).logits
    traced = compiled(**step, **with_cache(caches[1])).logits
    assert_close_relative(traced, eager, 1e-5, "compiled vs eager decode step")


#: Where each patch module's static cache (``cache_implementation="static"`` or a preallocated ``SlimCache``) is
#: compared with the unpatched model: ``"file.py::test"``. A patch that serves static caches (no
#: ``static_cache_refusal``) must be listed, so a new family cannot claim one untested.
STATIC_CACHE_TESTS = {
    "hf_slim.patches.gpt2": "test_static.py::test_generate_with_static_cache_matches_vanilla",
    "hf_slim.patches.whisper": "test_whisper.py::test_static_slim_cache_matches_step_by_step",
    "hf_slim.patches.t5": "test_t5.py::test_static_cache_generate_identical",
    "hf_slim.patches.bart": "test_bart.py::test_static_cache_generate_identical",  # Florence-2: test_encoder_decoder
    "hf_slim.patches.trocr": "test_encoder_decoder.py::test_static_cache_generate_identical",
    "hf_slim.patches.encoder_decoder": "test_encoder_decoder.py::test_static_cache_generate_identical",
    "hf_slim.patches.opt": "test_decoders.py::test_static_cache_generate_matches_vanilla",
    "hf_slim.patches.gpt_neo": "test_decoders.py::test_static_cache_generate_matches_vanilla",
    "hf_slim.patches.bloom": "test_decoders.py::test_static_cache_generate_matches_vanilla",
    "hf_slim.patches.mpt": "test_decoders.py::test_static_cache_generate_matches_vanilla",
    "hf_slim.patches.falcon": "test_decoders.py::test_static_cache_generate_matches_vanilla",
    "hf_slim.patches.gpt_bigcode": "test_decoders.py::test_static_cache_generate_matches_vanilla",
    "hf_slim.patches.ctrl": "test_decoders.py::test_static_cache_generate_matches_vanilla",
    "hf_slim.patches.llama": "test_rope.py::test_static_cache_generate_matches",
    "hf_slim.patches.phi3": "test_rope.py::test_static_cache_generate_matches",
    "hf_slim.patches.phi": "test_rope.py::test_static_cache_generate_matches",
    "hf_slim.patches.gpt_neox": "test_rope.py::test_static_cache_generate_matches",  # persimmon too
    "hf_slim.patches.gptj": "test_rope.py::test_static_cache_generate_matches",
    "hf_slim.patches.codegen": "test_rope.py::test_static_cache_generate_matches",
    "hf_slim.patches.moonshine": "test_moonshine.py::test_generation_identical",  # its "static" case
}


def test_every_family_that_serves_a_static_cache_has_a_static_cache_test():
    from hf_slim.registry import SUPPORTED

    serving = {
        architecture.patch_module
        for architecture in SUPPORTED.values()
        if architecture.load().static_cache_refusal is None
    }
    assert serving == set(STATIC_CACHE_TESTS), f"untested: {sorted(serving - set(STATIC_CACHE_TESTS))}"
    for where in STATIC_CACHE_TESTS.values():
        file, test = where.split("::")
        assert callable(getattr(importlib.import_module(file.removesuffix(".py")), test, None)), f"{where} is gone"
