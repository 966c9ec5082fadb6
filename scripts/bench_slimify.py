"""What ``slimify(model, mode="k")`` costs per layer, next to one bare float64 SVD of the same W_K, measured in one run.

The K-mode calibration (:func:`hf_slim.kmode.choose_residual_rank`) factorises each layer's W_K once and measures every
candidate residual rank in the model's dtype. Before it took the float64 SVD of W_K and two float64 GEMMs per candidate
(1.2x-3.5x one SVD per layer at width 4096); from width :data:`hf_slim.kmode.LU_MIN_WIDTH` on it takes an LU and an
inverse subspace iteration instead (:class:`hf_slim.kmode.KeyInverse`).

For each width (Llama-shaped: ``hidden = width``, ``width / 128`` heads of 128, MHA, ``intermediate = 2.6875 width``,
random weights as ``from_config`` draws them, default calibration inputs) and dtype, one model with ``--layers``
decoder layers (default 1: a 32-layer width-4096 model needs ~26 GiB in fp32) is slimified end to end (calibration
forward, factorisation, probes, patching) and one bare ``torch.linalg.svd`` of its first W_K in float64 is timed in
the same run. Printed per row: slimify seconds per layer, the SVD's seconds, their ratio (the target is <= 0.5 at
width 4096), the chosen residual rank r per layer, the cache ratio against K/V at 4096 tokens, and 32 x the per-layer
time (a 32-layer model of that width, extrapolated, not measured). ``--compare-svd`` also slimifies with the float64
SVD factorisation forced (what widths below ``LU_MIN_WIDTH`` use) and prints its time and r beside: r must be the same
or smaller with the fast path.

Timings on a shared machine move with its load (printed before and after; other processes make multithreaded LAPACK
calls much slower): compare ratios measured in one run, not seconds across runs, and use ``--repeat N`` (the fastest
of N runs of each, SVD and slimify alike) where the load changes.

Usage: ``python scripts/bench_slimify.py [--widths 1024 2048 4096] [--dtypes fp32 bf16] [--layers 1] [--repeat 1]
[--compare-svd]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import hf_slim
from hf_slim import kmode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def llama(width: int, layers: int, dtype: torch.dtype) -> LlamaForCausalLM:
    """A Llama-shaped model with random weights (seeded): MHA, head_dim 128, Llama's MLP ratio."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=width,
        num_attention_heads=width // 128,
        num_key_value_heads=width // 128,
        intermediate_size=int(2.6875 * width),
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().to(dtype)


def timed_slimify(model) -> tuple[float, dict, float]:
    """Seconds of ``slimify(model, "k")``, the residual ranks it chose and the cache ratio at 4096 tokens; undone."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
        hf_slim.slimify(model, "k")
    seconds = time.perf_counter() - start
    record = hf_slim.slim_record(model)
    ranks = {name: record.residual_ranks.get(name, "kv") for name in record.layer_modes}
    ratio = hf_slim.cache_report(model, 1, 4096, verbose=False).ratio
    hf_slim.unslimify(model)
    return seconds, ranks, ratio


def bare_svd_seconds(model) -> float:
    """Seconds of one float64 ``torch.linalg.svd`` of the first layer's W_K (the copy to float64 not counted)."""
    weight = model.model.layers[0].self_attn.k_proj.weight.detach().double()
    start = time.perf_counter()
    torch.linalg.svd(weight)
    return time.perf_counter() - start


def warm_up() -> None:
    """First LAPACK calls of a process pay one-off setup (seconds): pay it before anything is timed."""
    small = torch.randn(256, 256, dtype=torch.float64)
    torch.linalg.svd(small)
    torch.linalg.lu_factor(small)
    torch.linalg.qr(small.float())
    torch.linalg.lu_factor(small.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp32", "bf16"])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers per model (default 1)")
    parser.add_argument("--compare-svd", action="store_true", help="also time the SVD factorisation and show its r")
    parser.add_argument("--repeat", type=int, default=1, help="time each row this often, keep the fastest (default 1)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {platform.system()} {platform.release()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, hf_slim {hf_slim.__version__}, torch threads {torch.get_num_threads()}; "
        f"fast path from width {kmode.LU_MIN_WIDTH}, {kmode.KeyInverse.ITERATIONS} iterations per block"
    )
    warm_up()
    header = (
        f"{'width':>5} {'dtype':<5} {'slimify s/layer':>15} {'SVD s':>7} {'ratio':>6} {'r per layer':<16} "
        f"{'cache':>6} {'32 layers':>10}"
    )
    if args.compare_svd:
        header += f" | {'SVD path s/layer':>16} {'ratio':>6} {'r per layer':<16}"
    print(header)
    for width in args.widths:
        for name in args.dtypes:
            model = llama(width, args.layers, DTYPES[name])
            svd = min(bare_svd_seconds(model) for _ in range(args.repeat))
            runs = [timed_slimify(model) for _ in range(args.repeat)]
            seconds, ranks, ratio = min(runs, key=lambda run: run[0])
            per_layer = seconds / args.layers
            row = (
                f"{width:>5} {name:<5} {per_layer:>15.2f} {svd:>7.2f} {per_layer / svd:>5.2f}x "
                f"{','.join(map(str, ranks.values())):<16} {ratio:>5.2f}x {32 * per_layer / 60:>7.1f} min"
            )
            if args.compare_svd:
                minimum, kmode.factorisation.LU_MIN_WIDTH = kmode.LU_MIN_WIDTH, sys.maxsize  # every layer on the SVD
                try:
                    svd_runs = [timed_slimify(model) for _ in range(args.repeat)]
                finally:
                    kmode.factorisation.LU_MIN_WIDTH = minimum
                svd_seconds, svd_ranks, _ = min(svd_runs, key=lambda run: run[0])
                svd_per_layer = svd_seconds / args.layers
                row += (
                    f" | {svd_per_layer:>16.2f} {svd_per_layer / svd:>5.2f}x "
                    f"{','.join(map(str, svd_ranks.values())):<16}"
                )
            print(row, flush=True)
            del model
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("(32 layers: 32 x the measured seconds per layer, extrapolated; ratio: slimify per layer / one SVD)")


if __name__ == "__main__":
    main()
