"""CUDA C++ kernels vs the Triton kernels vs eager PyTorch, per op and shape, at SD shapes.

Ops: GroupNorm(32)+SiLU (NCHW and channels-last, the SD1.5/SDXL U-Net's resolutions) and the fused
CFG + sampler step (SD1.5 and SDXL latents). Providers: eager (plain PyTorch), triton (the public
op on the triton backend), cuda (the extension's op, called directly, only for inputs its
``supports_*`` accepts; others are reported as not supported). Timing, CSV schema and GB/s as in
benchmarks/common.py. Besides the CSV rows it writes the measured table that
fastdiff.ops.autoselect reads (``--table``, default <out>/backend_table.json) and prints, per shape,
the backend the runtime would pick.
Run: python benchmarks/bench_cuda_backend.py [--quick] [--out DIR] [--table FILE]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    Row,
    Workload,
    add_speedups,
    append_csv,
    csv_header,
    device_name,
    format_rows,
    measure,
    on_gpu,
    results_path,
)

import fastdiff.ops.cuda_extension as cuda_extension  # noqa: E402
from fastdiff.ops import autoselect, group_norm, sampler_step, use_backend  # noqa: E402
from fastdiff.ops.group_norm import group_norm_eager  # noqa: E402
from fastdiff.ops.sampler_step import sampler_step_eager  # noqa: E402
from fastdiff.sampling import NoiseSchedule, make_plan  # noqa: E402

GROUP_NORM_SHAPES = [  # SD1.5 U-Net (64x64 latents): the resolutions the CUDA kernel targets
    (2, 640, 32, 32),
    (2, 960, 32, 32),
    (2, 1280, 16, 16),
    (2, 1920, 16, 16),
    (2, 1280, 8, 8),
    (2, 2560, 8, 8),
    (2, 320, 64, 64),  # too large a group for registers: shows the fallback rule
]
QUICK_GROUP_NORM_SHAPES = [(2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8)]
LATENT_SHAPES = [(2, 4, 64, 64), (2, 4, 128, 128)]
STEPS = 20


def random(shape, device, dtype) -> torch.Tensor:
    """Inputs come from the CPU generator: a provider whose CUDA-graph capture fails can leave
    the CUDA generator unusable ("Offset increment outside graph capture"), as seen on an H200."""
    return torch.randn(shape).to(device, dtype)


def group_norm_workload(shape, dtype, channels_last: bool) -> Workload:
    def make(reduced: bool):
        size = (shape[0], shape[1], 4, 4) if reduced else shape
        device = "cuda" if on_gpu() else "cpu"
        x = random(size, device, dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        weight = random((shape[1],), device, dtype)
        bias = random((shape[1],), device, dtype)
        return (x, 32, weight, bias, 1e-5, True)

    probe = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        probe = probe.to(memory_format=torch.channels_last)
    return Workload(
        autoselect.group_norm_key(probe),
        dtype,
        make,
        bytes_moved=lambda inputs: 2 * inputs[0].numel() * inputs[0].element_size(),
    )


def sampler_step_workload(shape, dtype, sampler: str) -> Workload:
    plan = make_plan(NoiseSchedule(beta_schedule="scaled_linear"), sampler, steps=STEPS)

    def make(reduced: bool):
        size = (shape[0], shape[1], 16, 16) if reduced else shape
        device = "cuda" if on_gpu() else "cpu"
        x = random(size, device, dtype)
        model_output = random((2 * size[0], *size[1:]), device, dtype)
        x0_prev = random(size, device, dtype) if sampler == "dpmpp_2m" else None
        table = plan.coefficients.to(device)
        step = torch.tensor(STEPS // 2, device=device)
        guidance = torch.tensor(7.5, device=device)
        return (x, model_output, table, step, x0_prev, guidance, None)

    def bytes_moved(inputs) -> float:
        x = inputs[0]
        reads = 3 + (1 if inputs[4] is not None else 0)
        return (reads + 2) * x.numel() * x.element_size()

    probe = torch.empty(shape, dtype=dtype, device="meta")
    key = autoselect.sampler_step_key(probe, torch.empty(2 * shape[0], device="meta"))
    return Workload(f"{key}|{sampler}", dtype, make, bytes_moved=bytes_moved)


def on_backend(name: str, op):
    def build(inputs):
        def call():
            with use_backend(name):
                return op(*inputs)

        return call

    return build


def cuda_group_norm(inputs):
    return lambda: cuda_extension.group_norm(*inputs)


def cuda_sampler_step(inputs):
    x, model_output, table, step, x0_prev, guidance, noise = inputs
    args = (x, model_output, table, step, x0_prev, guidance, 1.0, noise)
    return lambda: cuda_extension.sampler_step(*args)


def cuda_supports(op: str, workload: Workload) -> bool:
    inputs = workload.make(False)
    if op == "group_norm":
        return cuda_extension.supports_group_norm(*inputs)
    x, model_output, table, step, x0_prev, guidance, noise = inputs
    args = (x, model_output, table, step, x0_prev, guidance, 1.0, noise)
    return cuda_extension.supports_sampler_step(*args)


def run_op(op: str, benchmark: str, workloads, eager, public, cuda_builder, quick: bool):
    rows: list[Row] = []
    measured = []  # (op, key, backend, ms) for the autoselect table
    use_cuda = on_gpu() and cuda_extension.available()
    for workload in workloads:
        # eager last: its capture is the one that can fail (then it is timed per call).
        providers = {}
        if use_cuda and cuda_supports(op, workload):
            providers["cuda"] = cuda_builder
        elif use_cuda:
            rows.append(Row(benchmark, workload.name, "cuda", "-", notes=["not supported"]))
        if on_gpu():
            providers["triton"] = on_backend("triton", public)
        providers["eager"] = lambda inputs: lambda: eager(*inputs)
        for name, build in providers.items():
            row = measure(benchmark, workload, name, build, quick)
            row.workload = workload.name
            rows.append(row)
            # Table key: the sampler is not part of it (the first sampler measured stands in).
            key = workload.name if op == "group_norm" else workload.name.rsplit("|", 1)[0]
            if not any(m[:3] == (op, key, name) for m in measured):
                measured.append((op, key, name, row.ms))
            print(format_rows([row]).split("\n")[1], flush=True)
    add_speedups(rows)
    return rows, measured


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument("--out", type=Path, default=None, help="folder for <gpu>.csv")
    parser.add_argument("--table", type=Path, default=None, help="autoselect JSON to write")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    args = parser.parse_args()
    if not args.no_csv:  # a CSV that cannot take the rows fails now, not after the timings
        csv_header(results_path(args.out))

    print(f"== cuda backend on {device_name()} (torch {torch.__version__})", flush=True)
    if on_gpu():
        begin = time.perf_counter()
        ok = cuda_extension.available()  # builds on first use: timed apart from the kernels
        detail = cuda_extension.origin() if ok else cuda_extension.unavailable_reason()
        status = "loaded" if ok else "UNAVAILABLE"
        print(f"   extension {status} in {time.perf_counter() - begin:.1f} s: {detail}")
    else:
        print("   no GPU: eager path only at reduced shapes (numbers are not kernel timings)")
    norm_shapes = QUICK_GROUP_NORM_SHAPES if args.quick else GROUP_NORM_SHAPES
    norm_workloads = [
        group_norm_workload(shape, torch.float16, layout)
        for layout in (True, False)
        for shape in norm_shapes
    ]
    norm_workloads.append(group_norm_workload((2, 640, 32, 32), torch.bfloat16, True))
    step_workloads = [
        sampler_step_workload(shape, torch.float16, sampler)
        for sampler in (("ddim",) if args.quick else ("ddim", "dpmpp_2m"))
        for shape in LATENT_SHAPES
    ]
    rows, measured = run_op(
        "group_norm",
        "cuda_backend_group_norm",
        norm_workloads,
        group_norm_eager,
        group_norm,
        cuda_group_norm,
        args.quick,
    )
    step_rows, step_measured = run_op(
        "sampler_step",
        "cuda_backend_sampler_step",
        step_workloads,
        sampler_step_eager,
        sampler_step,
        cuda_sampler_step,
        args.quick,
    )
    rows += step_rows
    measured += step_measured
    print(format_rows(rows), flush=True)

    table = autoselect.table_from_rows(device_name(), measured)
    print("\nbackend the runtime would pick (cuda vs triton, measured):")
    timings = autoselect._validate(table, "measured")
    for entry in table["entries"]:
        choice = autoselect.preferred_backend(entry["op"], entry["key"], table=timings)
        print(f"  {entry['op']:<13} {entry['key']:<32} -> {choice}   {entry['ms']}")
    if args.no_csv:
        return
    csv_path = append_csv([r for r in rows if r.ms is not None or r.notes], results_path(args.out))
    table_path = args.table or (args.out or RESULTS_DIR) / "backend_table.json"
    if on_gpu():
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {table_path}")
    print(f"appended {len(rows)} rows to {csv_path}")


if __name__ == "__main__":
    main()
