"""Host time of one call of each fastdiff op on the Triton path, measured on a machine without a
GPU: what a launch costs the CPU outside a CUDA graph, where an eager U-Net (``optimize(...,
graphs=False)``, or a user calling ``fastdiff.ops`` directly) waits on it.

Each op is called on CPU tensors of an SD1.5 shape (fp16) with the triton backend and Triton's
driver replaced by ``triton_sm90.py``'s stub (``launches_stubbed``): kernels compile for sm_90,
and the op's checks, PyTorch's dispatch, the output's allocation, Triton's launch front end
(argument binding, specialisation, the kernel cache lookup, the grid) and the call of the
kernel's launcher all run as on a GPU; only the launcher's own work (a few µs of C on a GPU
machine) is replaced by a Python function that does nothing. Columns, µs per call (the fastest
of 7 rounds):

  cached     the whole call as fastdiff makes it: a repeated launch goes from
             ``kernels/launch_cache.py`` straight to the kernel's launcher
  triton     the same with the launch cache off (``FASTDIFF_LAUNCH_CACHE=0``): every launch
             through Triton's launch front end
  python     fastdiff's Python and PyTorch's dispatch only (``launch_cache.launch`` returning at
             once: the rest of ``cached`` is the cache's lookup and the launcher's call)
  eager      the PyTorch ops the op replaces, on tiny CPU tensors of the same ranks (one
             element per spatial position or row): their dispatch and a trivial CPU kernel, about
             what each costs the host before its CUDA launch (meta tensors would time PyTorch's
             Python meta functions instead)

A GPU's own figure is ``bench_<op>.py``'s ``launch_ms`` note (the per-call event time, host
included). The absolute figures depend on the CPU; compare columns and commits on one machine.

``--unet`` times whole U-Net forwards instead: SD1.5's every layer at narrow widths
(``narrow_sd15_unet``: the same op calls in the same order), batch 2 at 8×8 latents, prepared
as ``optimize()`` prepares it (fused QKV, folded biases, channels-last; fp32, whose CPU
matrix products are quick, unlike fp16's), each op routed
as ``optimize()``'s auto backend routes it (by the shipped table: cuDNN for the 3x3
convolutions, for example), its kernels as above, in the same three ways; and on the eager
backend, whose PyTorch ops run on the CPU (at these widths, in little time). With the Triton
launches per forward.

    python benchmarks/host_overhead.py [--calls 2000] [--unet]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton_sm90  # noqa: E402  (starts the process again without TRITON_INTERPRET)
from fastdiff.kernels import launch_cache  # noqa: E402

from fastdiff.ops import use_backend  # noqa: E402

HALF = torch.float16


def empty(*shape: int, dtype=HALF) -> torch.Tensor:
    """A CPU tensor of a real shape for the Triton path (nothing reads or writes its values)."""
    return torch.empty(*shape, dtype=dtype)


def tiny(*shape: int) -> torch.Tensor:
    """A small fp32 CPU tensor for the eager column: dispatch and a trivial CPU kernel."""
    return torch.zeros(*shape)


def cases() -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(label, the fastdiff call, the eager PyTorch ops it replaces), at SD1.5 shapes."""
    from fastdiff import ops
    from fastdiff.ops.sampler_step import sampler_step_eager

    out = []
    x = empty(2, 640, 32, 32).to(memory_format=torch.channels_last)
    weight, offset = empty(640), empty(2, 640)
    x1, weight1, offset1 = tiny(2, 32, 1, 1), tiny(32), tiny(2, 32)
    out.append(
        (
            "group_norm 2x640x32x32 NHWC silu offset (one launch)",
            lambda: ops.group_norm(x, 32, weight, weight, 1e-5, True, offset),
            lambda: F.silu(F.group_norm(x1 + offset1[:, :, None, None], 32, weight1, weight1)),
        )
    )
    big = empty(2, 320, 64, 64).to(memory_format=torch.channels_last)
    weight320 = empty(320)
    out.append(
        (
            "group_norm 2x320x64x64 NHWC silu (three launches)",
            lambda: ops.group_norm(big, 32, weight320, weight320, 1e-5, True),
            lambda: F.silu(F.group_norm(x1, 32, weight1, weight1)),
        )
    )
    rows, width, other = empty(2, 4096, 320), empty(320), empty(2, 4096, 320)
    rows1, width1 = tiny(2, 1, 8), tiny(8)
    out.append(
        (
            "layer_norm 2x4096x320",
            lambda: ops.layer_norm(rows, width, width),
            lambda: F.layer_norm(rows1, (8,), width1, width1),
        )
    )

    def eager_add_norm():
        total = rows1 + width1 + rows1
        return total, F.layer_norm(total, (8,), width1, width1)

    out.append(
        (
            "add_layer_norm 2x4096x320 x_bias",
            lambda: ops.add_layer_norm(rows, other, width, width, 1e-5, None, width),
            eager_add_norm,
        )
    )
    qkv = empty(2, 4096, 3, 8, 40).permute(2, 0, 3, 1, 4)  # the fused projection's head views
    q, k, v = qkv.unbind(0)
    q1 = tiny(2, 1, 3, 8, 8).permute(2, 0, 3, 1, 4)[0]
    out.append(
        (
            "attention self 2x8x4096x40 (fused-QKV views)",
            lambda: ops.attention(q, k, v),
            lambda: F.scaled_dot_product_attention(q1, q1, q1),
        )
    )
    context = empty(2, 77, 2, 8, 40).permute(2, 0, 3, 1, 4)
    out.append(
        (
            "attention cross 2x8x4096x40, 77 keys",
            lambda: ops.attention(q, context[0], context[1]),
            lambda: F.scaled_dot_product_attention(q1, q1, q1),
        )
    )
    gate_in, gate1 = empty(2, 4096, 2560), tiny(2, 1, 16)

    def eager_geglu():
        value, gate = gate1.chunk(2, dim=-1)
        return value * F.gelu(gate)

    out.append(("geglu 2x4096x2560", lambda: ops.geglu(gate_in), eager_geglu))
    projection, projection_bias = empty(2560, 320), empty(2560)
    projection1, projection_bias1 = tiny(16, 8), tiny(16)

    def eager_linear_geglu():
        value, gate = F.linear(rows1, projection1, projection_bias1).chunk(2, dim=-1)
        return value * F.gelu(gate)

    out.append(
        (
            "linear_geglu 8192x320 -> 1280",
            lambda: ops.linear_geglu(rows, projection, projection_bias),
            eager_linear_geglu,
        )
    )
    latents, model, previous = empty(1, 4, 64, 64), empty(2, 4, 64, 64), empty(1, 4, 64, 64)
    table = empty(20, 10, dtype=torch.float32)
    step = torch.zeros((), dtype=torch.int64)
    guidance = torch.ones((), dtype=torch.float32)
    latents1, model1, table1 = tiny(1, 1, 1, 1), tiny(2, 1, 1, 1), tiny(20, 10)
    out.append(
        (
            "sampler_step 1x4x64x64 CFG, device step",
            lambda: ops.sampler_step(latents, model, table, step, previous, guidance),
            lambda: sampler_step_eager(latents1, model1, table1, step, latents1, guidance),
        )
    )
    return out


def narrow_unet() -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, its eager-backend twin): the narrow SD1.5 U-Net prepared as optimize() does
    (``triton_sm90.prepared_unet``), in fp32: the CPU's fp16 matrix products (about 0.1 ms each
    here) would hide the host time."""
    model, inputs = triton_sm90.prepared_unet("narrow_sd15_unet", 8, torch.float32)

    def eager():
        with use_backend("eager"):
            return model(**inputs)

    return (lambda: model(**inputs)), eager


@contextlib.contextmanager
def launches_skipped() -> Iterator[None]:
    """Inside, fastdiff's launches return at once: what is left of a call is fastdiff's
    Python and PyTorch's dispatch."""
    previous = launch_cache.launch
    launch_cache.launch = lambda kernel, grid, args, kwargs: None
    try:
        yield
    finally:
        launch_cache.launch = previous


def variants(call: Callable[[], object], eager: Callable[[], object]) -> dict[str, tuple]:
    """The four columns by name: (function, what makes the context it runs in)."""
    return {
        "cached": (call, contextlib.nullcontext),
        "triton": (call, lambda: launch_cache.enabled(False)),
        "python": (call, launches_skipped),
        "eager": (eager, contextlib.nullcontext),
    }


def choose_as_auto() -> None:
    """Route each op as ``optimize()``'s auto backend would on a GPU: by the shipped table per op
    and shape (triton where it names the CUDA extension, which is not built here), eager for
    the eager backend. ``select_backend`` itself sends CPU tensors' auto requests to eager."""
    from fastdiff.ops import autoselect, backend

    def choose(tensor, op=None, key=None):
        if backend.requested_backend() == "eager":
            return "eager"
        if op is None or key is None:
            return "triton"
        return "eager" if autoselect.cached_preference(op, key()) == "eager" else "triton"

    for name in (
        "attention",
        "bias_residual",
        "cat_channels",
        "conv3x3",
        "group_norm",
        "linear_geglu",
        "sampler_step",
    ):
        importlib.import_module(f"fastdiff.ops.{name}").select_backend = choose


def unet_main(calls: int) -> int:
    choose_as_auto()
    with torch.inference_mode(), use_backend("triton"), triton_sm90.launches_stubbed() as records:
        forward, eager = narrow_unet()
        forward()  # compiles
        records.clear()
        forward()
        launches = len(records)
        triton_sm90.RecordingLauncher.calls = None  # the timed calls record nothing
        ms = {name: us / 1e3 for name, us in per_call_us(variants(forward, eager), calls).items()}
        inside = launch_layer_ms(forward, calls)
    if not launches:
        print("no Triton kernel was launched: the U-Net did not take the triton path")
        return 1
    print(
        f"host ms per U-Net forward; torch {torch.__version__}, triton {triton_version()}, "
        f"{cpu_name()}"
    )
    print("narrow_sd15_unet (SD1.5's layers), batch 2, 8x8 latents, fp32, prepared as optimize()")
    print(f"  cached launches   {ms['cached']:8.2f} ms  ({launches} Triton launches a forward)")
    print(f"  triton launches   {ms['triton']:8.2f} ms  (the launch cache off)")
    print(f"  of it, python     {ms['python']:8.2f} ms  (fastdiff's launches returning at once)")
    print(f"  eager backend     {ms['eager']:8.2f} ms  (PyTorch ops on the CPU, these widths)")
    print("time inside fastdiff's launches (kernels.launch_cache.launch), ms per forward:")
    print(f"  cached            {inside['cached']:8.2f} ms")
    print(f"  triton            {inside['triton']:8.2f} ms  (the launch cache off)")
    return 0


def launch_layer_ms(forward: Callable[[], object], calls: int, rounds: int = 15) -> dict:
    """ms per forward spent inside ``launch_cache.launch``, with the cache and without (the
    fastest of ``rounds`` rounds, the two taking turns): the launch layer's cost apart from
    the forward's CPU arithmetic, whose noise on a shared machine hides a few ms."""
    real = launch_cache.launch
    spent = [0.0]

    def timed(kernel, grid, args, kwargs):
        begin = time.perf_counter()
        real(kernel, grid, args, kwargs)
        spent[0] += time.perf_counter() - begin

    samples: dict[str, list[float]] = {"cached": [], "triton": []}
    launch_cache.launch = timed
    try:
        for _ in range(rounds):
            for name, on in (("cached", True), ("triton", False)):
                with launch_cache.enabled(on):
                    spent[0] = 0.0
                    for _ in range(calls):
                        forward()
                    samples[name].append(spent[0] / calls * 1e3)
    finally:
        launch_cache.launch = real
    return {name: min(times) for name, times in samples.items()}


def per_call_us(
    variants: dict[
        str, tuple[Callable[[], object], Callable[[], contextlib.AbstractContextManager]]
    ],
    calls: int,
    rounds: int = 7,
) -> dict[str, float]:
    """µs per call of each variant (a function and what makes its context), the fastest of
    ``rounds`` rounds of ``calls`` calls. The variants take turns within each round, so that a
    slow spell of this shared machine slows all of them, not one column."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 1):
        for name, (fn, context) in variants.items():
            with context():
                if round_ == 0:  # warm-up
                    for _ in range(min(200, calls)):
                        fn()
                    continue
                begin = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - begin) / calls * 1e6)
    return {name: min(times) for name, times in samples.items()}  # noise only adds time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=None, help="calls per timed round")
    parser.add_argument("--unet", action="store_true", help="whole U-Net forwards instead")
    args = parser.parse_args(argv)

    import fastdiff.ops.backend as backend

    backend.triton_can_run = lambda tensor: True  # CPU tensors stand in for CUDA ones
    if args.unet:
        return unet_main(args.calls or 20)
    args.calls = args.calls or 2000
    table = []
    with torch.inference_mode(), use_backend("triton"), triton_sm90.launches_stubbed() as records:
        for label, call, eager in cases():
            call()  # compiles
            if not records:
                print(
                    f"{label}: no Triton kernel was launched: the op did not take the triton path"
                )
                return 1
            triton_sm90.RecordingLauncher.calls = None  # the timed calls record nothing
            table.append((label, per_call_us(variants(call, eager), args.calls)))
            records.clear()
            triton_sm90.RecordingLauncher.calls = records
    print(f"host µs per call; torch {torch.__version__}, triton {triton_version()}, {cpu_name()}")
    print(f"{'op (fp16)':52s}" + "".join(f" {name:>8s}" for name in table[0][1]))
    for label, figures in table:
        print(f"{label:52s}" + "".join(f" {figure:8.1f}" for figure in figures.values()))
    return 0


def triton_version() -> str:
    import triton

    return triton.__version__


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
