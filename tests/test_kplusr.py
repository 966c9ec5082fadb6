"""K+R cache (hf_slim.kmode): keys plus the r input directions W_K barely carries.

* the algebra: ``[K | Z] W_KV + v_offset == V`` in float64 for every r, and not without Z;
* the rank choice: the smallest r on the grid that calibrates exact, in the model's dtype;
* equivalence with the unpatched model on random GPT-2 and Whisper configs with r forced to 0, d/2 and d (logits
  over prefill and 24 decode steps, sdpa and eager, left padding, greedy, beams with several returned sequences,
  seeded sampling, chunked prefill, static cache), and a test that fails when Z is dropped;
* export/load_slim of K+R layers, deep copies and pickles.

Real Whisper tiny.en (every layer K+R in fp32/fp16/bf16, identical transcripts) is tested in test_whisper.py.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import warnings

import pytest
import torch
from helpers import (
    LOGITS_RTOL,
    assert_as_accurate_as_unpatched,
    assert_close_relative,
    assert_same_tokens,
    cache_of,
    relative_difference,
    with_cache,
    without_derived_state_checks,
)
from safetensors.torch import load_file, save_file
from test_whisper import random_features, tiny_whisper
from tiny_models import tiny_gpt2, tiny_rope, tiny_tokenizer
from transformers import DynamicCache, EncoderDecoderCache

from hf_slim import (
    SlimCache,
    SlimCheckpointError,
    SlimFallbackWarning,
    cache_nbytes,
    cache_report,
    kmode,
    load_slim,
    slim_record,
    slimify,
)
from hf_slim.absorbed import absorbed_attention
from hf_slim.export import CONFIG_KEY, SIDECAR
from hf_slim.kmode import (
    KeyInverse,
    KeySVD,
    KModeWeights,
    SingularKeyProjection,
    ValueErrorProbe,
    choose_residual_rank,
    k_mode_is_exact,
    key_factorization,
    key_svd,
    residual_rank_grid,
    solve_k_mode,
)
from hf_slim.projections import Projections


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP threads waiting for each other cost 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


# ---------------------------------------------------------------------------------------------------------- the math


def ill_conditioned(d: int = 64, cond: float = 1e4, seed: int = 0, tail: int = 8) -> Projections:
    """Float64 projections whose W_K has a trained model's spectrum: a bulk from 1 down to 0.3 and a tail of ``tail``
    singular values from 1e-2 down to 1/cond; random W_V and random biases on both."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    bulk = torch.logspace(0, -0.5, d - tail, dtype=torch.float64)
    singular = torch.cat([bulk, torch.logspace(-2, -torch.log10(torch.tensor(cond)).item(), tail, dtype=torch.float64)])
    return Projections(
        w_k=left @ torch.diag(singular) @ right.T,
        w_v=torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5,
        b_k=torch.randn(d, generator=generator, dtype=torch.float64),
        b_v=torch.randn(d, generator=generator, dtype=torch.float64),
    )


def rebuilt_values(x: torch.Tensor, projections: Projections, weights: KModeWeights, with_z: bool = True):
    """``[K | Z] W_KV + v_offset`` in float64 from inputs ``x: (n, d)``."""
    keys = x @ projections.w_k + projections.b_k  # (n, e)
    e = keys.shape[1]
    values = keys @ weights.w_kv[:e] + weights.v_offset  # (n, e)
    if with_z:
        values = values + (x @ weights.z_proj) @ weights.w_kv[e:]  # Z = X U_r: (n, r)
    return values


@pytest.mark.parametrize("rank", [0, 8, 32, 64])
def test_keys_plus_residual_rebuild_values_exactly_in_float64(rank):
    projections = ill_conditioned()
    weights = solve_k_mode(projections, rank)
    assert weights.w_kv.shape == (64 + rank, 64) and weights.z_proj.shape == (64, rank)
    assert weights.residual_rank == rank
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = x @ projections.w_v + projections.b_v
    assert relative(rebuilt_values(x, projections, weights), expected) < 1e-10
    if rank:  # the Z term carries real information: dropping it is wrong by far more than any rounding
        assert relative(rebuilt_values(x, projections, weights, with_z=False), expected) > 1e-2


def test_residual_directions_are_the_smallest_singular_ones():
    projections = ill_conditioned(cond=1e6)
    svd = key_svd(projections)
    assert torch.all(svd.s[:-1] >= svd.s[1:])
    conds = [svd.weights(rank).kept_cond for rank in (0, 16, 32, 48)]
    assert conds[0] == pytest.approx(1e6, rel=1e-6) and all(a > b for a, b in zip(conds, conds[1:], strict=False))
    z_proj = svd.weights(16).z_proj  # (d, r): orthonormal columns
    torch.testing.assert_close(z_proj.T @ z_proj, torch.eye(16, dtype=torch.float64))
    assert torch.equal(key_svd(projections).weights(16).z_proj, z_proj), "solving again gives the same sidecar"


def test_rank_grid():
    assert residual_rank_grid(384) == [0, *range(16, 193, 16)]
    assert residual_rank_grid(4096) == [0, *range(128, 2049, 128)]
    assert residual_rank_grid(64) == [0, 16, 32]
    assert residual_rank_grid(512)[-1] == 256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_chosen_rank_is_the_smallest_exact_one_in_half_precision(dtype):
    """cond(W_K) = 1e4: the plain K cache is far off in 16 bits; K+R with the chosen r is as exact as the model."""
    projections = ill_conditioned(cond=1e4)
    layer = Projections(*(t.to(dtype) for t in (projections.w_k, projections.w_v, projections.b_k, projections.b_v)))
    inputs = torch.randn(256, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    choice = choose_residual_rank(layer, inputs, dtype)
    numbers = choice.numbers
    assert choice.weights is not None and numbers["residual_rank"] == 16, numbers  # the first rank covering the tail
    assert numbers["k_error"] <= 4 * numbers["vanilla_error"]
    assert numbers["cache_ratio"] == pytest.approx(128 / (64 + numbers["residual_rank"]))
    probe = ValueErrorProbe(inputs, layer, dtype)
    grid = residual_rank_grid(64)
    smaller = grid[: grid.index(numbers["residual_rank"])]
    for rank in smaller:  # every smaller rank on the grid fails the rule
        assert not k_mode_is_exact(probe.k_mode_error(solve_k_mode(layer, rank)), probe.vanilla_error), rank
    assert probe.k_mode_error(solve_k_mode(layer, 0)) > 50 * probe.vanilla_error


@torch.no_grad()
def geometric_key_spectrum(model, cond: float):
    """``model`` (a tiny RoPE LM) with every W_K's singular values replaced by ``s_1 * logspace(0, -log10(cond), d)``
    (same singular vectors): a chosen condition number, so a chosen fp32 K-cache error."""
    for layer in model.model.layers:
        weight = layer.self_attn.k_proj.weight  # (e, d)
        u, s, vh = torch.linalg.svd(weight.double())
        spectrum = s[0] * torch.logspace(0, -math.log10(cond), s.shape[0], dtype=torch.float64)
        weight.copy_(u @ torch.diag(spectrum) @ vh)
    return model


def worst_decode_difference(vanilla, slim, steps: int = 40) -> float:
    """Worst relative logit difference over a left-padded prefill and ``steps`` random single-token steps."""
    batch = left_padded_gpt2_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    caches = DynamicCache(), SlimCache()
    generator, worst = torch.Generator().manual_seed(1), 0.0
    with torch.no_grad():
        for _ in range(steps + 1):
            expected = vanilla(input_ids=ids, attention_mask=mask, **with_cache(caches[0])).logits
            actual = slim(input_ids=ids, attention_mask=mask, **with_cache(caches[1])).logits
            worst = max(worst, relative_difference(actual, expected))
            ids = torch.randint(0, vanilla.config.vocab_size, (ids.shape[0], 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return worst


def test_fp32_layer_between_the_old_and_the_new_floor_is_not_taken_as_plain_k(monkeypatch):
    """cond(W_K) = 500 on a tiny Qwen2 (RoPE): the plain fp32 K cache rebuilds V to ~8e-6, under the old floor
    (1e-5, the logits tolerance itself), and its logits drift ~3e-5, 3x the tolerance. The calibration must give
    those layers r > 0 (or their own K/V), and the logits of what it chose must stay within 1e-5."""
    vanilla = geometric_key_spectrum(tiny_rope("qwen2", seed=0), 500.0)
    names = [f"Qwen2Attention[self {i}]" for i in range(2)]
    plain = slimify(copy.deepcopy(vanilla), layer_modes=dict.fromkeys(names, "k"))  # forced r = 0, no calibration
    with monkeypatch.context() as patch, warnings.catch_warnings():  # the calibration's numbers for r = 0 alone
        patch.setattr(kmode.factorisation, "max_residual_rank", lambda d_model: 0)
        warnings.simplefilter("ignore", SlimFallbackWarning)  # r = 0 refused: the layers fall back (as they should)
        plain_numbers = slim_record(slimify(copy.deepcopy(vanilla))).calibration
    assert all(1e-6 < plain_numbers[name]["k_error"] < 1e-5 for name in names), plain_numbers
    drift = worst_decode_difference(vanilla, plain)
    assert drift > LOGITS_RTOL[torch.float32], f"premise: plain K drifts {drift:.2e}, within the tolerance"

    slim = slimify(copy.deepcopy(vanilla))
    record = slim_record(slim)
    for name in names:
        assert record.layer_modes[name] == "kv" or record.residual_ranks[name] > 0, record.calibration
        if record.layer_modes[name] == "k":
            assert record.calibration[name]["k_error"] <= kmode.K_MODE_ABSOLUTE_FLOOR, record.calibration
    difference = worst_decode_difference(vanilla, slim)
    assert difference <= LOGITS_RTOL[torch.float32], f"calibrated model drifts {difference:.2e} ({record.calibration})"


# --------------------------------------------------------------------- wide layers: LU and subspace factorisation


def lu_factorization(projections: Projections) -> KeyInverse:
    factorization = key_factorization(projections, "lu")
    assert isinstance(factorization, KeyInverse)
    return factorization


@pytest.mark.parametrize("rank", [0, 8, 16, 17, 40, 64])
def test_lu_factorisation_rebuilds_values_exactly_in_float64(rank):
    """Exact for any basis of the residual directions, converged or not (the block size is d / 32 rounded up to 16,
    so 17 and 40 are ranks between blocks and 64 is the whole space)."""
    projections = ill_conditioned(cond=1e4)
    weights = lu_factorization(projections).weights(rank)
    assert weights.w_kv.shape == (64 + rank, 64) and weights.z_proj.shape == (64, rank)
    torch.testing.assert_close(weights.z_proj.T @ weights.z_proj, torch.eye(rank, dtype=torch.float64))
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = x @ projections.w_v + projections.b_v
    assert relative(rebuilt_values(x, projections, weights), expected) < 1e-10
    if rank:
        assert relative(rebuilt_values(x, projections, weights, with_z=False), expected) > 1e-2


def test_lu_weights_are_the_same_whatever_was_solved_before():
    """export solves each K layer again from the weights and compares with the buffers: rank r must give the same
    bits whether the calibration tried other ranks first or not."""
    projections = ill_conditioned(cond=1e4)
    calibrating = lu_factorization(projections)
    after_others = [calibrating.weights(rank) for rank in (0, 16, 48, 16)][-1]
    fresh = lu_factorization(projections).weights(16)
    for name in ("w_kv", "v_offset", "z_proj"):
        assert torch.equal(getattr(after_others, name), getattr(fresh, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cond", [3e2, 1e4])
def test_lu_errors_are_the_svd_errors(dtype, cond):
    """The subspace only approximates the smallest singular directions, which costs conditioning at second order: the
    measured errors are the SVD's, to 2% in fp32 and on average. In bf16 single ranks move by up to ~5% either way
    on this small layer: W_KV differs from the SVD's by ~1e-3 (the directions at the split), below bf16's rounding
    step, and which entries round the other way is noise that a 256 x 256 layer does not average out (a width-4096
    one does, to ~0.5%: scripts/bench_slimify.py --compare-svd)."""
    projections = ill_conditioned(d=256, cond=cond, tail=48)
    layer = Projections(*(t.to(dtype) for t in (projections.w_k, projections.w_v, projections.b_k, projections.b_v)))
    inputs = torch.randn(128, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    probe = ValueErrorProbe(inputs, layer, dtype)
    svd, lu = key_factorization(layer, "svd"), lu_factorization(layer)
    ratios = [
        probe.k_mode_error(lu.weights(rank)) / probe.k_mode_error(svd.weights(rank))
        for rank in residual_rank_grid(256)[:8]
    ]
    spread = 0.02 if dtype == torch.float32 else 0.07
    assert all(abs(ratio - 1) < spread for ratio in ratios), ratios
    assert abs(sum(ratios) / len(ratios) - 1) < 0.02, ratios
    assert lu.cond == pytest.approx(svd.cond, rel=0.02)
    assert lu.weights(64).kept_cond == pytest.approx(svd.weights(64).kept_cond, rel=0.05)


def test_factorisation_is_the_svd_below_the_lu_width_and_for_ill_conditioned_layers(monkeypatch):
    projections = ill_conditioned(cond=1e4)
    assert isinstance(key_factorization(projections), KeySVD), "d = 64 < LU_MIN_WIDTH: the exact SVD"
    monkeypatch.setattr(kmode.factorisation, "LU_MIN_WIDTH", 64)
    assert isinstance(key_factorization(projections), KeyInverse)
    assert isinstance(key_factorization(ill_conditioned(cond=1e9)), KeySVD), "cond > LU_MAX_COND: the SVD"
    u, s, vh = torch.linalg.svd(projections.w_k)
    s[-8:] = 0
    singular = Projections(u @ torch.diag(s) @ vh, projections.w_v, projections.b_k, projections.b_v)
    assert isinstance(key_factorization(singular), KeySVD)
    with pytest.raises(ValueError, match="method must be"):
        key_factorization(projections, "qr")


LU_MODELS = {
    "gpt2": lambda: tiny_gpt2(),
    "whisper": lambda: ill_conditioned_whisper(),
    "llama": lambda: tiny_rope("llama"),
    "olmo2": lambda: tiny_rope("olmo2"),  # keys normalised per token: diag(1/w) in W_KV, the key scale cached
}
LU_CASES = [(name, dtype) for name in LU_MODELS for dtype in (torch.float32, torch.bfloat16)]


def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM fed ``ids: (batch, steps)`` one token at a time over its own cache, float64."""
    cache, steps = None, []
    with torch.no_grad():
        for position in range(ids.shape[1]):
            out = model(input_ids=ids[:, position : position + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits.double())
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(
    ("name", "dtype"), [case for case in LU_CASES if case != ("whisper", torch.bfloat16)], ids=str
)  # bf16 Whisper: _generate's random features are fp32
def test_slimify_with_the_lu_factorisation_on_every_layer(name, dtype, monkeypatch, tmp_path):
    """Every layer on the wide-layer path (LU_MIN_WIDTH = 0): the same or a smaller r than with the SVD; fp32: the
    unpatched model's greedy tokens; bf16: logits as close to the fp32 model's as the unpatched bf16 model's; and
    export's check (it solves again and compares with the buffers) passes, load_slim reproduces the buffers."""
    reference = LU_MODELS[name]()
    vanilla = copy.deepcopy(reference).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlimFallbackWarning)
        svd_record = slim_record(slimify(copy.deepcopy(vanilla), "k"))
        monkeypatch.setattr(kmode.factorisation, "LU_MIN_WIDTH", 0)
        slim = slimify(copy.deepcopy(vanilla), "k")
    record = slim_record(slim)
    for layer, mode in svd_record.layer_modes.items():
        if mode == "k":  # a layer the SVD puts on K+R keeps it, at the same or a smaller rank
            assert record.layer_modes[layer] == "k", (layer, record.calibration[layer])
            assert record.residual_ranks[layer] <= svd_record.residual_ranks[layer], (layer, record.calibration)
    if dtype == torch.float32:
        arch = "whisper" if name == "whisper" else "gpt2"
        expected, actual = _generate(arch, vanilla), _generate(arch, slim)
        assert_same_tokens(actual.sequences, expected.sequences, f"{name} on the LU factorisation")
    else:
        ids = torch.randint(0, reference.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(5))
        logits = {"reference": decode_logits(reference, ids), "vanilla": decode_logits(vanilla, ids)}
        assert_as_accurate_as_unpatched({**logits, "slim": decode_logits(slim, ids)}, f"{name} bf16, LU")
    slim.save_pretrained(tmp_path)
    loaded = load_slim(tmp_path)
    for (layer, module), original in zip(loaded.named_modules(), slim.modules(), strict=True):
        for buffer in ("hf_slim_w_kv", "hf_slim_v_offset", "hf_slim_z_proj"):
            if buffer in original._buffers:
                assert torch.equal(module.get_buffer(buffer), original.get_buffer(buffer)), f"{layer}.{buffer}"


# ------------------------------------------------------------------------------------------- reference attention


def test_head_slice_scores_read_keys_only_and_weights_sum_the_residual():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 3, 16, generator=generator)  # (b, h, t, dk), e = 64
    keys, residual = torch.randn(2, 9, 64, generator=generator), torch.randn(2, 9, 24, generator=generator)
    mixed_k, weights_k = absorbed_attention(query, keys, scale=0.25, head_slice=True, return_weights=True)
    cache = torch.cat([keys, residual], dim=-1)  # (b, n, e + r)
    mixed, weights = absorbed_attention(query, cache, scale=0.25, head_slice=True, return_weights=True)
    assert torch.equal(weights, weights_k), "the residual columns must not change the scores"
    torch.testing.assert_close(mixed[..., :64], mixed_k)
    torch.testing.assert_close(mixed[..., 64:], weights @ residual[:, None])  # (b, h, t, r)


# --------------------------------------------------------------------------- equivalence on random configs, forced r

D_MODEL = 64
RANKS = {"r0": 0, "r-half": D_MODEL // 2, "r-d": D_MODEL}


def gpt2_names() -> list[str]:
    return [f"GPT2Attention[self {i}]" for i in range(2)]


def whisper_modes() -> dict[str, str]:
    modes = {f"WhisperAttention[self {i}]": "k" for i in range(2)}
    modes.update({f"WhisperAttention[cross {i}]": "encoder" for i in range(2)})
    return modes


def k_plus_r(model, rank: int):
    """``model`` slimified with every self-attention layer on a K+R cache of rank ``rank`` (no calibration)."""
    if model.config.model_type == "gpt2":
        modes = {name: "k" for name in gpt2_names()}
    else:
        modes = whisper_modes()
    ranks = {name: rank for name, mode in modes.items() if mode == "k"}
    slim = slimify(model, "k", layer_modes=modes, residual_ranks=ranks)
    assert slim_record(slim).residual_ranks == ranks
    return slim


def gpt2_pair(rank: int, attn: str = "sdpa"):
    vanilla = tiny_gpt2(attn=attn)
    return vanilla, k_plus_r(copy.deepcopy(vanilla), rank)


def whisper_pair(rank: int, attn: str = "sdpa"):
    vanilla = ill_conditioned_whisper(attn)
    return vanilla, k_plus_r(copy.deepcopy(vanilla), rank)


def ill_conditioned_whisper(attn: str = "sdpa"):
    """The random tiny Whisper with decoder W_K given a trained-like singular value tail (cond 1e3), so the split
    into kept and residual directions is a real one (the test_whisper model's W_K is orthogonal: all equal)."""
    model = tiny_whisper(attn=attn)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            weight = layer.self_attn.k_proj.weight
            u, s, vh = torch.linalg.svd(weight.double())
            tail = torch.logspace(0, -3, s.shape[0], dtype=torch.float64)
            weight.copy_(u @ torch.diag(s * tail) @ vh)
    return model


PAIRS = {"gpt2": gpt2_pair, "whisper": whisper_pair}


def left_padded_gpt2_batch():
    return tiny_tokenizer()(
        ["the quick brown fox", "memory", "slim attention keeps one"], return_tensors="pt", padding=True
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rank", list(RANKS.values()), ids=list(RANKS))
@pytest.mark.parametrize("arch", list(PAIRS))
def test_prefill_and_24_decode_steps_match_logits(arch, rank, attn):
    vanilla, slim = PAIRS[arch](rank, attn)
    generator = torch.Generator().manual_seed(7)
    if arch == "gpt2":
        batch = left_padded_gpt2_batch()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        caches = {"vanilla": DynamicCache(), "slim": SlimCache()}
        common = {}
    else:
        ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(6))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding in row 1
        caches = {
            "vanilla": EncoderDecoderCache(DynamicCache(), DynamicCache()),
            "slim": EncoderDecoderCache(SlimCache(), SlimCache(0)),
        }
        common = {"encoder_outputs": vanilla.model.encoder(random_features(3))}
    prompt = ids.shape[1]
    with torch.no_grad():
        for step in range(25):
            outputs = {}
            for name, model in (("vanilla", vanilla), ("slim", slim)):
                if arch == "gpt2":
                    outputs[name] = model(input_ids=ids, attention_mask=mask, **with_cache(caches[name]))
                else:
                    outputs[name] = model(
                        decoder_input_ids=ids, decoder_attention_mask=mask, **with_cache(caches[name]), **common
                    )
            rtol = LOGITS_RTOL[torch.float32]
            assert_close_relative(outputs["slim"].logits, outputs["vanilla"].logits, rtol, f"step {step}")
            ids = torch.randint(3, 96, (ids.shape[0], 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    self_cache = caches["slim"] if arch == "gpt2" else caches["slim"].self_attention_cache
    assert self_cache.get_seq_length() == prompt + 24
    assert all(layer.states.shape[-1] == D_MODEL + rank for layer in self_cache.layers), "cache width e + r"


def _generate(arch: str, model, **kwargs):
    with torch.no_grad():
        if arch == "gpt2":
            return model.generate(
                **left_padded_gpt2_batch(),
                max_new_tokens=20,
                return_dict_in_generate=True,
                **{"output_scores": True, **kwargs},
            )
        return model.generate(
            random_features(3),
            max_new_tokens=20,
            no_repeat_ngram_size=2,
            return_dict_in_generate=True,
            **{"output_scores": True, **kwargs},
        )


@pytest.mark.parametrize("rank", list(RANKS.values()), ids=list(RANKS))
@pytest.mark.parametrize("arch", list(PAIRS))
def test_greedy_beams_and_seeded_sampling_identical(arch, rank):
    vanilla, slim = PAIRS[arch](rank)
    for kwargs in (
        dict(do_sample=False),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=20, num_return_sequences=2),
    ):
        torch.manual_seed(123)
        expected = _generate(arch, vanilla, **kwargs)
        torch.manual_seed(123)
        actual = _generate(arch, slim, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"{arch} r={rank} {kwargs}")
        if "num_beams" in kwargs:
            assert_close_relative(actual.sequences_scores, expected.sequences_scores, 1e-5, "beam scores")


@pytest.mark.parametrize("rank", list(RANKS.values()), ids=list(RANKS))
def test_chunked_prefill_rebuilds_keys_and_values_from_the_k_plus_r_cache(rank):
    """Chunks longer than head_dim (16) rebuild K (first e columns) and V (all e + r) from the cache."""
    vanilla, slim = gpt2_pair(rank)
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = vanilla(input_ids=ids).logits
        cache, pieces, start = SlimCache(), [], 0
        for size in (10, 25, 3, 1, 21):
            positions = torch.arange(start, start + size)[None]
            pieces.append(slim(input_ids=ids[:, start : start + size], **with_cache(cache), position_ids=positions))
            start += size
    logits = torch.cat([piece.logits for piece in pieces], dim=1)
    assert_close_relative(logits, full, LOGITS_RTOL[torch.float32], "chunked prefill")


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3)], ids=["greedy", "beams"])
def test_static_cache_holds_k_plus_r_rows(kwargs):
    vanilla, slim = gpt2_pair(D_MODEL // 2)
    common = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    batch = left_padded_gpt2_batch()
    expected = vanilla.generate(**batch, **common, **kwargs)
    actual = slim.generate(**batch, **common, **kwargs)
    assert_same_tokens(actual.sequences, expected.sequences, "static cache")
    assert cache_of(actual).layers[0].states.shape[-1] == D_MODEL + D_MODEL // 2


@pytest.mark.parametrize("arch", list(PAIRS))
def test_dropping_the_z_term_breaks_the_outputs(arch, monkeypatch):
    """The guard against a silently dropped residual: with Z zeroed (its projection rows kept), the logits of the
    decode steps move by far more than the 1e-5 the equivalence tests allow. (The derived-state checks would solve
    the zeroed buffer again from the weights: they are switched off for the broken copy.)"""
    vanilla, slim = PAIRS[arch](D_MODEL // 2)
    broken = copy.deepcopy(slim)
    without_derived_state_checks(monkeypatch, broken)
    for module in broken.modules():
        if "hf_slim_z_proj" in module._buffers:
            module.hf_slim_z_proj.zero_()
    expected, actual, dropped = (_generate(arch, model, do_sample=False) for model in (vanilla, slim, broken))

    def finite_difference(a: torch.Tensor, e: torch.Tensor) -> float:  # Whisper masks tokens with -inf
        finite = torch.isfinite(a) & torch.isfinite(e)
        return float((a[finite] - e[finite]).abs().max() / e[finite].abs().max())

    assert finite_difference(actual.scores[5], expected.scores[5]) < LOGITS_RTOL[torch.float32], "intact"
    difference = max(finite_difference(a, e) for a, e in zip(dropped.scores[1:], expected.scores[1:], strict=False))
    assert difference > 1e-2, f"Z dropped but logits moved only {difference:.2e}"


def test_cache_bytes_and_report_count_the_residual():
    vanilla, slim = gpt2_pair(16)
    expected, actual = _generate("gpt2", vanilla), _generate("gpt2", slim)
    vanilla_bytes, slim_bytes = cache_nbytes(cache_of(expected)), cache_nbytes(cache_of(actual))
    assert vanilla_bytes * (D_MODEL + 16) == slim_bytes * 2 * D_MODEL, (vanilla_bytes, slim_bytes)
    batch, seq = cache_of(actual).layers[0].states.shape[:2]
    report = cache_report(slim, batch, seq, verbose=False)
    assert report.slim_bytes == slim_bytes and report.vanilla_bytes == vanilla_bytes
    assert report.ratio == pytest.approx(2 * D_MODEL / (D_MODEL + 16))


def test_slimify_logs_what_the_model_got(caplog, monkeypatch):
    """One INFO line per slimify: layers per mode, the K+R ranks, and the cache ratio at the model's maximum length
    (nothing said it: the README's "half the cache" is 1.60x on this GPT-2's K+R layers)."""
    with caplog.at_level(logging.INFO, logger="hf_slim"):
        slimify(tiny_gpt2())
        slimify(tiny_gpt2(), "k")
        slimify(tiny_whisper())
        monkeypatch.setattr(
            kmode.factorisation, "max_residual_rank", lambda d_model: 0
        )  # K refused: the model's own K/V kept
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlimFallbackWarning)
            slimify(tiny_rope("llama", dtype=torch.bfloat16, seed=0))
    assert [record.getMessage() for record in caplog.records] == [
        "hf_slim: 2 layers input (X); cache 2.00x smaller than K/V at 256 tokens",
        "hf_slim: 2 layers K+R (r 16); cache 1.60x smaller than K/V at 256 tokens",
        "hf_slim: 2 layers input (X), 2 layers cross-attention (reads the encoder output, no cache); cache 2.41x "
        "smaller than K/V at 96 tokens, counting the encoder output",
        "hf_slim: 2 layers their own K/V (no exact K+R); cache 1.00x smaller than K/V at 32 tokens",
    ]


def test_deepcopy_and_pickle_keep_the_k_plus_r_buffers():
    vanilla, slim = gpt2_pair(32)
    buffer = io.BytesIO()
    torch.save(slim, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(slim), torch.load(buffer, weights_only=False)]
    expected = _generate("gpt2", vanilla)
    for model in copies:
        assert slim_record(model).residual_ranks == slim_record(slim).residual_ranks
        actual = _generate("gpt2", model)
        assert_same_tokens(actual.sequences, expected.sequences)
        assert cache_of(actual).layers[0].states.shape[-1] == D_MODEL + 32


def test_forced_ranks_are_validated():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="pass layer_modes too"):
        slimify(copy.deepcopy(model), "k", residual_ranks={gpt2_names()[0]: 16})
    modes = {gpt2_names()[0]: "k", gpt2_names()[1]: "input"}
    with pytest.raises(ValueError, match=r"not forced to 'k': \['GPT2Attention\[self 1\]'\]"):
        slimify(copy.deepcopy(model), "k", layer_modes=modes, residual_ranks={gpt2_names()[1]: 16})
    with pytest.raises(ValueError, match=r"residual rank must be in \[0, 64\]"):
        slimify(copy.deepcopy(model), "k", layer_modes=modes, residual_ranks={gpt2_names()[0]: 65})


# ------------------------------------------------------------------------------------------------- export / load


@pytest.fixture(scope="module")
def k_plus_r_checkpoint(tmp_path_factory):
    """(vanilla, slim, folder): GPT-2 with layer 0 at r = 32 and layer 1 at r = 0, saved once."""
    vanilla = tiny_gpt2()
    names = gpt2_names()
    slim = slimify(
        copy.deepcopy(vanilla),
        "k",
        layer_modes={name: "k" for name in names},
        residual_ranks={names[0]: 32, names[1]: 0},
    )
    folder = tmp_path_factory.mktemp("gpt2-k-plus-r")
    slim.save_pretrained(folder)
    return vanilla, slim, folder


def test_export_round_trip_carries_ranks_and_projections(k_plus_r_checkpoint):
    vanilla, slim, folder = k_plus_r_checkpoint
    settings = json.loads((folder / "config.json").read_text())[CONFIG_KEY]
    names = gpt2_names()
    assert settings["residual_ranks"] == {names[0]: 32, names[1]: 0}
    tensors = load_file(folder / SIDECAR)
    assert tensors[f"{names[0]}.w_kv"].shape == (96, 64) and tensors[f"{names[0]}.z_proj"].shape == (64, 32)
    assert f"{names[1]}.z_proj" not in tensors
    loaded = load_slim(folder)
    assert slim_record(loaded).residual_ranks == slim_record(slim).residual_ranks
    for (name, module), original in zip(loaded.named_modules(), slim.modules(), strict=True):
        for buffer in ("hf_slim_w_kv", "hf_slim_v_offset", "hf_slim_z_proj"):
            if buffer in original._buffers:
                assert torch.equal(module.get_buffer(buffer), original.get_buffer(buffer)), f"{name}.{buffer}"
    expected, actual = _generate("gpt2", slim), _generate("gpt2", loaded)
    assert_same_tokens(actual.sequences, expected.sequences)
    for a, e in zip(actual.scores, expected.scores, strict=True):
        assert torch.equal(a, e), "load_slim must reproduce the saved model bit for bit"


def _tampered(folder, tmp_path, *, sidecar=None, settings=None):
    import shutil

    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    if sidecar is not None:
        tensors = load_file(target / SIDECAR)
        sidecar(tensors)
        save_file(tensors, target / SIDECAR)
    if settings is not None:
        config = json.loads((target / "config.json").read_text())
        settings(config[CONFIG_KEY])
        (target / "config.json").write_text(json.dumps(config))
    return target


LAYER0 = "GPT2Attention[self 0]"
RANK_TAMPERING = {
    "z_proj perturbed": (
        dict(sidecar=lambda t: t[f"{LAYER0}.z_proj"].mul_(1 + 1e-4)),
        r"GPT2Attention\[self 0\] W_KV does not match the weights",
    ),
    "residual rows of w_kv perturbed": (
        dict(sidecar=lambda t: t[f"{LAYER0}.w_kv"][64:].add_(1e-3)),
        r"W_KV does not match the weights",
    ),
    "z_proj missing": (
        dict(sidecar=lambda t: t.pop(f"{LAYER0}.z_proj")),
        r"missing: \['GPT2Attention\[self 0\].z_proj'\]",
    ),
    "rank in config changed": (
        dict(settings=lambda s: s["residual_ranks"].update({LAYER0: 16})),
        r"w_kv is torch.float64 \(96, 64\), expected torch.float64 \(80, 64\)",
    ),
    "rank on a non-K layer": (
        dict(settings=lambda s: s["residual_ranks"].update({"GPT2Attention[self 9]": 16})),
        r"residual_ranks must map K-mode layers to ranks >= 0",
    ),
    "rank dropped from config": (
        dict(settings=lambda s: s["residual_ranks"].pop(LAYER0)),
        r"unknown: \['GPT2Attention\[self 0\].z_proj'\]",
    ),
}


@pytest.mark.parametrize("case", list(RANK_TAMPERING))
def test_tampered_k_plus_r_checkpoint_is_a_clear_error(k_plus_r_checkpoint, tmp_path, case):
    edits, message = RANK_TAMPERING[case]
    with pytest.raises(SlimCheckpointError, match=message):
        load_slim(_tampered(k_plus_r_checkpoint[2], tmp_path, **edits))


def test_saving_after_the_weights_changed_refuses_a_stale_z_proj(tmp_path):
    _, slim = gpt2_pair(32)
    with torch.no_grad():
        slim.transformer.h[0].attn.c_attn.weight[:, 64:128].mul_(1.01)  # W_K only: its SVD (and U_r) move
    with pytest.raises(RuntimeError, match=r"GPT2Attention\[self 0\]: the weights changed after slimify"):
        slim.save_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------- accelerate offload


def test_k_plus_r_on_a_disk_offloaded_model(tmp_path):
    """slimify solves the SVD from the real weights of a layer that rests on the meta device; z_proj and W_KV are
    buffers on the offloaded module and the outputs equal the in-memory K+R model's."""
    from test_accelerate import dispatched

    vanilla = tiny_gpt2()
    vanilla.save_pretrained(tmp_path / "plain")
    offloaded = k_plus_r(dispatched("gpt2", tmp_path / "plain", tmp_path), 32)
    in_memory = k_plus_r(copy.deepcopy(vanilla), 32)
    attention = offloaded.get_submodule("transformer.h.1.attn")
    assert attention.c_attn.weight.is_meta, "the layer's weights must be back on meta at rest"
    assert attention.hf_slim_z_proj.shape == (64, 32)
    expected, actual = _generate("gpt2", in_memory), _generate("gpt2", offloaded)
    assert_same_tokens(actual.sequences, expected.sequences, "offloaded K+R")
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores, strict=True)):
        assert_close_relative(a, e, LOGITS_RTOL[torch.float32], f"step {step}")


def test_singular_key_projection_is_refused_only_beyond_the_cap():
    """W_K with 8 exactly-zero singular values: the plain K cache cannot exist, K+R with r >= 8 is exact; with more
    null directions than d/2 the layer cannot use K mode at all and the error says so."""
    projections = ill_conditioned(tail=8)
    u, s, vh = torch.linalg.svd(projections.w_k)
    s[-8:] = 0
    singular = Projections(u @ torch.diag(s) @ vh, projections.w_v, projections.b_k, projections.b_v)
    with pytest.raises(SingularKeyProjection, match="singular in the directions the keys would carry"):
        solve_k_mode(singular, 0)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = x @ singular.w_v + singular.b_v
    assert relative(rebuilt_values(x, singular, solve_k_mode(singular, 16)), expected) < 1e-10
    s[-40:] = 0
    rank_deficient = Projections(u @ torch.diag(s) @ vh, projections.w_v, projections.b_k, projections.b_v)
    with pytest.raises(SingularKeyProjection, match="in more than 32 directions"):
        choose_residual_rank(rank_deficient, x, torch.float64)
