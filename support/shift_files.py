"""Shift files: the δ of a trained model on disk, one 1-D tensor per shifted weight keyed by the weight's name in
the ORIGINAL single-file checkpoint (model.diffusion_model.input_blocks.1.1.proj_in.weight), with metadata: the
base model's fingerprint, family and source, the subset, rank and step. Reading them back (checked against the
base model), combining them (Eq. 4-5) and style mixing (--mix).
"""
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import svdiff
from support import loading
from support.files import atomic_write
from support.fingerprint import fingerprint

FORMAT = "svdiff-shifts"
VERSION = "1"


def key_of(model, name: str) -> str:
    """A layer's name ("unet.input_blocks.1.1.proj_in", svdiff.shifts) -> its weight's original checkpoint key."""
    component, _, path = name.partition(".")
    return loading.checkpoint_key(component, path + ".weight", model.family)


def shifts_by_key(model) -> list:
    """[(original checkpoint key, layer)] of a model with shifts added: svdiff.shifts as files name them."""
    return [(key_of(model, name), m) for name, m in svdiff.shifts(model)]


def names_by_key(model) -> dict:
    """{original checkpoint key: layer name} of every weight SVDiff can shift."""
    return {key_of(model, name): name for name, _ in svdiff.shiftable_modules(model)}


def save_shift_file(model, path, half=False, subset="all", rank=None, step=None, deltas=None):
    """δ of every shifted layer (or `deltas`, δ by key), keyed by the weight's ORIGINAL single-file checkpoint name.
    `step`: the training step the δ belong to (train.py's resume checks it against resume.pt)."""
    deltas = {k: m.delta for k, m in shifts_by_key(model)} if deltas is None else deltas
    tensors = {k: d.detach().to(torch.float16 if half else torch.float32).cpu().contiguous() for k, d in deltas.items()}
    meta = {"format": FORMAT, "version": VERSION, "family": model.family, "subset": str(subset),
            "rank": str(rank or ""), "fingerprint": fingerprint(model),
            "base_model": model.source}  # sample.py / edit.py load it when --model is not given
    if step is not None:
        meta["step"] = str(step)
    atomic_write(lambda p: save_file(tensors, str(p), metadata=meta), Path(path))


def read_shift_file(path):
    """(δ by original key, metadata). A file with no svdiff metadata (another tool's) is accepted as is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such shift file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path}: not a readable .safetensors shift file ({e})") from None


def file_format(path, tensors) -> str:
    """FORMAT (ours: the weights' original checkpoint names) or "svdiff-pytorch" (module paths + ".delta")."""
    keys = list(tensors)
    if keys and all(k.startswith((loading.UNET_PREFIX, *loading.TEXT_PREFIXES)) for k in keys):
        return FORMAT
    if keys and all(k.endswith(".delta") for k in keys):
        return "svdiff-pytorch"
    raise ValueError(f"{path}: keys of neither an svdiff shift file (model.diffusion_model.….weight) nor an "
                     f"svdiff-pytorch one (down_blocks.….delta), e.g. {keys[0] if keys else 'no tensors at all'!r}")


FORCE_HINT = "pass the base model it was trained on as --model, or --force to apply it anyway"


def check_shift_file(model, path, meta, force=False, hint=FORCE_HINT):
    """Refuse a shift file made for another base model (family, or the fingerprint of the weights) unless forced;
    `hint` is the way out, naming the flags of the command that reads the file."""
    if meta.get("family") and meta["family"] != model.family:  # their layers do not exist here: not forceable
        raise ValueError(f"{path}: shifts for an {meta['family']} model, but the base model is {model.family}; "
                         f"pass the {meta['family']} model they were trained on as --model")
    if "fingerprint" not in meta:
        warnings.warn(f"{path} has no base-model fingerprint (written by another tool?); applying it anyway")
    elif meta["fingerprint"] != fingerprint(model) and not force:
        raise ValueError(f"{path}: trained on a different base model (fingerprint {meta['fingerprint']} != "
                         f"{fingerprint(model)}); {hint}")


def fit_length(d: torch.Tensor, n: int, where: str) -> torch.Tensor:
    """A δ for a layer with n shifts. A file trained with --rank k holds δ of the k largest singular values only:
    the others' δ is 0, and ReLU(σ + 0) = σ leaves them as they were, so padding with zeros is exact (σ is in
    descending order in every SVD here). A longer δ belongs to another layer."""
    if d.shape[0] > n:
        raise ValueError(f"{where}: δ of length {d.shape[0]}, expected at most {n}")
    return F.pad(d, (0, n - d.shape[0]))


def load_shift_file(model, path, scale=1.0, force=False):
    """Set the δ of a model that has shifts added (trainable, unmerged) from a file, times `scale`."""
    tensors, meta = read_shift_file(path)
    check_shift_file(model, path, meta, force)
    layers = dict(shifts_by_key(model))
    for k, d in tensors.items():
        if k not in layers:
            raise ValueError(f"{path}: key {k} is not a shifted layer of this model")
        with torch.no_grad():
            layers[k].delta.copy_(scale * fit_length(d.float(), layers[k].delta.shape[0], f"{path}: key {k}"))


def parse_spec(spec: str):
    """FILE[:SCALE] -> (path, scale)."""
    m = re.fullmatch(r"(.+):(-?(?:\d+\.?\d*|\.\d+)(?:e-?\d+)?)", spec)
    return (Path(m[1]), float(m[2])) if m else (Path(spec), 1.0)


def in_layer_range(key: str, ranges) -> bool:
    """Style mixing: is this key in one of the named layer ranges ("input_blocks.4-8", "middle_block", any
    key prefix)?"""
    for r in ranges:
        m = re.fullmatch(r"(\w+)\.(\d+)-(\d+)", r)
        if m:
            k = re.search(rf"\b{m[1]}\.(\d+)\.", key)
            if k and int(m[2]) <= int(k[1]) <= int(m[3]):
                return True
        elif re.search(rf"(^|\.){re.escape(r)}(\.|$)", key):  # whole name parts: input_blocks.1 is not .10
            return True
    return False


# Original-key prefix of each shifted component, of every family (SDXL: text_encoder and text_encoder_2)
COMPONENT_PREFIXES = [("unet", loading.UNET_PREFIX)] + [(c, p) for family in loading.TEXT_ENCODERS.values()
                                                   for c, (p, _) in family.items()]


def block_names(keys) -> str:
    """The names --mix can take, per component, as they occur in these keys: each key's first numbered part as a
    range of its numbers (input_blocks.0-11, layers.0-11), or, for a key with none, its layer's own name
    (token_embedding). E.g. "unet: input_blocks.0-11, middle_block.0-2, …; text_encoder: layers.0-11, …"."""
    found = {c: {} for c, _ in COMPONENT_PREFIXES} | {"other": {}}  # component -> {name: [numbers]}, UNet first
    for key in sorted(keys):
        component, rest = next(((c, key[len(p):]) for c, p in COMPONENT_PREFIXES if key.startswith(p)), ("other", key))
        m = re.search(r"(\w+)\.(\d+)\.", rest)
        names = found.setdefault(component, {})
        if m:
            names.setdefault(m[1], []).append(int(m[2]))
        else:
            names.setdefault(rest.removesuffix(".weight").rsplit(".", 1)[-1], [])
    def shown(name, n):
        return name if not n else f"{name}.{n[0]}" if min(n) == max(n) else f"{name}.{min(n)}-{max(n)}"
    return "; ".join(f"{component}: " + ", ".join(shown(name, n) for name, n in names.items())
                     for component, names in found.items() if names)


def check_mix(mix, key_sets):
    """--mix: every range must name some weight of the files (`key_sets`: each file's keys), or a typo
    (outputblocks.0-5) would mix nothing and write a copy of the first file. Needs the keys only, so scripts check
    it before loading a model."""
    keys = set().union(*key_sets)
    for r in mix or []:
        if not any(in_layer_range(k, [r]) for k in keys):
            raise ValueError(f"--mix {r} matches no weight of the files; name a range as NAME.A-B or a dotted part of "
                             f"a key, from the files' blocks: {block_names(keys)}")


def combine_files(specs, mix=None):
    """Eq. 4-5 on files: Σ sᵢδᵢ per key (a key missing from a file counts as δ = 0). With `mix` (two files,
    style mixing), the keys in those layer ranges come from the second file and all others from the first.
    Returns (δ by key, metadata of the first file)."""
    read = [(parse_spec(s), read_shift_file(parse_spec(s)[0])) for s in specs]
    for (path, _), (tensors, _) in read:
        if file_format(path, tensors) != FORMAT:
            raise ValueError(f"{path} is an svdiff-pytorch file; convert it first: python shifts.py convert {path} "
                             "--model BASE --out ours.safetensors")
    (first_path, _), (_, first_meta) = read[0]
    for (path, _), (_, meta) in read[1:]:
        for field in ("family", "fingerprint"):
            if meta.get(field) != first_meta.get(field):
                raise ValueError(f"{path}: {field} {meta.get(field)} differs from {first_path}'s "
                                 f"{first_meta.get(field)}; shifts of different base models cannot be combined")
    if mix is not None and len(read) != 2:
        raise ValueError("style mixing takes exactly two files: layers in the ranges from the second, rest from the first")
    check_mix(mix, [tensors.keys() for _, (tensors, _) in read])
    terms = {}  # key -> [(δ, scale)] of the files that shift it
    for i, ((path, scale), (tensors, _)) in enumerate(read):
        for k, d in tensors.items():
            if mix is None or in_layer_range(k, mix) == (i == 1):
                terms.setdefault(k, []).append((d, scale))
    combined = {}
    for k, ds in terms.items():  # files of different --rank: the shorter δ is zero-padded (exact, see fit_length)
        n = max(d.shape[0] for d, _ in ds)
        combined[k] = svdiff.combine([fit_length(d, n, k) for d, _ in ds], [s for _, s in ds])
    ranks = [meta.get("rank", "") for _, (_, meta) in read]  # "": no limit
    return combined, dict(first_meta, rank="" if "" in ranks else str(max(map(int, ranks))))
