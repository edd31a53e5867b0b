"""Shift files of svdiff-pytorch, the other public implementation (mkshing/svdiff-pytorch, its Colab and its
Space): spectral_shifts.safetensors for the UNet and, with the text encoder, spectral_shifts_te.safetensors; fp32, no metadata, one δ per module keyed by the
diffusers / transformers module path + ".delta". Its layers compute W' = U diag(ReLU(σ + s·δ)) Vᵀ (σ descending,
s its inference scale) of the same matrices as ours, and shift a norm's γ as the 1 x C matrix it is: ONE δ,
W' = ReLU(‖γ‖ + s·δ)·γ/‖γ‖. Versions 0.1.x shifted neither norms nor the text encoder.
They are applied as that implementation computes them, or converted to ours (shifts.py convert).
"""
import re
from pathlib import Path

import torch.nn.functional as F

import clip_text
import svdiff
import unet as unet_lib
from support import loading
from support.shift_files import file_format, key_of, read_shift_file


def svdiff_pytorch_te_file(path):
    """The text-encoder file svdiff-pytorch writes beside its UNet file (spectral_shifts_te.safetensors), if any."""
    path = Path(path)
    te = path.with_name(path.stem + "_te" + path.suffix)
    return te if te.is_file() else None


def read_svdiff_pytorch(path, te_path=None) -> dict:
    """δ by svdiff-pytorch key: the UNet file, and its text-encoder file (`te_path`, else the one beside it)."""
    tensors, _ = read_shift_file(path)
    if file_format(path, tensors) != "svdiff-pytorch":
        raise ValueError(f"{path} is already an svdiff shift file, not an svdiff-pytorch one")
    if all(k.startswith("text_model.") for k in tensors):
        raise ValueError(f"{path} holds only svdiff-pytorch text-encoder shifts (its spectral_shifts_te.safetensors); "
                         "pass its UNet file, spectral_shifts.safetensors: the _te file beside it is read with it")
    te_path = te_path or svdiff_pytorch_te_file(path)
    if te_path:
        te, _ = read_shift_file(te_path)
        if file_format(te_path, te) != "svdiff-pytorch" or not all(k.startswith("text_model.") for k in te):
            raise ValueError(f"{te_path}: not an svdiff-pytorch text-encoder file (keys text_model.….delta)")
        tensors |= te
    return tensors


def svdiff_pytorch_target(model, key: str, path):
    """svdiff-pytorch key -> (our original checkpoint key, block). SD2's text q/k/v are separate matrices in
    transformers and blocks 0/1/2 (rows) of OpenCLIP's fused in_proj in ours; every other layer is the same matrix."""
    name = key.removesuffix(".delta") + ".weight"
    try:
        if not name.startswith("text_model."):
            return loading.checkpoint_key("unet", unet_lib.diffusers_to_original(name, model.unet.cfg), model.family), None
        ours = clip_text.diffusers_to_original(name, model.text_encoder.cfg)
        if ours is None:
            raise ValueError("not a layer SD runs")
    except ValueError:
        raise ValueError(f"{path}: {key} is not a layer of this {model.family} model; "
                         "is the file for another architecture?") from None
    m = re.search(r"\.attn\.([qkv])_proj\.weight$", ours)
    if m:
        fused = ours[:m.start()] + ".attn.in_proj.weight"
        return loading.checkpoint_key("text_encoder", fused, model.family), "qkv".index(m[1])
    return loading.checkpoint_key("text_encoder", ours, model.family), None


def svdiff_pytorch_weight(W, delta):
    """svdiff-pytorch's forward, W' = U diag(ReLU(σ + δ)) Vᵀ (δ with its scale in), on the matrix it takes: a Linear or
    Embedding weight as is, a conv kernel as c_out x c_in·kh·kw, a norm's γ as 1 x C (σ = ‖γ‖). Same shape and dtype."""
    M = W.reshape(1, -1) if W.ndim == 1 else W.flatten(1)
    U, S, V = svdiff.svd(M)
    return ((U * F.relu(S + delta.to(S))) @ V.T).reshape(W.shape).to(W.dtype)


def from_svdiff_pytorch(model, deltas: dict, path):
    """svdiff-pytorch δ (Σ sᵢδᵢ already) -> (our δ by key, {(key, block): δ} set apart). A matrix's δ carries over one
    to one (the same matrix, the same descending σ); a norm's one number becomes our full-length γ shift W'(γ) - γ,
    exact; SD2's text q/k/v blocks cannot: the fused matrix's singular values are not theirs."""
    modules = {key_of(model, n): m for n, m in svdiff.shiftable_modules(model)}
    ours, apart = {}, {}
    for k, d in deltas.items():
        key, block = svdiff_pytorch_target(model, k, path)
        if key not in modules:
            raise ValueError(f"{path}: {k} is not a layer of this {model.family} model; is the file for another "
                             "architecture?")
        W = modules[key].weight if block is None else modules[key].weight.chunk(3)[block]
        length = 1 if W.ndim == 1 else min(W.shape[0], W[0].numel())
        if d.shape != (length,):
            raise ValueError(f"{path}: {k} holds {d.numel()} values, this {model.family} model's layer takes "
                             f"{length}; is the file for another architecture?")
        if block is not None:
            apart[key, block] = d
        elif W.ndim == 1:
            ours[key] = (svdiff_pytorch_weight(W.detach().float(), d) - W.detach().float()).cpu()
        else:
            ours[key] = d.float().cpu()
    return ours, apart
