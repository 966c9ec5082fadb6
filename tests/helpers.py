"""Comparison helpers shared by the equivalence tests: relative tolerances per dtype, errors that show the numbers."""

from __future__ import annotations

import torch

from hf_slim._compat import returned_cache, with_cache  # noqa: F401  (with_cache: re-exported for the tests)

#: Relative tolerance on logits, per dtype: fp32 per the issue; half precisions are compared on tokens instead.
LOGITS_RTOL = {torch.float32: 1e-5}


def cache_of(output):
    """The cache a model or generate() output carries, whatever the installed transformers calls the field."""
    return returned_cache(output)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "logits") -> None:
    """Fail with the measured max difference when ``actual`` is not within ``rtol`` (relative) of ``expected``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = relative_difference(actual, expected)
    max_abs = float((actual.double() - expected.double()).abs().max())
    assert difference <= rtol, f"{what}: relative max difference {difference:.3e} > {rtol:.0e} (max abs {max_abs:.3e})"


def assert_same_tokens(actual: torch.Tensor, expected: torch.Tensor, what: str = "tokens") -> None:
    """Token ids must be identical; on failure show where the first difference is."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        rows, cols = torch.nonzero(actual != expected, as_tuple=True)
        raise AssertionError(
            f"{what} differ first at row {rows[0].item()} position {cols[0].item()}:\n"
            f"slim     {actual[rows[0]].tolist()}\nvanilla  {expected[rows[0]].tolist()}"
        )


#: The generate() variants every encoder-decoder family is compared on: greedy, 3 beams returning 2 sequences each,
#: seeded sampling returning 2.
GENERATE_CASES = (
    dict(),
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, top_k=20, num_return_sequences=2),
)


def assert_encoder_decoder_generate_identical(generate, vanilla, slim, what: str) -> None:
    """``generate(model, **case)`` of the unpatched and the slim encoder-decoder, seeded alike, for each of
    :data:`GENERATE_CASES` (``return_dict_in_generate=True``, ``output_scores=True``): identical tokens, rows that
    differ (a random model stuck on one token would prove nothing), beam scores within 1e-5, and a slim
    self-attention cache where one comes back."""
    from hf_slim import SlimCache

    for kwargs in GENERATE_CASES:
        torch.manual_seed(0)
        expected = generate(vanilla, **kwargs)
        torch.manual_seed(0)
        actual = generate(slim, **kwargs)
        assert_same_tokens(actual.sequences, expected.sequences, f"{what} {kwargs}")
        assert len(set(map(tuple, expected.sequences.tolist()))) > 1, "every row generated the same tokens"
        if "num_beams" in kwargs:
            difference = float((actual.sequences_scores - expected.sequences_scores).abs().max())
            assert difference <= 1e-5, f"beam scores differ by {difference:.3e}"
        else:
            assert isinstance(cache_of(actual).self_attention_cache, SlimCache)


def bf16_steps(top: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``(top - second) / (2**-7 * max(|top|, |second|))``: a score gap in bf16 steps (2**-7 relative) at its size.

    Two bf16 models that round at different places (slim vs unpatched differ by about one such step) can pick
    different greedy tokens only where the gap is about 1 or less.
    """
    top, second = top.float(), second.float()
    return (top - second) / (2.0**-7 * torch.maximum(top.abs(), second.abs()))


def greedy_margins(scores: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Top-1 margins in bf16 steps (:func:`bf16_steps`) of generate()'s ``output_scores`` (processed scores, one
    ``(batch, vocab)`` per step): ``(batch, steps)``."""
    top = torch.stack([step.float().topk(2, dim=-1).values for step in scores], dim=1)  # (b, steps, 2)
    return bf16_steps(top[..., 0], top[..., 1])


def logit_differences_in_bf16_steps(
    actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """``max |actual - expected|`` per row and step of generate()'s ``output_logits`` (one ``(batch, vocab)`` per
    step), in bf16 steps of each row's largest expected logit (``2**-7 * max |expected|``): comparable with
    :func:`greedy_margins`. Returns ``(batch, steps)``."""
    steps = []
    for got, want in zip(actual, expected, strict=True):
        got, want = got.float(), want.float()
        steps.append((got - want).abs().amax(dim=-1) / (2.0**-7 * want.abs().amax(dim=-1)))  # (batch,)
    return torch.stack(steps, dim=1)


def logit_difference_in_bf16_steps(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    """The largest of :func:`logit_differences_in_bf16_steps`."""
    return float(logit_differences_in_bf16_steps(actual, expected).max())


#: bf16 steps (:func:`bf16_steps`) by which every greedy token of a sharpened tiny model
#: (:func:`tiny_models.sharpen_greedy`) must lead the runner-up, and by which slim and unpatched bf16 logits may
#: differ on that path. Measured: margins 31.8-54.9, differences at most 1.34 (a dropped value bias gives 4.9-27) on
#: the BART family and composites; on the decoder-only families, GPT-2 and T5 margins 32.7-52.0, differences at most
#: 2.51 (Falcon; BLOOM 14.7, its unpatched model's own error, see ``reference``; a dropped value bias gives 12-48).
BF16_MIN_MARGIN, BF16_MAX_DIFFERENCE = 16.0, 4.0


def assert_bf16_greedy_identical(
    vanilla: torch.nn.Module,
    slim: torch.nn.Module,
    inputs: dict,
    path: torch.Tensor,
    generate_kwargs: dict,
    what: str,
    reference: torch.nn.Module | None = None,
) -> None:
    """Greedy tokens of the slim bf16 model equal the unpatched bf16 model's, strictly, and for a reason.

    On the unpatched model's path: every top-1 margin is at least ``BF16_MIN_MARGIN`` bf16 steps (else the model is
    not peaked and a token difference could be a tie), the path is ``path`` (the float32 model's, that
    ``sharpen_greedy`` made confident), rows differ, the tokens are identical, and the slim logits differ from the
    unpatched ones by at most ``BF16_MAX_DIFFERENCE`` steps (4x below the margin, so identity is no luck).

    ``reference``: the float32 model of ``path``, for models whose unpatched bf16 logits are themselves off float32
    by more than rounding (BLOOM, whose ALiBi scores are summed in bf16: up to 15 steps off on a sharpened path,
    where the slim model's are within 2). Slim may then differ from the unpatched model by its own error too: the
    bound per row and step is ``BF16_MAX_DIFFERENCE`` + the unpatched model's distance from ``reference``.
    """
    greedy = dict(generate_kwargs, output_logits=True, output_scores=True, return_dict_in_generate=True)
    expected, actual = vanilla.generate(**inputs, **greedy), slim.generate(**inputs, **greedy)
    margin = float(greedy_margins(expected.scores).min())
    assert margin >= BF16_MIN_MARGIN, f"{what}: unpatched bf16 top-1 margin {margin:.1f} bf16 steps: not peaked"
    assert torch.equal(expected.sequences, path), f"{what}: the unpatched bf16 model left the float32 greedy path"
    assert len(set(map(tuple, expected.sequences.tolist()))) == len(path), f"{what}: rows generated the same tokens"
    assert_same_tokens(actual.sequences, expected.sequences, f"{what} bf16 greedy (margins >= {margin:.1f})")
    difference = logit_differences_in_bf16_steps(actual.logits, expected.logits)  # (batch, steps)
    allowed = torch.full_like(difference, BF16_MAX_DIFFERENCE)
    if reference is not None:
        exact = reference.generate(**inputs, **greedy)
        assert torch.equal(exact.sequences, path), f"{what}: the float32 reference left its own greedy path"
        allowed += logit_differences_in_bf16_steps(expected.logits, exact.logits)
    worst = int((difference - allowed).argmax())
    assert bool((difference <= allowed).all()), (
        f"{what}: slim vs unpatched bf16 logits differ by {difference.flatten()[worst]:.2f} steps "
        f"(allowed {allowed.flatten()[worst]:.2f}; largest difference {difference.max():.2f})"
    )


def encoder_decoder_step_logits(model: torch.nn.Module, inputs: dict, decoder_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of an encoder-decoder, one decoder token per step over the model's own cache:
    ``decoder_ids: (batch, steps)`` -> ``(batch, steps, vocab)`` float64 (``inputs``: the encoder's)."""
    cache, steps = None, []
    with torch.no_grad():
        for position in range(decoder_ids.shape[1]):
            out = model(**inputs, decoder_input_ids=decoder_ids[:, position : position + 1], **with_cache(cache))
            cache = cache_of(out)
            steps.append(out.logits.double())
    return torch.cat(steps, dim=1)


def assert_as_accurate_as_unpatched(logits: dict[str, torch.Tensor], what: str) -> None:
    """The half-precision bar: the slim model's logits are at most 1.5x as far from the float32 model's as the
    unpatched model's are (max absolute difference). ``logits``: ``reference`` (float32), ``vanilla``, ``slim``."""
    vanilla_error = float((logits["vanilla"] - logits["reference"]).abs().max())
    slim_error = float((logits["slim"] - logits["reference"]).abs().max())
    assert slim_error <= 1.5 * vanilla_error, f"{what}: slim error {slim_error:.3g} vs unpatched {vanilla_error:.3g}"


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, set[str]]]:
    """A copy of the weights and each module's instance attribute names, for :func:`assert_unchanged`."""
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return state, {name: set(vars(module)) for name, module in model.named_modules()}


def assert_unchanged(model: torch.nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, set[str]]]) -> None:
    """The model has exactly the instance attributes and bit-identical weights it had at :func:`snapshot` time."""
    state_before, attributes_before = before
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    for name, tensor in state_before.items():
        assert torch.equal(tensor, state_after[name]), name


def without_derived_state_checks(monkeypatch, model: torch.nn.Module) -> None:
    """Switch off the K-mode derived-state checks of ``model`` (per step and per generate()), for mutation tests
    that edit W_KV / z_proj in place: the checks would see buffers that no longer fit the weights and solve them
    again, undoing the mutation."""
    for module in model.modules():
        state = vars(module).get("hf_slim")
        if state is not None and state.k_source is not None:
            monkeypatch.setattr(state.k_source, "check", lambda *args: None)
            monkeypatch.setattr(state.k_source, "verify", lambda *args: None)
