"""The two layouts Stable Diffusion weights come in, read into our modules (sd.load is the entry point).

  (a) one original checkpoint file (.safetensors or .ckpt): keys `model.diffusion_model.*` (UNet),
      `first_stage_model.*` (VAE), `cond_stage_model.*` (the text encoder of SD1/2) or
      `conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*` (SDXL's two);
  (b) a diffusers folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ (SDXL: also text_encoder_2/ and
      tokenizer_2/), each with its config.json.
Facts: shared/reference/sd_weights_and_sampling.md (§8 for SDXL). Our modules are named after layout (a), so (a)
loads by stripping a prefix; (b) goes through each component's short `diffusers_to_original` rename rule. Weights
stream tensor by tensor into modules built on the `meta` device, so the process never holds two copies of the
model; the digests of the weights as stored are taken on the way (support/fingerprint.py).
"""
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

import clip_text
import svdiff
import unet as unet_lib
import vae as vae_lib
from support import checkpoint, hub

# Original-layout prefixes of the components. The text encoders depend on the family: each is
# component -> (prefix, the names it is stored under: clip_text.TextConfig.family, "sd1" = Hugging Face CLIP names,
# "sd2" = OpenCLIP names). SDXL conditions on two encoders at once (ViT-L and bigG).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODERS = {"sd1": {"text_encoder": ("cond_stage_model.transformer.", "sd1")},
                 "sd2": {"text_encoder": ("cond_stage_model.model.", "sd2")},
                 "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "sd1"),
                          "text_encoder_2": ("conditioner.embedders.1.model.", "sd2")}}
TEXT_PREFIXES = tuple(prefix for family in TEXT_ENCODERS.values() for prefix, _ in family.values())  # all of them
# What `load(components=)` names. "text_encoder" is the model's text side: SDXL's pair of encoders (and their
# tokenizers), which only work together (the UNet's context is both encoders' states side by side).
COMPONENTS = ("unet", "vae", "text_encoder")
HALF = (torch.float16, torch.bfloat16)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # the scripts' --dtype
DEFAULT_SIZE = {"sd1": 512, "sd2": 512, "sdxl": 1024}  # image side when none is given (SDXL was trained at 1024)
DEFAULT_MODEL = hub.DEFAULT_MODEL  # what the scripts run on when neither --model, a shift file's base model nor
                                   # $SVDIFF_MODEL names one


def checkpoint_key(component: str, module_key: str, family: str) -> str:
    """Our module parameter name -> its name in the original single-file checkpoint (shift files use these)."""
    if component == "unet":
        return UNET_PREFIX + module_key
    if component == "vae":
        return VAE_PREFIX + module_key
    if component in TEXT_ENCODERS[family]:
        prefix, names = TEXT_ENCODERS[family][component]
        return prefix + clip_text.module_to_original_key(module_key, names)
    raise ValueError(f"unknown component {component!r} of an {family} model")


def split_checkpoint_key(key: str, family: str) -> tuple[str, str] | None:
    """Inverse of checkpoint_key: original key -> (component, module key), or None for keys we do not model."""
    if key.startswith(UNET_PREFIX):
        return "unet", key[len(UNET_PREFIX):]
    if key.startswith(VAE_PREFIX):
        return "vae", key[len(VAE_PREFIX):]
    for component, (prefix, names) in TEXT_ENCODERS[family].items():
        if key.startswith(prefix):
            return component, clip_text.original_to_module_key(key[len(prefix):], names)
    return None


# ---------------------------------------------------------------------------------------------------------------
# What is this file?

SDXL_REFINER_TEXT = "conditioner.embedders.0.model."  # the SDXL refiner conditions on bigG alone


def _describe_foreign(keys: set[str]) -> str:
    """Name what a non-SD-1.x/2.x/XL file looks like, for the error message."""
    if any(k.startswith(SDXL_REFINER_TEXT) for k in keys):
        return "an SDXL refiner (image to image on bigG alone; only the SDXL base model is supported)"
    if any(".lora_down." in k or ".lora_up." in k or "lora_A" in k or k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "a LoRA, not a full model; pass the base SD checkpoint instead"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "first_stage_model.")) for k in keys) and \
            not any(k.startswith(UNET_PREFIX) for k in keys):
        return "a VAE alone, not a full model"
    if any(k.startswith(("down_blocks.", "conv_in.", "mid_block.")) for k in keys):
        return "a single diffusers component; pass the whole diffusers folder instead"
    return "an unknown model"


def detect_family(shapes: dict[str, tuple]) -> str:
    """sd1, sd2 or sdxl from an original-layout state dict: SDXL's text encoders are `conditioner.embedders.*`
    and its UNet has label_emb; between SD1 and SD2 the to_k width decides, as diffusers does."""
    if any(k.startswith("conditioner.embedders.") for k in shapes) or \
            (UNET_PREFIX + "label_emb.0.0.weight" in shapes and not any(k.startswith("cond_stage_model.") for k in shapes)):
        return "sdxl"
    if any(k.startswith(TEXT_ENCODERS["sd2"]["text_encoder"][0]) for k in shapes):
        return "sd2"
    to_k = [s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    proj_in = [s for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")]
    if (to_k and to_k[0][-1] == 1024) or (proj_in and len(proj_in[0]) == 2):
        return "sd2"
    return "sd1"


def _ignored_key(key: str, family: str, text_cfgs: dict) -> bool:
    """Keys a single file may carry that we do not model: EMA copies, schedule buffers (SDXL files saved by the
    sgm code or the UIs: `denoiser.sigmas`), unused text parts."""
    if key.startswith(("model_ema.", "denoiser.")):
        return True
    if "." not in key:  # LatentDiffusion buffers: betas, alphas_cumprod, posterior_*, logvar, ...
        return True
    for component, (prefix, _) in TEXT_ENCODERS[family].items():
        if key.startswith(prefix) and component in text_cfgs:
            return clip_text.ignored_original_key(key[len(prefix):], text_cfgs[component])
    return False


# ---------------------------------------------------------------------------------------------------------------
# Building modules from streamed tensors


def fit_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The one reshape rule between layouts: a 1x1 conv kernel [C,C,1,1] and a Linear weight [C,C] are the same
    matrix (UNet proj_in/out of SD2 vs SD1 files, VAE attention in diffusers vs original files)."""
    if t.shape != shape and t.numel() == shape.numel() and t.shape[:2] == shape[:2] and \
            all(d == 1 for d in list(t.shape[2:]) + list(shape[2:])):
        return t.reshape(shape)
    return t


def _build(module_fn, state: dict, name: str, path) -> nn.Module:
    """Build on `meta` (no memory) and adopt the streamed tensors as parameters: every key used, shapes exact."""
    with torch.device("meta"):
        module = module_fn()
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the {name} weights do not match an SD {name}: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}); the file is not a standard SD 1.x/2.x/XL checkpoint")
    for k, t in expected.items():
        state[k] = fit_shape(state[k], t.shape)
        if state[k].shape != t.shape:
            raise ValueError(f"{path}: {name} tensor {k} has shape {tuple(state[k].shape)}, expected "
                             f"{tuple(t.shape)}; the file does not match its own architecture")
    module.load_state_dict(state, strict=True, assign=True)
    # Our modules keep no buffers outside the checkpoint (position ids are made in forward), so nothing is left
    # on `meta`; check it, since a meta tensor would only fail later, far from here.
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    assert not left, f"{name}: not initialised by the checkpoint: {left[:3]}"
    return module.requires_grad_(False).eval()


def _cast(t: torch.Tensor, device, dtype) -> torch.Tensor:
    # Floating weights take the requested dtype (files are often fp16); integer buffers stay as they are.
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


# ---------------------------------------------------------------------------------------------------------------
# (a) one original checkpoint file


def _tokenizer_name(component: str) -> str:
    return component.replace("text_encoder", "tokenizer")  # text_encoder_2 -> tokenizer_2, as diffusers names them


def _dtypes(configs: dict, dtype) -> dict:
    """The dtype each component is loaded in: the requested one, but fp32 for a VAE that needs it (SDXL's overflows
    fp16; diffusers upcasts it before decoding, and loaded in fp32 it never needs that)."""
    return {c: torch.float32 if c == "vae" and cfg.force_upcast else dtype for c, cfg in configs.items()}


def load_single_file(path: Path, device, dtype, components, vocab):
    tf = checkpoint.TensorFile(path)
    keys = set(tf.shapes)
    if keys and all(len(s) == 1 for s in tf.shapes.values()):
        raise ValueError(f"{path}: this is a spectral-shift file (1-D tensors only), not a base model; "
                         "pass the base SD checkpoint as the model and this file with --shifts")
    if not any(k.startswith(UNET_PREFIX) for k in keys) or any(k.startswith(SDXL_REFINER_TEXT) for k in keys):
        raise ValueError(f"{path}: not an SD 1.x/2.x/XL checkpoint: it looks like {_describe_foreign(keys)}")
    family = detect_family(tf.shapes)
    strip = lambda prefix: {k[len(prefix):]: s for k, s in tf.shapes.items() if k.startswith(prefix)}

    configs = {}
    if "unet" in components:
        configs["unet"] = unet_lib.config_from_shapes(strip(UNET_PREFIX), family)
    if "vae" in components:
        if not any(k.startswith(VAE_PREFIX) for k in keys):
            raise ValueError(f"{path}: this checkpoint has no VAE (first_stage_model.*); use a full SD checkpoint")
        configs["vae"] = vae_lib.config_from_shapes(strip(VAE_PREFIX), family)
    text_cfgs = {}  # also when the text encoders are not loaded: they say which of the file's text keys are unused
    for component, (prefix, names) in TEXT_ENCODERS[family].items():
        if any(k.startswith(prefix) for k in keys):
            text_cfgs[component] = clip_text.config_from_shapes(
                {clip_text.original_to_module_key(k, names): s for k, s in strip(prefix).items()}, names,
                sdxl=family == "sdxl")
    if "text_encoder" in components:
        for component, (prefix, _) in TEXT_ENCODERS[family].items():
            if component not in text_cfgs:
                raise ValueError(f"{path}: this checkpoint has no text encoder ({prefix}*); use a full SD checkpoint")
            configs[component] = text_cfgs[component]
    dtypes = _dtypes(configs, dtype)

    # One pass over the file: route each tensor to its component, renamed to our module keys.
    state = {c: {} for c in configs}
    wanted = []
    for k in sorted(keys):
        if _ignored_key(k, family, text_cfgs):
            continue
        where = split_checkpoint_key(k, family)
        if where is None:
            raise ValueError(f"{path}: unexpected tensor {k!r}; the file is not a standard SD 1.x/2.x/XL checkpoint")
        if where[0] in state:
            wanted.append((k, where))
    routes = dict(wanted)
    digests = {c: {} for c in state if c in svdiff.COMPONENTS}
    for k, t in tf.tensors([k for k, _ in wanted]):
        comp, mkey = routes[k]
        if comp in digests:  # before the cast: the identity of the weights as stored (svdiff.fingerprint)
            digests[comp].update(checkpoint.tensor_digests(mkey, t))
        state[comp][mkey] = _cast(t, device, dtypes[comp])
    del tf

    modules, tokenizers = {}, {}
    if "unet" in configs:
        modules["unet"] = _build(lambda: unet_lib.UNet(configs["unet"]), state.pop("unet"), "UNet", path)
    if "vae" in configs:
        modules["vae"] = _build(lambda: vae_lib.VAE(configs["vae"]), state.pop("vae"), "VAE", path)
    for component, (_, names) in TEXT_ENCODERS[family].items():
        if component in configs:
            modules[component] = _build(lambda: clip_text.build_text_encoder(configs[component]),
                                        state.pop(component), component.replace("_", " "), path)
            # A single file carries no vocabulary: --vocab, or the CLIP vocabulary shipped with the project (all
            # of SD's tokenizers use it; they differ in the pad token only).
            tokenizers[_tokenizer_name(component)] = clip_text.Tokenizer.from_bpe(clip_text.find_bpe_vocab(vocab),
                                                                               clip_text.pad_id_for(names))
    return modules, tokenizers, family, None, {c: checkpoint.weights_digest(d) for c, d in digests.items()}


# ---------------------------------------------------------------------------------------------------------------
# (b) a diffusers folder


def _read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{folder}: missing config.json; the diffusers folder is incomplete")
    try:
        return json.loads(cfg.read_text())
    except ValueError:
        raise ValueError(f"{cfg}: not valid JSON; the diffusers folder is corrupt") from None


def _load_component_folder(folder: Path, stems: tuple[str, ...], rename, device, dtype, digests=None) -> dict:
    """One component's tensors, renamed to our module keys and cast; `digests` (a dict) collects their
    tensor_digests as stored."""
    state = {}
    for file in hub.weights_file(folder, stems, half=dtype in HALF):
        tf = checkpoint.TensorFile(file)
        for k, t in tf.tensors(list(tf.shapes)):
            new = rename(k)
            if new is not None:
                if digests is not None:
                    digests.update(checkpoint.tensor_digests(new, t))
                state[new] = _cast(t, device, dtype)
    return state


def folder_family(path: Path) -> str:
    """sdxl (a second text encoder, or a UNet with SDXL's add-embedding), else sd1/sd2 from the text encoder's
    activation or the UNet's context width."""
    unet_cfg = _read_config(path / "unet") if (path / "unet" / "config.json").is_file() else {}
    if (path / "text_encoder_2").is_dir() or unet_cfg.get("addition_embed_type"):
        return "sdxl"
    if (path / "text_encoder").is_dir():
        return clip_text.config_from_diffusers(_read_config(path / "text_encoder")).family
    return "sd2" if unet_cfg.get("cross_attention_dim") == 1024 else "sd1"


def load_folder(path: Path, device, dtype, components):
    family = folder_family(path)
    if family == "sdxl" and "text_encoder" in components and not (path / "text_encoder").is_dir() and \
            (path / "text_encoder_2").is_dir():
        raise ValueError(f"{path}: not an SD 1.x/2.x/XL model: it looks like an SDXL refiner (image to image on "
                         "bigG alone; only the SDXL base model is supported)")
    texts = list(TEXT_ENCODERS[family]) if "text_encoder" in components else []
    for sub in [c for c in components if c != "text_encoder"] + texts + [_tokenizer_name(c) for c in texts]:
        if not (path / sub).is_dir():
            raise ValueError(f"{path}: diffusers folder has no {sub}/ subfolder; the model is incomplete")
    configs = {}
    if "unet" in components:
        configs["unet"] = unet_lib.config_from_diffusers(_read_config(path / "unet"))
    if "vae" in components:
        configs["vae"] = vae_lib.config_from_diffusers(_read_config(path / "vae"), family)
    for component in texts:
        configs[component] = clip_text.config_from_diffusers(_read_config(path / component), sdxl=family == "sdxl")
    dtypes = _dtypes(configs, dtype)
    modules, tokenizers, digests = {}, {}, {c: {} for c in configs if c in svdiff.COMPONENTS}
    if "unet" in configs:
        cfg = configs["unet"]
        state = _load_component_folder(path / "unet", hub.WEIGHT_STEMS["unet"],
                                       lambda k: unet_lib.diffusers_to_original(k, cfg), device, dtypes["unet"],
                                       digests["unet"])
        modules["unet"] = _build(lambda: unet_lib.UNet(cfg), state, "UNet", path / "unet")
    if "vae" in configs:
        vcfg = configs["vae"]
        state = _load_component_folder(path / "vae", hub.WEIGHT_STEMS["vae"],
                                       lambda k: vae_lib.diffusers_to_original(k, vcfg), device, dtypes["vae"])
        modules["vae"] = _build(lambda: vae_lib.VAE(vcfg), state, "VAE", path / "vae")
    for component in texts:
        tcfg = configs[component]
        state = _load_component_folder(path / component, hub.WEIGHT_STEMS[component],
                                       lambda k: clip_text.diffusers_to_original(k, tcfg), device, dtypes[component],
                                       digests[component])
        if tcfg.family == "sd2":  # OpenCLIP names: q/k/v fused (and bigG's projection transposed)
            state = clip_text.openclip_from_hf(state)
        modules[component] = _build(lambda: clip_text.build_text_encoder(tcfg), state, component.replace("_", " "),
                                    path / component)
        tokenizers[_tokenizer_name(component)] = clip_text.Tokenizer.from_folder(
            path / _tokenizer_name(component), clip_text.pad_id_for(tcfg.family))
    prediction_type = None
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        prediction_type = json.loads(sched.read_text()).get("prediction_type")
    return modules, tokenizers, family, prediction_type, {c: checkpoint.weights_digest(d) for c, d in digests.items()}


# ---------------------------------------------------------------------------------------------------------------
# Which model, and its family, before loading it


def choose_model(model=None, shift_file=None) -> str:
    """The base model a command runs on: `model` (--model), else the one `shift_file` was trained on (its
    base_model metadata), else $SVDIFF_MODEL, else DEFAULT_MODEL. Prints one line naming it unless given."""
    if model:
        return model
    recorded = None
    if shift_file and Path(shift_file).is_file():
        try:
            recorded = checkpoint.TensorFile(Path(shift_file)).metadata.get("base_model")
        except (ValueError, OSError):
            pass  # not ours to judge here: reading the shifts later says what is wrong with the file
    for spec, why in ((recorded, f"the base model of {shift_file}"), (os.environ.get("SVDIFF_MODEL"), "$SVDIFF_MODEL"),
                      (DEFAULT_MODEL, "default")):
        if spec:
            print(f"model: {spec} ({why}; --model to choose another)")
            return spec


def peek_family(path, half: bool = False) -> str:
    """The family ("sd1", "sd2", "sdxl") of what `load(path)` loads, without loading it: a single file's tensor
    names and shapes (a .safetensors header, no tensor data; a .ckpt is memory-mapped where torch can), a folder's
    layout and configs. Of a Hub id only the configs are fetched (kilobytes), after the checks `load` makes of the
    repo, or none where the cache has the model (`half`: in `load`'s precision); `load` then fetches the weights and
    finds the configs in the cache. The scripts pick their family-dependent defaults with it (SDXL's 1024 px), and
    eval.py refuses shift files of another family, before gigabytes are fetched or loaded; what is wrong with a file
    is `load`'s to say."""
    path = Path(path) if Path(path).exists() else hub.resolve_model(str(path), half=half, configs_only=True)[0]
    if path.is_dir():
        return folder_family(path)
    return detect_family(checkpoint.TensorFile(path).shapes)
