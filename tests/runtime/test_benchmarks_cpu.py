"""The model benchmarks' cases run on CPU (toy configs, eager graph backend) without failing:
every provider's setup and call path, including the graphed ones, is exercised here."""

from __future__ import annotations

import bench_pipeline
import bench_unet
import bench_vae
import model_bench
import pytest


@pytest.mark.parametrize(
    "make_cases",
    [
        lambda: bench_unet.cases(["sd15_b2", "sdxl_b2"]),
        lambda: bench_vae.cases(),
        lambda: bench_pipeline.cases([2, 9]),  # whole-loop graph and step graph
    ],
    ids=["unet", "vae", "pipeline"],
)
def test_benchmark_cases_run(make_cases, tmp_path):
    cases = make_cases()
    providers = {case.provider for case in cases}
    assert {"fastdiff", "fastdiff-eager"} <= providers
    results = model_bench.run_cases(
        cases, warmup=0, iters=1, reference="fastdiff-eager", verbose=False
    )
    failed = [(r.workload, r.provider, r.note) for r in results if r.note.startswith("FAILED")]
    assert not failed
    assert all(r.ms is not None and r.ms > 0 and r.gflop and r.gflop > 0 for r in results)
    path = model_bench.append_csv(results, tmp_path / "cpu.csv")
    lines = path.read_text().splitlines()
    assert lines[0].startswith("timestamp,device,benchmark") and len(lines) == len(results) + 1


def test_unknown_workload_and_provider_raise():
    with pytest.raises(ValueError, match="allowed values"):
        bench_unet.cases(["sd3_b2"])
    cases = bench_vae.cases(["no-such-provider"])  # the KL VAE's decode, then TAESD's
    assert [case.workload for case in cases] == ["tiny_vae_decode", "tiny_taesd_decode"]
    for case in cases:
        result = model_bench.run_case(case, warmup=0, iters=1)
        assert result.note.startswith("FAILED ValueError") and "allowed values" in result.note


def test_attention_padded_provider_runs_only_where_the_head_dim_is_split(monkeypatch):
    """bench_attention's fastdiff-padded rows: the triton kernel with SPLIT_HEAD_DIM off, at the
    head dims the kernel splits (40, 80, 160); no row elsewhere (64), where it equals fastdiff."""
    import argparse

    import bench_attention
    import common
    import fastdiff.kernels.attention as attention_kernels
    import torch

    from fastdiff.ops.attention import attention_reference
    from tests.ops.helpers import INTERPRET, record_attention_launches

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")
    d40 = bench_attention.workload("d40", (1, 2, 24, 24, 40), torch.float32)
    d64 = bench_attention.workload("d64", (1, 2, 24, 24, 64), torch.float32)
    cross = bench_attention.workload("cross", (1, 2, 24, 7, 40), torch.float32)
    assert bench_attention.padded_provider(d64.make(True)) is None
    assert bench_attention.padded_provider(cross.make(True)) is None
    inputs = d40.make(True)
    launched = record_attention_launches(monkeypatch)
    out = bench_attention.padded_provider(inputs)()
    assert [block_dt for (_, block_dt), _ in launched] == [
        0
    ] and attention_kernels.SPLIT_HEAD_DIM  # padded, and restored after
    torch.testing.assert_close(out, attention_reference(*inputs[:3]), atol=1e-4, rtol=1e-4)

    args = argparse.Namespace(providers=None, quick=True, no_csv=True, out=None)
    # (on CPU run_benchmark keeps only these two provider names)
    providers = {"eager": lambda inputs: lambda: None, "fastdiff": lambda inputs: None}
    rows = common.run_benchmark("attention", [d40, d64], providers, args)
    assert [(r.workload, r.provider) for r in rows] == [("d40", "eager"), ("d64", "eager")]


def test_tune_attention_reads_models_and_needs_a_gpu(tmp_path, monkeypatch, capsys):
    import tune_attention

    works = tune_attention.parse_models("sd15@64,sdxl@128,sd15@96")
    assert [(w.config, w.size, w.context_dim, w.batch) for w in works] == [
        ("sd15_unet", 64, 768, 2),
        ("sdxl_unet", 128, 2048, 2),
        ("sd15_unet", 96, 768, 2),
    ]
    for bad in ("sd3@64", "sd15", "sd15@60", "sd15@x", "sd15@0"):
        with pytest.raises(ValueError, match=f"--models: '{bad}' is not NAME@LATENT_SIZE"):
            tune_attention.parse_models(bad)
    monkeypatch.setattr(tune_attention.torch.cuda, "is_available", lambda: False)
    # main() sets the variable "off" for the process: undone with this test's monkeypatch.
    monkeypatch.setenv("FASTDIFF_ATTENTION_CONFIGS", "")
    assert tune_attention.main(["--out", str(tmp_path)]) == 1
    assert "no CUDA device; nothing to tune" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_tune_attention_tunes_with_the_table_off_and_merges_the_winners(tmp_path, monkeypatch):
    """main() on a (faked) GPU: every model is tuned with FASTDIFF_ATTENTION_CONFIGS=off (a
    shape the current table covers would launch directly and never be timed), the autotuner's
    winners replace the --merge table's entries of the same shape and its other entries stay,
    and a --merge table of another architecture is refused."""
    import json

    import fastdiff.kernels.attention as attention_kernels
    import torch
    import triton
    import tune_attention
    from fastdiff.kernels import attention_configs

    half = str(torch.float16)
    cache = {}
    settings, timings = [], []

    def fake_tune(work):
        settings.append(attention_configs.os.environ.get(attention_configs.ENV))
        timings.append(attention_kernels.AUTOTUNE_TIMING_MS)
        winner = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
        cache[(4096, 4096, 40, 32, 16, half, half, half, half)] = winner
        return 1.0

    monkeypatch.setattr(tune_attention.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune_attention.torch.cuda, "get_device_name", lambda device: "fake GPU")
    monkeypatch.setattr(attention_configs, "capability_name", lambda device: "sm_90")
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "cache", cache)
    monkeypatch.setattr(tune_attention, "tune", fake_tune)
    monkeypatch.setenv(attention_configs.ENV, "")
    shape = {"queries": 4096, "keys": 4096, "head_dim": 40, "block_d": 32, "block_dt": 16}
    config = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    old = [{"dtype": "fp16", **shape, **config}, {"dtype": "fp16", **shape, "keys": 77, **config}]
    merge = tmp_path / "old.json"
    merge.write_text(json.dumps({"capability": "sm_90", "entries": old}))
    out = tmp_path / "out"
    args = ["--out", str(out), "--models", "sd15@64,sdxl@128", "--merge", str(merge)]
    assert tune_attention.main(args) == 0
    assert settings == ["off", "off"]  # one tuning call per model
    # Timed at Triton's default length (the table's winners), and the launcher's restored after.
    assert timings == [(25, 100), (25, 100)]
    assert attention_kernels.AUTOTUNE_TIMING_MS == (5, 25)
    capability, table = attention_configs.read(out / "sm_90.json")
    assert capability == "sm_90"
    assert table == {
        ("fp16", 4096, 4096, 40, 32, 16): (128, 64, 8, 3),
        ("fp16", 4096, 77, 40, 32, 16): (64, 32, 4, 2),
    }
    merge.write_text(json.dumps({"capability": "sm_80", "entries": old}))
    with pytest.raises(ValueError, match="is for sm_80, this GPU is sm_90"):
        tune_attention.main(["--out", str(out), "--models", "sd15@64", "--merge", str(merge)])


def test_a_graphed_rows_note_says_where_its_warm_up_went():
    """model_bench notes the first call's phases from the graph it captured, and nothing for a
    provider without a graph or a backend that does not time them."""
    from types import SimpleNamespace

    def fn():
        return None

    assert model_bench.warmup_phases(fn) == ""
    row = {"capture_s": 5.0, "compile_ahead_s": 1.2, "warmup_runs_s": 3.7, "graph_capture_s": 0.1}
    fn.graphed = SimpleNamespace(cache=SimpleNamespace(report=lambda: [{"capture_s": 1}, row]))
    note = model_bench.warmup_phases(fn)
    assert note == "warm-up: compile-ahead 1.2 s, warm-up runs 3.7 s, capture 0.1 s"
    fn.graphed = SimpleNamespace(cache=SimpleNamespace(report=lambda: [{"capture_s": 1.0}]))
    assert model_bench.warmup_phases(fn) == ""
    assert model_bench.join_notes("", "a", "", "b") == "a; b"


def test_a_runs_note_names_its_rows_in_the_csv(tmp_path):
    """--note (gpu_warmup_device.sh names each warm-up row with it) leads every row's note."""
    import csv

    csv_path = tmp_path / "rows.csv"
    args = ["--workloads", "sd15_b2", "--providers", "fastdiff", "--iters", "1", "--warmup", "0"]
    assert bench_unet.main([*args, "--note", "sd15_table", "--csv", str(csv_path)]) == 0
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["provider"] for row in rows] == ["fastdiff"]
    assert rows[0]["note"].startswith("sd15_table; CPU: toy config")


def test_linear_geglu_providers_run_their_variants(monkeypatch):
    """bench_linear_geglu's rows: fastdiff and each fastdiff-<tile> run the fused kernel (that
    tile, the module setting restored after), fastdiff-two-steps the projection then the GEGLU
    kernel; all within the tolerance rule of the reference."""
    import bench_linear_geglu
    import fastdiff.kernels.geglu as geglu_kernels
    import fastdiff.kernels.linear_geglu as linear_geglu_kernels
    import torch

    from fastdiff.ops.linear_geglu import linear_geglu_eager, linear_geglu_reference
    from tests.ops.helpers import INTERPRET, CallCounter, assert_within_tolerance

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")
    inputs = bench_linear_geglu.workload("small", (40, 48, 36), torch.float16).make(True)
    providers = bench_linear_geglu.providers()
    tiles = {f"fastdiff-{name}" for name in linear_geglu_kernels.CONFIGS} - {
        f"fastdiff-{linear_geglu_kernels.DEFAULT_CONFIG}"
    }
    assert tiles and tiles | {"fastdiff", "eager", "fastdiff-two-steps"} <= set(providers)
    launched = []
    choose = linear_geglu_kernels.choose_config
    monkeypatch.setattr(
        linear_geglu_kernels,
        "choose_config",
        lambda dtype: launched.append(linear_geglu_kernels.config_override) or choose(dtype),
    )
    geglu_calls = CallCounter(monkeypatch, geglu_kernels, "geglu_forward")
    for name in ("fastdiff", "fastdiff-two-steps", *sorted(tiles)):
        out = providers[name](inputs)()
        want = linear_geglu_reference(*inputs)
        assert_within_tolerance(out, want, linear_geglu_eager(*inputs), name)
    assert launched == [None, *sorted(name.removeprefix("fastdiff-") for name in tiles)]
    assert geglu_calls.calls == 1 and linear_geglu_kernels.config_override is None


@pytest.mark.parametrize("provider", sorted(bench_unet.UNTIMED_KERNEL_PROVIDERS))
def test_untimed_kernel_providers_switch_on_their_kernel_only(provider):
    """bench_unet's fastdiff-fusedgeglu, -conv3x3, -catkernel and -residkernel rows: inside,
    the auto backend's answer for an unmeasured shape of that op is its triton kernel, the
    other ops' stay PyTorch's; outside (and after), all are PyTorch's."""
    from fastdiff.ops import autoselect

    keys = {
        "linear_geglu": "8192x320x2560|fp16",
        "conv3x3": "2x1280x8x8|fp16|nhwc|out1280",
        "cat_channels": "2x960x64x64|fp16|nhwc",
        "bias_residual": "2x320x64x64|fp16|nhwc",
    }
    assert set(keys) == set(bench_unet.UNTIMED_KERNEL_PROVIDERS.values())
    op = bench_unet.UNTIMED_KERNEL_PROVIDERS[provider]
    saved = dict(autoselect.UNMEASURED_BACKEND)
    for name, key in keys.items():
        assert autoselect.preferred_backend(name, key, table={}) == "eager"
    with bench_unet.kernel_where_unmeasured(op):
        for name, key in keys.items():
            want = "triton" if name == op else "eager"
            assert autoselect.preferred_backend(name, key, table={}) == want
    assert autoselect.UNMEASURED_BACKEND == saved


@pytest.mark.parametrize("provider", ["fastdiff-nograph", "fastdiff-nograph-nocache"])
def test_nograph_providers_set_the_launch_cache_for_their_calls_only(provider, monkeypatch):
    """bench_unet's un-graphed rows: fastdiff-nograph launches through the launch cache (as
    optimize(graphs=False) does), fastdiff-nograph-nocache through Triton's front end; the
    cache is on again after each call."""
    import torch
    from fastdiff.kernels import launch_cache

    work = bench_unet.CPU_WORKLOADS["sd15_b2"]
    holder = model_bench.ModelHolder("unet", work.config, torch.device("cpu"), torch.float32)
    run = bench_unet.provider_setup(provider, work, holder)()
    model = holder.fastdiff
    seen = []
    real_forward = type(model).forward
    monkeypatch.setattr(
        type(model),
        "forward",
        lambda self, *a, **k: seen.append(launch_cache.ENABLED) or real_forward(self, *a, **k),
    )
    assert run() is not None
    assert seen == [provider == "fastdiff-nograph"] and launch_cache.ENABLED


@pytest.mark.parametrize("bench", ["bench_geglu", "bench_linear_geglu"])
def test_polyerf_providers_launch_the_polynomial_erf_and_restore_it(bench, monkeypatch):
    """bench_geglu's and bench_linear_geglu's fastdiff-polyerf rows: the kernel launched with
    kernels/gelu.py's POLYNOMIAL_ERF on (off again after), its output within fp16 rounding of
    the reference."""
    import importlib

    import fastdiff.kernels.gelu as gelu_kernels
    import torch

    from fastdiff import ops
    from tests.ops.helpers import INTERPRET

    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("triton kernels need a GPU or TRITON_INTERPRET=1")
    op = bench.removeprefix("bench_")
    kernels = importlib.import_module(f"fastdiff.kernels.{op}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(2, 8, 64)] if op == "geglu" else [(2, 8, 32), (64, 32), (64,)]
    inputs = tuple((torch.randn(*shape, device=device) / 4).half() for shape in shapes)
    launched, launch = [], kernels.launch

    def spy(kernel, grid, *args, **kwargs):
        launched.append(kwargs["POLYNOMIAL_ERF"])
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", spy)
    out = importlib.import_module(bench).providers()["fastdiff-polyerf"](inputs)()
    assert launched == [True] and not gelu_kernels.POLYNOMIAL_ERF
    want = getattr(ops, f"{op}_reference")(*inputs)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("bench", [bench_unet, bench_vae], ids=["unet", "vae"])
def test_upfold_providers_fold_the_upsamplers_for_their_rows_only(bench):
    """bench_unet's and bench_vae's fastdiff-upfold rows run the shared model with its
    upsamplers folded (transposed; -phases: phases), bench_vae's fastdiff-biasfold with its
    ResNet blocks' bias folds on, and the next fastdiff row undoes each (its upsamplers "auto",
    as optimize() leaves them)."""
    import torch

    device = torch.device("cpu")
    if bench is bench_unet:
        work = bench.CPU_WORKLOADS["sd15_b2"]
        holder = model_bench.ModelHolder("unet", work.config, device, torch.float32)

        def setup(provider):
            return bench.provider_setup(provider, work, holder)
    else:
        holder = model_bench.ModelHolder("vae", "tiny_vae", device, torch.float32)

        def setup(provider):
            return bench.provider_setup(provider, holder, 8)

    outputs = {}
    providers = ["fastdiff", *bench.UPSAMPLE_FOLDS]
    if bench is bench_vae:
        providers.append(bench.BIAS_FOLD)
    for provider in [*providers, "fastdiff"]:
        run = setup(provider)()
        model = holder.fastdiff
        folds = {module.fold for module in model.folded_upsamplers}
        assert folds == {bench.UPSAMPLE_FOLDS.get(provider, "auto")}
        if bench is bench_vae:  # the decoder's bias folds: its own row only
            blocks = [m for m in model.modules() if hasattr(type(m), "fold_biases")]
            assert {m.fold_biases for m in blocks} == {provider == bench.BIAS_FOLD}
        outputs.setdefault(provider, run())
    for provider in providers[1:]:
        torch.testing.assert_close(outputs[provider], outputs["fastdiff"], rtol=1e-4, atol=1e-4)


def test_upsample_benchmark_providers_compute_the_two_steps():
    import bench_upsample
    import torch

    workload = bench_upsample.workload("vae decode 64x64", (1, 512, 64, 64), torch.float32)
    inputs = workload.make(True)
    assert inputs[0].shape == (1, 32, 16, 16)
    want = bench_upsample.upsample_eager(*inputs)
    providers = bench_upsample.providers()
    assert {"eager", "fastdiff", "fastdiff-phases"} <= set(providers)
    for name in ("fastdiff", "fastdiff-phases"):
        torch.testing.assert_close(providers[name](inputs)(), want, rtol=1e-4, atol=1e-4)
    assert workload.flop(inputs) == 2.0 * 1 * 4 * 16 * 16 * 32 * 9 * 32


def test_pipeline_untimed_provider_switches_on_each_untimed_change_for_its_rows_only(monkeypatch):
    """bench_pipeline's fastdiff-untimed rows: the pipeline optimized with the upsample fold,
    the VAE's bias folds on and the cat_channels kernel where the table has not measured it
    (the auto backend's answer inside its calls); the next fastdiff row has none of them, and
    the images agree."""
    import torch

    from fastdiff.ops import autoselect

    holder = bench_pipeline.PipelineHolder(torch.device("cpu"), torch.float32)
    seen = []
    images = {}
    for provider in ("fastdiff-untimed", "fastdiff"):
        run = bench_pipeline.provider_setup(provider, holder, 2)()
        pipe = holder.fastdiff
        real_denoise = pipe.denoise

        def denoise(*args, real=real_denoise, pipe=pipe, **kwargs):
            blocks = [m for m in pipe.vae.modules() if hasattr(type(m), "fold_biases")]
            seen.append(
                (
                    {m.fold for m in pipe.unet.folded_upsamplers + pipe.vae.folded_upsamplers},
                    {m.fold_biases for m in blocks},
                    tuple(
                        autoselect.preferred_backend(op, "2x960x64x64|fp16|nhwc", table={})
                        for op in ("cat_channels", "bias_residual")
                    ),
                )
            )
            return real(*args, **kwargs)

        monkeypatch.setattr(pipe, "denoise", denoise)
        images[provider] = run()
    assert seen == [
        ({"transposed"}, {True}, ("triton", "triton")),
        ({"auto"}, {False}, ("eager", "eager")),
    ]
    torch.testing.assert_close(images["fastdiff-untimed"], images["fastdiff"], rtol=1e-4, atol=1e-4)


def test_cfgshare_provider_gives_the_latents_once_and_equals_fastdiff():
    """bench_unet's fastdiff-cfgshare rows: the sample and timesteps of the first half, every
    context; the output is fastdiff's (the two halves of the benchmark's random sample differ,
    so the rows compare with fastdiff on the first half repeated)."""
    import torch

    work = bench_unet.CPU_WORKLOADS["sd15_b2"]
    holder = model_bench.ModelHolder("unet", work.config, torch.device("cpu"), torch.float32)
    inputs = bench_unet.unet_inputs(work, "cpu", torch.float32)
    shared = bench_unet.shared_guided_inputs(inputs)
    assert shared["sample"].shape[0] == inputs["sample"].shape[0] // 2 == 1
    assert shared["encoder_hidden_states"] is inputs["encoder_hidden_states"]
    got = bench_unet.provider_setup(bench_unet.CFG_SHARE, work, holder)()()
    model = holder.fastdiff
    sample, timestep = shared["sample"], shared["timestep"]
    with torch.no_grad():
        want = model(
            torch.cat([sample, sample]),
            torch.cat([timestep, timestep]),
            inputs["encoder_hidden_states"],
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
