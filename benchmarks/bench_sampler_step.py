"""Fused CFG + sampler step on SD latents: fastdiff kernel vs the eager op sequence.

Providers: fastdiff (one Triton kernel), eager (fastdiff.ops.sampler_step_eager: the same math as
a sequence of PyTorch ops reading coefficients from the device), eager-plan_step (the sampling
layer's combine_guidance + plan_step, as the eager sampler loop runs it, with its host sync),
torch.compile (of the eager sequence), cuda (the CUDA C++ extension, when built).
GB/s counts each input read once and both outputs written once.
Run: python benchmarks/bench_sampler_step.py [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Workload,
    host_synchronising,
    parse_args,
    random,
    run_benchmark,
    standard_providers,
)

from fastdiff.ops import sampler_step, sampler_step_eager  # noqa: E402
from fastdiff.sampling import NoiseSchedule, combine_guidance, make_plan, plan_step  # noqa: E402

STEPS = 20
SHAPES = [("sd15 2x4x64x64", (2, 4, 64, 64)), ("sdxl 2x4x128x128", (2, 4, 128, 128))]


def plan_for(sampler: str):
    return make_plan(NoiseSchedule(beta_schedule="scaled_linear"), sampler, steps=STEPS)


def workload(name, shape, dtype, sampler: str) -> Workload:
    plan = plan_for(sampler)

    def make(reduced: bool):
        size = (shape[0], shape[1], 16, 16) if reduced else shape
        device = "cuda" if torch.cuda.is_available() else "cpu"
        x = random(size, dtype)
        model_output = random((2 * size[0], *size[1:]), dtype)
        x0_prev = random(x.shape, dtype) if sampler in ("dpmpp_2m", "unipc") else None
        depth = plan.history_depth - 1  # older x0 estimates (UniPC's corrector: 1)
        x0_older = random((depth, *x.shape), dtype) if depth > 0 else None
        table = plan.coefficients.to(device)
        step = torch.tensor(STEPS // 2, device=device)
        guidance = torch.tensor(7.5, device=device)
        return (x, model_output, table, step, x0_prev, guidance, None, x0_older)

    def bytes_moved(inputs) -> float:
        x = inputs[0]
        reads = 3 + (inputs[4] is not None) + (0 if inputs[7] is None else inputs[7].shape[0])
        return (reads + 2) * x.numel() * x.element_size()

    return Workload(f"{name} {sampler} cfg", dtype, make, bytes_moved=bytes_moved)


def plan_step_provider(sampler: str):
    plan = plan_for(sampler)

    @host_synchronising
    def build(inputs):
        x, model_output, _, step, x0_prev, guidance, noise, x0_older = inputs
        index, scale = int(step), float(guidance)

        def call():
            guided = combine_guidance(*model_output.chunk(2), scale)
            return plan_step(plan, index, x, guided, x0_prev, noise, x0_older=x0_older)

        return call

    return build


def main() -> None:
    args = parse_args(__doc__)
    shapes = SHAPES[:1] if args.quick else SHAPES
    # (quick: DDIM and UniPC, whose rows also read an older x0 estimate: the history path)
    samplers = ("ddim", "unipc") if args.quick else ("ddim", "dpmpp_2m", "unipc")
    for sampler in samplers:
        workloads = [workload(n, s, torch.float16, sampler) for n, s in shapes]
        providers = standard_providers(sampler_step_eager, sampler_step, "sampler_step")
        providers["eager-plan_step"] = plan_step_provider(sampler)
        run_benchmark("sampler_step", workloads, providers, args)


if __name__ == "__main__":
    main()
