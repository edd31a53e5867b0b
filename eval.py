"""Measure a personalization as the papers do: DINO, CLIP-I and CLIP-T on DreamBench's prompts.

As DreamBooth (Ruiz et al. 2023, §4.1) measures, for one shift file or several (e.g. the steps --keep-every kept),
beside two reference rows.

    python eval.py --shifts runs/sks/shifts.safetensors --images ./dog
    python eval.py --shifts 'runs/sks/step-*.safetensors'               # compare saved steps (photos: the run's)

Every shift file samples --num-images images of each prompt ("a sks dog in the snow"); prompt n's noise comes from
seed + n, the same for every row, so two files are compared on the same noise (and image j of prompt n is sample.py's
image j with --seed seed+n). With g a generated image, r a reference photo, t g's prompt with the subject's token left
out ("a dog in the snow") and cos the cosine similarity of two embeddings:
    DINO    mean over every (g, r) of cos(DINO(g), DINO(r)); DINO: the [CLS] embedding of ViT-S/16 (facebook/dino-vits16)
    CLIP-I  the same with CLIP's image embeddings (openai/clip-vit-base-patch32)
    CLIP-T  mean over g of cos(CLIP(g), CLIP(t))
CLIP-T leaves the token out because the token is a word CLIP has no meaning for ("sks"): kept, it would score how
CLIP reads a rare word, not whether the image shows the prompt; the scores of the rows are then comparable, the base
row's included. Reference rows: `real`, the photos against each other (each pair of two different photos: the
ceiling of DINO and CLIP-I), and `base`, the base model on the same prompts with the class word alone ("a dog in the
snow": what personalization must beat on DINO and CLIP-I, and where CLIP-T starts).

Writes into --out (default eval/{token}): eval.json (per prompt and overall: mean and standard error over the images),
images/{row}/{prompt}_{image}.png, sheet.png (a row per prompt: a photo, then each row's first image), and, where
matplotlib is installed, scatter.png (CLIP-T against DINO, a point per row).
"""
import argparse
import glob
import json
import math
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

try:  # optional: only scatter.png needs it
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

import sd
import svdiff
from support import (apply_shifts, cli, clip_image, dino, dreambench, fast_layer, loading, photos, sheet,
                     shift_files)
from support.files import atomic_write
from support.svd_cache import check_svd_cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--shifts", nargs="+", required=True, metavar="FILE",
                   help="shift files to measure; a pattern such as 'runs/sks/step-*.safetensors' is expanded")
    p.add_argument("--images", default=None, help="the subject's reference photos, a folder or one image (default: "
                   "the run's, from the config.json beside the first shift file)")
    p.add_argument("--token", default=None, help="the subject's token (default: the run's)")
    p.add_argument("--class-word", default=None, help="the subject's class (default: the run's)")
    p.add_argument("--prompts", default=None, help="object, live (DreamBench's 25 each), or a file of prompts, one "
                   "a line, each with {token} and {class} (default: live for a dog, a cat, another animal or "
                   "a person, else object)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt and row, as DreamBooth's evaluation")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt's noise (prompt n's: seed + n)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: 512, SDXL 1024)")
    p.add_argument("--dino", default=dino.DEFAULT_DINO, help="the DINO ViT: a Hub id or a transformers folder")
    p.add_argument("--clip", default=clip_image.DEFAULT_CLIP, help="any CLIP: a Hub id or a transformers folder")
    p.add_argument("--model", default=None, help="the base model (default: the one the first shift file records)")
    p.add_argument("--force", action="store_true", help="measure shift files made on other base weights anyway")
    p.add_argument("--vocab", default=None, help="CLIP BPE vocabulary for single-file models (default: shipped)")
    p.add_argument("--svd-cache", default=None, help="file to keep the SVD of the base weights in")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=list(loading.DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, help="output folder (default eval/{token})")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier eval in --out")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Checks, before anything is loaded, fetched or sampled


def resolve(a):
    """The defaults (the subject, its photos and the base model from the run the first shift file comes from), and
    every check that needs no model: one line each."""
    a.shifts = [f for spec in a.shifts for f in (sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec])]
    if not a.shifts:
        raise ValueError("--shifts: the pattern matches no file; pass the shift files to measure")
    apply_shifts.check_shift_files(a.shifts, "--shifts")
    a.metas = {}
    for f in a.shifts:
        tensors, a.metas[f] = shift_files.read_shift_file(f)
        if shift_files.file_format(f, tensors) != shift_files.FORMAT:
            raise ValueError(f"{f} is an svdiff-pytorch file; convert it first: python shifts.py convert {f} --model "
                             "BASE --out ours.safetensors")
    first = a.shifts[0]
    for f in a.shifts[1:]:
        for field in ("family", "fingerprint"):
            if a.metas[f].get(field) != a.metas[first].get(field) and not a.force:
                raise ValueError(f"{f}: trained on another base model than {first} ({field} {a.metas[f].get(field)} "
                                 f"!= {a.metas[first].get(field)}); measure the shift files of one base model "
                                 "together")
    run_subject(a, Path(first).parent / "config.json")
    photos.check_images(Path(a.images), "--images")
    a.prompts = a.prompts or ("live" if a.class_word in dreambench.LIVE_CLASSES else "object")
    prompt_templates(a.prompts)  # read and judged now
    if a.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {a.num_images}")
    if not 1 <= a.steps <= 1000:
        raise ValueError(f"--steps must be between 1 and 1000, got {a.steps}")
    if a.resolution is not None and (a.resolution % 8 or a.resolution < 8):
        raise ValueError(f"--resolution must be a positive multiple of 8, got {a.resolution}")
    cli.check_device(a.device)
    if a.svd_cache:
        check_svd_cache(a.svd_cache)
    a.out = a.out or str(Path("eval") / a.token)
    cli.check_writable(Path(a.out), "--out")
    if (Path(a.out) / "eval.json").exists() and not a.overwrite:
        raise ValueError(f"--out {a.out} holds an earlier eval's results; pass --overwrite to replace them, or "
                         "another --out")
    a.model = loading.choose_model(a.model, first)
    a.dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    return a


def run_subject(a, config: Path):
    """--token, --class-word and --images, where not given, from the train.py run that wrote the first shift file
    (its config.json): the subject's, or the one of its subjects --token names."""
    try:
        run = json.loads(config.read_text())
    except (OSError, ValueError):
        run = {}
    run = run if isinstance(run, dict) else {}
    tokens, words, folders = run.get("token") or [], run.get("class_word") or [], run.get("images") or []
    i = tokens.index(a.token) if a.token in tokens else 0 if len(tokens) == 1 and not a.token else None
    a.token = a.token or (tokens[i] if i is not None else None)
    a.class_word = a.class_word or (words[i] if i is not None and i < len(words) else None)
    a.images = a.images or (folders[i] if i is not None and i < len(folders) else None)
    for flag, value in (("--token", a.token), ("--class-word", a.class_word), ("--images", a.images)):
        if not value:
            found = f"the run's ({config}) has {len(tokens)} subjects" if len(tokens) > 1 else f"no {config}"
            raise ValueError(f"{flag}: not given, and {found}; pass {flag}")


def prompt_templates(prompts: str) -> list[str]:
    """DreamBench's object or live-subject prompts, or a file's, one a line, each with {token} and {class}."""
    if prompts in ("object", "live"):
        return dreambench.OBJECT_PROMPTS if prompts == "object" else dreambench.LIVE_PROMPTS
    try:
        lines = [line.strip() for line in Path(prompts).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {prompts}: not object, live or a readable text file ({type(e).__name__})") \
            from None
    bad = [line for line in lines if "{token}" not in line or "{class}" not in line]
    if not lines or bad:
        raise ValueError(f"--prompts {prompts}: each line must be a prompt with {{token}} and {{class}}, e.g. 'a "
                         f"{{token}} {{class}} in the snow'" + (f"; not so: {bad[0]!r}" if bad else "; it has none"))
    return lines


def fill(template: str, token: str | None, word: str) -> str:
    """A prompt of the subject ("a sks dog in the snow"), or without its token ("a dog in the snow")."""
    return " ".join(template.replace("{token}", token or "").replace("{class}", word).split())


# ---------------------------------------------------------------------------------------------------------------
# Sampling and measuring


def main(argv=None):
    a = resolve(parse_args(argv))
    templates = prompt_templates(a.prompts)
    # The small models first, each judged by its configs before its weights are fetched: a wrong --clip or --dino,
    # or an unreachable Hub, is said before the base model (gigabytes) is fetched or loaded
    clip = clip_image.load(a.clip, device=a.device)
    vit = dino.load(a.dino, device=a.device)
    family = loading.peek_family(a.model, half=loading.DTYPES[a.dtype] in loading.HALF)
    for f in a.shifts:
        if a.metas[f].get("family", family) != family:
            raise ValueError(f"{f}: shifts for an {a.metas[f]['family']} model, but {a.model} is {family}; pass the "
                             "base model they were trained on as --model")
    a.resolution = a.resolution or loading.DEFAULT_SIZE[family]

    references = [photos.open_image(f) for f in readable_photos(Path(a.images))]
    ref = {"dino": unit(vit.image_features(references)), "clip": unit(clip.image_features(references))}
    texts = unit(clip.text_features([fill(t, None, a.class_word) for t in templates]))  # CLIP-T's: no token

    model = sd.load(a.model, device=a.device, dtype=loading.DTYPES[a.dtype], vocab=a.vocab)
    files = {f: shift_files.read_shift_file(f)[0] for f in a.shifts}
    for f in a.shifts:  # the fingerprint is a digest of the weights: known once they are read, before any SVD
        shift_files.check_shift_file(model, f, a.metas[f], a.force)
    # every layer any file shifts; each row sets its δ (0 where its file has none), merges, samples and unmerges
    names = shift_files.names_by_key(model)
    unknown = sorted(set().union(*files.values()) - set(names))
    if unknown:
        raise ValueError(f"key {unknown[0]} of the shift files is not a weight of {a.model}")
    fast_layer.add_spectral_shifts(model, names={names[k] for f in files.values() for k in f}, cache=a.svd_cache)

    out = Path(a.out)
    if a.overwrite:
        shutil.rmtree(out / "images", ignore_errors=True)  # an earlier eval's rows and prompts
    results, generated = {"real": real_row(ref)}, {}
    for row, f in [("base", None)] + [(row_name(f, a.shifts), f) for f in a.shifts]:
        set_shifts(model, f)
        svdiff.merge(model)
        images = sample(model, templates, a.token if f else None, a, row)
        svdiff.unmerge(model)
        for i, prompt_images in enumerate(images):
            for j, im in enumerate(prompt_images):
                photos.save_png(im, out / "images" / row / f"{i:02d}_{j}.png")
        generated[row] = images
        results[row] = measure(images, templates, a.token if f else None, a.class_word, ref, texts, clip, vit)
    write_outputs(a, results, generated, references, templates, out)


def readable_photos(folder: Path) -> list[Path]:
    """The reference photos: those of `folder` that open (damaged ones are left out, as training leaves them out;
    resolve has checked that one opens)."""
    good = []
    for f in photos.image_files(folder):
        try:
            photos.open_image(f)
            good.append(f)
        except photos.UNREADABLE:
            pass
    return good


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1, in float64: their dot products are the cosine similarities."""
    x = x.double().cpu()
    return x / x.norm(dim=-1, keepdim=True)


def set_shifts(model, shift_file):
    """δ of the shift file, 0 in every layer it does not shift (so ReLU(σ + 0) = σ: the base weight); all 0 for
    the base model (`shift_file` None)."""
    with torch.no_grad():
        for _, m in svdiff.shifts(model):
            m.delta.zero_()
    if shift_file:
        shift_files.load_shift_file(model, shift_file, force=True)  # (checked in main)


def sample(model, templates, token, a, row) -> list[list]:
    """--num-images images of each prompt, prompt n's from the seed + n: every row the same noise."""
    images = []
    for n, template in enumerate(tqdm(templates, desc=f"sampling {row}")):
        g = torch.Generator("cpu").manual_seed(a.seed + n)
        x = sd.text_to_image(model, [fill(template, token, a.class_word)] * a.num_images, steps=a.steps,
                             guidance=a.guidance, generator=g, height=a.resolution, width=a.resolution,
                             progress=False)
        images.append(sd.to_pil(x))
    return images


def mean_se(scores: torch.Tensor) -> dict:
    """Mean and standard error of the mean (the sample standard deviation over √n; 0 for one score)."""
    n = scores.numel()
    return {"mean": scores.mean().item(), "se": (scores.std() / math.sqrt(n)).item() if n > 1 else 0.0, "n": n}


def real_row(ref) -> dict:
    """The photos against each other: every pair of two different photos (the ceiling of DINO and CLIP-I; none for
    a single photo)."""
    out = {}
    for metric, key in (("dino", "dino"), ("clip_i", "clip")):
        sims = ref[key] @ ref[key].T
        pairs = sims[~torch.eye(len(sims), dtype=torch.bool)]
        if len(pairs):
            out[metric] = mean_se(pairs)
    return {"overall": out}


def measure(images, templates, token, word, ref, texts, clip, vit) -> dict:
    """DINO, CLIP-I and CLIP-T per prompt and overall. An image's DINO (CLIP-I) is its mean over the photos, so the
    overall mean is the mean over every (image, photo) pair; its CLIP-T is its similarity to its prompt without the
    token. Standard errors are over the images."""
    per_prompt, scores = {}, {"dino": [], "clip_i": [], "clip_t": []}
    for n, prompt_images in enumerate(images):
        c = unit(clip.image_features(prompt_images))
        s = {"dino": (unit(vit.image_features(prompt_images)) @ ref["dino"].T).mean(1),
             "clip_i": (c @ ref["clip"].T).mean(1), "clip_t": c @ texts[n]}
        per_prompt[fill(templates[n], token, word)] = {k: mean_se(v) for k, v in s.items()}
        for k in scores:
            scores[k].append(s[k])
    return {"overall": {k: mean_se(torch.cat(v)) for k, v in scores.items()}, "prompts": per_prompt}


def row_name(f, files) -> str:
    """A shift file's row: its name without .safetensors, or its path where two files share a name."""
    stems = [Path(x).name.removesuffix(".safetensors") for x in files]
    stem = Path(f).name.removesuffix(".safetensors")
    return stem if stems.count(stem) == 1 else str(Path(f).with_suffix(""))


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def write_outputs(a, results, generated, references, templates, out: Path):
    """eval.json, sheet.png (a row per prompt: a photo, then each row's first image, 256 px), the table, and
    scatter.png where matplotlib is installed."""
    settings = {k: v for k, v in vars(a).items() if k not in ("metas", "overwrite")}
    atomic_write(lambda p: p.write_text(json.dumps({"settings": settings, "rows": results}, indent=2)),
                 out / "eval.json")
    rows = []
    for n, template in enumerate(templates):
        photo = references[n % len(references)]
        rows.append([(square(photo), "photo")] + [(images[n][0].resize((256, 256)), f"{row}: " + fill(
            template, None if row == "base" else a.token, a.class_word)) for row, images in generated.items()])
    photos.save_png(sheet.comparison(rows), out / "sheet.png")
    print(table(results))
    wrote = ["eval.json", "sheet.png"] + (["scatter.png"] if scatter(results, out / "scatter.png") else [])
    print(f"wrote {', '.join(wrote)} and the images to {out}" +
          ("" if "scatter.png" in wrote else " (pip install matplotlib for scatter.png)"))


def square(image, side: int = 256):
    """A photo's centre square at `side` pixels, for the sheet."""
    w, h = image.size
    s = min(w, h)
    return image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((side, side))


def table(results) -> str:
    """The console's table: a row per shift file and the two reference rows, mean ± standard error."""
    def cell(r, k):
        return f"{r[k]['mean']:.3f} ± {r[k]['se']:.3f}" if k in r else "–"
    lines = ["| row | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
    for row, r in results.items():
        o = r["overall"]
        lines.append(f"| {row} | {cell(o, 'dino')} | {cell(o, 'clip_i')} | {cell(o, 'clip_t')} |")
    return "\n".join(lines)


def scatter(results, path: Path) -> bool:
    """CLIP-T against DINO, a point per row (the base model's and each shift file's) with its standard errors, where
    matplotlib is installed. Returns whether the plot was written."""
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for row, r in results.items():
        if row != "real":
            t, d = r["overall"]["clip_t"], r["overall"]["dino"]
            ax.errorbar(t["mean"], d["mean"], xerr=t["se"], yerr=d["se"], fmt="s" if row == "base" else "o",
                        capsize=2)  # ± one standard error
            ax.annotate(row, (t["mean"], d["mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.locator_params(nbins=5)
    ax.set_xlabel("CLIP-T (prompt fidelity)")
    ax.set_ylabel("DINO (subject fidelity)")
    fig.tight_layout()
    atomic_write(lambda p: fig.savefig(p, format="png", dpi=120), path)
    plt.close(fig)
    return True


if __name__ == "__main__":
    cli.run(main, "--dtype fp16, or a smaller --num-images or --resolution")
