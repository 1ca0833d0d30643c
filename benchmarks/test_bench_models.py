"""The model benchmarks through pytest-benchmark (outside the default ``tests/`` run):

    python -m pytest benchmarks/test_bench_models.py --benchmark-only [-k unet]

Each (workload, provider) case of bench_unet / bench_vae / bench_pipeline becomes one benchmark;
on GPU every call is followed by a device synchronisation so wall-clock rounds are device time.
The first call (capture, autotuning) happens before timing, as in the scripts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pipeline  # noqa: E402
import bench_unet  # noqa: E402
import bench_vae  # noqa: E402

pytest.importorskip("pytest_benchmark")


def all_cases():
    quick_unet = bench_unet.cases(["sd15_b2"])
    return quick_unet + bench_vae.cases() + bench_pipeline.cases([4])


CASES = all_cases()


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c.benchmark}-{c.workload}-{c.provider}" for c in CASES]
)
def test_model_benchmark(benchmark, case):
    with torch.no_grad():
        fn = case.setup()
        fn()

        def call():
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        try:
            benchmark.pedantic(call, rounds=10 if torch.cuda.is_available() else 3, warmup_rounds=2)
        finally:
            if case.teardown is not None:
                case.teardown()
    benchmark.extra_info.update(
        workload=case.workload, provider=case.provider, gflop=(case.flop or 0) / 1e9
    )
