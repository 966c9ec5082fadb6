"""Whisper's decoding options (``hf_slim.app.transcription.WhisperOptions``, the ``hf-slim transcribe`` flags
--language, --task, --word-timestamps, --initial-prompt, --condition-on-previous-text, --temperature and its
thresholds): each reaches transformers' Whisper generate as its own argument, and each gives the slim model the
unpatched model's results (token ids, text, segments, word timings) on real tiny.en clips, and on a random
multilingual Whisper for the language and task tiny.en (English-only) does not have."""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_cli import env, hf_slim, long_wav, tiny_whisper_dir  # noqa: F401 (fixtures)
from test_export import one_thread  # noqa: F401 (autouse fixture)

from hf_slim import slimified
from hf_slim.app.audio import load_audio
from hf_slim.app.cli.main import main
from hf_slim.app.transcription import WhisperOptions, _generate_kwargs, check_options, transcribe_batch

DATA = Path(__file__).parent / "data"
SENTENCES = json.loads((DATA / "sentences.json").read_text())


def slim_and_unpatched(model, processor, clips, options: WhisperOptions) -> dict[str, list[dict]]:
    """Each clip's :class:`Transcription` (as a dict) from the unpatched model, then from the same model slimified."""
    results = {}
    for name in ("unpatched", "slim"):
        with slimified(model) if name == "slim" else contextlib.nullcontext():
            results[name] = [asdict(result) for result in transcribe_batch(model, processor, clips, options)]
    return results


@pytest.fixture(scope="module")
def clips() -> dict[str, object]:
    """Two real sentences (16 kHz WAV, 44.1 kHz stereo MP3) decoded to 16 kHz mono."""
    return {name: load_audio(DATA / name)[0] for name in ("finish_report.wav", "train_station.mp3")}


def test_each_option_is_the_transformers_generate_argument(bundled_whisper):
    """The options map to WhisperForConditionalGeneration.generate's own arguments; the defaults add none (a run
    without options calls generate as before they existed); an English-only model's "en" / "transcribe" are left
    out (transformers refuses any language or task for it)."""
    model, processor = bundled_whisper
    assert _generate_kwargs(model, processor, WhisperOptions()) == {"num_beams": 1}
    options = WhisperOptions(
        num_beams=2, max_new_tokens=40, language="English", task="transcribe", prompt="Trains and stations.",
        condition_on_previous_text=True, temperature=(0.0, 0.5), compression_ratio_threshold=1.35,
        logprob_threshold=-1.0, no_speech_threshold=0.6,
    )  # fmt: skip
    kwargs = _generate_kwargs(model, processor, options)
    prompt_ids = kwargs.pop("prompt_ids")
    assert torch.equal(prompt_ids, processor.get_prompt_ids("Trains and stations.", return_tensors="pt"))
    assert kwargs == {
        "num_beams": 2, "max_new_tokens": 40, "condition_on_prev_tokens": True, "temperature": (0.0, 0.5),
        "compression_ratio_threshold": 1.35, "logprob_threshold": -1.0, "no_speech_threshold": 0.6,
    }  # fmt: skip
    assert _generate_kwargs(model, processor, WhisperOptions(temperature=(0.7,)))["temperature"] == 0.7


def test_english_only_whisper_takes_english_and_refuses_the_rest(bundled_whisper):
    """tiny.en has no language or task tokens: "en" and "transcribe" are what it does; another language, a
    translation or an unknown language name is refused before any audio is decoded, with the reason."""
    config = bundled_whisper[0].generation_config
    for fine in (WhisperOptions(language="en"), WhisperOptions(language="English", task="transcribe")):
        check_options(config, fine)
    refused = {
        "fr": (WhisperOptions(language="fr"), "language 'fr': this Whisper is English-only"),
        "translate": (WhisperOptions(task="translate"), "task 'translate': this Whisper is English-only"),
        "unknown": (WhisperOptions(language="klingon"), "unknown language 'klingon': give a code such as en"),
        "negative": (WhisperOptions(temperature=(0.0, -1.0)), "temperature must be one or more values >= 0"),
        "no speech alone": (WhisperOptions(no_speech_threshold=0.6), "needs a log-probability threshold"),
    }
    for options, message in refused.values():
        with pytest.raises(ValueError, match=message):
            check_options(config, options)


def assert_words_spell_the_text(result: dict) -> None:
    """The words of a result are its text, in order, each inside the clip."""
    words = [word for segment in result["segments"] for word in segment["words"]]
    assert "".join(word["word"] for word in words) == result["text"].replace(" ", ""), result
    starts = [word["start"] for word in words]
    assert starts == sorted(starts) and all(0 <= w["start"] <= w["end"] <= result["duration"] for w in words), words


def test_word_timestamps_identical(bundled_whisper, clips):
    """Word timings come from the cross-attention weights of the alignment heads, which the slim model computes on
    its absorbed path (no cross cache): identical to the unpatched model's. (With beams, whose weights generate
    gathers per beam: ``test_whisper.py::test_token_timestamps_from_cross_attention_identical``.)"""
    model, processor = bundled_whisper
    options = WhisperOptions(word_timestamps=True)
    results = slim_and_unpatched(model, processor, list(clips.values()), options)
    assert results["slim"] == results["unpatched"]
    assert model.config._attn_implementation == "sdpa", "generate's switch to eager is undone"
    assert [result["text"] for result in results["slim"]] == [SENTENCES[n.replace(".mp3", ".wav")] for n in clips]
    for result in results["slim"]:
        assert_words_spell_the_text(result)


def test_long_form_words_prompt_and_conditioning_identical(bundled_whisper, clips, long_wav):  # noqa: F811
    """A 37 s clip in long form (two 30 s windows, each conditioned on the previous one's text) beside a short clip,
    with word timings and an initial prompt (``prompt_ids``), which steers the spelling ("Trains station", greedy:
    "train station") and is no part of the transcript: slim and unpatched agree. Without timestamps (another
    code path) the prompt is left out of the text and ids too."""
    model, processor = bundled_whisper
    audio = [clips["train_station.mp3"], load_audio(long_wav)[0]]
    options = WhisperOptions(prompt="Trains and stations.", condition_on_previous_text=True, word_timestamps=True)
    results = slim_and_unpatched(model, processor, audio, options)
    assert results["slim"] == results["unpatched"]
    assert results["slim"][0]["text"] == "Can you tell me where the Trains station is?", results["slim"][0]
    for result in results["slim"]:
        assert_words_spell_the_text(result)
    assert results["slim"][1]["segments"][-1]["end"] > 30, "the second window's segments are there"
    untimed = slim_and_unpatched(model, processor, audio[:1], WhisperOptions(prompt="Trains and stations."))
    assert untimed["slim"] == untimed["unpatched"] and untimed["slim"][0]["text"] == results["slim"][0]["text"]
    assert 50360 not in untimed["slim"][0]["token_ids"], "the prompt (<|startofprev|> ...) is not in the ids"


def test_temperature_fallback_samples_identically_from_the_seed(bundled_whisper, clips):
    """A log-probability threshold no greedy window meets makes every window fall back to sampling at 1.0: the slim
    model samples the unpatched model's tokens from the same seed, whatever random state the caller left."""
    model, processor = bundled_whisper
    audio = list(clips.values())
    options = WhisperOptions(temperature=(0.0, 1.0), logprob_threshold=-0.01, seed=5)
    unpatched = [asdict(result) for result in transcribe_batch(model, processor, audio, options)]
    torch.rand(17)  # another random state: the seed, not the state earlier calls left, decides the tokens
    with slimified(model):
        slim = [asdict(result) for result in transcribe_batch(model, processor, audio, options)]
    assert slim == unpatched
    greedy = [SENTENCES[name.replace(".mp3", ".wav")] for name in clips]  # what greedy decoding transcribes
    assert [result["text"] for result in slim] != greedy, "the fallback sampled"


# ------------------------------------------------------------------------------------------ multilingual path


@pytest.fixture(scope="module")
def multilingual_whisper_dir(tiny_whisper_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The random tiny Whisper of test_cli with a multilingual generation config: the language and task tokens of
    tiny.en's vocabulary (which has them, as every Whisper tokenizer) in ``lang_to_id`` / ``task_to_id``."""
    from transformers import GenerationConfig, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    folder = tmp_path_factory.mktemp("multilingual")
    shutil.copytree(tiny_whisper_dir, folder, dirs_exist_ok=True)
    tokenizer = WhisperTokenizer.from_pretrained(folder)
    config = GenerationConfig.from_pretrained(folder)
    ids = {f"<|{code}|>": tokenizer.convert_tokens_to_ids(f"<|{code}|>") for code in LANGUAGES}
    config.lang_to_id = {token: token_id for token, token_id in ids.items() if token_id != tokenizer.unk_token_id}
    config.task_to_id = {task: tokenizer.convert_tokens_to_ids(f"<|{task}|>") for task in ("transcribe", "translate")}
    config.is_multilingual = True
    config.save_pretrained(folder)
    return folder


def test_multilingual_language_and_translate_identical(multilingual_whisper_dir, clips, capsys):
    """``--language fr --task translate`` on a multilingual Whisper: the decoder starts with <|fr|><|translate|>,
    and the slim model gives the unpatched model's results; so does language detection (no --language). The same
    through the command line's --compare."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(multilingual_whisper_dir).eval()
    processor = WhisperProcessor.from_pretrained(multilingual_whisper_dir)
    prompts = []
    model.model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: prompts.append(kwargs["input_ids"][0, :4].tolist()), with_kwargs=True
    )
    audio = list(clips.values())
    translated = slim_and_unpatched(model, processor, audio, WhisperOptions(language="French", task="translate"))
    assert translated["slim"] == translated["unpatched"]
    lang, task = model.generation_config.lang_to_id["<|fr|>"], model.generation_config.task_to_id["translate"]
    assert prompts[0][:3] == [model.generation_config.decoder_start_token_id, lang, task], prompts[0]
    assert [result["language"] for result in translated["slim"]] == ["fr", "fr"]
    detected = slim_and_unpatched(model, processor, audio, WhisperOptions(timestamps=True))
    assert detected["slim"] == detected["unpatched"]
    assert all(f"<|{result['language']}|>" in model.generation_config.lang_to_id for result in detected["slim"])

    arguments = ["transcribe", *(str(DATA / name) for name in clips), "--model", str(multilingual_whisper_dir),
                 "--language", "fr", "--task", "translate", "--compare"]  # fmt: skip
    assert main(arguments) == 0
    assert "identical transcripts (token ids, text, timings): 2 of 2 files" in capsys.readouterr().out


def test_command_line_flags_are_the_options():
    """Each flag sets its option; several temperatures without thresholds get transformers' documented fallback
    thresholds (without one no window would ever fall back)."""
    from hf_slim.app.cli.main import build_parser
    from hf_slim.app.cli.transcribe import _whisper_options

    def options(*flags: str) -> WhisperOptions:
        return _whisper_options(build_parser().parse_args(["transcribe", *flags]))

    assert options() == WhisperOptions()
    assert options("--language", "fr", "--task", "translate", "--word-timestamps", "--initial-prompt", "Hi.",
                   "--no-condition-on-previous-text", "--num-beams", "3", "--seed", "4") == WhisperOptions(
        language="fr", task="translate", word_timestamps=True, prompt="Hi.", condition_on_previous_text=False,
        num_beams=3, seed=4)  # fmt: skip
    fallback = options("--temperature", "0,0.2,0.4")
    assert (fallback.temperature, fallback.compression_ratio_threshold, fallback.logprob_threshold) == (
        (0.0, 0.2, 0.4), 1.35, -1.0)  # fmt: skip
    chosen = options("--temperature", "0,1", "--logprob-threshold", "-0.5", "--no-speech-threshold", "0.6")
    assert (chosen.logprob_threshold, chosen.no_speech_threshold) == (-0.5, 0.6)
    assert options("--temperature", "0.7").compression_ratio_threshold is None, "one temperature: no fallback"


def test_options_from_the_command_line_match_the_unpatched_model(env, tmp_path):  # noqa: F811
    """The flags reach the model: ``--compare`` runs slim then unpatched with word timings, a prompt, conditioning
    and the language and task an English-only model takes; the json carries the words."""
    out = tmp_path / "out"
    result = hf_slim(
        "transcribe", DATA / "train_station.mp3", "--compare", "--format", "json", "--output-dir", out,
        "--word-timestamps", "--initial-prompt", "Trains and stations.", "--condition-on-previous-text",
        "--language", "en", "--task", "transcribe", env=env,
    )  # fmt: skip
    assert "transcripts identical: yes" in result.stdout, result.stdout
    document = json.loads((out / "train_station.json").read_text())
    assert document["text"] == "Can you tell me where the Trains station is?", document
    words = [word["word"] for segment in document["segments"] for word in segment["words"]]
    assert " ".join(words) == document["text"], document
