"""The training loop: exact resume, falling loss, atomic checkpoints, data order, LR schedule."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastdiff.files import atomic_write
from fastdiff.training.checkpoint import load_checkpoint, save_checkpoint
from fastdiff.training.config import OptimConfig, config_from_dict
from fastdiff.training.distributed import DistContext
from fastdiff.training.loop import global_batch_indices, learning_rate_at
from fastdiff.training.run import run_training
from fastdiff.training.shapes import make_shapes
from fastdiff.training.unet_stage import train_unet

CPU = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


def read_losses(path: Path) -> list[tuple[int, str]]:
    with open(path, newline="") as handle:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(handle)]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_config_dict):
    straight = config_from_dict({**tiny_config_dict, "output_dir": str(tmp_path / "straight")})
    run_training(straight, context=CPU)

    resumed_values = {**tiny_config_dict, "output_dir": str(tmp_path / "resumed")}
    # Interrupt every stage half way (the U-Net stage needs the finished VAE, so it goes last).
    run_training(
        config_from_dict({**resumed_values, "stages": ["classifier", "vae"]}),
        stop_after_step=3,
        context=CPU,
    )
    run_training(config_from_dict({**resumed_values, "stages": ["classifier", "vae"]}), context=CPU)
    run_training(
        config_from_dict({**resumed_values, "stages": ["unet"]}), stop_after_step=3, context=CPU
    )
    assert load_checkpoint(tmp_path / "resumed" / "unet_checkpoint.pt")["step"] == 3
    run_training(config_from_dict({**resumed_values, "stages": ["unet"]}), context=CPU)

    for stage in ("classifier", "vae", "unet"):
        a = load_checkpoint(tmp_path / "straight" / f"{stage}_checkpoint.pt")
        b = load_checkpoint(tmp_path / "resumed" / f"{stage}_checkpoint.pt")
        assert a["step"] == b["step"] == 6
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (stage, key)
        for index, state in a["optimizer"]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b["optimizer"]["state"][index][name]), (stage, name)
        if stage == "unet":
            for key, value in a["ema"]["weights"].items():
                assert torch.equal(value, b["ema"]["weights"][key]), key
        losses = read_losses(tmp_path / "straight" / f"{stage}_log.csv")
        assert [step for step, _ in losses] == list(range(1, 7))
        assert losses == read_losses(tmp_path / "resumed" / f"{stage}_log.csv")
    for name in ("unet", "vae", "classifier"):
        for file in sorted((tmp_path / "straight" / "pipeline" / name).iterdir()):
            twin = tmp_path / "resumed" / "pipeline" / name / file.name
            assert file.read_bytes() == twin.read_bytes(), file


def test_short_unet_training_lowers_the_loss(tmp_path, tiny_config_dict):
    # Structured stand-in latents (4x4-pooled shape images plus a brightness channel) so the
    # test needs no trained VAE; the U-Net must learn their distribution.
    images, labels = make_shapes(256, seed=2)
    pooled = F.avg_pool2d(images, 4)
    latents = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
    latents = (latents - latents.mean()) / latents.std()
    values = dict(tiny_config_dict)
    values["unet"] = {
        **values["unet"],
        "steps": 300,
        "batch_size": 16,
        "checkpoint_every": 300,
        "warmup_steps": 20,
    }
    config = config_from_dict(values)
    outcome = train_unet(config, latents, labels, CPU)
    losses = outcome.result.losses
    first, last = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    assert last < 0.6 * first, (first, last)


def test_checkpoint_is_atomic_and_damage_is_reported(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(3)})
    save_checkpoint(path, {"step": 2, "weights": torch.arange(4)})
    assert load_checkpoint(path)["step"] == 2
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary files left behind
    assert load_checkpoint(tmp_path / "missing.pt") is None
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(RuntimeError, match="cannot be read"):
        load_checkpoint(path)


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def killed_mid_write(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C while torch.save is writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, killed_mid_write)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_batches_walk_through_seeded_epoch_permutations():
    seen = torch.cat([global_batch_indices(step, 6, 18, seed=1) for step in range(6)])
    assert sorted(seen[:18].tolist()) == list(range(18))  # epoch 0: every item once
    assert sorted(seen[18:].tolist()) == list(range(18))  # epoch 1 too
    assert not torch.equal(seen[:18], seen[18:])  # ... in a different order
    assert torch.equal(global_batch_indices(4, 6, 18, seed=1), seen[24:30])
    # A batch that straddles an epoch boundary: 4 items from epoch 0, 3 from epoch 1.
    assert torch.equal(global_batch_indices(2, 7, 18, seed=1)[:4], seen[14:18])


def test_learning_rate_warmup_then_cosine_to_ten_percent():
    config = OptimConfig(steps=110, learning_rate=1.0, warmup_steps=10)
    assert learning_rate_at(0, config) == pytest.approx(0.1)
    assert learning_rate_at(9, config) == pytest.approx(1.0)
    assert learning_rate_at(10, config) == pytest.approx(1.0)
    assert learning_rate_at(60, config) == pytest.approx(0.55)
    assert learning_rate_at(110, config) == pytest.approx(0.1)
    flat = OptimConfig(steps=110, learning_rate=1.0, cosine_decay=False)
    assert learning_rate_at(100, flat) == 1.0


def test_batch_must_split_evenly_over_ranks(tiny_config_dict):
    config = config_from_dict(tiny_config_dict)
    two_ranks = DistContext(rank=0, world_size=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="divisible by the 3 data-parallel ranks"):
        train_unet(config, torch.zeros(8, 4, 8, 8), torch.zeros(8, dtype=torch.long), two_ranks)


def test_a_run_with_other_settings_is_refused_not_resumed(tmp_path, tiny_config_dict):
    """A checkpoint keeps the settings it was trained with: a changed batch size, learning rate,
    step count or architecture used to be resumed (or, past its end, trained on) without a word,
    into a model no uninterrupted run gives; the bookkeeping keys may change."""
    values = {**tiny_config_dict, "stages": ["classifier"]}
    run_training(config_from_dict(values), stop_after_step=3, context=CPU)
    checkpoint = tmp_path / "run" / "classifier_checkpoint.pt"
    before = checkpoint.read_bytes()
    for change, message in (
        ({"batch_size": 4}, "batch_size: 8 -> 4"),
        ({"steps": 9}, "steps: 6 -> 9"),
        ({"width": 16}, "width: 8 -> 16"),  # was torch's 20-line size-mismatch error
    ):
        changed = {**values, "classifier": {**values["classifier"], **change}}
        with pytest.raises(ValueError, match=f"written with other settings .*{message}"):
            run_training(config_from_dict(changed), context=CPU)
        assert checkpoint.read_bytes() == before
    other_data = {**values, "data": {**values["data"], "seed": 6}}
    with pytest.raises(ValueError, match="data: "):
        run_training(config_from_dict(other_data), context=CPU)
    # A setting the checkpoint lacks (added to fastdiff after it was written) is its default.
    state = load_checkpoint(checkpoint)
    del state["settings"]["noise_std"]
    save_checkpoint(checkpoint, state)
    noisier = {**values, "classifier": {**values["classifier"], "noise_std": 0.5}}
    with pytest.raises(ValueError, match="noise_std: 0.08 -> 0.5"):
        run_training(config_from_dict(noisier), context=CPU)
    # Checkpoint and log cadence change what is written when, not what is trained.
    bookkeeping = {**values, "classifier": {**values["classifier"], "checkpoint_every": 2}}
    run_training(config_from_dict(bookkeeping), context=CPU)
    assert load_checkpoint(checkpoint)["step"] == 6


def test_an_interrupted_log_rewrite_keeps_the_log(tmp_path, tiny_config_dict, monkeypatch):
    """On resume the loss log is cut back to the checkpoint's step; that rewrite was made in
    place, so an interruption left an empty log and the next resume an IndexError."""
    values = {**tiny_config_dict, "stages": ["classifier"]}
    run_training(config_from_dict(values), stop_after_step=3, context=CPU)
    log = tmp_path / "run" / "classifier_log.csv"
    before = log.read_text()

    def interrupted(path, write, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fastdiff.training.loop.atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(config_from_dict(values), context=CPU)
    assert log.read_text() == before
    monkeypatch.undo()
    run_training(config_from_dict(values), context=CPU)
    assert [step for step, _ in read_losses(log)] == list(range(1, 7))


def test_the_unet_is_built_for_the_vae_on_disk(tmp_path, tiny_config_dict):
    """Run as a stage of its own, the U-Net took its latent channels and size from the config's
    vae section, not from the VAE it trains on: a changed section exported a U-Net for the
    wrong image size, or failed with a bare shape error."""
    run_training(config_from_dict({**tiny_config_dict, "stages": ["vae"]}), context=CPU)
    edited = {**tiny_config_dict, "stages": ["unet"]}
    edited["vae"] = {**edited["vae"], "block_out_channels": [8, 16, 16], "latent_channels": 3}
    edited["unet"] = {**edited["unet"], "steps": 2}
    run_training(config_from_dict(edited), context=CPU)
    unet = json.loads((tmp_path / "run" / "pipeline" / "unet" / "config.json").read_text())
    vae = json.loads((tmp_path / "run" / "pipeline" / "vae" / "config.json").read_text())
    assert unet["in_channels"] == unet["out_channels"] == vae["latent_channels"] == 4
    assert unet["sample_size"] == vae["sample_size"] // 2  # the VAE's one downsampling


def test_a_foreign_metrics_file_is_named(tmp_path, tiny_config_dict):
    (tmp_path / "run").mkdir()
    metrics = tmp_path / "run" / "metrics.json"
    values = {**tiny_config_dict, "stages": ["classifier"]}
    for content, message in (("not json", "is not a JSON file"), ("[1, 2]", "holds a JSON list")):
        metrics.write_text(content)
        with pytest.raises(ValueError, match=f"metrics.json {message}"):
            run_training(config_from_dict(values), context=CPU)
        assert metrics.read_text() == content
