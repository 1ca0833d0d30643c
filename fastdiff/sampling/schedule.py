"""The discrete-time variance-preserving noise schedule: betas, alphā, SNR, the closed-form forward
process q(x_t | x_0) and conversions between the three model parameterisations.

Notation: alphā_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, Eq. 4), x_t = sqrt(alphā_t) x_0 +
sqrt(1 - alphā_t) eps, SNR(t) = alphā_t / (1 - alphā_t) (Kingma et al. 2021), and the velocity
v = sqrt(alphā_t) eps - sqrt(1 - alphā_t) x_0 (Salimans & Ho 2022, Sec. 4).
The tables are built in float32 exactly as diffusers builds them (so they are bit-identical to
the tables diffusers-trained and diffusers-sampled checkpoints use; the last alphā of the cosine
schedule is ~2e-9 and sampling from it is sensitive to its last bits) and stored as float64 on the
CPU; functions that take tensors return the tensors' dtype/device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.sampling.spacing import SPACINGS, lcm_timesteps, spaced_timesteps

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The multistep solvers' variants a scheduler config may name (``NoiseSchedule.solver_type``).
SOLVER_TYPES = ("midpoint", "heun", "logrho", "bh1", "bh2")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: alphā(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008;
    beta_t = 1 - alphā(t+1)/alphā(t), clipped at 0.999 so the last steps stay invertible."""

    def alpha_bar(fraction: float) -> float:
        return math.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for index in range(num_train_timesteps):
        start = alpha_bar(index / num_train_timesteps)
        end = alpha_bar((index + 1) / num_train_timesteps)
        betas.append(min(1.0 - end / start, max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphā) so that the last step has
    sqrt(alphā_T) = 0 (zero SNR: pure noise) while the first step keeps its value."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def _is_whole_number(value: Any) -> bool:
    """True for an int or an integral finite float (1000.0, as JSON may write it)."""
    return isinstance(value, numbers.Real) and math.isfinite(value) and int(value) == value


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A diffusers-compatible DDPM noise schedule (keyword names as in scheduler_config.json).

    ``betas``, ``alphas`` and ``alphas_cumprod`` are float64 tensors of length
    ``num_train_timesteps``. ``timestep_spacing``, ``steps_offset`` (an int; 0 when a config
    leaves it out) and ``set_alpha_to_one`` describe how samplers sub-sample it (see
    :func:`fastdiff.sampling.make_plan`); None in ``timestep_spacing`` or ``set_alpha_to_one`` (a
    config file that leaves them out) means the default of the diffusers scheduler each sampler
    reproduces: ``leading`` for ddim/ddpm, ``linspace`` for euler and dpmpp; true.
    ``clip_sample`` (clipping DDIM/DDPM's x0 estimate to [-1, 1]) is not implemented: it must be
    false, or None (left out of a config: ddim and ddpm then refuse, as DDIMScheduler and
    DDPMScheduler would clip by default).
    ``sigma_min`` / ``sigma_max`` (None: the table's ends) bound the Karras noise levels of the
    ``*_karras`` samplers, as they bound diffusers' when its config has them.
    ``original_inference_steps`` and ``timestep_scaling`` (None: LCMScheduler's 50 and 10.0)
    are the ``lcm`` sampler's: the distillation schedule its timesteps are taken from, and the
    scale of the timestep in its boundary-condition weights.
    ``solver_type`` (None: each solver's default) is the multistep solvers' variant, as
    diffusers reads it: ``unipc`` takes "bh1" as UniPC's B(h) = h and anything else as its
    default "bh2" (B(h) = e^h - 1); the ``dpmpp_2m`` samplers take "midpoint" (and "bh1", "bh2",
    "logrho", which DPMSolverMultistepScheduler reads as midpoint) and refuse "heun", a second
    order variant fastdiff does not implement.
    ``lower_order_final`` (None: true, diffusers' default) lets DPM-Solver++(3M) take its
    second-to-last step at second order when a run has fewer than 15 steps, as
    DPMSolverMultistepScheduler does.
    ``skip_prk_steps`` (None: false, PNDMScheduler's default) must be true for the ``pndm``
    sampler: PNDM's Runge-Kutta warm-up steps are not implemented, its linear multistep
    (PLMS) steps with one repeated call at the start are.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Any = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool | None = True
    rescale_betas_zero_snr: bool = False
    clip_sample: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None
    solver_type: str | None = None
    lower_order_final: bool | None = None
    skip_prk_steps: bool | None = None
    betas: torch.Tensor = field(init=False, repr=False)
    alphas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # (diffusers reads no beta_schedule when trained_betas are given)
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"unknown beta_schedule {self.beta_schedule!r}; allowed: {list(BETA_SCHEDULES)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {self.prediction_type!r}; "
                f"allowed: {list(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(
                f"unknown timestep_spacing {self.timestep_spacing!r}; allowed: {list(SPACINGS)}"
            )
        # Whole numbers only, checked before int(): int() of a null written in the config
        # (None), a string or inf raised TypeError / OverflowError that named no key.
        if not _is_whole_number(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise ValueError(
                f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}"
            )
        if not _is_whole_number(self.steps_offset) or self.steps_offset < 0:
            raise ValueError(
                f"steps_offset must be a non-negative integer, got {self.steps_offset!r}"
            )
        for key, may_be_none in (
            ("set_alpha_to_one", True),
            ("rescale_betas_zero_snr", False),
            ("lower_order_final", True),
            ("skip_prk_steps", True),
        ):
            value = getattr(self, key)  # a string "false" would be true below
            if not isinstance(value, bool) and not (may_be_none and value is None):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        if self.clip_sample not in (False, None):
            raise ValueError(
                f"clip_sample={self.clip_sample!r} (x0 clipping) is not implemented; fastdiff "
                "samples with clip_sample false"
            )
        for key in ("sigma_min", "sigma_max"):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not 0.0 < value < math.inf
            ):
                raise ValueError(f"{key} must be a positive number or None, got {value!r}")
        steps = self.original_inference_steps
        if steps is not None and (
            isinstance(steps, bool)
            or not isinstance(steps, numbers.Real)
            or int(steps) != steps
            or not 1 <= steps <= self.num_train_timesteps
        ):
            raise ValueError(
                "original_inference_steps must be an integer in [1, num_train_timesteps="
                f"{self.num_train_timesteps}], got {steps!r}"
            )
        scaling = self.timestep_scaling
        if scaling is not None and (
            isinstance(scaling, bool)
            or not isinstance(scaling, numbers.Real)
            or not 0.0 < scaling < math.inf
        ):
            raise ValueError(f"timestep_scaling must be a positive number, got {scaling!r}")
        if self.solver_type is not None and self.solver_type not in SOLVER_TYPES:
            raise ValueError(
                f"unknown solver_type {self.solver_type!r}; allowed: {list(SOLVER_TYPES)}"
            )
        total = int(self.num_train_timesteps)
        object.__setattr__(self, "num_train_timesteps", total)
        object.__setattr__(self, "steps_offset", int(self.steps_offset))

        if self.trained_betas is None and self.beta_schedule != "squaredcos_cap_v2":
            # Checked first: a negative value would reach sqrt() in scaled_linear (complex dtype).
            for key in ("beta_start", "beta_end"):
                value = getattr(self, key)
                if (
                    isinstance(value, bool)
                    or not isinstance(value, numbers.Real)
                    or not 0.0 < value < 1.0
                ):
                    raise ValueError(f"{key} must be a number in (0, 1), got {value!r}")
        if self.trained_betas is not None:
            betas = torch.as_tensor(self.trained_betas, dtype=torch.float32).flatten().clone()
            if betas.numel() != total:
                raise ValueError(
                    f"trained_betas has {betas.numel()} values, num_train_timesteps is {total}"
                )
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, total, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            # Latent diffusion's schedule: linear in sqrt(beta).
            betas = (
                torch.linspace(self.beta_start**0.5, self.beta_end**0.5, total, dtype=torch.float32)
                ** 2
            )
        else:
            betas = _cosine_betas(total)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1); check beta_start/beta_end/trained_betas")
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
            if not bool(torch.isfinite(betas).all()):
                # alphā underflowed to 0 before the last step: the rescale divides 0 by 0.
                first = int((~torch.isfinite(betas)).nonzero()[0])
                raise ValueError(
                    "rescale_betas_zero_snr: alphā of this beta schedule reaches 0 in float32 "
                    f"at t = {first - 1}, before the last step, so the rescaled betas are NaN "
                    "from there on; use a smaller beta_end"
                )
        alphas = 1.0 - betas
        object.__setattr__(self, "betas", betas.double())
        object.__setattr__(self, "alphas", alphas.double())
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(alphas, dim=0).double())

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers ``scheduler_config.json`` dict (DDIM, DDPM, PNDM, Euler,
        DPM-Solver, LMS ... configs). Keys that would change the math in a way we do not
        implement raise ``ValueError``; cosmetic keys are ignored (``fastdiff.sampling.config``).
        """
        from fastdiff.sampling.config import schedule_kwargs_from_config

        return cls(**schedule_kwargs_from_config(config))

    def to_config(self) -> dict[str, Any]:
        """A scheduler config (diffusers key names) that ``from_config`` rebuilds this schedule
        from. Keys that are None here (left out of the config this schedule was read from) are
        left out again, so that diffusers schedulers, too, fill them with their own defaults."""
        trained = self.trained_betas
        if isinstance(trained, torch.Tensor):
            trained = trained.tolist()
        optional = {
            "timestep_spacing": self.timestep_spacing,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": self.clip_sample,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "original_inference_steps": self.original_inference_steps,
            "timestep_scaling": self.timestep_scaling,
            "solver_type": self.solver_type,
            "lower_order_final": self.lower_order_final,
            "skip_prk_steps": self.skip_prk_steps,
        }
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "trained_betas": trained,
            "prediction_type": self.prediction_type,
            "steps_offset": self.steps_offset,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
            **{key: value for key, value in optional.items() if value is not None},
        }

    # ----------------------------------------------------------------------------- tables
    def timesteps(self, steps: int, sampler: str = "ddim", keep_fraction=False) -> torch.Tensor:
        """Model timesteps (LongTensor [steps], non-increasing; Heun's [2 steps - 1], one per
        model call) ``sampler`` visits with this
        schedule's ``timestep_spacing`` and ``steps_offset`` (see ``fastdiff.sampling.spacing``);
        for the ``*_karras`` samplers the timesteps of their Karras noise levels, which ignore
        the spacing. ``keep_fraction``: as floats, the Euler family's unrounded (diffusers'
        own, at which ``make_plan`` calls the model and which diffusers compares with
        denoising_start / denoising_end cut-offs)."""
        if sampler == "pndm":
            from fastdiff.sampling.vp_rows import pndm_calls  # builds on this module

            base = self.timesteps(steps, "ddim", keep_fraction)
            return pndm_calls(base)
        if sampler.startswith(("kdpm2", "lms")):
            # (LMS: Euler's timesteps, or Karras levels spanning them without the config's
            # sigma bounds; KDPM2: its midpoints' too)
            from fastdiff.sampling.plan import make_plan  # plan builds on this module

            timesteps = make_plan(self, sampler, steps).timesteps
            return timesteps.double() if keep_fraction else timesteps.round().long()
        if sampler.startswith("heun"):
            # Euler's timesteps, each after the first called twice (the correction of the step
            # before, then its own Euler step): the plan's rows, as HeunDiscreteScheduler lists
            base = self.timesteps(steps, "euler" + sampler[len("heun") :], keep_fraction)
            return torch.cat([base[:1], base[1:].repeat_interleave(2)])
        if sampler in ("lcm", "tcd"):  # TCDScheduler takes LCMScheduler's timesteps
            original = self.original_inference_steps
            timesteps = lcm_timesteps(self.num_train_timesteps, steps, original)
            return timesteps.double() if keep_fraction else timesteps
        if sampler.endswith("_karras"):
            from fastdiff.sampling.sigma_rows import karras_plan_inputs  # builds on this module

            fraction = keep_fraction and sampler == "euler_karras"
            timesteps = karras_plan_inputs(self, steps, sampler, keep_fraction=fraction)[0]
            return timesteps.double() if keep_fraction else timesteps
        return spaced_timesteps(
            self.num_train_timesteps,
            steps,
            self.timestep_spacing,
            self.steps_offset,
            sampler,
            keep_fraction,
        )

    def snr(self, t: int | torch.Tensor) -> torch.Tensor:
        """SNR alphā_t / (1 - alphā_t), float64 (0 at a zero-SNR terminal step)."""
        alpha_bar = self._lookup(t)
        return alpha_bar / (1.0 - alpha_bar)

    def log_snr(self, t: int | torch.Tensor) -> torch.Tensor:
        """log alphā_t - log(1 - alphā_t), float64 (-inf at a zero-SNR terminal step)."""
        alpha_bar = self._lookup(t)
        return torch.log(alpha_bar) - torch.log1p(-alpha_bar)

    def _lookup(self, t: int | torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(t)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers, got dtype {index.dtype}")
        index = index.to("cpu", torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps - 1}], "
                f"got min {int(index.min())} max {int(index.max())}"
            )
        return self.alphas_cumprod[index]

    def _coefficients(self, t: int | torch.Tensor, like: torch.Tensor):
        """sqrt(alphā_t), sqrt(1 - alphā_t) shaped [B, 1, ...] to broadcast against ``like``."""
        alpha_bar = self._lookup(t)
        if alpha_bar.dim() > 1:
            raise ValueError(
                f"t must be a scalar or a 1-D tensor, got shape {tuple(alpha_bar.shape)}"
            )
        if alpha_bar.dim() == 1:
            if alpha_bar.shape[0] not in (1, like.shape[0]):
                raise ValueError(
                    f"t has {alpha_bar.shape[0]} entries but the batch has {like.shape[0]}"
                )
            alpha_bar = alpha_bar.reshape(-1, *([1] * (like.dim() - 1)))
        signal = alpha_bar.sqrt().to(like.device, like.dtype)
        noise = (1.0 - alpha_bar).sqrt().to(like.device, like.dtype)
        return signal, noise

    # ----------------------------------------------------------------------------- forward process
    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form (Ho et al. 2020, Eq. 4):
        x_t = sqrt(alphā_t) x_0 + sqrt(1 - alphā_t) noise, with t an int or a [batch] tensor."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}")
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise

    def velocity(
        self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """v = sqrt(alphā_t) noise - sqrt(1 - alphā_t) x_0 (Salimans & Ho 2022)."""
        signal, sigma = self._coefficients(t, x0)
        return signal * noise - sigma * x0

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """What a model of this schedule's ``prediction_type`` is trained to output."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return self.velocity(x0, noise, t)

    # ----------------------------------------------------------------------------- conversions
    def predict_x0(
        self, x_t: torch.Tensor, model_output: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """x_0 estimate from a model output in this schedule's prediction type."""
        signal, sigma = self._coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / signal
        if self.prediction_type == "sample":
            return model_output
        return signal * x_t - sigma * model_output

    def predict_epsilon(
        self, x_t: torch.Tensor, model_output: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """Noise estimate from a model output in this schedule's prediction type."""
        signal, sigma = self._coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "sample":
            return (x_t - signal * model_output) / sigma
        return signal * model_output + sigma * x_t

    def predict_velocity(
        self, x_t: torch.Tensor, model_output: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """Velocity estimate from a model output in this schedule's prediction type."""
        if self.prediction_type == "v_prediction":
            return model_output
        signal, sigma = self._coefficients(t, x_t)
        x0 = self.predict_x0(x_t, model_output, t)
        epsilon = self.predict_epsilon(x_t, model_output, t)
        return signal * epsilon - sigma * x0
