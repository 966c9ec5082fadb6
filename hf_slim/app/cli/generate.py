"""``hf-slim generate``: text from a slim model, one prompt (``--compare``: beside the unpatched model) or a JSONL
file of them in batches, appended to a JSONL output, resumable; ``--ray`` runs the batches as a Ray Data pipeline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import (
    CliError,
    JobInterrupted,
    add_bulk_options,
    add_command,
    add_model_options,
    check_length,
    check_supported,
    human,
    load_model,
    meta_model_of,
    model_folder,
    note,
    positive_int,
    progress_bar,
    read_checkpoint_config,
    tokenizer_of,
    unpatched_batch,
)


def load_text_model(model: str, dtype: str, mode: str | None, device: str) -> tuple:
    """``(slim model, its tokenizer with a pad token)`` for a bulk worker, as :func:`load_whisper`."""
    loaded, folder = load_model(model, dtype, mode, device)
    return loaded, _prepared_tokenizer(folder)


def _token_progress(total: int, desc: str):
    """A generate() streamer that advances a tqdm bar once per generated token."""
    from transformers.generation.streamers import BaseStreamer

    class TokenProgress(BaseStreamer):
        def __init__(self) -> None:
            self.bar, self.first = progress_bar(total, desc), True

        def put(self, value) -> None:
            if self.first:  # the prompt (decoder-only) or the decoder start token (encoder-decoder)
                self.first = False
                return
            self.bar.update()

        def end(self) -> None:
            self.bar.close()

    return TokenProgress()


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, num_beams: int = 1) -> tuple[str, int]:
    """Greedy (or beam-search) continuation of ``prompt``: ``(text, cache_bytes)`` with the bytes of the cache
    generate returned."""
    import torch

    from hf_slim._compat import returned_cache
    from hf_slim.cache import cache_nbytes

    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    if inputs["input_ids"].shape[1] == 0:
        raise CliError("the prompt is empty after tokenization")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, return_dict_in_generate=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        settings["pad_token_id"] = tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(**inputs, **settings, streamer=_token_progress(max_new_tokens, "generating"))
    new_tokens = (
        out.sequences[0] if model.config.is_encoder_decoder else out.sequences[0, inputs["input_ids"].shape[1] :]
    )
    return tokenizer.decode(new_tokens, skip_special_tokens=True), cache_nbytes(returned_cache(out))


def run(args: argparse.Namespace) -> int:
    """Run ``hf-slim generate`` with its parsed arguments; returns the exit status."""
    from hf_slim.api import unslimify

    folder = model_folder(args.model)
    if read_checkpoint_config(folder).get("model_type") == "whisper":
        raise CliError(f"{folder} is a Whisper speech model: use hf-slim transcribe")
    if args.input is None:
        for option in ("output", "ray", "max_memory"):
            if getattr(args, option) is not None:
                raise CliError(f"--{option.replace('_', '-')} is for bulk jobs: give --input PROMPTS.jsonl")
        if args.batch_size_given:
            raise CliError("--batch-size is for bulk jobs: give --input PROMPTS.jsonl")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    check_supported(config, args.mode)  # before the tokenizer: the clearer error first
    if args.input is not None:
        return _generate_bulk(args, folder, config)
    tokenizer = tokenizer_of(folder)
    check_length(config, len(tokenizer(args.prompt)["input_ids"]), args.max_new_tokens)  # before loading weights
    model, _ = load_model(args.model, args.dtype, args.mode, args.device)
    text, slim_bytes = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.num_beams)
    if not args.compare:
        print(text)
        return 0
    unslimify(model)
    vanilla_text, vanilla_bytes = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.num_beams)
    print(f"slim:    {text}")
    print(f"vanilla: {vanilla_text}")
    print(
        f"cache bytes: slim {slim_bytes} ({human(slim_bytes)}), vanilla {vanilla_bytes} ({human(vanilla_bytes)}), "
        f"ratio {vanilla_bytes / max(slim_bytes, 1):.2f}x"
    )
    print(f"outputs identical: {'yes' if text == vanilla_text else 'NO'}")
    return 0


def _prepared_tokenizer(folder: Path):
    """The checkpoint's tokenizer with a pad token (batches are padded; decoder-only models often have none)."""
    tokenizer = tokenizer_of(folder)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CliError(
                f"{folder}: the tokenizer has neither a pad nor an end-of-sequence token to pad batches with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _text_budget(model, args, longest: int, *, slim: bool, budget: int | None = None, batch_size: int | None = None):
    """:mod:`hf_slim.app.budget` for prompts of ``longest`` tokens: encoder-decoders encode them and decode
    ``--max-new-tokens``; decoder-only models prefill them and grow the cache by ``--max-new-tokens``."""
    from ..budget import batch_memory, largest_batch

    if model.config.is_encoder_decoder:
        shape = dict(seq_len=args.max_new_tokens + 1, encoder_len=longest, prompt_len=1)
    else:
        shape = dict(seq_len=longest + args.max_new_tokens, prompt_len=longest)
    if budget is not None:
        return largest_batch(model, budget, slim=slim, num_beams=args.num_beams, **shape)
    return batch_memory(model, batch_size, slim=slim, num_beams=args.num_beams, **shape)


def _generate_bulk(args, folder: Path, config) -> int:
    """``--input PROMPTS.jsonl --output OUT.jsonl``: batches of prompts in input order, one output line per prompt
    (``{"id", "output", "output_ids"}``) appended as each batch finishes; ids already in OUT.jsonl are skipped."""
    from ..bulk import append_lines, batches, completed_ids, generate_batch, read_prompts

    prompts = read_prompts(Path(args.input))
    if args.output is None:
        raise CliError("--input needs --output OUT.jsonl (results are appended there, resumable)")
    output = Path(args.output)
    if args.overwrite:
        output.unlink(missing_ok=True)
    done = completed_ids(output)
    pending = [prompt for prompt in prompts if prompt.id not in done]
    skipped = len(prompts) - len(pending)
    if skipped:
        note(f"skipping {skipped} prompt(s) already in {output} (--overwrite redoes them)")
    if not pending:
        print(f"wrote 0 results to {output} ({skipped} skipped (already done))")
        return 0
    tokenizer = _prepared_tokenizer(folder)
    lengths = [len(tokenizer(prompt.text)["input_ids"]) for prompt in pending]
    longest = max(lengths)
    empty = [prompt.id for prompt, length in zip(pending, lengths, strict=True) if length == 0]
    if empty:
        raise CliError(f"prompt {empty[0]!r} is empty after tokenization")
    check_length(
        config, longest, args.max_new_tokens, f"the longest prompt (id {pending[lengths.index(longest)].id!r})"
    )
    if args.ray is not None:
        model = meta_model_of(folder, args.dtype)
    else:
        model, _ = load_model(args.model, args.dtype, args.mode, args.device)
    batch_size = args.batch_size
    if args.max_memory is not None:
        slim = _text_budget(model, args, longest, slim=True, budget=args.max_memory)
        if slim is None:
            raise CliError(f"--max-memory {human(args.max_memory)} is too small for one prompt of {longest} tokens")
        vanilla = _text_budget(model, args, longest, slim=False, budget=args.max_memory)
        note(
            f"--max-memory {human(args.max_memory)}: batch {slim.batch_size} (prompts of up to {longest} tokens, "
            f"{args.max_new_tokens} new tokens, {args.num_beams} beam(s); slim cache, encoder output and activations, "
            f"estimated: {human(slim.peak)}); the unpatched model would get {unpatched_batch(slim, vanilla)}"
        )
        batch_size = min(slim.batch_size, len(pending))
    started, done = time.monotonic(), 0
    try:
        with progress_bar(len(pending), "generating" + (f" on Ray ({args.workers} workers)" if args.ray else ""),
                  unit="prompt") as bar:  # fmt: skip

            def progress(count: int) -> None:
                nonlocal done
                done += count
                bar.update(count)

            if args.ray is not None:
                from ..raydata import generate_on_ray

                generate_on_ray(
                    pending, output, load=load_text_model, address=None if args.ray == "local" else args.ray,
                    workers=args.workers, model=str(folder), dtype=args.dtype, mode=args.mode, device=args.device,
                    batch_size=batch_size, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                    progress=progress,
                )  # fmt: skip
            else:
                for batch in batches(pending, batch_size):
                    results = generate_batch(
                        model, tokenizer, [prompt.text for prompt in batch], max_new_tokens=args.max_new_tokens,
                        num_beams=args.num_beams,
                    )  # fmt: skip
                    append_lines(
                        output, [{"id": prompt.id} | result for prompt, result in zip(batch, results, strict=True)]
                    )
                    progress(len(batch))
    except KeyboardInterrupt:
        raise JobInterrupted(
            f"{done + skipped} of {len(prompts)} prompts done; rerun the same command to resume"
        ) from None
    elapsed = max(time.monotonic() - started, 1e-3)
    extra = f" ({skipped} skipped (already done))" if skipped else ""
    print(f"wrote {done} results to {output}{extra} in {elapsed:.1f} s ({done / elapsed:.2f} prompts/s)")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``generate`` sub-command and its options."""
    sub = add_command(commands, "generate", "generate text with a slim model, one prompt or a JSONL file of them",
              "Text generation with a slim model (greedy or beam search): one PROMPT, or --input PROMPTS.jsonl "
              "(one {\"text\": ..., \"id\": ...} object per line) in batches to --output OUT.jsonl.")  # fmt: skip
    sub.add_argument("prompt", nargs="?", default=None, metavar="PROMPT",
                     help="text to continue (decoder-only) or to transform (encoder-decoders)")  # fmt: skip
    add_model_options(sub, required=True, bundled=False)
    sub.add_argument(
        "--max-new-tokens", type=positive_int, default=32, metavar="N", help="tokens to generate (default 32)"
    )
    sub.add_argument("--input", metavar="JSONL", default=None, help="prompts, one JSON object per line (bulk job)")
    sub.add_argument("--output", metavar="JSONL", default=None,
                     help='results, one {"id", "output", "output_ids"} line per prompt, appended '
                     "(resumable)")  # fmt: skip
    add_bulk_options(sub, unit="prompts")
    sub.add_argument("--compare", action="store_true", help="also run the unpatched model and compare")
    sub.set_defaults(run=run)
