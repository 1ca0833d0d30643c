"""Prompt sharding over torch.distributed ranks (the torchrun end-to-end run is in
tests/commands/test_generate.py)."""

from __future__ import annotations

import pytest

from fastdiff import parallel


@pytest.mark.parametrize("count,world_size", [(0, 2), (1, 2), (5, 2), (7, 3), (4, 4), (3, 5)])
def test_shards_cover_every_item_once_and_balance(count, world_size):
    items = [f"prompt {index}" for index in range(count)]
    shards = [parallel.shard(items, rank, world_size) for rank in range(world_size)]
    indices = sorted(index for shard in shards for index, _ in shard)
    assert indices == list(range(count))
    assert all(items[index] == item for shard in shards for index, item in shard)
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_is_round_robin_and_rejects_bad_ranks():
    assert parallel.shard(list("abcde"), 1, 2) == [(1, "b"), (3, "d")]
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        parallel.shard(["a"], 2, 2)
    with pytest.raises(ValueError, match="world of size 0"):
        parallel.shard(["a"], 0, 0)


def test_single_process_context_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = parallel.init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_distributed) == (0, 1, False)
    assert context.is_main and context.device.type == "cpu"
    assert parallel.gather_to_main(context, ("written", "failed")) == [("written", "failed")]
    parallel.shutdown(context)  # a no-op without a process group


def test_device_choice_is_checked():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        parallel.init_distributed("tpu")
    assert parallel.wants_cuda("cpu") is False


def test_nccl_context_binds_local_rank_and_gathers_over_gloo_without_a_short_timeout(monkeypatch):
    """The nccl path (never run on CPU otherwise): GPU LOCAL_RANK is made current before the
    group starts, objects travel over a gloo group, and neither group keeps torch's 30-minute
    default, which a rank that finished (or failed) early would hit waiting for the others."""
    from datetime import timedelta

    import torch

    calls = {}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        parallel.dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs)
    )
    monkeypatch.setattr(
        parallel.dist, "new_group", lambda **kwargs: calls.setdefault("group", kwargs)
    )
    context = parallel.init_distributed()
    assert calls["device"] == 1 and context.device == torch.device("cuda", 1)
    assert (context.rank, context.world_size, context.backend) == (3, 4, "nccl")
    assert calls["init"]["backend"] == "nccl" and calls["group"]["backend"] == "gloo"
    assert calls["init"]["timeout"] >= timedelta(hours=24)
    assert calls["group"]["timeout"] >= timedelta(hours=24)
