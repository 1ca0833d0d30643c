"""LoRA weights fused into the U-Net and text encoder (fastdiff.models.lora) against diffusers'
load_lora_weights + fuse_lora, in the layouts LoRA files come in."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastdiff.pipeline import Pipeline
from tests.pipeline.folders import save_peft_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")  # diffusers loads LoRA weights through it

RANK = 4
CALL = dict(prompt="a red cat", num_inference_steps=4, guidance_scale=6.0, height=16, width=16)


def factors(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, tuple]:
    """Random (down, up) factors for the Linear and Conv2d modules whose names end so."""
    generator = torch.Generator().manual_seed(0)
    found = {}
    for name, module in model.named_modules():
        if not name.endswith(suffixes):
            continue
        if isinstance(module, torch.nn.Conv2d):
            down_shape = (RANK, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, RANK, 1, 1)
        elif isinstance(module, torch.nn.Linear):
            down_shape, up_shape = (RANK, module.in_features), (module.out_features, RANK)
        else:
            continue
        down = torch.randn(down_shape, generator=generator) * 0.1
        found[name] = (down, torch.randn(up_shape, generator=generator) * 0.1)
    return found


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


@pytest.fixture(scope="module")
def lora(sd_folder):
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    return factors(reference.unet, UNET_TARGETS), factors(reference.text_encoder, TEXT_TARGETS)


def peft_layout(lora) -> dict[str, torch.Tensor]:
    unet, text = lora
    state = {}
    for prefix, layers in (("unet", unet), ("text_encoder", text)):
        for name, (down, up) in layers.items():
            state[f"{prefix}.{name}.lora_A.weight"] = down
            state[f"{prefix}.{name}.lora_B.weight"] = up
    return state


def kohya_layout(lora, alpha: float) -> dict[str, torch.Tensor]:
    """kohya's names: module paths with underscores; the text encoder's under text_model, as
    files written with transformers 4 name it."""
    unet, text = lora
    state = {}
    for prefix, layers in (("lora_unet_", unet), ("lora_te_text_model_", text)):
        for name, (down, up) in layers.items():
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_fused_lora_equals_diffusers_and_unloads_exactly(sd_folder, lora, layout):
    state = peft_layout(lora) if layout == "peft" else kohya_layout(lora, alpha=2.0)
    pipe = Pipeline.from_pretrained(sd_folder)
    before = pipe(**CALL, seed=1, output_type="tensor", progress=False)
    assert pipe.load_lora_weights(dict(state), scale=0.7) == sum(len(part) for part in lora)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    equals_fused_in_diffusers(pipe, reference, dict(state), 0.7)
    patched = pipe(**CALL, seed=1, output_type="tensor", progress=False)
    assert (patched - before).abs().max() > 1e-3
    assert pipe.unload_lora_weights() == sum(len(part) for part in lora)
    torch.testing.assert_close(pipe(**CALL, seed=1, output_type="tensor", progress=False), before)


def test_older_diffusers_layout_and_files(sd_folder, lora, tmp_path):
    """diffusers' attention-processor layout (to_q_lora.down / .up, to_out_lora for to_out.0)
    patches what the PEFT layout does; a folder's pytorch_lora_weights.safetensors loads."""
    unet, _ = lora
    attention = {name: pair for name, pair in unet.items() if ".attn" in name}
    older = {}
    for name, (down, up) in attention.items():
        module, projection = (
            name.rsplit(".", 1)
            if not name.endswith("to_out.0")
            else (
                name[: -len(".to_out.0")],
                "to_out",
            )
        )
        older[f"unet.{module}.processor.{projection}_lora.down.weight"] = down
        older[f"unet.{module}.processor.{projection}_lora.up.weight"] = up
    save_file(peft_layout((attention, {})), str(tmp_path / "pytorch_lora_weights.safetensors"))
    from_folder, from_older = (
        Pipeline.from_pretrained(sd_folder),
        Pipeline.from_pretrained(sd_folder),
    )
    assert from_folder.load_lora_weights(tmp_path) == len(attention)
    assert from_older.load_lora_weights(older) == len(attention)
    for ours, theirs in zip(
        from_folder.unet.parameters(), from_older.unet.parameters(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_bad_lora_weights_are_refused_and_change_nothing(sd_folder, lora, tmp_path):
    pipe = Pipeline.from_pretrained(sd_folder)
    weights = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    state = peft_layout(lora)
    cases = [
        ({**state, "vae.decoder.conv_in.lora_A.weight": torch.zeros(1)}, "addresses none"),
        ({**state, "unet.conv_in.scale": torch.zeros(1)}, "not a LoRA factor or alpha"),
        ({"unet.mid_block.nothing.lora_A.weight": torch.zeros(4, 8)}, "no such module"),
        (
            {
                **state,
                "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 7),
            },
            r"do not fit a weight of shape \(32, 32\)",
        ),
        (
            {k: v for k, v in state.items() if not k.endswith("lora_B.weight")},
            "both up and down factors are needed",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.load_lora_weights(bad)
    with pytest.raises(FileNotFoundError, match="LoRA weights not found"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="LoRA scale must be a finite number"):
        pipe.load_lora_weights(state, scale=float("nan"))
    for name, value in pipe.unet.state_dict().items():  # every error left the U-Net as it was
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_sdxl_lora_with_both_text_encoders_equals_diffusers(sdxl_folder):
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    state = {}
    for prefix, model, targets in (
        ("unet", reference.unet, UNET_TARGETS),
        ("text_encoder", reference.text_encoder, TEXT_TARGETS),
        ("text_encoder_2", reference.text_encoder_2, TEXT_TARGETS),
    ):
        for name, (down, up) in factors(model, targets).items():
            state[f"{prefix}.{name}.lora_A.weight"] = down
            state[f"{prefix}.{name}.lora_B.weight"] = up
    pipe = Pipeline.from_pretrained(sdxl_folder)
    pipe.load_lora_weights(dict(state), scale=0.5)
    equals_fused_in_diffusers(pipe, reference, dict(state), 0.5)


def equals_fused_in_diffusers(pipe, reference, source, scale: float) -> None:
    """``pipe`` (its LoRA loaded) generates what ``reference`` does after diffusers'
    load_lora_weights(source) and fuse_lora(lora_scale=scale)."""
    ours = pipe(**CALL, seed=1, output_type="tensor", progress=False)
    reference.load_lora_weights(source)
    reference.fuse_lora(lora_scale=scale)
    generator = torch.Generator().manual_seed(1)
    theirs = reference(**CALL, generator=generator, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def sgm_name(name: str, layers_per_block: int, upsampler_part: dict[int, int]) -> str | None:
    """A diffusers U-Net module path in the original SGM / LDM layout, as kohya's SDXL files
    name modules (underscored): the inverse of what the loader maps, written out here so that
    diffusers' own reading of those names is the check."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1"}
    resnet["conv_shortcut"] = "skip_connection"
    parts = name.split(".")
    span = layers_per_block + 1

    def inner(kind: str, rest: list[str]) -> str:
        tail = "_".join(rest)
        return resnet.get(tail, tail) if kind == "resnets" else tail

    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks_{1 + block * span + layers_per_block}_0_op"
        index = 1 + block * span + int(parts[3])
        part = 0 if kind == "resnets" else 1
        return f"input_blocks_{index}_{part}_{inner(kind, parts[4:])}"
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        return f"middle_block_{index}_{inner(parts[1], parts[3:])}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            return f"output_blocks_{block * span + layers_per_block}_{upsampler_part[block]}_conv"
        index = block * span + int(parts[3])
        part = 0 if kind == "resnets" else 1
        return f"output_blocks_{index}_{part}_{inner(kind, parts[4:])}"
    return None


def test_kohya_sdxl_lora_in_the_sgm_layout_equals_diffusers(sdxl_folder):
    """kohya's SDXL LoRAs name the U-Net's modules as the original SGM U-Net does (input,
    middle and output blocks): attention, feed-forward, ResNet convolutions (LoCon, 3x3 down
    factors) and time projections, and a downsampler, against diffusers' reading of them."""
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    reference.set_progress_bar_config(disable=True)
    config = reference.unet.config
    upsampler_part = {
        block: 2 if kind.startswith("CrossAttn") else 1
        for block, kind in enumerate(config.up_block_types)
    }
    targets = (*UNET_TARGETS, "proj_out", "conv1", "conv2", "time_emb_proj", "downsamplers.0.conv")
    state = {}
    for name, (down, up) in factors(reference.unet, targets).items():
        key = "lora_unet_" + sgm_name(name, config.layers_per_block, upsampler_part)
        state[f"{key}.lora_down.weight"] = down
        state[f"{key}.lora_up.weight"] = up
        state[f"{key}.alpha"] = torch.tensor(2.0)
    assert any("input_blocks" in key for key in state) and any(
        "middle_block" in key for key in state
    )
    pipe = Pipeline.from_pretrained(sdxl_folder)
    assert pipe.load_lora_weights(dict(state), scale=0.6) == len(state) // 3
    equals_fused_in_diffusers(pipe, reference, dict(state), 0.6)


def test_factors_of_the_transposed_shape_are_refused(sd_folder):
    """A (128 -> 32) layer's factors given as for (32 -> 128) have the right number of values:
    they are refused, not reshaped into the weight (diffusers refuses them too)."""
    pipe = Pipeline.from_pretrained(sd_folder)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    layer = pipe.unet.get_submodule(name)
    down = torch.randn(RANK, layer.out_features)
    up = torch.randn(layer.in_features, RANK)
    with pytest.raises(ValueError, match="do not fit a weight of shape"):
        pipe.load_lora_weights(
            {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
        )


def test_alphas_from_the_adapter_config_diffusers_saves(sd_folder, tmp_path):
    """diffusers' save_lora_weights writes the PEFT config (lora_alpha, alpha_pattern) into the
    file's metadata: its alphas scale the update as diffusers' loading does."""
    from peft import LoraConfig

    config = LoraConfig(
        r=RANK,
        lora_alpha=16,
        alpha_pattern={"to_v": 2},
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights="gaussian",
    )
    save_peft_lora(sd_folder, tmp_path, config)
    pipe = Pipeline.from_pretrained(sd_folder)
    pipe.load_lora_weights(tmp_path, scale=0.5)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    equals_fused_in_diffusers(pipe, reference, tmp_path, 0.5)


def test_kohya_alphas_scale_each_layer_by_its_own_rank(sd_folder):
    """kohya's alpha is per layer: each update is alpha / r of that layer's own rank."""
    pipe = Pipeline.from_pretrained(sd_folder)
    names = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    state, expected = {}, {}
    for rank, alpha, name in ((8, 8.0, names[0]), (2, 1.0, names[1])):
        layer = pipe.unet.get_submodule(name)
        down, up = torch.randn(rank, layer.in_features), torch.randn(layer.out_features, rank)
        key = "lora_unet_" + name.replace(".", "_")
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        state[f"{key}.alpha"] = torch.tensor(alpha)
        expected[name] = layer.weight.detach().clone() + 0.5 * alpha / rank * (up @ down)
    pipe.load_lora_weights(state, scale=0.5)
    for name in names:
        torch.testing.assert_close(pipe.unet.get_submodule(name).weight, expected[name])


def test_unloading_after_optimize_fused_the_projections_is_refused(sd_folder):
    """Fused QKV projections are new layers made from the patched ones: the originals can no
    longer reach them, so unloading says so and changes nothing (load, unload, then optimize)."""
    pipe = Pipeline.from_pretrained(sd_folder)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = pipe.unet.get_submodule(name)
    down, up = torch.randn(RANK, layer.in_features), torch.randn(layer.out_features, RANK)
    pipe.load_lora_weights({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unload LoRA weights loaded before optimize"):
        pipe.unload_lora_weights()


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_lora_switched_after_optimize_reaches_the_captured_graphs(sd_folder, lora, layout):
    """After optimize() (fused QKV, packed context projections, folds) a LoRA lands in the
    fused weights' rows in place: the graphs captured before it replay with it, equal to the
    pipeline that fused it from the start, and unloading gives the first images back. A LoRA
    switch without a new capture, as stable-fast users expect."""
    import fastdiff.runtime as runtime
    from tests.runtime.fake_graph import RecordingGraphBackend

    state = peft_layout(lora) if layout == "peft" else kohya_layout(lora, alpha=2.0)
    call = dict(CALL, seed=1, output_type="tensor", progress=False)
    reference = Pipeline.from_pretrained(sd_folder)
    reference.unet.fold_conv_biases(True)  # optimize()'s arithmetic, for an exact comparison
    plain = reference(**call)
    reference.load_lora_weights(dict(state), scale=0.7)
    patched = reference(**call)
    pipe = Pipeline.from_pretrained(sd_folder)
    rt = runtime.optimize(pipe, backend=RecordingGraphBackend(), verbose=False)
    torch.testing.assert_close(pipe(**call), plain, atol=1e-5, rtol=0)
    captures = rt.cache.stats.captures
    pipe.load_lora_weights(dict(state), scale=0.7)
    torch.testing.assert_close(pipe(**call), patched, atol=1e-5, rtol=0)
    pipe.unload_lora_weights()
    torch.testing.assert_close(pipe(**call), plain, atol=1e-5, rtol=0)
    assert rt.cache.stats.captures == captures  # the same graphs, replayed
