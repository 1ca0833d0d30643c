"""Classifier-free guidance: the combination, guidance rescale and the one batched call."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from fastdiff.sampling import classifier_free_guidance, combine_guidance


def test_combination_and_rescale_against_direct_formula():
    uncond, cond = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5) * 2
    guided = combine_guidance(uncond, cond, 7.5)
    assert torch.allclose(guided, uncond + 7.5 * (cond - uncond))
    rescaled = combine_guidance(uncond, cond, 7.5, guidance_rescale=0.7)
    # Lin et al. 2023 Eq. 15-16 written out per sample.
    for index in range(3):
        g = guided[index]
        expected = 0.7 * g * (cond[index].std() / g.std()) + 0.3 * g
        assert torch.allclose(rescaled[index], expected, atol=1e-6)
    assert torch.allclose(
        rescaled, rescale_noise_cfg(guided, cond, guidance_rescale=0.7), atol=1e-6
    )
    assert torch.allclose(
        combine_guidance(uncond, cond, 7.5, 1.0).std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3))
    )


def test_combination_validation():
    with pytest.raises(ValueError, match="shape"):
        combine_guidance(torch.zeros(2, 3), torch.zeros(2, 4), 3.0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        combine_guidance(torch.zeros(2, 3), torch.zeros(2, 3), 3.0, guidance_rescale=1.5)


class RecordingModel:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, condition):
        self.calls.append((x.clone(), t.clone(), condition))
        scale = (
            condition["text"].mean(dim=(1, 2))
            if isinstance(condition, dict)
            else (
                condition.float().mean(dim=tuple(range(1, condition.dim())))
                if condition is not None
                else torch.ones(x.shape[0])
            )
        )
        return x * scale.reshape(-1, *([1] * (x.dim() - 1))) + t.reshape(-1, 1, 1, 1) / 1000


def test_wrapper_makes_one_batched_call_with_uncond_first():
    model = RecordingModel()
    cond, uncond = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    guided = classifier_free_guidance(model, cond, uncond, guidance_scale=5.0)
    x, t = torch.randn(2, 4, 3, 3), torch.tensor([500, 500])
    output = guided(x, t)
    assert len(model.calls) == 1
    batch_x, batch_t, batch_cond = model.calls[0]
    assert torch.equal(batch_x, torch.cat([x, x])) and torch.equal(batch_t, torch.cat([t, t]))
    assert torch.equal(batch_cond, torch.cat([uncond, cond]))
    out_uncond = RecordingModel()(x, t, uncond)
    out_cond = RecordingModel()(x, t, cond)
    assert torch.allclose(output, out_uncond + 5.0 * (out_cond - out_uncond), atol=1e-6)


def test_wrapper_concatenates_dict_conditions_per_key():
    model = RecordingModel()
    cond = {"text": torch.randn(2, 3, 4), "time_ids": torch.ones(2, 6)}
    uncond = {"text": torch.zeros(2, 3, 4), "time_ids": torch.ones(2, 6) * 2}
    classifier_free_guidance(model, cond, uncond, 3.0, guidance_rescale=0.5)(
        torch.randn(2, 4, 2, 2), torch.tensor([10, 10])
    )
    ((_, _, batched),) = model.calls
    assert set(batched) == {"text", "time_ids"}
    assert torch.equal(batched["time_ids"], torch.cat([uncond["time_ids"], cond["time_ids"]]))
    with pytest.raises(ValueError, match="keys"):
        classifier_free_guidance(model, cond, {"text": uncond["text"]}, 3.0)


def test_wrapper_with_no_condition_and_bad_batch():
    model = RecordingModel()
    x = torch.randn(3, 1, 2, 2)
    output = classifier_free_guidance(model, None, None, 4.0)(x, torch.tensor([1, 1, 1]))
    assert len(model.calls) == 1 and model.calls[0][2] is None and output.shape == x.shape
    with pytest.raises(ValueError, match="batch size 2 but x_t has batch size 3"):
        classifier_free_guidance(model, torch.randn(2, 5), torch.randn(2, 5), 4.0)(
            x, torch.tensor([1, 1, 1])
        )


@pytest.mark.parametrize("rescale", [0.1, 0.5, 1.0])
def test_rescale_values_against_diffusers(rescale):
    """Every rescale strength, not only 0.7, is Lin et al.'s blend (diffusers'
    rescale_noise_cfg)."""
    uncond, cond = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6) * 3
    guided = combine_guidance(uncond, cond, 5.0)
    torch.testing.assert_close(
        combine_guidance(uncond, cond, 5.0, guidance_rescale=rescale),
        rescale_noise_cfg(guided, cond, guidance_rescale=rescale),
        atol=1e-5,
        rtol=0,
    )


def test_wrapper_passes_each_rows_timestep_to_both_halves():
    """Per-sample timesteps (as in training or img2img batches) go to the unconditional and the
    conditional half in the same order as the rows of x_t."""
    seen = []

    def model(x, t, c):
        seen.append(t.clone())
        return x * t.view(-1, 1).float()

    guided = classifier_free_guidance(model, torch.ones(3, 1), torch.zeros(3, 1), 2.0)
    t = torch.tensor([5, 7, 9])
    out = guided(torch.ones(3, 2), t)
    assert torch.equal(seen[0], torch.tensor([5, 7, 9, 5, 7, 9]))
    torch.testing.assert_close(out, t.view(-1, 1).float().expand(3, 2))


def test_shared_input_passes_the_sample_once_with_both_conditions():
    """``shared_input=True``: one call with x_t and t as given and [uncond; cond] conditions,
    for a model that returns both halves (fastdiff's U-Net); the combination is the same."""
    seen = []

    def model_fn(x, t, c):
        seen.append((x.shape[0], t.shape[0], c.shape[0]))
        rows = c.shape[0] // x.shape[0]
        return torch.cat([x] * rows) * c[:, :1, None, None] + t.float().mean()

    x_t, t = torch.randn(2, 3, 4, 4), torch.tensor([5, 5])
    cond, uncond = torch.randn(2, 6), torch.randn(2, 6)
    shared = classifier_free_guidance(model_fn, cond, uncond, 4.0, shared_input=True)(x_t, t)
    repeated = classifier_free_guidance(model_fn, cond, uncond, 4.0)(x_t, t)
    assert seen == [(2, 2, 4), (4, 4, 4)]
    torch.testing.assert_close(shared, repeated)
