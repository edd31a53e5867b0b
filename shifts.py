"""Shift files: the δ of a trained model on disk, keyed by the weights' original checkpoint names; reading them
back (checked against the base model's fingerprint), combining them (Eq. 4-5, style mixing), applying them for
sampling, and exporting them as a LoRA or a merged checkpoint that any Stable Diffusion tool loads. Shift files of
svdiff-pytorch (spectral_shifts.safetensors) are applied as that implementation computes them, or converted.

    python shifts.py info runs/sks/shifts.safetensors
    python shifts.py combine dog.safetensors:0.7 cat.safetensors:0.3 --out mix.safetensors
    python shifts.py combine geometry.safetensors appearance.safetensors --mix output_blocks.0-5 --out style.safetensors
    python shifts.py export-lora runs/sks/shifts.safetensors --model v1-5.safetensors --rank 8 --out sks_lora.safetensors
    python shifts.py export-merged runs/sks/shifts.safetensors --model v1-5.safetensors --out v1-5-sks.safetensors
    python shifts.py convert spectral_shifts.safetensors --model v1-5.safetensors --out sks.safetensors
"""
import argparse
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoint
import sd
from svdiff import (SpectralShift, add_spectral_shifts, atomic_write, bake, combine, fingerprint, merge,
                    shiftable_modules, shifts, svd)

FORMAT = "svdiff-shifts"
VERSION = "1"


# ---------------------------------------------------------------------------------------------------------------
# Shift files: one 1-D δ per shifted weight, keyed by its ORIGINAL checkpoint name


def save_shift_file(model, path, half=False, subset="all", rank=None, step=None, deltas=None):
    """δ of every shifted layer (or `deltas`, δ by key), keyed by the weight's ORIGINAL single-file checkpoint name.
    `step`: the training step the δ belong to (train.py's resume checks it against resume.pt)."""
    from safetensors.torch import save_file
    deltas = {k: m.delta for k, m in shifts(model)} if deltas is None else deltas
    tensors = {k: d.detach().to(torch.float16 if half else torch.float32).cpu().contiguous() for k, d in deltas.items()}
    meta = {"format": FORMAT, "version": VERSION, "family": model.family, "subset": str(subset),
            "rank": str(rank or ""), "fingerprint": fingerprint(model),
            "base_model": model.source}  # sample.py / edit.py load it when --model is not given
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


def file_format(path, tensors) -> str:
    """FORMAT (ours: the weights' original checkpoint names) or "svdiff-pytorch" (module paths + ".delta")."""
    keys = list(tensors)
    if keys and all(k.startswith((sd.UNET_PREFIX, *sd.TEXT_PREFIXES)) for k in keys):
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
    layers = dict(shifts(model))
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
COMPONENT_PREFIXES = [("unet", sd.UNET_PREFIX)] + [(c, p) for family in sd.TEXT_ENCODERS.values()
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
        combined[k] = combine([fit_length(d, n, k) for d, _ in ds], [s for _, s in ds])
    ranks = [meta.get("rank", "") for _, (_, meta) in read]  # "": no limit
    return combined, dict(first_meta, rank="" if "" in ranks else str(max(map(int, ranks))))


# ---------------------------------------------------------------------------------------------------------------
# svdiff-pytorch files (mkshing/svdiff-pytorch, its Colab and its Space): spectral_shifts.safetensors for the UNet
# and, with the text encoder, spectral_shifts_te.safetensors; fp32, no metadata, one δ per module keyed by the
# diffusers / transformers module path + ".delta". Its layers compute W' = U diag(ReLU(σ + s·δ)) Vᵀ (σ descending,
# s its inference scale) of the same matrices as ours, and shift a norm's γ as the 1 x C matrix it is: ONE δ,
# W' = ReLU(‖γ‖ + s·δ)·γ/‖γ‖. Versions 0.1.x shifted neither norms nor the text encoder.


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


def check_shift_files(specs, flag=None):
    """Every FILE[:SCALE] read and judged before any model is loaded or fetched (gigabytes, for a typo): it exists,
    is a readable .safetensors of δ in our format or svdiff-pytorch's (with its _te file). What only the model can
    judge (its family, fingerprint and layers) is checked when the shifts are applied."""
    for spec in specs:
        path, _ = parse_spec(spec)
        if flag and not path.is_file():  # (without a flag: read_shift_file's "no such shift file")
            raise ValueError(f"{flag} {spec}: no such file; pass the shifts.safetensors of a train.py run")
        tensors, _ = read_shift_file(path)
        if file_format(path, tensors) != FORMAT:
            read_svdiff_pytorch(path)


def svdiff_pytorch_target(model, key: str, path):
    """svdiff-pytorch key -> (our original checkpoint key, block). SD2's text q/k/v are separate matrices in
    transformers and blocks 0/1/2 (rows) of OpenCLIP's fused in_proj in ours; every other layer is the same matrix."""
    import clip_text
    import unet as unet_lib
    name = key.removesuffix(".delta") + ".weight"
    try:
        if not name.startswith("text_model."):
            return sd.checkpoint_key("unet", unet_lib.diffusers_to_original(name, model.unet.cfg), model.family), None
        ours = clip_text.diffusers_to_original(name, model.text_encoder.cfg)
        if ours is None:
            raise ValueError("not a layer SD runs")
    except ValueError:
        raise ValueError(f"{path}: {key} is not a layer of this {model.family} model; "
                         "is the file for another architecture?") from None
    m = re.search(r"\.attn\.([qkv])_proj\.weight$", ours)
    if m:
        fused = ours[:m.start()] + ".attn.in_proj.weight"
        return sd.checkpoint_key("text_encoder", fused, model.family), "qkv".index(m[1])
    return sd.checkpoint_key("text_encoder", ours, model.family), None


def svdiff_pytorch_weight(W, delta):
    """svdiff-pytorch's forward, W' = U diag(ReLU(σ + δ)) Vᵀ (δ with its scale in), on the matrix it takes: a Linear or
    Embedding weight as is, a conv kernel as c_out x c_in·kh·kw, a norm's γ as 1 x C (σ = ‖γ‖). Same shape and dtype."""
    M = W.reshape(1, -1) if W.ndim == 1 else W.flatten(1)
    U, S, V = svd(M)
    return ((U * F.relu(S + delta.to(S))) @ V.T).reshape(W.shape).to(W.dtype)


def from_svdiff_pytorch(model, deltas: dict, path):
    """svdiff-pytorch δ (Σ sᵢδᵢ already) -> (our δ by key, {(key, block): δ} set apart). A matrix's δ carries over one
    to one (the same matrix, the same descending σ); a norm's one number becomes our full-length γ shift W'(γ) - γ,
    exact; SD2's text q/k/v blocks cannot: the fused matrix's singular values are not theirs."""
    modules = {_key(model, c, n): m for c, n, m in shiftable_modules(model)}
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


def _key(model, component, name):
    return sd.checkpoint_key(component, name + ".weight", model.family)


def apply_shift_files(model, specs, force=False, merged=True, mix=None, cache=None):
    """sample.py --shifts A.safetensors[:s] B.safetensors[:s]: ReLU(σ + Σ sᵢδᵢ) (Eq. 4-5), merged once so that
    sampling costs what the base model costs. `cache`: the SVD cache file of add_spectral_shifts. svdiff-pytorch
    files are summed in their own δ (Σ sᵢδᵢ, as their scale works) and carried over into ours; SD2's text q/k/v,
    which they shift as three matrices and we hold as one, are then set to their W' directly (merged only)."""
    ours, theirs = [], {}
    for spec in specs:
        path, scale = parse_spec(spec)
        if file_format(path, read_shift_file(path)[0]) == FORMAT:
            ours.append(spec)
            continue
        for k, d in read_svdiff_pytorch(path).items():
            theirs[k] = theirs.get(k, 0) + scale * d.float()
    combined, apart = {}, {}
    if ours:
        combined, meta = combine_files(ours, mix)
        check_shift_file(model, ours[0], meta, force)
    if theirs:
        if mix is not None:
            raise ValueError("style mixing takes svdiff shift files; convert svdiff-pytorch files first "
                             "(shifts.py convert)")
        converted, apart = from_svdiff_pytorch(model, theirs, " + ".join(specs))
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
    known = {_key(model, component, name) for component, name, _ in shiftable_modules(model)}
    for k in combined:
        if k not in known:
            raise ValueError(f"key {k} of the shift files is not a weight of this model")
    if combined:
        add_spectral_shifts(model, keys=set(combined), cache=cache, progress=True)
    layers = dict(shifts(model))
    for k, d in combined.items():
        with torch.no_grad():
            layers[k].delta.copy_(fit_length(d, layers[k].delta.shape[0], f"key {k}"))
    if merged:
        bake(model)
    modules = {_key(model, c, n): m for c, n, m in shiftable_modules(model)}
    with torch.no_grad():
        for (k, block), d in apart.items():
            rows = modules[k].weight.chunk(3)[block]
            rows.copy_(svdiff_pytorch_weight(rows, d))


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
    import clip_text
    import unet as unet_lib
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
    from safetensors.torch import save_file
    factors, errors, skipped = [], [], []
    for component in sd.SHIFTED:  # UNet and text encoder(s)
        root = getattr(model, component)
        for name, layer in (root.named_modules() if root is not None else []):
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
    if per_layer:
        for name, err, _ in errors:
            print(f"{name}: relative error {err:.4f}")
    num = sum(e ** 2 * t for _, e, t in errors)
    den = sum(t for _, _, t in errors)
    total = (num / den).sqrt().item() if den > 0 else 0.0
    worst = max(errors, key=lambda e: e[1], default=None)
    print(f"LoRA of {sd.plural(len(errors), 'layer')} at rank {rank} (written at rank {K}): total relative error "
          f"‖ΔW − LoRA‖/‖ΔW‖ {total:.4f}" + (f", worst layer {worst[0]} {worst[1]:.4f}" if worst else "")
          + ("" if per_layer else " (--per-layer: every layer's)"))
    if skipped:
        print(f"warning: {sd.plural(len(skipped), 'shifted layer')} (norm γ, embeddings, rank-limited) cannot be "
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
    from safetensors.torch import save_file
    merge(model, keep_original=False)
    new = {k: m.base.weight for k, m in shifts(model)}
    tf = checkpoint.TensorFile(Path(source))
    out = {}
    for k, t in tf.tensors(list(tf.shapes)):
        if k in new:
            t = sd.fit_shape(new[k].detach().to("cpu", t.dtype), t.shape) if t.is_floating_point() else t
        out[k] = t.contiguous()
    missing = set(new) - set(out)
    if missing:
        raise ValueError(f"{source} lacks {sd.plural(len(missing), 'shifted weight')} (e.g. {sorted(missing)[0]})")
    atomic_write(lambda p: save_file(out, str(p)), Path(path))


# ---------------------------------------------------------------------------------------------------------------
# Command line: info, combine, export-lora, export-merged, convert


def main(argv=None):
    p = argparse.ArgumentParser(description="Inspect, combine and export SVDiff shift files.",
                                formatter_class=sd.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what a shift file holds")
    info.add_argument("file")
    comb = sub.add_parser("combine", help="Σ sᵢδᵢ of several files (Eq. 4-5), or style mixing of two",
                          formatter_class=sd.HelpFormatter)
    comb.add_argument("files", nargs="+", metavar="FILE[:SCALE]")
    comb.add_argument("--mix", nargs="+", default=None, metavar="RANGE",
                      help="style mixing: these layer ranges (e.g. input_blocks.4-8, middle_block) from the second "
                           "file, all other layers from the first")
    comb.add_argument("--half", action="store_true", help="store fp16")
    comb.add_argument("--out", required=True, help="the combined shift file to write")
    for name, helptext in (("export-lora", "a kohya-format LoRA for AUTOMATIC1111 / ComfyUI"),
                           ("export-merged", "a single-file checkpoint with the shifts baked in")):
        e = sub.add_parser(name, help=helptext, formatter_class=sd.HelpFormatter)
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
                                          "format", formatter_class=sd.HelpFormatter)
    conv.add_argument("file", help="svdiff-pytorch's spectral_shifts.safetensors")
    conv.add_argument("te_file", nargs="?", default=None,
                      help="its spectral_shifts_te.safetensors (default: the one beside FILE, if any)")
    conv.add_argument("--model", required=True, help="the base model the shifts were trained on")
    conv.add_argument("--vocab", default=None, help="CLIP BPE vocabulary (single-file models)")
    conv.add_argument("--out", required=True, help="the shift file to write, in our format")
    a = p.parse_args(argv)

    if a.command == "info":
        tensors, meta = read_shift_file(a.file)
        floats = sum(t.numel() for t in tensors.values())
        print(f"{a.file}: {sd.plural(len(tensors), 'shifted weight')}, {sd.plural(floats, 'value')}, "
              f"{sd.plural(os.path.getsize(a.file), 'byte')}")
        for k, v in sorted(meta.items()):
            if k == "rank" and not v:  # "": trained (or combined) without --rank
                v = "full (every singular value)"
            print(f"  {k}: {v}")
        if file_format(a.file, tensors) != FORMAT:
            print("  svdiff-pytorch file: apply it with --shifts, or write it in our format with shifts.py convert")
        for component, prefix in COMPONENT_PREFIXES:  # per component (SDXL: unet, text_encoder, text_encoder_2)
            part = [t for k, t in tensors.items() if k.startswith(prefix)]
            if part:
                print(f"  {component} ({prefix}*): {sd.plural(len(part), 'weight')}, "
                      f"{sd.plural(sum(t.numel() for t in part), 'value')}, "
                      f"|δ| mean {torch.cat([t.float().abs() for t in part]).mean():.4g}")
        return
    check_shift_files(a.files if a.command == "combine" else getattr(a, "shifts", []))
    if Path(a.out).is_dir():  # (every command but info writes --out; checked before minutes of SVD)
        raise ValueError(f"--out {a.out} is a folder; name the file to write, e.g. {Path(a.out) / 'out.safetensors'}")
    sd.check_writable(Path(a.out).parent, "--out")
    if a.command == "combine":
        combined, meta = combine_files(a.files, a.mix)
        meta = dict(meta, subset=f"combined({', '.join(a.files)})")
        from safetensors.torch import save_file
        out = {k: v.to(torch.float16 if a.half else torch.float32).contiguous() for k, v in combined.items()}
        atomic_write(lambda p: save_file(out, str(p), metadata=meta), Path(a.out))
        print(f"wrote {a.out}: {sd.plural(len(out), 'shifted weight')}")
        return
    if a.command == "export-lora" and a.rank < 1:
        raise ValueError("--rank must be at least 1")
    if a.command != "convert":
        a.model = sd.choose_model(a.model, parse_spec(a.shifts[0])[0])
    if a.command == "export-merged" and not Path(a.model).is_file():
        raise ValueError(f"--model {a.model} is not a single-file checkpoint; export-merged rewrites one (.safetensors/"
                         ".ckpt), not a diffusers folder or Hub id")
    theirs = read_svdiff_pytorch(a.file, a.te_file) if a.command == "convert" else None  # before loading a model
    model = sd.load(a.model, vocab=a.vocab, components=("unet", "text_encoder"))
    if a.command == "convert":
        ours, apart = from_svdiff_pytorch(model, theirs, a.file)
        save_shift_file(model, a.out, subset="svdiff-pytorch", deltas=ours)
        print(f"wrote {a.out}: {sd.plural(len(ours), 'shifted weight')}")
        if apart:
            print(f"warning: {len(apart)} layers of {a.file} were left out: SD2's text-encoder q/k/v projections, "
                  "one fused matrix (in_proj) in our format whose singular values are not the three of svdiff-pytorch; "
                  f"apply {a.file} itself with --shifts to keep them exact", file=sys.stderr)
        return
    apply_shift_files(model, a.shifts, force=a.force, merged=False)
    if a.command == "export-lora":
        export_lora(model, a.out, a.rank, per_layer=a.per_layer)
    else:
        export_merged(model, a.model, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
