"""The Stable Diffusion UNet (SD 1.x, 2.x and SDXL) in one file.

Module attribute names are the original checkpoint's keys (minus `model.diffusion_model.`), so an original
file loads with one `load_state_dict`; diffusers keys go through `diffusers_to_original`, a short rule.
SDXL is the same network with three levels, deeper transformers and one more input: `label_emb`, an MLP on
the vector y (pooled text embedding + image sizes, see `label_vector`) added to the time embedding.
Facts: shared/reference/sd_weights_and_sampling.md §1-2, §8.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4               # latent channels (9 for inpainting models)
    out_channels: int = 4
    model_channels: int = 320          # channels of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2            # per level on the way down; the way up has one more (it eats the skips)
    attention_levels: tuple = (0, 1, 2)  # levels with a SpatialTransformer after each ResBlock; SD: all but the last
    num_heads: int | None = 8          # SD1: 8 heads everywhere, so the head dim grows with the channels
    head_dim: int | None = None        # SD2: head dim 64 everywhere, so the head count grows with the channels
    transformer_depth: int | tuple = 1  # blocks per SpatialTransformer: one for all levels (SD1/SD2) or per level
    transformer_depth_middle: int = 1  # (SDXL: (0, 2, 10), level 0 having no attention, and 10 in the middle)
    context_dim: int = 768             # text width: 768 (CLIP ViT-L) SD1, 1024 (OpenCLIP ViT-H) SD2, 2048 SDXL
    linear_proj: bool = False          # SD2/SDXL: Linear proj_in/proj_out (applied after flattening); SD1 1x1 convs
    upcast_attention: bool = False     # SD2 in fp16 overflows in q·k: attention is computed in fp32
    norm_groups: int = 32
    adm_in_channels: int = 0           # width of y for label_emb (SDXL: 2816); 0: no label_emb (SD1/SD2)

    def heads(self, channels: int) -> int:
        return self.num_heads if self.num_heads else channels // self.head_dim

    def depth(self, level: int) -> int:
        return self.transformer_depth if isinstance(self.transformer_depth, int) else self.transformer_depth[level]


# SDXL's y: each of the six size/crop numbers is embedded like a timestep, in this many channels (diffusers'
# addition_time_embed_dim; the original's ConcatTimestepEmbedderND(outdim=256)).
SIZE_EMBED_DIM = 256


class GroupNorm32(nn.GroupNorm):
    """The original GroupNorm32: statistics in fp32 (fp16 variance overflows), result cast back."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the timestep, cos first (the original code's order; diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def label_vector(pooled: torch.Tensor, original_size=(1024, 1024), crop_top_left=(0, 0),
                 target_size=(1024, 1024)) -> torch.Tensor:
    """SDXL's y [B, pooled + 6 x 256]: the pooled text embedding, then (original height, width; crop top, left;
    target height, width), each number embedded like a timestep (cos first). Sizes are pixels, (h, w) pairs, one
    for the batch or one per row ([B, 2]). As diffusers' _get_add_time_ids + add_time_proj + concat."""
    B = pooled.shape[0]
    numbers = torch.cat([torch.as_tensor(v, dtype=torch.float32, device=pooled.device).reshape(-1, 2).expand(B, 2)
                         for v in (original_size, crop_top_left, target_size)], dim=1)  # [B, 6]
    sizes = timestep_embedding(numbers.flatten(), SIZE_EMBED_DIM).reshape(B, -1)
    return torch.cat([pooled.float(), sizes], dim=-1).to(pooled.dtype)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(GroupNorm32(groups, c_out), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb, context):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention (attn1) when context is None, cross-attention (attn2) otherwise."""

    def __init__(self, dim, context_dim, heads, upcast):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.record_probs = False  # set by UNet.record_cross_attention: keep softmax probs for the unmix loss
        self.probs = None

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        B, T, C = q.shape
        # each by its own batch (B,h,T,d): a context of another batch size fails here instead of being folded
        # into longer token sequences
        q, k, v = (t.reshape(t.shape[0], t.shape[1], self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        if self.record_probs:
            out = self.attention_reference(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # fast path: fused kernel, same maths as below
        out = out.to(dtype).transpose(1, 2).reshape(B, T, C)
        return self.to_out(out)

    def attention_reference(self, q, k, v):
        """softmax(q·kᵀ/√d)·v written out; also keeps the probabilities (with their graph) in self.probs."""
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
        self.probs = probs
        return probs @ v


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)  # first half the value, second half the gate
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads, upcast):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels, cfg: UNetConfig, depth: int):
        super().__init__()
        self.linear = cfg.linear_proj
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if cfg.linear_proj else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, cfg.context_dim, cfg.heads(channels), cfg.upcast_attention)
             for _ in range(depth)])
        self.proj_out = proj()

    def forward(self, x, emb, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # image -> tokens
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # tokens -> image
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb, context):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb, context, size=None):
        # nearest x2 in fp32: bf16 upsampling kernels are missing on some devices, and values are unchanged.
        # `size`: the next skip's size, which is not 2x when a latent side is not a multiple of 8 (diffusers' rule)
        up = F.interpolate(x.float(), size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(up.to(x.dtype))


class TimestepEmbedSequential(nn.ModuleList):
    """A block of the original UNet: ResBlocks also take the time embedding, transformers the text context."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, Upsample):
                x = layer(x, emb, context, size)
            elif isinstance(layer, (ResBlock, SpatialTransformer, Downsample)):
                x = layer(x, emb, context)
            else:  # conv_in
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        mc, emb_dim, G = cfg.model_channels, 4 * cfg.model_channels, cfg.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:  # SDXL: y -> the same width, added to the time embedding (the original's nesting)
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        # Way down: conv_in, then per level num_res_blocks x (ResBlock [+ SpatialTransformer]), then a Downsample
        # (not after the last level). Every block's output is kept as a skip.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skips, ch = [mc], mc
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = [ResBlock(ch, mc * mult, emb_dim, G)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    block.append(SpatialTransformer(ch, cfg, cfg.depth(level)))
                self.input_blocks.append(TimestepEmbedSequential(block))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skips.append(ch)

        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, ch, emb_dim, G), SpatialTransformer(ch, cfg, cfg.transformer_depth_middle),
             ResBlock(ch, ch, emb_dim, G)])

        # Way up: per level (deepest first) num_res_blocks + 1 x (ResBlock on [h, skip] [+ SpatialTransformer]),
        # and an Upsample after the last block of every level but the top one.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = [ResBlock(ch + skips.pop(), mc * mult, emb_dim, G)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    block.append(SpatialTransformer(ch, cfg, cfg.depth(level)))
                if level != 0 and i == cfg.num_res_blocks:
                    block.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(block))

        self.out = nn.Sequential(GroupNorm32(G, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context, y=None):
        """x: noisy latents [B, 4, h, w]; t: timestep (int, 0-d or [B]); context: text states [B, 77, C];
        y: SDXL only, the label_emb input [B, adm_in_channels] (`label_vector`)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if bool(self.cfg.adm_in_channels) != (y is not None):
            raise ValueError("an SDXL UNet needs y (unet.label_vector: the pooled text embedding and image sizes)"
                             if y is None else "y is given, but this UNet has no label_emb (it is not SDXL's)")
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        run = self._checkpointed if self.grad_checkpointing and self.training else (lambda b, *a: b(*a))
        h, skips = x, []
        for block in self.input_blocks:
            h = run(block, h, emb, context)
            skips.append(h)
        h = run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = run(block, h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h)

    @staticmethod
    def _checkpointed(block, *args):
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    # Cross-attention maps, for the attention-separation ("unmix") loss of Cut-Mix-Unmix.
    def record_cross_attention(self, on: bool):
        for name, m in self.named_modules():
            if isinstance(m, CrossAttention) and name.endswith("attn2"):
                m.record_probs, m.probs = on, None

    def cross_attention_probs(self) -> list[tuple[str, torch.Tensor]]:
        """(module name, probs [B, heads, h*w, 77]) of every recording attn2, in forward order."""
        return [(n, m.probs) for n, m in self.named_modules()
                if isinstance(m, CrossAttention) and m.record_probs and m.probs is not None]


# ---------------------------------------------------------------------------------------------------------------
# Configuration from a checkpoint


def _depths(attention: tuple, per_level: list, middle: int) -> tuple:
    """(transformer_depth, transformer_depth_middle): one int when all transformers have the same depth (SD1/SD2),
    else one per level, 0 where a level has no attention (SDXL: (0, 2, 10), 10)."""
    used = [d for level, d in enumerate(per_level) if level in attention]
    if all(d == middle for d in used):
        return middle, middle
    return tuple(d if level in attention else 0 for level, d in enumerate(per_level)), middle


def config_from_shapes(shapes: dict, family: str) -> UNetConfig:
    """Architecture of an original-layout UNet from its tensor shapes (keys without `model.diffusion_model.`).
    family: "sd1" (8 heads), "sd2" (64-channel heads, fp32 attention) or "sdxl" (64-channel heads)."""
    mc = shapes["input_blocks.0.0.weight"][0]
    n_in = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks."))
    # resblock output channels of each input block (Downsamples have `op`, ResBlocks have in_layers)
    res_out = {int(k.split(".")[1]): s[0] for k, s in shapes.items()
               if k.startswith("input_blocks.") and k.endswith(".0.in_layers.2.weight")}
    downs = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.") and ".op.weight" in k)
    levels = len(downs) + 1
    num_res = (downs[0] - 1) if downs else (n_in - 1)

    def depth(prefix):  # transformer blocks in the SpatialTransformer at `prefix`
        return 1 + max([int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)], default=-1)

    mult, attention, per_level = [], [], []
    for level in range(levels):
        first = 1 + level * (num_res + 1)
        mult.append(res_out[first] // mc)
        per_level.append(depth(f"input_blocks.{first}.1.transformer_blocks."))
        if f"input_blocks.{first}.1.proj_in.weight" in shapes:
            attention.append(level)
    transformer_depth, middle = _depths(tuple(attention), per_level, depth("middle_block.1.transformer_blocks."))
    to_k = shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
    return UNetConfig(in_channels=shapes["input_blocks.0.0.weight"][1], out_channels=shapes["out.2.weight"][0],
                      model_channels=mc, channel_mult=tuple(mult), num_res_blocks=num_res,
                      attention_levels=tuple(attention), transformer_depth=transformer_depth,
                      transformer_depth_middle=middle, context_dim=to_k[1],
                      linear_proj=len(shapes["middle_block.1.proj_in.weight"]) == 2,
                      num_heads=8 if family == "sd1" else None, head_dim=None if family == "sd1" else 64,
                      upcast_attention=family == "sd2", norm_groups=32,
                      adm_in_channels=shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else 0)


def config_from_diffusers(cfg: dict) -> UNetConfig:
    """Our config from a diffusers unet/config.json (SD 1.x/2.x, or SDXL: addition_embed_type "text_time")."""
    for key in ("class_embed_type", "encoder_hid_dim", "time_cond_proj_dim", "reverse_transformer_layers_per_block"):
        if cfg.get(key):
            raise ValueError(f"unet/config.json sets {key}={cfg[key]!r}: not an SD 1.x/2.x/XL UNet")
    adm = 0
    if cfg.get("addition_embed_type"):
        if cfg["addition_embed_type"] != "text_time" or cfg.get("addition_time_embed_dim") != SIZE_EMBED_DIM:
            raise ValueError(f"unet/config.json: addition_embed_type={cfg['addition_embed_type']!r} with "
                             f"addition_time_embed_dim={cfg.get('addition_time_embed_dim')!r} is not SDXL's "
                             f"(\"text_time\", {SIZE_EMBED_DIM})")
        adm = cfg["projection_class_embeddings_input_dim"]
    down = list(cfg["down_block_types"])
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or \
            cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unet/config.json has blocks {down}: not an SD 1.x/2.x/XL UNet")
    channels = list(cfg["block_out_channels"])
    attention = tuple(i for i, t in enumerate(down) if t.startswith("CrossAttn"))
    depth = cfg.get("transformer_layers_per_block", 1)
    per_level = [depth] * len(channels) if isinstance(depth, int) else list(depth)
    if any(not isinstance(d, int) for d in per_level):
        raise ValueError("unet/config.json: separate transformer depths for the way up are not supported")
    # diffusers' middle block takes the depth of the last level
    transformer_depth, middle = _depths(attention, per_level, per_level[-1])
    # diffusers' `attention_head_dim` is, for SD, the number of heads (a known misnomer): an int for SD1 (8),
    # a per-block list for SD2/SDXL (channels / 64). num_attention_heads, when set, means the same.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    num_heads, head_dim = None, None
    if isinstance(heads, int):
        num_heads = heads
    else:
        dims = {c // h for c, h in zip(channels, heads)}
        if len(set(heads)) == 1:
            num_heads = heads[0]
        elif len(dims) == 1:
            head_dim = dims.pop()
        else:
            raise ValueError("unet/config.json: neither the head count nor the head dim is constant")
    if cfg.get("norm_eps", 1e-5) != 1e-5 or cfg.get("act_fn", "silu") != "silu":
        raise ValueError("unet/config.json: non-SD norm eps or activation")
    if not cfg.get("flip_sin_to_cos", True) or cfg.get("freq_shift", 0) != 0:
        raise ValueError("unet/config.json: the timestep embedding is not SD's (flip_sin_to_cos, freq_shift 0)")
    return UNetConfig(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                      model_channels=channels[0], channel_mult=tuple(c // channels[0] for c in channels),
                      num_res_blocks=cfg.get("layers_per_block", 2), attention_levels=attention,
                      num_heads=num_heads, head_dim=head_dim, transformer_depth=transformer_depth,
                      transformer_depth_middle=middle, context_dim=cfg.get("cross_attention_dim", 768),
                      linear_proj=bool(cfg.get("use_linear_projection", False)),
                      upcast_attention=bool(cfg.get("upcast_attention", False)),
                      norm_groups=cfg.get("norm_num_groups", 32), adm_in_channels=adm)


# ---------------------------------------------------------------------------------------------------------------
# The diffusers -> original key rule (§1.3): block indices are arithmetic on layers_per_block, inner names of
# ResBlocks are renamed, inner names of transformers are the same in both layouts.

RESBLOCK_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_RENAMES = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def diffusers_to_original(key: str, cfg: UNetConfig) -> str:
    L = cfg.num_res_blocks

    def resnet(rest):
        name, _, tail = rest.partition(".")
        if name not in RESBLOCK_RENAMES:
            raise ValueError(f"diffusers UNet key {key!r} cannot be mapped to the original layout")
        return f"{RESBLOCK_RENAMES[name]}.{tail}"

    for old, new in TOP_RENAMES.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if part == "resnets":
                return f"input_blocks.{1 + i * (L + 1) + j}.0.{resnet(rest)}"
            if part == "attentions":
                return f"input_blocks.{1 + i * (L + 1) + j}.1.{rest}"
            if part == "downsamplers":  # downsamplers.0.conv -> op
                return f"input_blocks.{(i + 1) * (L + 1)}.0.op.{rest.removeprefix('conv.')}"
        else:
            n = i * (L + 1) + j
            if part == "resnets":
                return f"output_blocks.{n}.0.{resnet(rest)}"
            if part == "attentions":
                return f"output_blocks.{n}.1.{rest}"
            if part == "upsamplers":  # the Upsample follows the last ResBlock (and its transformer, if any)
                has_attn = (len(cfg.channel_mult) - 1 - i) in cfg.attention_levels
                return f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, j, rest = m.groups()
        if part == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * int(j)}.{resnet(rest)}"
    raise ValueError(f"diffusers UNet key {key!r} cannot be mapped to the original layout")


def original_to_diffusers(key: str, cfg: UNetConfig) -> str:
    """The inverse rule (LoRA export names layers the diffusers way, as kohya and the UIs expect)."""
    L, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    back = {v: k for k, v in RESBLOCK_RENAMES.items()}

    def resnet(rest):
        for old, new in back.items():
            if rest.startswith(old + "."):
                return new + rest[len(old):]
        raise ValueError(f"UNet key {key!r} cannot be mapped to diffusers names")

    for new, old in TOP_RENAMES.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    parts = key.split(".")
    if parts[0] == "input_blocks":
        n, layer, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        i, j = (n - 1) // (L + 1), (n - 1) % (L + 1)
        if j == L:  # the Downsample closing level i
            return f"down_blocks.{i}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        return f"down_blocks.{i}.resnets.{j}.{resnet(rest)}" if layer == "0" else f"down_blocks.{i}.attentions.{j}.{rest}"
    if parts[0] == "middle_block":
        rest = ".".join(parts[2:])
        return "mid_block.attentions.0." + rest if parts[1] == "1" else f"mid_block.resnets.{int(parts[1]) // 2}.{resnet(rest)}"
    if parts[0] == "output_blocks":
        n, layer, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        i, j = n // (L + 1), n % (L + 1)
        has_attn = (levels - 1 - i) in cfg.attention_levels
        if layer == 0:
            return f"up_blocks.{i}.resnets.{j}.{resnet(rest)}"
        if layer == 1 and has_attn:
            return f"up_blocks.{i}.attentions.{j}.{rest}"
        return f"up_blocks.{i}.upsamplers.0.{rest}"
    raise ValueError(f"UNet key {key!r} cannot be mapped to diffusers names")
