"""Which cache each attention layer gets: the K-mode calibration on real activations (the smallest exact residual
rank per layer, :mod:`hf_slim.kmode`), layer modes forced by the caller, and the calibration forward pass."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ._compat import find_cache, generation_cache_names, positional_parameters
from .kmode import RotaryRoundTrip, SingularKeyProjection, choose_residual_rank
from .patching import resident_weights
from .registry import UnsupportedModelError
from .rope import rotary_state_kept
from .sites import solve_layer_k_mode


class SlimFallbackWarning(UserWarning):
    """Some layers asked for the K cache keep the input cache (RoPE models: the model's own K and V) because no K or
    K+R cache (``r <= d/2``) is exact there."""


def fallback_mode(architecture) -> str:
    """What a self-attention layer keeps where the K cache is refused: the exact input cache, or for RoPE models
    (where the input cache cannot apply) the model's own keys and values (``"kv"``: a mixed cache)."""
    return "kv" if architecture.positions == "rope" else "input"


def choose_layer_modes(model, patch, sites, resolved, calibration_inputs, fallback):
    """Decide each site's mode; for the K mode solve W_KV and calibrate on real activations, before any patching."""
    layer_modes, calibration, k_weights = {}, {}, {}
    for site in sites:
        layer_modes[site.name] = "encoder" if site.kind == "cross" else "input"
    if resolved != "k":
        return layer_modes, calibration, k_weights
    self_sites = [site for site in sites if site.kind == "self"]
    refused = [f"{site.name}: {site.k_mode_refusal}" for site in self_sites if site.k_mode_refusal]
    for site in self_sites:
        layer_modes[site.name] = fallback
    self_sites = [site for site in self_sites if not site.k_mode_refusal]
    if not self_sites:
        _warn_fallback(refused, fallback)
        return layer_modes, calibration, k_weights
    if calibration_inputs is None:
        calibration_inputs = patch.calibration_inputs(model)
    check_calibration_inputs(calibration_inputs)
    activations = collect_attention_inputs(model, self_sites, calibration_inputs)
    dtype = next(model.parameters()).dtype
    bar = _progress(self_sites, "hf_slim: K+R calibration")
    for site in bar:
        bar.set_postfix_str(site.name)  # the layer being calibrated, and the rank being tried

        def on_rank(rank: int, name: str = site.name) -> None:
            bar.set_postfix_str(f"{name}, r = {rank}")

        with resident_weights(site.module):  # accelerate offload: solve from the real weights, on their device
            projections = site.projections(site.module)
            try:
                round_trip = (
                    None if site.rotary is None else RotaryRoundTrip(site.num_heads, site.head_dim, site.rotary)
                )
                choice = choose_residual_rank(projections, activations[site.name], dtype, round_trip, on_rank)
            except SingularKeyProjection as error:
                refused.append(f"{site.name}: {error}")
                if error.numbers:
                    calibration[site.name] = error.numbers  # what was measured (cond(W_K)), for hf-slim verify
                continue
            except ValueError as error:
                raise ValueError(f"{site.name}: {error}") from error
        numbers = calibration[site.name] = choice.numbers
        if choice.weights is not None:
            layer_modes[site.name] = "k"
            k_weights[site.name] = choice.weights
        else:
            refused.append(
                f"{site.name}: even with r = {numbers['residual_rank']} (cap {choice.max_rank}; cache ratio "
                f"{numbers['cache_ratio']:.2f}x) V rebuilt "
                f"from {dtype} keys has relative error {numbers['k_error']:.2e} vs {numbers['vanilla_error']:.2e} for "
                f"the unmodified model (cond(W_K) = {numbers['cond_w_k']:.2e})"
            )
    _warn_fallback(refused, fallback)
    return layer_modes, calibration, k_weights


def _warn_fallback(refused: list[str], fallback: str) -> None:
    if refused:
        kept = "the model's own keys and values" if fallback == "kv" else "the (exact) input cache"
        warnings.warn(
            f"K cache refused, these layers keep {kept}:\n  " + "\n  ".join(refused),
            SlimFallbackWarning,
            stacklevel=4,
        )


def forced_layer_modes(sites, architecture, layer_modes, residual_ranks, k_weights):
    """Check caller-given per-layer modes (and K-layer ranks) against the model's sites and get W_KV for the K layers
    (no calibration)."""
    by_name = {site.name: site for site in sites}
    unknown, missing = sorted(set(layer_modes) - set(by_name)), sorted(set(by_name) - set(layer_modes))
    if unknown or missing:
        raise ValueError(
            f"layer_modes do not match this model's attention layers (unknown: {unknown}, missing: {missing}); "
            f"its layers are {list(by_name)}"
        )
    not_k = sorted(name for name in residual_ranks if layer_modes.get(name) != "k")
    if not_k:
        raise ValueError(f"residual_ranks names layers that are not forced to 'k': {not_k}")
    weights = {}
    for name, site in by_name.items():
        mode, allowed = layer_modes[name], (("encoder",) if site.kind == "cross" else ("input", "k"))
        if mode == "input" and architecture.positions == "rope":
            raise UnsupportedModelError(f"layer_modes[{name!r}] = 'input' cannot be used with RoPE; use 'k' or 'kv'")
        if architecture.positions == "rope" and site.kind != "cross":  # cross-attention has no positions (Moonshine)
            allowed = ("k", "kv")
        if mode not in allowed:
            raise ValueError(f"layer_modes[{name!r}] = {mode!r}: a {site.kind}-attention layer takes one of {allowed}")
        if mode == "k" and site.k_mode_refusal:
            raise ValueError(f"layer_modes[{name!r}] = 'k' is not exact here: {site.k_mode_refusal}; use 'kv'")
        rank = residual_ranks.get(name, 0)
        if mode == "k" and k_weights is not None and name in k_weights:
            weights[name] = k_weights[name]
            if name in residual_ranks and rank != weights[name].residual_rank:
                raise ValueError(f"{name}: residual rank {rank} != {weights[name].residual_rank} of its K weights")
        elif mode == "k":
            try:
                weights[name] = solve_layer_k_mode(site, rank)
            except ValueError as error:
                other = "'kv'" if architecture.positions == "rope" else "'input'"
                raise ValueError(f"layer_modes[{name!r}] = 'k': {error}; use {other} for this layer") from error
    # K layers record the dtype they are set up in, as a calibration would: load_slim checks it
    calibration = {name: {"dtype": str(by_name[name].projections(by_name[name].module).w_k.dtype)} for name in weights}
    return {site.name: layer_modes[site.name] for site in sites}, calibration, weights


def check_calibration_inputs(calibration_inputs) -> None:
    """``calibration_inputs`` must be the keyword arguments of one forward pass: a dict of names to tensors."""
    example = "e.g. calibration_inputs={'input_ids': tokenizer(text, return_tensors='pt').input_ids}"
    if not isinstance(calibration_inputs, Mapping):
        raise TypeError(
            "calibration_inputs must be a dict of forward() keyword arguments, got a "
            f"{type(calibration_inputs).__name__}; {example}"
        )
    for key, value in calibration_inputs.items():
        if not isinstance(key, str):
            raise TypeError(f"calibration_inputs keys must be argument names (str), got {key!r}; {example}")
        if key in ("use_cache", "cache", *generation_cache_names()) or find_cache((value,), {}) is not None:
            raise ValueError(f"calibration_inputs must not set {key!r}: the calibration runs one pass without a cache")
        if not isinstance(value, torch.Tensor) and key not in ("encoder_outputs",):
            raise TypeError(f"calibration_inputs[{key!r}] is a {type(value).__name__}, expected a tensor; {example}")


@torch.no_grad()
def collect_attention_inputs(model, sites, calibration_inputs) -> dict[str, torch.Tensor]:
    """Run the unmodified model once and keep each site's attention input, ``(tokens, d_model)``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:
        # the attention input: the forward's first argument, by name or position (FSMT passes ``query=`` time-first)
        first = positional_parameters(type(site.module).forward)[0]

        def hook(module, args, kwargs, name=site.name, first=first):
            hidden = kwargs[first] if first in kwargs else args[0]
            captured[name] = hidden.detach().reshape(-1, hidden.shape[-1])

        handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with rotary_state_kept(model):  # dynamic NTK / longrope: the pass must not change the frequencies
            model(**calibration_inputs, use_cache=False)
    except Exception as error:  # the model's own error, often deep inside: say which argument is at fault
        shapes = {key: tuple(value.shape) for key, value in calibration_inputs.items() if hasattr(value, "shape")}
        raise ValueError(
            f"the calibration forward pass failed with calibration_inputs of shapes {shapes}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. Pass the keyword arguments "
            f"of one forward pass of {type(model).__name__} (real text or audio), or none for the default"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    missing = [site.name for site in sites if site.name not in captured]
    if missing:
        raise ValueError(f"calibration forward never reached {missing}; pass calibration_inputs that run the decoder")
    return captured


def _progress(items: list, desc: str):
    """A progress bar over ``items`` on stderr, none when stderr is not a terminal (tqdm's ``disable=None``); it is
    transformers' tqdm, so ``transformers.utils.logging.disable_progress_bar()`` silences it."""
    from transformers.utils.logging import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False, disable=None)
