"""Comparison helpers shared by the equivalence tests: relative tolerances per dtype, errors that show the numbers."""

from __future__ import annotations

import torch

#: Relative tolerance on logits, per dtype: fp32 per the issue; half precisions are compared on tokens instead.
LOGITS_RTOL = {torch.float32: 1e-5}


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
