"""train.py's flags (their help), the defaults that depend on other flags or on the model's family, --resume's
settings, and every check of them, done before anything is loaded, fetched or written (the Settings themselves,
with their defaults and why, are train.py's first screen)."""
import argparse
import dataclasses
import string
import sys
from pathlib import Path

import torch

import svdiff
from support import cli, loading, photos, run_folder
from support.svd_cache import check_svd_cache


def parse(argv, defaults):
    """The command line as `defaults`' dataclass (train.Settings), and in its `given` which flags were typed
    (--resume keeps the run's recorded values of the others)."""
    values = vars(parser(defaults).parse_args(argv))
    return dataclasses.replace(defaults, **values, given=cli.given_flags(parser(defaults), argv))


def parser(defaults):
    """The flags, named as the Settings' fields, whose values are their defaults (set_defaults)."""
    p = argparse.ArgumentParser(description="Personalize Stable Diffusion with spectral shifts (SVDiff, Han et al. "
                                            "2023).", formatter_class=cli.HelpFormatter)
    p.add_argument("--images", action="append", help="folder of subject images (3-5 is typical), or one image file")
    p.add_argument("--token", action="append",
                   help="rare token naming the subject, e.g. sks (needed when a prompt uses {token})")
    p.add_argument("--class-word", action="append",
                   help="subject class (default: the folder's name, or the image file's name without suffix)")
    p.add_argument("--model", help="SD 1.x/2.x/XL single file, diffusers folder or Hugging Face Hub id "
                   f"owner/name[@revision] (default: $SVDIFF_MODEL, else {loading.DEFAULT_MODEL}; with --resume, the "
                   "run's own)")
    p.add_argument("--vocab", help="CLIP BPE vocabulary for single-file models (default: the shipped "
                   "bpe_simple_vocab_16e6.txt.gz)")
    p.add_argument("--instance-prompt", help="prompt of the subject's images ({token}, {class} filled in)")
    p.add_argument("--class-prompt", help="prompt of the class images")
    p.add_argument("--no-captions", action="store_true",
                   help="ignore .txt captions beside the images: every image gets --instance-prompt")
    p.add_argument("--cutmix-prob", type=float, help="chance that an example is a two-subject collage")
    p.add_argument("--cutmix-prompt", help="prompt of a collage ({left}, {right}: '{token} {class}' of each half)")
    p.add_argument("--unmix-weight", type=float, help="weight of the cross-attention separation loss on collages")
    p.add_argument("--prior-weight", type=float, help="λ of Eq. 3")
    p.add_argument("--no-prior", action="store_true", help="train without prior preservation (λ = 0)")
    p.add_argument("--num-class-images", type=int, help="class images per subject (generated once)")
    p.add_argument("--class-dir", help="class image cache (default: {out}/class_images)")
    p.add_argument("--class-steps", type=int, help="DDIM steps for generating class images")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, help="instance images per step (+ as many class images)")
    p.add_argument("--lr", type=float, help="learning rate of the matrix (2-D/4-D) shifts")
    p.add_argument("--lr-1d", type=float, help="learning rate of the norm (1-D) shifts")
    p.add_argument("--subset", help="which weights get shifts: " + ", ".join(svdiff.SUBSETS))
    p.add_argument("--rank", type=int, help="shift only the k largest singular values per matrix")
    p.add_argument("--svd-cache", help="file to keep the SVD of the base weights in, reused next time")
    p.add_argument("--resolution", type=int,
                   help="shorter side resized to this, centre crop (default: 1024 for SDXL, 512 for SD 1.x/2.x)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--seed", type=int, help="seed of every random draw")
    p.add_argument("--device", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=list(loading.DTYPES),
                   help="autocast dtype on CUDA (default bf16 where supported, else fp16); CPU runs fp32")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute UNet activations in the backward pass: less memory, one more UNet forward "
                        "per step (default: on for SDXL, off for SD 1.x/2.x)")
    p.add_argument("--out", help="output folder (default runs/{token})")
    p.add_argument("--save-every", type=int, help="write the shift file and resume.pt every N steps")
    p.add_argument("--keep-every", type=int, help="also keep the shift file of every N-th step (and the last) as "
                   "step-NNNNN.safetensors, for eval.py to compare (0: none)")
    p.add_argument("--half", action="store_true", help="store the shift file in fp16 (half the size)")
    p.add_argument("--sample-every", type=int, help="sample grid every N steps and at the end (0: none)")
    p.add_argument("--sample-prompt", help="prompt of the sample grids (default: the instance prompt; with several "
                   "subjects 'a {token1} {class1} sitting beside a {token2} {class2}')")
    p.add_argument("--sample-steps", type=int, help="DDIM steps of the sample grids")
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN",
                   help="continue the run in folder RUN (default: --out) from its last saved step, with the settings "
                        "of its config.json; only --steps, --save-every, --keep-every, --sample-every, --sample-prompt, "
                        "--sample-steps, --device, --dtype, --grad-checkpointing, --svd-cache and --half may change")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an existing --out")
    p.set_defaults(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name != "given"})
    return p


# ---------------------------------------------------------------------------------------------------------------
# Checks before anything is loaded or written


def check_args(a):
    if not a.images:
        raise ValueError("no --images: pass a folder of the subject's photos (3-5 is typical), e.g. --images ./dog; "
                         "or --resume RUN to continue a run")
    for folder in a.images:  # (loaded in `train`; one with no readable image is refused before a model is fetched)
        photos.check_images(Path(folder))
    if not a.token and len(a.images) > 1:
        raise ValueError("several --images folders need one --token each (e.g. --token sks --token zwx)")
    if not a.token and uses_token(a.instance_prompt):
        raise ValueError("the instance prompt uses {token}: pass --token with a rare word such as sks, or an "
                         "--instance-prompt without {token}")
    if a.token and len(a.images) != len(a.token):
        raise ValueError(f"--images and --token come in pairs: got {cli.plural(len(a.images), 'folder')}, "
                         f"{cli.plural(len(a.token), 'token')}")
    if a.class_word and len(a.class_word) != len(a.images):
        raise ValueError("give one --class-word per --images folder, or none (then the folder names are used)")
    if a.resolution is not None and (a.resolution % 8 or a.resolution < 8):  # (None: the family's default)
        raise ValueError(f"--resolution must be a positive multiple of 8, got {a.resolution}")
    if not 0 <= a.cutmix_prob <= 1:
        raise ValueError(f"--cutmix-prob must be between 0 and 1, got {a.cutmix_prob}")
    if a.token and len(set(a.token)) != len(a.token):
        raise ValueError("each subject needs its own --token")
    for name in ("steps", "batch_size", "save_every", "num_class_images"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("class_steps", "sample_steps"):  # DDIM steps of the 1000-step schedule
        if not 1 <= getattr(a, name) <= 1000:
            raise ValueError(f"--{name.replace('_', '-')} must be between 1 and 1000, got {getattr(a, name)}")
    if a.rank is not None and a.rank < 1:
        raise ValueError(f"--rank must be at least 1 (leave it out for every singular value), got {a.rank}")
    if a.token and any(not t.strip() for t in a.token):
        raise ValueError("--token is empty: pass a rare word such as sks")
    for name in ("lr", "lr_1d", "prior_weight", "unmix_weight"):  # (float32 holds δ, AdamW's steps and the loss)
        if not 0 <= getattr(a, name) <= torch.finfo(torch.float32).max or (name == "lr" and a.lr == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a {'positive' if name == 'lr' else 'non-negative'} "
                             f"finite number, got {getattr(a, name)}")
    if a.sample_every < 0:
        raise ValueError("--sample-every must be at least 0 (0: no sample grids)")
    if a.keep_every < 0:
        raise ValueError("--keep-every must be at least 0 (0: keep no numbered shift files)")
    if a.subset not in svdiff.SUBSETS:
        raise ValueError(f"--subset {a.subset!r} is not one of {', '.join(svdiff.SUBSETS)}")
    cli.check_device(a.device)
    if a.svd_cache:
        check_svd_cache(a.svd_cache)
    out = Path(a.out)
    cli.check_writable(out, "--out")
    if a.resume and run_folder.holds_run(out):
        run_folder.resume_files(out)  # the pair belongs together (checked again, with the model, when resuming)
        if run_folder.saved_step(out) >= a.steps:
            raise ValueError(f"--resume: {out} already reached step {run_folder.saved_step(out)} of --steps "
                             f"{a.steps}; pass a larger --steps to train longer")
    if not a.resume and not a.overwrite and run_folder.holds_run(out):
        raise ValueError(f"--out {out} already holds a run; continue it with --resume {out}, or pass --overwrite "
                         "to replace it")
    if not a.resume and not a.overwrite and not run_folder.only_run_files(out):
        raise ValueError(f"--out {out} holds other files; choose an empty or new folder, or pass --overwrite")


def uses_token(prompt: str) -> bool:
    """Does the prompt have a {token} field? (str.format's own parser: "{{token}}" is a literal, not a field.)"""
    return any(field == "token" for _, field, _, _ in string.Formatter().parse(prompt))


def common_word_warning(tokenizer, token: str):
    """A token that is already a frequent word (a single early BPE merge) carries a prior meaning that training
    must fight; DreamBooth practice is a rare token such as `sks`."""
    ids = tokenizer.encode(token)
    if len(ids) == 1 and ids[0] < 20000 and token.isalpha():  # ids follow merge order: low id = frequent
        print(f"warning: --token {token!r} is a common word in the CLIP vocabulary; a rare token such as 'sks' "
              "keeps its old meaning from interfering", file=sys.stderr)


def resolve(a):
    """Fill in the defaults that depend on other flags (with --resume: the run's recorded settings), and check
    everything before anything is loaded, fetched or written. Returns `a`, ready for `train`."""
    if a.resume and a.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; choose one")
    if a.resume:
        resume_settings(a)
    a.class_word = a.class_word or class_words(a.images)
    a.out = a.out or default_out(a)
    a.class_dir = a.class_dir or str(Path(a.out) / "class_images")
    a.prior_weight = 0.0 if a.no_prior else a.prior_weight
    check_args(a)
    shift_file = Path(a.out) / "shifts.safetensors"
    if a.resume and "model" not in a.given and shift_file.is_file():
        # the base model the shift file records: a Hub id pinned to the commit it was trained on. (A --model that
        # names it at another place, a moved file, is judged by the weights' fingerprint, not by its path.)
        a.model = None
    a.model = loading.choose_model(a.model, shift_file if a.resume else None)
    if a.dtype is None:
        a.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if a.device.startswith("cuda") else "fp32"
    if a.resolution is None or a.grad_checkpointing is None:
        # The defaults that depend on the model's family, known before anything is loaded: a file's header, a
        # folder's layout; a Hub id is fetched here as `train` will load it (the same files, from the cache).
        family = loading.peek_family(a.model, half=weight_dtype(a) in loading.HALF)
        # SDXL was trained at 1024 px; at 512 it makes worse images (and its micro-conditioning would say so)
        a.resolution = a.resolution or loading.DEFAULT_SIZE[family]
        if a.grad_checkpointing is None:
            # On for SDXL: at 1024 px (4x the pixels of SD's 512) through a UNet 3x SD1.5's, the activations kept
            # for the backward pass grow past what a 24 GB GPU has beside the weights and factors (as DreamBooth-SDXL
            # recipes expect; with it a step peaks at 16.6 GB on an H200, docs/performance.md); recomputing them
            # costs one more UNet forward per step. --no-grad-checkpointing where memory allows.
            a.grad_checkpointing = family == "sdxl"
    return a


def resume_settings(a):
    """--resume [RUN]: the run folder (RUN, else --out), and every setting from its config.json but those today's
    command line may change (run_folder.MAY_CHANGE)."""
    run = Path(a.resume if a.resume is not True else a.out or default_out(a))
    if a.resume is not True and a.out and Path(a.out).resolve() != run.resolve():
        raise ValueError(f"--resume {run} and --out {a.out} name different folders; --resume RUN continues the run "
                         "in RUN: leave --out out")
    run_folder.merge_config(a, a.given, run_folder.read_config(run), run)
    a.out = str(run)
    if not run_folder.holds_run(run):
        print(f"note: {run} has no saved step (the run stopped before its first); starting it afresh with its "
              "settings")


def class_words(images) -> list[str]:
    """The default --class-word of each subject: its folder's name, or its one image file's name."""
    return [p.stem if p.is_file() else p.resolve().name for p in map(Path, images or [])]


def default_out(a) -> str:
    """runs/{token} (several subjects: runs/{token1}_{token2}; no token: the class words)."""
    names = a.token or a.class_word or class_words(a.images)
    if not names:
        raise ValueError("--resume: name the run's folder, e.g. --resume runs/sks")
    return str(Path("runs") / "_".join(names))


def weight_dtype(a):
    """The frozen weights' dtype: the autocast dtype on CUDA (half the memory), fp32 on CPU."""
    return loading.DTYPES[a.dtype] if a.device.startswith("cuda") else torch.float32


