"""The shipped table of autotuned attention configurations (kernels/attention_configs.py): its
format and errors, which launches it applies to, and that every shipped file still names
configurations the kernel can launch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import fastdiff.kernels.attention as attention_kernels
import fastdiff.kernels.attention_configs as attention_configs
import pytest
import torch
import triton

from fastdiff.ops import attention_reference
from tests.ops.helpers import assert_within_tolerance, record_attention_launches

GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m, n, w, s in attention_kernels._GPU_SHAPES + attention_kernels._FP32_SHAPES
]


def entry(**changes) -> dict:
    base = {
        "dtype": "fp16",
        "queries": 4096,
        "keys": 4096,
        "head_dim": 40,
        "block_d": 32,
        "block_dt": 16,
        "block_m": 64,
        "block_n": 32,
        "num_warps": 4,
        "num_stages": 2,
    }
    return {**base, **changes}


def table_file(tmp_path, entries, capability="sm_90", name="table.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"capability": capability, "entries": entries}))
    return path


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    attention_configs.load.cache_clear()
    monkeypatch.setattr(attention_kernels, "_lone_configs", {})
    yield
    attention_configs.load.cache_clear()


def test_a_table_file_parses_to_shape_keys():
    capability, table = attention_configs.parse(
        {"capability": "sm_90", "entries": [entry(), entry(dtype="bf16", keys=77, block_n=64)]},
        "t",
    )
    assert capability == "sm_90"
    assert table == {
        ("fp16", 4096, 4096, 40, 32, 16): (64, 32, 4, 2),
        ("bf16", 4096, 77, 40, 32, 16): (64, 64, 4, 2),
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param([], "an 'entries' list", id="not-an-object"),
        pytest.param({"capability": "sm_90"}, "an 'entries' list", id="no-entries"),
        pytest.param({"entries": []}, "'capability' must be", id="no-capability"),
        pytest.param({"capability": "90", "entries": []}, "such as 'sm_90'", id="bad-capability"),
        pytest.param({"capability": "sm_90", "entries": [3]}, "entry 0 is not", id="not-dict"),
        pytest.param(
            {"capability": "sm_90", "entries": [entry(), {"dtype": "fp16"}]},
            "entry 1 lacks queries, keys",
            id="missing-fields",
        ),
        pytest.param(
            {"capability": "sm_90", "entries": [entry(dtype="fp8")]},
            "dtype 'fp8' is not one of fp16, bf16, fp32",
            id="dtype",
        ),
        pytest.param(
            {"capability": "sm_90", "entries": [entry(num_warps=0)]},
            "num_warps must be an integer >= 1, got 0",
            id="zero",
        ),
        pytest.param(
            {"capability": "sm_90", "entries": [entry(block_m=True)]},
            "block_m must be an integer",
            id="bool",
        ),
        pytest.param(
            {"capability": "sm_90", "entries": [entry(keys=77.0)]},
            "keys must be an integer",
            id="float",
        ),
        pytest.param(
            {"capability": "sm_90", "entries": [entry(), entry(block_m=128)]},
            "entry 1: a second, different configuration",
            id="conflict",
        ),
    ],
)
def test_a_bad_table_is_refused_naming_the_entry_and_field(data, message):
    with pytest.raises(ValueError, match="attention configs src") as error:
        attention_configs.parse(data, "src")
    assert message in str(error.value)


def test_a_repeated_identical_entry_is_accepted():
    _, table = attention_configs.parse({"capability": "sm_90", "entries": [entry(), entry()]}, "t")
    assert len(table) == 1


def test_an_unsplit_head_dim_entry_has_no_tail_block():
    """Head dims that are a power of two (64, 128) launch with BLOCK_DT = 0: a table entry for
    them must be accepted, while a negative block is still refused."""
    _, table = attention_configs.parse(
        {"capability": "sm_90", "entries": [entry(head_dim=64, block_d=64, block_dt=0)]}, "t"
    )
    assert table == {("fp16", 4096, 4096, 64, 64, 0): (64, 32, 4, 2)}
    with pytest.raises(ValueError, match="block_dt must be an integer >= 0, got -1"):
        attention_configs.parse({"capability": "sm_90", "entries": [entry(block_dt=-1)]}, "t")


@pytest.mark.parametrize("field", attention_configs.CONFIG_FIELDS)
def test_an_entry_without_a_configuration_field_is_refused(field):
    """Every configuration field is required (a missing one would be a KeyError, not a message
    naming the entry)."""
    incomplete = {name: value for name, value in entry().items() if name != field}
    with pytest.raises(ValueError, match=f"entry 0 lacks {field}$"):
        attention_configs.parse({"capability": "sm_90", "entries": [incomplete]}, "t")


def test_a_file_that_is_not_json_is_refused_naming_it(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        attention_configs.read(path)


def test_the_environment_picks_a_file_off_or_the_packaged_table(tmp_path, monkeypatch):
    path = table_file(tmp_path, [entry()])
    packaged = attention_configs.load("sm_90", "")
    assert attention_configs.load("sm_90", "off") == {} == attention_configs.load("sm_90", "OFF")
    assert attention_configs.load("sm_90", str(path)) == {
        ("fp16", 4096, 4096, 40, 32, 16): (64, 32, 4, 2)
    }
    # A file measured on another architecture does not apply.
    assert attention_configs.load("sm_80", str(path)) == {}
    with pytest.raises(FileNotFoundError, match="FASTDIFF_ATTENTION_CONFIGS: no such file"):
        attention_configs.load("sm_90", str(tmp_path / "missing.json"))
    # The packaged table is the file named after the capability, if one ships.
    shipped = attention_configs.packaged_path("sm_90")
    assert packaged == (attention_configs.read(shipped)[1] if shipped.is_file() else {})
    assert attention_configs.load("sm_12345", "") == {}


def test_no_table_applies_off_a_cuda_device(tmp_path, monkeypatch):
    monkeypatch.setenv(attention_configs.ENV, str(table_file(tmp_path, [entry()])))
    assert attention_configs.table_for(torch.empty(1, 1, 1, 40)) == {}


def test_on_a_gpu_the_table_follows_the_environment(tmp_path, monkeypatch):
    """table_for on a CUDA tensor reads FASTDIFF_ATTENTION_CONFIGS: a file replaces the packaged
    table, and ``off`` (what tune_attention.py sets) disables it."""
    monkeypatch.setattr(attention_configs, "capability_name", lambda device: "sm_90")
    q = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    monkeypatch.setenv(attention_configs.ENV, str(table_file(tmp_path, [entry(keys=77)])))
    assert attention_configs.table_for(q) == {("fp16", 4096, 77, 40, 32, 16): (64, 32, 4, 2)}
    monkeypatch.setenv(attention_configs.ENV, "off")
    assert attention_configs.table_for(q) == {}


def test_the_optimize_report_says_which_table_the_launcher_takes(tmp_path, monkeypatch):
    """describe() (a line of optimize()'s report): the shipped table and its size, another file,
    off, or none for this architecture; a bad file fails here, before any launch."""
    from fastdiff.ops.backend import attention_configs_summary

    monkeypatch.setattr(attention_configs, "capability_name", lambda device: "sm_90")
    gpu = torch.device("cuda", 0)
    monkeypatch.delenv(attention_configs.ENV, raising=False)
    shipped = attention_configs.load("sm_90", "")
    if shipped:
        assert attention_configs.describe(gpu) == (
            f"attention configurations: {len(shipped)} shapes from shipped sm_90.json; other "
            "shapes autotune at their first use"
        )
    monkeypatch.setenv(attention_configs.ENV, str(table_file(tmp_path, [entry(), entry(keys=77)])))
    assert "2 shapes from " + str(tmp_path) in attention_configs.describe(gpu)
    monkeypatch.setenv(attention_configs.ENV, "off")
    assert "=off, every attention shape autotunes" in attention_configs.describe(gpu)
    monkeypatch.setattr(attention_configs, "capability_name", lambda device: "sm_75")
    monkeypatch.delenv(attention_configs.ENV)
    assert "none shipped for sm_75, every attention shape autotunes" in (
        attention_configs.describe(gpu)
    )
    monkeypatch.setenv(attention_configs.ENV, str(table_file(tmp_path, [entry()])))
    assert f"{tmp_path}" in attention_configs.describe(gpu)
    assert "lists none for sm_75" in attention_configs.describe(gpu)
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    monkeypatch.setenv(attention_configs.ENV, str(broken))
    with pytest.raises(ValueError, match="broken.json: expected an object"):
        attention_configs.describe(gpu)
    # Off a CUDA device the launcher reads no table: nothing to report.
    assert attention_configs_summary(torch.device("cpu")) is None


def shipped_tables():
    folder = attention_configs.packaged_path("sm_90").parent
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


@pytest.mark.parametrize("path", shipped_tables(), ids=lambda path: path.name)
def test_every_shipped_table_names_configurations_the_kernel_can_launch(path):
    """A shipped entry whose configuration the kernel no longer offers for its shape would be
    ignored at run time (autotuning again): catch it here, when the candidates change."""
    capability, table = attention_configs.read(path)
    assert path.stem == capability
    assert table, f"{path} has no entries"
    for (dtype, queries, keys, head_dim, block_d, block_dt), shape in table.items():
        assert attention_kernels.head_blocks(head_dim) == (block_d, block_dt) or (
            attention_kernels.head_blocks(head_dim, split=False) == (block_d, block_dt)
        ), f"{path}: blocks {(block_d, block_dt)} are not the kernel's for head dim {head_dim}"
        q = torch.empty(0, dtype=attention_configs.DTYPES[dtype])
        args = attention_kernels.prune_args(q, queries, keys, block_d, block_dt)
        fitting = [
            attention_kernels._shape(c) for c in attention_kernels._fitting(GPU_CONFIGS, args)
        ]
        assert shape in fitting, f"{path}: {shape} is not a candidate for {queries}x{keys}"


def use_table(monkeypatch, table: dict) -> None:
    """Make lone_config see ``table`` for CPU tensors (table_for answers {} off a GPU)."""
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "configs", GPU_CONFIGS)
    monkeypatch.setattr(attention_configs, "table_for", lambda q: table)


@pytest.mark.parametrize("autotune", ["1", "0"])
def test_a_table_entry_is_launched_directly(monkeypatch, autotune):
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", autotune)
    use_table(monkeypatch, {("fp16", 4096, 4096, 40, 32, 16): (64, 32, 4, 2)})
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    kernel, options = attention_kernels.lone_config(q, 4096, 4096, 32, 16)
    assert kernel is attention_kernels.attention_forward_kernel.fn
    assert options == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    assert (64, 32, 4, 2) != attention_kernels.heuristic_shape(48, 4096)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        pytest.param(("bf16", 4096, 4096, 40, 32, 16), "another dtype", id="dtype"),
        pytest.param(("fp16", 4096, 77, 40, 32, 16), "other keys", id="keys"),
        pytest.param(("fp16", 4096, 4096, 36, 32, 16), "another head dim", id="head-dim"),
        pytest.param(("fp16", 4096, 4096, 40, 64, 0), "the padded blocks", id="blocks"),
    ],
)
def test_a_table_entry_for_another_shape_leaves_the_autotuner(monkeypatch, key, why):
    use_table(monkeypatch, {key: (64, 32, 4, 2)})
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    kernel, options = attention_kernels.lone_config(q, 4096, 4096, 32, 16)
    assert (kernel, options) == (attention_kernels.attention_forward_kernel, {}), why


def test_a_table_entry_is_keyed_by_queries_then_keys(monkeypatch):
    """Cross-attention: 4096 queries over 77 text keys. The entry applies to that launch, not to
    one with the counts the other way round."""
    use_table(monkeypatch, {("fp16", 4096, 77, 40, 32, 16): (64, 32, 4, 2)})
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    kernel, options = attention_kernels.lone_config(q, 4096, 77, 32, 16)
    assert kernel is attention_kernels.attention_forward_kernel.fn and options["BLOCK_M"] == 64
    q = torch.empty(2, 8, 77, 40, dtype=torch.float16)
    assert attention_kernels.lone_config(q, 77, 4096, 32, 16) == (
        attention_kernels.attention_forward_kernel,
        {},
    )


@pytest.mark.parametrize(
    ("other", "why"),
    [
        pytest.param(torch.empty(2, 8, 4096, 40, dtype=torch.bfloat16), "dtype", id="dtype"),
        # head dims 36 and 40 launch the same blocks (32 + 16)
        pytest.param(torch.empty(2, 8, 4096, 36, dtype=torch.float16), "head dim", id="head-dim"),
        # a second GPU of another architecture, without a table (here: another device type)
        pytest.param(
            torch.empty(2, 8, 4096, 40, dtype=torch.float16, device="meta"), "device", id="device"
        ),
    ],
)
def test_the_launch_cache_tells_apart_launches_the_table_tells_apart(monkeypatch, other, why):
    """lone_config memoises its answer per launch shape: a table entry answered for one launch
    must not be reused for one that differs only in what the table's key (or the device's table)
    depends on."""
    assert attention_kernels.head_blocks(36) == attention_kernels.head_blocks(40) == (32, 16)
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "configs", GPU_CONFIGS)
    table = {("fp16", 4096, 4096, 40, 32, 16): (64, 32, 4, 2)}
    monkeypatch.setattr(
        attention_configs, "table_for", lambda q: table if q.device.type == "cpu" else {}
    )
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    assert attention_kernels.lone_config(q, 4096, 4096, 32, 16)[1]["BLOCK_M"] == 64
    kernel, options = attention_kernels.lone_config(other, 4096, 4096, 32, 16)
    assert (kernel, options) == (attention_kernels.attention_forward_kernel, {}), why


def test_a_stale_table_entry_is_ignored(monkeypatch):
    # 128-key blocks are not a candidate at head dim 160 (registers): the entry predates that.
    use_table(monkeypatch, {("fp16", 256, 256, 160, 128, 32): (128, 128, 8, 3)})
    q = torch.empty(2, 8, 256, 160, dtype=torch.float16)
    kernel, options = attention_kernels.lone_config(q, 256, 256, 128, 32)
    assert (kernel, options) == (attention_kernels.attention_forward_kernel, {})
    monkeypatch.setenv("FASTDIFF_AUTOTUNE", "0")  # then the heuristic config, as without a table
    kernel, options = attention_kernels.lone_config(q, 256, 256, 128, 32)
    assert kernel is attention_kernels.attention_forward_kernel.fn
    got = (options["BLOCK_M"], options["BLOCK_N"], options["num_warps"], options["num_stages"])
    assert got == attention_kernels.heuristic_shape(160, 256)


def test_the_table_setting_is_part_of_the_launch_cache(monkeypatch, tmp_path):
    """Switching FASTDIFF_ATTENTION_CONFIGS in a process takes effect at the next launch."""
    monkeypatch.setattr(attention_kernels.attention_forward_kernel, "configs", GPU_CONFIGS)
    tables = {"": {("fp16", 4096, 4096, 40, 32, 16): (64, 32, 4, 2)}, "off": {}}
    monkeypatch.setattr(
        attention_configs,
        "table_for",
        lambda q: tables[attention_configs.os.environ.get(attention_configs.ENV, "")],
    )
    q = torch.empty(2, 8, 4096, 40, dtype=torch.float16)
    monkeypatch.setenv(attention_configs.ENV, "")
    assert attention_kernels.lone_config(q, 4096, 4096, 32, 16)[1]["BLOCK_M"] == 64
    monkeypatch.setenv(attention_configs.ENV, "off")
    assert attention_kernels.lone_config(q, 4096, 4096, 32, 16)[1] == {}


def test_entries_from_the_autotuner_cache_round_trip(tmp_path):
    def config(m, n, w, s):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)

    half, bf16 = str(torch.float16), str(torch.bfloat16)
    cache = {  # keys as the autotuner writes them: its key arguments, then the dtypes
        (4096, 77, 40, 32, 16, half, half, half, half): config(128, 64, 4, 3),
        (4096, 4096, 40, 32, 16, bf16, bf16, bf16, bf16): config(128, 64, 8, 3),
        (256, 256, 160, 128, 32, "torch.int8"): config(64, 32, 4, 2),  # not a kernel dtype
    }
    entries = attention_configs.entries_from_cache(cache)
    assert [e["dtype"] for e in entries] == ["bf16", "fp16"]
    path = table_file(tmp_path, entries)
    assert attention_configs.read(path)[1] == {
        ("fp16", 4096, 77, 40, 32, 16): (128, 64, 4, 3),
        ("bf16", 4096, 4096, 40, 32, 16): (128, 64, 8, 3),
    }


def test_merging_keeps_old_entries_and_takes_new_configurations():
    old = [entry(), entry(keys=77)]
    new = [entry(block_m=128, block_n=64, num_warps=8, num_stages=3), entry(queries=1024)]
    result = attention_configs.merged(old, new)
    assert len(result) == 3
    by_shape = {(e["queries"], e["keys"]): e["block_m"] for e in result}
    assert by_shape == {(4096, 4096): 128, (4096, 77): 64, (1024, 4096): 64}


def test_merging_keeps_each_dtype_and_sorts_by_key():
    """fp16 and bf16 entries of one shape are two entries; the merged list is in key order, so a
    re-tuned table diffs against the committed one line by line."""
    old = [entry(queries=1024), entry(dtype="bf16", block_m=128)]
    new = [entry(keys=77), entry()]
    result = attention_configs.merged(old, new)
    keys = [(e["dtype"], e["queries"], e["keys"], e["block_m"]) for e in result]
    assert keys == [
        ("bf16", 4096, 4096, 128),
        ("fp16", 1024, 4096, 64),
        ("fp16", 4096, 77, 64),
        ("fp16", 4096, 4096, 64),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_table_configuration_runs_correctly_on_the_gpu(tmp_path, monkeypatch):
    """A shipped configuration other than the heuristic one, launched by the op on the GPU."""
    from fastdiff.ops import attention, use_backend
    from fastdiff.ops.attention import attention_eager

    capability = attention_configs.capability_name(torch.device("cuda"))
    path = table_file(
        tmp_path,
        [entry(queries=300, keys=77, head_dim=40, block_m=64, block_n=32, num_warps=4)],
        capability=capability,
    )
    monkeypatch.setenv(attention_configs.ENV, str(path))
    q = torch.randn(2, 3, 300, 40, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(2, 3, 77, 40, device="cuda", dtype=torch.float16) for _ in range(2))
    launched = record_attention_launches(monkeypatch)
    with use_backend("triton"):
        out = attention(q, k, v)
    assert [options for _, options in launched] == [
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    ]
    assert_within_tolerance(
        out, attention_reference(q, k, v), attention_eager(q, k, v), "table config 64x32"
    )


def test_the_autotuner_times_each_candidate_for_the_launchers_length(monkeypatch):
    """A new shape's candidates are timed for AUTOTUNE_TIMING_MS (warm-up, repetitions in ms)
    by this machine's benchmarker, not for Triton's default (25, 100): over a second per shape."""
    from triton.runtime import driver

    asked = []

    class Driver:
        def get_benchmarker(self):
            def bench(kernel_call, warmup, rep, quantiles):
                kernel_call()
                asked.append((warmup, rep, quantiles))
                return [1.0, 0.9, 1.1]

            return bench

    monkeypatch.setattr(driver, "_active", Driver())
    calls = []
    assert attention_kernels._time_candidate(lambda: calls.append(1), (0.5, 0.2, 0.8)) == [
        1.0,
        0.9,
        1.1,
    ]
    assert asked == [(5, 25, (0.5, 0.2, 0.8))] and calls == [1]
    assert attention_kernels.attention_forward_kernel.do_bench is attention_kernels._time_candidate
