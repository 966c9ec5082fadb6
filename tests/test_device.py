"""hf_slim creates no tensor on the default device: what a GPU run needs, checked on the CPU.

With the model on a GPU, every tensor hf_slim creates without naming a device lands on the CPU and crashes the run
(measured on an H200: ``slimify`` of every RoPE model, in the K-mode calibration). On a CPU-only machine such a tensor
is on the model's device by accident, so no ordinary test sees it. Here every supported model type (the tiny models
of ``scripts/check_release.py``, plus the RoPE configurations whose K path keeps frequency regimes) runs under the
guards of ``tests/device_guard.py``, model and inputs on the CPU:

* :class:`~device_guard.ExplicitDevices` around everything: a tensor factory called from ``hf_slim/`` or
  ``patches/`` without ``device=`` fails;
* meta as the default device around everything transformers' own code survives it in
  (:data:`device_guard.META_BROKEN` lists the rest, and the test asserts the unpatched model fails there too, so
  nothing skips it silently): a tensor created on the default device anywhere, also by a helper hf_slim calls, is a
  meta tensor and fails. The slim forward steps (:func:`_steps`: prefill, decode, a beam reorder, a static slim
  cache) run under meta where generate() cannot.

Covered per type: ``slimify`` in every mode the family takes (the K-mode calibration and its default calibration batch
included), greedy, beam and static-cache ``generate``, forward steps with a beam reorder and with a static slim cache,
``cache_report``, ``save_pretrained`` (the K-mode sidecar), ``load_slim`` and a generate of the loaded model.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from device_guard import DefaultDeviceError, ExplicitDevices, device_guard, meta_applies, meta_default_device
from helpers import assert_same_tokens

import hf_slim
from hf_slim import cache_report, load_slim, slim_record, slimify
from hf_slim._compat import returned_cache, with_cache
from hf_slim.registry import architecture_for


def _check_release():
    """``scripts/check_release.py`` as a module: its ``builders()`` make the tiny model of every supported type."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "check_release.py"
    spec = importlib.util.spec_from_file_location("check_release", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RELEASE = _check_release()
NEW_TOKENS = 4
#: RoPE configurations with their own K path beside each type's default: dynamic NTK and longrope switch frequencies
#: past the original context (32), so the cache records frequency regimes; their generate runs past it
ROPE_VARIANTS = ("llama-dynamic", "phi3-longrope")
ROPE_VARIANT_TOKENS = 26  # prompt 8 + 26 > 32 + 1

#: types without beam search (MusicGen) or without a generate() of their own config (the MusicGen decoder alone)
NO_BEAMS = ("musicgen", *RELEASE.STEPWISE)
BEAMS = dict(num_beams=2, num_return_sequences=2)


def _cases() -> dict:
    from tiny_models import tiny_rope

    cases = dict(RELEASE.builders())
    cases |= {name: RELEASE._decoder_only(name, tiny_rope) for name in ROPE_VARIANTS}
    return cases


CASES = _cases()


def _modes(model) -> list[str]:
    """``"auto"`` (the input cache, or on RoPE models the K cache) and, where ``auto`` is not already the K mode,
    ``"k"`` (the K+R calibration)."""
    return ["auto"] if architecture_for(model.config, "auto").positions == "rope" else ["auto", "k"]


def _calibration_inputs(model_type: str, model) -> dict | None:
    """MusicGen has no default calibration batch: text ids and decoder ids ``(batch * codebooks, tokens)``."""
    if model_type != "musicgen":
        return None
    generator = torch.Generator().manual_seed(0)
    codebooks = model.config.decoder.num_codebooks
    return {
        "input_ids": torch.randint(2, 90, (2, 7), generator=generator, device="cpu"),
        "decoder_input_ids": torch.randint(0, 64, (2 * codebooks, 8), generator=generator, device="cpu"),
    }


def _generate(model_type: str, model, inputs: dict, **kwargs) -> torch.Tensor:
    """Greedy token ids (``kwargs``: beams, a static cache), or for the step-wise types greedy forward steps."""
    new_tokens = ROPE_VARIANT_TOKENS if model_type in ROPE_VARIANTS else NEW_TOKENS
    if model_type in RELEASE.STEPWISE:
        return RELEASE._greedy_steps(model, inputs["input_ids"], new_tokens).sequences
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return RELEASE.generate(model, inputs, **settings, **kwargs, return_dict_in_generate=True).sequences


def _unpatched_under_meta(model_type: str, model, inputs: dict, phase: str, kwargs: dict) -> None:
    """Run a phase of the unpatched model with meta as the default device (``"slimify"``: one forward on the
    calibration batch, which is all the calibration asks of the model; ``"forward"``: :func:`_steps`)."""
    if phase == "slimify":
        batch = _calibration_inputs(model_type, model)
        batch = batch or architecture_for(model.config, "auto").load().calibration_inputs(model)
        with meta_default_device(), torch.no_grad():
            model(**batch)
    elif phase == "forward":
        with meta_default_device():
            _steps(model, inputs, static=False)
    else:
        with meta_default_device():
            _generate(model_type, model, inputs, **kwargs)


@torch.no_grad()
def _steps(model, inputs: dict, static: bool, steps: int = 2) -> None:
    """Greedy forward steps over the batch doubled (two beams per input), every row taking another's history at each
    step (``reorder_cache``, as beam search does), with the cache the model makes or (``static``) a preallocated slim
    cache: the slim forward and cache paths of generate(), run where generate() itself cannot (meta)."""
    encoder_decoder = model.config.is_encoder_decoder
    codebooks = getattr(model.config.get_text_config(decoder=True), "num_codebooks", 1)  # MusicGen: rows per input
    inputs = {key: value.repeat_interleave(2, 0) for key, value in inputs.items() if isinstance(value, torch.Tensor)}
    if encoder_decoder:  # the encoder runs again at every step: no encoder_outputs plumbing per family
        rows = next(iter(inputs.values())).shape[0] * codebooks
        start = model.generation_config.decoder_start_token_id
        start = model.config.decoder.bos_token_id if model.config.model_type == "musicgen" else start or 0
        first = torch.full((rows, 1), start, dtype=torch.long, device="cpu")
    else:
        first = inputs.pop("input_ids")
    key = "decoder_input_ids" if encoder_decoder else "input_ids"
    cache = slim_record(model).new_cache(max_cache_len=first.shape[1] + steps) if static else None
    mask = None if encoder_decoder else inputs.pop("attention_mask", None)
    positions = "position_ids" in inspect.signature(model.forward).parameters and not encoder_decoder
    output, new = None, first
    for step in range(steps + 1):
        if output is not None:
            cache = returned_cache(output)
            cache.reorder_cache(torch.arange(output.logits.shape[0] // codebooks, device="cpu").flip(0))
            new = output.logits[:, -1:].argmax(-1)  # (rows, 1)
        extra = {}
        if mask is not None:  # generate() passes a static cache's whole length, a dynamic one's tokens so far
            seen = torch.cat([mask, mask.new_ones(mask.shape[0], step)], dim=1)
            extra["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], steps)], 1) if static else seen
            if positions:  # from the mask, as generate() derives them (OPT's forward would otherwise)
                extra["position_ids"] = (seen.cumsum(-1) - 1).clamp_min(0)[:, -new.shape[1] :]
        cached = {} if cache is None else with_cache(cache)
        output = model(**inputs, **extra, **{key: new}, use_cache=True, **cached)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_no_tensor_on_the_default_device(model_type, tmp_path):
    vanilla, inputs = CASES[model_type]()
    expected = _generate(model_type, vanilla, inputs)
    variants = {"greedy": {}}
    static_refused = architecture_for(vanilla.config, "auto").load().static_cache_refusal is not None
    if model_type not in RELEASE.STEPWISE and not static_refused:  # a refused one: test_encdec_types, test_decoders
        variants["static"] = dict(cache_implementation="static")
    if model_type not in NO_BEAMS:
        variants["beams"] = BEAMS
    for phase, kwargs in {**variants, "slimify": {}, "forward": {}}.items():  # what META_BROKEN exempts fails there
        if not meta_applies(model_type, phase):
            try:
                _unpatched_under_meta(model_type, vanilla, inputs, phase, kwargs)
            except Exception:  # whatever transformers raises there
                continue
            raise AssertionError(f"the unpatched {model_type} now runs {phase} under meta: update META_BROKEN")

    slim = None
    for mode in _modes(vanilla):
        calibration_inputs = _calibration_inputs(model_type, vanilla)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
            with device_guard(meta=meta_applies(model_type, "slimify")):
                slim = slimify(copy.deepcopy(vanilla), mode, calibration_inputs=calibration_inputs)
        where = f"{model_type}, mode {mode} ({'/'.join(sorted(set(slim_record(slim).layer_modes.values())))})"
        for variant, kwargs in variants.items():
            with device_guard(meta=meta_applies(model_type, variant)):
                tokens = _generate(model_type, slim, inputs, **kwargs)
            if variant != "beams":
                assert_same_tokens(tokens, expected, f"{where}: {variant}")
        with device_guard(meta=meta_applies(model_type, "forward")):
            for static in (False,) if static_refused else (False, True):
                _steps(slim, inputs, static)
        with device_guard(meta=True):
            cache_report(slim, batch_size=2, seq_len=16, verbose=False)

    with device_guard(meta=True):  # save_pretrained: the K layers' sidecar is solved again from the weights
        slim.save_pretrained(tmp_path)
    # from_pretrained builds the model on the default device: not under meta. Built eager, reloaded eager (its default
    # is SDPA, whose Falcon rounds differently on padded rows; a composite's parts keep their own choice)
    eager = dict(attn_implementation="eager") if vanilla.config._attn_implementation == "eager" else {}
    with device_guard(meta=False):
        loaded = load_slim(tmp_path, **eager)
    assert slim_record(loaded).layer_modes == slim_record(slim).layer_modes
    with device_guard(meta=meta_applies(model_type, "greedy")):
        assert_same_tokens(_generate(model_type, loaded, inputs), expected, f"{model_type}: loaded")


def test_wide_layer_factorisation_names_its_devices():
    """The factorisation of wide layers (:class:`~hf_slim.kmode.KeyInverse`, d >= 1024: seeded random blocks, which
    the tiny models never reach) creates nothing on the default device either."""
    from hf_slim.kmode import KeyInverse, key_factorization

    vanilla, _ = CASES["llama"]()
    site = architecture_for(vanilla.config, "auto").load().attention_sites(vanilla)[0]
    with device_guard(meta=True):
        factorization = key_factorization(site.projections(site.module), method="lu")
        assert isinstance(factorization, KeyInverse)
        assert factorization.weights(16).z_proj.shape[1] == 16


#: ``token_calibration_inputs`` as it was before it named a device (what crashed ``slimify`` of every RoPE model on
#: a GPU), for :func:`test_the_guards_fail_hf_slims_old_calibration_batch`
OLD_CALIBRATION_BATCH = """
def token_calibration_inputs(model):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=generator)
    return {"input_ids": input_ids.to(model.device)}
"""


def test_the_guards_fail_hf_slims_old_calibration_batch(monkeypatch):
    """The guards fail on what a GPU run would (a test that cannot fail is no test): the old calibration batch, compiled
    as lines of hf_slim/sites.py, is refused by each guard alone, and an offence caught on the way still fails."""
    from hf_slim.patches import llama

    import hf_slim.sites

    namespace = {"torch": torch}
    exec(compile(OLD_CALIBRATION_BATCH, hf_slim.sites.__file__, "exec"), namespace)  # frames in hf_slim/sites.py
    old = namespace["token_calibration_inputs"]
    monkeypatch.setattr(llama, "PATCH", dataclasses.replace(llama.PATCH, calibration_inputs=old))
    vanilla, _ = CASES["llama"]()
    with pytest.raises(DefaultDeviceError, match=r"hf_slim/sites\.py:4 .*torch\.randint without device="):
        with device_guard(meta=False):
            slimify(copy.deepcopy(vanilla))
    with pytest.raises(NotImplementedError, match="meta"):  # meta alone: the meta ids cannot reach the CPU model
        with meta_default_device():
            slimify(copy.deepcopy(vanilla))
    with pytest.raises(DefaultDeviceError, match="caught"):
        with ExplicitDevices():
            try:
                old(vanilla)
            except DefaultDeviceError:
                pass
