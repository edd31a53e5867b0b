"""Measure a personalization as the papers do: DINO, CLIP-I and CLIP-T on DreamBench's prompts (DreamBooth, Ruiz et
al. 2023, §4.1), for one shift file or several (e.g. the steps --keep-every kept), beside reference rows.

    python eval.py --shifts runs/sks/shifts.safetensors --images ./dog
    python eval.py --shifts runs/sks/step-*.safetensors                  # compare saved steps (photos: the run's)

Every shift file samples --num-images images of each prompt ("a sks dog in the snow"), from the same seeds: two files
are compared on the same noise. With `g` a generated image, `r` a reference photo, `t` the prompt with the subject's
token left out ("a dog in the snow", so that CLIP-T measures the prompt, not the token) and cos the cosine similarity:
    DINO    mean over (g, r) of cos(DINO(g), DINO(r)), DINO = ViT-S/16's [CLS] embedding (facebook/dino-vits16)
    CLIP-I  the same with CLIP's image embeddings (openai/clip-vit-base-patch32)
    CLIP-T  mean over g of cos(CLIP(g), CLIP(t))
Reference rows: `real`, the photos against each other (every pair of two different ones: the ceiling of DINO and
CLIP-I), and `base`, the base model without shifts on the same prompts with the class word alone ("a dog in the
snow": what personalization must beat on DINO and CLIP-I, and where CLIP-T starts).

Outputs in --out (default eval/{token}): eval.json (per prompt and overall: mean and standard error over the
images), images/{row}/{prompt}_{i}.png, sheet.png (a row per prompt, an image of each shift file), and, where
matplotlib is installed, scatter.png (CLIP-T against DINO, a point per shift file).
"""
import argparse
import glob
import json
import math
from pathlib import Path

import torch

import sd
import svdiff
from support import (apply_shifts, cli, clip_image, dino, dreambench, fast_layer, loading, photos, sheet,
                     shift_files)
from support.files import atomic_write
from support.svd_cache import check_svd_cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.HelpFormatter)
    p.add_argument("--shifts", nargs="+", required=True, metavar="FILE",
                   help="shift files to measure (a pattern such as runs/sks/step-*.safetensors is expanded)")
    p.add_argument("--images", default=None, help="the subject's reference photos (default: the run's --images, "
                   "from the config.json beside the first shift file)")
    p.add_argument("--token", default=None, help="the subject's token (default: the run's)")
    p.add_argument("--class-word", default=None, help="the subject's class (default: the run's)")
    p.add_argument("--prompts", default=None, help="object, live, or a file of prompts, one a line, each with "
                   "{token} and {class} (default: live for a dog or cat, as DreamBench's live subjects, else object)")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt and shift file")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt's noise (the n-th: seed + n)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: 512, SDXL 1024)")
    p.add_argument("--dino", default="facebook/dino-vits16", help="the DINO ViT (Hub id or folder)")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="the CLIP model (Hub id or folder)")
    p.add_argument("--model", default=None, help="the base model (default: the one the first shift file records)")
    p.add_argument("--vocab", default=None, help="CLIP BPE vocabulary for single-file models (default: shipped)")
    p.add_argument("--svd-cache", default=None, help="file to keep the SVD of the base weights in")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", choices=list(loading.DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", default=None, help="output folder (default eval/{token})")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Checks, before anything is loaded, fetched or sampled


def resolve(a):
    """The defaults (the subject, its photos and the base model from the run the first shift file comes from),
    and every check of the flags and files."""
    a.shifts = [f for spec in a.shifts for f in (sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec])]
    if not a.shifts:
        raise ValueError("--shifts: the pattern matches no file; pass the shift files to measure")
    apply_shifts.check_shift_files(a.shifts, "--shifts")
    metas = {}
    for f in a.shifts:
        tensors, metas[f] = shift_files.read_shift_file(f)
        if shift_files.file_format(f, tensors) != shift_files.FORMAT:
            raise ValueError(f"{f} is an svdiff-pytorch file; convert it first: python shifts.py convert {f} --model "
                             "BASE --out ours.safetensors")
    first = a.shifts[0]
    for f in a.shifts[1:]:
        for field in ("family", "fingerprint"):
            if metas[f].get(field) != metas[first].get(field):
                raise ValueError(f"{f}: trained on another base model than {first} ({field} {metas[f].get(field)} != "
                                 f"{metas[first].get(field)}); measure the shift files of one base model together")
    run = run_settings(Path(first).parent / "config.json")
    tokens, words = run.get("token") or [], run.get("class_word") or []
    a.token = a.token or (tokens[0] if len(tokens) == 1 else None)
    a.class_word = a.class_word or (words[tokens.index(a.token)] if a.token in tokens else
                                    words[0] if len(words) == 1 else None)
    a.images = a.images or (run["images"][tokens.index(a.token) if a.token in tokens else 0]
                            if run.get("images") and len(run["images"]) in (1, len(tokens)) else None)
    for flag, value in (("--token", a.token), ("--class-word", a.class_word), ("--images", a.images)):
        if not value:
            raise ValueError(f"{flag}: not given, and no single subject's in {Path(first).parent / 'config.json'}; "
                             f"pass {flag}")
    photos.check_images(Path(a.images))
    a.prompts = a.prompts or ("live" if a.class_word in dreambench.LIVE_CLASSES else "object")
    prompt_templates(a.prompts)  # (read and checked now)
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
    a.model = loading.choose_model(a.model, first)
    a.dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    a.resolution = a.resolution or loading.DEFAULT_SIZE[loading.peek_family(a.model, half=loading.DTYPES[a.dtype]
                                                                            in loading.HALF)]
    return a


def run_settings(config: Path) -> dict:
    """The settings of the train.py run a shift file comes from (its config.json), or none."""
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def prompt_templates(prompts: str) -> list[str]:
    """DreamBench's object or live-subject prompts, or a file's, one a line, each with {token} and {class}."""
    if prompts in ("object", "live"):
        return dreambench.OBJECT_PROMPTS if prompts == "object" else dreambench.LIVE_PROMPTS
    try:
        lines = [l.strip() for l in Path(prompts).read_text().splitlines() if l.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {prompts}: not object, live or a readable text file ({type(e).__name__})") \
            from None
    bad = [l for l in lines if "{token}" not in l or "{class}" not in l]
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
    # the small models first: a repo that is not what it should be fails before the base model loads
    clip = clip_image.load(a.clip, device=a.device)
    vit = dino.load(a.dino, device=a.device)
    references = [photos.open_image(f) for f in readable_photos(Path(a.images))]
    ref = {"dino": unit(vit.image_features(references)), "clip": unit(clip.image_features(references))}
    texts = unit(clip.text_features([fill(t, None, a.class_word) for t in templates]))  # CLIP-T's: no token

    model = sd.load(a.model, device=a.device, dtype=loading.DTYPES[a.dtype], vocab=a.vocab)
    # every layer any of the files shifts; each row sets its δ (0 where its file has none), merges, samples, unmerges
    files = {f: shift_files.read_shift_file(f)[0] for f in a.shifts}
    names = shift_files.names_by_key(model)
    unknown = sorted(set().union(*files.values()) - set(names))
    if unknown:
        raise ValueError(f"{a.shifts[0]}: key {unknown[0]} is not a weight of {a.model}; pass the base model the "
                         "shifts were trained on as --model")
    fast_layer.add_spectral_shifts(model, names={names[k] for f in files.values() for k in f}, cache=a.svd_cache)
    out = Path(a.out)
    results = {"real": real_row(ref)}
    generated = {}
    for row, f in [("base", None)] + [(row_name(f, a.shifts), f) for f in a.shifts]:
        set_shifts(model, f)
        svdiff.merge(model)
        images = sample(model, templates, a.token if f else None, a)
        svdiff.unmerge(model)
        for i, prompt_images in enumerate(images):
            for j, im in enumerate(prompt_images):
                photos.save_png(im, out / "images" / row / f"{i:02d}_{j}.png")
        generated[row] = images
        results[row] = measure(images, templates, a, ref, texts, clip, vit, token=a.token if f else None)
    write_outputs(a, results, generated, templates, out)


def readable_photos(folder: Path) -> list[Path]:
    """The reference photos: those of `folder` that open (damaged ones are left out, as training leaves them)."""
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
    """δ of the shift file (checked against the base model's fingerprint), 0 in every layer it does not shift;
    all 0 for the base model (`shift_file` None)."""
    with torch.no_grad():
        for _, m in svdiff.shifts(model):
            m.delta.zero_()
    if shift_file:
        shift_files.load_shift_file(model, shift_file)


def sample(model, templates, token, a) -> list[list]:
    """--num-images images of each prompt, from the seed + the prompt's index: every row the same noise."""
    images = []
    for i, template in enumerate(templates):
        g = torch.Generator("cpu").manual_seed(a.seed + i)
        x = sd.text_to_image(model, [fill(template, token, a.class_word)] * a.num_images, steps=a.steps,
                             guidance=a.guidance, generator=g, height=a.resolution, width=a.resolution,
                             progress=False)
        images.append(sd.to_pil(x))
    return images


def mean_se(scores: torch.Tensor) -> dict:
    """Mean and standard error of the mean (0 for one score)."""
    n = scores.numel()
    se = (scores.std() / math.sqrt(n)).item() if n > 1 else 0.0
    return {"mean": scores.mean().item(), "se": se, "n": n}


def real_row(ref) -> dict:
    """The photos against each other: every pair of two different photos (the ceiling of DINO and CLIP-I)."""
    out = {}
    for metric, key in (("dino", "dino"), ("clip_i", "clip")):
        sims = ref[key] @ ref[key].T
        off = ~torch.eye(len(sims), dtype=torch.bool)
        out[metric] = mean_se(sims[off]) if off.any() else {"mean": float("nan"), "se": 0.0, "n": 0}
    return {"overall": out}


def measure(images, templates, a, ref, texts, clip, vit, token) -> dict:
    """DINO, CLIP-I and CLIP-T per prompt and overall; an image's DINO (CLIP-I) is its mean over the photos, its
    CLIP-T its similarity to its prompt without the token."""
    per_prompt, scores = {}, {"dino": [], "clip_i": [], "clip_t": []}
    for i, prompt_images in enumerate(images):
        d = unit(vit.image_features(prompt_images)) @ ref["dino"].T
        c = unit(clip.image_features(prompt_images))
        s = {"dino": d.mean(1), "clip_i": (c @ ref["clip"].T).mean(1), "clip_t": c @ texts[i]}
        per_prompt[fill(templates[i], token, a.class_word)] = {k: mean_se(v) for k, v in s.items()}
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


def write_outputs(a, results, generated, templates, out: Path):
    """eval.json, sheet.png (a row per prompt: each row's first image, 256 px), the table, scatter.png."""
    atomic_write(lambda p: p.write_text(json.dumps({"settings": vars(a), "rows": results}, indent=2)),
                 out / "eval.json")
    rows = []
    for i, template in enumerate(templates):
        rows.append([(images[i][0].resize((256, 256)),
                      f"{row}: " + fill(template, None if row == "base" else a.token, a.class_word))
                     for row, images in generated.items()])
    photos.save_png(sheet.comparison(rows), out / "sheet.png")
    print(table(results))
    if scatter(results, out / "scatter.png"):
        print(f"wrote eval.json, sheet.png and scatter.png to {out}")
    else:
        print(f"wrote eval.json and sheet.png to {out} (pip install matplotlib for scatter.png)")


def table(results) -> str:
    cell = lambda r, k: f"{r[k]['mean']:.3f} ± {r[k]['se']:.3f}" if k in r else "–"
    lines = ["| row | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
    for row, r in results.items():
        o = r["overall"]
        lines.append(f"| {row} | {cell(o, 'dino')} | {cell(o, 'clip_i')} | {cell(o, 'clip_t')} |")
    return "\n".join(lines)


def scatter(results, path: Path) -> bool:
    """CLIP-T against DINO, a point per row but `real`; where matplotlib is installed (an optional dependency, so
    imported only here)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for row, r in results.items():
        if row != "real":
            ax.scatter(r["overall"]["clip_t"]["mean"], r["overall"]["dino"]["mean"])
            ax.annotate(row, (r["overall"]["clip_t"]["mean"], r["overall"]["dino"]["mean"]), fontsize=8)
    ax.set_xlabel("CLIP-T (prompt fidelity)")
    ax.set_ylabel("DINO (subject fidelity)")
    fig.tight_layout()
    atomic_write(lambda p: fig.savefig(p, format="png", dpi=120), path)
    plt.close(fig)
    return True


if __name__ == "__main__":
    cli.run(main, "--num-images 1, --dtype fp16 or a smaller --resolution")
