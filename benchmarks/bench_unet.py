"""U-Net step benchmark: one forward at the SD1.5 (batch 2 and 1) and SDXL (batch 2) shapes.

Random weights at the real architectures (benchmarks/model_configs.py), fp16 on GPU. Providers:
  fastdiff           optimize(): fp16, channels-last, fused QKV, Triton kernels, biases and
                     residuals folded into other kernels, each upsampler as the backend table
                     measured fastest at its shape (upsample_fold="auto"), CUDA graph
  fastdiff-nofold    fastdiff with optimize(fold_biases=False) (what the folds buy)
  fastdiff-fusedgeglu fastdiff with the feed-forward's fused GEGLU projection (linear_geglu's
                     triton kernel) wherever the auto table has not measured it (what it buys)
  fastdiff-conv3x3   fastdiff with the split-reduction 3x3 convolution kernel (conv3x3) on the
                     small feature maps wherever the table has not measured it (what it buys)
  fastdiff-catkernel fastdiff with the channels-last concatenation kernel (cat_channels) for
                     the skip connections wherever the table has not measured it (what it buys)
  fastdiff-residkernel fastdiff with the one-pass bias + residual kernel (bias_residual) at the
                     identity-shortcut ResNet blocks' ends wherever unmeasured (what it buys)
  fastdiff-upfold    fastdiff with optimize(upsample_fold="transposed"): each upsampler as one
                     transposed convolution over the small map, whatever the table says (what
                     the fold buys where fastdiff's auto does not already run it)
  fastdiff-upfold-phases  the same with upsample_fold="phases" (a 2x2 convolution per phase)
  fastdiff-cfgshare  fastdiff given a guided batch's latents once (the first half of the sample
                     and timesteps, all the contexts), as the optimized pipeline's guided steps
                     give them: the blocks before the first cross-attention run on half the
                     rows (SD1.5; SDXL's pooled text differs between the halves, and its U-Net
                     repeats the latents up front), what optimize(share_guided_input) buys
  fastdiff-nograph   the same without the CUDA graph (what graphs buy)
  fastdiff-nograph-nocache  fastdiff-nograph with kernels/launch_cache.py off: every launch
                     through Triton's launch front end (what the launch cache buys)
  fastdiff-nchw      fastdiff with NCHW activations (what channels-last buys)
  fastdiff-nokernels fastdiff with PyTorch's ops instead of ours (what the kernels buy)
  fastdiff-eager     fastdiff's model in fp16, NCHW, plain PyTorch ops (FASTDIFF_BACKEND=eager)
  diffusers          diffusers' UNet2DConditionModel, fp16, eager (when diffusers is installed)
  diffusers-graph    the same under one CUDA graph (BASELINES.md "eager + CUDA graph")
  fastdiff-compile   fastdiff + torch.compile of the U-Net blocks, under the CUDA graph (--compile)
  diffusers-compile  torch.compile(default) of diffusers' U-Net (only with --compile: ~1 min)
On CPU the toy configs run in float32 on the eager path, in seconds, and the table says so.

    python benchmarks/bench_unet.py [--quick] [--compile] [--workloads sd15_b2,sdxl_b2]
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_bench as mb  # noqa: E402
import model_bench_cli as cli  # noqa: E402
from model_configs import TEXT_EMBED_DIM, model_config  # noqa: E402

PROVIDERS = (
    "fastdiff",
    "fastdiff-nofold",
    "fastdiff-fusedgeglu",
    "fastdiff-conv3x3",
    "fastdiff-catkernel",
    "fastdiff-residkernel",
    "fastdiff-upfold",
    "fastdiff-upfold-phases",
    "fastdiff-cfgshare",
    "fastdiff-nograph",
    "fastdiff-nograph-nocache",
    "fastdiff-nchw",
    "fastdiff-nokernels",
    "fastdiff-eager",
    "fastdiff-compile",
    "diffusers",
    "diffusers-graph",
    "diffusers-compile",
)


@dataclass(frozen=True)
class UNetWorkload:
    name: str
    config: str
    batch: int
    size: int  # latent height = width
    tokens: int
    context_dim: int


GPU_WORKLOADS = {
    "sd15_b2": UNetWorkload("sd15_b2", "sd15_unet", 2, 64, 77, 768),
    "sd15_b1": UNetWorkload("sd15_b1", "sd15_unet", 1, 64, 77, 768),
    "sdxl_b2": UNetWorkload("sdxl_b2", "sdxl_unet", 2, 128, 77, 2048),
}
CPU_WORKLOADS = {
    "sd15_b2": UNetWorkload("tiny_sd15_b2", "tiny_sd15_unet", 2, 8, 77, 32),
    "sd15_b1": UNetWorkload("tiny_sd15_b1", "tiny_sd15_unet", 1, 8, 77, 32),
    "sdxl_b2": UNetWorkload("tiny_sdxl_b2", "tiny_sdxl_unet", 2, 8, 77, 32),
}


def unet_inputs(work: UNetWorkload, device, dtype) -> dict:
    """sample, timestep, encoder_hidden_states and (SDXL) added_cond_kwargs."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    inputs = {
        "sample": randn(work.batch, 4, work.size, work.size),
        "timestep": torch.full((work.batch,), 500, dtype=torch.long, device=device),
        "encoder_hidden_states": randn(work.batch, work.tokens, work.context_dim),
    }
    if work.config in TEXT_EMBED_DIM:
        pixels = float(work.size * 8)
        time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]], device=device)
        inputs["added_cond_kwargs"] = {
            "text_embeds": randn(work.batch, TEXT_EMBED_DIM[work.config]),
            "time_ids": time_ids.repeat(work.batch, 1).to(dtype),
        }
    return inputs


def unet_flops(work: UNetWorkload) -> float | None:
    """FLOP of one forward, counted on the meta device (no memory, no compute)."""
    from fastdiff.models import UNet2DConditionModel

    try:
        with torch.device("meta"):
            model = UNet2DConditionModel(model_config(work.config))
        inputs = unet_inputs(work, "meta", torch.float32)
        return mb.count_flops(lambda: model(**inputs))
    except Exception as error:
        print(f"FLOP count on meta failed ({error}); TFLOP/s column left empty")
        return None


# Providers that run one untimed kernel wherever the auto table has not measured it, to put
# the optimized step with it beside the default's in one run.
UNTIMED_KERNEL_PROVIDERS = {
    "fastdiff-fusedgeglu": "linear_geglu",
    "fastdiff-conv3x3": "conv3x3",
    "fastdiff-catkernel": "cat_channels",
    "fastdiff-residkernel": "bias_residual",
}
CFG_SHARE = "fastdiff-cfgshare"


def shared_guided_inputs(inputs: dict) -> dict:
    """A guided batch's inputs as the optimized pipeline passes them: the latents and
    timesteps of the first half (the two halves' are the same), every row's context and added
    conditions (fastdiff.models.context_groups)."""
    half = inputs["sample"].shape[0] // 2
    if half == 0:
        return inputs
    return {**inputs, "sample": inputs["sample"][:half], "timestep": inputs["timestep"][:half]}


# Providers that fold the upsamplers (optimize(upsample_fold=...)); the others run them unfolded.
UPSAMPLE_FOLDS = {"fastdiff-upfold": "transposed", "fastdiff-upfold-phases": "phases"}


@contextlib.contextmanager
def kernel_where_unmeasured(*ops: str) -> Iterator[None]:
    """The auto backend sending each of ``ops`` (among autoselect's UNMEASURED_BACKEND) to its
    triton kernel at every shape the table has not measured, where it otherwise keeps PyTorch's
    path; the other ops as they are."""
    from fastdiff.ops import autoselect

    saved = autoselect.UNMEASURED_BACKEND
    autoselect.UNMEASURED_BACKEND = {
        name: backend for name, backend in saved.items() if name not in ops
    }
    autoselect.cached_preference.cache_clear()
    try:
        yield
    finally:
        autoselect.UNMEASURED_BACKEND = saved
        autoselect.cached_preference.cache_clear()


def provider_setup(
    provider: str, work: UNetWorkload, holder: mb.ModelHolder
) -> Callable[[], Callable[[], object]]:
    from fastdiff.ops import use_backend
    from fastdiff.runtime import GraphedCall
    from fastdiff.runtime.optimize import ops_backend

    device, dtype = holder.device, holder.dtype

    def setup():
        inputs = unet_inputs(work, device, dtype)
        if provider == "fastdiff-eager":
            model = holder.fastdiff_model(prepared=False)

            def run():
                with use_backend("eager"):
                    return model(**inputs)

            return run
        if provider in (
            "fastdiff",
            "fastdiff-nofold",
            "fastdiff-fusedgeglu",
            "fastdiff-conv3x3",
            "fastdiff-catkernel",
            "fastdiff-residkernel",
            *UPSAMPLE_FOLDS,
            CFG_SHARE,
            "fastdiff-nograph",
            "fastdiff-nograph-nocache",
            "fastdiff-nchw",
            "fastdiff-nokernels",
            "fastdiff-compile",
        ):
            nhwc = provider != "fastdiff-nchw"
            model = holder.fastdiff_model(prepared=True, channels_last=nhwc)
            # The model is shared by the providers, which run one after another: each sets the
            # folds it measures here, once, outside the timed calls (switching them walks the
            # modules and packs or unpacks the time projections; inside run_graphed it added
            # about a millisecond per call to every graphed row of the 2026-11-28 run).
            model.fold_conv_biases(provider != "fastdiff-nofold")
            model.fold_upsampling(UPSAMPLE_FOLDS.get(provider, "auto"))  # auto: as optimize()
            if provider == "fastdiff-compile":
                from fastdiff.runtime.optimize import compile_blocks

                compile_blocks(model, "default")
            if provider == CFG_SHARE:
                inputs = shared_guided_inputs(inputs)
            if device.type == "cuda" and nhwc:
                inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
            if provider in ("fastdiff-nograph", "fastdiff-nograph-nocache"):
                from fastdiff.kernels import launch_cache

                cache = provider == "fastdiff-nograph"

                def run_nograph():
                    # what optimize() selects
                    with ops_backend(kernels=True), launch_cache.enabled(cache):
                        return model(**inputs)

                return run_nograph
            # On CPU the cache replays eagerly: the same code path, without capture.
            graphed = GraphedCall(model, mb.graph_cache(), kind="unet")
            kernels = provider != "fastdiff-nokernels"
            untimed = UNTIMED_KERNEL_PROVIDERS.get(provider)

            def run_graphed():
                # The backend is part of the graph's key, so it is set on every call, as
                # optimize()'s runtime does. (Each provider's cache is its own: an untimed
                # kernel's graph is never fastdiff's.)
                with ops_backend(kernels):
                    if untimed is None:
                        return graphed(**inputs)
                    with kernel_where_unmeasured(untimed):
                        return graphed(**inputs)

            run_graphed.graphed = graphed  # read by model_bench.run_case
            return run_graphed
        model = holder.diffusers_model()

        def forward(**kw):
            return model(**kw, return_dict=False)[0]

        if provider == "diffusers":
            return lambda: forward(**inputs)
        if provider == "diffusers-graph":
            graphed = GraphedCall(forward, mb.graph_cache(), kind="unet")

            def run_diffusers_graph():
                return graphed(**inputs)

            run_diffusers_graph.graphed = graphed
            return run_diffusers_graph
        if provider == "diffusers-compile":
            compiled = torch.compile(model)
            return lambda: compiled(**inputs, return_dict=False)[0]
        raise ValueError(f"unknown provider {provider!r}; allowed values: {', '.join(PROVIDERS)}")

    return setup


def default_providers(compile_: bool) -> list[str]:
    """Headline providers first (a time limit cuts from the end), then the ablations."""
    providers = ["fastdiff-eager", "fastdiff"]
    if mb.diffusers_available():
        providers += ["diffusers", "diffusers-graph"]
    if mb.on_gpu():  # without CUDA these equal fastdiff
        providers += [
            "fastdiff-nofold",
            "fastdiff-fusedgeglu",
            "fastdiff-conv3x3",
            "fastdiff-catkernel",
            "fastdiff-residkernel",
            *UPSAMPLE_FOLDS,
            CFG_SHARE,
            "fastdiff-nokernels",
            "fastdiff-nchw",
            "fastdiff-nograph",
            "fastdiff-nograph-nocache",
        ]
    if compile_:
        providers += ["fastdiff-compile"] + (
            ["diffusers-compile"] if mb.diffusers_available() else []
        )
    return providers


def cases(
    workloads: list[str] | None = None, providers: list[str] | None = None, compile_: bool = False
) -> list[mb.Case]:
    table = GPU_WORKLOADS if mb.on_gpu() else CPU_WORKLOADS
    names = workloads or [name for name in table if mb.on_gpu() or name != "sd15_b1"]
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown U-Net workloads {unknown}; allowed values: {', '.join(table)}")
    providers = mb.available_providers(providers or default_providers(compile_))
    device = torch.device("cuda" if mb.on_gpu() else "cpu")
    dtype = torch.float16 if mb.on_gpu() else torch.float32
    note = "" if mb.on_gpu() else "CPU: toy config, float32, eager reference path"
    result = []
    for name in names:
        work = table[name]
        holder = mb.ModelHolder("unet", work.config, device, dtype)
        # One image per call: batch 2 is one guided image, batch 1 one unguided image.
        result += mb.model_cases(
            "unet",
            work.name,
            providers,
            lambda provider, work=work, holder=holder: provider_setup(provider, work, holder),
            holder,
            unet_flops(work),
            note,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = cli.argument_parser(__doc__, PROVIDERS)
    parser.add_argument("--workloads", help="comma-separated: sd15_b2,sd15_b1,sdxl_b2")
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",") if args.workloads else None
    if args.quick and workloads is None:
        workloads = ["sd15_b2"]
    return cli.run_and_report(cases(workloads, args.providers, args.compile), args)


if __name__ == "__main__":
    sys.exit(main())
