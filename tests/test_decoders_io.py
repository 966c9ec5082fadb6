"""Decoder-only MHA families beyond the forward pass: cache_report on real checkpoint configs, save_pretrained /
load_slim, accelerate disk offload, and the ``hf-slim generate|verify|memory`` commands."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens
from test_export import one_thread  # noqa: F401 (autouse fixture)
from tiny_models import DECODER_CONFIGS, tiny_decoder, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from hf_slim import cache_report, is_slim, load_slim, slim_record, slimify, unslimify
from hf_slim.app.cli.main import main

#: a random W_K can be ill-conditioned: the K mode then keeps the input cache there (tests check for >= 1 K layer)
pytestmark = pytest.mark.filterwarnings("ignore::hf_slim.calibration.SlimFallbackWarning")
CONFIGS = Path(__file__).parent / "data" / "configs"
NAMES = list(DECODER_CONFIGS)
GENERATE = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
PROMPTS = ["the quick brown fox", "memory"]

#: real checkpoint configs (written from the published config.json files): (layers, d_model) of each
REAL_CONFIGS = {"opt-6.7b": (32, 4096), "bloom-7b1": (30, 4096), "gpt-neo-2.7B": (32, 2560)}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_cache_report_on_real_configs_is_2x(name):
    """Built on the meta device: 2 * L * d per token vanilla, L * d slim, for 2048 fp16 tokens."""
    config = AutoConfig.for_model(**json.loads((CONFIGS / f"{name}.json").read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    report = cache_report(model, batch_size=1, seq_len=2048, verbose=False)
    layers, d_model = REAL_CONFIGS[name]
    assert len(report.layers) == layers
    assert report.vanilla_bytes == 2 * layers * d_model * 2048 * 2
    assert report.slim_bytes == layers * d_model * 2048 * 2
    assert report.ratio == 2.0


def _inputs():
    return tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)


def _generate(model):
    with torch.no_grad():
        return model.generate(**_inputs(), **GENERATE)


def _assert_same_generation(actual, expected, what: str) -> None:
    assert_same_tokens(actual.sequences, expected.sequences, what)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores, strict=True)):
        assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"{what} step {step}")


@pytest.mark.parametrize("mode", ["input", "k"])
@pytest.mark.parametrize("name", ["opt", "xglm", "biogpt", "gpt_neo", "bloom", "mpt", "falcon"])
def test_save_pretrained_and_load_slim(name, mode, tmp_path):
    vanilla = tiny_decoder(name)
    slim = slimify(copy.deepcopy(vanilla), mode)
    slim.save_pretrained(tmp_path)
    loaded = load_slim(tmp_path, attn_implementation="eager")  # the tiny models are eager; Falcon eager != sdpa
    assert is_slim(loaded) and slim_record(loaded).layer_modes == slim_record(slim).layer_modes
    _assert_same_generation(_generate(loaded), _generate(vanilla), f"{name} {mode}: load_slim vs unpatched")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert not is_slim(plain)
    _assert_same_generation(_generate(plain), _generate(vanilla), f"{name}: plain transformers load")


def _device_map(model) -> tuple[dict[str, str], str]:
    """Every module on "cpu" except the last decoder layer on "disk"; returns the map and that layer's name."""
    attention = next(name for name, module in model.named_modules() if type(module).__name__.endswith("Attention"))
    layers_name = re.match(r"(.*)\.\d+\.", attention + ".")[1]
    parts = layers_name.split(".")
    device_map = {}
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        for child, _ in model.get_submodule(parent).named_children():
            full = f"{parent}.{child}" if parent else child
            if full != ".".join(parts[: depth + 1]):
                device_map[full] = "cpu"
    layers = model.get_submodule(layers_name)
    for index in range(len(layers)):
        device_map[f"{layers_name}.{index}"] = "disk" if index == len(layers) - 1 else "cpu"
    return device_map, f"{layers_name}.{len(layers) - 1}"


@pytest.mark.parametrize("mode", ["input", "k"])
@pytest.mark.parametrize("name", ["opt", "gpt_neo", "bloom", "mpt", "falcon"])
def test_slimify_with_accelerate_disk_offload(name, mode, tmp_path):
    vanilla = tiny_decoder(name)
    vanilla.save_pretrained(tmp_path / "plain")
    device_map, offloaded = _device_map(vanilla)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", device_map=device_map, offload_folder=tmp_path / "offload", attn_implementation="eager"
    )
    weight = next(parameter for parameter in model.get_submodule(offloaded).parameters())
    assert weight.is_meta, "test setup: the last layer must be offloaded"
    expected = _generate(model)
    _assert_same_generation(expected, _generate(vanilla), f"{name}: test setup, dispatched vs in memory")
    slimify(model, mode)
    assert mode in slim_record(model).layer_modes.values()
    _assert_same_generation(_generate(model), expected, f"{name} {mode}: slim vs unpatched, both offloaded")
    assert weight.is_meta, "the offloaded weights must go back to meta after the forward"
    unslimify(model)
    _assert_same_generation(_generate(model), expected, f"{name} {mode}: after unslimify")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for name in NAMES:
        folder = tmp_path_factory.mktemp(name)
        tiny_decoder(name).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name", NAMES)
def test_cli_generate_compare(name, model_dirs, capsys):
    arguments = ["generate", "--model", str(model_dirs[name]), "the quick brown fox", "--max-new-tokens", "8"]
    assert main([*arguments, "--compare"]) == 0
    out = capsys.readouterr().out
    assert "outputs identical: yes" in out, out
    match = re.search(r"cache bytes: slim (\d+) .*?, vanilla (\d+) .*?, ratio ([\d.]+)x", out)
    assert match and int(match[2]) == 2 * int(match[1]) and float(match[3]) == 2.0, out


@pytest.mark.parametrize("name", ["opt", "gpt_neo", "bloom", "mpt", "falcon"])
def test_cli_verify(name, model_dirs, capsys):
    assert main(["verify", "--model", str(model_dirs[name]), "--mode", "k", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\w+Attention\[self \d\]", line)]
    assert len(rows) == 2 and all(row[2] in ("k", "input") for row in rows), out
    assert "greedy outputs: identical to the unpatched model" in out, out


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_cli_memory_from_real_config(name, capsys):
    config = CONFIGS / f"{name}.json"
    assert main(["memory", "--config", str(config), "--seq-len", "2048", "--batch", "1", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^total\s+.*\s2\.00x$", out, re.MULTILINE), out


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [(dict(attn_config=dict(clip_qkv=6.0)), "clip_qkv"), (dict(multi_query=True), "multi_query")],
    ids=["mpt-clip_qkv", "falcon-multi_query"],
)
def test_cli_refuses_with_the_reason(overrides, reason, tmp_path, capsys):
    model_type = "mpt" if "attn_config" in overrides else "falcon"
    folder = tmp_path / model_type
    tiny_decoder(model_type, **overrides).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert main(["generate", "--model", str(folder), "hello"]) == 1
    assert reason in capsys.readouterr().err
