"""A failure on one data-parallel rank must stop every rank with the error, not leave the others
waiting in a collective until the launcher kills them."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastdiff.training.config import OptimConfig
from fastdiff.training.distributed import DistContext
from fastdiff.training.loop import train_stage


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nan_on_rank_one(model, indices, generator):
    """A small regression loss that becomes NaN on rank 1 at the second step."""
    x = torch.linspace(-1, 1, 4 * indices.numel()).view(-1, 4)
    loss = (model(x) - 1.0).square().mean()
    if dist.get_rank() == 1 and model.weight.grad is not None:  # the second step
        loss = loss * float("nan")
    return loss


def run_rank(rank: int, port: int, folder: str, outcomes) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout, so that a rank left waiting fails the test rather than hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    try:
        config = OptimConfig(steps=3, batch_size=4, checkpoint_every=10, warmup_steps=0)
        context = DistContext(rank=rank, world_size=2, device=torch.device("cpu"))
        torch.manual_seed(0)
        train_stage(
            "toy", nn.Linear(4, 1), nan_on_rank_one, 8, config, folder, context, progress=False
        )
        outcomes.put((rank, "finished"))
    except Exception as error:  # noqa: BLE001 - the test reads what each rank raised
        outcomes.put((rank, f"{type(error).__name__}: {error}"))
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_its_step(tmp_path):
    """Rank 1's loss became NaN at step 2. It raised there alone, and rank 0 went on into the
    gradient all-reduce, where it either waited for a rank that had left (30 minutes on gloo by
    default) or, once rank 1's process group closed, failed on "Connection closed by peer",
    which names nothing. The loss is now reduced over the ranks before backward, so both ranks
    stop at step 2 naming the loss."""
    context = mp.get_context("spawn")
    outcomes = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=run_rank, args=(rank, port, str(tmp_path), outcomes))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    results = dict(outcomes.get(timeout=10) for _ in processes)
    assert set(results) == {0, 1}
    assert results[1] == "RuntimeError: toy: loss became nan at step 2"
    assert results[0] == "RuntimeError: toy: loss became nan on another rank at step 2"
