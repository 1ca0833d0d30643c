"""Training bugs found in review: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

from fastdiff.training.classifier import ShapeClassifier
from fastdiff.training.config import config_from_dict
from fastdiff.training.distributed import DistContext
from fastdiff.training.ema import EMA
from fastdiff.training.model_io import build_vae
from fastdiff.training.unet_stage import train_unet

CPU = DistContext(rank=0, world_size=1, device=torch.device("cpu"))


def test_unet_batch_larger_than_the_data_set_trains(tiny_config_dict):
    """The null-class labels for condition dropout were ``full_like(labels[:batch])``: a batch
    larger than the data set (allowed, and walked over several epochs by the loop) got fewer
    null labels than items, and the U-Net stage failed with a broadcast error at its first step,
    after the classifier and VAE had trained."""
    tiny_config_dict["unet"].update(steps=1, batch_size=8, cond_drop_prob=1.0)
    config = config_from_dict(tiny_config_dict)
    latents = torch.randn(3, 4, 8, 8)
    outcome = train_unet(config, latents, torch.arange(3), CPU)
    assert outcome.result.step == 1 and len(outcome.result.losses) == 1


def test_every_ema_decay_the_config_accepts_is_accepted_by_the_ema(tiny_config_dict):
    """The config allows unet.ema_decay in [0, 1), but EMA refused 0: a config with
    ema_decay 0 passed validation and failed only when the U-Net stage started."""
    tiny_config_dict["unet"]["ema_decay"] = 0.0
    config = config_from_dict(tiny_config_dict)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, config.unet.ema_decay)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, model.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("width", [4, 12])
def test_classifier_width_that_its_group_norm_cannot_split_is_refused(tiny_config_dict, width):
    """classifier.width is split into 8 GroupNorm groups; any width >= 1 passed the config and
    then failed in torch ("num_channels must be divisible by num_groups") without naming the
    key. A width the config accepts must build a classifier."""
    tiny_config_dict["classifier"]["width"] = width
    message = rf"classifier.width must be a multiple of 8 .*, got {width}"
    with pytest.raises(ValueError, match=message):
        config_from_dict(tiny_config_dict)
    tiny_config_dict["classifier"]["width"] = 24
    ShapeClassifier(width=config_from_dict(tiny_config_dict).classifier.width)


@pytest.mark.parametrize("output_dir", [None, 5, ""])
def test_output_dir_must_be_a_folder_path(tiny_config_dict, output_dir):
    """output_dir was never checked: null or a number reached ``Path()`` and ``fastdiff train``
    died with a TypeError traceback instead of an error naming the key."""
    tiny_config_dict["output_dir"] = output_dir
    with pytest.raises(ValueError, match="output_dir must be a non-empty folder path"):
        config_from_dict(tiny_config_dict)


def test_train_cli_names_a_bad_output_dir(tmp_path, capsys, tiny_config_dict):
    """The same through the command line: exit code 2 and the key, not a traceback."""
    import json

    from fastdiff.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**tiny_config_dict, "output_dir": None}))
    assert main(["train", "--config", str(path)]) == 2
    assert "output_dir must be a non-empty folder path" in capsys.readouterr().err


def test_vae_with_more_blocks_than_the_image_can_halve_is_refused(tiny_config_dict):
    """Each VAE block after the first halves the 32-pixel image: 7 blocks passed the config and
    failed with a torch convolution error once the VAE stage started (after the classifier had
    trained). Six blocks (a 1x1 latent) still build."""
    tiny_config_dict["vae"].update(block_out_channels=[8] * 7, norm_num_groups=4)
    with pytest.raises(ValueError, match="vae.block_out_channels has 7 entries; at most 6"):
        config_from_dict(tiny_config_dict)
    tiny_config_dict["vae"]["block_out_channels"] = [8] * 6
    vae = build_vae(config_from_dict(tiny_config_dict).vae)
    assert vae.encode(torch.zeros(1, 3, 32, 32)).mean.shape[-1] == 1
