"""A U-Net call with several contexts per sample (``fastdiff.models.context_groups``): the
same output as the call with every sample repeated, and the blocks before the first
cross-attention run on the samples alone."""

from __future__ import annotations

import pytest
import torch

from fastdiff.models import UNet2DConditionModel
from fastdiff.models.resnet import ResnetBlock2D
from fastdiff.models.transformer import BasicTransformerBlock
from fastdiff.pipeline.inpainting import INPAINT_KEY
from tests.runtime.conftest import tiny_pipeline

LAYOUTS = [
    pytest.param(torch.contiguous_format, id="nchw"),
    pytest.param(torch.channels_last, id="nhwc"),
]


def tiny_unet(config: str = "tiny_sd15_unet", **overrides) -> UNet2DConditionModel:
    from model_configs import model_config

    torch.manual_seed(0)
    return UNet2DConditionModel({**model_config(config), **overrides}).eval()


def repeated(x: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.cat([x] * groups)


class BatchRecorder:
    """The batch each module of interest ran on, in call order."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.calls: list[tuple[str, int]] = []
        first_block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
        first_resnet = next(m for m in unet.modules() if isinstance(m, ResnetBlock2D))
        watched = {
            "conv_in": unet.conv_in,
            "resnet0": first_resnet,
            "attn1": first_block.attn1,
            "attn2": first_block.attn2,
            "conv_out": unet.conv_out,
        }
        for name, module in watched.items():
            module.register_forward_pre_hook(
                lambda mod, args, name=name: self.calls.append((name, args[0].shape[0]))
            )

    def first(self, name: str) -> int:
        return next(batch for seen, batch in self.calls if seen == name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
@pytest.mark.parametrize("batch,groups", [(1, 2), (2, 2), (1, 3)])
def test_groups_equal_the_repeated_samples(layout, fold, batch, groups):
    """Output row g·B + i is the U-Net on sample i with context g·B + i, as with the samples
    repeated; conv_in, the first ResNet block and the first self-attention run on the B
    samples, the cross-attention on every row."""
    unet = tiny_unet().to(memory_format=layout)
    unet.fold_conv_biases(fold)
    sample = torch.randn(batch, 4, 16, 16).contiguous(memory_format=layout)
    context = torch.randn(groups * batch, 77, unet.config.cross_attention_dim)
    timestep = torch.tensor([10] * batch)
    with torch.no_grad():
        want = unet(repeated(sample, groups), repeated(timestep, groups), context)
        recorder = BatchRecorder(unet)
        got = unet(sample, timestep, context)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=layout)
    rows = groups * batch
    assert [recorder.first(name) for name in ("conv_in", "resnet0", "attn1", "attn2")] == [
        batch,
        batch,
        batch,
        rows,
    ]
    assert recorder.first("conv_out") == rows


def test_a_context_given_once_per_sample_changes_nothing():
    unet = tiny_unet()
    sample = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        recorder = BatchRecorder(unet)
        out = unet(sample, 10, context)
    assert out.shape[0] == 2 and {batch for _, batch in recorder.calls} == {2}


def test_time_inputs_given_per_row_repeat_the_samples_up_front():
    """Class labels (or a timestep, or SDXL's pooled text) with one row per context: the
    samples are repeated before anything runs, and the result is the repeated call's."""
    unet = tiny_unet(num_class_embeds=4)
    sample = torch.randn(2, 4, 16, 16)
    context = torch.randn(4, 77, unet.config.cross_attention_dim)
    labels = torch.tensor([3, 3, 0, 1])  # [null, null; class 0, class 1]
    timesteps = torch.tensor([10, 20])  # per sample: repeated with it
    with torch.no_grad():
        want = unet(repeated(sample, 2), repeated(timesteps, 2), context, class_labels=labels)
        recorder = BatchRecorder(unet)
        got = unet(sample, timesteps, context, class_labels=labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert recorder.first("conv_in") == 4
        # timesteps per row differing between the halves
        per_row = torch.tensor([10, 20, 30, 40])
        want = unet(repeated(sample, 2), per_row, context, class_labels=labels)
        torch.testing.assert_close(
            unet(sample, per_row, context, class_labels=labels), want, rtol=1e-5, atol=1e-5
        )


def test_sdxl_added_conditions_per_row_or_per_sample():
    unet = tiny_unet("tiny_sdxl_unet")
    sample = torch.randn(1, 4, 16, 16)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]])
    # pooled text per sample (shared), per row (CFG's halves) with the time ids per row or
    # per sample (repeated with the sample)
    for text_rows, id_rows in ((1, 1), (2, 2), (2, 1)):
        added = {
            "text_embeds": torch.randn(text_rows, pooled),
            "time_ids": time_ids.expand(id_rows, -1),
        }
        with torch.no_grad():
            want = unet(
                repeated(sample, 2),
                10,
                context,
                added_cond_kwargs={
                    "text_embeds": added["text_embeds"].expand(2, -1),
                    "time_ids": time_ids.expand(2, -1),
                },
            )
            recorder = BatchRecorder(unet)
            got = unet(sample, 10, context, added_cond_kwargs=added)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert recorder.first("conv_in") == (1 if text_rows == 1 else 2)


@pytest.mark.parametrize(
    "sample_batch,context_batch,timestep,message",
    [
        (2, 3, 10, "encoder_hidden_states has batch 3: it must be the sample's batch 2"),
        (2, 4, torch.tensor([1, 2, 3]), "timestep has batch 3: it must be 1, the sample's batch 2"),
    ],
)
def test_batches_that_do_not_divide_are_refused(sample_batch, context_batch, timestep, message):
    unet = tiny_unet()
    sample = torch.randn(sample_batch, 4, 16, 16)
    context = torch.randn(context_batch, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        unet(sample, timestep, context)


def test_guided_pipeline_passes_the_latents_once():
    """The eager pipeline's guided steps: the latents once, the [uncond; cond] contexts, the
    output's two halves; an inpainting U-Net's extra channels (given per row) repeat them."""
    for inpainting in (False, True):
        pipe = tiny_pipeline(inpainting=inpainting)
        recorder = BatchRecorder(pipe.unet)
        cond = {"encoder_hidden_states": torch.randn(2, 7, 32)}
        if inpainting:
            cond[INPAINT_KEY] = torch.randn(2, 5, 8, 8)
        model_fn = pipe.build_model_fn(
            type("Conditioning", (), {"cond": cond, "uncond": cond})(), 7.5
        )
        with torch.no_grad():
            out = model_fn(torch.randn(2, 4, 8, 8), torch.tensor([500, 500]))
        assert out.shape == (2, 4, 8, 8)
        assert recorder.first("conv_in") == (4 if inpainting else 2)
        assert recorder.first("conv_out") == 4


@pytest.mark.gpu
@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
def test_cuda_fp16_groups_within_the_tolerance_rule(fold):
    """The SD1.5 architecture's first blocks at 64x64 on the GPU (fp16, channels-last, fused
    QKV, the auto backend, as optimize() runs them) with the latents once: against the float32
    call with them repeated, within the tolerance rule of the fp16 repeated call (cuDNN and the
    kernels may pick other algorithms at batch 1)."""
    from fastdiff.ops import use_backend
    from tests.models.test_models_gpu import SD15_CONFIG

    with torch.device("cuda"):
        torch.manual_seed(0)
        model = UNet2DConditionModel(SD15_CONFIG).eval()
    sample = torch.randn(1, 4, 64, 64, device="cuda")
    context = torch.randn(2, 77, 768, device="cuda")
    timestep = torch.tensor([981], device="cuda")
    with torch.no_grad():
        reference = model(repeated(sample, 2), repeated(timestep, 2), context)
        model = model.half().to(memory_format=torch.channels_last)
        model.fuse_qkv_projections()
        model.fold_conv_biases(fold)
        half = sample.half().contiguous(memory_format=torch.channels_last)
        with use_backend("auto"):
            recorder = BatchRecorder(model)
            grouped = model(half, timestep, context.half())
            repeated_rows = model(repeated(half, 2), repeated(timestep, 2), context.half())
    assert recorder.first("attn1") == 1 and recorder.first("attn2") == 2
    assert torch.isfinite(grouped).all()

    def relative(value):
        return ((value.float() - reference).norm() / reference.norm()).item()

    assert relative(grouped) <= 2 * relative(repeated_rows) + 1e-3, (
        relative(grouped),
        relative(repeated_rows),
    )
