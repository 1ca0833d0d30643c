"""The denoising loop on static buffers, captured as CUDA graphs.

One body implements a sampler step for every sampler, because every sampler is a ``SamplingPlan``
(see ``fastdiff/sampling/plan.py``): the plan row and the timestep are read from device tensors at a
step index that is itself a device tensor, incremented inside the body. The same body therefore

* unrolled ``S`` times in one capture gives the whole-loop graph (few-step generation: one launch
  for all steps), and
* captured once and replayed ``S`` times gives the step graph (long runs: one launch per step),

and both stay correct for any plan of the right length, guidance scale, prompt or seed, since all
of those are copied into the buffers before a replay. The sampler state is kept in float32 and
cast to the model's dtype only for the U-Net input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdiff.ops.backend import compiling_ahead, requested_backend
from fastdiff.runtime.graphs import (
    EagerReplay,
    GraphCache,
    GraphEntry,
    GraphKey,
    autocast_state,
    normal_tensors,
    tensor_bytes,
)
from fastdiff.runtime.plan_step import apply_plan_step
from fastdiff.sampling.guidance import combine_guidance
from fastdiff.sampling.known_region import KnownRegion, keep_known, known_region_rows
from fastdiff.sampling.plan import NUM_COEFFICIENTS, history_depth, step_noise_dtype

# Plan rows held by step-graph buffers: any plan up to this many steps reuses the same graph.
STEP_GRAPH_CAPACITY = 1000
# Eagerly run shapes (their capture failed) whose buffers are kept between calls.
EAGER_ENTRIES = 8


def step_graph_rows(steps: int) -> int:
    """Plan rows a shared step graph holds: ``STEP_GRAPH_CAPACITY`` (any plan of a 1000-step
    schedule), or for a longer plan (a longer schedule) the next power of two, in a graph that
    the plans of similar lengths share."""
    if steps <= STEP_GRAPH_CAPACITY:
        return STEP_GRAPH_CAPACITY
    return 1 << (steps - 1).bit_length()


@dataclass
class DenoiseBuffers:
    """Static device tensors read and written by a captured denoising body."""

    x: torch.Tensor  # [B, C, H, W] float32 sampler state; holds the clean sample at the end
    x0_prev: torch.Tensor  # [B, C, H, W] float32, previous step's x0 estimate (dpmpp_2m)
    coefficients: torch.Tensor  # [rows, 10] float32 plan coefficients
    timesteps: torch.Tensor  # [rows] float32 model timesteps (whole or fractional)
    step: torch.Tensor  # [1] int64, index of the next step; the body increments it
    guidance_scale: torch.Tensor  # [1] float32
    # U-Net inputs by name (encoder_hidden_states, text_embeds, time_ids, class_labels), batched
    # [uncond; cond] when guided: the pipeline's condition dict.
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    noise: torch.Tensor | None = None  # [rows or 1, B, C, H, W] float32 for stochastic samplers
    # What the U-Net reads in place of ``cond`` when part of its work is done once per
    # generation, outside the graph (``GraphedDenoiser``'s ``prepare_cond``): static like the
    # rest, reloaded by ``load_buffers``. None: the U-Net reads ``cond``.
    prepared: dict[str, Any] | None = None
    # Inpainting with a plain U-Net: the kept region's latents, mask and noise (float32) and its
    # per-step rows [rows, 2] (``fastdiff.sampling.known_region``), blended after each step.
    known: KnownRegion | None = None
    known_rows: torch.Tensor | None = None
    # [K, B, C, H, W] float32: the x0 estimates two to K + 1 rows back, for plans that read them
    # (DPM-Solver++(3M), UniPC: K = 1; LMS: 2; PNDM: 3), else None.
    x0_older: torch.Tensor | None = None


@dataclass
class DenoiseCall:
    """What one generation asks of the loop (host-side values, copied into the buffers)."""

    x_T: torch.Tensor
    timesteps: torch.Tensor
    coefficients: torch.Tensor
    init_noise_scale: float
    cond: dict[str, torch.Tensor]  # batched [uncond; cond] when guidance_scale is not None
    guidance_scale: float | None
    noise: torch.Tensor | None  # [S, B, C, H, W], rows for steps without noise may be zero
    guidance_rescale: float = 0.0  # phi of Lin et al. 2023 (guided calls only); part of the key
    result_dtype: torch.dtype | None = None  # what the caller casts the result to (None: x_T's)
    known: KnownRegion | None = None  # the region kept at the image (plain-U-Net inpainting)
    known_rows: torch.Tensor | None = None  # [S, 2], ``known_region_rows`` of the plan

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def older_depth(self) -> int:
        """How many x0 estimates older than the previous row's the plan reads (0 to 3): part of
        the key, since the graph keeps that many."""
        return max(history_depth(self.coefficients) - 1, 0)


UNetForward = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def denoise_body(
    unet_forward: UNetForward,
    buffers: DenoiseBuffers,
    model_dtype: torch.dtype,
    channels_last: bool,
    guidance: bool,
    noise_per_step: bool,
    guidance_rescale: float = 0.0,
    shared_input: bool = False,
) -> None:
    """One sampler step on ``buffers``: U-Net (batched [uncond; cond]), CFG, plan update.

    No host synchronisation: plan row, timestep and noise row are selected on the device. With
    ``guidance_rescale`` the CFG combine and rescale (per-sample std, on the device) run before
    the fused step, which then takes the guided output as an unguided model output.
    ``shared_input``: a guided step passes the U-Net its sample and timestep once, with the
    batched [uncond; cond] condition (two contexts per sample,
    ``fastdiff.models.context_groups``), instead of the sample twice.
    """
    step = buffers.step
    x_in = buffers.x * buffers.coefficients.index_select(0, step)[0, 0]
    model_in = x_in.to(model_dtype)
    if guidance and not shared_input:
        model_in = torch.cat([model_in, model_in])
    if channels_last:
        model_in = model_in.contiguous(memory_format=torch.channels_last)
    timestep = buffers.timesteps.index_select(0, step).expand(model_in.shape[0])
    cond = buffers.cond if buffers.prepared is None else buffers.prepared
    model_out = unet_forward(model_in, timestep, cond)
    noise = None
    if buffers.noise is not None:
        row = step if noise_per_step else torch.zeros_like(step)
        noise = buffers.noise.index_select(0, row)[0]
        if channels_last:  # index_select returns NCHW; the fused step wants one layout
            noise = noise.contiguous(memory_format=torch.channels_last)
    guidance_scale = buffers.guidance_scale if guidance else None
    if guidance and guidance_rescale > 0.0:
        uncond, cond = model_out.float().chunk(2)
        model_out = combine_guidance(uncond, cond, buffers.guidance_scale, guidance_rescale)
        guidance_scale = None
    apply_plan_step(
        buffers.x,
        model_out,
        buffers.x0_prev,
        buffers.coefficients,
        step,
        guidance_scale,
        noise,
        buffers.x0_older,
    )
    if buffers.known is not None:
        row = buffers.known_rows.index_select(0, step)[0]
        buffers.x.copy_(keep_known(buffers.x, buffers.known, row[0], row[1]))
    step.add_(1)


def allocate_buffers(
    call: DenoiseCall, rows: int, noise_rows: int, device, channels_last: bool = False
) -> DenoiseBuffers:
    """Zeroed buffers. With channels-last models the latents are NHWC too, so the U-Net output,
    the state and the noise share one layout and the fused step kernel reads them flat."""
    shape = tuple(call.x_T.shape)

    def latent_buffer(*leading: int) -> torch.Tensor:
        if not channels_last:
            return torch.zeros((*leading, *shape), dtype=torch.float32, device=device)
        # [..., B, H, W, C] storage viewed as [..., B, C, H, W]: each latent is NHWC.
        batch, channels, height, width = shape
        storage = torch.zeros(
            (*leading, batch, height, width, channels), dtype=torch.float32, device=device
        )
        return storage.movedim(-1, -3)

    known = known_rows = None
    if call.known is not None:
        mask = torch.zeros(call.known.mask.shape, dtype=torch.float32, device=device)
        known = KnownRegion(latents=latent_buffer(), mask=mask, noise=latent_buffer())
        known_rows = torch.zeros((rows, 2), dtype=torch.float32, device=device)
    return DenoiseBuffers(
        known=known,
        known_rows=known_rows,
        x=latent_buffer(),
        x0_prev=latent_buffer(),
        x0_older=latent_buffer(call.older_depth) if call.older_depth else None,
        coefficients=torch.zeros((rows, NUM_COEFFICIENTS), dtype=torch.float32, device=device),
        # float32: exact for whole timesteps, and the Euler family's fractional ones are
        # diffusers' float32 values.
        timesteps=torch.zeros((rows,), dtype=torch.float32, device=device),
        step=torch.zeros((1,), dtype=torch.long, device=device),
        guidance_scale=torch.ones((1,), dtype=torch.float32, device=device),
        cond={k: torch.zeros_like(v, device=device) for k, v in call.cond.items()},
        noise=None if call.noise is None else latent_buffer(noise_rows),
    )


def prepared_signature(prepared: dict[str, Any] | None) -> tuple:
    """What a graph's static prepared condition must match: whether there is one (a graph whose
    buffers hold one reads them, not the condition's), and for each value that is not a plain
    tensor (the packed context projections), its ``signature()``."""
    if prepared is None:
        return ()
    return ("prepared",) + tuple(
        (name, value.signature())
        for name, value in sorted(prepared.items())
        if value is not None and not isinstance(value, torch.Tensor)
    )


def load_buffers(
    buffers: DenoiseBuffers,
    call: DenoiseCall,
    whole_loop: bool,
    prepared: dict[str, Any] | None = None,
) -> None:
    """Copy one generation's inputs into the static buffers (ordinary kernels, before replay);
    ``prepared``: ``call.cond`` prepared (``GraphedDenoiser.prepare``), for ``buffers.prepared``."""
    steps = call.steps
    buffers.x.copy_(call.x_T.float() * call.init_noise_scale)
    buffers.x0_prev.zero_()
    if buffers.x0_older is not None:
        buffers.x0_older.zero_()
    buffers.coefficients[:steps].copy_(call.coefficients.to(torch.float32))
    buffers.timesteps[:steps].copy_(call.timesteps)
    if buffers.known is not None:
        for name in ("latents", "mask", "noise"):
            getattr(buffers.known, name).copy_(getattr(call.known, name))
        buffers.known_rows[:steps].copy_(call.known_rows)
    buffers.step.zero_()
    buffers.guidance_scale.fill_(1.0 if call.guidance_scale is None else call.guidance_scale)
    for name, value in call.cond.items():
        buffers.cond[name].copy_(value)
    if buffers.prepared is not None:
        if prepared is None:  # the key has the prepared structure: a caller's bug
            raise RuntimeError("these buffers read a prepared condition: pass it to load_buffers")
        for name, value in prepared.items():
            if value is call.cond.get(name):
                continue  # loaded with the condition, above
            target = buffers.prepared[name]
            if isinstance(value, torch.Tensor):
                target.copy_(value)
            else:  # the projections computed once for this generation (ContextProjections)
                # its context is the condition's, loaded above: not copied a second time
                loaded = target.states is buffers.cond.get(name) and value.states is call.cond.get(
                    name
                )
                target.load_(value, states_loaded=loaded)
    if buffers.noise is not None and whole_loop:
        buffers.noise.copy_(call.noise)


class GraphedDenoiser:
    """Runs ``DenoiseCall``s through cached captured graphs (or eagerly when capture fails).

    Plans of at most ``max_loop_steps`` steps get a whole-loop graph (key includes the step count
    and sampler); longer plans share one step graph per shape that is replayed once per step.
    """

    def __init__(
        self,
        unet_forward: UNetForward,
        cache: GraphCache,
        model_dtype: torch.dtype | Callable[[], torch.dtype],
        channels_last: bool = False,
        max_loop_steps: int = 8,
        key_extra: tuple = (),
        then: Callable[[torch.Tensor], Any] | None = None,
        prepare_cond: Callable[[dict], dict] | None = None,
        model_state: Callable[[], tuple] | None = None,
        shared_input: bool = False,
    ):
        """``then(latents)``: what the caller does next with the result (the VAE decode), run
        in a new graph's compile-ahead pass on a tensor like the result (dtype, shape, layout)
        so that its kernels compile with the U-Net's (``GraphCache.get``'s ``also``).

        ``prepare_cond(cond)``: the condition with the work that stays the same at every step
        done (``Pipeline.prepare_condition``: the packed context projections). It runs once per
        generation, before the graph's replays, which then read its result from static
        buffers instead of repeating that work at every step.

        ``model_state()``: what the U-Net decides on the host besides its weights (FreeU's
        factors, ``UNet2DConditionModel.graph_state``), read per call into the key.

        ``shared_input``: ``unet_forward`` takes a guided step's sample once with the batched
        [uncond; cond] condition (``denoise_body``); the U-Net runs what comes before its
        first cross-attention once for both halves."""
        self.unet_forward = unet_forward
        self.cache = cache
        # A dtype, or a callable giving the U-Net's current one: a model cast after optimize()
        # then gets graphs of its own dtype (the key has it) instead of mismatched buffers.
        self.model_dtype = model_dtype
        self.channels_last = channels_last
        self.max_loop_steps = max_loop_steps
        self.key_extra = key_extra
        self.then = then
        self.prepare_cond = prepare_cond
        self.model_state = model_state
        self.shared_input = shared_input
        self.eager_fallbacks: dict[GraphKey, str] = {}

    def current_dtype(self) -> torch.dtype:
        return self.model_dtype() if callable(self.model_dtype) else self.model_dtype

    def prepare(self, cond: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """``prepare_cond(cond)``, or None when it has nothing to do ahead for ``cond``."""
        if self.prepare_cond is None:
            return None
        prepared = self.prepare_cond(cond)
        if all(value is cond.get(name) for name, value in prepared.items()):
            return None
        return prepared

    def key_for(
        self, call: DenoiseCall, sampler: str = "", prepared: dict[str, Any] | None = None
    ) -> GraphKey:
        """The graph key of ``call``; ``prepared``: its condition prepared (``prepare``), whose
        structure the graph's static buffers take."""
        batch, channels, height, width = call.x_T.shape
        whole_loop = call.steps <= self.max_loop_steps
        cond = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in call.cond.items()))
        return GraphKey(
            kind="loop" if whole_loop else "step",
            batch=int(batch),
            height=int(height),
            width=int(width),
            dtype=self.current_dtype(),
            guidance=call.guidance_scale is not None,
            steps=call.steps if whole_loop else 1,
            sampler=sampler if whole_loop else "",
            extra=(
                int(channels),
                cond,
                call.noise is not None,
                call.older_depth,  # the body keeps as many older x0 estimates as the plan reads
                call.guidance_rescale if call.guidance_scale is not None else 0.0,
                requested_backend(),  # a graph replays the kernels chosen when it was captured
                autocast_state(call.x_T.device.type),  # and the casts of torch.autocast
                0 if whole_loop else step_graph_rows(call.steps),  # a step graph's plan rows
                prepared_signature(prepared),
                None if call.known is None else tuple(call.known.mask.shape),
                () if self.model_state is None else self.model_state(),
                *self.key_extra,
            ),
        )

    def build(self, call: DenoiseCall, key: GraphKey, device, prepared=None):
        whole_loop = key.kind == "loop"
        rows = call.steps if whole_loop else step_graph_rows(call.steps)
        buffers = allocate_buffers(
            call, rows, call.steps if whole_loop else 1, device, self.channels_last
        )
        if prepared is not None:  # static counterparts, prepared from the static condition
            buffers.prepared = self.prepare(buffers.cond)
        repeats = call.steps if whole_loop else 1
        # read here, so that the body (kept by an eager stand-in) does not keep the call alive
        guidance_rescale = call.guidance_rescale if key.guidance else 0.0

        def body() -> None:
            # In the compile-ahead pass one step launches every kernel the others will (the
            # steps differ only in what the device buffers hold): the pass runs one, not all.
            for _ in range(1 if compiling_ahead() else repeats):
                denoise_body(
                    self.unet_forward,
                    buffers,
                    key.dtype,  # the dtype captured, whatever the model is cast to later
                    self.channels_last,
                    key.guidance,
                    noise_per_step=whole_loop,
                    guidance_rescale=guidance_rescale,
                    shared_input=self.shared_input,
                )

        def prepare() -> None:
            load_buffers(buffers, call, whole_loop, prepared)

        return buffers, body, prepare

    def entry_for(
        self, call: DenoiseCall, sampler: str = "", prepared: dict[str, Any] | None = None
    ) -> GraphEntry:
        key = self.key_for(call, sampler, prepared)
        if key in self.eager_fallbacks:
            return self.eager_entry(call, key, prepared)
        also = None
        if self.then is not None:
            # The result as the caller gets it: the state's layout (__call__ returns a clone of
            # it), the dtype the caller casts it to.
            dtype = call.result_dtype or call.x_T.dtype
            also = lambda buffers: self.then(buffers.x.to(dtype))  # noqa: E731
        try:
            build = lambda: self.build(call, key, call.x_T.device, prepared)  # noqa: E731
            return self.cache.get(key, build, also)
        except Exception as error:  # capture failed: keep generating, eagerly, and say why
            reason = f"{type(error).__name__}: {error}"
            self.eager_fallbacks[key] = reason
            print(
                f"fastdiff.runtime: graph capture failed for {key.describe()} ({reason}); "
                "running this shape eagerly"
            )
            return self.eager_entry(call, key, prepared)

    def eager_entry(self, call: DenoiseCall, key: GraphKey, prepared=None) -> GraphEntry:
        """The eager stand-in for a graph whose capture failed: its buffers and body are built
        once per key (as a graph's are) and kept, the most recent ``EAGER_ENTRIES``, so later
        calls of that shape do not allocate them again."""
        kept = self.cache.eager  # cleared with the cache (after moving or re-casting a model)
        entry = kept.pop(key, None)
        if entry is None or entry.buffers.x.device != call.x_T.device:
            with normal_tensors():  # kept for later calls, as a graph's buffers
                buffers, body, _ = self.build(call, key, call.x_T.device, prepared)
            entry = GraphEntry(key, EagerReplay(body), buffers, 0.0, tensor_bytes(buffers))
        kept[key] = entry  # most recent last
        while len(kept) > EAGER_ENTRIES:
            kept.pop(next(iter(kept)))
        return entry

    def __call__(self, call: DenoiseCall, sampler: str = "") -> torch.Tensor:
        """Final latents (float32, [B, C, H, W]) of the plan in ``call``."""
        if call.noise is not None and call.noise.shape[0] != call.steps:
            raise ValueError(
                f"noise must have one row per step: got {call.noise.shape[0]} rows for "
                f"{call.steps} steps"
            )
        prepared = self.prepare(call.cond)  # once per generation, outside the graph
        entry = self.entry_for(call, sampler, prepared)
        whole_loop = entry.key.kind == "loop"
        load_buffers(entry.buffers, call, whole_loop, prepared)
        if whole_loop:
            entry.replay()
        else:
            for index in range(call.steps):
                if entry.buffers.noise is not None:
                    entry.buffers.noise[0].copy_(call.noise[index])
                entry.replay()
        return entry.buffers.x.clone()


def check_guided_batch(conditioning, batch: int) -> None:
    """A guided condition has the latents' batch in both halves, as the eager loop's
    ``classifier_free_guidance`` requires. Unchecked, a guided step that passes the latents once
    (``shared_input``) read a condition of half their batch as one [uncond; cond] pair per
    latent, and the step took that output as unguided, without an error."""
    for part in (conditioning.cond, conditioning.uncond):
        for value in part.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != batch:
                raise ValueError(
                    f"the condition has batch size {value.shape[0]} but x_t has batch size {batch}"
                )


def build_call(
    plan,
    conditioning,
    noise: torch.Tensor,
    guidance_scale: float,
    generator,
    known: KnownRegion | None = None,
):
    """The pipeline's conditioning and noise as a ``DenoiseCall`` ([uncond; cond] batched);
    ``known``: the region kept at the image after each step, with the plan's rows for it.

    Noise for stochastic plans is drawn up front in the order, dtype and device the eager loop
    (``fastdiff.sampling.run_plan``) uses, so a seed gives the same image on both paths.
    """
    if known is not None:
        known.check(noise)
    guided = conditioning.uncond is not None
    if guided:
        check_guided_batch(conditioning, int(noise.shape[0]))
    cond = dict(conditioning.cond)
    if guided:
        cond = {key: torch.cat([conditioning.uncond[key], value]) for key, value in cond.items()}
    step_noise = None
    if plan.stochastic:
        device = generator.device if generator is not None else noise.device
        dtype = step_noise_dtype(plan, noise.dtype)
        rows = []
        for std in plan.coefficients[:, 6].tolist():
            draw = torch.zeros(noise.shape, dtype=dtype, device=noise.device)
            if std != 0.0:
                draw = torch.randn(noise.shape, generator=generator, device=device, dtype=dtype)
                draw = draw.to(noise.device)
            rows.append(draw)
        step_noise = torch.stack(rows)
    return DenoiseCall(
        x_T=noise,
        timesteps=plan.timesteps,
        coefficients=plan.coefficients,
        init_noise_scale=plan.init_noise_scale,
        cond=cond,
        guidance_scale=guidance_scale if guided else None,
        noise=step_noise,
        known=known,
        known_rows=None if known is None else known_region_rows(plan),
    )
