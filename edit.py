"""Edit one image by changing its prompt (SVDiff §3.4, "CoSINE" on the project page).

    python edit.py --image cat.jpg --prompt "a photo of a cat" --edit "a photo of a cat wearing a hat"

1. Fine-tune spectral shifts on the one image-prompt pair: train.py's loop with no prior (λ = 0), text encoder
   included, the prompt taken literally (no special token). `--shifts FILE` reuses an earlier run's shifts.
2. For each --edit prompt c: DDIM inversion of the image's latent with the fine-tuned model, guidance 1,
   conditioned on c (Eq. 6), then DDIM sampling from z_T with --guidance. More freedom for structural edits:
   --eta > 0, --slerp α (z_T mixed with the seed's noise, Eq. 7), or --no-inversion (from noise alone).

Outputs in --out (default edits/{image stem}): shifts.safetensors, edit{i}_{prompt}_seed{s}.png per edit and
seed, comparison.png (input, then the edits, each prompt written under its image), edit_config.json (the
resolved arguments); when it trains, also train.py's config.json, log.jsonl and resume.pt.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

import data
import ddim
import run_folder
import sd
import shifts
import svdiff
import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=sd.HelpFormatter)
    p.add_argument("--image", default=None, help="the photo to edit (JPEG/PNG/WebP/BMP)")
    p.add_argument("--prompt", default=None, help="describes the input image, no special token: 'a photo of a cat'")
    p.add_argument("--edit", action="append", default=None,
                   help="a target prompt, e.g. 'a photo of a cat wearing a hat'; repeat for several edits")
    p.add_argument("--model", default=None,
                   help="SD 1.x/2.x/XL single file, diffusers folder or Hugging Face Hub id owner/name[@revision] "
                        f"(default: the base model --shifts records, else $SVDIFF_MODEL, else {sd.DEFAULT_MODEL})")
    p.add_argument("--vocab", default=None, help="CLIP BPE vocabulary for single-file models (default: the shipped "
                   "bpe_simple_vocab_16e6.txt.gz)")
    # fine-tuning (the authors' single-image recipe: 500 steps, batch 1, lr 1e-3 / 1e-6, text encoder, no prior)
    p.add_argument("--shifts", default=None, help="shift file of an earlier run on this image (ours, or "
                   "svdiff-pytorch's spectral_shifts.safetensors with its _te file beside it): skip fine-tuning")
    p.add_argument("--force", action="store_true", help="apply --shifts made on other base weights anyway")
    p.add_argument("--steps", type=int, default=500, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the matrix (2-D/4-D) shifts")
    p.add_argument("--lr-1d", type=float, default=1e-6, help="learning rate of the norm (1-D) shifts")
    p.add_argument("--svd-cache", default=None,
                   help="file to keep the SVD of the base weights in, reused next time (also with --shifts)")
    # editing (authors' recipe: inversion with guidance 1, sampling with guidance 3)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM sampling steps")
    p.add_argument("--inversion-steps", type=int, default=None, help="DDIM inversion steps (default: --sample-steps)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance of the sampling (<= 1: none)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the sampling (> 0: more change; authors 0.1-0.5)")
    p.add_argument("--slerp", type=float, default=None, metavar="ALPHA",
                   help="Eq. 7: start from slerp(ALPHA, z_T, noise of the seed), ALPHA in [0, 1] (authors 0.5)")
    p.add_argument("--inversion-model-at", choices=["source", "target"], default="source",
                   help="where each inversion step evaluates the UNet: at the latent's own level (exact reverse of "
                        "DDIM sampling) or one step ahead, as diffusers' inversion pipelines do")
    p.add_argument("--no-inversion", action="store_true", help="start from noise, not the inverted image")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one image per edit and seed (the first also seeds fine-tuning); seeds matter only with "
                        "--eta > 0, --slerp or --no-inversion")
    p.add_argument("--resolution", type=int, default=None,
                   help="shorter side resized to this, centre crop (default: 1024 for SDXL, 512 for SD 1.x/2.x)")
    # hardware and outputs
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=list(sd.DTYPES), default=None,
                   help="weights and autocast on CUDA (default bf16 where supported, else fp16); CPU runs fp32")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute UNet activations in fine-tuning: less memory, one more UNet forward per step "
                        "(default: on for SDXL, off for SD 1.x/2.x)")
    p.add_argument("--out", default=None, help="output folder (default edits/{image stem})")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    return p.parse_args(argv)


def check_args(a):
    """edit.py's own flags; train.resolve checks the rest (model, resolution, device, --out) before anything
    is loaded or written."""
    if not a.image:
        raise ValueError("no --image: pass the photo to edit, e.g. --image cat.jpg")
    if Path(a.image).is_dir():
        raise ValueError(f"--image {a.image} is a folder; edit.py edits one photo: pass its file, e.g. "
                         f"--image {Path(a.image) / 'cat.jpg'}")
    data.check_images(Path(a.image), "--image")  # a readable image (loaded once the resolution is known)
    if not a.prompt or not a.prompt.strip():
        raise ValueError("--prompt is empty: describe the input image, e.g. --prompt 'a photo of a cat'")
    if not a.edit:
        raise ValueError("no --edit: give at least one target prompt, e.g. --edit 'a photo of a cat wearing a hat'")
    if any(not e.strip() for e in a.edit):
        raise ValueError("an --edit prompt is empty: each --edit is a target prompt, e.g. 'a photo of a cat "
                         "wearing a hat'")
    for name in ("sample_steps", "inversion_steps"):
        if not 1 <= getattr(a, name) <= 1000:
            raise ValueError(f"--{name.replace('_', '-')} must be between 1 and 1000, got {getattr(a, name)}")
    if a.slerp is not None and not 0 <= a.slerp <= 1:
        raise ValueError(f"--slerp must be between 0 (the inverted latent) and 1 (pure noise), got {a.slerp}")
    if a.slerp is not None and a.no_inversion:
        raise ValueError("--slerp mixes the inverted latent with noise, and --no-inversion has none; choose one")
    if a.eta < 0:
        raise ValueError(f"--eta must be at least 0, got {a.eta}")
    if any(s < 0 for s in a.seed):
        raise ValueError("--seed takes non-negative integers")
    if a.shifts:
        shifts.check_shift_files([a.shifts], "--shifts")


def train_args(a):
    """train.py's arguments for the single-image fine-tuning: the image with its prompt taken literally (braces
    escaped, so no {token}; .txt captions ignored), no prior (λ = 0), every weight including the text encoder,
    no sample grids (the edits are the samples). The same checks and image handling as train.py, by construction."""
    literal = a.prompt.replace("{", "{{").replace("}", "}}")
    argv = [f"--images={a.image}", f"--instance-prompt={literal}", "--no-captions", "--no-prior", "--subset=all",
            f"--steps={a.steps}", f"--lr={a.lr}", f"--lr-1d={a.lr_1d}", f"--seed={a.seed[0]}", f"--device={a.device}",
            f"--out={a.out}", "--sample-every=0"]
    for flag, value in (("model", a.model), ("vocab", a.vocab), ("dtype", a.dtype), ("svd-cache", a.svd_cache),
                        ("resolution", a.resolution)):
        if value is not None:
            argv.append(f"--{flag}={value}")
    if a.grad_checkpointing is not None:  # (None: train.py's default for the family)
        argv.append("--grad-checkpointing" if a.grad_checkpointing else "--no-grad-checkpointing")
    argv += ["--overwrite"] * a.overwrite
    return train.parse_args(argv)


def resolve(a):
    """Fill in the defaults and check everything before anything is loaded or written (train.resolve does the
    model, resolution, device and --out, and gives the defaults that depend on the model's family: SDXL's 1024 px
    and gradient checkpointing). Returns train.py's resolved arguments; `a` gets the same resolution, dtype and
    gradient checkpointing."""
    a.inversion_steps = a.sample_steps if a.inversion_steps is None else a.inversion_steps
    check_args(a)
    a.out = a.out or str(Path("edits") / Path(a.image).stem)
    out = Path(a.out)
    if not a.overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} already holds outputs; pass --overwrite to replace them, or another --out")
    a.model = sd.choose_model(a.model, a.shifts)
    t = train.resolve(train_args(a))  # train.py's checks: model, resolution, device, writable --out
    a.dtype, a.resolution, a.grad_checkpointing = t.dtype, t.resolution, t.grad_checkpointing
    return t


# ---------------------------------------------------------------------------------------------------------------
# Editing


@torch.no_grad()
def encode_image(model, image):
    """z* = the VAE's mean × scale: inversion starts from the one most likely latent, not a sample."""
    p = next(model.vae.parameters())
    mean, _ = model.vae.encode(image[None].to(p.device, p.dtype))
    return mean * model.vae.cfg.scaling_factor


@torch.no_grad()
def invert(model, z, prompt, steps, model_at="source", progress=True, sizes=None):
    """Eq. 6: z_T = DDIMInvert(z*, c; θ′), guidance 1, conditioned on the TARGET prompt c (`sizes`: SDXL's
    micro-conditioning, sd.encode_prompts' original_size, crop_top_left, target_size). The steps add up in fp32 even
    when the UNet runs in half precision (the rounding would add up over the steps too)."""
    cond = sd.encode_prompts(model, [prompt], **(sizes or {}))
    dtype = next(model.unet.parameters()).dtype
    unet = lambda x, t: model.unet(x.to(dtype), t, cond.context, cond.y).float()
    return svdiff.ddim_invert(unet, z.float(), steps, ddim.alphas_cumprod(), model.prediction_type, progress,
                              model_at)


def edit_image(model, z_T, prompt, seed, a, progress=True, sizes=None):
    """DDIM sampling (sd.text_to_image) of `prompt` from the inverted z_T, from slerp(α, z_T, ε) (Eq. 7), or,
    with z_T None, from noise (`sizes`: SDXL's micro-conditioning, as `invert`). The seed's generator draws ε first,
    then the η-noise of each step."""
    g = torch.Generator("cpu").manual_seed(seed)
    latents = z_T
    if z_T is not None and a.slerp is not None:
        latents = svdiff.slerp(a.slerp, z_T, sd.initial_latents(model, 1, a.resolution, a.resolution, g))
    if latents is not None:
        latents = latents.to(next(model.unet.parameters()).dtype)  # text_to_image runs in the model's dtype
    return sd.text_to_image(model, [prompt], steps=a.sample_steps, guidance=a.guidance, eta=a.eta, generator=g,
                            height=a.resolution, width=a.resolution, latents=latents, progress=progress,
                            **(sizes or {}))


def comparison(rows):
    """rows of [(PIL image, caption)] -> one sheet with each caption written under its image (PIL's default
    font, word-wrapped to the image width)."""
    from PIL import Image, ImageDraw, ImageFont
    w, h = rows[0][0][0].size
    try:
        font = ImageFont.load_default(size=max(10, w // 32))  # scalable where Pillow has FreeType
    except (ImportError, OSError, TypeError):
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrap(text):
        lines = [""]
        for word in text.split():
            line = f"{lines[-1]} {word}".strip()
            if draw.textlength(line, font=font) <= w - 8 or not lines[-1]:
                lines[-1] = line
            else:
                lines.append(word)
        return lines

    wrapped = [[wrap(caption) for _, caption in row] for row in rows]
    line_h = font.getbbox("Ay")[3] + 3
    caption_h = max(len(lines) for row in wrapped for lines in row) * line_h + 8
    sheet = Image.new("RGB", (max(len(r) for r in rows) * w, len(rows) * (h + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (im, _) in enumerate(row):
            x, y = c * w, r * (h + caption_h)
            sheet.paste(im, (x, y))
            for k, line in enumerate(wrapped[r][c]):
                draw.text((x + 4, y + h + 4 + k * line_h), line, fill="black", font=font)
    return sheet


def output_name(i, prompt, seed):
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]
    return f"edit{i:02d}_{slug}_seed{seed}.png"


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    a = parse_args(argv)
    t = resolve(a)
    out = Path(a.out)
    loaded = data.load_image_folder(Path(a.image), a.resolution, "--image")  # train.py's image handling
    image, crop = loaded[0][0], loaded[2][0]
    # SDXL's micro-conditioning of the inversion and of the edits: the image's own (as in its fine-tuning), its
    # original size and centre crop, made at R x R
    sizes = dict(original_size=crop.original_size, crop_top_left=crop.top_left,
                 target_size=(a.resolution, a.resolution))

    if a.shifts:
        model = sd.load(t.model, device=t.device, dtype=train.weight_dtype(t), vocab=t.vocab)
        shifts.apply_shift_files(model, [a.shifts], force=a.force, cache=t.svd_cache)  # merged, U and V dropped
        out.mkdir(parents=True, exist_ok=True)
        copies = {Path(a.shifts): out / "shifts.safetensors"}
        te = shifts.svdiff_pytorch_te_file(a.shifts)  # an svdiff-pytorch file's text-encoder half goes with it
        if te:
            copies[te] = out / "shifts_te.safetensors"
        for src, dst in copies.items():
            if not dst.exists() or not dst.samefile(src):
                svdiff.atomic_write(lambda p: shutil.copyfile(src, p), dst)
    else:
        try:
            model = train.train(t, [loaded])  # writes shifts.safetensors (and config.json, log.jsonl, resume.pt)
        except run_folder.Interrupted as e:
            saved = f"the shifts of step {e.step} are in {out / 'shifts.safetensors'} (edit with them as they are: " \
                    "--shifts FILE); " if e.saved else ""
            print(f"stopped at fine-tuning step {e.step} of {a.steps}, nothing edited; {saved}--overwrite starts "
                  "afresh", file=sys.stderr)
            sys.exit(130)
        # Merged only now: after the last optimizer step, and after the shift file was saved with the base
        # weights' fingerprint (merging changes those weights). Never unmerged, so no copy of W is kept.
        svdiff.bake(model)
    for stale in list(out.glob("edit[0-9][0-9]_*.png")) + [out / "comparison.png"]:  # --overwrite
        stale.unlink(missing_ok=True)
    (out / "edit_config.json").write_text(json.dumps(vars(a), indent=2))

    z = encode_image(model, image)
    inputs = sd.to_pil(((image + 1) / 2).clamp(0, 1)[None])[0]  # the cropped image that was inverted
    rows = [[(inputs, f"input: {a.prompt}")] for _ in a.seed]
    for i, prompt in enumerate(a.edit):
        z_T = None if a.no_inversion else invert(model, z, prompt, a.inversion_steps, a.inversion_model_at,
                                                 sizes=sizes)
        for row, seed in zip(rows, a.seed):
            im = sd.to_pil(edit_image(model, z_T, prompt, seed, a, sizes=sizes))[0]
            svdiff.atomic_write(lambda p: im.save(p, format="PNG"), out / output_name(i, prompt, seed))
            row.append((im, prompt if len(a.seed) == 1 else f"{prompt} (seed {seed})"))
    svdiff.atomic_write(lambda p: comparison(rows).save(p, format="PNG"), out / "comparison.png")
    print(f"done: {sd.plural(len(a.edit) * len(a.seed), 'edit')} and comparison.png in {out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        print("error: out of GPU memory; try --grad-checkpointing, a smaller --resolution or --dtype fp16",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
