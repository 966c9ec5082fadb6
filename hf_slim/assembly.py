"""Patch assembly: the reversible instance patches that make each attention layer slim (its state, derived
buffers and forward), built before any is applied (:func:`hf_slim.patching.apply_all` applies them all or none)."""

from __future__ import annotations

import functools
import inspect

import torch

from .adapters import UnsupportedProjectionError
from .attention_state import SlimAttentionState
from .cache_layers import CacheOwner, SlimLayout
from .interface import RoutedSignature, SlimAttentionConfig, check_implementation, routed_forward
from .kmode import KSourceStamp
from .patching import BufferPatch, InstancePatch, PatchedMethod, forward_attribute, resident_weights
from .sites import AttentionSite


def check_projections(sites: list[AttentionSite]) -> None:
    """Read every site's key/value projections once, before anything is patched.

    Why: the slim decode applies these weights itself, so a layer kind it cannot reproduce exactly (an unknown
    ``nn.Linear`` subclass, bitsandbytes 8-bit, a layer that quantizes its input, an unmergeable adapter) must be
    refused here with the model untouched, not at the first decode step; and non-finite weights make the model
    compute NaN, whose pattern the slim path (other products, other order) would not reproduce.
    """
    for site in sites:
        with resident_weights(site.module):
            try:
                projections = site.projections(site.module)
            except UnsupportedProjectionError as error:
                raise type(error)(f"{site.name}: {error}") from error
            for tensor in (projections.w_k, projections.w_v, projections.b_k, projections.b_v):
                if tensor is not None and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(
                        f"{site.name}: the key/value weights contain NaN or inf, so the model itself computes NaN "
                        "(and the slim decode would put it elsewhere); check how the weights were loaded or trained "
                        "before slimify"
                    )


def site_patches(sites, layer_modes, calibration, k_weights, owner: CacheOwner) -> list:
    patches = []
    for site in sites:
        module, mode = site.module, layer_modes[site.name]
        if mode == "kv":  # the model's own attention and K/V (a K/V layer of the mixed cache)
            continue
        projections = functools.partial(site.projections, module)
        buffers = {}
        k_source, key_scale = None, False
        if mode == "k":
            weights = k_weights[site.name]
            with resident_weights(module):
                live = projections()
                dtype = live.w_v.dtype
                buffers["hf_slim_w_kv"] = weights.w_kv.to(dtype)  # (e + r, e)
                buffers["hf_slim_v_offset"] = weights.v_offset.to(dtype)  # (e,)
                if weights.residual_rank:
                    buffers["hf_slim_z_proj"] = weights.z_proj.to(dtype)  # (d, r)
                k_source = KSourceStamp.of(live, tuple(buffers.values()))  # the weights and the buffers as installed
                key_scale = live.key_norm is not None  # keys normalised per token: keep s
        state = SlimAttentionState(
            mode=mode,
            layer_idx=site.layer_idx,
            num_heads=site.num_heads,
            head_dim=site.head_dim,
            projections=projections,
            calibration=calibration.get(site.name, {}),
            name=site.name,
            layout=SlimLayout(owner, mode) if site.kind == "self" else None,
            k_source=k_source,
            residual_rank=k_weights[site.name].residual_rank if mode == "k" else 0,
            rotary=site.rotary if mode == "k" else None,
            rotary_source=site.rotary_source if mode == "k" else None,
            key_scale=key_scale,
            route=site.route,
        )
        patches.append(InstancePatch(module, "hf_slim", state))
        patches.extend(BufferPatch(module, name, tensor) for name, tensor in buffers.items())
        original = type(module).forward
        if site.route is not None:  # the model's own forward, served through the extension points
            patches.append(InstancePatch(module, "config", SlimAttentionConfig(module.config)))
            forward = PatchedMethod(routed_forward, module, RoutedSignature.of(original), signature_of=original)
        else:  # a replacement forward, adapted from transformers
            cache_name = _positional_twin(site.forward, original)
            forward = PatchedMethod(_run_resident, module, site.forward, cache_name, signature_of=original)
        patches.append(InstancePatch(module, forward_attribute(module), forward))
    return patches


def _positional_twin(forward, original) -> str | None:
    """The name the original forward gives the parameter that a replacement forward calls ``cache`` (the same
    position: its contract checks the parameters around it), so a cache passed by keyword reaches it."""
    names = list(inspect.signature(forward).parameters)
    if "cache" not in names:
        return None
    originals = list(inspect.signature(original).parameters)
    index = names.index("cache")
    return originals[index] if index < len(originals) else None


def _run_resident(module: torch.nn.Module, forward, cache_name: str | None, *args, **kwargs):
    """Run a replacement ``forward`` with the module's offloaded weights kept real: it reads projection weights of
    submodules after their own (offloading) forwards returned.

    ``cache_name``: what the original forward calls its cache parameter (the replacement calls it ``cache``); a
    cache passed under that name by keyword is handed on as ``cache``. Also the one place that refuses an attention
    implementation switched after slimify (``model.set_attn_implementation("flex_attention")``) for replacement
    forwards: the slim paths only understand eager/SDPA masks.
    """
    if getattr(module, "config", None) is not None:
        check_implementation(module)
    if cache_name is not None and cache_name != "cache" and cache_name in kwargs:
        kwargs["cache"] = kwargs.pop(cache_name)
    with resident_weights(module):
        return forward(module, *args, **kwargs)
