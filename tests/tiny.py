"""Tiny random Stable Diffusion models written in BOTH official layouts, with the diffusers/transformers oracle
loaded from the same numbers.

Single file: our random modules give the original-layout tensors; diffusers' OWN converters
(convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint /
convert_open_clip_checkpoint) turn them into the oracle's weights, so the oracle's mapping, not ours, decides.
Folder: random diffusers/transformers models saved with save_pretrained, as the Hub folders are.
"""
import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import clip_text
from support import loading
import unet as unet_lib
import vae as vae_lib

TEXT_WIDTH = 64  # heads = width / 64 is the fixed CLIP rule, so 64 is the smallest width with one head


def unet_config(family):
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH)
    if family == "sd1":  # 8 heads everywhere (diffusers calls the head count attention_head_dim)
        return dict(common, block_out_channels=(32, 64), attention_head_dim=8)
    # sd2: head dim 64 -> heads = channels / 64; linear proj_in/out; fp32 attention
    return dict(common, block_out_channels=(64, 128), attention_head_dim=(1, 2), use_linear_projection=True,
                upcast_attention=True)


# four levels like SD's VAE, so the latent is H/8 x W/8 as in the real model
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, layers_per_block=1,
                  block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)


def text_config(family):
    """SD2 has 23 layers: diffusers' OpenCLIP converter hard-codes that block 23 (of 24) is the unused one."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                          num_hidden_layers=2 if family == "sd1" else 23, num_attention_heads=TEXT_WIDTH // 64, max_position_embeddings=77,
                          hidden_act="quick_gelu" if family == "sd1" else "gelu", projection_dim=TEXT_WIDTH,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if family == "sd1" else 0)


def randomize_(module, seed):
    """Default inits leave norms at 1/0 and some layers at 0: perturb every tensor so nothing is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def _oracle_unet(family):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**unet_config(family)).eval()


def _oracle_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(**VAE_CONFIG).eval()


def _oracle_text(family):
    from transformers import CLIPTextModel
    return CLIPTextModel(text_config(family)).eval()


def _hf_text_state(state):
    # transformers >= 5.6 keeps CLIPTextModel keys without the 'text_model.' prefix in memory
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def original_checkpoint(unet, vae, text, family: str) -> dict:
    """Our modules' tensors under their names in an ORIGINAL single-file checkpoint."""
    ckpt = {loading.checkpoint_key("unet", k, family): v for k, v in unet.state_dict().items()}
    ckpt |= {loading.checkpoint_key("vae", k, family): v for k, v in vae.state_dict().items()}
    ckpt |= {loading.checkpoint_key("text_encoder", k, family): v for k, v in text.state_dict().items()}
    return ckpt


def write_ours(path: Path, size="tiny", dtype=torch.float32, device="cpu"):
    """An SD1 single file of OUR modules with random weights and no oracle, so it needs neither diffusers nor
    transformers (the GPU machine has neither). size "tiny": the tiny SD1 architecture, randomized as
    write_single_file randomizes it; "sd15": SD1.5's UNet, VAE and CLIP ViT-L/14 with PyTorch's default inits,
    built on `device` (fast on a GPU). The GPU lane compares runs with each other, not with an oracle."""
    if size == "tiny":
        ucfg, vcfg = unet_lib.config_from_diffusers(unet_config("sd1")), vae_lib.config_from_diffusers(VAE_CONFIG)
        tcfg = clip_text.TextConfig(width=TEXT_WIDTH, layers=2, heads=TEXT_WIDTH // 64, intermediate=4 * TEXT_WIDTH)
    else:
        ucfg, vcfg, tcfg = unet_lib.UNetConfig(), vae_lib.VAEConfig(), clip_text.TextConfig()  # SD1.5's
    torch.manual_seed(0)
    with torch.device(device if size == "sd15" else "cpu"):
        modules = unet_lib.UNet(ucfg), vae_lib.VAE(vcfg), clip_text.build_text_encoder(tcfg)
    if size == "tiny":
        modules = [randomize_(m, seed) for m, seed in zip(modules, (1, 2, 3))]
    ckpt = {k: v.to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in original_checkpoint(*modules, "sd1").items()}
    save_file(ckpt, str(path))


def write_single_file(path: Path, family: str, dtype=torch.float32, extras=True):
    """Draw original-layout tensors and write one checkpoint file; return the oracle models (diffusers/HF).
    family "sdxl": write_sdxl_single_file."""
    if family == "sdxl":
        return write_sdxl_single_file(path, dtype)
    ucfg = unet_lib.config_from_diffusers(unet_config(family))
    ours_unet = randomize_(unet_lib.UNet(ucfg), 1)
    ours_vae = randomize_(vae_lib.VAE(vae_lib.config_from_diffusers(VAE_CONFIG)), 2)
    tcfg = clip_text.config_from_diffusers(text_config(family).to_dict())
    ours_text = randomize_(clip_text.build_text_encoder(tcfg), 3)

    ckpt = original_checkpoint(ours_unet, ours_vae, ours_text, family)
    g = torch.Generator().manual_seed(4)
    if family == "sd2":
        # A real SD2 file holds all 24 OpenCLIP blocks and the projection; SD conditions on the penultimate block,
        # so the last block and the projection must be ignored. Add them with random values.
        prefix, last = "cond_stage_model.model.", f"transformer.resblocks.{tcfg.layers}."
        for k, v in list(ckpt.items()):
            if k.startswith(prefix + "transformer.resblocks.0."):
                ckpt[k.replace("resblocks.0.", f"resblocks.{tcfg.layers}.")] = torch.randn(v.shape, generator=g)
        ckpt[prefix + "text_projection"] = torch.randn(TEXT_WIDTH, TEXT_WIDTH, generator=g)
        assert any(k.startswith(prefix + last) for k in ckpt)
    if extras:  # what official files carry beside the weights
        ckpt["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        ckpt["alphas_cumprod"] = torch.cumprod(1 - ckpt["betas"], 0)
        ckpt["model_ema.decay"] = torch.tensor(0.9999)
        ckpt["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(3, 3)
        if family == "sd1":
            ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        else:
            ckpt["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)

    oracle = oracle_from_checkpoint(ckpt, family)
    ckpt = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in ckpt.items()}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": ckpt, "global_step": 1}, path)
    else:
        save_file(ckpt, str(path))
    if dtype != torch.float32:  # the oracle sees the same rounded numbers
        for m in oracle.values():
            m.to(dtype).float()
    return oracle


def oracle_from_checkpoint(ckpt: dict, family: str):
    """diffusers/transformers models loaded from an original-layout state dict by diffusers' OWN converters."""
    if family == "sdxl":
        return sdxl_oracle_from_checkpoint(ckpt)
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    o_unet = _oracle_unet(family)
    o_unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dict(o_unet.config)), strict=True)
    o_vae = _oracle_vae()
    o_vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dict(o_vae.config)), strict=True)
    o_text = _oracle_text(family)
    text_sd = convert_ldm_clip_checkpoint(ckpt) if family == "sd1" else convert_open_clip_checkpoint(o_text, ckpt)
    text_sd = {k: v for k, v in _hf_text_state(text_sd).items() if k != "embeddings.position_ids"}
    o_text.load_state_dict(text_sd, strict=True)
    return dict(unet=o_unet, vae=o_vae, text_encoder=o_text)


def write_tokenizer_files(folder: Path, bpe_gz: Path, family: str, tokenizer_config: dict | None = None):
    """vocab.json + merges.txt as the Hub's tokenizer/ folders hold them, made from the CLIP BPE file
    (tokenizer_config: the tokenizer_config.json to write, else a minimal one for the family)."""
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    bytes_vocab = list(clip_text.bytes_to_unicode().values())
    vocab = bytes_vocab + [v + "</w>" for v in bytes_vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pad = "<|endoftext|>" if family == "sd1" else "!"
    (folder / "special_tokens_map.json").write_text(json.dumps(
        dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=pad)))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or dict(
        model_max_length=77, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token=pad, do_lower_case=True, tokenizer_class="CLIPTokenizer")))


SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 timestep_spacing="leading")


def write_folder(path: Path, family: str, bpe_gz: Path, dtype=torch.float32, variant=None, prediction_type=None,
                 max_shard_size=None):
    """A diffusers folder of random models (as save_pretrained writes them, in shards of `max_shard_size` if
    given, e.g. "1MB"); return the oracle models."""
    oracle = dict(unet=randomize_(_oracle_unet(family), 11), vae=randomize_(_oracle_vae(), 12),
                  text_encoder=randomize_(_oracle_text(family), 13))
    save_folder(path, oracle, family, bpe_gz, dtype, variant, prediction_type, max_shard_size)
    return oracle


def save_folder(path: Path, oracle: dict, family: str, bpe_gz: Path, dtype=torch.float32, variant=None,
                prediction_type=None, max_shard_size=None):
    """The oracle models (e.g. those write_single_file returns: the same weights) saved as a diffusers folder."""
    if family == "sdxl":
        return save_sdxl_folder(path, oracle, bpe_gz, dtype, variant)
    shard = dict(max_shard_size=max_shard_size) if max_shard_size else {}
    for name, m in oracle.items():
        m.to(dtype).save_pretrained(path / name, variant=variant, **shard)
        m.float()
    write_tokenizer_files(path / "tokenizer", bpe_gz, family)
    sched = dict(SCHEDULER, prediction_type=prediction_type or ("epsilon" if family == "sd1" else "v_prediction"))
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))


# ---------------------------------------------------------------------------------------------------------------
# SDXL: a tiny UNet with the label_emb, the two text encoders (ViT-L in Hugging Face names, bigG in OpenCLIP
# names), SDXL's VAE config. The two encoders have different widths and bigG's projection is not square, so a
# swapped concatenation or a missing transpose cannot pass.

SDXL_TEXT_WIDTH = (64, 128)   # ViT-L, bigG: context width 192 (SDXL: 768 + 1280 = 2048)
SDXL_POOLED = 96              # bigG's projection width (SDXL: 1280)


def sdxl_unet_config():
    """SDXL's unet/config.json in small: no attention at level 0, depth 1 then 2 (SDXL: 2, 10; the middle takes the
    last level's), 64-channel heads, linear proj_in/out, the "text_time" add-embedding on pooled + 6 x 256."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(64, 128, 128),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                cross_attention_dim=sum(SDXL_TEXT_WIDTH), upcast_attention=None, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=SDXL_POOLED + 6 * 256)


SDXL_VAE_CONFIG = dict(VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)


def sdxl_text_configs():
    """text_encoder/ (CLIPTextModel, ViT-L) and text_encoder_2/ (CLIPTextModelWithProjection, bigG) configs, with
    the token ids of SDXL's config.json files (eos_token_id 2: transformers pools at the argmax of the ids)."""
    from transformers import CLIPTextConfig
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    w1, w2 = SDXL_TEXT_WIDTH
    return (CLIPTextConfig(hidden_size=w1, intermediate_size=4 * w1, num_hidden_layers=3, num_attention_heads=w1 // 64,
                           hidden_act="quick_gelu", projection_dim=w1, **ids),
            CLIPTextConfig(hidden_size=w2, intermediate_size=4 * w2, num_hidden_layers=3, num_attention_heads=w2 // 64,
                           hidden_act="gelu", projection_dim=SDXL_POOLED, **ids))


# Original single-file prefixes (diffusers single_file_utils: LDM_UNET_KEY, LDM_VAE_KEYS, LDM_CLIP_PREFIX_TO_REMOVE)
SDXL_PREFIX = dict(unet="model.diffusion_model.", vae="first_stage_model.",
                   text_encoder="conditioner.embedders.0.transformer.", text_encoder_2="conditioner.embedders.1.model.")


def sdxl_checkpoint():
    """Original-layout SDXL tensors drawn with our modules, as a full file holds them (ViT-L with its last layer
    and final norm, which SDXL does not use; schedule buffers, the sgm denoiser's sigmas; bigG's logit_scale), and
    the oracle models loaded from them by diffusers' OWN converters. Returns (ckpt, oracle)."""
    l_cfg, g_cfg = sdxl_text_configs()
    modules = dict(
        unet=randomize_(unet_lib.UNet(unet_lib.config_from_diffusers(sdxl_unet_config())), 21),
        vae=randomize_(vae_lib.VAE(vae_lib.config_from_diffusers(SDXL_VAE_CONFIG, "sdxl")), 22),
        # the file's ViT-L is a whole CLIP text model: every layer and the final norm
        text_encoder=randomize_(clip_text.build_text_encoder(clip_text.config_from_diffusers(l_cfg.to_dict())), 23),
        text_encoder_2=randomize_(clip_text.build_text_encoder(
            clip_text.config_from_diffusers(g_cfg.to_dict(), sdxl=True)), 24))
    ckpt = {}
    for name, m in modules.items():
        family = "sd2" if name == "text_encoder_2" else "sd1"
        ckpt |= {SDXL_PREFIX[name] + clip_text.module_to_original_key(k, family): v for k, v in m.state_dict().items()}
    ckpt["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ckpt["denoiser.sigmas"] = ((1 - torch.cumprod(1 - ckpt["betas"], 0)) / torch.cumprod(1 - ckpt["betas"], 0)) ** 0.5
    ckpt[SDXL_PREFIX["text_encoder"] + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ckpt[SDXL_PREFIX["text_encoder_2"] + "logit_scale"] = torch.tensor(4.6)
    return ckpt, sdxl_oracle_from_checkpoint(ckpt)


def sdxl_oracle_from_checkpoint(ckpt: dict) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    l_cfg, g_cfg = sdxl_text_configs()
    o_unet = UNet2DConditionModel(**sdxl_unet_config()).eval()
    o_unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dict(o_unet.config)), strict=True)
    o_vae = AutoencoderKL(**SDXL_VAE_CONFIG).eval()
    o_vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dict(o_vae.config)), strict=True)
    o_l = CLIPTextModel(l_cfg).eval()
    state = _hf_text_state(convert_ldm_clip_checkpoint(ckpt))
    o_l.load_state_dict({k: v for k, v in state.items() if k != "embeddings.position_ids"}, strict=True)
    o_g = CLIPTextModelWithProjection(g_cfg).eval()
    o_g.load_state_dict(convert_open_clip_checkpoint(o_g, ckpt, prefix=SDXL_PREFIX["text_encoder_2"]), strict=True)
    return dict(unet=o_unet, vae=o_vae, text_encoder=o_l, text_encoder_2=o_g)


def write_sdxl_single_file(path: Path, dtype=torch.float32):
    """An SDXL single-file checkpoint (sd_xl_base_1.0.safetensors in small); returns the oracle models."""
    ckpt, oracle = sdxl_checkpoint()
    save_file({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in ckpt.items()}, str(path))
    if dtype != torch.float32:  # the oracle sees the same rounded numbers
        for m in oracle.values():
            m.to(dtype).float()
    return oracle


def sdxl_tokenizer_config(pad: str) -> dict:
    """tokenizer_config.json of stabilityai/stable-diffusion-xl-base-1.0 (tokenizer/: pad "<|endoftext|>";
    tokenizer_2/: pad "!", which is then an added special token, id 0)."""
    def token(content, normalized, special):
        return dict(content=content, lstrip=False, normalized=normalized, rstrip=False, single_word=False,
                    special=special)
    added = {"49406": token("<|startoftext|>", True, False), "49407": token("<|endoftext|>", False, False)}
    if pad == "!":
        added = {"0": token("!", False, True)} | added
    return {"add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": [],
            "bos_token": "<|startoftext|>", "clean_up_tokenization_spaces": True, "do_lower_case": True,
            "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 77, "pad_token": pad,
            "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}


SDXL_SCHEDULER = dict(_class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085,
                      beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      interpolation_type="linear", prediction_type="epsilon", sample_max_value=1.0,
                      skip_prk_steps=True, steps_offset=1, timestep_spacing="leading", trained_betas=None,
                      use_karras_sigmas=False)


def write_sdxl_folder(path: Path, bpe_gz: Path, dtype=torch.float32, variant=None):
    """An SDXL diffusers folder of random models (as save_pretrained writes them); returns the oracle models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    l_cfg, g_cfg = sdxl_text_configs()
    oracle = dict(unet=randomize_(UNet2DConditionModel(**sdxl_unet_config()), 31),
                  vae=randomize_(AutoencoderKL(**SDXL_VAE_CONFIG), 32),
                  text_encoder=randomize_(CLIPTextModel(l_cfg), 33),
                  text_encoder_2=randomize_(CLIPTextModelWithProjection(g_cfg), 34))
    save_sdxl_folder(path, oracle, bpe_gz, dtype, variant)
    return oracle


def write_sdxl_tokenizers(path: Path, bpe_gz: Path):
    """tokenizer/ and tokenizer_2/ as stabilityai/stable-diffusion-xl-base-1.0 holds them."""
    write_tokenizer_files(path / "tokenizer", bpe_gz, "sd1", sdxl_tokenizer_config("<|endoftext|>"))
    write_tokenizer_files(path / "tokenizer_2", bpe_gz, "sd2", sdxl_tokenizer_config("!"))


def save_sdxl_folder(path: Path, oracle: dict, bpe_gz: Path, dtype=torch.float32, variant=None):
    """The SDXL oracle models (e.g. those write_sdxl_single_file returns: the same weights) saved as a diffusers
    folder, with SDXL's tokenizers, scheduler config and model_index.json."""
    for name, m in oracle.items():
        m.to(dtype).save_pretrained(path / name, variant=variant)
        m.float()
    write_sdxl_tokenizers(path, bpe_gz)
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))


# ---------------------------------------------------------------------------------------------------------------
# The evaluation's models (eval.py: support/clip_image.py, support/dino.py), as transformers writes them

# The repos' preprocessor configs (tests/test_image_processing.py) at the tiny models' 32 px
CLIP_PREPROCESS = {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 32,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
DINO_PREPROCESS = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
                   "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 32}


def tiny_clip(act: str = "quick_gelu"):
    """A random CLIPModel of 32 px images in 8 px patches; the text tower keeps CLIP's real vocabulary."""
    from transformers import CLIPConfig, CLIPModel
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                  patch_size=8, hidden_act=act)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act=act)
    return randomize_(CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)), 21)


def tiny_vit():
    """A random ViTModel as DINO's (gelu, qkv bias), WITH transformers' pooler, whose weights the file then holds."""
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                    patch_size=8)
    return randomize_(ViTModel(cfg), 22)


def save_transformers(model, folder: Path, preprocess: dict, bin_too=True) -> Path:
    """save_pretrained (model.safetensors), the repo's preprocessor_config.json; and a copy of the folder whose weights
    are pytorch_model.bin as transformers 4 pickled it, position_ids buffers included."""
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocess))
    if bin_too:
        old = folder.with_name(folder.name + "-bin")
        old.mkdir()
        state = load_file(folder / "model.safetensors")
        for prefix in ("text_model.", "vision_model."):
            if any(k.startswith(prefix) for k in state):
                n = len(state[f"{prefix}embeddings.position_embedding.weight"])
                state[f"{prefix}embeddings.position_ids"] = torch.arange(n)[None]
        torch.save(state, old / "pytorch_model.bin")
        for f in ("config.json", "preprocessor_config.json"):
            (old / f).write_text((folder / f).read_text())
    return folder
