"""Full generation benchmark: SD1.5 at 512x512, DDIM, guidance 7.5, VAE decode; 20 and 4 steps.

Random weights at the real architectures, fp16 on GPU, prompt embeddings given (77x768, the text
encoder is not part of the timing). Providers:
  fastdiff           Pipeline.optimize(): 4 steps = one whole-loop graph + one VAE graph;
                     20 steps = a step graph replayed 20 times + the VAE graph
  fastdiff-nofold    the same with optimize(fold_biases=False) (what the folds buy)
  fastdiff-untimed   fastdiff with every change built since the fourth H200 run and off until
                     timed, together: optimize(upsample_fold="transposed") at every shape
                     (fastdiff: "auto", the table's choice per shape), the cat_channels
                     and bias_residual kernels wherever the table has not measured them, and
                     the VAE decoder's ResNet blocks with the bias folds (bench_unet / bench_vae
                     time each alone)
  fastdiff-taesd     fastdiff with TAESD (AutoencoderTiny) as the VAE: the fast decode users swap
                     in (another image: its FLOPs are its own)
  fastdiff-eager     the same Pipeline without optimize(): plain PyTorch ops, no graphs
  diffusers          StableDiffusionPipeline + DDIMScheduler, fp16, eager
  diffusers-compile  the same with torch.compile(unet) (only with --compile)
On CPU toy models run in float32 on the eager path.

    python benchmarks/bench_pipeline.py [--quick] [--compile] [--steps 20,4]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_bench as mb  # noqa: E402
import model_bench_cli as cli  # noqa: E402
from bench_unet import (  # noqa: E402
    CPU_WORKLOADS,
    GPU_WORKLOADS,
    kernel_where_unmeasured,
    unet_flops,
)
from bench_vae import vae_flops  # noqa: E402
from model_configs import SD_SCHEDULER, model_config  # noqa: E402

PROVIDERS = (
    "fastdiff",
    "fastdiff-nofold",
    "fastdiff-untimed",
    "fastdiff-taesd",
    "fastdiff-eager",
    "diffusers",
    "diffusers-compile",
)
GUIDANCE = 7.5
# Ops whose kernels the auto backend runs only where measured: fastdiff-untimed runs them at
# every unmeasured shape.
UNTIMED_KERNELS = ("cat_channels", "bias_residual")
FASTDIFF_PROVIDERS = (
    "fastdiff",
    "fastdiff-nofold",
    "fastdiff-untimed",
    "fastdiff-taesd",
    "fastdiff-eager",
)


def setting():
    """(unet config, vae config, latent size, context width) for this machine."""
    if mb.on_gpu():
        return "sd15_unet", "sd_vae", 64, 768
    return "tiny_sd15_unet", "tiny_vae", 8, 32


def taesd_config() -> str:
    """The TAESD config of the fastdiff-taesd rows (on CPU a small one with the toy VAE's
    downscale factor)."""
    return "taesd" if mb.on_gpu() else "tiny_taesd"


class PipelineHolder:
    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.fastdiff = self.optimized = self.diffusers = None
        self.fold_biases = True  # what the last optimize() was given
        self.taesd = False  # whether the pipeline's VAE is TAESD
        self.untimed = False  # whether the last optimize() switched on the untimed changes

    def release(self) -> None:
        self.print_graph_report()
        self.fastdiff = self.optimized = self.diffusers = None

    def print_graph_report(self) -> None:
        """The optimized pipeline's graphs: capture time and memory of each (once)."""
        runtime = getattr(self.fastdiff, "runtime", None)
        if runtime is not None and not getattr(runtime, "reported", False):
            print(runtime.graph_report(), flush=True)
            runtime.reported = True

    def fastdiff_pipeline(
        self, optimized: bool, fold_biases: bool = True, taesd: bool = False, untimed: bool = False
    ):
        from fastdiff.models import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
        from fastdiff.pipeline import Pipeline
        from fastdiff.runtime import EagerGraphBackend, optimize
        from fastdiff.sampling import NoiseSchedule

        if self.fastdiff is None or (self.optimized and not optimized) or self.taesd != taesd:
            self.diffusers = None
            self.fastdiff = None
            mb.free_memory()
            unet_config, vae_config, _, _ = setting()
            with torch.device(self.device):
                unet = UNet2DConditionModel(model_config(unet_config))
                if taesd:
                    vae = AutoencoderTiny(model_config(taesd_config()))
                else:
                    vae = AutoencoderKL(model_config(vae_config))
            self.taesd = taesd
            unet.to(self.dtype).eval().requires_grad_(False)
            vae.to(self.dtype).eval().requires_grad_(False)
            self.fastdiff = Pipeline(unet, vae, NoiseSchedule.from_config(SD_SCHEDULER))
            self.optimized = False
        settings = (fold_biases, untimed)
        if optimized and (not self.optimized or (self.fold_biases, self.untimed) != settings):
            on_cuda = self.device.type == "cuda"
            self.print_graph_report()  # optimizing again drops the graphs captured so far
            # On CPU the static-buffer loop runs without capture: the same code path as on GPU.
            optimize(
                self.fastdiff,
                dtype=self.dtype if on_cuda else None,
                backend=None if on_cuda else EagerGraphBackend(),
                fold_biases=fold_biases,
                upsample_fold="transposed" if untimed else "auto",
            )
            if untimed:  # optimize() leaves the VAE unfolded (and unfolds it again without)
                self.fastdiff.vae.fold_conv_biases(True)
            self.optimized, self.fold_biases, self.untimed = True, fold_biases, untimed
        return self.fastdiff

    def diffusers_pipeline(self):
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
        from diffusers import UNet2DConditionModel as DiffusersUNet

        if self.diffusers is None:
            self.fastdiff = None
            mb.free_memory()
            unet_config, vae_config, _, _ = setting()
            with torch.device(self.device):
                unet = DiffusersUNet(**model_config(unet_config))
                vae = AutoencoderKL(**model_config(vae_config))
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=None,
                tokenizer=None,
                unet=unet,
                scheduler=DDIMScheduler(**SD_SCHEDULER),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.to(self.device, self.dtype)
            pipe.set_progress_bar_config(disable=True)
            self.diffusers = pipe
        return self.diffusers


def provider_setup(provider: str, holder: PipelineHolder, steps: int):
    from fastdiff.ops import use_backend

    def setup():
        _, _, size, width = setting()
        generator = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(holder.device, holder.dtype)

        embeds, negative = randn(1, 77, width), randn(1, 77, width)
        latents = randn(1, 4, size, size)
        pixels = size * (8 if mb.on_gpu() else 2)
        if provider in FASTDIFF_PROVIDERS:
            pipe = holder.fastdiff_pipeline(
                optimized=provider != "fastdiff-eager",
                fold_biases=provider != "fastdiff-nofold",
                taesd=provider == "fastdiff-taesd",
                untimed=provider == "fastdiff-untimed",
            )
            # The untimed kernels where the table has not measured them: captured into this
            # provider's graphs (its optimize() started a new graph cache).
            untimed = provider == "fastdiff-untimed"

            def run():
                backend = "eager" if provider == "fastdiff-eager" else None
                kernels = (
                    kernel_where_unmeasured(*UNTIMED_KERNELS)
                    if untimed
                    else contextlib.nullcontext()
                )
                with use_backend(backend), kernels:
                    return pipe(
                        prompt_embeds=embeds,
                        negative_prompt_embeds=negative,
                        num_inference_steps=steps,
                        guidance_scale=GUIDANCE,
                        sampler="ddim",
                        height=pixels,
                        width=pixels,
                        latents=latents,
                        output_type="tensor",
                        progress=False,
                    )

            return run
        pipe = holder.diffusers_pipeline()
        if provider == "diffusers-compile":
            pipe.unet = torch.compile(pipe.unet)
        elif provider != "diffusers":
            raise ValueError(f"unknown provider {provider!r}; allowed: {', '.join(PROVIDERS)}")

        def run_diffusers():
            return pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                height=pixels,
                width=pixels,
                latents=latents,
                output_type="pt",
            ).images

        return run_diffusers

    return setup


def default_providers(compile_: bool) -> list[str]:
    providers = ["fastdiff-eager", "fastdiff"]
    if mb.diffusers_available():
        providers.append("diffusers")
        if compile_:
            providers.append("diffusers-compile")
    if mb.on_gpu():  # last: a time limit cuts from the end, and diffusers is the reference
        providers += ["fastdiff-nofold", "fastdiff-untimed"]
    providers.append("fastdiff-taesd")
    return providers


def cases(
    steps_list: list[int] | None = None, providers: list[str] | None = None, compile_: bool = False
) -> list[mb.Case]:
    steps_list = steps_list or [20, 4]
    device = torch.device("cuda" if mb.on_gpu() else "cpu")
    dtype = torch.float16 if mb.on_gpu() else torch.float32
    note = "" if mb.on_gpu() else "CPU: toy config, float32, eager reference path"
    unet_work = (GPU_WORKLOADS if mb.on_gpu() else CPU_WORKLOADS)["sd15_b2"]
    unet_config, vae_config, size, _ = setting()
    per_step, decode = unet_flops(unet_work), vae_flops(vae_config, size)
    taesd_decode = vae_flops(taesd_config(), size, "taesd")
    providers = mb.available_providers(providers or default_providers(compile_))
    result = []
    for steps in steps_list:
        holder = PipelineHolder(device, dtype)
        flop = per_step * steps + decode if per_step and decode else None
        name = f"{'sd15' if mb.on_gpu() else 'tiny'}_{steps}step_cfg"
        taesd_flop = per_step * steps + taesd_decode if per_step and taesd_decode else None
        for index, provider in enumerate(providers):
            case = mb.Case(
                "pipeline",
                name,
                provider,
                provider_setup(provider, holder, steps),
                images=1,
                flop=taesd_flop if provider == "fastdiff-taesd" else flop,  # its own decode's
                note=note,
            )
            if provider in ("fastdiff", "fastdiff-nofold", "fastdiff-untimed"):
                case.teardown = holder.print_graph_report
            if index == len(providers) - 1:
                case.teardown = holder.release
            result.append(case)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = cli.argument_parser(__doc__, PROVIDERS)
    parser.add_argument(
        "--steps",
        type=lambda text: [int(s) for s in text.split(",")],
        help="comma-separated step counts (default 20,4)",
    )
    args = parser.parse_args(argv)
    steps = args.steps or ([4] if args.quick else None)
    return cli.run_and_report(cases(steps, args.providers, args.compile), args)


if __name__ == "__main__":
    sys.exit(main())
