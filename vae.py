"""The Stable Diffusion autoencoder (AutoencoderKL, "kl-f8") in one file: SD 1.x, 2.x and SDXL.

Module attribute names are the original checkpoint's keys (minus `first_stage_model.`); diffusers keys go
through `diffusers_to_original`. SDXL's VAE is the same network with other weights, another latent scale and
a need for fp32. Facts: shared/reference/sd_weights_and_sampling.md §4, §8.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALE = 0.18215  # SD 1.x/2.x's scaling_factor (VAEConfig's default; the scripts read model.vae.cfg.scaling_factor)
SDXL_SCALE = 0.13025


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                  # channels of level 0; level i has ch * ch_mult[i]
    ch_mult: tuple = (1, 2, 4, 4)  # 4 levels, 3 downsamples: latents are H/8 x W/8
    num_res_blocks: int = 2        # per level in the encoder; the decoder has one more
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = SCALE  # latents = z * scaling_factor for the UNet (unit variance): SD 0.18215, SDXL 0.13025
    force_upcast: bool = False     # SDXL: activations overflow fp16, so fp16 runs in fp32 (diffusers' force_upcast)


def Normalize(c, groups):
    return GroupNorm32(groups, c, eps=1e-6)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with statistics in fp32 (safe for fp16/bf16 weights), result cast back."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = Normalize(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Normalize(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels. q/k/v/proj_out are 1x1 convs, as in the original file."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = Normalize(c, groups)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)
        self.use_sdpa = True

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(B, C, H * W).transpose(1, 2)[:, None] for t in (self.q(h), self.k(h), self.v(h)))  # B,1,HW,C
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self.attention_reference(q, k, v)
        out = out[:, 0].transpose(1, 2).reshape(B, C, H, W)  # pixels -> image
        return x + self.proj_out(out)

    @staticmethod
    def attention_reference(q, k, v):
        """softmax(q·kᵀ/√C)·v with the softmax in fp32, as diffusers computes it (upcast_softmax)."""
        probs = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return (probs @ v.float()).to(v.dtype)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: pad right and bottom only (the original's quirk)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class Mid(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: ResnetBlocks in `block`, then an optional `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(self, blocks, resample_name=None, resample=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample_name:
            setattr(self, resample_name, resample)

    def forward(self, x):
        for b in self.block:
            x = b(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        G, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, c = nn.ModuleList(), cfg.ch
        for i, c_out in enumerate(chs):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, c_out, G))
                c = c_out
            last = i == len(chs) - 1
            self.down.append(Level(blocks, None if last else "downsample", None if last else Downsample(c)))
        self.mid = Mid(c, G)
        self.norm_out = Normalize(c, G)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        G, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        c = chs[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c, G)
        # `up` is indexed like the encoder's `down` (up.0 is the full-resolution level) but runs deepest first.
        levels = [None] * len(chs)
        for i in reversed(range(len(chs))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, chs[i], G))
                c = chs[i]
            levels[i] = Level(blocks, "upsample" if i else None, Upsample(c) if i else None)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c, G)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, images):
        """images in [-1, 1] -> (mean, logvar) of the latent posterior, NOT multiplied by the scaling factor."""
        if self._run_in_fp32(images):
            with torch.autocast(images.device.type, enabled=False):
                return tuple(t.to(images.dtype) for t in self.encode(images.float()))
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """latents (NOT multiplied by the scaling factor) -> images, about [-1, 1]."""
        if self._run_in_fp32(z):
            with torch.autocast(z.device.type, enabled=False):
                return self.decode(z.float()).to(z.dtype)
        return self.decoder(self.post_quant_conv(z))

    def _run_in_fp32(self, x) -> bool:
        """force_upcast with fp16 anywhere (input, weights or autocast): the call runs in fp32 and returns the input's
        dtype. fp16 weights are made fp32 here for good, as diffusers' SDXL pipeline does (vae.to(float32)); a loader
        that keeps such a VAE in fp32 never needs that. bf16 has fp32's range: no upcast, as in diffusers."""
        if not self.cfg.force_upcast:
            return False
        device = x.device.type
        fp16 = torch.float16 in (x.dtype, self.post_quant_conv.weight.dtype) or \
            (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16)
        if fp16 and self.post_quant_conv.weight.dtype != torch.float32:
            self.float()
        return fp16


# ---------------------------------------------------------------------------------------------------------------
# Configuration and the diffusers -> original key rule (§4.1)


def config_from_shapes(shapes: dict, family: str = "sd1") -> VAEConfig:
    """Architecture from original-layout tensor shapes (keys without `first_stage_model.`). The scale and the fp32
    need are not in the weights: they come with the family ("sd1", "sd2" or "sdxl", from the rest of the file)."""
    ch = shapes["encoder.conv_in.weight"][0]
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
    mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    num_res = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
    return VAEConfig(in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
                     ch=ch, ch_mult=mult, num_res_blocks=num_res, z_channels=shapes["post_quant_conv.weight"][0],
                     norm_groups=32, scaling_factor=SDXL_SCALE if family == "sdxl" else SCALE,
                     force_upcast=family == "sdxl")


def config_from_diffusers(cfg: dict, family: str = "sd1") -> VAEConfig:
    """vae/config.json. force_upcast is honoured for SDXL only: diffusers' SD 1.x/2.x pipeline ignores it, and
    save_pretrained writes its default (true) into every re-saved SD folder."""
    channels = list(cfg["block_out_channels"])
    if any(t != "DownEncoderBlock2D" for t in cfg["down_block_types"]) or cfg.get("use_quant_conv") is False:
        raise ValueError("vae/config.json: not an SD AutoencoderKL")
    return VAEConfig(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                     ch=channels[0], ch_mult=tuple(c // channels[0] for c in channels),
                     num_res_blocks=cfg.get("layers_per_block", 2), z_channels=cfg.get("latent_channels", 4),
                     norm_groups=cfg.get("norm_num_groups", 32), scaling_factor=cfg.get("scaling_factor", SCALE),
                     force_upcast=family == "sdxl" and bool(cfg.get("force_upcast", True)))


# Inner names: diffusers -> original. Both spellings of the attention (to_q... and the older query...).
VAE_RENAMES = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out", "group_norm": "norm",
               "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
               "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def diffusers_to_original(key: str, cfg: VAEConfig) -> str:
    levels = len(cfg.ch_mult)
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", k)
    for old, new in VAE_RENAMES.items():
        k = re.sub(rf"(^|\.){re.escape(old)}\.(weight|bias)$", rf"\g<1>{new}.\2", k)
    if "_blocks" in k or "mid_block" in k:
        raise ValueError(f"diffusers VAE key {key!r} cannot be mapped to the original layout")
    return k
