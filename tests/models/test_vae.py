"""fastdiff's AutoencoderKL against diffusers', the Gaussian posterior, legacy keys and tiling."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fastdiff.models import AutoencoderKL, DiagonalGaussian, load_vae
from fastdiff.models.tiling import tiled_decode, tiled_encode
from tests.models.reference import VAE_CONFIG

TOLERANCE = 1e-4


def images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vae", {}),
        ("vae_no_quant", {"use_quant_conv": False, "use_post_quant_conv": False}),
        ("vae_no_mid_attention", {"mid_block_add_attention": False, "shift_factor": 0.1}),
    ],
)
def test_encode_decode_match_diffusers(checkpoints, name, overrides):
    reference, folder = checkpoints.vae(name, **overrides)
    model = load_vae(folder)
    x = images()
    with torch.no_grad():
        expected = reference.encode(x).latent_dist
        posterior = model.encode(x)
        assert isinstance(posterior, DiagonalGaussian)
        torch.testing.assert_close(posterior.mean, expected.mean, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(posterior.std, expected.std, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(posterior.mode(), expected.mode(), atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(posterior.kl(), expected.kl(), atol=TOLERANCE, rtol=1e-5)
        decoded = model.decode(posterior.mean)
        torch.testing.assert_close(
            decoded, reference.decode(expected.mean).sample, atol=TOLERANCE, rtol=0
        )
    assert decoded.shape == x.shape
    assert model.config.shift_factor == overrides.get("shift_factor")
    assert (model.quant_conv is None) == (not overrides.get("use_quant_conv", True))


def test_posterior_sample_is_mean_plus_std_noise():
    moments = torch.randn(2, 8, 16, 16)
    posterior = DiagonalGaussian(moments)
    first = posterior.sample(torch.Generator().manual_seed(5))
    again = posterior.sample(torch.Generator().manual_seed(5))
    other = posterior.sample(torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    noise = (first - posterior.mean) / posterior.std
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    torch.testing.assert_close(posterior.mean, moments[:, :4])
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * moments[:, 4:]))
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussian(torch.randn(1, 7, 2, 2))


def test_legacy_attention_key_names_load(checkpoints, tmp_path):
    reference, folder = checkpoints.vae()
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            marker = f".attentions.0.{new}."
            if marker in key:
                key = key.replace(marker, f".attentions.0.{old}.")
                if value.dim() == 2 and old == "query":
                    value = value[:, :, None, None]  # the old 1x1-conv form
        renamed[key] = value.contiguous()
    assert any(".proj_attn." in key for key in renamed)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    model = load_vae(tmp_path)
    direct = AutoencoderKL(VAE_CONFIG).eval()
    direct.load_state_dict(renamed)  # the module's own load_state_dict renames as well
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            model.decode(z), reference.decode(z).sample, atol=TOLERANCE, rtol=0
        )
        torch.testing.assert_close(direct.decode(z), model.decode(z), atol=0, rtol=0)


def local_decoder(latent: torch.Tensor) -> torch.Tensor:
    """A decoder whose output pixel depends only on its own latent pixel."""
    return torch.tanh(F.interpolate(latent, scale_factor=4, mode="nearest")[:, :3] * 2 + 1)


@pytest.mark.parametrize(
    "size, tile, overlap", [((13, 21), 6, 2), ((16, 16), 8, 4), ((9, 5), 4, 1)]
)
def test_tiled_decode_blends_to_the_untiled_result_for_a_local_decoder(size, tile, overlap):
    latent = torch.randn(2, 4, *size)
    tiled = tiled_decode(local_decoder, latent, tile, overlap, scale=4)
    torch.testing.assert_close(tiled, local_decoder(latent), atol=1e-6, rtol=0)


def test_tiled_decode_rejects_bad_tiles():
    with pytest.raises(ValueError, match="overlap"):
        tiled_decode(local_decoder, torch.randn(1, 4, 8, 8), 4, 4, scale=4)


def test_tiled_vae_decode(checkpoints):
    _, folder = checkpoints.vae()
    model = load_vae(folder)
    assert model.default_tile() == (8, 2)  # sample_size 16 / downscale 2, quarter overlap
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        # One tile covering the latent is exactly the untiled decode.
        torch.testing.assert_close(model.decode(z, tiled=True), model.decode(z), atol=0, rtol=0)
        big = torch.randn(1, 4, 40, 28)  # 5x / 3.5x the training size
        tiled = model.decode(big, tiled=True, tile_size=8, overlap=2)
        assert tiled.shape == (1, 3, 80, 56) and torch.isfinite(tiled).all()
        model.enable_tiling(tile_size=8, overlap=2)
        torch.testing.assert_close(model.decode(big), tiled, atol=0, rtol=0)
        model.disable_tiling()
        untiled = model.decode(big)
    # Tiles see their own GroupNorm statistics and borders, so a random-weight model is only
    # roughly reproduced; seams are blended, not exact.
    assert (tiled - untiled).abs().mean() < untiled.std()


def local_encoder(image: torch.Tensor) -> torch.Tensor:
    """An encoder whose output pixel depends only on its own 4x4 block of image pixels."""
    return torch.tanh(F.avg_pool2d(image, 4).repeat(1, 2, 1, 1)[:, :8] * 2 + 1)


@pytest.mark.parametrize("size, tile, overlap", [((52, 84), 24, 8), ((36, 20), 16, 4)])
def test_tiled_encode_blends_to_the_untiled_result_for_a_local_encoder(size, tile, overlap):
    image = torch.randn(2, 3, *size)
    tiled = tiled_encode(local_encoder, image, tile, overlap, scale=4)
    torch.testing.assert_close(tiled, local_encoder(image), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        tiled_encode(local_encoder, image, tile + 2, overlap, scale=4)


def test_tiled_vae_encode_and_slicing(checkpoints):
    """enable_tiling() tiles encode too, as diffusers' does (images larger than the tile times
    the downscale factor); enable_slicing() runs one sample at a time with equal results."""
    _, folder = checkpoints.vae()
    model = load_vae(folder)
    small, big = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 80, 56) * 2 - 1
    with torch.no_grad():
        untiled_small, untiled_big = model.encode(small).mean, model.encode(big).mean
        model.enable_tiling(tile_size=8, overlap=2)  # 16 image pixels, 4 of overlap
        torch.testing.assert_close(model.encode(small).mean, untiled_small, atol=0, rtol=0)
        tiled = model.encode(big)
        assert tiled.mean.shape == (2, 4, 40, 28)
        assert not torch.allclose(tiled.mean, untiled_big, atol=1e-3)
        # The same as blending the encoder's tiles directly (quant_conv is pointwise).
        moments = tiled_encode(model.encoder, big, 16, 4, scale=2)
        direct = model.quant_conv(moments) if model.quant_conv is not None else moments
        torch.testing.assert_close(tiled.parameters, direct, atol=1e-6, rtol=0)
        model.enable_slicing()
        torch.testing.assert_close(model.encode(big).parameters, tiled.parameters)
        z = torch.randn(3, 4, 40, 28)
        batches = []
        hook = model.decoder.register_forward_pre_hook(lambda _, args: batches.append(len(args[0])))
        sliced = model.decode(z)
        assert batches and set(batches) == {1}  # one image at a time, tiled too
        model.disable_slicing()
        batches.clear()
        torch.testing.assert_close(sliced, model.decode(z), atol=1e-5, rtol=0)
        assert set(batches) == {3}
        hook.remove()
        # decode(tile_size=) without overlap overlaps by a quarter of that tile, not by the
        # overlap enable_tiling() set for its own tile.
        model.enable_tiling(tile_size=8, overlap=6)
        at_quarter = model.decode(z[:1], tile_size=12)
        torch.testing.assert_close(at_quarter, model.decode(z[:1], tile_size=12, overlap=3))


def test_blend_ramp_weights():
    """The seam weights: 1 inside, rising linearly over the overlap from the half-sample
    positions, falling symmetrically at the far edge; no ramp at the image's own borders."""
    from fastdiff.models.tiling import blend_ramp

    rising = [0.125, 0.375, 0.625, 0.875]
    both = blend_ramp(10, 4, at_start=False, at_end=False, device="cpu")
    assert both.tolist() == rising + [1.0, 1.0] + rising[::-1]
    assert blend_ramp(10, 4, at_start=True, at_end=False, device="cpu").tolist()[:4] == [1.0] * 4
    assert blend_ramp(10, 4, at_start=False, at_end=True, device="cpu").tolist()[-4:] == [1.0] * 4
    short = blend_ramp(6, 4, False, False, "cpu")  # the ramp is cut to half the length
    assert torch.allclose(short, torch.tensor([1 / 6, 0.5, 5 / 6, 5 / 6, 0.5, 1 / 6]))


def test_tiles_are_blended_over_the_overlap_in_output_pixels():
    """Each tile decoded to a constant (its index): inside one tile the output is that tile's
    constant; across a seam it moves linearly from one to the next over overlap * scale output
    pixels, and the image's last rows and columns belong to the last tile alone."""
    count = []

    def constant_tile(tile: torch.Tensor) -> torch.Tensor:
        count.append(len(count))
        shape = (tile.shape[0], 1, tile.shape[2] * 2, tile.shape[3] * 2)
        return torch.full(shape, float(count[-1]))

    out = tiled_decode(constant_tile, torch.zeros(1, 4, 4, 14), 4, 2, scale=2)[0, 0, 0]
    # Columns: tiles start at 0, 2, 4, ..., 10 (the last one pulled back to end at 14).
    assert out[:4].tolist() == [0.0] * 4  # only tile 0 covers the first 2 latent columns
    assert out[-4:].tolist() == [5.0] * 4  # only the last tile covers the end
    seam = out[4:8]  # tiles 0 and 1 overlap over 2 latent = 4 output pixels
    assert torch.allclose(seam, torch.tensor([0.125, 0.375, 0.625, 0.875]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tile_size": 0}, "tile_size must be an int >= 1"),
        ({"tile_size": 4.0}, "tile_size must be an int"),
        ({"overlap": -1}, "overlap must be an int >= 0"),
        ({"tile_size": 4, "overlap": 4}, "overlap 4 must be smaller than tile_size 4"),
    ],
)
def test_enable_tiling_checks_its_arguments(kwargs, message):
    model = AutoencoderKL(VAE_CONFIG)
    with pytest.raises(ValueError, match=message):
        model.enable_tiling(**kwargs)
    assert not model.tiling_enabled


def test_vae_config_and_conveniences(checkpoints):
    _, folder = checkpoints.vae()
    model = load_vae(folder)
    config = json.loads((folder / "config.json").read_text())
    assert model.scaling_factor == config["scaling_factor"]
    assert model.downscale_factor == 2
    assert model.dtype == torch.float32
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.decode(model.encode(x).mode()))


def test_vae_fused_projections_same_output(checkpoints):
    _, folder = checkpoints.vae()
    model = load_vae(folder)
    x = images(1)
    with torch.no_grad():
        expected = model(x)
        assert model.fuse_qkv_projections() == 2  # encoder and decoder mid-block attention
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_vae_bad_input_shapes():
    model = AutoencoderKL(VAE_CONFIG)
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="images"):
        model.encode(torch.randn(1, 4, 8, 8))


def test_vae_channels_last_same_output(checkpoints):
    _, folder = checkpoints.vae()
    model = load_vae(folder)
    x = images(1)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
