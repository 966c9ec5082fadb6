"""``hf-slim verify``: the per-layer value error of a slim mode in the model's dtype, and whether greedy outputs on a
sample input match the unpatched model (exit status 1 if they differ)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    WHISPER_SAMPLING_RATE,
    CliError,
    add_command,
    add_model_options,
    check_length,
    human,
    load_model,
    model_folder,
    note,
    positive_int,
    progress_bar,
    read_checkpoint_config,
    slimify_with_progress,
    tokenizer_of,
    whisper_processor,
)

DEFAULT_PROMPT = "The quick brown fox"


def _sample_inputs(model, folder: Path, args) -> dict:
    """A real sample input for the greedy comparison: the sample (or given) audio for Whisper, a prompt otherwise."""
    parameter = next(model.parameters())
    if model.config.model_type == "whisper":
        from hf_slim.bundled import sample_audio_path

        from ..audio import load_audio

        samples, _ = load_audio(args.audio or str(sample_audio_path()), WHISPER_SAMPLING_RATE)
        extractor = whisper_processor(folder).feature_extractor
        features = extractor(samples, sampling_rate=WHISPER_SAMPLING_RATE, return_tensors="pt").input_features
        return {"input_features": features.to(device=parameter.device, dtype=parameter.dtype)}
    import torch

    try:
        tokenizer = tokenizer_of(folder)
        return dict(tokenizer(args.prompt, return_tensors="pt").to(parameter.device))
    except CliError:
        note(f"no tokenizer in {folder}: comparing on fixed token ids instead of the prompt")
        ids = torch.arange(1, 17, device=parameter.device)[None] % model.config.vocab_size
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _greedy(model, inputs: dict, max_new_tokens: int):
    import torch

    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    if model.config.model_type != "whisper":
        settings["min_new_tokens"] = max_new_tokens  # compare a long path, not an early end of sequence
        settings["pad_token_id"] = getattr(model.generation_config, "pad_token_id", None) or 0
    with torch.inference_mode():
        return model.generate(**inputs, **settings)


def run(args: argparse.Namespace) -> int:
    """Run ``hf-slim verify`` with its parsed arguments; returns the exit status."""
    from hf_slim.api import slim_record, unslimify
    from hf_slim.export import CONFIG_KEY
    from hf_slim.registry import architecture_for

    model_type = "whisper" if args.model is None else read_checkpoint_config(model_folder(args.model)).get("model_type")
    if args.audio is not None and model_type != "whisper":
        raise CliError(f"--audio is for Whisper models; {model_type} takes text (use --prompt)")
    model, folder = load_model(args.model, args.dtype, args.mode, args.device, slim=False)
    recorded = read_checkpoint_config(folder).get(CONFIG_KEY)
    mode = args.mode or (recorded["requested_mode"] if isinstance(recorded, dict) else None) or "auto"
    inputs = _sample_inputs(model, folder, args)
    if "input_ids" in inputs:
        check_length(model.config, inputs["input_ids"].shape[1], args.max_new_tokens, "the --prompt")
    steps = progress_bar(3, "verifying")
    expected = _greedy(model, inputs, args.max_new_tokens)
    steps.update()
    # the K-mode calibration numbers of every layer, whichever mode is verified: they say what the K cache would cost.
    # One calibration: where the verified mode is K mode (auto on RoPE models is), its own slimify gives them
    k_mode = mode == "k" or (mode == "auto" and architecture_for(model.config, mode).positions == "rope")
    calibration = {}
    if not k_mode:
        try:
            slimify_with_progress(model, "k", notes=False)
            calibration = dict(slim_record(model).calibration)
            unslimify(model)
        except ValueError as error:  # no K mode for this architecture (e.g. e != d): no numbers
            note(f"no K-mode numbers: {error}")
    slimify_with_progress(model, mode)
    if k_mode:
        calibration = dict(slim_record(model).calibration)
    steps.update()
    actual = _greedy(model, inputs, args.max_new_tokens)
    steps.update()
    steps.close()

    record = slim_record(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"{folder.name}: {model.config.model_type}, {dtype}, mode {mode}")
    print(
        f"{'layer':<34} {'mode':<8} {'cond(W_K)':>10} {'r':>5} {'V err K+R cache':>16} {'V err unmodified':>17} "
        f"{'V err this mode':>16} {'ratio':>6}"
    )
    for name, layer_mode in record.layer_modes.items():
        numbers = calibration.get(name, {})  # a layer refused before any rank was tried has cond(W_K) only

        def number(key: str, width: int, spec: str, numbers=numbers) -> str:
            return f"{numbers[key]:>{width}{spec}}" if key in numbers else f"{'-':>{width}}"

        chosen = "k_error" if layer_mode == "k" else "vanilla_error"
        # input cache: d per token against 2d for K+V; kv: the model's own K and V
        ratio = numbers.get("cache_ratio") if layer_mode == "k" else {"kv": 1.0}.get(layer_mode, 2.0)
        ratio = ratio if "k_error" in numbers else None
        rank = "-"
        if "residual_rank" in numbers:  # +s: one more column, the key scale
            rank = f"{numbers['residual_rank']}{'+s' if numbers.get('key_scale') else ''}"
        print(
            f"{name:<34} {layer_mode:<8} {number('cond_w_k', 10, '.3g')} {rank:>5} {number('k_error', 16, '.2e')} "
            f"{number('vanilla_error', 17, '.2e')} {number(chosen, 16, '.2e')} "
            + (f"{ratio:>5.2f}x" if ratio is not None else f"{'-':>6}")
        )
    print(
        "(r: input directions the K+R cache keeps beside K, the smallest that calibrates exact, or the largest tried "
        "where K mode is refused, +s: one more column, each token's key scale, for keys normalised per token; "
        "V err: relative error of the values against float64, on calibration data, in the "
        "model dtype; ratio: K+V bytes / this layer's cache bytes)"
    )
    if "kv" in record.layer_modes.values():
        print("(kv: the layer keeps the model's own keys and values; the other layers keep one tensor)")
    from hf_slim.memory import cache_report

    report = cache_report(model, 1, actual.shape[-1], verbose=False)
    print(
        f"cache at {actual.shape[-1]} tokens, batch 1: {human(report.vanilla_bytes)} vanilla, "
        f"{human(report.slim_bytes)} slim ({report.ratio:.2f}x)"
    )
    same = expected.shape == actual.shape and bool((expected == actual).all())
    tokens = actual.shape[-1]
    if same:
        print(f"greedy outputs: identical to the unpatched model ({tokens} tokens)")
        return 0
    print(f"greedy outputs: DIFFER from the unpatched model (slim {actual.tolist()}, vanilla {expected.tolist()})")
    return 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``verify`` sub-command and its options."""
    sub = add_command(commands, "verify", "check a mode's per-layer error and greedy equality",
              "Per-layer value error of the slim mode in the given dtype (calibration data) and whether greedy "
              "outputs on a sample input match the unpatched model. Exit status 1 if they differ.")  # fmt: skip
    add_model_options(sub)
    sub.add_argument("--prompt", default=DEFAULT_PROMPT, help="sample text input (text models)")
    sub.add_argument("--audio", default=None, metavar="WAV", help="sample audio (Whisper; default: shipped sample)")
    sub.add_argument("--max-new-tokens", type=positive_int, default=24, metavar="N", help="greedy tokens to compare")
    sub.set_defaults(run=run)
