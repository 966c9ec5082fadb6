"""CPU decode benchmark: ms per decode step and cache bytes, slim vs unpatched, measured in the same run.

Random weights at a real shape (GPT-2 small by default: 12 layers, d 768, 12 heads). For each batch size and context
length: prefill the context, then time ``--steps`` single-token forward passes with the cache (median step time) for
the unpatched model (DynamicCache) and the slim model (input mode, and K mode forced on every layer). Prints machine,
versions, command, and ratios slim / vanilla.

    python scripts/bench_cpu_decode.py --batch 1 8 --context 256 1024 2048
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import hf_slim
from hf_slim import SlimCache, cache_nbytes, slim_record, slimify
from hf_slim._compat import with_cache


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per configuration")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser.parse_args()


@torch.no_grad()
def time_decode(model, cache, batch: int, context: int, steps: int) -> tuple[float, int]:
    """Median ms of one decode step after a ``context``-token prefill, and the cache bytes at the end."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context + steps + 1), generator=generator)
    model(input_ids=ids[:, :context], **with_cache(cache))
    times = []
    for position in range(context, context + steps + 1):
        start = time.perf_counter()
        model(input_ids=ids[:, position : position + 1], **with_cache(cache))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:]), cache_nbytes(cache)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = GPT2Config(
        n_layer=args.layers, n_embd=args.d_model, n_head=args.heads, n_positions=max(args.context) + args.steps + 2
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    vanilla = GPT2LMHeadModel(config).eval().to(dtype)
    slim_input = slimify(copy.deepcopy(vanilla), "input")
    # the K cache is forced on every layer (no calibration gate) to time it: random weights rarely pass the gate
    k_layers = {name: ("k" if mode == "input" else mode) for name, mode in slim_record(slim_input).layer_modes.items()}
    models = {
        "vanilla": (vanilla, DynamicCache),
        "slim-input": (slim_input, SlimCache),
        "slim-k": (slimify(copy.deepcopy(vanilla), "k", layer_modes=k_layers), SlimCache),
    }

    print(f"# {' '.join(sys.argv)}")
    machine = platform.processor() or platform.machine()
    print(
        f"# {machine}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, hf_slim {hf_slim.__version__}; {time.strftime('%Y-%m-%d')}"
    )
    print(f"# GPT-2 shape: {args.layers} layers, d {args.d_model}, {args.heads} heads, {args.dtype}, random weights")
    print(
        f"{'batch':>5} {'context':>7} {'vanilla ms':>10} {'input ms':>9} {'x':>6} {'k ms':>8} {'x':>6} {'bytes x':>8}"
    )
    for batch in args.batch:
        for context in args.context:
            results = {
                name: time_decode(model, cache(), batch, context, args.steps) for name, (model, cache) in models.items()
            }
            base_ms, base_bytes = results["vanilla"]
            input_ms, input_bytes = results["slim-input"]
            k_ms, _ = results["slim-k"]
            print(
                f"{batch:>5} {context:>7} {base_ms:>10.2f} {input_ms:>9.2f} {input_ms / base_ms:>6.2f} "
                f"{k_ms:>8.2f} {k_ms / base_ms:>6.2f} {base_bytes / input_bytes:>8.2f}"
            )


if __name__ == "__main__":
    main()
