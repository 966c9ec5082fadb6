"""accelerate device maps: slimify and load_slim on models whose layers are split between CPU and disk offload.

With disk offload, accelerate keeps a layer's weights on the meta device at rest and its hooks load them just around
each submodule's own forward. slimify must compute W_KV and the K-mode calibration from the real weights, and the
patched forwards must read real projection weights at every step; outputs must equal the same dispatched model's
without slimify.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens
from test_export import ARCHITECTURES, one_thread  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

from hf_slim import is_slim, load_slim, slim_record, slimify, unslimify
from hf_slim.patching import resident_weights

pytestmark = pytest.mark.oldest_transformers  # CI also runs these with the lowest accelerate (see .ci/run)

#: every top-level piece on "cpu", the last decoder layer on "disk" (weights on meta at rest, loaded per forward)
DEVICE_MAPS = {
    "gpt2": {
        "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
        "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu",
    },
    "whisper": {
        "model.encoder": "cpu", "model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
        "model.decoder.layers.0": "cpu", "model.decoder.layers.1": "disk", "model.decoder.layer_norm": "cpu",
        "proj_out": "cpu",
    },
    "t5": {
        "shared": "cpu", "encoder": "cpu", "decoder.embed_tokens": "cpu", "decoder.block.0": "cpu",
        "decoder.block.1": "disk", "decoder.final_layer_norm": "cpu", "decoder.dropout": "cpu", "lm_head": "cpu",
    },
}  # fmt: skip
#: the attention module whose weights sit on disk, and one of its offloaded weights
OFFLOADED = {
    "gpt2": ("transformer.h.1.attn", "c_attn.weight"),
    "whisper": ("model.decoder.layers.1.self_attn", "k_proj.weight"),
    "t5": ("decoder.block.1.layer.0.SelfAttention", "k.weight"),
}
CASES = [("gpt2", "input"), ("gpt2", "k"), ("whisper", "input"), ("whisper", "k"), ("t5", "input")]
GENERATE = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{arch: (unpatched in-memory model, plain checkpoint folder)}."""
    out = {}
    for arch in DEVICE_MAPS:
        model = ARCHITECTURES[arch][0]()
        folder = tmp_path_factory.mktemp(f"plain-{arch}")
        model.save_pretrained(folder)
        out[arch] = model, folder
    return out


@pytest.fixture(scope="module")
def in_memory_slim(checkpoints):
    """slimify of the never-offloaded model, per (arch, mode), computed once."""
    cache = {}

    def get(arch: str, mode: str):
        if (arch, mode) not in cache:
            cache[arch, mode] = slimify(copy.deepcopy(checkpoints[arch][0]), mode)
        return cache[arch, mode]

    return get


def dispatched(arch: str, folder, tmp_path, loader=None, **kwargs):
    loader = loader or ARCHITECTURES[arch][2].from_pretrained
    model = loader(folder, device_map=DEVICE_MAPS[arch], offload_folder=tmp_path / "offload", **kwargs)
    module_name, weight = OFFLOADED[arch]
    assert model.get_submodule(module_name).get_parameter(weight).is_meta, "test setup: layer not offloaded"
    return model


def generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, **GENERATE, pad_token_id=model.config.pad_token_id or 0)


def assert_same_generation(actual, expected, what: str) -> None:
    assert_same_tokens(actual.sequences, expected.sequences, what)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores, strict=True)):
        assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"{what} step {step}")


@pytest.mark.parametrize(("arch", "mode"), CASES)
def test_slimify_on_offloaded_model_matches_it_unpatched(checkpoints, in_memory_slim, tmp_path, arch, mode):
    original, folder = checkpoints[arch]
    inputs = ARCHITECTURES[arch][1](original)
    model = dispatched(arch, folder, tmp_path)
    expected = generate(model, inputs)
    if arch == "gpt2":
        assert_same_generation(expected, generate(original, inputs), f"{arch}: test setup, dispatched vs in memory")

    reference = in_memory_slim(arch, mode)  # same weights, never offloaded
    slimify(model, mode)
    assert slim_record(model).layer_modes == slim_record(reference).layer_modes
    for name, numbers in slim_record(reference).calibration.items():  # calibrated on the real weights, not meta
        offloaded_numbers = slim_record(model).calibration[name]
        assert offloaded_numbers["cond_w_k"] == pytest.approx(numbers["cond_w_k"], rel=1e-9), name
        assert offloaded_numbers["k_error"] == pytest.approx(numbers["k_error"], rel=1e-3), name

    module_name, weight = OFFLOADED[arch]
    module = model.get_submodule(module_name)
    if mode == "k":
        assert slim_record(model).layer_modes[_site_name(model, module)] == "k", "offloaded layer refused K mode"
        assert module.hf_slim_w_kv.device.type == "cpu", "W_KV must live on the layer's execution device"
        assert torch.equal(module.hf_slim_w_kv, reference.get_submodule(module_name).hf_slim_w_kv)
    actual = generate(model, inputs)
    assert_same_generation(actual, expected, f"{arch} {mode}: slim vs unpatched, both offloaded")
    assert module.get_parameter(weight).is_meta, "the offloaded weights must go back to meta after the forward"

    unslimify(model)
    assert not is_slim(model) and "hf_slim_w_kv" not in vars(module)["_buffers"]
    if arch == "gpt2":
        assert_same_generation(generate(model, inputs), expected, f"{arch} {mode}: after unslimify")


def _site_name(model, module) -> str:
    state = module.hf_slim
    return next(name for name in slim_record(model).layer_modes if name.endswith(f"[self {state.layer_idx}]"))


@pytest.mark.parametrize(("arch", "mode"), [("gpt2", "input"), ("gpt2", "k"), ("whisper", "k")])
def test_load_slim_with_device_map_and_disk_offload(checkpoints, in_memory_slim, tmp_path, arch, mode):
    original, folder = checkpoints[arch]
    inputs = ARCHITECTURES[arch][1](original)
    slim_folder = tmp_path / "slim"
    in_memory_slim(arch, mode).save_pretrained(slim_folder)
    expected = generate(dispatched(arch, folder, tmp_path / "vanilla"), inputs)
    model = dispatched(arch, slim_folder, tmp_path / "slim-offload", loader=load_slim)
    assert is_slim(model)
    assert_same_generation(generate(model, inputs), expected, f"{arch} {mode}: load_slim offloaded vs unpatched")


def test_resident_weights_keeps_offloaded_weights_real_through_nested_forwards(checkpoints, tmp_path):
    """What the patched forward relies on: projections read after c_attn's own (offloading) forward are real."""
    _, folder = checkpoints["gpt2"]
    model = dispatched("gpt2", folder, tmp_path)
    attention = model.transformer.h[1].attn
    hidden = torch.randn(1, 3, model.config.n_embd)
    with torch.no_grad():
        attention.c_attn(hidden)
        assert attention.c_attn.weight.is_meta, "accelerate offloads again after each submodule forward"
        with resident_weights(attention):
            assert not attention.c_attn.weight.is_meta
            attention.c_attn(hidden)  # nested hooked forward
            assert not attention.c_attn.weight.is_meta and not attention.c_proj.weight.is_meta
        assert attention.c_attn.weight.is_meta and attention.c_proj.weight.is_meta


def test_projections_inside_the_patched_forward_are_real(checkpoints, tmp_path):
    _, folder = checkpoints["gpt2"]
    model = slimify(dispatched("gpt2", folder, tmp_path), "input")
    attention = model.transformer.h[1].attn
    seen = []
    original = attention.hf_slim.projections

    def spy():
        projections = original()
        seen.append(projections.w_k.is_meta or projections.w_v.is_meta)
        return projections

    attention.hf_slim.projections = spy
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert seen and not any(seen), f"meta projections read in {sum(seen)} of {len(seen)} calls"


def test_model_fully_on_disk_except_embeddings(checkpoints, tmp_path):
    """Both GPT-2 blocks offloaded to disk, K mode: every W_KV solved from loaded-on-demand weights."""
    original, folder = checkpoints["gpt2"]
    device_map = {**DEVICE_MAPS["gpt2"], "transformer.h.0": "disk"}
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "o")
    inputs = ARCHITECTURES["gpt2"][1](original)
    expected = generate(model, inputs)
    slimify(model, "k")
    assert set(slim_record(model).layer_modes.values()) == {"k"}
    assert_same_generation(generate(model, inputs), expected, "gpt2 k, all blocks on disk")


def test_save_pretrained_from_an_offloaded_slim_model(checkpoints, tmp_path):
    """W_KV for the sidecar is solved again from the offloaded weights (loaded for the solve, then back on disk)."""
    original, folder = checkpoints["gpt2"]
    model = slimify(dispatched("gpt2", folder, tmp_path), "k")
    model.save_pretrained(tmp_path / "slim")
    assert model.transformer.h[1].attn.c_attn.weight.is_meta
    loaded = load_slim(tmp_path / "slim")
    inputs = ARCHITECTURES["gpt2"][1](original)
    for name, module in loaded.named_modules():
        if "hf_slim_w_kv" in vars(module)["_buffers"]:
            assert torch.equal(module.hf_slim_w_kv, model.get_submodule(name).hf_slim_w_kv), name
    assert_same_generation(generate(loaded, inputs), generate(model, inputs), "saved from offloaded vs offloaded")
