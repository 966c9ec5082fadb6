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
from test_input_errors import BAD_WAV
from tiny_models import tiny_gpt2, tiny_rope, tiny_t5_tokenizer, tiny_tokenizer
from transformers import AutoTokenizer, BertConfig, BertModel, GPT2LMHeadModel

from hf_slim import calibration, is_slim, kmode, load_slim, slim_record
from hf_slim.app.cli.main import main
from hf_slim.export import CONFIG_KEY, SIDECAR
from hf_slim.kmode import choose_residual_rank

DATA = Path(__file__).parent / "data"
SCRIPT = Path(sys.executable).parent / "hf-slim"
COMMANDS = ["transcribe", "generate", "export", "verify", "memory"]
SAMPLE_TEXT = "Thank you very much for your help yesterday."


@pytest.fixture(scope="module")
def env(bundled_whisper_cache) -> dict:
    """Subprocess environment: offline, the session's converted Whisper tiny.en cache, one thread (tiny models gain
    nothing from more, and on a shared machine OpenMP threads waiting for each other cost 10-100x)."""
    return {**os.environ, "HF_SLIM_CACHE": str(bundled_whisper_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def hf_slim(*args, env: dict, check: bool = True, umask: int = -1) -> subprocess.CompletedProcess:
    """Run the ``hf-slim`` command (``umask``: the subprocess's, -1: inherited)."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "hf_slim.app.cli"]
    result = subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300, umask=umask
    )
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
def llama_dir(tmp_path_factory) -> Path:
    """A tiny RoPE model: its default mode is K mode, so slimify calibrates."""
    folder = tmp_path_factory.mktemp("llama")
    tiny_rope("llama").save_pretrained(folder)
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
    from hf_slim.app.audio import load_wav
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


@pytest.fixture(scope="module")
def plain_env() -> dict:
    """Subprocess environment for commands that never reach the bundled Whisper (no conversion needed)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def terminal_lines(stream: str) -> list[str]:
    """The non-empty lines a terminal shows for ``stream``: a carriage return (how progress bars redraw and erase
    themselves) moves back to the start of the line, and what follows overwrites what was there."""
    shown = []
    for line in stream.split("\n"):
        screen = ""
        for segment in line.split("\r"):
            screen = segment + screen[len(segment) :]
        if screen.strip():
            shown.append(screen.rstrip())
    return shown


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


def test_transcribe_bar_counts_audio_seconds_and_files_on_a_terminal(tiny_whisper_dir, long_wav, capsys, monkeypatch):
    """On a terminal the bar counts audio seconds (its rate is audio seconds per second, its ETA weighs long files
    as they are) and files; the long file advances it window by window."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    arguments = [str(DATA / "finish_report.wav"), str(long_wav), "--model", str(tiny_whisper_dir), "--batch-size", "1"]
    assert main(["transcribe", *arguments]) == 0
    frames = capsys.readouterr().err.split("\r")
    bar = r"transcribing: +(\d+)%\|[^|]*\| (\d+)/41 s audio, (\d)/2 files \[[\d:]+<[\d:?]+, +(?:[\d.]+|\?) s audio/s\]"
    shown = [re.match(bar, frame.strip()) for frame in frames]
    shown = [(int(match[2]), int(match[3])) for match in shown if match]
    assert shown and shown[0] == (0, 0), frames


def test_transcription_progress_adds_up_window_by_window(tiny_whisper_dir, long_wav):
    """``transcribe_tasks`` reports audio seconds as the long file's 30 s windows finish (files 0), then each
    batch's files; the seconds add up to the durations from the headers."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from hf_slim.app.bulk import AudioTask, JobReport, check_audio, transcribe_tasks

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).eval()
    processor = WhisperProcessor.from_pretrained(tiny_whisper_dir)
    tasks = check_audio([AudioTask(long_wav, None), AudioTask(DATA / "finish_report.wav", None)], JobReport(), print)
    calls = []
    transcribe_tasks(model, processor, tasks, batch_size=2, progress=lambda *call: calls.append(call))
    # the short file, the long file's first window (the last one ends with generate), then the batch's files
    assert calls[:2] == [(0, pytest.approx(tasks[1].duration)), (0, 30.0)] and calls[-1][0] == 2, calls
    assert sum(files for files, _ in calls) == 2
    assert sum(seconds for _, seconds in calls) == pytest.approx(sum(task.duration for task in tasks))


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
    widths = [64 + rank for rank in settings["residual_ranks"].values()]  # e + r per K+R layer
    assert vanilla * sum(widths) == 2 * 64 * len(widths) * slim, (vanilla, slim, widths)
    assert ratio == pytest.approx(2 * 64 * len(widths) / sum(widths), abs=0.01)


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
        # random GPT-2 W_K (cond ~1e2): the plain fp32 K cache is off by 2-6e-6, above the floor; r = 16 is exact
        assert rank == 16 and 0 < vanilla_error <= k_error <= max(4 * vanilla_error, kmode.K_MODE_ABSOLUTE_FLOOR), row
    assert "greedy outputs: identical to the unpatched model" in result.stdout


@pytest.mark.parametrize(("folder", "mode"), [("llama_dir", None), ("gpt2_dir", "k"), ("gpt2_dir", None)])
def test_verify_calibrates_each_layer_once(folder, mode, request, capsys, monkeypatch):
    """verify used to calibrate twice where the verified mode is K mode (the K numbers, then the mode itself, which
    on RoPE models is K mode by default); the K numbers of an input-mode verify are the one calibration."""
    calibrated = []

    def counting(projections, *args, **kwargs):
        calibrated.append(projections.w_k.shape)
        return choose_residual_rank(projections, *args, **kwargs)

    monkeypatch.setattr(calibration, "choose_residual_rank", counting)
    argv = ["verify", "--model", str(request.getfixturevalue(folder)), "--max-new-tokens", "4"]
    assert main(argv + (["--mode", mode] if mode else [])) == 0
    captured = capsys.readouterr()
    assert len(calibrated) == 2, calibrated  # two layers, once each
    rows = [line.split() for line in captured.out.splitlines() if "Attention[self" in line]
    assert len(rows) == 2 and all(row[4] != "-" for row in rows), captured.out  # every layer has its K numbers
    assert captured.err.count("hf_slim: ") == 1, captured.err  # the summary of the verified mode only


def test_calibration_bar_names_the_layer_on_a_terminal(llama_dir, capsys, monkeypatch):
    """main() switches transformers' bars off (from_pretrained's); slimify's calibration bar is still drawn, with the
    layer (and rank) being calibrated, and slimify's summary is printed after it."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["generate", "--model", str(llama_dir), "--max-new-tokens", "2", "the quick brown fox"]) == 0
    err = capsys.readouterr().err
    assert "hf_slim: K+R calibration" in err and "LlamaAttention[self 1], r = " in err, repr(err)
    summary = r"hf_slim: 2 layers K\+R \(r \d+(?:-\d+)?\); cache [\d.]+x smaller than K/V at 32 tokens"
    summaries = re.findall(summary, err)
    assert len(summaries) == 1, repr(err)


def test_verify_bf16_in_process_reports_k_plus_r_ranks_and_fallbacks(gpt2_dir, capsys, monkeypatch):
    """bf16 rounding of the keys is amplified by cond(W_K): the plain K cache is inexact, K+R keeps r > 0 input
    directions beside K (rank and cache ratio per layer); with the rank cap at 0 the input cache is kept instead."""
    argv = ["verify", "--model", str(gpt2_dir), "--dtype", "bf16", "--mode", "k", "--max-new-tokens", "8"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("GPT2Attention")]
    assert rows and all(row[2] == "k" and int(row[4]) > 0 for row in rows), captured.out
    assert all(float(row[-1].rstrip("x")) == pytest.approx(128 / (64 + int(row[4])), abs=0.01) for row in rows)
    assert "bfloat16" in captured.out and "identical to the unpatched model" in captured.out

    monkeypatch.setattr(kmode.factorisation, "max_residual_rank", lambda d_model: 0)
    assert main(argv) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("GPT2Attention")]
    assert rows and all(row[2] == "input" and row[4] == "0" for row in rows), captured.out
    assert "K cache refused" in captured.err
    assert "identical to the unpatched model" in captured.out


def test_verify_shows_cond_of_a_singular_rope_layer(tmp_path, capsys):
    """A RoPE layer whose W_K is singular beyond the K+R cap keeps its own K/V ("kv"); verify still prints the
    cond(W_K) that decided it, and "-" only for the numbers no rank measured."""
    from tiny_models import tiny_rope

    model = tiny_rope("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[:, :40] = 0  # rank 24 of 64
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert main(["verify", "--model", str(tmp_path), "--mode", "k", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("LlamaAttention[self 0]"))
    assert row[2] == "kv" and float(row[3]) > 1e12 and row[4:] == ["-"] * 5, out


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


@pytest.fixture(scope="module")
def bad_calibration_dir(tmp_path_factory, gpt2_dir) -> Path:
    """A slim GPT-2 checkpoint whose config.json calibration entry was hand-edited into a string."""
    folder = tmp_path_factory.mktemp("bad-calibration")
    assert main(["export", "--model", str(gpt2_dir), "--out", str(folder), "--mode", "input"]) == 0
    config = json.loads((folder / "config.json").read_text())
    config[CONFIG_KEY]["calibration"] = "cond 12.5"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD_INPUT = {
    "missing audio": (lambda d: ["transcribe", "nowhere.wav"], "audio file not found: nowhere.wav"),
    "audio not audio": (lambda d: ["transcribe", str(d["gpt2"] / "config.json")], "cannot decode this audio file"),
    "transcribe a text model": (lambda d: ["transcribe", "--model", str(d["gpt2"])], "needs a Whisper model"),
    "unsupported model": (lambda d: ["export", "--model", str(d["bert"]), "--out", "x"], "cannot patch 'bert'"),
    "not a checkpoint": (lambda d: ["verify", "--model", str(DATA)], "has no config.json"),
    "export onto itself": (lambda d: ["export", "--model", str(d["gpt2"]), "--out", str(d["gpt2"])], "--out must"),
    "config folder instead of file": (
        lambda d: ["memory", "--config", str(d["gpt2"])], "--config takes a config.json file; "
    ),
    "missing config json": (lambda d: ["memory", "--config", "nowhere.json"], "config file not found: nowhere.json"),
    "encoder length of a decoder-only model": (
        lambda d: ["memory", "--model", str(d["gpt2"]), "--encoder-len", "30"],
        "--encoder-len is for encoder-decoder models (Whisper, T5); gpt2 has none",
    ),
    "plot file without a type": (
        lambda d: ["memory", "--model", str(d["gpt2"]), "--plot", "memory"],
        "--plot memory: name a .png, .svg or .pdf file",
    ),
    "prompt plus new tokens beyond the positions": (
        lambda d: ["generate", "--model", str(d["gpt2"]), "the quick brown fox", "--max-new-tokens", "300"],
        "plus --max-new-tokens 300 needs",
    ),
    "verify prompt beyond the positions": (
        lambda d: ["verify", "--model", str(d["gpt2"]), "--prompt", " ".join(["the quick brown fox"] * 100)],
        "the --prompt is",
    ),
    "hub id instead of a folder": (
        lambda d: ["generate", "--model", "openai/whisper-tiny", "hi"],
        "download it first with: hf download openai/whisper-tiny --local-dir DIR",
    ),
    "audio folder without audio": (lambda d: ["transcribe", str(DATA / "configs")], "no audio files in this folder"),
    "format without output folder": (lambda d: ["transcribe", "--format", "srt"], "--format srt writes files: give"),
    "pattern matching nothing": (lambda d: ["transcribe", str(DATA / "*.nothing")], "no file matches this pattern"),
    "audio not a regular file": (lambda d: ["transcribe", os.devnull], f"{os.devnull} is not a regular file"),
    "verify audio of a text model": (
        lambda d: ["verify", "--model", str(d["gpt2"]), "--audio", str(DATA / "finish_report.wav")],
        "--audio is for Whisper models; gpt2 takes text (use --prompt)",
    ),
    "malformed calibration in a slim checkpoint": (
        lambda d: ["generate", "--model", str(d["bad calibration"]), "hi"],
        "config.json['hf_slim']['calibration'] must be an object mapping layer names to their numbers, got str",
    ),
    "generate unsupported": (lambda d: ["generate", "--model", str(d["bert"]), "hi"], "cannot patch 'bert'"),
    "generate whisper": (lambda d: ["generate", "--model", str(d["whisper"]), "hi"], "use hf-slim transcribe"),
}  # fmt: skip
USAGE_ERRORS = {
    "bad dtype": (["verify", "--dtype", "fp8"], "argument --dtype: unknown dtype 'fp8' (use fp32, fp16 or bf16)"),
    "meta device": (["verify", "--device", "meta"], "argument --device: 'meta' holds no weights (shapes only)"),
    "bad mode": (["export", "--out", "x", "--mode", "v"], "argument --mode: invalid choice: 'v'"),
    "no command": ([], "choose a command"),
    "missing prompt": (["generate", "--model", "x"], "give a PROMPT, or --input PROMPTS.jsonl for a bulk job"),
    "bad memory size": (["transcribe", "--max-memory", "lots"], "not a memory size: 'lots' (use e.g. 8GiB"),
    "batch size and memory": (["transcribe", "--batch-size", "2", "--max-memory", "1GiB"], "not allowed with"),
    "memory without source": (["memory"], "one of the arguments --model --config is required"),
    "zero sequence length": (["memory", "--config", "c", "--seq-len", "0"], "--seq-len: must be at least 1, got 0"),
    "negative encoder length": (["memory", "--config", "c", "--encoder-len", "-5"], "--encoder-len: must be at least"),
    "zero batch": (["memory", "--config", "c", "--batch", "0"], "argument --batch: must be at least 1, got 0"),
    "zero new tokens": (["generate", "--model", "x", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be at"),
    "new tokens not a number": (["verify", "--max-new-tokens", "ten"], "expected a positive whole number, got 'ten'"),
    "unknown device": (["transcribe", "--device", "gpu"], "--device: unknown device 'gpu' (use cpu, cuda, cuda:N or"),
    "device not on this machine": (["export", "--out", "x", "--device", "cuda:99"], "argument --device: 'cuda:99': "),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(case, gpt2_dir, bert_dir, tiny_whisper_dir, bad_calibration_dir, capsys):
    arguments, message = BAD_INPUT[case]
    folders = {"gpt2": gpt2_dir, "bert": bert_dir, "whisper": tiny_whisper_dir, "bad calibration": bad_calibration_dir}
    assert main(arguments(folders)) == 1
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


# ----------------------------------------------------------------------- errors a new user runs into, one per item


def test_prompt_longer_than_the_model_positions_is_one_line(plain_env, gpt2_dir):
    """Was ``IndexError: index out of range in self`` from the position embedding, after loading the model."""
    prompt = " ".join(["the quick brown fox"] * 100)
    tokens = len(AutoTokenizer.from_pretrained(gpt2_dir)(prompt)["input_ids"])
    assert tokens > 256
    result = hf_slim("generate", "--model", gpt2_dir, prompt, env=plain_env, check=False)
    assert result.returncode == 1
    assert terminal_lines(result.stderr) == [
        f"hf-slim generate: error: the prompt is {tokens} tokens, but this gpt2 model has 256 positions "
        "(n_positions): shorten it to fewer than 256 tokens"
    ], result.stderr


def test_empty_wav_is_one_line_not_a_transcript(plain_env, tmp_path):
    """Was transcribed as "you" with exit status 0 (Whisper hears the padding silence)."""
    path = BAD_WAV["empty"][0](tmp_path / "empty.wav")
    result = hf_slim("transcribe", path, env=plain_env, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert terminal_lines(result.stderr) == [
        f"hf-slim transcribe: error: {path}: the file holds no audio samples (empty, or truncated after its "
        "header); record or export it again"
    ], result.stderr


@pytest.mark.parametrize("case", list(BAD_WAV))
def test_bad_wav_is_one_clear_line(case, tmp_path, capsys):
    write, message = BAD_WAV[case]
    assert main(["transcribe", str(write(tmp_path / "audio.wav"))]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and re.fullmatch(
        rf"hf-slim transcribe: error: \S+audio.wav: .*{message}.*\n", captured.err
    )


def test_plot_without_matplotlib_says_what_to_install(gpt2_dir, tmp_path, monkeypatch, capsys):
    """Was ``No module named 'matplotlib'`` after printing the table. None in sys.modules makes an import fail (for
    the submodules too: an earlier test may have imported them)."""
    for name in ["matplotlib", *(name for name in sys.modules if name.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)
    plot = tmp_path / "memory.png"
    assert main(["memory", "--model", str(gpt2_dir), "--plot", str(plot)]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        'hf-slim memory: error: --plot needs matplotlib, which is not installed: pip install "hf-slim[plot]" '
        "(or pip install matplotlib)\n"
    )
    assert captured.out == "" and not plot.exists(), "nothing is computed or written before the check"


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("command", ["generate", "verify"])
def test_error_under_a_progress_bar_starts_on_a_clean_line(command, interruption, gpt2_dir, monkeypatch, capsys):
    """A failure (or Ctrl-C) while a progress bar is drawn: the bar is erased, and the message alone is left on the
    terminal instead of being appended to the bar."""
    original, calls = GPT2LMHeadModel.forward, []

    def forward_failing_at_the_third_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise interruption("stopped in the middle of generation")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "forward", forward_failing_at_the_third_step)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are drawn on terminals only
    arguments = {"generate": ["the quick brown fox"], "verify": []}[command]
    status = main([command, "--model", str(gpt2_dir), *arguments])
    err = capsys.readouterr().err
    assert {"generate": "generating:", "verify": "verifying:"}[command] in err, "the bar was drawn"
    lines = terminal_lines(err)
    assert all(line.startswith("hf_slim: ") for line in lines[:-1]), repr(err)  # slimify's summary, on its own line
    if interruption is KeyboardInterrupt:
        assert status == 130 and lines[-1] == f"hf-slim {command}: interrupted", repr(err)
    else:
        message = f"hf-slim {command}: error: RuntimeError: stopped in the middle of generation"
        assert status == 1 and lines[-1] == message, repr(err)


def test_no_progress_bar_when_stderr_is_not_a_terminal(gpt2_dir, capsys):
    """Piped or captured stderr gets no bars (tqdm's rule), only the lines meant for it: slimify's summary."""
    assert main(["generate", "--model", str(gpt2_dir), "--max-new-tokens", "4", "the quick brown fox"]) == 0
    assert capsys.readouterr().err == "hf_slim: 2 layers input (X); cache 2.00x smaller than K/V at 256 tokens\n"


def test_memory_beyond_the_model_positions_is_noted(gpt2_dir, capsys):
    """The arithmetic is still shown (what-if sizes), with a note that this model cannot run that context."""
    assert main(["memory", "--model", str(gpt2_dir), "--seq-len", "1000"]) == 0
    captured = capsys.readouterr()
    assert "gpt2: batch 1, 1000 tokens" in captured.out
    assert captured.err == "note: gpt2 has 256 positions (n_positions): it cannot run 1000 tokens\n"
