"""BART family and composites beyond equivalence: save_pretrained / load_slim round trips, accelerate disk offload,
cache_report on the real configs of NLLB-200-distilled-600M, mBART-large-50, opus-mt-en-de and BART-large, and the
``hf-slim generate | verify | memory`` commands."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens
from test_encoder_decoder import encoder_inputs, tiny_composite
from tiny_encdec import source_batch, tiny_bart
from tiny_models import tiny_tokenizer
from transformers import AutoConfig, AutoModelForSeq2SeqLM, VisionEncoderDecoderModel

from hf_slim import cache_report, is_slim, load_slim, slim_record, slimify
from hf_slim.app.cli.main import main
from hf_slim.export import CONFIG_KEY

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GENERATE = dict(
    max_new_tokens=16, min_new_tokens=16, no_repeat_ngram_size=2, return_dict_in_generate=True, output_scores=True
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(model, inputs: dict, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **GENERATE, **kwargs)


def assert_same_generation(actual, expected, what: str) -> None:
    assert_same_tokens(actual.sequences, expected.sequences, what)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores, strict=True)):
        finite = torch.isfinite(e)  # n-gram blocking puts -inf on the same tokens
        assert torch.equal(finite, torch.isfinite(a)), f"{what} step {step}: different tokens masked"
        assert_close_relative(a[finite], e[finite], LOGITS_RTOL[torch.float32], f"{what} step {step}")


# ------------------------------------------------------------------------------------------------ save and load

ROUND_TRIPS = [("bart", "input"), ("bart", "k"), ("marian", "input"), ("m2m_100", "input"), ("composite", "input")]


def _build(kind: str):
    """(model, inputs) for a round trip: a BART-family seq2seq model or a ViT + TrOCR composite."""
    if kind == "composite":
        return tiny_composite("vision", "trocr"), encoder_inputs("vision")
    return tiny_bart(kind, well_conditioned_keys=True), source_batch(3, padding_side="left")


@pytest.mark.parametrize(("kind", "mode"), ROUND_TRIPS)
def test_save_pretrained_and_load_slim_round_trip(tmp_path, kind, mode):
    vanilla, inputs = _build(kind)
    calibration = {**source_batch(2), "decoder_input_ids": torch.randint(3, 96, (2, 12))} if mode == "k" else None
    slim = slimify(copy.deepcopy(vanilla), mode, calibration_inputs=calibration)
    if mode == "k":
        assert "k" in slim_record(slim).layer_modes.values(), "K mode refused everywhere: nothing tested"
    slim.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())[CONFIG_KEY]
    assert settings["layer_modes"] == slim_record(slim).layer_modes
    loaded = load_slim(tmp_path)
    assert is_slim(loaded) and type(loaded) is type(slim)
    assert slim_record(loaded).layer_modes == slim_record(slim).layer_modes
    expected = generate(vanilla, inputs, num_beams=2)
    assert_same_generation(generate(loaded, inputs, num_beams=2), expected, f"{kind} {mode}: load_slim vs unpatched")
    plain_class = VisionEncoderDecoderModel if kind == "composite" else AutoModelForSeq2SeqLM
    plain = plain_class.from_pretrained(tmp_path)  # plain transformers: the original model, not slim
    assert not is_slim(plain)
    assert_same_generation(generate(plain, inputs, num_beams=2), expected, f"{kind} {mode}: plain from_pretrained")


# ------------------------------------------------------------------------------------------------ accelerate

DEVICE_MAP = {
    "model.shared": "cpu", "model.encoder": "cpu", "model.decoder.embed_tokens": "cpu",
    "model.decoder.embed_positions": "cpu", "model.decoder.layernorm_embedding": "cpu",
    "model.decoder.layers.0": "cpu", "model.decoder.layers.1": "disk", "lm_head": "cpu",
    "final_logits_bias": "cpu",  # a buffer: accelerate needs it placed (and warns that it is not a submodule)
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")
@pytest.mark.parametrize("mode", ["input", "k"])
def test_slimify_on_disk_offloaded_bart_matches_it_unpatched(tmp_path, mode):
    original = tiny_bart("bart", well_conditioned_keys=True)
    original.save_pretrained(tmp_path / "plain")
    inputs = source_batch(3, padding_side="left")

    def dispatched(folder):
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, device_map=DEVICE_MAP, offload_folder=folder / "offload")
        assert model.model.decoder.layers[1].self_attn.k_proj.weight.is_meta, "test setup: layer not offloaded"
        return model

    model = dispatched(tmp_path / "plain")
    expected = generate(model, inputs, num_beams=2)
    calibration = {**source_batch(2), "decoder_input_ids": torch.randint(3, 96, (2, 12))} if mode == "k" else None
    slimify(model, mode, calibration_inputs=calibration)
    if mode == "k":
        assert slim_record(model).layer_modes["BartAttention[self 1]"] == "k", "offloaded layer refused K mode"
    assert_same_generation(generate(model, inputs, num_beams=2), expected, f"{mode}: slim vs unpatched, offloaded")
    assert model.model.decoder.layers[1].self_attn.k_proj.weight.is_meta, "weights must return to meta"


# ------------------------------------------------------------------------------------------------ cache_report

REAL_CONFIGS = {  # file: (model type, decoder layers, d_model)
    "nllb-200-distilled-600M": ("m2m_100", 12, 1024),
    "mbart-large-50": ("mbart", 12, 1024),
    "opus-mt-en-de": ("marian", 6, 512),
    "bart-large": ("bart", 12, 1024),
}


def meta_model(name: str, dtype: torch.dtype = torch.float16):
    raw = json.loads((CONFIGS / f"{name}.json").read_text())
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        return getattr(transformers, raw["architectures"][0])._from_config(config, dtype=dtype)


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_cache_report_on_real_configs_at_a_translation_shape(name):
    """8 sentences of 128 source tokens translated into 128 tokens with 4 beams, fp16: per decoder layer vanilla
    caches self K+V (2d per target token) and cross K+V (2d per source token) for every beam, slim caches X (d per
    target token) and nothing for cross-attention: ratio 2 + 2 * 128 / 128 = 4. The encoder output (d per source
    token) is repeated per beam by transformers and kept once per input by the slim model."""
    model_type, layers, d = REAL_CONFIGS[name]
    model = meta_model(name)
    assert model.config.model_type == model_type
    batch, beams, source, target, size = 8, 4, 128, 128, 2
    report = cache_report(model, batch, target, encoder_len=source, num_beams=beams, verbose=False)
    rows = batch * beams
    assert report.vanilla_bytes == layers * rows * 2 * d * (target + source) * size
    assert report.slim_bytes == layers * rows * d * target * size
    assert report.ratio == 4.0
    assert (report.encoder_bytes, report.slim_encoder_bytes) == (rows * source * d * size, batch * source * d * size)
    vanilla_total = report.vanilla_bytes + report.encoder_bytes
    assert report.ratio_with_encoder == vanilla_total / (report.slim_bytes + batch * source * d * size)
    slimify(model)  # the input mode touches no weight: it works on the meta device and the report follows it
    assert cache_report(model, batch, target, encoder_len=source, num_beams=beams, verbose=False).ratio == 4.0


def test_memory_command_on_the_opus_mt_config(capsys):
    config = str(CONFIGS / "opus-mt-en-de.json")
    args = ["memory", "--config", config, "--seq-len", "128", "--encoder-len", "128", "--batch", "8", "--beams", "4"]
    assert main([*args, "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "marian: batch 8, 128 tokens, 4 beams, 128 encoder frames, float16" in out, out
    assert re.search(r"MarianAttention\[self 0\]\s+input\s+8\.0 MiB\s+4\.0 MiB", out), out
    assert re.search(r"MarianAttention\[cross 0\]\s+encoder\s+8\.0 MiB\s+0 B", out), out
    assert re.search(r"total\s+96\.0 MiB\s+24\.0 MiB\s+4\.00x", out), out
    assert re.search(r"total incl. encoder output\s+100\.0 MiB\s+25\.0 MiB\s+4\.00x", out), out


# ------------------------------------------------------------------------------------------------ generate, verify


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory) -> Path:
    """A tiny BART whose vocabulary is the tiny BPE tokenizer's, saved with that tokenizer."""
    tokenizer = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("bart")
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = tiny_bart("bart", vocab_size=len(tokenizer), decoder_start_token_id=tokenizer.eos_token_id, **ids)
    model.generation_config.update(**ids, decoder_start_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_command_translates_source_text_like_the_unpatched_model(bart_dir, capsys):
    args = ["generate", "the quick brown fox", "--model", str(bart_dir), "--max-new-tokens", "12", "--compare"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "outputs identical: yes" in out, out
    slim_text = re.search(r"^slim: +(.*)$", out, re.M).group(1)
    assert slim_text.strip(), f"the tiny model generated no text: {out}"


def test_verify_command_on_bart(bart_dir, capsys):
    assert main(["verify", "--model", str(bart_dir), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "greedy outputs: identical to the unpatched model" in out, out
    assert re.search(r"BartAttention\[self 0\]\s+input", out) and re.search(r"BartAttention\[cross 1\]\s+encoder", out)
