"""Image helpers of the pipeline: range conversions, grids, atomic writes that never clobber."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.pipeline import images


def test_vae_output_and_pil_round_trip():
    decoded = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 2, 3).repeat(1, 3, 1, 1)
    unit = images.vae_output_to_unit_range(decoded)
    assert torch.equal(unit[0, 0], torch.tensor([[0.0, 0.0, 0.5], [0.75, 1.0, 1.0]]))
    (pil,) = images.tensor_to_pil(unit)
    assert pil.size == (3, 2) and pil.mode == "RGB"
    assert np.asarray(pil)[:, :, 0].tolist() == [[0, 0, 128], [191, 255, 255]]
    back = images.image_to_tensor(pil)
    assert back.shape == (1, 3, 2, 3)
    assert torch.allclose(back, unit.round(decimals=2) * 2 - 1, atol=0.01)


def test_image_to_tensor_checks_and_resizes():
    pil = Image.new("RGB", (12, 8), (255, 0, 0))
    resized = images.image_to_tensor([pil, pil], height=16, width=24)
    assert resized.shape == (2, 3, 16, 24)
    assert torch.allclose(resized[:, 0], torch.ones(2, 16, 24)) and resized[:, 1].max() == -1
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        images.image_to_tensor(torch.full((1, 3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="shape"):
        images.image_to_tensor(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="4x4 but height x width 8x8"):
        images.image_to_tensor(torch.zeros(3, 4, 4), height=8, width=8)
    with pytest.raises(ValueError, match="PIL image"):
        images.image_to_tensor(["not an image"])


def test_make_grid_layout():
    tiles = [Image.new("RGB", (2, 3), (10 * i, 0, 0)) for i in range(5)]
    grid = images.make_grid(tiles)
    assert grid.size == (3 * 2, 2 * 3)  # 5 tiles -> 3 columns, 2 rows
    pixels = np.asarray(grid)[:, :, 0]
    assert pixels[0, 0] == 0 and pixels[0, 4] == 20 and pixels[3, 2] == 40 and pixels[3, 4] == 0
    with pytest.raises(ValueError, match="same size"):
        images.make_grid([Image.new("RGB", (2, 2)), Image.new("RGB", (3, 2))])


def test_save_image_atomic_writes_and_never_clobbers(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    images.save_image_atomic(Image.new("RGB", (4, 4), (1, 2, 3)), target)
    assert Image.open(target).getpixel((0, 0)) == (1, 2, 3)
    before = target.read_bytes()

    def failing_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        images.save_image_atomic(Image.new("RGB", (4, 4)), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.png"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "missing" / "x.png")
    with pytest.raises(ValueError, match="image format"):
        images.save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "x.unknown")


def test_latent_scaling_round_trips_and_matches_formulas():
    from fastdiff.pipeline.vae_scaling import from_vae_latents, to_vae_latents

    latents = torch.randn(2, 4, 3, 3)
    plain = {"scaling_factor": 0.5}
    torch.testing.assert_close(to_vae_latents(latents, plain), latents / 0.5)
    shifted = {"scaling_factor": 0.5, "shift_factor": 0.25}
    torch.testing.assert_close(to_vae_latents(latents, shifted), latents / 0.5 + 0.25)
    per_channel = {"scaling_factor": 0.5, "latents_mean": [0, 1, 2, 3], "latents_std": [1, 2, 3, 4]}
    decoded = to_vae_latents(latents, per_channel)
    torch.testing.assert_close(decoded[:, 3], latents[:, 3] * 4 / 0.5 + 3)
    for config in (plain, shifted, per_channel):
        torch.testing.assert_close(
            from_vae_latents(to_vae_latents(latents, config), config), latents
        )
    with pytest.raises(ValueError, match="one value per latent channel"):
        to_vae_latents(latents, {**per_channel, "latents_std": [1, 2]})


def test_sixteen_bit_and_float_init_images():
    """Pillow's convert("RGB") clips 16-bit pixels to 255 (an almost white image): scale them."""
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    gray16 = Image.fromarray(values)
    assert gray16.mode == "I;16"
    expected = torch.from_numpy(values.astype(np.float32) / 65535 * 2 - 1)
    tensor = images.image_to_tensor(gray16)
    assert tensor.shape == (1, 3, 2, 2)
    assert torch.allclose(tensor, expected.expand(1, 3, 2, 2), atol=1e-6)
    assert images.image_to_tensor(gray16, height=4, width=4).shape == (1, 3, 4, 4)
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode "I": older Pillow's 16-bit PNGs
    assert torch.allclose(images.image_to_tensor(as_int32), tensor, atol=1e-6)
    # Mode "I" holding 8-bit values (L.convert("I")) keeps the 8-bit reading, not near-black.
    eight = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    widened = Image.fromarray(eight).convert("I")
    expected8 = torch.from_numpy(eight.astype(np.float32) / 255 * 2 - 1)
    assert torch.allclose(images.image_to_tensor(widened), expected8.expand(1, 3, 2, 2), atol=1e-6)
    with pytest.raises(ValueError, match="outside the 16-bit range"):
        images.image_to_tensor(Image.fromarray(np.full((2, 2), 70000, dtype=np.int32)))
    with pytest.raises(ValueError, match="mode 'F'"):
        images.image_to_tensor(Image.fromarray(np.zeros((2, 2), dtype=np.float32)))
    with pytest.raises(ValueError, match="NaN or inf"):
        images.image_to_tensor(torch.full((3, 2, 2), float("nan")))


def test_save_image_atomic_refuses_a_directory_and_writes_readable_files(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        images.save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "folder.png")
    assert list((tmp_path / "folder.png").iterdir()) == []
    written = images.save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "out.png")
    assert written.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_numpy_init_image_errors_describe_the_array_given():
    """The shape in the error is the one passed (a batch axis was added first), and a float
    array out of [0, 1] is called an array, with the uint8 reading as the hint."""
    with pytest.raises(ValueError, match=r"channels last, got \(3, 16, 16\)$"):
        images.image_to_tensor(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"got 2 x \(3, 8, 8\)$"):
        images.image_to_tensor([np.zeros((3, 8, 8), np.float32)] * 2)
    with pytest.raises(ValueError, match=r"numpy float init image values must lie in \[0, 1\]"):
        images.image_to_tensor(np.full((16, 16, 3), 200.0, np.float32))
    with pytest.raises(ValueError, match="numpy init image contains NaN or inf"):
        images.image_to_tensor(np.full((16, 16, 3), np.nan, np.float32))
    ok = images.image_to_tensor(np.full((2, 16, 16, 3), 0.5, np.float64))
    assert ok.shape == (2, 3, 16, 16) and bool((ok == 0).all())
