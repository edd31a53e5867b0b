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
from safetensors.torch import save_file

import clip_text
import sd
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
    ckpt = {sd.checkpoint_key("unet", k, family): v for k, v in unet.state_dict().items()}
    ckpt |= {sd.checkpoint_key("vae", k, family): v for k, v in vae.state_dict().items()}
    ckpt |= {sd.checkpoint_key("text_encoder", k, family): v for k, v in text.state_dict().items()}
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
    """Draw original-layout tensors and write one checkpoint file; return the oracle models (diffusers/HF)."""
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


def write_tokenizer_files(folder: Path, bpe_gz: Path, family: str):
    """vocab.json + merges.txt as the Hub's tokenizer/ folders hold them, made from the CLIP BPE file."""
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
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        model_max_length=77, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token=pad, do_lower_case=True, tokenizer_class="CLIPTokenizer")))


SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                 timestep_spacing="leading")


def write_folder(path: Path, family: str, bpe_gz: Path, dtype=torch.float32, variant=None, prediction_type=None):
    """A diffusers folder of random models (as save_pretrained writes them); return the oracle models."""
    o_unet = randomize_(_oracle_unet(family), 11)
    o_vae = randomize_(_oracle_vae(), 12)
    o_text = randomize_(_oracle_text(family), 13)
    for name, m in (("unet", o_unet), ("vae", o_vae), ("text_encoder", o_text)):
        m.to(dtype).save_pretrained(path / name, variant=variant)
        m.float()
    write_tokenizer_files(path / "tokenizer", bpe_gz, family)
    sched = dict(SCHEDULER, prediction_type=prediction_type or ("epsilon" if family == "sd1" else "v_prediction"))
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return dict(unet=o_unet, vae=o_vae, text_encoder=o_text)
