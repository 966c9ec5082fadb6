"""Bad input gets a clear error, and a failed slimify leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, snapshot, with_cache
from tiny_models import tiny_gpt2
from transformers import BertConfig, BertModel, DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import hf_slim.patching
from hf_slim import SlimCache, UnsupportedModelError, cache_report, is_slim, slimify


def tiny_llama(kv_heads: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
    )
    return LlamaForCausalLM(config)


def test_gqa_model_is_refused_with_mha_explanation():
    with pytest.raises(UnsupportedModelError, match=r"needs multi-head attention.*num_key_value_heads"):
        slimify(tiny_llama(kv_heads=2))


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_cache_report_refuses_what_slimify_refuses(kv_heads):
    """cache_report on a GQA/MQA model reported 2.00x and mode 'k' per layer, a saving slimify never delivers: it now
    raises slimify's own error (as hf-slim memory does)."""
    model = tiny_llama(kv_heads=kv_heads)
    with pytest.raises(UnsupportedModelError) as refused:
        slimify(model)
    with pytest.raises(UnsupportedModelError) as reported:
        cache_report(model, 1, 16, verbose=False)
    assert str(reported.value) == str(refused.value) and "grouped/multi-query attention" in str(reported.value)


def test_cache_report_refuses_an_attention_implementation_slimify_refuses():
    model = tiny_llama(kv_heads=4)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flex_attention' is not supported"):
        cache_report(model, 1, 16, verbose=False)


def test_input_mode_on_rope_model_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"mode='input' cannot be used with 'llama'.*RoPE"):
        slimify(tiny_llama(kv_heads=4), mode="input")


def test_unsupported_architecture_lists_supported_ones():
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match=r"encoder-only.*Supported model types: .*bart, .*gpt2, .*whisper"):
        slimify(model)
    config = LlamaConfig()
    config.model_type = "made_up_arch"
    with pytest.raises(UnsupportedModelError, match=r"no patch for model type 'made_up_arch'. Supported"):
        hf_slim.registry.architecture_for(config, "auto")


def test_bad_mode_and_attention_implementation():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="mode must be one of"):
        slimify(model, mode="fast")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flex_attention' is not supported"):
        slimify(model)
    assert not is_slim(model)


def test_failure_half_way_leaves_model_unchanged(monkeypatch):
    model = tiny_gpt2()
    before = snapshot(model)
    calls = {"count": 0}
    original_apply = hf_slim.patching.InstancePatch.apply

    def failing_apply(self):
        calls["count"] += 1
        if calls["count"] == 5:
            raise RuntimeError("injected failure")
        original_apply(self)

    monkeypatch.setattr(hf_slim.patching.InstancePatch, "apply", failing_apply)
    with pytest.raises(RuntimeError, match="injected failure"):
        slimify(model, "k")
    assert calls["count"] == 5
    assert not is_slim(model)
    assert_unchanged(model, before)
    for module in model.modules():
        assert "forward" not in vars(module) and "hf_slim" not in vars(module)


def test_incompatible_cache_objects_are_refused():
    model = slimify(tiny_gpt2())
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with pytest.raises(TypeError, match=r"slimified but got a DynamicCache.*SlimCache"):
        model(ids, **with_cache(DynamicCache()))
    with pytest.raises(TypeError, match=r"generate\(\) got a DynamicCache as its cache"):
        model.generate(ids, **with_cache(DynamicCache()), max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="cache_implementation='quantized'"):
        model.generate(ids, cache_implementation="quantized", max_new_tokens=2)
    with pytest.raises(TypeError, match="SlimCache"):
        model.generate(ids, **with_cache(StaticCache(config=model.config, max_cache_len=16)), max_new_tokens=2)
    with pytest.raises(TypeError, match="only be used by a model patched"):
        SlimCache().update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0)
