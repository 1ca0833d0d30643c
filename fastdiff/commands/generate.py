"""``fastdiff generate``: images from a pipeline folder, one output file or, with ``--prompts``, a
folder of images (one per prompt, sharded over ranks when started by torchrun)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from fastdiff import parallel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BYTE_ORDER_MARK = "\ufeff"


def parse_size(text: str) -> tuple[int, int]:
    """ "HxW" or "N" (square) -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"size must be HxW or N (e.g. 512x768 or 512), got {text!r}"
        )
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return height, width


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a diffusers-format pipeline folder",
        description="Generate images with a text- or class-conditional pipeline folder. With "
        "--prompts, run under torchrun to shard the prompts over processes/GPUs.",
    )
    parser.add_argument("--model", required=True, help="pipeline folder (model_index.json, ...)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text prompt")
    what.add_argument("--class-label", type=int, help="class label of a class-conditional model")
    what.add_argument(
        "--prompts",
        type=Path,
        help="file with one prompt per line (a class label per line for class-conditional "
        "models); blank lines and lines starting with '#' are skipped",
    )
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (text models)")
    parser.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        help="use the text encoder's hidden state this many layers before the default one, as "
        "diffusers' clip_skip (text models)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default 20; 4 for latent consistency model folders)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale; <= 1 disables it (default: 5.0 for SDXL folders, 8.5 for latent "
        "consistency model folders, else 7.5; 7.5 with --mask-image)",
    )
    parser.add_argument("--guidance-rescale", type=float, default=0.0)
    parser.add_argument(
        "--sampler",
        default=None,
        help="ddim, ddpm, euler[_ancestral|_karras], dpmpp_{2m,3m}[_sde][_karras], heun[_karras], "
        "kdpm2[_ancestral][_karras], pndm, lms[_karras], lcm, tcd, "
        "unipc[_karras] "
        "(default: the one equal to the folder's scheduler, else ddim)",
    )
    parser.add_argument(
        "--eta", type=float, default=0.0, help="DDIM eta, or TCD gamma (0 = deterministic)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed; prompt i of --prompts uses seed+i"
    )
    parser.add_argument("--size", type=parse_size, default=None, help="HxW or N (default: model's)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (a grid)")
    parser.add_argument("--init-image", type=Path, help="img2img: start from this image")
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="img2img: share of the steps to run (0, 1] (default: 0.3 for SDXL folders, else 0.8; "
        "with --mask-image 1.0, 0.9999 for SDXL folders)",
    )
    parser.add_argument(
        "--mask-image",
        type=Path,
        help="inpainting (with --init-image): repaint where the mask is white; an inpainting "
        "checkpoint reads the mask, another has the kept region blended back at each step",
    )
    parser.add_argument(
        "--lora",
        type=Path,
        action="append",
        help="LoRA weights (a .safetensors file or a folder) fused into the model; repeatable",
    )
    parser.add_argument(
        "--lora-scale", type=float, default=None, help="scale of every --lora (default 1.0)"
    )
    parser.add_argument(
        "--padding-mask-crop",
        type=int,
        default=None,
        help="with --mask-image: inpaint only the box around the mask, widened by this many "
        "pixels, at the model's size, and paste it back into the image",
    )
    parser.add_argument(
        "--freeu",
        type=str,
        default=None,
        metavar="S1,S2,B1,B2",
        help="FreeU factors (e.g. 0.9,0.2,1.2,1.4 for SD 1.5)",
    )
    parser.add_argument(
        "--vae",
        type=Path,
        help="an autoencoder folder used instead of the model's (e.g. TAESD, AutoencoderTiny, "
        "for fast decoding)",
    )
    parser.add_argument(
        "--textual-inversion",
        type=Path,
        action="append",
        help="a textual inversion embedding (file or folder) whose token prompts may use (the "
        "token the file names, or the file's name for Automatic1111 .safetensors); repeatable",
    )
    parser.add_argument("--out", type=Path, help="output image file (single prompt/label)")
    parser.add_argument("--out-dir", type=Path, help="output folder (with --prompts)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite", action="store_true", help="replace output images that exist already"
    )
    existing.add_argument(
        "--skip-existing",
        action="store_true",
        help="with --prompts: make only the images missing from --out-dir (resume a run)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights dtype (default: fp16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="weights variant, as diffusers names it: e.g. fp16 reads "
        "diffusion_pytorch_model.fp16.safetensors; a component folder without files of the "
        "variant reads its plain ones (default: the plain files, else fp16 ones)",
    )
    parser.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="on CUDA, skip pipe.optimize() (CUDA graphs, channels-last, fused QKV, kernels; its "
        "warm-up is seconds once Triton's caches are warm): run the plain eager pipeline",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run)


def load_pipeline(args, device: torch.device, verbose: bool = True):
    """The pipeline in the chosen dtype; on CUDA optimized (unless --no-optimize): without CUDA
    graphs each Triton kernel launch costs more host time than the eager op it replaces."""
    from fastdiff.pipeline import Pipeline

    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    pipe = Pipeline.from_pretrained(
        args.model,
        device=device,
        dtype=dtype,
        variant=getattr(args, "variant", None),
        vae=getattr(args, "vae", None),
    )
    for lora in getattr(args, "lora", None) or []:  # before optimize(), which fuses QKV
        scale = 1.0 if getattr(args, "lora_scale", None) is None else args.lora_scale
        pipe.load_lora_weights(lora, scale=scale)
    if getattr(args, "freeu", None) is not None:
        pipe.enable_freeu(*freeu_factors(args.freeu))
    for embedding in getattr(args, "textual_inversion", None) or []:
        token = pipe.load_textual_inversion(embedding)
        print(f"textual inversion {embedding}: prompts may use {token!r}")
    if device.type == "cuda" and getattr(args, "optimize", True):
        pipe.optimize(dtype=dtype, verbose=verbose)
    return pipe


def generate_one(pipe, args, text: str, seed: int):
    """Run the pipeline for one prompt (or class label, as text) and return the image (a grid
    for several)."""
    from fastdiff.pipeline.images import make_grid

    height, width = args.size if args.size else (None, None)
    inputs = {}
    if pipe.is_text_conditional:
        if args.class_label is not None:
            raise ValueError("this model takes text prompts, not --class-label")
        inputs["prompt"] = text
        inputs["negative_prompt"] = args.negative_prompt
        inputs["clip_skip"] = args.clip_skip
    else:
        for option in ("negative_prompt", "clip_skip"):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise ValueError(f"this model is class-conditional: {flag} is not used")
        try:
            inputs["class_labels"] = int(text)
        except ValueError:
            raise ValueError(
                f"this model is class-conditional: expected a class label, got {text!r}"
            ) from None
    if args.init_image is not None:
        if not args.init_image.is_file():
            raise FileNotFoundError(f"init image not found: {args.init_image}")
        inputs["image"] = read_init_image(args.init_image)
        inputs["strength"] = args.strength  # None: the pipeline's default
    if args.mask_image is not None:
        if not args.mask_image.is_file():
            raise FileNotFoundError(f"mask image not found: {args.mask_image}")
        inputs["mask_image"] = read_init_image(args.mask_image, "mask image")
    if getattr(args, "padding_mask_crop", None) is not None:
        inputs["padding_mask_crop"] = args.padding_mask_crop
    images = pipe(
        **inputs,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        sampler=args.sampler,
        eta=args.eta,
        height=height,
        width=width,
        num_images=args.num_images,
        seed=seed,
        progress=not args.no_progress,
    )
    return images[0] if len(images) == 1 else make_grid(images)


def freeu_factors(text: str) -> tuple[float, float, float, float]:
    """--freeu "S1,S2,B1,B2" as four numbers."""
    parts = text.split(",")
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(value) for value in values):
        # float() reads "nan" and "inf" too: refused here, not as NaN latents after the sampling
        raise ValueError(
            f"--freeu takes four numbers S1,S2,B1,B2, finite (e.g. 0.9,0.2,1.2,1.4), got {text!r}"
        )
    return values


def read_init_image(path: Path, what: str = "init image"):
    """The image, fully decoded (first frame) and turned upright as its EXIF orientation says
    (as viewers show it, and as diffusers' load_image reads it); a file PIL cannot read raises
    ValueError naming ``what`` it is."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            # A copy either way (the file closes); the pipeline converts the mode, 16-bit
            # grayscale included. Transposed from the open file: a TIFF keeps its orientation
            # in tags that a copy would drop.
            try:
                return ImageOps.exif_transpose(image)
            except Exception:  # unreadable EXIF data: viewers show the pixels as stored
                return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from None


def check_args(args) -> None:
    if args.prompts is None:
        if args.out is None:
            raise ValueError("--out FILE.png is required")
        if args.out_dir is not None:
            raise ValueError("--out-dir is only used with --prompts")
        from fastdiff.pipeline.images import check_image_path

        if args.skip_existing:
            raise ValueError("--skip-existing is only used with --prompts")
        # Fail before the model is loaded, not after the images are made.
        check_image_path(args.out, overwrite=args.overwrite)
    else:
        if args.out_dir is None:
            raise ValueError("--prompts needs --out-dir DIR")
        if args.out is not None:
            raise ValueError("--out is not used with --prompts; images go to --out-dir")
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise ValueError(f"--out-dir {args.out_dir} exists and is not a directory")
        if args.out_dir.is_dir() and not os.access(args.out_dir, os.W_OK | os.X_OK):
            raise PermissionError(
                f"--out-dir: cannot write to directory {args.out_dir} (permission denied)"
            )
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength is only used with --init-image (img2img)")
    if args.mask_image is not None and args.init_image is None:
        raise ValueError("--mask-image needs --init-image: the image to inpaint")
    if getattr(args, "padding_mask_crop", None) is not None and args.mask_image is None:
        raise ValueError("--padding-mask-crop needs --mask-image (inpainting)")
    if getattr(args, "lora_scale", None) is not None and not getattr(args, "lora", None):
        raise ValueError("--lora-scale is only used with --lora FILE (the weights it scales)")
    if getattr(args, "freeu", None) is not None:
        freeu_factors(args.freeu)  # refused before the model loads
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")


def run(args) -> int:
    check_args(args)
    if args.prompts is not None:
        return run_prompts_file(args)
    from fastdiff.pipeline.images import save_image_atomic

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--prompt/--class-label make one image; under torchrun use --prompts FILE")
    device = torch.device("cuda" if parallel.wants_cuda(args.device) else "cpu")
    pipe = load_pipeline(args, device)
    text = args.prompt if args.prompt is not None else str(args.class_label)
    started = time.perf_counter()
    image = generate_one(pipe, args, text, args.seed)
    path = save_image_atomic(image, args.out, overwrite=args.overwrite)
    print(f"wrote {path} ({settings(pipe, args)}, {time.perf_counter() - started:.1f} s)")
    return 0


def settings(pipe, args) -> str:
    """The sampler, steps and guidance (and img2img strength) the run used, defaults (the
    folder's) resolved."""
    sampler = args.sampler or pipe.defaults.sampler
    default = pipe.defaults.guidance_scale
    if getattr(args, "mask_image", None) is not None:
        default = pipe.defaults.inpaint_guidance_scale
    guidance = default if args.guidance is None else args.guidance
    # The pipeline samples w <= 1 unguided (one forward per step): say so, not "guidance -2".
    guided = f"guidance {guidance:g}" if guidance > 1 else f"no guidance (w={guidance:g} <= 1)"
    if pipe.unet.config.time_cond_proj_dim is not None:  # one forward per step, w embedded
        guided = f"guidance {guidance:g} (embedded)"
    steps = pipe.defaults.num_inference_steps if args.steps is None else args.steps
    text = f"{sampler}, {steps} steps, {guided}"
    if args.init_image is not None:
        inpainting = args.mask_image is not None
        default = pipe.defaults.inpaint_strength if inpainting else pipe.defaults.strength
        strength = default if args.strength is None else args.strength
        run = min(int(steps * strength), steps)
        if pipe.defaults.lcm_img2img and sampler == "lcm" and not inpainting:
            run = steps  # all of them, within the strength's share of the schedule
        kind = "inpainting" if inpainting else "img2img"
        text += f", {kind} strength {strength:g}: {run} steps run"
    return text


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    data = path.read_bytes()
    try:  # UTF-8 whatever the locale; utf-8-sig drops the byte-order mark some editors write
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1  # without the mark, if any
        raise ValueError(f"prompts file {path} is not UTF-8 text (line {line}): {error}") from None
    # Lines end at \n, \r\n or \r only, as when a text file is read line by line: str.splitlines
    # also splits at characters a prompt may hold (U+2028, U+0085, form feed, ...), which made
    # two prompts of one and shifted the index, seed and file name of every later prompt.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # A byte-order mark starts every file that was joined from several saved by such editors.
    lines = [line.strip().lstrip(BYTE_ORDER_MARK).strip() for line in lines]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def generate_shard(args, mine: list[tuple[int, str]], context) -> tuple[list, list]:
    """This rank's prompts -> ([(index, path)], [(index, rank, error)]); never raises."""
    from fastdiff.pipeline.images import save_image_atomic

    if not mine:  # nothing left for this rank (--skip-existing): no model to load
        return [], []
    try:
        pipe = load_pipeline(args, context.device, verbose=context.is_main)
    except Exception as error:  # this rank cannot work at all: report all of its prompts
        return [], [(index, context.rank, f"loading the model: {error}") for index, _ in mine]
    written, failures = [], []
    for index, text in mine:
        try:
            image = generate_one(pipe, args, text, args.seed + index)
            target = prompt_image_path(args, index)
            path = save_image_atomic(image, target, overwrite=args.overwrite, option="--out-dir")
            written.append((index, str(path)))
        except Exception as error:
            failures.append((index, context.rank, f"{type(error).__name__}: {error}"))
            print(f"rank {context.rank}: prompt {index} failed: {error}", file=sys.stderr)
    return written, failures


def prompt_image_path(args, index: int) -> Path:
    return args.out_dir / f"prompt-{index:05d}.png"


def pending_prompts(args, prompts: list[str]) -> list[tuple[int, str]]:
    """(index, prompt) of the images to make: all of them, or with --skip-existing those not in
    --out-dir yet. Images there already are never replaced without --overwrite."""
    # A dangling link counts as there, as check_output_path counts it: the write would refuse it.
    existing = [
        index
        for index in range(len(prompts))
        if prompt_image_path(args, index).exists() or prompt_image_path(args, index).is_symlink()
    ]
    if existing and not (args.overwrite or args.skip_existing):
        raise FileExistsError(
            f"--out-dir {args.out_dir} already holds {len(existing)} of the {len(prompts)} "
            f"images ({prompt_image_path(args, existing[0]).name} ...): pass --skip-existing to "
            f"make only the missing ones, or --overwrite to make them all again"
        )
    skipped = set(existing) if args.skip_existing else set()
    return [(index, text) for index, text in enumerate(prompts) if index not in skipped]


def run_prompts_file(args) -> int:
    """Each rank generates its share of the prompts, writing each image atomically as soon as it
    is done; a failing prompt is recorded (prompt, rank, error) and the rank moves on. Rank 0
    prints a summary; the exit code is 1 when any prompt failed on any rank."""
    prompts = read_prompts(args.prompts)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    context = parallel.init_distributed(args.device)
    try:
        # Rank 0 lists the images there already and every rank shards its answer: ranks that
        # listed the folder themselves could see different files (node-local folders, another
        # writer) and make some prompts twice and others never.
        pending = parallel.broadcast_from_main(context, lambda: pending_prompts(args, prompts))
        mine = [item for _, item in parallel.shard(pending, context.rank, context.world_size)]
        started = time.perf_counter()
        written, failures = generate_shard(args, mine, context)
        gathered = parallel.gather_to_main(context, (written, failures))
    finally:
        parallel.shutdown(context)
    if not context.is_main:
        # Rank 0 reports every rank's failures and sets the exit code; a non-zero exit here
        # could make torchrun stop rank 0 before its summary is printed.
        return 0
    all_written = sorted(item for rank_written, _ in gathered for item in rank_written)
    all_failures = sorted(item for _, rank_failures in gathered for item in rank_failures)
    elapsed = time.perf_counter() - started
    skipped = len(prompts) - len(pending)
    print_escaped(
        f"generated {len(all_written)}/{len(pending)} prompts on {context.world_size} "
        f"rank(s) in {elapsed:.1f} s into {args.out_dir}"
        + (f" ({skipped} of {len(prompts)} were there already: skipped)" if skipped else "")
    )
    for index, rank, message in all_failures:
        print_escaped(f"FAILED prompt {index} ({prompts[index]!r}) on rank {rank}: {message}")
    return 1 if all_failures else 0


def print_escaped(text: str) -> None:
    """Print ``text`` with the characters stdout cannot encode as backslash escapes: a prompt in
    a script that an ASCII or Latin-1 stdout lacks raised UnicodeEncodeError in the summary,
    which hid every failure report after it and turned exit code 1 into 2."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))
