"""Data-parallel training: two CPU processes on gloo (launched by torchrun) reach the same weights
as one process on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import torch

from fastdiff.training.checkpoint import load_checkpoint
from fastdiff.training.config import config_from_dict
from fastdiff.training.distributed import DistContext
from fastdiff.training.run import run_training


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_cpu_processes_match_one_process(tmp_path, tiny_config_dict):
    values = dict(tiny_config_dict)
    # No augmentation noise: then the loss of a global batch is the mean of the two ranks'
    # half-batch losses, and the all-reduced gradient equals the single-process gradient.
    values["classifier"] = {**values["classifier"], "noise_std": 0.0}
    values["stages"] = ["classifier"]
    ddp_values = {**values, "output_dir": str(tmp_path / "ddp")}
    config_path = tmp_path / "ddp.json"
    config_path.write_text(json.dumps(ddp_values))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTDIFF_BACKEND": "eager"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "fastdiff",
        "train",
        "--config",
        str(config_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single = config_from_dict({**values, "output_dir": str(tmp_path / "single")})
    run_training(single, context=DistContext(rank=0, world_size=1, device=torch.device("cpu")))

    ddp = load_checkpoint(tmp_path / "ddp" / "classifier_checkpoint.pt")
    one = load_checkpoint(tmp_path / "single" / "classifier_checkpoint.pt")
    assert ddp["step"] == one["step"] == 6
    ddp_weights = torch.cat([value.flatten() for value in ddp["model"].values()])
    one_weights = torch.cat([value.flatten() for value in one["model"].values()])
    difference = (ddp_weights - one_weights).abs()
    # The all-reduced gradients equal the single-process ones up to summation order. Adam divides
    # by sqrt(v), so a gradient element that is itself at rounding level can move by up to the
    # learning rate either way; every other element must agree to float rounding.
    assert (difference < 1e-5).float().mean() > 0.995
    assert difference.max() <= 2 * single.classifier.learning_rate * single.classifier.steps
    assert (tmp_path / "ddp" / "pipeline" / "classifier" / "model.safetensors").exists()
    ddp_log = (tmp_path / "ddp" / "classifier_log.csv").read_text().splitlines()
    one_log = (tmp_path / "single" / "classifier_log.csv").read_text().splitlines()
    assert len(ddp_log) == len(one_log) == 7
    first_ddp, first_one = float(ddp_log[1].split(",")[1]), float(one_log[1].split(",")[1])
    assert abs(first_ddp - first_one) < 1e-5  # the logged loss is the mean over both ranks
