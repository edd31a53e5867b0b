"""Shift files applied to a model, as sample.py, edit.py and the exports apply them: ours and svdiff-pytorch's, with
their scales (Eq. 4-5), merged once so that sampling costs what the base model costs."""
import shutil
import warnings
from pathlib import Path

import torch

import svdiff
from support import fast_layer, shift_files, svdiff_pytorch
from support.files import atomic_write


def check_shift_files(specs, flag=None):
    """Every FILE[:SCALE] read and judged before any model is loaded or fetched (gigabytes, for a typo): it exists,
    is a readable .safetensors of δ in our format or svdiff-pytorch's (with its _te file). What only the model can
    judge (its family, fingerprint and layers) is checked when the shifts are applied."""
    for spec in specs:
        path, _ = shift_files.parse_spec(spec)
        if flag and not path.is_file():  # (without a flag: read_shift_file's "no such shift file")
            raise ValueError(f"{flag} {spec}: no such file; pass the shifts.safetensors of a train.py run")
        tensors, _ = shift_files.read_shift_file(path)
        if shift_files.file_format(path, tensors) != shift_files.FORMAT:
            svdiff_pytorch.read_svdiff_pytorch(path)


def apply_shift_files(model, specs, force=False, merged=True, mix=None, cache=None):
    """sample.py --shifts A.safetensors[:s] B.safetensors[:s]: ReLU(σ + Σ sᵢδᵢ) (Eq. 4-5), merged once so that
    sampling costs what the base model costs. `cache`: the SVD cache file of add_spectral_shifts. svdiff-pytorch
    files are summed in their own δ (Σ sᵢδᵢ, as their scale works) and carried over into ours; SD2's text q/k/v,
    which they shift as three matrices and we hold as one, are then set to their W' directly (merged only)."""
    ours, theirs = [], {}
    for spec in specs:
        path, scale = shift_files.parse_spec(spec)
        if shift_files.file_format(path, shift_files.read_shift_file(path)[0]) == shift_files.FORMAT:
            ours.append(spec)
            continue
        for k, d in svdiff_pytorch.read_svdiff_pytorch(path).items():
            theirs[k] = theirs.get(k, 0) + scale * d.float()
    combined, apart = {}, {}
    if ours:
        combined, meta = shift_files.combine_files(ours, mix)
        shift_files.check_shift_file(model, ours[0], meta, force)
    if theirs:
        if mix is not None:
            raise ValueError("style mixing takes svdiff shift files; convert svdiff-pytorch files first "
                             "(shifts.py convert)")
        converted, apart = svdiff_pytorch.from_svdiff_pytorch(model, theirs, " + ".join(specs))
        warnings.warn("svdiff-pytorch files hold no base-model fingerprint: only their layers' shapes were checked")
        for k, d in converted.items():
            combined[k] = combined[k] + d if k in combined else d
    if apart and not merged:
        raise ValueError("SD2's text-encoder q/k/v of an svdiff-pytorch file are exact only applied for sampling "
                         "(--shifts); to export, convert the file first (shifts.py convert), which leaves them out")
    clash = {k for k, _ in apart} & set(combined)
    if clash:
        raise ValueError(f"{sorted(clash)[0]}: shifted by an svdiff shift file and, as q/k/v, by an svdiff-pytorch "
                         "file; the two cannot be combined on this layer")
    names = shift_files.names_by_key(model)
    for k in combined:
        if k not in names:
            raise ValueError(f"key {k} of the shift files is not a weight of this model")
    if combined:
        fast_layer.add_spectral_shifts(model, names={names[k] for k in combined}, cache=cache, progress=True)
    layers = dict(shift_files.shifts_by_key(model))
    for k, d in combined.items():
        with torch.no_grad():
            layers[k].delta.copy_(shift_files.fit_length(d, layers[k].delta.shape[0], f"key {k}"))
    if merged:
        svdiff.bake(model)
    with torch.no_grad():
        for (k, block), d in apart.items():
            component, _, path = names[k].partition(".")
            rows = getattr(model, component).get_submodule(path).weight.chunk(3)[block]
            rows.copy_(svdiff_pytorch.svdiff_pytorch_weight(rows, d))


def copy_shift_file(spec, out: Path):
    """edit.py --shifts: the file it edited with, copied into --out as shifts.safetensors (with an svdiff-pytorch
    file's text-encoder half beside it) unless it is that file already."""
    out.mkdir(parents=True, exist_ok=True)
    copies = {Path(spec): out / "shifts.safetensors"}
    te = svdiff_pytorch.svdiff_pytorch_te_file(spec)
    if te:
        copies[te] = out / "shifts_te.safetensors"
    for src, dst in copies.items():
        if not dst.exists() or not dst.samefile(src):
            atomic_write(lambda p: shutil.copyfile(src, p), dst)
