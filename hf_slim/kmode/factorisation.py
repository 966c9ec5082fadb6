"""One factorisation of a layer's W_K per layer, and the K+R weights of any residual rank from it: the float64 SVD
(narrow or ill-conditioned layers) or an LU and an inverse subspace iteration (wide ones), on the device where float64
is fast."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..projections import Projections

#: Kept singular directions must stay this far above float64 rounding (``s_g / s_1``); below it the key part of the
#: cache cannot be inverted at all and more directions must go into Z.
MIN_KEPT_SINGULAR_RATIO = 1e-12


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
