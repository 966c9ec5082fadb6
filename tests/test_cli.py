"""The ``hf-slim`` command line: every command as a subprocess on tiny models saved to tmp folders and on the bundled
Whisper tiny.en, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import one_thread, tiny_t5  # noqa: F401 (autouse fixture)
from tiny_models import tiny_gpt2, tiny_t5_tokenizer, tiny_tokenizer
from transformers import BertConfig, BertModel

from hf_slim import is_slim, load_slim, slim_record
from hf_slim.cli import main
from hf_slim.export import CONFIG_KEY, SIDECAR

DATA = Path(__file__).parent / "data"
SCRIPT = Path(sys.executable).parent / "hf-slim"
COMMANDS = ["transcribe", "generate", "export", "verify", "memory"]
SAMPLE_TEXT = "Thank you very much for your help yesterday."


@pytest.fixture(scope="module")
def env(bundled_whisper_cache) -> dict:
    """Subprocess environment: offline, the session's converted Whisper tiny.en cache, one thread (tiny models gain
    nothing from more, and on a shared machine OpenMP threads waiting for each other cost 10-100x)."""
    return {**os.environ, "HF_SLIM_CACHE": str(bundled_whisper_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def hf_slim(*args, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "hf_slim.cli"]
    result = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, f"hf-slim {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("t5")
    tiny_t5().save_pretrained(folder)
    tiny_t5_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory, bundled_whisper_cache) -> Path:
    """A random 1+2-layer Whisper (d=32) with tiny.en's vocabulary, audio front end, processor and generation config
    (30 s windows, timestamps), so long-form transcription runs in seconds."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    from hf_slim.bundled import whisper_tiny_en_dir

    source = whisper_tiny_en_dir(bundled_whisper_cache)
    config = WhisperConfig.from_pretrained(source)
    config.update(dict(
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, init_std=0.2,
    ))  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig.from_pretrained(source)
    model.generation_config.max_length = 12  # random weights: keep every window's greedy decode short
    model.generation_config.suppress_tokens = []
    folder = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(folder)
    WhisperProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory) -> Path:
    """The test sentences and the sample twice, with short pauses: 37 s, more than one 30 s Whisper window."""
    from hf_slim.audio import load_wav
    from hf_slim.bundled import sample_audio_path

    parts = []
    for path in [*sorted(DATA.glob("*.wav")), sample_audio_path()]:
        parts += [load_wav(path)[0], np.zeros(4000, np.float32)]
    samples = np.concatenate(parts * 2)
    assert len(samples) > 31 * 16_000
    path = tmp_path_factory.mktemp("audio") / "long.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def cache_numbers(stdout: str) -> tuple[int, int, float]:
    match = re.search(r"cache bytes: slim (\d+) .*?, vanilla (\d+) .*?, ratio ([\d.]+)x", stdout)
    assert match, stdout
    return int(match[1]), int(match[2]), float(match[3])


# ------------------------------------------------------------------------------------------------- transcribe


def test_transcribe_compare_bundled_sample(env):
    result = hf_slim("transcribe", "--compare", env=env)
    out = result.stdout
    assert f"slim:    {SAMPLE_TEXT}" in out and f"vanilla: {SAMPLE_TEXT}" in out, out
    assert "transcripts identical: yes" in out
    slim, vanilla, ratio = cache_numbers(out)
    layers, d_model, frames, fp32 = 4, 384, 1500, 4
    tokens = slim // (layers * d_model * fp32)
    assert slim == layers * tokens * d_model * fp32, "slim: one (tokens, d_model) tensor per decoder layer"
    assert vanilla == 2 * slim + 2 * layers * frames * d_model * fp32, "vanilla: K and V, plus the cross-attention K/V"
    assert ratio == pytest.approx(vanilla / slim, rel=1e-2) and ratio > 100
    assert "Traceback" not in result.stderr


def test_transcribe_long_audio_in_30s_windows(env, tiny_whisper_dir, long_wav):
    result = hf_slim("transcribe", long_wav, "--model", tiny_whisper_dir, "--compare", env=env)
    out = result.stdout
    assert "long.wav (36.9 s, 2 windows of 30 s" in out, out
    assert "transcripts identical: yes" in out
    slim, vanilla, _ = cache_numbers(out)
    assert 0 < slim < vanilla


# -------------------------------------------------------------------------------- export, generate, verify


def test_export_then_generate_from_the_slim_checkpoint(env, gpt2_dir, tmp_path):
    out_dir = tmp_path / "slim"
    result = hf_slim("export", "--model", gpt2_dir, "--out", out_dir, "--mode", "k", env=env)
    assert "exported slim checkpoint" in result.stdout and "2 k" in result.stdout, result.stdout
    assert (out_dir / SIDECAR).is_file() and (out_dir / "tokenizer.json").is_file()
    settings = json.loads((out_dir / "config.json").read_text())[CONFIG_KEY]
    assert set(settings["layer_modes"].values()) == {"k"}
    model = load_slim(out_dir)
    assert is_slim(model) and slim_record(model).layer_modes == settings["layer_modes"]

    result = hf_slim(
        "generate", "--model", out_dir, "the quick brown fox", "--max-new-tokens", 12, "--compare", env=env
    )
    assert "outputs identical: yes" in result.stdout, result.stdout
    slim, vanilla, ratio = cache_numbers(result.stdout)
    assert vanilla == 2 * slim and ratio == 2.0


def test_generate_t5_in_process(t5_dir, capsys):
    assert main(["generate", "--model", str(t5_dir), "summarize: the quick brown fox", "--max-new-tokens", "8",
                 "--compare"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "outputs identical: yes" in out, out
    slim, vanilla, _ = cache_numbers(out)
    assert 0 < slim < vanilla


def test_verify_reports_per_layer_errors_and_greedy_equality(env, gpt2_dir):
    result = hf_slim("verify", "--model", gpt2_dir, "--mode", "k", env=env)
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith("GPT2Attention")]
    assert len(rows) == 2 and all(row[2] == "k" for row in rows), result.stdout
    for row in rows:
        rank, k_error, vanilla_error = int(row[4]), float(row[5]), float(row[6])
        assert rank == 0, "random GPT-2 weights are well conditioned: the plain K cache is exact in float32"
        assert 0 < vanilla_error <= k_error < 1e-4
    assert "greedy outputs: identical to the unpatched model" in result.stdout


def test_verify_bf16_in_process_reports_k_plus_r_ranks_and_fallbacks(gpt2_dir, capsys, monkeypatch):
    """bf16 rounding of the keys is amplified by cond(W_K): the plain K cache is inexact, K+R keeps r > 0 input
    directions beside K (rank and cache ratio per layer); with the rank cap at 0 the input cache is kept instead."""
    from hf_slim import kmode

    argv = ["verify", "--model", str(gpt2_dir), "--dtype", "bf16", "--mode", "k", "--max-new-tokens", "8"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("GPT2Attention")]
    assert rows and all(row[2] == "k" and int(row[4]) > 0 for row in rows), captured.out
    assert all(float(row[-1].rstrip("x")) == pytest.approx(128 / (64 + int(row[4])), abs=0.01) for row in rows)
    assert "bfloat16" in captured.out and "identical to the unpatched model" in captured.out

    monkeypatch.setattr(kmode, "max_residual_rank", lambda d_model: 0)
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("GPT2Attention")]
    assert rows and all(row[2] == "input" and row[4] == "0" for row in rows), captured.out
    assert "K cache refused" in captured.err
    assert "identical to the unpatched model" in captured.out


# ------------------------------------------------------------------------------------------------------ memory


def test_memory_table_and_plot(env, gpt2_dir, tmp_path):
    plot = tmp_path / "plots" / "memory.png"
    result = hf_slim("memory", "--model", gpt2_dir, "--seq-len", 512, "--batch", 4, "--plot", plot, env=env)
    assert "gpt2: batch 4, 512 tokens, float32" in result.stdout
    assert re.search(r"total\s+2\.0 MiB\s+1\.0 MiB\s+2\.00x", result.stdout), result.stdout
    assert plot.is_file() and plot.stat().st_size > 10_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_from_config_json_t5_11b_shape(tmp_path, capsys):
    """T5-11B attention shape (d_model 1024, 128 heads of 128): the input cache is 32x smaller than K+V per
    self-attention layer, and the cross-attention cache is gone (64x in total)."""
    config = dict(model_type="t5", architectures=["T5ForConditionalGeneration"], d_model=1024, d_kv=128, num_heads=128,
                  d_ff=65536, num_layers=24, num_decoder_layers=24, vocab_size=32128)  # fmt: skip
    path = tmp_path / "t5-11b.json"
    path.write_text(json.dumps(config))
    assert main(["memory", "--config", str(path), "--seq-len", "512", "--encoder-len", "512", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"T5Attention\[self 0\]\s+input\s+32\.0 MiB\s+1\.0 MiB", out), out
    assert re.search(r"T5Attention\[cross 0\]\s+encoder\s+32\.0 MiB\s+0 B", out), out
    assert re.search(r"total\s+1\.5 GiB\s+24\.0 MiB\s+64\.00x", out), out
    assert "total incl. encoder output" in out


# --------------------------------------------------------------------------------------------- help and errors


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-slim" in capsys.readouterr().out


def test_bad_input_subprocess_is_one_line_without_traceback(env, tmp_path):
    result = hf_slim("generate", "--model", tmp_path / "missing", "hello", env=env, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"hf-slim generate: error: model folder not found: {tmp_path / 'missing'}"
    ]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(folder)
    return folder


BAD_INPUT = {
    "missing audio": (lambda d: ["transcribe", "nowhere.wav"], "audio file not found: nowhere.wav"),
    "audio not a wav": (lambda d: ["transcribe", str(d["gpt2"] / "config.json")], "not a readable PCM WAV file"),
    "transcribe a text model": (lambda d: ["transcribe", "--model", str(d["gpt2"])], "needs a Whisper model"),
    "unsupported model": (lambda d: ["export", "--model", str(d["bert"]), "--out", "x"], "cannot patch 'bert'"),
    "not a checkpoint": (lambda d: ["verify", "--model", str(DATA)], "has no config.json"),
    "export onto itself": (lambda d: ["export", "--model", str(d["gpt2"]), "--out", str(d["gpt2"])], "--out must"),
    "missing config json": (lambda d: ["memory", "--config", "nowhere.json"], "config file not found: nowhere.json"),
    "bad sequence length": (lambda d: ["memory", "--model", str(d["gpt2"]), "--seq-len", "0"], "must be positive"),
    "generate unsupported": (lambda d: ["generate", "--model", str(d["bert"]), "hi"], "cannot patch 'bert'"),
    "generate whisper": (lambda d: ["generate", "--model", str(d["whisper"]), "hi"], "use hf-slim transcribe"),
}  # fmt: skip
USAGE_ERRORS = {
    "bad dtype": (["verify", "--dtype", "fp8"], "argument --dtype: unknown dtype 'fp8' (use fp32, fp16 or bf16)"),
    "bad mode": (["export", "--out", "x", "--mode", "v"], "argument --mode: invalid choice: 'v'"),
    "no command": ([], "choose a command"),
    "missing prompt": (["generate", "--model", "x"], "the following arguments are required: PROMPT"),
    "memory without source": (["memory"], "one of the arguments --model --config is required"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(case, gpt2_dir, bert_dir, tiny_whisper_dir, capsys):
    arguments, message = BAD_INPUT[case]
    assert main(arguments({"gpt2": gpt2_dir, "bert": bert_dir, "whisper": tiny_whisper_dir})) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert errors[0].startswith("hf-slim ") and "Traceback" not in err


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_exit_2(case, capsys):
    arguments, message = USAGE_ERRORS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_tokenizer_missing_is_one_line(gpt2_dir, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(gpt2_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert main(["generate", "--model", str(folder), "hi"]) == 1
    assert "has no usable tokenizer files" in capsys.readouterr().err
