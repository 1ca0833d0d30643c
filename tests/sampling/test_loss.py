"""diffusion_loss: targets per prediction type, condition dropout, Min-SNR-gamma weights."""

from __future__ import annotations

import pytest
import torch

from fastdiff.sampling import NoiseSchedule, diffusion_loss, min_snr_weights


class Oracle:
    """Returns the exact target, optionally perturbed, and records what it was given."""

    def __init__(self, schedule, x0, noise_source, offset=0.0):
        self.schedule, self.x0, self.offset = schedule, x0, offset
        self.seen = []

    def __call__(self, x_t, t, cond):
        self.seen.append((x_t, t, cond))
        alpha_bar = self.schedule.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1)
        noise = (x_t - alpha_bar.sqrt() * self.x0) / (1 - alpha_bar).sqrt()
        return self.schedule.training_target(self.x0, noise, t) + self.offset


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_zero_for_the_exact_target_and_mse_otherwise(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    x0 = torch.randn(6, 3, 4, dtype=torch.float64)
    exact = diffusion_loss(Oracle(schedule, x0, None), x0, None, schedule)
    assert float(exact) < 1e-20
    shifted = diffusion_loss(Oracle(schedule, x0, None, offset=0.3), x0, None, schedule)
    assert float(shifted) == pytest.approx(0.09, rel=1e-9)


def test_targets_differ_by_prediction_type():
    x0, t = torch.randn(4, 5), torch.tensor([10, 200, 600, 900])
    g = torch.Generator().manual_seed(0)
    losses = {}
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        schedule = NoiseSchedule(prediction_type=prediction_type)
        g.manual_seed(0)
        losses[prediction_type] = float(
            diffusion_loss(
                lambda x, t, c: torch.zeros_like(x), x0, None, schedule, generator=g, timesteps=t
            )
        )
    # Zero prediction: loss = mean(target^2): eps ~ noise, x0 for sample, v for velocity.
    g.manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    assert losses["epsilon"] == pytest.approx(float((noise**2).mean()), rel=1e-5)
    assert losses["sample"] == pytest.approx(float((x0**2).mean()), rel=1e-5)
    velocity = NoiseSchedule().velocity(x0, noise, t)
    assert losses["v_prediction"] == pytest.approx(float((velocity**2).mean()), rel=1e-5)


def test_condition_dropout_fraction_and_null_values():
    schedule = NoiseSchedule()
    x0 = torch.zeros(4000, 1)
    labels = torch.randint(1, 10, (4000,))
    seen = []
    model = lambda x, t, c: seen.append(c) or torch.zeros_like(x)
    diffusion_loss(model, x0, labels, schedule, cond_drop_prob=0.25, null_cond=0)
    dropped = (seen[0] == 0).float().mean()
    assert abs(float(dropped) - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5
    assert torch.equal(seen[0][seen[0] != 0], labels[seen[0] != 0])

    embeddings, null = torch.randn(500, 7, 8), torch.full((7, 8), -3.0)
    diffusion_loss(model, torch.zeros(500, 1), embeddings, schedule, 0.5, null_cond=null)
    replaced = (seen[1] == -3.0).all(dim=(1, 2))
    assert 150 < int(replaced.sum()) < 350
    assert torch.equal(seen[1][~replaced], embeddings[~replaced])

    cond = {"text": torch.randn(300, 3), "pooled": torch.randn(300, 2)}
    nulls = {"text": torch.zeros(3), "pooled": torch.zeros(2)}
    diffusion_loss(model, torch.zeros(300, 1), cond, schedule, 0.5, null_cond=nulls)
    text_dropped = (seen[2]["text"] == 0).all(dim=1)
    assert torch.equal(text_dropped, (seen[2]["pooled"] == 0).all(dim=1))  # same rows


def test_dropout_needs_a_null_condition():
    with pytest.raises(ValueError, match="null_cond"):
        diffusion_loss(lambda x, t, c: x, torch.zeros(2, 1), torch.ones(2), NoiseSchedule())
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(lambda x, t, c: x[:1], torch.zeros(2, 1), None, NoiseSchedule())


def test_min_snr_weights_per_prediction_type():
    snr = torch.tensor([0.0, 0.5, 5.0, 50.0], dtype=torch.float64)
    gamma = 5.0
    assert torch.allclose(
        min_snr_weights(snr, gamma, "sample"),
        torch.tensor([0.0, 0.5, 5.0, 5.0], dtype=torch.float64),
    )
    assert torch.allclose(
        min_snr_weights(snr, gamma, "epsilon"),
        torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64),
    )
    assert torch.allclose(
        min_snr_weights(snr, gamma, "v_prediction"),
        torch.tensor([0.0, 0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0], dtype=torch.float64),
    )


def test_min_snr_weighting_is_applied_per_sample():
    schedule = NoiseSchedule(prediction_type="epsilon")
    t = torch.tensor([5, 900])
    x0 = torch.zeros(2, 3)
    unweighted = diffusion_loss(
        lambda x, t, c: torch.ones_like(x) + 0.0 * x,
        x0,
        None,
        schedule,
        timesteps=t,
        generator=torch.Generator().manual_seed(0),
    )
    weighted = diffusion_loss(
        lambda x, t, c: torch.ones_like(x) + 0.0 * x,
        x0,
        None,
        schedule,
        timesteps=t,
        generator=torch.Generator().manual_seed(0),
        min_snr_gamma=5.0,
    )
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, generator=g)
    per_sample = ((1 - noise) ** 2).mean(dim=1)
    weights = torch.clamp(5.0 / schedule.snr(t), max=1.0).float()
    assert float(unweighted) == pytest.approx(float(per_sample.mean()), rel=1e-6)
    assert float(weighted) == pytest.approx(float((per_sample * weights).mean()), rel=1e-6)
    assert float(weights[0]) < 1 and float(weights[1]) == 1.0


def test_drawn_timesteps_cover_the_whole_schedule():
    """Training timesteps are drawn from [0, T): both ends occur (t = 0 is a real step)."""
    schedule = NoiseSchedule(num_train_timesteps=2, beta_schedule="linear")
    x0 = torch.randn(64, 3, 2)
    oracle = Oracle(schedule, x0, None)
    for _ in range(4):
        diffusion_loss(oracle, x0, None, schedule)
    drawn = torch.cat([t for _, t, _ in oracle.seen])
    assert set(drawn.tolist()) == {0, 1}


def test_loss_is_computed_in_float32_for_half_predictions():
    """A float16 prediction is compared with the target in float32: squared errors of 300 would
    overflow float16's 65504 and the mean would lose the batch's precision."""
    schedule = NoiseSchedule()
    x0 = torch.randn(4, 3, 8)
    oracle = Oracle(schedule, x0, None, offset=300.0)

    def half_model(x_t, t, cond):
        return oracle(x_t, t, cond).half()

    loss = diffusion_loss(half_model, x0, None, schedule)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert float(loss) == pytest.approx(9e4, rel=1e-2)
