"""Never silently wrong: copies, pickles, changed weights, dtype casts, LoRA adapters, nested and shared state.

Each test compares with the unpatched model (token ids equal, logits within the suite's tolerance) or asserts the
clear error; none passes by skipping.
"""

from __future__ import annotations

import copy
import io
import json
import pickle

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
from test_whisper import random_features, tiny_whisper
from tiny_models import tiny_gpt2
from transformers import GPT2LMHeadModel

from hf_slim import (
    SlimCache,
    SlimCheckpointError,
    SlimFallbackWarning,
    is_slim,
    load_slim,
    slim_record,
    slimify,
    unslimify,
)
from hf_slim.adapters import UnsupportedAdapterError
from hf_slim.export import CONFIG_KEY, SIDECAR
from hf_slim.kmode import StaleKModeWeights
from hf_slim.registry import UnsupportedModelError

PROMPT = torch.tensor([[5, 17, 33, 8, 41, 2, 77]])
RTOL = LOGITS_RTOL[torch.float32]


def all_k(model) -> dict[str, str]:
    """Force every self-attention layer of a tiny GPT-2 to the K cache (deterministic, no calibration)."""
    return {f"GPT2Attention[self {i}]": "k" for i in range(model.config.n_layer)}


def greedy(model, steps: int = 10) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=steps, do_sample=False)


@torch.no_grad()
def decode_logits(model, steps: int = 12) -> torch.Tensor:
    """Prefill + ``steps`` one-token decode steps through the model's own cache; logits ``(steps + 1, vocab)``."""
    output = model(PROMPT, use_cache=True)
    logits, cache = [output.logits[:, -1]], cache_of(output)
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)  # (1, 1)
        output = model(token, **with_cache(cache), use_cache=True)
        logits.append(output.logits[:, -1])
        cache = cache_of(output)
    return torch.cat(logits)


# --- 1. deepcopy ---


def test_deepcopy_follows_its_own_weights_and_undoes_independently():
    original = slimify(tiny_gpt2(), "input")
    reference = greedy(original)
    duplicate = copy.deepcopy(original)
    other = tiny_gpt2(seed=1)
    duplicate.load_state_dict(other.state_dict())
    assert_close_relative(decode_logits(duplicate), decode_logits(other), RTOL)
    assert_same_tokens(greedy(duplicate), greedy(other))

    unslimify(original)  # must not touch the copy
    assert is_slim(duplicate) and not is_slim(original)
    assert_same_tokens(greedy(duplicate), greedy(other))
    assert_same_tokens(greedy(original), reference)

    unslimify(duplicate)
    assert not is_slim(duplicate)
    attention = duplicate.transformer.h[0].attn
    assert "forward" not in vars(attention) and "hf_slim" not in vars(attention)
    assert "forward" not in vars(duplicate.transformer)
    assert_same_tokens(greedy(duplicate), greedy(other))


# --- 2. pickle / torch.save ---


@pytest.mark.parametrize("family", ["gpt2", "whisper"])
def test_pickle_and_torch_save_round_trip(family):
    if family == "gpt2":
        model = slimify(tiny_gpt2(), "input")

        def run(m):
            return greedy(m)
    else:
        model = slimify(tiny_whisper(), "input")
        features = random_features(2)

        def run(m):
            return m.generate(features, max_new_tokens=8, num_beams=2, do_sample=False)

    reference = run(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for restored in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model))):
        assert is_slim(restored)
        assert_same_tokens(run(restored), reference)
        unslimify(restored)
        assert not is_slim(restored)
        assert_same_tokens(run(restored), reference)


# --- 3. K mode after the weights change ---


@pytest.mark.parametrize("change", ["load_state_dict", "optimizer_step", "in_place_edit", "data_assignment"])
def test_k_mode_refuses_changed_weights(change):
    model = tiny_gpt2()
    slimify(model, "k", layer_modes=all_k(model))
    greedy(model, steps=2)
    if change == "load_state_dict":
        model.load_state_dict(tiny_gpt2(seed=1).state_dict())
    elif change == "optimizer_step":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(PROMPT, labels=PROMPT).loss.backward()
        optimizer.step()
    elif change == "in_place_edit":
        with torch.no_grad():
            model.transformer.h[1].attn.c_attn.weight[:, 70] += 0.01
    else:
        weight = model.transformer.h[0].attn.c_attn.weight
        weight.data = weight.data * 1.01
    with pytest.raises(StaleKModeWeights, match="changed after slimify"):
        greedy(model, steps=2)


def test_k_mode_accepts_a_reload_of_identical_weights_and_input_mode_follows_new_weights():
    vanilla = tiny_gpt2()
    model = slimify(copy.deepcopy(vanilla), "k", layer_modes=all_k(vanilla))
    model.load_state_dict(vanilla.state_dict())  # same values: version counters move, the sketch does not
    assert_close_relative(decode_logits(model), decode_logits(vanilla), RTOL)

    other = tiny_gpt2(seed=2)
    input_mode = slimify(tiny_gpt2(), "input")
    input_mode.load_state_dict(other.state_dict())
    assert_close_relative(decode_logits(input_mode), decode_logits(other), RTOL)


# --- 4. K mode after a dtype cast ---


def test_k_mode_refuses_a_dtype_cast_and_input_mode_follows_it():
    model = tiny_gpt2()
    slimify(model, "k", layer_modes=all_k(model))
    model.to(torch.bfloat16)
    with pytest.raises(StaleKModeWeights, match="now runs in torch.bfloat16"):
        greedy(model, steps=2)

    vanilla = tiny_gpt2(dtype=torch.bfloat16)
    input_mode = slimify(tiny_gpt2(), "input").to(torch.bfloat16)
    assert_same_tokens(greedy(input_mode), greedy(vanilla))


# --- 5. PEFT LoRA ---

peft = pytest.importorskip("peft", reason="PEFT is a test dependency (pip install -e .[test])")


def lora_gpt2(targets=("c_attn",), **config):
    base = tiny_gpt2()
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, fan_in_fan_out=True, **config
    )
    torch.manual_seed(3)
    return peft.get_peft_model(base, lora).eval()


def test_lora_active_disabled_and_multiple_adapters_match_the_adapted_model():
    vanilla = lora_gpt2()
    second = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    vanilla.add_adapter("second", second)
    slim = slimify(copy.deepcopy(vanilla), "input")
    assert is_slim(slim) and isinstance(slim, peft.PeftModel)

    assert_close_relative(decode_logits(slim), decode_logits(vanilla), RTOL)
    assert_same_tokens(greedy(slim), greedy(vanilla))
    with slim.disable_adapter(), vanilla.disable_adapter():
        assert_close_relative(decode_logits(slim), decode_logits(vanilla), RTOL)
    for model in (slim, vanilla):
        model.set_adapter("second")
    assert_close_relative(decode_logits(slim), decode_logits(vanilla), RTOL)
    # the adapters must matter, or this test tests nothing
    with vanilla.disable_adapter():
        base = decode_logits(vanilla)
    assert (decode_logits(vanilla) - base).abs().max() > 0.1


def test_lora_added_after_slimify_and_on_whisper_cross_attention():
    vanilla = tiny_gpt2()
    slim = slimify(copy.deepcopy(vanilla), "input")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    torch.manual_seed(3)
    adapted_vanilla = peft.get_peft_model(vanilla, lora).eval()
    torch.manual_seed(3)
    adapted_slim = peft.get_peft_model(slim, lora).eval()
    assert_close_relative(decode_logits(adapted_slim), decode_logits(adapted_vanilla), RTOL)

    whisper_lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(4)
    whisper = peft.get_peft_model(tiny_whisper(), whisper_lora).eval()
    whisper_slim = slimify(copy.deepcopy(whisper), "input")
    features = random_features(2)
    for beams in (1, 3):
        expected = whisper.generate(input_features=features, max_new_tokens=10, num_beams=beams, do_sample=False)
        actual = whisper_slim.generate(input_features=features, max_new_tokens=10, num_beams=beams, do_sample=False)
        assert_same_tokens(actual, expected)


def test_lora_with_k_mode_falls_back_or_refuses_and_dora_is_refused():
    adapted = lora_gpt2()
    with pytest.warns(SlimFallbackWarning, match="merge_and_unload"):
        slimify(adapted, "k", calibration_inputs={"input_ids": PROMPT})
    assert set(slim_record(adapted).layer_modes.values()) == {"input"}
    with pytest.raises(ValueError, match="merge_and_unload"):
        slimify(lora_gpt2(), "k", layer_modes=all_k(tiny_gpt2()))

    k_model = tiny_gpt2()
    slimify(k_model, "k", layer_modes=all_k(k_model))
    torch.manual_seed(3)
    later = peft.get_peft_model(
        k_model, peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    ).eval()
    with pytest.raises(StaleKModeWeights, match="LoRA"):
        greedy(later, steps=2)

    dora = lora_gpt2(targets=("c_attn",), use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="merge_and_unload"):  # refused by slimify, model untouched
        slimify(dora, "input")
    assert not is_slim(dora) and "forward" not in vars(dora.get_base_model().transformer.h[0].attn)
    later_dora = slimify(lora_gpt2(), "input")  # a DoRA adapter added after slimify: refused at decode
    later_dora.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True))
    later_dora.set_adapter("dora")
    with pytest.raises(UnsupportedAdapterError, match="merge_and_unload"):
        greedy(later_dora, steps=2)


# --- 6. nested slimify ---


def test_nested_slimify_is_refused_in_both_orders():
    model = tiny_gpt2()
    before = snapshot(model)
    reference = greedy(model)

    slimify(model.transformer)
    with pytest.raises(ValueError, match="already slimified"):
        slimify(model)
    with pytest.raises(ValueError, match="part of it"):
        unslimify(model)
    unslimify(model.transformer)
    assert_unchanged(model, before)

    slimify(model)
    with pytest.raises(ValueError, match="already slimified"):
        slimify(model.transformer)
    with pytest.raises(ValueError, match="part of it"):
        unslimify(model.transformer)
    assert_same_tokens(greedy(model), reference)
    unslimify(model)
    assert_unchanged(model, before)


# --- 7. shared config ---


def test_slim_state_does_not_leak_into_a_shared_config(tmp_path):
    slim = tiny_gpt2()
    slimify(slim, "k", layer_modes=all_k(slim))
    assert CONFIG_KEY not in vars(slim.config)
    sibling = GPT2LMHeadModel(slim.config)
    sibling.save_pretrained(tmp_path / "sibling")
    assert CONFIG_KEY not in json.loads((tmp_path / "sibling" / "config.json").read_text())
    assert not (tmp_path / "sibling" / SIDECAR).exists()
    slim.save_pretrained(tmp_path / "slim")  # the slim model itself still saves a slim checkpoint
    assert json.loads((tmp_path / "slim" / "config.json").read_text())[CONFIG_KEY]["sidecar"] == SIDECAR
    assert is_slim(load_slim(tmp_path / "slim"))


# --- 8. failed save ---


def test_a_failed_sidecar_write_leaves_a_plain_checkpoint_and_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    slim = tiny_gpt2()
    slimify(slim, "k", layer_modes=all_k(slim))
    folder = tmp_path / "ckpt"
    slim.save_pretrained(folder)  # a good slim save first: the failed one must not leave its claims behind

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device.*original \\(unslimmed\\) model"):
        slim.save_pretrained(folder)
    assert CONFIG_KEY not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob(".*hf_slim-tmp"))
    with pytest.raises(SlimCheckpointError, match="not an hf_slim checkpoint"):
        load_slim(folder)
    plain = GPT2LMHeadModel.from_pretrained(folder).eval()
    assert_same_tokens(greedy(plain), greedy(tiny_gpt2()))


# --- 9. a slim cache from another model ---


def test_a_slim_cache_refuses_another_model_or_layout():
    k_model = tiny_gpt2()
    slimify(k_model, "k", layer_modes=all_k(k_model))
    input_model = slimify(tiny_gpt2(), "input")
    other_input_model = slimify(tiny_gpt2(), "input")
    for writer, reader in ((k_model, input_model), (other_input_model, input_model)):
        cache = cache_of(writer(PROMPT, use_cache=True))
        with pytest.raises(ValueError, match="belongs to the model that filled it"):
            reader(PROMPT[:, :1], **with_cache(cache), use_cache=True)
    # the model that filled a cache keeps using it
    cache = cache_of(input_model(PROMPT, use_cache=True))
    assert isinstance(cache, SlimCache)
    input_model(PROMPT[:, :1], **with_cache(cache), use_cache=True)


# --- 10. clear errors from slimify and the slim forward ---


def test_clear_errors_for_flex_attention_nan_weights_and_bad_calibration_inputs():
    whisper = slimify(tiny_whisper(), "input")
    whisper.set_attn_implementation("flex_attention")
    with pytest.raises(UnsupportedModelError, match="set_attn_implementation\\('sdpa'\\)"):
        whisper.generate(random_features(1), max_new_tokens=3)

    broken = tiny_gpt2()
    with torch.no_grad():
        broken.transformer.h[0].attn.c_attn.weight[0, 70] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        slimify(broken, "k", calibration_inputs={"input_ids": PROMPT})
    assert not is_slim(broken) and "forward" not in vars(broken.transformer.h[0].attn)

    model = tiny_gpt2()
    with pytest.raises(TypeError, match="must be a dict of forward\\(\\) keyword arguments, got a Tensor"):
        slimify(model, "k", calibration_inputs=PROMPT)
    with pytest.raises(TypeError, match=r"calibration_inputs\['input_ids'\] is a GPT2LMHeadModel, expected a tensor"):
        slimify(model, "k", calibration_inputs={"input_ids": model})
    with pytest.raises(ValueError, match="calibration forward pass failed"):
        slimify(model, "k", calibration_inputs={"input_features": PROMPT})
    assert not is_slim(model)


def test_a_decoder_bert_is_not_told_it_is_encoder_only():
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, is_decoder=True
    )
    with pytest.raises(UnsupportedModelError, match="configured as a decoder"):
        slimify(BertLMHeadModel(config))
    with pytest.raises(UnsupportedModelError, match="encoder-only"):
        slimify(BertLMHeadModel(BertConfig(**{**config.to_dict(), "is_decoder": False})))


def test_forced_k_layers_record_their_dtype_and_load_slim_refuses_another(tmp_path):
    model = tiny_gpt2()
    slimify(model, "k", layer_modes=all_k(model))
    model.save_pretrained(tmp_path)
    with pytest.raises(SlimCheckpointError, match="calibrated in torch.float32"):
        load_slim(tmp_path, dtype=torch.bfloat16)
    assert is_slim(load_slim(tmp_path))


# --- 11. derived state never outlives what it was derived from (K mode) ---


def k_model(seed: int = 0):
    model = tiny_gpt2(seed=seed)
    return slimify(model, "k", layer_modes=all_k(model))


def test_k_mode_through_the_meta_device_and_to_empty_solves_its_buffers_again():
    """``to("meta")``, ``to_empty()`` and ``load_state_dict`` of the same weights: the non-persistent W_KV buffers
    hold uninitialised memory while the weights are back. The check sees buffers that no longer fit the (unchanged)
    weights and solves them again: tokens and logits of the unpatched model."""
    vanilla = tiny_gpt2()
    model = k_model()
    attention = model.transformer.h[0].attn
    before = attention.hf_slim_w_kv.clone()
    greedy(model, steps=2)
    model.to("meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        attention.hf_slim_w_kv.fill_(7.0)  # what uninitialised memory may hold, made certain
    model.load_state_dict(vanilla.state_dict())
    assert_same_tokens(greedy(model, steps=16), greedy(vanilla, steps=16))
    assert torch.equal(attention.hf_slim_w_kv, before), "W_KV was not solved again from the weights"
    assert_close_relative(decode_logits(model), decode_logits(vanilla), RTOL)


def test_k_mode_on_the_meta_device_is_a_clear_error():
    model = k_model()
    model.to("meta")
    with pytest.raises(StaleKModeWeights, match="meta device"):
        model(PROMPT.to("meta"), use_cache=True)


@pytest.mark.parametrize("where", ["generate", "new cache"])
def test_k_mode_sees_edits_through_param_data(where):
    """``param.data[...] += x`` bumps no version counter; the check before every generate() and on every new cache
    reads the values."""
    model = k_model()
    greedy(model, steps=2)
    model.transformer.h[0].attn.c_attn.weight.data[:, 70] += 0.05
    with pytest.raises(StaleKModeWeights, match="changed after slimify"):
        if where == "generate":
            greedy(model, steps=2)
        else:
            model(PROMPT, use_cache=True)


def test_k_mode_under_torch_compile_sees_changed_weights():
    """A compiled forward leaves the per-step check out (it cannot be traced); the check before every generate()
    runs eagerly outside the compiled region."""
    vanilla = tiny_gpt2()
    model = slimify(copy.deepcopy(vanilla), "k", layer_modes=all_k(vanilla))
    torch._dynamo.reset()  # fresh caches: every model's forward shares one transformers wrapper frame
    model.forward = torch.compile(model.forward, backend="eager")  # dynamo traces; no code generation (fast)
    assert_same_tokens(greedy(model, steps=6), greedy(vanilla, steps=6))
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:, 70] += 0.05
    with pytest.raises(StaleKModeWeights, match="changed after slimify"):
        greedy(model, steps=6)


def test_the_derived_state_check_runs_once_per_generate_and_per_new_cache(monkeypatch):
    """Not at every step: one read of W_K, W_V and the buffers per generate() call (and per new cache)."""
    import hf_slim.kmode

    calls = []
    verify = hf_slim.kmode.KSourceStamp.verify
    monkeypatch.setattr(hf_slim.kmode.KSourceStamp, "verify", lambda *a, **k: calls.append(1) or verify(*a, **k))
    model = k_model()
    greedy(model, steps=8)
    assert len(calls) == 2, calls  # two K layers, once each
    decode_logits(model, steps=8)  # a new cache made by forward(): checked at its first step only
    assert len(calls) == 4, calls


# --- 12. NaN weights in every mode ---


@pytest.mark.parametrize("mode", ["auto", "input"])
def test_non_finite_key_weights_are_refused_in_every_mode(mode):
    broken = tiny_gpt2()
    with torch.no_grad():
        broken.transformer.h[0].attn.c_attn.weight[0, 70] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        slimify(broken, mode)
    assert not is_slim(broken) and "forward" not in vars(broken.transformer.h[0].attn)


# --- 13. an interrupted unslimify ---


@pytest.mark.parametrize("mode", ["input", "k"])
def test_an_interrupted_unslimify_leaves_the_model_slim_and_a_second_one_finishes(mode, monkeypatch):
    """Ctrl-C at each of the patch reverts in turn: the model stays fully slim (same tokens), and the next
    unslimify restores it exactly."""
    from hf_slim.patching import BufferPatch, InstancePatch

    vanilla = tiny_gpt2()
    reference = greedy(vanilla)
    before = snapshot(vanilla)
    originals = {cls: cls.revert for cls in (InstancePatch, BufferPatch)}
    point = 0
    while True:
        point += 1
        model = copy.deepcopy(vanilla)
        slimify(model, mode, **({"layer_modes": all_k(model)} if mode == "k" else {}))
        calls = []

        def interrupting(self, calls=calls, point=point):
            calls.append(self)
            if len(calls) == point:
                raise KeyboardInterrupt
            return originals[type(self)](self)

        for cls in originals:
            monkeypatch.setattr(cls, "revert", interrupting)
        try:
            unslimify(model)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        for cls, revert in originals.items():
            monkeypatch.setattr(cls, "revert", revert)
        if not interrupted:
            break
        assert is_slim(model), f"interrupted at revert {point}: no longer slim"
        assert_same_tokens(greedy(model), reference, f"slim after an interruption at revert {point}")
        unslimify(model)
        assert not is_slim(model)
        assert_unchanged(model, before)
        assert_same_tokens(greedy(model), reference)
    assert point > 5, "the loop never interrupted a revert"
    assert_unchanged(model, before)


# --- 14. the model you call generate on ---


def test_generate_on_a_model_around_a_slimified_part_says_which_to_slimify():
    model = tiny_gpt2()
    slimify(model.transformer)
    with pytest.raises(TypeError, match=r"slimify the model you call generate\(\)/forward\(\) on"):
        greedy(model, steps=2)


# --- 15. saves ---


def test_a_sidecar_write_failing_with_a_safetensors_error_is_wrapped(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError (not an OSError): same message, plain folder."""
    import safetensors.torch
    from safetensors import SafetensorError

    slim = k_model()

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    folder = tmp_path / "ckpt"
    with pytest.raises(OSError, match="No space left on device.*original \\(unslimmed\\) model"):
        slim.save_pretrained(folder)
    assert CONFIG_KEY not in json.loads((folder / "config.json").read_text())
    assert_same_tokens(greedy(GPT2LMHeadModel.from_pretrained(folder).eval()), greedy(tiny_gpt2()))


def test_a_slim_save_removes_temporary_files_of_earlier_killed_saves(tmp_path):
    """A process killed while safetensors writes leaves its ``.tmpXXXXXX`` file; the next slim save removes the
    ones it can tell are such leftovers (older than the save, empty or a safetensors start) and nothing else."""
    import os
    import time

    folder = tmp_path / "ckpt"
    folder.mkdir()
    stale = {".tmpAb12Cd": b"", ".tmpXy34Zw": (100).to_bytes(8, "little") + b'{"a":', ".config.json.hf_slim-tmp": b"{"}
    kept = {".tmpQw56Er": b"not a safetensors file", "tmp123456": b"", "notes.txt": b"mine"}
    for name, content in {**stale, **kept}.items():
        (folder / name).write_bytes(content)
        os.utime(folder / name, (time.time() - 60, time.time() - 60))
    k_model().save_pretrained(folder)
    assert not [name for name in stale if (folder / name).exists()]
    assert all((folder / name).exists() for name in kept)
    assert is_slim(load_slim(folder))


def test_a_plain_resave_of_a_slim_checkpoint_is_refused_clearly_by_load_slim(tmp_path):
    """transformers keeps the ``hf_slim`` key as a config attribute; a plain model saved again writes it without the
    sidecar. load_slim refuses that folder and says what to do; from_pretrained loads the original model."""
    k_model().save_pretrained(tmp_path / "slim")
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "slim").eval()
    plain.save_pretrained(tmp_path / "resaved")
    with pytest.raises(SlimCheckpointError, match="re-saved by a model that is not slim.*hf_slim.slimify"):
        load_slim(tmp_path / "resaved")
    assert_same_tokens(greedy(GPT2LMHeadModel.from_pretrained(tmp_path / "resaved").eval()), greedy(tiny_gpt2()))


# --- 16. refusals that say the right thing ---


def test_gpt_bigcode_multi_query_is_refused_and_multi_head_is_served():
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    settings = dict(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    assert is_slim(slimify(GPTBigCodeForCausalLM(GPTBigCodeConfig(multi_query=False, **settings))))
    with pytest.raises(UnsupportedModelError, match=r"multi-query attention \(one shared K/V head\)"):
        slimify(GPTBigCodeForCausalLM(GPTBigCodeConfig(multi_query=True, **settings)))


def test_a_singular_rope_key_projection_keeps_own_kv_without_advice_rope_refuses():
    """The fallback warning of a RoPE layer whose W_K is singular says what the layer keeps, not mode='input' (which
    RoPE refuses), and the record keeps cond(W_K) for hf-slim verify."""
    from tiny_models import tiny_rope

    model = tiny_rope("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[:, :40] = 0  # rank 24 of 64: singular beyond the r cap
    with pytest.warns(SlimFallbackWarning, match="keep the model's own keys and values") as caught:
        slimify(model, "k", calibration_inputs={"input_ids": PROMPT})
    assert "mode='input'" not in str(caught[0].message)
    record = slim_record(model)
    assert record.layer_modes["LlamaAttention[self 0]"] == "kv"
    assert record.calibration["LlamaAttention[self 0]"]["cond_w_k"] > 1e12
