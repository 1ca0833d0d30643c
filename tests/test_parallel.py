"""Prompt sharding over torch.distributed ranks (the torchrun end-to-end run is in
tests/test_generate_cli.py)."""

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
