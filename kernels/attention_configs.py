"""Shipped autotuning results for the attention kernel: the configuration Triton's autotuner chose
per shape on a GPU, so that a fresh machine launches it directly instead of compiling and timing
every candidate (5.8-9.2 s per new shape in the attention benchmark on an H200; the SD1.5
U-Net's first call on a fresh H200 machine took 7.0 s with the shipped table and 12.9 s without).

One JSON file per GPU architecture, ``fastdiff/assets/attention_configs/<capability>.json``
(``sm_90.json`` for H100 and H200), written by ``benchmarks/tune_attention.py``::

    {"capability": "sm_90", "measured_on": "NVIDIA H200",
     "versions": {"torch": "2.11.0+cu130", "triton": "3.6.0"},
     "entries": [{"dtype": "fp16", "queries": 4096, "keys": 4096, "head_dim": 40,
                  "block_d": 32, "block_dt": 16,
                  "block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}, ...]}

An entry is keyed like the autotuner's cache (query and key counts, head dim, the head-dim blocks,
dtype), so it holds for any batch and head count. ``FASTDIFF_ATTENTION_CONFIGS`` names another
file (it applies on GPUs of its ``capability``) or is ``off`` (autotune every shape, as
tune_attention.py does). A shape the table lacks is autotuned as before, and an entry whose
configuration is not among the kernel's candidates for that shape is ignored (the kernel's
candidate list changed after the measurement): a table can make a launch slower, never wrong.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path

import torch

ENV = "FASTDIFF_ATTENTION_CONFIGS"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
KEY_FIELDS = ("queries", "keys", "head_dim", "block_d", "block_dt")
CONFIG_FIELDS = ("block_m", "block_n", "num_warps", "num_stages")

# (dtype name, queries, keys, head_dim, block_d, block_dt) -> (BLOCK_M, BLOCK_N, warps, stages)
Table = dict[tuple, tuple[int, int, int, int]]


def packaged_path(capability: str) -> Path:
    return Path(str(resources.files("fastdiff") / "assets" / "attention_configs")) / (
        f"{capability}.json"
    )


def capability_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def entry_key(
    dtype: torch.dtype, queries: int, keys: int, head_dim: int, block_d: int, block_dt: int
) -> tuple:
    return (DTYPE_NAMES.get(dtype, str(dtype)), queries, keys, head_dim, block_d, block_dt)


def parse(data: object, source: str) -> tuple[str, Table]:
    """(capability, table) from a file's JSON, with errors that name the file, entry and field."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"attention configs {source}: expected an object with an 'entries' list")
    capability = data.get("capability")
    if not isinstance(capability, str) or not capability.startswith("sm_"):
        raise ValueError(
            f"attention configs {source}: 'capability' must be a string such as 'sm_90', "
            f"got {capability!r}"
        )
    table: Table = {}
    for index, entry in enumerate(data["entries"]):
        where = f"attention configs {source}: entry {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object")
        missing = [f for f in ("dtype", *KEY_FIELDS, *CONFIG_FIELDS) if f not in entry]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{where}: dtype {entry['dtype']!r} is not one of {', '.join(DTYPES)}")
        for field in (*KEY_FIELDS, *CONFIG_FIELDS):
            value = entry[field]
            low = 0 if field == "block_dt" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}: {field} must be an integer >= {low}, got {value!r}")
        key = (entry["dtype"], *(entry[f] for f in KEY_FIELDS))
        config = tuple(entry[f] for f in CONFIG_FIELDS)
        if table.get(key, config) != config:
            raise ValueError(f"{where}: a second, different configuration for {key}")
        table[key] = config
    return capability, table


def read(path: Path) -> tuple[str, Table]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"attention configs {path}: not valid JSON ({error})") from None
    return parse(data, str(path))


@functools.lru_cache(maxsize=16)
def load(capability: str, setting: str) -> Table:
    """The table for GPUs of ``capability`` under the ENV ``setting`` ("" = the packaged file)."""
    if setting.lower() == "off":
        return {}
    if setting:
        path = Path(setting)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV}: no such file {path} (or set it to 'off')")
        file_capability, table = read(path)
        return table if file_capability == capability else {}
    path = packaged_path(capability)
    return read(path)[1] if path.is_file() else {}


def table_for(q: torch.Tensor) -> Table:
    """The shipped winners that apply to a launch on q's device ({} off a CUDA device)."""
    if q.device.type != "cuda":
        return {}
    return load(capability_name(q.device), os.environ.get(ENV, ""))


def describe(device: torch.device) -> str:
    """What the attention launcher will take on ``device`` (optimize()'s report): the table in
    use and how many shapes it lists, or why every shape autotunes at first use. Raises the
    table's own error for a bad ``FASTDIFF_ATTENTION_CONFIGS`` file, before any launch."""
    capability = capability_name(device)
    setting = os.environ.get(ENV, "")
    autotune = "every attention shape autotunes at its first use (seconds each)"
    if setting.lower() == "off":
        return f"attention configurations: {ENV}=off, {autotune}"
    table = load(capability, setting)
    source = setting if setting else f"shipped {packaged_path(capability).name}"
    if not table:
        why = (
            f"{setting} lists none for {capability}"
            if setting
            else f"none shipped for {capability}"
        )
        return f"attention configurations: {why}, {autotune}"
    return (
        f"attention configurations: {len(table)} shapes from {source}; other shapes autotune at "
        "their first use"
    )


def entries_from_cache(cache: dict) -> list[dict]:
    """Table entries from the autotuner's cache of ``attention_forward_kernel``: keys
    (N_QUERIES, N_KEYS, HEAD_DIM, BLOCK_D, BLOCK_DT, then the tensors' dtypes as strings),
    values triton.Config. Keys whose dtype is not fp16/bf16/fp32 are skipped."""
    names = {str(dtype): name for dtype, name in DTYPE_NAMES.items()}
    entries = []
    for key, config in cache.items():
        dtype = next((names[item] for item in key[5:] if item in names), None)
        if dtype is None:
            continue
        entry = {"dtype": dtype, **dict(zip(KEY_FIELDS, (int(v) for v in key[:5]), strict=True))}
        entry.update(
            block_m=config.kwargs["BLOCK_M"],
            block_n=config.kwargs["BLOCK_N"],
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        entries.append(entry)
    return sorted(entries, key=lambda e: (e["dtype"], *(e[f] for f in KEY_FIELDS)))


def merged(old: list[dict], new: list[dict]) -> list[dict]:
    """``new`` entries replace ``old`` ones of the same key; the rest of ``old`` is kept."""
    by_key = {(e["dtype"], *(e[f] for f in KEY_FIELDS)): e for e in old}
    by_key.update({(e["dtype"], *(e[f] for f in KEY_FIELDS)): e for e in new})
    return [by_key[key] for key in sorted(by_key)]
