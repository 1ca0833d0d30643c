"""Tiny random-weight pipeline folders for the pipeline and CLI tests, written by diffusers' own
``save_pretrained`` (diffusers and transformers are test-only references). Nothing is downloaded:
the CLIP tokenizer gets a small hand-written vocabulary (letters, a few whole words)."""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path

import torch

TOKENIZER_LENGTH = 16
WORDS = ("cat", "dog", "red", "blue", "a", "photo", "of")
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
UNET_BLOCKS = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=8,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=4,
    layers_per_block=1,
    sample_size=16,
)


def tiny_tokenizer():
    """A CLIP BPE tokenizer over single letters plus whole-word merges for a few words."""
    from transformers import CLIPTokenizer

    vocab = ["<|startoftext|>", "<|endoftext|>"]
    vocab += list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = []
    for word in WORDS:
        # Merge left to right: c+a -> ca, ca+t</w> -> cat</w>.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=merges,
        model_max_length=TOKENIZER_LENGTH,
    )


def tiny_text_encoder(vocab_size: int, hidden_size: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_LENGTH,
        projection_dim=hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE).eval()


def make_sd_folder(
    path: Path, sd2: bool = False, inpainting: bool = False, lcm: bool = False
) -> Path:
    """An SD1-like text-to-image folder: CLIP text encoder, cross-attention U-Net, DDIM. With
    ``sd2``: SD 2.x-like, linear transformer projections and v-prediction. With ``inpainting``:
    a StableDiffusionInpaintPipeline folder whose U-Net takes 9 channels (latents, mask,
    masked-image latents). With ``lcm``: a LatentConsistencyModelPipeline folder, its U-Net
    taking the guidance-scale embedding (time_cond_proj_dim), and LCMScheduler."""
    from diffusers import (
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        in_channels=9 if inpainting else 4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=sd2,
        time_cond_proj_dim=16 if lcm else None,
        **UNET_BLOCKS,
    ).eval()
    prediction_type = "v_prediction" if sd2 else "epsilon"
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    scheduler = DDIMScheduler(prediction_type=prediction_type, **SCHEDULER)
    if lcm:
        pipeline_class = LatentConsistencyModelPipeline
        scheduler = LCMScheduler(prediction_type=prediction_type, **SCHEDULER)
    pipe = pipeline_class(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_sdxl_unet(in_channels: int, text_width: int, time_ids: int, **extra):
    """A text_time U-Net taking ``text_width``-wide token embeddings and a 32-wide pooled one
    with ``time_ids`` micro-conditioning ids of 8 features each."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + time_ids * 8,
        **UNET_BLOCKS,
        **extra,
    ).eval()


def make_sdxl_folder(path: Path, inpainting: bool = False) -> Path:
    """An SDXL-like folder: two text encoders (the second with projection), text_time U-Net;
    with ``inpainting`` a 9-channel U-Net in a StableDiffusionXLInpaintPipeline folder."""
    from diffusers import DDIMScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    tokenizer = tiny_tokenizer()
    # both encoders' hidden states concatenated (32 + 32), two transformer layers in the second
    unet = tiny_sdxl_unet(9 if inpainting else 4, 64, 6, transformer_layers_per_block=(1, 2))
    pipeline_class = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
    pipe = pipeline_class(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(len(tokenizer)),
        text_encoder_2=tiny_text_encoder(len(tokenizer), with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        scheduler=DDIMScheduler(**SCHEDULER),
    )
    pipe.save_pretrained(path)
    return path


def make_sdxl_refiner_folder(path: Path) -> Path:
    """An SDXL-refiner-like folder: only the second text encoder (with projection), a text_time
    U-Net conditioned on (original size, crop, aesthetic score), requires_aesthetics_score."""
    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline

    unet = tiny_sdxl_unet(4, 32, 5)  # text_encoder_2's hidden states alone; 5 ids with the score
    tokenizer = tiny_tokenizer()
    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=unet,
        vae=tiny_vae(),
        text_encoder=None,
        text_encoder_2=tiny_text_encoder(len(tokenizer), with_projection=True),
        tokenizer=None,
        tokenizer_2=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(path)
    return path


def make_class_folder(path: Path, num_classes: int = 3) -> Path:
    """A class-conditional latent model as fastdiff's trainer ships it: no text encoder,
    num_class_embeds = classes + 1 with the last label as the null (unconditional) class."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        num_class_embeds=num_classes + 1,
        **UNET_BLOCKS,
    ).eval()
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet")
    tiny_vae().save_pretrained(path / "vae")
    DDIMScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    index = {
        "_class_name": "FastdiffClassConditionalPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "null_class_label": num_classes,
        "class_names": [f"class-{index}" for index in range(num_classes)],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def save_peft_lora(sd_folder: Path, out: Path, config) -> None:
    """A LoRA as diffusers writes one: ``config`` (a peft ``LoraConfig``) added to the folder's
    U-Net, its up factors drawn (seed 1; a fresh adapter's are zero), saved by
    ``save_lora_weights`` with the adapter config in the file's metadata."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    trained = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    trained.unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in trained.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(trained.unet),
        unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict(),
    )


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: the tiny models here are dominated by thread overhead, and CI
    shares its cores between test processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class UNetCallCounter:
    """Wraps a pipeline's U-Net to record the batch size of every forward's output (a guided
    call's [uncond; cond] rows, whether the latents were passed once or twice)."""

    def __init__(self, pipe) -> None:
        self.batches: list[int] = []
        self.original = pipe.unet.forward

        def counting_forward(sample, *args, **kwargs):
            out = self.original(sample, *args, **kwargs)
            self.batches.append(out.shape[0])
            return out

        pipe.unet.forward = counting_forward
