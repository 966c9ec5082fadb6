"""RoPE models through the K cache: slim vs unpatched for every model type, rope scaling type and layout.

Every tiny model has random biases and norms; prompts plus decode steps run past the original context of the
dynamic / longrope configs (32 tokens), so their frequency switch happens mid-generation.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import (
    LOGITS_RTOL,
    assert_close_relative,
    assert_same_tokens,
    assert_unchanged,
    cache_of,
    relative_difference,
    snapshot,
    with_cache,
    without_derived_state_checks,
)
from tiny_models import ROPE_CONFIGS, peak_logits, tiny_rope, tiny_tokenizer
from transformers import DynamicCache

from hf_slim import (
    SlimCache,
    SlimFallbackWarning,
    UnsupportedModelError,
    cache_nbytes,
    cache_report,
    slim_record,
    slimify,
    unslimify,
)
from hf_slim.cache_layers import StaticSlimLayer

NAMES = list(ROPE_CONFIGS)
PROMPTS = ["the quick brown fox", "slim attention keeps one tensor per token instead of", "memory"]


def pair(name: str, **overrides):
    """(unpatched, slim) copies of the same random model; every layer must have taken the K cache."""
    vanilla = tiny_rope(name, **overrides)
    slim = slimify(copy.deepcopy(vanilla))
    modes = slim_record(slim).layer_modes
    assert set(modes.values()) == {"k"}, f"K cache refused: {modes} {slim_record(slim).calibration}"
    return vanilla, slim


def padded_batch():
    return tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)


def _decode_logits(vanilla, slim, steps: int = 40):
    """Prefill a left-padded batch, then ``steps`` random single tokens, comparing logits at every step."""
    batch = padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    caches = {"vanilla": DynamicCache(), "slim": SlimCache()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(steps + 1):
            expected = vanilla(input_ids=ids, attention_mask=mask, **with_cache(caches["vanilla"])).logits
            actual = slim(input_ids=ids, attention_mask=mask, **with_cache(caches["slim"])).logits
            assert_close_relative(actual, expected, LOGITS_RTOL[torch.float32], f"step {step}")
            ids = torch.randint(0, vanilla.config.vocab_size, (ids.shape[0], 1), generator=generator)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    return caches


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_40_decode_steps_match_logits(name, attn):
    if attn == "sdpa" and ROPE_CONFIGS[name].get("attn") == "eager":
        pytest.skip(f"{name} has eager attention only")
    vanilla, slim = pair(name, attn=attn)
    caches = _decode_logits(vanilla, slim)
    assert caches["slim"].get_seq_length() == caches["vanilla"].get_seq_length()
    _assert_half_plus_positions(slim, caches["slim"], caches["vanilla"])


def _k_columns(slim) -> list[int]:
    """Cached columns per token of each K layer: ``e + r``, plus one for OLMo-2's key scale (its keys are normalised
    per token; the scale makes the values exact again)."""
    ranks, inner = slim_record(slim).residual_ranks.values(), slim.config.hidden_size
    return [inner + rank + (slim.config.model_type == "olmo2") for rank in ranks]


def _k_plus_r_ratio(slim) -> float:
    """K/V bytes over K+R bytes of a model whose layers all use the K cache: ``2e L / sum(e + r (+ 1))`` (2 when every
    r = 0, less for OLMo-2's key scale; the fp32 calibration gives these random W_K, cond ~1e2, r = 16, see
    hf_slim.kmode.K_MODE_ABSOLUTE_FLOOR)."""
    columns = _k_columns(slim)
    return 2 * slim.config.hidden_size * len(columns) / sum(columns)


def _assert_half_plus_positions(slim, slim_cache, vanilla_cache):
    """Slim bytes = the K/V bytes / :func:`_k_plus_r_ratio` (half for plain K layers) + one int32 position per token
    (history-dependent rope types: a regime id beside it, and the regimes' frequencies); no cos/sin table: the
    recompute reproduced the model's exactly."""
    rotary = slim_cache.rotary
    assert rotary.table is None, "fell back to storing the cos/sin table"
    positions = rotary.positions.states  # (b, n, 1|2)
    assert positions.dtype == torch.int32 and positions.shape[1] == slim_cache.layers[0].states.shape[1]
    regimes = 0 if rotary.regime_buffer is None else rotary.regime_buffer.numel() * 4
    columns = _k_columns(slim)
    layers = cache_nbytes(vanilla_cache) * sum(columns) // (2 * slim.config.hidden_size * len(columns))
    assert cache_nbytes(slim_cache) == layers + positions.numel() * 4 + regimes
    return rotary


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_matches(name):
    """Chunks larger than head_dim rebuild K/V (values from un-rotated keys); small chunks use the absorbed path.
    Compared with the unpatched model fed the same chunks (dynamic NTK picks frequencies per forward call), with a
    dynamic and a static (preallocated, 72 slots) slim cache."""
    vanilla, slim = pair(name)
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(2))
    static = SlimCache(slim_record(slim).num_cache_layers, max_cache_len=72)
    logits = {}
    with torch.no_grad():
        for label, model, cache in (
            ("vanilla", vanilla, DynamicCache()),
            ("slim", slim, SlimCache()),
            ("slim static", slim, static),
        ):
            pieces, start = [], 0
            for size in (10, 25, 3, 1, 21):
                pieces.append(model(input_ids=ids[:, start : start + size], **with_cache(cache)).logits)
                start += size
            logits[label] = torch.cat(pieces, dim=1)
    for label in ("slim", "slim static"):
        assert_close_relative(logits[label], logits["vanilla"], LOGITS_RTOL[torch.float32], f"{label} chunked prefill")
    assert isinstance(static.layers[0], StaticSlimLayer)


def _generate(model, max_new_tokens: int = 36, **kwargs):
    batch = padded_batch()
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_scores=True, **kwargs
        )


GENERATION = {
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
}


@pytest.mark.parametrize("how", list(GENERATION))
@pytest.mark.parametrize("name", NAMES)
def test_generation_identical_past_original_context(name, how):
    vanilla, slim = pair(name)
    torch.manual_seed(123)
    expected = _generate(vanilla, **GENERATION[how])
    torch.manual_seed(123)
    actual = _generate(slim, **GENERATION[how])
    assert expected.sequences.shape[1] > 32, "generation must pass the original context (32)"
    assert_same_tokens(actual.sequences, expected.sequences, how)
    rotary = next((module for module in slim.modules() if hasattr(module, "rope_type")), None)
    if rotary is not None and rotary.rope_type in ("dynamic", "longrope"):  # the frequencies did switch mid-generation
        assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq), "no frequency switch happened"
    assert isinstance(cache_of(actual), SlimCache)


#: one config per RoPE patch module (llama, phi3, phi, gpt_neox, gptj, codegen), the history-dependent / key-norm
#: variants and the model types registered onto a patch module
@pytest.mark.parametrize(
    "name",
    ["llama", "llama-dynamic", "olmo2", "qwen2", "phi3", "phi", "stablelm", "gpt_neox", "persimmon", "gptj", "codegen"],
)
def test_static_cache_generate_matches(name):
    vanilla, slim = pair(name)
    common = dict(cache_implementation="static", do_sample=False)
    expected, actual = _generate(vanilla, **common), _generate(slim, **common)
    assert_same_tokens(actual.sequences, expected.sequences, "static cache")
    _assert_half_plus_positions(slim, cache_of(actual), cache_of(expected))


@torch.no_grad()
@pytest.mark.parametrize("name", ["llama", "olmo2"])
def test_decode_step_compiles_fullgraph(name):
    """A RoPE decode step with a static slim cache (rotary table included; OLMo-2: the key scale) traces as one graph;
    compiled = eager."""
    slim = pair(name)[1]
    ids = torch.randint(0, slim.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6))
    caches = [SlimCache(2, max_cache_len=16) for _ in range(2)]
    for cache in caches:
        slim(input_ids=ids[:, :5], **with_cache(cache))
    torch._dynamo.reset()  # fresh caches: every model's forward shares one transformers wrapper frame
    compiled = torch.compile(slim.forward, fullgraph=True, dynamic=False)
    step = dict(input_ids=ids[:, 5:], position_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 16))
    eager = slim(**step, **with_cache(caches[0])).logits
    traced = compiled(**step, **with_cache(caches[1])).logits
    assert_close_relative(traced, eager, 1e-5, "compiled vs eager decode step")


def _key_rows(module: torch.nn.Module) -> tuple[torch.nn.Linear, slice | torch.Tensor]:
    """The linear layer holding a RoPE attention module's key projection and the rows of its weight that are W_K:
    ``k_proj`` (Llama, Qwen2, OLMo, Phi, StableLM, GPT-J), the key rows of CodeGen's ``qkv_proj`` (``mp_num`` shards
    of ``[q | v | k]``), the middle third of Phi-3's ``qkv_proj``, or the key rows of GPT-NeoX's (and Persimmon's)
    per-head ``(heads, 3, head_dim)`` ``query_key_value``."""
    if hasattr(module, "k_proj"):
        return module.k_proj, slice(None)
    if hasattr(module, "mp_num"):
        shards = torch.arange(3 * module.embed_dim).view(module.mp_num, 3, module.embed_dim // module.mp_num)
        return module.qkv_proj, shards[:, 2].reshape(-1)
    if hasattr(module, "qkv_proj"):
        e = module.config.num_attention_heads * module.head_dim
        return module.qkv_proj, slice(e, 2 * e)
    heads = module.config.num_attention_heads
    head_dim = module.config.hidden_size // heads
    return module.query_key_value, torch.arange(3 * heads * head_dim).view(heads, 3, head_dim)[:, 1].reshape(-1)


@torch.no_grad()
def _orthogonal_keys(model: torch.nn.Module) -> torch.nn.Module:
    """Give every W_K orthogonal columns (cond 1): random square W_K have cond ~1e2-1e3, for which the bf16
    calibration rightly adds residual directions (K+R); trained models' vary by layer. With these, bf16 accepts the
    plain K cache on every layer."""
    generator = torch.Generator().manual_seed(7)
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            linear, rows = _key_rows(module)
            weight = linear.weight[rows]  # (e, d)
            q, _ = torch.linalg.qr(torch.randn(weight.shape, generator=generator, dtype=torch.float64))
            linear.weight[rows] = (q * 0.5).to(weight.dtype)
    return model


#: The bf16 greedy test's premise: at every generated token, vanilla bf16's top logit leads the runner-up by at least
#: this many bf16 steps (one step = the spacing of bf16 numbers at the top logit). :func:`peak_logits` models have 76
#: to 117 at the closest of the 108 decisions (per config and W_K case); slim and vanilla bf16 logits differ by 1 step
#: at most there. Unpeaked, the same configs have 0 to 1.
MIN_TOP1_MARGIN_BF16_STEPS = 16


def _bf16_models(name: str, keys=lambda model: model):
    """(fp32 reference, vanilla bf16, slim bf16) of the peaked tiny model ``name``, W_K set by ``keys``."""
    reference = peak_logits(keys(tiny_rope(name)))
    vanilla = copy.deepcopy(reference).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlimFallbackWarning)  # a refused layer keeps its own K/V (checked by callers)
        slim = slimify(copy.deepcopy(vanilla))
    return reference, vanilla, slim


@pytest.mark.parametrize("name", NAMES)
def test_bf16_plain_k_on_every_layer_same_greedy_tokens(name):
    """bf16, well-conditioned W_K: the calibration puts every layer on the plain K cache (r = 0); greedy decoding of
    a left-padded batch gives exactly vanilla bf16's tokens, and the logits are as accurate as vanilla's (OLMo-2
    included: its normalised keys, each token's bf16 key scale and ``diag(1/w)`` pass the same calibration)."""
    reference, vanilla, slim = _bf16_models(name, _orthogonal_keys)
    record = slim_record(slim)
    assert set(record.layer_modes.values()) == {"k"} and not any(record.residual_ranks.values()), record.calibration
    _assert_bf16_same_greedy_and_as_accurate(reference, vanilla, slim)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_k_plus_r_where_plain_k_is_inexact_same_greedy_tokens(name):
    """bf16, random W_K (cond ~2e2): the plain K cache would be ~20x less accurate than the model, so the calibration
    keeps ``r > 0`` input directions beside the rotated keys (K+R) on every K layer (a layer may also keep its own
    K/V, exact; at least one must be K+R); greedy tokens and accuracy as in the test above."""
    reference, vanilla, slim = _bf16_models(name)
    record = slim_record(slim)
    k_layers = [layer for layer, mode in record.layer_modes.items() if mode == "k"]
    assert k_layers and all(record.residual_ranks[layer] > 0 for layer in k_layers), record.calibration
    for layer in k_layers:
        numbers = record.calibration[layer]
        assert numbers["k_error"] <= 4 * numbers["vanilla_error"], numbers
    _assert_bf16_same_greedy_and_as_accurate(reference, vanilla, slim)


def _assert_bf16_same_greedy_and_as_accurate(reference, vanilla, slim) -> None:
    """The bf16 bar, against the fp32 ``reference``:

    * the premise: every greedy decision of vanilla bf16 (left-padded batch, 36 new tokens) is clear, its top logit
      :data:`MIN_TOP1_MARGIN_BF16_STEPS` or more bf16 steps above the runner-up (checked first, so a near tie is
      reported as such and not as a slim difference);
    * greedy decoding gives exactly vanilla bf16's tokens;
    * teacher-forced along those tokens, the logits are as close to the fp32 model as vanilla bf16's (within 1.5x).
    """
    expected = _generate(vanilla, do_sample=False).sequences
    prompt_length = padded_batch()["input_ids"].shape[1]
    assert expected.shape[1] - prompt_length >= 36, "generation stopped early"
    logits = {
        label: _teacher_forced(model, expected, cache)
        for label, model, cache in (("fp32", reference, DynamicCache()), ("vanilla", vanilla, DynamicCache()))
    }
    top2 = logits["vanilla"][:, prompt_length - 1 : -1].topk(2, dim=-1).values  # (b, 36, 2): the greedy decisions
    step = torch.exp2(torch.floor(torch.log2(top2[..., 0].abs())) - 7)  # (b, 36): bf16 spacing at the top logit
    margin = float(((top2[..., 0] - top2[..., 1]) / step).min())
    assert margin >= MIN_TOP1_MARGIN_BF16_STEPS, f"a near tie ({margin:.1f} bf16 steps): the test would test luck"
    assert_same_tokens(_generate(slim, do_sample=False).sequences, expected, "bf16 greedy")
    logits["slim"] = _teacher_forced(slim, expected, SlimCache())
    slim_error = relative_difference(logits["slim"], logits["fp32"])
    vanilla_error = relative_difference(logits["vanilla"], logits["fp32"])
    assert slim_error <= 1.5 * vanilla_error, f"bf16 slim error {slim_error:.3e} vs vanilla {vanilla_error:.3e}"


@torch.no_grad()
def _teacher_forced(model, sequences: torch.Tensor, cache) -> torch.Tensor:
    """Logits of the prompt batch's prefill and then one token at a time along ``sequences``, float32."""
    prompt = padded_batch()
    length = prompt["input_ids"].shape[1]
    mask = torch.cat([prompt["attention_mask"], torch.ones_like(sequences[:, length:])], dim=1)
    out = [model(input_ids=sequences[:, :length], attention_mask=mask[:, :length], **with_cache(cache)).logits]
    for t in range(length, sequences.shape[1]):
        step = model(input_ids=sequences[:, t : t + 1], attention_mask=mask[:, : t + 1], **with_cache(cache))
        out.append(step.logits)
    return torch.cat(out, dim=1).float()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forced_mixed_cache_matches(attn):
    """Layer 0 plain K (r = 0), layer 1 the model's own K/V, layer 2 K+R (r = 16): the mixed cache gives the same
    logits and tokens."""
    vanilla = tiny_rope("llama", seed=0, num_hidden_layers=3, attn=attn)  # forced modes: no calibration gate
    names = [f"LlamaAttention[self {i}]" for i in range(3)]
    modes = dict(zip(names, ["k", "kv", "k"], strict=True))
    slim = slimify(copy.deepcopy(vanilla), layer_modes=modes, residual_ranks={names[0]: 0, names[2]: 16})
    record = slim_record(slim)
    assert record.kv_layers == (1,) and record.residual_ranks == {names[0]: 0, names[2]: 16}, record.residual_ranks
    caches = _decode_logits(vanilla, slim, steps=20)
    layers, inner = caches["slim"].layers, vanilla.config.hidden_size
    assert layers[1].keys is not None and layers[1].values is not None
    assert layers[0].states.shape[-1] == inner and layers[2].states.shape[-1] == inner + 16
    for kwargs in (dict(), dict(cache_implementation="static")):
        expected, actual = _generate(vanilla, do_sample=False, **kwargs), _generate(slim, do_sample=False, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"mixed cache greedy {kwargs}")


def test_refused_layers_keep_own_kv_with_warning(monkeypatch):
    """A layer whose K cache calibrates inexact keeps the model's own K and V, with the numbers in the warning."""
    import hf_slim.kmode

    vanilla = tiny_rope("qwen2", seed=0)  # seed 0: cond(W_K) ~3e3 on both layers: r = 0 is above the fp32 floor
    monkeypatch.setattr(
        hf_slim.kmode.factorisation, "max_residual_rank", lambda d_model: 0
    )  # no K+R: K alone or the own K/V
    with pytest.warns(SlimFallbackWarning, match="keep the model's own keys and values") as record:
        slim = slimify(copy.deepcopy(vanilla))
    assert "relative error" in str(record[0].message)
    assert set(slim_record(slim).layer_modes.values()) == {"kv"}
    _decode_logits(vanilla, slim, steps=5)


@pytest.mark.parametrize("name", ["llama", "codegen", "persimmon"])
def test_mode_input_refused_and_auto_picks_k(name):
    model = tiny_rope(name)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="mode='input' cannot be used"):
        slimify(model, "input")
    assert_unchanged(model, before)
    assert set(slim_record(slimify(model, "auto")).layer_modes.values()) == {"k"}


def test_codegen_computing_attention_itself_is_refused_cleanly(monkeypatch):
    """Up to transformers 5.23 CodeGen's attention computes attention itself (no adapted forward in hf_slim): slimify
    refuses with the reason and leaves the model untouched (simulated here on a routed release)."""
    from hf_slim.patches import codegen

    model = tiny_rope("codegen")
    before = snapshot(model)
    monkeypatch.setattr(codegen, "ROUTED", False)
    with pytest.raises(UnsupportedModelError, match="CodeGen computes attention itself.*transformers>=5.24"):
        slimify(model)
    assert_unchanged(model, before)


def test_persimmon_qk_layernorm_is_refused_with_reason():
    """Persimmon's ``qk_layernorm`` (a LayerNorm of each head's keys: mean removed, bias added) leaves V no function of
    the cached keys: the config is refused before anything changes (the key-norm support is OLMo-2's full-width
    RMSNorm)."""
    model = tiny_rope("persimmon", qk_layernorm=True)
    before = snapshot(model)
    for mode in ("auto", "k"):
        with pytest.raises(UnsupportedModelError, match="qk_layernorm=True applies a LayerNorm to each head's"):
            slimify(model, mode)
    assert_unchanged(model, before)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_gqa_configs_refused_with_reason(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    config.num_key_value_heads = 2
    with pytest.raises(UnsupportedModelError, match="grouped/multi-query attention"):
        slimify(AutoModelForCausalLM.from_config(config))


def test_mistral_mha_message_is_right():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    config.num_key_value_heads = 4
    with pytest.raises(UnsupportedModelError) as error:
        slimify(MistralForCausalLM(config))
    assert "no patch for this RoPE model type" in str(error.value) and "grouped/multi-query" not in str(error.value)


def test_unslimify_restores_exactly_and_copies_work():
    vanilla = tiny_rope("llama")
    model = copy.deepcopy(vanilla)
    before = snapshot(model)
    slimify(model)
    copied, pickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    expected = _generate(vanilla, do_sample=False)
    for other in (model, copied, pickled):
        assert_same_tokens(_generate(other, do_sample=False).sequences, expected.sequences, "copy")
    unslimify(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["llama", "olmo2"])
def test_cache_report_matches_measured_bytes(name):
    vanilla, slim = pair(name)
    expected, actual = _generate(vanilla, do_sample=False), _generate(slim, do_sample=False)
    tokens = cache_of(actual).get_seq_length()
    report = cache_report(slim, batch_size=3, seq_len=tokens, verbose=False)
    assert report.vanilla_bytes == cache_nbytes(cache_of(expected))
    assert report.slim_bytes == cache_nbytes(cache_of(actual))
    assert report.layers_ratio == pytest.approx(_k_plus_r_ratio(slim))


def _meta_model(model_type: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float16)


# Llama-2-7B and Phi-3-mini-128k-instruct config.json values (the fields that set cache shapes)
LLAMA_2_7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32)
LLAMA_2_7B.update(intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096)


def test_cache_report_llama_2_7b_at_4k_is_2x():
    model = _meta_model("llama", **LLAMA_2_7B)
    report = cache_report(model, batch_size=1, seq_len=4096, verbose=False)
    assert report.vanilla_bytes == 2 * 32 * 4096 * 4096 * 2  # 2 GiB
    assert report.layers_ratio == 2.0
    assert abs(report.ratio - 2) < 1e-3 and f"{report.ratio:.2f}x" in str(report) and "2.00x" in str(report)
    assert report.rotary_stored == "positions"  # default rope: position-pure, no regime ids
    assert report.rotary_bytes == 4096 * 4 + 64 * 4  # an int32 position per token + the one inv_freq (64 float32)


NOT_LINEAR_IN_K = {
    "olmo-clip_qkv": (dict(name="olmo", clip_qkv=0.5), "clip_qkv=0.5 clamps keys"),
    "phi-qk_layernorm": (dict(name="phi", qk_layernorm=True), "qk_layernorm normalises each head's keys"),
    "stablelm-qk_layernorm": (dict(name="stablelm", qk_layernorm=True), "qk_layernorm normalises each head's keys"),
    "qwen2-sliding": (
        dict(name="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0),
        "sliding-window layer",
    ),
}


@pytest.mark.parametrize("case", list(NOT_LINEAR_IN_K))
def test_layers_where_v_is_not_a_function_of_k_keep_own_kv_with_reason(case):
    """Clamped or normalised keys break ``V = f(K)``: each such layer keeps the model's own K/V, says why, and the
    model still matches the unpatched one."""
    overrides, reason = NOT_LINEAR_IN_K[case]
    vanilla = tiny_rope(**overrides)
    with pytest.warns(SlimFallbackWarning, match=reason):
        slim = slimify(copy.deepcopy(vanilla))
    assert set(slim_record(slim).layer_modes.values()) == {"kv"}
    _decode_logits(vanilla, slim, steps=5)
    with pytest.raises(ValueError, match="is not exact here"):
        slimify(copy.deepcopy(vanilla), layer_modes=dict.fromkeys(slim_record(slim).layer_modes, "k"))


# ------------------------------------------------------------------------------------ checkpoints, offload, CLI


@pytest.mark.parametrize("name", ["llama", "phi3-longrope", "gptj", "gpt_neox", "olmo2"])
def test_save_and_load_slim_reproduce_mixed_cache(name, tmp_path):
    """A mixed model (layer 0 K, layer 1 the model's own K/V) saves and loads with the same modes and outputs."""
    from hf_slim import load_slim

    vanilla = tiny_rope(name)
    names = list(slim_record(slimify(copy.deepcopy(vanilla))).layer_modes)
    slim = slimify(copy.deepcopy(vanilla), layer_modes=dict(zip(names, ["k", "kv"], strict=True)))
    slim.save_pretrained(tmp_path)
    loaded = load_slim(tmp_path)
    assert slim_record(loaded).layer_modes == slim_record(slim).layer_modes
    expected = _generate(vanilla, do_sample=False)
    assert_same_tokens(_generate(loaded, do_sample=False).sequences, expected.sequences, "load_slim")


def test_accelerate_disk_offload_matches(tmp_path):
    """Layer 1 on disk (weights on meta at rest): W_KV is solved from the real weights, the slim forward reads them."""
    from transformers import AutoModelForCausalLM

    vanilla = tiny_rope("llama")
    vanilla.save_pretrained(tmp_path / "plain")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    assert offloaded.model.layers[1].self_attn.k_proj.weight.is_meta, "test setup: layer not offloaded"
    expected = _generate(offloaded, do_sample=False)
    slimify(offloaded)
    assert set(slim_record(offloaded).layer_modes.values()) == {"k"}
    assert_same_tokens(_generate(offloaded, do_sample=False).sequences, expected.sequences, "offloaded")


def test_cli_verify_and_generate_on_a_rope_checkpoint(tmp_path, capsys):
    from hf_slim.app.cli.main import main

    tiny_rope("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert main(["verify", "--model", str(tmp_path), "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("LlamaAttention")]
    assert len(rows) == 2 and all(row[2] == "k" for row in rows), out
    assert "greedy outputs: identical to the unpatched model" in out
    assert "slim (" in out and "x)" in out
    assert (
        main(["generate", "--model", str(tmp_path), "the quick brown fox", "--max-new-tokens", "8", "--compare"]) == 0
    )
    assert "outputs identical: yes" in capsys.readouterr().out


# Phi-3-mini-128k-instruct config.json values (the fields that set cache shapes)
PHI3_MINI_128K = dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32)
PHI3_MINI_128K.update(intermediate_size=8192, vocab_size=32064, max_position_embeddings=131072)
PHI3_MINI_128K.update(original_max_position_embeddings=4096, sliding_window=262144)


def test_cache_report_phi3_mini_128k_at_128k_is_2x(tmp_path, capsys):
    """The issue's stake: 48 GiB of fp16 K/V at 128k tokens; all layers K: 24 GiB plus 8 bytes per token (int32
    position and longrope regime id) and the two regimes' frequencies: 2.00x."""
    from hf_slim.app.cli.main import main

    factors = dict(short_factor=[1.0] * 48, long_factor=[2.0] * 48, original_max_position_embeddings=4096)
    config = dict(PHI3_MINI_128K, rope_parameters=dict(rope_type="longrope", **factors))
    model = _meta_model("phi3", **config)
    report = cache_report(model, batch_size=1, seq_len=131072, verbose=False)
    assert report.vanilla_bytes == 48 * 2**30
    assert sum(layer.slim for layer in report.layers) == 24 * 2**30
    assert report.layers_ratio == 2.0 and abs(report.ratio - 2) < 1e-3
    assert report.rotary_stored == "positions + regimes"
    assert report.rotary_bytes == 131072 * (4 + 4) + 2 * 48 * 4  # 1 MiB (was 48 MiB of fp16 cos|sin) + 2 regimes
    path = tmp_path / "phi3.json"
    path.write_text(__import__("json").dumps(dict(config, model_type="phi3", architectures=["Phi3ForCausalLM"])))
    assert main(["memory", "--config", str(path), "--seq-len", "131072", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "Phi3Attention[self 31]" in out and "rotary positions + regimes (all layers)" in out, out
    assert "2.00x" in out and "1.0 MiB" in out, out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_k_plus_r_on_rope_layers_matches_and_needs_its_residual(attn, monkeypatch):
    """K+R on RoPE layers: the cache holds the rotated keys and ``Z = X U_r`` (never rotated); values come from the
    un-rotated keys and Z. Forced r = 16 of 64 on every layer matches the unpatched model; zeroing the residual
    projection (dropping Z) does not."""
    vanilla = tiny_rope("llama", attn=attn)
    names = [f"LlamaAttention[self {i}]" for i in range(2)]
    slim = slimify(
        copy.deepcopy(vanilla), layer_modes=dict.fromkeys(names, "k"), residual_ranks=dict.fromkeys(names, 16)
    )
    assert slim_record(slim).residual_ranks == dict.fromkeys(names, 16)
    caches = _decode_logits(vanilla, slim, steps=20)
    assert caches["slim"].layers[0].states.shape[-1] == 64 + 16
    expected, actual = _generate(vanilla, do_sample=False), _generate(slim, do_sample=False)
    assert_same_tokens(actual.sequences, expected.sequences, "K+R greedy")
    without_derived_state_checks(monkeypatch, slim)  # they would solve the zeroed z_proj again
    with torch.no_grad():
        for layer in slim.model.layers:
            layer.self_attn.hf_slim_z_proj.zero_()
    with pytest.raises(AssertionError, match="relative max difference"):
        _decode_logits(vanilla, slim, steps=2)


# ------------------------------------------------------------------------- OLMo-2: normalised keys, per-token scale

OLMO2_LAYERS = [f"Olmo2Attention[self {i}]" for i in range(2)]


def _olmo2_forced(rank: int, attn: str = "sdpa"):
    """(unpatched, slim) tiny OLMo-2 with both layers forced onto the K cache at residual rank ``rank``; for ``r = 0``
    W_K is orthogonal (random W_K have cond ~1e2: plain K in fp32 would sit above the K-mode floor)."""
    vanilla = tiny_rope("olmo2", attn=attn)
    if rank == 0:
        vanilla = _orthogonal_keys(vanilla)
    slim = slimify(
        copy.deepcopy(vanilla),
        layer_modes=dict.fromkeys(OLMO2_LAYERS, "k"),
        residual_ranks=dict.fromkeys(OLMO2_LAYERS, rank),
    )
    return vanilla, slim


@pytest.mark.parametrize("rank", [0, 16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_olmo2_key_scale_k_and_k_plus_r_match(attn, rank):
    """OLMo-2's k_norm: the cache holds the normalised rotated keys (the scores' own), Z (K+R) and each token's key
    scale, ``e + r + 1`` columns; the values come from ``[s * R^-1(K_n) | Z]`` with ``diag(1/w)`` in W_KV. Prefill and
    40 decode steps of a left-padded batch match the unpatched model in fp32, greedy and static-cache tokens too."""
    vanilla, slim = _olmo2_forced(rank, attn)
    caches = _decode_logits(vanilla, slim)
    assert caches["slim"].layers[0].states.shape[-1] == 64 + rank + 1
    _assert_half_plus_positions(slim, caches["slim"], caches["vanilla"])
    for kwargs in (dict(), dict(cache_implementation="static")):
        expected, actual = _generate(vanilla, do_sample=False, **kwargs), _generate(slim, do_sample=False, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"OLMo-2 K (r = {rank}) greedy {kwargs}")


def _drop_key_scale(monkeypatch) -> None:
    """Mutation: rebuild the values from ``[K_n | Z]``, the key scale column ignored."""
    import hf_slim.slim_tensor

    monkeypatch.setattr(hf_slim.slim_tensor, "scale_keys", lambda keys, key_width, owned=False: keys[..., :-1].float())


@torch.no_grad()
def _drop_weight_fold(monkeypatch, slim) -> None:
    """Mutation: W_KV's key block without ``diag(1/w)`` (as solved for keys that are not normalised)."""
    for layer in slim.model.layers:
        attention = layer.self_attn
        attention.hf_slim_w_kv[:64] *= attention.k_norm.weight[:, None]


@pytest.mark.parametrize("mutation", [_drop_key_scale, _drop_weight_fold])
@pytest.mark.parametrize("rank", [0, 16])
def test_olmo2_values_need_the_key_scale_and_the_weight_fold(monkeypatch, rank, mutation):
    """Without each token's scale, or without ``1/w`` folded into W_KV, the logits leave the unpatched model's."""
    vanilla, slim = _olmo2_forced(rank)
    without_derived_state_checks(monkeypatch, slim)  # they would solve an edited W_KV again
    if mutation is _drop_key_scale:
        mutation(monkeypatch)
    else:
        mutation(monkeypatch, slim)
    with pytest.raises(AssertionError, match="relative max difference"):
        _decode_logits(vanilla, slim, steps=2)


def test_olmo2_key_norm_with_zero_weights_keeps_own_kv_with_reason():
    """A k_norm weight with zeros makes those key columns 0 whatever the input: ``1/w`` does not exist, the layer keeps
    the model's own K/V, says why, and the model still matches the unpatched one."""
    vanilla = tiny_rope("olmo2")
    with torch.no_grad():
        vanilla.model.layers[1].self_attn.k_norm.weight[3] = 0.0
    with pytest.warns(SlimFallbackWarning, match=r"Olmo2Attention\[self 1\]: the key norm's weight has 1 zero"):
        slim = slimify(copy.deepcopy(vanilla))
    assert slim_record(slim).layer_modes == {OLMO2_LAYERS[0]: "k", OLMO2_LAYERS[1]: "kv"}
    _decode_logits(vanilla, slim, steps=5)
    with pytest.raises(ValueError, match="the key norm's weight has 1 zero"):
        slimify(copy.deepcopy(vanilla), layer_modes=dict.fromkeys(OLMO2_LAYERS, "k"))


def test_olmo2_key_norm_edit_after_slimify_is_caught():
    """W_KV folds ``1/w`` of the key norm: editing its weight after slimify makes W_KV stale, and the next step says so
    (the stamp watches the norm weight as it watches W_K and W_V)."""
    from hf_slim.kmode import StaleKModeWeights

    slim = pair("olmo2")[1]
    with torch.no_grad():
        slim.model.layers[0].self_attn.k_norm.weight.mul_(1.01)
    with pytest.raises(StaleKModeWeights, match="changed after slimify"):
        _decode_logits(tiny_rope("olmo2"), slim, steps=1)


def test_olmo2_save_and_load_slim_checks_the_key_norm(tmp_path):
    """Every layer K: load_slim reproduces the outputs; a checkpoint whose k_norm weight was changed after export is
    refused (W_KV folds ``1/w``, so the sidecar no longer fits)."""
    from safetensors.torch import load_file, save_file

    from hf_slim import load_slim
    from hf_slim.export import SlimCheckpointError

    vanilla, slim = pair("olmo2")
    slim.save_pretrained(tmp_path)
    loaded = load_slim(tmp_path)
    assert slim_record(loaded).layer_modes == dict.fromkeys(OLMO2_LAYERS, "k")
    assert all(module.hf_slim.key_scale for module in loaded.modules() if hasattr(module, "hf_slim"))
    expected = _generate(vanilla, do_sample=False)
    assert_same_tokens(_generate(loaded, do_sample=False).sequences, expected.sequences, "load_slim OLMo-2")
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.k_norm.weight"] = weights["model.layers.0.self_attn.k_norm.weight"] * 1.01
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlimCheckpointError, match=r"Olmo2Attention\[self 0\] W_KV does not match the weights"):
        load_slim(tmp_path)


def test_olmo2_cli_verify_shows_the_key_scale(tmp_path, capsys):
    from hf_slim.app.cli.main import main

    tiny_rope("olmo2").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    assert main(["verify", "--model", str(tmp_path), "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("Olmo2Attention")]
    assert len(rows) == 2 and all(row[2] == "k" and row[4] == "16+s" for row in rows), out
    assert "greedy outputs: identical to the unpatched model" in out


# ------------------------------------------------------------------- positions instead of cos/sin: checks, mutations


def _noisy_rotary(monkeypatch, start: int) -> None:
    """Make every Llama rotary module hand out cos values 0.1% off from position ``start`` on (a rotary
    implementation the slim cache's recompute does not know): both models then rotate with them."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    original = LlamaRotaryEmbedding.forward

    def noisy(self, x, position_ids):
        cos, sin = original(self, x, position_ids)
        return torch.where(position_ids[..., None] >= start, cos * 1.001, cos), sin

    monkeypatch.setattr(LlamaRotaryEmbedding, "forward", noisy)


@pytest.mark.parametrize("start", [0, 20])
def test_unreproducible_cos_sin_fall_back_to_the_table(monkeypatch, start):
    """cos/sin that are not a function of the recorded positions and frequencies (here: noise from position
    ``start``, i.e. at the prefill or mid-generation) are detected on write: the cache warns, keeps the model's table
    from then on (recomputing the earlier, checked rows into it) and stays exact, dynamic and static."""
    from hf_slim.rope import RotaryFallbackWarning

    _noisy_rotary(monkeypatch, start)
    vanilla, slim = pair("llama")
    with pytest.warns(RotaryFallbackWarning, match="recomputed from the positions differ"):
        caches = _decode_logits(vanilla, slim, steps=16)
    rotary = caches["slim"].rotary
    assert rotary.positions is None and rotary.table.states.shape == (3, caches["slim"].get_seq_length(), 32)
    common = dict(cache_implementation="static", do_sample=False)
    with pytest.warns(RotaryFallbackWarning):
        actual = _generate(slim, **common)
    assert_same_tokens(actual.sequences, _generate(vanilla, **common).sequences, "static cache, fallback")


def test_missing_position_ids_fall_back_to_the_table():
    """An attention call without ``position_ids`` (nothing to recompute from) keeps the cos/sin table, exactly."""
    from hf_slim.rope import RotaryFallbackWarning

    vanilla, slim = pair("llama")
    ids = torch.randint(0, vanilla.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    cache = SlimCache()
    with torch.no_grad():
        hidden = slim.model.embed_tokens(ids)
        cos_sin = slim.model.rotary_emb(hidden, torch.arange(8)[None])
        attention = slim.model.layers[0].self_attn
        with pytest.warns(RotaryFallbackWarning, match="no position_ids"):
            attention(hidden_states=hidden, position_embeddings=cos_sin, attention_mask=None, **with_cache(cache))
    assert cache.rotary.table.states.shape == (1, 8, 32) and cache.rotary.positions is None


RECOMPUTE_MUTATIONS = {
    "position off by one": ("llama", "position"),
    "position off by one, dynamic NTK": ("llama-dynamic", "position"),
    "position off by one, GPT-J": ("gptj", "position"),
    "regime ignored, dynamic NTK": ("llama-dynamic", "regime"),
    "regime ignored, longrope": ("phi3-longrope", "regime"),
}


@pytest.mark.parametrize("case", list(RECOMPUTE_MUTATIONS))
def test_recompute_mutations_are_caught(monkeypatch, case):
    """A wrong recompute (positions shifted by one; every token read with the first regime's frequencies, i.e.
    dynamic NTK / longrope without regimes) is caught by the check on write (fallback, exact logits); with the
    check disabled, the 40-step logits comparison fails: both guards can fail."""
    import hf_slim.rope
    import hf_slim.rotary_positions
    from hf_slim.rope import RotaryFallbackWarning
    from hf_slim.rotary_positions import RotaryPositions

    name, what = RECOMPUTE_MUTATIONS[case]
    if what == "position":
        frequency_table, sinusoid_table = hf_slim.rope.frequency_table, hf_slim.rope.sinusoid_table
        monkeypatch.setattr(
            hf_slim.rope, "frequency_table", lambda positions, *rest: frequency_table(positions + 1, *rest)
        )
        monkeypatch.setattr(
            hf_slim.rope, "sinusoid_table", lambda table, positions, dtype: sinusoid_table(table, positions + 1, dtype)
        )
    else:
        register = RotaryPositions._regime_id
        monkeypatch.setattr(
            RotaryPositions, "_regime_id", lambda self, source, device: 0 * register(self, source, device)
        )
    vanilla, slim = pair(name)
    with pytest.warns(RotaryFallbackWarning):
        caches = _decode_logits(vanilla, slim)
    assert caches["slim"].rotary.table is not None
    monkeypatch.setattr(hf_slim.rotary_positions, "reproduces", lambda recomputed, handed: True)
    with pytest.raises(AssertionError, match="relative max difference"):
        _decode_logits(vanilla, slim)


@pytest.mark.parametrize("name", ["llama-dynamic", "phi3-longrope", "gptj"])
def test_crop_and_continue_match(name):
    """Cropping back below the original context (assisted decoding does) and decoding on: positions are cropped with
    the layers, and dynamic NTK / longrope return to their original frequencies, found among the recorded regimes."""
    vanilla, slim = pair(name)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, vanilla.config.vocab_size, (2, 40), generator=generator)
    steps = torch.randint(0, vanilla.config.vocab_size, (2, 12), generator=generator)
    caches = {"vanilla": DynamicCache(), "slim": SlimCache()}
    logits = {}
    with torch.no_grad():
        for label, model in (("vanilla", vanilla), ("slim", slim)):
            model(input_ids=ids, **with_cache(caches[label]))
            caches[label].crop(-20)  # 20 tokens left, then 12 more: within the original context
            logits[label] = torch.cat(
                [model(input_ids=steps[:, i : i + 1], **with_cache(caches[label])).logits for i in range(12)], 1
            )
    assert_close_relative(logits["slim"], logits["vanilla"], LOGITS_RTOL[torch.float32], "crop and continue")
    rotary = _assert_half_plus_positions(slim, caches["slim"], caches["vanilla"])
    assert rotary.positions.states.shape[1] == 32
    if name != "gptj":
        assert len(rotary.scales) == 2, rotary.scales  # the frequencies at 40 tokens, then the original ones


@torch.no_grad()
def test_longrope_decode_compiles_across_the_factor_switch():
    """A history-dependent type under ``torch.compile`` with a static cache: the regime registration graph-breaks
    (as transformers' own dynamic update may), compiled decode steps across the longrope switch match eager ones."""
    # a fresh dynamo: compiled tests before this one share hf_slim's code objects, and past dynamo's recompile limit
    # their frames run eagerly around inductor's cos/sin, whose rounding the positions check then (rightly) refuses
    # to reproduce: the cache falls back to the table (exact, 0.2% larger), not what this test is about
    torch._dynamo.reset()
    slim = pair("phi3-longrope")[1]
    ids = torch.randint(0, slim.config.vocab_size, (1, 34), generator=torch.Generator().manual_seed(6))
    caches = [SlimCache(2, max_cache_len=36) for _ in range(2)]
    for cache in caches:
        slim(input_ids=ids[:, :31], **with_cache(cache))
    torch._dynamo.reset()  # fresh caches: every model's forward shares one transformers wrapper frame
    compiled = torch.compile(slim.forward, dynamic=False)
    for position in range(31, 34):
        step = dict(input_ids=ids[:, position : position + 1], position_ids=torch.tensor([[position]]))
        step["attention_mask"] = torch.ones(1, 36)
        eager = slim(**step, **with_cache(caches[0])).logits
        traced = compiled(**step, **with_cache(caches[1])).logits
        assert_close_relative(traced, eager, 1e-5, f"compiled vs eager decode step at {position}")
    assert len(caches[1].rotary.scales) == 2, "the short and long factors"
