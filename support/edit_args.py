"""edit.py's flags and their checks, done before anything is loaded, fetched or written."""
import argparse
from pathlib import Path

import torch

from support import apply_shifts, cli, loading, photos


def parse(argv=None):
    p = argparse.ArgumentParser(description="Edit one image by changing its prompt (SVDiff §3.4, \"CoSINE\" on the "
                                            "project page).", formatter_class=cli.HelpFormatter)
    p.add_argument("--image", default=None, help="the photo to edit (JPEG/PNG/WebP/BMP)")
    p.add_argument("--prompt", default=None, help="describes the input image, no special token: 'a photo of a cat'")
    p.add_argument("--edit", action="append", default=None,
                   help="a target prompt, e.g. 'a photo of a cat wearing a hat'; repeat for several edits")
    p.add_argument("--model", default=None,
                   help="SD 1.x/2.x/XL single file, diffusers folder or Hugging Face Hub id owner/name[@revision] "
                        f"(default: the base model --shifts records, else $SVDIFF_MODEL, else {loading.DEFAULT_MODEL})")
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
    p.add_argument("--dtype", choices=list(loading.DTYPES), default=None,
                   help="weights and autocast on CUDA (default bf16 where supported, else fp16); CPU runs fp32")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute UNet activations in fine-tuning: less memory, one more UNet forward per step "
                        "(default: on for SDXL, off for SD 1.x/2.x)")
    p.add_argument("--out", default=None, help="output folder (default edits/{image stem})")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    a = p.parse_args(argv)
    check(a)
    return a



def check(a):
    """edit.py's own flags, their defaults that depend on others, and --out; train_args.resolve checks the
    fine-tuning's (model, resolution, device) before anything is loaded or written."""
    a.inversion_steps = a.sample_steps if a.inversion_steps is None else a.inversion_steps
    if not a.image:
        raise ValueError("no --image: pass the photo to edit, e.g. --image cat.jpg")
    if Path(a.image).is_dir():
        raise ValueError(f"--image {a.image} is a folder; edit.py edits one photo: pass its file, e.g. "
                         f"--image {Path(a.image) / 'cat.jpg'}")
    photos.check_images(Path(a.image), "--image")  # a readable image (loaded once the resolution is known)
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
        apply_shifts.check_shift_files([a.shifts], "--shifts")
    a.out = a.out or str(Path("edits") / Path(a.image).stem)
    out = Path(a.out)
    if not a.overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} already holds outputs; pass --overwrite to replace them, or another --out")
    a.model = loading.choose_model(a.model, a.shifts)


def interrupted_line(e, a) -> str:
    """Ctrl-C during the fine-tuning (run_folder.Interrupted): what is kept, and the ways on."""
    saved = f"the shifts of step {e.step} are in {Path(a.out) / 'shifts.safetensors'} (edit with them as they are: " \
            "--shifts FILE); " if e.saved else ""
    return f"stopped at fine-tuning step {e.step} of {a.steps}, nothing edited; {saved}--overwrite starts afresh"
