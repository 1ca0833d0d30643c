"""sample(), make_plan() and plan_step(): validation, dtypes, callbacks, the plan contract."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.sampling import (
    INPUT_SCALE,
    NEXT_FROM_PREV_X0,
    NOISE_STD,
    SAMPLERS,
    NoiseSchedule,
    apply_plan_row,
    combine_guidance,
    make_plan,
    plan_step,
    sample,
)
from fastdiff.sampling.plan import rows_per_step
from tests.sampling.helpers import SD_BETAS, toy_model

# (skip_prk_steps: PNDM's PLMS steps only, as SD 1.x configs ask; the other samplers ignore it)
SCHEDULE = NoiseSchedule(
    **SD_BETAS, beta_schedule="scaled_linear", steps_offset=1, skip_prk_steps=True
)


def test_top_level_exports():
    assert fastdiff.sample is sample
    assert fastdiff.NoiseSchedule is NoiseSchedule
    assert callable(fastdiff.classifier_free_guidance) and callable(fastdiff.diffusion_loss)
    assert fastdiff.combine_guidance is combine_guidance


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_plan_shapes_and_contract(sampler):
    plan = make_plan(SCHEDULE, sampler, 12)
    # Euler through Karras levels calls the model at fractional timesteps, as diffusers does,
    # and KDPM2 at its midpoints' levels.
    fractional = sampler.startswith("kdpm2") or sampler in (
        "euler_karras",
        "heun_karras",
        "lms_karras",
    )
    assert plan.timesteps.dtype == (torch.float64 if fractional else torch.long)
    # Heun and KDPM2: two model calls a step, one the last
    rows = 23 if sampler.startswith(("heun", "kdpm2")) else 12
    assert rows == 12 * rows_per_step(sampler) - (rows_per_step(sampler) - 1)
    rows += sampler == "pndm"  # PNDM: the second timestep called twice
    assert plan.timesteps.shape == (rows,)
    assert plan.coefficients.dtype == torch.float64 and plan.coefficients.shape == (rows, 10)
    if sampler.startswith("heun"):  # each step's correction calls the model at the next timestep
        assert torch.equal(plan.timesteps[1::2], plan.timesteps[2::2])
        assert bool((plan.timesteps[::2].diff() < 0).all())
    elif sampler == "pndm":
        assert plan.timesteps[1] == plan.timesteps[2]
        assert bool((plan.timesteps[2:].diff() < 0).all()) and plan.timesteps[0] > plan.timesteps[1]
    elif sampler.startswith("kdpm2_ancestral"):  # each midpoint is the next level (in float32;
        # with Karras levels the steps' timesteps are rounded, the midpoints' not)
        torch.testing.assert_close(plan.timesteps[1::2], plan.timesteps[2::2], rtol=0, atol=0.501)
        assert bool((plan.timesteps[::2].diff() < 0).all())
    else:
        assert bool((plan.timesteps.diff() < 0).all())
    stochastic = ("ddpm", "euler_ancestral", "lcm", "kdpm2_ancestral", "kdpm2_ancestral_karras")
    assert plan.stochastic == (sampler in stochastic or "_sde" in sampler)
    # (Heun and KDPM2: the step's first call's x0)
    multistep = sampler.startswith(("dpmpp", "unipc", "heun", "pndm", "lms", "kdpm2"))
    assert (plan.coefficients[:, NEXT_FROM_PREV_X0] != 0).any() == multistep
    # DPM-Solver++(3M) and UniPC's corrector reach two rows back, LMS three, PNDM's PLMS four
    assert plan.reads_prev2 == sampler.startswith(("dpmpp_3m", "unipc", "pndm", "lms"))
    depth = {"pndm": 4, "lms": 3, "lms_karras": 3}.get(sampler)
    depth = depth or (2 if plan.reads_prev2 else int(multistep))
    assert plan.history_depth == depth
    if sampler.startswith(("euler", "heun", "lms", "kdpm2")):
        assert plan.init_noise_scale > 5 and (plan.coefficients[:, INPUT_SCALE] < 1).all()
    else:
        assert plan.init_noise_scale == 1.0 and (plan.coefficients[:, INPUT_SCALE] == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_dtype_callback_and_timestep_type(sampler, dtype):
    seen = []

    fractional = ("euler_karras", "heun_karras", "lms_karras")
    fractional = sampler in fractional or sampler.startswith("kdpm2")
    t_dtype = torch.float32 if fractional else torch.long

    def model(x, t):
        assert x.dtype == dtype and t.dtype == t_dtype and t.shape == (3,)
        return toy_model(x, t)

    x_T = torch.randn(3, 2, 5, dtype=dtype)
    result = sample(
        model,
        x_T,
        SCHEDULE,
        sampler,
        6,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x: seen.append((i, t, x.dtype)),
    )
    assert result.dtype == dtype and result.shape == x_T.shape
    plan = make_plan(SCHEDULE, sampler, 6)
    assert seen == [(i, t, dtype) for i, t in enumerate(plan.timesteps.tolist())]


def test_stochastic_sampling_is_reproducible_with_a_generator():
    x_T = torch.randn(2, 4)
    first = sample(toy_model, x_T, SCHEDULE, "ddpm", 5, generator=torch.Generator().manual_seed(1))
    again = sample(toy_model, x_T, SCHEDULE, "ddpm", 5, generator=torch.Generator().manual_seed(1))
    other = sample(toy_model, x_T, SCHEDULE, "ddpm", 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_unknown_names_list_the_allowed_values():
    with pytest.raises(
        ValueError,
        match=r"allowed: \['ddpm', 'ddim', 'euler', 'euler_ancestral', 'euler_karras', "
        r"'dpmpp_2m', 'dpmpp_2m_karras', 'dpmpp_2m_sde', 'dpmpp_2m_sde_karras', 'dpmpp_3m', "
        r"'dpmpp_3m_karras', 'dpmpp_3m_sde', 'dpmpp_3m_sde_karras', 'heun', 'heun_karras', "
        r"'kdpm2', 'kdpm2_karras', 'kdpm2_ancestral', 'kdpm2_ancestral_karras', 'pndm', 'lms', "
        r"'lms_karras', 'lcm', 'tcd', 'unipc', 'unipc_karras'\]",
    ):
        sample(toy_model, torch.randn(1, 2), SCHEDULE, "dpm2", 5)
    with pytest.raises(ValueError, match="allowed"):
        NoiseSchedule(timestep_spacing="even")
    with pytest.raises(ValueError, match="allowed"):
        NoiseSchedule(beta_schedule="sigmoid")


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_step_count_is_checked(steps):
    with pytest.raises(ValueError, match="steps must be in"):
        sample(toy_model, torch.randn(1, 2), SCHEDULE, "ddim", steps)


def test_eta_is_checked():
    with pytest.raises(ValueError, match="ddim"):
        make_plan(SCHEDULE, "euler", 5, eta=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_plan(SCHEDULE, "ddim", 5, eta=1.5)


def test_model_output_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        sample(lambda x, t: torch.zeros(2, 3), torch.randn(2, 4), SCHEDULE, "ddim", 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_model_output_names_the_step(bad):
    plan = make_plan(SCHEDULE, "dpmpp_2m", 5)

    def model(x, t):
        output = toy_model(x, t)
        if int(t[0]) == int(plan.timesteps[3]):
            output[0, 1] = bad
        return output

    with pytest.raises(RuntimeError, match=rf"step 3 \(timestep {int(plan.timesteps[3])}\)"):
        sample(model, torch.randn(2, 4), SCHEDULE, "dpmpp_2m", 5)


def test_generator_is_checked():
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got 42"):
        sample(toy_model, torch.randn(2, 4), SCHEDULE, "ddpm", 3, generator=42)


def test_x_T_is_checked():
    with pytest.raises(ValueError, match="floating-point"):
        sample(toy_model, torch.ones(2, 3, dtype=torch.long), SCHEDULE, "ddim", 5)
    # A model that ignores x (or an x0 model) used to hand the NaN back as the sample.
    start = torch.randn(2, 3)
    start[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x_T .* contains NaN or inf"):
        sample(lambda x, t: torch.zeros_like(x), start, SCHEDULE, "ddim", 5)


def test_plan_step_formulas_and_noise():
    plan = make_plan(SCHEDULE, "ddpm", 4)
    x, m, x0_prev = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    noise = torch.randn(2, 3)
    c = plan.coefficients[1].tolist()
    x_next, x0 = plan_step(plan, 1, x, m, x0_prev, noise)
    expected_x0 = c[1] * (c[0] * x) + c[2] * m
    assert torch.allclose(x0, expected_x0)
    assert torch.allclose(x_next, c[3] * x + c[4] * expected_x0 + c[5] * x0_prev + c[6] * noise)
    with pytest.raises(ValueError, match="noise"):
        plan_step(plan, 1, x, m, x0_prev)
    with pytest.raises(ValueError, match="out of range"):
        plan_step(plan, 4, x, m, x0_prev, noise)
    # A [7] tensor row (e.g. read from a device tensor) gives the same numbers.
    assert torch.equal(apply_plan_row(plan.coefficients[1], x, m, x0_prev, noise)[0], x_next)
    assert plan.coefficients[-1, NOISE_STD] == 0  # no noise into the final sample


def test_plan_step_keeps_half_precision_inputs_in_their_dtype():
    plan = make_plan(SCHEDULE, "dpmpp_2m", 4)
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    x_next, x0 = plan_step(plan, 2, x.half(), m.half(), m.half())
    reference, _ = plan_step(plan, 2, x.half().float(), m.half().float(), m.half().float())
    assert x_next.dtype == torch.float16 and x0.dtype == torch.float16
    assert torch.allclose(x_next.float(), reference, atol=2e-3)


def test_plan_step_folds_in_guidance_like_the_fused_kernel():
    plan = make_plan(SCHEDULE, "dpmpp_2m", 6)
    x, x0_prev = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    uncond, cond = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    guided = plan_step(plan, 3, x, torch.cat([uncond, cond]), x0_prev, guidance_scale=6.0)
    combined = plan_step(plan, 3, x, combine_guidance(uncond, cond, 6.0), x0_prev)
    for mine, reference in zip(guided, combined, strict=True):
        assert torch.allclose(mine, reference, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[uncond; cond\]"):
        plan_step(plan, 3, x, torch.cat([uncond, cond, cond]), x0_prev, guidance_scale=6.0)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_sampling_matches_cpu(sampler):
    seen_devices = []

    def model(x, t):
        seen_devices.append((x.device.type, t.device.type))
        return toy_model(x, t)

    x_T = torch.randn(2, 4, 8, 8)
    generator = torch.Generator(device="cuda").manual_seed(0)
    on_gpu = sample(model, x_T.cuda(), SCHEDULE, sampler, 8, generator=generator)
    assert on_gpu.device.type == "cuda" and set(seen_devices) == {("cuda", "cuda")}
    if not make_plan(SCHEDULE, sampler, 8).stochastic:  # same numbers as on the CPU
        on_cpu = sample(toy_model, x_T, SCHEDULE, sampler, 8)
        assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)


STOCHASTIC = [s for s in SAMPLERS if make_plan(SCHEDULE, s, 8).stochastic]


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", [*STOCHASTIC, "ddim"])  # ddim with eta = 1
def test_cpu_generator_drives_cuda_sampling_with_the_same_noise(sampler):
    # A CUDA generator draws other numbers than a CPU one; a CPU generator gives CUDA latents the
    # CPU run's noise, so the stochastic samplers are compared with the CPU here.
    x_T = torch.randn(2, 4, 8, 8)
    eta = 1.0 if sampler == "ddim" else 0.0
    on_cpu = sample(
        toy_model, x_T, SCHEDULE, sampler, 8, eta=eta, generator=torch.Generator().manual_seed(3)
    )
    on_gpu = sample(
        toy_model,
        x_T.cuda(),
        SCHEDULE,
        sampler,
        8,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
    )
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)
