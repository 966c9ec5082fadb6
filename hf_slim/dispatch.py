"""Which exact decode path runs where: the rule, and the GPU measurements it rests on (one place).

Every path computes the same function (:func:`hf_slim.absorbed.absorbed_attention` is the specification); they
differ in speed only, so the choice is made by measurement, never assumed:

* **the Triton kernel** (:mod:`hf_slim.kernels`) runs a decode step only where a GPU run showed it faster than the
  PyTorch path end to end. Today that is nowhere: on an H200 it was 1.4-2.4x slower than SDPA over K and V
  (20-37% of the copy bandwidth, SDPA 97-106%) and made ``generate()`` slower than the PyTorch path in every case
  measured (:data:`KERNEL_MEASUREMENTS`). ``HF_SLIM_KERNEL=1`` forces it (benchmarks, the kernel's own tests),
  ``HF_SLIM_KERNEL=0`` forbids it.
* **K-cache scores on a GPU** (:func:`padded_head_scores`): each head scores against its own ``head_dim`` slice of
  the cached keys. A batched matmul over per-head slices of a ``(batch, seq, width)`` tensor cannot be expressed
  without copying the keys into a head-major layout; on CUDA the queries are laid out block-diagonally instead
  (each head's query at its own columns, zeros elsewhere) and one batched matmul reads the cache in place, in its
  own dtype with float32 accumulation and output (``heads`` times the multiply-adds, on the matrix units, against
  a full copy of the keys). On the CPU, where the multiply-adds are the cost, the keys are copied per head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measurement:
    """One GPU measurement of the kernel against the PyTorch path (or SDPA): microseconds or seconds as named."""

    case: str
    dtype: torch.dtype
    kernel: float
    torch_path: float
    unit: str  # "us": the attention op alone; "s": generate() end to end, what decides


#: Measured 2026-12-04 on one H200 (torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0), shared/GPU.md:
#: ``scripts/bench_attention.py --check --graph`` (bf16, CUDA graphs; "torch_path" is SDPA over K and V) and
#: ``generate()`` end to end (kernel vs ``HF_SLIM_KERNEL=0``).
KERNEL_MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("Llama b16 x 32 heads x 128, n 1k, attention op", torch.bfloat16, 104.9, 64.6, "us"),
    Measurement("Llama b16 x 32 heads x 128, n 4k, attention op", torch.bfloat16, 356.7, 241.8, "us"),
    Measurement("Llama b16 x 32 heads x 128, n 16k, attention op", torch.bfloat16, 1350.0, 952.0, "us"),
    Measurement("Whisper-large-v3 cross b64, attention op", torch.float16, 283.6, 116.8, "us"),
    Measurement("Whisper-large-v3 cross 16 x 5 beams, attention op", torch.float16, 1201.6, 544.1, "us"),
    Measurement("Whisper-large-v3 b64 greedy 128 tok, generate", torch.float16, 12.42, 6.89, "s"),
    Measurement("Whisper-large-v3 16 x 5 beams 128 tok, generate", torch.float16, 9.62, 6.67, "s"),
    Measurement("Whisper-large-v3 b16 greedy 64 tok, generate", torch.float32, 7.18, 4.29, "s"),
    Measurement("GPT-2-XL b32 prompt 1024 128 tok, generate", torch.float16, 7.51, 6.06, "s"),
    Measurement("Llama-2-7B shape b8 prompt 2048 64 tok, generate", torch.bfloat16, 7.89, 7.22, "s"),
)


def kernel_wins(dtype: torch.dtype) -> bool:
    """Whether GPU runs showed the kernel faster than the PyTorch path end to end (``generate()``) in ``dtype``: at
    least one such measurement, and the kernel faster in every one. None does today, so the kernel never runs by
    default; a new row here (with its command and date above) is how it would."""
    rows = [row for row in KERNEL_MEASUREMENTS if row.unit == "s" and row.dtype == dtype]
    return bool(rows) and all(row.kernel < row.torch_path for row in rows)


def use_fused_kernel(cache: torch.Tensor) -> bool:
    """Whether a decode step over ``cache: (batch, seq, width)`` runs the Triton kernel.

    ``HF_SLIM_KERNEL=1`` forces it where Triton can run (CUDA, or Triton's interpreter in tests), ``0`` forbids it;
    unset, it runs only where :func:`kernel_wins`. Triton is imported only when the kernel could run, so CPU users
    never pay for it.
    """
    setting = os.environ.get("HF_SLIM_KERNEL")
    if setting == "0" or (setting != "1" and not (cache.is_cuda and kernel_wins(cache.dtype))):
        return False
    from . import kernels

    return kernels.triton_available(cache.device)


def padded_head_scores(cache: torch.Tensor) -> bool:
    """Whether K-cache scores read ``cache`` in place with block-diagonal queries (CUDA) rather than a per-head
    copy of the keys (CPU); see the module docstring."""
    return cache.is_cuda
