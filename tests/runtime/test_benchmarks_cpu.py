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
    (case,) = bench_vae.cases(["no-such-provider"])
    result = model_bench.run_case(case, warmup=0, iters=1)
    assert result.note.startswith("FAILED ValueError") and "allowed values" in result.note
