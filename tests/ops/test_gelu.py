"""kernels/gelu.py: the polynomial erf GELU (Abramowitz & Stegun 7.1.26) the half-precision
GEGLU kernels may take, against the exact GELU computed in float64."""

from __future__ import annotations

import math

import fastdiff.kernels.gelu as gelu_kernels
import pytest
import torch
import triton
import triton.language as tl

from tests.ops.helpers import DEVICE


@triton.jit
def gelu_kernel(x_ptr, y_ptr, n, POLYNOMIAL_ERF: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(y_ptr + offsets, gelu_kernels.gelu_erf(x, POLYNOMIAL_ERF), mask=mask)


def gelu_of(x: torch.Tensor, polynomial: bool) -> torch.Tensor:
    y = torch.empty_like(x)
    gelu_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), polynomial, 256)
    return y


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.special.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("polynomial", [False, True], ids=["libdevice", "polynomial"])
def test_gelu_erf_within_its_bound_over_the_range_that_matters(triton_backend, polynomial):
    """fp32 math: the polynomial erf's error is at most 1.5e-7, so the GELU's at most
    7.5e-8 |g|, plus the fp32 rounding of a few operations."""
    x = torch.cat([torch.linspace(-12, 12, 24001), torch.randn(4000) * 3]).to(DEVICE)
    error = (gelu_of(x, polynomial).double() - exact_gelu(x)).abs()
    bound = 7.5e-8 * x.double().abs() + 4 * torch.finfo(torch.float32).eps * exact_gelu(x).abs()
    assert bool((error <= bound + 1e-30).all()), (error - bound).max().item()


# The interpreter computes with numpy, which warns on inf * 0 and on g² overflowing: expected here.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_polynomial_gelu_keeps_the_special_values(triton_backend):
    """The same answers as libdevice's erf GELU: +inf stays +inf, -inf and NaN give NaN (-inf
    times a zero), zeros keep their sign, far negative gates give (minus) zero."""
    specials = torch.tensor(
        [math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-30, -1e-30, 1e20, -1e20, -30.0, 30.0],
        device=DEVICE,
    )
    want = gelu_of(specials, polynomial=False)
    got = gelu_of(specials, polynomial=True)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-7, atol=0)
    assert torch.equal(got[finite].signbit(), want[finite].signbit())
