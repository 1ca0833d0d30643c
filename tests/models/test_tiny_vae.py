"""fastdiff's AutoencoderTiny (TAESD) against diffusers' on the same saved folders."""

from __future__ import annotations

import pytest
import torch

from fastdiff.models import AutoencoderTiny, load_vae

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    encoder_block_out_channels=(8, 8, 8),
    decoder_block_out_channels=(8, 8, 8),
    num_encoder_blocks=(1, 2, 1),
    num_decoder_blocks=(1, 2, 1),
)


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    reference = perturbed(diffusers.AutoencoderTiny(**CONFIG))
    folder = tmp_path_factory.mktemp("taesd") / "vae"
    reference.save_pretrained(folder)
    return reference, folder


def test_encode_and_decode_equal_diffusers(taesd):
    reference, folder = taesd
    model = load_vae(folder)
    assert isinstance(model, AutoencoderTiny) and model.downscale_factor == 4
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode(images), reference.encode(images).latents, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            model.decode(latents), reference.decode(latents).sample, atol=1e-5, rtol=0
        )
        model.enable_slicing()
        torch.testing.assert_close(
            model.decode(latents), reference.decode(latents).sample, atol=1e-5, rtol=0
        )


def test_saved_and_loaded_again(taesd, tmp_path):
    _, folder = taesd
    model = load_vae(folder)
    model.save_pretrained(tmp_path / "again")
    again = load_vae(tmp_path / "again")
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(model.decode(latents), again.decode(latents))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(act_fn="silu"), "act_fn"),
        (dict(decoder_block_out_channels=(8, 16, 8)), "decoder_block_out_channels must all"),
        (dict(num_encoder_blocks=(1, 1)), "must have the same length"),
    ],
)
def test_configs_it_cannot_build_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderTiny({**CONFIG, **change})
    with pytest.raises(ValueError, match="tiling is implemented for AutoencoderKL only"):
        AutoencoderTiny(CONFIG).enable_tiling()


def test_forward_rounds_the_latents_as_diffusers_and_never_upcasts(taesd, tmp_path):
    """forward() stores the latents in 8 bits first (diffusers' reconstruction); force_upcast
    is always false, whatever the file says (diffusers registers it so); a stage may have no
    blocks."""
    import json

    reference, folder = taesd
    model = load_vae(folder)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images).sample, atol=1e-5, rtol=0)
    config = json.loads((folder / "config.json").read_text())
    assert AutoencoderTiny({**config, "force_upcast": True}).config.force_upcast is False
    no_blocks = {**CONFIG, "num_decoder_blocks": (1, 0, 1)}
    theirs = perturbed(diffusers.AutoencoderTiny(**no_blocks))
    ours = AutoencoderTiny(no_blocks)
    ours.load_state_dict(theirs.state_dict())
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.decode(latents), theirs.decode(latents).sample, atol=1e-5, rtol=0
        )
