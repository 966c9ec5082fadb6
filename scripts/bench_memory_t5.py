"""T5 cache memory benchmark: bytes held by the unpatched vs the slim cache at the T5-11B attention shape.

T5-11B projects d_model 1024 to 128 heads x d_kv 128 = 16384, so a decoder self-attention layer caches K and V
(2 x 16384 per token) where slim caches its input X (1024 per token): 32x; cross-attention caches nothing at all (it
reads the encoder output E, which generate() holds either way).

* measured: random weights at the T5-11B attention shape with ``--layers`` encoder and decoder layers (small d_ff and
  vocabulary: the feed-forward and embeddings hold no cache). Bytes are counted on the cache objects generate()
  returns (:func:`hf_slim.cache_nbytes`) and on the encoder output the decoder attends to (captured by a hook, so it
  has one row per beam where transformers repeats it); :func:`hf_slim.cache_report` for the same shape must agree.
* reported: the full 24+24-layer T5-11B config built on the meta device (never allocated), through cache_report.

    python scripts/bench_memory_t5.py
    python scripts/bench_memory_t5.py --layers 2 --batch 2 --encoder-len 256 --new-tokens 64 --beams 1 4
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

import hf_slim
from hf_slim import cache_nbytes, cache_report, slimify, unslimify
from hf_slim._compat import returned_cache
from hf_slim.memory import format_bytes

T5_11B = dict(
    vocab_size=32128, d_model=1024, d_kv=128, num_heads=128, d_ff=65536, num_layers=24, num_decoder_layers=24,
    feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers of the measured model")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--encoder-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--report-len", type=int, nargs="+", default=[512, 2048], help="full-config token counts")
    return parser.parse_args()


def fmt(nbytes: float) -> str:
    return format_bytes(nbytes, digits=2)


@contextlib.contextmanager
def encoder_output_probe(model: T5ForConditionalGeneration):
    """Record the bytes and rows of the encoder output the decoder attends to during generate()."""
    seen = {"bytes": 0, "rows": 0}

    def before_decoder(module, args, kwargs):
        encoder = kwargs.get("encoder_hidden_states")
        if encoder is not None:
            seen["bytes"] = max(seen["bytes"], encoder.numel() * encoder.element_size())
            seen["rows"] = encoder.shape[0]

    handle = model.decoder.register_forward_pre_hook(before_decoder, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def run(model, inputs: dict, args, beams: int) -> dict:
    with encoder_output_probe(model) as seen:
        start = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, num_beams=beams,
            do_sample=False, return_dict_in_generate=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    cache = returned_cache(out)
    return {
        "sequences": out.sequences,
        "cache": cache_nbytes(cache),
        "self": cache_nbytes(cache.self_attention_cache),
        "cross": cache_nbytes(cache.cross_attention_cache),
        "tokens": cache.get_seq_length(),
        "encoder": seen["bytes"],
        "encoder_rows": seen["rows"],
        "seconds": seconds,
    }


def measured_section(args, dtype: torch.dtype) -> None:
    config = T5Config(**{**T5_11B, "vocab_size": 512, "d_ff": 64})
    config.num_layers = config.num_decoder_layers = args.layers
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval().to(dtype)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, config.vocab_size, (args.batch, args.encoder_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -args.encoder_len // 4 :] = 0  # one padded row
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    print(
        f"\n## measured: T5-11B attention shape (d_model 1024, 128 heads x d_kv 128 = 16384), {args.layers}+"
        f"{args.layers} layers, batch {args.batch}, {args.encoder_len} encoder tokens, {args.new_tokens} new tokens, "
        f"{args.dtype}, random weights"
    )
    for beams in args.beams:
        if hf_slim.is_slim(model):
            unslimify(model)
        vanilla = run(model, inputs, args, beams)
        slimify(model)
        slim = run(model, inputs, args, beams)
        rows = args.batch * beams
        report = cache_report(
            model, batch_size=rows, seq_len=slim["tokens"], encoder_len=args.encoder_len, verbose=False
        )
        # cache_report counts one encoder output per decoder row, as transformers holds it (the vanilla side)
        agree = (report.vanilla_bytes, report.slim_bytes, report.encoder_bytes) == (
            vanilla["cache"], slim["cache"], vanilla["encoder"],
        )  # fmt: skip
        print(f"\n### beams {beams}: {rows} decoder rows, {slim['tokens']} cached decoder tokens")
        print(f"{'':<40} {'vanilla':>12} {'slim':>12} {'vanilla/slim':>13}")
        rows_out = [
            ("self-attention cache (measured)", vanilla["self"], slim["self"]),
            ("cross-attention cache (measured)", vanilla["cross"], slim["cross"]),
            ("cache total (measured, cache_nbytes)", vanilla["cache"], slim["cache"]),
            ("cache total (cache_report)", report.vanilla_bytes, report.slim_bytes),
            ("encoder output seen by the decoder", vanilla["encoder"], slim["encoder"]),
            ("cache + encoder output", vanilla["cache"] + vanilla["encoder"], slim["cache"] + slim["encoder"]),
        ]
        for label, v, s in rows_out:
            ratio = f"{v / s:>12.2f}x" if s else f"{'(slim 0)':>13}"
            print(f"{label:<40} {fmt(v):>12} {fmt(s):>12} {ratio}")
        print(
            f"cache_report agrees with the measured bytes: {agree}; identical token ids: "
            f"{torch.equal(vanilla['sequences'], slim['sequences'])}; encoder rows {vanilla['encoder_rows']} vs "
            f"{slim['encoder_rows']}; generate() seconds: vanilla {vanilla['seconds']:.1f}, slim {slim['seconds']:.1f}"
        )


def reported_section(args, dtype: torch.dtype) -> None:
    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(**T5_11B))
    print("\n## reported (cache_report): full T5-11B config, 24+24 layers, built on the meta device")
    print(
        f"{'batch':>5} {'enc':>6} {'dec':>6} {'vanilla':>12} {'slim':>12} {'ratio':>8} "
        f"{'+E vanilla':>12} {'+E slim':>12} {'ratio':>8}"
    )
    for batch in (1, 8):
        for length in args.report_len:
            r = cache_report(model, batch_size=batch, seq_len=length, encoder_len=length, dtype=dtype, verbose=False)
            print(
                f"{batch:>5} {length:>6} {length:>6} {fmt(r.vanilla_bytes):>12} {fmt(r.slim_bytes):>12} "
                f"{r.ratio:>7.2f}x {fmt(r.vanilla_bytes + r.encoder_bytes):>12} "
                f"{fmt(r.slim_bytes + r.encoder_bytes):>12} {r.ratio_with_encoder:>7.2f}x"
            )
    self_layer = next(layer for layer in r.layers if layer.mode == "input")
    print(f"per decoder self-attention layer: vanilla / slim = {self_layer.vanilla / self_layer.slim:.0f}x")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"# {' '.join(['python', *sys.argv])}")
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"hf_slim {hf_slim.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    measured_section(args, dtype)
    reported_section(args, dtype)


if __name__ == "__main__":
    main()
