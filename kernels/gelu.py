"""The exact (erf) GELU as a Triton device function, shared by the GEGLU kernels.

gelu(g) = g · Φ(g) = ½ g (1 + erf(g / √2)). With libdevice's ``erff`` the GEGLU kernel runs
about 39 SASS instructions per element on sm_90, most of them the erf's (two polynomials chosen
per element, their coefficients moved into registers and selected): by estimate it issues about
as long as it waits for memory, and it moved 2.3 TB/s of the H200's 4.1 at 2×4096×2560 (fourth
run; benchmarks/NOTES.md). For half-precision
outputs ``POLYNOMIAL_ERF`` uses Abramowitz & Stegun 7.1.26 instead: erfc(z) ≈ t (a₁ + t (a₂ + t
(a₃ + t (a₄ + t a₅)))) e^(−z²) with t = 1 / (1 + p z), z = |g| / √2 ≥ 0, absolute error at most
1.5e-7 in erf; one reciprocal and one exp2 on the SFU, five FMAs. The GELU's error is then at
most 7.5e-8 · |g|, far below the rounding of an fp16 or bf16 result (about 4.9e-4 and 3.9e-3 of
it); fp32 keeps libdevice's erf.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Half-precision GEGLU kernels take the polynomial erf (the GEGLU kernel's launcher and the fused
# projection's read this). Off until a GPU times it: bench_geglu's and bench_linear_geglu's
# fastdiff-polyerf rows against their fastdiff rows decide (benchmarks/NOTES.md).
POLYNOMIAL_ERF = False


@triton.jit
def gelu_erf(gate, POLYNOMIAL_ERF: tl.constexpr):
    """½ g (1 + erf(g / √2)) of an fp32 tile: libdevice's erf, or with POLYNOMIAL_ERF
    Abramowitz & Stegun's 7.1.26 (Handbook of Mathematical Functions, 1964) for half-precision
    results only (see the module docstring)."""
    if POLYNOMIAL_ERF:
        # z = |g| / √2 folded into the constants: p / √2, the aᵢ / 2 (for ½ erfc), and
        # e^(−z²) = 2^(−log₂(e) g² / 2).
        t = tl.fdiv(1.0, 1.0 + 0.2316418882663604 * tl.abs(gate))  # rcp.approx and a multiply
        half_poly = 0.127414796 + t * (
            -0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))
        )
        half_erfc = t * half_poly * tl.math.exp2(-0.7213475204444817 * gate * gate)  # ½ erfc(z)
        # Φ(g) = ½ erfc(|g| / √2) for g < 0, 1 − ½ erfc(|g| / √2) otherwise
        return gate * tl.where(gate < 0, half_erfc, 1.0 - half_erfc)
    return 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
