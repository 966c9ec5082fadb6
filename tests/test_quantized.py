"""Quantized projections: used by the slim path only where hf_slim knows exactly what the layer computes.

bitsandbytes 4-bit, optimum-quanto weight-only (frozen or not) and torchao weight-only layers compute
``x @ dequantize(W).T + b``: the input cache reads their dequantized weights and matches the unpatched quantized model
(fp32 logits within 1e-5, identical tokens). bitsandbytes 8-bit (LLM.int8()) and every layer that quantizes its
input compute something no fixed weight reproduces, and unknown ``nn.Linear`` subclasses are not trusted: slimify
refuses them with the model untouched. The K cache is refused on quantized projections (each layer falls back).

The three libraries install on CPU machines; each test needs only its own (bitsandbytes and optimum-quanto are in the
test extra; torchao is not, see pyproject.toml, and its tests skip without it).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from helpers import LOGITS_RTOL, assert_close_relative, assert_same_tokens, cache_of, with_cache
from tiny_models import tiny_decoder, tiny_gpt2, tiny_rope, tiny_tokenizer
from transformers import AutoModelForCausalLM

from hf_slim import SlimFallbackWarning, is_slim, slim_record, slimify
from hf_slim.adapters import UnsupportedProjectionError, read_projection
from hf_slim.kmode import StaleKModeWeights

PROMPTS = ["the quick brown fox", "slim attention keeps one tensor per token instead of", "memory"]
RTOL = LOGITS_RTOL[torch.float32]
BUILDERS = {"gpt2": tiny_gpt2, "opt": lambda: tiny_decoder("opt"), "llama": lambda: tiny_rope("llama")}


def needs(package: str, reason: str = ""):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"needs {package} {reason}".strip())


@pytest.fixture(autouse=True)
def quiet():
    """The quantization libraries warn about their own kernels (fp16 casts, missing optional kernel packages)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="bitsandbytes|optimum|torchao")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def batch() -> dict:
    return dict(tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True))


@torch.no_grad()
def decode_logits(model, steps: int = 12) -> torch.Tensor:
    """Left-padded prefill, then ``steps`` greedy one-token steps through the model's cache: ``(steps + 1, b, V)``."""
    inputs = batch()
    mask = inputs["attention_mask"]
    output = model(**inputs, use_cache=True)
    logits, cache = [output.logits[:, -1]], cache_of(output)
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)  # (b, 1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        output = model(token, attention_mask=mask, **with_cache(cache), use_cache=True)
        logits.append(output.logits[:, -1])
        cache = cache_of(output)
    return torch.stack(logits)


def generate(model, **kwargs) -> torch.Tensor:
    return model.generate(**batch(), max_new_tokens=16, min_new_tokens=16, do_sample=False, **kwargs)


def assert_matches(slim, vanilla, rtol: float = RTOL) -> None:
    assert_close_relative(decode_logits(slim), decode_logits(vanilla), rtol, "prefill + 12 decode steps")
    for kwargs in (dict(), dict(num_beams=3)):
        assert_same_tokens(generate(slim, **kwargs), generate(vanilla, **kwargs), f"generate {kwargs}")


def assert_refused_untouched(model, mode: str, match: str) -> None:
    with pytest.raises(UnsupportedProjectionError, match=match):
        slimify(model, mode)
    assert not is_slim(model)
    patched = [name for name, module in model.named_modules() if {"forward", "hf_slim"} & set(vars(module))]
    assert not patched, patched


# --- bitsandbytes ---


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """The tiny models saved once, for from_pretrained(quantization_config=...)."""
    saved = {}
    for name, build in BUILDERS.items():
        saved[name] = tmp_path_factory.mktemp(name)
        build().save_pretrained(saved[name])
    return saved


def bitsandbytes_model(folder, bits: int, cpu_kernel: bool = False, double_quant: bool = False):
    """The model in ``folder`` loaded in 4 or 8 bits. ``cpu_kernel``: let 4-bit layers switch to bitsandbytes' CPU
    kernel (AVX512-BF16 machines: a repacked layout computed in bf16); otherwise they dequantize and multiply in fp32.
    ``double_quant``: the 4-bit block scales are themselves quantized (QLoRA's nested quantization)."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True)
    config.bnb_4bit_compute_dtype = torch.float32
    config.bnb_4bit_use_double_quant = double_quant
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).eval()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = cpu_kernel and module.support_avx512bf16_for_cpu
    return model


@needs("bitsandbytes")
@pytest.mark.parametrize("mode", ["input", "k", "auto"])
def test_bitsandbytes_8bit_is_refused_with_the_model_untouched(folders, mode):
    """LLM.int8() rounds every input row to int8 inside the product: no weight reproduces it (the probe: garbage)."""
    assert_refused_untouched(bitsandbytes_model(folders["opt"], 8), mode, r"8-bit layer \(LLM.int8\(\)\)")
    if mode != "input":
        assert_refused_untouched(bitsandbytes_model(folders["llama"], 8), mode, "LLM.int8")


@needs("bitsandbytes")
@pytest.mark.parametrize(("arch", "double_quant"), [("gpt2", False), ("opt", False), ("opt", True)])
def test_bitsandbytes_4bit_input_cache_is_exact(folders, arch, double_quant):
    """4-bit codes times their block scales, dequantized as the layer does (GPT-2's fused c_attn included)."""
    vanilla = bitsandbytes_model(folders[arch], 4, double_quant=double_quant)
    slim = slimify(bitsandbytes_model(folders[arch], 4, double_quant=double_quant), "input")
    assert_matches(slim, vanilla)


@needs("bitsandbytes")
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_4bit_cpu_kernel_is_matched_as_accurately_as_it_computes(folders, double_quant):
    """On AVX512-BF16 CPUs a 4-bit layer switches at its first forward to a repacked layout computed in bf16. The slim
    decode reads the same weights (bf16 block scales) and computes in fp32: tokens identical, and the logits as close
    to an exact fp32 computation with those weights as the unpatched model's are (within 1.5x), the layer's state
    untouched by the reads. (The kernel rounds its inputs, code values and outputs to bf16: no weight reproduces it
    bit for bit; the weights it multiplies with are probed with the identity, independently of hf_slim.)"""
    import bitsandbytes.functional

    if not bitsandbytes.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps its canonical layout (tested above)")
    vanilla = bitsandbytes_model(folders["opt"], 4, cpu_kernel=True, double_quant=double_quant)
    slim = slimify(bitsandbytes_model(folders["opt"], 4, cpu_kernel=True, double_quant=double_quant), "input")
    expected, actual = decode_logits(vanilla), decode_logits(slim)  # both layers now in the CPU layout
    layer = vanilla.model.decoder.layers[0].self_attn.k_proj
    assert layer.weight.quant_state.packing_format_for_cpu, "the CPU kernel did not engage"
    state = dict(vars(layer.weight.quant_state))
    reference = copy.deepcopy(vanilla)  # every 4-bit layer as a plain fp32 nn.Linear with its effective weight
    for name, module in list(reference.named_modules()):
        if type(module).__name__ == "Linear4bit":
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():  # the weight the kernel multiplies with, probed: row i of layer(I) - b is W[:, i]
                bias = 0 if module.bias is None else module.bias
                probed = module(torch.eye(module.in_features)) - bias  # (in, out)
                read = read_projection(module).weight  # (in, out): the codes in fp32 times the kernel's bf16 scales
                steps = ((read - probed).abs() / (2**-7 * probed.abs()).clamp_min(1e-30)).max()  # zero codes: 0/0
                assert steps <= 1, f"{name}: dequantized weight {float(steps):.2f} bf16 steps from the kernel's"

                dense.weight.copy_(probed.T)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            reference.set_submodule(name, dense)
    assert vars(layer.weight.quant_state).keys() == state.keys() and all(
        vars(layer.weight.quant_state)[key] is value for key, value in state.items()
    ), "reading the weights changed the layer's quantization state"
    exact = decode_logits(reference)
    slim_error, vanilla_error = (float((x - exact).abs().max()) for x in (actual, expected))
    assert 0 < vanilla_error and slim_error <= 1.5 * vanilla_error, (slim_error, vanilla_error)
    for kwargs in (dict(), dict(num_beams=3)):
        assert_same_tokens(generate(slim, **kwargs), generate(vanilla, **kwargs), f"generate {kwargs}")


@needs("bitsandbytes")
def test_k_mode_on_quantized_projections_falls_back_per_layer(folders):
    """The K cache would keep a dense W_KV (more than the quantized K and V weights) calibrated on keys the quantized
    kernel does not compute bit for bit: every layer keeps the input cache (RoPE: its own K and V), with the reason;
    a forced K layer is an error."""
    with pytest.warns(SlimFallbackWarning, match="quantized"):
        slim = slimify(bitsandbytes_model(folders["opt"], 4), "k")
    assert set(slim_record(slim).layer_modes.values()) == {"input"}
    assert_matches(slim, bitsandbytes_model(folders["opt"], 4))
    with pytest.warns(SlimFallbackWarning, match="keep the model's own keys and values:\n.*quantized"):
        rope = slimify(bitsandbytes_model(folders["llama"], 4), "auto")
    assert set(slim_record(rope).layer_modes.values()) == {"kv"}
    assert_same_tokens(generate(rope), generate(bitsandbytes_model(folders["llama"], 4)))
    forced = bitsandbytes_model(folders["opt"], 4)
    names = [f"OPTAttention[self {i}]" for i in range(2)]
    with pytest.raises(ValueError, match="quantized.*use 'input' for this layer"):
        slimify(forced, layer_modes=dict.fromkeys(names, "k"))
    assert not is_slim(forced)


# --- optimum-quanto ---


def quanto_model(arch: str = "opt", frozen: bool = True, activations: bool = False):
    from optimum.quanto import freeze, qint8, quantize

    model = BUILDERS[arch]()
    quantize(model, weights=qint8, activations=qint8 if activations else None)
    if frozen:
        freeze(model)
    return model


@needs("optimum.quanto")
@pytest.mark.parametrize("frozen", [False, True], ids=["quantized-in-forward", "frozen"])
def test_quanto_weight_only_input_cache_is_exact(frozen):
    """Not frozen, QLinear keeps float weights and quantizes them in every forward (the probe: 5e-3 off); frozen, it
    stores them quantized. Either way the slim decode reads the weights the layer multiplies with."""
    assert_matches(slimify(quanto_model(frozen=frozen), "input"), quanto_model(frozen=frozen))


@needs("optimum.quanto")
def test_quanto_activation_quantization_is_refused_and_rope_keeps_own_kv():
    assert_refused_untouched(quanto_model(activations=True), "input", "quantizes activations")
    with pytest.warns(SlimFallbackWarning, match="quantized"):
        rope = slimify(quanto_model("llama", frozen=False), "k")
    assert set(slim_record(rope).layer_modes.values()) == {"kv"}
    assert_same_tokens(generate(rope), generate(quanto_model("llama", frozen=False)))


# --- torchao ---


def torchao_model(config: str = "Int8WeightOnlyConfig", arch: str = "opt"):
    import torchao.quantization

    model = BUILDERS[arch]()
    torchao.quantization.quantize_(model, getattr(torchao.quantization, config)())
    return model


@needs("torchao", "(not in the test extra: pip install 'torchao>=0.17,<0.19')")
@pytest.mark.parametrize("config", ["Int8WeightOnlyConfig", "IntxWeightOnlyConfig"])
def test_torchao_weight_only_input_cache_is_exact(config):
    """The weight is a tensor subclass (``layer.weight.T`` raised NotImplementedError in the probe): read through its
    own dequantize()."""
    assert_matches(slimify(torchao_model(config), "input"), torchao_model(config))


@needs("torchao", "(not in the test extra: pip install 'torchao>=0.17,<0.19')")
def test_torchao_dynamic_activation_quantization_is_refused():
    assert_refused_untouched(torchao_model("Int8DynamicActivationInt8WeightConfig"), "input", "act_quant_kwargs")


# --- layer kinds hf_slim does not know ---


class ScaledLinear(torch.nn.Linear):
    """An ``nn.Linear`` subclass whose forward is not ``x @ W.T + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_unknown_linear_subclasses_are_refused_not_trusted():
    model = tiny_decoder("opt")
    attention = model.model.decoder.layers[1].self_attn
    scaled = ScaledLinear(64, 64)
    scaled.load_state_dict(attention.v_proj.state_dict())
    attention.v_proj = scaled
    assert_refused_untouched(model, "input", r"OPTAttention\[self 1\]: the value projection is a .*ScaledLinear")


def test_the_known_exact_linear_subclasses_still_compute_x_w_t_plus_b():
    """hf_slim reads these ``nn.Linear`` subclasses as plain layers (Falcon's FalconLinear: product, then bias); if a
    transformers release changes what their forward computes, this fails."""
    import importlib

    from hf_slim.adapters import _EXACT_LINEAR_SUBCLASSES

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    for module_name, class_name in sorted(_EXACT_LINEAR_SUBCLASSES):
        cls = getattr(importlib.import_module(module_name), class_name)
        for bias in (True, False):
            layer = cls(16, 8, bias=bias)
            weights = read_projection(layer)
            expected = x @ weights.weight + (0 if weights.bias is None else weights.bias)
            assert_close_relative(layer(x), expected, 1e-6, f"{class_name}(bias={bias})")


@needs("optimum.quanto")
def test_quantizing_a_slim_model_afterwards_is_followed_or_refused():
    """Input cache: it reads the live layers at every step, so a model quantized after slimify is served exactly. K
    cache: quantization changes W_K and W_V, so the next generate() refuses the stale W_KV."""
    from optimum.quanto import freeze, qint8, quantize

    slim = slimify(tiny_decoder("opt"), "input")
    quantize(slim, weights=qint8)
    freeze(slim)
    assert_matches(slim, quanto_model())

    model = tiny_decoder("opt")
    names = [f"OPTAttention[self {i}]" for i in range(2)]
    slimify(model, layer_modes=dict.fromkeys(names, "k"))
    generate(model)
    quantize(model, weights=qint8)
    freeze(model)
    with pytest.raises(StaleKModeWeights, match="changed after slimify"):
        generate(model)
