"""Shift files: the δ of a trained model on disk, keyed by the weights' original checkpoint names; reading them
back (checked against the base model's fingerprint), combining them (Eq. 4-5, style mixing), applying them for
sampling, and exporting them as a LoRA or a merged checkpoint that any Stable Diffusion tool loads.

    python shifts.py info runs/sks/shifts.safetensors
    python shifts.py combine dog.safetensors:0.7 cat.safetensors:0.3 --out mix.safetensors
    python shifts.py combine geometry.safetensors appearance.safetensors --mix output_blocks.0-5 --out style.safetensors
    python shifts.py export-lora runs/sks/shifts.safetensors --model v1-5.safetensors --rank 8 --out sks_lora.safetensors
    python shifts.py export-merged runs/sks/shifts.safetensors --model v1-5.safetensors --out v1-5-sks.safetensors
"""
import argparse
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import sd
from svdiff import (SpectralShift, add_spectral_shifts, atomic_write, bake, combine, fingerprint, merge,
                    shiftable_modules, shifts)

FORMAT = "svdiff-shifts"
VERSION = "1"


# ---------------------------------------------------------------------------------------------------------------
# Shift files: one 1-D δ per shifted weight, keyed by its ORIGINAL checkpoint name


def save_shift_file(model, path, half=False, subset="all", rank=None, step=None):
    """δ of every shifted layer, keyed by the weight's ORIGINAL single-file checkpoint name. `step`: the training
    step the δ belong to (train.py's resume checks it against resume.pt)."""
    from safetensors.torch import save_file
    tensors = {k: m.delta.detach().to(torch.float16 if half else torch.float32).cpu().contiguous()
               for k, m in shifts(model)}
    meta = {"format": FORMAT, "version": VERSION, "family": model.family, "subset": str(subset),
            "rank": str(rank or ""), "fingerprint": fingerprint(model)}
    if step is not None:
        meta["step"] = str(step)
    atomic_write(lambda p: save_file(tensors, str(p), metadata=meta), Path(path))


def read_shift_file(path):
    """(δ by original key, metadata). A file with no svdiff metadata (another tool's) is accepted as is."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such shift file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"{path}: not a readable .safetensors shift file ({e})") from None


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


def load_shift_file(model, path, scale=1.0, force=False):
    """Set the δ of a model with shifts added from a file (to continue from shifts)."""
    tensors, meta = read_shift_file(path)
    check_shift_file(model, path, meta, force)
    layers = dict(shifts(model))
    for k, d in tensors.items():
        if k not in layers:
            raise ValueError(f"{path}: key {k} is not a shifted layer of this model")
        if d.shape != layers[k].delta.shape:
            raise ValueError(f"{path}: key {k} has δ of length {d.shape[0]}, expected {layers[k].delta.shape[0]}")
        with torch.no_grad():
            layers[k].delta.copy_(scale * d.float())


def parse_spec(spec: str):
    """FILE[:SCALE] -> (path, scale)."""
    m = re.fullmatch(r"(.+):(-?[\d.]+(?:e-?\d+)?)", spec)
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
        elif r in key:
            return True
    return False


def combine_files(specs, mix=None):
    """Eq. 4-5 on files: Σ sᵢδᵢ per key (a key missing from a file counts as δ = 0). With `mix` (two files,
    style mixing), the keys in those layer ranges come from the second file and all others from the first.
    Returns (δ by key, metadata of the first file)."""
    read = [(parse_spec(s), read_shift_file(parse_spec(s)[0])) for s in specs]
    (first_path, _), (_, first_meta) = read[0]
    for (path, _), (_, meta) in read[1:]:
        for field in ("family", "fingerprint"):
            if meta.get(field) != first_meta.get(field):
                raise ValueError(f"{path}: {field} {meta.get(field)} differs from {first_path}'s "
                                 f"{first_meta.get(field)}; shifts of different base models cannot be combined")
    if mix is not None and len(read) != 2:
        raise ValueError("style mixing takes exactly two files: layers in the ranges from the second, rest from the first")
    combined = {}
    for i, ((path, scale), (tensors, _)) in enumerate(read):
        for k, d in tensors.items():
            if mix is not None and in_layer_range(k, mix) != (i == 1):
                continue
            if k in combined and combined[k].shape != d.shape:
                raise ValueError(f"{path}: key {k} has δ of length {d.shape[0]}, the other files {combined[k].shape[0]}")
            combined[k] = combined.get(k, 0) + combine([d], [scale])
    return combined, first_meta


def apply_shift_files(model, specs, force=False, merged=True, mix=None, cache=None):
    """sample.py --shifts A.safetensors[:s] B.safetensors[:s]: ReLU(σ + Σ sᵢδᵢ) (Eq. 4-5), merged once so that
    sampling costs what the base model costs. `cache`: the SVD cache file of add_spectral_shifts."""
    combined, meta = combine_files(specs, mix)
    check_shift_file(model, specs[0], meta, force)
    known = {_key(model, component, name) for component, name, _ in shiftable_modules(model)}
    for k in combined:
        if k not in known:
            raise ValueError(f"key {k} of the shift files is not a weight of this model")
    add_spectral_shifts(model, keys=set(combined), cache=cache, progress=True)
    layers = dict(shifts(model))
    for k, d in combined.items():
        if d.shape != layers[k].delta.shape:
            raise ValueError(f"key {k}: δ of length {d.shape[0]}, expected {layers[k].delta.shape[0]}")
        with torch.no_grad():
            layers[k].delta.copy_(d)
    if merged:
        bake(model)


def _key(model, component, name):
    return sd.checkpoint_key(component, name + ".weight", model.family)


# ---------------------------------------------------------------------------------------------------------------
# Export: LoRA (kohya names) and a merged checkpoint


def lora_factors(layer: SpectralShift, rank: int):
    """ΔW = Σ (ReLU(σᵢ+δᵢ) - σᵢ) uᵢ vᵢᵀ, so its best rank-k approximation (Eckart-Young) keeps the k terms with
    the largest |ReLU(σᵢ+δᵢ) - σᵢ|. Returns (up [m, k], down [k, n], relative Frobenius error)."""
    d = layer.delta_sigma().detach().double()
    keep = d.abs().argsort(descending=True)[:rank]
    up = layer.U[:, keep].double() * d[keep]
    down = layer.V[:, keep].double().T
    total = d.square().sum()
    err = ((total - d[keep].square().sum()).clamp_min(0) / total).sqrt().item() if total > 0 else 0.0
    return up, down, err


def lora_names(model, component, name):
    """kohya's names: lora_unet_ + the diffusers module path, lora_te_ + the transformers one, dots -> '_'."""
    import clip_text
    import unet as unet_lib
    if component == "unet":
        return ["lora_unet_" + unet_lib.original_to_diffusers(name + ".weight", model.unet.cfg)[:-7].replace(".", "_")]
    return ["lora_te_" + hf[:-7].replace(".", "_")
            for hf in clip_text.module_to_hf(name + ".weight", model.text_encoder.cfg)]


def export_lora(model, path, rank=4, dtype=torch.float16):
    """Write the shifts as a rank-`rank` LoRA that diffusers / AUTOMATIC1111 / ComfyUI / kohya load. Prints each
    layer's relative error; γ and embedding shifts cannot be expressed as a LoRA and are skipped.

    Every layer is written at ONE rank K (the largest min(rank, rank of the layer)) with ONE alpha = K, so each
    loader's scale alpha/r is 1 however it collects them: diffusers names the alphas of kohya attention layers after
    its old `processor.to_q_lora` modules, peft matches none of them, and those layers get the MOST COMMON alpha
    over their own rank (measured: ×0.5 and ×2 on files whose layers had different ranks). A layer of lower rank is
    padded with zero rows of `down` and zero columns of `up`: the product, and so ΔW, is unchanged."""
    from safetensors.torch import save_file
    factors, errors, skipped = [], [], []
    for component in ("unet", "text_encoder"):
        root = getattr(model, component)
        for name, layer in root.named_modules():
            if not isinstance(layer, SpectralShift):
                continue
            if layer.kind in ("norm", "embedding") or not layer.full_rank:
                skipped.append(name)
                continue
            up, down, err = lora_factors(layer, rank)
            errors.append((f"{component}.{name}", err, layer.delta_sigma().detach().double().square().sum()))
            factors.append((component, name, layer, up, down))
    K = max((up.shape[1] for *_, up, _ in factors), default=rank)
    tensors = {}
    for component, name, layer, up, down in factors:
        up, down = F.pad(up, (0, K - up.shape[1])), F.pad(down, (0, 0, 0, K - down.shape[0]))
        if layer.kind == "conv":
            down = down.reshape(K, *layer.base.weight.shape[1:])
            up = up[:, :, None, None]
        names = lora_names(model, component, name)
        rows = up.shape[0] // len(names)  # SD2's fused q/k/v: one LoRA per projection, sharing `down`
        for i, lname in enumerate(names):
            tensors[lname + ".lora_up.weight"] = up[i * rows:(i + 1) * rows].to(dtype).contiguous()
            tensors[lname + ".lora_down.weight"] = down.to(dtype).contiguous()
            tensors[lname + ".alpha"] = torch.tensor(float(K), dtype=dtype)
    for name, err, _ in errors:
        print(f"{name}: relative error {err:.4f}")
    num = sum(e ** 2 * t for _, e, t in errors)
    den = sum(t for _, _, t in errors)
    total = (num / den).sqrt().item() if den > 0 else 0.0
    print(f"total relative error of ΔW (rank {rank}): {total:.4f} over {len(errors)} layers, written at rank {K}")
    if skipped:
        print(f"warning: {len(skipped)} shifted layers (norm γ, embeddings, rank-limited) cannot be expressed in a "
              "LoRA and were left out", file=sys.stderr)
    meta = {"ss_network_dim": str(K), "ss_network_alpha": str(K), "ss_network_module": "networks.lora"}
    atomic_write(lambda p: save_file(tensors, str(p), metadata=meta), Path(path))
    return total


def export_merged(model, source, path):
    """A new single-file checkpoint (original layout, the source's dtype) with W_δ baked in: the source file's
    tensors streamed, the shifted ones replaced, everything else copied."""
    from safetensors.torch import save_file
    merge(model, keep_original=False)
    new = {k: m.base.weight for k, m in shifts(model)}
    tf = sd.TensorFile(Path(source))
    out = {}
    for k, t in tf.tensors(list(tf.shapes)):
        if k in new:
            t = sd.fit_shape(new[k].detach().to("cpu", t.dtype), t.shape) if t.is_floating_point() else t
        out[k] = t.contiguous()
    missing = set(new) - set(out)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} shifted weights (e.g. {sorted(missing)[0]})")
    atomic_write(lambda p: save_file(out, str(p)), Path(path))


# ---------------------------------------------------------------------------------------------------------------
# Command line: info, combine, export-lora, export-merged


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect, combine and export SVDiff shift files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a shift file holds")
    info.add_argument("file")
    comb = sub.add_parser("combine", help="Σ sᵢδᵢ of several files (Eq. 4-5), or style mixing of two",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comb.add_argument("files", nargs="+", metavar="FILE[:SCALE]")
    comb.add_argument("--mix", nargs="+", default=None, metavar="RANGE",
                      help="style mixing: these layer ranges (e.g. input_blocks.4-8, middle_block) from the second "
                           "file, all other layers from the first")
    comb.add_argument("--half", action="store_true", help="store fp16")
    comb.add_argument("--out", required=True)
    for name, helptext in (("export-lora", "a kohya-format LoRA for AUTOMATIC1111 / ComfyUI"),
                           ("export-merged", "a single-file checkpoint with the shifts baked in")):
        e = sub.add_parser(name, help=helptext, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        e.add_argument("shifts", metavar="FILE[:SCALE]", nargs="+")
        e.add_argument("--model", required=True, help="the base model the shifts were trained on")
        e.add_argument("--vocab", default=None, help="CLIP BPE vocabulary (single-file models)")
        e.add_argument("--force", action="store_true", help="apply even if the base-model fingerprint differs")
        e.add_argument("--out", required=True)
        if name == "export-lora":
            e.add_argument("--rank", type=int, default=4)
    a = p.parse_args(argv)

    if a.command == "info":
        tensors, meta = read_shift_file(a.file)
        floats = sum(t.numel() for t in tensors.values())
        print(f"{a.file}: {len(tensors)} shifted weights, {floats:,} values, {os.path.getsize(a.file):,} bytes")
        for k, v in sorted(meta.items()):
            print(f"  {k}: {v}")
        for prefix in ("model.diffusion_model.", "cond_stage_model."):
            part = [t for k, t in tensors.items() if k.startswith(prefix)]
            if part:
                print(f"  {prefix}*: {len(part)} weights, |δ| mean {torch.cat([t.float().abs() for t in part]).mean():.4g}")
        return
    if a.command == "combine":
        for spec in a.files:
            parse_spec(spec)
        combined, meta = combine_files(a.files, a.mix)
        meta = dict(meta, subset=f"combined({', '.join(a.files)})")
        from safetensors.torch import save_file
        out = {k: v.to(torch.float16 if a.half else torch.float32).contiguous() for k, v in combined.items()}
        atomic_write(lambda p: save_file(out, str(p), metadata=meta), Path(a.out))
        print(f"wrote {a.out}: {len(out)} shifted weights")
        return
    if a.command == "export-lora" and a.rank < 1:
        raise ValueError("--rank must be at least 1")
    if a.command == "export-merged" and Path(a.model).is_dir():
        raise ValueError(f"--model {a.model} is a diffusers folder; export-merged rewrites a single-file checkpoint")
    model = sd.load(a.model, vocab=a.vocab, components=("unet", "text_encoder"))
    apply_shift_files(model, a.shifts, force=a.force, merged=False)
    if a.command == "export-lora":
        export_lora(model, a.out, a.rank)
    else:
        export_merged(model, a.model, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
