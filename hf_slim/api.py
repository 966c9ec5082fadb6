"""Public entry points: ``slimify``, ``unslimify``, ``is_slim``, ``slimified``.

slimify validates everything and computes everything first (architecture, attention implementation, K-mode weights
and calibration), then applies a list of reversible instance patches all at once; a failure part-way reverts the
ones already applied, so the model is either fully slim or exactly as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from . import MODES
from ._compat import check_contracts
from .assembly import check_projections, site_patches
from .calibration import choose_layer_modes, fallback_mode, forced_layer_modes
from .export import export_patches
from .generation import CONTRACTS as GENERATION_CONTRACTS
from .generation import forward_with_slim_cache, prepare_slim_cache
from .interface import check_model_implementation
from .kmode import KModeWeights
from .memory import slim_summary
from .patching import InstancePatch, apply_all, forward_attribute, revert_all
from .record import SlimRecord, is_slim, slim_part, slim_record, unwrapped
from .registry import UnsupportedModelError, architecture_for
from .sites import AttentionSite

logger = logging.getLogger(__name__)


def slimify(
    model: torch.nn.Module,
    mode: str = "auto",
    *,
    calibration_inputs: dict | None = None,
    layer_modes: dict[str, str] | None = None,
    residual_ranks: dict[str, int] | None = None,
    _k_weights: dict[str, KModeWeights] | None = None,
) -> torch.nn.Module:
    """Patch every supported attention layer of ``model`` in place to use a slim cache, and return the model.

    After this, ``model.generate(...)``, ``model(...)`` and pipelines build and use a slim cache by themselves.

    Parameters
    ----------
    model:
        a transformers model of a supported architecture (see ``hf_slim.supported_model_types()``).
    mode:
        ``"input"`` caches each layer's attention input X (exact, no inverse; not with RoPE); ``"k"`` caches the
        keys plus the ``r`` input directions W_K barely carries (K+R cache, width ``e + r``, see
        :mod:`hf_slim.kmode`) and rebuilds values from them, with per layer the smallest ``r`` for which a
        calibration in the model's dtype shows it is as exact as the unmodified model; layers that would need
        ``r > d/2`` keep the input cache, with a :class:`SlimFallbackWarning` (one factorisation of every W_K,
        7-10 s per d = 4096 layer on two idle CPU cores, a quarter to a third of one float64 SVD; with a progress
        bar over the layers). ``"auto"`` picks
        ``"input"`` wherever the architecture allows it. Logs one line at INFO (logger ``hf_slim``) saying what
        the model got: layers per mode, residual ranks and the cache ratio against K/V at its maximum length.
        Cross-attention always reads the encoder output directly (no cache) whatever the mode.
    calibration_inputs:
        keyword arguments for one forward pass of the unmodified model whose attention inputs calibrate the K mode
        (real text or audio: random activations understate the K-cache error 3-10x). Defaults to the
        architecture's own calibration batch.
    layer_modes:
        force each layer's mode instead of choosing it (``{site name: "input" | "k" | "encoder"}``, exactly the keys
        of ``slim_record(model).layer_modes``), e.g. to reproduce an exported model: no calibration runs, K layers
        get ``W_KV`` solved from the live weights. Names or modes that do not fit the model raise ``ValueError``.
        (``_k_weights`` is for :func:`hf_slim.load_slim`: verified precomputed K-mode weights, skipping the solve.)
    residual_ranks:
        with ``layer_modes``: the residual rank ``r`` (``0 <= r <= d``) of each forced K layer (default 0, the plain
        K cache), e.g. to reproduce an exported model or to test a given ``r``. No calibration checks it.

    Raises
    ------
    UnsupportedModelError
        for architectures or configurations slim attention cannot serve (GQA/MQA, RoPE with the input mode, an
        unsupported attention implementation); the model is left untouched.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    wrapper, model = model, unwrapped(model)
    if is_slim(model):
        record = slim_record(model)
        if (layer_modes is not None and layer_modes != record.layer_modes) or (
            residual_ranks is not None and residual_ranks != record.residual_ranks
        ):
            raise ValueError("model is already slimified with other layer modes; call hf_slim.unslimify(model) first")
        if record.requested_mode != mode:
            raise ValueError(
                f"model is already slimified with mode={record.requested_mode!r}; call hf_slim.unslimify(model) "
                f"before slimify(model, mode={mode!r})"
            )
        return wrapper
    part = slim_part(model)
    if part is not None:
        raise ValueError(
            f"part of this model ({part!r}) is already slimified, by a slimify() call on it or on a model that "
            "contains it; unslimify that first (one slimify per model: nested slim states could not be undone in "
            "every order)"
        )
    config = model.config
    architecture = architecture_for(config, mode)
    check_model_implementation(model)
    patch = architecture.load()
    check_contracts((*GENERATION_CONTRACTS, *patch.contracts), model)  # transformers drift
    sites: list[AttentionSite] = patch.attention_sites(model)
    if not sites:
        raise UnsupportedModelError(f"found no attention layers to patch in {type(model).__name__}")
    resolved = ("k" if architecture.positions == "rope" else "input") if mode == "auto" else mode
    check_projections(sites)  # layer kinds the slim path cannot reproduce, non-finite weights: refuse, untouched

    if residual_ranks is not None and layer_modes is None:
        raise ValueError("residual_ranks forces the rank of forced K layers: pass layer_modes too")
    if layer_modes is not None:
        layer_modes, calibration, k_weights = forced_layer_modes(
            sites, architecture, layer_modes, residual_ranks or {}, _k_weights
        )
    else:
        layer_modes, calibration, k_weights = choose_layer_modes(
            model, patch, sites, resolved, calibration_inputs, fallback_mode(architecture)
        )
    self_sites = [site for site in sites if site.kind == "self"]
    record = SlimRecord(
        requested_mode=mode,
        layer_modes=layer_modes,
        calibration=calibration,
        num_cache_layers=1 + max((site.layer_idx for site in self_sites), default=-1),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        static_cache_refusal=patch.static_cache_refusal,
        residual_ranks={name: weights.residual_rank for name, weights in k_weights.items()},
        kv_layers=tuple(site.layer_idx for site in self_sites if layer_modes[site.name] == "kv"),
        has_derived_state=any(mode == "k" for mode in layer_modes.values()),
    )
    # the record first: applied first and reverted last, so an interrupted unslimify leaves a model that is_slim()
    # and that a second unslimify finishes (see revert_all)
    patches = [InstancePatch(model, "_hf_slim_record", record)]
    patches += site_patches(sites, layer_modes, calibration, k_weights, record.owner)
    for owner in patch.cache_owners(model):
        patches.append(InstancePatch(owner, forward_attribute(owner), forward_with_slim_cache(owner, record)))
    if hasattr(model, "_prepare_cache_for_generation"):
        patches.append(InstancePatch(model, "_prepare_cache_for_generation", prepare_slim_cache(model, record)))
    patches.extend(patch.extra_patches(model))
    patches.extend(export_patches(model, record))
    record.patches = patches
    apply_all(patches)
    logger.info(slim_summary(model))  # what the user got: layers per mode, ranks, the cache ratio
    return wrapper


def unslimify(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`slimify`: original forwards back, added buffers gone, weights untouched (bit-identical)."""
    revert_all(slim_record(model).patches)
    return model


@contextlib.contextmanager
def slimified(model: torch.nn.Module, mode: str = "auto", **kwargs) -> Iterator[torch.nn.Module]:
    """Context manager form: the model is slim inside the block and restored after it (if it was not slim before)."""
    was_slim = is_slim(model)
    slimify(model, mode, **kwargs)
    try:
        yield model
    finally:
        if not was_slim:
            unslimify(model)
