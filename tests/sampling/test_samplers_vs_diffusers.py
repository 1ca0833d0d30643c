"""Each deterministic sampler against its diffusers counterpart, step by step, for every beta
schedule x timestep spacing x prediction type, zero terminal SNR on and off.

Tolerance: 1e-5 relative to the largest magnitude in play so far (states and x0 estimates of
the diffusers run, initial state included), i.e. max|ours - diffusers| <= 1e-5 * max(1, peak).
For ordinary cases (peak ~ 1-100) this is 1e-5 to 1e-3 absolute; it only widens where fp32 itself
cannot do better: an epsilon model at sigma ~ 4096 (zero-SNR, clamped alphā 2**-24) or
alphā ~ 2e-9 (last cosine step) makes x0 = (x - sigma eps) a cancellation of values ~1e4.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from fastdiff.sampling import BETA_SCHEDULES, PREDICTION_TYPES, NoiseSchedule, make_plan, sample
from tests.sampling.helpers import (
    SD_BETAS,
    assert_trajectories_match,
    run_diffusers,
    scheduler_config,
    toy_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers + numpy 2

REFERENCE = {
    "ddim": lambda **kw: DDIMScheduler(**kw, clip_sample=False),
    "euler": lambda **kw: EulerDiscreteScheduler(**kw),
    "dpmpp_2m": lambda **kw: DPMSolverMultistepScheduler(
        **kw, algorithm_type="dpmsolver++", solver_order=2
    ),
    "dpmpp_3m": lambda **kw: DPMSolverMultistepScheduler(
        **kw, algorithm_type="dpmsolver++", solver_order=3
    ),
    "unipc": lambda **kw: UniPCMultistepScheduler(**kw),
}
SPACINGS = ("leading", "linspace", "trailing")
CASES = list(
    itertools.product(REFERENCE, BETA_SCHEDULES, SPACINGS, PREDICTION_TYPES, (False, True))
)


def assert_started_part_way_matches(reference, schedule, sampler, steps, start, end=None):
    """``reference``, a diffusers scheduler set to ``steps`` (and its begin index), run over its
    timesteps ``start:end`` from a random state, against fastdiff's plan restarted at row
    ``start`` (``start_state``: img2img, a refiner's denoising_start, a denoising_end cut).
    Step noise, where a sampler draws it, comes from one seed on both sides."""
    from fastdiff.pipeline.denoising import start_state
    from fastdiff.sampling import run_plan

    x = torch.randn(2, 3, 4, 4)
    theirs = x.clone()
    plan = make_plan(schedule, sampler, steps)
    # (only the schedulers that draw step noise take a generator)
    noise = {"generator": torch.Generator().manual_seed(2)} if plan.stochastic else {}
    for t in reference.timesteps[start:end]:
        output = toy_model(reference.scale_model_input(theirs, t), t)
        theirs = reference.step(output, t, theirs, **noise).prev_sample
    part, state = start_state(plan, schedule, x, x, start, end, add_noise=False)
    assert len(part) == (end or len(plan)) - start
    ours = run_plan(toy_model, state, part, generator=torch.Generator().manual_seed(2))
    error = float((ours - theirs).abs().max())
    assert error <= 1e-5 * max(1.0, float(theirs.abs().max())), error


@pytest.mark.parametrize("sampler,beta_schedule,spacing,prediction_type,zero_snr", CASES)
def test_sampler_matches_diffusers(sampler, beta_schedule, spacing, prediction_type, zero_snr):
    config = scheduler_config(spacing, prediction_type, zero_snr, beta_schedule)
    schedule = NoiseSchedule(**config, set_alpha_to_one=False)
    extra = {"set_alpha_to_one": False} if sampler == "ddim" else {}
    reference = REFERENCE[sampler](**config, **extra)
    steps = 10  # linspace gives integral Euler timesteps for 10 steps (999 / 9 = 111)
    reference.set_timesteps(steps)
    x_T = torch.randn(2, 3, 4, 4)

    if sampler == "ddim" and zero_snr and prediction_type == "epsilon" and spacing != "leading":
        # alphā is exactly 0 at t = 999: diffusers divides by zero, we refuse up front.
        states, _, _ = run_diffusers(reference, x_T)
        assert not bool(torch.isfinite(states[0]).all())
        with pytest.raises(ValueError, match="zero terminal SNR"):
            make_plan(schedule, sampler, steps)
        return

    plan = make_plan(schedule, sampler, steps)
    assert torch.equal(plan.timesteps, reference.timesteps.round().long())
    assert torch.equal(reference.timesteps.float(), plan.timesteps.float())  # integral
    if sampler == "euler" and spacing != "leading":
        # diffusers starts Euler at sigma_max * x_T for these spacings; the VP-consistent start
        # (and the plan contract) is sqrt(sigma_max^2 + 1) * x_T. Same everywhere else.
        sigma_max = float(reference.init_noise_sigma)
        assert plan.init_noise_scale == pytest.approx(math.sqrt(sigma_max**2 + 1), rel=1e-6)
    else:
        assert plan.init_noise_scale == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)

    ours = []
    result = sample(
        toy_model, x_T, schedule, sampler, steps, callback=lambda i, t, x: ours.append(x)
    )
    theirs, _, peaks = run_diffusers(reference, x_T * plan.init_noise_scale)
    assert_trajectories_match(ours, theirs, peaks, f"{sampler}/{beta_schedule}/{spacing}")
    assert torch.equal(result, ours[-1])
    assert result.dtype == torch.float32


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_set_alpha_to_one_and_uneven_steps(spacing):
    # 7 steps: 1000 / 7 is not integral, so DDIM's "previous timestep" t - 1000 // 7 differs from
    # the next visited timestep for trailing spacing; we follow diffusers there.
    config = scheduler_config(spacing)
    schedule = NoiseSchedule(**config, set_alpha_to_one=True)
    reference = DDIMScheduler(**config, set_alpha_to_one=True, clip_sample=False)
    reference.set_timesteps(7)
    x_T = torch.randn(3, 5)
    ours = []
    sample(toy_model, x_T, schedule, "ddim", 7, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, f"ddim/{spacing}/7")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_euler_calls_the_model_at_diffusers_fractional_linspace_timesteps(
    prediction_type, zero_snr
):
    """With 20 steps diffusers' Euler linspace timesteps are fractional (999 k / 19 in float32)
    and their sigmas are interpolated between neighbouring table entries. fastdiff's plan holds
    the same timesteps and levels, and the model sees the same float32 timesteps."""
    config = scheduler_config("linspace", prediction_type, zero_snr)
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, "euler", 20)
    reference = EulerDiscreteScheduler(**config)
    reference.set_timesteps(20)
    assert not torch.equal(reference.timesteps, reference.timesteps.round())
    assert plan.timesteps.dtype == torch.float64
    assert torch.equal(plan.timesteps.float(), reference.timesteps)
    sigmas = reference.sigmas[:-1].double()
    torch.testing.assert_close(
        plan.coefficients[:, 0], 1 / (sigmas**2 + 1).sqrt(), rtol=1e-6, atol=0
    )

    seen = []

    def model(x, t):
        seen.append(t)
        return toy_model(x, t)

    x_T = torch.randn(2, 4, 3)
    ours = []
    sample(model, x_T, schedule, "euler", 20, callback=lambda i, t, x: ours.append(x))
    assert {t.dtype for t in seen} == {torch.float32}
    assert torch.equal(torch.stack([t[0] for t in seen]), reference.timesteps)
    theirs, _, peaks = run_diffusers(reference, x_T * plan.init_noise_scale)
    assert_trajectories_match(ours, theirs, peaks, "euler/linspace/20")


@pytest.mark.parametrize("steps", [1, 2, 3, 25])
def test_dpmpp_2m_step_counts(steps):
    # 1 step: only the final first-order step; 2: first-order start and end; 25 >= 15 steps.
    config = scheduler_config("trailing", "v_prediction", True)
    schedule = NoiseSchedule(**config)
    reference = DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    reference.set_timesteps(steps)
    x_T = torch.randn(2, 6)
    ours = []
    sample(toy_model, x_T, schedule, "dpmpp_2m", steps, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, f"dpmpp_2m/{steps}")


def test_float64_sampling_agrees_with_float32():
    schedule = NoiseSchedule(**SD_BETAS, beta_schedule="scaled_linear", prediction_type="epsilon")
    x_T = torch.randn(2, 3, 4, dtype=torch.float64)
    for sampler in ("ddim", "euler", "dpmpp_2m"):
        result64 = sample(toy_model, x_T, schedule, sampler, 8)
        result32 = sample(toy_model, x_T.float(), schedule, sampler, 8)
        assert result64.dtype == torch.float64
        assert torch.allclose(result64.float(), result32, atol=1e-5)


def _karras_reference(config, steps):
    reference = DPMSolverMultistepScheduler(
        **config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    reference.set_timesteps(steps)
    # Rounded Karras timesteps can repeat; without a begin index diffusers looks a repeated
    # first timestep up as the second occurrence and runs off the end.
    reference.set_begin_index(0)
    return reference


@pytest.mark.parametrize(
    "beta_schedule,prediction_type,zero_snr",
    list(itertools.product(BETA_SCHEDULES, PREDICTION_TYPES, (False, True))),
)
def test_dpmpp_2m_karras_matches_diffusers(beta_schedule, prediction_type, zero_snr):
    """DPM-Solver++(2M) through Karras noise levels against DPMSolverMultistepScheduler with
    use_karras_sigmas: the same (rounded; truncated for cosine) timesteps, the same steps."""
    config = scheduler_config("linspace", prediction_type, zero_snr, beta_schedule)
    reference = _karras_reference(config, 10)
    plan = make_plan(NoiseSchedule(**config), "dpmpp_2m_karras", 10)
    assert torch.equal(plan.timesteps, reference.timesteps)
    assert plan.init_noise_scale == 1.0 == float(reference.init_noise_sigma)
    x_T = torch.randn(2, 3, 4)
    ours = []
    sample(
        toy_model,
        x_T,
        NoiseSchedule(**config),
        "dpmpp_2m_karras",
        10,
        callback=lambda i, t, x: ours.append(x),
    )
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, f"dpmpp_2m_karras/{beta_schedule}")


@pytest.mark.parametrize("steps", [1, 2, 3, 25, 50])
def test_dpmpp_2m_karras_step_counts(steps):
    """1 step: only the final first-order step; at 50 steps the rounded Karras timesteps repeat
    near t = 0, as diffusers' do; the timestep spacing plays no part."""
    config = scheduler_config("leading")
    schedule = NoiseSchedule(**config)
    reference = _karras_reference(config, steps)
    plan = make_plan(schedule, "dpmpp_2m_karras", steps)
    assert torch.equal(plan.timesteps, reference.timesteps)
    assert torch.equal(schedule.timesteps(steps, "dpmpp_2m_karras"), plan.timesteps)
    trailing = NoiseSchedule(**scheduler_config("trailing"))
    assert torch.equal(make_plan(trailing, "dpmpp_2m_karras", steps).timesteps, plan.timesteps)
    if steps == 50:
        assert len(set(plan.timesteps.tolist())) < steps
    x_T = torch.randn(2, 5)
    ours = []
    sample(
        toy_model, x_T, schedule, "dpmpp_2m_karras", steps, callback=lambda i, t, x: ours.append(x)
    )
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, f"karras/{steps}")


def test_dpmpp_2m_karras_takes_the_configs_sigma_bounds():
    """A config with sigma_min / sigma_max (Euler configs write them) bounds diffusers' Karras
    levels; fastdiff reads them the same way. Too many steps are refused by name."""
    config = {
        **scheduler_config("leading"),
        "_class_name": "DPMSolverMultistepScheduler",
        "use_karras_sigmas": True,
        "sigma_min": 0.1,
        "sigma_max": 12.0,
    }
    reference = DPMSolverMultistepScheduler.from_config(config)
    reference.set_timesteps(10)
    schedule = NoiseSchedule.from_config(config)
    plan = make_plan(schedule, "dpmpp_2m_karras", 10)
    assert torch.equal(plan.timesteps, reference.timesteps)
    assert float(reference.sigmas[0]) == pytest.approx(12.0)
    x_T = torch.randn(2, 5)
    ours = []
    sample(toy_model, x_T, schedule, "dpmpp_2m_karras", 10, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, "karras bounds")
    with pytest.raises(ValueError, match=r"steps must be in \[1, num_train_timesteps=1000\]"):
        make_plan(schedule, "dpmpp_2m_karras", 1001)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_euler_karras_matches_diffusers(spacing, prediction_type, zero_snr):
    """EulerDiscreteScheduler(use_karras_sigmas=True): the same noise levels (spanning the spaced
    timesteps' sigmas), and the model called at the same fractional timesteps."""
    config = scheduler_config(spacing, prediction_type, zero_snr)
    reference = EulerDiscreteScheduler(**config, use_karras_sigmas=True)
    reference.set_timesteps(10)
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, "euler_karras", 10)
    sigmas = reference.sigmas[:-1].double()
    torch.testing.assert_close(
        plan.coefficients[:, 0], 1 / (sigmas**2 + 1).sqrt(), rtol=1e-6, atol=0
    )
    assert not torch.equal(reference.timesteps, reference.timesteps.round())  # fractional
    assert torch.equal(plan.timesteps.float(), reference.timesteps)
    assert torch.equal(schedule.timesteps(10, "euler_karras", keep_fraction=True), plan.timesteps)
    rounded = schedule.timesteps(10, "euler_karras")
    assert torch.equal(rounded, reference.timesteps.round().long())

    x_T = torch.randn(2, 3, 4)
    ours = []
    sample(toy_model, x_T, schedule, "euler_karras", 10, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T * plan.init_noise_scale)
    assert_trajectories_match(ours, theirs, peaks, f"euler_karras/{spacing}")


@pytest.mark.parametrize(
    "spacing,steps,offset,bounds",
    [
        ("trailing", 61, 0, {}),  # a count whose trailing grid plain euler refuses
        ("leading", 1000, 1, {}),  # grid end past the table, clamped as np.interp clamps
        ("linspace", 333, 0, {"sigma_min": 0.0292, "sigma_max": 14.6}),  # float32 ties
        ("leading", 1, 1, {}),
    ],
)
def test_euler_karras_levels_and_timesteps_at_awkward_counts(spacing, steps, offset, bounds):
    config = dict(scheduler_config(spacing), steps_offset=offset)
    reference = EulerDiscreteScheduler(**config, use_karras_sigmas=True, **bounds)
    reference.set_timesteps(steps)
    plan = make_plan(NoiseSchedule(**config, **bounds), "euler_karras", steps)
    sigmas = reference.sigmas[:-1].double()
    torch.testing.assert_close(
        plan.coefficients[:, 0], 1 / (sigmas**2 + 1).sqrt(), rtol=1e-6, atol=0
    )
    assert torch.equal(plan.timesteps.float(), reference.timesteps)


def test_ddim_set_alpha_to_one_left_out_is_diffusers_default():
    """A config without set_alpha_to_one (None) takes DDIMScheduler's default, true: the last
    step lands on alphā = 1, not alphā_0."""
    config = scheduler_config("leading")
    left_out = make_plan(NoiseSchedule(**config, set_alpha_to_one=None), "ddim", 10)
    written = make_plan(NoiseSchedule(**config, set_alpha_to_one=True), "ddim", 10)
    final_zero = make_plan(NoiseSchedule(**config, set_alpha_to_one=False), "ddim", 10)
    assert torch.equal(left_out.coefficients, written.coefficients)
    assert not torch.equal(left_out.coefficients[-1], final_zero.coefficients[-1])
    reference = DDIMScheduler(**config, clip_sample=False)  # its default set_alpha_to_one
    reference.set_timesteps(10)
    x_T = torch.randn(3, 5)
    ours = []
    schedule = NoiseSchedule(**config, set_alpha_to_one=None)
    sample(toy_model, x_T, schedule, "ddim", 10, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, "ddim/left-out")


@pytest.mark.parametrize("steps", [1, 2, 3, 25])
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unipc_step_counts_and_karras_levels(steps, karras, prediction_type):
    """UniPC's first step has no corrector and a first-order predictor, its second a first-order
    corrector, its last a first-order predictor: short runs exercise each combination."""
    config = scheduler_config("linspace", prediction_type)
    reference = UniPCMultistepScheduler(**config, use_karras_sigmas=karras)
    reference.set_timesteps(steps)
    plan = make_plan(NoiseSchedule(**config), "unipc_karras" if karras else "unipc", steps)
    assert torch.equal(plan.timesteps, reference.timesteps)
    x_T = torch.randn(2, 3, 4, 4)
    ours = []
    sample(
        toy_model,
        x_T,
        NoiseSchedule(**config),
        plan.sampler,
        steps,
        callback=lambda i, t, x: ours.append(x),
    )
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, f"unipc {steps} karras={karras}")


def test_unipc_bh1_matches_diffusers_and_ends_at_the_last_estimate():
    """solver_type "bh1" (B(h) = h). diffusers' last step multiplies B(h) = -inf (sigma 0) by a
    zero correction and returns NaN latents; fastdiff's last step is the limit of the same
    update, the last x0 estimate, as the bh2 step is."""
    config = {**scheduler_config("linspace"), "solver_type": "bh1"}
    reference = UniPCMultistepScheduler(**config)
    reference.set_timesteps(8)
    schedule = NoiseSchedule(**config)
    x_T = torch.randn(2, 3, 4, 4)
    ours = []
    sample(toy_model, x_T, schedule, "unipc", 8, callback=lambda i, t, x: ours.append(x))
    theirs, estimates, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours[:-1], theirs[:-1], peaks[:-1], "unipc bh1")
    assert not bool(torch.isfinite(theirs[-1]).all())
    error = float((ours[-1] - estimates[-1]).abs().max())
    assert error <= 1e-5 * max(1.0, peaks[-1])
    bh2 = make_plan(NoiseSchedule(**scheduler_config("linspace")), "unipc", 8)
    assert not torch.equal(make_plan(schedule, "unipc", 8).coefficients, bh2.coefficients)


@pytest.mark.parametrize(
    "steps,start,end", [(5, 1, None), (10, 3, None), (10, 8, None), (10, 9, None), (20, 6, 15)]
)
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
def test_unipc_started_part_way_matches_set_begin_index(steps, start, end, karras):
    """img2img and a refiner's denoising_start: diffusers starts the scheduler's history at
    ``set_begin_index`` (no corrector at the first step, a first-order one at the second), and
    a denoising_end cut leaves the remaining steps' orders as in the whole run."""
    config = scheduler_config("linspace")
    reference = UniPCMultistepScheduler(**config, use_karras_sigmas=karras)
    reference.set_timesteps(steps)
    reference.set_begin_index(start)
    sampler = "unipc_karras" if karras else "unipc"
    assert_started_part_way_matches(reference, NoiseSchedule(**config), sampler, steps, start, end)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 14, 15, 25])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
def test_dpmpp_3m_orders_match_diffusers(steps, lower_order_final, karras):
    """DPM-Solver++(3M): first order at the first and last steps, second at the second and, for
    runs under 15 steps with lower_order_final, at the last but one; third elsewhere."""
    config = {**scheduler_config("linspace"), "lower_order_final": lower_order_final}
    reference = DPMSolverMultistepScheduler(**config, solver_order=3, use_karras_sigmas=karras)
    reference.set_timesteps(steps)
    reference.set_begin_index(0)  # Karras timesteps can repeat (see above)
    sampler = "dpmpp_3m_karras" if karras else "dpmpp_3m"
    schedule = NoiseSchedule(**config)
    x_T = torch.randn(2, 3, 4, 4)
    ours = []
    sample(toy_model, x_T, schedule, sampler, steps, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, f"{sampler} {steps}")
    if steps == 4:  # the flag decides the order of the last step but one
        other = NoiseSchedule(**{**config, "lower_order_final": not lower_order_final})
        assert not torch.equal(
            make_plan(other, sampler, steps).coefficients,
            make_plan(schedule, sampler, steps).coefficients,
        )


@pytest.mark.parametrize("sampler", ["dpmpp_3m", "dpmpp_3m_sde_karras"])
@pytest.mark.parametrize("steps,start,end", [(10, 3, None), (10, 8, None), (20, 6, 15)])
def test_dpmpp_3m_started_part_way_matches_set_begin_index(sampler, steps, start, end):
    """A 3M run started part-way takes a second-order second step, as diffusers' history does
    after ``set_begin_index``."""
    config = scheduler_config("linspace")
    sde = "_sde" in sampler
    reference = DPMSolverMultistepScheduler(
        **config,
        solver_order=3,
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
        use_karras_sigmas=sampler.endswith("_karras"),
    )
    reference.set_timesteps(steps)
    reference.set_begin_index(start)
    assert_started_part_way_matches(reference, NoiseSchedule(**config), sampler, steps, start, end)


def assert_two_calls_a_step_match(
    scheduler_class, sampler, steps, spacing, prediction_type, dtype=torch.float32, **close
):
    """A sampler that calls the model twice a step (``sampler``, with ``_karras`` for Karras
    levels) against its diffusers scheduler, call by call: its 2 steps - 1 rows' timesteps
    (``close``: their tolerance), then the state after every call, from sqrt(sigma_max^2 + 1)
    x_T as Euler starts."""
    config = scheduler_config(spacing, prediction_type)
    del config["rescale_betas_zero_snr"]  # not an argument of these schedulers
    reference = scheduler_class(**config, use_karras_sigmas=sampler.endswith("_karras"))
    reference.set_timesteps(steps)
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, sampler, steps)
    assert len(plan) == 2 * steps - 1
    torch.testing.assert_close(plan.timesteps.double(), reference.timesteps.double(), **close)
    assert torch.equal(
        schedule.timesteps(steps, sampler, keep_fraction=True), plan.timesteps.double()
    )
    x_T = torch.randn(2, 3, 4, 4, dtype=dtype)
    ours = []
    sample(toy_model, x_T, schedule, sampler, steps, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T * plan.init_noise_scale)
    assert_trajectories_match(ours, theirs, peaks, f"{sampler} {spacing} {steps}")


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_heun_matches_diffusers_call_by_call(steps, karras, spacing, prediction_type):
    """Heun's method, one plan row per model call as HeunDiscreteScheduler steps: the Euler
    state after each first call, the corrected state after each second (the last step is
    Euler's alone).

    The correction is x' + k (x0' - x0) with k = (sigma - sigma') / (2 sigma'): 250 for two
    steps to t = 0 (sigma 14.6 -> 0.029), which multiplies the float32 rounding of x0 (an
    estimate that cancels terms of size sigma): 2e-5 of the peak there, under 1e-6 from 5
    steps up (diffusers' derivative form rounds less). Two steps are compared in float64."""
    sampler = "heun_karras" if karras else "heun"
    dtype = torch.float64 if steps == 2 else torch.float32
    assert_two_calls_a_step_match(
        HeunDiscreteScheduler, sampler, steps, spacing, prediction_type, dtype
    )


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_kdpm2_matches_diffusers_call_by_call(steps, karras, spacing, prediction_type):
    """KDPM2 (DPM-Solver-2), one plan row per model call as KDPM2DiscreteScheduler steps: the
    Euler state at the midpoint after each first call, the second-order state after each
    second (the last step is Euler's alone); the midpoints' fractional timesteps as diffusers
    passes them to the model. diffusers finds those in float32, fastdiff in float64: 1e-7
    apart relative (6e-5 at t ~ 600)."""
    sampler = "kdpm2_karras" if karras else "kdpm2"
    assert_two_calls_a_step_match(
        KDPM2DiscreteScheduler, sampler, steps, spacing, prediction_type, rtol=1e-6, atol=0.0
    )


@pytest.mark.parametrize(
    "steps,start,end", [(5, 1, None), (10, 3, None), (10, 9, None), (20, 6, 15)]
)
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
def test_kdpm2_started_part_way_matches_set_begin_index(steps, start, end, karras):
    """img2img and denoising_start / denoising_end: a KDPM2 run started at step ``start`` (row
    2 start, a first call) as diffusers' after ``set_begin_index(2 start)``."""
    config = scheduler_config("linspace")
    del config["rescale_betas_zero_snr"]
    reference = KDPM2DiscreteScheduler(**config, use_karras_sigmas=karras)
    reference.set_timesteps(steps)
    reference.set_begin_index(2 * start)
    sampler = "kdpm2_karras" if karras else "kdpm2"
    rows = None if end is None else 2 * end
    assert_started_part_way_matches(
        reference, NoiseSchedule(**config), sampler, steps, 2 * start, rows
    )


@pytest.mark.parametrize("sampler", ["kdpm2", "kdpm2_karras"])
def test_kdpm2_refuses_what_its_scheduler_lacks(sampler):
    """KDPM2DiscreteScheduler has no rescale_betas_zero_snr and raises for sample prediction:
    fastdiff refuses both rather than sample something else."""
    zero_snr = NoiseSchedule(**scheduler_config("trailing", "v_prediction", zero_snr=True))
    with pytest.raises(ValueError, match="KDPM2DiscreteScheduler has no rescale_betas_zero_snr"):
        make_plan(zero_snr, sampler, 5)
    config = scheduler_config("linspace", "sample")
    with pytest.raises(ValueError, match="does not implement prediction_type 'sample'"):
        make_plan(NoiseSchedule(**config), sampler, 5)


def test_heun_refuses_a_zero_snr_schedule():
    """HeunDiscreteScheduler has no rescale_betas_zero_snr: diffusers would sample the plain
    schedule, fastdiff refuses rather than sample another."""
    schedule = NoiseSchedule(**scheduler_config("trailing", "v_prediction", zero_snr=True))
    with pytest.raises(ValueError, match="HeunDiscreteScheduler has no rescale_betas_zero_snr"):
        make_plan(schedule, "heun", 5)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 25])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_pndm_matches_diffusers_call_by_call(steps, spacing, prediction_type, set_alpha_to_one):
    """PNDM's PLMS steps (skip_prk_steps, as SD 1.x folders configure it): the repeated second
    call, then Adams-Bashforth combinations of up to four model outputs, call by call. The run
    lengths reach each combination (3 steps: the first three-output one; 5: the first with
    four)."""
    config = scheduler_config(spacing, prediction_type)
    del config["rescale_betas_zero_snr"]  # not a PNDMScheduler argument
    config.update(skip_prk_steps=True, set_alpha_to_one=set_alpha_to_one)
    reference = PNDMScheduler(**config)
    reference.set_timesteps(steps)
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, "pndm", steps)
    assert torch.equal(plan.timesteps, reference.timesteps)
    assert torch.equal(schedule.timesteps(steps, "pndm"), plan.timesteps)
    x_T = torch.randn(2, 3, 4, 4)
    ours = []
    sample(toy_model, x_T, schedule, "pndm", steps, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T)
    assert_trajectories_match(ours, theirs, peaks, f"pndm {spacing} {steps}")


@pytest.mark.parametrize("steps,start", [(10, 1), (10, 2), (10, 4), (10, 10), (30, 12)])
def test_pndm_started_part_way_matches_diffusers(steps, start):
    """img2img takes PNDMScheduler's calls from ``start`` (its order is 1), and its call counter
    starts the method again there: a first-order call, the repeated-call average, ..."""
    config = {**scheduler_config("leading"), "skip_prk_steps": True, "set_alpha_to_one": False}
    del config["rescale_betas_zero_snr"]
    reference = PNDMScheduler(**config)  # (no set_begin_index: its call counter starts at 0)
    reference.set_timesteps(steps)
    assert_started_part_way_matches(reference, NoiseSchedule(**config), "pndm", steps, start)


def test_pndm_refuses_what_it_does_not_implement():
    config = {**scheduler_config("leading"), "skip_prk_steps": True}
    with pytest.raises(ValueError, match="skip_prk_steps is not true"):
        make_plan(NoiseSchedule(**{**config, "skip_prk_steps": False}), "pndm", 10)
    with pytest.raises(ValueError, match="skip_prk_steps is not true"):
        make_plan(NoiseSchedule(**{**config, "skip_prk_steps": None}), "pndm", 10)
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        make_plan(NoiseSchedule(**{**config, "prediction_type": "sample"}), "pndm", 10)
    with pytest.raises(ValueError, match="PNDMScheduler has no rescale_betas_zero_snr"):
        make_plan(NoiseSchedule(**{**config, "rescale_betas_zero_snr": True}), "pndm", 10)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 12])
@pytest.mark.parametrize("karras", [False, True], ids=["spaced", "karras"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_lms_matches_diffusers(steps, karras, spacing, prediction_type):
    """Linear multistep (order 4) in sigma as LMSDiscreteScheduler: its orders 1 to 4 in the
    first four steps, the Lagrange weights integrated exactly. Started, like Euler, from
    sqrt(sigma_max^2 + 1) x_T."""
    config = scheduler_config(spacing, prediction_type)
    del config["rescale_betas_zero_snr"]  # not an LMSDiscreteScheduler argument
    reference = LMSDiscreteScheduler(**config, use_karras_sigmas=karras)
    reference.set_timesteps(steps)
    sampler = "lms_karras" if karras else "lms"
    schedule = NoiseSchedule(**config)
    plan = make_plan(schedule, sampler, steps)
    torch.testing.assert_close(plan.timesteps.double(), reference.timesteps.double())
    x_T = torch.randn(2, 3, 4, 4)
    ours = []
    sample(toy_model, x_T, schedule, sampler, steps, callback=lambda i, t, x: ours.append(x))
    theirs, _, peaks = run_diffusers(reference, x_T * plan.init_noise_scale)
    assert_trajectories_match(ours, theirs, peaks, f"{sampler} {spacing} {steps}")


@pytest.mark.parametrize("steps,start", [(10, 3), (10, 9), (20, 1)])
def test_lms_started_part_way_matches_set_begin_index(steps, start):
    """diffusers keeps the whole run's order at the start step but has only the derivatives
    since: the weights of the missing ones drop out."""
    config = scheduler_config("linspace")
    del config["rescale_betas_zero_snr"]
    reference = LMSDiscreteScheduler(**config)
    reference.set_timesteps(steps)
    reference.set_begin_index(start)
    assert_started_part_way_matches(reference, NoiseSchedule(**config), "lms", steps, start)


def test_lms_refuses_a_zero_snr_schedule():
    schedule = NoiseSchedule(**scheduler_config("trailing", "v_prediction", zero_snr=True))
    with pytest.raises(ValueError, match="LMSDiscreteScheduler has no rescale_betas_zero_snr"):
        make_plan(schedule, "lms", 5)
