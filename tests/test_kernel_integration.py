"""The slim models' decode path through the fused Triton kernel (in Triton's CPU interpreter here, on the GPU in a
CUDA run) gives the unpatched model's tokens: the kernel is wired with the right shapes, masks and layouts.

The models and inputs are built on the kernel's device (CUDA where there is one: the kernel refuses CPU tensors
outside the interpreter, which is only switched on without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_tokens
from tiny_models import tiny_gpt2, tiny_tokenizer

import hf_slim.decode
import hf_slim.kernels
from hf_slim import slimify
from hf_slim.kernels import triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason=f"no triton kernels on {DEVICE.type}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Route every decode step through the kernel (CPU tensors run in the interpreter) and count the calls."""
    calls = {"count": 0}
    monkeypatch.setattr(hf_slim.decode, "fused_kernel_enabled", lambda cache: True)
    original = hf_slim.kernels.slim_decode_attention

    def counting(*args, **kwargs):
        calls["count"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_slim.kernels, "slim_decode_attention", counting)
    return calls


@pytest.mark.parametrize("mode", ["input", "k"])
def test_gpt2_generate_through_kernel(kernel_calls, mode):
    vanilla = tiny_gpt2(n_layer=1).to(DEVICE)
    slim = slimify(copy.deepcopy(vanilla), mode)
    batch = tiny_tokenizer()(["the quick brown fox", "memory"], return_tensors="pt", padding=True).to(DEVICE)
    common = dict(max_new_tokens=6, do_sample=False)
    for kwargs in (dict(), dict(num_beams=2)):
        expected = vanilla.generate(**batch, **common, **kwargs)
        actual = slim.generate(**batch, **common, **kwargs)
        assert_same_tokens(actual, expected, f"kernel decode {kwargs}")
    assert kernel_calls["count"] >= 2 * 5, "decode steps did not go through the kernel"


@pytest.mark.parametrize("name", ["llama-dynamic", "olmo2"])
def test_rope_generate_through_kernel(kernel_calls, name):
    """RoPE K cache: the kernel scores against the rotated keys and mixes the un-rotated ones (its ``values``; OLMo-2:
    times each token's key scale, so the values are one column narrower than the cache ``[K_n | Z | s]``)."""
    from tiny_models import tiny_rope

    from hf_slim import slim_record

    vanilla = tiny_rope(name).to(DEVICE)
    slim = slimify(copy.deepcopy(vanilla))
    assert set(slim_record(slim).layer_modes.values()) == {"k"}
    batch = tiny_tokenizer()(["the quick brown fox", "memory"], return_tensors="pt", padding=True).to(DEVICE)
    common = dict(max_new_tokens=30, do_sample=False)  # past the original context (32) of the dynamic config
    for kwargs in (dict(), dict(num_beams=2)):
        expected = vanilla.generate(**batch, **common, **kwargs)
        actual = slim.generate(**batch, **common, **kwargs)
        assert_same_tokens(actual, expected, f"kernel decode {kwargs}")
    assert kernel_calls["count"] >= 2 * 2 * 29, "decode steps did not go through the kernel"
