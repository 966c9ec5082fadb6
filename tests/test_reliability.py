"""Never silently wrong: copies, pickles, changed weights, dtype casts, LoRA adapters, nested and shared state.

Each test compares with the unpatched model (token ids equal, logits within the suite's tolerance) or asserts the
clear error; none passes by skipping.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import pickle

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens, assert_unchanged, snapshot
from test_whisper import random_features, tiny_whisper
from tiny_models import tiny_gpt2
from transformers import GPT2LMHeadModel

from hf_slim import SlimCache, SlimCheckpointError, is_slim, load_slim, slim_record, slimify, unslimify
from hf_slim.adapters import UnsupportedAdapterError
from hf_slim.api import SlimFallbackWarning
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
    logits, cache = [output.logits[:, -1]], output.past_key_values
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)  # (1, 1)
        output = model(token, past_key_values=cache, use_cache=True)
        logits.append(output.logits[:, -1])
        cache = output.past_key_values
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


def test_lora_with_k_mode_falls_back_or_refuses_and_dora_is_refused(caplog):
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

    with caplog.at_level(logging.INFO, logger="hf_slim"):
        dora = slimify(lora_gpt2(targets=("c_attn",), use_dora=True), "input")
    assert "cache size not computed: the key projection: adapter 'default' is a LoRA variant" in caplog.text
    with pytest.raises(UnsupportedAdapterError, match="merge_and_unload"):
        greedy(dora, steps=2)


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
        cache = writer(PROMPT, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="belongs to the model that filled it"):
            reader(PROMPT[:, :1], past_key_values=cache, use_cache=True)
    # the model that filled a cache keeps using it
    cache = input_model(PROMPT, use_cache=True).past_key_values
    assert isinstance(cache, SlimCache)
    input_model(PROMPT[:, :1], past_key_values=cache, use_cache=True)


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
