"""Slim checkpoints: save_pretrained / load_slim round trips (GPT-2, Whisper, T5), what a plain transformers loader
sees, and clear errors for tampered or mismatched checkpoints."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens
from safetensors.torch import load_file, save_file
from tiny_models import randomize_biases, tiny_gpt2, tiny_t5_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSpeechSeq2Seq,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from hf_slim import SlimCheckpointError, is_slim, load_slim, slim_record, slimify, unslimify
from hf_slim.export import CONFIG_KEY, FORMAT_VERSION, SIDECAR, read_slim_settings

GENERATE = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_scores=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP threads waiting for each other cost 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ tiny models


def tiny_whisper() -> WhisperForConditionalGeneration:
    """2+2 layers, d=64, 8 mel bins, 30 encoder frames; orthogonal W_K so the K mode is exact in float32."""
    config = WhisperConfig(
        vocab_size=96, num_mel_bins=8, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=30,
        max_target_positions=64, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        suppress_tokens=[], begin_suppress_tokens=[], init_std=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = randomize_biases(WhisperForConditionalGeneration(config)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("k_proj"):
                q, _ = torch.linalg.qr(torch.randn(module.weight.shape, generator=generator, dtype=torch.float64))
                module.weight.copy_(q * 0.5)
    return model


def tiny_t5() -> T5ForConditionalGeneration:
    """2+2 layers, d_model = heads * d_kv = 32 (square W_K, so the K mode can apply), random norms and bias tables."""
    tokenizer = tiny_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return randomize_biases(T5ForConditionalGeneration(config)).eval()


def gpt2_inputs(model) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def whisper_inputs(model) -> dict:
    features = torch.randn(2, 8, 60, generator=torch.Generator().manual_seed(3))
    return {"input_features": features}


def t5_inputs(model) -> dict:
    return dict(tiny_t5_tokenizer()(["summarize: the quick brown fox", "memory"], return_tensors="pt", padding=True))


ARCHITECTURES = {
    # name: (builder, inputs, plain Auto class, modes to round-trip)
    "gpt2": (tiny_gpt2, gpt2_inputs, AutoModelForCausalLM, ["input", "k"]),
    "whisper": (tiny_whisper, whisper_inputs, AutoModelForSpeechSeq2Seq, ["input", "k"]),
    "t5": (tiny_t5, t5_inputs, AutoModelForSeq2SeqLM, ["input", "k"]),
}
CASES = [(arch, mode) for arch, (*_, modes) in ARCHITECTURES.items() for mode in modes]


def generate(model, inputs: dict):
    with torch.no_grad():
        return model.generate(**inputs, **GENERATE, pad_token_id=model.config.pad_token_id or 0)


def assert_same_generation(actual, expected, what: str, exact: bool = False) -> None:
    assert_same_tokens(actual.sequences, expected.sequences, what)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores, strict=True)):
        if exact:
            assert torch.equal(a, e), f"{what}: scores differ at step {step} (max {float((a - e).abs().max()):.2e})"
        else:
            assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"{what} step {step}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{(arch, mode): (vanilla model, slim model, checkpoint folder)}, each saved once per module."""
    cache = {}

    def get(arch: str, mode: str):
        if (arch, mode) not in cache:
            build = ARCHITECTURES[arch][0]
            vanilla = build()
            slim = slimify(copy.deepcopy(vanilla), mode)
            folder = tmp_path_factory.mktemp(f"{arch}-{mode}")
            slim.save_pretrained(folder)
            cache[arch, mode] = vanilla, slim, folder
        return cache[arch, mode]

    return get


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("arch", "mode"), CASES)
def test_round_trip_reproduces_the_slim_model(saved, arch, mode):
    vanilla, slim, folder = saved(arch, mode)
    if mode == "k":
        assert "k" in slim_record(slim).layer_modes.values(), f"{arch}: K mode refused everywhere, nothing tested"
    settings = json.loads((folder / "config.json").read_text())[CONFIG_KEY]
    assert settings["format_version"] == FORMAT_VERSION
    assert settings["layer_modes"] == slim_record(slim).layer_modes
    assert settings["calibration"] == slim_record(slim).calibration
    assert (folder / SIDECAR).is_file() == ("k" in settings["layer_modes"].values())

    loaded = load_slim(folder)
    assert is_slim(loaded) and type(loaded) is type(slim)
    assert slim_record(loaded).layer_modes == slim_record(slim).layer_modes
    assert slim_record(loaded).calibration == slim_record(slim).calibration
    for name, module in loaded.named_modules():
        if "hf_slim_w_kv" in vars(module)["_buffers"]:
            original = slim.get_submodule(name)
            assert torch.equal(module.hf_slim_w_kv, original.hf_slim_w_kv), f"{name}: W_KV differs from slimify's"
            assert module.hf_slim_w_kv.stride() == original.hf_slim_w_kv.stride(), "another layout rounds otherwise"
            assert torch.equal(module.hf_slim_v_offset, original.hf_slim_v_offset)

    inputs = ARCHITECTURES[arch][1](vanilla)
    expected_slim, expected_vanilla = generate(slim, inputs), generate(vanilla, inputs)
    actual = generate(loaded, inputs)
    assert_same_generation(actual, expected_slim, f"{arch} {mode}: load_slim vs the saved slim model")
    assert_same_generation(actual, expected_vanilla, f"{arch} {mode}: load_slim vs the unpatched model")
    # same weights from disk, same settings: bit for bit what slimify of the plain checkpoint computes
    plain = ARCHITECTURES[arch][2].from_pretrained(folder)
    with torch.no_grad():
        record = slim_record(slim)
        reslimified = slimify(plain, mode, layer_modes=record.layer_modes, residual_ranks=record.residual_ranks)
    assert_same_generation(actual, generate(reslimified, inputs), f"{arch} {mode}: vs slimify(from_pretrained)", True)


@pytest.mark.parametrize(("arch", "mode"), [("gpt2", "k"), ("whisper", "k"), ("t5", "input")])
def test_plain_transformers_loads_the_original_model(saved, arch, mode):
    vanilla, _, folder = saved(arch, mode)
    plain = ARCHITECTURES[arch][2].from_pretrained(folder)
    assert not is_slim(plain)
    expected_state = vanilla.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), f"{name} differs from the original weights"
    inputs = ARCHITECTURES[arch][1](vanilla)
    assert_same_generation(generate(plain, inputs), generate(vanilla, inputs), f"{arch}: plain from_pretrained")


def test_unslimify_removes_the_config_key_and_vanilla_saves_stay_plain(saved, tmp_path):
    vanilla, _, folder = saved("gpt2", "k")
    model = slimify(copy.deepcopy(vanilla), "input")
    assert CONFIG_KEY not in vars(model.config), "slim settings go to the saved config.json only, never the live config"
    unslimify(model)
    assert CONFIG_KEY not in vars(model.config)
    model.save_pretrained(tmp_path / "plain")
    assert CONFIG_KEY not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not (tmp_path / "plain" / SIDECAR).exists()
    loaded = load_slim(folder)
    unslimify(loaded)
    assert CONFIG_KEY not in vars(loaded.config) and not is_slim(loaded)


def test_resaving_without_k_layers_removes_a_stale_sidecar(saved, tmp_path):
    vanilla, _, folder = saved("gpt2", "k")
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    slimify(copy.deepcopy(vanilla), "input").save_pretrained(target)
    assert not (target / SIDECAR).exists()
    assert slim_record(load_slim(target)).layer_modes == dict.fromkeys(
        slim_record(load_slim(folder)).layer_modes, "input"
    )


def test_forced_layer_modes_are_validated_against_the_model():
    model = tiny_gpt2()
    modes = {"GPT2Attention[self 0]": "k", "GPT2Attention[self 1]": "input"}
    assert slim_record(slimify(copy.deepcopy(model), "k", layer_modes=modes)).layer_modes == modes
    with pytest.raises(
        ValueError, match=r"unknown: \['GPT2Attention\[self 7\]'\].*missing: \['GPT2Attention\[self 1\]'"
    ):
        slimify(copy.deepcopy(model), layer_modes={"GPT2Attention[self 0]": "k", "GPT2Attention[self 7]": "k"})
    with pytest.raises(ValueError, match=r"self-attention layer takes one of \('input', 'k'\)"):
        slimify(copy.deepcopy(model), layer_modes={**modes, "GPT2Attention[self 1]": "encoder"})
    untouched = copy.deepcopy(model)
    with pytest.raises(ValueError):
        slimify(untouched, layer_modes={"nope": "k"})
    assert not is_slim(untouched) and CONFIG_KEY not in vars(untouched.config)


@pytest.mark.parametrize("change", ["w_v", "b_v"])
def test_saving_after_the_weights_changed_refuses_a_stale_w_kv(tmp_path, change):
    model = slimify(tiny_gpt2(), "k")
    c_attn = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        if change == "w_v":
            c_attn.weight[:, 128:].mul_(1.01)  # W_V only (W_KV is invariant to scaling both)
        else:
            c_attn.bias[128:].add_(0.01)  # the value offset b_V - b_K W_KV is stale
    with pytest.raises(RuntimeError, match=r"GPT2Attention\[self 0\]: the weights changed after slimify"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists(), "nothing is written when the check fails"


# -------------------------------------------------------------------------------------- tampered checkpoints


@pytest.fixture
def k_checkpoint(saved, tmp_path):
    """A writable copy of the GPT-2 K-mode checkpoint."""
    _, _, folder = saved("gpt2", "k")
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def edit_settings(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config[CONFIG_KEY])
    (folder / "config.json").write_text(json.dumps(config))


def edit_sidecar(folder, change) -> None:
    tensors = load_file(folder / SIDECAR)
    change(tensors)
    save_file(tensors, folder / SIDECAR)


def _drop_settings(folder) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config[CONFIG_KEY]
    (folder / "config.json").write_text(json.dumps(config))


LAYER = "GPT2Attention[self 1]"
CALIBRATION_KEY = r"config.json\['hf_slim'\]\['calibration'\]"
CALIBRATION_TAMPERING = {
    # case: (change to config.json["hf_slim"], message naming the key)
    "not an object": (
        lambda s: s.update(calibration=[1.5, 2.5]),
        rf"{CALIBRATION_KEY} must be an object mapping layer names to their numbers, got list; re-export",
    ),
    "layer entry not an object": (
        lambda s: s["calibration"].update({LAYER: 12.5}),
        rf"{CALIBRATION_KEY}\['GPT2Attention\[self 1\]'\] must be an object .*got float",
    ),
    "number is a string": (
        lambda s: s["calibration"][LAYER].update(cond_w_k="large"),
        rf"{CALIBRATION_KEY}\['GPT2Attention\[self 1\]'\]\['cond_w_k'\] must be a number, got 'large'",
    ),
    "dtype unknown": (
        lambda s: s["calibration"][LAYER].update(dtype="float32"),
        rf"{CALIBRATION_KEY}\['GPT2Attention\[self 1\]'\]\['dtype'\] must name a torch dtype such as "
        r"'torch.float32', got 'float32'",
    ),
}
TAMPERING = {
    "w_kv perturbed": (
        lambda f: edit_sidecar(f, lambda t: t[f"{LAYER}.w_kv"].mul_(1 + 1e-4)),
        r"GPT2Attention\[self 1\] W_KV does not match the weights",
    ),
    "w_kv of another layer": (
        lambda f: edit_sidecar(f, lambda t: t.update({f"{LAYER}.w_kv": t["GPT2Attention[self 0].w_kv"].clone()})),
        r"W_KV does not match the weights",
    ),
    "v_offset perturbed": (
        lambda f: edit_sidecar(f, lambda t: t[f"{LAYER}.v_offset"].add_(1e-3)),
        r"W_KV does not match the weights .*offset",
    ),
    "w_kv wrong shape": (
        lambda f: edit_sidecar(f, lambda t: t.update({f"{LAYER}.w_kv": t[f"{LAYER}.w_kv"][:, :32].contiguous()})),
        r"w_kv is torch.float64 \((\d+), 32\), expected torch.float64 \(\1, 64\)",  # (e + r, e): r from calibration
    ),
    "w_kv wrong dtype": (
        lambda f: edit_sidecar(f, lambda t: t.update({f"{LAYER}.w_kv": t[f"{LAYER}.w_kv"].float()})),
        r"w_kv is torch.float32",
    ),
    "sidecar tensor missing": (
        lambda f: edit_sidecar(f, lambda t: t.pop(f"{LAYER}.v_offset")),
        r"missing: \['GPT2Attention\[self 1\].v_offset'\]",
    ),
    "sidecar file missing": (lambda f: (f / SIDECAR).unlink(), r"use the K cache but hf_slim.safetensors is missing"),
    "sidecar not safetensors": (lambda f: (f / SIDECAR).write_bytes(b"garbage"), r"hf_slim.safetensors: unreadable"),
    "newer format": (
        lambda f: edit_settings(f, lambda s: s.update(format_version=FORMAT_VERSION + 1, library_version="9.0")),
        r"written by hf_slim 9.0 in slim checkpoint format 2; this hf_slim .* reads format 1 at most: upgrade",
    ),
    "no format version": (lambda f: edit_settings(f, lambda s: s.pop("format_version")), r"no valid format_version"),
    "unknown layer name": (
        lambda f: edit_settings(f, lambda s: s["layer_modes"].update({"GPT2Attention[self 9]": "k"})),
        r"unknown layers: \['GPT2Attention\[self 9\]'\]",
    ),
    "layer without mode": (
        lambda f: edit_settings(f, lambda s: s["layer_modes"].pop(LAYER)),
        r"layers without a mode: \['GPT2Attention\[self 1\]'\]",
    ),
    "unknown mode": (
        lambda f: edit_settings(f, lambda s: s["layer_modes"].update({LAYER: "v"})),
        r"unknown layer modes \{'GPT2Attention\[self 1\]': 'v'\}",
    ),
    "no slim settings": (
        _drop_settings,
        r"not an hf_slim checkpoint .*call hf_slim.slimify",
    ),
    **{
        f"calibration: {case}": (lambda f, change=change: edit_settings(f, change), message)
        for case, (change, message) in CALIBRATION_TAMPERING.items()
    },
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_checkpoint_is_a_clear_error(k_checkpoint, case):
    tamper, message = TAMPERING[case]
    tamper(k_checkpoint)
    with pytest.raises(SlimCheckpointError, match=message):
        load_slim(k_checkpoint)


@pytest.mark.parametrize("case", list(CALIBRATION_TAMPERING))
def test_malformed_calibration_is_refused_before_loading_weights(k_checkpoint, case):
    """read_slim_settings (which hf-slim and load_slim call first) names the key instead of a later TypeError."""
    change, message = CALIBRATION_TAMPERING[case]
    edit_settings(k_checkpoint, change)
    with pytest.raises(SlimCheckpointError, match=message):
        read_slim_settings(k_checkpoint)


def test_weights_changed_after_export_are_detected(saved, k_checkpoint):
    """Fine-tuned (or swapped) weights next to the old sidecar: W_K W_KV no longer gives W_V."""
    plain = AutoModelForCausalLM.from_pretrained(k_checkpoint)
    with torch.no_grad():
        plain.transformer.h[1].attn.c_attn.weight.add_(
            1e-3 * torch.randn_like(plain.transformer.h[1].attn.c_attn.weight)
        )
    settings = json.loads((k_checkpoint / "config.json").read_text())[CONFIG_KEY]
    plain.save_pretrained(k_checkpoint)  # the plain model keeps the config key as an attribute and re-saves it
    assert json.loads((k_checkpoint / "config.json").read_text())[CONFIG_KEY] == settings
    with pytest.raises(SlimCheckpointError, match=r"GPT2Attention\[self 1\] W_KV does not match the weights"):
        load_slim(k_checkpoint)


def test_k_mode_checkpoint_refuses_another_dtype(k_checkpoint):
    with pytest.raises(
        SlimCheckpointError, match=r"calibrated in torch.float32, but the model is loaded in torch.bfloat16"
    ):
        load_slim(k_checkpoint, dtype=torch.bfloat16)


def test_input_mode_checkpoint_loads_in_any_dtype(saved):
    _, _, folder = saved("gpt2", "input")
    model = load_slim(folder, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and is_slim(model)


def test_missing_folder_and_plain_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_slim(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_slim(tmp_path)
    tiny_gpt2().save_pretrained(tmp_path / "plain")
    with pytest.raises(SlimCheckpointError, match="not an hf_slim checkpoint"):
        load_slim(tmp_path / "plain")


def test_deepcopy_of_a_slim_model_saves_and_runs_the_copy(tmp_path):
    original = slimify(tiny_gpt2(), "k")
    duplicate = copy.deepcopy(original)
    with torch.no_grad():
        duplicate.transformer.wte.weight.mul_(2.0)
    attention = duplicate.transformer.h[0].attn
    assert attention.forward.__self__ is attention, "the patched forward must be bound to the copy"
    duplicate.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["transformer.wte.weight"], duplicate.transformer.wte.weight)
    assert is_slim(load_slim(tmp_path))
