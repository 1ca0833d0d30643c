"""``fastdiff profile``: where one U-Net step (or VAE decode) spends its time, eager against
fastdiff optimized.

torch.profiler records a few calls for each path and the command prints the kernels by
device time (CPU ops on a machine without CUDA), grouped into categories (convolution, layout
conversion, attention, GroupNorm, GEMM, elementwise). The optimized path is profiled without its
CUDA graph so each kernel stays visible; the graph's replay time is printed beside it. With
``--by-op`` the rows are the ops that launched the kernels instead, with their input shapes, so
that a kernel name such as ``elementwise_kernel`` can be traced to the add or copy that runs it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict

import torch

VAE_MODELS = ("vae", "tiny_vae")  # the SD KL decoder (512x512 image), its toy config
MODELS = ("sd15", "sdxl", "tiny", *VAE_MODELS)
CATEGORIES = (  # first match wins: cuDNN conv kernels often contain "gemm" in their names, and
    # cuDNN's attention kernels and ops "cudnn" and "fprop", so attention is matched first
    ("layout conversion", r"nchwtonhwc|nhwctonchw|convert.*layout|permute|transpose"),
    ("attention", r"attn|attention|flash|fmha|sdpa|softmax"),
    ("convolution", r"conv|fprop|dgrad|implicit|cudnn|winograd|xmma"),
    ("group norm", r"group_?norm"),
    ("layer norm", r"layer_?norm"),
    ("sampler step", r"sampler_step"),
    ("gemm", r"gemm|cutlass|cublas|matmul|addmm|\bmm\b|linear|sm90"),
    ("elementwise", r"elementwise|vectorized|silu|gelu|geglu|add|mul|copy|cat|fill|where"),
)


def unet_config(model: str) -> tuple[dict, int, int, int, int]:
    """(config, latent size, tokens, context width, pooled text width) from the checkout's
    benchmarks/model_configs.py, the one place the real architectures are written down."""
    configs = load_configs()
    name = {"sd15": "sd15_unet", "sdxl": "sdxl_unet", "tiny": "tiny_sd15_unet"}[model]
    config = configs.model_config(name)
    size = {"sd15": 64, "sdxl": 128, "tiny": 8}[model]
    return config, size, 77, config["cross_attention_dim"], configs.TEXT_EMBED_DIM.get(name, 0)


def category(name: str) -> str:
    lowered = name.lower()  # the patterns are lower case
    for label, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return label
    return "other"


def device_time(event) -> float:
    """Self device time in microseconds (the attribute was renamed across torch versions)."""
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return float(value)
    return 0.0


def shapes_text(input_shapes) -> str:
    """'(2x320x64x64, 2x320x1x1)' from a profiler event's input shapes (empty ones dropped)."""
    shapes = ["x".join(map(str, shape)) for shape in input_shapes or [] if shape]
    return f"({', '.join(shapes)})" if shapes else ""


def profile_calls(
    fn, calls: int, on_cuda: bool, by_op: bool = False
) -> list[tuple[str, int, float]]:
    """(name, calls, microseconds per profiled call) of kernels (GPU) or aten ops (CPU).

    ``by_op``: the ops (aten and fastdiff's custom ops) with their input shapes, each with the
    device time of the kernels it launched itself (GPU) or its own CPU time (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    fn()  # warm-up outside the trace (cuDNN/Triton autotuning)
    if on_cuda:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=by_op) as trace:
        for _ in range(calls):
            fn()
        if on_cuda:
            torch.cuda.synchronize()
    rows = []
    for event in trace.key_averages(group_by_input_shape=by_op):
        is_kernel = str(getattr(event, "device_type", "")).endswith("CUDA")
        if on_cuda and by_op:  # the CPU-side op, charged with the kernels it launched
            micros = device_time(event) if not is_kernel else 0.0
        elif on_cuda:
            micros = device_time(event) if is_kernel else 0.0
        else:
            micros = float(event.self_cpu_time_total) if event.key.startswith("aten::") else 0.0
        if micros <= 0:
            continue
        name = f"{event.key} {shapes_text(event.input_shapes)}" if by_op else event.key
        rows.append((name.strip(), int(event.count) // calls, micros / calls))
    return sorted(rows, key=lambda row: -row[2])


def print_breakdown(
    title: str, rows: list[tuple[str, int, float]], top: int, unit: str, width: int = 70
) -> None:
    total = sum(micros for _, _, micros in rows) or 1.0
    print(f"\n== {title}: {total / 1e3:.3f} ms of {unit} time per call")
    by_category: dict[str, float] = defaultdict(float)
    for name, _, micros in rows:
        by_category[category(name)] += micros
    for label, micros in sorted(by_category.items(), key=lambda item: -item[1]):
        print(f"  {label:<18} {micros / 1e3:9.3f} ms  {100 * micros / total:5.1f} %")
    print(f"  {'kernel / op':<{width}} {'calls':>5} {'ms':>8} {'%':>6}")
    for name, count, micros in rows[:top]:
        short = name if len(name) <= width else name[: width - 3] + "..."
        print(f"  {short:<{width}} {count:>5} {micros / 1e3:8.3f} {100 * micros / total:6.1f}")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="per-kernel time breakdown of one U-Net step or VAE decode, eager vs fastdiff "
        "optimized",
        description="Profile one U-Net forward or VAE decode (random weights at the chosen "
        "architecture) with "
        "torch.profiler, eager PyTorch ops against fastdiff's optimized path (fp16, "
        "channels-last, fused QKV, Triton kernels), and print the kernels by time.",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="architecture: a U-Net (sd15, sdxl, tiny) or the SD VAE's decoder (vae, tiny_vae) "
        "(default: sd15 on GPU, tiny on CPU)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch (default: 2 for a U-Net, one CFG image; 1 for the VAE decoder)",
    )
    parser.add_argument("--calls", type=int, default=3, help="profiled calls per path")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per path")
    parser.add_argument(
        "--no-fold-biases",
        dest="fold_biases",
        action="store_false",
        help="profile the optimized path with optimize(fold_biases=False) (default: folded, as "
        "optimize() prepares it)",
    )
    parser.add_argument(
        "--upsample-fold",
        choices=("auto", "transposed", "phases", "off"),
        default="auto",
        help="the optimized path's optimize(upsample_fold=...): each upsampler as one "
        "convolution over the small map, transposed or as phases, or off; auto (the default, "
        "as optimize() prepares it): each upsampler as the backend table measured fastest at "
        "its shape",
    )
    parser.add_argument(
        "--by-op",
        action="store_true",
        help="list the ops that launched the kernels, with their input shapes, not the kernels",
    )
    parser.set_defaults(handler=run)


def load_configs():
    """The checkout's benchmarks/model_configs.py module."""
    import importlib

    from fastdiff.commands.bench import benchmarks_dir

    folder = str(benchmarks_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("model_configs")


def unet_subject(model: str, batch: int, device, dtype):
    """(description, model, forward, its input) of one U-Net step."""
    from fastdiff.models import UNet2DConditionModel

    config, size, tokens, width, pooled = unet_config(model)
    with torch.device(device):
        unet = UNet2DConditionModel(config).to(dtype).eval().requires_grad_(False)
        sample = torch.randn(batch, 4, size, size, dtype=dtype)
        timestep = torch.full((batch,), 500, dtype=torch.long)
        context = torch.randn(batch, tokens, width, dtype=dtype)
        kwargs = {}
        if config.get("addition_embed_type") == "text_time":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, dtype=dtype),
                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, dtype=dtype),
            }

    def forward(x):
        return unet(x, timestep, context, **kwargs)

    what = f"U-Net {model}, batch {batch}, {size}x{size} latents"
    return what, unet, forward, sample


def vae_subject(model: str, batch: int, device, dtype):
    """(description, model, forward, its input) of one VAE decode: the SD KL decoder, 64x64
    latents to a 512x512 image ("vae"), or the toy one at 8x8 ("tiny_vae")."""
    from fastdiff.models import AutoencoderKL

    name, size = {"vae": ("sd_vae", 64), "tiny_vae": ("tiny_vae", 8)}[model]
    config = load_configs().model_config(name)
    with torch.device(device):
        vae = AutoencoderKL(config).to(dtype).eval().requires_grad_(False)
        latents = torch.randn(batch, config.get("latent_channels", 4), size, size, dtype=dtype)
    what = f"VAE decode ({name}), batch {batch}, {size}x{size} latents"
    return what, vae, vae.decode, latents


def run(args: argparse.Namespace) -> int:
    from fastdiff.ops import use_backend
    from fastdiff.runtime import (
        CudaGraphBackend,
        GraphCache,
        GraphedCall,
        OptimizeReport,
        prepare_module,
    )
    from fastdiff.runtime.optimize import ops_backend

    if args.calls < 1 or args.top < 1 or (args.batch is not None and args.batch < 1):
        raise ValueError("--batch, --calls and --top must be positive")
    on_cuda = torch.cuda.is_available()
    model = args.model or ("sd15" if on_cuda else "tiny")
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.float16 if on_cuda else torch.float32
    if not on_cuda:
        print("no CUDA: profiling CPU ops of the eager reference path (toy shapes unless --model)")
    else:
        torch.backends.cudnn.benchmark = True  # both paths get cuDNN's fastest algorithms
    is_vae = model in VAE_MODELS
    batch = args.batch if args.batch is not None else (1 if is_vae else 2)
    subject = vae_subject if is_vae else unet_subject
    what, module, forward, x = subject(model, batch, device, dtype)

    def eager():
        with use_backend("eager"), torch.no_grad():
            return forward(x)

    print(f"{what}, {str(dtype)[6:]}, {device}")
    unit = "GPU kernel" if on_cuda else "CPU op"
    name_width = 110 if args.by_op else 70  # room for the input shapes
    print_breakdown(
        "eager (PyTorch ops, NCHW)",
        profile_calls(eager, args.calls, on_cuda, args.by_op),
        args.top,
        unit,
        name_width,
    )
    # As optimize() prepares each model: the bias folds are the U-Net's only.
    fold_biases = args.fold_biases and not is_vae
    report = OptimizeReport(str(device))
    kind = "vae" if is_vae else "unet"
    upsample_fold = None if args.upsample_fold == "off" else args.upsample_fold
    prepare_module(module, kind, report, None, on_cuda, True, fold_biases, upsample_fold)
    fast_x = x.contiguous(memory_format=torch.channels_last) if on_cuda else x

    def optimized():
        with torch.no_grad(), ops_backend(kernels=True):  # the backend optimize() selects
            return forward(fast_x)

    folded = ""
    if not is_vae:
        folded = ", folded biases and residuals" if fold_biases else ", biases not folded"
    if upsample_fold in ("transposed", "phases"):
        folded += f", upsamplers as {upsample_fold} convolutions"
    elif upsample_fold is None:
        folded += ", upsamplers not folded"
    layout = ", channels-last" if on_cuda else ""  # prepare_module's, on CUDA only
    print_breakdown(
        f"fastdiff optimized, graph off (kernels{layout}, fused QKV{folded})",
        profile_calls(optimized, args.calls, on_cuda, args.by_op),
        args.top,
        unit,
        name_width,
    )
    if on_cuda:
        graphed = GraphedCall(forward, GraphCache(CudaGraphBackend()), kind=kind)
        with torch.no_grad(), ops_backend(kernels=True):
            graphed(fast_x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                graphed(fast_x)
            torch.cuda.synchronize()
        print(
            f"\nfastdiff optimized with its CUDA graph: "
            f"{(time.perf_counter() - start) * 100:.3f} ms per call (wall clock, 10 replays)"
        )
    return 0
