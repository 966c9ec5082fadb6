"""Triton decode kernel for slim caches: every head attends over ONE shared ``(batch, seq, width)`` tensor.

Computes exactly what :func:`hf_slim.absorbed.absorbed_attention` computes (its first output), float32
``mixed: (batch, heads, queries, width)``; the per-head value projection stays with the caller.

Design
------
Let ``rows = heads * queries`` (row ``r = head * queries + t``, the reference's ``(b, h*t, w)`` order) and let the
cache be ``C: (batch, seq, width)``. For one batch row the work is two skinny GEMMs sharing ``C``::

    S = scale * Q C^T + bias        (rows, seq)      Q: (rows, width)
    O = softmax(S) C                (rows, width)

``C`` is the only large operand, so the kernel is built around reading it as few times as possible:

* **Grid** ``(row_blocks * width_blocks, num_splits, batch)``. A program owns ``BLOCK_M`` query rows (all heads and
  queries of the batch row when ``rows <= 64``), one ``BLOCK_W`` chunk of the output width and one contiguous
  sequence split. It walks its split in ``BLOCK_N`` cache rows with an online softmax (running max / sum in fp32)
  and accumulates ``P @ C[:, chunk]`` into a ``(BLOCK_M, BLOCK_W)`` fp32 register accumulator.
* **Width tiling.** The accumulator of a whole batch row, ``rows * width`` fp32 (32 x 4096 = 512 KiB for
  Llama-2-7B), is larger than a streaming multiprocessor's registers plus shared memory, so no single program can
  hold it; the output width is split into ``width_blocks`` chunks owned by different programs. Those programs all
  need the full-width scores, which they get in one of two ways (``DecodeConfig.two_pass``):

  - *recompute* (``two_pass=False``, chosen when at most ``MAX_SCORE_READERS`` programs share a cache row): each
    program computes the scores of its rows itself, reducing over the width in ``BLOCK_D`` chunks. The cache is read
    once from HBM; the sibling programs (adjacent program ids, so they run together) re-read it from L2. With a
    single width chunk (``BLOCK_W >= width``, the common case for widths up to ~1024) one ``(BLOCK_N, BLOCK_W)``
    tile serves both the scores and ``P @ C``: the cache is read exactly once, nothing else is materialised.
  - *two-pass* (wide caches with many heads, e.g. 32 heads x width 4096): a scores kernel computes
    ``S`` once per batch row (grid ``(row_blocks, score_splits, batch)``, full-width rows) into a float32 scratch
    ``(batch, rows, seq)``; the main kernel then reads ``S`` instead of recomputing it and only reads its own width
    chunk of the cache. HBM traffic is two reads of the cache (the same bytes as vanilla K+V decode when
    ``width = heads * head_dim``) plus ``rows * seq * 4`` bytes of scores, instead of ``width_blocks`` L2 re-reads
    and ``width_blocks``-fold redundant score FLOPs.
* **Sequence splits** (flash-decoding / LeanAttention). With ``num_splits > 1`` each program writes a partial
  ``(acc, max, sum)`` and ``_combine_kernel`` rescales and sums them (one pass over ``(batch, splits, rows, width)``
  fp32). With one split the main kernel normalises and writes the output directly. ``choose_config`` picks
  ``num_splits`` with a bandwidth model: time ~ (cache bytes + ``splits * rows * width * 8`` partial bytes) /
  fraction of the GPU busy, where ``PROGRAMS_PER_SM * SMs`` programs (2 x 132 on an H100) count as full. Large
  batches and short contexts get one split; batch 1 at 16k tokens gets ~33.
* **head_slice** (K cache): head ``i`` scores against columns ``[i*head_dim, (i+1)*head_dim)`` only. The query row
  is read as a full-width row that is zero outside its head's slice (masked load, nothing materialised), so the
  score code is shared with the absorbed layout; a row block only reduces over the columns its heads cover.
  ``P @ C`` always uses the full width. A K+R cache (``width = heads*head_dim + r``, :mod:`hf_slim.kmode`) keeps
  its residual columns after the keys: no head's slice covers them, so they are weighted in ``P @ C`` and never
  scored.
* **Dots.** All dot shapes are padded to >= 16 (rows, cache rows and width are masked), so ``tl.dot`` always
  applies; padded query rows score 0 and are never stored. Operands are rounded to the cache dtype and accumulated
  in fp32, like flash attention (the query and the probabilities ``P`` get one rounding each). ``precise=True``
  splits each fp32 operand into hi + lo parts in the cache dtype (two dots, ~16 mantissa bits, close to the fp32
  reference). fp32 caches use ``input_precision="ieee"`` (no TF32).
* **Masked rows.** Scores are ``scale * q.c + bias`` in fp32, exactly as in the reference. A row whose keys all
  carry ``torch.finfo(float32).min`` has equal scores, so (like ``torch.softmax``) it gets uniform weights: the
  mean of the cache rows. A row whose keys are all ``-inf`` gives NaN, again like ``torch.softmax``; the running
  max is guarded so ``-inf`` never produces NaN for rows that have at least one finite key.

NOTES (to tune on the H100: nothing here was timed)
---------------------------------------------------
What was checked without a GPU: results in Triton's interpreter (tests/test_kernel.py), and compilation for sm_90
with the launch specialisation of real calls (ptxas register / spill report): no spills for the default configs of
the benchmark shapes (e.g. Llama-2-7B b16: main kernel 172 registers at 8 warps, i.e. one program per SM; scores
kernel ~80-140). To tune (``scripts/bench_attention.py --tune`` times variants of each):

* ``num_splits`` / ``PROGRAMS_PER_SM``: the model assumes 2 programs per SM; at 172 registers x 8 warps only one
  fits, so compare ``num_splits x2`` and ``num_warps=4``.
* ``block_n`` (main kernel: ``min(64, 16384 // block_w, 2048 // block_m)``), ``num_stages`` (2) and
  ``num_warps`` (8 above 4096 accumulator elements): bytes in flight per SM vs registers.
* ``ACC_BUDGET`` (fp32 accumulator elements per program, sets ``block_w``) and ``MAX_SCORE_READERS`` (recompute vs
  two-pass; with 2 the Llama shape is two-pass, Whisper-large too: 1280 wide, 20 heads -> 3 width chunks).
* the scores kernel: ``score_block_n`` (64), ``score_block_d`` (128), ``score_warps``, ``score_splits``; it is a
  plain skinny GEMM and could also be cuBLAS (``torch.baddbmm``) where no ``head_slice`` is needed.
* ``rows`` below 16 pad to 16 MMA rows; swapping operands (``S^T = C Q^T``, cache rows on the MMA M side, wgmma
  64-row tiles) may be faster for few heads. ``head_slice`` computes full-width dots with zeros outside each head's
  slice (``heads`` x the needed score FLOPs when one row block holds all heads): fine while memory bound.
* ``precise=True`` doubles the tensor-core work; check it stays memory bound.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ACC_BUDGET = 16384  # fp32 accumulator elements per program (64 registers per thread at 8 warps)
MAX_SCORE_READERS = 2  # recompute scores in-program while at most this many programs read each cache row
PROGRAMS_PER_SM = 2
DEFAULT_SMS = 132  # H100 SXM; used when the device cannot be queried (interpreter)
MAX_BLOCK_M = 64

_INTERPRET_ENV = "TRITON_INTERPRET"


def _interpreted() -> bool:
    """True when this module's kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(_INTERPRETER)


def triton_available(device: torch.device | str) -> bool:
    """Whether :func:`slim_decode_attention` can run on ``device``.

    CUDA devices need a working CUDA runtime; CPU tensors need ``TRITON_INTERPRET=1`` set before this module was
    imported (Triton's interpreter, for tests only: it is slow).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not _interpreted()
    if device.type == "cpu":
        return _interpreted()
    return False


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of :func:`slim_decode_attention` (see the module docstring; blocks are powers of 2 >= 16).

    block_m: query rows (heads * queries) per program.
    block_n: cache rows per step of the main kernel.
    block_w: output width columns per program (the fp32 accumulator is ``block_m x block_w``).
    block_d: width chunk of the score reduction (recompute mode); ``block_d == block_w >= width`` means one tile.
    num_splits: sequence splits of the main kernel (upper bound; splits are whole ``block_n`` multiples).
    two_pass: scores computed once by the scores kernel (True) or recomputed per width chunk (False).
    num_warps, num_stages: of the main kernel.
    score_splits, score_block_n, score_block_d, score_warps: the scores kernel (two-pass only); it has no
        reduction over splits, so many splits are cheap.
    """

    block_m: int
    block_n: int
    block_w: int
    block_d: int
    num_splits: int
    two_pass: bool
    num_warps: int = 8
    num_stages: int = 2
    score_splits: int = 1
    score_block_n: int = 64
    score_block_d: int = 128
    score_warps: int = 4


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _num_splits(work: int, cache_bytes: int, partial_bytes: int, target: int, max_splits: int) -> int:
    """Sequence splits minimising a bandwidth model: (cache + partial traffic) / fraction of the GPU kept busy.

    ``work``: programs per split; ``cache_bytes``: cache bytes per batch row; ``partial_bytes``: bytes one split
    adds per batch row (partial accumulator written, then read by the combine kernel); ``target``: programs that
    fill the GPU. The cost falls while ``work * splits < target`` and rises after, so the optimum is 1 or next to
    ``target / work`` (O(1): this runs on every decode step).
    """

    def cost(splits: int) -> float:
        traffic = cache_bytes + (partial_bytes * splits if splits > 1 else 0)
        return traffic / min(1.0, work * splits / target)

    candidates = {1, max(1, min(max_splits, target // work)), max(1, min(max_splits, _cdiv(target, work)))}
    return min(sorted(candidates), key=cost)


def choose_config(
    batch: int, rows: int, seq: int, width: int, *, elem_size: int = 2, precise: bool = False, sms: int = DEFAULT_SMS
) -> DecodeConfig:
    """Heuristic launch parameters for ``rows = heads * queries`` query rows over a ``(batch, seq, width)`` cache.

    ``elem_size``: bytes per cache element. The block sizes keep every kernel free of register spills on sm_90
    (checked by compiling, not timed; see NOTES in the module docstring).
    """
    wide = elem_size > 2 or precise  # fp32 operands: twice the register / shared-memory footprint
    block_m = min(MAX_BLOCK_M, max(16, _pow2(rows)))
    row_blocks = _cdiv(rows, block_m)
    acc_budget = ACC_BUDGET // 2 if wide else ACC_BUDGET
    block_w = min(max(16, _pow2(width)), max(16, acc_budget // block_m))
    width_blocks = _cdiv(width, block_w)
    two_pass = row_blocks * width_blocks > MAX_SCORE_READERS
    single_tile = width_blocks == 1 and not two_pass
    block_d = block_w if single_tile else min(64 if wide else 128, block_w)
    tile_budget = 8192 if wide else 16384  # elements of the (block_n, block_w) cache tile
    block_n = min(64, max(16, tile_budget // block_w), max(16, 2048 // block_m))
    target = PROGRAMS_PER_SM * sms
    num_splits = _num_splits(
        batch * row_blocks * width_blocks,
        seq * width * elem_size,
        rows * width * 8,
        target,
        max(1, seq // max(64, block_n)),
    )
    score_block_n = 32 if (wide and block_m > 16) or block_m > 32 else 64
    score_splits = max(1, min(_cdiv(target, batch * row_blocks), _cdiv(seq, score_block_n)))
    return DecodeConfig(
        block_m, block_n, block_w, block_d, num_splits, two_pass,
        num_warps=4 if block_m * block_w <= 4096 else 8,
        score_splits=score_splits, score_block_n=score_block_n, score_block_d=64 if wide else 128,
        score_warps=8 if block_m * score_block_n >= 2048 else 4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# kernels (argument lists kept compact on purpose)
# ----------------------------------------------------------------------------------------------------------------
# fmt: off


@triton.jit
def _dot(a, b, acc):
    """``acc + a @ b`` (fp32 accumulate). Triton 3.9's interpreter multiplies the raw bits of bf16 operands, so
    there (only) bf16 dots run on fp32 copies: exact, since bf16 x bf16 products fit in fp32."""
    if _INTERPRETER and b.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


_INTERPRETER = tl.constexpr(type(_dot).__name__ == "InterpretedFunction")  # TRITON_INTERPRET=1 at import


@triton.jit
def _mma(a, b, acc, PRECISE: tl.constexpr):
    """``acc += a @ b`` in fp32; ``a`` (M, K) is rounded to ``b``'s dtype (hi + lo parts when PRECISE)."""
    a_hi = a.to(b.dtype)
    acc = _dot(a_hi, b, acc)
    if PRECISE:
        a_lo = (a.to(tl.float32) - a_hi.to(tl.float32)).to(b.dtype)
        acc = _dot(a_lo, b, acc)
    return acc


@triton.jit
def _load_query(q_base, sq_h, sq_t, sq_w, head, qpos, mask_m, offs_d, d_hi, head_dim, HEAD_SLICE: tl.constexpr):
    """Query rows as full-width rows ``(BLOCK_M, BLOCK_D)`` at columns ``offs_d``; head_slice: zero off the head."""
    if HEAD_SLICE:
        q_col = offs_d[None, :] - head[:, None] * head_dim  # (M, D) column inside the head's slice
        q_mask = mask_m[:, None] & (q_col >= 0) & (q_col < head_dim) & (offs_d[None, :] < d_hi)
    else:
        q_col = offs_d[None, :]  # (1, D)
        q_mask = mask_m[:, None] & (offs_d[None, :] < d_hi)
    q_ptrs = q_base + head[:, None] * sq_h + qpos[:, None] * sq_t + q_col * sq_w
    return tl.load(q_ptrs, mask=q_mask, other=0.0)


@triton.jit
def _add_bias(s, bias_base, sb_h, sb_t, sb_n, head, qpos, mask_m, offs_n, mask_n, scale, HAS_BIAS: tl.constexpr):
    """``scale * s + bias`` in fp32 for a ``(BLOCK_M, BLOCK_N)`` score block; bias strides may be 0 (broadcast)."""
    s = s * scale
    if HAS_BIAS:
        b_ptrs = bias_base + head[:, None] * sb_h + qpos[:, None] * sb_t + offs_n[None, :] * sb_n
        s += tl.load(b_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    return s


@triton.jit
def _width_range(m_start, rows, queries, width, head_dim, HEAD_SLICE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Columns ``[d_lo, d_hi)`` the scores of rows ``[m_start, m_start + BLOCK_M)`` depend on (d_lo BLOCK_D aligned)."""
    if HEAD_SLICE:
        last_row = tl.minimum(m_start + BLOCK_M, rows) - 1
        d_lo = ((m_start // queries) * head_dim // BLOCK_D) * BLOCK_D
        d_hi = tl.minimum(width, (last_row // queries + 1) * head_dim)
    else:
        d_lo = 0
        d_hi = width
    return d_lo, d_hi


@triton.jit
def _block_scores(q_base, sq_h, sq_t, sq_w, c_rows, sc_n, sc_w, head, qpos, mask_m, offs_r, mask_n, d_lo, d_hi,
                  head_dim, HEAD_SLICE: tl.constexpr, PRECISE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw scores ``Q C^T``: (BLOCK_M, BLOCK_N) fp32, reduced over columns ``[d_lo, d_hi)`` in BLOCK_D chunks.

    ``c_rows`` points at the block's first cache row, ``offs_r = arange(BLOCK_N)`` (64-bit safe for long caches).
    """
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)  # (D,)
        q = _load_query(q_base, sq_h, sq_t, sq_w, head, qpos, mask_m, offs_d, d_hi, head_dim, HEAD_SLICE)  # (M, D)
        c_ptrs = c_rows + offs_r[:, None] * sc_n + offs_d[None, :] * sc_w
        c = tl.load(c_ptrs, mask=mask_n[:, None] & (offs_d[None, :] < d_hi), other=0.0)  # (N, D)
        s = _mma(q, tl.trans(c), s, PRECISE)
    return s


@triton.jit
def _slim_scores_kernel(
    q_ptr, c_ptr, bias_ptr, s_ptr,
    rows, queries, seq, width, head_dim, split_len, scale,
    sq_b, sq_h, sq_t, sq_w, sc_b, sc_n, sc_w, sb_b, sb_h, sb_t, sb_n, ss_b, ss_m,
    HEAD_SLICE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Two-pass, pass 1: ``S[b, r, n] = scale * q_r . c_n + bias`` (fp32 scratch ``(batch, rows, seq)``).

    Grid ``(row_blocks, score_splits, batch)``; each program reads its split's cache rows at full width once.
    """
    m_start = tl.program_id(0) * BLOCK_M
    n_lo = tl.program_id(1) * split_len
    b = tl.program_id(2).to(tl.int64)
    n_hi = tl.minimum(n_lo + split_len, seq)
    offs_m = m_start + tl.arange(0, BLOCK_M)  # (M,) query rows
    mask_m = offs_m < rows
    head = offs_m // queries
    qpos = offs_m % queries
    d_lo, d_hi = _width_range(m_start, rows, queries, width, head_dim, HEAD_SLICE, BLOCK_M, BLOCK_D)
    q_base = q_ptr + b * sq_b
    c_base = c_ptr + b * sc_b
    offs_r = tl.arange(0, BLOCK_N)  # (N,) row inside a cache block
    c_rows = c_base + n_lo.to(tl.int64) * sc_n  # first row of the current block (64-bit: long caches)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + offs_r  # (N,) cache rows
        mask_n = offs_n < n_hi
        s = _block_scores(q_base, sq_h, sq_t, sq_w, c_rows, sc_n, sc_w, head, qpos, mask_m, offs_r, mask_n, d_lo,
                          d_hi, head_dim, HEAD_SLICE, PRECISE, BLOCK_M, BLOCK_N, BLOCK_D)  # (M, N)
        s = _add_bias(s, bias_ptr + b * sb_b, sb_h, sb_t, sb_n, head, qpos, mask_m, offs_n, mask_n, scale, HAS_BIAS)
        s_ptrs = s_ptr + b * ss_b + offs_m[:, None] * ss_m + offs_n[None, :]
        tl.store(s_ptrs, s, mask=mask_m[:, None] & mask_n[None, :])
        c_rows += BLOCK_N * sc_n


@triton.jit
def _slim_decode_kernel(
    q_ptr, c_ptr, bias_ptr, s_ptr, o_ptr, m_ptr, l_ptr,
    rows, queries, seq, width, head_dim, split_len, scale,
    sq_b, sq_h, sq_t, sq_w, sc_b, sc_n, sc_w, sb_b, sb_h, sb_t, sb_n, ss_b, ss_m,
    so_b, so_s, so_h, so_t, so_w, sm_b, sm_s,
    HEAD_SLICE: tl.constexpr, HAS_BIAS: tl.constexpr, SCORES_IN_SCRATCH: tl.constexpr, SINGLE_TILE: tl.constexpr,
    FINAL: tl.constexpr, PRECISE: tl.constexpr, NUM_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online-softmax ``softmax(S) @ C`` for one (row block, width chunk, sequence split, batch row).

    Grid ``(row_blocks * NUM_W, num_splits, batch)`` (width chunk fastest, so programs sharing cache rows run
    together). FINAL (one split): writes ``acc / sum`` to ``o``. Otherwise writes the unnormalised partial ``acc`` to
    ``o = (batch, splits, rows, width)`` and the running max / sum to ``m, l = (batch, splits, rows)``.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m_start = (pid // NUM_W) * BLOCK_M
    w_blk = pid % NUM_W
    n_lo = split * split_len
    n_hi = tl.minimum(n_lo + split_len, seq)
    offs_m = m_start + tl.arange(0, BLOCK_M)  # (M,) query rows r = head * queries + qpos
    mask_m = offs_m < rows
    head = offs_m // queries
    qpos = offs_m % queries
    offs_w = w_blk * BLOCK_W + tl.arange(0, BLOCK_W)  # (W,) output columns of this program
    mask_w = offs_w < width
    q_base = q_ptr + b * sq_b
    c_base = c_ptr + b * sc_b
    offs_r = tl.arange(0, BLOCK_N)  # (N,) row inside a cache block
    c_rows = c_base + n_lo.to(tl.int64) * sc_n  # first row of the current block (64-bit: long caches)
    bias_base = bias_ptr + b * sb_b
    d_lo, d_hi = _width_range(m_start, rows, queries, width, head_dim, HEAD_SLICE, BLOCK_M, BLOCK_D)
    if SINGLE_TILE:  # the whole width fits one tile: keep the query rows in registers
        q = _load_query(q_base, sq_h, sq_t, sq_w, head, qpos, mask_m, offs_w, width, head_dim, HEAD_SLICE)  # (M, W)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + offs_r  # (N,) cache rows
        mask_n = offs_n < n_hi
        c_ptrs = c_rows + offs_r[:, None] * sc_n + offs_w[None, :] * sc_w  # (N, W)
        if SCORES_IN_SCRATCH:
            s_ptrs = s_ptr + b * ss_b + offs_m[:, None] * ss_m + offs_n[None, :]
            s = tl.load(s_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # (M, N), scaled + biased
        else:
            if SINGLE_TILE:
                c = tl.load(c_ptrs, mask=mask_n[:, None] & mask_w[None, :], other=0.0)  # (N, W), read once
                s = _mma(q, tl.trans(c), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISE)
            else:
                s = _block_scores(q_base, sq_h, sq_t, sq_w, c_rows, sc_n, sc_w, head, qpos, mask_m, offs_r, mask_n,
                                  d_lo, d_hi, head_dim, HEAD_SLICE, PRECISE, BLOCK_M, BLOCK_N, BLOCK_D)
            s = _add_bias(s, bias_base, sb_h, sb_t, sb_n, head, qpos, mask_m, offs_n, mask_n, scale, HAS_BIAS)
        s = tl.where(mask_n[None, :], s, float("-inf"))  # (M, N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys -inf so far: avoid (-inf) - (-inf)
        alpha = tl.exp(m_i - m_use)  # (M,)
        p = tl.exp(s - m_use[:, None])  # (M, N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if not SINGLE_TILE:
            c = tl.load(c_ptrs, mask=mask_n[:, None] & mask_w[None, :], other=0.0)  # (N, W)
        acc = _mma(p, c, acc, PRECISE)  # (M, W)
        m_i = m_new
        c_rows += BLOCK_N * sc_n

    if FINAL:
        acc = acc / l_i[:, None]
    o_base = o_ptr + b * so_b + split.to(tl.int64) * so_s
    o_ptrs = o_base + head[:, None] * so_h + qpos[:, None] * so_t + offs_w[None, :] * so_w
    tl.store(o_ptrs, acc, mask=mask_m[:, None] & mask_w[None, :])
    if not FINAL:
        if w_blk == 0:  # every width chunk has the same max / sum: one writer
            ml_offs = b * sm_b + split * sm_s + offs_m
            tl.store(m_ptr + ml_offs, m_i, mask=mask_m)
            tl.store(l_ptr + ml_offs, l_i, mask=mask_m)


@triton.jit
def _combine_kernel(
    a_ptr, m_ptr, l_ptr, o_ptr,
    queries, width, num_splits,
    sa_b, sa_s, sa_m, sm_b, sm_s, so_b, so_h, so_t, so_w,
    BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """``o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s`` for one (width chunk, row, batch row)."""
    w_blk = tl.program_id(0)
    row = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)  # (S,)
    mask_s = offs_s < num_splits
    ml_base = b * sm_b + row
    m = tl.load(m_ptr + ml_base + offs_s * sm_s, mask=mask_s, other=float("-inf"))  # (S,)
    l_s = tl.load(l_ptr + ml_base + offs_s * sm_s, mask=mask_s, other=0.0)  # (S,)
    m_max = tl.max(m, axis=0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    denom = tl.sum(tl.exp(m - m_use) * l_s, axis=0)
    offs_w = w_blk * BLOCK_W + tl.arange(0, BLOCK_W)  # (W,)
    mask_w = offs_w < width
    acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for s in range(num_splits):
        weight = tl.exp(tl.load(m_ptr + ml_base + s * sm_s) - m_use)
        acc += weight * tl.load(a_ptr + b * sa_b + s * sa_s + row * sa_m + offs_w, mask=mask_w, other=0.0)
    o_ptrs = o_ptr + b * so_b + (row // queries) * so_h + (row % queries) * so_t + offs_w * so_w
    tl.store(o_ptrs, acc / denom, mask=mask_w)


# fmt: on
# ----------------------------------------------------------------------------------------------------------------
# host wrapper
# ----------------------------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """float32 scratch; a single allocation point so tests can poison every buffer."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _check_device(query: torch.Tensor, cache: torch.Tensor) -> None:
    if query.device != cache.device:
        raise ValueError(f"query on {query.device} but cache on {cache.device}")
    if not triton_available(cache.device):
        if cache.device.type == "cpu":
            raise RuntimeError(
                "slim_decode_attention needs CUDA tensors; CPU tensors only run under Triton's interpreter "
                f"({_INTERPRET_ENV}=1 set before hf_slim.kernels is imported). Use hf_slim.absorbed.absorbed_attention "
                "on CPU."
            )
        raise RuntimeError(f"slim_decode_attention: no Triton backend for device {cache.device}")


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SMS


def slim_decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    head_slice: bool = False,
    precise: bool = False,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``absorbed_attention(query, cache, ...)[0]``: softmax attention of all heads over one shared cache.

    Parameters
    ----------
    query:
        ``(batch, heads, queries, width)``, or ``(batch, heads, queries, head_dim)`` with ``heads * head_dim <=
        width`` when ``head_slice`` (K+R cache: columns past the keys are weighted, not scored); fp32/fp16/bf16,
        any strides.
    cache:
        ``(batch, seq, width)`` fp32/fp16/bf16, any strides.
    scale:
        multiplies the raw scores.
    bias:
        additive float bias broadcastable to ``(batch, heads, queries, seq)`` (expanded with stride 0, never
        materialised); use ``torch.finfo(torch.float32).min`` for masked keys (see the module docstring).
    head_slice:
        K-cache layout: head ``i`` scores against its own ``head_dim`` slice of the first ``heads * head_dim``
        cache columns.
    precise:
        hi/lo split of the fp32 operands (query, probabilities) for fp16/bf16 caches; ~fp32-reference accuracy at
        twice the tensor-core work.
    config:
        launch parameters; default :func:`choose_config`.
    out:
        optional ``(batch, heads, queries, value_width)`` float32 output buffer.
    values:
        ``(batch, seq, value_width)``: what the probabilities multiply instead of ``cache`` (a RoPE K cache scores
        with its rotated keys and mixes the un-rotated ones, :mod:`hf_slim.rope`). Runs the two-pass path: the scores
        kernel reads ``cache``, the main kernel reads ``values``.

    Returns
    -------
    ``(batch, heads, queries, value_width)`` float32 (``value_width = width`` without ``values``). Inference only:
    no autograd.
    """
    _check_device(query, cache)
    if query.dim() != 4 or cache.dim() != 3:
        raise ValueError(
            f"expected query (b, h, t, d) and cache (b, n, w), got {tuple(query.shape)}, {tuple(cache.shape)}"
        )
    batch, heads, queries, q_width = query.shape
    _, seq, width = cache.shape
    if cache.shape[0] != batch:
        raise ValueError(f"cache batch {cache.shape[0]} != query batch {batch}")
    if head_slice and heads * q_width > width:
        raise ValueError(f"head_slice needs heads*head_dim <= cache width, got {heads}*{q_width} > {width}")
    if not head_slice and q_width != width:
        raise ValueError(f"query width {q_width} does not match cache width {width}")
    mixed_source = cache if values is None else values
    if values is not None and (values.dim() != 3 or values.shape[:2] != cache.shape[:2]):
        raise ValueError(f"values must be (batch, seq, value_width) like the cache, got {tuple(values.shape)}")
    for name, t in (("query", query), ("cache", cache), ("values", mixed_source)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} dtype {t.dtype} not supported (fp32, fp16, bf16)")
    rows = heads * queries
    device = cache.device
    out_width = mixed_source.shape[-1]
    if out is None:
        out = _empty((batch, heads, queries, out_width), device)
    elif out.shape != (batch, heads, queries, out_width) or out.dtype != torch.float32:
        raise ValueError(
            f"out must be float32 {(batch, heads, queries, out_width)}, got {out.dtype} {tuple(out.shape)}"
        )
    if seq == 0 or rows == 0 or width == 0 or out_width == 0:
        return out.zero_()  # softmax over no keys: bmm of empty operands gives zeros, like the reference

    if bias is not None:
        if not bias.is_floating_point():
            raise TypeError("bias must be an additive float tensor (see hf_slim.absorbed.additive_bias)")
        bias = bias.expand(batch, heads, queries, seq)  # stride 0 on broadcast dims, no copy
    precise = precise and cache.dtype != torch.float32
    cfg = config or choose_config(
        batch, rows, seq, max(width, out_width), elem_size=cache.element_size(), precise=precise, sms=_sms(device)
    )
    if values is not None:
        cfg = dataclasses.replace(cfg, two_pass=True)  # scores from the cache, once; the main kernel reads values
    blocks = (cfg.block_m, cfg.block_n, cfg.block_w, cfg.block_d, cfg.score_block_n, cfg.score_block_d)
    if any(x < 16 or x & (x - 1) for x in blocks):
        raise ValueError(f"DecodeConfig blocks must be powers of 2 >= 16, got {cfg}")
    if not precise and query.dtype != cache.dtype:
        query = query.to(cache.dtype)  # the kernel rounds it to this dtype anyway; halves query reads
    head_dim = q_width if head_slice else width

    width_blocks = _cdiv(out_width, cfg.block_w)
    row_blocks = _cdiv(rows, cfg.block_m)
    single_tile = not cfg.two_pass and width_blocks == 1 and cfg.block_d == cfg.block_w
    split_len = _cdiv(_cdiv(seq, max(1, cfg.num_splits)), cfg.block_n) * cfg.block_n
    splits = _cdiv(seq, split_len)

    q_strides = query.stride()
    c_strides = cache.stride()
    b_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    bias_arg = bias if bias is not None else cache  # dummy pointer, never read

    scores = cache  # dummy pointer unless two-pass
    s_strides = (0, 0)
    if cfg.two_pass:
        scores = _empty((batch, rows, seq), device)
        s_strides = scores.stride()[:2]
        score_len = _cdiv(_cdiv(seq, max(1, cfg.score_splits)), cfg.score_block_n) * cfg.score_block_n
        _slim_scores_kernel[(row_blocks, _cdiv(seq, score_len), batch)](
            query, cache, bias_arg, scores,
            rows, queries, seq, width, head_dim, score_len, float(scale),
            *q_strides, *c_strides, *b_strides, *s_strides,
            HEAD_SLICE=head_slice, HAS_BIAS=bias is not None, PRECISE=precise,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.score_block_n, BLOCK_D=min(cfg.score_block_d, max(16, _pow2(width))),
            num_warps=cfg.score_warps, num_stages=3,
        )  # fmt: skip

    final = splits == 1
    if final:
        target, m_part, l_part = out, out, out
        o_strides = (out.stride(0), 0, *out.stride()[1:])  # (b, split, h, t, w)
        ml_strides = (0, 0)
    else:
        target = _empty((batch, splits, rows, out_width), device)
        m_part = _empty((batch, splits, rows), device)
        l_part = _empty((batch, splits, rows), device)
        o_strides = (target.stride(0), target.stride(1), queries * out_width, out_width, 1)
        ml_strides = m_part.stride()[:2]
    _slim_decode_kernel[(row_blocks * width_blocks, splits, batch)](
        query, mixed_source, bias_arg, scores, target, m_part, l_part,
        rows, queries, seq, out_width, head_dim, split_len, float(scale),
        *q_strides, *mixed_source.stride(), *b_strides, *s_strides, *o_strides, *ml_strides,
        HEAD_SLICE=head_slice, HAS_BIAS=bias is not None, SCORES_IN_SCRATCH=cfg.two_pass, SINGLE_TILE=single_tile,
        FINAL=final, PRECISE=precise, NUM_W=width_blocks,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not final:
        block_w = min(1024, _pow2(out_width))
        _combine_kernel[(_cdiv(out_width, block_w), rows, batch)](
            target, m_part, l_part, out,
            queries, out_width, splits,
            *target.stride()[:3], *m_part.stride()[:2], *out.stride(),
            BLOCK_S=max(16, _pow2(splits)), BLOCK_W=block_w, num_warps=4,
        )  # fmt: skip
    return out


__all__ = ["DecodeConfig", "choose_config", "slim_decode_attention", "triton_available"]
