"""Which training timesteps a sampler visits: the ``leading`` / ``linspace`` / ``trailing``
spacings of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed",
Table 2), computed the way each diffusers scheduler computes them so that results agree.

diffusers computes the spacings slightly differently per scheduler family:

* ``ddim`` / ``ddpm`` (DDIMScheduler, DDPMScheduler): ``steps`` points.
* ``euler`` (EulerDiscreteScheduler): the same points, but ``linspace`` keeps them as float32
  (fractional timesteps such as 946.42 for 20 steps). Our model functions take integer
  timesteps, so we round them to the nearest integer (half to even, as the DDIM family does) and
  take sigma at the rounded timestep, which keeps the noise level and the timestep the model sees
  consistent. This equals diffusers exactly whenever its timesteps are integral (e.g.
  ``999 / (steps - 1)`` integral) and equals diffusers run with these integer timesteps otherwise.
* ``dpmpp_2m`` (DPMSolverMultistepScheduler): ``linspace`` and ``leading`` build ``steps + 1``
  points and drop the last one (t = 0).
"""

from __future__ import annotations

import numpy as np
import torch

SPACINGS = ("leading", "linspace", "trailing")
SAMPLER_FAMILIES = {"ddim": "ddim", "ddpm": "ddim", "euler": "euler", "dpmpp_2m": "dpmpp_2m"}


def _round_half_even(values: np.ndarray) -> np.ndarray:
    # numpy's round is half-to-even, which is what diffusers relies on (499.5 -> 500, 0.5 -> 0).
    return np.round(values).astype(np.int64)


def spaced_timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: str,
    steps_offset: int = 0,
    sampler: str = "ddim",
) -> torch.Tensor:
    """Return the model timesteps (LongTensor [steps], descending) a sampler visits.

    ``sampler`` selects the diffusers scheduler whose arithmetic is reproduced (see module doc).
    Raises ``ValueError`` for unknown names, ``steps`` outside [1, num_train_timesteps], and for a
    combination that would visit a timestep twice or fall outside [0, num_train_timesteps).
    """
    if sampler not in SAMPLER_FAMILIES:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {sorted(SAMPLER_FAMILIES)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; allowed: {list(SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(
            f"steps must be in [1, num_train_timesteps={num_train_timesteps}], got {steps}"
        )
    total = num_train_timesteps
    family = SAMPLER_FAMILIES[sampler]
    # DPM-Solver places steps + 1 boundaries and never evaluates the model at the last one.
    points = steps + 1 if family == "dpmpp_2m" else steps

    if spacing == "linspace":
        grid = np.linspace(0, total - 1, points)
        if family == "euler":
            grid = np.linspace(0, total - 1, points, dtype=np.float32).astype(np.float64)
        timesteps = _round_half_even(grid)[::-1]
    elif spacing == "leading":
        ratio = total // points
        timesteps = (np.arange(points, dtype=np.int64) * ratio)[::-1] + steps_offset
    else:  # trailing
        ratio = total / steps
        timesteps = _round_half_even(np.arange(total, 0, -ratio)) - 1

    if family == "dpmpp_2m" and spacing != "trailing":
        timesteps = timesteps[:-1]
    timesteps = np.ascontiguousarray(timesteps)
    if timesteps.shape[0] != steps:
        raise ValueError(
            f"{spacing} spacing produced {timesteps.shape[0]} timesteps for steps={steps}; "
            "choose a step count that divides the schedule more evenly"
        )
    if timesteps.min() < 0 or timesteps.max() >= total:
        raise ValueError(
            f"{spacing} spacing with steps={steps} and steps_offset={steps_offset} gives timesteps "
            f"outside [0, {total - 1}]: {timesteps.tolist()}"
        )
    if steps > 1 and not np.all(np.diff(timesteps) < 0):
        raise ValueError(
            f"{spacing} spacing with steps={steps} visits a timestep twice for sampler "
            f"{sampler!r}; use fewer steps"
        )
    return torch.from_numpy(timesteps.copy())
