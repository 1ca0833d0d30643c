"""EMA, classifier persistence and the loss plot."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fastdiff.training.classifier import ShapeClassifier, load_classifier, save_classifier
from fastdiff.training.ema import EMA


def test_ema_follows_the_warmed_up_decay():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    start = ema.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: decay min(0.99, 1/10) = 0.1
    expected = 0.1 * start + 0.9 * model.weight.detach()
    torch.testing.assert_close(ema.model.weight, expected)
    for _ in range(2000):
        ema.update(model)
    assert ema.current_decay() == 0.99
    torch.testing.assert_close(ema.model.weight, model.weight.detach())
    restored = EMA(torch.nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2001 and restored.decay == 0.99
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(model, decay=1.0)


def test_classifier_round_trip_and_errors(tmp_path):
    model = ShapeClassifier(width=8).eval()
    save_classifier(model, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    with pytest.raises(ValueError, match=r"expects images of shape \[N, 3, 32, 32\]"):
        model(torch.zeros(1, 3, 16, 16))
    weights = {k: v for k, v in model.state_dict().items() if k != "head.bias"}
    save_file(weights, str(tmp_path / "clf" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        load_classifier(tmp_path / "clf")
    with pytest.raises(FileNotFoundError, match="no classifier config"):
        load_classifier(tmp_path / "nothing")


def test_loss_plot_from_run_logs(tmp_path):
    pytest.importorskip("matplotlib")
    from fastdiff.training.plot import plot_losses, smooth

    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    with pytest.raises(FileNotFoundError, match="no <stage>_log.csv"):
        plot_losses(tmp_path, tmp_path / "loss.png")
    rows = "\n".join(f"{step},{1.0 / step:.6f},0.001,0.0" for step in range(1, 101))
    (tmp_path / "unet_log.csv").write_text("step,loss,learning_rate,seconds\n" + rows + "\n")
    assert plot_losses(tmp_path, tmp_path / "loss.png") == ["unet"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_plot_command_errors_and_titles(tmp_path, capsys):
    """The script's errors were tracebacks, it replaced an existing PNG without asking, and it
    titled an epsilon-trained U-Net "v-prediction"."""
    pytest.importorskip("matplotlib")
    from fastdiff.training.plot import main, unet_title

    rows = "\n".join(f"{step},{1.0 / step:.6f},0.001,0.0" for step in range(1, 11))
    (tmp_path / "unet_log.csv").write_text("step,loss,learning_rate,seconds\n" + rows + "\n")
    out = tmp_path / "loss.png"
    out.write_bytes(b"earlier work")
    for args, message in (
        ([str(tmp_path / "nowhere"), str(out)], "run folder not found"),
        ([str(tmp_path), str(tmp_path / "missing" / "x.png")], "output directory does not exist"),
        ([str(tmp_path), str(out)], "loss.png already exists; pass --overwrite"),
        ([str(tmp_path), str(tmp_path / "loss.jpg")], "must name a .png file"),
    ):
        assert main(args) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, error
    assert out.read_bytes() == b"earlier work"
    assert main([str(tmp_path), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "vae_log.csv").write_text("not,a,log\n1,2,3\n")
    assert main([str(tmp_path), str(out), "--overwrite"]) == 2
    assert "vae_log.csv is not a training loss log" in capsys.readouterr().err
    assert unet_title(tmp_path) == "U-Net (diffusion loss)"  # no metrics.json
    for prediction, gamma, title in (
        ("epsilon", 5.0, "U-Net (Min-SNR-weighted ε-prediction MSE)"),
        ("v_prediction", None, "U-Net (v-prediction MSE)"),
    ):
        config = {"unet": {"prediction_type": prediction, "min_snr_gamma": gamma}}
        (tmp_path / "metrics.json").write_text(json.dumps({"config": config}))
        assert unet_title(tmp_path) == title
