"""What the K-mode derived-state check costs: once per generate() against one decode step, measured in the same run.

``hf_slim.generation.check_derived_state`` reads W_K, W_V and the K-mode buffers (W_KV, value offset, z_proj) of every K
layer once, as float64 sketches, before every generate() call and at the first forward on every new slim cache. This
times it (median of ``--repeats``) against the median decode step of the same slim model (batch ``--batch``, after a
``--context``-token prefill), and against a whole ``generate()`` of ``--new-tokens`` tokens, and prints the ratios.
Random weights at a real shape (GPT-2 small by default: 12 layers, d 768), every layer forced onto the K cache.

    python scripts/bench_derived_check.py --context 256 1024 --batch 1 8 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import hf_slim
from hf_slim import SlimCache, slim_record, slimify
from hf_slim._compat import with_cache
from hf_slim.generation import check_derived_state


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per configuration")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per timed generate() call")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of the check")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser.parse_args()


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def decode_step_ms(model, batch: int, context: int, steps: int) -> float:
    """Median ms of one decode step after a ``context``-token prefill (the cache checked once, at the prefill)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context + steps + 1), generator=torch.Generator())
    cache = SlimCache()
    model(input_ids=ids[:, :context], **with_cache(cache))
    times = []
    for position in range(context, context + steps + 1):
        start = time.perf_counter()
        model(input_ids=ids[:, position : position + 1], **with_cache(cache))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        n_positions=max(args.context) + max(args.steps, args.new_tokens) + 2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval().to(getattr(torch, args.dtype))
    layer_modes = {f"GPT2Attention[self {i}]": "k" for i in range(args.layers)}
    slimify(model, "k", layer_modes=layer_modes)
    record = slim_record(model)

    print(f"# {' '.join(sys.argv)}")
    machine = platform.processor() or platform.machine()
    print(
        f"# {machine}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, hf_slim {hf_slim.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    print(f"# GPT-2 shape: {args.layers} layers, d {args.d_model}, {args.heads} heads, {args.dtype}, all layers K")
    check_derived_state(record)  # warm up
    check = median_ms(lambda: check_derived_state(record), args.repeats)
    print(f"check (all {args.layers} K layers): {check:.2f} ms")
    print(f"{'batch':>5} {'context':>8} {'step ms':>9} {'check/step':>11} {'generate ms':>12} {'check/generate':>15}")
    for batch in args.batch:
        for context in args.context:
            step = decode_step_ms(model, batch, context, args.steps)
            ids = torch.randint(0, config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(1))
            settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            with torch.no_grad():
                generate = median_ms(lambda ids=ids, settings=settings: model.generate(ids, **settings), 3)
            print(
                f"{batch:>5} {context:>8} {step:>9.2f} {check / step:>10.2f}x {generate:>12.1f} "
                f"{100 * check / generate:>14.2f}%"
            )


if __name__ == "__main__":
    main()
