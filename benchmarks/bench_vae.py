"""VAE decode benchmark: SD AutoencoderKL, latents 1x4x64x64 -> a 512x512 image; and the same
decode by TAESD (AutoencoderTiny, diffusers' default config), the fast autoencoder users swap in.

Random weights at the real architecture, fp16 on GPU. Providers as in bench_unet.py:
fastdiff (fp16, channels-last, fused QKV, Triton kernels, each upsampler as the backend table
measured fastest at its shape, CUDA graph), fastdiff-nograph,
fastdiff-nchw (NCHW activations), fastdiff-nokernels (PyTorch ops), fastdiff-upfold and
fastdiff-upfold-phases (the KL decoder's upsamplers folded: optimize(upsample_fold="transposed"
/ "phases"); TAESD has no such upsampler), fastdiff-biasfold (the KL decoder's ResNet blocks
with the U-Net's bias folds, ``fold_conv_biases()``: conv1's bias added by norm2's GroupNorm
kernel, conv2's joining a 1x1 shortcut's GEMM; optimize() leaves the VAE unfolded),
fastdiff-eager (plain PyTorch ops, NCHW), diffusers,
diffusers-graph, diffusers-compile (--compile). On CPU a toy VAE runs in float32 on the eager
path.

    python benchmarks/bench_vae.py [--quick] [--compile]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_bench as mb  # noqa: E402
import model_bench_cli as cli  # noqa: E402
from model_configs import model_config  # noqa: E402

PROVIDERS = (
    "fastdiff",
    "fastdiff-nograph",
    "fastdiff-nchw",
    "fastdiff-nokernels",
    "fastdiff-upfold",
    "fastdiff-upfold-phases",
    "fastdiff-biasfold",
    "fastdiff-eager",
    "diffusers",
    "diffusers-graph",
    "diffusers-compile",
)


# Providers that fold the KL decoder's upsamplers (optimize(upsample_fold=...)).
UPSAMPLE_FOLDS = {"fastdiff-upfold": "transposed", "fastdiff-upfold-phases": "phases"}
BIAS_FOLD = "fastdiff-biasfold"  # the decoder's ResNet blocks with fold_conv_biases()
KL_ONLY = (*UPSAMPLE_FOLDS, BIAS_FOLD)  # rows that would repeat fastdiff's for TAESD


def workloads() -> list[tuple[str, str, str, int]]:
    """(kind, name, config, latent size) of each decode: the KL VAE's, then TAESD's."""
    if mb.on_gpu():
        return [("vae", "vae_decode_512", "sd_vae", 64), ("taesd", "taesd_decode_512", "taesd", 64)]
    return [
        ("vae", "tiny_vae_decode", "tiny_vae", 8),
        ("taesd", "tiny_taesd_decode", "tiny_taesd", 8),
    ]


def vae_flops(config: str, size: int, kind: str = "vae") -> float | None:
    import fastdiff.models

    try:
        with torch.device("meta"):
            model = getattr(fastdiff.models, mb.ModelHolder.CLASSES[kind])(model_config(config))
            latents = torch.empty(1, 4, size, size)
        return mb.count_flops(lambda: model.decode(latents))
    except Exception as error:
        print(f"FLOP count on meta failed ({error}); TFLOP/s column left empty")
        return None


def provider_setup(provider: str, holder: mb.ModelHolder, size: int):
    from fastdiff.ops import use_backend
    from fastdiff.runtime import GraphedCall
    from fastdiff.runtime.optimize import ops_backend

    def setup():
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, size, size, generator=generator)
        latents = latents.to(device=holder.device, dtype=holder.dtype)
        on_cuda = holder.device.type == "cuda"
        if provider == "fastdiff-eager":
            model = holder.fastdiff_model(prepared=False)

            def run():
                with use_backend("eager"):
                    return model.decode(latents)

            return run
        if provider in (
            "fastdiff",
            "fastdiff-nograph",
            "fastdiff-nchw",
            "fastdiff-nokernels",
            *KL_ONLY,
        ):
            nhwc = provider != "fastdiff-nchw"
            model = holder.fastdiff_model(prepared=True, channels_last=nhwc)
            # Shared by the providers: each sets the folds it measures, outside the timed calls.
            model.fold_upsampling(UPSAMPLE_FOLDS.get(provider, "auto"))  # auto: as optimize()
            model.fold_conv_biases(provider == BIAS_FOLD)
            if on_cuda and nhwc:
                latents = latents.contiguous(memory_format=torch.channels_last)
            if provider == "fastdiff-nograph":

                def run_nograph():
                    with ops_backend(kernels=True):  # what optimize() selects
                        return model.decode(latents)

                return run_nograph
            graphed = GraphedCall(model.decode, mb.graph_cache(), kind="vae")
            kernels = provider != "fastdiff-nokernels"

            def run_graphed():
                with ops_backend(kernels):  # chosen at capture, as optimize() does
                    return graphed(latents)

            run_graphed.graphed = graphed  # read by model_bench.run_case
            return run_graphed
        model = holder.diffusers_model()

        def decode(z):
            return model.decode(z, return_dict=False)[0]

        if provider == "diffusers":
            return lambda: decode(latents)
        if provider == "diffusers-graph":
            graphed = GraphedCall(decode, mb.graph_cache(), kind="vae")

            def run_diffusers_graph():
                return graphed(latents)

            run_diffusers_graph.graphed = graphed
            return run_diffusers_graph
        if provider == "diffusers-compile":
            compiled = torch.compile(decode)
            return lambda: compiled(latents)
        raise ValueError(f"unknown provider {provider!r}; allowed values: {', '.join(PROVIDERS)}")

    return setup


def default_providers(compile_: bool) -> list[str]:
    """Headline providers first (a time limit cuts from the end), then the ablations."""
    providers = ["fastdiff-eager", "fastdiff"]
    if mb.diffusers_available():
        providers += ["diffusers", "diffusers-graph"]
    if mb.on_gpu():  # without CUDA these equal fastdiff
        providers += ["fastdiff-nokernels", "fastdiff-nchw", "fastdiff-nograph", *KL_ONLY]
    if compile_ and mb.diffusers_available():
        providers.append("diffusers-compile")
    return providers


def cases(providers: list[str] | None = None, compile_: bool = False) -> list[mb.Case]:
    device = torch.device("cuda" if mb.on_gpu() else "cpu")
    dtype = torch.float16 if mb.on_gpu() else torch.float32
    note = "" if mb.on_gpu() else "CPU: toy config, float32, eager reference path"
    providers = mb.available_providers(providers or default_providers(compile_))
    all_cases = []
    for kind, name, config, size in workloads():
        holder = mb.ModelHolder(kind, config, device, dtype)
        flop = vae_flops(config, size, kind)
        setup_for = functools.partial(provider_setup, holder=holder, size=size)
        # TAESD upsamples by nn.Upsample modules and has no ResNetBlock2D, which the folds
        # leave alone: those rows would repeat fastdiff's.
        chosen = [p for p in providers if kind == "vae" or p not in KL_ONLY]
        all_cases += mb.model_cases("vae", name, chosen, setup_for, holder, flop, note)
    return all_cases


def main(argv: list[str] | None = None) -> int:
    args = cli.argument_parser(__doc__, PROVIDERS).parse_args(argv)
    return cli.run_and_report(cases(args.providers, args.compile), args)


if __name__ == "__main__":
    sys.exit(main())
