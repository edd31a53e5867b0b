"""Inspect, combine and export shift files (the δ of a trained model on disk: support/shift_files.py): combining
is Eq. 4-5 and style mixing; the exports are a LoRA or a merged checkpoint that any Stable Diffusion tool loads
(support/exports.py); svdiff-pytorch's files are converted to ours (support/svdiff_pytorch.py).

    python shifts.py info runs/sks/shifts.safetensors
    python shifts.py combine dog.safetensors:0.7 cat.safetensors:0.3 --out mix.safetensors
    python shifts.py combine geometry.safetensors appearance.safetensors --mix output_blocks.0-5 --out style.safetensors
    python shifts.py export-lora runs/sks/shifts.safetensors --model v1-5.safetensors --rank 8 --out sks_lora.safetensors
    python shifts.py export-merged runs/sks/shifts.safetensors --model v1-5.safetensors --out v1-5-sks.safetensors
    python shifts.py convert spectral_shifts.safetensors --model v1-5.safetensors --out sks.safetensors
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import sd
from support import apply_shifts, cli, exports, loading, shift_files, svdiff_pytorch
from support.files import atomic_write


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect, combine and export SVDiff shift files.",
                                formatter_class=cli.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a shift file holds")
    info.add_argument("file")
    comb = sub.add_parser("combine", help="Σ sᵢδᵢ of several files (Eq. 4-5), or style mixing of two",
                          formatter_class=cli.HelpFormatter)
    comb.add_argument("files", nargs="+", metavar="FILE[:SCALE]")
    comb.add_argument("--mix", nargs="+", default=None, metavar="RANGE",
                      help="style mixing: these layer ranges (e.g. input_blocks.4-8, middle_block) from the second "
                           "file, all other layers from the first")
    comb.add_argument("--half", action="store_true", help="store fp16")
    comb.add_argument("--out", required=True, help="the combined shift file to write")
    for name, helptext in (("export-lora", "a kohya-format LoRA for AUTOMATIC1111 / ComfyUI"),
                           ("export-merged", "a single-file checkpoint with the shifts baked in")):
        e = sub.add_parser(name, help=helptext, formatter_class=cli.HelpFormatter)
        e.add_argument("shifts", metavar="FILE[:SCALE]", nargs="+")
        e.add_argument("--model", default=None, help="the base model the shifts were trained on: a single file"
                       + (", diffusers folder or Hub id owner/name[@revision]" if name == "export-lora" else "")
                       + " (default: the base model the first shift file records)")
        e.add_argument("--vocab", default=None, help="CLIP BPE vocabulary for single-file models (default: shipped)")
        e.add_argument("--force", action="store_true", help="apply even if the base-model fingerprint differs")
        e.add_argument("--out", required=True, help="the file to write")
        if name == "export-lora":
            e.add_argument("--rank", type=int, default=4, help="LoRA rank: the k largest terms of each ΔW")
            e.add_argument("--per-layer", action="store_true", help="print each layer's relative error, not only "
                           "the total and the worst layer's")
    conv = sub.add_parser("convert", help="an svdiff-pytorch spectral_shifts.safetensors (and its _te file) in our "
                                          "format", formatter_class=cli.HelpFormatter)
    conv.add_argument("file", help="svdiff-pytorch's spectral_shifts.safetensors")
    conv.add_argument("te_file", nargs="?", default=None,
                      help="its spectral_shifts_te.safetensors (default: the one beside FILE, if any)")
    conv.add_argument("--model", required=True, help="the base model the shifts were trained on")
    conv.add_argument("--vocab", default=None, help="CLIP BPE vocabulary (single-file models)")
    conv.add_argument("--out", required=True, help="the shift file to write, in our format")
    a = p.parse_args(argv)

    if a.command == "info":
        tensors, meta = shift_files.read_shift_file(a.file)
        floats = sum(t.numel() for t in tensors.values())
        print(f"{a.file}: {cli.plural(len(tensors), 'shifted weight')}, {cli.plural(floats, 'value')}, "
              f"{cli.plural(os.path.getsize(a.file), 'byte')}")
        for k, v in sorted(meta.items()):
            if k == "rank" and not v:  # "": trained (or combined) without --rank
                v = "full (every singular value)"
            print(f"  {k}: {v}")
        if shift_files.file_format(a.file, tensors) != shift_files.FORMAT:
            print("  svdiff-pytorch file: apply it with --shifts, or write it in our format with shifts.py convert")
        for component, prefix in shift_files.COMPONENT_PREFIXES:  # per component (SDXL: unet, text_encoder, text_encoder_2)
            part = [t for k, t in tensors.items() if k.startswith(prefix)]
            if part:
                print(f"  {component} ({prefix}*): {cli.plural(len(part), 'weight')}, "
                      f"{cli.plural(sum(t.numel() for t in part), 'value')}, "
                      f"|δ| mean {torch.cat([t.float().abs() for t in part]).mean():.4g}")
        return
    apply_shifts.check_shift_files(a.files if a.command == "combine" else getattr(a, "shifts", []))
    if Path(a.out).is_dir():  # (every command but info writes --out; checked before minutes of SVD)
        raise ValueError(f"--out {a.out} is a folder; name the file to write, e.g. {Path(a.out) / 'out.safetensors'}")
    cli.check_writable(Path(a.out).parent, "--out")
    if a.command == "combine":
        combined, meta = shift_files.combine_files(a.files, a.mix)
        meta = dict(meta, subset=f"combined({', '.join(a.files)})")
        out = {k: v.to(torch.float16 if a.half else torch.float32).contiguous() for k, v in combined.items()}
        atomic_write(lambda p: save_file(out, str(p), metadata=meta), Path(a.out))
        print(f"wrote {a.out}: {cli.plural(len(out), 'shifted weight')}")
        return
    if a.command == "export-lora" and a.rank < 1:
        raise ValueError("--rank must be at least 1")
    if a.command != "convert":
        a.model = loading.choose_model(a.model, shift_files.parse_spec(a.shifts[0])[0])
    if a.command == "export-merged" and not Path(a.model).is_file():
        raise ValueError(f"--model {a.model} is not a single-file checkpoint; export-merged rewrites one (.safetensors/"
                         ".ckpt), not a diffusers folder or Hub id")
    theirs = svdiff_pytorch.read_svdiff_pytorch(a.file, a.te_file) if a.command == "convert" else None  # before loading a model
    model = sd.load(a.model, vocab=a.vocab, components=("unet", "text_encoder"))
    if a.command == "convert":
        ours, apart = svdiff_pytorch.from_svdiff_pytorch(model, theirs, a.file)
        shift_files.save_shift_file(model, a.out, subset="svdiff-pytorch", deltas=ours)
        print(f"wrote {a.out}: {cli.plural(len(ours), 'shifted weight')}")
        if apart:
            print(f"warning: {len(apart)} layers of {a.file} were left out: SD2's text-encoder q/k/v projections, "
                  "one fused matrix (in_proj) in our format whose singular values are not the three of svdiff-pytorch; "
                  f"apply {a.file} itself with --shifts to keep them exact", file=sys.stderr)
        return
    apply_shifts.apply_shift_files(model, a.shifts, force=a.force, merged=False)
    if a.command == "export-lora":
        exports.export_lora(model, a.out, a.rank, per_layer=a.per_layer)
    else:
        exports.export_merged(model, a.model, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    cli.run(main)
