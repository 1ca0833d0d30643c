"""CUDA-graph runtime on a GPU: captured graphs against the eager fastdiff path.

Tolerance rule (STYLE.md): the optimized fp16 path's max error against the fp32 eager reference
must be at most 2x the error of the eager fp16 path plus a small floor.
"""

from __future__ import annotations

import pytest
import torch

import fastdiff.runtime as runtime
from fastdiff.ops import use_backend
from fastdiff.pipeline.conditioning import Conditioning
from fastdiff.sampling.plan import rows_per_step
from tests.runtime.conftest import tiny_pipeline

pytestmark = pytest.mark.gpu
FP16_FLOOR = 2e-3


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 convolutions/matmuls would make the fp32 references themselves approximate.
    # optimize() turns cudnn.benchmark on for the process: on from the start, the eager
    # references and the graphs choose their convolution algorithms the same way whatever the
    # test order, and the flag is restored afterwards.
    backends = torch.backends
    previous = backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False
    backends.cudnn.benchmark = True
    yield
    backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32, backends.cudnn.benchmark = previous


def conditioning(batch=1, guided=True, device="cuda", dtype=torch.float32):
    def part():
        return {"encoder_hidden_states": torch.randn(batch, 77, 32, device=device, dtype=dtype)}

    return Conditioning(part(), part() if guided else None)


def max_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.float() - reference.float()).abs().max().item()


@pytest.mark.parametrize("fold_biases", [False, True], ids=["biases", "folded-biases"])
def test_optimized_unet_within_tolerance_of_eager_fp16(fold_biases):
    pipe = tiny_pipeline(device="cuda")
    x = torch.randn(2, 4, 16, 16, device="cuda")
    t = torch.tensor([999, 10], device="cuda")
    context = torch.randn(2, 77, 32, device="cuda")
    with torch.no_grad(), use_backend("eager"):
        reference = pipe.unet(x, t, context)
        eager_fp16 = pipe.unet.half()(x.half(), t, context.half())
    runtime.prepare_module(
        pipe.unet,
        "unet",
        runtime.OptimizeReport("cuda"),
        torch.float16,
        channels_last=True,
        fuse_qkv=True,
        fold_biases=fold_biases,
    )
    cache = runtime.GraphCache(runtime.CudaGraphBackend())
    graphed = runtime.GraphedCall(pipe.unet, cache, kind="unet")
    x_nhwc = x.half().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = graphed(x_nhwc, t, context.half())
        second = graphed(x_nhwc * 0.5, t, context.half())
        direct = pipe.unet(x_nhwc * 0.5, t, context.half())
    bound = 2 * max_error(eager_fp16, reference) + FP16_FLOOR
    assert max_error(first, reference) <= bound
    assert max_error(second, direct) <= FP16_FLOOR  # replay saw the new input
    assert cache.stats.captures == 1 and cache.memory_bytes() > 0


@pytest.mark.parametrize("sampler, steps", [("ddim", 4), ("dpmpp_2m", 4), ("euler", 12)])
def test_graphs_equal_eager_loop_fp32(sampler, steps):
    """Graphs with the eager ops in fp32: only graph mechanics differ from the eager loop."""
    pipe = tiny_pipeline(device="cuda")
    cond = conditioning()
    x_T = torch.randn(1, 4, 16, 16, device="cuda")
    with torch.no_grad(), use_backend("eager"):
        want = pipe.denoise(
            cond, x_T, guidance_scale=6.0, sampler=sampler, steps=steps, progress=False
        )
    rt = runtime.optimize(pipe, dtype=None, channels_last=False, kernels=False, verbose=False)
    got = pipe.denoise(cond, x_T, guidance_scale=6.0, sampler=sampler, steps=steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (entry,) = rt.cache.entries.values()
    if steps <= 8:  # the whole loop is one graph launch
        assert entry.key.kind == "loop" and entry.replays == 1
    else:
        assert entry.key.kind == "step" and entry.replays == steps


def test_full_optimize_fp16_generation_within_tolerance():
    pipe = tiny_pipeline(device="cuda")
    cond = conditioning()
    x_T = torch.randn(1, 4, 16, 16, device="cuda")
    kwargs = dict(guidance_scale=7.5, sampler="ddim", steps=4)
    with torch.no_grad(), use_backend("eager"):
        reference = pipe.denoise(cond, x_T, progress=False, **kwargs)
        pipe.unet.half()
        half = {k: v.half() for k, v in cond.cond.items()}
        half_cond = Conditioning(half, {k: v.half() for k, v in cond.uncond.items()})
        eager_fp16 = pipe.denoise(half_cond, x_T.half(), progress=False, **kwargs)
    pipe.unet.float()
    runtime.optimize(pipe, dtype=torch.float16, verbose=False)
    applied = pipe.optimize_report.applied
    assert any(item.startswith("attention configurations: ") for item in applied), applied
    got = pipe.denoise(half_cond, x_T.half(), **kwargs)
    assert torch.isfinite(got).all()
    assert max_error(got, reference) <= 2 * max_error(eager_fp16, reference) + 1e-2


def test_new_shapes_and_step_counts_capture_and_replay_correctly():
    pipe = tiny_pipeline(device="cuda")
    eager = {}
    cases = [(16, 4), (24, 4), (16, 6), (16, 20), (16, 4), (16, 30)]
    for size, steps in cases:
        torch.manual_seed(size * 100 + steps)
        cond, x_T = conditioning(), torch.randn(1, 4, size, size, device="cuda")
        with torch.no_grad(), use_backend("eager"):
            eager[(size, steps)] = (
                cond,
                x_T,
                pipe.denoise(cond, x_T, guidance_scale=5.0, steps=steps, progress=False),
            )
    rt = runtime.optimize(pipe, dtype=None, channels_last=False, kernels=False, verbose=False)
    for size, steps in cases:
        cond, x_T, want = eager[(size, steps)]
        got = pipe.denoise(cond, x_T, guidance_scale=5.0, steps=steps)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # loops: 16/4, 24/4, 16/6; one step graph shared by 20 and 30 steps
    assert rt.cache.stats.captures == 4 and rt.cache.stats.hits == 2


def test_stochastic_ddim_matches_eager_with_cuda_generator():
    pipe = tiny_pipeline(device="cuda")
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    kwargs = dict(guidance_scale=5.0, sampler="ddim", steps=5, eta=0.7)
    with torch.no_grad(), use_backend("eager"):
        want = pipe.denoise(
            cond, x_T, generator=torch.Generator("cuda").manual_seed(7), progress=False, **kwargs
        )
    runtime.optimize(pipe, dtype=None, channels_last=False, kernels=False, verbose=False)
    got = pipe.denoise(cond, x_T, generator=torch.Generator("cuda").manual_seed(7), **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lru_bound_on_gpu_evicts_and_reports_memory():
    pipe = tiny_pipeline(device="cuda")
    rt = runtime.optimize(pipe, max_graphs=1, verbose=False)
    for size in (16, 24):
        pipe(
            prompt_embeds=torch.randn(1, 77, 32, device="cuda"),
            num_inference_steps=3,
            guidance_scale=1.0,
            height=size * 2,
            width=size * 2,
            output_type="latent",
            progress=False,
        )
    # one loop graph per size (latent output: no decode graph); a bound of 1 keeps the last
    assert len(rt.cache) == 1 and rt.cache.stats.evictions == 1
    assert "MiB" in rt.graph_report()


def test_failed_capture_falls_back_and_leaves_cuda_usable():
    def reads_host(x):
        return x * float(x.sum())  # a host read: allowed eagerly, illegal inside a capture

    cache = runtime.GraphCache(runtime.CudaGraphBackend())
    graphed = runtime.GraphedCall(reads_host, cache, kind="host-read")
    x = torch.randn(8, device="cuda")
    torch.testing.assert_close(graphed(x), reads_host(x))
    assert graphed.eager_fallbacks and cache.stats.failures == 1 and len(cache) == 0
    torch.randn(4, device="cuda")  # the CUDA RNG works again after the failed capture
    torch.testing.assert_close(graphed(x + 1), reads_host(x + 1))  # stays eager, no retry
    assert cache.stats.failures == 1


def half_conditioning(cond: Conditioning) -> Conditioning:
    def half(part):
        return None if part is None else {k: v.half() for k, v in part.items()}

    return Conditioning(half(cond.cond), half(cond.uncond))


@pytest.mark.parametrize(
    "sampler, steps, eta",
    [("ddim", 12, 0.0), ("dpmpp_2m", 6, 0.0), ("euler", 10, 0.0), ("ddpm", 10, 0.0),
     ("ddim", 10, 0.8), ("lcm", 4, 0.0), ("euler_karras", 12, 0.0), ("tcd", 4, 0.3),
     ("unipc", 6, 0.0), ("unipc", 12, 0.0), ("dpmpp_3m_sde", 10, 0.0), ("heun", 4, 0.0),
     ("heun_karras", 8, 0.0), ("pndm", 12, 0.0), ("lms", 10, 0.0), ("kdpm2", 4, 0.0),
     ("kdpm2_karras", 8, 0.0), ("kdpm2_ancestral_karras", 6, 0.0)],
)  # fmt: skip
def test_default_optimize_loop_and_step_graphs_within_tolerance(sampler, steps, eta):
    """optimize() as users call it (fp16, channels-last, fused QKV, auto kernels): whole-loop
    graphs (<= 8 steps) and step graphs, deterministic and stochastic plans."""
    pipe = tiny_pipeline(device="cuda")
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    kwargs = dict(guidance_scale=6.0, sampler=sampler, steps=steps, eta=eta)

    def generator():
        return torch.Generator("cuda").manual_seed(11)

    with torch.no_grad(), use_backend("eager"):
        reference = pipe.denoise(cond, x_T, generator=generator(), progress=False, **kwargs)
        pipe.unet.half()
        eager_fp16 = pipe.denoise(
            half_conditioning(cond), x_T.half(), generator=generator(), progress=False, **kwargs
        )
    pipe.unet.float()
    rt = runtime.optimize(pipe, dtype=torch.float16, verbose=False)
    for _ in range(2):  # capture, then a pure replay
        got = pipe.denoise(half_conditioning(cond), x_T.half(), generator=generator(), **kwargs)
        assert torch.isfinite(got).all()
        assert max_error(got, reference) <= 2 * max_error(eager_fp16, reference) + 1e-2
    assert not rt.denoiser.eager_fallbacks
    (entry,) = rt.cache.entries.values()
    calls = steps * rows_per_step(sampler) - rows_per_step(sampler) + 1  # Heun: 2 calls a step
    assert entry.key.kind == ("loop" if calls <= 8 else "step")


@pytest.mark.parametrize(
    "sampler, steps, start_step", [("ddim", 10, 4), ("euler", 14, 3), ("unipc", 10, 3)]
)
def test_default_optimize_img2img_within_tolerance(sampler, steps, start_step):
    """img2img through the graphs: the plan's remaining rows from the noised init latents."""
    pipe = tiny_pipeline(device="cuda")
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    init = torch.randn(1, 4, 16, 16, device="cuda")
    kwargs = dict(guidance_scale=6.0, sampler=sampler, steps=steps, start_step=start_step)
    with torch.no_grad(), use_backend("eager"):
        reference = pipe.denoise(cond, x_T, init_latents=init, progress=False, **kwargs)
        pipe.unet.half()
        eager_fp16 = pipe.denoise(
            half_conditioning(cond), x_T.half(), init_latents=init.half(), progress=False, **kwargs
        )
    pipe.unet.float()
    rt = runtime.optimize(pipe, dtype=torch.float16, verbose=False)
    got = pipe.denoise(half_conditioning(cond), x_T.half(), init_latents=init.half(), **kwargs)
    assert torch.isfinite(got).all() and not rt.denoiser.eager_fallbacks
    assert max_error(got, reference) <= 2 * max_error(eager_fp16, reference) + 1e-2


def fp16_within_tolerance(pipe, cond, x_T, **kwargs) -> torch.Tensor:
    """``pipe.denoise`` after ``optimize()`` (fp16) within the rule of the fp32 eager loop;
    returns the optimized run's latents."""
    halves = {k: v.half() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with torch.no_grad(), use_backend("eager"):
        reference = pipe.denoise(cond, x_T, progress=False, **kwargs)
        pipe.unet.half()
        eager_fp16 = pipe.denoise(half_conditioning(cond), x_T.half(), progress=False, **halves)
    pipe.unet.float()
    rt = runtime.optimize(pipe, dtype=torch.float16, verbose=False)
    got = pipe.denoise(half_conditioning(cond), x_T.half(), **halves)
    assert torch.isfinite(got).all() and not rt.denoiser.eager_fallbacks
    assert max_error(got, reference) <= 2 * max_error(eager_fp16, reference) + 1e-2
    return got


@pytest.mark.parametrize("steps", [4, 12])
def test_default_optimize_guidance_rescale_within_tolerance(steps):
    """Guidance rescale in the graphs (CFG and per-sample stds on the device, then the step)."""
    pipe = tiny_pipeline(device="cuda")
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    fp16_within_tolerance(pipe, cond, x_T, guidance_scale=7.0, guidance_rescale=0.7, steps=steps)


@pytest.mark.parametrize("steps", [4, 12])
def test_default_optimize_inpainting_within_tolerance(steps):
    """An inpainting U-Net: the mask and masked-image latents ride in the condition and are
    stacked onto each step's (channels-last) latents inside the graphs."""
    from fastdiff.pipeline.inpainting import INPAINT_KEY

    pipe = tiny_pipeline(device="cuda", inpainting=True)
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    stacked = torch.randn(1, 5, 16, 16, device="cuda")
    cond.cond[INPAINT_KEY] = cond.uncond[INPAINT_KEY] = stacked
    fp16_within_tolerance(pipe, cond, x_T, guidance_scale=6.0, steps=steps)


@pytest.mark.parametrize("steps", [4, 12])
def test_default_optimize_plain_unet_inpainting_within_tolerance(steps):
    """A plain U-Net inpainting: the kept region is blended back after each step inside the
    graphs (static latents, mask, noise and rows; NHWC state)."""
    from fastdiff.sampling import KnownRegion

    pipe = tiny_pipeline(device="cuda")
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    mask = torch.zeros(1, 1, 16, 16, device="cuda")
    mask[..., 4:12, 2:10] = 1.0
    known = KnownRegion(torch.randn_like(x_T), mask, x_T)
    fp16_within_tolerance(pipe, cond, x_T, guidance_scale=6.0, steps=steps, known=known)


def test_default_optimize_freeu_within_tolerance():
    """FreeU's FFT skip filter (cuFFT) inside the captured graphs, fp16 U-Net."""
    pipe = tiny_pipeline(device="cuda")
    pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    fp16_within_tolerance(pipe, cond, x_T, guidance_scale=6.0, steps=4)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_default_optimize_hand_over_within_tolerance(sampler):
    """denoising_end then denoising_start through the graphs: the rows before end_step, then the
    rest from the latents the first run returned, unnoised."""
    cond, x_T = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    common = dict(guidance_scale=6.0, sampler=sampler, steps=10)
    stopped = fp16_within_tolerance(tiny_pipeline(device="cuda"), cond, x_T, end_step=7, **common)
    resume = dict(init_latents=stopped.float(), start_step=7, add_noise=False)
    fp16_within_tolerance(tiny_pipeline(device="cuda"), cond, x_T, **resume, **common)


def test_default_optimize_vae_encoder_graph_within_tolerance():
    """img2img's encoder (posterior moments) through its graph, fp16 channels-last."""
    pipe = tiny_pipeline(device="cuda")
    images = [torch.rand(1, 3, 32, 32, device="cuda") * 2 - 1 for _ in range(2)]
    with torch.no_grad(), use_backend("eager"):
        references = [pipe.encode_moments(x) for x in images]
        pipe.vae.half()
        eager_fp16 = [pipe.encode_moments(x) for x in images]
    pipe.vae.float()
    rt = runtime.optimize(pipe, dtype=torch.float16, verbose=False)
    for x, reference, half in zip(images, references, eager_fp16, strict=True):
        got = pipe.encode_moments(x)  # capture, then a replay on new values
        assert max_error(got, reference) <= 2 * max_error(half, reference) + 1e-2
    assert not rt.encoder.eager_fallbacks
    assert rt.cache.stats.captures == 1 and rt.cache.stats.hits == 1


def test_default_optimize_vae_decode_graph_within_tolerance():
    pipe = tiny_pipeline(device="cuda")
    latents = [torch.randn(1, 4, 16, 16, device="cuda") for _ in range(2)]
    # References first: the captured graph holds the optimized weights' addresses, so the model
    # must not be converted again once it is captured.
    with torch.no_grad(), use_backend("eager"):
        references = [pipe.decode_latents(z) for z in latents]
        pipe.vae.half()
        eager_fp16 = [pipe.decode_latents(z.half()) for z in latents]
    pipe.vae.float()
    rt = runtime.optimize(pipe, dtype=torch.float16, verbose=False)
    for z, reference, half in zip(latents, references, eager_fp16, strict=True):
        got = pipe.decode_latents(z.half())  # capture, then a replay on new values
        assert max_error(got, reference) <= 2 * max_error(half, reference) + 1e-2
    assert not rt.decoder.eager_fallbacks
    assert rt.cache.stats.captures == 1 and rt.cache.stats.hits == 1


def decoder_compiles_after_first_generation(
    size: int, decode_ahead: bool, dtype: torch.dtype = torch.float16
) -> list[bool]:
    """A fresh optimized tiny pipeline's first generation at ``size`` px in ``dtype`` (latents
    only), then the decode of its result: the Triton compilations that decode made which
    missed Triton's disk cache (a load from the disk cache is not a compilation)."""
    from triton import knobs

    pipe = tiny_pipeline(device="cuda")
    rt = runtime.optimize(pipe, dtype=dtype, verbose=False)
    if not decode_ahead:
        rt.denoiser.then = None
    embeds = [torch.randn(1, 77, 32, device="cuda", dtype=dtype) for _ in range(2)]
    latents = pipe(
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        num_inference_steps=3,
        height=size,
        width=size,
        output_type="latent",
        progress=False,
    )
    misses, previous = [], knobs.compilation.listener
    knobs.compilation.listener = lambda *, cache_hit, **_: misses.append(cache_hit)
    try:
        pipe.decode_latents(latents)
    finally:
        knobs.compilation.listener = previous
    assert [key.kind for key in rt.cache.entries] == ["loop", "vae"]
    return [hit for hit in misses if not hit]


def test_the_first_generation_compiles_the_decoders_kernels_with_the_unets(monkeypatch, tmp_path):
    """optimize()'s runtime runs the VAE decoder in the first denoising graph's compile-ahead
    pass, so the first decode compiles no Triton kernel; without that (the control) it compiles
    some. The control runs in bfloat16, which no other test of this file decodes in, so its
    decoder kernels are new to the process: a control in fp16 at 88 px found every one already
    compiled by the 72 px run (the same specialisations: the sizes' divisibility by 16 and the
    attention's even-keys flag agree; H200, 2026-11-28). A cache folder of the test's own keeps
    other processes' compilations (gpu_check runs test files side by side) out of it."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    assert decoder_compiles_after_first_generation(72, decode_ahead=True) == []
    control = decoder_compiles_after_first_generation(88, False, dtype=torch.bfloat16)
    assert control != []


def test_failed_capture_message_names_the_op_that_broke_it():
    def reads_host(x):
        return x * float(x.sum())

    cache = runtime.GraphCache(runtime.CudaGraphBackend())
    runtime.GraphedCall(reads_host, cache, kind="host-read")(torch.randn(8, device="cuda"))
    (message,) = cache.stats.failed_keys.values()
    # the body's own error first, not only "operation failed due to a previous error"
    assert "previous error" not in message.split("(then")[0], message


@pytest.mark.parametrize("ahead", [True, False], ids=["compile-ahead", "compile-at-launch"])
def test_capture_after_a_compile_ahead_pass_replays_correctly(monkeypatch, ahead):
    """CudaGraphBackend's compile-ahead pass (kernels compiled, not run; outputs zeroed) must
    leave nothing behind: the warm-up, capture and replays compute as without it. Shapes no
    other test uses, so the kernels are new to this process."""
    import fastdiff.runtime.graphs as graphs
    from fastdiff.ops import attention, attention_reference, group_norm, group_norm_reference

    entered = []
    real_compile_ahead = graphs.ops_compile_ahead

    def spy(timing=None):
        entered.append(True)
        return real_compile_ahead(timing=timing)

    monkeypatch.setattr(graphs, "ops_compile_ahead", spy)
    x = torch.randn(2, 96, 7, 9, device="cuda", dtype=torch.float16)
    q = torch.randn(2, 3, 63, 56, device="cuda", dtype=torch.float16)
    out = {}

    def body():
        out["norm"] = group_norm(x, 12, None, None, silu=True)
        out["attention"] = attention(q, q * 0.5, q)

    cache = runtime.GraphCache(runtime.CudaGraphBackend(compile_ahead=ahead))
    with use_backend("triton"):
        key = runtime.GraphKey("ahead", 2, 7, 9, torch.float16)
        entry = cache.get(key, lambda: (out, body, lambda: None))
    x.copy_(torch.randn_like(x))
    entry.replay()
    torch.cuda.synchronize()
    assert entered == ([True] if ahead else [])
    norm_reference = group_norm_reference(x, 12, None, None, silu=True)
    eager = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 12))
    assert max_error(out["norm"], norm_reference) <= 2e-3 + 2 * max_error(eager, norm_reference)
    reference = attention_reference(q, q * 0.5, q)
    eager = torch.nn.functional.scaled_dot_product_attention(q, q * 0.5, q)
    assert max_error(out["attention"], reference) <= 2e-3 + 2 * max_error(eager, reference)


def test_lora_switched_after_optimize_reaches_the_cuda_graphs():
    """A LoRA loaded after optimize() lands in the fused and packed weights in place: the
    captured graphs replay with it (no new capture), as the pipeline that fused it before
    optimize() generates, and unloading gives the first latents back."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in tiny_pipeline().unet.named_modules():  # the unfused layers' names
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v")):
            down = torch.randn(4, module.in_features, generator=generator) * 0.1
            state[f"unet.{name}.lora_A.weight"] = down
            up = torch.randn(module.out_features, 4, generator=generator) * 0.1
            state[f"unet.{name}.lora_B.weight"] = up
    cond32, x_T32 = conditioning(), torch.randn(1, 4, 16, 16, device="cuda")
    cond, x_T = half_conditioning(cond32), x_T32.half()
    kwargs = dict(guidance_scale=6.0, steps=4)
    fused_first = tiny_pipeline(device="cuda")
    fused_first.load_lora_weights(state)
    with torch.no_grad(), use_backend("eager"):  # the fp32 reference
        reference = fused_first.denoise(cond32, x_T32, progress=False, **kwargs)
    runtime.optimize(fused_first, dtype=torch.float16, verbose=False)
    want = fused_first.denoise(cond, x_T, **kwargs)
    pipe = tiny_pipeline(device="cuda")
    rt = runtime.optimize(pipe, dtype=torch.float16, verbose=False)
    plain = pipe.denoise(cond, x_T, **kwargs)
    captures = rt.cache.stats.captures
    pipe.load_lora_weights(state)
    got = pipe.denoise(cond, x_T, **kwargs)
    # The fused-first pipeline rounded W + update to fp16 once; this one rounded W, then W +
    # update (0.047 apart at guidance 6 on the H200, 2026-11-28): both against the fp32
    # reference, by the tests' rule.
    assert max_error(got, reference) <= 2 * max_error(want, reference) + 1e-2
    assert max_error(got, plain) > 2 * max_error(want, reference) + 1e-2  # the LoRA shows
    pipe.unload_lora_weights()
    assert max_error(pipe.denoise(cond, x_T, **kwargs), plain) <= 1e-3
    assert rt.cache.stats.captures == captures and not rt.denoiser.eager_fallbacks
