"""``Pipeline``: conditioning -> sampler over the U-Net -> VAE decode -> images.

The stages are separate methods so that a faster runtime can replace one without touching the
others: ``encode_conditioning`` (text or class inputs), ``unet_forward`` (one U-Net call on a
condition dict), ``build_model_fn`` (the guided model function a sampler calls), ``denoise`` (the
sampling loop), ``decode_latents`` / ``encode_moments`` (the VAE).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastdiff.models.context_groups import repeat_batch
from fastdiff.models.embeddings import guidance_scale_embedding
from fastdiff.models.vae import DiagonalGaussian
from fastdiff.pipeline import images as image_utils
from fastdiff.pipeline import inpainting, mask_crop
from fastdiff.pipeline.call_arguments import (
    CallDefaults,
    as_float,
    check_choices,
    check_latents,
    guidance_rescale_value,
    guidance_scale_value,
    make_generator,
    starting_noise,
)
from fastdiff.pipeline.components import (
    PipelineComponents,
    check_aesthetics_score,
    check_latent_channels,
    default_image_size,
    is_inpainting_unet,
    load_components,
)
from fastdiff.pipeline.conditioning import Condition, Conditioning, encode_inputs
from fastdiff.pipeline.denoising import run_sampler, run_start
from fastdiff.pipeline.inpainting import INPAINT_KEY
from fastdiff.pipeline.micro_conditioning import (
    add_time_ids,
    aesthetic_scores,
    check_size_options,
)
from fastdiff.pipeline.text_encoding import PromptEncoder
from fastdiff.pipeline.vae_scaling import (
    ALL_LATENT_KEYS,
    from_vae_latents,
    latent_scaling,
    to_vae_latents,
    vae_run_dtype,
)
from fastdiff.sampling import KnownRegion, NoiseSchedule, classifier_free_guidance


class Pipeline:
    """Text- or class-conditional latent diffusion on fastdiff's own U-Net, VAE and samplers."""

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        schedule: NoiseSchedule,
        prompt_encoder: PromptEncoder | None = None,
        null_class_label: int | None = None,
        class_names: list[str] | None = None,
        force_zeros_for_empty_prompt: bool = False,
        defaults: CallDefaults | None = None,
        vae_latent_keys: tuple[str, ...] = ALL_LATENT_KEYS,
        requires_aesthetics_score: bool = False,
    ) -> None:
        """``requires_aesthetics_score``: an SDXL refiner's U-Net, conditioned on (original
        size, crop, aesthetic score) rather than (original size, crop, target size)."""
        check_latent_channels(unet.config, vae.config)
        check_aesthetics_score(unet.config, requires_aesthetics_score)
        self.unet = unet
        self.vae = vae
        self.schedule = schedule
        self.prompt_encoder = prompt_encoder
        self.class_names = class_names
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_aesthetics_score = requires_aesthetics_score
        self.defaults = CallDefaults() if defaults is None else defaults
        # Which of the VAE config's scaling keys apply (vae_scaling.LATENT_KEYS): those the
        # diffusers pipeline the folder names reads.
        self.vae_latent_keys = tuple(vae_latent_keys)
        self.vae_scale_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        vae_dtype = next(vae.parameters()).dtype
        if self.vae_dtype_for(vae_dtype) != vae_dtype:
            vae.to(torch.float32)
        num_class_embeds = unet.config.get("num_class_embeds")
        if num_class_embeds is not None and null_class_label is None:
            null_class_label = num_class_embeds - 1  # fastdiff's convention: the last label
        self.null_class_label = null_class_label

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device=None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        vae=None,
    ) -> Pipeline:
        """Load a diffusers-format pipeline folder (model_index.json, unet/, vae/, scheduler/, and
        text_encoder/ + tokenizer/ [+ text_encoder_2/ + tokenizer_2/] when present). ``vae``:
        another autoencoder to use instead of the folder's, a component folder (e.g. TAESD's
        ``AutoencoderTiny``, for fast decoding) or a loaded model, as diffusers' ``vae=``."""
        parts: PipelineComponents = load_components(
            folder, device=device, dtype=dtype, variant=variant, vae=vae
        )
        schedule = NoiseSchedule.from_config(parts.scheduler_config)
        return cls(
            parts.unet,
            parts.vae,
            schedule,
            prompt_encoder=parts.prompt_encoder,
            null_class_label=parts.null_class_label,
            class_names=parts.class_names,
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
            defaults=parts.defaults,
            vae_latent_keys=parts.vae_latent_keys,
            requires_aesthetics_score=parts.requires_aesthetics_score,
        )

    # -- properties -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def is_class_conditional(self) -> bool:
        return self.unet.config.get("num_class_embeds") is not None

    @property
    def is_inpainting(self) -> bool:
        """An inpainting U-Net: it takes a mask and the masked image's latents as well."""
        return is_inpainting_unet(self.unet.config, self.vae.config)

    @property
    def is_text_conditional(self) -> bool:
        return self.prompt_encoder is not None or not self.is_class_conditional

    @property
    def num_classes(self) -> int:
        """Real classes of a class-conditional model (the null class excluded), else 0."""
        return self.unet.config["num_class_embeds"] - 1 if self.is_class_conditional else 0

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) used when they are not given: the U-Net's ``sample_size`` (an int, or
        [height, width] as diffusers also reads it) times the VAE's scale factor."""
        return default_image_size(self.unet.config, self.vae_scale_factor)

    # -- stages -----------------------------------------------------------------------------

    def encode_conditioning(self, guided: bool, num_images: int, **inputs: Any) -> Conditioning:
        """Text and/or class inputs -> U-Net keyword inputs for the conditional (and, when guided,
        the unconditional) batch, each input repeated ``num_images`` times."""
        return encode_inputs(self, guided, num_images, **inputs)

    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """One U-Net call on a condition dict (see ``fastdiff.pipeline.conditioning``); an
        inpainting U-Net's mask and masked-image latents are stacked onto ``x`` here. ``x`` may
        have a fraction of the condition's batch (guided steps pass it once for
        [uncond; cond], eager and optimized: ``fastdiff.models.context_groups``)."""
        added = {key: cond[key] for key in ("text_embeds", "time_ids") if key in cond}
        if INPAINT_KEY in cond:
            nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            extra = cond[INPAINT_KEY]
            if extra.shape[0] != x.shape[0] and extra.shape[0] % x.shape[0] == 0:
                # channels given per row: the sample (and its timesteps) once per row
                groups = extra.shape[0] // x.shape[0]
                x = repeat_batch(x, groups)
                if torch.is_tensor(t) and t.dim() == 1 and t.shape[0] > 1:
                    t = repeat_batch(t, groups)
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
            x = x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        return self.unet(
            x,
            t,
            encoder_hidden_states=cond.get("encoder_hidden_states"),
            added_cond_kwargs=added or None,
            class_labels=cond.get("class_labels"),
            timestep_cond=cond.get("timestep_cond"),
        )

    def prepare_condition(self, cond: Condition) -> dict[str, Any]:
        """The condition with the work that does not change from step to step done: a folded
        U-Net's cross-attention keys and values of the text context, projected by one GEMM
        (``UNet.context_projections``). Steps that pass the result to ``unet_forward`` skip
        that GEMM. ``cond`` itself when there is nothing to do ahead."""
        context = cond.get("encoder_hidden_states")
        project = getattr(self.unet, "context_projections", None)
        if context is None or project is None:
            return cond
        projected = project(context)
        return cond if projected is context else {**cond, "encoder_hidden_states": projected}

    def prepared_forward(self) -> Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]:
        """``unet_forward`` for the steps of one generation, which pass one condition dict: its
        ``prepare_condition`` runs at the first step and is reused while the dict is the same."""
        prepared: list[tuple[Condition, dict[str, Any]]] = []

        def forward(x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
            if not prepared or prepared[0][0] is not cond:
                prepared[:] = [(cond, self.prepare_condition(cond))]
            return self.unet_forward(x, t, prepared[0][1])

        return forward

    def build_model_fn(
        self, conditioning: Conditioning, guidance_scale: float, guidance_rescale: float = 0.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The function a sampler calls: ``model_fn(x_t, t)`` -> U-Net output, guided when the
        conditioning carries an unconditional half (one batched forward over [uncond; cond],
        the latents passed once where the U-Net takes two contexts per sample). The
        condition's per-generation work is done once (``prepared_forward``)."""
        forward = self.prepared_forward()
        if conditioning.uncond is None:
            cond = conditioning.cond
            return lambda x, t: forward(x, t, cond)
        return classifier_free_guidance(
            forward,
            conditioning.cond,
            conditioning.uncond,
            guidance_scale,
            guidance_rescale=guidance_rescale,
            # the latents once for both halves, as the optimized runtime's guided steps
            shared_input=getattr(self.unet, "takes_context_groups", False),
        )

    def denoise(
        self,
        conditioning: Conditioning,
        noise: torch.Tensor,
        *,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        sampler: str = "ddim",
        steps: int = 20,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        init_latents: torch.Tensor | None = None,
        start_step: int = 0,
        end_step: int | None = None,
        add_noise: bool = True,
        progress: bool = True,
        known: KnownRegion | None = None,
        lcm_strength: float = 1.0,
        start_checked: bool = False,
    ) -> torch.Tensor:
        """The denoising loop: unit-variance ``noise`` (or, for img2img, ``init_latents`` noised
        to ``start_step``, or taken as they are with ``add_noise=False``) -> final latents (the
        state before plan step ``end_step`` when given); ``known``: the region kept at the image
        after each step (inpainting with a 4-channel U-Net); ``lcm_strength``: the lcm
        sampler's share of its schedule (``make_plan``); ``start_checked``: the start is known
        to be finite (``__call__``'s own draw or checked latents), so the optimized runtime
        skips its check, a host sync (the eager loop checks anyway). A faster runtime replaces this
        method as a whole; it receives the conditioning as U-Net keyword dicts, [uncond; cond]
        batched when guided."""
        model_fn = self.build_model_fn(conditioning, guidance_scale, guidance_rescale)
        return run_sampler(
            model_fn,
            noise,
            self.schedule,
            sampler=sampler,
            steps=steps,
            eta=eta,
            generator=generator,
            init_latents=init_latents,
            start_step=start_step,
            end_step=end_step,
            add_noise=add_noise,
            progress=progress,
            known=known,
            lcm_strength=lcm_strength,
        )

    @property
    def vae_scaling(self) -> dict:
        """The VAE config's latent-scaling values this folder's pipeline class applies (read per
        call: a later edit of the config takes effect)."""
        return latent_scaling(self.vae.config, self.vae_latent_keys)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> float32 images (B, 3, H, W) in [0, 1]."""
        weight = next(self.vae.parameters())  # latents returned earlier may lie elsewhere
        latents = latents.to(device=weight.device, dtype=weight.dtype)
        decoded = self.vae.decode(to_vae_latents(latents, self.vae_scaling))
        return image_utils.vae_output_to_unit_range(decoded)

    @torch.no_grad()
    def encode_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the encoder's posterior [mean | logvar], or a deterministic
        autoencoder's latents (AutoencoderTiny): the part a faster runtime replaces."""
        vae_dtype = next(self.vae.parameters()).dtype
        encoded = self.vae.encode(pixels.to(device=self.device, dtype=vae_dtype))
        return encoded if isinstance(encoded, torch.Tensor) else encoded.parameters

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images in [-1, 1] -> diffusion latents, sampled from the encoder's Gaussian (a
        deterministic autoencoder's latents as they are: no random draw, as in diffusers)."""
        if getattr(self.vae, "deterministic", False):
            return from_vae_latents(self.encode_moments(pixels), self.vae_scaling)
        posterior = DiagonalGaussian(self.encode_moments(pixels))
        return from_vae_latents(posterior.sample(generator), self.vae_scaling)

    def vae_graph_state(self) -> tuple:
        """What decoding and encoding decide on the host (the VAE's tiling and slicing, the
        latent scaling numbers): fastdiff.runtime captures a new VAE graph when it changes."""
        numbers = tuple(
            (key, tuple(value) if isinstance(value, (list, tuple)) else value)
            for key, value in self.vae_scaling.items()
        )
        return (*self.vae.graph_state(), numbers)

    def vae_dtype_for(self, dtype: torch.dtype | None) -> torch.dtype | None:
        """The dtype the VAE runs in when the models are cast to ``dtype`` (float32 for the
        SDXL VAE instead of float16: see ``vae_run_dtype``)."""
        return vae_run_dtype(self.unet.config, self.vae.config, dtype)

    def load_lora_weights(
        self, source: str | Path | dict[str, torch.Tensor], scale: float = 1.0
    ) -> int:
        """Fuse LoRA weights into the U-Net and text encoders, as diffusers'
        ``load_lora_weights`` then ``fuse_lora(lora_scale=scale)`` do; ``source``: a
        .safetensors (or .bin) file, a folder holding ``pytorch_lora_weights.safetensors`` (or
        ``.bin``), or a state dict. Several LoRAs add up; ``unload_lora_weights`` restores the
        weights. After ``optimize()`` the updates land in the fused projections' rows in place,
        so captured graphs replay with them (no new capture). Returns the number of layers
        patched (``fastdiff.pipeline.lora``)."""
        from fastdiff.pipeline.lora import fuse_lora

        if not hasattr(self, "lora_fusion"):
            from fastdiff.models.lora import LoraFusion

            self.lora_fusion = LoraFusion()
        return fuse_lora(self, self.lora_fusion, source, scale)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on the U-Net (``UNet2DConditionModel.enable_freeu``), as diffusers'
        ``pipe.enable_freeu``; after ``optimize()`` the graphs of the new setting are captured
        anew (their key has it)."""
        self.unet.enable_freeu(s1, s2, b1, b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def load_textual_inversion(self, source, token: str | None = None) -> str:
        """Add a textual inversion embedding (a .safetensors / .bin file, a folder holding
        ``learned_embeds.*``, a state dict or a tensor) to the tokenizers and text encoders,
        as diffusers' ``load_textual_inversion`` does; ``token``: the word prompts use for it
        (default: the one the file names). SDXL files (``clip_l`` and ``clip_g``) load into
        both encoders. Returns the token (``fastdiff.pipeline.textual_inversion``)."""
        from fastdiff.pipeline import textual_inversion

        return textual_inversion.load(self, source, token)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None) -> list[str]:
        """Remove textual inversions (None: all of them); returns the tokens removed."""
        from fastdiff.pipeline import textual_inversion

        return textual_inversion.unload(self, tokens)

    def unload_lora_weights(self) -> int:
        """Restore the weights LoRAs were fused into; returns how many."""
        fusion = getattr(self, "lora_fusion", None)
        return 0 if fusion is None else fusion.restore()

    def optimize(self, **options: Any):
        """Prepare this pipeline for speed in place (fp16, channels-last, fused QKV, Triton
        kernels, CUDA graphs); returns the runtime. See ``fastdiff.runtime.optimize``."""
        from fastdiff.runtime import optimize  # the runtime sits below the pipeline, loaded late

        return optimize(self, **options)

    # -- the call ---------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        sampler: str | None = None,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        image=None,
        strength: float | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        clip_skip: int | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        mask_image=None,
        padding_mask_crop: int | None = None,
        **sizes: tuple[int, int] | None,
    ):
        """Generate images. Returns a list of PIL images (``output_type="pil"``), a float32 tensor
        (B, 3, H, W) in [0, 1] (``"tensor"``), a float32 numpy array (B, H, W, 3) in [0, 1]
        (``"np"``, as diffusers' output_type="np") or the final scaled latents (``"latent"``).

        ``guidance_scale <= 1`` disables classifier-free guidance (a single forward per step);
        a guidance-distilled U-Net (``time_cond_proj_dim``: latent consistency models) takes the
        scale in its time embedding instead, one forward per step, as diffusers runs it;
        ``num_inference_steps`` left at None takes ``self.defaults`` (20; 4 for
        LatentConsistencyModelPipeline folders);
        ``guidance_scale``, ``sampler`` and ``strength`` left at None take ``self.defaults``
        (``CallDefaults.for_folder``: those of the diffusers pipeline and scheduler the folder
        names, e.g. guidance 5.0, Euler and strength 0.3 for an SDXL base folder).
        With ``image`` (img2img, SDEdit: Meng et al. 2022) the image is encoded, noised by the
        forward process to the step that ``strength`` selects, and only the remaining
        ``int(num_inference_steps * strength)`` steps are sampled.
        As in diffusers: ``prompt_2`` / ``negative_prompt_2`` go to SDXL's second text encoder,
        ``clip_skip`` takes an earlier layer's hidden state for the prompt, and SDXL's
        micro-conditioning takes ``original_size``, ``crops_coords_top_left``, ``target_size``
        and their ``negative_*`` forms (``fastdiff.pipeline.micro_conditioning.add_time_ids``); an
        SDXL refiner (``requires_aesthetics_score``) takes ``aesthetic_score`` and
        ``negative_aesthetic_score`` (default 6.0 and 2.5) in place of the target sizes.
        ``denoising_end`` (a fraction of the schedule) stops early and returns the still noisy
        state (``output_type="latent"``), which a second call takes as ``image=`` with the same
        fraction as ``denoising_start`` to run the rest: SDXL's base-then-refiner hand-over,
        with the steps cut as diffusers' SDXL pipelines cut them. ``image`` may be latents
        (B, latent channels, h, w), as in diffusers: not encoded, and with ``denoising_start``
        not noised.
        ``image`` with ``mask_image`` (white: repaint; ``fastdiff.pipeline.inpainting``)
        inpaints: an inpainting U-Net (9 input channels) reads the mask, another U-Net has the
        kept region blended back after each step, as diffusers' inpainting pipelines do for
        each. ``strength`` defaults to 1.0 (from pure noise; 0.9999 for SDXL folders, as
        StableDiffusionXLInpaintPipeline), and the size to the folder's default unless
        ``height``/``width`` are given, as diffusers does (PIL inputs are resized to it; a
        tensor or array of another size is refused rather than resized).
        ``padding_mask_crop`` (pixels) inpaints only the box around the mask, widened by that
        padding, at the model's size, and pastes the result back into the (PIL) image, as
        diffusers does (``fastdiff.pipeline.mask_crop``).
        """
        # numpy integers as ints (check_size and check_choices refuse anything else, bools too)
        height, width, num_images = (
            int(value)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool)
            else value
            for value in (height, width, num_images)
        )
        text_time = self.unet.config.get("addition_embed_type") == "text_time"
        check_size_options(sizes, text_time)
        scores = aesthetic_scores(
            self.requires_aesthetics_score, aesthetic_score, negative_aesthetic_score
        )
        sampler = self.defaults.sampler if sampler is None else sampler
        check_choices(sampler, output_type, num_images)
        generator = make_generator(seed, generator, self.device)
        if guidance_scale is None:
            inpainting_call = mask_image is not None
            guidance_scale = (
                self.defaults.inpaint_guidance_scale
                if inpainting_call
                else self.defaults.guidance_scale
            )
        if num_inference_steps is None:
            num_inference_steps = self.defaults.num_inference_steps
        guidance_scale = guidance_scale_value(guidance_scale)
        guidance_rescale = guidance_rescale_value(guidance_rescale)
        check_latents(latents)
        # (the plan's float() would take "0.5" and True; its range is checked there)
        if not isinstance(as_float(eta), float):
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        eta = as_float(eta)
        embedded_guidance = self.unet.config.time_cond_proj_dim is not None
        if embedded_guidance and guidance_rescale > 0.0:
            raise ValueError(
                "guidance_rescale rescales classifier-free guidance, which this U-Net does not "
                "run: it takes the guidance scale in its time embedding (time_cond_proj_dim)"
            )
        guided = guidance_scale > 1.0 and not embedded_guidance
        conditioning = self.encode_conditioning(
            guided,
            num_images,
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            class_labels=class_labels,
            prompt_2=prompt_2,
            negative_prompt_2=negative_prompt_2,
            clip_skip=clip_skip,
        )
        batch = conditioning.batch_size
        if embedded_guidance:  # one forward per step, w - 1 embedded, as diffusers passes it
            scales = torch.full((batch,), guidance_scale - 1.0, dtype=torch.float32)
            embedding = guidance_scale_embedding(scales, self.unet.config.time_cond_proj_dim)
            conditioning.cond["timestep_cond"] = embedding.to(self.device, self.dtype)

        inpaint_mode = inpainting.check_inputs(
            self, image, mask_image, latents, (denoising_start, denoising_end)
        )
        inpaint = inpaint_mode is not None
        cropped = None  # (box, image, mask) of a padding_mask_crop call, to paste back
        if padding_mask_crop is not None:
            if not inpaint:
                raise ValueError("padding_mask_crop needs mask_image (inpainting)")
            pad = mask_crop.check_inputs(padding_mask_crop, image, mask_image, output_type)
            # A 16-bit mask in 8 bits before its box, cut and overlay read it through
            # convert("L"), which would clip it (as mask_to_tensor does for other calls).
            mask_image = image_utils.eight_bit_gray(mask_image)
            default_height, default_width = self.default_size
            height, width = height or default_height, width or default_width
            box = mask_crop.crop_region(mask_image, width, height, pad)
            cropped = (box, image, mask_image)
            image, mask_image = mask_crop.cut(image, mask_image, box, width, height)
        start = run_start(
            self,
            image,
            latents,
            strength,
            (denoising_start, denoising_end),
            inpaint,
            (height, width),
            (sampler, num_inference_steps),
        )
        height, width, init_latents = start.height, start.width, None
        if height is None or width is None:
            default_height, default_width = self.default_size
            height = default_height if height is None else height
            width = default_width if width is None else width
        image_utils.check_size(height, width, self.vae_scale_factor)
        if text_time:
            add_time_ids(
                conditioning, height, width, self.unet.config, sizes, scores, image is not None
            )
        from_noise = inpaint and start.strength == 1.0  # pure noise: no init latents
        image_latents = None  # the image's, also when the run starts from pure noise (blend)
        if image is not None and (not from_noise or inpaint_mode == inpainting.BLEND):
            if start.given_latents is None:  # encode each image once (as diffusers does)
                image_latents = self.encode_image(start.pixels, generator).to(self.dtype)
            else:
                image_latents = start.given_latents.to(device=self.device, dtype=self.dtype)
            image_latents = image_utils.fit_batch(image_latents, batch, num_images)
            init_latents = None if from_noise else image_latents

        shape = (
            batch,
            self.vae.config["latent_channels"],
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        add_noise = denoising_start is None
        if add_noise:
            noise = starting_noise(latents, shape, self.vae_scale_factor, generator)
        else:  # a hand-over's latents are the start: no noise drawn, as in diffusers
            noise = torch.zeros(shape)
        noise = noise.to(device=self.device, dtype=self.dtype)
        known = None
        if inpaint_mode == inpainting.UNET:  # after the noise, as diffusers draws them
            stacked = inpainting.stacked_latents(
                self, start.pixels, mask_image, shape, generator, num_images
            )
            conditioning.cond[INPAINT_KEY] = stacked
            if conditioning.uncond is not None:
                conditioning.uncond[INPAINT_KEY] = stacked
        elif inpaint_mode == inpainting.BLEND:
            known = inpainting.known_region(
                self, start.pixels, mask_image, image_latents, noise, generator, num_images
            )

        result = self.denoise(
            conditioning,
            noise,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            sampler=sampler,
            steps=num_inference_steps,
            eta=eta,
            generator=generator,
            init_latents=init_latents,
            start_step=start.start_step,
            end_step=start.end_step,
            add_noise=add_noise,
            progress=progress,
            known=known,
            lcm_strength=start.lcm_strength,
            start_checked=True,  # drawn here, or from inputs checked above
        )
        if output_type == "latent":
            return result
        pixels = self.decode_latents(result)
        if output_type == "tensor":
            return pixels
        # Copied to the host for np and PIL anyway: checked there, at no extra sync. The eager
        # loop stops at a step whose model output is not finite; the optimized runtime checks no
        # step (a host sync each), and a NaN image became black pixels without a word.
        pixels = pixels.cpu()
        if not bool(torch.isfinite(pixels).all()):
            raise RuntimeError(
                "the generated images contain NaN or inf: the model output or the VAE diverged "
                "(the eager pipeline names the step; an optimized one checks the images only)"
            )
        if output_type == "np":
            return pixels.permute(0, 2, 3, 1).numpy()
        images = image_utils.tensor_to_pil(pixels)
        if cropped is not None:
            images = [
                mask_crop.paste_back(generated, *cropped[1:], cropped[0]) for generated in images
            ]
        return images
