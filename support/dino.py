"""DINO's image features as DreamBooth measures subject fidelity with them (its "DINO" metric): the self-supervised
ViT-S/16 (facebook/dino-vits16, transformers' ViTModel), the [CLS] token's state after the final LayerNorm —
`ViTModel(...).last_hidden_state[:, 0]`, which is also the original DINO code's output (the norm, then token 0).

Module names are the checkpoint's keys (embeddings.*, encoder.layer.N.attention.attention.query, ...), which
transformers 5 still writes although it renames the modules in memory. The architecture comes from config.json.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

import clip_text
from support import hf_folder, image_processing
from support.clip_image import self_attention

DEFAULT_DINO = "facebook/dino-vits16"  # DreamBooth's DINO model (ViT-S/16)
WHAT = "a DINO ViT model (transformers' ViTModel)"

# transformers' ViTConfig defaults, for the keys a config.json leaves out (1e-12: BERT's LayerNorm epsilon, which
# ViTConfig kept; DINO's own code used 1e-6, and its converted config.json keeps transformers' value)
DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True)


@dataclass
class ViTConfig:
    width: int
    layers: int
    heads: int
    intermediate: int
    act: str
    eps: float
    image_size: int
    patch_size: int
    channels: int
    qkv_bias: bool


def config(cfg: dict, where) -> ViTConfig:
    """config.json -> ViTConfig, or one line saying why the model is not a ViT this port runs."""
    if cfg.get("model_type") != "vit":
        raise ValueError(f"{where}: not {WHAT}: config.json's model_type is {cfg.get('model_type')!r}, not 'vit'")
    architectures = cfg.get("architectures") or ["ViTModel"]
    if "ViTModel" not in architectures:  # e.g. ViTForImageClassification: a supervised classifier, keys under vit.
        raise ValueError(f"{where}: not {WHAT}: config.json's architectures are {architectures}")
    c = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if c["hidden_act"] not in ("gelu", "quick_gelu"):
        raise ValueError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (gelu, quick_gelu)")
    if not isinstance(c["image_size"], int) or not isinstance(c["patch_size"], int):
        raise ValueError(f"{where}: image_size and patch_size must be single numbers (square images)")
    return ViTConfig(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["intermediate_size"],
                     c["hidden_act"], c["layer_norm_eps"], c["image_size"], c["patch_size"], c["num_channels"],
                     c["qkv_bias"])


# ---------------------------------------------------------------------------------------------------------------
# The model


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query, self.key, self.value = (nn.Linear(cfg.width, cfg.width, bias=cfg.qkv_bias) for _ in range(3))

    def forward(self, x):
        return self_attention(self.query(x), self.key(x), self.value(x), self.heads)


class ViTSelfOutput(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention, self.output = ViTSelfAttention(cfg), ViTSelfOutput(cfg)

    def forward(self, x):
        return self.output.dense(self.attention(x))


class ViTIntermediate(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.intermediate)


class ViTOutput(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate, cfg.width)


class ViTLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.act = cfg.act
        self.layernorm_before, self.attention = nn.LayerNorm(cfg.width, eps=cfg.eps), ViTAttention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.intermediate, self.output = ViTIntermediate(cfg), ViTOutput(cfg)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(clip_text.activation(self.intermediate.dense(self.layernorm_after(x)), self.act))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer(cfg) for _ in range(cfg.layers)])


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.width))
        self.position_embeddings = nn.Parameter(torch.empty(1, (cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)

    def forward(self, pixels):
        patches = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)  # [B, patches, width]
        return torch.cat([self.cls_token.expand(len(pixels), -1, -1), patches], dim=1) + self.position_embeddings


class ViTModel(nn.Module):
    """The pooler of transformers' ViTModel (a dense layer and tanh on the [CLS] state) is not built, and its
    weights, where a checkpoint holds them, are left unread: DINO's network ends at the final norm, so such weights
    come from transformers' initialisation, not from DINO's training, and the metric is the [CLS] state itself."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings, self.encoder = ViTEmbeddings(cfg), ViTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixels):
        """[B, 3, H, W] -> [B, width]: last_hidden_state[:, 0] (the norm acts on each token alone, so on it alone)."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x[:, 0])


# ---------------------------------------------------------------------------------------------------------------
# Loading, and the features


def route(key: str):
    """A ViTModel checkpoint key -> ("vit", key), or None for the pooler (see ViTModel)."""
    if key.startswith("pooler."):
        return None
    if key.startswith(("embeddings.", "encoder.layer.", "layernorm.")):
        return "vit", key
    raise ValueError(f"unexpected tensor {key!r}: not a ViTModel checkpoint")


class DINO:
    """A loaded DINO ViT: `image_features` gives [N, width] float32, UNNORMALISED as transformers returns it; the
    caller divides by the norms for cosine similarities (DreamBooth's DINO score)."""

    def __init__(self, model: ViTModel, preprocess, source: str):
        self.model = model
        self.preprocess = preprocess  # image_processing.Preprocess, from the repo's preprocessor_config.json
        self.source = source          # the folder, or "owner/name@commit"
        self.device, self.dtype = model.layernorm.weight.device, model.layernorm.weight.dtype

    @torch.inference_mode()
    def image_features(self, images, batch_size: int = 32) -> torch.Tensor:
        """PIL images -> [N, width]: ViTModel(pixel_values).last_hidden_state[:, 0] (unnormalised)."""
        out = [self.model(self.preprocess(images[i:i + batch_size]).to(self.device, self.dtype)).float()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.model.layernorm.normalized_shape[0])


def _check(folder, name):
    cfg = config(hf_folder.read_json(folder, "config.json"), name)
    preprocess = image_processing.from_config(hf_folder.read_json(folder, "preprocessor_config.json"),
                                              "ViTImageProcessor", f"{name}: preprocessor_config.json")
    if preprocess.output_size() != (cfg.image_size,) * 2:
        raise ValueError(f"{name}: preprocessor_config.json makes images of {preprocess.output_size()} pixels, but the "
                         f"model takes {cfg.image_size} x {cfg.image_size}")
    return cfg, preprocess


def load(spec: str = DEFAULT_DINO, device="cpu", dtype=torch.float32) -> DINO:
    """A DINO ViT from a local transformers folder (config.json, preprocessor_config.json, model.safetensors or
    pytorch_model.bin) or a Hub id (those files alone are fetched, the cache first). A model that is not a ViTModel
    (a CLIP, a DINOv2, a classifier) is one ValueError line, before its weights are read or fetched."""
    folder, source, (cfg, preprocess) = hf_folder.locate(spec, lambda f: _check(f, spec), WHAT, DEFAULT_DINO)
    parts = hf_folder.read_weights(folder, route, device, dtype)
    return DINO(hf_folder.build(lambda: ViTModel(cfg), parts.get("vit", {}), "ViT", folder), preprocess, source)
