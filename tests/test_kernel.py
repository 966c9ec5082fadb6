"""The Triton slim decode kernel against its specification, :func:`hf_slim.absorbed.absorbed_attention`.

Without a GPU the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set below, before Triton is
imported (the interpreter is chosen when Triton's and our ``@triton.jit`` functions are decorated). When another
module imported Triton first (``transformers`` model classes do), this file re-runs itself in a fresh Python
process instead. With CUDA the same tests run on the GPU.

Tolerances (``|out - ref| <= atol + rtol * |ref|``, outputs are O(1)): the kernel rounds the query and the softmax
probabilities to the cache dtype once each (like flash attention) and accumulates in fp32, the reference computes
everything in fp32 from the same (already rounded) inputs.

* fp32: 1e-4 (ieee dots; only summation order differs);
* fp16: 4e-3 (two roundings of 2^-11 relative);
* bf16: 3e-2 (two roundings of 2^-8; Triton's interpreter truncates fp32 -> bf16 instead of rounding, 2^-7);
* ``precise=True`` (hi + lo operands) with fp16/bf16 caches: 1e-4.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton imported earlier in this process without the interpreter: its own jit functions (tl.zeros, tl.max, ...)
# are compiled-mode objects and the interpreter cannot run; the tests then run in a subprocess.
NEEDS_FRESH_PROCESS = DEVICE.type == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if DEVICE.type == "cpu" and not NEEDS_FRESH_PROCESS:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

pytest.importorskip("triton", reason="needs triton (pip install hf-slim[kernels])")

from hf_slim.absorbed import absorbed_attention, additive_bias  # noqa: E402
from hf_slim.kernels import slim_decode as sd  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PRECISE_TOL = 1e-4


def make_inputs(batch, heads, queries, seq, width, *, head_slice, dtype, query_dtype=None, seed=0, residual=0):
    """Fresh non-zero random query ``(b, h, t, width or head_dim)`` and cache ``(b, n, width)``; with ``residual``
    (head_slice only) the last ``residual`` cache columns are a K+R residual: ``head_dim = (width - residual) / h``."""
    gen = torch.Generator().manual_seed(seed)
    q_width = (width - residual) // heads if head_slice else width
    query = torch.randn(batch, heads, queries, q_width, generator=gen).to(query_dtype or dtype).to(DEVICE)
    cache = (torch.randn(batch, seq, width, generator=gen) + 0.1).to(dtype).to(DEVICE)
    return query, cache


def make_bias(kind, batch, heads, queries, seq, seed=1):
    """None, a left-padding mask (additive, finfo.min), or a random float bias broadcast over the batch."""
    gen = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "pad":  # batch row i has i * 3 left-padding keys (never all of them)
        keep = torch.ones(batch, seq, dtype=torch.bool)
        for i in range(batch):
            keep[i, : min(3 * i, seq - 1)] = False
        return additive_bias(keep[:, None, None, :]).to(DEVICE)  # (b, 1, 1, n)
    if kind == "rand":  # T5-style position bias: (1, h, t, n)
        return (2 * torch.randn(1, heads, queries, seq, generator=gen)).to(DEVICE)
    if kind == "expand":  # stride-0 view, never materialised
        return torch.randn(1, heads, 1, seq, generator=gen).to(DEVICE).expand(batch, heads, queries, seq)
    raise ValueError(kind)


def run_and_compare(query, cache, *, head_slice, bias=None, tol, precise=False, config=None):
    scale = query.shape[-1] ** -0.5
    batch, heads, queries, _ = query.shape
    out = torch.full((batch, heads, queries, cache.shape[-1]), float("nan"), device=DEVICE)  # poisoned
    got = sd.slim_decode_attention(
        query, cache, scale=scale, bias=bias, head_slice=head_slice, precise=precise, config=config, out=out
    )
    assert got is out
    ref, _ = absorbed_attention(query.float(), cache, scale=scale, bias=bias, head_slice=head_slice)
    assert_close(got, ref, tol)


def assert_close(got, ref, tol):
    diff = (got - ref).abs()
    max_abs = diff.max().item()
    max_rel = (diff / (ref.abs() + tol)).max().item()
    ok = torch.isfinite(got).all() and bool((diff <= tol + tol * ref.abs()).all())
    assert ok, (
        f"max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e}, tol {tol:g}, nan/inf: {(~got.isfinite()).sum()}"
    )


@pytest.fixture(autouse=True)
def skip_unless_runnable(request):
    if request.function.__name__ == "test_in_fresh_process":
        return
    if NEEDS_FRESH_PROCESS:
        pytest.skip("run by test_in_fresh_process (triton was imported before TRITON_INTERPRET=1 was set)")
    if not sd.triton_available(DEVICE):
        pytest.skip(f"triton cannot run on {DEVICE}")


@pytest.fixture(autouse=True)
def poison_scratch(monkeypatch):
    """Every scratch buffer the wrapper allocates (partials, scores) starts as NaN: unwritten reads show up."""
    monkeypatch.setattr(sd, "_empty", lambda shape, device: torch.full(shape, float("nan"), device=device))


# (batch, heads, queries, seq, width, head_slice, bias, dtype): a spread over the grid, not its product.
# head_slice cases have heads * head_dim == width here; RESIDUAL_CASES below add K+R residual columns.
CASES = [
    (2, 4, 1, 7, 64, False, None, torch.float32),
    (2, 1, 3, 1, 64, True, "rand", torch.float32),
    (3, 6, 3, 130, 96, True, "pad", torch.float32),
    (2, 4, 3, 130, 96, False, "expand", torch.float16),
    (2, 6, 1, 7, 384, False, "pad", torch.float16),
    (1, 4, 1, 130, 384, True, None, torch.bfloat16),
    (2, 6, 3, 1, 96, False, "rand", torch.bfloat16),
    (2, 1, 1, 130, 64, False, "pad", torch.bfloat16),
    (2, 6, 1, 700, 384, False, "pad", torch.float16),  # long: several splits + combine
    (1, 4, 3, 700, 96, True, "rand", torch.float32),  # long, head_slice
    (2, 6, 1, 700, 96, True, "pad", torch.bfloat16),  # long
]


def _case_id(case):
    b, h, t, n, w, hs, bias, dtype = case
    return f"b{b}h{h}t{t}n{n}w{w}{'-slice' if hs else ''}-{bias}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case):
    batch, heads, queries, seq, width, head_slice, bias_kind, dtype = case
    query, cache = make_inputs(batch, heads, queries, seq, width, head_slice=head_slice, dtype=dtype)
    bias = make_bias(bias_kind, batch, heads, queries, seq)
    run_and_compare(query, cache, head_slice=head_slice, bias=bias, tol=TOL[dtype])


# (batch, heads, queries, seq, e, r, bias, dtype): K+R caches of width e + r, scores from the first e columns only.
RESIDUAL_CASES = [
    (2, 4, 1, 7, 64, 16, None, torch.float32),
    (3, 6, 3, 130, 96, 48, "pad", torch.float32),
    (1, 4, 1, 130, 384, 192, "rand", torch.bfloat16),  # Whisper tiny.en layer 0 in bf16 (r = d/2), 2 width chunks
    (2, 6, 1, 700, 384, 48, "pad", torch.float16),  # long: several splits + combine; width 432 not a power of 2
    (1, 4, 3, 700, 96, 96, "rand", torch.float32),  # r = d
]


@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=lambda c: f"b{c[0]}h{c[1]}t{c[2]}n{c[3]}e{c[4]}r{c[5]}-{c[6]}")
def test_k_plus_r_cache_matches_reference(case):
    batch, heads, queries, seq, inner, residual, bias_kind, dtype = case
    query, cache = make_inputs(
        batch, heads, queries, seq, inner + residual, head_slice=True, dtype=dtype, residual=residual
    )
    assert query.shape[-1] * heads == inner
    bias = make_bias(bias_kind, batch, heads, queries, seq)
    run_and_compare(query, cache, head_slice=True, bias=bias, tol=TOL[dtype])


@pytest.mark.parametrize(
    "name", ["recompute-3-width-chunks", "recompute-chunked-scores", "two-pass-splits", "single-tile-splits"]
)
def test_k_plus_r_cache_forced_configs(name):
    """Width 96 + 32 in 32-wide chunks: the residual columns get their own width programs, scored by none."""
    query, cache = make_inputs(2, 6, 3, 70, 128, head_slice=True, dtype=torch.float16, residual=32)
    run_and_compare(
        query, cache, head_slice=True, bias=make_bias("pad", 2, 6, 3, 70), tol=TOL[torch.float16], config=CONFIGS[name]
    )


def test_long_sequence_uses_several_splits():
    cfg = sd.choose_config(2, 6, 700, 384)
    assert cfg.num_splits > 1 and not cfg.two_pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_precise_fp32_query(dtype):
    """The realistic absorbed call: fp32 query (from absorb_query) over a half-precision cache."""
    query, cache = make_inputs(2, 4, 3, 130, 96, head_slice=False, dtype=dtype, query_dtype=torch.float32)
    bias = make_bias("pad", 2, 4, 3, 130)
    run_and_compare(query, cache, head_slice=False, bias=bias, tol=TOL[dtype])
    run_and_compare(query, cache, head_slice=False, bias=bias, tol=PRECISE_TOL, precise=True)


# Forced launch configurations: every code path of the kernels on small shapes.
_BASE = sd.DecodeConfig(block_m=16, block_n=16, block_w=32, block_d=32, num_splits=1, two_pass=False)
CONFIGS = {
    "recompute-3-width-chunks": _BASE,
    "recompute-splits": dataclasses.replace(_BASE, num_splits=4),
    "recompute-chunked-scores": dataclasses.replace(_BASE, block_w=128, block_d=32, num_splits=3),
    "two-pass": dataclasses.replace(_BASE, two_pass=True, score_splits=3, score_block_n=16, score_block_d=32),
    "two-pass-splits": dataclasses.replace(_BASE, two_pass=True, num_splits=3, score_block_d=64, score_splits=2),
    "single-tile-splits": dataclasses.replace(_BASE, block_w=128, block_d=128, block_n=32, num_splits=3),
}


@pytest.mark.parametrize("head_slice", [False, True], ids=["absorbed", "slice"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forced_configs(name, head_slice):
    """heads*queries = 18 rows over block_m 16: two row blocks, the second partial; width 96 = 3 x 32 chunks."""
    dtype = torch.float16 if head_slice else torch.float32
    query, cache = make_inputs(2, 6, 3, 70, 96, head_slice=head_slice, dtype=dtype)
    bias = make_bias("pad", 2, 6, 3, 70)
    run_and_compare(query, cache, head_slice=head_slice, bias=bias, tol=TOL[dtype], config=CONFIGS[name])


def test_strided_inputs():
    """Non-contiguous query (transposed) and cache (a slice of a wider, longer buffer)."""
    query, big = make_inputs(2, 4, 3, 150, 128, head_slice=False, dtype=torch.float16)
    cache = big[:, 10:140, 16:112]  # (2, 130, 96), row stride 128
    query = query[..., :96].transpose(1, 2).contiguous().transpose(1, 2)  # (2, 4, 3, 96), non-contiguous
    assert not cache.is_contiguous() and not query.is_contiguous()
    run_and_compare(query, cache, head_slice=False, bias=make_bias("rand", 2, 4, 3, 130), tol=TOL[torch.float16])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 / 0
@pytest.mark.parametrize("config", [None, CONFIGS["two-pass-splits"]], ids=["default", "two-pass-splits"])
def test_fully_masked_rows_match_torch_softmax(config):
    """All keys at finfo.min: uniform weights (the mean cache row), like torch.softmax. All -inf: NaN, like it."""
    query, cache = make_inputs(3, 2, 3, 60, 96, head_slice=False, dtype=torch.float32)
    bias = torch.zeros(3, 1, 1, 60, device=DEVICE)
    bias[1] = torch.finfo(torch.float32).min
    bias[2, ..., :30] = float("-inf")  # half the keys -inf, the rest finite: normal rows
    got = sd.slim_decode_attention(query, cache, scale=0.125, bias=bias, config=config)
    ref, _ = absorbed_attention(query, cache, scale=0.125, bias=bias)
    assert_close(got, ref, TOL[torch.float32])
    torch.testing.assert_close(got[1], cache[1].mean(0).expand_as(got[1]), atol=1e-4, rtol=1e-4)

    bias[0] = float("-inf")
    got = sd.slim_decode_attention(query, cache, scale=0.125, bias=bias, config=config)
    ref, _ = absorbed_attention(query, cache, scale=0.125, bias=bias)
    assert ref[0].isnan().all() and got[0].isnan().all()
    assert_close(got[1:], ref[1:], TOL[torch.float32])


def test_empty_cache_and_shape_errors():
    query, cache = make_inputs(1, 2, 1, 0, 64, head_slice=False, dtype=torch.float32)
    got = sd.slim_decode_attention(query, cache, scale=1.0)
    torch.testing.assert_close(got, absorbed_attention(query, cache, scale=1.0)[0])
    query, cache = make_inputs(1, 2, 1, 5, 64, head_slice=True, dtype=torch.float32)
    with pytest.raises(ValueError, match="head_slice"):  # heads * head_dim = 2 * 48 > 64 columns
        sd.slim_decode_attention(torch.cat([query, query[..., :16]], -1), cache, scale=1.0, head_slice=True)
    with pytest.raises(ValueError, match="width"):
        sd.slim_decode_attention(query, cache, scale=1.0)
    with pytest.raises(TypeError, match="bias"):
        sd.slim_decode_attention(query, cache, scale=1.0, head_slice=True, bias=torch.ones(5, dtype=torch.bool))


def test_cpu_without_interpreter_raises_clearly():
    code = (
        "import torch\n"
        "from hf_slim.kernels import slim_decode_attention, triton_available\n"
        "assert not triton_available('cpu')\n"
        "try:\n"
        "    slim_decode_attention(torch.randn(1, 2, 1, 64), torch.randn(1, 5, 64), scale=1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# (batch, heads, queries, seq, width, extra value columns, bias, dtype): RoPE K cache (values = un-rotated keys, fp32)
# and a K cache carrying extra value columns (K+R); seq 700 runs several splits + combine; extra -1: a key-scaled K+R
# cache [K_n | Z | s] (e = 64, r = 16) whose values [s * K | Z] are one column narrower (OLMo-2).
VALUES_CASES = [
    (2, 4, 1, 7, 64, 0, "pad", torch.float32),
    (3, 4, 3, 130, 96, 0, None, torch.bfloat16),
    (2, 6, 1, 700, 96, 0, "pad", torch.float16),
    (1, 4, 1, 130, 64, 32, "rand", torch.float32),
    (2, 4, 1, 130, 81, -1, "pad", torch.bfloat16),
]


@pytest.mark.parametrize("case", VALUES_CASES, ids=lambda case: f"b{case[0]}n{case[3]}w{case[4]}+{case[5]}")
def test_separate_values_match_reference(case):
    """Scores from the cache (head slices), weighted sum over another tensor: the RoPE K-cache decode step."""
    batch, heads, queries, seq, width, extra, bias_kind, dtype = case
    residual = 17 if extra < 0 else 0  # cache columns after the keys: Z and the key scale
    query, cache = make_inputs(batch, heads, queries, seq, width, head_slice=True, dtype=dtype, residual=residual)
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(batch, seq, width + extra, generator=gen).to(DEVICE)  # float32, like un-rotated keys
    bias = make_bias(bias_kind, batch, heads, queries, seq)
    scale = query.shape[-1] ** -0.5
    got = sd.slim_decode_attention(query, cache, scale=scale, bias=bias, head_slice=True, values=values)
    ref, _ = absorbed_attention(query.float(), cache, scale=scale, bias=bias, head_slice=True, values=values)
    assert got.shape == (batch, heads, queries, width + extra)
    assert_close(got, ref, TOL[dtype])


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the tests above run in this process")
def test_in_fresh_process():
    """Re-run this file where TRITON_INTERPRET=1 is set before Triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
