"""Slim checkpoints: ``model.save_pretrained(dir)`` on a slim model, ``hf_slim.load_slim(dir)`` to get it back.

What a slim checkpoint is, and why it is laid out this way:

* The model weights are saved by transformers, unchanged. A plain ``AutoModel*.from_pretrained(dir)`` (no hf_slim)
  therefore loads the original model and computes the original outputs; nothing slim can leak into its weights.
* ``config.json`` gets one extra key, ``"hf_slim"`` (:data:`CONFIG_KEY`): the format version, the library version,
  the requested mode, the mode of every attention layer and the K-mode calibration numbers. transformers keeps
  unknown config keys as plain attributes, so vanilla loaders ignore it. It is written into the saved file only,
  never set on ``model.config``: a config object is often shared (a second model built from ``a.config``), and slim
  state must not leak into other models or their checkpoints.
* A save is ordered so that an interrupted or failed one (a full disk) never leaves a folder that claims what it does
  not hold: transformers writes the plain checkpoint, the key is removed from its ``config.json``, the sidecar is
  written (to a temporary name, then renamed), and only then is the key added (again through a rename).
* K-mode layers need the stacked projection ``W_KV: (e + r, e)``, the value offset and, for a K+R layer
  (``r > 0``, :mod:`hf_slim.kmode`), ``z_proj = U_r: (d, r)``; ``r`` itself is recorded per layer in
  ``config.json`` (``residual_ranks``). They are stored in float64 in a sidecar file, ``hf_slim.safetensors``
  (:data:`SIDECAR`), which transformers never reads. On load, every stored ``W_KV`` is checked against the loaded
  weights before it is used: ``[K | Z] W_KV + v_offset`` must give ``V`` for every input, i.e.
  ``||W_K W_KV[:e] + z_proj W_KV[e:] - W_V|| <= W_KV_RTOL * ||W_V||`` in float64 (``r = 0``: ``W_K W_KV = W_V``),
  so a sidecar that does not belong to these weights is an error, not a wrong model. Layers whose keys are
  normalised per token (OLMo-2) have ``diag(1/w)`` of the key norm folded into ``W_KV[:e]``: the check multiplies it
  back with the loaded ``w`` (so a changed key norm is caught too).

``load_slim`` reproduces the recorded per-layer modes exactly (no re-calibration: a calibration depends on the
calibration data and could choose differently) and uses the stored ``W_KV`` (no solve: for large layers the float64
solve is the slow part of slimify), so its outputs are identical to those of the model that was saved.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch
import transformers

from . import __version__
from .api import MODES, SlimRecord, slim_record, slimify
from .kmode import KModeWeights, solve_layer_k_mode, value_offset
from .patching import InstancePatch, PatchedMethod, resident_weights
from .registry import SUPPORTED, UnsupportedModelError, architecture_for

#: Version of the checkpoint layout written here. Readers refuse a newer format instead of guessing its meaning.
FORMAT_VERSION = 1
#: Key of the slim settings in ``config.json``.
CONFIG_KEY = "hf_slim"
#: File holding the float64 K-mode weights, next to the model weights.
SIDECAR = "hf_slim.safetensors"
#: Largest accepted relative residual ``||W_K W_KV[:e] + z_proj W_KV[e:] - W_V||_F / ||W_V||_F`` (float64) of a
#: stored ``W_KV``.
#: A float64 solve leaves ~1e-15 (LU with partial pivoting is backward stable; layers whose W_K is ill-conditioned
#: enough to matter fail the K-mode calibration long before); anything that changes the weights or W_KV by a
#: meaningful amount (fine-tuning, another model's sidecar, edits) leaves 1e-4 or more.
W_KV_RTOL = 1e-6
_LAYER_MODES = ("input", "k", "kv", "encoder")
#: Numeric fields of one layer's calibration record (see ``hf_slim.api``); each is optional in a checkpoint.
_CALIBRATION_NUMBERS = ("cond_w_k", "k_error", "vanilla_error")


class SlimCheckpointError(ValueError):
    """A slim checkpoint is missing, damaged, from an incompatible hf_slim version, or does not fit its weights."""


def slim_settings(record: SlimRecord) -> dict:
    """The JSON-serialisable slim settings of a slim model, as stored under ``config.json["hf_slim"]``."""
    has_k = any(mode == "k" for mode in record.layer_modes.values())
    return {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "requested_mode": record.requested_mode,
        "layer_modes": dict(record.layer_modes),
        "calibration": {name: dict(numbers) for name, numbers in record.calibration.items()},
        "residual_ranks": dict(record.residual_ranks),
        "sidecar": SIDECAR if has_k else None,
    }


def export_patches(model: torch.nn.Module, record: SlimRecord) -> list[InstancePatch]:
    """Patches slimify applies so that ``model.save_pretrained`` writes a slim checkpoint (undone by unslimify).

    The new ``save_pretrained`` is a :class:`~hf_slim.patching.PatchedMethod`, so a ``copy.deepcopy`` of the slim
    model saves the copy.
    """
    return [InstancePatch(model, "save_pretrained", PatchedMethod(_save_slim_pretrained, model))]


def _save_slim_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
    """``save_pretrained`` of a slim model: the weights and config as transformers saves them, plus the sidecar."""
    if kwargs.get("push_to_hub"):
        raise NotImplementedError(
            "push_to_hub from a slim model would upload before the hf_slim sidecar is written; save to a local "
            "folder with save_pretrained(dir) and upload that folder"
        )
    from safetensors import SafetensorError

    record = slim_record(self)
    tensors = k_mode_tensors(self, record)  # before writing anything: a model whose weights changed fails here
    settings = slim_settings(record)
    started = time.time()
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    is_main_process = args[0] if args else kwargs.get("is_main_process", True)
    if not is_main_process:
        return result
    directory = Path(save_directory)
    try:
        _set_config_settings(directory, None)  # plain first (a stale key may come from the config object)
        _write_sidecar(directory, tensors)
        _set_config_settings(directory, settings)
        _remove_stale_temporaries(directory, started)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error type
        raise OSError(
            f"saved the weights and a plain config to {directory}, but writing the hf_slim settings failed ({error}). "
            "The folder holds the original (unslimmed) model, loadable with from_pretrained; free space or fix the "
            "folder and call save_pretrained again for a slim checkpoint"
        ) from error
    return result


#: Temporary files safetensors (0.8: Rust ``tempfile``) writes beside its target before renaming it into place.
_SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def _remove_stale_temporaries(directory: Path, started: float) -> None:
    """Remove the temporary files that earlier saves into ``directory`` left behind when they were killed.

    Why: safetensors writes each file to a ``.tmpXXXXXX`` name and renames it when complete; a process killed mid-write
    cannot remove it, so the folder keeps a partial file of up to a model's size beside a correct checkpoint. Only
    files of that name that are older than this save (no writer of this save can still own them) and hold nothing or
    the start of a safetensors file (an 8-byte header length, then ``{``) are removed, as is hf_slim's own temporary.
    """
    for path in directory.iterdir():
        own = path.name.endswith(".hf_slim-tmp")
        if not (own or _SAFETENSORS_TEMPORARY.fullmatch(path.name)) or not path.is_file():
            continue
        try:
            if path.stat().st_mtime >= started:
                continue
            with path.open("rb") as handle:
                head = handle.read(9)
            if own or len(head) < 9 or head[8:9] == b"{":  # empty, a partial header, or a header
                path.unlink()
        except OSError:
            continue  # gone already, or not ours to remove


def _atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename it onto ``path``: readers see the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.hf_slim-tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _set_config_settings(directory: Path, settings: dict | None) -> None:
    """Set (or, with None, remove) ``config.json[CONFIG_KEY]`` in a saved folder, atomically."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if settings is None and CONFIG_KEY not in config:
        return
    config.pop(CONFIG_KEY, None)
    if settings is not None:
        config[CONFIG_KEY] = settings
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(config_file, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _sites_by_name(model: torch.nn.Module) -> dict:
    patch_module = SUPPORTED[model.config.model_type].load()
    return {site.name: site for site in patch_module.attention_sites(model)}


@torch.no_grad()
def k_mode_tensors(model: torch.nn.Module, record: SlimRecord) -> dict[str, torch.Tensor]:
    """Float64 ``W_KV`` ``(e + r, e)``, value offset ``(e,)`` and (``r > 0``) ``z_proj`` ``(d, r)`` of every
    K-mode layer, for the sidecar.

    Solved again from the live weights (the model keeps only the copies in its dtype) and checked against the
    buffers the model runs with: if the weights changed after slimify, the K layers are stale and saving fails.
    """
    tensors = {}
    sites = _sites_by_name(model)
    for name, mode in record.layer_modes.items():
        if mode != "k":
            continue
        module = sites[name].module
        weights = solve_layer_k_mode(sites[name], record.residual_ranks.get(name, 0))
        pairs = [(weights.w_kv, module.hf_slim_w_kv), (weights.v_offset, module.hf_slim_v_offset)]  # (e + r, e), (e,)
        if weights.residual_rank:
            pairs.append((weights.z_proj, module.hf_slim_z_proj))  # (d, r)
        stale = max(
            float((solved.to(device=buffer.device, dtype=buffer.dtype) - buffer).abs().max())
            / (8 * torch.finfo(buffer.dtype).eps * max(float(buffer.abs().max()), 1e-30))
            for solved, buffer in pairs
        )
        if stale > 1:
            raise RuntimeError(
                f"{name}: the weights changed after slimify, so its K-mode W_KV is stale; call "
                "hf_slim.unslimify(model) and hf_slim.slimify(model, ...) again before saving"
            )
        tensors[f"{name}.w_kv"] = weights.w_kv.cpu().contiguous()
        tensors[f"{name}.v_offset"] = weights.v_offset.cpu().contiguous()
        if weights.residual_rank:
            tensors[f"{name}.z_proj"] = weights.z_proj.cpu().contiguous()
    return tensors


def _write_sidecar(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = directory / SIDECAR
    if not tensors:
        path.unlink(missing_ok=True)  # a stale sidecar from an earlier save would contradict config.json
        return
    metadata = {"format_version": str(FORMAT_VERSION), "library_version": __version__}
    _atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def read_slim_settings(path: str | os.PathLike) -> dict:
    """Read and validate the slim settings of a checkpoint folder, without loading any weights.

    Raises
    ------
    FileNotFoundError
        the folder or its ``config.json`` does not exist.
    SlimCheckpointError
        ``config.json`` has no (or malformed) slim settings, or they come from a newer, incompatible format.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SlimCheckpointError(f"{config_file}: unreadable config.json ({error})") from error
    settings = config.get(CONFIG_KEY)
    if settings is None:
        raise SlimCheckpointError(
            f"{path} is not an hf_slim checkpoint (config.json has no {CONFIG_KEY!r} key); load it with "
            "from_pretrained and call hf_slim.slimify(model)"
        )
    _validate_settings(settings, path)
    return settings


def _validate_settings(settings, path: Path) -> None:
    where = f"{path}: config.json[{CONFIG_KEY!r}]"
    if not isinstance(settings, dict):
        raise SlimCheckpointError(f"{where} must be an object, got {type(settings).__name__}")
    version = settings.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SlimCheckpointError(f"{where} has no valid format_version (got {version!r})")
    if version > FORMAT_VERSION:
        raise SlimCheckpointError(
            f"{path} was written by hf_slim {settings.get('library_version', '?')} in slim checkpoint format "
            f"{version}; this hf_slim {__version__} reads format {FORMAT_VERSION} at most: upgrade hf_slim"
        )
    if settings.get("requested_mode") not in MODES:
        raise SlimCheckpointError(f"{where}: requested_mode {settings.get('requested_mode')!r} not in {MODES}")
    layer_modes = settings.get("layer_modes")
    if not isinstance(layer_modes, dict) or not layer_modes:
        raise SlimCheckpointError(f"{where}: layer_modes must be a non-empty object")
    bad = {name: mode for name, mode in layer_modes.items() if mode not in _LAYER_MODES}
    if bad:
        raise SlimCheckpointError(f"{where}: unknown layer modes {bad} (known: {_LAYER_MODES})")
    _validate_calibration(settings.get("calibration", {}), f"{where}['calibration']")
    ranks = settings.get("residual_ranks", {})
    if not isinstance(ranks, dict) or any(
        not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 for rank in ranks.values()
    ):
        raise SlimCheckpointError(f"{where}: residual_ranks must map K-mode layers to ranks >= 0, got {ranks!r}")
    if any(mode == "k" for mode in layer_modes.values()) and settings.get("sidecar") != SIDECAR:
        raise SlimCheckpointError(f"{where}: K-mode layers need sidecar {SIDECAR!r}, got {settings.get('sidecar')!r}")


def _validate_calibration(calibration, where: str) -> None:
    """Check the shape of the recorded K-mode calibration numbers before anything reads them.

    Why: load_slim compares each layer's ``dtype`` with the loaded model and copies the numbers into the slim record;
    a hand-edited entry of the wrong type would otherwise fail there with an AttributeError or TypeError that names
    neither the file nor the key.
    """
    fix = "re-export it with hf_slim, or load it with from_pretrained and call hf_slim.slimify(model)"
    if not isinstance(calibration, dict):
        raise SlimCheckpointError(
            f"{where} must be an object mapping layer names to their numbers, got {type(calibration).__name__}; {fix}"
        )
    for name, numbers in calibration.items():
        key = f"{where}[{name!r}]"
        if not isinstance(numbers, dict):
            raise SlimCheckpointError(
                f'{key} must be an object such as {{"cond_w_k": 12.5, "dtype": "torch.float32"}}, got '
                f"{type(numbers).__name__}; {fix}"
            )
        for field in _CALIBRATION_NUMBERS:
            value = numbers.get(field, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SlimCheckpointError(f"{key}[{field!r}] must be a number, got {value!r}; {fix}")
        dtype = numbers.get("dtype", "torch.float32")
        known = isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype)
        if not (known and dtype.startswith("torch.")):
            raise SlimCheckpointError(f"{key}['dtype'] must name a torch dtype such as 'torch.float32', got {dtype!r}")


def _model_class(path: Path):
    """The transformers class named by ``config.json["architectures"]`` (falls back to ``AutoModel``)."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if not architectures:
        return transformers.AutoModel
    model_class = getattr(transformers, architectures[0], None)
    if model_class is None:
        raise SlimCheckpointError(
            f"{path}: config.json names architecture {architectures[0]!r}, unknown to transformers"
        )
    return model_class


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
    model = _model_class(path).from_pretrained(path, **from_pretrained_kwargs)
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
        z_proj = tensors.get(f"{name}.z_proj", torch.zeros(d_model, 0, dtype=torch.float64))
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
