"""K-cache mode with a residual: cache ``C = [K | Z]`` and rebuild ``V`` from it, exact on real weights.

The plain K cache (``V = K W_K^-1 W_V``) is exact algebra but not exact arithmetic: keys are rounded to the model
dtype when they are cached, and the inverse divides that rounding by the singular values of ``W_K``. Trained weights
have a tail of tiny ones (``cond(W_K)`` 1.7e3 to 2.4e6 on Whisper tiny.en), so a bf16 K cache gives values that are
off by 0.16 to 162 (relative) where the unmodified model is off by 2e-3 (see shared/SLIM_ATTENTION.md).

K+R keeps the few input directions ``W_K`` cannot carry beside ``K``. With the float64 SVD ``W_K = U S V^T`` split
into the ``g`` largest and ``r = d - g`` smallest singular directions (``U = [U_g | U_r]``), exactly::

    X U_g = (K - b_K) V_g S_g^-1                                 (well conditioned: S_g excludes the tail)
    Z     = X U_r                                                (r numbers per token, cached beside K)
    V     = (K - b_K) V_g S_g^-1 U_g^T W_V + Z U_r^T W_V + b_V
          = [K | Z] @ W_KV + v_offset

with the stacked projection ``W_KV = [V_g S_g^-1 U_g^T W_V ; U_r^T W_V]`` of shape ``(e + r, e)`` and
``v_offset = b_V - b_K V_g S_g^-1 U_g^T W_V``. Scores read only the first ``e`` columns of ``C`` (each head its own
slice of K); the weighted sum reads all ``e + r`` columns; each head then applies its slice of ``W_KV``. ``r = 0`` is
the plain K cache (``W_KV = W_K^-1 W_V``), ``r = d`` carries X completely (no memory gain).

Keys normalised per token (OLMo-2's ``k_norm``, :class:`~hf_slim.attention.KeyNorm`): the model caches
``K_n = w * k / s`` with ``k = X W_K + b_K`` and ``s = sqrt(mean(k^2) + eps)`` per token, so ``k = s * K_n / w``.
The cache keeps ``s`` as one more column, ``C = [K_n | Z | s]`` (``e + r + 1`` per token), and ``diag(1/w)`` is
folded into the key block of ``W_KV``: ``V = [s * K_n | Z] @ W_KV + v_offset`` with ``W_KV = [diag(1/w) V_g S_g^-1
U_g^T W_V ; U_r^T W_V]`` (Z, a projection of X, is not scaled; the offset is unchanged). A weight with zeros is
refused (those key columns carry nothing). The calibration measures this pipeline (the norm's rounding, ``s`` in the
model dtype, the RoPE round trip of the normalised keys, ``1/w`` amplifying it) with the same acceptance rule.

Which ``r``: a layer gets the smallest ``r`` on :func:`residual_rank_grid` for which a calibration on real activations
in the model's dtype shows the rebuilt values are as accurate as the unmodified model's (:func:`k_mode_is_exact`).
Above :func:`max_residual_rank` (``d / 2``: the cache would be at most 1.33x smaller than K+V, against 2x for the
input cache) the layer keeps the input cache.

How: :func:`key_factorization` factorises W_K once per layer and every candidate rank's weights come from it: the
float64 SVD above (:class:`KeySVD`) for layers narrower than :data:`LU_MIN_WIDTH` and for ill-conditioned W_K, else
an LU factorisation and a basis of the smallest singular directions grown by inverse subspace iteration
(:class:`KeyInverse`, the same construction for any basis): 3-5x cheaper than the SVD alone at d = 4096, and measured
as exact as the SVD's weights (the calibration measures whichever weights it installs, in the model's dtype).

Names other code relies on (stable): the module buffers ``hf_slim_w_kv`` ``(e + r, e)``, ``hf_slim_v_offset``
``(e,)`` and, for ``r > 0``, ``hf_slim_z_proj`` ``(d, r)`` (``= U_r``); ``SlimAttentionState.residual_rank`` and
``SlimAttentionState.key_scale``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .projections import Projections
from .rope import RotaryLayout, Unrotation, rotate, unrotate_keys

#: A layer keeps the K cache when rebuilding V from cached keys is at most this many times less accurate than the
#: unmodified model computing V in the same dtype (both measured against float64). 4x is two bits of the mantissa:
#: the size of the differences between GEMM kernels, far from the 100x-10000x seen on real Whisper layers.
K_MODE_ERROR_FACTOR = 4.0

#: ... or when its relative error is below this absolute floor. It matters in fp32, where 4x the unmodified model's
#: own V error (1.4e-7 to 2.8e-7) is about fp32 rounding, and it must keep the fp32 promise of the equivalence tests:
#: logits within 1e-5 (relative) of the unmodified model. V errors do not reach the logits 1:1. Measured with
#: ``scripts/kmode_floor.py`` (every layer forced onto K at one rank; worst logit difference over a decode / the
#: calibration's k_error): 0.8-1.4x on tiny GPT-2, 1.4-3.2x on tiny Llama, 2.8-4.2x on tiny Qwen2 (2 layers, W_K of
#: cond 1e2 to 1e5), 1.2-2.2x on real Whisper tiny.en (4 layers); on top of that the slim path costs 0.8-1.2e-6 with
#: exact values on the tiny models and 3-4e-6 on tiny.en (its exact input cache: 4.0e-6). The former floor, 1e-5 (the
#: tolerance itself), let a plain K layer at 3.4e-6 drift 1.1e-5 (tiny Llama) and took tiny.en's fp32 layers at r =
#: 32/16/16/16, 9.2e-6 from the unmodified logits. The floor is the tolerance over the worst amplification with a 2x
#: safety factor, 1e-5 / (4.2 * 2) = 1.2e-6, rounded down: a layer at the floor moves logits by ~4.2e-6 at most, which
#: leaves room for the baseline. Cost: random W_K (cond ~1e2) take r = 16 instead of 0 in fp32, and tiny.en's fp32
#: layers r = 176/64/80/48 (1.61x, 3.0e-6 from the unmodified logits). fp16/bf16 layers (unmodified error 3e-4 to
#: 2e-3) are decided by the 4x rule alone. Only 2- and 4-layer models were measured: errors of many layers add up.
K_MODE_ABSOLUTE_FLOOR = 1e-6

#: Kept singular directions must stay this far above float64 rounding (``s_g / s_1``); below it the key part of the
#: cache cannot be inverted at all and more directions must go into Z.
MIN_KEPT_SINGULAR_RATIO = 1e-12


class StaleKModeWeights(RuntimeError):
    """The weights or the dtype of a K-mode layer changed after slimify, so its ``W_KV`` no longer rebuilds V."""


class SingularKeyProjection(ValueError):
    """W_K cannot be inverted (not square, or numerically singular), or the layer cannot use the K cache for another
    reason (LoRA adapters, quantized projections), so the K cache cannot rebuild V. ``numbers``: what was measured
    before the refusal (``cond_w_k``), for the record and ``hf-slim verify``."""

    def __init__(self, message: str, numbers: dict | None = None) -> None:
        super().__init__(message)
        self.numbers = dict(numbers or {})


@dataclass(frozen=True)
class KModeWeights:
    """K-mode weights of one layer with residual rank ``r`` (float64 when solved, the model dtype as buffers).

    Shapes: ``w_kv: (e + r, e)`` (stacked key and residual projections), ``v_offset: (e,)``, ``z_proj: (d, r)``
    (``Z = X @ z_proj``). ``cond`` is the 2-norm condition number of the whole W_K, ``kept_cond`` the one of the
    part the keys carry (``s_1 / s_g``; equal to ``cond`` when ``r = 0``).
    """

    w_kv: torch.Tensor
    v_offset: torch.Tensor
    z_proj: torch.Tensor
    cond: float
    kept_cond: float

    @property
    def residual_rank(self) -> int:
        """``r``, the number of input directions cached beside the keys."""
        return self.z_proj.shape[1]


@dataclass(frozen=True)
class KeySVD:
    """Float64 SVD of one layer's key projection, ``W_K = u @ diag(s) @ vh`` (descending ``s``), and its biases.

    Computed once per layer; :meth:`weights` then gives the K-mode weights for any residual rank at the cost of one
    matrix product. Shapes: ``u: (d, d)``, ``s: (d,)``, ``vh: (d, d)``, ``w_v: (d, e)``, ``b_k, b_v: (e,)``;
    ``key_weight: (e,)``, the weight of a per-token key norm (folded into ``W_KV`` as ``diag(1/w)``), or None.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    w_v: torch.Tensor
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None
    key_weight: torch.Tensor | None = None

    @property
    def cond(self) -> float:
        return float(self.s[0] / self.s[-1]) if float(self.s[-1]) > 0 else math.inf

    @functools.cached_property
    def _projected_values(self) -> torch.Tensor:
        """``U^T W_V: (d, e)``, computed once: every rank's weights take rows of it (one GEMM per rank, not two)."""
        return self.u.T @ self.w_v

    def weights(self, residual_rank: int, device: torch.device | str = "cpu") -> KModeWeights:
        """:class:`KModeWeights` for ``r = residual_rank`` (``0 <= r <= d``), float64 on ``device``.

        Raises
        ------
        SingularKeyProjection
            when the ``d - r`` kept singular values reach down to float64 rounding (keep more directions in Z).
        """
        d = self.s.shape[0]
        if not 0 <= residual_rank <= d:
            raise ValueError(f"residual rank must be in [0, {d}], got {residual_rank}")
        g = d - residual_rank
        kept_cond = float(self.s[0] / self.s[g - 1]) if g else 1.0
        if g and not kept_cond < 1 / MIN_KEPT_SINGULAR_RATIO:
            raise SingularKeyProjection(
                f"W_K is singular in the directions the keys would carry (s_1/s_{g} = {kept_cond:.3g}, r = "
                f"{residual_rank}); cache more directions beside K"
            )
        u_r = self.u[:, g:]  # (d, r)
        key_part = (self.vh[:g].T / self.s[:g]) @ self._projected_values[:g]  # V_g S_g^-1 U_g^T W_V: (e, e)
        offset = value_offset(key_part, self.b_k, self.b_v)  # (e,): of the keys before the norm
        if self.key_weight is not None:  # the cache holds w * k / s and rebuilds from s * (w * k / s): divide by w
            key_part = key_part / self.key_weight[:, None]  # diag(1/w) V_g S_g^-1 U_g^T W_V: (e, e)
        w_kv = torch.cat([key_part, self._projected_values[g:]])  # (e + r, e)
        return KModeWeights(
            w_kv=w_kv.to(device),
            v_offset=offset.to(device),
            z_proj=u_r.contiguous().to(device),
            cond=self.cond,
            kept_cond=kept_cond,
        )


#: CUDA compute capabilities whose float64 runs at half the float32 rate (data-centre GPUs: P100, V100, A100,
#: H100/H200, B200). On these the float64 factorisations of :func:`key_factorization` run on the model's GPU, where
#: a d = 4096 LU takes milliseconds; other GPUs (1/32 to 1/64 rate) and every other device factorise on the CPU.
FULL_RATE_FLOAT64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def factorisation_device(device: torch.device) -> torch.device:
    """Where the float64 factorisation of a layer on ``device`` runs: that GPU if its float64 is full rate
    (:data:`FULL_RATE_FLOAT64_CAPABILITIES`), else the CPU. The algorithm, the seeds and the acceptance rule are the
    same on both: only the last bits of the float64 results differ, far below the model dtype's rounding that the
    calibration measures."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in FULL_RATE_FLOAT64_CAPABILITIES:
        return device
    return torch.device("cpu")


def _key_inputs(projections: Projections) -> tuple[torch.Tensor, ...]:
    """``(w_k, w_v, b_k, b_v, key_weight)`` as float64 tensors on the :func:`factorisation_device` (biases and key
    weight may be None), after the checks every K-mode factorisation needs.

    Raises
    ------
    SingularKeyProjection
        when W_K is not square (e != d_model): K then cannot stand in for X; when a per-token key norm's weight
        has zeros (those key columns are 0 whatever the input); or for active LoRA adapters.
    ValueError
        for meta (not loaded) weights, or NaN/inf in them.
    """
    if projections.k_low_rank or projections.v_low_rank:
        raise SingularKeyProjection(
            "LoRA adapters on the key/value projections change W_K and W_V whenever they are switched, so no fixed "
            "W_KV serves them; merge them first (peft: model.merge_and_unload()) to use the K cache. The input cache "
            "serves active adapters exactly"
        )
    if projections.quantized is not None:
        raise SingularKeyProjection(
            f"the key/value projections are quantized ({projections.quantized}): the K cache would keep a dense W_KV "
            "((e + r) x e in the model dtype per layer, 2-4x the bytes of the quantized W_K and W_V together, paid "
            "back only beyond about e + r cached tokens), and its calibration models the keys as x @ W_K in the model "
            "dtype, which a quantized kernel does not compute bit for bit; load the model unquantized for the K cache"
        )
    w_k = projections.w_k.detach()
    if w_k.is_meta or projections.w_v.is_meta:
        raise ValueError("K mode needs the real weights, got meta tensors (load the weights before slimify)")
    device = factorisation_device(w_k.device)
    w_k = w_k.to(device=device, dtype=torch.float64)
    if not (bool(torch.isfinite(w_k).all()) and bool(torch.isfinite(projections.w_v.detach()).all())):
        raise ValueError(
            "the key/value weights contain NaN or inf, so the model itself computes NaN; check how the weights were "
            "loaded or trained before slimify"
        )
    if w_k.shape[0] != w_k.shape[1]:
        raise SingularKeyProjection(f"K mode needs a square W_K, got {tuple(w_k.shape)} (d_model != heads*head_dim)")
    key_weight = None
    if projections.key_norm is not None:
        key_weight = projections.key_norm.weight.detach().to(device=device, dtype=torch.float64)  # (e,)
        zeros = int((key_weight == 0).sum())
        if zeros or not bool(torch.isfinite(key_weight).all()):
            raise SingularKeyProjection(
                f"the key norm's weight has {zeros} zero (or non-finite) entries: those key columns are 0 whatever the "
                "input, so the cached keys cannot rebuild V"
            )

    def float64(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(device=device, dtype=torch.float64)

    return w_k, float64(projections.w_v), float64(projections.b_k), float64(projections.b_v), key_weight


def key_svd(projections: Projections) -> KeySVD:
    """Float64 SVD of ``W_K``, on the :func:`factorisation_device`.

    Signs are canonical (each column of ``U`` has its largest-magnitude entry positive), so solving again from the same
    weights gives the same ``z_proj`` and the same sidecar.

    Raises
    ------
    SingularKeyProjection, ValueError
        see :func:`_key_inputs`.
    """
    w_k, w_v, b_k, b_v, key_weight = _key_inputs(projections)
    u, s, vh = torch.linalg.svd(w_k)  # (d, d), (d,), (d, d)
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))  # (1, d)
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs.T  # u s vh is unchanged: each direction flips in U and V together
    return KeySVD(u, s, vh, w_v, b_k, b_v, key_weight)


class KeyInverse:
    """K-mode weights for any residual rank from an LU factorisation of ``W_K`` and an orthonormal basis of (nearly)
    its smallest singular directions, grown block by block by inverse subspace iteration: the factorisation
    :func:`key_factorization` uses for wide layers, where the float64 SVD is the slow part of the calibration.

    The weights are exact for *any* orthonormal ``P: (e, r)``, converged or not. With ``A = W_K^-1 W_V`` (one LU
    solve), ``F = W_K^-1 Y`` for an orthonormal ``Y: (d, k)`` and its thin SVD ``F = P S H^T`` (``P`` orthonormal,
    ``S`` descending, the first ``r`` columns taken), ``z_proj = Q = Y H`` satisfies ``W_K P = Q S^-1``, so::

        X W_V = X W_K (I - P P^T) A + X W_K P P^T A = (K - b_K) (I - P P^T) A + Z S^-1 P^T A,    Z = X Q

    i.e. ``W_KV = [(I - P P^T) A ; S^-1 P^T A]``. How well ``Y`` holds the smallest singular directions decides only
    the conditioning: the key block ``(I - P P^T) A`` has norm ``~1/s_g`` (not ``1/s_min``) when ``range(Y)`` holds
    them, and a principal angle ``t`` off changes that by ``1/cos(t)`` (second order). With the exact singular
    subspace these are the weights of :class:`KeySVD` (``P = V_r``, ``S = S_r^-1``, ``Q = U_r``).

    The basis grows in blocks of ``block`` columns (the rank grid's step): each new block is ``ITERATIONS`` steps of
    ``(W_K W_K^T)^-1`` on a seeded random block in float32 (the basis only needs to be close: second order), kept
    orthogonal to the blocks before it; the exact algebra above is float64. Rank ``r`` uses the first
    ``k = min(d, block * ceil(r / block) + block)`` columns (one block beyond ``r``), whatever was grown before, so
    solving ``r`` again from the same weights gives the same ``z_proj`` and the same sidecar. Cost: one float64 LU
    and one solve with ``e`` right-hand sides (together ~2.7 d^3 flops, the price of one GEMM), ~20 d^2 k for a
    basis of ``k`` columns (mostly float32) and one small ``k x k`` SVD per rank tried, against ~20 d^3 for the SVD of
    W_K. The measured errors are the SVD's to ~0.2% on average (tests/test_kplusr.py, scripts/bench_slimify.py
    ``--compare-svd``), the size of the SVD's own spread when its residual basis is merely rotated.

    Errors: the float64 solve is accurate to ``~eps * cond(W_K)`` (the SVD's to ``~eps * s_1 / s_g``), so
    :func:`key_factorization` takes this path only for ``cond(W_K) <= LU_MAX_COND``. ``cond`` and ``kept_cond`` are
    estimates (the largest singular value from a block Krylov space, within ~1%; the smallest ones from the basis).
    """

    #: float32 steps of (W_K W_K^T)^-1 per block: with 3, the errors of the chosen weights are the SVD's to ~0.2% on
    #: average (2: ~0.4%, 4 and more: no better than the SVD's own spread, ~0.2%)
    ITERATIONS = 3
    #: blocks the basis holds beyond rank r (the directions next to the split converge slowest)
    EXTRA_BLOCKS = 1
    #: columns of the block Krylov spaces that estimate the largest and smallest singular values, and their steps
    ESTIMATE_COLUMNS = 4
    ESTIMATE_STEPS = 6

    def __init__(
        self,
        w_k: torch.Tensor,
        w_v: torch.Tensor,
        b_k: torch.Tensor | None,
        b_v: torch.Tensor | None,
        key_weight: torch.Tensor | None,
        block: int,
    ) -> None:
        d = w_k.shape[0]
        self.b_k, self.b_v, self.key_weight, self.block = b_k, b_v, key_weight, block
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(w_k)  # W_K = P L U, float64
        self.singular = int(info) != 0 or not bool(torch.isfinite(self.lu).all())
        if self.singular:
            return
        self.lu32, self.pivots32 = self.lu.float(), self.pivots  # the same factors in float32, for the basis
        self.a = torch.linalg.lu_solve(self.lu, self.pivots, w_v)  # W_K^-1 W_V: (e, e)
        self.singular = not bool(torch.isfinite(self.a).all())  # numerically singular: the solve overflowed
        if self.singular:
            return
        self.s_1, self.s_min = self._extreme_singular_values(w_k)
        self.basis = w_k.new_zeros(d, 0)  # Y: (d, k), orthonormal
        self.basis32 = self.basis.float()
        self.solved_q = w_k.new_zeros(d, 0)  # Q_F of F = W_K^-1 Y = Q_F R_F: (e, k)
        self.solved_r = w_k.new_zeros(0, 0)  # R_F: (k, k), upper triangular
        self.projected = w_k.new_zeros(0, d)  # Q_F^T A: (k, e)

    @property
    def cond(self) -> float:
        """Estimated ``s_1 / s_min`` of W_K (inf if the LU broke down)."""
        return math.inf if self.singular or self.s_min <= 0 else self.s_1 / self.s_min

    def _extreme_singular_values(self, w_k: torch.Tensor) -> tuple[float, float]:
        """Estimates of the largest and smallest singular values of W_K, from block Krylov spaces of ``W_K^T W_K``
        and of its inverse built in float32 (seeded: the same weights give the same numbers), Ritz values in float64.
        Neither passes the true value (``s_1`` is estimated from below, ``s_min`` from above); measured within 1% on
        random (Marchenko-Pastur edge, the hardest case) and geometric spectra of width 2048."""
        generator = torch.Generator().manual_seed(0)  # on the CPU: the same numbers on every device
        start = torch.randn(w_k.shape[0], 2 * self.ESTIMATE_COLUMNS, generator=generator, device="cpu")  # (d, 2c)
        start = start.to(w_k.device)  # float32
        w_k32 = w_k.float()
        top = _krylov_basis(lambda y: w_k32.T @ (w_k32 @ y), start[:, : self.ESTIMATE_COLUMNS], self.ESTIMATE_STEPS)
        bottom = _krylov_basis(self._inverse_gram32, start[:, self.ESTIMATE_COLUMNS :], self.ESTIMATE_STEPS)
        s_1 = float(torch.linalg.svdvals(w_k @ top.double())[0])
        solved = torch.linalg.lu_solve(self.lu, self.pivots, bottom.double())  # (e, (steps + 1) c)
        s_min = 1 / float(torch.linalg.svdvals(solved)[0]) if bool(torch.isfinite(solved).all()) else 0.0
        return s_1, s_min

    def _inverse_gram32(self, y: torch.Tensor) -> torch.Tensor:
        """``(W_K W_K^T)^-1 y = W_K^-T W_K^-1 y`` in float32: ``(d, c) -> (d, c)``."""
        solved = torch.linalg.lu_solve(self.lu32, self.pivots32, y)
        return torch.linalg.lu_solve(self.lu32, self.pivots32, solved, adjoint=True)

    def _grow(self, k: int) -> None:
        """Append blocks to the basis until it has ``k`` columns (each block the same, whatever ``k`` asked)."""
        while self.basis.shape[1] < k:
            index, columns = self.basis.shape[1] // self.block, min(self.block, self.lu.shape[0] - self.basis.shape[1])
            new = _orthonormal_to(self._iterated_block(index, columns).double(), self.basis)  # (d, b)
            self.basis = torch.cat([self.basis, new], dim=1)
            self.basis32 = self.basis.float()
            solved = torch.linalg.lu_solve(self.lu, self.pivots, new)  # W_K^-1 Y_new: (e, b)
            above = self.solved_q.T @ solved  # block Gram-Schmidt, twice (CGS2): (k, b)
            solved = solved - self.solved_q @ above
            again = self.solved_q.T @ solved
            q_new, r_new = torch.linalg.qr(solved - self.solved_q @ again)  # (e, b), (b, b)
            top = torch.cat([self.solved_r, above + again], dim=1)  # (k, k + b)
            bottom = torch.cat([r_new.new_zeros(r_new.shape[0], self.solved_r.shape[0]), r_new], dim=1)  # (b, k + b)
            self.solved_r = torch.cat([top, bottom])  # (k + b, k + b)
            self.solved_q = torch.cat([self.solved_q, q_new], dim=1)
            self.projected = torch.cat([self.projected, q_new.T @ self.a])  # (k + b, e)

    def _iterated_block(self, index: int, columns: int) -> torch.Tensor:
        """Block ``index``: a seeded random block through :attr:`ITERATIONS` steps of ``W_K^-T W_K^-1`` in float32,
        kept orthogonal to the basis before it on both sides (``Y`` before ``W_K^-1``, ``F = W_K^-1 Y`` after it, so
        float32 never subtracts components amplified by ``(s / s_min)^2``): it converges to the next smallest
        directions. Returns ``(d, b)``, orthonormal in float32."""
        generator = torch.Generator().manual_seed(index)  # on the CPU: the same numbers on every device
        block = torch.randn(self.lu.shape[0], columns, generator=generator, device="cpu").to(self.lu.device)  # (e, b)
        solved32 = self.solved_q.float()  # (e, k): where W_K^-1 sends the basis
        block = torch.linalg.lu_solve(self.lu32, self.pivots32, block, adjoint=True)  # W_K^-T: (d, b)
        for _ in range(self.ITERATIONS):
            block = _orthonormal_to(block, self.basis32)
            solved = torch.linalg.lu_solve(self.lu32, self.pivots32, block)  # (e, b)
            solved = solved - solved32 @ (solved32.T @ solved)
            block = torch.linalg.lu_solve(self.lu32, self.pivots32, solved, adjoint=True)  # (d, b)
        return _orthonormal_to(block, self.basis32)

    def weights(self, residual_rank: int, device: torch.device | str = "cpu") -> KModeWeights:
        """:class:`KModeWeights` for ``r = residual_rank`` (``0 <= r <= d``), float64 on ``device``."""
        d = self.lu.shape[0]
        if not 0 <= residual_rank <= d:
            raise ValueError(f"residual rank must be in [0, {d}], got {residual_rank}")
        if self.singular:
            raise SingularKeyProjection("W_K is singular (its LU factorisation broke down); use the SVD")
        rank = residual_rank
        if rank == 0:
            key_part, z_part, z_proj, kept_cond = self.a, self.a[:0], self.a.new_zeros(d, 0), self.cond
        else:
            k = min(d, self.block * (math.ceil(rank / self.block) + self.EXTRA_BLOCKS))
            self._grow(k)
            p_hat, s_inv, h_t = torch.linalg.svd(self.solved_r[:k, :k])  # R_F = P^ S H^T: (k, k), (k,), (k, k)
            z_all = self.basis[:, :k] @ h_t.T  # Q = Y H: (d, k)
            signs = torch.sign(z_all.gather(0, z_all.abs().argmax(0, keepdim=True)))  # (1, k): canonical, as key_svd
            signs[signs == 0] = 1
            p = (self.solved_q[:, :k] @ p_hat[:, :rank]) * signs[:, :rank]  # P: (e, r)
            coefficients = (p_hat[:, :rank] * signs[:, :rank]).T @ self.projected[:k]  # P^T A: (r, e)
            key_part = self.a - p @ coefficients  # (I - P P^T) A: (e, e)
            z_part = coefficients / s_inv[:rank, None]  # S^-1 P^T A: (r, e)
            z_proj = (z_all[:, :rank] * signs[:, :rank]).contiguous()  # (d, r)
            kept_cond = self.s_1 * float(s_inv[rank]) if rank < d else 1.0  # s_1 / s_g, s_g estimated by the basis
        offset = value_offset(key_part, self.b_k, self.b_v)  # (e,): of the keys before the norm
        if self.key_weight is not None:  # the cache holds w * k / s and rebuilds from s * (w * k / s): divide by w
            key_part = key_part / self.key_weight[:, None]
        w_kv = torch.cat([key_part, z_part])  # (e + r, e)
        return KModeWeights(
            w_kv=w_kv.to(device),
            v_offset=offset.to(device),
            z_proj=z_proj.to(device),
            cond=self.cond,
            kept_cond=kept_cond,
        )


def _krylov_basis(operator: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthonormal basis of the block Krylov space ``[X, A X, ..., A^steps X]`` for ``start = X: (n, c)``:
    ``(n, (steps + 1) c)``."""
    basis = torch.linalg.qr(start).Q
    block = basis
    for _ in range(steps):
        block = _orthonormal_to(operator(block), basis)
        basis = torch.cat([basis, block], dim=1)
    return basis


def _orthonormal_to(block: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``block: (n, b)`` with the span of the orthonormal ``basis: (n, k)`` projected out
    (twice: classical Gram-Schmidt loses orthogonality once the block is mostly in that span)."""
    for _ in range(2):
        block = block - basis @ (basis.T @ block)
    return torch.linalg.qr(block).Q


#: From this width on (d_model), :func:`key_factorization` uses :class:`KeyInverse`: below it the float64 SVD of one
#: layer costs under a second on two CPU cores and the calibration keeps the exact singular split.
LU_MIN_WIDTH = 1024

#: Largest cond(W_K) for :class:`KeyInverse`: its float64 W_KV is accurate to ~eps * cond(W_K), 2e-9 here, far below
#: the fp32 rounding (6e-8) the calibration measures in; more ill-conditioned layers get the SVD (eps * s_1 / s_g).
LU_MAX_COND = 1e7


def key_factorization(projections: Projections, method: str = "auto") -> KeySVD | KeyInverse:
    """The factorisation of one layer's ``W_K`` that gives its K-mode weights for every residual rank: the float64
    SVD (:class:`KeySVD`) or the LU and subspace one (:class:`KeyInverse`, ``d >= LU_MIN_WIDTH`` and
    ``cond(W_K) <= LU_MAX_COND``). ``method``: ``"auto"``, or ``"svd"`` / ``"lu"`` to force one (tests, benchmarks;
    ``"lu"`` still falls back to the SVD where the LU breaks down).

    Raises
    ------
    SingularKeyProjection, ValueError
        see :func:`_key_inputs`.
    """
    if method not in ("auto", "svd", "lu"):
        raise ValueError(f"method must be 'auto', 'svd' or 'lu', got {method!r}")
    d_model = projections.w_k.shape[0]
    if method == "svd" or (method == "auto" and d_model < LU_MIN_WIDTH):
        return key_svd(projections)
    w_k, w_v, b_k, b_v, key_weight = _key_inputs(projections)
    inverse = KeyInverse(w_k, w_v, b_k, b_v, key_weight, block=residual_rank_grid(d_model)[1])
    if inverse.singular or (method == "auto" and not inverse.cond <= LU_MAX_COND):
        return key_svd(projections)
    return inverse


def solve_k_mode(projections: Projections, residual_rank: int = 0) -> KModeWeights:
    """K-mode weights of one layer for a given residual rank (``0``: the plain K cache ``W_KV = W_K^-1 W_V``), from
    the same factorisation the calibration uses (:func:`key_factorization`), so the same weights."""
    return key_factorization(projections).weights(residual_rank, device=projections.w_k.device)


def value_offset(key_part: torch.Tensor, b_k: torch.Tensor | None, b_v: torch.Tensor | None) -> torch.Tensor:
    """``b_V - b_K P_K`` in float64, ``(e,)``, where ``P_K: (e, e)`` is the key block of ``W_KV``: what
    ``V = [K | Z] W_KV + offset`` adds when K was cached with its bias (Z carries no bias)."""
    offset = torch.zeros(key_part.shape[1], dtype=torch.float64, device=key_part.device)
    if b_v is not None:
        offset = offset + b_v.detach().to(device=key_part.device, dtype=torch.float64)
    if b_k is not None:
        offset = offset - b_k.detach().to(device=key_part.device, dtype=torch.float64) @ key_part
    return offset


def residual_rank_grid(d_model: int) -> list[int]:
    """Residual ranks tried by the calibration, smallest first: ``0`` and multiples of ``step`` up to
    :func:`max_residual_rank`, ``step = max(16, d / 32 rounded up to a multiple of 16)``.

    Why this grid: a step of at most ``d / 32`` costs at most 3% of cache above the true minimum ``r``; multiples of
    16 keep the cache width ``d + r`` a multiple of 16 (whole kernel tiles, 32-byte rows in 16-bit dtypes); and the
    calibration tries at most 17 ranks per layer whatever ``d`` (each one two small GEMMs on the calibration tokens,
    against one SVD per layer). d = 384 (Whisper tiny): 0, 16, ..., 192; d = 4096: 0, 128, ..., 2048.
    """
    step = max(16, 16 * math.ceil(d_model / 32 / 16))
    return [0, *range(step, max_residual_rank(d_model) + 1, step)]


def max_residual_rank(d_model: int) -> int:
    """Largest residual rank a layer may use, ``d / 2``: beyond it the K+R cache (``d + r`` per token) saves less
    than 1.33x against K+V (``2d``) and the input cache (``d``, always exact without RoPE) is the better choice."""
    return d_model // 2


class ValueErrorProbe:
    """Relative errors of V in ``dtype`` on real activations, against float64: rebuilt from the K+R cache (any
    :class:`KModeWeights`) and computed as the unmodified model does. The reference and the cached keys are computed
    once, so trying many residual ranks costs two small GEMMs each.

    Parameters
    ----------
    inputs:
        ``(tokens, d_model)`` real activations entering the attention layer, in the model dtype.
    projections:
        the layer's projections.
    dtype:
        the dtype the model runs in.
    round_trip:
        for a RoPE layer (:class:`RotaryRoundTrip`), the rotate-in-dtype / un-rotate round trip its cached keys go
        through before the values are rebuilt (one more rounding than the plain K cache).

    With a per-token key norm (``projections.key_norm``) the keys are normalised as the model does (in float32, cast
    to ``dtype``), each token's scale ``s`` is rounded to ``dtype`` as the cache stores it, and the values are rebuilt
    from ``s * K_n`` after the round trip, with ``W_KV``'s ``diag(1/w)`` in ``dtype``: the same pipeline as decode.
    """

    def __init__(
        self, inputs: torch.Tensor, projections: Projections, dtype: torch.dtype, round_trip: Callable | None = None
    ) -> None:
        x64 = inputs.detach().to(torch.float64)
        w_k64, w_v64 = projections.w_k.detach().double(), projections.w_v.detach().double()
        b_k64 = None if projections.b_k is None else projections.b_k.detach().double()
        b_v64 = None if projections.b_v is None else projections.b_v.detach().double()
        v_ref = x64 @ w_v64 + (0 if b_v64 is None else b_v64)  # (n, e)
        self.dtype = dtype
        self.x = inputs.detach().to(dtype)  # (n, d)
        self.v_ref = v_ref
        self.norm = v_ref.norm().clamp_min(1e-300)
        self.keys = self._in_dtype(w_k64, b_k64)  # what the K cache stores, rounded to dtype: (n, e)
        scale = None
        if projections.key_norm is not None:  # cached: the normalised keys and each token's scale, both in dtype
            raw = self.keys.to(dtype)  # (n, e)
            scale = projections.key_norm.scale(raw).to(dtype).double()  # (n, 1)
            self.keys = projections.key_norm.normalise(raw).double()  # (n, e)
        if round_trip is not None:  # RoPE: cached rotated in dtype, un-rotated in float32 for the values
            self.keys = round_trip(self.keys.to(dtype)).double()
        if scale is not None:
            self.keys = (self.keys.float() * scale.float()).double()  # s * K_n, in float32 as decode mixes it
        self.vanilla_error = self._error(self._in_dtype(w_v64, b_v64))

    def _in_dtype(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ weight (+ bias)`` as the model computes it: operands in dtype, result rounded to dtype (float64)."""
        out = (self.x.float() @ weight.to(self.dtype).float()).to(self.dtype).double()
        return out if bias is None else (out + bias.to(self.dtype).double()).to(self.dtype).double()

    def _error(self, values: torch.Tensor) -> float:
        return float((values.double() - self.v_ref).norm() / self.norm)

    def k_mode_error(self, weights: KModeWeights) -> float:
        """Relative error of ``V = [K | Z] W_KV + v_offset`` with K, Z, W_KV and the offset in the model dtype."""
        w_kv = weights.w_kv.to(device=self.x.device, dtype=self.dtype).float()  # (e + r, e)
        offset = weights.v_offset.to(device=self.x.device, dtype=self.dtype).float()  # (e,)
        rebuilt = self.keys.float() @ w_kv[: self.keys.shape[1]] + offset  # (n, e)
        if weights.residual_rank:
            z_proj = weights.z_proj.to(device=self.x.device, dtype=self.dtype).float()  # (d, r)
            z = (self.x.float() @ z_proj).to(self.dtype).float()  # what the cache stores beside K: (n, r)
            rebuilt = rebuilt + z @ w_kv[self.keys.shape[1] :]
        return self._error(rebuilt)


@dataclass(frozen=True)
class RotaryRoundTrip:
    """Rotate keys in their dtype and un-rotate them in float32, as a RoPE K-cache layer does, for the calibration.

    The angles are a standard RoPE table (base 10000, position = token index within ``seq_len`` rows): the rounding
    of a rotation depends on the angles only through ``cos``/``sin`` magnitudes, which any spread of angles covers.
    The whole head is rotated: for partial rotary (Phi, GPT-NeoX, GPT-J) a slight over-estimate, on the safe side.
    """

    num_heads: int
    head_dim: int
    layout: RotaryLayout

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys: (tokens, e)`` in the model dtype -> the un-rotated keys the values are rebuilt from, float32."""
        tokens = keys.shape[0]
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=keys.device)
        inv_freq = 1.0 / (10000.0 ** (steps / self.head_dim))  # (dk/2,)
        angles = torch.arange(tokens, dtype=torch.float64, device=keys.device)[:, None] * inv_freq  # (n, dk/2)
        if self.layout.style == "half":
            angles = torch.cat((angles, angles), dim=-1)  # (n, dk)
        else:
            angles = angles.repeat_interleave(2, dim=-1)  # (n, dk)
        cos, sin = angles.cos().to(keys.dtype), angles.sin().to(keys.dtype)  # (n, dk), as the model hands them over
        heads = keys.view(tokens, self.num_heads, self.head_dim)  # (n, h, dk)
        rotated = heads * cos[:, None] + rotate(heads, self.layout.style) * sin[:, None]  # in dtype, as the model
        unrotation = Unrotation.of(torch.cat((cos, sin), dim=-1)[None])  # of the (1, n, 2dk) table
        return unrotate_keys(rotated.reshape(1, tokens, -1), unrotation, self.num_heads, self.head_dim, self.layout)[0]


def k_mode_is_exact(k_error: float, vanilla_error: float) -> bool:
    """The acceptance rule: at most :data:`K_MODE_ERROR_FACTOR` x the unmodified model's own error, or
    below :data:`K_MODE_ABSOLUTE_FLOOR`."""
    return k_error <= max(K_MODE_ERROR_FACTOR * vanilla_error, K_MODE_ABSOLUTE_FLOOR)


def cache_ratio(inner: int, residual_rank: int, key_scale: bool = False) -> float:
    """How many times smaller a K+R layer's cache is than the model's own K and V: ``2 e / (e + r)``, or
    ``2 e / (e + r + 1)`` for a layer that keeps each token's key scale."""
    return 2 * inner / (inner + residual_rank + int(key_scale))


@dataclass(frozen=True)
class KModeChoice:
    """The outcome of calibrating one layer: its weights (None: it keeps the input cache), the numbers, and the
    largest rank that was allowed (:func:`max_residual_rank`)."""

    weights: KModeWeights | None
    numbers: dict
    max_rank: int


def choose_residual_rank(
    projections: Projections,
    inputs: torch.Tensor,
    dtype: torch.dtype,
    round_trip: RotaryRoundTrip | None = None,
    on_rank: Callable[[int], None] | None = None,
) -> KModeChoice:
    """The smallest residual rank on :func:`residual_rank_grid` whose rebuilt values pass :func:`k_mode_is_exact`.

    ``W_K`` is factorised once (:func:`key_factorization`) and every rank's weights come from that factorisation; each
    is measured in ``dtype`` by one :class:`ValueErrorProbe`. ``on_rank(r)`` is called before rank ``r`` is tried (a
    progress bar's postfix).

    RoPE layers pass ``round_trip`` (their keys are cached rotated, see :class:`RotaryRoundTrip`): the errors then
    include that round trip; the residual ``Z = X U_r`` is not rotated. Layers with a per-token key norm are measured
    with its scale and ``diag(1/w)`` (:class:`ValueErrorProbe`); their ``numbers`` say ``key_scale: True``.

    Returns
    -------
    a :class:`KModeChoice` whose ``numbers`` (plain data, for the record, the warning, the export and ``hf-slim
    verify``) are ``residual_rank``, ``k_error``, ``vanilla_error``, ``cond_w_k``, ``kept_cond``, ``cache_ratio``
    and ``dtype``; on refusal they describe the largest rank tried and ``weights`` is None.

    Raises
    ------
    SingularKeyProjection
        when W_K is not square, or singular to float64 precision in more than ``max_residual_rank`` directions.
    """
    factorization = key_factorization(projections)
    probe = ValueErrorProbe(inputs, projections, dtype, round_trip)
    d_model, inner = projections.w_k.shape
    numbers: dict = {}
    max_rank = max_residual_rank(d_model)
    for rank in residual_rank_grid(d_model):
        if on_rank is not None:
            on_rank(rank)
        try:
            weights = factorization.weights(rank, device=projections.w_k.device)
        except SingularKeyProjection:
            continue
        k_error = probe.k_mode_error(weights)
        numbers = {
            "residual_rank": rank,
            "k_error": k_error,
            "vanilla_error": probe.vanilla_error,
            "cond_w_k": factorization.cond,
            "kept_cond": weights.kept_cond,
            "cache_ratio": cache_ratio(inner, rank, projections.key_norm is not None),
            "dtype": str(dtype),
        }
        if projections.key_norm is not None:
            numbers["key_scale"] = True  # one more cached column per token: the key scale
        if k_mode_is_exact(k_error, probe.vanilla_error):
            return KModeChoice(weights, numbers, max_rank)
    if not numbers:
        raise SingularKeyProjection(
            f"W_K is singular (cond {factorization.cond:.3g}) in more than {max_rank} directions, the most a K+R "
            "cache may keep beside K",
            numbers={"cond_w_k": factorization.cond, "dtype": str(dtype)},
        )
    return KModeChoice(None, numbers, max_rank)


#: Elements of a weight converted to float64 at a time when sketching it (bounds the temporary copy at 16 MiB).
_SKETCH_BLOCK = 1 << 21


@functools.lru_cache(maxsize=64)
def _probe(columns: int, device: torch.device, absolute: bool) -> torch.Tensor:
    """The fixed sketch probe ``cos(0.785 j + 0.1)`` (no zero entries), float64 ``(columns,)``, made once per size."""
    probe = torch.cos(torch.arange(columns, dtype=torch.float64, device=device) * 0.7853981 + 0.1)
    return probe.abs() if absolute else probe


@dataclass(frozen=True)
class Sketch:
    """A float64 fingerprint of one tensor, on the CPU: ``values = rows @ probe`` and the bound ``|rows| @ |probe|``
    (one number per row of a matrix, one per element of a vector), with a fixed probe.

    Why a sketch and not a copy: it costs one read of the tensor and a few bytes per row, yet any change of the values
    larger than rounding moves it (the probe has no zero entries and no structure a weight edit would follow), and it
    is the same on every device. ``bound``, computed once at stamp time, scales the tolerance of each row
    (:meth:`matches`); a check computes only the values.
    """

    values: torch.Tensor
    bound: torch.Tensor

    @staticmethod
    def _rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().reshape(-1, tensor.shape[-1] if tensor.dim() > 1 else 1)  # vectors: one row each

    @staticmethod
    def _apply(rows: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        """``rows @ probe`` (or ``|rows| @ |probe|``) in float64, converting ``_SKETCH_BLOCK`` elements at a time."""
        columns = rows.shape[-1]
        probe = _probe(columns, rows.device, absolute)  # (cols,)
        out = []
        for block in rows.split(max(1, _SKETCH_BLOCK // columns)):  # (rows_b, cols)
            block = block.to(torch.float64)
            out.append(torch.mv(block.abs() if absolute else block, probe))
        return torch.cat(out).cpu()

    @classmethod
    def of(cls, tensor: torch.Tensor | None) -> Sketch | None:
        if tensor is None:
            return None
        rows = cls._rows(tensor)
        return cls(cls._apply(rows), cls._apply(rows, absolute=True))

    def matches(self, tensor: torch.Tensor | None, rtol: float) -> bool:
        """Whether ``tensor`` holds the sketched values up to ``rtol`` of each row's magnitude (NaN never matches)."""
        if tensor is None:
            return False
        rows = self._rows(tensor)
        if rows.shape[0] != self.values.shape[0]:
            return False
        return bool(((self._apply(rows) - self.values).abs() <= rtol * self.bound + 1e-300).all())


def _same(old: Sketch | None, tensor: torch.Tensor | None, rtol: float) -> bool:
    return (old is None and tensor is None) or (old is not None and old.matches(tensor, rtol))


#: Weights are compared as float64 values: a sketch of identical values differs only by the float64 summation order
#: of the device that computed it.
_WEIGHT_RTOL = 1e-12


def _derived_rtol(dtype: torch.dtype) -> float:
    """Derived buffers (``W_KV`` in the model dtype) solved again from the same weights may round differently by one
    unit in the last place where the float64 solve's last bits differ (other BLAS threads): 4 of them per row."""
    return 4 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _versions(projections: Projections, buffers: tuple[torch.Tensor, ...]) -> tuple[tuple[int, int], ...]:
    """``(version counter, data pointer)`` of each tensor the layer's K mode depends on: the projections' source
    tensors and the derived buffers themselves. In-place edits bump the first, ``.data = ...`` assignments, device
    moves and ``to_empty`` change the second; edits through ``param.data`` in place change neither (the per-generate
    check, :meth:`KSourceStamp.verify`, reads the values)."""
    parts = (*(projections.sources or _stamped(projections)), *buffers)
    return tuple((-1, 0) if t is None else (t._version, t.data_ptr()) for t in parts)


def _stamped(projections: Projections) -> tuple[torch.Tensor | None, ...]:
    """The tensors ``W_KV`` is derived from: W_K, W_V, their biases and a key norm's weight (folded in as 1/w)."""
    key_weight = None if projections.key_norm is None else projections.key_norm.weight
    return (projections.w_k, projections.w_v, projections.b_k, projections.b_v, key_weight)


@dataclass
class KSourceStamp:
    """Which weights, dtype and derived buffers a K-mode layer runs with, checked before its K cache is used.

    Why: ``W_KV = W_K^-1 W_V`` (and the value offset, and ``z_proj = U_r``) are copies derived from the weights, kept
    as non-persistent buffers. ``load_state_dict``, an optimizer step or any edit changes W_K/W_V but not W_KV (decode
    would silently use the old weights); ``to_empty()`` after a move through the meta device fills the buffers with
    uninitialised memory while ``load_state_dict`` restores the weights (they are not in the state dict); a dtype cast
    breaks the calibration's promise (the K cache is exact only in the dtype it was calibrated in).

    Two checks, both eager (never inside a ``torch.compile`` trace):

    * :meth:`verify`, one read of W_K, W_V and the buffers (float64 :class:`Sketch` es), at every ``generate()`` call
      and at the first forward on every new slim cache: weights that changed raise :class:`StaleKModeWeights`;
      buffers that no longer match identical weights (``to_empty``) are solved again from the weights and checked.
      It sees every kind of edit, ``param.data`` in place and compiled forwards included.
    * :meth:`check`, O(1) at every eager decode step: dtype, LoRA adapters, and the version counters and data pointers
      of the weights and buffers; when one of them moved, :meth:`verify` runs.
    """

    dtype: torch.dtype
    versions: tuple[tuple[int, int], ...]
    sketches: tuple[Sketch | None, ...]
    derived: tuple[Sketch, ...]

    @classmethod
    def of(cls, projections: Projections, buffers: tuple[torch.Tensor, ...]) -> KSourceStamp:
        """Stamp the live projections and the derived ``buffers`` (``W_KV``, offset[, ``z_proj``]) as installed."""
        return cls(
            projections.w_k.dtype,
            _versions(projections, buffers),
            tuple(Sketch.of(t) for t in _stamped(projections)),
            tuple(Sketch.of(t) for t in buffers),
        )

    def _check_kind(self, projections: Projections, where: str) -> None:
        if projections.w_k.dtype != self.dtype:
            raise StaleKModeWeights(
                f"{where} uses the K cache, set up for {self.dtype}, but the model now runs in {projections.w_k.dtype}:"
                " the K cache is only known to be exact in the dtype it was calibrated in. Call "
                "hf_slim.unslimify(model) and hf_slim.slimify(model, mode='k') after the cast to calibrate again (or, "
                "without RoPE, use mode='input': exact in every dtype)"
            )
        if projections.k_low_rank or projections.v_low_rank:
            raise StaleKModeWeights(
                f"{where} uses the K cache but its key/value projections now carry LoRA adapters, which change W_K and "
                "W_V; merge them (peft: model.merge_and_unload()) and slimify again (or, without RoPE, use "
                "mode='input', which serves active adapters exactly)"
            )

    def check(
        self, projections: Projections, buffers: tuple[torch.Tensor, ...], where: str, rederive: Callable[[], None]
    ) -> None:
        """The per-step O(1) check; runs :meth:`verify` when a version counter or data pointer moved (of the buffers
        only when theirs moved: accelerate's offload hooks give the weights new storage at every step)."""
        self._check_kind(projections, where)
        versions = _versions(projections, buffers)
        if versions != self.versions:
            moved = versions[-len(buffers) :] != self.versions[-len(buffers) :]
            self.verify(projections, buffers, where, rederive, buffers_too=moved)

    def verify(
        self,
        projections: Projections,
        buffers: tuple[torch.Tensor, ...],
        where: str,
        rederive: Callable[[], None],
        *,
        buffers_too: bool = True,
    ) -> None:
        """Raise :class:`StaleKModeWeights` unless ``projections`` hold the stamped weights (values and dtype); call
        ``rederive()`` (solve the buffers again in place from the live weights) if the buffers no longer hold what was
        derived from them, and raise if they still do not. Costs one read of W_K, W_V and (``buffers_too``) the
        buffers."""
        self._check_kind(projections, where)
        parts = _stamped(projections)
        if any(t is not None and t.is_meta for t in (*parts, *buffers)):
            raise StaleKModeWeights(
                f"{where}: its weights or K-mode buffers are on the meta device (not loaded); load real weights first "
                "(model.to_empty(device=...) and load_state_dict), or slimify after loading"
            )
        for old, tensor in zip(self.sketches, parts, strict=True):
            if not _same(old, tensor, _WEIGHT_RTOL):
                raise StaleKModeWeights(
                    f"{where}: the key/value weights changed after slimify (load_state_dict, an optimizer step or an "
                    "in-place edit), so its K-mode W_KV = W_K^-1 W_V is stale and decode would use the old weights. "
                    "Call hf_slim.unslimify(model) and hf_slim.slimify(model, mode='k') again after changing weights "
                    "(or, without RoPE, use mode='input', which always reads the live weights)"
                )
        if buffers_too and not self._derived_match(buffers):
            rederive()  # the weights are the stamped ones: the buffers lost what was derived from them (to_empty)
            if not self._derived_match(buffers):
                raise StaleKModeWeights(
                    f"{where}: its K-mode buffers (W_KV, the value offset, z_proj) no longer match the weights they "
                    "were derived from, and solving them again did not reproduce them; call hf_slim.unslimify(model) "
                    "and hf_slim.slimify(model, mode='k') again"
                )
        self.versions = _versions(projections, buffers)  # same values (a device move or a reload): new counters

    def _derived_match(self, buffers: tuple[torch.Tensor, ...]) -> bool:
        return len(buffers) == len(self.derived) and all(
            _same(old, buffer, _derived_rtol(buffer.dtype)) for old, buffer in zip(self.derived, buffers, strict=True)
        )
