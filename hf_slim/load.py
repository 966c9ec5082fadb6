"""Loading slim checkpoints: :func:`load_slim` reproduces the slim model that was saved (``hf_slim.export`` writes
them and defines their format).

Why apart from ``hf_slim.export``: loading calls slimify, and slimify installs the saving patches; with loading here,
``api -> export`` is the only direction between them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .api import slimify
from .checkpoint import SlimCheckpointError, model_class, read_config
from .export import CONFIG_KEY, SIDECAR, W_KV_RTOL, read_slim_settings
from .kmode import KModeWeights, value_offset
from .patching import resident_weights
from .record import slim_record
from .registry import UnsupportedModelError, architecture_for


def load_slim(path: str | os.PathLike, **from_pretrained_kwargs) -> torch.nn.Module:
    """Load a checkpoint saved from a slim model and slimify it exactly as it was saved.

    Why: ``from_pretrained`` + ``slimify`` would calibrate again (possibly choosing other layer modes on other data)
    and solve every ``W_KV`` again; this reuses the recorded modes and the stored, verified ``W_KV``, so the outputs
    are identical to the saved slim model's.

    Parameters
    ----------
    path:
        folder written by ``save_pretrained`` of a slimified model.
    from_pretrained_kwargs:
        passed to ``from_pretrained`` (``dtype``, ``device_map``, ``offload_folder``, ``attn_implementation``, ...).

    Raises
    ------
    SlimCheckpointError
        no slim settings, a newer format, layer names that do not fit the model, a missing or damaged sidecar,
        a ``W_KV`` that does not match the weights, or a dtype other than the one the K mode was calibrated in.
    """
    path = Path(path)
    settings = read_slim_settings(path)
    model = model_class(read_config(path), path).from_pretrained(path, **from_pretrained_kwargs)
    if CONFIG_KEY in vars(model.config):
        delattr(model.config, CONFIG_KEY)  # the record is the source of truth; unslimify leaves a plain config
    try:
        architecture = architecture_for(model.config, settings["requested_mode"])
    except UnsupportedModelError as error:
        raise SlimCheckpointError(f"{path}: {error}") from error
    sites = {site.name: site for site in architecture.load().attention_sites(model)}
    layer_modes, calibration = settings["layer_modes"], settings.get("calibration", {})
    unknown, missing = sorted(set(layer_modes) - set(sites)), sorted(set(sites) - set(layer_modes))
    if unknown or missing:
        raise SlimCheckpointError(
            f"{path}: the recorded layer modes do not fit {type(model).__name__} (unknown layers: {unknown}, layers "
            f"without a mode: {missing}); the config or the weights were changed after export"
        )
    _check_calibration_dtype(model, layer_modes, calibration, path)
    ranks = settings.get("residual_ranks", {})  # absent in checkpoints from before K+R: plain K layers (r = 0)
    not_k = sorted(name for name in ranks if layer_modes[name] != "k") if set(ranks) <= set(layer_modes) else ranks
    if not_k:
        raise SlimCheckpointError(
            f"{path}: config.json[{CONFIG_KEY!r}]: residual_ranks must map K-mode layers to ranks >= 0, but names "
            f"{sorted(not_k)}"
        )
    k_weights = _verified_k_weights(sites, layer_modes, ranks, calibration, path)
    try:
        slimify(
            model,
            settings["requested_mode"],
            layer_modes=layer_modes,
            residual_ranks={name: w.residual_rank for name, w in k_weights.items()},
            _k_weights=k_weights,
        )
    except ValueError as error:
        raise SlimCheckpointError(f"{path}: {error}") from error
    record = slim_record(model)
    for name, numbers in calibration.items():
        if name in sites:
            record.calibration[name] = dict(numbers)
            sites[name].module.hf_slim.calibration.update(numbers)
    return model


def _check_calibration_dtype(model, layer_modes: dict, calibration: dict, path: Path) -> None:
    """K mode is only exact in the dtype it was calibrated in (fp16/bf16 can turn it into garbage)."""
    dtype = str(next(model.parameters()).dtype)
    for name, mode in layer_modes.items():
        calibrated = calibration.get(name, {}).get("dtype")
        if mode == "k" and calibrated is not None and calibrated != dtype:
            raise SlimCheckpointError(
                f"{path}: {name} uses the K cache, calibrated in {calibrated}, but the model is loaded in {dtype}; "
                f"the K cache is only known to be exact in the calibrated dtype. Load with dtype={calibrated}, or load "
                "with from_pretrained and call hf_slim.slimify(model) to calibrate again"
            )


@torch.no_grad()
def _verified_k_weights(
    sites: dict, layer_modes: dict, ranks: dict, calibration: dict, path: Path
) -> dict[str, KModeWeights]:
    """Read the sidecar and check every ``W_KV``, ``z_proj`` and offset against the loaded weights (float64)."""
    k_names = [name for name, mode in layer_modes.items() if mode == "k"]
    if not k_names:
        return {}
    sidecar = path / SIDECAR
    if not sidecar.is_file():
        raise SlimCheckpointError(
            f"{path}: {len(k_names)} layers use the K cache but {SIDECAR} is missing: the folder was probably re-saved "
            "by a model that is not slim (from_pretrained keeps the hf_slim key of config.json as a config attribute, "
            "and save_pretrained writes it back); load it with from_pretrained and call hf_slim.slimify(model) instead"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(sidecar))
    except (SafetensorError, OSError, ValueError) as error:
        raise SlimCheckpointError(f"{sidecar}: unreadable ({error})") from error
    parts = {name: ("w_kv", "v_offset", "z_proj") if ranks.get(name, 0) else ("w_kv", "v_offset") for name in k_names}
    expected = {f"{name}.{part}" for name in k_names for part in parts[name]}
    unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unknown or missing:
        raise SlimCheckpointError(
            f"{sidecar}: tensors do not match the K-mode layers and their residual ranks (unknown: {unknown}, "
            f"missing: {missing})"
        )
    weights = {}
    for name in k_names:
        site, rank = sites[name], ranks.get(name, 0)
        w_kv, v_offset = tensors[f"{name}.w_kv"], tensors[f"{name}.v_offset"]
        with resident_weights(site.module):
            projections = site.projections(site.module)
            if projections.w_k.is_meta:
                raise SlimCheckpointError(f"{path}: {name} weights are on the meta device; cannot check W_KV")
            device = projections.w_k.device
            w_k, w_v = projections.w_k.double().cpu(), projections.w_v.double().cpu()  # (d, e)
            b_k = None if projections.b_k is None else projections.b_k.double().cpu()
            b_v = None if projections.b_v is None else projections.b_v.double().cpu()
            norm = projections.key_norm  # OLMo-2: W_KV's key block carries diag(1/w) of the key norm
            key_weight = None if norm is None else norm.weight.detach().double().cpu()  # (e,)
        d_model, width = w_v.shape
        z_proj = tensors.get(f"{name}.z_proj", torch.zeros(d_model, 0, dtype=torch.float64, device="cpu"))
        for part, tensor, shape in (
            ("w_kv", w_kv, (w_k.shape[1] + rank, width)),
            ("v_offset", v_offset, (width,)),
            ("z_proj", z_proj, (d_model, rank)),
        ):
            if tensor.dtype != torch.float64 or tuple(tensor.shape) != shape:
                raise SlimCheckpointError(
                    f"{sidecar}: {name}.{part} is {tensor.dtype} {tuple(tensor.shape)}, expected torch.float64 {shape} "
                    f"(residual rank {rank})"
                )
        key_part, residual_part = w_kv[: w_k.shape[1]], w_kv[w_k.shape[1] :]  # (e, e), (r, e)
        if key_weight is not None:
            key_part = key_weight[:, None] * key_part  # undo the folded diag(1/w): the map from the pre-norm keys
        rebuilt = w_k @ key_part + z_proj @ residual_part  # the W_V that [K | Z] W_KV implies: (d, e)
        residual = float((rebuilt - w_v).norm() / w_v.norm().clamp_min(1e-300))
        offset = value_offset(key_part, b_k, b_v)  # (e,)
        scale = max(float(offset.norm()), float(w_v.norm()) / math.sqrt(w_v.shape[0]), 1e-300)
        offset_residual = float((v_offset - offset).norm()) / scale
        if not (residual <= W_KV_RTOL and offset_residual <= W_KV_RTOL):
            raise SlimCheckpointError(
                f"{sidecar}: {name} W_KV does not match the weights (||W_K W_KV[:e] + z_proj W_KV[e:] - W_V|| / "
                f"||W_V|| = {residual:.2e}, offset {offset_residual:.2e}, tolerance {W_KV_RTOL:.0e}); the weights or "
                "the sidecar were changed after export"
            )
        numbers = calibration.get(name, {})
        cond = float(numbers.get("cond_w_k", math.nan))
        # contiguous, like the W_KV slimify computes (torch.cat), so the buffers have slimify's layout and the matmuls
        # reading them round exactly as in the model that was saved (BLAS kernels differ per layout)
        weights[name] = KModeWeights(
            w_kv=w_kv.contiguous().to(device),
            v_offset=v_offset.to(device),
            z_proj=z_proj.to(device),
            cond=cond,
            kept_cond=float(numbers.get("kept_cond", cond)),
        )
    return weights
