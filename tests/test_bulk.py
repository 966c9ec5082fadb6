"""Bulk jobs: audio formats through soundfile/soxr/PyAV, batched transcription of a mixed folder to txt/srt/vtt/json
identical to the unpatched model file by file, a killed run resumed, --max-memory batch planning, encoder
micro-batches, JSONL generate (resumable, beams), and the same jobs on a local Ray with 2 CPU workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import hf_slim, terminal_lines
from test_export import one_thread  # noqa: F401 (autouse fixture)
from tiny_models import tiny_gpt2, tiny_tokenizer

from hf_slim.app.audio import load_audio, probe_audio
from hf_slim.app.budget import batch_memory, encoder_micro_batches, largest_batch, parse_size
from hf_slim.app.bulk import batches, completed_ids, find_audio, generate_batch
from hf_slim.app.cli.main import main
from hf_slim.app.outputs import TEMP_PREFIX, render, write_atomic
from hf_slim.app.transcription import Segment, Transcription, transcribe_batch
from hf_slim.memory import cache_report

DATA = Path(__file__).parent / "data"
SENTENCES = json.loads((DATA / "sentences.json").read_text())
#: the committed compressed copies of the test sentences (made once with ffmpeg from the WAV files)
COMPRESSED = ["finish_report.flac", "train_station.mp3", "send_document.ogg", "reading_garden.m4a"]


@pytest.fixture(scope="module")
def env(bundled_whisper_cache) -> dict:
    return {**os.environ, "HF_SLIM_CACHE": str(bundled_whisper_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """WAV, FLAC, MP3 (44.1 kHz stereo), OGG (22.05 kHz) and M4A in nested folders, distinct names, and a WAV
    copy of the bundled sample: 6 files."""
    from hf_slim.bundled import sample_audio_path

    folder = tmp_path_factory.mktemp("mixed")
    (folder / "calls").mkdir()
    for name in COMPRESSED:
        shutil.copy(DATA / name, folder / "calls" / name)
    shutil.copy(DATA / "train_station.wav", folder / "station_again.wav")
    shutil.copy(sample_audio_path(), folder / "sample.wav")
    return folder


# ---------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("name", COMPRESSED)
def test_every_format_decodes_to_16k_mono_close_to_the_source(name):
    """FLAC is lossless: the WAV's samples exactly. MP3 (44.1 kHz stereo), OGG (22.05 kHz) and M4A (AAC) are lossy
    and resampled by soxr: the same length (AAC: plus its codec delay) and waveform."""
    if name.endswith(".m4a"):
        pytest.importorskip("av", reason='M4A needs PyAV: pip install "hf-slim[av]"')
    reference, _ = load_audio(DATA / name.replace(Path(name).suffix, ".wav"))
    samples, rate = load_audio(DATA / name)
    assert rate == 16_000 and samples.dtype == np.float32 and samples.ndim == 1
    assert probe_audio(DATA / name) == pytest.approx(len(reference) / 16_000, abs=0.1)
    if name.endswith(".flac"):
        assert np.array_equal(samples, reference)
        return
    assert abs(len(samples) - len(reference)) <= 2048, (len(samples), len(reference))
    # align (codecs add a delay of up to ~1k samples), then compare the waveforms
    n = min(len(samples), len(reference)) - 2048
    best = max(np.corrcoef(samples[lag : lag + n], reference[:n])[0, 1] for lag in range(0, 2048, 1))
    assert best > 0.9, best


def test_m4a_without_pyav_says_what_to_install(monkeypatch):
    import hf_slim.app.audio

    monkeypatch.setattr(hf_slim.app.audio, "_pyav", lambda: None)
    with pytest.raises(ValueError, match=r"reading_garden.m4a: cannot decode .*install PyAV .*: pip install av"):
        load_audio(DATA / "reading_garden.m4a")


@pytest.mark.parametrize("suffix", [".flac", ".mp3", ".ogg"])
def test_cut_off_compressed_files_are_refused(tmp_path, suffix):
    name = next(name for name in COMPRESSED if name.endswith(suffix))
    data = (DATA / name).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"cut{suffix}: .*(truncated|cannot decode)"):
        load_audio(cut)


def test_find_audio_files_folders_and_patterns(mixed_dir):
    found = find_audio([str(mixed_dir)])
    assert [file.relative_to(mixed_dir).as_posix() for file, _ in found] == [
        "calls/finish_report.flac", "calls/reading_garden.m4a", "calls/send_document.ogg", "calls/train_station.mp3",
        "sample.wav", "station_again.wav",
    ]  # fmt: skip
    assert all(root == mixed_dir for _, root in found)
    pattern = find_audio([str(mixed_dir / "**" / "*.mp3"), str(mixed_dir / "sample.wav")])
    assert [(file.name, root) for file, root in pattern] == [
        ("train_station.mp3", mixed_dir), ("sample.wav", mixed_dir)
    ]  # fmt: skip
    assert len(find_audio([str(mixed_dir), str(mixed_dir / "sample.wav")])) == 6, "each file once"


# ---------------------------------------------------------------------------------------------------- outputs


def test_render_formats():
    result = Transcription(
        text="Hello there. General Kenobi.", duration=3725.5, language="en", token_ids=[1, 2],
        segments=[Segment(0.0, 1.5, "Hello there."), Segment(3723.25, 3725.5, "General Kenobi.")],
    )  # fmt: skip
    assert render(result, "txt") == "Hello there. General Kenobi.\n"
    assert render(result, "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n2\n01:02:03,250 --> 01:02:05,500\nGeneral Kenobi.\n"
    )
    assert render(result, "vtt").startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n01:02:03.250")
    document = json.loads(render(result, "json", source="a.wav"))
    assert document == {
        "source": "a.wav", "text": "Hello there. General Kenobi.", "language": "en", "duration": 3725.5,
        "segments": [{"start": 0.0, "end": 1.5, "text": "Hello there."},
                     {"start": 3723.25, "end": 3725.5, "text": "General Kenobi."}],
        "token_ids": [1, 2],
    }  # fmt: skip


def test_write_atomic_leaves_the_old_file_or_a_complete_new_one(tmp_path, monkeypatch):
    target = tmp_path / "out" / "a.srt"
    write_atomic(target, "first\n")
    assert target.read_text() == "first\n"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "second, never complete\n")
    assert target.read_text() == "first\n", "the old output is untouched"
    assert [path.name for path in target.parent.iterdir()] == ["a.srt"], "no temporary file is left"


# ------------------------------------------------------------------------------- transcription, real tiny.en


def reference_ids(model, processor, samples: np.ndarray) -> list[int]:
    """Plain transformers: the unpatched model, this clip alone (batch 1), timestamps, no hf_slim code path."""
    from hf_slim.app.transcription import _content_ids

    features = processor.feature_extractor(samples, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        out = model.generate(features, return_timestamps=True, return_segments=True)
    return _content_ids(model, out["sequences"][0])


@pytest.mark.parametrize("fmt", ["json", "srt"])
def test_mixed_folder_in_batches_matches_the_unpatched_model_file_by_file(fmt, env, mixed_dir, tmp_path,
                                                                          bundled_whisper):  # fmt: skip
    """6 files of 5 formats, batches of 4 and 2: every output is the unpatched model's, each file transcribed alone
    (token ids, timestamp tokens included) — slim and batching change nothing."""
    pytest.importorskip("av")
    out = tmp_path / fmt
    result = hf_slim("transcribe", mixed_dir, "--output-dir", out, "--format", fmt, "--batch-size", 4, env=env)
    assert f"wrote 6 {fmt} file(s) to {out}" in result.stdout, result.stdout
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file())
    expected = [f"calls/{Path(name).stem}.{fmt}" for name in sorted(COMPRESSED)]
    assert written == [*expected, f"sample.{fmt}", f"station_again.{fmt}"]
    model, processor = bundled_whisper
    texts = {Path(name).stem: text for name, text in SENTENCES.items()} | {"sample": "Thank you very much for your "
             "help yesterday.", "station_again": SENTENCES["train_station.wav"]}  # fmt: skip
    for file, _ in find_audio([str(mixed_dir)]):
        target = out / file.relative_to(mixed_dir).with_suffix(f".{fmt}")
        text = target.read_text()
        if fmt == "json":
            document = json.loads(text)
            assert document["token_ids"] == reference_ids(model, processor, load_audio(file)[0]), file
            assert document["text"] == texts[file.stem] and document["language"] == "en"
            assert document["segments"] and document["segments"][-1]["end"] <= document["duration"] + 1e-6
        else:
            assert text.startswith("1\n00:00:00,000 --> 00:00:0") and texts[file.stem] in text, text


def test_killed_run_resumes_and_leaves_every_output_complete(env, mixed_dir, tmp_path):
    """SIGKILL after the first output appears (batch 1), then the same command again: every output is complete
    and byte-identical to an uninterrupted run's; the second run skips what the first finished."""
    pytest.importorskip("av")
    command = [sys.executable, "-m", "hf_slim.app.cli", "transcribe", str(mixed_dir), "--format", "json"]
    out = tmp_path / "resumed"
    process = subprocess.Popen([*command, "--output-dir", str(out), "--batch-size", "1"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def finished() -> list[Path]:
        return [path for path in out.rglob("*.json") if not path.name.startswith(TEMP_PREFIX)]

    deadline = time.monotonic() + 240
    while not finished() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    finished = finished()
    assert 1 <= len(finished) < 6, f"killed after {len(finished)} of 6 outputs: the test did not kill mid-run"
    for path in finished:
        json.loads(path.read_text())  # complete
    rerun = hf_slim(*command[3:], "--output-dir", out, "--batch-size", 1, env=env)
    assert f"({len(finished)} skipped (already done))" in rerun.stdout, rerun.stdout
    assert not [path for path in out.rglob(f"{TEMP_PREFIX}*")], "no temporary file is left"
    whole = tmp_path / "whole"
    hf_slim(*command[3:], "--output-dir", whole, "--batch-size", 1, env=env)
    for path in whole.rglob("*.json"):
        assert (out / path.relative_to(whole)).read_bytes() == path.read_bytes(), path


def test_bad_file_is_one_line_and_the_batch_goes_on(env, tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    shutil.copy(DATA / "finish_report.flac", folder / "a.flac")
    (folder / "b.mp3").write_bytes(b"\x00" * 4000)
    cut = (DATA / "send_document.ogg").read_bytes()
    (folder / "c.ogg").write_bytes(cut[: len(cut) // 2])
    shutil.copy(DATA / "train_station.mp3", folder / "d.mp3")
    result = hf_slim("transcribe", folder, "--batch-size", 4, env=env, check=False)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"a.flac: {SENTENCES['finish_report.wav']}",
        f"d.mp3: {SENTENCES['train_station.wav']}",
    ], result.stdout
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 2 and "b.mp3: cannot decode" in errors[0] and "c.ogg: the OGG file is truncated" in errors[1]
    assert "2 of 4 files failed" in result.stderr


def test_encoder_micro_batches_change_no_output(bundled_whisper):
    """The encoder in micro-batches of 2 (a batch of 5): the same encoder output and the same transcripts."""
    model, processor = bundled_whisper
    clips = [load_audio(DATA / name)[0] for name in SENTENCES] + [load_audio(DATA / "finish_report.flac")[0]]
    features = torch.stack(
        [processor.feature_extractor(c, sampling_rate=16_000, return_tensors="pt").input_features[0] for c in clips]
    )
    calls = []
    handle = model.get_encoder().register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.inference_mode():
        whole = model.get_encoder()(features).last_hidden_state
        with encoder_micro_batches(model, 2):
            split = model.get_encoder()(features).last_hidden_state
    handle.remove()
    assert "forward" not in vars(model.get_encoder()), "undone after the block"
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    plain = transcribe_batch(model, processor, clips)
    micro = transcribe_batch(model, processor, clips, encoder_batch=2)
    assert [r.token_ids for r in micro] == [r.token_ids for r in plain]


# ------------------------------------------------------------------------- what a new user meets (issue 28)


def damaged_mp3(path: Path) -> Path:
    """train_station.mp3 with every 97th byte after its header replaced (seeded): its header reads, its frames do
    not, and libmpg123 says so on fd 2 ("Note: Illegal Audio-MPEG-Header ...", "Trying to resync...")."""
    data = bytearray((DATA / "train_station.mp3").read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, len(data))
    for position in range(200, len(data), 97):
        data[position] = noise[position]
    path.write_bytes(bytes(data))
    return path


QUIET_SCRIPT = """
import sys, threading
from hf_slim.app.audio import load_audio, quiet_native_decoders

def decode():
    for _ in range(20):
        try:
            load_audio(sys.argv[1])
        except ValueError:
            pass

context = quiet_native_decoders() if sys.argv[2] == "quiet" else __import__("contextlib").nullcontext()
with context:
    thread = threading.Thread(target=decode)
    thread.start()
    for number in range(300):  # the main thread's own lines, while the other thread decodes
        print(f"line {number}", file=sys.stderr)
    thread.join()
print("after", file=sys.stderr)
"""


def test_quiet_native_decoders_drops_libmpg123_and_keeps_every_python_line(tmp_path):
    """A thread decodes a damaged MP3 twenty times while the main thread writes 300 lines to stderr: inside
    ``quiet_native_decoders`` every one of those lines arrives and none of libmpg123's notes, which do arrive
    without it (so this test can tell)."""
    damaged = damaged_mp3(tmp_path / "damaged.mp3")
    runs = {}
    for mode in ("quiet", "plain"):
        command = [sys.executable, "-c", QUIET_SCRIPT, str(damaged), mode]
        runs[mode] = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stderr
    expected = [f"line {number}" for number in range(300)] + ["after"]
    assert runs["quiet"].splitlines() == expected
    assert "Illegal Audio-MPEG-Header" in runs["plain"] and len(runs["plain"].splitlines()) > len(expected)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict:
    """README's first bulk run as a user meets it: a fresh model cache (the bundled model is converted in the
    command), umask 002, a folder of a 16 kHz WAV, a phone recording (M4A), a damaged MP3 and an empty (0-byte)
    WAV, subtitles to an output folder. One subprocess, read by the tests below."""
    root = tmp_path_factory.mktemp("first-run")
    folder = root / "calls"
    folder.mkdir()
    shutil.copy(DATA / "finish_report.wav", folder / "meeting.wav")
    shutil.copy(DATA / "reading_garden.m4a", folder / "phone.m4a")
    damaged_mp3(folder / "damaged.mp3")
    (folder / "empty.wav").write_bytes(b"")
    cache, out = root / "cache", root / "subs"
    env = {**os.environ, "HF_SLIM_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = hf_slim("transcribe", folder, "--output-dir", out, "--format", "srt", env=env, check=False, umask=0o002)
    return {"result": result, "folder": folder, "cache": cache, "out": out}


def test_summary_line_gives_files_audio_seconds_and_real_time_factor(first_run):
    """Finding 1: a closing line with what was written and how fast (the bar itself is drawn on terminals only:
    ``test_cli.py::test_transcribe_bar_counts_audio_seconds_and_files_on_a_terminal``)."""
    result, out = first_run["result"], first_run["out"]
    assert result.returncode == 1, "two inputs failed"
    line = result.stdout.strip()
    match = re.fullmatch(
        rf"wrote 2 srt file\(s\) to {re.escape(str(out))} \(2 failed\): ([\d.]+) s of audio in ([\d.]+) s, "
        r"([\d.]+)x real time \(real-time factor ([\d.]+)\)",
        line,
    )
    assert match, line
    audio, elapsed, speed, factor = map(float, match.groups())
    expected = (len(load_audio(DATA / "finish_report.wav")[0]) + len(load_audio(DATA / "reading_garden.m4a")[0])) / 16e3
    assert audio == pytest.approx(expected, abs=0.05)
    # each printed figure is rounded (seconds and speed to 0.1, the factor to 3 significant digits): the speed and the
    # factor must lie within what the printed seconds allow, widened by their own rounding
    low, high = (audio - 0.05) / (elapsed + 0.05), (audio + 0.05) / max(elapsed - 0.05, 1e-3)
    assert low - 0.05 <= speed <= high + 0.05, (speed, audio, elapsed)
    assert 1 / high * 0.995 <= factor <= 1 / low * 1.005, (factor, audio, elapsed)


def test_outputs_and_the_converted_model_get_the_users_umask(first_run):
    """Finding 2: with umask 002 every file the command writes is 0664 (was 0600: tempfile.mkstemp for outputs,
    safetensors and mkdtemp for the converted model), folders 0775."""
    out, cache = first_run["out"], first_run["cache"]
    outputs = sorted(out.rglob("*"))
    assert [path.name for path in outputs] == ["meeting.srt", "phone.srt"], "no temporary file is left"
    converted = sorted(cache.rglob("*"))
    assert any(path.name == "model.safetensors" for path in converted), converted
    for path in [*outputs, *converted]:
        expected = 0o775 if path.is_dir() else 0o664
        assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path}: {oct(stat.S_IMODE(path.stat().st_mode))}"


def test_damaged_mp3_is_one_line_and_native_decoders_print_nothing(first_run):
    """Finding 3: the damaged MP3 is one line naming it; libmpg123's notes (printed on fd 2 while the file is
    probed and while it is decoded in the background thread) are gone; our own lines all reach stderr."""
    result, folder = first_run["result"], first_run["folder"]
    lines = terminal_lines(result.stderr)
    errors = [line for line in lines if line.startswith("hf-slim transcribe: error: ")]
    assert len(errors) == 2 and f"error: {folder / 'damaged.mp3'}: the MP3 file is truncated or damaged: its " \
        "header announces 3.51 s but only 0.05 s decode; copy or export it again" in errors[1], lines  # fmt: skip
    others = [line for line in lines if line not in errors]
    assert len(others) == 1 and others[0].startswith("hf_slim: 4 layers input (X)"), lines  # slimify's summary


def test_m4a_is_decoded_by_the_readme_install(first_run):
    """Finding 4: PyAV (FFmpeg's libraries in its wheels) is a dependency, not an extra: README's install
    (``pip install ".[audio]"``) decodes the phone recording."""
    from importlib.metadata import requires

    assert any(re.match(r"av\b", requirement) and "extra" not in requirement for requirement in requires("hf-slim"))
    subtitles = (first_run["out"] / "phone.srt").read_text()
    assert subtitles.startswith("1\n00:00:00,000 --> ") and SENTENCES["reading_garden.wav"] in subtitles, subtitles


def test_empty_file_says_it_is_empty(first_run):
    """Finding 5: a 0-byte .wav was "Format not recognised ... convert it"; now one line says it is empty, from the
    command (before the model loads) and from the library."""
    empty = first_run["folder"] / "empty.wav"
    message = "the file is empty (0 bytes), it holds no audio samples; record or export it again"
    assert terminal_lines(first_run["result"].stderr)[0] == f"hf-slim transcribe: error: {empty}: {message}"
    for read in (load_audio, probe_audio):
        with pytest.raises(ValueError, match=re.escape(f"{empty}: {message}")):
            read(empty)


def test_ctrl_c_says_how_many_files_are_done_and_that_a_rerun_resumes(env, mixed_dir, tmp_path):
    """Finding 1: SIGINT after the first output: exit status 130, one line saying how many of the files are done
    and that the same command resumes, every output complete, no temporary file."""
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "hf_slim.app.cli", "transcribe", str(mixed_dir), "--format", "json",
               "--output-dir", str(out), "--batch-size", "1"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("**/[!.]*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    finished = sorted(out.rglob("[!.]*.json"))
    assert process.returncode == 130 and 1 <= len(finished) < 6, (process.returncode, finished, stderr[-2000:])
    assert terminal_lines(stderr)[-1] == (
        f"hf-slim transcribe: interrupted: {len(finished)} of 6 files done; rerun the same command to resume"
    ), stderr
    for path in finished:
        json.loads(path.read_text())  # complete
    assert not list(out.rglob(f"{TEMP_PREFIX}*")), "no temporary file is left"


# ------------------------------------------------------------------------------------------------ --max-memory


def whisper_large_v3_meta():
    """Whisper-large-v3's shape (d 1280, 32+32 layers, 20 heads, 51866 tokens) on the meta device, fp16."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20, decoder_attention_heads=20,
        encoder_ffn_dim=5120, decoder_ffn_dim=5120, vocab_size=51866, num_mel_bins=128,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return WhisperForConditionalGeneration(config).to(torch.float16)


def test_budget_arithmetic_is_cache_report_plus_activations(bundled_whisper):
    model, _ = bundled_whisper
    for slim in (True, False):
        plan = batch_memory(model, 8, 448, slim=slim, encoder_len=1500, prompt_len=4, num_beams=2)
        report = cache_report(model, 8, 448, encoder_len=1500, num_beams=2, verbose=False)
        assert plan.cache == (report.slim_bytes if slim else report.vanilla_bytes)
        assert plan.encoder_output == (report.slim_encoder_bytes if slim else report.encoder_bytes)
        assert plan.encode_phase <= plan.decode_phase, "micro-batches keep the encoder below the decode peak"
    budget = parse_size("2GiB")
    for slim in (True, False):
        best = largest_batch(model, budget, 448, slim=slim, encoder_len=1500, prompt_len=4)
        assert best.peak <= budget < batch_memory(model, best.batch_size + 1, 448, slim=slim, encoder_len=1500,
                                                  prompt_len=4).peak  # fmt: skip
    assert largest_batch(model, 1000, 448, slim=True, encoder_len=1500) is None
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("1.5 GB") == 1_500_000_000 and parse_size("512mib") == 2**29
    for bad in ("lots", "0GiB", "-1GB", "8 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("beams, at_least", [(1, 6.0), (5, 6.0)])
def test_max_memory_fits_6x_the_batch_at_whisper_large_v3_shape(beams, at_least):
    """30 s windows, 448 tokens, fp16, 8 GiB: the slim batch is at least 6x the unpatched one (the 8.7x cache ratio
    less the encoder output both keep and the activations)."""
    model = whisper_large_v3_meta()
    shape = dict(encoder_len=1500, prompt_len=4, num_beams=beams)
    slim = largest_batch(model, parse_size("8GiB"), 448, slim=True, **shape)
    vanilla = largest_batch(model, parse_size("8GiB"), 448, slim=False, **shape)
    assert slim.batch_size >= at_least * vanilla.batch_size, (slim.describe(), vanilla.describe())


def test_max_memory_prints_both_batches(env, tmp_path):
    result = hf_slim("transcribe", DATA / "finish_report.flac", "--max-memory", "1GiB", env=env)
    notes = [line for line in result.stderr.replace("\r", "\n").splitlines() if "--max-memory" in line]
    assert len(notes) == 1, result.stderr
    slim, vanilla = (int(n) for n in __import__("re").findall(r"batch (\d+)", notes[0])[:2])
    assert slim > 3 * vanilla > 0, notes[0]
    assert result.stdout.strip() == SENTENCES["finish_report.wav"]


# ----------------------------------------------------------------------------------------------- JSONL generate


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 and a tiny Marian (the translation family, encoder-decoder) with a byte-level tokenizer."""
    from tiny_encdec import tiny_bart

    tokenizer = tiny_tokenizer()
    ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)  # its one special token
    marian = tiny_bart("marian", vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), **ids)
    folders = {}
    for name, model in (("gpt2", tiny_gpt2()), ("marian", marian)):
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = folder
    return folders


PROMPTS = ["the quick brown fox", "summarize: a b c d e f", "hello", "one two three four five six seven", "x y"]


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "text": text}) + "\n" for i, text in enumerate(PROMPTS)))
    return path


@pytest.mark.parametrize("name", ["gpt2", "marian"])
def test_generate_jsonl_in_batches_with_beams_matches_the_unpatched_model(name, text_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = text_dirs[name]
    prompts, out = write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "out.jsonl"
    arguments = ["generate", "--model", str(folder), "--input", str(prompts), "--output", str(out),
                 "--batch-size", "2", "--num-beams", "3", "--max-new-tokens", "6"]  # fmt: skip
    assert main(arguments) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [f"p{i}" for i in range(len(PROMPTS))]
    model_class = AutoModelForSeq2SeqLM if name == "marian" else AutoModelForCausalLM
    model = model_class.from_pretrained(folder).eval()  # unpatched, same batches
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    expected = [r for batch in batches(PROMPTS, 2) for r in generate_batch(model, tokenizer, batch, max_new_tokens=6,
                                                                           num_beams=3)]  # fmt: skip
    assert [line["output_ids"] for line in lines] == [r["output_ids"] for r in expected]
    assert sum(len(line["output_ids"]) for line in lines) > len(PROMPTS), "more than end-of-sequence tokens"

    # a run killed while writing: the last line is cut off, and two results are missing
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:7])
    assert completed_ids(out) == {"p0", "p1"} and out.read_text() == "".join(text[:2]), "the cut line is removed"
    out.write_text("".join(text[:2]) + text[2][:7])
    assert main(arguments) == 0
    assert out.read_text() == "".join(text), "resumed: the same lines, each once"


def test_generate_ctrl_c_says_how_many_prompts_are_done(text_dirs, tmp_path, capsys, monkeypatch):
    """Ctrl-C during a JSONL generate job: how many prompts are in the output and that a rerun resumes."""
    import hf_slim.app.bulk

    prompts, out = write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "out.jsonl"
    original, calls = hf_slim.app.bulk.generate_batch, []

    def interrupted_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_slim.app.bulk, "generate_batch", interrupted_at_the_second_batch)
    arguments = ["generate", "--model", str(text_dirs["gpt2"]), "--input", str(prompts), "--output", str(out),
                 "--batch-size", "2", "--max-new-tokens", "4"]  # fmt: skip
    assert main(arguments) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"hf-slim generate: interrupted: 2 of {len(PROMPTS)} prompts done; rerun the same command to resume"
    )
    assert len(out.read_text().splitlines()) == 2


def test_generate_max_memory_picks_a_larger_batch_for_the_slim_marian(text_dirs, tmp_path, capsys):
    prompts, out = write_prompts(tmp_path / "prompts.jsonl"), tmp_path / "out.jsonl"
    arguments = ["generate", "--model", str(text_dirs["marian"]), "--input", str(prompts), "--output", str(out),
                 "--max-memory", "64MiB", "--num-beams", "4", "--max-new-tokens", "8"]  # fmt: skip
    assert main(arguments) == 0
    captured = capsys.readouterr()
    slim, vanilla = (int(n) for n in __import__("re").findall(r"batch (\d+)", captured.err)[:2])
    assert slim > vanilla > 0, captured.err
    assert f"wrote {len(PROMPTS)} results" in captured.out


# ------------------------------------------------------------------------------------------------------- Ray


def ray_processes_since(start: float) -> list[str]:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.info["create_time"] >= start - 1 and "hfslim-ray-" in cmdline:
            found.append(cmdline[:120])
    return found


def transcriber_actors(driver: int) -> list:
    """The Ray actor processes (one slim Whisper each) of the local Ray that the command with pid ``driver`` started
    (its raylet is the command's child, the actors the raylet's): never another run's."""
    import psutil

    try:
        processes = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    actors = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if "_Transcriber" in " ".join(process.cmdline()):
                actors.append(process)
    return actors


@pytest.fixture(scope="module")
def single_process_outputs(env, mixed_dir, tmp_path_factory) -> Path:
    """The mixed folder to json in one process, batches of one file: what the Ray runs must write."""
    single = tmp_path_factory.mktemp("single")
    hf_slim("transcribe", mixed_dir, "--format", "json", "--batch-size", 1, "--output-dir", single, env=env)
    return single


@pytest.mark.ray
def test_ray_worker_killed_mid_job_still_gives_the_single_process_outputs(env, mixed_dir, single_process_outputs,
                                                                          tmp_path):  # fmt: skip
    """``--ray`` on a local Ray (2 CPU workers, one slim model each) with one actor process SIGKILLed after the
    first output is written: Ray restarts the actor and runs its unfinished batches again, the job finishes, and
    every file is byte for byte the single-process run's; no temporary file, no Ray process outlives the command."""
    pytest.importorskip("ray.data", reason='needs pip install "hf-slim[ray]"')
    start = time.time()
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "hf_slim.app.cli", "transcribe", str(mixed_dir), "--format", "json",
               "--batch-size", "1", "--output-dir", str(out), "--ray", "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.rglob("[!.]*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    written, actors = len(list(out.rglob("[!.]*.json"))), transcriber_actors(process.pid)
    assert 1 <= written < 6 and len(actors) == 2, (written, actors, process.poll())
    actors[0].kill()  # SIGKILL: the process dies mid-job, as when the OOM killer or a pre-emption takes it
    seen, restarted = {actor.pid for actor in actors}, []
    while process.poll() is None and time.monotonic() < deadline:
        restarted += [actor.pid for actor in transcriber_actors(process.pid) if actor.pid not in seen]
        seen.update(restarted)
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "wrote 6 json file(s)" in stdout, stdout + stderr[-3000:]
    assert restarted, "Ray started a new actor for the killed one"
    outputs = sorted(path.relative_to(single_process_outputs) for path in single_process_outputs.rglob("*.json"))
    assert len(outputs) == 6 and outputs == sorted(path.relative_to(out) for path in out.rglob("*.json"))
    for path in outputs:
        assert (out / path).read_bytes() == (single_process_outputs / path).read_bytes(), path
    assert not list(out.rglob(f"{TEMP_PREFIX}*")), "no temporary file is left"
    time.sleep(1)
    assert ray_processes_since(start) == [], "Ray processes outlived the command"


@pytest.mark.ray
def test_ray_generate_jsonl_gives_the_single_process_lines(env, text_dirs, tmp_path):
    """JSONL generate on a local Ray (2 CPU workers): the lines of one process, each once."""
    pytest.importorskip("ray.data", reason='needs pip install "hf-slim[ray]"')
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    text = ("generate", "--model", text_dirs["marian"], "--input", prompts, "--batch-size", 2, "--num-beams", 2)
    hf_slim(*text, "--output", tmp_path / "single.jsonl", env=env)
    hf_slim(*text, "--output", tmp_path / "ray.jsonl", "--ray", "--workers", 2, env=env)
    by_id = [{json.loads(line)["id"]: line for line in (tmp_path / f).read_text().splitlines()} for f in
             ("single.jsonl", "ray.jsonl")]  # fmt: skip
    assert by_id[0] == by_id[1] and len(by_id[0]) == len(PROMPTS)
