"""`fastdiff bench` and `fastdiff profile` on CPU (toy models): they run and print their tables."""

from __future__ import annotations

from fastdiff.cli import main


def test_bench_prints_table(capsys):
    assert main(["bench", "--which", "vae", "--no-csv", "--warmup", "0", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA" in out
    header = next(line for line in out.splitlines() if line.startswith("workload"))
    assert "TFLOP/s" in header and "warmup s" in header
    assert "tiny_vae_decode" in out and "fastdiff-eager" in out


def test_bench_rejects_unknown_provider(capsys):
    assert main(["bench", "--providers", "nope", "--no-csv"]) == 2
    assert "allowed values" in capsys.readouterr().err


def test_bench_rejects_bad_iteration_counts(capsys):
    # --iters 0 used to run every case and fail each one with "no median for empty data".
    assert main(["bench", "--which", "vae", "--no-csv", "--iters", "0"]) == 2
    assert "--iters must be at least 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--which", "vae", "--no-csv", "--warmup", "-1"]) == 2
    assert "--warmup must be >= 0, got -1" in capsys.readouterr().err


def test_bench_csv_is_checked_before_any_case_runs(tmp_path, capsys):
    """A folder, or a CSV that is not a results file, used to fail (or take rows of empty
    fields) only after every case had run; now before, and the file is left as it was."""
    other = tmp_path / "other.csv"
    other.write_text("name,score\na,1\n")
    args = ["bench", "--which", "vae", "--warmup", "0", "--iters", "1", "--csv"]
    assert main([*args, str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main([*args, str(other)]) == 2
    captured = capsys.readouterr()
    assert "is not a benchmark results CSV" in captured.err
    assert "tiny_vae_decode" not in captured.out  # nothing ran
    assert other.read_text() == "name,score\na,1\n"
    fresh = tmp_path / "results.csv"
    assert main([*args, str(fresh)]) == 0
    header = fresh.read_text().splitlines()[0].split(",")
    assert header[:5] == ["timestamp", "device", "benchmark", "workload", "provider"]


def test_profile_prints_breakdowns(capsys):
    assert main(["profile", "--calls", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "== eager (PyTorch ops, NCHW)" in out
    assert "== fastdiff optimized" in out
    assert "convolution" in out  # the category table
    assert "aten::" in out  # the per-op rows


def test_profile_by_op_names_the_ops_with_their_input_shapes(capsys):
    assert main(["profile", "--calls", "1", "--top", "40", "--by-op"]) == 0
    out = capsys.readouterr().out
    # The toy U-Net's first convolution: latents (2, 4, 8, 8) into 32 channels, 3x3.
    assert "aten::mkldnn_convolution (2x4x8x8, 32x4x3x3, 32)" in out


def test_profile_with_the_upsample_fold_runs_transposed_convolutions(capsys):
    import re

    args = ["profile", "--calls", "1", "--top", "400", "--by-op", "--upsample-fold", "transposed"]
    assert main(args) == 0
    eager_part, fastdiff_part = capsys.readouterr().out.split("== fastdiff optimized")
    assert "upsamplers as transposed convolutions" in fastdiff_part
    # The toy U-Net's upsampler: nearest 2x then a 3x3 conv eagerly; one convolution with the
    # folded 4x4 kernel (stride 2) optimized.
    assert "aten::upsample_nearest2d" in eager_part
    assert "aten::upsample_nearest2d" not in fastdiff_part
    assert re.search(r"convolution \(2x\d+x\d+x\d+, \d+x\d+x4x4", fastdiff_part)
    assert not re.search(r"convolution \(2x\d+x\d+x\d+, \d+x\d+x4x4", eager_part)


def test_profile_upsample_fold_off_and_auto_keep_the_two_steps(capsys):
    """``--upsample-fold off`` profiles the optimized path unfolded, and the default ("auto",
    as optimize()) does too where the table has no upsampler rows: the shipped table."""
    for extra, label in (([], None), (["--upsample-fold", "off"], "upsamplers not folded")):
        assert main(["profile", "--calls", "1", "--top", "400", "--by-op", *extra]) == 0
        fastdiff_part = capsys.readouterr().out.split("== fastdiff optimized")[1]
        assert "aten::upsample_nearest2d" in fastdiff_part
        assert label is None or label in fastdiff_part


def test_profile_vae_decoder_with_its_upsamplers_folded(capsys):
    """``--model tiny_vae``: the KL decoder's toy config, batch 1; its upsamplers fold too, and
    the U-Net's bias folds are not claimed for it."""
    args = ["profile", "--model", "tiny_vae", "--calls", "1", "--top", "400", "--by-op"]
    assert main([*args, "--upsample-fold", "phases"]) == 0
    out = capsys.readouterr().out
    assert "VAE decode (tiny_vae), batch 1, 8x8 latents" in out
    eager_part, fastdiff_part = out.split("== fastdiff optimized")
    assert "upsamplers as phases convolutions" in fastdiff_part
    assert "folded biases" not in fastdiff_part
    assert "aten::upsample_nearest2d" in eager_part
    assert "aten::upsample_nearest2d" not in fastdiff_part
    assert main([*args, "--batch", "0"]) == 2
    assert "--batch, --calls and --top must be positive" in capsys.readouterr().err


def test_profile_categories():
    from fastdiff.commands.profile import category

    assert category("aten::_cudnn_attention_forward") == "attention"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert category("aten::cudnn_convolution") == "convolution"
    assert category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == (
        "convolution"
    )
    assert category("void cudnn::engines_precompiled::nchwToNhwcKernel") == "layout conversion"
    # the fused GEGLU projection is a GEMM (its name also says geglu, an elementwise word)
    assert category("fastdiff::linear_geglu") == "gemm"
    assert category("linear_geglu_kernel") == "gemm"
    assert category("geglu_kernel") == "elementwise"
    # the split-reduction 3x3 convolution and its summing kernel are convolution time
    assert category("fastdiff::conv3x3") == "convolution"
    assert category("conv3x3_sum_kernel") == "convolution"
