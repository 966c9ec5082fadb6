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

``load_slim`` (:mod:`hf_slim.load`) reproduces the recorded per-layer modes exactly (no re-calibration: a
calibration depends on the calibration data and could choose differently) and uses the stored ``W_KV`` (no solve:
for large layers the solve is the slow part of slimify), so its outputs are identical to those of the model that was
saved.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch

from . import MODES, __version__
from .checkpoint import SlimCheckpointError, read_config
from .patching import InstancePatch, PatchedMethod
from .record import LAYER_MODES, SlimRecord, slim_record
from .registry import SUPPORTED
from .sites import solve_layer_k_mode

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
#: Numeric fields of one layer's calibration record (see ``hf_slim.api``); each is optional in a checkpoint.
_CALIBRATION_NUMBERS = ("cond_w_k", "k_error", "vanilla_error")


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
    config = read_config(directory)
    if settings is None and CONFIG_KEY not in config:
        return
    config.pop(CONFIG_KEY, None)
    if settings is not None:
        config[CONFIG_KEY] = settings
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(config_file, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _sites_by_name(model: torch.nn.Module) -> dict:
    patch = SUPPORTED[model.config.model_type].load()
    return {site.name: site for site in patch.attention_sites(model)}


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
        config = read_config(path)
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
    bad = {name: mode for name, mode in layer_modes.items() if mode not in LAYER_MODES}
    if bad:
        raise SlimCheckpointError(f"{where}: unknown layer modes {bad} (known: {LAYER_MODES})")
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
