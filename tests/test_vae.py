"""vae.py equals diffusers' AutoencoderKL, in both key layouts and both attention spellings."""
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

import tiny
from support import loading
import vae as vae_lib

CONFIGS = {"sd-like": tiny.VAE_CONFIG,
           "two-levels": dict(tiny.VAE_CONFIG, layers_per_block=2, block_out_channels=(32, 64),
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)}


def diffs(ours, oracle):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(img)
        dist = oracle.encode(img).latent_dist
        return max((mean - dist.mean).abs().max().item(), (logvar - dist.logvar).abs().max().item(),
                   (ours.decode(mean) - oracle.decode(mean).sample).abs().max().item())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_layout_matches_diffusers_through_its_own_converter(name):
    cfg = vae_lib.config_from_diffusers(CONFIGS[name])
    ours = tiny.randomize_(vae_lib.VAE(cfg), 0)
    oracle = AutoencoderKL(**CONFIGS[name]).eval()
    ckpt = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    oracle.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dict(oracle.config)), strict=True)
    err = diffs(ours, oracle)
    assert err <= 1e-4, f"max abs diff {err:.2e}"
    assert vae_lib.config_from_shapes({k: tuple(v.shape) for k, v in ours.state_dict().items()}) == cfg


@pytest.mark.parametrize("spelling", ["to_q", "query"])
def test_diffusers_layout_loads_in_both_attention_spellings(spelling):
    cfg = vae_lib.config_from_diffusers(tiny.VAE_CONFIG)
    oracle = tiny.randomize_(AutoencoderKL(**tiny.VAE_CONFIG), 1)
    state = oracle.state_dict()
    if spelling == "query":  # the deprecated AttentionBlock names of older diffusers files
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for new_name, old_name in old.items():
            state = {k.replace(f".{new_name}.", f".{old_name}."): v for k, v in state.items()}
    ours = vae_lib.VAE(cfg).eval()
    expected = ours.state_dict()
    mapped = {vae_lib.diffusers_to_original(k, cfg): v for k, v in state.items()}
    ours.load_state_dict({k: loading.fit_shape(v, expected[k].shape) for k, v in mapped.items()}, strict=True)
    err = diffs(ours, oracle)
    assert err <= 1e-4, f"max abs diff {err:.2e}"


def test_sdpa_equals_explicit_attention():
    model = tiny.randomize_(vae_lib.VAE(vae_lib.config_from_diffusers(tiny.VAE_CONFIG)), 0)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fast = model.encode(img)[0]
        for m in model.modules():
            if isinstance(m, vae_lib.AttnBlock):
                m.use_sdpa = False
        slow = model.encode(img)[0]
    assert (fast - slow).abs().max() <= 1e-5
