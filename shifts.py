"""Shift files beyond training: inspect, combine (Eq. 4-5, style mixing), and export as a LoRA or a merged
checkpoint that any Stable Diffusion tool loads.

    python shifts.py info runs/sks/shifts.safetensors
    python shifts.py combine dog.safetensors:0.7 cat.safetensors:0.3 --out mix.safetensors
    python shifts.py combine geometry.safetensors appearance.safetensors --mix output_blocks.0-5 --out style.safetensors
    python shifts.py export-lora runs/sks/shifts.safetensors --model v1-5.safetensors --rank 8 --out sks_lora.safetensors
    python shifts.py export-merged runs/sks/shifts.safetensors --model v1-5.safetensors --out v1-5-sks.safetensors
"""
import argparse
import os
import sys
from pathlib import Path

import torch

import sd
from svdiff import (SpectralShift, atomic_write, apply_shift_files, combine_files, merge, parse_spec, read_shift_file,
                    shifts)


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
    """Write the shifts as a rank-`rank` LoRA that AUTOMATIC1111 / ComfyUI / kohya load (alpha = rank, so scale 1).
    Prints each layer's relative error; γ and embedding shifts cannot be expressed as a LoRA and are skipped."""
    from safetensors.torch import save_file
    tensors, errors, skipped = {}, [], []
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
            k = up.shape[1]
            if layer.kind == "conv":
                w = layer.base.weight
                down = down.reshape(k, *w.shape[1:])
                up = up[:, :, None, None]
            names = lora_names(model, component, name)
            rows = up.shape[0] // len(names)  # SD2's fused q/k/v: one LoRA per projection, sharing `down`
            for i, lname in enumerate(names):
                tensors[lname + ".lora_up.weight"] = up[i * rows:(i + 1) * rows].to(dtype).contiguous()
                tensors[lname + ".lora_down.weight"] = down.to(dtype).contiguous()
                tensors[lname + ".alpha"] = torch.tensor(float(k), dtype=dtype)
    for name, err, _ in errors:
        print(f"{name}: relative error {err:.4f}")
    num = sum(e ** 2 * t for _, e, t in errors)
    den = sum(t for _, _, t in errors)
    total = (num / den).sqrt().item() if den > 0 else 0.0
    print(f"total relative error of ΔW (rank {rank}): {total:.4f} over {len(errors)} layers")
    if skipped:
        print(f"warning: {len(skipped)} shifted layers (norm γ, embeddings, rank-limited) cannot be expressed in a "
              "LoRA and were left out", file=sys.stderr)
    atomic_write(lambda p: save_file(tensors, str(p), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                                                            "ss_network_module": "networks.lora"}), Path(path))
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
