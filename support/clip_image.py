"""CLIP's image and text features, as transformers' CLIPModel.get_image_features / get_text_features give them: the
evaluation's CLIP-I (generated image to real image) and CLIP-T (prompt to generated image), as DreamBooth defines
them. Any CLIPModel checkpoint (ViT-B/32 by default, ViT-L/14, OpenCLIP's in transformers' layout, ...).

The image tower is transformers' CLIPVisionTransformer, its module names the checkpoint's keys (vision_model.*,
visual_projection): patches by a conv without bias, the class embedding in front, learned positions, a LayerNorm
BEFORE the blocks (pre_layrnorm), pre-norm blocks of full (not causal) attention, the class token's state through
post_layernorm, then the projection. The text side is clip_text.py's encoder, the one SD conditions on (the states
after its final LayerNorm), pooled at the EOS token as get_text_features pools, then text_projection.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_text
from support import hf_folder, image_processing

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # DreamBooth's CLIP-I and CLIP-T model (ViT-B/32)
WHAT = "a CLIP model (transformers' CLIPModel)"

# transformers' CLIPVisionConfig and CLIPTextConfig defaults, for the keys a config.json leaves out
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     eos_token_id=49407)
ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI's CLIP: x·σ(1.702x); OpenCLIP's: exact gelu (clip_text.activation)


@dataclass
class VisionConfig:
    width: int
    layers: int
    heads: int
    intermediate: int
    channels: int
    image_size: int
    patch_size: int
    act: str
    eps: float
    projection_dim: int


def sub_config(cfg: dict, name: str, defaults: dict) -> dict:
    """config.json's vision_config or text_config with transformers' defaults for what it leaves out. Old files
    (openai/clip-vit-large-patch14's) also hold a vision_config_dict / text_config_dict, which CLIPConfig reads
    instead: its values, and the defaults for the rest (so such a file's text_config eos_token_id 2 is not used)."""
    if isinstance(cfg.get(f"{name}_dict"), dict):
        return {**defaults, **cfg[f"{name}_dict"]}
    return {**defaults, **(cfg.get(name) or {})}


def configs(cfg: dict, where) -> tuple[VisionConfig, clip_text.TextConfig, dict]:
    """config.json -> (the image tower's config, the text encoder's, the text_config dict it came from), or one
    line saying why the model is not a CLIP this port runs."""
    if cfg.get("model_type") != "clip":
        raise ValueError(f"{where}: not {WHAT}: config.json's model_type is {cfg.get('model_type')!r}, not 'clip'")
    v, t = sub_config(cfg, "vision_config", VISION_DEFAULTS), sub_config(cfg, "text_config", TEXT_DEFAULTS)
    for side, c in (("vision", v), ("text", t)):
        if c["hidden_act"] not in ACTIVATIONS:
            raise ValueError(f"{where}: {side}_config hidden_act {c['hidden_act']!r} is not CLIP's (quick_gelu, gelu)")
    if not isinstance(v["image_size"], int) or not isinstance(v["patch_size"], int):
        raise ValueError(f"{where}: vision_config image_size and patch_size must be single numbers (square images)")
    # The text is tokenized by clip_text.Tokenizer with the CLIP vocabulary shipped with the project, which every
    # OpenAI and OpenCLIP text tower uses; a model with another vocabulary or context is not one of them.
    if (t["vocab_size"], t["max_position_embeddings"]) != (49408, clip_text.CONTEXT_LENGTH):
        raise ValueError(f"{where}: text_config vocab_size {t['vocab_size']} / max_position_embeddings "
                         f"{t['max_position_embeddings']}: not CLIP's vocabulary of 49,408 tokens and context of 77")
    if t["eos_token_id"] not in (2, clip_text.EOS):  # 2: the value old configs hold, see CLIP.text_features
        raise ValueError(f"{where}: text_config eos_token_id {t['eos_token_id']} is not CLIP's <|endoftext|>")
    vision = VisionConfig(v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"], v["intermediate_size"],
                          v["num_channels"], v["image_size"], v["patch_size"], v["hidden_act"], v["layer_norm_eps"],
                          cfg.get("projection_dim", 512))
    return vision, clip_text.config_from_diffusers(t), t


# ---------------------------------------------------------------------------------------------------------------
# The image tower (transformers' CLIPVisionModelWithProjection, under CLIPModel's names)


def self_attention(q, k, v, heads: int):
    """Multi-head attention where every token sees every token (an image has no order to mask)."""
    B, T, C = q.shape
    q, k, v = (t.reshape(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        return self.out_proj(self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(cfg.width, eps=cfg.eps), CLIPAttention(cfg)
        # the text encoder's MLP (VisionConfig has its width, intermediate and act)
        self.layer_norm2, self.mlp = nn.LayerNorm(cfg.width, eps=cfg.eps), clip_text.CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        # OpenAI's conv1 has no bias: pre_layrnorm, right after, would take any constant out again
        self.patch_embedding = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, patches, width], rows first
        x = torch.cat([self.class_embedding.expand(len(pixels), 1, -1), patches], dim=1)
        # position i is row i of the table: the checkpoint's position_ids buffer (0, 1, ...) is not needed
        return x + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # (sic: transformers' name, the checkpoint's key)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixels):
        """[B, 3, H, W] -> the class token's final state, after post_layernorm (transformers' pooler_output)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPImageTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels):
        return self.visual_projection(self.vision_model(pixels))


# ---------------------------------------------------------------------------------------------------------------
# Loading, and the features


def route(key: str, text_cfg: clip_text.TextConfig):
    """A CLIPModel checkpoint key -> (part, our module key), or None for what the features do not use."""
    if key.endswith("position_ids"):  # a buffer of 0, 1, 2, ... that old .bin files still hold
        return None
    if key.startswith(("vision_model.", "visual_projection.")):
        return "image", key
    if key.startswith("text_model."):
        new = clip_text.diffusers_to_original(key, text_cfg)
        return None if new is None else ("text", new)
    if key == "text_projection.weight":
        return "text_projection", "weight"
    if key == "logit_scale":  # the temperature of CLIP's training loss; the metrics are plain cosines
        return None
    raise ValueError(f"unexpected tensor {key!r}: not a CLIPModel checkpoint")


class CLIP:
    """A loaded CLIP: `image_features` and `text_features`, both [N, projection_dim] float32 and UNNORMALISED, as
    transformers returns them; the caller divides by the norms for cosine similarities (CLIP-I, CLIP-T)."""

    def __init__(self, image, text, text_projection, text_config: dict, preprocess, source: str):
        self.image, self.text, self.text_projection = image, text, text_projection
        self.eos_token_id = text_config["eos_token_id"]
        self.tokenizer = clip_text.Tokenizer.from_bpe(clip_text.find_bpe_vocab(), clip_text.EOS)
        self.preprocess = preprocess  # image_processing.Preprocess, from the repo's preprocessor_config.json
        self.source = source          # the folder, or "owner/name@commit"
        self.device, self.dtype = text_projection.weight.device, text_projection.weight.dtype

    @torch.inference_mode()
    def image_features(self, images, batch_size: int = 32) -> torch.Tensor:
        """PIL images -> [N, D] CLIPModel.get_image_features of their preprocessed pixels (unnormalised)."""
        out = [self.image(self.preprocess(images[i:i + batch_size]).to(self.device, self.dtype)).float()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.text_projection.out_features)

    @torch.inference_mode()
    def text_features(self, prompts, batch_size: int = 64) -> torch.Tensor:
        """Prompts -> [N, D] CLIPModel.get_text_features (unnormalised): the final LayerNorm's state at the EOS token,
        projected. CLIP's text attention is causal, so the padding after EOS changes nothing there."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = []
        for i in range(0, len(prompts), batch_size):
            ids = self.tokenizer(prompts[i:i + batch_size]).to(self.device)
            states = self.text(ids)
            # transformers' rule: configs from before its fix hold eos_token_id 2, and the EOS is then found as the
            # highest id (<|endoftext|> is the last of the vocabulary); else the first position of eos_token_id
            eos = ids.argmax(-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(-1)
            out.append(self.text_projection(states[torch.arange(len(ids), device=ids.device), eos]).float())
        return torch.cat(out) if out else torch.empty(0, self.text_projection.out_features)


def _check(folder, name):
    """The configs of a CLIP folder -> (vision config, text config, text_config dict, Preprocess); ValueError for a
    model that is not one, or whose preprocessing does not make the images its tower takes."""
    vision, text, text_dict = configs(hf_folder.read_json(folder, "config.json"), name)
    preprocess = image_processing.from_config(hf_folder.read_json(folder, "preprocessor_config.json"),
                                              "CLIPImageProcessor", f"{name}: preprocessor_config.json")
    if preprocess.output_size() != (vision.image_size,) * 2:
        raise ValueError(f"{name}: preprocessor_config.json makes images of {preprocess.output_size()} pixels, but the "
                         f"model takes {vision.image_size} x {vision.image_size}")
    return vision, text, text_dict, preprocess


def load(spec: str = DEFAULT_CLIP, device="cpu", dtype=torch.float32) -> CLIP:
    """A CLIP from a local transformers folder (config.json, preprocessor_config.json, model.safetensors or
    pytorch_model.bin) or a Hub id (those files alone are fetched, the cache first). A model that is not a CLIP is
    one ValueError line, before its weights are read or fetched."""
    folder, source, (vision, text_cfg, text_dict, preprocess) = hf_folder.locate(
        spec, lambda f: _check(f, spec), WHAT, DEFAULT_CLIP)
    parts = hf_folder.read_weights(folder, lambda key: route(key, text_cfg), device, dtype)
    image = hf_folder.build(lambda: CLIPImageTower(vision), parts.get("image", {}), "CLIP image", folder)
    text_state = parts.get("text", {})
    if text_cfg.family == "sd2":  # OpenCLIP's text tower (gelu): clip_text keeps it under OpenCLIP's names
        text_state = clip_text.openclip_from_hf(text_state)
    text = hf_folder.build(lambda: clip_text.build_text_encoder(text_cfg), text_state, "CLIP text", folder)
    for m in text.modules():  # clip_text builds its norms with CLIP's 1e-5; follow the config if it says otherwise
        if isinstance(m, nn.LayerNorm):
            m.eps = text_dict["layer_norm_eps"]
    projection = hf_folder.build(lambda: nn.Linear(text_cfg.width, vision.projection_dim, bias=False),
                                 parts.get("text_projection", {}), "CLIP text projection", folder)
    return CLIP(image, text, projection, text_dict, preprocess, source)
