"""``fastdiff.runtime.optimize(pipe)``: prepare a loaded pipeline for speed.

What it does, and why each step pays on an H100/H200:

* fp16 (or bf16) weights: tensor cores, half the memory traffic.
* channels-last (NHWC) activations and conv weights: cuDNN runs NHWC convolutions natively; with
  NCHW it inserts layout conversions around every convolution (26 % of SD1.5's eager GPU time).
  Our GroupNorm kernel takes NHWC, so no conversion is left between blocks.
* fused QKV projections: one GEMM instead of three for self-attention.
* fastdiff's kernels through the ``auto`` ops backend: per op and shape the faster of the CUDA
  extension and Triton (GroupNorm, sampler step) or of Triton and PyTorch's SDPA (attention),
  by the measured table of ``fastdiff.ops.autoselect``.
* CUDA graphs: the U-Net launches hundreds of small kernels; eager PyTorch spends more host time
  launching them (31 ms) than the GPU spends running them (12 ms). A graph replays them all with
  one launch. Few-step generations capture the whole loop, longer ones one step.

Without CUDA it keeps everything eager on the reference path and says so.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.models.upsample_fold import AUTO as AUTO_UPSAMPLE_FOLD
from fastdiff.models.upsample_fold import check_mode as check_upsample_fold
from fastdiff.ops import autoselect, use_backend
from fastdiff.ops.backend import (
    attention_configs_summary,
    cuda_extension_module,
    requested_backend,
)
from fastdiff.runtime.denoise import GraphedDenoiser, build_call
from fastdiff.runtime.graphed_call import GraphedCall
from fastdiff.runtime.graphs import (
    CudaGraphBackend,
    EagerGraphBackend,
    GraphBackend,
    GraphCache,
    WeightAddresses,
)
from fastdiff.runtime.memory import format_mib, memory_snapshot

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class OptimizeReport:
    """What ``optimize`` changed, what it skipped and why, and how long it took."""

    device: str
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"fastdiff.runtime.optimize on {self.device} ({self.seconds:.2f} s)"]
        lines += [f"  applied: {item}" for item in self.applied]
        lines += [f"  skipped: {item} ({why})" for item, why in self.skipped.items()]
        return "\n".join(lines)


def compile_blocks(module: torch.nn.Module, mode: str, backend: str = "inductor") -> int:
    """torch.compile each U-Net/VAE stage (down, mid, up blocks) in place; returns how many.

    Blocks rather than the whole model: one compiled graph per block type and shape keeps the
    compile short and lets the runtime's CUDA graph capture the compiled kernels as usual.
    """
    count = 0
    for name in ("down_blocks", "up_blocks"):
        for block in getattr(module, name, None) or []:
            block.compile(mode=mode, backend=backend, dynamic=False)
            count += 1
    mid = getattr(module, "mid_block", None)
    if mid is not None:
        mid.compile(mode=mode, backend=backend, dynamic=False)
        count += 1
    for part in ("encoder", "decoder"):  # the VAE keeps its blocks one level down
        if hasattr(module, part):
            count += compile_blocks(getattr(module, part), mode, backend)
    return count


def prepare_module(
    module: torch.nn.Module,
    name: str,
    report: OptimizeReport,
    dtype: torch.dtype | None,
    channels_last: bool,
    fuse_qkv: bool,
    fold_biases: bool = False,
    upsample_fold: str | None = AUTO_UPSAMPLE_FOLD,
) -> None:
    """dtype, memory format, QKV fusion, (``fold_biases``) bias and residual folding and
    (``upsample_fold``) the upsamplers' folded convolutions of one model, in place."""
    module.eval().requires_grad_(False)
    if dtype is not None:
        module.to(dtype=dtype)
        report.applied.append(f"{name}: {str(dtype).replace('torch.', '')} weights")
    if fuse_qkv:
        fuse = getattr(module, "fuse_qkv_projections", None)
        if fuse is None:
            report.skipped[f"{name}: fused QKV"] = "model has no fuse_qkv_projections()"
        else:
            count = fuse()
            has_attention = getattr(module, "attention_modules", lambda: True)()
            if count or has_attention:
                report.applied.append(f"{name}: fused QKV projections ({count} attention modules)")
            else:  # e.g. TAESD, which has no attention
                report.skipped[f"{name}: fused QKV"] = "no attention modules"
    if channels_last:
        module.to(memory_format=torch.channels_last)
        report.applied.append(f"{name}: channels-last convolutions")
    fold = getattr(module, "fold_conv_biases", None)
    if fold is not None:  # also switches folding back off on a re-optimize without it
        count = fold(fold_biases)
        if fold_biases:
            report.applied.append(
                f"{name}: bias and residual folding on ({count} blocks with something to fold)"
            )
    elif fold_biases:
        report.skipped[f"{name}: bias folding"] = "model has no fold_conv_biases()"
    fold_up = getattr(module, "fold_upsampling", None)
    if fold_up is not None:  # also switches it back off on a re-optimize without it
        count = fold_up(upsample_fold)
        if upsample_fold == AUTO_UPSAMPLE_FOLD and count:
            measured = sum(key.startswith("upsample|") for key in autoselect.load_table())
            report.applied.append(
                f"{name}: {count} upsamplers, each call the two steps or a folded convolution "
                f"as the backend table measured fastest at its shape (upsample_fold='auto'; "
                f"{measured} upsampler shapes in the table, the two steps elsewhere)"
            )
        elif upsample_fold is not None and count:
            report.applied.append(
                f"{name}: {count} upsamplers as one {upsample_fold} convolution each (folded "
                f"weights {format_mib(module.folded_weight_bytes())})"
            )
        elif upsample_fold is not None:
            report.skipped[f"{name}: upsample fold"] = "no Upsample2D"
    elif upsample_fold is not None:
        report.skipped[f"{name}: upsample fold"] = "model has no fold_upsampling()"


def ops_backend(kernels: bool = True):
    """The ops backend of the optimized path, as a context manager. Kernels on: the ``auto``
    backend (per op and shape, the faster of the CUDA extension and Triton by the measured table)
    unless the user forced one; kernels off: eager PyTorch ops."""
    if not kernels:
        return use_backend("eager")
    return contextlib.nullcontext() if requested_backend() else use_backend("auto")


PHASE_NAMES = {
    "build_s": "build",
    "compile_ahead_s": "compile-ahead",
    # Not a phase of its own: the part of build's and compile-ahead's passes spent waiting for
    # the compilers once the forward (PyTorch's ops, cuDNN's search) had ended.
    "compile_wait_s": "of those waiting for compilers",
    "warmup_runs_s": "warm-up runs",
    "graph_capture_s": "capture",
}


def describe_phases(row: dict) -> str:
    """ " (build 0.1 s, compile-ahead 1.2 s, of those waiting for compilers 0.8 s, warm-up runs
    3.4 s, capture 0.1 s)" from a graph report row whose backend timed its phases
    (CudaGraphBackend), else ""."""
    parts = [f"{label} {row[name]} s" for name, label in PHASE_NAMES.items() if name in row]
    return f" ({', '.join(parts)})" if parts else ""


def decode_ahead_setting() -> bool:
    """``FASTDIFF_DECODE_AHEAD``: 1 (the default) runs the VAE decoder in each new denoising
    graph's compile-ahead pass (``OptimizedRuntime.decode_ahead``); 0 leaves the decoder's
    kernels to its own graph's pass at the first decode (kept to measure the two apart)."""
    setting = os.environ.get("FASTDIFF_DECODE_AHEAD", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"FASTDIFF_DECODE_AHEAD must be 0 or 1, got {setting!r}")
    return setting == "1"


class OptimizedRuntime:
    """The fast stages attached to a pipeline: ``denoise``, ``decode_latents`` and
    ``encode_moments`` (img2img's encoder) replacements.

    Every denoising call runs in the graphs: text-to-image, img2img (the plan's remaining rows)
    and guidance rescale (combined on the device before the fused step). A shape whose capture
    fails runs eagerly, and the runtime says so once (``graph_report``).
    """

    attached: bool = False  # True once the pipeline's stages call this runtime

    def __init__(
        self,
        pipe: Any,
        backend: GraphBackend,
        max_graphs: int,
        max_loop_steps: int,
        channels_last: bool,
        kernels: bool,
        report: OptimizeReport,
        decode_ahead: bool = True,
        shared_input: bool = False,
    ):
        self.pipe = pipe
        self.report = report
        self.kernels = kernels
        self.cache = GraphCache(backend, max_graphs=max_graphs)
        self.eager_denoise = pipe.denoise
        self.eager_decode_latents = pipe.decode_latents
        unet_weights = WeightAddresses(lambda: pipe.unet)
        self.denoiser = GraphedDenoiser(
            pipe.unet_forward,
            self.cache,
            model_dtype=lambda: pipe.dtype,  # read per call: the U-Net may be cast later
            channels_last=channels_last,
            max_loop_steps=max_loop_steps,
            # Only a backend with a compile-ahead pass runs ``then`` (GraphCache.get's also).
            then=self.decode_ahead if decode_ahead else None,
            # The packed context projections, once per generation rather than at every step.
            prepare_cond=getattr(pipe, "prepare_condition", None),
            # Host-side U-Net settings (FreeU) and where its weights live, read per call:
            # changing them (or swapping or casting the U-Net) captures anew.
            model_state=lambda: (*getattr(pipe.unet, "graph_state", tuple)(), unet_weights()),
            shared_input=shared_input,
        )
        # The VAE's tiling and slicing settings and its latent scaling are decided on the host:
        # part of the VAE graphs' keys (a pipeline without vae_graph_state has none to change).
        # Where the VAE's weights live too: a VAE swapped or cast after optimize() gets graphs
        # of its own rather than replays that read the old one's memory.
        vae_weights = WeightAddresses(lambda: getattr(pipe, "vae", None))
        host_state = getattr(pipe, "vae_graph_state", tuple)
        vae_state = lambda: (*host_state(), vae_weights())  # noqa: E731
        self.decoder = GraphedCall(self.eager_decode_latents, self.cache, "vae", vae_state)
        self.eager_encode_moments = pipe.encode_moments
        self.encoder = GraphedCall(self.eager_encode_moments, self.cache, "vae-encode", vae_state)
        self.plans: dict[tuple, tuple] = {}
        self.last_call_seconds: float | None = None

    def ops_backend(self):
        return ops_backend(self.kernels)

    def refresh_folded_weights(self) -> None:
        """Derive the upsamplers' folded weights again where their sources changed in place
        since (``ModelBase.refresh_folded_weights``): a graph replay reads them without running
        the Python that would notice. Nothing to do (a few comparisons) when nothing changed."""
        for model in (self.pipe.unet, getattr(self.pipe, "vae", None)):
            refresh = getattr(model, "refresh_folded_weights", None)
            if refresh is not None:
                refresh()

    @staticmethod
    def on_device(device: torch.device):
        """Make ``device`` current: Triton launches its kernels on the current device (not the
        tensors'), and eager fallbacks run outside CudaGraphBackend's own device context."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(device)

    def denoise(
        self,
        conditioning,
        noise: torch.Tensor,
        *,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        sampler: str = "ddim",
        steps: int = 20,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        init_latents: torch.Tensor | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        add_noise: bool = True,
        progress: bool = True,
        known=None,
        lcm_strength: float = 1.0,
        start_checked: bool = False,
    ) -> torch.Tensor:
        """Same contract as ``Pipeline.denoise``; runs the plan through captured graphs."""
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
        plan, timesteps, coefficients = self.device_plan(
            sampler, steps, eta, noise.device, lcm_strength
        )
        x_start = noise
        if init_latents is not None or start_step != 0 or end_step is not None:
            from fastdiff.pipeline.denoising import start_state  # the eager loop's own rule

            # img2img: the plan's rows from start_step on, from the noised init latents (and
            # before end_step). The coefficients live in device buffers, so the same graphs
            # replay them.
            plan, x_start = start_state(
                plan, self.pipe.schedule, noise, init_latents, start_step, end_step, add_noise
            )
            timesteps = plan.timesteps.to(noise.device)
            coefficients = plan.coefficients.to(device=noise.device, dtype=torch.float32)
        # The eager loop's checks of its first state (fastdiff.sampling.run_plan): the graphs
        # would cast integer latents to float32 and back, and carry NaN through to the image.
        # The finiteness check syncs with the host: skipped for a start the pipeline's call
        # drew itself or checked already (``start_checked``).
        if not x_start.is_floating_point():
            raise ValueError("x_T must be a floating-point tensor")
        if not start_checked and not bool(torch.isfinite(x_start).all()):
            raise ValueError("x_T (the starting noise / latents) contains NaN or inf")
        call = build_call(plan, conditioning, x_start, guidance_scale, generator, known)
        call.guidance_rescale = float(guidance_rescale)
        call.result_dtype = noise.dtype  # returned below: what decode_ahead decodes
        call.timesteps, call.coefficients = timesteps, coefficients
        start = time.perf_counter()
        with self.on_device(noise.device), self.ops_backend(), torch.no_grad():
            self.refresh_folded_weights()
            latents = self.denoiser(call, sampler=sampler)
        self.last_call_seconds = time.perf_counter() - start
        return latents.to(noise.dtype)

    def device_plan(self, sampler: str, steps: int, eta: float, device, lcm_strength=1.0):
        """The plan and its timesteps/coefficients already on ``device`` (float32), cached so a
        repeated generation copies them device-to-device instead of from the host."""
        from fastdiff.sampling import make_plan

        schedule = self.pipe.schedule
        key = (id(schedule), sampler, int(steps), float(eta), str(device), float(lcm_strength))
        cached = self.plans.pop(key, None)
        # The entry keeps its schedule alive: an id is only unique among live objects, and a
        # later schedule at a freed one's address would otherwise get that schedule's plan.
        if cached is None or cached[0] is not schedule:
            plan = make_plan(schedule, sampler, steps, eta, lcm_strength=lcm_strength)
            cached = (
                schedule,
                plan,
                plan.timesteps.to(device),
                plan.coefficients.to(device=device, dtype=torch.float32),
            )
        self.plans[key] = cached  # most recent last
        while len(self.plans) > 16:
            self.plans.pop(next(iter(self.plans)))
        return cached[1:]

    def decode_ahead(self, latents: torch.Tensor) -> None:
        """The VAE decoder on ``latents`` (like a denoising result), run in the compile-ahead
        pass of each new denoising graph: its Triton kernels then compile in the same threads
        as the U-Net's, while the pass goes on, instead of in the decoder graph's own pass at
        the first decode (on the H200, 2026-11-28: a 20-step generation's first call spent
        3.5 s on the decoder's graph after 7.1 s on the U-Net's). Skipped where the decoder's
        graph for these latents is already captured. A pipeline that never decodes
        (``output_type="latent"``) pays for this once per shape, in warm-up only."""
        if self.decoder.key_for((latents,), {}) not in self.cache:
            self.eager_decode_latents(latents)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with self.on_device(latents.device), self.ops_backend(), torch.no_grad():
            self.refresh_folded_weights()
            return self.decoder(latents)

    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """img2img's VAE encoder in a graph; the posterior sample stays outside (a seed's
        draw differs per call)."""
        vae_dtype = next(self.pipe.vae.parameters()).dtype
        # Moved outside the graph: a host-to-device copy cannot be captured.
        pixels = pixels.to(device=self.pipe.device, dtype=vae_dtype)
        with self.on_device(pixels.device), self.ops_backend(), torch.no_grad():
            self.refresh_folded_weights()
            return self.encoder(pixels)

    def graph_report(self) -> str:
        rows = self.cache.report()
        stats = self.cache.stats
        lines = [
            f"graphs: {len(rows)} live (max {self.cache.max_graphs}), {stats.captures} captured, "
            f"{stats.hits} reused, {stats.evictions} evicted, capture time "
            f"{stats.capture_seconds:.2f} s, memory {format_mib(self.cache.memory_bytes())}"
        ]
        lines += [
            f"  {row['graph']}: {row['capture_s']} s{describe_phases(row)}, "
            f"{row['memory_mib']} MiB, {row['replays']} replays"
            for row in rows
        ]
        failures = {
            **self.denoiser.eager_fallbacks,
            **self.decoder.eager_fallbacks,
            **self.encoder.eager_fallbacks,
        }
        lines += [
            f"  eager (capture failed) {key.describe()}: {why}" for key, why in failures.items()
        ]
        return "\n".join(lines)


def optimize(
    pipe: Any,
    dtype: torch.dtype | None = torch.float16,
    channels_last: bool = True,
    fuse_qkv: bool = True,
    kernels: bool = True,
    cuda_graphs: bool = True,
    max_graphs: int = 8,
    max_loop_steps: int = 8,
    backend: GraphBackend | None = None,
    verbose: bool = True,
    vae_dtype: torch.dtype | None = None,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
    vae_channels_last: bool | None = None,
    fold_biases: bool = True,
    upsample_fold: str | None = AUTO_UPSAMPLE_FOLD,
    share_guided_input: bool = True,
) -> OptimizedRuntime:
    """Prepare ``pipe`` (a ``fastdiff.Pipeline``) for speed, in place; returns its runtime
    (``runtime.report`` says what was applied; ``runtime.attached`` whether the pipeline now
    runs through it).

    ``dtype``: weights' dtype (None keeps it); ``vae_dtype`` overrides it for the VAE (None:
    ``dtype``, except float32 for the SDXL VAE under fp16, which overflows there: see
    ``vae_run_dtype``). ``max_graphs`` bounds the graph cache (LRU); plans of at most
    ``max_loop_steps`` steps are captured whole.
    ``backend`` overrides how graphs are captured (``EagerGraphBackend()`` runs the same
    static-buffer loop without capture, which is how it is tested on CPU). Without CUDA and
    without ``backend`` nothing but QKV fusion and bias folding is applied (float32
    kept) and the pipeline's eager path stays in use.

    ``vae_channels_last`` overrides ``channels_last`` for the VAE (None: the same; the
    benchmarks' fastdiff-nchw provider shows which layout is faster for a GPU).
    ``fold_biases`` makes the U-Net do its additions inside other kernels where the sum allows
    it: convolution biases and time embeddings (one GEMM for every block's time shift, added by
    the GroupNorm kernel), transformer residuals (added by the next LayerNorm, or accumulated
    into by the feed-forward's last GEMM); fewer kernels and full-size passes, see
    ``ResnetBlock2D``, ``BasicTransformerBlock``, ``Transformer2DModel`` and
    ``UNet2DConditionModel.time_shifts``. On by default: on an H200 (2026-11-28) it took the
    SD1.5 step from 6.66 to 5.94 ms and the SDXL step from 31.3 to 29.9 ms (bench_unet's
    fastdiff-nofold rows measure it against the default). The
    VAE is left as it is: it has no time embedding, and its shortcut GEMMs would run in float32
    for the SDXL VAE, where cuBLAS takes no TF32 by default and cuDNN's convolutions do.
    ``upsample_fold`` ("transposed" or "phases"; None = off) runs each upsampler of the U-Net
    and the VAE (nearest-neighbour 2x, then a 3x3 convolution) as one convolution over the
    small map with summed weights: 4 instead of 9 multiply-adds per output value and no
    upsampled map (``fastdiff.models.upsample_fold``; the summed weights take memory beside
    the checkpoint's). The default, "auto", runs each call the way the backend table measured
    fastest at its input's shape (bench_upsample.py's rows) and the two steps where nothing was
    measured, as the ``auto`` ops backend does for the kernels that replace a PyTorch path.
    ``share_guided_input``: a guided step passes the latents to the U-Net once with the
    [uncond; cond] contexts (``fastdiff.models.context_groups``), so that its blocks before the
    first cross-attention run once for both halves; the U-Net repeats the latents up front
    where the halves' time embeddings differ (SDXL's pooled text, class labels). In SD1.5 that
    is ``conv_in``, the first ResNet block and the first self-attention at 64x64, about 40 of
    the step's 1607 GFLOP (the meta device's count), for three to four copies of a 64x64
    feature map. The eager pipeline passes the latents once too; False passes them twice in
    the runtime (bench_unet's fastdiff-cfgshare rows time the difference).
    ``compile_mode`` (e.g. "default" or "max-autotune-no-cudagraphs"; None = off) also
    torch.compiles the U-Net's blocks: an option, since compiling takes a minute where the
    default path warms up in seconds.

    Graphs hold the addresses of the weights. Their keys have them (``WeightAddresses``): a
    U-Net or VAE swapped, cast or moved after ``optimize`` captures new graphs at its next call,
    and in-place updates (``load_state_dict``, ``load_lora_weights``) replay in the old ones.
    Call ``optimize`` after loading, so the fusions and folds apply; after replacing a module
    inside a model (or its buffers alone), or writing weights through ``.data`` (which no
    version counter sees, so the upsamplers' summed weights stay as they were), call
    ``optimize`` again.
    """
    check_upsample_fold(upsample_fold)
    for name, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(
                f"{name} must be one of {[str(d) for d in DTYPES]} or None, got {value}"
            )
    if max_graphs < 1:
        raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
    if max_loop_steps < 0:
        raise ValueError(f"max_loop_steps must be >= 0, got {max_loop_steps}")
    if compile_mode is not None:
        # torch.compile checks the mode and backend when it wraps a function (compiling waits
        # for the first call): a bad one fails here, not after the models were converted.
        torch.compile(lambda: None, mode=compile_mode, backend=compile_backend, dynamic=False)
    # The attention table the launcher will read, parsed before anything changes (a bad
    # FASTDIFF_ATTENTION_CONFIGS file fails here, naming the file, with the pipeline untouched).
    triton_may_run = kernels and requested_backend() != "eager"
    attention = attention_configs_summary(torch.device(pipe.device)) if triton_may_run else None
    decode_ahead = decode_ahead_setting()
    start = time.perf_counter()
    previous = getattr(pipe, "runtime", None)
    if previous is not None:  # optimizing again: start from the pipeline's own stages
        previous.cache.clear()
        for name in ("denoise", "decode_latents", "encode_moments"):
            pipe.__dict__.pop(name, None)
        pipe.runtime = None
    on_cuda = pipe.device.type == "cuda"
    report = OptimizeReport(device=str(pipe.device))
    if not on_cuda:
        if dtype not in (None, torch.float32):
            report.skipped[f"{dtype} weights"] = "no CUDA: the CPU reference path runs in float32"
        dtype = vae_dtype = None
        if channels_last:
            report.skipped["channels-last"] = "no CUDA"
        channels_last = False
    else:
        torch.backends.cudnn.benchmark = True  # pick the fastest NHWC conv algorithm per shape
        report.applied.append("cudnn.benchmark = True")
    vae_dtype_for = getattr(pipe, "vae_dtype_for", None)
    if vae_dtype is None and dtype is not None and vae_dtype_for is not None:
        # The SDXL VAE overflows in fp16 (force_upcast in its config): keep it in float32.
        vae_dtype = vae_dtype_for(dtype)
        if vae_dtype != dtype:
            report.applied.append(f"vae: {str(vae_dtype).replace('torch.', '')} (force_upcast)")
    prepare_module(
        pipe.unet, "unet", report, dtype, channels_last, fuse_qkv, fold_biases, upsample_fold
    )
    vae_nhwc = channels_last if vae_channels_last is None else (vae_channels_last and on_cuda)
    prepare_module(
        pipe.vae, "vae", report, vae_dtype or dtype, vae_nhwc, fuse_qkv, False, upsample_fold
    )
    if compile_mode is not None:
        count = compile_blocks(pipe.unet, compile_mode, compile_backend)
        report.applied.append(
            f"unet: torch.compile({compile_mode!r}) of {count} blocks (compiles on the first call)"
        )
    if on_cuda and kernels:
        forced = requested_backend()
        report.applied.append(
            f"fastdiff kernels (ops backend: {forced})"
            if forced
            else "fastdiff kernels (ops backend: auto: per op and shape the faster of the CUDA "
            "extension and Triton by the measured table, Triton where none was measured)"
        )
        extension = cuda_extension_module()
        if not forced and extension is not None and not extension.available(build=False):
            report.skipped["CUDA extension"] = extension.unavailable_reason(build=False)
        if attention is not None:
            report.applied.append(attention)
    elif on_cuda:
        report.skipped["Triton kernels"] = "kernels=False: ops run the eager PyTorch backend"

    attach = backend is not None or (cuda_graphs and on_cuda)
    if backend is None:
        backend = CudaGraphBackend(device=pipe.device) if attach else EagerGraphBackend()
    shared_input = share_guided_input and getattr(pipe.unet, "takes_context_groups", False)
    runtime = OptimizedRuntime(
        pipe,
        backend,
        max_graphs,
        max_loop_steps,
        channels_last,
        kernels,
        report,
        decode_ahead,
        shared_input,
    )
    runtime.attached = attach
    pipe.runtime = runtime
    if attach:
        pipe.denoise = runtime.denoise
        pipe.decode_latents = runtime.decode_latents
        pipe.encode_moments = runtime.encode_moments
        kind = "CUDA graphs" if isinstance(backend, CudaGraphBackend) else "static-buffer loop"
        if isinstance(backend, EagerGraphBackend):
            kind += " without capture"
        report.applied.append(
            f"{kind}: whole loop up to {max_loop_steps} steps, else one step graph; "
            f"cache of {max_graphs}"
        )
        if shared_input:
            report.applied.append(
                "guided steps: the U-Net runs its blocks before the first cross-attention once "
                "for the [uncond; cond] halves where their time embeddings agree"
            )
        elif share_guided_input:
            report.skipped["shared guided input"] = "the U-Net takes no context groups"
        if getattr(backend, "compile_ahead", False):
            report.applied.append(
                "compile-ahead pass before each capture"
                + (
                    "; a new denoising graph's pass compiles the VAE decoder's kernels too"
                    if decode_ahead
                    else " (FASTDIFF_DECODE_AHEAD=0: the decoder's at its first decode)"
                )
            )
    elif not on_cuda:
        report.skipped["CUDA graphs"] = "no CUDA: the pipeline keeps its eager reference path"
    else:
        report.skipped["CUDA graphs"] = "cuda_graphs=False"
    report.seconds = time.perf_counter() - start
    if on_cuda:
        report.applied.append(f"memory after optimize: {memory_snapshot(pipe.device)}")
    pipe.optimize_report = report
    if verbose:
        print(report.summary())
    return runtime
