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

Keys normalised per token (OLMo-2's ``k_norm``, :class:`~hf_slim.projections.KeyNorm`): the model caches
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

from .exactness import (
    K_MODE_ABSOLUTE_FLOOR,
    K_MODE_ERROR_FACTOR,
    KModeChoice,
    RotaryRoundTrip,
    ValueErrorProbe,
    cache_ratio,
    choose_residual_rank,
    k_mode_is_exact,
)
from .factorisation import (
    LU_MAX_COND,
    LU_MIN_WIDTH,
    KeyInverse,
    KeySVD,
    KModeWeights,
    SingularKeyProjection,
    factorisation_device,
    key_factorization,
    key_svd,
    max_residual_rank,
    residual_rank_grid,
    solve_k_mode,
    value_offset,
)
from .stamps import KSourceStamp, Sketch, StaleKModeWeights

__all__ = [
    "K_MODE_ABSOLUTE_FLOOR",
    "K_MODE_ERROR_FACTOR",
    "LU_MAX_COND",
    "LU_MIN_WIDTH",
    "KModeChoice",
    "KModeWeights",
    "KSourceStamp",
    "KeyInverse",
    "KeySVD",
    "RotaryRoundTrip",
    "SingularKeyProjection",
    "Sketch",
    "StaleKModeWeights",
    "ValueErrorProbe",
    "cache_ratio",
    "choose_residual_rank",
    "factorisation_device",
    "k_mode_is_exact",
    "key_factorization",
    "key_svd",
    "max_residual_rank",
    "residual_rank_grid",
    "solve_k_mode",
    "value_offset",
]
