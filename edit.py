"""Edit one image by changing its prompt (SVDiff §3.4, "CoSINE" on the project page).

    python edit.py --image cat.jpg --prompt "a photo of a cat" --edit "a photo of a cat wearing a hat"

1. Fine-tune spectral shifts on the one image-prompt pair: train.py's loop with no prior (λ = 0), text encoder
   included, the prompt taken literally (no special token). `--shifts FILE` reuses an earlier run's shifts.
2. For each --edit prompt c: DDIM inversion of the image's latent with the fine-tuned model, guidance 1,
   conditioned on c (Eq. 6), then DDIM sampling from z_T with --guidance. More freedom for structural edits:
   --eta > 0, --slerp α (z_T mixed with the seed's noise, Eq. 7), or --no-inversion (from noise alone).

Outputs in --out (default edits/{image stem}): shifts.safetensors, edit{i}_{prompt}_seed{s}.png per edit and
seed, comparison.png (input, then the edits, each prompt written under its image), edit_config.json (the
resolved arguments); when it trains, also train.py's config.json, log.jsonl and resume.pt. Its flags and their
checks are support/edit_args.py's; the comparison sheet support/sheet.py's.
"""
import json
import re
import sys
from pathlib import Path

import torch

import ddim
import sd
import svdiff
import train
from support import apply_shifts, cli, edit_args, photos, run_folder, sheet, train_args


def main(argv=None):
    a = edit_args.parse(argv)  # the flags and every check of them, before anything is loaded
    t = resolve(a)
    out = Path(a.out)
    loaded = photos.load_image_folder(Path(a.image), a.resolution, "--image")  # train.py's image handling
    image, crop = loaded[0][0], loaded[2][0]
    # SDXL's micro-conditioning of the inversion and of the edits: the image's own (as in its fine-tuning), its
    # original size and centre crop, made at R x R
    sizes = dict(original_size=crop.original_size, crop_top_left=crop.top_left,
                 target_size=(a.resolution, a.resolution))

    if a.shifts:
        model = sd.load(t.model, device=t.device, dtype=train_args.weight_dtype(t), vocab=t.vocab)
        apply_shifts.apply_shift_files(model, [a.shifts], force=a.force, cache=t.svd_cache)  # merged, U, V freed
        apply_shifts.copy_shift_file(a.shifts, out)
    else:
        try:
            model = train.train(t, [loaded])  # writes shifts.safetensors (and config.json, log.jsonl, resume.pt)
        except run_folder.Interrupted as e:
            print(edit_args.interrupted_line(e, a), file=sys.stderr)
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
            photos.save_png(im, out / output_name(i, prompt, seed))
            row.append((im, prompt if len(a.seed) == 1 else f"{prompt} (seed {seed})"))
    photos.save_png(sheet.comparison(rows), out / "comparison.png")
    print(f"done: {cli.plural(len(a.edit) * len(a.seed), 'edit')} and comparison.png in {out}")


def resolve(a) -> train.Settings:
    """The fine-tuning's settings, resolved and checked as train.py's are (the model, resolution, device); `a` gets
    the resolution, dtype and gradient checkpointing they settle on (SDXL: 1024 px, on)."""
    t = train_args.resolve(fine_tuning(a))
    a.dtype, a.resolution, a.grad_checkpointing = t.dtype, t.resolution, t.grad_checkpointing
    return t


def fine_tuning(a) -> train.Settings:
    """train.py's loop on the one image, with the paper's values for editing: its prompt taken literally (braces
    escaped, so no {token}; a .txt caption ignored), no prior (λ = 0), every weight including the text encoder,
    the authors' learning rates (--lr 1e-3, --lr-1d 1e-6) and no sample grids (the edits are the samples)."""
    return train.Settings(images=[a.image], instance_prompt=a.prompt.replace("{", "{{").replace("}", "}}"),
                          no_captions=True, no_prior=True, subset="all", steps=a.steps, lr=a.lr, lr_1d=a.lr_1d,
                          seed=a.seed[0], device=a.device, out=a.out, sample_every=0, model=a.model, vocab=a.vocab,
                          dtype=a.dtype, svd_cache=a.svd_cache, resolution=a.resolution,
                          grad_checkpointing=a.grad_checkpointing, overwrite=a.overwrite)


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
    return svdiff.ddim_invert(unet, z.float(), steps, ddim.alphas_cumprod(), model.prediction_type, model_at,
                              progress)


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


def output_name(i, prompt, seed):
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60]
    return f"edit{i:02d}_{slug}_seed{seed}.png"


if __name__ == "__main__":
    cli.run(main, "--grad-checkpointing, a smaller --resolution or --dtype fp16")
