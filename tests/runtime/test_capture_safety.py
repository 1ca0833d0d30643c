"""What a CUDA graph captures must never read a tensor value on the host (``.item()``, ``bool()``
of a tensor, ``nonzero``) or build tensors from host data: either fails or is baked into the
graph. The capture bodies (denoising loop with the real U-Net, the fused step, the VAE decode) run
here on CPU under a dispatch mode that rejects exactly those operations."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff.runtime as runtime
from fastdiff.runtime.graphs import EagerReplay

HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), float(t), bool(t), if t: ...
    torch.ops.aten.nonzero.default,  # data-dependent output shape
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.lift_fresh.default,  # torch.tensor(host data)
}


class HostReadError(AssertionError):
    pass


class RejectHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS or func.overloadpacket in {op.overloadpacket for op in HOST_READS}:
            raise HostReadError(f"{func} inside a graph body")
        return func(*args, **(kwargs or {}))


class CheckingReplay(EagerReplay):
    def replay(self) -> None:
        with RejectHostReads():
            self.body()


class CaptureCheckingBackend:
    """Eager 'capture' that fails like a real capture would on a host read."""

    def __init__(self):
        self.captures = 0

    def capture(self, body, prepare):
        prepare()
        with RejectHostReads():
            body()
        self.captures += 1
        return CheckingReplay(body), 0


def test_checker_catches_item():
    backend = CaptureCheckingBackend()
    x = torch.ones(2)
    with pytest.raises(HostReadError):
        backend.capture(lambda: x.add_(float(x.sum())), lambda: None)


@pytest.mark.parametrize(
    "steps, eta", [(3, 0.0), (10, 0.0), (3, 0.5)], ids=["loop", "step", "loop-noise"]
)
def test_pipeline_bodies_have_no_host_reads(pipe, steps, eta):
    backend = CaptureCheckingBackend()
    pipe.optimize(backend=backend, verbose=False)
    images = pipe(
        prompt_embeds=torch.randn(1, 7, 32),
        negative_prompt_embeds=torch.randn(1, 7, 32),
        num_inference_steps=steps,
        eta=eta,
        seed=1,
        output_type="tensor",
        progress=False,
    )
    assert images.shape == (1, 3, 16, 16)
    assert backend.captures == 2  # the denoising graph and the decoder graph


def test_sdxl_text_time_body_has_no_host_reads(sdxl_pipe):
    backend = CaptureCheckingBackend()
    runtime.optimize(sdxl_pipe, backend=backend, verbose=False)
    sdxl_pipe(
        prompt_embeds=torch.randn(1, 7, 32),
        negative_prompt_embeds=torch.randn(1, 7, 32),
        pooled_prompt_embeds=torch.randn(1, 32),
        negative_pooled_prompt_embeds=torch.randn(1, 32),
        num_inference_steps=2,
        output_type="latent",
        progress=False,
    )
    assert backend.captures == 1


def test_vae_decode_with_per_channel_latent_stats_has_no_host_copies(pipe):
    """latents_mean/latents_std VAEs (SDXL derivatives): the per-channel tensors must not be
    built from the host config inside the decoder graph (an H2D copy is illegal in a capture)."""
    pipe.vae.config.latents_mean = [0.1, -0.2, 0.3, 0.0]
    pipe.vae.config.latents_std = [1.1, 0.9, 1.2, 1.0]
    backend = CaptureCheckingBackend()
    rt = pipe.optimize(backend=backend, verbose=False)
    pipe(
        prompt_embeds=torch.randn(1, 7, 32),
        negative_prompt_embeds=torch.randn(1, 7, 32),
        num_inference_steps=2,
        seed=1,
        output_type="tensor",
        progress=False,
    )
    assert not rt.decoder.eager_fallbacks
    assert backend.captures == 2
