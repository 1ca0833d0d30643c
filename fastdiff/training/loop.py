"""The one training loop every stage (classifier, VAE, U-Net) runs: AdamW, warm-up + cosine
learning rate, gradient clipping, optional EMA, DDP, tqdm, a CSV loss log and atomic checkpoints.

Resuming is exact because nothing in the loop carries hidden state between steps:
- the data order is a function of (seed, step): each epoch is a seeded permutation of the items,
  the global batch for a step is a fixed slice of it, and rank r takes every world_size-th item;
- the randomness a step needs (noise, timesteps, condition dropout, augmentation) comes from a
  generator seeded with (seed, step, rank);
- the learning rate is a function of the step.
So a checkpoint needs only the step, model, EMA and optimizer (plus the global RNG states, saved
for any library code that draws from them), and a resumed run repeats the uninterrupted one bit for
bit on the same machine. That holds only for the same settings: the checkpoint keeps them, and a
run whose settings differ is refused rather than resumed into a model neither config describes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastdiff.files import atomic_write
from fastdiff.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from fastdiff.training.config import OptimConfig
from fastdiff.training.distributed import DistContext, all_reduce_mean, barrier
from fastdiff.training.ema import EMA

# loss_fn(model, indices, generator) -> scalar loss for the items ``indices`` of the stage's data.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class StageResult:
    model: nn.Module  # the trained model (unwrapped from DDP), on the training device
    ema_model: nn.Module | None
    losses: list[float] = field(default_factory=list)  # losses of the steps run in this call
    step: int = 0  # optimizer steps completed in total
    finished: bool = False


class _Objective(nn.Module):
    """``loss_fn`` as a module's forward, so DDP sees one forward per step (its gradient hooks
    need that) even when the loss calls methods such as ``vae.encode`` rather than ``forward``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.loss_fn(self.model, indices, generator)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    # Large odd multipliers keep (seed, step, rank) triples from colliding for any realistic run.
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 17) % (2**63 - 1)


def global_batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """Item indices of the global batch at ``step``: slices of seeded per-epoch permutations."""
    start = step * batch_size
    pieces = []
    while batch_size > 0:
        epoch, offset = divmod(start, num_items)
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + epoch))
        take = min(batch_size, num_items - offset)
        pieces.append(order[offset : offset + take])
        start += take
        batch_size -= take
    return torch.cat(pieces)


def learning_rate_at(step: int, config: OptimConfig) -> float:
    """Linear warm-up, then constant or a cosine decay to 10 % of the peak at the last step."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if not config.cosine_decay:
        return config.learning_rate
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


LOG_HEADER = ["step", "loss", "learning_rate", "seconds"]
# Settings that change what is written when, not what is trained: they may differ on resume.
BOOKKEEPING_KEYS = ("checkpoint_every", "log_every")


def stage_settings(section: OptimConfig, **inputs: Any) -> dict[str, Any]:
    """What decides a stage's result: its config section (less ``BOOKKEEPING_KEYS``) and
    ``inputs`` (seed, data, the VAE a U-Net trains on). Kept in the checkpoint."""
    values = dataclasses.asdict(section)
    return {
        **{key: value for key, value in values.items() if key not in BOOKKEEPING_KEYS},
        **inputs,
    }


def check_same_settings(
    path: Path, saved: dict[str, Any] | None, now: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Refuse to resume (or re-export) from a checkpoint written with other settings: the result
    would be a model that no uninterrupted run of either config gives. A key the checkpoint
    lacks (a setting added to fastdiff since) counts as its default, as that run trained with."""
    if saved is None:  # a checkpoint from before settings were kept
        return
    absent = object()
    saved = {**{key: value for key, value in defaults.items() if key not in saved}, **saved}
    changed = [
        f"{key}: {saved.get(key, '(absent)')!r} -> {now.get(key, '(absent)')!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key, absent) != now.get(key, absent)
    ]
    if not changed:
        return
    raise ValueError(
        f"{path} was written with other settings ({'; '.join(changed)}); resuming would train a "
        f"model neither config describes. Use a new output_dir, or delete {path.name} and "
        "its log to train this stage again"
    )


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows past the checkpoint: those steps are about to be run again. Rewritten
    atomically: an interruption leaves the old log, never an empty one."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle)]
    kept = [LOG_HEADER] + [
        row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) <= last_step
    ]
    text = io.StringIO()
    csv.writer(text).writerows(kept)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text.getvalue(), "utf-8"))


def train_stage(
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    num_items: int,
    config: OptimConfig,
    output_dir: str | os.PathLike,
    context: DistContext,
    seed: int = 0,
    ema_decay: float | None = None,
    progress: bool = True,
    stop_after_step: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> StageResult:
    """Train ``model`` for ``config.steps`` optimizer steps, resuming from ``<name>_checkpoint.pt``
    when that was written with the same settings (``stage_settings`` of ``config``, ``seed`` and
    ``inputs``: what the stage trains on, e.g. the data config).

    ``stop_after_step`` ends the call early (after that many total steps, with a checkpoint), which
    is how tests simulate an interruption.
    """
    if config.batch_size % context.world_size:
        raise ValueError(
            f"{name}.batch_size={config.batch_size} must be divisible by the "
            f"{context.world_size} data-parallel ranks"
        )
    output_dir = Path(output_dir)
    checkpoint_path = output_dir / f"{name}_checkpoint.pt"
    log_path = output_dir / f"{name}_log.csv"
    model = model.to(context.device)
    ema = EMA(model, ema_decay) if ema_decay is not None else None
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )

    start = 0
    settings = stage_settings(config, seed=seed, **(inputs or {}))
    state = load_checkpoint(checkpoint_path)
    if state is not None:
        if state["name"] != name:
            raise RuntimeError(
                f"{checkpoint_path} belongs to stage {state['name']!r}, not {name!r}"
            )
        defaults = stage_settings(type(config)())
        check_same_settings(checkpoint_path, state.get("settings"), settings, defaults)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
    if context.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if start:
            _truncate_log(log_path, start)
        elif log_path.exists():
            log_path.unlink()
    barrier(context)

    objective = _Objective(model, loss_fn)
    wrapped = DistributedDataParallel(objective) if context.enabled else objective
    end = config.steps if stop_after_step is None else min(config.steps, stop_after_step)
    bar = None
    if progress and context.is_main and end > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"train {name}", dynamic_ncols=True)

    result = StageResult(model=model, ema_model=ema.model if ema else None, step=start)
    log_rows: list[tuple[int, float, float, float]] = []
    started = time.perf_counter()
    model.train()
    for step in range(start, end):
        lr = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = global_batch_indices(step, config.batch_size, num_items, seed)
        indices = indices[context.rank :: context.world_size]
        generator = torch.Generator(context.device).manual_seed(step_seed(seed, step, context.rank))
        loss = wrapped(indices, generator)
        # The mean over the ranks before backward: a non-finite loss on any rank stops every
        # rank here, each naming it (one rank raising alone left the others failing in the
        # gradient all-reduce on a closed connection, or waiting there).
        mean_loss = all_reduce_mean(loss.detach(), context).item()
        if not math.isfinite(mean_loss):
            where = "" if not math.isfinite(loss.item()) else " on another rank"
            raise RuntimeError(f"{name}: loss became {mean_loss}{where} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model)
        result.losses.append(mean_loss)
        result.step = step + 1
        log_rows.append((step + 1, mean_loss, lr, time.perf_counter() - started))
        if bar is not None:
            bar.update(1)
            if (step + 1) % config.log_every == 0:
                bar.set_postfix(loss=f"{mean_loss:.4f}")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
            if context.is_main:
                _append_log(log_path, log_rows, config.log_every)
                save_checkpoint(
                    checkpoint_path,
                    {
                        "name": name,
                        "settings": settings,
                        "step": step + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "rng": capture_rng_state(),
                    },
                )
            log_rows = []
            barrier(context)
    if bar is not None:
        bar.close()
    model.eval()
    result.finished = result.step >= config.steps
    return result


def _append_log(path: Path, rows: list[tuple[int, float, float, float]], every: int) -> None:
    """Append the rows whose step is a multiple of ``every`` (the loss is that step's value)."""
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(LOG_HEADER)
        for step, loss, lr, seconds in rows:
            if step % every == 0:
                writer.writerow([step, f"{loss:.6f}", f"{lr:.6g}", f"{seconds:.2f}"])
