"""Stable Diffusion 1.x / 2.x / XL in use: load it from the files users already have (`load`: a Hugging Face Hub
id, an original single-file checkpoint or a diffusers folder; the layouts are support/loading.py's), encode prompts,
and generate images from text with DDIM, as diffusers' pipelines do.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from PIL import Image

import clip_text
import ddim
import unet as unet_lib
from support import hub, loading


@dataclass
class StableDiffusion:
    unet: nn.Module | None
    vae: nn.Module | None
    text_encoder: nn.Module | None
    tokenizer: object | None
    family: str                  # "sd1" (CLIP ViT-L text, 768-d context) | "sd2" (OpenCLIP ViT-H, 1024-d) |
                                 # "sdxl" (ViT-L + OpenCLIP ViT-bigG, 2048-d, and the pooled text for label_emb)
    prediction_type: str         # "epsilon" | "v_prediction": not in the weights; from scheduler config or user
    digests: dict = field(default_factory=dict)  # component -> `weights_digest` of its weights AS STORED (sd.load)
    source: str = ""             # what to load again: the absolute local path, or "owner/name@commit" of the Hub
    text_encoder_2: nn.Module | None = None  # SDXL's OpenCLIP ViT-bigG (context and pooled); None for SD1/2
    tokenizer_2: object | None = None        # its tokenizer (pads with 0, as open_clip)


def load(path, device="cpu", dtype=torch.float32, prediction_type=None, vocab=None,
         components=loading.COMPONENTS) -> StableDiffusion:
    """Load an SD 1.x/2.x/XL single-file checkpoint, diffusers folder or Hugging Face Hub id
    ("owner/name[@revision]", `hub.resolve_model`; a local path that exists wins). `components` limits what is built
    (e.g. ("unet",) for benchmarks; "text_encoder" is SDXL's pair of encoders with their tokenizers); `vocab`
    overrides the CLIP BPE file a single file's tokenizers are built from. A VAE that needs fp32 (SDXL's) is loaded
    in fp32 whatever `dtype`."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction type {prediction_type!r} is not one of epsilon, v_prediction")
    bad = set(components) - set(loading.COMPONENTS)
    if bad:
        raise ValueError(f"unknown components {sorted(bad)}; choose from {loading.COMPONENTS}")
    if Path(path).exists():
        path = Path(path)
        source = str(path.resolve())
    else:
        path, source = hub.resolve_model(str(path), half=dtype in loading.HALF)
    if path.is_dir():
        modules, tokenizers, family, file_prediction, digests = loading.load_folder(path, device, dtype, components)
    else:
        modules, tokenizers, family, file_prediction, digests = loading.load_single_file(path, device, dtype,
                                                                                         components, vocab)
    parts = {name: None for name in ("unet", "vae", "text_encoder", "tokenizer")} | modules | tokenizers
    return StableDiffusion(**parts, family=family,
                           prediction_type=prediction_type or file_prediction or "epsilon",
                           digests=digests, source=source)


def default_size(model: StableDiffusion) -> int:
    """The image side used when none is given: 512 for SD 1.x/2.x, 1024 for SDXL."""
    return loading.DEFAULT_SIZE[model.family]


# ---------------------------------------------------------------------------------------------------------------
# Text to image (sample.py, train.py's class images and edit.py all come through here)


class Conditioning(NamedTuple):
    """What the UNet takes beside the latents and the timestep: model.unet(x, t, c.context, c.y)."""
    context: torch.Tensor          # [B, 77, C]: the text states the cross-attention reads
    y: torch.Tensor | None = None  # SDXL: label_emb's input [B, pooled + 6 x 256] (unet.label_vector); else None

    def cat(self, other: "Conditioning") -> "Conditioning":
        """The batch of both, self first (classifier-free guidance: [negative, prompt])."""
        return Conditioning(torch.cat([self.context, other.context]),
                            None if self.y is None else torch.cat([self.y, other.y]))


def _text_states(model: StableDiffusion, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, pooled): SD1/2 one encoder's states, no pooled; SDXL both encoders' penultimate states side by
    side, ViT-L's first ([B, 77, 768 + 1280]), and bigG's pooled, projected EOS state."""
    param = next(model.text_encoder.parameters())
    context = model.text_encoder(model.tokenizer(prompts).to(param.device))
    if model.text_encoder_2 is None:
        return context, None
    context_2, pooled = model.text_encoder_2(model.tokenizer_2(prompts).to(param.device))
    return torch.cat([context, context_2], dim=-1), pooled


def _label(model: StableDiffusion, pooled, original_size, crop_top_left, target_size) -> torch.Tensor:
    target_size = target_size if target_size is not None else (default_size(model),) * 2
    return unet_lib.label_vector(pooled, target_size if original_size is None else original_size, crop_top_left,
                                 target_size)


def encode_prompts(model: StableDiffusion, prompts: list[str], original_size=None, crop_top_left=(0, 0),
                   target_size=None) -> Conditioning:
    """Prompts -> the UNet's conditioning: model.unet(x, t, c.context, c.y).

    SDXL's y also holds its micro-conditioning (ignored for SD 1.x/2.x), (h, w) pixel pairs, one for the batch or
    one per prompt ([B, 2], e.g. each training image's own): `original_size` (default: target_size), the
    `crop_top_left` corner (0, 0), and `target_size` (default: default_size, 1024 x 1024)."""
    context, pooled = _text_states(model, prompts)
    if pooled is None:
        return Conditioning(context)
    return Conditioning(context, _label(model, pooled, original_size, crop_top_left, target_size))


def encode_negative(model: StableDiffusion, negative_prompt: str, n: int, original_size=None, crop_top_left=(0, 0),
                    target_size=None) -> Conditioning:
    """The unconditional half of classifier-free guidance, for n images: the negative prompt encoded. No negative
    prompt ("") is the empty prompt encoded for SD 1.x/2.x, but zeros for SDXL, context and pooled alike: SDXL base's
    `force_zeros_for_empty_prompt`, which diffusers applies when negative_prompt is None (an explicit "" there would
    be encoded; here "" always means none)."""
    if negative_prompt or model.text_encoder_2 is None:
        return encode_prompts(model, [negative_prompt] * n, original_size, crop_top_left, target_size)
    p = next(model.text_encoder_2.parameters())
    like = dict(device=p.device, dtype=p.dtype)
    pooled = torch.zeros(n, model.text_encoder_2.cfg.projection_dim, **like)
    width = model.text_encoder.cfg.width + model.text_encoder_2.cfg.width  # the context of both, side by side
    return Conditioning(torch.zeros(n, clip_text.CONTEXT_LENGTH, width, **like),
                        _label(model, pooled, original_size, crop_top_left, target_size))


def latent_factor(model: StableDiffusion) -> int:
    """Image pixels per latent pixel: 8 for SD's VAE (one downsample per level but the last)."""
    return 2 ** (len(model.vae.cfg.ch_mult) - 1)


def initial_latents(model: StableDiffusion, n: int, height: int, width: int, generator=None) -> torch.Tensor:
    """N(0, I) latents drawn as diffusers draws them (on the generator's device, in the model dtype), so the
    same seed gives the same images: randn((n, 4, H/8, W/8), generator)."""
    param = next(model.unet.parameters())
    f = latent_factor(model)
    gen_device = generator.device if generator is not None else param.device
    z = torch.randn((n, model.unet.cfg.in_channels, height // f, width // f), generator=generator,
                    device=gen_device, dtype=param.dtype)
    return z.to(param.device)


def decode(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """UNet latents -> images in [0, 1] (float32, CPU): divided by the VAE's scale (SD 0.18215, SDXL 0.13025) and
    decoded in the VAE's dtype (fp32 for SDXL's, whatever the UNet's)."""
    vae_dtype = next(model.vae.parameters()).dtype
    images = model.vae.decode(latents.to(vae_dtype) / model.vae.cfg.scaling_factor)
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def text_to_image(model: StableDiffusion, prompts: list[str], negative_prompt: str = "", steps: int = 50,
                  guidance: float = 7.5, eta: float = 0.0, generator=None, height: int | None = None,
                  width: int | None = None, latents=None, progress: bool = True, original_size=None,
                  crop_top_left=(0, 0), target_size=None) -> torch.Tensor:
    """DDIM text-to-image; returns images in [0, 1], [B, 3, H, W] (float32, CPU). height and width default to the
    given latents' size, else default_size (SD 512, SDXL 1024); SDXL's micro-conditioning (encode_prompts) to
    original_size = target_size = (height, width), crop (0, 0), as diffusers' pipeline.

    As StableDiffusionPipeline / StableDiffusionXLPipeline + DDIMScheduler: classifier-free guidance with the
    negative prompt (encode_negative: "" is none) only when guidance > 1, initial latents then each step's η-noise
    from the one generator, in that order."""
    f = latent_factor(model)
    height = height or (latents.shape[-2] * f if latents is not None else default_size(model))
    width = width or (latents.shape[-1] * f if latents is not None else default_size(model))
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    size = (height, width)
    sizes = dict(original_size=size if original_size is None else original_size, crop_top_left=crop_top_left,
                 target_size=size if target_size is None else target_size)
    cond = encode_prompts(model, prompts, **sizes)
    if latents is None:
        latents = initial_latents(model, len(prompts), height, width, generator)
    if guidance > 1:
        both = encode_negative(model, negative_prompt, len(prompts), **sizes).cat(cond)

        def denoise(x, t):
            out_uncond, out_cond = model.unet(torch.cat([x, x]), t, both.context, both.y).chunk(2)
            return ddim.guidance(out_uncond, out_cond, guidance)
    else:
        def denoise(x, t):
            return model.unet(x, t, cond.context, cond.y)

    # SDXL samples with SD's DDIM schedule: its scheduler config has the same scaled_linear betas, "leading"
    # timesteps and steps_offset 1
    latents = ddim.sample(denoise, latents, steps, ddim.alphas_cumprod().to(latents.device), eta=eta,
                          generator=generator, prediction_type=model.prediction_type, progress=progress)
    return decode(model, latents)


def to_pil(images: torch.Tensor):
    """[B, 3, H, W] in [0, 1] -> PIL images, rounded as diffusers rounds (x * 255, round half to even)."""
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def grid(images):
    """One PIL image with the samples in a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    g = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g

