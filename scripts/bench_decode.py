"""End-to-end decode benchmark on one GPU: ms per decode step, peak memory and the largest batch in a memory budget,
slim vs unpatched, both at their fastest (static cache + ``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs).

Random weights at real shapes:

* ``gpt2-xl``: 48 layers, d 1600, 25 heads (decoder-only, learned positions);
* ``whisper-large-v3``: decoder of 32 layers, d 1280, 20 heads over 1500 encoder frames (the encoder output is
  random: only the decoder's cost is timed; the encoder output is allocated on both sides).

For each shape, batch and context: prefill ``context`` tokens (not timed, not compiled), then time ``--steps`` decode
steps of the compiled forward with CUDA events (median). The attention op alone is ``scripts/bench_attention.py``.

    python scripts/bench_decode.py --shape gpt2-xl whisper-large-v3 --batch 1 64 --context 1024
    python scripts/bench_decode.py --device cpu --tiny     # smoke test of the script itself, no GPU needed
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import (
    EncoderDecoderCache,
    GPT2Config,
    GPT2LMHeadModel,
    StaticCache,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import hf_slim
from hf_slim import cache_nbytes, slim_record, slimify
from hf_slim._compat import with_cache

SHAPES = {
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257),
    "whisper-large-v3": dict(
        d_model=1280,
        decoder_layers=32,
        decoder_attention_heads=20,
        encoder_layers=1,
        encoder_attention_heads=20,
        decoder_ffn_dim=5120,
        encoder_ffn_dim=256,
        vocab_size=51866,
        max_source_positions=1500,
        max_target_positions=448,
        num_mel_bins=128,
    ),
}
TINY = {
    "gpt2-xl": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=300),
    "whisper-large-v3": dict(
        d_model=64,
        decoder_layers=2,
        decoder_attention_heads=4,
        encoder_layers=1,
        encoder_attention_heads=4,
        decoder_ffn_dim=128,
        encoder_ffn_dim=128,
        vocab_size=300,
        max_source_positions=1500,
        max_target_positions=448,
        num_mel_bins=80,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    ),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[1024])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--budget-gib", type=float, default=40.0, help="memory budget for the largest-batch search")
    parser.add_argument("--no-compile", action="store_true", help="eager steps (for the slim/vanilla eager ratio)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (script smoke test)")
    return parser.parse_args()


def build(shape: str, tiny: bool, dtype: torch.dtype, device: str) -> torch.nn.Module:
    settings = (TINY if tiny else SHAPES)[shape]
    torch.manual_seed(0)
    with torch.device(device):
        if shape.startswith("gpt2"):
            config = GPT2Config(**settings, n_positions=8192)
            config._attn_implementation = "sdpa"
            model = GPT2LMHeadModel(config)
        else:
            config = WhisperConfig(**settings)
            config._attn_implementation = "sdpa"
            model = WhisperForConditionalGeneration(config)
    return model.eval().to(dtype)


def new_cache(model, batch: int, max_len: int, frames: int):
    """The fastest cache of each side: transformers' StaticCache, or the static slim cache."""
    if hf_slim.is_slim(model):
        return slim_record(model).new_cache(max_cache_len=max_len)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    if model.config.is_encoder_decoder:
        cache = EncoderDecoderCache(cache, StaticCache(config=model.config, max_cache_len=frames))
    return cache


def step_inputs(model, batch: int, device: str, dtype: torch.dtype, frames: int) -> dict:
    if not model.config.is_encoder_decoder:
        return {}
    encoder = torch.randn(batch, frames, model.config.d_model, device=device, dtype=dtype)
    return {"encoder_outputs": (encoder,)}


@torch.no_grad()
def run(model, batch: int, context: int, steps: int, compiled: bool, device: str, dtype, frames: int) -> dict:
    """Prefill then time decode steps; returns median ms/step, peak memory and the cache bytes."""
    ids_key = "decoder_input_ids" if model.config.is_encoder_decoder else "input_ids"
    extra = step_inputs(model, batch, device, dtype, frames)
    cache = new_cache(model, batch, context + steps + 1, frames)
    ids = torch.randint(0, model.config.vocab_size, (batch, context + steps + 1), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model(**{ids_key: ids[:, :context]}, **with_cache(cache), **extra)
    # fullgraph=False: whether dynamo traces the Triton launcher whole is unverified (no GPU yet); a graph break
    # still leaves CUDA graphs around the pieces
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False) if compiled else model.forward
    times = []
    for position in range(context, context + steps):
        kwargs = {
            ids_key: ids[:, position : position + 1],
            **with_cache(cache),
            "cache_position": torch.tensor([position], device=device),
        }
        if not model.config.is_encoder_decoder:
            kwargs["position_ids"] = torch.full((batch, 1), position, device=device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(**kwargs, **extra)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            forward(**kwargs, **extra)
            times.append(1000 * (time.perf_counter() - begin))
    warm = times[len(times) // 2 :]  # compile / graph capture happen in the first steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return {"ms": statistics.median(warm), "peak": peak, "cache": cache_nbytes(cache)}


def largest_batch(model, context: int, budget: int, device: str, dtype, frames: int) -> int:
    """Largest power-of-two batch whose prefill + one eager decode step peaks under ``budget`` bytes."""
    if device != "cuda":
        return 0
    best, batch = 0, 1
    while batch <= 4096:
        try:
            peak = run(model, batch, context, 1, False, device, dtype, frames)["peak"]
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        if peak > budget:
            break
        best, batch = batch, batch * 2
    return best


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_decode.py needs a CUDA GPU (or --device cpu --tiny for a smoke test)")
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"# {' '.join(sys.argv)}")
    print(
        f"# {gpu}; torch {torch.__version__}, transformers {transformers.__version__}, hf_slim {hf_slim.__version__}, "
        f"{datetime.date.today()}; {args.dtype}, random weights, {'eager' if args.no_compile else 'compiled'} steps"
    )
    print(
        f"{'shape':<17} {'batch':>5} {'ctx':>6} {'vanilla ms':>10} {'slim ms':>8} {'speedup':>7} "
        f"{'vanilla peak':>12} {'slim peak':>10} {'cache x':>7}"
    )
    frames = 1500
    for shape in args.shape:
        vanilla = build(shape, args.tiny, dtype, args.device)
        slim = slimify(copy.deepcopy(vanilla))
        for batch in args.batch:
            for context in args.context:
                context = min(context, 440) if shape.startswith("whisper") else context
                results = {}
                for name, model in (("vanilla", vanilla), ("slim", slim)):
                    results[name] = run(
                        model, batch, context, args.steps, not args.no_compile, args.device, dtype, frames
                    )
                    torch._dynamo.reset()
                v, s = results["vanilla"], results["slim"]
                print(
                    f"{shape:<17} {batch:>5} {context:>6} {v['ms']:>10.3f} {s['ms']:>8.3f} {v['ms'] / s['ms']:>7.2f} "
                    f"{v['peak'] / 2**30:>10.2f}Gi {s['peak'] / 2**30:>8.2f}Gi {v['cache'] / max(s['cache'], 1):>7.2f}"
                )
        if args.device == "cuda":
            context = min(args.context[0], 440) if shape.startswith("whisper") else args.context[0]
            budget = int(args.budget_gib * 2**30)
            sizes = {
                name: largest_batch(m, context, budget, args.device, dtype, frames)
                for name, m in (("vanilla", vanilla), ("slim", slim))
            }
            print(f"# {shape}: largest batch under {args.budget_gib} GiB at context {context}: {sizes}")
        del vanilla, slim


if __name__ == "__main__":
    main()
