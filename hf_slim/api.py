"""Public entry points: ``slimify``, ``unslimify``, ``is_slim``, ``slimified``.

slimify validates everything and computes everything first (architecture, attention implementation, K-mode weights
and calibration), then applies a list of reversible instance patches all at once; a failure part-way reverts the
ones already applied, so the model is either fully slim or exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache

from ._compat import cache_entry, cache_parameter, check_contracts, find_cache, generation_cache_names
from .adapters import UnsupportedProjectionError
from .attention import SlimAttentionState
from .cache import CacheOwner, EncoderOutputCache, SlimCache, SlimLayout, adopt_cross_part, self_attention_part
from .export import export_patches
from .generation import CONTRACTS as GENERATION_CONTRACTS
from .interface import (
    RoutedSignature,
    SlimAttentionConfig,
    check_implementation,
    check_model_implementation,
    routed_forward,
)
from .kmode import (
    KModeWeights,
    KSourceStamp,
    RotaryRoundTrip,
    SingularKeyProjection,
    choose_residual_rank,
)
from .memory import slim_summary
from .patching import (
    BufferPatch,
    InstancePatch,
    PatchedMethod,
    apply_all,
    forward_attribute,
    resident_weights,
    revert_all,
)
from .record import MODES, SlimRecord, is_slim, slim_part, slim_record, unwrapped
from .registry import UnsupportedModelError, architecture_for
from .rope import rotary_state_kept
from .sites import AttentionSite, solve_layer_k_mode

logger = logging.getLogger(__name__)


class SlimFallbackWarning(UserWarning):
    """Some layers asked for the K cache keep the input cache (RoPE models: the model's own K and V) because no K or
    K+R cache (``r <= d/2``) is exact there."""


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
    patch_module = architecture.load()
    check_contracts((*GENERATION_CONTRACTS, *getattr(patch_module, "CONTRACTS", ())), model)  # transformers drift
    sites: list[AttentionSite] = patch_module.attention_sites(model)
    if not sites:
        raise UnsupportedModelError(f"found no attention layers to patch in {type(model).__name__}")
    resolved = ("k" if architecture.positions == "rope" else "input") if mode == "auto" else mode
    _check_projections(sites)  # layer kinds the slim path cannot reproduce, non-finite weights: refuse, untouched

    if residual_ranks is not None and layer_modes is None:
        raise ValueError("residual_ranks forces the rank of forced K layers: pass layer_modes too")
    if layer_modes is not None:
        layer_modes, calibration, k_weights = _forced_layer_modes(
            sites, architecture, layer_modes, residual_ranks or {}, _k_weights
        )
    else:
        layer_modes, calibration, k_weights = _choose_layer_modes(
            model, patch_module, sites, resolved, calibration_inputs, fallback_mode(architecture)
        )
    self_sites = [site for site in sites if site.kind == "self"]
    record = SlimRecord(
        requested_mode=mode,
        layer_modes=layer_modes,
        calibration=calibration,
        num_cache_layers=1 + max((site.layer_idx for site in self_sites), default=-1),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        static_cache_refusal=getattr(patch_module, "STATIC_CACHE_REFUSAL", None),
        residual_ranks={name: weights.residual_rank for name, weights in k_weights.items()},
        kv_layers=tuple(site.layer_idx for site in self_sites if layer_modes[site.name] == "kv"),
        has_derived_state=any(mode == "k" for mode in layer_modes.values()),
    )
    # the record first: applied first and reverted last, so an interrupted unslimify leaves a model that is_slim()
    # and that a second unslimify finishes (see revert_all)
    patches = [InstancePatch(model, "_hf_slim_record", record)]
    patches += _site_patches(sites, layer_modes, calibration, k_weights, record.owner)
    for owner in patch_module.cache_owners(model):
        patches.append(InstancePatch(owner, forward_attribute(owner), _forward_with_slim_cache(owner, record)))
    if hasattr(model, "_prepare_cache_for_generation"):
        patches.append(InstancePatch(model, "_prepare_cache_for_generation", _prepare_slim_cache(model, record)))
    patches.extend(getattr(patch_module, "extra_patches", lambda model: [])(model))
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


def _check_projections(sites: list[AttentionSite]) -> None:
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


def fallback_mode(architecture) -> str:
    """What a self-attention layer keeps where the K cache is refused: the exact input cache, or for RoPE models
    (where the input cache cannot apply) the model's own keys and values (``"kv"``: a mixed cache)."""
    return "kv" if architecture.positions == "rope" else "input"


def _choose_layer_modes(model, patch_module, sites, resolved, calibration_inputs, fallback):
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
        calibration_inputs = patch_module.default_calibration_inputs(model)
    _check_calibration_inputs(calibration_inputs)
    activations = _collect_attention_inputs(model, self_sites, calibration_inputs)
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


def _forced_layer_modes(sites, architecture, layer_modes, residual_ranks, k_weights):
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
        if architecture.positions == "rope":
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


def _check_calibration_inputs(calibration_inputs) -> None:
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
def _collect_attention_inputs(model, sites, calibration_inputs) -> dict[str, torch.Tensor]:
    """Run the unmodified model once and keep each site's attention input, ``(tokens, d_model)``."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:

        def hook(module, args, kwargs, name=site.name):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
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


def _site_patches(sites, layer_modes, calibration, k_weights, owner: CacheOwner) -> list:
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


def _progress(items: list, desc: str):
    """A progress bar over ``items`` on stderr, none when stderr is not a terminal (tqdm's ``disable=None``); it is
    transformers' tqdm, so ``transformers.utils.logging.disable_progress_bar()`` silences it."""
    from transformers.utils.logging import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False, disable=None)


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


def _use_cache_requested(owner: torch.nn.Module, arguments: dict) -> bool:
    use_cache = arguments.get("use_cache")
    if use_cache is None:
        use_cache = getattr(owner.config, "use_cache", False)
    return bool(use_cache) and not (getattr(owner, "gradient_checkpointing", False) and owner.training)


def _forward_with_slim_cache(owner: torch.nn.Module, record: SlimRecord) -> PatchedMethod:
    """Wrap the forward that would create a DynamicCache so that it starts from a slim cache instead.

    The forward's parameter names, and which one takes the cache (:func:`~hf_slim._compat.cache_parameter`: read
    from the installed code, not a name hf_slim knows), are read once here (this wrapper runs at every decode step).
    """
    forward = type(owner).forward
    names = tuple(inspect.signature(forward).parameters)[1:]  # after self
    return PatchedMethod(
        _slim_cache_owner_forward, owner, record, names, cache_parameter(forward), signature_of=forward
    )


def _slim_cache_owner_forward(
    owner: torch.nn.Module, record: SlimRecord, names: tuple[str, ...], cache_name: str, *args, **kwargs
):
    original = type(owner).forward  # what forward_attribute(owner) held: the class forward (accelerate's hook wraps us)
    cache = find_cache(args, kwargs)
    if cache is None:
        arguments = {**dict(zip(names, args, strict=False)), **kwargs}
        if arguments.get(cache_name) is not None or not _use_cache_requested(owner, arguments):
            return original(owner, *args, **kwargs)
        cache = record.new_cache()
        _check_new_cache(record, cache)
        position = names.index(cache_name)
        if len(args) > position:
            args = (*args[:position], cache, *args[position + 1 :])
        else:
            kwargs[cache_name] = cache
        return _ending_step(cache, original(owner, *args, **kwargs))
    if isinstance(cache, SlimCache):
        cache.adopt_layout(record.num_cache_layers, record.kv_layers)  # a user's SlimCache() for a mixed model
    if record.is_encoder_decoder and type(cache) is SlimCache:
        # a bare SlimCache for an encoder-decoder model: pair it with the cross-attention part, as generate()
        # does (Whisper's decoder would otherwise replace it by a K/V EncoderDecoderCache)
        paired = EncoderDecoderCache(cache, EncoderOutputCache())
        args = tuple(paired if value is cache else value for value in args)
        kwargs = {key: paired if value is cache else value for key, value in kwargs.items()}
        cache = paired
    if isinstance(cache, EncoderDecoderCache):
        adopt_cross_part(cache)
    _check_new_cache(record, cache)
    return _ending_step(cache, original(owner, *args, **kwargs))


def _check_new_cache(record: SlimRecord, cache) -> None:
    """Before the first forward on a slim cache that no check has seen (a new one, or a user's), check the K-mode
    layers' derived buffers against the live weights (:func:`check_derived_state`). A plain attribute test at every
    other step, so compiled decode steps of a checked cache stay one graph."""
    inner = self_attention_part(cache)
    if record.has_derived_state and isinstance(inner, SlimCache) and not getattr(inner, "derived_state_checked", False):
        check_derived_state(record, inner)


@torch.compiler.disable
def check_derived_state(record: SlimRecord, cache: SlimCache | None = None) -> None:
    """Check every K-mode layer's weight-derived buffers (``W_KV``, value offset, ``z_proj``) against the live weights
    and dtype, eagerly (outside any compiled region), and mark ``cache`` as checked.

    One read of W_K, W_V and the buffers per K-mode layer (float64 sketches, :class:`~hf_slim.kmode.KSourceStamp`):
    weights that changed in any way (``param.data`` edits and compiled models included) raise
    :class:`~hf_slim.kmode.StaleKModeWeights`; buffers that lost their values while the weights did not (``to_empty``
    after a move through the meta device) are solved again. Runs before every ``generate()`` and at the first forward
    on every new slim cache (``scripts/bench_derived_check.py`` measures it against a decode step).
    """
    for module, state in record.k_layers():
        with resident_weights(module):
            state.verify_derived(module)
    if cache is not None:
        cache.derived_state_checked = True


def _ending_step(cache, output):
    """Drop the slim cache's per-step working state (the rotary table of the step) once the forward is done: it is
    not part of the cache and must not hold memory between steps."""
    inner = self_attention_part(cache)
    if isinstance(inner, SlimCache):
        inner.end_step()
    return output


def _prepare_slim_cache(model: torch.nn.Module, record: SlimRecord) -> PatchedMethod:
    """generate() hook: let transformers prepare its cache, then swap its fresh DynamicCache for a slim one."""
    return PatchedMethod(_prepare_slim_cache_for_generation, model, record)


def _prepare_slim_cache_for_generation(self, record: SlimRecord, generation_config, model_kwargs, *args, **kwargs):
    original = type(self)._prepare_cache_for_generation
    _, user_cache = cache_entry(model_kwargs)  # by type: whatever name generate() keeps it under
    if user_cache is None and generation_config.cache_implementation not in (None, "dynamic", "static"):
        raise NotImplementedError(
            f"hf_slim does not support cache_implementation={generation_config.cache_implementation!r}; use "
            "the default (dynamic) or 'static', which hf_slim replaces by the matching slim cache"
        )
    if generation_config.cache_implementation == "static" and record.static_cache_refusal:
        raise NotImplementedError(f"cache_implementation='static': {record.static_cache_refusal}")
    if record.has_derived_state:
        check_derived_state(record)  # every generate(): the K-mode buffers still fit the weights (one read of each)
    original(self, generation_config, model_kwargs, *args, **kwargs)
    key, cache = cache_entry(model_kwargs)
    if cache is None:
        return
    if user_cache is not None:
        inner = self_attention_part(cache)
        if not isinstance(inner, SlimCache):
            raise TypeError(
                f"this model is slimified but generate() got a {type(cache).__name__} as its cache; pass no cache "
                "(generate builds a slim one), an hf_slim.SlimCache, or unslimify the model first"
            )
        inner.derived_state_checked = True
        return
    self_cache = self_attention_part(cache)
    if type(self_cache) is DynamicCache:
        slim = record.new_cache()
    elif type(self_cache) is StaticCache:
        slim = record.new_cache(max_cache_len=self_cache.get_max_length())
    else:
        raise NotImplementedError(f"hf_slim cannot replace a {type(cache).__name__} prepared by generate()")
    if generation_config.is_assistant:
        slim.activate_past_recording()
    self_attention_part(slim).derived_state_checked = True  # checked above, before this generate()
    model_kwargs[key] = slim
