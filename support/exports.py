"""Shifts exported for every other Stable Diffusion tool: as a LoRA (kohya's names, which AUTOMATIC1111, ComfyUI,
kohya's sd-scripts and diffusers load) or as a merged single-file checkpoint with W_δ baked in."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clip_text
import svdiff
import unet as unet_lib
from support import checkpoint, loading, shift_files
from support.cli import plural
from support.files import atomic_write


def lora_factors(layer: svdiff.SpectralShift, rank: int):
    """ΔW = Σ (ReLU(σᵢ+δᵢ) - σᵢ) uᵢ vᵢᵀ, so its best rank-k approximation (Eckart-Young) keeps the k terms with
    the largest |ReLU(σᵢ+δᵢ) - σᵢ|. Returns (up [m, k], down [k, n], relative Frobenius error)."""
    d = layer.delta_sigma().detach().double()
    keep = d.abs().argsort(descending=True)[:rank]
    up = layer.U[:, keep].double() * d[keep]
    down = layer.V[:, keep].double().T
    total = d.square().sum()
    err = ((total - d[keep].square().sum()).clamp_min(0) / total).sqrt().item() if total > 0 else 0.0
    return up, down, err


# kohya's LoRA names (AUTOMATIC1111, ComfyUI and diffusers read them): a prefix + the module path the trainer saw,
# dots -> '_'. For SD 1.x/2.x kohya trains diffusers' UNet and transformers' text encoder (`lora_unet_down_blocks_…`,
# `lora_te_text_model_…`); for SDXL its own copy of the original UNet, whose names are the single file's and so ours
# (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and transformers' two encoders, `lora_te1_`
# (ViT-L) and `lora_te2_` (bigG).
LORA_TEXT_PREFIX = {"sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}  # SD 1.x/2.x: lora_te_
LORA_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version


def lora_names(model, component, name):
    """kohya's LoRA name(s) of one of our modules: one, or three for an OpenCLIP fused q/k/v (SD2, SDXL's bigG),
    whose rows are transformers' q_proj, k_proj, v_proj."""
    if component == "unet":
        path = name if model.family == "sdxl" else \
            unet_lib.original_to_diffusers(name + ".weight", model.unet.cfg).removesuffix(".weight")
        return ["lora_unet_" + path.replace(".", "_")]
    prefix = LORA_TEXT_PREFIX.get(model.family, {}).get(component, "lora_te_")
    return [prefix + hf.removesuffix(".weight").replace(".", "_")
            for hf in clip_text.module_to_hf(name + ".weight", getattr(model, component).cfg)]


def export_lora(model, path, rank=4, dtype=torch.float16, per_layer=False):
    """Write the shifts as a rank-`rank` LoRA that diffusers / AUTOMATIC1111 / ComfyUI / kohya load. Prints one line:
    the layers, the total relative error ‖ΔW − LoRA‖/‖ΔW‖ and the worst layer's (`per_layer`: each layer's before it,
    hundreds of lines for a whole model); γ and embedding shifts cannot be expressed as a LoRA and are skipped.
    Returns the total relative error.

    Every layer is written at ONE rank K (the largest min(rank, rank of the layer)) with ONE alpha = K, so each
    loader's scale alpha/r is 1 however it collects them: diffusers names the alphas of kohya attention layers after
    its old `processor.to_q_lora` modules, peft matches none of them, and those layers get the MOST COMMON alpha
    over their own rank (measured: ×0.5 and ×2 on files whose layers had different ranks). A layer of lower rank is
    padded with zero rows of `down` and zero columns of `up`: the product, and so ΔW, is unchanged."""
    factors, errors, skipped = [], [], []
    for full_name, layer in svdiff.shifts(model):  # UNet and text encoder(s)
        component, _, name = full_name.partition(".")
        if layer.kind in ("norm", "embedding") or not layer.full_rank:
            skipped.append(name)
            continue
        up, down, err = lora_factors(layer, rank)
        errors.append((full_name, err, layer.delta_sigma().detach().double().square().sum()))
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
    if per_layer:
        for name, err, _ in errors:
            print(f"{name}: relative error {err:.4f}")
    num = sum(e ** 2 * t for _, e, t in errors)
    den = sum(t for _, _, t in errors)
    total = (num / den).sqrt().item() if den > 0 else 0.0
    worst = max(errors, key=lambda e: e[1], default=None)
    print(f"LoRA of {plural(len(errors), 'layer')} at rank {rank} (written at rank {K}): total relative error "
          f"‖ΔW − LoRA‖/‖ΔW‖ {total:.4f}" + (f", worst layer {worst[0]} {worst[1]:.4f}" if worst else "")
          + ("" if per_layer else " (--per-layer: every layer's)"))
    if skipped:
        print(f"warning: {plural(len(skipped), 'shifted layer')} (norm γ, embeddings, rank-limited) cannot be "
              "expressed in a LoRA; left out", file=sys.stderr)
    # kohya's metadata; AUTOMATIC1111 files a LoRA under SDXL by ss_base_model_version "sdxl_…", under SD2 by
    # ss_v2 "True", and under SD1 otherwise (its Lora tab hides those of the other kinds)
    meta = {"ss_network_dim": str(K), "ss_network_alpha": str(K), "ss_network_module": "networks.lora",
            "ss_base_model_version": LORA_BASE_MODEL_VERSION[model.family], "ss_v2": str(model.family == "sd2")}
    atomic_write(lambda p: save_file(tensors, str(p), metadata=meta), Path(path))
    return total


def export_merged(model, source, path):
    """A new single-file checkpoint (original layout, the source's dtype) with W_δ baked in: the source file's
    tensors streamed, the shifted ones replaced, everything else copied."""
    svdiff.merge(model, keep_original=False)
    new = {k: m.base.weight for k, m in shift_files.shifts_by_key(model)}
    tf = checkpoint.TensorFile(Path(source))
    out = {}
    for k, t in tf.tensors(list(tf.shapes)):
        if k in new:
            t = loading.fit_shape(new[k].detach().to("cpu", t.dtype), t.shape) if t.is_floating_point() else t
        out[k] = t.contiguous()
    missing = set(new) - set(out)
    if missing:
        raise ValueError(f"{source} lacks {plural(len(missing), 'shifted weight')} (e.g. {sorted(missing)[0]})")
    atomic_write(lambda p: save_file(out, str(p)), Path(path))
