"""Text to image with DDIM, optionally with spectral shifts applied.

    python sample.py --prompt "a photo of an astronaut riding a horse on mars"
    python sample.py --prompt "a photo of sks dog in the snow" --shifts runs/sks/shifts.safetensors
    python sample.py --model stabilityai/stable-diffusion-xl-base-1.0 --prompt "..."      # SDXL, 1024 x 1024

Writes 000.png, 001.png, ... in generation order and grid.png into --out (default: a new folder out/NNN). For the
same seed the images equal diffusers' StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) + DDIMScheduler
(initial latents and η-noise drawn from one CPU generator). The base model: --model, else the one the --shifts file
records, else $SVDIFF_MODEL, else SD1.5 from the Hugging Face Hub.
"""
import argparse
import json
from pathlib import Path

import torch

import sd
from support import apply_shifts, cli, loading, shift_files
from support.files import atomic_write
from support.photos import save_png
from support.svd_cache import check_svd_cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=None,
                   help="SD 1.x/2.x/XL single file, diffusers folder or Hugging Face Hub id owner/name[@revision] "
                        f"(default: the base model the first --shifts file records, else $SVDIFF_MODEL, else "
                        f"{loading.DEFAULT_MODEL})")
    p.add_argument("--vocab", default=None, help="CLIP BPE vocabulary for single-file models (default: the shipped "
                   "bpe_simple_vocab_16e6.txt.gz)")
    p.add_argument("--prompt", required=True, help="what to draw, e.g. 'a photo of sks dog in the snow'")
    p.add_argument("--negative-prompt", default="", help="the unconditional half of guidance; \"\" is none "
                   "(SDXL: zeros, diffusers' negative_prompt=None; SD 1.x/2.x: the empty prompt)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1: none)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--height", type=int, default=None, help="default: 512 for SD 1.x/2.x, 1024 for SDXL")
    p.add_argument("--width", type=int, default=None, help="default: 512 for SD 1.x/2.x, 1024 for SDXL")
    # SDXL's micro-conditioning (label_emb): the sizes and crop it was told its training images had
    p.add_argument("--original-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="SDXL: the original image size to condition on (default: the output size)")
    p.add_argument("--crops-coords-top-left", type=int, nargs=2, default=None, metavar=("TOP", "LEFT"),
                   help="SDXL: the crop's top-left corner to condition on (default: 0 0)")
    p.add_argument("--target-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="SDXL: the target image size to condition on (default: the output size)")
    p.add_argument("--num-images", type=int, default=4, help="images to draw")
    p.add_argument("--batch-size", type=int, default=None, help="images per UNet batch (default: all at once)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="override the model's (from scheduler_config.json, else epsilon)")
    p.add_argument("--shifts", nargs="*", default=[], metavar="FILE[:SCALE]",
                   help="spectral-shift files to apply, each with an optional scale: ours, or svdiff-pytorch's "
                        "spectral_shifts.safetensors (its _te file beside it is read with it)")
    p.add_argument("--force", action="store_true", help="apply --shifts made on other base weights anyway")
    p.add_argument("--svd-cache", default=None, help="file to keep the SVD of the base weights in (with --shifts)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=list(loading.DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, help="output folder (default: a new numbered folder under out/, never "
                   "one an earlier run wrote)")
    return p.parse_args(argv)


def check_args(a):
    """Everything we can check before loading gigabytes: one clear line per problem."""
    for flag, side in (("--height", a.height), ("--width", a.width)):
        if side is not None and (side % 8 or side <= 0):
            raise ValueError(f"{flag} must be a positive multiple of 8, got {side}")
    for flag, pair, low in (("--original-size", a.original_size, 1), ("--target-size", a.target_size, 1),
                            ("--crops-coords-top-left", a.crops_coords_top_left, 0)):
        if pair is not None and min(pair) < low:
            raise ValueError(f"{flag} takes two {'positive' if low else 'non-negative'} numbers of pixels, got "
                             f"{' '.join(map(str, pair))}")
    if not 1 <= a.steps <= 1000:
        raise ValueError(f"--steps must be between 1 and 1000, got {a.steps}")
    if a.num_images < 1 or (a.batch_size is not None and a.batch_size < 1):
        raise ValueError("--num-images and --batch-size must be at least 1")
    cli.check_device(a.device)
    if a.svd_cache:
        check_svd_cache(a.svd_cache)
    apply_shifts.check_shift_files(a.shifts, "--shifts")
    cli.check_writable(Path(a.out or "out"), "--out")


def resolve_sizes(a, family: str):
    """The image size (default: 512, SDXL 1024, loading.DEFAULT_SIZE) and SDXL's micro-conditioning (default: the output
    size, crop 0 0, the output size, as diffusers' pipeline), from the model's family (loading.peek_family, before the
    model is loaded); the micro-conditioning flags are refused for a model without it."""
    given = [f for f, v in (("--original-size", a.original_size), ("--crops-coords-top-left", a.crops_coords_top_left),
                            ("--target-size", a.target_size)) if v is not None]
    if given and family != "sdxl":
        raise ValueError(f"{', '.join(given)}: SDXL's micro-conditioning, but the model is {family} (no "
                         "label_emb); leave them out")
    a.height = a.height or loading.DEFAULT_SIZE[family]
    a.width = a.width or loading.DEFAULT_SIZE[family]
    if family == "sdxl":
        a.original_size = a.original_size or [a.height, a.width]
        a.crops_coords_top_left = a.crops_coords_top_left or [0, 0]
        a.target_size = a.target_size or [a.height, a.width]


def new_folder(root: Path) -> Path:
    """The next numbered folder under `root` (000, 001, ...), created here so that no other run takes it."""
    root.mkdir(parents=True, exist_ok=True)
    n = max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=-1) + 1
    while True:
        try:
            (root / f"{n:03d}").mkdir()
            return root / f"{n:03d}"
        except FileExistsError:
            n += 1


def main(argv=None):
    a = parse_args(argv)
    check_args(a)
    # sample_config.json keeps the values used, not the "default" placeholders
    a.dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    a.batch_size = a.batch_size or a.num_images
    a.model = loading.choose_model(a.model, shift_files.parse_spec(a.shifts[0])[0] if a.shifts else None)
    resolve_sizes(a, loading.peek_family(a.model, half=loading.DTYPES[a.dtype] in loading.HALF))
    model = sd.load(a.model, device=a.device, dtype=loading.DTYPES[a.dtype], prediction_type=a.prediction_type, vocab=a.vocab)
    a.prediction_type = model.prediction_type
    if a.shifts:
        apply_shifts.apply_shift_files(model, a.shifts, force=a.force, cache=a.svd_cache)
    generator = torch.Generator("cpu").manual_seed(a.seed)
    # All initial latents first, from one generator, as diffusers draws them for num_images_per_prompt.
    latents = sd.initial_latents(model, a.num_images, a.height, a.width, generator)
    images = []
    for i in range(0, a.num_images, a.batch_size):
        n = min(a.batch_size, a.num_images - i)
        images += sd.to_pil(sd.text_to_image(model, [a.prompt] * n, a.negative_prompt, a.steps, a.guidance,
                                             a.eta, generator, a.height, a.width, latents=latents[i:i + n],
                                             original_size=a.original_size, crop_top_left=a.crops_coords_top_left or
                                             (0, 0), target_size=a.target_size))
    out = Path(a.out) if a.out else new_folder(Path("out"))
    out.mkdir(parents=True, exist_ok=True)
    a.out = str(out)
    for i, im in enumerate(images):  # each file whole or not at all (Ctrl-C, a full disk)
        save_png(im, out / f"{i:03d}.png")
    save_png(sd.grid(images), out / "grid.png")
    atomic_write(lambda p: p.write_text(json.dumps(vars(a), indent=2)), out / "sample_config.json")
    print(f"wrote {cli.plural(len(images), 'image')} and grid.png to {out}")


if __name__ == "__main__":
    cli.run(main, "--batch-size 1, --dtype fp16 or a smaller --height/--width")
